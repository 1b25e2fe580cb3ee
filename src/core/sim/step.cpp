// One optimizer step: persistent state, micro-steps (forward, backward with
// checkpoint recompute and offload), the optimizer; and the estimate built on it.
#include <algorithm>
#include <optional>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "builder.hpp"
#include "mst/error.hpp"
#include "mst/simulate.hpp"
#include "mst/timemodel.hpp"

namespace mst::sim {

void StepBuilder::micro_step(int micro) {
    if (titan_) return titan_micro_step(micro);
    micro_ = micro;
    phase_ = Phase::Forward;
    layer_ = -1;
    const std::int64_t L = m_.num_layers, d = m_.hidden_size;
    const bool any_checkpoint = s_.checkpointed_count() > 0;
    // The category of layer l's input: a checkpoint, or saved by its first norm.
    auto input_category = [&](std::int64_t l) {
        return s_.checkpointed(l) ? Category::Checkpoint : Category::SavedActivation;
    };

    at("inputs");
    T ids = alloc("input_ids", elems(tokens_, 1, 8), Category::SavedActivation);
    T labels = alloc("labels", elems(tokens_, 1, 8), Category::SavedActivation);
    // Eager attention: the model builds 4-D additive masks [B, 1, S, S]; checkpointed
    // layers receive them as inputs, so the checkpoints keep them until backward.
    // (The hf runtime builds its masks in the model's forward: hf_model_tensors.)
    std::vector<T> masks;
    for (std::int64_t i = 0; i < (hf_ ? 0 : attention_masks()); ++i) {
        at("attn.mask");
        masks.push_back(alloc("causal_mask", bf16(s_.micro_batch, checked_mul(s_.seq_len, s_.seq_len)),
                              any_checkpoint ? Category::Checkpoint : Category::Transient));
    }

    if (hf_ddp()) hf_ddp_sync_buffers();
    if (z3_on_) {  // the model's call: the root's hooks (reset_step, then its fetch), then its inner model's
        z3_.coordinator->begin_micro_step();
        z3_.flats.clear();
        z3_fetch(z3_.root), z3_fetch(z3_.model);
    }
    // the root's pre-forward hook (the embedding, final norm and LM head); accelerate's: the embedding's group
    if (fsdp2_on_) fsdp2_pre_forward(fsdp2_embedding_group());
    enter_unit(-1, +1);
    T x = embedding_forward(input_category(0));
    release_unit(-1);
    if (hf_) {
        hf_embeddings_ = x;  // inputs_embeds, held by the model's forward until it returns
        x = hold(x);         // and hidden_states, its loop variable
        hf_model_tensors();
    }

    std::vector<LayerSaved> saved(static_cast<std::size_t>(L));
    std::vector<T> checkpoint(static_cast<std::size_t>(L)), host(static_cast<std::size_t>(L));
    std::vector<std::vector<T>> frames(static_cast<std::size_t>(L));
    for (std::int32_t l = 0; l < L; ++l) {
        const auto i = static_cast<std::size_t>(l);
        enter_unit(l, +1);
        const Category out = l + 1 < L ? input_category(l + 1) : Category::SavedActivation;
        if (hf_) {
            if (z3_on_ || fsdp2_on_) {  // (the layer's own hooks run outside its checkpoint)
                layer_ = l;
                if (fsdp2_on_) fsdp2_pre_forward(fsdp2_layer_group(l));
                else z3_fetch(z3_.layers[i].layer);
                layer_ = -1;
            }
            // its post-forward hook, as the call returns (before the loop variable is rebound)
            const auto post_forward = [&] {
                if (fsdp2_on_ && !fsdp2_keep_gathered_) fsdp2_reshard(fsdp2_layer_group(l));
            };
            // The model's loop variable holds x while the layer runs; a checkpointed layer's frame
            // (torch.utils.checkpoint, non-reentrant) also keeps its inputs: the hidden states and the
            // shared keyword tensors (the rotary tables, cache_position) until its backward is done.
            if (s_.checkpointed(l)) {
                // With offload, save_on_cpu packs the positional hidden states into a host copy
                // (the keyword tensors stay referenced on the device); x itself goes when the loop
                // variable is rebound.
                T input;
                if (s_.offload_checkpoints) {
                    at("checkpoint.offload");
                    layer_ = l;
                    input = alloc("checkpoint", table_[static_cast<std::size_t>(x.id)].bytes, Category::Offloaded,
                                  Device::Host);
                } else {
                    table_[static_cast<std::size_t>(x.id)].category = Category::Checkpoint;
                    input = hold(x);
                }
                // The frame's keyword arguments die in the order the model passes them (the rotary
                // (cos, sin) tuple releasing sin first), then the hidden states.
                HfRope& rope = hf_rope(l);
                if (m_.mistral_masking())  // it passes position_ids before the rotary tables
                    frames[i] = {hold(hf_mask(l)), hold(hf_positions_), hold(rope.sin), hold(rope.cos), input};
                else
                    frames[i] = {hold(hf_mask(l)), hold(rope.sin), hold(rope.cos), hold(hf_positions_), input};
                NoGrad no_grad(*this, true);  // the forward runs, its saved tensors are not kept
                T y = hf_layer_forward(l, x, saved[i], false);
                layer_ = -1;
                post_forward();
                drop(x);
                x = y;
            } else {
                T y = hf_layer_forward(l, x, saved[i], false);
                layer_ = -1;
                post_forward();
                drop(x);  // the loop variable takes the layer's output
                x = y;
            }
        } else if (s_.checkpointed(l)) {
            checkpoint[i] = hold(x);
            {
                NoGrad no_grad(*this);
                x = layer_forward(l, x, saved[i], out);
            }
            if (s_.offload_checkpoints) {
                at("checkpoint.offload");
                host[i] = alloc("checkpoint", res(tokens_, d), Category::Offloaded, Device::Host);
                drop(checkpoint[i]);
            }
        } else {
            x = layer_forward(l, x, saved[i], out);
        }
        release_unit(l);
    }
    enter_unit(static_cast<int>(L), +1);
    HeadSaved head;
    if (hf_) hf_head_forward(x, head);
    else head_forward(x, head);
    release_unit(static_cast<int>(L));
    layer_ = -1;
    if (fsdp2_on_) fsdp2_root_post_forward(head.hf_loss);  // the model's forward returns
    at("forward.end");
    clear_autocast_cache();  // the autocast region ends with the forward
    // The Hugging Face Trainer's bf16=True: accelerate's convert_outputs_to_fp32 makes an output whose bf16
    // tensors (the logits of an unchunked head; the loss is fp32) are fp32 copies, and the model's goes.
    T fp32_outputs = s_.hf_trainer_bf16 && head.hf_logits.valid() ? act("logits_fp32_output", f32(tokens_, m_.vocab_size), false)
                                                                   : T{};
    drop(head.hf_logits);  // the trainer keeps only the loss of the model's output
    drop(fp32_outputs);
    if (hf_ && s_.grad_accum > 1 && !ds_on_) {  // loss / grad_accum (DeepSpeed's engine divides in its backward)
        T scaled = act("loss_scaled", hf_loss_bytes(), false);
        drop(head.hf_loss);
        head.hf_loss = scaled;
    }
    if (!any_checkpoint)
        for (T& mask : masks) drop(mask);

    phase_ = Phase::Backward;
    enter_unit(static_cast<int>(L), -1);
    T dres = hf_ ? hf_head_backward(head) : head_backward(head);  // the residual-stream gradient, accumulated in place
    release_unit(static_cast<int>(L));
    if (!hf_) drop(labels);
    for (std::int32_t l = static_cast<std::int32_t>(L) - 1; l >= 0; --l) {
        const auto i = static_cast<std::size_t>(l);
        enter_unit(l, -1);
        layer_ = l;
        if (hf_) {
            if (fsdp2_on_) fsdp2_pre_backward(fsdp2_layer_group(l));  // its output's gradient is there
            if (s_.checkpointed(l)) {
                // The first node that unpacks a saved tensor recomputes the layer up to its last saved
                // tensor; the recomputed tensors die with the nodes that unpack them.
                hf_frame_ = std::move(frames[i]);
                pending_recompute_ = [this, l, &layer = saved[i]] {
                    T input = hf_frame_.back();  // the frame's last; offloaded: unpacked into a device copy
                    if (s_.offload_checkpoints) {
                        at("checkpoint.reload");
                        input = alloc("checkpoint", table_[static_cast<std::size_t>(input.id)].bytes,
                                      Category::Transient);
                    }
                    const char* op = op_;
                    phase_ = Phase::Recompute;
                    hf_layer_forward(l, input, layer, true);  // stops at its last save (hf_recomputation_stopped)
                    if (s_.offload_checkpoints) drop(input);  // the recompute's argument, once it returns
                    recomputed_ = true;
                    at(op);
                };
                hf_layer_backward(l, saved[i], dres);
                recomputed_ = false;
            } else {
                hf_layer_backward(l, saved[i], dres);
            }
            if (fsdp2_on_) fsdp2_post_backward(fsdp2_layer_group(l));  // its input's gradient is complete
        } else if (s_.checkpointed(l)) {
            if (s_.offload_checkpoints) {
                at("checkpoint.reload");
                checkpoint[i] = alloc("checkpoint", res(tokens_, d), Category::Checkpoint);
                drop(host[i]);
            }
            phase_ = Phase::Recompute;
            T out = layer_forward(l, hold(checkpoint[i]), saved[i], Category::Transient);
            at("recompute.end");
            clear_autocast_cache();
            phase_ = Phase::Backward;
            layer_backward(l, saved[i], dres);
            drop(out);  // reentrant checkpoint: the recomputed outputs live through the layer's backward
            drop(checkpoint[i]);
        } else {
            layer_backward(l, saved[i], dres);
        }
        release_unit(l);
    }
    enter_unit(-1, -1);
    embedding_backward(dres);
    release_unit(-1);
    at("backward.end");
    if (hf_) {
        // backward() returns (its grad_tensors go), then the trainer drops the loss and the batch
        if (fsdp2_on_) fsdp2_after_backward();
        if (z3_on_) z3_after_backward(head.hf_root);
        else if (ds_on_) ds_after_backward(head.hf_root);
        else drop(head.hf_root);
        drop(head.hf_loss), drop(ids), drop(labels);
        return;
    }
    drop(dres), drop(ids);
    for (T& mask : masks) drop(mask);
}

void StepBuilder::optimizer_step() {
    phase_ = Phase::Optimizer;
    layer_ = -1;
    micro_ = tl_.micro_steps_recorded - 1;
    if (s_.optimizer_in_backward) return;  // stepped inside backward
    if (ds_on_) {
        if (z3_on_) z3_optimizer_step();
        else ds_optimizer_step();
        return;
    }
    if (titan_) return titan_optimizer_step();
    if (hf_) {
        hf_optimizer_step();
        return;
    }
    // Fused optimizer kernels update in place (no temporaries); then zero_grad(set_to_none).
    at("optimizer.zero_grad");
    for (auto& p : params_) drop(p.grad);
}

Timeline StepBuilder::run() {
    init_state();
    for (int micro = 0; micro < tl_.micro_steps_recorded; ++micro) micro_step(micro);
    optimizer_step();
    if (hf_ && record_) hf_classify();
    return std::move(tl_);
}

}  // namespace mst::sim

namespace mst {

namespace {

// One step: its timeline and (with `allocator`) its caching allocator's replay on a device of
// `capacity` bytes. When ranks differ every rank's step is walked (walked_ranks()): the timeline
// is the one with the highest requested peak (the lowest rank of a tie) and the replay its own,
// whose peaks are raised to the highest of any rank's (a plan fits when every rank does).
struct Walked {
    Timeline timeline;
    AllocatorReplay allocator;
    std::int64_t ranks = 0;  // the ranks walked
};
Walked walk(const ModelSpec& model, const TrainingSetup& setup, const GpuProfile& gpu, bytes_t capacity, bool allocator,
            std::optional<std::int64_t> rank = std::nullopt) {
    validate(setup, model);
    const std::vector<std::int64_t> all = walked_ranks(setup, model);
    if (rank && !walks_rank(setup, model, *rank))
        fail("setup", "rank", fmt::format("expected a rank whose step differs: of ring attention's sp ranks (0 .. sp - 1, with "
                                          "sp_impl ring and sp > 1) or DeepSpeed's or FSDP2's dp ranks (0 .. dp - 1, runtime hf "
                                          "with ZeRO 1, 2 or 3), got {} (sp {}, {}, dp {}, ZeRO {}, runtime {})",
                                          *rank, setup.sp, to_string(setup.sp_impl), setup.dp, setup.zero_stage,
                                          to_string(setup.runtime)));
    const std::vector<std::int64_t> ranks = rank ? std::vector<std::int64_t>{*rank} : all;  // (DeepSpeed on one GPU: {0})
    Walked out;
    out.ranks = static_cast<std::int64_t>(ranks.size());
    if (ranks.empty()) {
        out.timeline = sim::StepBuilder(model, setup, gpu, true).run();
        if (allocator) out.allocator = replay_caching_allocator(out.timeline, gpu.calibration.allocator, capacity);
        return out;
    }
    bytes_t busiest = -1;
    AllocatorReplay highest;
    for (std::int64_t r : ranks) {
        sim::StepBuilder b(model, setup, gpu, true);
        b.walk_rank(r);
        Timeline t = b.run();
        t.rank = r;
        AllocatorReplay a;
        if (allocator) {
            a = replay_caching_allocator(t, gpu.calibration.allocator, capacity);
            highest.peak_allocated = std::max(highest.peak_allocated, a.peak_allocated);
            highest.peak_reserved = std::max(highest.peak_reserved, a.peak_reserved);
            highest.segments_released = std::max(highest.segments_released, a.segments_released);
        }
        const bytes_t peak = summarize(t, model.num_layers).peak.bytes;
        if (peak > busiest) out.timeline = std::move(t), out.allocator = std::move(a), busiest = peak;
    }
    out.allocator.peak_allocated = highest.peak_allocated;
    out.allocator.peak_reserved = highest.peak_reserved;
    out.allocator.segments_released = highest.segments_released;
    return out;
}

}  // namespace

Timeline simulate(const ModelSpec& model, const TrainingSetup& setup, const GpuProfile& gpu) {
    return walk(model, setup, gpu, gpu.usable_bytes(), false).timeline;
}

Timeline simulate_rank(const ModelSpec& model, const TrainingSetup& setup, const GpuProfile& gpu, std::int64_t rank) {
    return walk(model, setup, gpu, gpu.usable_bytes(), false, rank).timeline;
}

MemoryPeaks simulate_peaks(const ModelSpec& model, const TrainingSetup& setup, const GpuProfile& gpu, bool allocator,
                           bytes_t capacity) {
    return PeakSimulator(model, gpu).peaks(setup, allocator, capacity);
}

Estimate estimate(const ModelSpec& model, const TrainingSetup& setup, const GpuProfile& gpu, std::optional<bytes_t> capacity,
                  std::optional<std::int64_t> rank) {
    Estimate e;
    // The process can reserve the usable bytes: there PyTorch releases its cached segments and retries.
    Walked w = walk(model, setup, gpu, capacity.value_or(gpu.usable_bytes()), true, rank);
    e.timeline = std::move(w.timeline);
    e.allocator = std::move(w.allocator);
    e.ranks_walked = w.ranks;
    e.summary = summarize(e.timeline, model.num_layers);
    e.usable_bytes = gpu.usable_bytes();
    e.context_bytes = gpu.cuda_context_bytes;
    e.headroom_bytes = e.usable_bytes - e.allocator.peak_reserved;
    e.fits = e.headroom_bytes >= 0;
    return e;
}

nlohmann::json to_json(const Estimate& e, const ModelSpec& model, const TrainingSetup& setup, const GpuProfile& gpu) {
    const Summary& s = e.summary;
    nlohmann::json by_category, category_max, phase_peak;
    for (int c = 0; c < kCategoryCount; ++c) {
        by_category[to_string(static_cast<Category>(c))] = s.peak.by_category[static_cast<std::size_t>(c)];
        category_max[to_string(static_cast<Category>(c))] = s.category_max[static_cast<std::size_t>(c)];
    }
    for (int p = 0; p < kPhaseCount; ++p)
        if (s.phase_seen[static_cast<std::size_t>(p)])
            phase_peak[to_string(static_cast<Phase>(p))] = s.phase_peak[static_cast<std::size_t>(p)];
    nlohmann::json peak = {{"bytes", s.peak.bytes},
                           {"allocated_bytes", e.allocator.peak_allocated},
                           {"reserved_bytes", e.allocator.peak_reserved},
                           {"segments_released", e.allocator.segments_released},
                           {"by_category", by_category}};
    if (s.peak.event >= 0) {
        const Event& ev = e.timeline.events[static_cast<std::size_t>(s.peak.event)];
        peak["event"] = s.peak.event;
        peak["op"] = ev.op;
        peak["tensor"] = ev.name;
        peak["layer"] = ev.layer;
        peak["phase"] = to_string(ev.phase);
        peak["micro_step"] = ev.micro_step;
    }
    nlohmann::json out = {{"model", model.name},
                          {"gpu", gpu.name},
                          {"setup", to_json(setup)},
                          {"peak", peak},
                          {"phase_peak_bytes", phase_peak},
                          {"category_max_bytes", category_max},
                          {"largest_transient_bytes", s.largest_transient},
                          {"persistent_bytes", s.end_bytes},
                          {"host_peak_bytes", s.host_peak},
                          {"layer_saved_bytes", s.layer_saved},
                          {"usable_bytes", e.usable_bytes},
                          {"cuda_context_bytes", e.context_bytes},
                          {"headroom_bytes", e.headroom_bytes},
                          {"fits", e.fits},
                          {"events", e.timeline.events.size()}};
    // The time model's step (what recommend's plans record for the setup: emit checks a plan's against it)
    const StepTime t = predict_time(model, setup, gpu);
    out["time"] = {{"step_seconds", t.step_seconds}, {"tokens_per_second", t.tokens_per_second}, {"mfu", t.mfu}};
    if (e.timeline.rank >= 0) {  // the rank whose step the timeline is, and how many were walked
        const char* kind = setup.ring() ? "ring" : "dp";
        out[fmt::format("{}_rank", kind)] = e.timeline.rank;
        out[fmt::format("{}_ranks_walked", kind)] = e.ranks_walked;
    }
    return out;
}

}  // namespace mst

namespace mst::sim {

// torch.optim's step (torch/optim/adamw.py) then zero_grad(set_to_none=True), which frees the
// gradients in the parameters' order. AdamW's foreach implementation takes the square root of
// every second moment at once (_foreach_sqrt: one temporary per parameter, freed as the list
// dies, last first); the for-loop one computes denom = sqrt(v) / c + eps per parameter, the
// previous parameter's denom still held until the name is rebound; fused and SGD hold nothing.
void StepBuilder::hf_step_temporaries(bytes_t state_bytes) {
    if (s_.optimizer != Optimizer::AdamW) return;
    if (s_.optimizer_impl == OptimizerImpl::Foreach) {
        T root = alloc("exp_avg_sq_sqrt", state_bytes, Category::Transient);
        drop(root);
    } else if (s_.optimizer_impl == OptimizerImpl::ForLoop) {
        T root = alloc("exp_avg_sq_sqrt", state_bytes, Category::Transient);
        T denom = alloc("denom", state_bytes, Category::Transient);
        drop(root), drop(denom);
    }
}

void StepBuilder::hf_optimizer_step() {
    at("optimizer.step");
    const int sd = s_.effective_state_dtype() == StateDtype::Fp32 ? 4 : 2;
    const bool sharded = zero_stage() >= 1;
    auto state_bytes = [&](int i) {  // (FSDP2: the rows this rank steps)
        const Param& p = params_[static_cast<std::size_t>(i)];
        if (fsdp2_on_) return checked_mul(fsdp2_elements(i, fsdp2_local_rows(i)), sd);
        return checked_mul(sharded ? ceil_div(p.numel, p.shard_ranks) : p.numel, sd);
    };
    if (s_.optimizer == Optimizer::AdamW && s_.optimizer_impl == OptimizerImpl::Foreach) {
        std::vector<T> sqrt;
        for (int i : order_) {
            layer_ = -1;
            const bytes_t b = state_bytes(i);
            if (b > 0) sqrt.push_back(alloc("exp_avg_sq_sqrt", b, Category::Transient));  // (none for an empty shard)
        }
        for (auto it = sqrt.rbegin(); it != sqrt.rend(); ++it) drop(*it);
    } else if (s_.optimizer == Optimizer::AdamW && s_.optimizer_impl == OptimizerImpl::ForLoop) {
        T denom;
        for (int i : order_) {
            const bytes_t b = state_bytes(i);
            if (b == 0) {  // an empty shard: its tensors are empty (no memory); the name's rebinding frees the last denom
                drop(denom);
                continue;
            }
            T root = alloc("exp_avg_sq_sqrt", b, Category::Transient);
            T next = alloc("denom", b, Category::Transient);
            drop(root), drop(denom);
            denom = next;
        }
        drop(denom);
    }
    at("optimizer.zero_grad");  // the masters' gradients with bf16-master
    for (int i : order_) drop(params_[static_cast<std::size_t>(i)].grad);
    if (fsdp2_on_)
        for (int i : order_) drop(fsdp2_.sharded_grads[static_cast<std::size_t>(i)]);
    for (int i : order_) drop(params_[static_cast<std::size_t>(i)].master_grad);
}

}  // namespace mst::sim
