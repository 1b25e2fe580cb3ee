// The tensor table, parameters, gradients and persistent state of the simulator.
#include "builder.hpp"

#include <cassert>
#include <stdexcept>
#include <utility>

#include <fmt/format.h>

namespace mst::sim {

StepBuilder::StepBuilder(const ModelSpec& model, const TrainingSetup& setup, const GpuProfile& gpu, bool record,
                         PeakRun peak_run)
    : m_(model), s_(setup), gpu_(gpu), record_(record), peak_run_(record ? PeakRun{} : peak_run) {
    switch (s_.precision) {
        case Precision::PureBf16: pw_ = 2, pg_ = 2, rb_ = 2; break;
        case Precision::Bf16Master: pw_ = 2, pg_ = 4, rb_ = 2; break;
        case Precision::AmpFp32: pw_ = 4, pg_ = 4, rb_ = 4; break;
    }
    if (PeakScratch* scratch = peak_run_.scratch) {
        table_ = std::move(scratch->table);
        table_.clear();
        params_ = std::move(scratch->params);
        params_.clear();
        order_ = std::move(scratch->order);
        order_.clear();
        layer_params_ = std::move(scratch->layer_params);
        layer_params_.clear();
        scratch->gpu_events.clear();
        scratch->boundaries.clear();
        scratch->loops.clear();
        scratch->loop_marks.clear();
        scratch->loop_counts.clear();
    }
    tokens_ = s_.local_tokens();
    hf_ = s_.runtime == Runtime::Hf;
    amp_ = hf_ && s_.precision == Precision::AmpFp32;
    ds_on_ = s_.deepspeed_engine();
    z3_on_ = s_.deepspeed_zero3();
    titan_ = s_.titan();
    // (torchtitan shards with FSDP2 on any ranks, one included: bf16 parameters, gradients reduced in fp32)
    fsdp2_on_ = s_.fsdp2_shards() || titan_;
    if (fsdp2_on_ && s_.precision == Precision::Bf16Master) fsdp2_store_ = 4;  // (fp32 shards)
    if (fsdp2_on_) fsdp2_reduce_ = titan_ ? 4 : s_.fsdp2_reduce_bytes();
    if (hf_) pg_ = pw_;  // autograd's gradients are in the parameters' dtype; fp32 masters keep their own
    tl_.source = "simulator";
    tl_.model = m_.name;
    tl_.micro_steps = static_cast<std::int32_t>(s_.grad_accum);
    // Micro-steps after the second repeat it; unsynced FSDP2's last does not (it reduce-scatters): 0, 1, last.
    fsdp2_no_sync_ = fsdp2_on_ && s_.fsdp2_no_sync;
    fsdp2_keep_gathered_ = fsdp2_on_ && !s_.fsdp2_reshard_after_forward;
    fsdp2_accelerate_ = fsdp2_on_ && s_.fsdp2_groups == Fsdp2Groups::Accelerate;
    fsdp2_root_reshards_ = fsdp2_on_ && s_.fsdp2_root_reshards();
    fsdp2_torch_2_14_ = fsdp2_on_ && s_.fsdp2_groups == Fsdp2Groups::Axolotl;
    tl_.micro_steps_recorded = static_cast<std::int32_t>(std::min<std::int64_t>(s_.grad_accum, fsdp2_no_sync_ ? 3 : 2));
    build_params();
}

StepBuilder::~StepBuilder() {
    if (PeakScratch* scratch = peak_run_.scratch) {
        scratch->table = std::move(table_);
        scratch->params = std::move(params_);
        scratch->order = std::move(order_);
        scratch->layer_params = std::move(layer_params_);
    }
}

// ---- tensor table ------------------------------------------------------------

void StepBuilder::account_host(bytes_t bytes, bool alloc) {
    host_live_ = checked_add(host_live_, alloc ? bytes : -bytes, "host bytes");
    peaks_.host_peak_bytes = std::max(peaks_.host_peak_bytes, host_live_);
    if (peaks_.host_peak_bytes > peak_run_.limits.host_bytes) over_budget();
}

void StepBuilder::over_budget() { throw OverBudget{}; }

void StepBuilder::record(bool alloc, std::int64_t id) {
    const TableEntry& l = table_[static_cast<std::size_t>(id)];
    tl_.events.push_back(Event{alloc, id, l.bytes, l.category, l.device, phase_, layer_, micro_, op_, l.name});
}

void StepBuilder::dropped_after_free(T t) const {
    throw std::logic_error(fmt::format("simulator: tensor {} ({}) dropped after free", t.id,
                                       table_[static_cast<std::size_t>(t.id)].name));
}

std::vector<std::int64_t> StepBuilder::transient_chunks(std::int64_t chunks) const {
    // (Mixture-of-Experts blocks run every chunk: their repeats were not exact for the caching
    // allocator's cache releases, which fuzz_simulate found with expert parallelism over the device)
    if (record_ || m_.moe) return chunk_sizes(tokens_, chunks);
    std::vector<std::int64_t> kept;
    for (const ChunkGroup& g : chunk_groups(tokens_, chunks))
        kept.insert(kept.end(), static_cast<std::size_t>(std::min<std::int64_t>(g.count, 2)), g.tokens);
    return kept;
}

// ---- parameters ----------------------------------------------------------------

void StepBuilder::build_params() {
    const std::int64_t d = m_.hidden_size, I = m_.intermediate_size;
    // rows: the parameter's first dimension as torch stores it (a linear's weight is [out, in]); a
    // vector's is its length
    auto add = [&](const char* name, std::int32_t layer, std::int64_t numel, std::int64_t rows = 0) {
        Param p;
        p.name = name, p.layer = layer, p.numel = numel, p.rows = rows > 0 ? rows : numel;
        params_.push_back(std::move(p));
        return static_cast<int>(params_.size() - 1);
    };
    embed_ = add("embed_tokens", -1, m_.vocab_size * d, m_.vocab_size);
    for (std::int32_t l = 0; titan_ && l < m_.num_layers; ++l) {
        // torchtitan's Llama-3 block: attention (the fused wqkv, wo), feed_forward (w1 = gate, w2 = down,
        // w3 = up), attention_norm, ffn_norm
        LayerParams lp{};
        const std::int64_t qkv = m_.q_dim() + 2 * m_.kv_dim();
        lp.q = add("wqkv", l, d * qkv, qkv);
        lp.k = lp.v = -1;
        lp.o = add("wo", l, m_.q_dim() * d, d);
        lp.gate = add("w1", l, d * I, I);
        lp.down = add("w2", l, I * d, d);
        lp.up = add("w3", l, d * I, I);
        lp.norm1 = add("attention_norm", l, d);
        lp.norm2 = add("ffn_norm", l, d);
        layer_params_.push_back(lp);
    }
    for (std::int32_t l = 0; !titan_ && l < m_.num_layers; ++l) {
        LayerParams lp{};
        lp.norm1 = add("input_norm", l, d);
        // The kernels runtime folds a bias into its weight; in the hf runtime it is its own parameter.
        const bool fold = !hf_;
        // Phi-3's fused projections are one parameter each in the hf runtime (q, k, v in qkv_proj's
        // slot `q`; gate and up in gate_up_proj's slot `gate`); its attention registers o_proj first.
        const bool fused = hf_ && m_.fused_projections();
        if (fused) {
            lp.o = add("o_proj", l, m_.q_dim() * d, d);
            lp.q = add("qkv_proj", l, d * (m_.q_dim() + 2 * m_.kv_dim()), m_.q_dim() + 2 * m_.kv_dim());
            lp.k = lp.v = -1;
        } else {
            lp.q = add("q_proj", l, d * m_.q_dim() + (fold && m_.qkv_bias ? m_.q_dim() : 0), m_.q_dim());
            lp.k = add("k_proj", l, d * m_.kv_dim() + (fold && m_.qkv_bias ? m_.kv_dim() : 0), m_.kv_dim());
            lp.v = add("v_proj", l, d * m_.kv_dim() + (fold && m_.qkv_bias ? m_.kv_dim() : 0), m_.kv_dim());
            lp.o = add("o_proj", l, m_.q_dim() * d + (fold && m_.o_bias ? d : 0), d);
        }
        if (hf_ && m_.qkv_bias) {
            lp.q_bias = add("q_proj.bias", l, m_.q_dim());
            lp.k_bias = add("k_proj.bias", l, m_.kv_dim());
            lp.v_bias = add("v_proj.bias", l, m_.kv_dim());
        }
        if (hf_ && m_.o_bias) lp.o_bias = add("o_proj.bias", l, d);
        if (m_.qk_norm) {  // Qwen3: registered after the projections
            lp.q_norm = add("q_norm", l, m_.head_dim);
            lp.k_norm = add("k_norm", l, m_.head_dim);
        }
        if (m_.gemma()) lp.post_attn_norm = add("post_attention_norm", l, d);
        lp.norm2 = add(m_.gemma() ? "pre_feedforward_norm" : "post_attention_norm", l, d);
        if (m_.gemma()) lp.post_ff_norm = add("post_feedforward_norm", l, d);
        if (m_.attention_sinks) lp.sinks = add("sinks", l, m_.num_heads);
        if (m_.moe) {  // one parameter per projection for all experts (transformers fuses gate and up)
            const std::int64_t E = m_.moe->experts, Ie = m_.moe->intermediate;
            // gpt-oss's biases: parameters of their own in the hf runtime, folded in the kernels runtime
            const bool biases = hf_ && m_.moe->gpt_oss, folded = fold && m_.moe->gpt_oss;
            lp.router = add("router", l, E * d + (folded ? E : 0), E);
            if (biases) lp.router_bias = add("router.bias", l, E);
            if (hf_) {
                lp.gate = add("experts.gate_up_proj", l, E * 2 * Ie * d, E);
                lp.up = -1;
            } else {
                lp.gate = add("experts.gate_proj", l, E * Ie * d + (folded ? E * Ie : 0), E);
                lp.up = add("experts.up_proj", l, E * Ie * d + (folded ? E * Ie : 0), E);
            }
            if (biases) lp.gate_bias = add("experts.gate_up_proj_bias", l, E * 2 * Ie, E);
            lp.down = add("experts.down_proj", l, E * d * Ie + (folded ? E * d : 0), E);
            if (biases) lp.down_bias = add("experts.down_proj_bias", l, E * d, E);
            layer_params_.push_back(lp);
            continue;
        }
        if (fused) {
            lp.gate = add("gate_up_proj", l, d * 2 * I, 2 * I);
            lp.up = -1;
        } else {
            lp.gate = add("gate_proj", l, d * I + (m_.mlp_bias ? I : 0), I);
            lp.up = add("up_proj", l, d * I + (m_.mlp_bias ? I : 0), I);
        }
        lp.down = add("down_proj", l, I * d + (m_.mlp_bias ? d : 0), d);
        layer_params_.push_back(lp);
    }
    final_norm_ = add("final_norm", -1, d);
    // (torchtitan ties the weights after fully_shard: its FSDP2 keeps a parameter of the LM head's own, gathered
    // and given a gradient of its own, whose shard is the embedding's: titan_zero_grad)
    lm_head_ = m_.tie_word_embeddings && !titan_ ? embed_ : add("lm_head", -1, m_.vocab_size * d, m_.vocab_size);
    // Expert parallelism: each rank holds E / ep of every stacked expert parameter, which ZeRO
    // shards over the ranks holding the same experts; everything else over all dp x sp ranks.
    for (Param& p : params_) p.shard_ranks = s_.zero_ranks();
    for (const LayerParams& lp : layer_params_)
        for (int p : {lp.gate, lp.up, lp.down, lp.gate_bias, lp.down_bias})
            if (m_.moe && p >= 0) {
                Param& P = params_[static_cast<std::size_t>(p)];
                P.numel /= s_.ep, P.rows /= s_.ep;
                P.shard_ranks = s_.expert_data_ranks();
            }
    gathered_.assign(static_cast<std::size_t>(m_.num_layers + 2), T{});
    // The bytes ZeRO-3 gathers for each unit (index unit + 1): the embedding, each layer's sharded
    // parameters (an expert whose rank alone holds it, ep = dp x sp, is stored whole: nothing to
    // gather), the final norm with the LM head.
    unit_bytes_.assign(static_cast<std::size_t>(m_.num_layers + 2), 0);
    for (const Param& p : params_)
        if (p.layer >= 0 && p.shard_ranks > 1) unit_bytes_[static_cast<std::size_t>(p.layer + 1)] += p.numel;
    unit_bytes_.front() = params_[static_cast<std::size_t>(embed_)].numel;
    unit_bytes_.back() = params_[static_cast<std::size_t>(final_norm_)].numel + params_[static_cast<std::size_t>(lm_head_)].numel;
    for (bytes_t& b : unit_bytes_) b = checked_mul(b, pw_);

    // model.parameters() of a transformers causal LM: the embedding; per layer the attention's
    // q, k, v, o (each weight, then its bias; Phi-3: o, qkv), the MLP's gate, up, down (Phi-3:
    // gate_up, down), then the norms; the final norm; lm_head unless tied.
    if (!hf_) {
        for (int p = 0; p < static_cast<int>(params_.size()); ++p) order_.push_back(p);
        return;
    }
    order_.push_back(embed_);
    for (const LayerParams& lp : layer_params_) {
        if (titan_) {
            for (int p : {lp.q, lp.o, lp.gate, lp.down, lp.up, lp.norm1, lp.norm2}) order_.push_back(p);
            continue;
        }
        if (m_.fused_projections()) {
            for (int p : {lp.o, lp.q, lp.gate, lp.down, lp.norm1, lp.norm2}) order_.push_back(p);
            continue;
        }
        if (m_.moe) {  // the attention's, the block's (router and experts in its registration order), the norms
            const bool router_first = m_.moe->router_first;
            // (gpt-oss: the attention's own sinks before its projections; each bias after its weight)
            for (int p : {lp.sinks, lp.q, lp.q_bias, lp.k, lp.k_bias, lp.v, lp.v_bias, lp.o, lp.o_bias, lp.q_norm, lp.k_norm,
                          router_first ? lp.router : -1, router_first ? lp.router_bias : -1, lp.gate, lp.gate_bias, lp.down,
                          lp.down_bias, router_first ? -1 : lp.router, lp.norm1, lp.norm2})
                if (p >= 0) order_.push_back(p);
            continue;
        }
        for (int p : {lp.q, lp.q_bias, lp.k, lp.k_bias, lp.v, lp.v_bias, lp.o, lp.o_bias, lp.q_norm, lp.k_norm, lp.gate, lp.up, lp.down,
                      lp.norm1, lp.post_attn_norm, lp.norm2, lp.post_ff_norm})
            if (p >= 0) order_.push_back(p);
    }
    order_.push_back(final_norm_);
    if (!m_.tie_word_embeddings) order_.push_back(lm_head_);
}

// Persistent state, allocated before the step (steady state: step >= 2, so the
// optimizer's lazily created states already exist).
void StepBuilder::init_state() {
    phase_ = Phase::Init;
    layer_ = -1;
    if (ds_on_) {
        if (z3_on_) z3_init_state();
        else ds_init_state();
        init_workspace();
        return;
    }
    const bool shard_params = zero_stage() >= 3, shard_optim = zero_stage() >= 1, shard_grads = zero_stage() >= 2;
    // (FSDP2: each rank stores its padded dim-0 shard, and its optimizer steps the rows it uses)
    if (fsdp2_on_) fsdp2_build();
    auto part = [&](const Param& p, bool sharded) { return sharded ? ceil_div(p.numel, p.shard_ranks) : p.numel; };
    auto stored = [&](int i) {  // the weight's elements this rank stores
        return fsdp2_on_ ? fsdp2_elements(i, fsdp2_shard_rows(i)) : part(params_[static_cast<std::size_t>(i)], shard_params);
    };
    auto stepped = [&](int i) {  // the elements its optimizer steps on this rank
        return fsdp2_on_ ? fsdp2_elements(i, fsdp2_local_rows(i)) : part(params_[static_cast<std::size_t>(i)], shard_optim);
    };
    const int sd = s_.effective_state_dtype() == StateDtype::Fp32 ? 4 : 2;

    at("init.weights");
    for (int i : order_) {
        Param& p = params_[static_cast<std::size_t>(i)];
        layer_ = p.layer;
        p.weight = alloc(p.name, checked_mul(stored(i), fsdp2_on_ ? fsdp2_store_ : pw_), Category::Weights);
    }
    if (titan_) {  // every layer's RoPE table: complex64 [seq_len, head_dim / 2]
        at("init.buffers");
        for (std::int32_t l = 0; l < m_.num_layers; ++l) {
            layer_ = l;
            alloc("rope_cache", elems(s_.seq_len, m_.head_dim, 4), Category::Weights);
        }
    } else if (hf_) {
        init_hf_buffers();
    }
    if (s_.precision == Precision::Bf16Master && !fsdp2_on_) {  // (FSDP2's stored fp32 shards are the masters)
        at("init.master_weights");
        for (int i : order_) {
            const Param& p = params_[static_cast<std::size_t>(i)];
            layer_ = p.layer;
            alloc(p.name, checked_mul(part(p, shard_optim), 4), Category::MasterWeights);
        }
    }
    at("init.optimizer_state");
    for (int i : order_) {
        const Param& p = params_[static_cast<std::size_t>(i)];
        layer_ = p.layer;
        const std::int64_t n = stepped(i);
        // torch's fused implementations keep the step counter on the device (a 0-dim fp32 tensor);
        // the others keep it on the host.
        const bool step_on_device = hf_ && s_.optimizer_impl == OptimizerImpl::Fused && s_.optimizer == Optimizer::AdamW;
        switch (s_.optimizer) {
            case Optimizer::AdamW:
                if (step_on_device) alloc("step", 4, Category::OptimizerState);
                if (n == 0) break;  // (FSDP2: a rank past a short parameter's rows; torch allocates no empty tensor)
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
                if (n > 0) alloc("momentum", checked_mul(n, sd), Category::OptimizerState);
                break;
        }
    }
    if (hf_ddp() && !grad_ready_) hf_ddp_buckets();
    if (shard_grads) {
        at("init.gradient_shards");
        for (int i : order_) {
            const Param& p = params_[static_cast<std::size_t>(i)];
            if (p.shard_ranks == 1) continue;  // (its gradient is never reduce-scattered: it is the whole one)
            layer_ = p.layer;
            alloc(p.name, checked_mul(part(p, true), pg_), Category::Gradients);
        }
    }
    if (titan_) {
        // The previous step's sharded gradients, which torchtitan zeroes as a step begins: the bf16 output of each
        // reduce-scatter, one a group (the chunked loss reduces its LM head alone, in forward, then the rest of its
        // group), viewed by the parameters it reduced that had no sharded gradient yet (the tied LM head's is the
        // embedding's); made in the order of the parameters that view them.
        at("init.gradients");
        std::vector<std::vector<int>> parts;  // in the order they are reduced within a group
        for (std::size_t g = 0; g < fsdp2_.groups.size(); ++g) {
            const std::vector<int>& params = fsdp2_.groups[g].params;
            if (g != 0 || !titan_chunked_loss()) {
                parts.push_back(params);
                continue;
            }
            parts.push_back({lm_head_});
            parts.emplace_back();
            for (int p : params)
                if (p != lm_head_) parts.back().push_back(p);
        }
        std::vector<int> part_of(params_.size(), -1);
        for (std::size_t k = 0; k < parts.size(); ++k)
            for (int p : parts[k])
                for (int q : {p, fsdp2_same_shard(p)})
                    if (q >= 0 && part_of[static_cast<std::size_t>(q)] < 0) part_of[static_cast<std::size_t>(q)] = static_cast<int>(k);
        std::vector<bool> made(parts.size(), false);
        for (int i : order_) {
            const auto k = static_cast<std::size_t>(part_of[static_cast<std::size_t>(i)]);
            if (made[k]) continue;
            made[k] = true;
            std::int64_t elements = 0;
            for (int p : parts[k]) elements = checked_add(elements, fsdp2_elements(p, fsdp2_shard_rows(p)), "FSDP2 shard");
            layer_ = params_[static_cast<std::size_t>(parts[k].front())].layer;
            T buffer = alloc("sharded_grads", elems(1, elements, fsdp2_store_), Category::Gradients);
            for (std::size_t p = 0; p < params_.size(); ++p)
                if (part_of[p] == static_cast<int>(k)) fsdp2_.sharded_grads[p] = hold(buffer);
            drop(buffer);
        }
    }
    init_workspace();
}

void StepBuilder::init_workspace() {
    layer_ = -1;
    if (gpu_.calibration.cublas_workspace_bytes > 0) {
        at("init.cublas_workspace");
        alloc("cublas_workspace", gpu_.calibration.cublas_workspace_bytes, Category::Workspace);
    }
}

void StepBuilder::init_hf_buffers() {
    at("init.buffers");
    layer_ = -1;
    for (const HfBuffer& b : hf_buffers()) alloc(b.name, b.bytes, Category::Weights);
    // longrope's long_inv_freq: a plain attribute (no buffer: DDP does not broadcast it)
    if (m_.longrope) alloc("long_inv_freq", elems(m_.rotary_dim / 2, 1, 4), Category::Weights);
}

// Gemma's embedding scale (a scalar in the model's dtype), then each rotary table's inv_freq and
// original_inv_freq ([rotary_dim / 2] fp32 each; Gemma-3: one table per layer type, sorted).
std::vector<StepBuilder::HfBuffer> StepBuilder::hf_buffers() const {
    std::vector<HfBuffer> out;
    const int built = fsdp2_on_ ? fsdp2_store_ : pw_;  // (the dtype the model was built in)
    if (m_.gemma()) out.push_back(HfBuffer{"embed_scale", built, built});
    for (std::size_t table = 0; table < hf_rope_.size(); ++table)
        if (rope_table_used(table))
            for (const char* name : {"inv_freq", "original_inv_freq"})
                out.push_back(HfBuffer{name, 4, elems(m_.rotary_dim / 2, 1, 4)});
    return out;
}

// (DeepSpeed's engine in the hf runtime shards by its own rules: deepspeed.cpp, zero3.cpp,
// and FSDP2 by its own: fsdp2.cpp)
int StepBuilder::zero_stage() const { return s_.zero_ranks() > 1 && !ds_on_ && !fsdp2_on_ ? s_.zero_stage : 0; }

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
    if (hf_) {
        hf_grad_hooks(p);
        return;
    }
    if (s_.optimizer_in_backward) {
        const char* op = op_;
        at("optimizer.step_in_backward");  // the step runs in the gradient hook, then the gradient goes
        drop(P.grad);
        at(op);
    } else if (zero_stage() >= 2 && P.shard_ranks > 1) {
        const char* op = op_;
        at("zero.reduce_scatter");  // reduced into this rank's shard, the full gradient goes
        drop(P.grad);
        at(op);
    }
}

// AMP keeps a bf16 copy of each fp32 weight in the autocast cache for the rest of
// the autocast region, and every matmul that used it saves it for backward.
void StepBuilder::use_weight(int p, bool saved) {
    if (s_.precision != Precision::AmpFp32) return;
    Param& P = params_[static_cast<std::size_t>(p)];
    P.cast = true;
    if (!P.amp_copy.valid()) {
        const bytes_t bytes = checked_mul(P.numel, 2);
        P.amp_copy = hf_ ? act("autocast_weight", bytes, false) : alloc("autocast_bf16", bytes, Category::Weights);
        autocast_cache_.push_back(p);
    }
    if (grad_ && saved) {
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
    drop(autocast_leaf_);
}

void StepBuilder::hf_linear_weights(int w, int b) {
    if (b >= 0) use_weight(b, false);
    use_weight(w);
    z3_alias(w);
    if (b >= 0) z3_alias(b);  // (DeepSpeed's linear saves its bias too)
}

T StepBuilder::hf_linear_input(int w, int b, T x, std::int64_t rows, std::int64_t cols) {
    hf_linear_weights(w, b);
    if (!amp_) return hold(x);
    if (hf_leaf_input_ && autocast_leaf_.valid()) return hold(autocast_leaf_);
    T copy = act("autocast_input", bf16(rows, cols), false);
    if (hf_leaf_input_) autocast_leaf_ = hold(copy);
    return copy;
}

T StepBuilder::hf_mm_grad(int p) {
    if (!amp_) return grad_out(p);
    return alloc("weight_grad_bf16", checked_mul(params_[static_cast<std::size_t>(p)].numel, 2), Category::Transient);
}

T StepBuilder::hf_uncast(T g) {
    if (!amp_) return g;
    T f = alloc("grad_fp32", checked_mul(table_[static_cast<std::size_t>(g.id)].bytes, 2), Category::Transient);
    drop(g);
    return f;
}

namespace {
// A node's saved tensors with the weight's autocast copy added first or last.
std::vector<T*> with_copy(std::initializer_list<T*> saved, T* copy, bool first) {
    std::vector<T*> all;
    if (first) all.push_back(copy);
    all.insert(all.end(), saved.begin(), saved.end());
    if (!first) all.push_back(copy);
    return all;
}
}  // namespace

void StepBuilder::hf_mm_node_end(int w, std::initializer_list<T*> saved, T* grad_in) {
    if (!amp_) return node_end(saved, grad_in);
    Param& P = params_[static_cast<std::size_t>(w)];
    T copy = P.amp_saved.back();
    P.amp_saved.pop_back();
    node_end(with_copy(saved, &copy, true), grad_in, [] {});
}

T StepBuilder::hf_addmm_node_end(int w, int b, std::initializer_list<T*> saved, T* grad_in) {
    Param& P = params_[static_cast<std::size_t>(w)];
    T copy = P.amp_saved.back();
    P.amp_saved.pop_back();
    T bias;
    node_end(with_copy(saved, &copy, false), grad_in, [&] {
        bias = alloc("bias_grad_bf16", checked_mul(params_[static_cast<std::size_t>(b)].numel, 2), Category::Transient);
    });
    return bias;
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

// ---- hf runtime: autograd's bookkeeping --------------------------------------------------------

namespace mst::sim {

T StepBuilder::grad_out(int p) {
    const Param& P = params_[static_cast<std::size_t>(p)];
    return alloc("weight_grad", checked_mul(P.numel, pg_), Category::Transient);
}

void StepBuilder::buffer_add(GradBuffer& b, T g, bool view) {
    if (!b.sum.valid()) {
        b.sum = g, b.view = view;
        return;
    }
    accumulate(b.sum, g, b.view);
    // (a sum is no view: the next one is added in place; under ZeRO-3, whose linears are autograd
    // Functions, the referee sees every sum of a weight's gradients made anew)
    b.view = b.python && b.view;
}

void StepBuilder::add_grad(int p, T g, bool view, bool last) {
    if (fsdp2_upcasts(p)) g = fsdp2_upcast(p, g), view = false;  // (not a view: a cast, or the cast's sum)
    buffer_add(params_[static_cast<std::size_t>(p)].pending, g, view);
    if (last) accumulate_grad_run(p);
}

void StepBuilder::accumulate_grad_run(int p) {
    Param& P = params_[static_cast<std::size_t>(p)];
    T buffer = std::exchange(P.pending.sum, T{});
    if (!P.grad.valid()) {  // AccumulateGrad steals it
        P.grad = buffer;
        table_[static_cast<std::size_t>(buffer.id)].category = Category::Gradients;
        grad_done(p);
        return;
    }
    drop(buffer);  // .grad += buffer
    // (ZeRO-3's tiled MLP: each chunk's backward accumulates and runs the hook, which adds the sum
    // to the bucket after the last chunk only)
    if (s_.grad_accum > 1 || z3_on_) grad_done(p);
}

void StepBuilder::accumulate(T& acc, T g, bool acc_is_view) {
    if (acc_is_view) {
        T sum = alloc("grad_sum", table_[static_cast<std::size_t>(acc.id)].bytes, Category::Transient);
        drop(acc);
        acc = sum;
    }
    drop(g);
}

// mst_hf's hooks, run as AccumulateGrad finishes: optimizer in backward steps the parameter (its
// fp32 master with bf16-master) and frees its gradient; bf16-master otherwise moves the bf16
// gradient into the master's fp32 one (MasterWeightOptimizer._fold_grad). ZeRO 2/3 reduce-scatters.
void StepBuilder::hf_grad_hooks(int p) {
    Param& P = params_[static_cast<std::size_t>(p)];
    if (grad_ready_ && micro_ == 0) grad_ready_->push_back(p);  // (DDP: its copy into the bucket, in place)
    if (ds_on_) {
        if (!z3_on_) ds_grad_hook(p);
        else if (!z3_.leaf[static_cast<std::size_t>(p)]) z3_grad_hook(p);  // (a leaf block's hook reduces its own: z3_leaf_backward_end)
        return;
    }
    const char* op = op_;
    const bool master = s_.precision == Precision::Bf16Master && !fsdp2_on_;
    if (s_.optimizer_in_backward) {
        at("optimizer.step_in_backward");
        // the master's fp32 gradient lives only while this one parameter steps
        T mg = master ? alloc("master_grad", checked_mul(P.numel, 4), Category::Transient) : T{};
        hf_step_temporaries(checked_mul(P.numel, s_.effective_state_dtype() == StateDtype::Fp32 ? 4 : 2));
        drop(mg);
        drop(P.grad);
    } else if (master) {
        at("optimizer.fold_grad");
        if (!P.master_grad.valid()) P.master_grad = alloc("master_grad", checked_mul(P.numel, 4), Category::Gradients);
        drop(P.grad);
    } else if (zero_stage() >= 2) {
        at("zero.reduce_scatter");
        drop(P.grad);
    }
    at(op);
}

void StepBuilder::hf_release_frame() {
    for (T& t : hf_frame_) drop(t);
    hf_frame_.clear();
}

// A forward or recompute allocation that outlived its phase is a saved activation (autograd, a
// checkpoint's frame or the trainer kept it); every other one is transient. The referee
// (python/mst_referee/recorder.py) classifies by the same rule.
void StepBuilder::hf_classify() {
    std::vector<Phase> freed(table_.size(), Phase::Init);
    std::vector<bool> was_freed(table_.size(), false);
    for (const Event& e : tl_.events)
        if (!e.alloc) freed[static_cast<std::size_t>(e.tensor)] = e.phase, was_freed[static_cast<std::size_t>(e.tensor)] = true;
    std::vector<Category> category(table_.size());
    for (const Event& e : tl_.events) {
        const auto i = static_cast<std::size_t>(e.tensor);
        if (!e.alloc) continue;
        Category c = table_[i].category;
        if (c == Category::Transient || c == Category::SavedActivation) {
            const bool activation = e.phase == Phase::Forward || e.phase == Phase::Recompute;
            c = activation && (!was_freed[i] || freed[i] != e.phase) ? Category::SavedActivation : Category::Transient;
        }
        category[i] = c;
    }
    for (Event& e : tl_.events) e.category = category[static_cast<std::size_t>(e.tensor)];
}

}  // namespace mst::sim
