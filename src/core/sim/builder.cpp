// The tensor table, parameters, gradients and persistent state of the simulator.
#include "builder.hpp"

#include <cassert>
#include <stdexcept>
#include <utility>

#include <fmt/format.h>

namespace mst::sim {

StepBuilder::StepBuilder(const ModelSpec& model, const TrainingSetup& setup, const GpuProfile& gpu, bool record,
                         bool allocator)
    : m_(model), s_(setup), gpu_(gpu), record_(record), model_allocator_(allocator), allocator_(gpu.calibration.allocator) {
    switch (s_.precision) {
        case Precision::PureBf16: pw_ = 2, pg_ = 2, rb_ = 2; break;
        case Precision::Bf16Master: pw_ = 2, pg_ = 4, rb_ = 2; break;
        case Precision::AmpFp32: pw_ = 4, pg_ = 4, rb_ = 4; break;
    }
    tokens_ = s_.local_tokens();
    tl_.source = "simulator";
    tl_.model = m_.name;
    tl_.micro_steps = static_cast<std::int32_t>(s_.grad_accum);
    tl_.micro_steps_recorded = static_cast<std::int32_t>(std::min<std::int64_t>(s_.grad_accum, 2));
    build_params();
}

// ---- tensor table ------------------------------------------------------------

T StepBuilder::alloc(const char* name, bytes_t bytes, Category category, Device device) {
    const T t{static_cast<std::int64_t>(table_.size())};
    table_.push_back({bytes, 1, category, device, name});
    if (record_) tl_.events.push_back(Event{true, t.id, bytes, category, device, phase_, layer_, micro_, op_, name});
    account(t.id, bytes, device, true);
    return t;
}

T StepBuilder::act(const char* name, bytes_t bytes, bool saved) {
    return alloc(name, bytes, grad_ && saved ? Category::SavedActivation : Category::Transient);
}

void StepBuilder::save(T t) {
    if (grad_ && t.valid()) ++table_[static_cast<std::size_t>(t.id)].refs;
}

bool StepBuilder::drop(T& t) {
    if (!t.valid()) return false;
    Live& l = table_[static_cast<std::size_t>(t.id)];
    if (l.refs <= 0) throw std::logic_error(fmt::format("simulator: tensor {} ({}) dropped after free", t.id, l.name));
    const bool freed = --l.refs == 0;
    if (freed) {
        if (record_) tl_.events.push_back(Event{false, t.id, l.bytes, l.category, l.device, phase_, layer_, micro_, op_, l.name});
        account(t.id, l.bytes, l.device, false);
    }
    t = T{};
    return freed;
}

// Running peaks for the fast path (the recorded timeline gets the same from its views).
void StepBuilder::account(std::int64_t id, bytes_t bytes, Device device, bool alloc) {
    if (record_) return;
    if (device == Device::Host) {
        host_live_ = checked_add(host_live_, alloc ? bytes : -bytes, "host bytes");
        peaks_.host_peak_bytes = std::max(peaks_.host_peak_bytes, host_live_);
        return;
    }
    live_ = checked_add(live_, alloc ? bytes : -bytes, "live bytes");
    peaks_.peak_bytes = std::max(peaks_.peak_bytes, live_);
    if (!model_allocator_) return;
    if (alloc) allocator_.allocate(id, bytes);
    else allocator_.release(id);
    peaks_.peak_allocated_bytes = std::max(peaks_.peak_allocated_bytes, allocator_.allocated());
    peaks_.peak_reserved_bytes = std::max(peaks_.peak_reserved_bytes, allocator_.reserved());
}

T StepBuilder::saved(T t) {
    save(t);
    return grad_ ? t : T{};
}

T StepBuilder::hold(T t) {
    if (t.valid()) ++table_[static_cast<std::size_t>(t.id)].refs;
    return t;
}

std::vector<std::int64_t> StepBuilder::transient_chunks(std::int64_t chunks) const {
    if (record_) return chunk_sizes(tokens_, chunks);
    std::vector<std::int64_t> kept;
    for (const ChunkGroup& g : chunk_groups(tokens_, chunks))
        kept.insert(kept.end(), static_cast<std::size_t>(std::min<std::int64_t>(g.count, 2)), g.tokens);
    return kept;
}

bytes_t StepBuilder::elems(std::int64_t rows, std::int64_t cols, int bytes_per_element) const {
    return checked_product({rows, cols, bytes_per_element}, "tensor size");
}

// ---- parameters ----------------------------------------------------------------

void StepBuilder::build_params() {
    const std::int64_t d = m_.hidden_size, I = m_.intermediate_size;
    auto add = [&](const char* name, std::int32_t layer, std::int64_t numel) {
        params_.push_back(Param{name, layer, numel, {}, {}, {}, {}});
        return static_cast<int>(params_.size() - 1);
    };
    embed_ = add("embed_tokens", -1, m_.vocab_size * d);
    for (std::int32_t l = 0; l < m_.num_layers; ++l) {
        LayerParams lp{};
        lp.norm1 = add("input_norm", l, d);
        lp.q = add("q_proj", l, d * m_.q_dim() + (m_.qkv_bias ? m_.q_dim() : 0));
        lp.k = add("k_proj", l, d * m_.kv_dim() + (m_.qkv_bias ? m_.kv_dim() : 0));
        lp.v = add("v_proj", l, d * m_.kv_dim() + (m_.qkv_bias ? m_.kv_dim() : 0));
        lp.o = add("o_proj", l, m_.q_dim() * d + (m_.o_bias ? d : 0));
        if (m_.family == Family::Gemma2) lp.post_attn_norm = add("post_attention_norm", l, d);
        lp.norm2 = add(m_.family == Family::Gemma2 ? "pre_feedforward_norm" : "post_attention_norm", l, d);
        if (m_.family == Family::Gemma2) lp.post_ff_norm = add("post_feedforward_norm", l, d);
        lp.gate = add("gate_proj", l, d * I + (m_.mlp_bias ? I : 0));
        lp.up = add("up_proj", l, d * I + (m_.mlp_bias ? I : 0));
        lp.down = add("down_proj", l, I * d + (m_.mlp_bias ? d : 0));
        layer_params_.push_back(lp);
    }
    final_norm_ = add("final_norm", -1, d);
    lm_head_ = m_.tie_word_embeddings ? embed_ : add("lm_head", -1, m_.vocab_size * d);
    gathered_.assign(static_cast<std::size_t>(m_.num_layers + 2), T{});
}

// Persistent state, allocated before the step (steady state: step >= 2, so the
// optimizer's lazily created states already exist).
void StepBuilder::init_state() {
    phase_ = Phase::Init;
    layer_ = -1;
    const std::int64_t dp = s_.dp;
    const bool shard_params = zero_stage() >= 3, shard_optim = zero_stage() >= 1, shard_grads = zero_stage() >= 2;
    auto part = [&](std::int64_t numel, bool sharded) { return sharded ? ceil_div(numel, dp) : numel; };
    const int sd = s_.effective_state_dtype() == StateDtype::Fp32 ? 4 : 2;

    at("init.weights");
    for (auto& p : params_) {
        layer_ = p.layer;
        p.weight = alloc(p.name, checked_mul(part(p.numel, shard_params), pw_), Category::Weights);
    }
    if (s_.precision == Precision::Bf16Master) {
        at("init.master_weights");
        for (auto& p : params_) {
            layer_ = p.layer;
            alloc(p.name, checked_mul(part(p.numel, shard_optim), 4), Category::MasterWeights);
        }
    }
    at("init.optimizer_state");
    for (auto& p : params_) {
        layer_ = p.layer;
        const std::int64_t n = part(p.numel, shard_optim);
        switch (s_.optimizer) {
            case Optimizer::AdamW:
                alloc("exp_avg", checked_mul(n, sd), Category::OptimizerState);
                alloc("exp_avg_sq", checked_mul(n, sd), Category::OptimizerState);
                break;
            case Optimizer::AdamW8bit:
                // bitsandbytes: blockwise 8-bit states (one fp32 absmax per 2048 values) for
                // tensors of at least 4096 elements; smaller tensors keep fp32 states.
                if (n >= 4096) {
                    alloc("state1_u8", n, Category::OptimizerState);
                    alloc("state2_u8", n, Category::OptimizerState);
                    alloc("absmax1", 4 * ceil_div(n, 2048), Category::OptimizerState);
                    alloc("absmax2", 4 * ceil_div(n, 2048), Category::OptimizerState);
                } else {
                    alloc("exp_avg", 4 * n, Category::OptimizerState);
                    alloc("exp_avg_sq", 4 * n, Category::OptimizerState);
                }
                break;
            case Optimizer::SgdMomentum:
                alloc("momentum", checked_mul(n, sd), Category::OptimizerState);
                break;
        }
    }
    if (shard_grads) {
        at("init.gradient_shards");
        for (auto& p : params_) {
            layer_ = p.layer;
            alloc(p.name, checked_mul(part(p.numel, true), pg_), Category::Gradients);
        }
    }
    layer_ = -1;
    if (gpu_.calibration.cublas_workspace_bytes > 0) {
        at("init.cublas_workspace");
        alloc("cublas_workspace", gpu_.calibration.cublas_workspace_bytes, Category::Workspace);
    }
}

int StepBuilder::zero_stage() const { return s_.dp > 1 ? s_.zero_stage : 0; }

void StepBuilder::grad_write(int p) {
    Param& P = params_[static_cast<std::size_t>(p)];
    if (P.grad.valid()) return;  // accumulate in place
    const auto saved_layer = layer_;
    layer_ = P.layer;
    P.grad = alloc(P.name, checked_mul(P.numel, pg_), Category::Gradients);
    layer_ = saved_layer;
}

void StepBuilder::grad_done(int p) {
    Param& P = params_[static_cast<std::size_t>(p)];
    assert(P.grad.valid());
    if (s_.optimizer_in_backward) {
        const char* op = op_;
        at("optimizer.step_in_backward");  // the step runs in the gradient hook, then the gradient goes
        drop(P.grad);
        at(op);
    } else if (zero_stage() >= 2) {
        const char* op = op_;
        at("zero.reduce_scatter");  // reduced into this rank's shard, the full gradient goes
        drop(P.grad);
        at(op);
    }
}

// AMP keeps a bf16 copy of each fp32 weight in the autocast cache for the rest of
// the autocast region, and every matmul that used it saves it for backward.
void StepBuilder::use_weight(int p) {
    if (s_.precision != Precision::AmpFp32) return;
    Param& P = params_[static_cast<std::size_t>(p)];
    if (!P.amp_copy.valid()) {
        P.amp_copy = alloc("autocast_bf16", checked_mul(P.numel, 2), Category::Weights);
        autocast_cache_.push_back(p);
    }
    if (grad_) {
        save(P.amp_copy);
        P.amp_saved.push_back(P.amp_copy);
    }
}

void StepBuilder::release_weight(int p) {
    if (s_.precision != Precision::AmpFp32) return;
    Param& P = params_[static_cast<std::size_t>(p)];
    assert(!P.amp_saved.empty());
    T c = P.amp_saved.back();
    P.amp_saved.pop_back();
    drop(c);
}

void StepBuilder::clear_autocast_cache() {
    for (int p : autocast_cache_) drop(params_[static_cast<std::size_t>(p)].amp_copy);
    autocast_cache_.clear();
}

T StepBuilder::cast_for_matmul(T& x, std::int64_t cols) {
    if (rb_ == 2) return std::exchange(x, T{});
    T c = act("autocast_input_bf16", bf16(tokens_, cols), true);
    drop(x);
    return c;
}

T StepBuilder::uncast_grad(T& g, std::int64_t cols) {
    if (rb_ == 2) return std::exchange(g, T{});
    T f = alloc("grad_fp32", f32(tokens_, cols), Category::Transient);
    drop(g);
    return f;
}

// ---- ZeRO-3 units ------------------------------------------------------------------

bytes_t StepBuilder::unit_bytes(int unit) const {
    std::int64_t n = 0;
    if (unit < 0) {
        n = params_[static_cast<std::size_t>(embed_)].numel;
    } else if (unit >= m_.num_layers) {
        n = params_[static_cast<std::size_t>(final_norm_)].numel + params_[static_cast<std::size_t>(lm_head_)].numel;
    } else {
        for (const auto& p : params_)
            if (p.layer == unit) n += p.numel;
    }
    return checked_mul(n, pw_);
}

void StepBuilder::gather_unit(int unit) {
    if (zero_stage() < 3 || unit < -1 || unit > m_.num_layers) return;
    T& g = gathered_[static_cast<std::size_t>(unit + 1)];
    if (g.valid()) return;
    const char* op = op_;
    const auto layer = layer_;
    at("zero3.all_gather");
    layer_ = unit >= 0 && unit < m_.num_layers ? unit : -1;
    g = alloc("gathered_params", unit_bytes(unit), Category::Weights);
    at(op);
    layer_ = layer;
}

void StepBuilder::release_unit(int unit) {
    if (zero_stage() < 3) return;
    const char* op = op_;
    at("zero3.release");
    drop(gathered_[static_cast<std::size_t>(unit + 1)]);
    at(op);
}

// Gathers `unit` and the next `zero3_prefetch` units in execution order (dir +1 forward, -1 backward).
void StepBuilder::enter_unit(int unit, int dir) {
    for (int k = 0; k <= s_.zero3_prefetch; ++k) gather_unit(unit + dir * k);
}

}  // namespace mst::sim
