// torch's FSDP2 in the hf runtime (torch 2.15, torch/distributed/fsdp/_fully_shard/): fully_shard on
// every decoder layer, then on the model, as python/mst_referee/fsdp2.py runs it: parameters stored in
// bf16 without a mixed-precision policy (pure-bf16), or stored in fp32 and gathered in bf16, gradients
// reduced in fp32 (bf16-master: MixedPrecisionPolicy(bfloat16, float32), torchtitan's default).
// docs/fsdp2-model.md is the specification.
//
// * Each parameter is sharded on its first dimension: every rank stores ceil(rows / ranks) rows (the
//   padded shard, _sharded_param_data), of which the last ranks use fewer, or none; the optimizer's
//   states are the size of the rows a rank uses.
// * A group's unshard all-gathers every shard into one buffer (ranks x the group's padded shards,
//   all_gather_copy_in), then copies each parameter out into its own whole storage (ranks x its
//   padded shard: init_unsharded_param's resize_). In forward the buffer is kept until the next
//   group's all-gather (all_gather_state), in backward it goes after the copy-out.
// * After its forward a layer frees its whole parameters (reshard); the root keeps them until its
//   post-backward. Backward prefetches: the root's pre-backward hook all-gathers the last layer, each
//   layer's pre-backward the one before it.
// * A group's post-backward reshards, frees the previous reduce-scatter's input, fills a new one
//   (ranks x the padded shards of its parameters that have a gradient), frees the whole gradients (in
//   reverse parameter order), and makes the reduce-scatter's output (those padded shards), whose views
//   are the sharded gradients until
//   zero_grad (a later micro-step's output is added into them and goes). Backward's final callback
//   frees the last input.
// * reshard_after_forward=False on the layers (fsdp2_reshard_after_forward false): a layer's whole
//   parameters stay from its forward to its post-backward; backward gathers nothing.
// * accelerate's groups (fsdp2_groups, the Hugging Face Trainer's fsdp2_prepare_model): the layers, an untied
//   embedding alone (gathered for its forward and its backward, as a layer), then a tail of the final norm, the
//   tied embedding and the LM head, whole from its forward (at its first module) to its post-backward; the
//   root holds nothing. The tail's pre-backward hook is on lm_head's output: the logits' gradient prefetches
//   the last layer (the chunked loss's placeholder output gets none). docs/fsdp2-model.md has the table.
// * Unsynced accumulation (fsdp2_no_sync: set_requires_gradient_sync(False) before every micro-step
//   but the last, as the Hugging Face Trainer runs it): a group's post-backward only reshards; the
//   whole gradients stay on the parameters, later micro-steps add into them in place, and the last
//   micro-step's post-backward reduce-scatters them as above.
#include <algorithm>
#include <utility>

#include "builder.hpp"

namespace mst::sim {

std::int64_t StepBuilder::fsdp2_shard_rows(int p) const { return ceil_div(params_[static_cast<std::size_t>(p)].rows, s_.dp); }

std::int64_t StepBuilder::fsdp2_local_rows(int p) const {
    const std::int64_t rows = params_[static_cast<std::size_t>(p)].rows, c = fsdp2_shard_rows(p);
    return std::clamp<std::int64_t>(rows - rank_ * c, 0, c);
}

std::int64_t StepBuilder::fsdp2_elements(int p, std::int64_t rows) const {
    const Param& P = params_[static_cast<std::size_t>(p)];
    return checked_mul(rows, P.numel / P.rows);
}

void StepBuilder::fsdp2_build() {
    fsdp2_.groups.assign(static_cast<std::size_t>(m_.num_layers + (fsdp2_own_embedding_group() ? 2 : 1)), Fsdp2Group{});
    const auto add = [&](int group, int p) {
        Fsdp2Group& g = fsdp2_.groups[static_cast<std::size_t>(group)];
        g.params.push_back(p);
        g.shard = checked_add(g.shard, fsdp2_elements(p, fsdp2_shard_rows(p)), "FSDP2 shard");
    };
    // accelerate's and untied torchtitan's: a tail group of the final norm and the LM head (tied: and the embedding)
    const bool tail = fsdp2_accelerate_ || fsdp2_own_embedding_group();
    for (int p : order_) {
        const int layer = params_[static_cast<std::size_t>(p)].layer;
        if (layer >= 0 || !tail) add(layer + 1, p);  // (the root's: layer -1)
    }
    if (titan_ && m_.tie_word_embeddings) add(0, lm_head_);  // (torchtitan's tied: [embedding, final norm, LM head])
    if (tail) {  // fully_shard(embedding), then fully_shard([final norm, (tied) embedding, LM head])
        if (fsdp2_own_embedding_group()) add(fsdp2_embedding_group(), embed_);
        add(0, final_norm_);
        add(0, lm_head_);
    }
    fsdp2_.whole.assign(params_.size(), T{});
    fsdp2_.sharded_grads.assign(params_.size(), T{});
    fsdp2_.held_gather = fsdp2_.reduce_input = T{};
}

// foreach_all_gather: the output buffer, this rank's part of it copied in; under a mixed-precision
// policy the shards are first cast into a buffer of their own, which goes as the all-gather is issued.
T StepBuilder::fsdp2_all_gather(int group) {
    if (s_.dp == 1) return T{};  // (one rank: no all-gather; the copy-out copies each shard)
    const Fsdp2Group& g = fsdp2_.groups[static_cast<std::size_t>(group)];
    T cast = fsdp2_store_ != pw_ ? alloc("all_gather_input", elems(1, g.shard, pw_), Category::Transient) : T{};
    T out = alloc("all_gather_output", elems(s_.dp, g.shard, pw_), Category::Weights);
    drop(cast);
    return out;
}

// (one rank under a mixed-precision policy, torchtitan's bf16-master: no all-gather; each shard is cast to the
// compute dtype and copied into its whole parameter, the cast kept until the next one's is made)
void StepBuilder::fsdp2_copy_out(int group) {
    const bool cast = s_.dp == 1 && fsdp2_store_ != pw_;
    T previous;
    for (int p : fsdp2_.groups[static_cast<std::size_t>(group)].params) {
        T shard = cast ? alloc("shard_cast", elems(1, fsdp2_elements(p, fsdp2_shard_rows(p)), pw_), Category::Transient) : T{};
        drop(previous);
        previous = shard;
        fsdp2_.whole[static_cast<std::size_t>(p)] =
            alloc(params_[static_cast<std::size_t>(p)].name,
                  checked_mul(fsdp2_elements(p, checked_mul(fsdp2_shard_rows(p), s_.dp)), pw_), Category::Weights);
    }
    drop(previous);
}

// pre_forward: unshard (foreach_all_gather), then wait_for_unshard, which first releases the all-gather
// the forward holds (release_all_gather_state_for_comm_reuse), copies out and holds this one.
// (torch 2.14: the held one goes after the copy-out, fsdp2_torch_2_14_)
void StepBuilder::fsdp2_pre_forward(int group) {
    const char* op = op_;
    at("fsdp2.all_gather");
    T out = fsdp2_all_gather(group);
    T held = std::exchange(fsdp2_.held_gather, out);
    if (!fsdp2_torch_2_14_) drop(held);
    fsdp2_copy_out(group);
    drop(held);
    at(op);
}

void StepBuilder::fsdp2_reshard(int group) {
    for (int p : fsdp2_.groups[static_cast<std::size_t>(group)].params) drop(fsdp2_.whole[static_cast<std::size_t>(p)]);
}

// _post_forward: the groups' post-forward (Axolotl's root reshards), then the held all-gather goes, then
// output_dtype casts the outputs: the fp32 loss goes as its bf16 copy replaces it (torch 2.14: the
// all-gather, then the fp32 loss, after the cast: fsdp2_torch_2_14_).
void StepBuilder::fsdp2_root_post_forward(T& loss) {
    const char* op = op_;
    at("fsdp2.post_forward");
    if (fsdp2_root_reshards_) fsdp2_reshard(0);
    if (!fsdp2_torch_2_14_) drop(fsdp2_.held_gather);
    at(op);
    T cast = fsdp2_casts_outputs() ? act("loss_bf16", 2, false) : T{};
    if (cast.valid() && !fsdp2_torch_2_14_) drop(loss);
    drop(fsdp2_.held_gather);  // (torch 2.14: its local goes as _post_forward returns, then the outputs it cast)
    if (cast.valid()) {
        drop(loss);
        loss = cast;
    }
}

// The root's pre-backward, on the model's output (mst_hf's and Axolotl's groups): Axolotl's resharded root is
// gathered again (its pre-backward, as a layer's), then the last layer prefetched.
void StepBuilder::fsdp2_root_pre_backward() {
    if (fsdp2_root_reshards_) fsdp2_pre_backward(0);
    fsdp2_prefetch_last_layer();
}

void StepBuilder::fsdp2_prefetch(int group) {
    const char* op = op_;
    at("fsdp2.all_gather");
    fsdp2_.groups[static_cast<std::size_t>(group)].gathered = fsdp2_all_gather(group);
    at(op);
}

void StepBuilder::fsdp2_pre_backward(int group, bool resharded) {
    if (fsdp2_keep_gathered_ && !resharded) return;  // (whole since its forward: unshard and the prefetch are no-ops)
    const char* op = op_;
    at("fsdp2.all_gather");
    Fsdp2Group& g = fsdp2_.groups[static_cast<std::size_t>(group)];
    if (!g.gathered.valid()) fsdp2_prefetch(group);  // (not prefetched: its own unshard)
    fsdp2_copy_out(group);
    drop(g.gathered);
    // the group before in forward order: the layer before; layer 0's, accelerate's own embedding group (the
    // root's are whole already)
    if (group > 1 && group != fsdp2_embedding_group()) fsdp2_prefetch(group - 1);
    else if (group == 1 && fsdp2_own_embedding_group()) fsdp2_prefetch(fsdp2_embedding_group());
    at(op);
}

void StepBuilder::fsdp2_embedding_post_forward() {
    if (!fsdp2_own_embedding_group() || fsdp2_keep_gathered_) return;
    const char* op = op_;
    at("fsdp2.post_forward");
    fsdp2_reshard(fsdp2_embedding_group());
    at(op);
}

void StepBuilder::fsdp2_embedding_pre_backward() {
    if (fsdp2_own_embedding_group()) fsdp2_pre_backward(fsdp2_embedding_group());
}

void StepBuilder::fsdp2_prefetch_last_layer() {
    if (!fsdp2_keep_gathered_) fsdp2_prefetch(fsdp2_layer_group(static_cast<int>(m_.num_layers) - 1));
}

void StepBuilder::fsdp2_post_backward(int group) {
    const char* op = op_;
    const bool sync = !fsdp2_no_sync_ || micro_ == tl_.micro_steps_recorded - 1;
    at(sync ? "fsdp2.reduce_scatter" : "fsdp2.reshard");
    fsdp2_reshard(group);
    if (sync) fsdp2_reduce(group);  // (else reduce_grads false: the whole gradients stay on the parameters, added into in place)
    at(op);
}

// foreach_reduce over the group's parameters that have a gradient (torchtitan's chunked loss reduces its LM
// head's alone, early, and the rest of its group at the end of backward).
void StepBuilder::fsdp2_reduce(int group) {
    const Fsdp2Group& g = fsdp2_.groups[static_cast<std::size_t>(group)];
    std::vector<int>& reduced = fsdp2_.reduced;
    reduced.clear();
    std::int64_t elements = 0;
    for (int p : g.params)
        if (params_[static_cast<std::size_t>(p)].grad.valid()) {
            reduced.push_back(p);
            elements = checked_add(elements, fsdp2_elements(p, fsdp2_shard_rows(p)), "FSDP2 reduce-scatter");
        }
    drop(fsdp2_.reduce_input);
    fsdp2_.reduce_input = alloc("reduce_scatter_input", elems(s_.dp, elements, fsdp2_reduce_), Category::Gradients);
    // (torch 2.14: foreach_reduce's loop variable keeps the last parameter's until it returns)
    T& last = params_[static_cast<std::size_t>(g.params.back())].grad;
    T kept = fsdp2_torch_2_14_ ? std::exchange(last, T{}) : T{};
    for (auto it = g.params.rbegin(); it != g.params.rend(); ++it) drop(params_[static_cast<std::size_t>(*it)].grad);
    // The sharded gradients: views of its output, or (a later micro-step) what that output is added into,
    // in place, before it goes. (torchtitan's tied LM head shares the embedding's shard: a gradient of
    // either is the other's.)
    const auto sharded = [&](int p) -> T& { return fsdp2_.sharded_grads[static_cast<std::size_t>(p)]; };
    const bool viewed = std::any_of(reduced.begin(), reduced.end(), [&](int p) { return !sharded(p).valid(); });
    // (fp32 shards reduced in bf16, accelerate's policy: the output is cast into one fp32 buffer, which the
    // sharded gradients view, and goes)
    const bool cast = fsdp2_reduce_ != fsdp2_store_;
    const Category grads = viewed ? Category::Gradients : Category::Transient;
    T out = alloc("reduce_scatter_output", elems(1, elements, fsdp2_reduce_), cast ? Category::Transient : grads);
    if (cast) {
        T sharded_out = alloc("sharded_grads_fp32", elems(1, elements, fsdp2_store_), grads);
        drop(out);
        out = sharded_out;
    }
    for (int p : reduced)
        for (int q : {p, fsdp2_same_shard(p)})
            if (q >= 0 && !sharded(q).valid()) sharded(q) = hold(out);
    drop(kept);
    drop(out);
}

// validate_outputs: a gradient whose dtype is not the parameter's grad_dtype is cast to it.
T StepBuilder::fsdp2_upcast(int p, T g) {
    const bytes_t bytes = checked_mul(params_[static_cast<std::size_t>(p)].numel, fsdp2_reduce_);
    if (table_[static_cast<std::size_t>(g.id)].bytes == bytes) return g;  // (fp32 already)
    T f = alloc("weight_grad_fp32", bytes, Category::Transient);
    drop(g);
    return f;
}

void StepBuilder::fsdp2_after_backward() {
    fsdp2_post_backward(fsdp2_embedding_group());  // (the root's; accelerate's tied tail, or its own embedding group)
    at("fsdp2.final_callback");
    drop(fsdp2_.reduce_input);
}

}  // namespace mst::sim
