// The CPU executor: one real training step (forward, backward, optimizer) of a
// Llama-family decoder on the CPU kernels (cpu/kernels.hpp), every buffer taken from a
// TrackingAllocator, so the step's memory is *measured*: an mst::Timeline of source "cpu".
//
// INDEPENDENCE RULE. This file must not call the simulator (src/core/sim/, simulate(),
// simulate_peaks(), estimate()) or any of its size rules. Every buffer it allocates is
// what a kernel call really reads or writes, sized from the tensor's shape and storage
// dtype as the kernel API defines them (flash_lse_floats(), dtype_bytes(), ...), so that
// diffing the two timelines can catch a wrong rule. What it does share with the
// simulator, on purpose, is the op ORDER and PyTorch's lifetimes (who holds a tensor and
// when it lets go), written out again here: the goal is an event-by-event match, the
// same allocations and frees in the same order with the same bytes and categories.
//
// Shapes: T = B*S tokens; d hidden, I intermediate, V vocab, q_dim = nh*hd,
// kv_dim = nkv*hd. Activations are rows of [T, features], row b*S + t.
#include "executor.hpp"

#include "cpu_backend.hpp"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <stdexcept>
#include <utility>

#include <fmt/format.h>

#include "mst/error.hpp"
#include "mst/simulate.hpp"

namespace mst::exec {

float* Ten::f32() const {
    if (dtype != DType::F32) throw std::logic_error("executor: an fp32 buffer was expected");
    return static_cast<float*>(buf->data());
}

namespace {

// The knobs and model features one process with these kernels cannot run.
void check_supported(const ModelSpec& m, const TrainingSetup& s, const Backend& b) {
    const std::string w = "setup", who = "the " + b.name() + " executor";
    if (s.runtime != Runtime::Kernels)
        fail(w, "runtime", who + " runs mst-plan's kernels; expected kernels, got " + to_string(s.runtime) +
                               " (the hf runtime is measured by the referee, scripts/torch_crosscheck.py --device fake)");
    // (expert parallelism draws its ranks from these: it is refused with them)
    if (s.dp > 1) fail(w, "dp", "expected 1 (" + who + " runs one process: no data parallelism)");
    if (s.zero_stage > 0) fail(w, "zero_stage", "expected 0 (ZeRO shards over data-parallel ranks; " + who + " runs one process)");
    if (s.sp > 1) fail(w, "sp", "expected 1 (" + who + " runs one process: no sequence parallelism)");
    if (s.optimizer == Optimizer::AdamW8bit)
        fail(w, "optimizer", "expected adamw or sgd (" + who + " has no 8-bit AdamW: bitsandbytes' blockwise quantisation)");
    if (m.hidden_act != "silu" && m.hidden_act != "gelu_pytorch_tanh")
        fail(m.name, "hidden_act", fmt::format("expected silu or gelu_pytorch_tanh ({} implements those), got '{}'", who, m.hidden_act));
    if (m.head_dim > b.max_head_dim())
        fail(m.name, "head_dim", fmt::format("expected at most {} (the {} kernels' largest), got {}", b.max_head_dim(), b.name(), m.head_dim));
    if (m.moe && m.moe->experts > b.max_experts())
        fail(m.name, "num_experts", fmt::format("expected at most {} (the {} kernels route no more), got {}", b.max_experts(), b.name(),
                                                m.moe->experts));
}

// A backend that knows how much memory it can give (the CPU's: this machine's) refuses a step the
// simulator says needs more, before allocating anything: it would only be killed.
void check_memory(const ModelSpec& m, const TrainingSetup& s, const ExecuteOptions& options, const Backend& b) {
    const auto available = b.memory_available();
    if (!available) return;
    GpuProfile workspace_only;  // the executor allocates the options' workspace, not a GPU's
    workspace_only.calibration.cublas_workspace_bytes = options.workspace_bytes;
    const MemoryPeaks p = simulate_peaks(m, s, workspace_only, /*allocator=*/false);
    // Numerics tests store every tensor in fp32: at most twice the policy's bytes.
    const bytes_t needed = checked_mul(checked_add(p.peak_bytes, p.host_peak_bytes), options.storage_fp32 ? 2 : 1);
    if (needed > *available)
        fail("measure", "backend " + b.name(),
             fmt::format("expected a step within the {} of memory this machine has available; the simulator predicts "
                         "{} bytes ({}) for this model and setup",
                         format_bytes(*available), needed, format_bytes(needed)));
}

}  // namespace

// ---- tensors ---------------------------------------------------------------------------

Ten Step::alloc(const char* name, std::int64_t numel, DType dtype, Category category, Device device) {
    const bytes_t bytes = checked_mul(numel, dtype_bytes(dtype), "tensor size");
    return Ten{std::make_shared<Buffer>(alloc_.allocate(name, bytes, category, device)), dtype};
}

Ten Step::act(const char* name, std::int64_t numel, DType dtype, bool saved_by_op) {
    return alloc(name, numel, dtype, grad_ && saved_by_op ? Category::SavedActivation : Category::Transient);
}

Ten Step::alloc_i64(const char* name, std::int64_t numel, bool saved_by_op) {
    const bytes_t bytes = checked_mul(numel, std::int64_t{8}, "tensor size");
    const Category category = grad_ && saved_by_op ? Category::SavedActivation : Category::Transient;
    return Ten{std::make_shared<Buffer>(alloc_.allocate(name, bytes, category, Device::Gpu)), DType::F32};
}

void Step::at(const char* op) {
    b_.synchronize();  // an asynchronous backend's op ends when its kernels do
    const auto now = std::chrono::steady_clock::now();
    if (!op_.empty()) {
        const double seconds = std::chrono::duration<double>(now - op_start_).count();
        auto it = std::find_if(result_.op_seconds.begin(), result_.op_seconds.end(),
                               [&](const auto& e) { return e.first == op_; });
        if (it == result_.op_seconds.end()) result_.op_seconds.emplace_back(op_, seconds);
        else it->second += seconds;
    }
    op_ = op;
    op_start_ = now;
    alloc_.set_op(op);
}

std::vector<std::int64_t> Step::chunks(std::int64_t count) const {
    // What M means is the setup's definition (count parts of T tokens, differing by at most
    // one, the larger first, none dropped), not a size rule of the simulator.
    return chunk_sizes(T_, count);
}

AttentionConfig Step::attention_config(int l) const {
    AttentionConfig c;
    c.B = B_, c.S = S_, c.nh = m_.num_heads, c.nkv = m_.num_kv_heads, c.hd = m_.head_dim;
    c.scale = m_.query_pre_attn_scalar ? static_cast<float>(1.0 / std::sqrt(*m_.query_pre_attn_scalar))
                                       : 1.0f / std::sqrt(static_cast<float>(m_.head_dim));
    if (m_.sliding_window && m_.sliding_layers[static_cast<std::size_t>(l)]) c.window = *m_.sliding_window;
    if (m_.attn_logit_softcapping) c.softcap = static_cast<float>(*m_.attn_logit_softcapping);
    const int sinks = layer_params_[static_cast<std::size_t>(l)].sinks;
    if (sinks >= 0) {  // read as stored (under AMP the fp32 parameter itself: no autocast copy)
        const Ten& w = params_[static_cast<std::size_t>(sinks)].weight;
        c.sinks = w.buf->data(), c.sinks_dtype = w.dtype;
    }
    return c;
}

// ---- parameters ------------------------------------------------------------------------

Step::Step(const ModelSpec& model, const TrainingSetup& setup, std::uint64_t seed, const ExecuteOptions& options,
           Backend& backend)
    : m_(model), s_(setup), opt_(options), b_(backend), alloc_(backend, model.name), rng_(seed) {
    validate(setup, model);
    check_supported(model, setup, backend);
    check_memory(model, setup, options, backend);
    switch (s_.precision) {
        case Precision::PureBf16: pw_ = DType::BF16, pg_ = DType::BF16; break;
        case Precision::Bf16Master: pw_ = DType::BF16, pg_ = DType::F32; break;
        case Precision::AmpFp32: pw_ = DType::F32, pg_ = DType::F32; break;
    }
    amp_ = s_.precision == Precision::AmpFp32;
    act_ = DType::BF16;
    res_ = amp_ ? DType::F32 : DType::BF16;  // AMP: fp32 embedding and residual adds
    sd_ = s_.effective_state_dtype() == StateDtype::Fp32 ? DType::F32 : DType::BF16;
    if (opt_.storage_fp32) act_ = res_ = pw_ = pg_ = sd_ = DType::F32;
    B_ = s_.micro_batch, S_ = s_.seq_len, T_ = B_ * S_;
    gemma_ = m_.gemma();
    norm_kind_ = gemma_ ? NormKind::Gemma : NormKind::Llama;  // gain w or 1 + w
    gated_ = m_.moe && m_.moe->gpt_oss ? GatedAct(GatedAct::GptOss, static_cast<float>(m_.moe->swiglu_limit))
             : m_.hidden_act == "silu"   ? GatedAct::Silu
                                         : GatedAct::GeluTanh;
    normalize_ = m_.moe && (m_.moe->normalize_top_k || m_.moe->gpt_oss);
    result_.timeline.micro_steps = static_cast<std::int32_t>(s_.grad_accum);
    build_params();
}

void Step::build_params() {
    const std::int64_t d = m_.hidden_size, I = m_.intermediate_size;
    auto add = [&](const char* name, std::int32_t layer, std::int64_t rows, std::int64_t cols, bool bias = false) {
        Param p;
        p.name = name, p.layer = layer, p.rows = rows, p.cols = cols, p.bias = bias;
        params_.push_back(std::move(p));
        return static_cast<int>(params_.size() - 1);
    };
    auto gain = [&](const char* name, std::int32_t layer, std::int64_t size) {
        const int p = add(name, layer, 1, size);
        params_.back().gain = true;
        return p;
    };
    const bool qkv_bias = m_.qkv_bias, o_bias = m_.o_bias, mlp_bias = m_.mlp_bias;
    embed_ = add("embed_tokens", -1, m_.vocab_size, d);                         // [V, d]
    for (std::int32_t l = 0; l < m_.num_layers; ++l) {
        LayerParams lp;
        lp.norm1 = gain("input_norm", l, d);                                    // [d]
        lp.q = add("q_proj", l, m_.q_dim(), d, qkv_bias);                       // [q_dim, d] (+ [q_dim])
        lp.k = add("k_proj", l, m_.kv_dim(), d, qkv_bias);                      // [kv_dim, d] (+ [kv_dim])
        lp.v = add("v_proj", l, m_.kv_dim(), d, qkv_bias);                      // [kv_dim, d] (+ [kv_dim])
        lp.o = add("o_proj", l, d, m_.q_dim(), o_bias);                         // [d, q_dim] (+ [d])
        if (m_.qk_norm) {                                                       // Qwen3
            lp.q_norm = gain("q_norm", l, m_.head_dim);                         // [head_dim]
            lp.k_norm = gain("k_norm", l, m_.head_dim);                         // [head_dim]
        }
        if (gemma_) lp.post_attn_norm = gain("post_attention_norm", l, d);      // [d]
        lp.norm2 = gain(gemma_ ? "pre_feedforward_norm" : "post_attention_norm", l, d);  // [d]
        if (gemma_) lp.post_ff_norm = gain("post_feedforward_norm", l, d);      // [d]
        if (m_.attention_sinks) lp.sinks = add("sinks", l, m_.num_heads, 1);    // [nh] (gpt-oss)
        if (m_.moe) {  // the router, then each projection of every expert stacked: expert e's rows e*out ..
            const std::int64_t E = m_.moe->experts, Ie = m_.moe->intermediate;
            const bool biases = m_.moe->gpt_oss;  // the router's and each expert's, after the stacked weights
            lp.router = add("router", l, E, d, biases);                         // [E, d] (+ [E])
            lp.gate = add("experts.gate_proj", l, E * Ie, d, biases);           // [E, Ie, d] (+ [E, Ie])
            lp.up = add("experts.up_proj", l, E * Ie, d, biases);               // [E, Ie, d] (+ [E, Ie])
            lp.down = add("experts.down_proj", l, E * d, Ie, biases);           // [E, d, Ie] (+ [E, d])
            layer_params_.push_back(lp);
            continue;
        }
        lp.gate = add("gate_proj", l, I, d, mlp_bias);                          // [I, d] (+ [I])
        lp.up = add("up_proj", l, I, d, mlp_bias);                              // [I, d] (+ [I])
        lp.down = add("down_proj", l, d, I, mlp_bias);                          // [d, I] (+ [d])
        layer_params_.push_back(lp);
    }
    final_norm_ = gain("final_norm", -1, d);
    lm_head_ = m_.tie_word_embeddings ? embed_ : add("lm_head", -1, m_.vocab_size, d);  // [V, d]
}

// SplitMix64 (Steele, Lea, Flood 2014): fast, and the same numbers on every standard
// library (std::*_distribution are implementation-defined).
std::uint64_t Step::random() {
    std::uint64_t z = (rng_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Persistent state before the step, steady state (the optimizer's states already exist):
// weights with random values (matrices, biases and sinks uniform with standard deviation 0.02,
// norm gains 1: a Llama weight of 1, a Gemma weight of 0), master copy, states at 0. The values are
// counter-based (fill_uniform: parameter p's element i depends on the seed, p and i only), so
// every backend starts from the same weights.
void Step::init_state() {
    alloc_.set_phase(Phase::Init);
    const float half_width = 0.02f * std::sqrt(3.0f);  // U(-a, a) has standard deviation a / sqrt(3)
    const std::uint64_t weights_key = random();
    at("init.weights");
    for (std::size_t i = 0; i < params_.size(); ++i) {
        Param& p = params_[i];
        alloc_.set_layer(p.layer);
        p.weight = alloc(p.name.c_str(), p.numel(), pw_, Category::Weights);
        if (p.gain)
            b_.fill(p.weight.t(), p.numel(), norm_kind_ == NormKind::Gemma ? 0.0f : 1.0f);
        else
            b_.fill_uniform(p.weight.t(), p.numel(), half_width, weights_key + (i << 40));
    }
    if (opt_.nudge) nudge_weight(*opt_.nudge);
    if (s_.precision == Precision::Bf16Master) {
        at("init.master_weights");
        for (Param& p : params_) {
            alloc_.set_layer(p.layer);
            p.master = alloc(p.name.c_str(), p.numel(), DType::F32, Category::MasterWeights);
            b_.cast(p.master.t(), p.weight.t(), p.numel());
        }
    }
    at("init.optimizer_state");
    for (Param& p : params_) {
        alloc_.set_layer(p.layer);
        if (s_.optimizer == Optimizer::AdamW) {
            p.state1 = alloc("exp_avg", p.numel(), sd_, Category::OptimizerState);
            p.state2 = alloc("exp_avg_sq", p.numel(), sd_, Category::OptimizerState);
            b_.zero(p.state2.t(), p.numel());
        } else {
            p.state1 = alloc("momentum", p.numel(), sd_, Category::OptimizerState);
        }
        b_.zero(p.state1.t(), p.numel());
    }
    alloc_.set_layer(-1);
    if (opt_.workspace_bytes > 0) {  // raw bytes, no dtype: the cuBLAS-workspace equivalent
        at("init.cublas_workspace");
        workspace_ = Ten{std::make_shared<Buffer>(alloc_.allocate("cublas_workspace", opt_.workspace_bytes,
                                                                  Category::Workspace)),
                         DType::F32};
        b_.set_workspace(workspace_.buf->data(), static_cast<std::size_t>(opt_.workspace_bytes));
    }
}

Tensor Step::grad_write(int p) {
    Param& P = params_[static_cast<std::size_t>(p)];
    if (!P.grad) {  // first write of this step: every weight-gradient kernel accumulates into it
        const auto layer = alloc_.layer();
        alloc_.set_layer(P.layer);
        P.grad = alloc(P.name.c_str(), P.numel(), pg_, Category::Gradients);
        alloc_.set_layer(layer);
        b_.zero(P.grad.t(), P.numel());
    }
    return P.grad.t();
}

void Step::grad_done(int p) {
    Param& P = params_[static_cast<std::size_t>(p)];
    assert(P.grad);
    if (!s_.optimizer_in_backward) return;
    // The gradient hook steps the parameter, then the gradient goes.
    const std::string op = op_;
    at("optimizer.step_in_backward");
    capture_gradient(P);
    optimizer_update(P);
    drop(P.grad);
    at(op.c_str());
}

void Step::linear_forward(Tensor out, ConstTensor in, int p, Tensor w, std::int64_t n, std::int64_t i, std::int64_t o,
                          std::int64_t first) {
    const Param& P = params_[static_cast<std::size_t>(p)];
    b_.linear_forward(out, in, offset(w, first * i), n, i, o);
    if (P.bias) b_.bias_forward(out, offset(w, P.rows * P.cols + first), n, o);
}

void Step::linear_weight_grad(int p, ConstTensor dout, ConstTensor in, std::int64_t n, std::int64_t i, std::int64_t o,
                              std::int64_t first) {
    const Param& P = params_[static_cast<std::size_t>(p)];
    const Tensor g = grad_write(p);
    b_.linear_backward_weight(offset(g, first * i), dout, in, n, i, o, true);
    if (P.bias) b_.bias_backward(offset(g, P.rows * P.cols + first), dout, n, o);
}

// AMP: the autocast cache keeps one bf16 copy of each fp32 weight for the rest of the
// autocast region, and every matmul that used it under autograd saves it for backward.
Tensor Step::use_weight(int p) {
    Param& P = params_[static_cast<std::size_t>(p)];
    if (!amp_) return P.weight.t();
    if (!P.amp_copy) {
        P.amp_copy = alloc("autocast_bf16", P.numel(), opt_.storage_fp32 ? DType::F32 : DType::BF16, Category::Weights);
        b_.cast(P.amp_copy.t(), P.weight.t(), P.numel());
        autocast_cache_.push_back(p);
    }
    if (grad_) P.amp_saved.push_back(P.amp_copy);
    return P.amp_copy.t();
}

Tensor Step::backward_weight(int p) {
    const Param& P = params_[static_cast<std::size_t>(p)];
    return amp_ ? P.amp_saved.back().t() : P.weight.t();
}

void Step::release_weight(int p) {
    if (!amp_) return;
    Param& P = params_[static_cast<std::size_t>(p)];
    assert(!P.amp_saved.empty());
    drop(P.amp_saved.back());
    P.amp_saved.pop_back();
}

void Step::clear_autocast_cache() {
    for (int p : autocast_cache_) drop(params_[static_cast<std::size_t>(p)].amp_copy);
    autocast_cache_.clear();
}

Ten Step::cast_for_matmul(Ten x, std::int64_t cols) {
    if (!amp_) return x;
    Ten c = act("autocast_input_bf16", T_ * cols, opt_.storage_fp32 ? DType::F32 : DType::BF16, true);
    b_.cast(c.t(), x.t(), T_ * cols);
    drop(x);
    return c;
}

Ten Step::uncast_grad(Ten g, std::int64_t cols) {
    if (!amp_) return g;
    Ten f = alloc("grad_fp32", T_ * cols, DType::F32, Category::Transient);
    b_.cast(f.t(), g.t(), T_ * cols);
    drop(g);
    return f;
}

std::string Step::qualified_name(const Param& P) const {
    return P.layer >= 0 ? fmt::format("layers.{}.{}", P.layer, P.name) : P.name;
}

void Step::nudge_weight(const ExecuteOptions::Nudge& n) {
    for (Param& P : params_) {
        if (qualified_name(P) != n.param) continue;
        if (P.weight.dtype != DType::F32 || n.index < 0 || n.index >= P.numel())
            throw std::logic_error("executor: a nudge needs fp32 storage and an element of the parameter");
        float* element = static_cast<float*>(P.weight.buf->data()) + n.index;
        float value = 0;
        b_.copy(&value, element, sizeof value);
        value += n.delta;
        b_.copy(element, &value, sizeof value);
        return;
    }
    throw std::logic_error("executor: no parameter named " + n.param + " to nudge");
}

void Step::capture_gradient(const Param& P) {
    if (!opt_.capture) return;
    NamedValues v{qualified_name(P), std::vector<float>(static_cast<std::size_t>(P.numel()))};
    b_.to_host(v.values.data(), P.grad.t(), P.numel());
    result_.gradients.push_back(std::move(v));
}

// A fused update in place, without temporaries: the fp32 master under Bf16Master (then
// rounded into the bf16 weight), else the weight itself.
void Step::optimizer_update(Param& P) {
    const Tensor target = P.master ? P.master.t() : P.weight.t();
    if (s_.optimizer == Optimizer::AdamW)
        b_.adamw_step(target, P.grad.t(), P.state1.t(), P.state2.t(), P.numel(), AdamWConfig{}, 1);
    else
        b_.sgd_step(target, P.grad.t(), P.state1.t(), P.numel(), SgdConfig{1e-2f, 0.9f, 0.0f, 0.0f, false}, 1);
    if (P.master) b_.cast(P.weight.t(), P.master.t(), P.numel());
}

// ---- the step ----------------------------------------------------------------------------

void Step::micro_step(int micro) {
    alloc_.set_micro_step(micro);
    alloc_.set_phase(Phase::Forward);
    alloc_.set_layer(-1);
    const std::int64_t L = m_.num_layers, d = m_.hidden_size;
    // Layer l's input is a checkpoint, or saved by its first norm.
    auto input_category = [&](std::int64_t l) {
        return s_.checkpointed(l) ? Category::Checkpoint : Category::SavedActivation;
    };

    at("inputs");
    ids_ = Ten{std::make_shared<Buffer>(alloc_.allocate("input_ids", T_ * 8, Category::SavedActivation)), DType::F32};
    labels_ = Ten{std::make_shared<Buffer>(alloc_.allocate("labels", T_ * 8, Category::SavedActivation)), DType::F32};
    auto token = [&] { return static_cast<std::int64_t>(random() % static_cast<std::uint64_t>(m_.vocab_size)); };
    std::vector<std::int64_t> ids(static_cast<std::size_t>(T_)), labels(static_cast<std::size_t>(T_));
    for (auto& id : ids) id = token();
    for (auto& label : labels) label = token();
    b_.copy(ids_.buf->data(), ids.data(), ids.size() * sizeof(std::int64_t));
    b_.copy(labels_.buf->data(), labels.data(), labels.size() * sizeof(std::int64_t));
    const auto valid = static_cast<std::int64_t>(
        std::count_if(labels.begin(), labels.end(), [](std::int64_t label) { return label != kIgnoreIndex; }));
    loss_scale_ = 1.0f / static_cast<float>(valid * s_.grad_accum);  // mean over tokens, over grad_accum micro-steps
    loss_rows_ += valid;

    // Eager attention: the model builds 4-D additive masks [B, 1, S, S], one per kind of layer
    // (full, sliding); checkpointed layers receive them as inputs, so the checkpoints keep them
    // until backward.
    const bool any_checkpoint = s_.checkpointed_count() > 0;
    if (s_.attention == Attention::Eager) {
        bool any_full = false, any_sliding = false;
        for (std::int32_t l = 0; l < L; ++l) (attention_config(l).window > 0 ? any_sliding : any_full) = true;
        const Category mask_category = any_checkpoint ? Category::Checkpoint : Category::Transient;
        for (Ten* mask : {&mask_full_, &mask_sliding_}) {
            const bool sliding = mask == &mask_sliding_;
            if (!(sliding ? any_sliding : any_full)) continue;
            at("attn.mask");
            *mask = alloc("causal_mask", B_ * S_ * S_, act_, mask_category);
            b_.causal_mask_fill(mask->t(), B_, S_, sliding ? *m_.sliding_window : 0);
        }
    }

    Ten x = embedding_forward(input_category(0));
    std::vector<LayerSaved> saved(static_cast<std::size_t>(L));
    std::vector<Ten> checkpoint(static_cast<std::size_t>(L)), host(static_cast<std::size_t>(L));
    for (std::int32_t l = 0; l < L; ++l) {
        const auto i = static_cast<std::size_t>(l);
        const Category out = l + 1 < L ? input_category(l + 1) : Category::SavedActivation;
        if (s_.checkpointed(l)) {
            checkpoint[i] = x;  // the checkpoint's reference to the layer input
            {
                NoGrad no_grad(*this);
                x = layer_forward(l, std::move(x), saved[i], out);
            }
            if (s_.offload_checkpoints) {
                at("checkpoint.offload");
                host[i] = alloc("checkpoint", T_ * d, res_, Category::Offloaded, Device::Host);
                b_.copy(host[i].buf->data(), checkpoint[i].buf->data(), static_cast<std::size_t>(host[i].buf->bytes()));
                drop(checkpoint[i]);
            }
        } else {
            x = layer_forward(l, std::move(x), saved[i], out);
        }
    }
    HeadSaved head;
    head_forward(std::move(x), head);
    alloc_.set_layer(-1);
    at("forward.end");
    clear_autocast_cache();
    if (!any_checkpoint) drop(mask_full_), drop(mask_sliding_);

    alloc_.set_phase(Phase::Backward);
    Ten dres = head_backward(head);  // the residual-stream gradient, accumulated in place
    drop(labels_);
    for (std::int32_t l = static_cast<std::int32_t>(L) - 1; l >= 0; --l) {
        const auto i = static_cast<std::size_t>(l);
        alloc_.set_layer(l);
        if (s_.checkpointed(l)) {
            if (s_.offload_checkpoints) {
                at("checkpoint.reload");
                checkpoint[i] = alloc("checkpoint", T_ * d, res_, Category::Checkpoint);
                b_.copy(checkpoint[i].buf->data(), host[i].buf->data(), static_cast<std::size_t>(host[i].buf->bytes()));
                drop(host[i]);
            }
            // Reentrant checkpointing: the layer's forward again, under autograd; its output
            // lives through the layer's backward.
            alloc_.set_phase(Phase::Recompute);
            Ten out = layer_forward(l, checkpoint[i], saved[i], Category::Transient);
            at("recompute.end");
            clear_autocast_cache();
            alloc_.set_phase(Phase::Backward);
            layer_backward(l, saved[i], dres);
            drop(out);
            drop(checkpoint[i]);
        } else {
            layer_backward(l, saved[i], dres);
        }
    }
    embedding_backward(dres);
    at("backward.end");
    drop(dres), drop(ids_);
    drop(mask_full_), drop(mask_sliding_);
}

void Step::optimizer_step() {
    alloc_.set_phase(Phase::Optimizer);
    alloc_.set_layer(-1);
    if (s_.optimizer_in_backward) return;  // stepped inside backward
    at("optimizer.step");
    for (Param& p : params_) {
        capture_gradient(p);
        optimizer_update(p);
    }
    at("optimizer.zero_grad");  // set_to_none
    for (Param& p : params_) drop(p.grad);
}

MeasuredStep Step::run() {
    const auto start = std::chrono::steady_clock::now();
    init_state();
    const auto recorded = static_cast<std::int32_t>(std::min<std::int64_t>(s_.grad_accum, 2));
    for (int micro = 0; micro < recorded; ++micro) micro_step(micro);
    optimizer_step();
    at("");  // charge the last op its time
    result_.wall_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    result_.loss = b_.loss_sum() / static_cast<double>(loss_rows_);
    if (opt_.capture)
        for (const Param& p : params_) {
            NamedValues v{qualified_name(p),
                          std::vector<float>(static_cast<std::size_t>(p.numel()))};
            b_.to_host(v.values.data(), p.weight.t(), p.numel());
            result_.parameters.push_back(std::move(v));
        }
    const std::int32_t micro_steps = result_.timeline.micro_steps;
    result_.timeline = alloc_.finish();
    result_.timeline.micro_steps = micro_steps;
    result_.timeline.micro_steps_recorded = recorded;
    check_consistent(result_.timeline);
    return std::move(result_);
}

}  // namespace mst::exec

namespace mst {

MeasuredStep execute_cpu(const ModelSpec& model, const TrainingSetup& setup, std::uint64_t seed,
                         const ExecuteOptions& options) {
    exec::CpuBackend cpu;
    return exec::Step(model, setup, seed, options, cpu).run();
}

}  // namespace mst
