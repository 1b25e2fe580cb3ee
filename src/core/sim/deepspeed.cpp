// ZeRO 1 and 2 in the hf runtime: DeepSpeed's engine (deepspeed 0.19.8, runtime/engine.py and
// runtime/zero/stage_1_and_2.py) with the defaults mst-plan's ds_config.json keeps (bf16,
// contiguous_gradients on, multi-rank bucket all-reduce) and the setup's reduce_bucket_size
// (DeepSpeed's default 5e8 unless the file sets it) and overlap_comm (off unless it sets it),
// as the Hugging Face Trainer sets it up: the trainable parameters as one group, DeepSpeed's FusedAdam.
// The referee runs that engine on fake tensors and records it (python/mst_referee/deepspeed_zero.py).
//
// * Init. The bf16 parameters are views into one flat buffer, model.parameters() in order, padded
//   to a multiple of 2 x dp elements (the NCCL start alignment of bf16 times the ranks). Each rank
//   owns 1/dp of it, its partition: the master copy of it (fp32; bf16 with the bf16 master flags of
//   precision pure-bf16) and Adam's two states in the same dtype. FusedAdam's overflow flag and the
//   engine's last gradient norm are two more scalars.
// * Backward. engine.backward divides the loss by the accumulation steps and multiplies it by the
//   loss scale (1 in bf16): two scalars, and two nodes whose gradients are scalars. The engine's hook
//   on each parameter's AccumulateGrad makes the gradient bucket (reduce_bucket_size bf16 elements;
//   with overlap_comm a second one, and each reduction that overflows a bucket turns to the other)
//   at a backward's first gradient, then (ZeRO-2) moves each gradient into it and frees autograd's:
//   a gradient that would overflow it reduces what it holds first; one larger than the bucket stays
//   where it is and is reduced alone, by the next hook. A reduction flattens its gradients' slices
//   (a cat, unless they are one slice: consecutive slices bound for one rank merge), and copies the
//   gradients of parameters this rank's partition touches into grads_in_partition, made at the first
//   such copy: those parameters' gradients, whole. ZeRO-1 keeps autograd's gradients (they
//   accumulate as without ZeRO) and reduces them after the last micro-step's backward, in parameter
//   order (with overlap_comm: in that backward's hooks, as ZeRO-2 does, the gradients of other
//   partitions left as views of the buckets). After backward the epilogue reduces what the bucket
//   holds, keeps the partition's gradients for the step (the first backward's; a later one's are
//   added into them and freed), frees the buckets and clears every .grad.
// * Step. An overflow check (two scalars per piece of the partition), the norm in fp64 (a copy of
//   each piece, one at a time), clipping; the partition's gradient flattened (a cat of its pieces)
//   and made the master's dtype (fp32: a copy), the kept gradients freed; Adam in place; the
//   flattened gradient freed.
//
// Ranks differ: the gradients of another partition are reduced at other hooks, and its pieces
// differ. Every rank is walked (walked_ranks).
#include <algorithm>

#include "builder.hpp"

namespace mst::sim {

namespace {
constexpr std::int64_t kStartAlignment = 2;             // nccl_start_alignment_factor for bf16
constexpr int kGradBytes = 2;                           // bf16 gradients, buckets and grads_in_partition
}  // namespace

bool StepBuilder::ds_in_partition(int p) const {
    const std::int64_t start = ds_.start[static_cast<std::size_t>(p)];
    return start < ds_.hi && start + params_[static_cast<std::size_t>(p)].numel > ds_.lo;
}

void StepBuilder::ds_init_state() {
    const std::int64_t ranks = s_.dp;
    ds_.start.assign(params_.size(), 0);
    std::int64_t total = 0;
    for (int i : order_) {
        ds_.start[static_cast<std::size_t>(i)] = total;
        total = checked_add(total, params_[static_cast<std::size_t>(i)].numel, "parameters");
    }
    const std::int64_t align = checked_mul(kStartAlignment, ranks);
    const std::int64_t padded = checked_mul(ceil_div(total, align), align);
    ds_.partition = padded / ranks;
    ds_.lo = checked_mul(rank_, ds_.partition);
    ds_.hi = ds_.lo + ds_.partition;
    ds_.pieces.clear();
    ds_.partition_grads = 0;
    for (int i : order_)
        if (ds_in_partition(i)) {
            const std::int64_t start = ds_.start[static_cast<std::size_t>(i)], n = params_[static_cast<std::size_t>(i)].numel;
            ds_.pieces.push_back(DsPiece{i, std::min(start + n, ds_.hi) - std::max(start, ds_.lo)});
            ds_.partition_grads += n;
        }
    ds_.pad = std::max<std::int64_t>(0, ds_.hi - std::max(total, ds_.lo));
    ds_.held.assign(params_.size(), T{});

    at("init.weights");
    layer_ = -1;
    alloc("flat_bf16", checked_mul(padded, pw_), Category::Weights);
    init_hf_buffers();
    const int master = ds_master_bytes();  // (the states in the same dtype: validate_hf_scope)
    at("init.master_weights");
    alloc("partition_master", checked_mul(ds_.partition, master), Category::MasterWeights);
    at("init.optimizer_state");
    alloc("exp_avg", checked_mul(ds_.partition, master), Category::OptimizerState);
    alloc("exp_avg_sq", checked_mul(ds_.partition, master), Category::OptimizerState);
    at("init.deepspeed");
    alloc("fused_adam_overflow_buf", 4, Category::Workspace);
    ds_.global_norm = alloc("global_grad_norm", 4, Category::Workspace);
}

void StepBuilder::ds_loss_scaling() {
    at("deepspeed.backward");
    ds_.loss_div = alloc("loss_div_accumulation", 4, Category::Transient);
    ds_.loss_mul = alloc("loss_mul_scale", 4, Category::Transient);
}

void StepBuilder::ds_grad_hook(int p) {
    const char* op = op_;
    at("deepspeed.grad_hook");
    if (!ds_.bucket[0].valid()) {  // setup_buckets
        for (int i = 0; i < (s_.overlap_comm ? 2 : 1); ++i)
            ds_.bucket[i] = alloc("ipg_bucket", checked_mul(s_.reduce_bucket_size, kGradBytes), Category::Gradients);
        ds_.index = 0;
    }
    // ZeRO-2 reduces in the hooks; ZeRO-1 there too with overlap_comm, in the last micro-step
    const bool boundary = micro_ == tl_.micro_steps_recorded - 1;
    if (s_.zero_stage == 2 || (s_.overlap_comm && boundary)) ds_take_into_bucket(p);
    at(op);
}

void StepBuilder::ds_take_into_bucket(int p) {
    Param& P = params_[static_cast<std::size_t>(p)];
    if (ds_.elements + P.numel > s_.reduce_bucket_size) {
        ds_reduce_bucket();
        if (s_.overlap_comm) ds_.index = 1 - ds_.index;  // the next gradients go to the other bucket
    }
    if (P.numel > s_.reduce_bucket_size) {
        ds_.extra = p;  // reduced where it is
    } else {
        drop(P.grad);  // copied into the bucket; .grad becomes a view of it
        int& last = ds_.last_view[ds_.index];  // (the flat buffer is in parameter order)
        if (s_.zero_stage == 1 && !ds_in_partition(p) &&
            (last < 0 || ds_.start[static_cast<std::size_t>(p)] > ds_.start[static_cast<std::size_t>(last)]))
            last = p;
    }
    ds_.elements += P.numel;
    ds_.in_bucket.push_back(p);
}

void StepBuilder::ds_reduce_bucket() {
    at("deepspeed.reduce");
    // average_tensor: each gradient's slice per rank it spans, in bucket order, a slice merged into the
    // one before when both go to one rank (rank_and_offsets)...
    std::vector<std::int64_t>& slices = ds_.slices;
    slices.clear();
    std::int64_t previous = -1;
    for (int p : ds_.in_bucket) {
        const std::int64_t start = ds_.start[static_cast<std::size_t>(p)], end = start + params_[static_cast<std::size_t>(p)].numel;
        for (std::int64_t from = start; from < end;) {
            const std::int64_t rank = from / ds_.partition, to = std::min(end, checked_mul(rank + 1, ds_.partition));
            if (rank == previous) slices.back() += to - from;
            else slices.push_back(to - from);
            previous = rank;
            from = to;
        }
    }
    // ... then flattened (a cat, unless one slice) in groups closed once past reduce_bucket_size
    // elements (allreduce_and_scatter)
    std::int64_t group = 0, count = 0;
    for (std::size_t i = 0; i < slices.size(); ++i) {
        group += slices[i], ++count;
        if (group <= s_.reduce_bucket_size && i + 1 < slices.size()) continue;
        if (count >= 2) {
            T flat = alloc("reduce_flat", checked_mul(group, kGradBytes), Category::Transient);
            drop(flat);
        }
        group = count = 0;
    }
    for (int p : ds_.in_bucket) {
        Param& P = params_[static_cast<std::size_t>(p)];
        if (ds_in_partition(p)) {
            ds_copy_into_partition(p);
        } else if (p == ds_.extra) {
            if (s_.zero_stage == 2) drop(P.grad);              // clear_grad_attribute
            else ds_.held[static_cast<std::size_t>(p)] = std::exchange(P.grad, T{});  // ZeRO-1: .grad keeps it
        }
    }
    ds_.elements = 0;
    ds_.in_bucket.clear();
    ds_.extra = -1;
}

void StepBuilder::ds_copy_into_partition(int p) {
    if (!ds_.partition_grad.valid())
        ds_.partition_grad = alloc("grads_in_partition", checked_mul(ds_.partition_grads, kGradBytes), Category::Gradients);
    if (p == ds_.extra) drop(params_[static_cast<std::size_t>(p)].grad);  // .grad becomes its slice of it
}

void StepBuilder::ds_after_backward(T& root) {
    drop(root);  // backward() returns
    const bool boundary = micro_ == tl_.micro_steps_recorded - 1;
    if (s_.zero_stage == 1) {
        if (!boundary) {  // ZeRO-1 reduces at the accumulation boundary only
            drop(ds_.loss_mul), drop(ds_.loss_div);
            return;
        }
        if (!s_.overlap_comm) {  // (with it, the hooks have reduced them)
            at("deepspeed.reduce_gradients");
            for (int p : order_)
                if (params_[static_cast<std::size_t>(p)].grad.valid()) ds_take_into_bucket(p);
        }
    }
    // independent_gradient_partition_epilogue
    ds_reduce_bucket();
    at("deepspeed.epilogue");
    if (!ds_.averaged.valid()) ds_.averaged = hold(ds_.partition_grad);  // all_grad_tensors: views of it
    if (boundary && ds_.pad > 0)  // get_flat_partition: zeros past the last parameter
        ds_.pad_zeros = alloc("partition_pad", checked_mul(ds_.pad, kGradBytes), Category::Transient);
    // _release_ipg_buffers (the list of buckets cleared, the last first), then _clear_param_grad_only in
    // parameter order: the views of grads_in_partition let go; ZeRO-1's gradients of other partitions
    // are their own tensors or views of a bucket, which goes with the last of them
    for (int i = 1; i >= 0; --i)
        if (ds_.last_view[i] < 0) drop(ds_.bucket[i]);
    drop(ds_.partition_grad);
    for (int p : order_) {
        drop(ds_.held[static_cast<std::size_t>(p)]);
        for (int i = 0; i < 2; ++i)
            if (ds_.last_view[i] == p) drop(ds_.bucket[i]);
    }
    ds_.last_view[0] = ds_.last_view[1] = -1;
    drop(ds_.loss_mul), drop(ds_.loss_div);  // engine.backward returns
}

T StepBuilder::ds_then(T& from, const char* name, bytes_t bytes) {
    T to = alloc(name, bytes, Category::Transient);
    drop(from);
    return to;
}

// torch.isfinite of a scalar of `element` bytes (abs(x) != inf, x == x): returns the bool.
T StepBuilder::ds_isfinite(bytes_t element) {
    T a = alloc("abs", element, Category::Transient);
    T ne = alloc("ne", 1, Category::Transient);
    T eq = alloc("eq", 1, Category::Transient);
    T f = alloc("isfinite", 1, Category::Transient);
    drop(eq), drop(ne), drop(a);
    return f;
}

T StepBuilder::ds_is_invalid(bytes_t element) {
    T f = ds_isfinite(element);
    T n = ds_then(f, "not", 1);
    T lt = alloc("lt", 1, Category::Transient);
    T o = alloc("or", 1, Category::Transient);
    drop(n), drop(lt);
    return ds_then(o, "any", 1);
}

// unscale_and_clip_grads' scalars, in the norm's dtype (`element` bytes): clip = clamp((norm / scale +
// 1e-6) / clip_grad, min=1), combined = clip x scale, and the gradient times 1 / combined (in place).
void StepBuilder::ds_clip(bytes_t element) {
    T clip = alloc("clip_div", element, Category::Transient);
    clip = ds_then(clip, "clip_add", element);
    clip = ds_then(clip, "clip_ratio", element);
    clip = ds_then(clip, "clip", element);
    T combined_scale = alloc("combined_scale", element, Category::Transient);
    T reciprocal = alloc("reciprocal", element, Category::Transient);
    T factor = alloc("inverse_scale", element, Category::Transient);
    drop(reciprocal), drop(factor), drop(combined_scale), drop(clip);
}

void StepBuilder::ds_optimizer_step() {
    at("deepspeed.check_overflow");
    layer_ = -1;
    const std::size_t pieces = ds_.pieces.size() + (ds_.pad > 0 ? 1 : 0);
    // has_overflow_partitioned_grads_serial: has_inf_or_nan of each piece, isfinite of its amax and amin
    T count = alloc("invalid_grad_count", 4, Category::Transient);
    for (std::size_t i = 0; i < pieces; ++i) {
        T finite[2];
        for (T& f : finite) {  // of x.amax(), then of x.amin()
            T extreme = alloc("amax", kGradBytes, Category::Transient);
            f = ds_isfinite(kGradBytes);
            drop(extreme);
        }
        T both = alloc("logical_and", 1, Category::Transient);
        drop(finite[0]), drop(finite[1]);
        T invalid = ds_then(both, "logical_not", 1);
        drop(invalid);  // (added into the count in place)
    }
    T flag = ds_then(count, "overflow", 1);
    T byte = ds_then(flag, "overflow_u8", 1);
    drop(byte);

    at("deepspeed.grad_norm");  // get_grad_norm_direct: each parameter's piece in fp64
    std::vector<T> norms;
    for (const DsPiece& piece : ds_.pieces) {
        T copy = alloc("grad_fp64", checked_mul(piece.numel, 8), Category::Transient);
        norms.push_back(alloc("norm_fp64", 8, Category::Transient));
        drop(copy);
    }
    const auto k = static_cast<std::int64_t>(norms.size());
    T norm;
    if (k > 0) {  // stack(norms).pow(2).sum().float(), then .pow(1 / 2)
        norm = alloc("norms", checked_mul(k, 8), Category::Transient);
        norm = ds_then(norm, "norms_pow", checked_mul(k, 8));
        norm = ds_then(norm, "norm_sum", 8);
        norm = ds_then(norm, "norm_fp32", 4);
    } else {  // a partition of padding alone: torch.tensor(0.0).to(device), a copy on a GPU (the referee's CPU has none)
        norm = alloc("norm_fp32", 4, Category::Transient);
    }
    norm = ds_then(norm, "norm", 4);
    {  // mask_nan_or_inf_with_val_inplace
        T inf = alloc("isinf", 1, Category::Transient);
        T nan = alloc("isnan", 1, Category::Transient);
        T either = alloc("inf_or_nan", 1, Category::Transient);
        drop(inf), drop(nan), drop(either);
    }
    for (auto it = norms.rbegin(); it != norms.rend(); ++it) drop(*it);
    // combine_grad_norm_groups over the one group
    T groups = alloc("norm_groups", 4, Category::Transient);
    T invalid = ds_is_invalid(4);
    T combined = alloc("vector_norm", 4, Category::Transient);
    T inf = alloc("full_like", 4, Category::Transient);
    T scaled_norm = alloc("global_norm", 4, Category::Transient);
    drop(inf), drop(groups), drop(invalid), drop(combined), drop(norm);
    T checked = ds_is_invalid(4);  // step(): is_invalid_grad_norm
    drop(checked);
    T new_norm = alloc("global_grad_norm", 4, Category::Transient);  // scaled / loss scale: the engine keeps it

    at("deepspeed.flatten_partition");
    const bool single = pieces == 1;  // flattening one tensor is a view of it
    const bool master_fp32 = ds_master_bytes() == 4;
    T flat = single ? T{} : alloc("flat_grad_partition", checked_mul(ds_.partition, kGradBytes),
                                  master_fp32 ? Category::Transient : Category::Gradients);
    T grad = master_fp32 ? alloc("partition_grad_fp32", checked_mul(ds_.partition, 4), Category::Gradients) : T{};
    if (master_fp32) drop(flat);
    // averaged_gradients = None: the pieces go, last first (with one piece and bf16 masters the step's
    // gradient is that piece: it goes with it)
    if (master_fp32 || !single) drop(ds_.pad_zeros), drop(ds_.averaged);

    at("deepspeed.clip");  // unscale_and_clip_grads
    T clip_check = ds_is_invalid(4);
    drop(clip_check);
    ds_clip(4);

    at("optimizer.step");  // FusedAdam in place; then the step's gradient goes
    drop(grad), drop(flat), drop(ds_.pad_zeros), drop(ds_.averaged);
    drop(scaled_norm);
    drop(ds_.global_norm);  // the engine's last norm gives way to this step's
    ds_.global_norm = new_norm;
}

}  // namespace mst::sim
