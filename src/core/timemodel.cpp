#include "mst/timemodel.hpp"

#include <algorithm>
#include <cmath>
#include <string>
#include <string_view>

#include <fmt/format.h>

#include "mst/units.hpp"

namespace mst {

double causal_pairs(std::int64_t seq_len, std::int64_t window) {
    const double S = static_cast<double>(seq_len);
    if (window <= 0 || window >= seq_len) return S * (S + 1) / 2;
    const double w = static_cast<double>(window);
    return w * (w + 1) / 2 + (S - w) * w;  // the first w queries see t+1 keys, the rest w
}

namespace {

// chunk_groups() as (tokens, how many) pairs of doubles, for the roofline's arithmetic.
std::vector<std::pair<double, double>> chunks_as_doubles(std::int64_t tokens, std::int64_t chunks) {
    std::vector<std::pair<double, double>> g;
    for (const ChunkGroup& c : chunk_groups(tokens, chunks))
        g.push_back({static_cast<double>(c.tokens), static_cast<double>(c.count)});
    return g;
}

class Roofline {
public:
    explicit Roofline(const GpuProfile& g)
        : flops_per_s_(g.bf16_dense_tflops * 1e12), bytes_per_s_(g.hbm_gbps * 1e9), cal_(g.calibration) {}

    // A kernel: compute- or memory-bound, never faster than one launch.
    double kernel(double flops, double bytes, double efficiency) const {
        const double t = std::max(flops / (flops_per_s_ * efficiency), bytes / (bytes_per_s_ * cal_.memory_bound_efficiency));
        return std::max(t, cal_.kernel_launch_seconds);
    }
    double peak_flops() const { return flops_per_s_; }
    const Calibration& cal() const { return cal_; }

private:
    double flops_per_s_, bytes_per_s_;
    Calibration cal_;
};

// An op's row name: `base`, or `base (tag)` ("mlp.gate_up (fwd)"). The tuner times hundreds of
// setups: a row's name is only made when the row is.
struct OpName {
    std::string_view base, tag;
    OpName(const char* b) : base(b) {}  // (implicit: a plain name)
    OpName(std::string_view b, std::string_view t) : base(b), tag(t) {}
    bool names(const std::string& row) const {
        if (tag.empty()) return row == base;
        return row.size() == base.size() + tag.size() + 3 && row.starts_with(base) &&
               row.compare(base.size(), 2, " (") == 0 && row.compare(base.size() + 2, tag.size(), tag) == 0 && row.back() == ')';
    }
    std::string str() const { return tag.empty() ? std::string(base) : fmt::format("{} ({})", base, tag); }
};
// The tag of a group of rows: "mlp.gate_up" + Tag{"fwd"} names "mlp.gate_up (fwd)".
struct Tag {
    std::string_view tag;
};
OpName operator+(const char* base, Tag t) { return OpName(base, t.tag); }

// Times the ops of one micro-step; with `rows`, also sums them into named rows (predict_op_times).
class Ledger {
public:
    Ledger(const Roofline& r, bool rows) : r_(r), rows_(rows) {}

    // `count` identical kernels.
    double add(OpName name, double flops, double bytes, double efficiency, double count = 1) {
        const double t = count * r_.kernel(flops, bytes, efficiency);
        if (!rows_) return t;
        auto it = std::find_if(ops_.begin(), ops_.end(), [&](const OpTime& o) { return name.names(o.name); });
        if (it == ops_.end()) it = ops_.insert(ops_.end(), OpTime{name.str(), 0, 0, 0, 0});
        it->flops += count * flops;
        it->bytes += count * bytes;
        it->kernels += count;
        it->seconds += t;
        return t;
    }
    // C[m, n] = A[m, k] B[k, n] in bf16 with fp32 accumulation.
    double gemm(OpName name, double m, double n, double k, double count = 1) {
        return add(name, 2 * m * n * k, 2 * (m * k + k * n + m * n), r_.cal().gemm_efficiency, count);
    }
    double memory(OpName name, double bytes, double count = 1) { return add(name, 0, bytes, 1.0, count); }
    // One op of `kernels` launches that together do `flops` and move `bytes`.
    double split(OpName name, double flops, double bytes, double efficiency, double kernels) {
        return add(name, flops / kernels, bytes / kernels, efficiency, kernels);
    }
    std::vector<OpTime> take() { return std::move(ops_); }

private:
    const Roofline& r_;
    bool rows_;
    std::vector<OpTime> ops_;
};

double link_gbps(const GpuProfile& g, const ClusterShape& c, std::int64_t group, std::int64_t stride) {
    // A group of `group` ranks spaced `stride` apart stays inside one node when it fits.
    if (group * stride <= c.gpus_per_node) return g.nvlink_gbps > 0 ? g.nvlink_gbps : g.host_link_gbps;
    return c.network_gbps;
}

}  // namespace

namespace {

// The step's time; `rows`: also its ops, by name.
StepTime predict(const ModelSpec& m, const TrainingSetup& s, const GpuProfile& gpu, const ClusterShape& cluster,
                 std::vector<OpTime>* rows) {
    const Roofline roof(gpu);
    const Calibration& cal = gpu.calibration;
    StepTime out;

    const double T = static_cast<double>(s.local_tokens());
    const double d = static_cast<double>(m.hidden_size), I = static_cast<double>(m.intermediate_size);
    const double V = static_cast<double>(m.vocab_size), L = static_cast<double>(m.num_layers);
    const double qd = static_cast<double>(m.q_dim()), kvd = static_cast<double>(m.kv_dim());
    const double rb = s.precision == Precision::AmpFp32 ? 4 : 2;  // residual stream bytes per element
    // Attention's share of the heads x pairs per rank: Ulysses' nh / sp heads over the whole
    // sequence, or ring attention's every head over 1 / sp of the pairs (load-balanced causal blocks).
    const double heads_local = static_cast<double>(m.num_heads) / static_cast<double>(s.sp);
    const double B = static_cast<double>(s.micro_batch), sp = static_cast<double>(s.sp);
    double attention_forward = 0, attention_backward = 0;  // one layer's flash kernels (ring attention's blocks)
    const bool gemma = m.gemma();
    const double norms = gemma ? 4 : 2;

    // ---- one layer, forward ------------------------------------------------------------
    // Layers with a sliding window see fewer keys; average the attention pairs over layers.
    double pairs = 0;
    for (std::int64_t l = 0; l < m.num_layers; ++l)
        pairs += causal_pairs(s.seq_len, m.sliding_layers[static_cast<std::size_t>(l)] && m.sliding_window ? *m.sliding_window : 0);
    pairs /= L;

    // The MLP per mini-sequence: each chunk re-reads the weights and launches its own kernels. A
    // Mixture-of-Experts block: the router's GEMM, then the n k token-expert pairs through E experts
    // (uniform routing: E GEMMs of n k / E rows, each reading its expert's weights), and the
    // dispatch around them (sort, gathers of the inputs and of the weighted outputs, the sum).
    const std::optional<MoeSpec>& moe = m.moe;
    const double E = moe ? static_cast<double>(moe->experts) : 1, k = moe ? static_cast<double>(moe->top_k) : 1;
    const double Ie = moe ? static_cast<double>(moe->intermediate) : I;
    const double wb = moe && moe->fp32_routing_weights ? 4 : 2;
    // Expert parallelism: the experts of a rank run on what it received, F = moe_imbalance times the
    // pairs it sent at the busiest rank (which sets the step's pace), in E blocks (one per source
    // rank and local expert); F = 1 without it.
    const double F = s.ep > 1 ? s.moe_imbalance : 1.0;
    // `kernels` memory-bound kernels moving `bytes` together, `count` times
    auto several = [](Ledger& g, OpName name, double bytes, double count, double kernels) {
        return g.split(name, 0, bytes * count, 1.0, kernels * count);
    };
    // One group of `count` chunks of n tokens through the MLP, added into t op by op.
    auto mlp_chunks = [&](Ledger& g, Tag sfx, double n, double count, double& t) {
        if (moe) {
            const double S = n * k, R = F * S;
            t += g.gemm("moe.router" + sfx, n, E, d, count);
            t += several(g, "moe.router.topk" + sfx, n * E * 14 + n * k * 12, count, 4);
            t += several(g, "moe.dispatch" + sfx, S * d * 4 + S * 40, count, 5);
            t += g.gemm("moe.gate_up" + sfx, R / E, 2 * Ie, d, count * E);
            t += g.memory("moe.act" + sfx, 3 * R * Ie * 2, count);
            t += g.gemm("moe.down" + sfx, R / E, d, Ie, count * E);
            t += several(g, "moe.combine" + sfx, S * d * (2 + 3 * wb) + n * d * (wb + 2), count, 4);
            return;
        }
        t += g.gemm("mlp.gate_up" + sfx, n, 2 * I, d, count);
        t += g.memory("mlp.act" + sfx, 3 * n * I * 2, count);
        t += g.gemm("mlp.down" + sfx, n, d, I, count);
    };
    auto mlp_forward_only = [&](Ledger& g, const char* tag) {
        double t = 0;
        const Tag sfx{tag};
        for (const auto& [n, count] : chunks_as_doubles(s.local_tokens(), s.mlp_chunks)) {
            double chunk = 0;
            mlp_chunks(g, sfx, n, count, chunk);
            t += chunk;
        }
        return t;
    };
    auto layer_forward = [&](Ledger& g, const char* tag) {
        double t = 0;
        const Tag sfx{tag};
        t += g.memory("norm" + sfx, T * d * (2 * rb) + T * 4, norms);
        t += g.gemm("attn.qkv" + sfx, T, qd + 2 * kvd, d);
        t += g.memory("attn.rope" + sfx, 2 * T * (qd + kvd) * 2);
        const double attn_flops = 4 * B * heads_local * static_cast<double>(m.head_dim) * pairs;
        if (s.attention != Attention::Eager) {  // (sdpa: the same flash kernel)
            const double a = g.add("attention" + sfx, attn_flops, 2 * T * (2 * qd + 2 * kvd), cal.attention_efficiency);
            attention_forward = a, t += a;
            // Ring attention: every block's output to fp32 and merged, about 42 bytes per element of
            // q moved (the cast, the difference, the scaled difference, the update). The last rank,
            // which sets the pace, merges sp - 1 whole blocks (the others half-size ones after theirs).
            if (s.ring()) t += g.memory("attn.ring.merge" + sfx, T * qd * 42 * (sp - 1), 1);
        } else {
            // Scores, scaling, mask, fp32 softmax, bf16 cast, PV: about 30 bytes per score element.
            const double scores = B * heads_local * static_cast<double>(s.seq_len) * static_cast<double>(s.seq_len);
            t += g.split("attention" + sfx, attn_flops, 30 * scores, cal.gemm_efficiency, 6);
        }
        t += g.gemm("attn.o_proj" + sfx, T, d, qd);
        t += g.memory("residual" + sfx, 3 * T * d * rb, 2);
        // MLP per mini-sequence: each chunk re-reads the weights and launches its own kernels.
        for (const auto& [n, count] : chunks_as_doubles(s.local_tokens(), s.mlp_chunks)) mlp_chunks(g, sfx, n, count, t);
        return t;
    };
    auto layer_backward = [&](Ledger& g) {
        double t = 0;
        t += g.memory("norm (bwd)", T * d * (3 * rb) + T * 4, norms);
        t += g.gemm("attn.qkv (bwd)", T, d, qd + 2 * kvd) + g.gemm("attn.qkv (bwd)", qd + 2 * kvd, d, T);
        t += g.memory("attn.rope (bwd)", 2 * T * (qd + kvd) * 2);
        const double attn_flops = 2.5 * 4 * B * heads_local * static_cast<double>(m.head_dim) * pairs;  // FA2: 5 GEMMs vs 2
        if (s.attention != Attention::Eager) {  // (sdpa: the same flash kernel)
            const double a = g.add("attention (bwd)", attn_flops, 2 * T * (4 * qd + 4 * kvd) + T * qd * 4, cal.attention_efficiency);
            attention_backward = a, t += a;
            // Ring attention, per block: the output made contiguous, dq accumulated in fp32, dK and dV
            // accumulated, flattened and sent on in fp32.
            if (s.ring()) t += g.memory("attn.ring.accumulate (bwd)", sp * T * (qd * 10 + 2 * kvd * 12), 1);
        } else {
            const double scores = B * heads_local * static_cast<double>(s.seq_len) * static_cast<double>(s.seq_len);
            t += g.split("attention (bwd)", attn_flops, 40 * scores, cal.gemm_efficiency, 8);
        }
        t += g.gemm("attn.o_proj (bwd)", T, qd, d) + g.gemm("attn.o_proj (bwd)", d, qd, T);
        t += g.memory("residual (bwd)", 3 * T * d * rb, 2);
        for (const auto& [n, count] : chunks_as_doubles(s.local_tokens(), s.mlp_chunks)) {
            if (moe) {
                const double S = n * k, R = F * S;
                t += several(g, "moe.combine (bwd)", S * d * (4 * wb + 4) + n * d * (wb + 2), count, 5);
                t += g.gemm("moe.down (bwd)", R / E, Ie, d, count * E) + g.gemm("moe.down (bwd)", d, Ie, R / E, count * E);
                t += several(g, "moe.act (bwd)", 5 * R * Ie * 2 + 2 * R * Ie * 2, count, 2);
                t += g.gemm("moe.gate_up (bwd)", R / E, d, 2 * Ie, count * E) + g.gemm("moe.gate_up (bwd)", 2 * Ie, d, R / E, count * E);
                t += several(g, "moe.dispatch (bwd)", S * d * 2 + 3 * n * d * 2, count, 3);
                t += several(g, "moe.router.topk (bwd)", n * E * 28 + n * k * 40, count, 6);
                t += g.gemm("moe.router (bwd)", n, d, E, count) + g.gemm("moe.router (bwd)", E, d, n, count);
                continue;
            }
            t += g.gemm("mlp.down (bwd)", n, I, d, count) + g.gemm("mlp.down (bwd)", d, I, n, count);
            t += g.memory("mlp.act (bwd)", 5 * n * I * 2, count);
            t += g.gemm("mlp.gate_up (bwd)", n, d, 2 * I, count) + g.gemm("mlp.gate_up (bwd)", 2 * I, d, n, count);
        }
        return t;
    };

    // Every layer costs the same (sliding windows are averaged into `pairs`): time one, scale by L.
    Ledger layer(roof, rows);
    const double fwd = L * layer_forward(layer, "fwd");
    const double bwd = L * layer_backward(layer);
    if (rows)
        for (const auto& op : layer.take()) rows->push_back(OpTime{op.name, op.flops * L, op.bytes * L, op.kernels * L, op.seconds * L});
    const double ckpt = static_cast<double>(s.checkpointed_count());

    // ---- embedding, final norm, LM head + loss ---------------------------------------
    Ledger head(roof, rows);
    double head_fwd = head.memory("embedding (fwd)", T * d * rb + T * 8);
    double head_bwd = head.memory("embedding (bwd)", T * d * (rb + 4));
    head_fwd += head.memory("final_norm (fwd)", T * d * 2 * rb);
    head_bwd += head.memory("final_norm (bwd)", T * d * 3 * rb);
    if (s.lm_chunks == 1) {
        head_fwd += head.gemm("lm_head (fwd)", T, V, d);
        // upcast (2 -> 4), log-softmax (read twice, write), NLL: about 18 bytes per logit
        head_fwd += head.split("loss (fwd)", 0, 18 * T * V, 1, 3);
        // the Trainer's bf16=True (hf_trainer_bf16): accelerate's convert_outputs_to_fp32 copies the bf16 logits to fp32
        if (s.hf_trainer_bf16) head_fwd += head.memory("logits fp32 copy (fwd)", 6 * T * V);
        // NLL grad (4), log-softmax grad (8 -> 4), cast (4 -> 2): about 22 bytes per logit
        head_bwd += head.split("loss (bwd)", 0, 22 * T * V, 1, 3);
        head_bwd += head.gemm("lm_head (bwd)", T, d, V) + head.gemm("lm_head (bwd)", V, d, T);
        if (m.final_logit_softcapping) {
            head_fwd += head.split("lm_head.softcap (fwd)", 0, 12 * T * V, 1, 3);
            head_bwd += head.split("lm_head.softcap (bwd)", 0, 16 * T * V, 1, 3);
        }
    } else {
        for (const auto& [n, count] : chunks_as_doubles(s.local_tokens(), s.lm_chunks)) {
            head_fwd += head.gemm("lm_head (fwd)", n, V, d, count);
            if (s.lm_impl == LmHeadImpl::Recompute) {
                head_fwd += head.split("loss (fwd)", 0, 18 * n * V * count, 1, 3 * count);
                head_bwd += head.gemm("lm_head (recompute)", n, V, d, count);
                // upcast, softmax - onehot in place, cast: about 12 bytes per logit
                head_bwd += head.split("loss (bwd)", 0, 12 * n * V * count, 1, 2 * count);
                head_bwd += head.gemm("lm_head (bwd)", n, d, V, count) + head.gemm("lm_head (bwd)", V, d, n, count);
            } else {
                // Fused: softmax-CE forward and gradient in one pass, both GEMMs inside forward.
                head_fwd += head.memory("loss (fwd, fused)", 6 * n * V, count);
                head_fwd += head.gemm("lm_head (bwd in fwd)", n, d, V, count) + head.gemm("lm_head (bwd in fwd)", V, d, n, count);
            }
        }
    }
    if (rows)
        for (auto& op : head.take()) rows->push_back(std::move(op));

    out.forward_seconds = fwd + head_fwd;
    out.backward_seconds = bwd + head_bwd;
    // Recompute: each checkpointed layer's forward again; the tiled MLP's forward once more per layer.
    {
        Ledger tmp(roof, false);
        const double lr = layer_forward(tmp, "recompute");
        const bool tiled = s.mlp_chunks > 1 && s.mlp_impl == MlpImpl::Tiled;
        const double extra = tiled ? mlp_forward_only(tmp, "recompute") : 0;
        out.recompute_seconds = ckpt * lr + L * extra;
    }

    // ---- optimizer -------------------------------------------------------------------
    // A rank holds every dense parameter and E / ep of the experts'; ZeRO shards the dense ones
    // over all dp x sp ranks and the experts' over the ep-th of them holding the same experts.
    const double P = static_cast<double>(m.parameters().total());
    const double ep = static_cast<double>(s.ep), P_expert = static_cast<double>(m.expert_parameters()) / ep;
    const double P_dense = P - ep * P_expert;
    const int zero = s.zero_ranks() > 1 ? s.zero_stage : 0;
    const double p_local = zero >= 1 ? P_dense / static_cast<double>(s.zero_ranks()) + P_expert / static_cast<double>(s.expert_data_ranks())
                                     : P_dense + P_expert;
    const double pw = s.precision == Precision::AmpFp32 ? 4 : 2, pg = s.precision == Precision::PureBf16 ? 2 : 4;
    const double sd = s.effective_state_dtype() == StateDtype::Fp32 ? 4 : 2;
    // FSDP2 under its bf16 policy steps its fp32 shards and fp32 gradients (no master copy of its own)
    const bool fp32_shards = s.fsdp2_shards() && s.precision == Precision::Bf16Master;
    const double stepped = fp32_shards ? 4 : pw;
    double per_param = 0;  // bytes read + written per parameter by the update
    switch (s.optimizer) {
        case Optimizer::AdamW: per_param = stepped + pg + 2 * sd + stepped + 2 * sd; break;
        case Optimizer::AdamW8bit: per_param = stepped + pg + 2 + stepped + 2; break;
        case Optimizer::SgdMomentum: per_param = stepped + pg + sd + stepped + sd; break;
    }
    if (s.precision == Precision::Bf16Master && !fp32_shards) per_param += 8;
    out.optimizer_seconds = p_local * per_param / (gpu.hbm_gbps * 1e9 * cal.memory_bound_efficiency);

    // ---- offload: each checkpoint goes to the host after its layer and comes back before its
    // recompute; a transfer hides behind one layer's compute.
    if (s.offload_checkpoints) {
        const double transfer = T * d * rb / (gpu.host_link_gbps * 1e9 * cal.memory_bound_efficiency);
        const double layer_fwd = fwd / L, layer_bwd = (bwd + out.recompute_seconds) / L;
        out.offload_exposed_seconds = ckpt * (std::max(0.0, transfer - layer_fwd) + std::max(0.0, transfer - layer_bwd));
    }

    // ---- communication ---------------------------------------------------------------
    const double ga = static_cast<double>(s.grad_accum);
    double overlapped = 0, exposed = 0;
    double overlapped_elsewhere = 0;  // hidden, but not behind the step's whole compute (DeepSpeed's, DDP's: backward)
    // Gradients are reduced (and ZeRO shards) over every dp and sp rank; an expert's over the
    // ranks holding it.
    auto reduce = [&](double params, std::int64_t ranks) {
        if (ranks <= 1) return 0.0;
        const double N = static_cast<double>(ranks);
        const double bw = link_gbps(gpu, cluster, ranks, 1) * 1e9;
        const double ring = (N - 1) / N;
        const double grad_bytes = params * pg, param_bytes = params * pw;
        if (zero <= 1) return 2 * ring * grad_bytes / bw;                                 // all-reduce once per step
        if (zero == 2) return ga * ring * grad_bytes / bw + ring * param_bytes / bw;      // RS per micro-step, AG after step
        return ga * ((2 + ckpt / L) * ring * param_bytes + ring * grad_bytes) / bw;      // AG fwd, bwd, recompute; RS
    };
    // Gradients all-reduced as backward makes them ready, over `ranks`, `bytes` each: backward hides them
    // but for the tail its end waits for, `tail` elements. Returns the seconds waited for; `all` gets
    // the whole all-reduce's.
    const double embedding = std::min(P, static_cast<double>(m.vocab_size) * static_cast<double>(m.hidden_size));
    const double backward = out.backward_seconds + out.recompute_seconds;
    auto ring_share = [](std::int64_t ranks) { return (static_cast<double>(ranks) - 1) / static_cast<double>(ranks); };
    auto behind_backward = [&](std::int64_t ranks, double bytes, double tail, double& all) {
        const double ring = ring_share(ranks), bw = link_gbps(gpu, cluster, ranks, 1) * 1e9;
        auto all_reduce = [&](double elements) { return 2 * ring * elements * bytes / bw; };
        all = all_reduce(P);
        return std::max(0.0, all_reduce(P - tail) - backward) + all_reduce(tail);
    };
    if (s.deepspeed_zero() && s.zero_ranks() > 1) {
        // DeepSpeed's ZeRO 1/2 engine (runtime/zero/stage_1_and_2.py): a reduction all-reduces its bucket's
        // bf16 gradients (use_multi_rank_bucket_allreduce), ZeRO-2 in every micro-step's backward, ZeRO-1
        // in the last one's. Without overlap_comm the step waits for all of it (ZeRO-2's in the hooks, on
        // backward's stream; ZeRO-1's after backward). With it they run on their own stream behind
        // backward, but for what its end flushes: the embedding's gradient, ready last, and what the
        // bucket held when it came (flushed first if both do not fit; taken as a full bucket). After the
        // step the bf16 partitions are all-gathered (all_gather_dp_groups), with nothing to hide behind.
        const double tail = std::min(P, embedding + static_cast<double>(s.reduce_bucket_size));
        double all = 0;
        const double waited = behind_backward(s.zero_ranks(), 2, s.overlap_comm ? tail : P, all);
        const double reductions = s.zero_stage == 2 ? ga : 1;
        const double all_gather = ring_share(s.zero_ranks()) * P * 2 / (link_gbps(gpu, cluster, s.zero_ranks(), 1) * 1e9);
        exposed += reductions * waited + all_gather;
        overlapped_elsewhere = reductions * (all - waited);  // (comm_seconds counts it all)
    } else if (s.deepspeed_zero3() && s.zero_ranks() > 1) {
        // DeepSpeed's ZeRO-3 (runtime/zero/stage3.py): every module's parameters all-gathered in bf16 as
        // the trace prefetches them, in forward, in backward and in a checkpointed layer's recompute, and
        // the bf16 gradients reduce-scattered per bucket on their own stream (stage 3's overlap_comm),
        // behind the compute, but for each micro-step's first gather (the root's prefetch of the
        // embedding, which the forward waits for) and what backward's end flushes (the embedding's
        // gradient, ready last, and what the bucket held: taken as a full one).
        const double ring = ring_share(s.zero_ranks()), bw = link_gbps(gpu, cluster, s.zero_ranks(), 1) * 1e9;
        const double gathers = (2 + ckpt / L) * ring * P * 2 / bw, scatters = ring * P * 2 / bw;
        const double first = ring * embedding * 2 / bw;
        const double flushed = ring * std::min(P, embedding + static_cast<double>(s.reduce_bucket_size)) * 2 / bw;
        exposed += ga * (first + flushed);
        overlapped += ga * (gathers - first + scatters - flushed);
    } else if (s.fsdp2_shards() && s.zero_ranks() > 1) {
        // torch's FSDP2 (fully_shard per decoder layer and the model): a layer's parameters all-gathered in
        // bf16 for its forward and again for its backward (a checkpointed layer recomputes on those: no
        // third gather), its gradients reduce-scattered in the reduce dtype (fp32 under the bf16 policy),
        // behind the compute (the next layer's gather is issued while one runs; backward prefetches one
        // ahead), but for each micro-step's first gather, the root's (embedding, final norm, LM head: kept
        // whole through backward), which the forward waits for, and the root's reduce-scatter in
        // backward's final callback, which the step waits for.
        const double ring = ring_share(s.zero_ranks()), bw = link_gbps(gpu, cluster, s.zero_ranks(), 1) * 1e9;
        // accelerate's groups (fsdp2_groups): an untied embedding is a group of its own, gathered for its forward
        // and again for its backward (as the layers are), and first and last; its tail (final norm, LM head) is
        // kept whole from its forward to its backward. Axolotl's: the root reshards after its forward as the
        // layers do, and its pre-backward, which nothing hides either, gathers it again.
        const bool own_embedding = s.fsdp2_embedding_alone(m);
        const bool root_regathered = s.fsdp2_root_reshards();
        const double root = embedding * (m.tie_word_embeddings ? 1 : 2) + static_cast<double>(m.hidden_size);
        const double kept = own_embedding ? root - embedding : root_regathered ? 0 : root;
        const double ends = own_embedding ? embedding : root;
        const double reduce_bytes = s.fsdp2_reduce_bytes();
        // (reshard_after_forward false: a layer's forward gather serves its backward too)
        const double gathered = s.fsdp2_reshard_after_forward ? 2 * P - kept : P;
        const double gathers = ring * gathered * 2 / bw, scatters = ring * P * reduce_bytes / bw;
        const double first = ring * ends * 2 / bw, last = ring * ends * reduce_bytes / bw;
        // (unsynced accumulation, fsdp2_no_sync: the last micro-step's reduce-scatters only)
        const double scattering = s.fsdp2_unsynced() ? 1 : ga;
        const double waited = first * (root_regathered ? 2 : 1);
        exposed += ga * waited + scattering * last;
        overlapped += ga * (gathers - waited) + scattering * (scatters - last);
    } else if (s.runtime == Runtime::Hf && s.zero_stage == 0 && s.dp > 1) {
        // torch's DDP as the Hugging Face Trainer runs it (accelerate's accumulate: no_sync but in the
        // last micro-step): each bucket of gradients, in the parameters' dtype, all-reduced on NCCL's
        // stream as it fills in the last micro-step's backward, whose end waits for the last one: the
        // embedding's, whose gradient is ready last (src/core/sim/ddp.cpp: the buckets in that order).
        double all = 0;
        const double waited = behind_backward(s.dp, pw, embedding, all);
        exposed += waited;
        overlapped_elsewhere = all - waited;
    } else {
        overlapped += reduce(P_dense, s.zero_ranks()) + reduce(P_expert, s.expert_data_ranks());
    }
    if (moe && s.ep > 1) {
        // Expert parallelism: per layer and MoE pass, the pairs go to their experts' ranks and come
        // back (four all-to-alls a micro-step; two more per recomputed forward: a checkpointed
        // layer's, and the tiled MLP's in its backward). The busiest rank receives F times its share.
        const double bw = link_gbps(gpu, cluster, s.ep, 1) * 1e9;
        const double bytes = (ep - 1) / ep * F * T * k * d * 2;
        const bool tiled = s.mlp_chunks > 1 && s.mlp_impl == MlpImpl::Tiled;
        out.expert_parallel_seconds = ga * (4 * L + 2 * ckpt + (tiled ? 2 * L : 0)) * bytes / bw;
        exposed += out.expert_parallel_seconds;
    }
    if (s.ring()) {
        // Ring attention per layer: the K/V all-gather, waited after the first block (forward, and
        // again in backward and in a recomputed forward), and in backward one dK/dV pass to the next
        // rank per block, each waited after the next block, the last after the loop.
        const double bw = link_gbps(gpu, cluster, s.sp, 1) * 1e9;
        const double gather = (sp - 1) * T * 2 * kvd * 2 / bw, pass = T * 2 * kvd * 4 / bw;
        const double fwd_block = attention_forward / sp, bwd_block = attention_backward / sp;
        const double fwd_layer = std::max(0.0, gather - fwd_block);
        const double bwd_layer = std::max(0.0, gather - bwd_block) + (sp - 1) * std::max(0.0, pass - bwd_block) + pass;
        out.ring_seconds = ga * (L * (fwd_layer + bwd_layer) + ckpt * fwd_layer);
        exposed += out.ring_seconds;
    }
    if (s.ulysses()) {
        // Ulysses all-to-all of q, k, v and o (and their gradients) per layer and pass.
        const double p = static_cast<double>(s.sp);
        const double bw = link_gbps(gpu, cluster, s.sp, 1) * 1e9;
        const double bytes = (p - 1) / p * T * (2 * qd + 2 * kvd) * 2;
        out.ulysses_seconds = ga * (2 * L + ckpt) * bytes / bw;
        exposed += out.ulysses_seconds;
    }
    out.comm_seconds = overlapped + overlapped_elsewhere + exposed;
    const double compute = ga * (out.forward_seconds + out.backward_seconds + out.recompute_seconds);
    out.comm_exposed_seconds = exposed + std::max(0.0, overlapped - compute);

    out.step_seconds = compute + ga * out.offload_exposed_seconds + out.optimizer_seconds + out.comm_exposed_seconds;

    // ---- model FLOPs (no recompute): 6 N per token for the matmul weights (the embedding
    // lookup is not a matmul, the LM head is), plus causal attention 3 x 4 x hd x pairs per head.
    // A Mixture-of-Experts token goes through the router and its top-k experts only.
    const auto pc = m.parameters();
    const double n_matmul =
        (moe ? static_cast<double>(pc.attention) + L * (k * 3 * d * Ie + E * d) : static_cast<double>(pc.attention + pc.mlp)) + V * d;
    const double tokens_gpu = ga * T;
    const double attn = 12.0 * static_cast<double>(m.head_dim) * heads_local * B * pairs * L;
    out.model_flops = 6 * n_matmul * tokens_gpu + ga * attn;
    out.tokens_per_second = tokens_gpu / out.step_seconds;
    out.mfu = out.model_flops / (out.step_seconds * roof.peak_flops());
    return out;
}

}  // namespace

StepTime predict_time(const ModelSpec& m, const TrainingSetup& s, const GpuProfile& gpu, const ClusterShape& cluster) {
    return predict(m, s, gpu, cluster, nullptr);
}

std::vector<OpTime> predict_op_times(const ModelSpec& m, const TrainingSetup& s, const GpuProfile& gpu, const ClusterShape& cluster) {
    std::vector<OpTime> rows;
    predict(m, s, gpu, cluster, &rows);
    return rows;
}

}  // namespace mst
