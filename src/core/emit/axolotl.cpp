// axolotl: axolotl.yaml, a fragment to merge into an Axolotl config, plus
// ds_config.json (the deepspeed emitter's) when the plan needs DeepSpeed.
//
// Keys: https://docs.axolotl.ai/docs/config-reference.html, generated from
// src/axolotl/utils/schemas/config.py (sequence_len, micro_batch_size,
// gradient_accumulation_steps, bf16, flash_attention / eager_attention,
// gradient_checkpointing(_kwargs), activation_offloading, context_parallel_size,
// tiled_mlp(_num_shards), plugins, deepspeed, optimizer, sample_packing,
// pad_to_sequence_len). Also:
//  * docs/gradient_checkpointing.qmd: activation_offloading needs
//    gradient_checkpointing: true.
//  * docs/sequence_parallelism.qmd: context_parallel_size is the current name of
//    sequence_parallel_degree (validation migrates the old key); under deepspeed:
//    it maps to DeepSpeed Ulysses (ALST); it needs flash attention.
//  * docs/custom_integrations.qmd: Liger (axolotl.integrations.liger.LigerPlugin,
//    liger_fused_linear_cross_entropy) and Cut Cross Entropy
//    (axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin, cut_cross_entropy).
//  * Optimizer names are the Hugging Face Trainer's (adamw_torch_fused,
//    adamw_bnb_8bit, sgd); its sgd is torch.optim.SGD without momentum.
//  * normalize_config: bf16: true loads the weights in bf16 (torch_dtype), so
//    "pure-bf16" is bf16 alone and fp32 master weights come from DeepSpeed's bf16 optimizer.
#ifdef MST_NO_YAML
// Built without yaml-cpp (cmake/deps.cmake, MST_WITH_YAML): the format is unavailable.
#include "emit/emitters.hpp"
#include "mst/error.hpp"

namespace mst::emit_detail {
std::vector<EmittedFile> emit_axolotl(const Plan&, const ModelSpec&) {
    throw UserError("axolotl: format: this mst-plan was built without yaml-cpp; rebuild with yaml-cpp for axolotl.yaml");
}
}  // namespace mst::emit_detail
#else
#include <stdexcept>

#include <yaml-cpp/yaml.h>

#include <fmt/format.h>

#include "emit/emitters.hpp"
#include "mst/error.hpp"

namespace mst::emit_detail {

namespace {

constexpr const char* kWhere = "axolotl";

std::string joined(const std::vector<std::string>& lines) {
    std::string out;
    for (const auto& l : lines) out += (out.empty() ? "" : "\n") + l;
    return out;
}

// A comment on lines of its own before the next key.
void note(YAML::Emitter& e, const std::string& text) { e << YAML::Newline << YAML::Comment(joined(comment_lines(text))); }

// Refuses what Axolotl cannot train as planned (see include/mst/emit.hpp).
void check(const TrainingSetup& s, bool deepspeed) {
    if (s.precision == Precision::AmpFp32)
        fail(kWhere, "setup.precision",
             "expected pure-bf16 or bf16-master (with bf16: true Axolotl loads the weights in bf16; it has no "
             "fp32-weights-with-bf16-autocast mode), got amp");
    if (s.optimizer_in_backward)
        fail(kWhere, "setup.optimizer_in_backward",
             "expected false (the Hugging Face Trainer steps the optimizer after backward), got true");
    if (s.sp > 1 && s.attention == Attention::Eager)
        fail(kWhere, "setup.attention",
             "expected flash with sp > 1 (Axolotl's context parallelism needs flash attention), got eager");
    if (deepspeed) return;  // ds_config.json holds the optimizer; the deepspeed emitter checks it
    if (s.optimizer == Optimizer::SgdMomentum)
        fail(kWhere, "setup.optimizer",
             "expected adamw or adamw-8bit without DeepSpeed (the Hugging Face Trainer's sgd has no momentum; the "
             "plan's sgd keeps a momentum buffer), got sgd");
    if (s.optimizer == Optimizer::AdamW && s.effective_state_dtype() == StateDtype::Fp32)
        fail(kWhere, "setup.optimizer_state_dtype",
             "expected bf16 with pure-bf16 weights and no DeepSpeed (torch optimizers keep states in the weights' "
             "dtype), got fp32");
}

std::string optimizer_name(Optimizer o) {
    switch (o) {
        case Optimizer::AdamW: return "adamw_torch_fused";
        case Optimizer::AdamW8bit: return "adamw_bnb_8bit";
        case Optimizer::SgdMomentum: return "sgd";
    }
    return "";
}

// Only DeepSpeed gives an Axolotl run ZeRO sharding or fp32 master weights next to bf16 ones.
bool needs_deepspeed(const TrainingSetup& s) { return s.zero_stage > 0 || s.precision == Precision::Bf16Master; }

}  // namespace

void check_axolotl(const TrainingSetup& s, const ModelSpec& model) {
    check(s, needs_deepspeed(s));
    if (needs_deepspeed(s)) check_deepspeed(s, model);
}

std::vector<EmittedFile> emit_axolotl(const Plan& plan, const ModelSpec& model) {
    const TrainingSetup& s = plan.setup;
    const bool deepspeed = needs_deepspeed(s);
    check(s, deepspeed);
    std::vector<EmittedFile> files;
    if (deepspeed) files = emit_deepspeed(plan, model);  // refuses what DeepSpeed cannot do
    const bool ds_has_optimizer = deepspeed && s.optimizer != Optimizer::AdamW8bit;

    YAML::Emitter e;
    std::vector<std::string> header;
    for (const auto& line : plan_header(plan)) header.push_back(comment_line(line));
    header.push_back("Fragment of an Axolotl config: merge these keys into yours, which keeps base_model, datasets,");
    header.push_back("learning rate... Keys: https://docs.axolotl.ai/docs/config-reference.html");
    e << YAML::Comment(joined(header));
    e << YAML::BeginMap;
    e << YAML::Key << "sequence_len" << YAML::Value << s.seq_len;
    e << YAML::Key << "micro_batch_size" << YAML::Value << s.micro_batch;
    e << YAML::Key << "gradient_accumulation_steps" << YAML::Value << s.grad_accum;
    // Every micro-batch holds seq_len tokens, as the plan assumes: packed, or padded.
    e << YAML::Key << "sample_packing" << YAML::Value << !s.padded;
    e << YAML::Key << "pad_to_sequence_len" << YAML::Value << true;
    if (s.precision == Precision::Bf16Master)
        note(e, "bf16 weights for compute; the fp32 master weights and optimizer states are DeepSpeed's "
                "(bf16 in ds_config.json).");
    e << YAML::Key << "bf16" << YAML::Value << true;
    e << YAML::Key << (s.attention == Attention::Flash ? "flash_attention" : "eager_attention") << YAML::Value << true;

    const std::int64_t checkpointed = s.checkpointed_count();
    if (checkpointed > 0 && checkpointed < model.num_layers)
        note(e, fmt::format("The plan checkpoints {}. Axolotl has no per-layer placement, so every layer is "
                            "checkpointed: less memory than predicted, {} more layer recomputes per micro-step.",
                            describe_placement(s, model), model.num_layers - checkpointed));
    e << YAML::Key << "gradient_checkpointing" << YAML::Value << (checkpointed > 0);
    if (checkpointed > 0)
        e << YAML::Key << "gradient_checkpointing_kwargs" << YAML::Value << YAML::BeginMap << YAML::Key
          << "use_reentrant" << YAML::Value << false << YAML::EndMap;
    if (s.offload_checkpoints) {
        note(e, "Offloads what checkpointed layers save (their inputs) to host memory. Newer Axolotl also has "
                "activation_offloading: hidden_states, which moves exactly the checkpoint inputs.");
        e << YAML::Key << "activation_offloading" << YAML::Value << true;
    }
    if (s.sp > 1) e << YAML::Key << "context_parallel_size" << YAML::Value << s.sp;

    if (s.mlp_chunks > 1) {
        if (s.mlp_impl == MlpImpl::Loop)
            note(e, fmt::format("The plan splits the MLP into {} mini-sequences with the MsT loop. Axolotl has ALST "
                                "TiledMLP, which keeps only each chunk's input and recomputes it in backward: "
                                "memory at or below the prediction.",
                                s.mlp_chunks));
        e << YAML::Key << "tiled_mlp" << YAML::Value << true;
        e << YAML::Key << "tiled_mlp_num_shards" << YAML::Value << s.mlp_chunks;
    }
    if (s.lm_chunks > 1) {
        const bool fused = s.lm_impl == LmHeadImpl::FusedForward;
        note(e, fused ? fmt::format("The plan computes the LM-head gradient in forward over {} mini-sequences: "
                                    "Liger's fused linear cross-entropy does that and picks its own chunk size.",
                                    s.lm_chunks)
                      : fmt::format("The plan recomputes the logits in {} mini-sequences. Cut Cross Entropy never "
                                    "materialises them: memory at or below the prediction.",
                                    s.lm_chunks));
        const char* plugin = fused ? "axolotl.integrations.liger.LigerPlugin"
                                   : "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin";
        e << YAML::Key << "plugins" << YAML::Value << YAML::BeginSeq << plugin << YAML::EndSeq;
        e << YAML::Key << (fused ? "liger_fused_linear_cross_entropy" : "cut_cross_entropy") << YAML::Value << true;
    }

    if (ds_has_optimizer) note(e, "ds_config.json's optimizer block takes precedence; this names the same one.");
    e << YAML::Key << "optimizer" << YAML::Value << optimizer_name(s.optimizer);
    if (deepspeed) {
        note(e, "Written next to this file by mst-plan emit --out; the path is relative to where axolotl is launched.");
        e << YAML::Key << "deepspeed" << YAML::Value << "ds_config.json";
    }
    e << YAML::EndMap;
    if (!e.good()) throw std::logic_error("axolotl emitter: " + e.GetLastError());

    files.insert(files.begin(), {"axolotl.yaml", std::string(e.c_str()) + "\n"});
    return files;
}

}  // namespace mst::emit_detail
#endif  // MST_NO_YAML
