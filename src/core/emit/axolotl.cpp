// axolotl: axolotl.yaml, a fragment to merge into an Axolotl 0.21.0 config, plus
// ds_config.json (the deepspeed emitter's) when the plan needs DeepSpeed.
//
// Keys, as Axolotl 0.21.0's schema (src/axolotl/utils/schemas/config.py) reads them and
// scripts/check-clients runs them through its loader (python/mst_clients/axolotl_check.py):
//  * attn_implementation: flash_attention_2 | eager. The boolean flash_attention /
//    eager_attention keys are deprecated (normalize_attn_implementation maps them).
//  * activation_offloading: hidden_states offloads the input of every checkpointed layer
//    (monkeypatch/checkpoint_activation_offload.py), the plan's offload; `true` is TRL's
//    stream offloader of every saved tensor instead. Non-reentrant checkpointing offloads them
//    through a saved-tensors hook, reentrant through patch_hidden_states_offload (loaders/model.py).
//  * gradient_checkpointing_kwargs use_reentrant: what normalize_config picks when it is unset,
//    written out: false, except under DeepSpeed ZeRO-3, where non-reentrant recompute meets the
//    partitioned parameters and raises a CheckpointError (its comment there).
//  * context_parallel_size: with `deepspeed:` set it becomes accelerate's DeepSpeed Ulysses
//    axis (utils/distributed.py _get_parallel_config_kwargs: sp_size, sp_backend deepspeed,
//    the other ranks dp_replicate_size), which the plan models. Without DeepSpeed it is the
//    ringmaster plugin's Ulysses/ring/USP choice, so a plan with sp > 1 always ships DeepSpeed.
//  * tiled_mlp(_num_shards), plugins, deepspeed, optimizer (the Hugging Face Trainer's names:
//    adamw_torch_fused, adamw_bnb_8bit, sgd; its sgd is torch.optim.SGD without momentum),
//    sample_packing, pad_to_sequence_len, gradient_checkpointing(_kwargs).
//  * multipack_real_batches: true keeps a packed micro-batch [micro_batch_size, sequence_len];
//    unset, flash attention packs it into one row of micro_batch_size x sequence_len tokens
//    (core/builders/causal.py, AxolotlTrainer's multipack sampler), which DeepSpeed Ulysses,
//    built for micro_batch_size rows, refuses.
//  * tiled_mlp patches the dense {Prefix}MLP class (monkeypatch/tiled_mlp/patch.py): refused for
//    Mixture-of-Experts models. activation_offloading: hidden_states offloads every checkpointed
//    layer's input and Axolotl checkpoints every layer: offload needs every layer checkpointed.
//  * Liger (axolotl.integrations.liger.LigerPlugin, liger_fused_linear_cross_entropy) comes with
//    Axolotl; Cut Cross Entropy (axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin)
//    needs Axolotl's fork of cut-cross-entropy, installed apart (its plugin's _CCE_INSTALL_MESSAGE).
//  * normalize_config: bf16: true loads the weights in bf16 (torch_dtype), so "pure-bf16" is bf16
//    alone and fp32 master weights come from DeepSpeed's bf16 optimizer.
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
constexpr const char* kVersion = "0.21.0";
constexpr const char* kCceInstall =
    "pip uninstall -y cut-cross-entropy && pip install \"cut-cross-entropy[transformers] @ "
    "git+https://github.com/axolotl-ai-cloud/ml-cross-entropy.git@v0.1.1\"";

std::string joined(const std::vector<std::string>& lines) {
    std::string out;
    for (const auto& l : lines) out += (out.empty() ? "" : "\n") + l;
    return out;
}

// A comment on lines of its own before the next key.
void note(YAML::Emitter& e, const std::string& text) { e << YAML::Newline << YAML::Comment(joined(comment_lines(text))); }

// Refuses what Axolotl cannot train as planned (see include/mst/emit.hpp).
void check(const TrainingSetup& s, const ModelSpec& model, bool deepspeed) {
    if (s.precision == Precision::AmpFp32)
        fail(kWhere, "setup.precision",
             "expected pure-bf16 or bf16-master (with bf16: true Axolotl loads the weights in bf16; it has no "
             "fp32-weights-with-bf16-autocast mode), got amp");
    if (s.optimizer_in_backward)
        fail(kWhere, "setup.optimizer_in_backward",
             "expected false (the Hugging Face Trainer steps the optimizer after backward), got true");
    if (s.sp > 1 && s.attention != Attention::Flash)
        fail(kWhere, "setup.attention",
             fmt::format("expected flash with sp > 1 (Axolotl runs context_parallel_size as DeepSpeed Ulysses, which needs "
                         "flash attention), got {}",
                         to_string(s.attention)));
    // Packed samples reach sdpa with a mask that keeps them apart, which sends it to another kernel
    // (and an [S, S] mask): the plan's sdpa is PyTorch's flash kernel on unmasked causal attention.
    if (s.attention == Attention::Sdpa && !s.padded)
        fail(kWhere, "setup.attention",
             "expected flash or eager with packed samples (sample_packing keeps the sequences of a row apart with a "
             "mask, and sdpa then runs another kernel than the flash one planned), got sdpa");
    // patch_tiled_mlp (monkeypatch/tiled_mlp/patch.py) replaces the model's dense {Prefix}MLP
    // class: Mixtral has none (model load fails), Qwen3-MoE's experts never use it.
    if (s.mlp_chunks > 1 && model.moe)
        fail(kWhere, "setup.mlp_chunks",
             fmt::format("expected 1 for a Mixture-of-Experts model (Axolotl's tiled_mlp tiles the dense MLP class, "
                         "not the experts), got {}",
                         s.mlp_chunks));
    // activation_offloading: hidden_states offloads the input of every checkpointed layer, and
    // Axolotl checkpoints every layer: with fewer planned, host memory would exceed the plan's.
    const std::int64_t checkpointed = s.checkpointed_count();
    if (s.offload_checkpoints && checkpointed > 0 && checkpointed < model.num_layers)  // (0: no offload)
        fail(kWhere, "setup.checkpoint",
             fmt::format("expected all {} layers with offload_checkpoints (Axolotl checkpoints every layer and "
                         "offloads each one's input), got {}",
                         model.num_layers, checkpointed));
    // Axolotl's own FSDP2 (fsdp2_groups axolotl): its TiledMLP ends its tile loop with reshard() on the decoder
    // layer's FSDP module (monkeypatch/tiled_mlp/base.py _defer_fsdp2_reshard), in the middle of the layer's
    // backward; and its Trainer syncs the gradients in the last micro-step only (accelerate's no_sync).
    if (s.fsdp2 && s.mlp_chunks > 1)
        fail(kWhere, "setup.mlp_chunks",
             fmt::format("expected 1 with fsdp2 (Axolotl 0.21's tiled_mlp reshards the whole decoder layer as its tile "
                         "loop ends, before attention's backward reads the layer's weights), got {}",
                         s.mlp_chunks));
    if (s.fsdp2 && s.grad_accum > 1 && !s.fsdp2_no_sync)
        fail(kWhere, "setup.fsdp2_no_sync",
             "expected true with fsdp2 and grad_accum > 1 (Axolotl's Trainer syncs FSDP2's gradients in the last "
             "micro-step only, accelerate's no_sync: plan with --fsdp2-no-sync), got false");
    if (deepspeed) return;  // ds_config.json holds the optimizer; the deepspeed emitter checks it
    if (s.optimizer == Optimizer::SgdMomentum)
        fail(kWhere, "setup.optimizer",
             "expected adamw or adamw-8bit without DeepSpeed (the Hugging Face Trainer's sgd has no momentum; the "
             "plan's sgd keeps a momentum buffer), got sgd");
    if (s.optimizer == Optimizer::AdamW && s.optimizer_impl != OptimizerImpl::Fused)
        fail(kWhere, "setup.optimizer_impl",
             fmt::format("expected fused without DeepSpeed (the file names the Trainer's adamw_torch_fused, which allocates "
                         "none of the step's temporaries a {} AdamW does), got {}",
                         to_string(s.optimizer_impl), to_string(s.optimizer_impl)));
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

// Only DeepSpeed gives an Axolotl run fp32 master weights next to bf16 ones, Ulysses sequence parallelism
// (without it, context_parallel_size is the ringmaster plugin's), or ZeRO sharding but FSDP2's (fsdp_config:
// Axolotl's own fsdp2_prepare_model, fsdp2_groups axolotl).
bool needs_deepspeed(const TrainingSetup& s) {
    return (s.zero_stage > 0 && !s.fsdp2) || s.precision == Precision::Bf16Master || s.sp > 1;
}

// DeepSpeed's refusal of the plan; where only sp > 1 made it DeepSpeed's, said as the sp knob's.
void check_with_deepspeed(const TrainingSetup& s, const ModelSpec& model) {
    const bool only_for_ulysses = s.zero_stage == 0 && s.precision != Precision::Bf16Master;
    try {
        check_deepspeed(s, model);
    } catch (const UserError& e) {
        if (!only_for_ulysses) throw;
        fail(kWhere, "setup.sp",
             fmt::format("expected 1, or a setup DeepSpeed accepts (Axolotl runs sp > 1 as DeepSpeed Ulysses), got {}; {}",
                         s.sp, e.what()));
    }
}

// FSDP2 as Axolotl runs it (fsdp2_groups axolotl): its fsdp2_prepare_model shards every decoder layer (the
// transformer auto-wrap over the model's _no_split_modules, accelerate's fallback without
// transformer_layer_cls_to_wrap) and the model, all with reshard_after_forward, the bf16 weights it loads under
// accelerate's bf16 policy. An empty fsdp_config is falsy to Axolotl: FSDP off.
void emit_fsdp_config(YAML::Emitter& e, const TrainingSetup& s) {
    note(e, fmt::format("torch's FSDP2 over {} ranks as Axolotl's own fsdp2_prepare_model applies it: every decoder layer "
                        "and the model (embedding, final norm, LM head){}. One process per rank: axolotl train "
                        "axolotl.yaml --launcher torchrun -- --nproc_per_node {}. cpu_ram_efficient_loading: rank 0 reads the weights into "
                        "host memory and each rank receives its shards (without it every rank first puts the whole "
                        "model on its GPU).",
                        s.dp,
                        s.fsdp2_reshard_after_forward ? ", each resharded after its forward"
                                                      : ", all kept gathered from forward to backward",
                        s.dp));
    e << YAML::Key << "fsdp_config" << YAML::Value << YAML::BeginMap;
    e << YAML::Key << "fsdp_version" << YAML::Value << 2;
    e << YAML::Key << "auto_wrap_policy" << YAML::Value << "TRANSFORMER_BASED_WRAP";
    e << YAML::Key << "reshard_after_forward" << YAML::Value << s.fsdp2_reshard_after_forward;
    e << YAML::Key << "state_dict_type" << YAML::Value << "FULL_STATE_DICT";
    e << YAML::Key << "cpu_ram_efficient_loading" << YAML::Value << true;
    e << YAML::EndMap;
}

}  // namespace

void check_axolotl(const TrainingSetup& s, const ModelSpec& model) {
    check(s, model, needs_deepspeed(s));
    if (needs_deepspeed(s)) check_with_deepspeed(s, model);
}

std::vector<EmittedFile> emit_axolotl(const Plan& plan, const ModelSpec& model) {
    const TrainingSetup& s = plan.setup;
    const bool deepspeed = needs_deepspeed(s);
    check_axolotl(s, model);
    std::vector<EmittedFile> files;
    if (deepspeed) files = emit_deepspeed(plan, model);  // refuses what DeepSpeed cannot do
    const bool ds_has_optimizer = deepspeed && s.optimizer != Optimizer::AdamW8bit;

    YAML::Emitter e;
    std::vector<std::string> header;
    for (const auto& line : plan_header(plan)) header.push_back(comment_line(line));
    // (Axolotl's tiled_mlp imports DeepSpeed's TiledMLP, with or without a ds_config.json)
    header.push_back(fmt::format("For Axolotl {} (pip install \"axolotl{}=={}\"). Fragment of an Axolotl config: merge",
                                 kVersion, deepspeed || s.mlp_chunks > 1 ? "[deepspeed]" : "", kVersion));
    header.push_back("these keys into yours, which keeps base_model, datasets, learning rate... Keys:");
    header.push_back("https://docs.axolotl.ai/docs/config-reference.html; remove flash_attention / sdp_attention /");
    header.push_back("eager_attention from yours (attn_implementation replaces them). Train with: axolotl train axolotl.yaml");
    e << YAML::Comment(joined(header));
    e << YAML::BeginMap;
    e << YAML::Key << "sequence_len" << YAML::Value << s.seq_len;
    e << YAML::Key << "micro_batch_size" << YAML::Value << s.micro_batch;
    e << YAML::Key << "gradient_accumulation_steps" << YAML::Value << s.grad_accum;
    // Every micro-batch holds seq_len tokens, as the plan assumes: packed, or padded.
    e << YAML::Key << "sample_packing" << YAML::Value << !s.padded;
    e << YAML::Key << "pad_to_sequence_len" << YAML::Value << true;
    if (!s.padded && s.micro_batch > 1) {
        // Else a packed micro-batch is one row of micro_batch x sequence_len tokens
        // (AxolotlTrainer's multipack sampler), which DeepSpeed Ulysses refuses.
        note(e, fmt::format("{} packed rows of sequence_len tokens per micro-batch, as the plan has.", s.micro_batch));
        e << YAML::Key << "multipack_real_batches" << YAML::Value << true;
    }
    if (s.precision == Precision::Bf16Master)
        note(e, "bf16 weights for compute; the fp32 master weights and optimizer states are DeepSpeed's "
                "(bf16 in ds_config.json).");
    // bf16: true is the Trainer's bf16=True: accelerate's native amp wraps the forward where DeepSpeed does not
    // train the step (hf_trainer_bf16, which recommend --for axolotl sets wherever it is modelled)
    if (!deepspeed && !s.hf_trainer_bf16 && hf_trainer_bf16_refusal(s, model).empty())  // (refused: kernels runtime too)
        note(e, "The plan was made without hf_trainer_bf16 (recommend --for axolotl sets it): with bf16: true and no "
                "DeepSpeed, accelerate wraps the forward in bf16 autocast and copies its bf16 outputs to fp32, a "
                "copy of an unchunked head's logits the plan's numbers leave out.");
    e << YAML::Key << "bf16" << YAML::Value << true;
    e << YAML::Key << "attn_implementation" << YAML::Value
      << hf_attn_implementation(s.attention);

    const std::int64_t checkpointed = s.checkpointed_count();
    if (checkpointed > 0 && checkpointed < model.num_layers)
        note(e, fmt::format("The plan checkpoints {}. Axolotl has no per-layer placement, so every layer is "
                            "checkpointed: less memory than predicted, {} more layer recomputes per micro-step.",
                            describe_placement(s, model), model.num_layers - checkpointed));
    e << YAML::Key << "gradient_checkpointing" << YAML::Value << (checkpointed > 0);
    if (checkpointed > 0) {
        const bool reentrant = deepspeed && s.zero_stage == 3;
        if (reentrant)
            note(e, "Reentrant under ZeRO-3, as Axolotl's own default: non-reentrant recompute meets the "
                    "partitioned parameters.");
        e << YAML::Key << "gradient_checkpointing_kwargs" << YAML::Value << YAML::BeginMap << YAML::Key
          << "use_reentrant" << YAML::Value << reentrant << YAML::EndMap;
    }
    if (s.offload_checkpoints) {
        note(e, "Offloads what checkpointed layers save (their inputs) to host memory, as the plan does.");
        e << YAML::Key << "activation_offloading" << YAML::Value << "hidden_states";
    }
    if (s.sp > 1) {
        note(e, fmt::format("DeepSpeed Ulysses over {} ranks (with deepspeed: set, Axolotl maps this onto accelerate's "
                            "sequence-parallel axis), {} data-parallel replicas.",
                            s.sp, s.dp));
        e << YAML::Key << "context_parallel_size" << YAML::Value << s.sp;
    }

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
        if (fused)
            note(e, fmt::format("The plan computes the LM-head gradient in forward over {} mini-sequences: Liger's "
                                "fused linear cross-entropy (installed with Axolotl) does that and picks its own "
                                "chunk size.",
                                s.lm_chunks));
        else  // the command on a line of its own, unwrapped, to copy
            e << YAML::Newline
              << YAML::Comment(joined(comment_lines(fmt::format(
                                   "The plan recomputes the logits in {} mini-sequences. Cut Cross Entropy never "
                                   "materialises them: memory at or below the prediction. It needs Axolotl's fork "
                                   "of cut-cross-entropy:",
                                   s.lm_chunks))) +
                               "\n" + kCceInstall);
        // Under ZeRO-3 DeepSpeed gathers a weight read outside its module's forward for the module running
        // then (parameter_offload.py's parameter getter): the root, for its whole forward and backward.
        if (s.zero_stage == 3 && !s.fsdp2)  // (DeepSpeed's; FSDP2's root group holds the LM head through both)
            note(e, "Under ZeRO-3 these losses read lm_head's weight in the model's forward, outside lm_head's: "
                    "DeepSpeed then gathers it for the whole model's forward and backward, up to one gathered "
                    "lm_head weight more than the plan counts (it counts python/mst_hf's loss, computed inside "
                    "lm_head's forward).");
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
    if (s.fsdp2) emit_fsdp_config(e, s);
    e << YAML::EndMap;
    if (!e.good()) throw std::logic_error("axolotl emitter: " + e.GetLastError());

    files.insert(files.begin(), {"axolotl.yaml", std::string(e.c_str()) + "\n"});
    return files;
}

}  // namespace mst::emit_detail
#endif  // MST_NO_YAML
