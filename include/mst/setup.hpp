#pragma once
// TrainingSetup: every knob of one training step that changes its memory or time.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "mst/model.hpp"

namespace mst {

// Where parameters, gradients and optimizer states live and in which dtype.
enum class Precision {
    PureBf16,    // params, grads (and by default optimizer states) in bf16: the MsT benchmark
    Bf16Master,  // bf16 params for compute, fp32 master copy and fp32 grads: DeepSpeed/Megatron
    AmpFp32,     // fp32 params and grads, bf16 autocast for matmuls: PyTorch AMP
};

enum class Optimizer { AdamW, AdamW8bit, SgdMomentum };
enum class StateDtype { Fp32, Bf16 };

// Whose code runs the step. The op graph is the same; what each op allocates is not.
enum class Runtime {
    Hf,       // Hugging Face transformers + PyTorch (what users train with, directly or through
              // Axolotl/TRL/DeepSpeed): fp32 norm upcasts, saved activation outputs, rotary
              // tables, torch.cat in the loop MLP, autograd's gradient buffers, torch.optim's
              // temporaries; proven against the referee (python/mst_referee)
    Kernels,  // mst-plan's own executor (measure --backend cpu|cuda): minimal temporaries
};

// Which of torch's implementations steps AdamW or SGD (torch/optim/adamw.py): a variant of
// the trainer's code, so it matters to the hf runtime's temporaries only.
enum class OptimizerImpl {
    Foreach,  // _multi_tensor_*: list-wide kernels; torch.optim's default for CUDA tensors (one temporary per parameter)
    Fused,    // _fused_*: one kernel per parameter group, updating in place
    ForLoop,  // _single_tensor_*: one parameter at a time (foreach=False)
};

enum class Attention {
    Flash,  // FlashAttention-2 (hf runtime: transformers' flash_attention_2): saves output and logsumexp, O(S) memory
    Sdpa,   // hf runtime: transformers' default sdpa, PyTorch's own FlashAttention-2 kernel on a GPU
    Eager,  // materialises S x S scores and probabilities (Hugging Face "eager")
};
// What transformers calls it (attn_implementation).
const char* hf_attn_implementation(Attention a);

// How attention runs when the sequence is split over sp ranks.
enum class SpImpl {
    Ulysses,  // DeepSpeed Ulysses: all-to-all to the whole sequence with heads / sp heads, and back
    Ring,     // PyTorch's context parallelism (torch.distributed.tensor.experimental.context_parallel,
              // what accelerate's cp_backend "torch" runs): SDPA's flash kernel in a ring, the K/V
              // all-gathered once per call, fp32 merges, head-tail load balance; each rank keeps
              // its sequence shard and every head
};

// Whose model code the hf runtime's PyTorch step runs: transformers' modeling code (python/mst_hf, the
// Hugging Face Trainer, Axolotl, DeepSpeed), or torchtitan 0.3.0's own (its Llama-3: FSDP2 on every
// layout, a fused wqkv, complex RoPE, flex attention, fused RMSNorm; docs/torchtitan-model.md).
enum class ModelCode { Transformers, Torchtitan };

// Whose fully_shard calls group an FSDP2 model's parameters (docs/fsdp2-model.md).
enum class Fsdp2Groups {
    MstHf,       // python/mst_hf's shard: every decoder layer, then the model (the embedding, the final norm
                 // and the LM head: gathered from the forward's start to the end of backward)
    Accelerate,  // the Hugging Face Trainer's accelerate 1.15 (fsdp2_prepare_model, an unsharded model):
                 // the decoder layers, the embedding (untied), then a tail of the final norm, the tied
                 // embedding and the LM head, kept whole from its forward to its backward
    Axolotl,     // Axolotl 0.21's own fsdp2_prepare_model (it replaces accelerate's): the decoder layers, then the
                 // model, whose group (the embedding, the final norm, the LM head) reshards after its forward as
                 // the layers do; the bf16 weights it loads under accelerate's bf16 policy (output bf16), and
                 // torch 2.14's FSDP2 (Axolotl 0.21 requires torch < 2.15)
};

// How the MLP is split into mini-sequences when mlp_chunks > 1.
enum class MlpImpl {
    Loop,   // MsT reference: a loop over chunks under autograd; every chunk's saved tensors live until backward
    Tiled,  // DeepSpeed ALST TiledMLP: forward without autograd, saves only the input, recomputes in backward
};

// How the LM head + loss is split when lm_chunks > 1.
enum class LmHeadImpl {
    Recompute,     // MsT reference: saves the hidden chunk, recomputes logits in backward
    FusedForward,  // Liger FLCE / ALST tiled logits: gradients computed inside forward, held until backward
};

// DeepSpeed's defaults (elements; deepspeed/runtime/zero/config.py): reduce_bucket_size, and ZeRO-3's
// stage3_param_persistence_threshold, stage3_prefetch_bucket_size, stage3_max_live_parameters and
// stage3_max_reuse_distance (the last two are not knobs: mst-plan's ds_config.json writes the defaults).
inline constexpr std::int64_t kDeepSpeedReduceBucket = 500'000'000;
inline constexpr std::int64_t kDeepSpeedPersistence = 100'000;
inline constexpr std::int64_t kDeepSpeedPrefetchBucket = 50'000'000;
inline constexpr std::int64_t kDeepSpeedMaxLive = 1'000'000'000;
inline constexpr std::int64_t kDeepSpeedMaxReuse = 1'000'000'000;

struct TrainingSetup {
    std::int64_t micro_batch = 1;
    std::int64_t seq_len = 4096;      // tokens per sequence (before sequence parallelism)
    std::int64_t grad_accum = 1;      // micro-steps per optimizer step
    bool padded = false;              // padded batches need a 4-D mask with eager attention; packed ones do not

    Precision precision = Precision::PureBf16;
    Optimizer optimizer = Optimizer::AdamW;
    std::optional<StateDtype> state_dtype;  // default: bf16 for PureBf16, fp32 otherwise
    bool optimizer_in_backward = false;     // step each parameter in its gradient hook
    OptimizerImpl optimizer_impl = OptimizerImpl::Fused;  // the HF Trainer's adamw_torch_fused, torchtitan's default

    Attention attention = Attention::Flash;

    std::int64_t mlp_chunks = 1;  // M_mlp; 1 = unchunked
    MlpImpl mlp_impl = MlpImpl::Loop;
    std::int64_t lm_chunks = 1;   // M_lm; 1 = unchunked (Hugging Face loss with fp32 upcast)
    LmHeadImpl lm_impl = LmHeadImpl::Recompute;

    Runtime runtime = Runtime::Hf;

    std::vector<bool> checkpoint;  // per decoder layer; empty = none
    bool offload_checkpoints = false;

    std::int64_t dp = 1;          // data-parallel degree
    int zero_stage = 0;           // 0..3 (3 = FSDP full shard)
    int zero3_prefetch = 1;       // layers all-gathered ahead under ZeRO-3
    // DeepSpeed's ZeRO 1/2 engine (the hf runtime): its gradient bucket in elements
    // (zero_optimization.reduce_bucket_size: DeepSpeed's default 5e8; the Hugging Face Trainer fills
    // "auto" with hidden_size^2). Anything else runs no DeepSpeed bucket and keeps the default.
    std::int64_t reduce_bucket_size = kDeepSpeedReduceBucket;
    // Its zero_optimization.overlap_comm (false, DeepSpeed's default for ZeRO 1/2): a second bucket,
    // the reductions on a side stream while backward runs, ZeRO-1's in the last micro-step's hooks.
    bool overlap_comm = false;
    // DeepSpeed's ZeRO-3 engine (the hf runtime): parameters of at most this many elements stay
    // gathered (stage3_param_persistence_threshold), and each module's fetch prefetches up to this
    // many elements of the parameters the trace uses next (stage3_prefetch_bucket_size).
    std::int64_t param_persistence_threshold = kDeepSpeedPersistence;
    std::int64_t prefetch_bucket_size = kDeepSpeedPrefetchBucket;
    std::int64_t sp = 1;          // sequence-parallel degree (Ulysses or ring attention: sp_impl)
    SpImpl sp_impl = SpImpl::Ulysses;
    // Expert parallelism (Mixture-of-Experts, kernels runtime): each rank of a group of ep, drawn
    // from the dp x sp ranks, holds E / ep experts; token-expert pairs travel to their expert's rank
    // and back by all-to-all. moe_imbalance: how many pairs the busiest rank's experts receive, as a
    // multiple of a uniform routing's (1: uniform, the default assumption; at most ep).
    std::int64_t ep = 1;
    double moe_imbalance = 1.0;
    // The hf runtime's ZeRO-3 as torch's FSDP2 (torch.distributed.fsdp.fully_shard on every decoder
    // layer, then on the model), not DeepSpeed's stage-3 engine: each rank holds a dim-0 shard of every
    // parameter, a layer's are all-gathered for its forward and again for its backward, and its
    // gradients leave it reduce-scattered (src/core/sim/fsdp2.cpp).
    bool fsdp2 = false;
    // FSDP2 under accumulation as the Hugging Face Trainer and accelerate's accumulate() run it:
    // set_requires_gradient_sync(False) before every micro-step but the last, so each layer's whole
    // gradients stay (accumulated in place) until the last micro-step's backward reduce-scatters them.
    // false: every micro-step reduce-scatters (a loop that leaves the sync on, or accelerate's
    // sync_each_batch).
    bool fsdp2_no_sync = false;
    // fully_shard(layer, reshard_after_forward=...) (accelerate's fsdp_reshard_after_forward): false keeps
    // each layer's parameters whole from its forward to its post-backward (no gathers in backward).
    bool fsdp2_reshard_after_forward = true;
    // Whose grouping (above); accelerate's applies reshard_after_forward to the embedding's group too, and its
    // bf16-master is the Trainer's bf16=True: accelerate's MixedPrecisionPolicy(bf16, bf16, output bf16).
    Fsdp2Groups fsdp2_groups = Fsdp2Groups::MstHf;
    // The forward called as the Hugging Face Trainer with bf16=True calls it (runtime hf): accelerate wraps
    // it in bf16 autocast and converts its bf16 outputs to fp32 after it (convert_outputs_to_fp32). With an
    // unchunked LM head that is an fp32 copy of the logits as the forward returns.
    bool hf_trainer_bf16 = false;
    // runtime hf: whose model code (above)
    ModelCode model_code = ModelCode::Transformers;

    StateDtype effective_state_dtype() const {
        return state_dtype.value_or(precision == Precision::PureBf16 ? StateDtype::Bf16 : StateDtype::Fp32);
    }
    bool checkpointed(std::int64_t layer) const {
        return layer >= 0 && static_cast<std::size_t>(layer) < checkpoint.size() && checkpoint[static_cast<std::size_t>(layer)];
    }
    std::int64_t checkpointed_count() const;
    std::int64_t tokens() const { return micro_batch * seq_len; }           // per data-parallel rank
    std::int64_t local_tokens() const { return micro_batch * seq_len / sp; } // per rank outside attention
    // The ranks ZeRO shards over and gradients are reduced across: every data- and sequence-parallel
    // rank (each trains different tokens). DeepSpeed's Ulysses mpu shards ZeRO over its sequence-data
    // -parallel group (deepspeed/utils/groups.py), torchtitan's FSDP over the dp_shard x cp mesh.
    std::int64_t zero_ranks() const { return dp * sp; }
    // The ranks holding the same experts: ZeRO shards the experts' parameters over them and their
    // gradients are reduced across them (DeepSpeed-MoE's expert-data-parallel group, torchtitan's
    // FSDP over dp_shard / ep).
    std::int64_t expert_data_ranks() const { return zero_ranks() / ep; }
    // The token-expert pairs one rank's experts receive when every rank sends `pairs`: all of them
    // with ep = 1 (every expert is local), else ceil(moe_imbalance x pairs).
    std::int64_t expert_rows(std::int64_t pairs) const;
    bool ring() const { return sp > 1 && sp_impl == SpImpl::Ring; }
    bool ulysses() const { return sp > 1 && sp_impl == SpImpl::Ulysses; }
    // ZeRO 1 or 2 in the hf runtime: DeepSpeed's engine (runtime/zero/stage_1_and_2.py), on one GPU
    // too (its flat buffers and gradient bucket are there whatever the ranks); with ZeRO 0 the hf
    // runtime's data parallelism is torch's DDP.
    bool deepspeed_zero() const { return runtime == Runtime::Hf && (zero_stage == 1 || zero_stage == 2); }
    // ZeRO-3 in the hf runtime: DeepSpeed's stage-3 engine (runtime/zero/stage3.py and its parameter
    // coordinator), over dp > 1 ranks.
    bool deepspeed_zero3() const { return runtime == Runtime::Hf && zero_stage == 3 && !fsdp2; }
    // FSDP2 in the hf runtime (fsdp2 above): zero_stage 3 over dp > 1 ranks.
    bool fsdp2_shards() const { return runtime == Runtime::Hf && fsdp2 && zero_stage == 3; }
    // ... accumulating with its gradient sync off but in the last micro-step (fsdp2_no_sync, several of them).
    bool fsdp2_unsynced() const { return fsdp2_shards() && fsdp2_no_sync && grad_accum > 1; }
    // FSDP2's reduce-scatter, bytes per element: fp32 under mst_hf.shard's bf16 policy (bf16-master), else bf16
    // (bf16 parameters without a policy; accelerate's policy reduces in bf16)
    int fsdp2_reduce_bytes() const {
        return precision == Precision::Bf16Master && fsdp2_groups == Fsdp2Groups::MstHf ? 4 : 2;
    }
    // The policy's output_dtype casts the model's outputs (its fp32 loss) to bf16: accelerate's policy under the
    // Trainer's bf16=True (accelerate's bf16-master; Axolotl's bf16: true)
    bool fsdp2_output_bf16() const {
        return (fsdp2_groups == Fsdp2Groups::Accelerate && precision == Precision::Bf16Master) ||
               fsdp2_groups == Fsdp2Groups::Axolotl;
    }
    // Axolotl's grouping reshards the model's own group after its forward (it passes reshard_after_forward to
    // fully_shard(model) too), so the loss's pre-backward gathers it again
    bool fsdp2_root_reshards() const { return fsdp2_groups == Fsdp2Groups::Axolotl && fsdp2_reshard_after_forward; }
    // accelerate's and torchtitan's groupings give an untied embedding a group of its own (a tied one is in the tail)
    bool fsdp2_embedding_alone(const ModelSpec& m) const {
        return (fsdp2_groups == Fsdp2Groups::Accelerate || titan()) && !m.tie_word_embeddings;
    }
    // torchtitan's own step (model_code torchtitan, runtime hf)
    bool titan() const { return runtime == Runtime::Hf && model_code == ModelCode::Torchtitan; }
    bool deepspeed_engine() const { return deepspeed_zero() || deepspeed_zero3(); }
    // DeepSpeed's engine options as DeepSpeed's defaults (the only values a setup without its engine has)
    bool deepspeed_defaults() const {
        return reduce_bucket_size == kDeepSpeedReduceBucket && !overlap_comm && zero3_defaults();
    }
    bool zero3_defaults() const {
        return param_persistence_threshold == kDeepSpeedPersistence && prefetch_bucket_size == kDeepSpeedPrefetchBucket;
    }
};

// Ring attention's ranks differ (head-tail sharding gives rank r chunks r and 2 sp - 1 - r; its
// steps after r are half-size merges, and which tensors stay contiguous follows), down to the
// caching allocator's blocks: the simulator walks every rank's step (0 .. sp - 1; empty without
// ring attention), a plan fits when each does, and its peaks are the highest of any.
std::vector<std::int64_t> ring_ranks(const TrainingSetup& setup);
// The ranks whose steps differ, each walked by the simulator: ring attention's (ring_ranks), or
// with DeepSpeed's ZeRO in the hf runtime the dp ranks (each owns another partition of the flat
// parameters: other gradients, reduced at other times, and another step), or with FSDP2 the first
// rank of each set whose shards are alike (a dimension that the ranks do not divide leaves the last
// ones shorter shards, or none); empty when all ranks are alike (or there is one).
std::vector<std::int64_t> walked_ranks(const TrainingSetup& setup, const ModelSpec& model);
// Whether `rank`'s step can be walked alone (estimate --rank, a measured rank): one of walked_ranks,
// DeepSpeed's one rank on one GPU, or any of DeepSpeed's ZeRO-3 or FSDP2's ranks.
bool walks_rank(const TrainingSetup& setup, const ModelSpec& model, std::int64_t rank);

// Checkpoint placement from a user's words: "none", "all", "every:K", "first:K",
// "last:K", "spread:K" (K layers evenly spaced) or a list "0,2,5-9".
std::vector<bool> parse_checkpoint_spec(const std::string& spec, std::int64_t num_layers, const std::string& where);
std::string describe_checkpoints(const std::vector<bool>& checkpoint);
// ", ep 8" (", ep 8, imbalance 1.25") with expert parallelism, else "".
std::string describe_expert_parallelism(const TrainingSetup& setup);
// ", reduce_bucket_size 4096, overlap_comm" with DeepSpeed's engine options other than its defaults, else "".
std::string describe_deepspeed(const TrainingSetup& setup);
// What follows "ZeRO N" in a summary: " as FSDP2" for torch's fully_shard, else describe_deepspeed.
std::string describe_sharding(const TrainingSetup& setup);
// The precision in a summary: "bf16-master", "pure-bf16 under the Trainer's bf16=True" (hf_trainer_bf16).
std::string describe_precision(const TrainingSetup& setup);
// Whose model code the step runs, in a summary: "torchtitan's model code (flex attention, FSDP2 on one GPU)"
// (or over dp GPUs) for model_code torchtitan, else the attention ("flash attention").
std::string describe_model_code(const TrainingSetup& setup);

// A knob a check refuses and what it expects (its UserError's field and message).
struct FieldRefusal {
    const char* field;
    std::string expected;
};
// Why `sp` ranks cannot split a sequence of seq_len tokens of `model` with this implementation
// (part of validate(); the tuner asks it of each degree it might search). A degree must be
// positive and divide the sequence; Ulysses' must divide the query and key heads; ring
// attention's at most limits::kRingRanks ranks cut it into 2 sp equal chunks.
std::optional<FieldRefusal> sp_refusal(const ModelSpec& model, SpImpl impl, std::int64_t sp, std::int64_t seq_len);

// Checks the setup against the model: one UserError naming the knob when it is impossible.
void validate(const TrainingSetup& setup, const ModelSpec& model);
// What ring attention can run (part of validate() when sp_impl is ring and sp > 1): the kernels
// runtime, plain causal flash attention, heads aten's flash kernel takes.
void validate_ring_scope(const TrainingSetup& s, const ModelSpec& m);
// What the hf runtime does not model yet (part of validate).
void validate_hf_scope(const TrainingSetup& s, const ModelSpec& m);
// What torchtitan's own step (model_code torchtitan) is modelled for (part of validate_hf_scope): the
// first knob outside it, or nothing (recommend --for torchtitan plans with torchtitan's code where it is).
std::optional<FieldRefusal> titan_scope_refusal(const TrainingSetup& s, const ModelSpec& m);
void validate_titan_scope(const TrainingSetup& s, const ModelSpec& m);
// What torch's FSDP2 is modelled for (part of validate_hf_scope when fsdp2): ZeRO 3 over 2 or more
// ranks, a dense model, bf16 or fp32 parameters (no amp), no fused SGD. The tuner probes it.
void validate_fsdp2_scope(const TrainingSetup& s, const ModelSpec& m);
// Why `s` cannot have hf_trainer_bf16 on `m` ("" when it can): not the hf runtime; DeepSpeed's engine or
// FSDP2, where accelerate prepares the model without its native amp; Qwen3-MoE and gpt-oss in bf16.
std::string hf_trainer_bf16_refusal(const TrainingSetup& s, const ModelSpec& m);
// What a model can be planned with whatever the knobs' bounds (gpt-oss's runtime and attention,
// grouped_mm's row alignment); part of validate(), and checked before a search.
void validate_model_scope(const TrainingSetup& s, const ModelSpec& m);

// Mini-sequence chunks: `chunks` parts of `tokens`, differing by at most one, the larger ones
// first, so no token is ever dropped. As groups of equal chunks (at most two: `count` chunks of
// `tokens` each), which is how loops that repeat a chunk's memory exactly should walk them, and
// one size per chunk for loops whose chunks each leave something behind.
struct ChunkGroup {
    std::int64_t tokens = 0;
    std::int64_t count = 0;
};
std::vector<ChunkGroup> chunk_groups(std::int64_t tokens, std::int64_t chunks);
std::vector<std::int64_t> chunk_sizes(std::int64_t tokens, std::int64_t chunks);

// The chunks of at most `chunk_tokens` (>= 1) tokens each that cover one rank's tokens
// (micro_batch x seq_len / sp): what mlp_chunk_tokens and lm_chunk_tokens mean.
std::int64_t chunks_for_tokens(const TrainingSetup& setup, std::int64_t chunk_tokens);

// The most MLP chunks validate() accepts for `model`: limits::kChunks, and at most
// limits::kLayerChunks chunks over all layers (the loop MLP keeps every chunk of every layer).
std::int64_t max_mlp_chunks(const ModelSpec& model);

// Chunk sizes a setup file gives in tokens (mlp_chunk_tokens, lm_chunk_tokens): the file's counts are
// converted with its own length and batch; a caller that changes those converts them again.
struct ChunkTokens {
    std::optional<std::int64_t> mlp, lm;
};

// Setup files (--setup FILE.json); the schema is in README.md.
// default_runtime: the runtime of a setup that names none (measure's executor: kernels).
TrainingSetup parse_setup(const nlohmann::json& j, const ModelSpec& model, const std::string& where,
                          Runtime default_runtime = Runtime::Hf, ChunkTokens* chunk_tokens = nullptr);
TrainingSetup load_setup_file(const std::string& path, const ModelSpec& model, Runtime default_runtime = Runtime::Hf,
                              ChunkTokens* chunk_tokens = nullptr);
nlohmann::json to_json(const TrainingSetup& s);

std::string to_string(Precision p);
std::string to_string(Optimizer o);
std::string to_string(StateDtype d);
std::string to_string(OptimizerImpl i);
std::string to_string(Runtime r);
std::string to_string(Attention a);
std::string to_string(MlpImpl i);
std::string to_string(LmHeadImpl i);
std::string to_string(SpImpl i);
std::string to_string(Fsdp2Groups g);
std::string to_string(ModelCode c);
Precision parse_precision(const std::string& s, const std::string& where);
Optimizer parse_optimizer(const std::string& s, const std::string& where);
StateDtype parse_state_dtype(const std::string& s, const std::string& where);
OptimizerImpl parse_optimizer_impl(const std::string& s, const std::string& where);
Runtime parse_runtime(const std::string& s, const std::string& where);
Attention parse_attention(const std::string& s, const std::string& where);
// The attention a runtime runs when the user names none: flash, except that transformers (runtime
// hf) runs gpt-oss eager, SDPA being unable to take its sinks.
Attention default_attention(const ModelSpec& m, Runtime runtime);
MlpImpl parse_mlp_impl(const std::string& s, const std::string& where);
LmHeadImpl parse_lm_impl(const std::string& s, const std::string& where);
SpImpl parse_sp_impl(const std::string& s, const std::string& where);
Fsdp2Groups parse_fsdp2_groups(const std::string& s, const std::string& where);
ModelCode parse_model_code(const std::string& s, const std::string& where);

}  // namespace mst
