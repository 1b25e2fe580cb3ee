#include "mst/setup.hpp"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "json_read.hpp"
#include "mst/emit.hpp"  // (torchtitan_llama3: which models torchtitan's own code trains)
#include "mst/error.hpp"
#include "mst/limits.hpp"
#include "mst/units.hpp"

namespace mst {

// ---- names ------------------------------------------------------------------

namespace {

template <class E, std::size_t N>
E parse_enum(const std::string& s, const std::string& where, const char* field,
             const std::pair<const char*, E> (&names)[N]) {
    std::string known;
    for (const auto& [name, value] : names) {
        if (s == name) return value;
        known += known.empty() ? name : fmt::format(", {}", name);
    }
    fail(where, field, fmt::format("expected one of {}, got {}", known, in_quotes(s)));
}

template <class E, std::size_t N>
std::string enum_name(E e, const std::pair<const char*, E> (&names)[N]) {
    for (const auto& [name, value] : names)
        if (value == e) return name;
    return "?";
}

constexpr std::pair<const char*, Precision> kPrecisions[] = {
    {"pure-bf16", Precision::PureBf16}, {"bf16-master", Precision::Bf16Master}, {"amp", Precision::AmpFp32}};
constexpr std::pair<const char*, Optimizer> kOptimizers[] = {
    {"adamw", Optimizer::AdamW}, {"adamw-8bit", Optimizer::AdamW8bit}, {"sgd", Optimizer::SgdMomentum}};
constexpr std::pair<const char*, StateDtype> kStateDtypes[] = {{"fp32", StateDtype::Fp32}, {"bf16", StateDtype::Bf16}};
constexpr std::pair<const char*, Runtime> kRuntimes[] = {{"hf", Runtime::Hf}, {"kernels", Runtime::Kernels}};
constexpr std::pair<const char*, OptimizerImpl> kOptimizerImpls[] = {
    {"foreach", OptimizerImpl::Foreach}, {"fused", OptimizerImpl::Fused}, {"for-loop", OptimizerImpl::ForLoop}};
constexpr std::pair<const char*, Attention> kAttentions[] = {
    {"flash", Attention::Flash}, {"sdpa", Attention::Sdpa}, {"eager", Attention::Eager}};
constexpr std::pair<const char*, SpImpl> kSpImpls[] = {{"ulysses", SpImpl::Ulysses}, {"ring", SpImpl::Ring}};
constexpr std::pair<const char*, Fsdp2Groups> kFsdp2Groups[] = {{"mst_hf", Fsdp2Groups::MstHf},
                                                                 {"accelerate", Fsdp2Groups::Accelerate},
                                                                 {"axolotl", Fsdp2Groups::Axolotl}};
constexpr std::pair<const char*, MlpImpl> kMlpImpls[] = {{"loop", MlpImpl::Loop}, {"tiled", MlpImpl::Tiled}};
constexpr std::pair<const char*, LmHeadImpl> kLmImpls[] = {{"recompute", LmHeadImpl::Recompute},
                                                           {"fused", LmHeadImpl::FusedForward}};

}  // namespace

std::string to_string(Precision p) { return enum_name(p, kPrecisions); }
std::string to_string(Optimizer o) { return enum_name(o, kOptimizers); }
std::string to_string(StateDtype d) { return enum_name(d, kStateDtypes); }
std::string to_string(OptimizerImpl i) { return enum_name(i, kOptimizerImpls); }
std::string to_string(Runtime r) { return enum_name(r, kRuntimes); }
Runtime parse_runtime(const std::string& s, const std::string& w) { return parse_enum(s, w, "runtime", kRuntimes); }
std::string to_string(Attention a) { return enum_name(a, kAttentions); }
std::string to_string(MlpImpl i) { return enum_name(i, kMlpImpls); }
std::string to_string(LmHeadImpl i) { return enum_name(i, kLmImpls); }
std::string to_string(SpImpl i) { return enum_name(i, kSpImpls); }
SpImpl parse_sp_impl(const std::string& s, const std::string& w) { return parse_enum(s, w, "sp_impl", kSpImpls); }
constexpr std::pair<const char*, ModelCode> kModelCodes[] = {{"transformers", ModelCode::Transformers},
                                                             {"torchtitan", ModelCode::Torchtitan}};
std::string to_string(ModelCode c) { return enum_name(c, kModelCodes); }
ModelCode parse_model_code(const std::string& s, const std::string& w) { return parse_enum(s, w, "model_code", kModelCodes); }
std::string to_string(Fsdp2Groups g) { return enum_name(g, kFsdp2Groups); }
Fsdp2Groups parse_fsdp2_groups(const std::string& s, const std::string& w) {
    return parse_enum(s, w, "fsdp2_groups", kFsdp2Groups);
}
Precision parse_precision(const std::string& s, const std::string& w) { return parse_enum(s, w, "precision", kPrecisions); }
Optimizer parse_optimizer(const std::string& s, const std::string& w) { return parse_enum(s, w, "optimizer", kOptimizers); }
StateDtype parse_state_dtype(const std::string& s, const std::string& w) {
    return parse_enum(s, w, "optimizer_state_dtype", kStateDtypes);
}
OptimizerImpl parse_optimizer_impl(const std::string& s, const std::string& w) {
    return parse_enum(s, w, "optimizer_impl", kOptimizerImpls);
}
Attention parse_attention(const std::string& s, const std::string& w) { return parse_enum(s, w, "attention", kAttentions); }
const char* hf_attn_implementation(Attention a) {
    return a == Attention::Flash ? "flash_attention_2" : a == Attention::Sdpa ? "sdpa" : "eager";
}

Attention default_attention(const ModelSpec& m, Runtime runtime) {
    return m.attention_sinks && runtime == Runtime::Hf ? Attention::Eager : Attention::Flash;
}
MlpImpl parse_mlp_impl(const std::string& s, const std::string& w) { return parse_enum(s, w, "mlp_impl", kMlpImpls); }
LmHeadImpl parse_lm_impl(const std::string& s, const std::string& w) { return parse_enum(s, w, "lm_impl", kLmImpls); }

// ---- checkpoint placement -----------------------------------------------------

std::int64_t TrainingSetup::checkpointed_count() const {
    return std::count(checkpoint.begin(), checkpoint.end(), true);
}

namespace {

std::int64_t parse_int(const std::string& text, const std::string& where, const std::string& spec) {
    const auto v = parse_decimal(text);
    if (!v)
        fail(where, "checkpoint", fmt::format("expected none, all, every:K, first:K, last:K, spread:K or a list like 0,2,5-9; got {}", in_quotes(spec)));
    return *v;
}

}  // namespace

std::vector<bool> parse_checkpoint_spec(const std::string& spec, std::int64_t num_layers, const std::string& where) {
    const auto L = static_cast<std::size_t>(num_layers);
    std::vector<bool> out(L, false);
    if (spec == "none" || spec.empty()) return out;
    if (spec == "all") return std::vector<bool>(L, true);
    const auto colon = spec.find(':');
    if (colon != std::string::npos) {
        const std::string kind = spec.substr(0, colon);
        const std::int64_t k = parse_int(spec.substr(colon + 1), where, spec);
        if (k < 0 || (kind != "every" && k > num_layers) || (kind == "every" && k == 0))
            fail(where, "checkpoint", fmt::format("{}: K out of range for {} layers", in_quotes(spec), num_layers));
        if (kind == "every") {
            for (std::size_t i = 0; i < L; i += static_cast<std::size_t>(k)) out[i] = true;
        } else if (kind == "first") {
            for (std::int64_t i = 0; i < k; ++i) out[static_cast<std::size_t>(i)] = true;
        } else if (kind == "last") {
            for (std::int64_t i = num_layers - k; i < num_layers; ++i) out[static_cast<std::size_t>(i)] = true;
        } else if (kind == "spread") {
            // K layers at evenly spaced positions: i * L / K for i < K.
            for (std::int64_t i = 0; i < k; ++i) out[static_cast<std::size_t>(i * num_layers / k)] = true;
        } else {
            parse_int("x", where, spec);  // reports the accepted forms
        }
        return out;
    }
    std::size_t pos = 0;
    while (pos <= spec.size()) {
        const auto comma = std::min(spec.find(',', pos), spec.size());
        const std::string item = spec.substr(pos, comma - pos);
        const auto dash = item.find('-');
        const std::int64_t lo = parse_int(item.substr(0, dash), where, spec);
        const std::int64_t hi = dash == std::string::npos ? lo : parse_int(item.substr(dash + 1), where, spec);
        if (lo > hi)
            fail(where, "checkpoint", fmt::format("expected a layer range LO-HI with LO <= HI, got {}", in_quotes(item)));
        if (lo < 0 || hi >= num_layers)
            fail(where, "checkpoint", fmt::format("layer range {} outside 0..{}", in_quotes(item), num_layers - 1));
        for (std::int64_t i = lo; i <= hi; ++i) out[static_cast<std::size_t>(i)] = true;
        pos = comma + 1;
    }
    return out;
}

std::string describe_checkpoints(const std::vector<bool>& checkpoint) {
    const auto n = std::count(checkpoint.begin(), checkpoint.end(), true);
    if (n == 0) return "none";
    if (static_cast<std::size_t>(n) == checkpoint.size()) return "all";
    std::string out;
    for (std::size_t i = 0; i < checkpoint.size(); ++i) {
        if (!checkpoint[i]) continue;
        std::size_t j = i;
        while (j + 1 < checkpoint.size() && checkpoint[j + 1]) ++j;
        if (!out.empty()) out += ",";
        out += j == i ? fmt::format("{}", i) : fmt::format("{}-{}", i, j);
        i = j;
    }
    return out;
}

// ---- validation ---------------------------------------------------------------

std::vector<ChunkGroup> chunk_groups(std::int64_t tokens, std::int64_t chunks) {
    const std::int64_t q = tokens / chunks, r = tokens % chunks;
    std::vector<ChunkGroup> groups;
    if (r > 0) groups.push_back({q + 1, r});
    if (chunks - r > 0 && q > 0) groups.push_back({q, chunks - r});
    return groups;
}

std::vector<std::int64_t> chunk_sizes(std::int64_t tokens, std::int64_t chunks) {
    std::vector<std::int64_t> sizes;
    for (const ChunkGroup& g : chunk_groups(tokens, chunks)) sizes.insert(sizes.end(), static_cast<std::size_t>(g.count), g.tokens);
    return sizes;
}

std::string describe_expert_parallelism(const TrainingSetup& s) {
    if (s.ep == 1) return "";
    return s.moe_imbalance == 1.0 ? fmt::format(", ep {}", s.ep) : fmt::format(", ep {}, imbalance {}", s.ep, s.moe_imbalance);
}

std::string describe_precision(const TrainingSetup& s) {
    return to_string(s.precision) + (s.hf_trainer_bf16 ? " under the Trainer's bf16=True" : "");
}

std::string describe_model_code(const TrainingSetup& s) {
    if (!s.titan()) return to_string(s.attention) + " attention";
    return s.dp == 1 ? "torchtitan's model code (flex attention, FSDP2 on one GPU)"
                     : fmt::format("torchtitan's model code (flex attention, FSDP2 over {} GPUs)", s.dp);
}

std::string describe_sharding(const TrainingSetup& s) {
    if (!s.fsdp2) return describe_deepspeed(s);
    std::string out = " as FSDP2";
    if (s.fsdp2_groups == Fsdp2Groups::Accelerate) out += " in accelerate's groups";
    if (s.fsdp2_groups == Fsdp2Groups::Axolotl) out += " in Axolotl's groups";
    if (!s.fsdp2_reshard_after_forward) out += ", layers gathered from forward to backward";
    if (s.fsdp2_unsynced()) out += ", synced in the last micro-step";
    return out;
}

std::string describe_deepspeed(const TrainingSetup& s) {
    std::string out;
    if (s.reduce_bucket_size != kDeepSpeedReduceBucket) out += fmt::format(", reduce_bucket_size {}", s.reduce_bucket_size);
    if (s.overlap_comm) out += ", overlap_comm";
    if (s.param_persistence_threshold != kDeepSpeedPersistence)
        out += fmt::format(", param_persistence_threshold {}", s.param_persistence_threshold);
    if (s.prefetch_bucket_size != kDeepSpeedPrefetchBucket) out += fmt::format(", prefetch_bucket_size {}", s.prefetch_bucket_size);
    return out;
}

std::int64_t TrainingSetup::expert_rows(std::int64_t pairs) const {
    if (ep == 1) return pairs;
    // (1 - 1e-12: a product like 1.1 x 10 that lands a rounding above an integer is that integer)
    const double rows = std::ceil(moe_imbalance * static_cast<double>(pairs) * (1.0 - 1e-12));
    return std::min(checked_mul(pairs, ep), std::max(pairs, static_cast<std::int64_t>(rows)));
}

std::vector<std::int64_t> ring_ranks(const TrainingSetup& s) {
    std::vector<std::int64_t> ranks;
    for (std::int64_t r = 0; s.ring() && r < s.sp; ++r) ranks.push_back(r);
    return ranks;
}

namespace {
// FSDP2's ranks whose shards differ: rank r holds clamp(rows - r c, 0, c) rows of a parameter of `rows`
// (c = ceil(rows / dp)); ranks alike in every first dimension the model's parameters have are alike.
// (A superset of the dimensions only splits the ranks finer: more walks, the same peaks.)
std::vector<std::int64_t> fsdp2_ranks(const TrainingSetup& s, const ModelSpec& m) {
    const std::int64_t d = m.hidden_size, I = m.intermediate_size;
    const std::vector<std::int64_t> dims = {m.vocab_size, d, m.q_dim(), m.kv_dim(), I, 2 * I, m.q_dim() + 2 * m.kv_dim(),
                                            m.head_dim, m.num_heads};
    std::vector<std::int64_t> ranks;
    std::vector<std::vector<std::int64_t>> seen;
    for (std::int64_t r = 0; r < s.dp; ++r) {
        std::vector<std::int64_t> rows;
        for (std::int64_t n : dims) {
            const std::int64_t c = ceil_div(n, s.dp);
            rows.push_back(std::clamp<std::int64_t>(n - r * c, 0, c));
        }
        if (std::find(seen.begin(), seen.end(), rows) != seen.end()) continue;
        seen.push_back(std::move(rows));
        ranks.push_back(r);
    }
    if (ranks.size() == 1) ranks.clear();  // (every rank alike: one walk)
    return ranks;
}
}  // namespace

std::vector<std::int64_t> walked_ranks(const TrainingSetup& s, const ModelSpec& m) {
    if (s.fsdp2_shards()) return fsdp2_ranks(s, m);
    if (!s.deepspeed_zero()) return ring_ranks(s);
    std::vector<std::int64_t> ranks;
    for (std::int64_t r = 0; s.dp > 1 && r < s.dp; ++r) ranks.push_back(r);
    return ranks;
}

bool walks_rank(const TrainingSetup& s, const ModelSpec& m, std::int64_t rank) {
    if (s.deepspeed_zero() && s.dp == 1) return rank == 0;
    // (ZeRO-3's ranks are alike: any one of them; FSDP2's are each like one walked)
    if (s.deepspeed_zero3() || s.fsdp2_shards()) return rank >= 0 && rank < s.zero_ranks();
    const std::vector<std::int64_t> all = walked_ranks(s, m);
    return std::find(all.begin(), all.end(), rank) != all.end();
}

std::optional<FieldRefusal> sp_refusal(const ModelSpec& m, SpImpl impl, std::int64_t sp, std::int64_t seq_len) {
    if (sp < 1 || seq_len % sp != 0) return FieldRefusal{"sp", fmt::format("expected a divisor of seq_len ({}), got {}", seq_len, sp)};
    if (sp == 1) return std::nullopt;
    if (impl == SpImpl::Ring) {  // (else Ulysses)
        if (sp > limits::kRingRanks)
            return FieldRefusal{"sp", fmt::format("expected at most {} ranks with ring attention (every rank's step is walked, "
                                               "each layer's ring over all of them), got {}",
                                               limits::kRingRanks, sp)};
        if (seq_len % (2 * sp) != 0)
            return FieldRefusal{"seq_len", fmt::format("expected a multiple of 2 x sp = {} with ring attention (head-tail "
                                                    "sharding cuts each sequence into 2 sp equal chunks), got {}",
                                                    2 * sp, seq_len)};
        return std::nullopt;
    }
    if (m.num_heads % sp != 0 || m.num_kv_heads % sp != 0)
        return FieldRefusal{"sp", fmt::format("expected a divisor of both num_attention_heads ({}) and num_key_value_heads ({}) "
                                           "(Ulysses splits heads across ranks), got {}",
                                           m.num_heads, m.num_kv_heads, sp)};
    return std::nullopt;
}

std::string hf_trainer_bf16_refusal(const TrainingSetup& s, const ModelSpec& m) {
    if (s.runtime != Runtime::Hf)
        return "expected false with runtime kernels (it is how the Hugging Face Trainer calls Hugging Face's model: runtime hf)";
    // accelerate 1.15 wraps the forward in prepare_model only (accelerator.py:1824-1835), which neither
    // _prepare_deepspeed nor _prepare_fsdp2 calls on the model (accelerator.py:1549-1554)
    if (s.deepspeed_engine())
        return "expected false under DeepSpeed's engine (ZeRO 1-3 in runtime hf: accelerate leaves bf16 to DeepSpeed, no "
               "autocast and no fp32 outputs)";
    if (s.fsdp2)
        return "expected false with fsdp2 (accelerate prepares an FSDP2 model without its native amp: bf16=True adds no "
               "autocast and no fp32 outputs there)";
    // transformers' grouped_mm experts sum their weighted outputs in the parameters' dtype: CUDA's autocast runs
    // that sum in fp32 (the CPU's, the referee's, does not), so under it the step holds fp32 tensors not modelled
    if (s.precision != Precision::AmpFp32 && (m.family == Family::Qwen3Moe || m.family == Family::GptOss))
        return fmt::format("expected false for {} with bf16 parameters (under the Trainer's bf16 autocast, CUDA runs the "
                           "experts' combine, a sum, in fp32: not modelled)",
                           m.name);
    return "";
}

void validate(const TrainingSetup& s, const ModelSpec& m) {
    const std::string w = "setup";
    auto in_range = [&](const char* field, std::int64_t v, std::int64_t lo, std::int64_t hi) {
        if (v < lo || v > hi) fail(w, field, fmt::format("expected an integer in [{}, {}], got {}", lo, hi, v));
    };
    auto positive = [&](const char* field, std::int64_t v) {
        if (v < 1) fail(w, field, fmt::format("expected a positive integer, got {}", v));
    };
    positive("micro_batch", s.micro_batch);
    positive("seq_len", s.seq_len);
    positive("grad_accum", s.grad_accum);
    positive("dp", s.dp);
    positive("sp", s.sp);
    positive("mlp_chunks", s.mlp_chunks);
    positive("lm_chunks", s.lm_chunks);
    (void)checked_product({s.micro_batch, s.seq_len, m.vocab_size, 8}, "micro_batch x seq_len x vocab_size");
    // The bounds (include/mst/limits.hpp) keep every size inside 63 bits and the work bounded.
    in_range("seq_len", s.seq_len, 1, limits::kSeqLen);
    in_range("micro_batch", s.micro_batch, 1, limits::kMicroBatch);
    if (s.micro_batch * s.seq_len > limits::kMicroStepTokens)
        fail(w, "micro_batch", fmt::format("expected micro_batch x seq_len at most {} tokens, got {} x {}",
                                           limits::kMicroStepTokens, s.micro_batch, s.seq_len));
    in_range("grad_accum", s.grad_accum, 1, limits::kGradAccum);
    in_range("dp", s.dp, 1, limits::kGpus);
    in_range("sp", s.sp, 1, limits::kGpus);
    in_range("ep", s.ep, 1, limits::kGpus);
    if (s.dp * s.sp > limits::kGpus)
        fail(w, "dp", fmt::format("expected dp x sp at most {} GPUs, got {} x {}", limits::kGpus, s.dp, s.sp));
    in_range("mlp_chunks", s.mlp_chunks, 1, limits::kChunks);
    in_range("lm_chunks", s.lm_chunks, 1, limits::kChunks);
    if (const auto r = sp_refusal(m, s.sp_impl, s.sp, s.seq_len)) fail(w, r->field, r->expected);
    if (s.ring()) validate_ring_scope(s, m);
    const std::int64_t tokens = s.local_tokens();
    if (s.mlp_chunks > tokens)
        fail(w, "mlp_chunks", fmt::format("expected at most the tokens per rank ({}), got {}", tokens, s.mlp_chunks));
    if (s.lm_chunks > tokens)
        fail(w, "lm_chunks", fmt::format("expected at most the tokens per rank ({}), got {}", tokens, s.lm_chunks));
    if (s.mlp_chunks > max_mlp_chunks(m))
        fail(w, "mlp_chunks", fmt::format("expected at most {} for {} layers (num_hidden_layers x mlp_chunks at most {}: "
                                          "every chunk of every layer is simulated), got {}",
                                          max_mlp_chunks(m), m.num_layers, limits::kLayerChunks, s.mlp_chunks));
    if (s.zero_stage < 0 || s.zero_stage > 3) fail(w, "zero_stage", fmt::format("expected 0, 1, 2 or 3, got {}", s.zero_stage));
    if (s.fsdp2 && s.runtime != Runtime::Hf)
        fail(w, "fsdp2", "expected false with runtime kernels (its ZeRO-3 is its own; fsdp2 runs torch's fully_shard on Hugging "
                         "Face's model: runtime hf), got true");
    if (s.fsdp2_no_sync && !s.fsdp2)
        fail(w, "fsdp2_no_sync", "expected false without fsdp2 (it is FSDP2's set_requires_gradient_sync(False) under "
                                 "accumulation), got true");
    if (s.hf_trainer_bf16)
        if (const std::string why = hf_trainer_bf16_refusal(s, m); !why.empty()) fail(w, "hf_trainer_bf16", why + ", got true");
    if (!s.fsdp2_reshard_after_forward && !s.fsdp2)
        fail(w, "fsdp2_reshard_after_forward", "expected true without fsdp2 (it is fully_shard's reshard_after_forward), got false");
    if (s.fsdp2_groups != Fsdp2Groups::MstHf && !s.fsdp2)
        fail(w, "fsdp2_groups", fmt::format("expected mst_hf without fsdp2 (it is whose fully_shard calls group it), got {}",
                                            to_string(s.fsdp2_groups)));
    if (s.zero3_prefetch < 0 || s.zero3_prefetch > limits::kZero3Prefetch)
        fail(w, "zero3_prefetch", fmt::format("expected 0..{} layers, got {}", limits::kZero3Prefetch, s.zero3_prefetch));
    if (s.zero3_prefetch != 1 && s.runtime == Runtime::Hf)
        fail(w, "zero3_prefetch", fmt::format("expected 1 with runtime hf (the kernels runtime's layers; DeepSpeed's ZeRO-3 "
                                              "prefetches elements: prefetch_bucket_size), got {}",
                                              s.zero3_prefetch));
    in_range("reduce_bucket_size", s.reduce_bucket_size, 1, limits::kReduceBucket);
    if (s.reduce_bucket_size != kDeepSpeedReduceBucket && !s.deepspeed_engine())
        fail(w, "reduce_bucket_size",
             fmt::format("expected DeepSpeed's default {} unless DeepSpeed's ZeRO engine runs the step (runtime hf, "
                         "zero_stage 1, 2 or 3), got {}",
                         kDeepSpeedReduceBucket, s.reduce_bucket_size));
    in_range("param_persistence_threshold", s.param_persistence_threshold, 0, limits::kReduceBucket);
    in_range("prefetch_bucket_size", s.prefetch_bucket_size, 0, limits::kReduceBucket);
    if (!s.zero3_defaults() && !s.deepspeed_zero3()) {
        const bool persistence = s.param_persistence_threshold != kDeepSpeedPersistence;
        fail(w, persistence ? "param_persistence_threshold" : "prefetch_bucket_size",
             fmt::format("expected DeepSpeed's default {} unless DeepSpeed's ZeRO-3 engine runs the step (runtime hf, zero_stage 3), got {}",
                         persistence ? kDeepSpeedPersistence : kDeepSpeedPrefetchBucket,
                         persistence ? s.param_persistence_threshold : s.prefetch_bucket_size));
    }
    if (s.overlap_comm && !s.deepspeed_zero())
        fail(w, "overlap_comm", "expected false unless DeepSpeed's ZeRO 1/2 engine runs the step (runtime hf, zero_stage 1 or 2)");
    if (!s.checkpoint.empty() && static_cast<std::int64_t>(s.checkpoint.size()) != m.num_layers)
        fail(w, "checkpoint", fmt::format("expected one entry per layer ({}), got {}", m.num_layers, s.checkpoint.size()));
    if (s.offload_checkpoints && s.checkpointed_count() == 0)
        fail(w, "offload_checkpoints", "expected some checkpointed layers to offload (set checkpoint)");
    if (s.optimizer_in_backward && s.grad_accum > 1)
        fail(w, "optimizer_in_backward", "expected false with grad_accum > 1 (the gradients must accumulate before a step)");
    if (s.optimizer_in_backward && s.zero_stage >= 2)
        fail(w, "optimizer_in_backward", "expected false with ZeRO stage 2 or 3 (their gradients are reduce-scattered per bucket)");
    if (s.ep > 1 && !m.moe)
        fail(w, "ep", fmt::format("expected 1 for a dense model (expert parallelism shards a Mixture-of-Experts block's "
                                  "experts), got {}", s.ep));
    if (s.ep > 1 && m.moe->experts % s.ep != 0)
        fail(w, "ep", fmt::format("expected a divisor of the experts ({}), got {}", m.moe->experts, s.ep));
    if (s.zero_ranks() % s.ep != 0)
        fail(w, "ep", fmt::format("expected a divisor of dp x sp ({} x {}: the expert-parallel group is drawn from the "
                                  "data- and sequence-parallel ranks), got {}",
                                  s.dp, s.sp, s.ep));
    if (!(s.moe_imbalance >= 1.0 && s.moe_imbalance <= static_cast<double>(s.ep)))
        fail(w, "moe_imbalance", fmt::format("expected a number in [1, ep = {}] (the busiest rank's experts receive at most "
                                             "every rank's pairs{}), got {}",
                                             s.ep, s.ep == 1 ? "; with ep 1 every expert is local and no buffer depends on the "
                                                               "routing" : "",
                                             s.moe_imbalance));
    validate_model_scope(s, m);
    validate_hf_scope(s, m);
}

// Ring attention is PyTorch's context-parallel SDPA ring around the kernels runtime's layer: plain
// causal flash attention (the caller drops any other mask), aten's FlashAttention-2 (head_dim a
// multiple of 8, at most 256; above it transformers also expands the key heads).
void validate_ring_scope(const TrainingSetup& s, const ModelSpec& m) {
    const std::string w = "setup";
    const char* why = "ring attention runs PyTorch's causal SDPA flash kernel";
    if (s.runtime != Runtime::Kernels)
        fail(w, "sp_impl", "expected ulysses with runtime hf (sequence parallelism is not modelled in it; runtime kernels "
                           "plans ring attention), got ring");
    if (s.attention != Attention::Flash)
        fail(w, "attention", fmt::format("expected flash with sp_impl ring ({}), got {}", why, to_string(s.attention)));
    if (m.attention_sinks || m.attn_logit_softcapping)
        fail(w, "sp_impl", fmt::format("expected ulysses for {} ({}, which takes no {}), got ring", m.name, why,
                                       m.attention_sinks ? "attention sinks" : "logit soft-capping"));
    if (m.sliding_window && std::find(m.sliding_layers.begin(), m.sliding_layers.end(), true) != m.sliding_layers.end())
        fail(w, "sp_impl", fmt::format("expected ulysses for {} ({}: causal masks only, no sliding window), got ring", m.name, why));
    if (m.head_dim > 256 || m.head_dim % 8 != 0)
        fail(w, "sp_impl", fmt::format("expected ulysses for {} ({}, which takes head_dim a multiple of 8 up to 256; got {})",
                                       m.name, why, m.head_dim));
}

void validate_model_scope(const TrainingSetup& s, const ModelSpec& m) {
    const std::string w = "setup";
    // transformers runs gpt-oss's sinks in eager attention or in the kernels hub's vllm-flash-attn3
    // (flash_attention_2 falls back to it), whose allocations are not modelled yet; SDPA refuses sinks.
    // mst-plan's own executor runs them in its flash kernel only.
    if (m.attention_sinks && s.runtime == Runtime::Hf && s.attention != Attention::Eager)
        fail(w, "attention", fmt::format("expected eager for a model with attention sinks in the hf runtime (gpt-oss: its "
                                         "flash path is the kernels hub's vllm-flash-attn3, not modelled yet, and SDPA "
                                         "refuses sinks; the kernels runtime runs sinks in flash), got {}",
                                         to_string(s.attention)));
    // sdpa is transformers' attention implementation: PyTorch's FlashAttention-2 kernel, which SDPA
    // picks for causal attention without a mask (a sliding window as long as the sequence or shorter
    // passes one: masking_utils skips it only below the window, and another kernel runs with the
    // [S, S] mask; Gemma-2's soft-capping SDPA refuses), head dimensions a multiple of 8 up to 256.
    if (s.attention == Attention::Sdpa) {
        if (s.runtime != Runtime::Hf)
            fail(w, "attention", "expected flash or eager with runtime kernels (sdpa is transformers' attention "
                                 "implementation: runtime hf), got sdpa");
        const bool sliding = std::find(m.sliding_layers.begin(), m.sliding_layers.end(), true) != m.sliding_layers.end() &&
                             m.sliding_window && s.seq_len >= *m.sliding_window;
        if (sliding || m.attn_logit_softcapping || m.head_dim > 256 || m.head_dim % 8 != 0)
            fail(w, "attention",
                 fmt::format("expected flash or eager for {} (sdpa is modelled as PyTorch's flash kernel: causal "
                             "attention without a mask, {}), got sdpa",
                             m.name, sliding ? fmt::format("but its sliding window of {} tokens passes one at {}, and SDPA "
                                                           "then runs another kernel with an [S, S] mask", m.sliding_window.value_or(0),
                                                           s.seq_len)
                                     : m.attn_logit_softcapping ? "but its logit soft-capping SDPA cannot run"
                                                                : "which takes head dimensions a multiple of 8 up to 256"));
    }
    if (m.attention_sinks && s.runtime == Runtime::Kernels && s.attention != Attention::Flash)
        fail(w, "attention", "expected flash for a model with attention sinks in the kernels runtime (mst-plan's executor "
                             "runs gpt-oss's sinks in its flash kernel; runtime hf models transformers' eager path), got eager");
    // A head of 2 rotates two 1-wide halves, whose concatenation PyTorch lays out channels-last with
    // several sequences: the eager products then copy q and k, which is not modelled.
    if (s.runtime == Runtime::Hf && m.rotary_half_tables() && m.head_dim < 4 && s.micro_batch > 1)
        fail(w, "micro_batch", fmt::format("expected 1 for gpt-oss heads of {} dimensions (at least 4 with several sequences), "
                                           "got {}", m.head_dim, s.micro_batch));
    // transformers' experts run torch's grouped_mm, which needs rows of a multiple of 16 bytes: hidden
    // and expert sizes in whole 8 bf16 (under autocast 4 fp32) elements.
    const std::int64_t align = s.precision == Precision::AmpFp32 ? 4 : 8;
    if (s.runtime == Runtime::Hf && m.moe && (m.hidden_size % align != 0 || m.moe->intermediate % align != 0))
        fail(w, "runtime", fmt::format("expected a hidden size ({}) and an expert intermediate size ({}) in multiples of {} "
                                       "elements with runtime hf (the rows torch's grouped_mm multiplies must be multiples of 16 "
                                       "bytes; the kernels runtime plans any size)",
                                       m.hidden_size, m.moe->intermediate, align));
}

// ZeRO-3 in the hf runtime (src/core/sim/zero3.cpp) is proven on the referee for the Llama-shaped
// decoder (Llama, Mistral, Qwen2 with its q/k/v biases, Qwen3 with its head norms, Phi-3 with its fused
// projections, Gemma-2 and -3 with their four norms; tied embeddings or not) and the Mixture-of-Experts
// blocks of Mixtral, Qwen3-MoE and gpt-oss, with fp32 master weights, python/mst_hf's MLP (loop, or tiled
// for dense MLPs) and LM head mini-sequences and checkpoints on the GPU or offloaded.
// What else its hooks and gathers would meet is refused until it is proven the same way.
namespace {
void validate_zero3_scope(const TrainingSetup& s, const ModelSpec& m, const char* hint) {
    const std::string w = "setup";
    const char* z3 = "with runtime hf and ZeRO-3 (DeepSpeed's stage-3 engine)";
    if (s.dp < 2)
        fail(w, "dp", fmt::format("expected 2 or more ranks {} (on one GPU it shards nothing: zero_stage 0), got {}", z3, s.dp));
    // (Qwen2's q, k and v biases: a second parameter of their modules)
    const bool qwen2 = m.family == Family::Qwen2;
    // (Mixtral's and Qwen3-MoE's sparse blocks: DeepSpeed's default ZeRO-3 leaf modules, one set of hooks for
    // the router and the experts; gpt-oss's block is none: its router and experts have their own, and its
    // attention's q, k, v and o biases and sinks are parameters of their modules)
    const bool gpt_oss = m.family == Family::GptOss;
    const bool moe = m.family == Family::Mixtral || m.family == Family::Qwen3Moe || gpt_oss;
    const bool modelled = (m.family == Family::Llama || m.family == Family::Mistral || m.family == Family::Qwen3 || qwen2 ||
                           m.family == Family::Phi3 || m.family == Family::Gemma2 || m.family == Family::Gemma3 || moe) &&
                          (!m.moe || moe) && (!m.qkv_bias || qwen2 || gpt_oss) && (!m.o_bias || gpt_oss) && !m.mlp_bias;
    if (!modelled)
        fail(w, "zero_stage", fmt::format("expected 0, 1 or 2 for {} {} (its modules' hooks are modelled for Llama, Mistral, "
                                          "Qwen2, Qwen3, Phi-3, Gemma-2, Gemma-3, Mixtral, Qwen3-MoE and gpt-oss, with no "
                                          "biases but Qwen2's and gpt-oss's){}, got 3",
                                          m.name, z3, hint));
    // python/mst_hf's tiled MLP under ZeRO-3 is modelled for the dense MLP (its chunks' replays call each
    // projection's module; ds_grad_is_ready holds each reduction back), not for a sparse block's
    if (moe && s.mlp_chunks > 1 && s.mlp_impl == MlpImpl::Tiled)
        fail(w, "mlp_impl", fmt::format("expected loop for {} {} (python/mst_hf's tiled MLP under ZeRO-3 is modelled for "
                                        "dense MLPs){}, got tiled",
                                        m.name, z3, hint));
    // python/mst_hf refuses it (patch.py _check_lm_head): its chunked loss runs inside lm_head's forward
    // under ZeRO-3, and a soft-capping model's forward changes lm_head's output after it
    if (s.lm_chunks > 1 && m.final_logit_softcapping)
        fail(w, "lm_chunks", fmt::format("expected 1 for {} {} (python/mst_hf's chunked loss runs inside lm_head's forward, "
                                         "which the model then soft-caps: final_logit_softcapping {}){}, got {}",
                                         m.name, z3, *m.final_logit_softcapping, hint, s.lm_chunks));
    if (s.precision != Precision::Bf16Master)
        fail(w, "precision", fmt::format("expected bf16-master {} (its fp32 master partitions), got {}", z3, to_string(s.precision)));
}
}  // namespace

// FSDP2 in the hf runtime (src/core/sim/fsdp2.cpp) is proven on the referee (python/mst_referee/fsdp2.py)
// for dense models, parameters stored in bf16 or in fp32 under its bf16 mixed-precision policy; what else
// its hooks would meet is refused until it is proven the same way.
void validate_fsdp2_scope(const TrainingSetup& s, const ModelSpec& m) {
    const std::string w = "setup";
    const char* fsdp = "with fsdp2 (torch's fully_shard)";
    if (s.zero_stage != 3)
        fail(w, "zero_stage", fmt::format("expected 3 {} (every layer resharded after its forward), got {}", fsdp, s.zero_stage));
    if (s.dp < 2) fail(w, "dp", fmt::format("expected 2 or more ranks {} (on one GPU it shards nothing), got {}", fsdp, s.dp));
    // (its ranks alike in their shards are walked once: walked_ranks)
    if (m.moe)
        fail(w, "fsdp2", fmt::format("expected false for {} (FSDP2 is modelled for dense models; DeepSpeed's ZeRO-3 shards "
                                     "Mixture-of-Experts models in this runtime: fsdp2 false), got true",
                                     m.name));
    if (s.fsdp2_groups == Fsdp2Groups::Axolotl && s.precision != Precision::PureBf16)
        fail(w, "fsdp2_groups", fmt::format("expected pure-bf16 with axolotl (Axolotl trains the bf16 weights it loads: no "
                                            "fp32 master), got precision {}", to_string(s.precision)));
    if (s.precision == Precision::AmpFp32)
        fail(w, "precision", fmt::format("expected pure-bf16 (bf16 parameters) or bf16-master (fp32 parameters gathered in bf16 "
                                         "by its mixed-precision policy) {} (autocast over it is not modelled), got amp",
                                         fsdp));
    // torch's DTensor has no sharding rule for _fused_sgd_ (NotImplementedError at the first step)
    if (s.optimizer == Optimizer::SgdMomentum && s.optimizer_impl == OptimizerImpl::Fused)
        fail(w, "optimizer_impl", fmt::format("expected foreach or for-loop for sgd {} (torch's sharded parameters have no fused "
                                              "SGD), got fused",
                                              fsdp));
}

// The hf runtime walks transformers + PyTorch's own step, each rule proven event by event
// against the referee (python/mst_referee), which runs one process, DDP's Reducer or DeepSpeed's
// ZeRO engine. What is not proven that way yet (ZeRO-3 and sequence parallelism; padded batches;
// bitsandbytes; MLP biases) is refused, not guessed: the kernels runtime models those.
// torchtitan's own step (docs/torchtitan-model.md), proven event by event against mst_referee.titan for what
// is modelled so far: its Llama-3 code on one GPU or fully sharded by FSDP2 over several, pure bf16 or bf16-master
// (fp32 parameters cast to bf16 by FSDP2's mixed-precision policy), micro-batches of any size accumulated or not, every layer
// checkpointed (FullAC) or none, the loss whole or in ChunkedLossWrapper's chunks.
std::optional<FieldRefusal> titan_scope_refusal(const TrainingSetup& s, const ModelSpec& m) {
    const auto refuse = [](const char* field, const std::string& expected, const std::string& got) {
        return FieldRefusal{field, fmt::format("expected {} with model_code torchtitan (torchtitan's step is modelled so far "
                                               "for its Llama-3 code in pure bf16 or bf16-master), got {}",
                                               expected, got)};
    };
    // (a model torchtitan builds with its own Llama-3 code: the emitter's flavor match, emit/torchtitan.cpp)
    if (!torchtitan_llama3(m))
        return refuse("model_code", "a model torchtitan trains with its own Llama-3 code (one of its llama3 flavors' shapes; "
                                    "another runs through its transformers backend, transformers' code)", m.name);
    // (one GPU: torchtitan's FSDP2 on a mesh of one, zero_stage 0 and no fsdp2; several: its FSDP2 fully sharding,
    // zero_stage 3 with fsdp2 in its default layout)
    if (s.dp != 1 && !(s.fsdp2 && s.zero_stage == 3))
        return refuse("dp", "1, or several with fsdp2 and zero_stage 3 (torchtitan's FSDP2 sharding over them)", std::to_string(s.dp));
    if (s.sp != 1) return refuse("sp", "1", std::to_string(s.sp));
    if (s.ep != 1) return refuse("ep", "1", std::to_string(s.ep));
    if (s.dp == 1 && (s.zero_stage != 0 || s.fsdp2))
        return refuse("zero_stage", "0 without fsdp2 on one GPU (torchtitan's own FSDP2)",
                      fmt::format("{}{}", s.zero_stage, s.fsdp2 ? " with fsdp2" : ""));
    // (fsdp2_reshard_after_forward false: its fsdp_reshard_after_forward "never", every group whole from its forward)
    if (s.fsdp2 && s.fsdp2_groups != Fsdp2Groups::MstHf)
        return refuse("fsdp2_groups", "mst_hf (torchtitan's own FSDP2 groups)", to_string(s.fsdp2_groups));
    if (s.fsdp2 && s.fsdp2_no_sync)
        return refuse("fsdp2_no_sync", "false (torchtitan's loop reduce-scatters every micro-batch's gradients)", "true");
    if (s.precision == Precision::AmpFp32) return refuse("precision", "pure-bf16 or bf16-master", to_string(s.precision));
    if (s.grad_accum > limits::kTitanMicroSteps)
        return refuse("grad_accum",
                      fmt::format("at most {} (each micro-batch's inputs are held to the step's end, each walked)",
                                  limits::kTitanMicroSteps),
                      std::to_string(s.grad_accum));
    // (FullAC: torchtitan 0.3.0 checkpoints every block or none)
    if (const std::int64_t k = s.checkpointed_count(); k != 0 && k != m.num_layers)
        return refuse("checkpoint", fmt::format("none or all {} layers", m.num_layers), std::to_string(k));
    if (s.offload_checkpoints) return refuse("offload_checkpoints", "false", "true");
    if (s.mlp_chunks != 1) return refuse("mlp_chunks", "1", std::to_string(s.mlp_chunks));
    // (ChunkedLossWrapper: each chunk's backward inside the forward, torch._check(seq_len % num_chunks == 0))
    if (s.lm_chunks > 1 && s.lm_impl != LmHeadImpl::FusedForward)
        return refuse("lm_impl", "fused with lm_chunks > 1 (torchtitan's chunked loss runs each chunk's backward in the forward)",
                      to_string(s.lm_impl));
    if (s.lm_chunks < 1 || s.seq_len % s.lm_chunks != 0)
        return refuse("lm_chunks",
                      fmt::format("a divisor of seq_len {} (torchtitan's chunked loss splits the sequence evenly)", s.seq_len),
                      std::to_string(s.lm_chunks));
    if (s.attention != Attention::Flash) return refuse("attention", "flash (torchtitan's flex attention)", to_string(s.attention));
    if (s.optimizer != Optimizer::AdamW) return refuse("optimizer", "adamw", to_string(s.optimizer));
    if (s.optimizer_impl != OptimizerImpl::Fused) return refuse("optimizer_impl", "fused", to_string(s.optimizer_impl));
    if (s.optimizer_in_backward) return refuse("optimizer_in_backward", "false", "true");
    if (s.hf_trainer_bf16) return refuse("hf_trainer_bf16", "false", "true");
    return std::nullopt;
}

void validate_titan_scope(const TrainingSetup& s, const ModelSpec& m) {
    if (const auto r = titan_scope_refusal(s, m)) fail("setup", r->field, r->expected);
}

void validate_hf_scope(const TrainingSetup& s, const ModelSpec& m) {
    const std::string w = "setup";
    if (s.runtime != Runtime::Hf) {
        if (s.model_code != ModelCode::Transformers)
            fail(w, "model_code", fmt::format("expected transformers with runtime kernels (its model code is its own), got {}",
                                              to_string(s.model_code)));
        return;
    }
    if (s.titan()) validate_titan_scope(s, m);
    const char* hint = "; the kernels runtime models it (runtime kernels)";
    // Data parallelism is DistributedDataParallel (src/core/sim/ddp.cpp) with ZeRO 0 and DeepSpeed's
    // engine with ZeRO 1 or 2 (src/core/sim/deepspeed.cpp); ZeRO-3 and sequence parallelism are not
    // modelled in this runtime yet.
    if (s.sp > 1) fail(w, "sp", fmt::format("expected 1 with runtime hf (sequence parallelism is not modelled in it){}, got {}", hint, s.sp));
    if (s.ep > 1) fail(w, "ep", fmt::format("expected 1 with runtime hf (expert parallelism is not modelled in it){}, got {}", hint, s.ep));
    if (s.deepspeed_zero3()) validate_zero3_scope(s, m, hint);
    if (s.fsdp2) validate_fsdp2_scope(s, m);
    // The optimizer's states are in the dtype of what it steps: bf16 for pure bf16, fp32 for fp32
    // masters (bf16-master) or fp32 weights (amp). torch's optimizers keep them like the tensors they
    // update (python/mst_hf's make_optimizer refuses any other), DeepSpeed's engine like its master
    // weights (its bf16 master flags under pure bf16).
    const StateDtype states = s.precision == Precision::PureBf16 ? StateDtype::Bf16 : StateDtype::Fp32;
    const auto wrong_states = [&](const std::string& engine, const char* why) {
        fail(w, "optimizer_state_dtype", fmt::format("expected {} with precision {} {} ({}), got {}", to_string(states),
                                                     to_string(s.precision), engine, why, to_string(s.effective_state_dtype())));
    };
    if (!s.deepspeed_engine() && s.optimizer != Optimizer::AdamW8bit && s.effective_state_dtype() != states)
        wrong_states("with runtime hf", "torch keeps optimizer states in the dtype of the tensors it updates");
    if (s.deepspeed_engine()) {
        // DeepSpeed's bf16 engine: fp32 master weights and states (bf16-master), or its bf16 master
        // flags with bf16 states (pure-bf16), and its FusedAdam.
        const char* ds = s.deepspeed_zero3() ? "with runtime hf and ZeRO-3 (DeepSpeed's engine)"
                                             : "with runtime hf and ZeRO 1 or 2 (DeepSpeed's engine)";
        if (s.deepspeed_zero() && s.dp > limits::kDeepSpeedRanks)
            fail(w, "dp", fmt::format("expected at most {} ranks {} (every rank's step is walked){}, got {}", limits::kDeepSpeedRanks,
                                      ds, hint, s.dp));
        if (s.precision == Precision::AmpFp32)
            fail(w, "precision", fmt::format("expected bf16-master or pure-bf16 {} (its torch_autocast is not modelled){}, got amp", ds, hint));
        if (s.effective_state_dtype() != states) wrong_states(ds, "its optimizer states are its master weights' dtype");
        if (s.optimizer != Optimizer::AdamW || s.optimizer_impl != OptimizerImpl::Fused)
            fail(w, "optimizer", fmt::format("expected adamw with optimizer_impl fused {} (DeepSpeed's FusedAdam){}, got {} ({})", ds,
                                             hint, to_string(s.optimizer), to_string(s.optimizer_impl)));
        if (s.optimizer_in_backward)
            fail(w, "optimizer_in_backward", fmt::format("expected false {} (it steps after backward){}, got true", ds, hint));
    }
    if (s.dp > 1 && s.zero_stage == 0 && s.precision == Precision::Bf16Master)
        fail(w, "precision", fmt::format("expected pure-bf16 or amp with runtime hf, dp > 1 and ZeRO 0 (python/mst_hf's fp32 master "
                                         "weights would step on gradients DDP has not reduced; DeepSpeed's ZeRO 1 or 2 keeps "
                                         "its own){}, got bf16-master", hint));
    if (s.dp > 1 && s.optimizer_in_backward)
        fail(w, "optimizer_in_backward", fmt::format("expected false with runtime hf and dp > 1 (DDP and DeepSpeed reduce gradients "
                                                     "after their hooks; a step in backward would use unreduced ones){}, got true", hint));
    if (s.padded) fail(w, "padded", fmt::format("expected false with runtime hf (packed batches){}", hint));
    if (s.optimizer == Optimizer::AdamW8bit)
        fail(w, "optimizer", fmt::format("expected adamw or sgd with runtime hf (bitsandbytes is not modelled){}", hint));
    if (m.mlp_bias) fail(w, "runtime", fmt::format("expected kernels for a model with MLP biases{}", hint));
}

std::int64_t chunks_for_tokens(const TrainingSetup& s, std::int64_t chunk_tokens) {
    // Total for any knobs (validate() reports the bad ones): no zero divisor, no wrapped product.
    const std::int64_t tokens = checked_mul(std::max<std::int64_t>(s.micro_batch, 1), std::max<std::int64_t>(s.seq_len, 1),
                                            "micro_batch x seq_len") /
                                std::max<std::int64_t>(s.sp, 1);
    return ceil_div(std::max<std::int64_t>(tokens, 1), chunk_tokens);
}

std::int64_t max_mlp_chunks(const ModelSpec& m) {
    return std::min(limits::kChunks, limits::kLayerChunks / std::max<std::int64_t>(m.num_layers, 1));
}

// ---- JSON ---------------------------------------------------------------------

TrainingSetup parse_setup(const nlohmann::json& j, const ModelSpec& model, const std::string& where, Runtime default_runtime,
                          ChunkTokens* chunk_tokens) {
    detail::JsonReader r(j, where);
    TrainingSetup s;
    s.runtime = default_runtime;
    s.micro_batch = r.opt_integer("micro_batch", 1, limits::kMicroBatch).value_or(s.micro_batch);
    s.seq_len = r.opt_integer("seq_len", 1, limits::kSeqLen).value_or(s.seq_len);
    s.grad_accum = r.opt_integer("grad_accum", 1, limits::kGradAccum).value_or(s.grad_accum);
    s.padded = r.opt_boolean("padded").value_or(false);
    if (auto v = r.opt_string("precision")) s.precision = parse_precision(*v, where);
    if (auto v = r.opt_string("optimizer")) s.optimizer = parse_optimizer(*v, where);
    if (auto v = r.opt_string("optimizer_state_dtype")) s.state_dtype = parse_state_dtype(*v, where);
    s.optimizer_in_backward = r.opt_boolean("optimizer_in_backward").value_or(false);
    if (auto v = r.opt_string("optimizer_impl")) s.optimizer_impl = parse_optimizer_impl(*v, where);
    if (auto v = r.opt_string("runtime")) s.runtime = parse_runtime(*v, where);
    s.attention = default_attention(model, s.runtime);
    if (auto v = r.opt_string("attention")) s.attention = parse_attention(*v, where);
    s.dp = r.opt_integer("dp", 1, limits::kGpus).value_or(1);
    s.sp = r.opt_integer("sp", 1, limits::kGpus).value_or(1);
    if (auto v = r.opt_string("sp_impl")) s.sp_impl = parse_sp_impl(*v, where);
    s.ep = r.opt_integer("ep", 1, limits::kGpus).value_or(1);
    s.moe_imbalance = r.opt_number("moe_imbalance", 1.0, static_cast<double>(limits::kGpus)).value_or(1.0);
    s.zero_stage = static_cast<int>(r.opt_integer("zero_stage", 0, 3).value_or(0));
    s.zero3_prefetch = static_cast<int>(r.opt_integer("zero3_prefetch", 0, limits::kZero3Prefetch).value_or(1));
    s.reduce_bucket_size = r.opt_integer("reduce_bucket_size", 1, limits::kReduceBucket).value_or(kDeepSpeedReduceBucket);
    s.overlap_comm = r.opt_boolean("overlap_comm").value_or(false);
    s.param_persistence_threshold =
        r.opt_integer("param_persistence_threshold", 0, limits::kReduceBucket).value_or(kDeepSpeedPersistence);
    s.prefetch_bucket_size = r.opt_integer("prefetch_bucket_size", 0, limits::kReduceBucket).value_or(kDeepSpeedPrefetchBucket);
    s.fsdp2 = r.opt_boolean("fsdp2").value_or(false);
    s.fsdp2_no_sync = r.opt_boolean("fsdp2_no_sync").value_or(false);
    s.fsdp2_reshard_after_forward = r.opt_boolean("fsdp2_reshard_after_forward").value_or(true);
    if (auto v = r.opt_string("fsdp2_groups")) s.fsdp2_groups = parse_fsdp2_groups(*v, where);
    s.hf_trainer_bf16 = r.opt_boolean("hf_trainer_bf16").value_or(false);
    if (auto v = r.opt_string("model_code")) s.model_code = parse_model_code(*v, where);

    auto chunks = [&](const char* count_key, const char* tokens_key, std::optional<std::int64_t>* tokens) -> std::int64_t {
        if (r.has(count_key) && r.has(tokens_key))
            r.fail(tokens_key, fmt::format("expected either {} or {}, not both", count_key, tokens_key));
        if (auto t = r.opt_integer(tokens_key, 1, limits::kMicroStepTokens)) {
            if (tokens) *tokens = *t;
            return chunks_for_tokens(s, *t);
        }
        return r.opt_integer(count_key, 1, limits::kChunks).value_or(1);
    };
    s.mlp_chunks = chunks("mlp_chunks", "mlp_chunk_tokens", chunk_tokens ? &chunk_tokens->mlp : nullptr);
    s.lm_chunks = chunks("lm_chunks", "lm_chunk_tokens", chunk_tokens ? &chunk_tokens->lm : nullptr);
    if (auto v = r.opt_string("mlp_impl")) s.mlp_impl = parse_mlp_impl(*v, where);
    if (auto v = r.opt_string("lm_impl")) s.lm_impl = parse_lm_impl(*v, where);

    if (r.has("checkpoint")) {
        const auto& c = r.raw("checkpoint");
        if (c.is_string()) {
            s.checkpoint = parse_checkpoint_spec(c.get<std::string>(), model.num_layers, where);
        } else if (c.is_array()) {
            s.checkpoint.assign(static_cast<std::size_t>(model.num_layers), false);
            for (const auto& e : c) {
                const auto layer = detail::as_integer(e, 0, model.num_layers - 1);
                if (!layer)
                    r.fail("checkpoint", fmt::format("expected layer indices in 0..{}, got {}", model.num_layers - 1,
                                                     detail::shown(e)));
                s.checkpoint[static_cast<std::size_t>(*layer)] = true;
            }
        } else {
            r.fail("checkpoint", "expected a string (none, all, spread:K, ...) or an array of layer indices");
        }
    }
    s.offload_checkpoints = r.opt_boolean("offload_checkpoints").value_or(false);
    r.reject_unknown();
    return s;
}

TrainingSetup load_setup_file(const std::string& path, const ModelSpec& model, Runtime default_runtime, ChunkTokens* chunk_tokens) {
    return parse_setup(detail::read_json_file(path), model, path, default_runtime, chunk_tokens);
}

nlohmann::json to_json(const TrainingSetup& s) {
    std::vector<std::int64_t> layers;
    for (std::size_t i = 0; i < s.checkpoint.size(); ++i)
        if (s.checkpoint[i]) layers.push_back(static_cast<std::int64_t>(i));
    nlohmann::json j = {
        {"micro_batch", s.micro_batch},
        {"seq_len", s.seq_len},
        {"grad_accum", s.grad_accum},
        {"padded", s.padded},
        {"precision", to_string(s.precision)},
        {"optimizer", to_string(s.optimizer)},
        {"optimizer_state_dtype", to_string(s.effective_state_dtype())},
        {"optimizer_in_backward", s.optimizer_in_backward},
        {"optimizer_impl", to_string(s.optimizer_impl)},
        {"runtime", to_string(s.runtime)},
        {"attention", to_string(s.attention)},
        {"mlp_chunks", s.mlp_chunks},
        {"mlp_impl", to_string(s.mlp_impl)},
        {"lm_chunks", s.lm_chunks},
        {"lm_impl", to_string(s.lm_impl)},
        {"checkpoint", layers},
        {"offload_checkpoints", s.offload_checkpoints},
        {"dp", s.dp},
        {"zero_stage", s.zero_stage},
        {"zero3_prefetch", s.zero3_prefetch},
        {"reduce_bucket_size", s.reduce_bucket_size},
        {"overlap_comm", s.overlap_comm},
        {"sp", s.sp},
        {"sp_impl", to_string(s.sp_impl)},
        {"ep", s.ep},
        {"moe_imbalance", s.moe_imbalance},
    };
    if (s.deepspeed_zero3()) {  // (ZeRO-3's own options: only where its engine runs)
        j["param_persistence_threshold"] = s.param_persistence_threshold;
        j["prefetch_bucket_size"] = s.prefetch_bucket_size;
    }
    if (s.fsdp2) j["fsdp2"] = true;  // (only where it is asked for: setups without it read as before)
    if (s.fsdp2_no_sync) j["fsdp2_no_sync"] = true;
    if (!s.fsdp2_reshard_after_forward) j["fsdp2_reshard_after_forward"] = false;
    if (s.fsdp2_groups != Fsdp2Groups::MstHf) j["fsdp2_groups"] = to_string(s.fsdp2_groups);
    if (s.hf_trainer_bf16) j["hf_trainer_bf16"] = true;
    if (s.model_code != ModelCode::Transformers) j["model_code"] = to_string(s.model_code);
    return j;
}

}  // namespace mst
