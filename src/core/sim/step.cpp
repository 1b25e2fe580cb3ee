// One optimizer step: persistent state, micro-steps (forward, backward with
// checkpoint recompute and offload), the optimizer; and the estimate built on it.
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "builder.hpp"
#include "mst/simulate.hpp"

namespace mst::sim {

void StepBuilder::micro_step(int micro) {
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
    std::vector<T> masks;
    for (std::int64_t i = 0; i < attention_masks(); ++i) {
        at("attn.mask");
        masks.push_back(alloc("causal_mask", bf16(s_.micro_batch, checked_mul(s_.seq_len, s_.seq_len)),
                              any_checkpoint ? Category::Checkpoint : Category::Transient));
    }

    enter_unit(-1, +1);
    T x = embedding_forward(input_category(0));
    release_unit(-1);

    std::vector<LayerSaved> saved(static_cast<std::size_t>(L));
    std::vector<T> checkpoint(static_cast<std::size_t>(L)), host(static_cast<std::size_t>(L));
    for (std::int32_t l = 0; l < L; ++l) {
        const auto i = static_cast<std::size_t>(l);
        enter_unit(l, +1);
        const Category out = l + 1 < L ? input_category(l + 1) : Category::SavedActivation;
        if (s_.checkpointed(l)) {
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
    head_forward(x, head);
    release_unit(static_cast<int>(L));
    layer_ = -1;
    at("forward.end");
    clear_autocast_cache();
    if (!any_checkpoint)
        for (T& mask : masks) drop(mask);

    phase_ = Phase::Backward;
    enter_unit(static_cast<int>(L), -1);
    T dres = head_backward(head);  // the residual-stream gradient, accumulated in place
    release_unit(static_cast<int>(L));
    drop(labels);
    for (std::int32_t l = static_cast<std::int32_t>(L) - 1; l >= 0; --l) {
        const auto i = static_cast<std::size_t>(l);
        enter_unit(l, -1);
        layer_ = l;
        if (s_.checkpointed(l)) {
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
    drop(dres), drop(ids);
    for (T& mask : masks) drop(mask);
}

void StepBuilder::optimizer_step() {
    phase_ = Phase::Optimizer;
    layer_ = -1;
    micro_ = tl_.micro_steps_recorded - 1;
    if (s_.optimizer_in_backward) return;  // stepped inside backward
    // Fused optimizer kernels update in place (no temporaries); then zero_grad(set_to_none).
    at("optimizer.zero_grad");
    for (auto& p : params_) drop(p.grad);
}

Timeline StepBuilder::run() {
    init_state();
    for (int micro = 0; micro < tl_.micro_steps_recorded; ++micro) micro_step(micro);
    optimizer_step();
    return std::move(tl_);
}

}  // namespace mst::sim

namespace mst {

Timeline simulate(const ModelSpec& model, const TrainingSetup& setup, const GpuProfile& gpu) {
    validate(setup, model);
    return sim::StepBuilder(model, setup, gpu, true).run();
}

MemoryPeaks simulate_peaks(const ModelSpec& model, const TrainingSetup& setup, const GpuProfile& gpu, bool allocator) {
    return PeakSimulator(model, gpu).peaks(setup, allocator);
}

Estimate estimate(const ModelSpec& model, const TrainingSetup& setup, const GpuProfile& gpu) {
    Estimate e;
    e.timeline = simulate(model, setup, gpu);
    e.summary = summarize(e.timeline, model.num_layers);
    e.allocator = replay_caching_allocator(e.timeline, gpu.calibration.allocator);
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
    return {{"model", model.name},
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
}

}  // namespace mst
