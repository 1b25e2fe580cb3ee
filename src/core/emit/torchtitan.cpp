// torchtitan: torchtitan.toml, a fragment to merge into a torchtitan job config
// (e.g. torchtitan/models/llama3/train_configs/llama3_8b.toml).
//
// Keys: torchtitan/config/job_config.py
// (https://github.com/pytorch/torchtitan/blob/main/torchtitan/config/job_config.py):
//  [training]  local_batch_size (older releases: batch_size), global_batch_size (gradient
//              accumulation = global / (local x dp)), seq_len, mixed_precision_param
//  [optimizer] name ("AdamW" or "Adam"), early_step_in_backward
//  [activation_checkpoint] mode ("none" | "full" | "selective"), selective_ac_option
//              ("k": _apply_layer_sac wraps the blocks whose 1-based count is a multiple of k)
//  [parallelism] data_parallel_replicate_degree (DDP), data_parallel_shard_degree (FSDP2),
//              fsdp_reshard_after_forward, context_parallel_degree
// torchtitan keeps fp32 parameters and optimizer states; mixed_precision_param is the
// compute dtype (FSDP all-gather or autocast). It has context parallelism (ring
// attention over SDPA) where the plan has Ulysses, and no MsT chunking or activation
// offload keys: those become comments. toml++ writes the tables; it cannot write
// comments, so they are "# " lines before each table.
#include <optional>
#include <sstream>

#include <toml++/toml.h>

#include <fmt/format.h>

#include "emit/emitters.hpp"
#include "mst/error.hpp"
#include "mst/units.hpp"

namespace mst::emit_detail {

namespace {

constexpr const char* kWhere = "torchtitan";

void check(const TrainingSetup& s) {
    if (s.precision == Precision::PureBf16)
        fail(kWhere, "setup.precision",
             "expected bf16-master or amp (torchtitan keeps fp32 parameters and optimizer states; "
             "mixed_precision_param only sets the compute dtype), got pure-bf16");
    if (s.optimizer != Optimizer::AdamW)
        fail(kWhere, "setup.optimizer",
             fmt::format("expected adamw (torchtitan builds AdamW or Adam only), got {}", to_string(s.optimizer)));
    if (s.effective_state_dtype() != StateDtype::Fp32)
        fail(kWhere, "setup.optimizer_state_dtype",
             "expected fp32 (AdamW states follow torchtitan's fp32 parameters), got bf16");
}

// The k of selective_ac_option when the plan checkpoints every k-th layer and
// torchtitan's "k" (0-based layers k-1, 2k-1, ...) checkpoints at least as many.
std::optional<std::int64_t> layer_stride(const std::vector<std::int64_t>& layers, std::int64_t num_layers) {
    if (layers.size() < 2) return std::nullopt;
    const std::int64_t k = layers[1] - layers[0];
    for (std::size_t i = 1; i < layers.size(); ++i)
        if (layers[i] - layers[i - 1] != k) return std::nullopt;
    const bool spans_model = layers.front() < k && layers.back() + k >= num_layers;
    if (k < 2 || !spans_model || num_layers / k < static_cast<std::int64_t>(layers.size())) return std::nullopt;
    return k;
}

struct Section {
    std::string name;
    toml::table table;
    std::vector<std::string> notes;  // comment lines written above the table
};

}  // namespace

void check_torchtitan(const TrainingSetup& s, const ModelSpec& model) {
    (void)model;
    check(s);
}

std::vector<EmittedFile> emit_torchtitan(const Plan& plan, const ModelSpec& model) {
    const TrainingSetup& s = plan.setup;
    check(s);

    Section training{"training", {}, {}};
    training.table.insert("seq_len", s.seq_len);
    training.table.insert("local_batch_size", s.micro_batch);
    training.table.insert("global_batch_size", s.micro_batch * s.grad_accum * s.dp);
    training.table.insert("mixed_precision_param", "bfloat16");
    training.notes.push_back(fmt::format("torchtitan derives gradient accumulation from global_batch_size = "
                                         "local_batch_size {} x grad-accum {} x data-parallel degree {}.",
                                         s.micro_batch, s.grad_accum, s.dp));
    if (s.precision == Precision::Bf16Master)
        training.notes.push_back("The plan keeps bf16 weights next to fp32 masters; torchtitan keeps only fp32 "
                                 "parameters and casts them to bf16 for compute: memory at or below the prediction.");
    if (s.mlp_chunks > 1 || s.lm_chunks > 1)
        training.notes.push_back(fmt::format(
            "MsT: the prediction assumes the MLP in {} mini-sequences ({}) and the LM head + loss in {} ({}). "
            "torchtitan has no key for either: patch the model's FeedForward and loss (python/mst_hf shows how), "
            "or expect more memory than predicted.",
            s.mlp_chunks, to_string(s.mlp_impl), s.lm_chunks, to_string(s.lm_impl)));
    if (s.offload_checkpoints) {
        const bytes_t host = plan.prediction.host_bytes;
        training.notes.push_back(fmt::format("The plan offloads checkpoints to host memory; torchtitan's job config "
                                             "has no activation offload, so they stay on the GPU: memory above the "
                                             "prediction{}.",
                                             host > 0 ? " by up to " + format_bytes(host) : std::string()));
    }
    if (s.attention == Attention::Eager)
        training.notes.push_back("The plan assumes eager attention; torchtitan uses SDPA/flex attention, which never "
                                 "holds the S x S scores: memory at or below the prediction.");

    Section optimizer{"optimizer", {}, {}};
    optimizer.table.insert("name", "AdamW");
    optimizer.table.insert("early_step_in_backward", s.optimizer_in_backward);

    Section ac{"activation_checkpoint", {}, {}};
    const auto layers = checkpoint_layers(s);
    const auto count = static_cast<std::int64_t>(layers.size());
    const auto stride = layer_stride(layers, model.num_layers);
    if (count == 0) {
        ac.table.insert("mode", "none");
    } else if (count == model.num_layers) {
        ac.table.insert("mode", "full");
    } else if (stride) {
        ac.table.insert("mode", "selective");
        ac.table.insert("selective_ac_option", std::to_string(*stride));
        if (layers.front() != *stride - 1)
            ac.notes.push_back(fmt::format("The plan checkpoints {}; torchtitan's \"{}\" wraps one layer in {}, "
                                           "counting from 1 (layers {}, {}, ...): {} layers, as many or more.",
                                           describe_placement(s, model), *stride, *stride, *stride - 1,
                                           2 * *stride - 1, model.num_layers / *stride));
    } else {
        ac.table.insert("mode", "full");
        ac.notes.push_back(fmt::format("The plan checkpoints {}; torchtitan places selective checkpoints only every "
                                       "k-th layer, so every layer is: less memory than predicted, more recompute.",
                                       describe_placement(s, model)));
    }

    Section par{"parallelism", {}, {}};
    par.table.insert("data_parallel_replicate_degree", s.zero_stage == 0 ? s.dp : std::int64_t{1});
    par.table.insert("data_parallel_shard_degree", s.zero_stage == 0 ? std::int64_t{1} : s.dp);
    par.table.insert("context_parallel_degree", s.sp);
    // ZeRO-1/2 keep whole parameters through forward and backward: FSDP2 without
    // resharding after forward. FSDP2 also shards the gradients, which ZeRO-1 does not.
    if (s.zero_stage > 0) par.table.insert("fsdp_reshard_after_forward", s.zero_stage == 3 ? "default" : "never");
    if (s.zero_stage == 1 && s.zero_ranks() > 1)
        par.notes.push_back("ZeRO-1 has no torchtitan equivalent: FSDP2 without resharding also shards gradients "
                            "(ZeRO-2): memory at or below the prediction.");
    if (s.sp > 1)
        par.notes.push_back(fmt::format(
            "torchtitan has context parallelism (ring attention: KV shards passed between ranks), not Ulysses "
            "(all-to-all over heads); the plan's sp {} becomes context_parallel_degree {}, with the same {} tokens "
            "per rank. torchtitan also shards parameters over the context-parallel ranks.",
            s.sp, s.sp, s.local_tokens()));

    std::ostringstream out;
    for (const auto& line : plan_header(plan)) out << "# " << comment_line(line) << "\n";
    out << "# Fragment of a torchtitan job config: merge these tables into yours ([model], [job], ... stay yours).\n"
        << "# Keys: https://github.com/pytorch/torchtitan/blob/main/torchtitan/config/job_config.py\n";
    for (const Section* sec : {&training, &optimizer, &ac, &par}) {
        out << "\n";
        for (const auto& n : sec->notes)
            for (const auto& line : comment_lines(n)) out << "# " << line << "\n";
        out << toml::table{{sec->name, sec->table}} << "\n";
    }
    return {{"torchtitan.toml", out.str()}};
}

}  // namespace mst::emit_detail
