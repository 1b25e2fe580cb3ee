// Data parallelism in the hf runtime: torch's DistributedDataParallel with its defaults, as a
// hand-written loop and accelerate's defaults wrap the model (the Hugging Face Trainer too when
// given ddp_find_unused_parameters=False: otherwise it turns find_unused_parameters on whenever
// HF's own gradient checkpointing is off, and DDP then neither rebuilds its buckets nor lets the
// outputs through uncopied, which is not modelled).
//
// DDP all-reduces gradients in flat buckets the Reducer keeps for the whole run
// (torch/csrc/distributed/c10d/reducer.cpp). Each parameter's AccumulateGrad hook copies its
// gradient into its bucket's slice; a full bucket is all-reduced in place (NCCL's own buffers
// are outside the caching allocator) and copied back into each .grad, which stays a tensor of
// its own (gradient_as_bucket_view=False): a step allocates nothing more than on one GPU, and the
// buckets hold as many bytes again as the gradients. The buckets DDP is constructed with hold
// every parameter; after the first iteration the Reducer rebuilds them (freeing the old ones
// first) in the order the gradients became ready in that iteration's backward, at most 1 MiB for
// the first and 25 MiB for the others, which is what every later step holds. The referee runs
// the real Reducer on a fake process group and records them (python/mst_referee/ddp.py).
#include <algorithm>
#include <span>

#include "builder.hpp"

namespace mst::sim {

// torch's compute_bucket_assignment_by_size for one dtype: parameters join the current bucket
// in order until it holds at least its limit (the first limit, then the second for every later
// bucket); the last bucket takes what remains. Returns each bucket's bytes, in order.
std::vector<bytes_t> ddp_bucket_bytes(std::span<const bytes_t> grad_bytes, bytes_t first_limit, bytes_t limit) {
    std::vector<bytes_t> buckets;
    bytes_t open = 0;
    bool any = false;
    for (const bytes_t b : grad_bytes) {
        open = checked_add(open, b, "DDP bucket bytes");
        any = true;
        if (open >= (buckets.empty() ? first_limit : limit)) {
            buckets.push_back(open);
            open = 0;
            any = false;
        }
    }
    if (any) buckets.push_back(open);
    return buckets;
}

// The buckets the Reducer rebuilds after the first iteration, allocated after the optimizer
// states (the referee registers them there). The order the gradients become ready in comes from
// the same step simulated once without them.
void StepBuilder::hf_ddp_buckets() {
    std::vector<int> ready;
    {
        StepBuilder first(m_, s_, gpu_, false);
        first.grad_ready_ = &ready;
        first.run();
    }
    std::vector<bytes_t> bytes;
    bytes.reserve(ready.size());
    for (int p : ready) bytes.push_back(checked_mul(params_[static_cast<std::size_t>(p)].numel, pg_));
    at("init.ddp_buckets");
    layer_ = -1;
    for (const bytes_t b : ddp_bucket_bytes(bytes, kDdpFirstBucketBytes, kDdpBucketBytes)) alloc("ddp_bucket", b, Category::Gradients);
}

// DDP's forward first broadcasts the module's buffers from rank 0 (broadcast_buffers, on by
// default): torch's _broadcast_coalesced flattens them, one flat tensor per dtype (a cat; a single
// tensor is its own flat view), broadcasts it and copies it back into the buffers.
void StepBuilder::hf_ddp_sync_buffers() {
    struct Group {
        int element;  // bytes per element: the dtype
        int tensors;
        bytes_t bytes;
    };
    std::vector<Group> groups;  // by first appearance
    for (const HfBuffer& b : hf_buffers()) {
        auto it = std::find_if(groups.begin(), groups.end(), [&](const Group& g) { return g.element == b.element_bytes; });
        if (it == groups.end()) groups.push_back(Group{b.element_bytes, 1, b.bytes});
        else ++it->tensors, it->bytes += b.bytes;
    }
    at("ddp.broadcast_buffers");
    for (const Group& g : groups) {
        if (g.tensors < 2) continue;
        T flat = alloc("ddp_buffers", g.bytes, Category::Transient);
        drop(flat);  // copied back into the buffers
    }
}

}  // namespace mst::sim
