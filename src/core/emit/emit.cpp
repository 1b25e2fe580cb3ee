// emit: dispatch to one module per trainer format, and the helpers they share.
#include <algorithm>
#include <string_view>

#include <fmt/format.h>
#include <fmt/ranges.h>  // fmt::join

#include "emit/emitters.hpp"
#include "mst/error.hpp"
#include "mst/units.hpp"

namespace mst {

namespace {

using Emitter = std::vector<EmittedFile> (*)(const Plan&, const ModelSpec&);
using Check = void (*)(const TrainingSetup&, const ModelSpec&);
using Extra = bytes_t (*)(const TrainingSetup&, const ModelSpec&);

struct Format {
    const char* name;
    Emitter emit;
    Check check;  // what the format's trainer cannot train as planned (its emitter refuses the same)
    Extra extra;  // what its trainer allocates beyond the runtime's prediction; nullptr: nothing known
    const char* no_expert_parallelism;  // why its trainer cannot run the plan's expert parallelism (nullptr: it can)
    bool deepspeed;  // its files hold a ds_config.json (DeepSpeed's engine options: reduce_bucket_size, overlap_comm)
};

// torchtitan's own step, as python/mst_referee/titan.py records it from emitted modules (python/README.md has
// the table; python/tests/test_titan_referee.py re-runs the numbers quoted): where mst-plan models it
// (model_code torchtitan, src/core/sim/titan.cpp) and what the referee measured elsewhere.
constexpr const char* kTorchtitanScope =
    "its Llama-3 code on one GPU or fully sharded by FSDP2 over several, in pure bf16 or bf16-master, every layer "
    "checkpointed or none, the loss whole or in chunks, which recommend --for torchtitan plans with that step (runtime "
    "hf), equal to the referee event for event";
constexpr const char* kTorchtitanMeasured =
    "The referee, running torchtitan's step from emitted modules, measured -31 % to +99 % against such predictions "
    "(20 plans under FSDP2 or DDP, expert parallelism among them; Llama-3-8B at 8192 tokens on 8 H100s: +14.1 %): "
    "FSDP2 even on one GPU, gradients reduced in fp32, the chunked loss's fp32 logits. "
    "`python -m mst_referee.titan PLAN.json DIR --out m.json` records a plan's step (python/README.md), `mst-plan "
    "compare --run m.json` shows where it differs.";
constexpr Format kFormats[] = {
    {"hf-mst", emit_detail::emit_hf_mst, emit_detail::check_hf_mst, nullptr,
     "it trains transformers' MoE blocks, which have no expert parallelism", false},
    {"deepspeed", emit_detail::emit_deepspeed, emit_detail::check_deepspeed, nullptr,
     "DeepSpeed's expert parallelism is deepspeed.moe.layer.MoE in the model's code, which transformers' MoE blocks are not",
     true},
    {"axolotl", emit_detail::emit_axolotl, emit_detail::check_axolotl, nullptr,
     "it trains transformers' MoE blocks, which have no expert parallelism", true},
    {"torchtitan", emit_detail::emit_torchtitan, emit_detail::check_torchtitan, emit_detail::torchtitan_extra_bytes,
     nullptr, false},
};

const Format& find_format(const std::string& format) {
    for (const Format& f : kFormats)
        if (format == f.name) return f;
    fail("emit", "format", fmt::format("expected one of {}, got '{}'", fmt::join(emit_formats(), ", "), format));
}

// What mst-plan's executor runs and no format's trainer does, refused for every format:
//  * Expert parallelism, but for torchtitan (expert_parallel_degree: its all-to-all token dispatcher, run by
//    the referee as the caution's other plans): python/mst_hf and Axolotl train transformers' MoE blocks,
//    which have none; DeepSpeed's is deepspeed.moe.layer.MoE in the model's own code.
//  * Ring attention: PyTorch's context parallelism, which accelerate runs (cp_backend "torch") and no
//    emitter writes yet; DeepSpeed's and Axolotl's sequence parallelism is Ulysses' or another ring.
//  * Attention sinks (gpt-oss) on flash: the trainers run transformers' gpt-oss, whose sinks run in
//    eager attention (modelled: runtime hf) or the kernels hub's vllm-flash-attn3 (not modelled).
void check_executor_only(const Format& f, const TrainingSetup& s, const ModelSpec& m) {
    // DeepSpeed's engine options belong to a ds_config.json, which a format without one cannot carry
    if (!f.deepspeed && s.reduce_bucket_size != kDeepSpeedReduceBucket)
        fail(f.name, "setup.reduce_bucket_size",
             fmt::format("expected DeepSpeed's default {} ({} writes no ds_config.json to hold DeepSpeed's bucket: emit "
                         "--format deepspeed or axolotl does), got {}",
                         kDeepSpeedReduceBucket, f.name, s.reduce_bucket_size));
    // (ZeRO-3's gathering options too: the kernels runtime's ZeRO-3 has none, the hf runtime's is DeepSpeed's engine)
    if (!f.deepspeed && s.param_persistence_threshold != kDeepSpeedPersistence)
        fail(f.name, "setup.param_persistence_threshold",
             fmt::format("expected DeepSpeed's default {} ({} writes no ds_config.json to hold it: emit --format deepspeed "
                         "or axolotl does), got {}",
                         kDeepSpeedPersistence, f.name, s.param_persistence_threshold));
    if (!f.deepspeed && s.prefetch_bucket_size != kDeepSpeedPrefetchBucket)
        fail(f.name, "setup.prefetch_bucket_size",
             fmt::format("expected DeepSpeed's default {} ({} writes no ds_config.json to hold it: emit --format deepspeed "
                         "or axolotl does), got {}",
                         kDeepSpeedPrefetchBucket, f.name, s.prefetch_bucket_size));
    if (!f.deepspeed && s.overlap_comm)
        fail(f.name, "setup.overlap_comm",
             fmt::format("expected false, DeepSpeed's default ({} writes no ds_config.json to hold it: emit --format "
                         "deepspeed or axolotl does), got true",
                         f.name));
    if (s.ep > 1 && f.no_expert_parallelism) fail(f.name, "setup.ep", fmt::format("expected 1 ({}), got {}", f.no_expert_parallelism, s.ep));
    const std::string_view name = f.name;
    // torchtitan's own model code is torchtitan's: the other formats train transformers' model
    if (s.model_code == ModelCode::Torchtitan && name != "torchtitan")
        fail(f.name, "setup.model_code",
             fmt::format("expected transformers ({} trains transformers' model code; this plan is torchtitan's own: emit "
                         "--format torchtitan), got torchtitan",
                         f.name));
    // FSDP2: hf-mst's model is sharded by mst_hf.shard or the Trainer's accelerate, Axolotl's by Axolotl's own
    const bool axolotl_groups = s.fsdp2_groups == Fsdp2Groups::Axolotl;
    if (s.fsdp2 && name == "hf-mst" && axolotl_groups)
        fail(f.name, "setup.fsdp2_groups",
             "expected mst_hf or accelerate (hf-mst's model is sharded by mst_hf.shard or the Hugging Face Trainer's "
             "accelerate; Axolotl shards with its own fsdp2_prepare_model: emit --format axolotl), got axolotl");
    if (s.fsdp2 && name == "axolotl" && !axolotl_groups)
        fail(f.name, "setup.fsdp2_groups",
             fmt::format("expected axolotl (Axolotl shards with its own fsdp2_prepare_model: plan with --fsdp2-groups "
                         "axolotl), got {}",
                         to_string(s.fsdp2_groups)));
    // (torchtitan's FSDP2 is modelled with its own model code: its emitter's check)
    if (s.fsdp2 && name != "hf-mst" && name != "axolotl" && name != "torchtitan")
        fail(f.name, "setup.fsdp2",
             fmt::format("expected false ({} shards the model its own way; the plan is for torch's fully_shard {}: emit --format "
                         "{}), got true",
                         f.name,
                         s.fsdp2_groups == Fsdp2Groups::Accelerate
                             ? "as the Hugging Face Trainer's accelerate applies it to a model python/mst_hf patched"
                         : axolotl_groups ? "as Axolotl's fsdp2_prepare_model applies it"
                                          : "as python/mst_hf's users apply it, mst_hf.shard",
                         axolotl_groups ? "axolotl" : "hf-mst"));
    if (s.ring())
        fail(f.name, "setup.sp_impl",
             "expected ulysses (no emitter writes PyTorch's context parallelism yet: accelerate's cp_backend \"torch\" "
             "runs it for transformers' sdpa attention, with FSDP2), got ring");
    if (m.attention_sinks && s.attention != Attention::Eager)
        fail(f.name, "setup.attention",
             "expected eager for a model with attention sinks (its trainer runs transformers' gpt-oss: sinks in eager "
             "attention, planned by runtime hf, or in the kernels hub's vllm-flash-attn3, which is not modelled), got flash");
}

}  // namespace

std::vector<std::string> emit_formats() {
    std::vector<std::string> names;
    for (const Format& f : kFormats) names.emplace_back(f.name);
    return names;
}

std::vector<EmittedFile> emit(const Plan& plan, const ModelSpec& model, const std::string& format) {
    const Format& f = find_format(format);
    // A plan built in code (not read from a file) has not been checked yet; the
    // emitters index layers and divide by degrees on the strength of this.
    validate(plan.setup, model);
    check_executor_only(f, plan.setup, model);
    return f.emit(plan, model);
}

void check_expressible(const std::string& format, const TrainingSetup& setup, const ModelSpec& model) {
    const Format& f = find_format(format);
    check_executor_only(f, setup, model);
    f.check(setup, model);
}

bytes_t trainer_extra_bytes(const std::string& format, const TrainingSetup& setup, const ModelSpec& model) {
    const Format& f = find_format(format);
    return f.extra ? f.extra(setup, model) : 0;
}

std::string unmodelled_trainer(const std::string& format) {
    if (format != "torchtitan") return "";  // (the hf runtime models the Hugging Face trainers' step)
    return fmt::format("mst-plan models torchtitan's own step for {}; the other plans are the memory of the runtime's "
                       "model. {}",
                       kTorchtitanScope, kTorchtitanMeasured);
}

std::string unmodelled_trainer(const std::string& format, const TrainingSetup& planned, const ModelSpec& model) {
    if (format != "torchtitan") return unmodelled_trainer(format);
    if (planned.titan()) return "";  // (torchtitan's own step predicted it)
    TrainingSetup own = planned;
    own.model_code = ModelCode::Torchtitan;
    const auto outside = titan_scope_refusal(own, model);
    const char* field = planned.runtime != Runtime::Hf ? "runtime" : outside ? outside->field : "model_code";
    return fmt::format("mst-plan predicts this plan with the runtime's model, not torchtitan's own step: its {} is "
                       "outside what mst-plan models that step for ({}). {}",
                       field, kTorchtitanScope, kTorchtitanMeasured);
}

namespace emit_detail {

std::vector<std::int64_t> checkpoint_layers(const TrainingSetup& s) {
    std::vector<std::int64_t> layers;
    for (std::size_t i = 0; i < s.checkpoint.size(); ++i)
        if (s.checkpoint[i]) layers.push_back(static_cast<std::int64_t>(i));
    return layers;
}

std::string describe_placement(const TrainingSetup& s, const ModelSpec& model) {
    return fmt::format("{} of {} layers ({})", s.checkpointed_count(), model.num_layers, describe_checkpoints(s.checkpoint));
}

std::vector<std::string> plan_header(const Plan& plan) {
    const TrainingSetup& s = plan.setup;
    const Prediction& p = plan.prediction;
    return {
        // (expert parallelism: its degree, and the busiest rank's share of the routed pairs where it is not uniform)
        fmt::format("mst-plan: {} on {} x {} (dp {} x sp {}{}), seq {}, micro-batch {}, grad-accum {}", plan.model,
                    plan.gpus, plan.gpu, s.dp, s.sp, describe_expert_parallelism(s), s.seq_len, s.micro_batch, s.grad_accum),
        fmt::format("predicted per GPU: peak {} allocated, {} reserved; {:.0f} tokens/s",
                    format_bytes(p.peak_allocated_bytes), format_bytes(p.peak_reserved_bytes), p.tokens_per_second),
    };
}

std::string comment_line(const std::string& text) { return printable(text); }

std::vector<std::string> comment_lines(const std::string& raw, std::size_t width) {
    const std::string text = comment_line(raw);
    std::vector<std::string> lines;
    std::string line;
    std::size_t pos = 0;
    while (pos < text.size()) {
        const std::size_t space = std::min(text.find(' ', pos), text.size());
        const std::string word = text.substr(pos, space - pos);
        pos = space + 1;
        if (!line.empty() && line.size() + 1 + word.size() > width) {
            lines.push_back(line);
            line.clear();
        }
        line += line.empty() ? word : " " + word;
    }
    if (!line.empty()) lines.push_back(line);
    return lines;
}

}  // namespace emit_detail

}  // namespace mst
