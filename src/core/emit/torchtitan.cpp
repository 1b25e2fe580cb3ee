// torchtitan: mst_torchtitan.py, a config module for torchtitan 0.3.0.
//
// torchtitan 0.3.0 reads no TOML: a run is `--module M --config F` (F a function returning a
// Trainer.Config, found in M or M.config_registry) plus command-line overrides, so the plan
// becomes a module of our own whose mst_plan() starts from torchtitan's config for the model
// family and sets the plan's knobs (torchtitan/config/manager.py; the fields below are
// torchtitan/trainer.py's Trainer.Config and torchtitan/config/configs.py):
//   model_spec            the model flavor: torchtitan's own Llama-3 and Qwen3 code where one of
//                         its flavors has the plan's shape, else its transformers backend
//                         (experiments/transformers_modeling_backend, hf_model = the HF repo)
//   training              seq_len, local_batch_size, global_batch_size (gradient accumulation =
//                         global / (local x data-parallel degree)), dtype ("bfloat16": parameters,
//                         gradients and optimizer states in bf16; "float32" with
//                         mixed_precision_param "bfloat16": fp32 parameters, bf16 compute)
//   parallelism           data_parallel_replicate_degree (DDP), data_parallel_shard_degree (FSDP2),
//                         fsdp_reshard_after_forward, context_parallel_degree, expert_parallel_degree
//                         (the experts sharded over ep of the FSDP ranks, the rest of them sharding each
//                         expert: ParallelDims' efsdp = dp_shard / ep; tokens exchanged by all-to-all)
//   activation_checkpoint FullAC.Config() (every layer) or None: 0.3.0 wraps all blocks or none
//   loss                  ChunkedLossWrapper(num_chunks): LM head + loss per sequence chunk, each
//                         chunk's backward run in the forward (the plan's fused LM head)
//   optimizer             AdamW, implementation fused | foreach | for-loop
// and, for torchtitan's own models, each layer's RoPE restated from the plan model (theta, Llama-3
// scaling; the table lengthened past the flavor's) and its size per GPU (ROPE_TABLE_BYTES, which
// recommend --for torchtitan keeps free); every other degree 1, no compile, no CUDA graphs.
// What torchtitan cannot train as planned is refused (check_torchtitan), so `recommend --for
// torchtitan` never plans it: MLP mini-sequences, a recomputed chunked LM head, checkpoints of
// some layers or offloaded ones, sequence parallelism (its language models' context parallelism is
// FlexAttention over all-gathered K/V, not simulated), ZeRO-1, stepping in backward, SGD and 8-bit
// AdamW.
// scripts/check-clients loads every emitted module through torchtitan's own ConfigManager
// (python/mst_clients/titan.py).
#include <optional>
#include <sstream>

#include <fmt/format.h>

#include "emit/emitters.hpp"
#include "mst/error.hpp"
#include "mst/units.hpp"

namespace mst::emit_detail {

namespace {

constexpr const char* kWhere = "torchtitan";
constexpr const char* kVersion = "0.3.0";

// A model as torchtitan 0.3.0 builds it: its own code where a flavor has the plan's shape.
struct TitanModel {
    std::string package;      // torchtitan.models.llama3, ...
    std::string flavor;       // model_registry's key
    std::string base_config;  // the config_registry function mst_plan() starts from
    bool native = true;       // false: the transformers backend
    bool moe = false;
    std::int64_t rope_max = 0;  // the flavor's RoPE table: torchtitan refuses a longer seq_len
};

// A flavor's shape: every dimension that sets a parameter's size (a model matches only when all do).
struct Flavor {
    std::int64_t hidden, layers, heads, kv_heads, head_dim, intermediate;  // intermediate: each expert's for MoE
    bool tied;
    std::int64_t experts, top_k;  // 0 for a dense model
    const char* name;
    const char* base;
};

// torchtitan/models/llama3/__init__.py and models/qwen3/__init__.py (vocabularies 128256, 151936; no
// biases; Qwen3's query/key norms). scripts/check-clients builds each matched flavor on the meta
// device and compares its parameter count with the plan model's.
constexpr Flavor kLlama3[] = {
    {2048, 16, 32, 8, 64, 8192, true, 0, 0, "1B", "llama3_8b"},
    {3072, 28, 24, 8, 128, 8192, true, 0, 0, "3B", "llama3_8b"},
    {4096, 32, 32, 8, 128, 14336, false, 0, 0, "8B", "llama3_8b"},
    {8192, 80, 64, 8, 128, 28672, false, 0, 0, "70B", "llama3_70b"},
    {16384, 126, 128, 8, 128, 53248, false, 0, 0, "405B", "llama3_70b"},  // (llama3_405b's converters need torchao)
};
constexpr Flavor kQwen3[] = {
    {1024, 28, 16, 8, 128, 3072, true, 0, 0, "0.6B", "qwen3_0_6b"},
    {2048, 28, 16, 8, 128, 6144, true, 0, 0, "1.7B", "qwen3_1_7b"},
    {2560, 36, 32, 8, 128, 9728, true, 0, 0, "4B", "qwen3_1_7b"},
    {4096, 36, 32, 8, 128, 12288, false, 0, 0, "8B", "qwen3_14b"},
    {5120, 40, 40, 8, 128, 17408, false, 0, 0, "14B", "qwen3_14b"},
    {5120, 64, 64, 8, 128, 25600, false, 0, 0, "32B", "qwen3_32b"},
    {2048, 48, 32, 4, 128, 768, false, 128, 8, "30B-A3B", "qwen3_30b_a3b"},
    {4096, 94, 64, 4, 128, 1536, false, 128, 8, "235B-A22B", "qwen3_30b_a3b"},
};

template <std::size_t N>
std::optional<TitanModel> flavor_of(const Flavor (&flavors)[N], const ModelSpec& m, std::int64_t vocab,
                                    std::int64_t rope_max, const char* package) {
    // (a rotary scaling mst_plan() cannot restate in torchtitan's RoPE.Config: the backend's HF code)
    const std::string& rope = m.rope_scaling.type;
    if (m.vocab_size != vocab || m.qkv_bias || m.o_bias || m.mlp_bias || (rope != "default" && rope != "llama3"))
        return std::nullopt;
    const std::int64_t intermediate = m.moe ? m.moe->intermediate : m.intermediate_size;
    for (const Flavor& f : flavors)
        if (f.hidden == m.hidden_size && f.layers == m.num_layers && f.heads == m.num_heads &&
            f.kv_heads == m.num_kv_heads && f.head_dim == m.head_dim && f.intermediate == intermediate &&
            f.tied == m.tie_word_embeddings && f.experts == (m.moe ? m.moe->experts : 0) &&
            f.top_k == (m.moe ? m.moe->top_k : 0))
            return TitanModel{package, f.name, f.base, true, f.experts > 0, rope_max};
    return std::nullopt;
}

TitanModel titan_model(const ModelSpec& m) {
    std::optional<TitanModel> native;
    // (max_seq_len of every flavor's RoPE: 131072 for Llama-3, 40960 for Qwen3)
    if (m.family == Family::Llama) native = flavor_of(kLlama3, m, 128256, 131072, "torchtitan.models.llama3");
    if (m.family == Family::Qwen3 || m.family == Family::Qwen3Moe)
        native = flavor_of(kQwen3, m, 151936, 40960, "torchtitan.models.qwen3");
    if (native) return *native;
    return TitanModel{"torchtitan.experiments.transformers_modeling_backend", "full",
                      "transformers_modeling_backend_full", false, m.moe.has_value(), 0};
}

// The RoPE tables torchtitan's own model keeps: one per layer, of seq_len positions
// (models/common/rope.py): complex64 [S, head_dim / 2] for Llama-3, fp32 cos|sin [S, 2 head_dim]
// for Qwen3. The transformers backend computes its rotary embedding per forward instead.
bytes_t rope_table_bytes(const TitanModel& tm, const ModelSpec& m, std::int64_t seq_len) {
    if (!tm.native) return 0;
    const std::int64_t per_position = (m.family == Family::Llama ? 4 : 8) * m.head_dim;
    return checked_product({m.num_layers, seq_len, per_position}, "RoPE table bytes");
}

// "org/name" of a config.json downloaded from huggingface.co, or "".
std::string hf_repo(const ModelSpec& m) {
    const std::string prefix = "https://huggingface.co/";
    const std::string& url = m.source_url;
    if (url.rfind(prefix, 0) != 0) return "";
    const std::size_t org_end = url.find('/', prefix.size());
    if (org_end == std::string::npos) return "";
    const std::size_t name_end = url.find('/', org_end + 1);
    return url.substr(prefix.size(), (name_end == std::string::npos ? url.size() : name_end) - prefix.size());
}

// Printable text with quotes and backslashes escaped: safe inside any Python string literal, the
// module's docstring included (a plan's model or GPU name cannot close it).
std::string py_escaped(const std::string& text) {
    std::string out;
    for (char c : comment_line(text)) {
        if (c == '"' || c == '\\') out += '\\';
        out += c;
    }
    return out;
}

std::string py_string(const std::string& text) {
    // (appended piecewise: GCC 12's -Wrestrict misreads "\"" + std::string&& at -O3)
    std::string out = "\"";
    out += py_escaped(text);
    out += '"';
    return out;
}

// A Python float literal: 500000.0, 0.25.
std::string py_float(double x) {
    std::string out = fmt::format("{}", x);
    if (out.find_first_of(".en") == std::string::npos) out += ".0";
    return out;
}

// torchtitan's RoPE.Config fields (models/common/rope.py) for the model's own rotary embedding:
// theta, and Llama-3's scaling ("llama") or none; a table of `max_seq_len` positions when given.
std::string rope_fields(const ModelSpec& m, std::optional<std::int64_t> max_seq_len) {
    std::string out = "theta=" + py_float(m.rope_theta);
    if (m.rope_scaling.type == "llama3")
        out += fmt::format(", scaling=\"llama\", scaling_factor={}, low_freq_factor={}, high_freq_factor={}, "
                           "original_max_position_embeddings={}",
                           py_float(m.rope_scaling.factor), py_float(m.rope_scaling.low_freq_factor),
                           py_float(m.rope_scaling.high_freq_factor), m.rope_scaling.original_max_position_embeddings);
    else
        out += ", scaling=\"none\"";
    if (max_seq_len) out += fmt::format(", max_seq_len={}", *max_seq_len);
    return out;
}

void check(const TrainingSetup& s, const ModelSpec& model) {
    const bool native = titan_model(model).native;
    if (!native && hf_repo(model).empty())
        fail(kWhere, "model",
             fmt::format("expected a model whose config.json names its Hugging Face repository (\"_mst\": {{\"source\": "
                         "\"https://huggingface.co/ORG/NAME/...\"}}): torchtitan's transformers backend loads {} by "
                         "that name",
                         model.model_type));
    // What torchtitan 0.3.0's transformers backend cannot build, by its own exceptions in
    // parallelize_hf_transformers (run by the referee: python/mst_referee/titan.py): Gemma's scaled embedding takes
    // `input_ids` where the sharding config it is given names `input`; Phi-3's fused qkv_proj is no projection
    // hf_sharding.py recognises.
    if (model.family == Family::Gemma2 || model.family == Family::Gemma3)
        fail(kWhere, "model",
             fmt::format("expected a model torchtitan 0.3.0 can parallelize; its transformers backend cannot build {} "
                         "(AssertionError: {}ScaledWordEmbedding: local_map is set but in_dst_shardings is missing "
                         "entries for: ['input_ids'])",
                         model.model_type, model.family == Family::Gemma2 ? "Gemma2Text" : "Gemma3Text"));
    if (model.family == Family::Phi3)
        fail(kWhere, "model",
             "expected a model torchtitan 0.3.0 can parallelize; its transformers backend cannot build phi3 (ValueError: "
             "Phi3Attention: no recognized query projection: the fused qkv_proj)");
    // The backend swaps in torchtitan's MoE inside parallelize, outside the trainer's training.dtype default: its
    // experts are fp32 beside the layer's bf16 weights, and FSDP2 refuses the layer on the first forward.
    if (!native && model.moe && s.precision == Precision::PureBf16)
        fail(kWhere, "setup.precision",
             fmt::format("expected fp32 parameters (bf16-master or amp) for {} through torchtitan 0.3.0's transformers "
                         "backend: it builds its MoE in fp32 beside the bf16 layers of training.dtype bfloat16, and "
                         "FSDP2 refuses the mix (AssertionError: FSDP expects uniform original parameter dtype), got "
                         "pure-bf16",
                         model.name));
    if (s.optimizer != Optimizer::AdamW)
        fail(kWhere, "setup.optimizer",
             fmt::format("expected adamw (mst-plan emits torchtitan's AdamW param group only), got {}", to_string(s.optimizer)));
    if (s.optimizer_in_backward)
        fail(kWhere, "setup.optimizer_in_backward", "expected false (torchtitan 0.3.0 steps after backward), got true");
    if (s.precision == Precision::PureBf16 && s.effective_state_dtype() != StateDtype::Bf16)
        fail(kWhere, "setup.optimizer_state_dtype",
             "expected bf16 with precision pure-bf16 (training.dtype bfloat16 keeps the optimizer states in bf16), got fp32");
    if (s.precision != Precision::PureBf16 && s.effective_state_dtype() != StateDtype::Fp32)
        fail(kWhere, "setup.optimizer_state_dtype",
             "expected fp32 with fp32 parameters (torchtitan's AdamW states follow them), got bf16");
    if (s.mlp_chunks > 1)
        fail(kWhere, "setup.mlp_chunks",
             fmt::format("expected 1 (torchtitan has no MLP mini-sequences), got {}", s.mlp_chunks));
    if (s.lm_chunks > 1 && s.lm_impl != LmHeadImpl::FusedForward)
        fail(kWhere, "setup.lm_impl",
             "expected fused with lm_chunks > 1 (torchtitan's ChunkedLossWrapper runs each chunk's backward in the "
             "forward), got recompute");
    // (ChunkedLossWrapper splits each rank's sequence evenly: torch._check(seq_len % num_chunks == 0))
    if (s.lm_chunks > 1 && (s.seq_len / s.sp) % s.lm_chunks != 0)
        fail(kWhere, "setup.lm_chunks",
             fmt::format("expected a divisor of each rank's sequence ({} tokens; torchtitan's chunked loss splits it "
                         "evenly), got {}",
                         s.seq_len / s.sp, s.lm_chunks));
    if (s.lm_chunks > 1 && !native)
        fail(kWhere, "setup.lm_chunks",
             fmt::format("expected 1 for {} (torchtitan chunks the loss of its own Llama-3 and Qwen3 code only; this "
                         "model runs through its transformers backend), got {}",
                         model.model_type, s.lm_chunks));
    const std::int64_t k = s.checkpointed_count();
    if (k != 0 && k != model.num_layers)
        fail(kWhere, "setup.checkpoint",
             fmt::format("expected none or all {} layers (torchtitan 0.3.0 checkpoints every block or none), got {}",
                         model.num_layers, k));
    if (s.offload_checkpoints)
        fail(kWhere, "setup.offload_checkpoints", "expected false (torchtitan has no activation offload), got true");
    if (s.sp > 1)
        fail(kWhere, "setup.sp",
             fmt::format("expected 1 (torchtitan 0.3.0's language models run context parallelism as FlexAttention over "
                         "all-gathered keys and values, which mst-plan does not simulate yet: neither Ulysses nor "
                         "sp_impl ring, PyTorch's SDPA ring), got {}",
                         s.sp));
    // torchtitan's experts are sharded over ep ranks taken from the FSDP ones (ParallelDims: efsdp = dp_shard / ep)
    if (s.ep > 1 && (s.zero_stage == 0 || s.dp % s.ep != 0))
        fail(kWhere, "setup.ep",
             fmt::format("expected 1 without FSDP (torchtitan takes its expert-parallel ranks from the sharding ones, "
                         "data_parallel_shard_degree, which ZeRO 0 leaves at 1), got {}",
                         s.ep));
    if (s.zero_stage == 1 && s.zero_ranks() > 1)
        fail(kWhere, "setup.zero_stage",
             "expected 0, 2 or 3 (FSDP2 shards gradients with the optimizer states: there is no ZeRO-1), got 1");
    // The hf runtime plans torchtitan's data parallelism with torchtitan's own model code (its step, titan.cpp)
    // only: with transformers' code its several ranks are torch's DDP, DeepSpeed's engine or python/mst_hf's
    // fully_shard, not torchtitan's FSDP2 (the kernels runtime's ranks are mst-plan's own, which a caution says).
    if (s.runtime == Runtime::Hf && !s.titan() && (s.fsdp2 || s.dp > 1)) {
        TrainingSetup own = s;
        own.model_code = ModelCode::Torchtitan;
        if (const auto outside = titan_scope_refusal(own, model)) fail(kWhere, std::string("setup.") + outside->field, outside->expected);
        fail(kWhere, "setup.model_code",
             "expected torchtitan with runtime hf over several GPUs (torchtitan's FSDP2 is modelled with its own model "
             "code; transformers' there is torch's DDP, DeepSpeed's engine or python/mst_hf's fully_shard: emit --format "
             "hf-mst or deepspeed), got transformers");
    }
}

}  // namespace

void check_torchtitan(const TrainingSetup& s, const ModelSpec& model) { check(s, model); }

bytes_t torchtitan_extra_bytes(const TrainingSetup& s, const ModelSpec& model) {
    if (s.titan()) return 0;  // (torchtitan's own step holds them: its prediction counts them)
    return rope_table_bytes(titan_model(model), model, s.seq_len);  // positions, whatever the micro-batch
}

std::vector<EmittedFile> emit_torchtitan(const Plan& plan, const ModelSpec& model) {
    const TrainingSetup& s = plan.setup;
    check(s, model);
    const TitanModel tm = titan_model(model);
    const std::string repo = hf_repo(model);
    const std::string assets = "./assets/hf/" + (repo.empty() ? model.name : repo.substr(repo.find('/') + 1));

    std::vector<std::string> notes;
    if (s.precision == Precision::Bf16Master && !s.titan())  // (torchtitan's own step is predicted as it runs)
        notes.push_back("The plan keeps bf16 weights next to fp32 masters; torchtitan keeps only the fp32 parameters "
                        "and casts them to bf16 for compute (FSDP2's mixed precision, or autocast without FSDP): "
                        "memory at or below the prediction.");
    if (s.zero_stage == 2 && s.zero_ranks() > 1)
        notes.push_back("ZeRO-2 is FSDP2 without resharding after forward: each block keeps its gathered parameters "
                        "from forward to backward, gradients and optimizer states stay sharded.");
    if (s.attention == Attention::Eager)
        notes.push_back("The plan assumes eager attention; torchtitan uses SDPA/flex attention, which never holds the "
                        "S x S scores: memory at or below the prediction.");
    const bool longer_rope = tm.native && s.seq_len > tm.rope_max;
    if (longer_rope)
        notes.push_back(fmt::format("{} tokens exceed the flavor's RoPE table ({} positions), which torchtitan "
                                    "refuses: mst_plan() lengthens the table, the frequencies stay the model's.",
                                    s.seq_len, tm.rope_max));
    const bytes_t rope_bytes = rope_table_bytes(tm, model, s.seq_len);
    if (rope_bytes > 0 && s.titan())
        notes.push_back(fmt::format("torchtitan keeps a RoPE table of seq_len positions in every layer ({} per GPU, "
                                    "ROPE_TABLE_BYTES below): the prediction above, torchtitan's own step, holds them.",
                                    format_bytes(rope_bytes)));
    else if (rope_bytes > 0)
        notes.push_back(fmt::format("torchtitan keeps a RoPE table of seq_len positions in every layer ({} per GPU, "
                                    "ROPE_TABLE_BYTES below), which mst-plan's runtime does not: recommend --for "
                                    "torchtitan keeps that much of the budget free; the prediction above is without it.",
                                    format_bytes(rope_bytes)));
    if (!tm.native)
        notes.push_back(fmt::format("{} has no torchtitan model of its own: it runs through torchtitan's transformers "
                                    "backend (an experiment), which builds it from its Hugging Face config.",
                                    model.model_type));
    if (const std::string unmodelled = unmodelled_trainer("torchtitan", s, model); !unmodelled.empty())
        notes.push_back(unmodelled);

    std::ostringstream py;
    py << "\"\"\"";
    for (const auto& line : plan_header(plan)) py << py_escaped(line) << "\n";
    py << "\ntorchtitan " << kVersion << " config (https://github.com/pytorch/torchtitan/tree/v" << kVersion
       << "): from the directory holding this file, with the model's tokenizer in " << py_escaped(assets) << "\n"
       << "    PYTHONPATH=. torchrun --nproc_per_node=" << plan.gpus
       << " -m torchtitan.train --module mst_torchtitan --config mst_plan\n"
       << "(over several nodes: torchrun's --nnodes and --rdzv options; torchtitan options after these override "
          "the file).\n";
    for (const auto& n : notes) {
        py << "\n";
        for (const auto& line : comment_lines(n)) py << py_escaped(line) << "\n";
    }
    py << "\"\"\"\n\n";
    if (tm.native) py << "import dataclasses\n\n";
    py << "from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss\n"
       << "from torchtitan.distributed.activation_checkpoint import FullAC\n";
    if (!tm.native && tm.moe)
        py << "from torchtitan.experiments.transformers_modeling_backend import HFTransformerModel, TitanMoeModelConfig\n";
    py << "from " << tm.package << " import model_registry\n"
       << "from " << tm.package << ".config_registry import " << tm.base_config << " as base_config\n\n";
    if (rope_bytes > 0)
        py << "ROPE_TABLE_BYTES = " << rope_bytes << "  # per GPU, " << (s.titan() ? "within" : "beyond") << " the prediction\n";
    py << "\n"
       << "def mst_plan():\n"
       << "    config = base_config()\n";
    if (!tm.native && tm.moe) {
        py << "    # every field None: the Hugging Face config's experts, not another model's\n"
           << "    config.model_spec = model_registry(\"full_moe\")\n"
           << "    config.model_spec.model = HFTransformerModel.Config(model_config=TitanMoeModelConfig())\n";
    } else {
        py << "    config.model_spec = model_registry(" << py_string(tm.flavor) << ")\n";
    }
    if (!tm.native) py << "    config.hf_model = " << py_string(repo) << "\n";
    py << "    config.hf_assets_path = " << py_string(assets) << "\n"
       << "    config.training.seq_len = " << s.seq_len << "\n";
    if (tm.native)
        py << "    # the model's rotary embedding (the flavor's may differ: Llama-3.2 scales by 32, Llama-3 not at all)"
           << (longer_rope ? fmt::format(", its table lengthened past the flavor's {} positions", tm.rope_max) : "")
           << "\n"
           << "    for layer in config.model_spec.model.layers:\n"
           << "        layer.attention.rope = dataclasses.replace(layer.attention.rope, "
           << rope_fields(model, longer_rope ? std::optional<std::int64_t>(s.seq_len) : std::nullopt) << ")\n";
    py << "    config.training.local_batch_size = " << s.micro_batch << "\n"
       << "    # gradient accumulation " << s.grad_accum << " = global / (local x data-parallel degree " << s.dp << ")\n"
       << "    config.training.global_batch_size = " << s.micro_batch * s.grad_accum * s.dp << "\n"
       << "    config.training.dtype = " << (s.precision == Precision::PureBf16 ? "\"bfloat16\"" : "\"float32\"") << "\n"
       << "    config.training.mixed_precision_param = \"bfloat16\"\n"
       << "    config.parallelism.data_parallel_replicate_degree = " << (s.zero_stage == 0 ? s.dp : 1) << "\n"
       << "    config.parallelism.data_parallel_shard_degree = " << (s.zero_stage == 0 ? 1 : s.dp) << "\n"
       << "    config.parallelism.context_parallel_degree = 1\n"
       << "    config.parallelism.expert_parallel_degree = " << s.ep << "\n"
       << "    # every degree the plan has none of (llama3_70b's base config sets tensor parallel 8)\n"
       << "    config.parallelism.tensor_parallel_degree = 1\n"
       << "    config.parallelism.pipeline_parallel_degree = 1\n"
       << "    config.training.enable_cpu_offload = False\n"
       << "    config.compile.enable = False  # the prediction is of eager PyTorch\n"
       << "    config.training.disable_cuda_graphs = True  # (a captured step keeps its own memory pool)\n";
    // ("never": ZeRO 2's layout, or the hf runtime's fsdp2 kept gathered from forward to backward)
    if (s.zero_stage > 0)
        py << "    config.parallelism.fsdp_reshard_after_forward = "
           << (s.zero_stage == 3 && s.fsdp2_reshard_after_forward ? "\"default\"" : "\"never\"") << "\n";
    py << "    config.activation_checkpoint = " << (s.checkpointed_count() > 0 ? "FullAC.Config()" : "None") << "\n";
    const std::string loss_fn = tm.native ? "CrossEntropyLoss.Config(global_vocab_size=" + std::to_string(model.vocab_size) + ")"
                                          : "CrossEntropyLoss.Config()";
    if (s.lm_chunks > 1)
        py << "    config.loss = ChunkedLossWrapper.Config(num_chunks=" << s.lm_chunks << ", loss_fn=" << loss_fn << ")\n";
    else
        py << "    config.loss = " << loss_fn << "\n";
    py << "    config.optimizer.implementation = " << py_string(to_string(s.optimizer_impl)) << "\n"
       << "    return config\n";
    return {{"mst_torchtitan.py", py.str()}};
}

}  // namespace mst::emit_detail

namespace mst {

bool torchtitan_llama3(const ModelSpec& model) {
    const emit_detail::TitanModel tm = emit_detail::titan_model(model);
    return tm.native && tm.package == "torchtitan.models.llama3";
}

}  // namespace mst
