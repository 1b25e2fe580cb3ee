// deepspeed: ds_config.json for the DeepSpeed engine.
//
// Keys: https://www.deepspeed.ai/docs/config-json/ (batch size, bf16, zero_optimization,
// activation_checkpointing, optimizer, gradient_clipping). scripts/check-clients takes every file
// of a plan matrix through transformers' Trainer, accelerate and deepspeed.initialize to a built
// engine (python/mst_clients/ds_check.py). Checked against the code:
//  * deepspeed/runtime/config.py: with Ulysses SP the engine's world size is
//    world / sequence_parallel_size, so train_batch_size = micro x accum x dp, while the
//    Hugging Face Trainer's check (integrations/deepspeed.py) computes it over the whole
//    world: with sp > 1 the key is left out and DeepSpeed derives it; the
//    top-level "sequence_parallel_size" is what ALST configs and DeepSpeed's own
//    Ulysses tests set (tests/unit/ulysses_alst/test_ulysses_sp_hf.py), see
//    https://www.deepspeed.ai/tutorials/ulysses-alst-sequence-parallelism/.
//  * Top-level keys are read one by one by name (get_scalar_param, param_dict.get),
//    so an extra top-level key is ignored; the sub-blocks are pydantic models that
//    forbid unknown fields. Hence our explanations live in one top-level array,
//    "mst_plan_notes", and every sub-block holds DeepSpeed's own keys only.
//  * deepspeed/runtime/precision_config.py: bf16.bf16_master_weights_and_grads and
//    bf16.bf16_optimizer_states (bf16 masters need ZeRO 1-3); "torch_autocast" keeps
//    fp32 parameters and autocasts matmuls (our "amp").
// The MsT chunking, attention kernel and which layers get checkpointed live in the
// model code, not in this file: each gets a note saying where to apply it.
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "emit/emitters.hpp"
#include "mst/error.hpp"

namespace mst::emit_detail {

namespace {

constexpr const char* kWhere = "deepspeed";

// Where a plan's mini-sequences go when the trainer is DeepSpeed: the model code.
std::string mlp_note(const TrainingSetup& s) {
    const std::string where =
        s.mlp_impl == MlpImpl::Tiled
            ? fmt::format("ALST TiledMLP (deepspeed.runtime.sequence_parallel.ulysses_sp.TiledMLP, shards={}; "
                          "Arctic Training's tiled_mlp_compute: true picks its own shard count) or python/mst_hf",
                          s.mlp_chunks)
            : fmt::format("python/mst_hf (the MsT loop); ALST TiledMLP with shards={} uses no more memory",
                          s.mlp_chunks);
    return fmt::format("MLP: {} mini-sequences ({}) have no DeepSpeed config key; apply them in the model with {}. "
                       "Without them memory exceeds the prediction.",
                       s.mlp_chunks, to_string(s.mlp_impl), where);
}

std::string lm_note(const TrainingSetup& s) {
    const std::string where = s.zero_stage == 3
                                  ? "python/mst_hf, which under ZeRO-3 computes the loss inside lm_head's forward, where "
                                    "DeepSpeed gathers its weight, as the plan counts (a loss that reads the weight "
                                    "elsewhere makes DeepSpeed gather it its own way)"
                              : s.lm_impl == LmHeadImpl::FusedForward
                                  ? "ALST TiledFusedLogitsLoss (deepspeed.runtime.sequence_parallel.ulysses_sp), "
                                    "Liger fused linear cross-entropy or python/mst_hf"
                                  : "python/mst_hf (MsT: logits recomputed per chunk in backward)";
    return fmt::format("LM head + loss: {} mini-sequences ({}) have no DeepSpeed config key; apply them in the model "
                       "with {}. Without them memory exceeds the prediction.",
                       s.lm_chunks, to_string(s.lm_impl), where);
}

std::string checkpoint_note(const TrainingSetup& s, const ModelSpec& model) {
    std::string note = fmt::format(
        "activation checkpointing: the plan checkpoints {}. This block configures deepspeed.checkpointing; the "
        "model decides which layers it wraps: wrap exactly these (python/mst_hf does)",
        describe_placement(s, model));
    if (s.checkpointed_count() < model.num_layers)
        note += ", or all of them (transformers' gradient_checkpointing_enable(): less memory, more recompute)";
    if (s.offload_checkpoints)
        note += ". cpu_checkpointing offloads only checkpoints taken through deepspeed.checkpointing (Arctic "
                "Training: activation_checkpoint_cpu_offload: true)";
    return note + ".";
}

}  // namespace

void check_deepspeed(const TrainingSetup& s, const ModelSpec& model) {
    (void)model;
    if (s.sp > 1 && s.attention == Attention::Eager)
        fail(kWhere, "setup.attention",
             "expected flash with sp > 1 (Ulysses under accelerate and DeepSpeed refuses eager attention: it "
             "materialises the S x S mask), got eager");
    if (s.optimizer_in_backward)
        fail(kWhere, "setup.optimizer_in_backward",
             "expected false (DeepSpeed steps the optimizer after backward, never inside a gradient hook), got true");
    const bool states_bf16 = s.effective_state_dtype() == StateDtype::Bf16;
    const bool states_matter = s.optimizer != Optimizer::AdamW8bit;  // 8-bit states have no fp32/bf16 choice
    if (s.precision == Precision::PureBf16 && s.zero_stage == 0)
        fail(kWhere, "setup.precision",
             "expected bf16-master or amp with zero_stage 0 (DeepSpeed keeps bf16 master weights only "
             "under ZeRO 1-3), got pure-bf16");
    // bf16 master weights with fp32 states: DeepSpeed 0.19.8 allows it only with ZeRO-Offload's
    // DeepSpeedCPUAdam (runtime/zero/stage_1_and_2.py, stage3.py), which the plan does not offload.
    if (s.precision == Precision::PureBf16 && states_matter && !states_bf16)
        fail(kWhere, "setup.optimizer_state_dtype",
             "expected bf16 with precision pure-bf16 (DeepSpeed keeps fp32 states beside bf16 master weights only "
             "with its CPU-offloaded optimizer), got fp32");
    if (s.precision != Precision::PureBf16 && states_matter && states_bf16)
        fail(kWhere, "setup.optimizer_state_dtype",
             fmt::format("expected fp32 with precision {} (DeepSpeed keeps bf16 optimizer states only with "
                         "bf16 master weights, precision pure-bf16), got bf16",
                         to_string(s.precision)));
}

std::vector<EmittedFile> emit_deepspeed(const Plan& plan, const ModelSpec& model) {
    const TrainingSetup& s = plan.setup;
    std::vector<std::string> notes = plan_header(plan);

    check_deepspeed(s, model);
    const bool states_bf16 = s.effective_state_dtype() == StateDtype::Bf16;

    nlohmann::ordered_json j;
    // train_batch_size must equal micro x accum x (world / sp); DeepSpeed asserts it. The Hugging Face
    // Trainer checks it against world x micro x accum (or fills "auto" with that), which differs when
    // sp > 1: then the key is left out and DeepSpeed derives it from the other two (both checks pass:
    // scripts/check-clients runs them).
    if (s.sp == 1) j["train_batch_size"] = s.micro_batch * s.grad_accum * s.dp;
    j["train_micro_batch_size_per_gpu"] = s.micro_batch;
    j["gradient_accumulation_steps"] = s.grad_accum;
    j["gradient_clipping"] = 1.0;

    switch (s.precision) {
        case Precision::PureBf16:
            j["bf16"] = {{"enabled", true},
                         {"bf16_master_weights_and_grads", true},
                         {"bf16_optimizer_states", states_bf16}};
            notes.push_back(
                "bf16_master_weights_and_grads and bf16_optimizer_states need a DeepSpeed release that has them "
                "(deepspeed/runtime/precision_config.py); older releases reject the keys.");
            break;
        case Precision::Bf16Master:
        case Precision::AmpFp32:
            if (s.precision == Precision::Bf16Master)
                j["bf16"] = {{"enabled", true}};  // bf16 compute, fp32 master weights and states in the optimizer
            else {
                j["torch_autocast"] = {{"enabled", true}, {"dtype", "bfloat16"}};
                notes.push_back(
                    "amp: torch_autocast keeps fp32 weights and casts the matmuls; run the Hugging Face Trainer "
                    "without --bf16/--fp16 (with them it refuses this file, and accelerate would add a bf16 "
                    "block: bf16 weights, not the plan).");
            }
            break;
    }

    nlohmann::ordered_json zero = {{"stage", s.zero_stage}};
    // The bucket the plan holds (hf runtime, ZeRO 1/2); left out, DeepSpeed's default is the plan's. Its
    // overlap_comm is written either way: configurations copied from DeepSpeed's and Hugging Face's
    // examples turn it on, for a second bucket the plan must then hold too. (A plan of the kernels
    // runtime models neither: DeepSpeed's defaults are left.)
    if (s.reduce_bucket_size != kDeepSpeedReduceBucket) zero["reduce_bucket_size"] = s.reduce_bucket_size;
    if (s.deepspeed_zero()) zero["overlap_comm"] = s.overlap_comm;
    if (s.deepspeed_zero3()) {
        // The hf runtime models DeepSpeed's own stage 3 (src/core/sim/zero3.cpp): every option it
        // depends on is written, so that neither DeepSpeed's defaults nor the Hugging Face Trainer's
        // "auto" fill-ins (10 x hidden_size persistence, 0.9 x hidden_size^2 prefetch) change it.
        zero["reduce_bucket_size"] = s.reduce_bucket_size;
        zero["stage3_param_persistence_threshold"] = s.param_persistence_threshold;
        zero["stage3_prefetch_bucket_size"] = s.prefetch_bucket_size;
        zero["stage3_max_live_parameters"] = kDeepSpeedMaxLive;
        zero["stage3_max_reuse_distance"] = kDeepSpeedMaxReuse;
    } else if (s.zero_stage == 3) {  // the kernels runtime counts ZeRO-3 prefetch in layers; DeepSpeed counts elements
        zero["stage3_prefetch_bucket_size"] = s.zero3_prefetch * model.layer_parameters();
        notes.push_back(
            "ZeRO-3: DeepSpeed's engine gathers ahead by elements at every submodule, keeping up to "
            "stage3_max_live_parameters (1e9) gathered and those reused within stage3_max_reuse_distance (1e9), "
            "and holds a reduce bucket of reduce_bucket_size (5e8) bf16 elements: more than this plan, made with "
            "mst-plan's kernels' ZeRO-3, counts (the hf runtime models DeepSpeed's own stage 3: plan with "
            "--runtime hf).");
    }
    j["zero_optimization"] = zero;

    if (s.checkpointed_count() > 0) {
        // partition_activations splits checkpoints across tensor-parallel ranks, and
        // contiguous_memory_optimization needs it: neither applies without TP.
        j["activation_checkpointing"] = {{"partition_activations", false},
                                         {"cpu_checkpointing", s.offload_checkpoints},
                                         {"contiguous_memory_optimization", false},
                                         {"number_checkpoints", s.checkpointed_count()}};
        notes.push_back(checkpoint_note(s, model));
    }

    switch (s.optimizer) {
        case Optimizer::AdamW:
            j["optimizer"] = {{"type", "AdamW"},
                              {"params", {{"lr", "auto"}, {"betas", "auto"}, {"eps", "auto"}, {"weight_decay", "auto"}}}};
            break;
        case Optimizer::SgdMomentum:
            // Any non-zero momentum allocates the buffer the plan counts; 0.9 is the usual value.
            j["optimizer"] = {{"type", "SGD"}, {"params", {{"lr", "auto"}, {"momentum", 0.9}, {"weight_decay", "auto"}}}};
            // ZeRO wraps only the optimizers it was tested with (Adam, AdamW, ...) unless told
            // otherwise: torch's SGD needs the flag (deepspeed/runtime/engine.py asserts it).
            if (s.zero_stage > 0) j["zero_allow_untested_optimizer"] = true;
            break;
        case Optimizer::AdamW8bit:
            // DeepSpeed has no bitsandbytes optimizer type: the client passes its own.
            if (s.zero_stage > 0) j["zero_allow_untested_optimizer"] = true;
            notes.push_back(
                "optimizer: adamw-8bit has no DeepSpeed optimizer type, so the block is left out: pass bitsandbytes "
                "AdamW8bit as the client optimizer (the Hugging Face Trainer does with optim=adamw_bnb_8bit).");
            break;
    }
    if (j.contains("optimizer"))
        notes.push_back(
            "optimizer params \"auto\" are filled in by the Hugging Face Trainer / Accelerate integration; with "
            "deepspeed.initialize alone, write numbers.");

    if (s.sp > 1) {
        j["sequence_parallel_size"] = s.sp;
        notes.push_back(fmt::format(
            "sequence_parallel_size {} (Ulysses): DeepSpeed counts the batch over data-parallel ranks only ({} GPUs / "
            "{} = {}: {} sequences per step) and the Hugging Face Trainer over every process, so train_batch_size is "
            "left for DeepSpeed to derive (not \"auto\": under ZeRO-3 the model is built in deepspeed.zero.Init "
            "with the Trainer's value); with the Trainer pass TrainingArguments(parallelism_config="
            "ParallelismConfig(sp_backend=\"deepspeed\", sp_size={}, dp_shard_size={})) (accelerate sets "
            "train_batch_size over its data-parallel size, 1 unless given), or wire the model yourself with "
            "UlyssesSPAttentionHF.register_with_transformers.",
            s.sp, s.dp * s.sp, s.sp, s.dp, s.micro_batch * s.grad_accum * s.dp, s.sp, s.dp));
    }
    if (s.mlp_chunks > 1) notes.push_back(mlp_note(s));
    if (s.lm_chunks > 1) notes.push_back(lm_note(s));
    notes.push_back(fmt::format("attention: {}; set it when loading the model (attn_implementation=\"{}\").",
                                to_string(s.attention), hf_attn_implementation(s.attention)));

    j["mst_plan_notes"] = notes;
    return {{"ds_config.json", j.dump(2) + "\n"}};
}

}  // namespace mst::emit_detail
