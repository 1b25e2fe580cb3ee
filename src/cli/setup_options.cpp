#include "setup_options.hpp"

#include <limits>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "mst/error.hpp"
#include "mst/limits.hpp"
#include "mst/units.hpp"
#include "numbers.hpp"

namespace mst::cli {

void SetupOptions::add_to(CLI::App& cmd, const char* default_runtime) {
    cmd_ = &cmd;
    runtime = default_runtime_ = default_runtime;
    cmd.add_option("--setup", setup_file, "Setup JSON file with the knobs below (see README); options given here override it");
    cmd.add_option("--seq", seq, "Sequence length in tokens")->capture_default_str()->check(decimal());
    cmd.add_option("--batch", batch, "Micro-batch size (sequences per micro-step)")->capture_default_str()->check(decimal());
    cmd.add_option("--grad-accum", grad_accum, "Gradient-accumulation micro-steps")->capture_default_str()->check(decimal());
    add_switch(cmd, "--padded", padded, "Padded batches (default: packed)");
    cmd.add_option("--precision", precision, "pure-bf16 | bf16-master | amp")->capture_default_str();
    cmd.add_option("--optimizer", optimizer, "adamw | adamw-8bit | sgd")->capture_default_str();
    cmd.add_option("--optimizer-state-dtype", state_dtype, "fp32 | bf16 (default: bf16 for pure-bf16, else fp32)");
    add_switch(cmd, "--optimizer-in-backward", opt_in_backward, "Step each parameter in its gradient hook");
    add_hf_trainer_bf16(cmd, hf_trainer_bf16);
    cmd.add_option("--optimizer-impl", optimizer_impl, "fused (the HF Trainer's and torchtitan's default) | foreach (torch.optim's default on GPUs) | for-loop")
        ->capture_default_str();
    cmd.add_option("--runtime", runtime, "hf (transformers + PyTorch: what users run) | kernels (mst-plan's executor)")
        ->capture_default_str();
    cmd.add_option("--model-code", model_code, "transformers | torchtitan (runtime hf: whose model code the PyTorch step runs; "
                                               "torchtitan's own Llama-3 step on one GPU, pure bf16 or bf16-master, every "
                                               "layer checkpointed or none, the loss whole or chunked: "
                                               "docs/torchtitan-model.md)")
        ->capture_default_str();
    cmd.add_option("--attention", attention, "flash | sdpa | eager (default: flash; sdpa: transformers' default, PyTorch's flash kernel, runtime hf; with runtime hf, gpt-oss's default is eager, which SDPA cannot run)");
    cmd.add_option("--mlp-chunks", mlp_chunks, "MsT mini-sequences for the MLP (M_mlp; 1 = unchunked)")->capture_default_str()->check(decimal());
    cmd.add_option("--mlp-chunk-tokens", mlp_chunk_tokens, "Alternatively: MLP chunk size in tokens")->check(decimal());
    cmd.add_option("--mlp-impl", mlp_impl, "loop (MsT reference) | tiled (ALST TiledMLP)")->capture_default_str();
    cmd.add_option("--lm-chunks", lm_chunks, "MsT mini-sequences for LM head + loss (M_lm; 1 = unchunked)")->capture_default_str()->check(decimal());
    cmd.add_option("--lm-chunk-tokens", lm_chunk_tokens, "Alternatively: LM-head chunk size in tokens")->check(decimal());
    cmd.add_option("--lm-impl", lm_impl, "recompute (MsT reference) | fused (Liger/ALST: gradient in forward)")->capture_default_str();
    cmd.add_option("--checkpoint", checkpoint, "Checkpointed layers: none | all | every:K | first:K | last:K | spread:K | 0,2,5-9")
        ->capture_default_str();
    add_switch(cmd, "--offload", offload, "Offload checkpoints to host memory");
    cmd.add_option("--dp", dp, "Data-parallel degree")->capture_default_str()->check(decimal());
    const auto an_int = decimal(std::numeric_limits<int>::min(), std::numeric_limits<int>::max());
    cmd.add_option("--zero", zero, "ZeRO stage 0-3 (3 = FSDP full shard)")->capture_default_str()->check(an_int);
    cmd.add_option("--zero3-prefetch", zero3_prefetch, "Layers all-gathered ahead under ZeRO-3")->capture_default_str()->check(an_int);
    add_switch(cmd, "--fsdp2", fsdp2, "ZeRO-3 (runtime hf) as torch's FSDP2, fully_shard on every decoder layer and the model, "
                                   "not DeepSpeed's stage-3 engine");
    add_fsdp2_knobs(cmd, fsdp2_knobs, "With --fsdp2");
    cmd.add_option("--reduce-bucket-size", reduce_bucket_size_,
                   "DeepSpeed's gradient bucket in elements (ZeRO 1-3, runtime hf: its reduce_bucket_size; the Hugging Face "
                   "Trainer's \"auto\" is hidden_size^2)")
        ->capture_default_str()->check(decimal());
    cmd.add_option("--param-persistence-threshold", persistence_,
                   "DeepSpeed's ZeRO-3 (runtime hf): parameters of at most this many elements stay gathered "
                   "(stage3_param_persistence_threshold; the Hugging Face Trainer's \"auto\" is 10 x hidden_size)")
        ->capture_default_str()->check(decimal(0));
    cmd.add_option("--prefetch-bucket-size", prefetch_bucket_,
                   "DeepSpeed's ZeRO-3 (runtime hf): elements gathered ahead at each module (stage3_prefetch_bucket_size; "
                   "the Hugging Face Trainer's \"auto\" is 0.9 x hidden_size^2)")
        ->capture_default_str()->check(decimal(0));
    add_switch(cmd, "--overlap-comm", overlap_comm,
                 "DeepSpeed's overlap_comm (ZeRO 1/2, runtime hf): a second gradient bucket, the reductions overlapping backward");
    cmd.add_option("--sp", sp, "Sequence-parallel degree (runtime kernels)")->capture_default_str()->check(decimal());
    cmd.add_option("--sp-impl", sp_impl, "ulysses (DeepSpeed: all-to-all, heads split) | ring (PyTorch's context-parallel ring "
                                         "attention, as accelerate runs it)")->capture_default_str();
    cmd.add_option("--ep", ep, "Expert-parallel degree (Mixture-of-Experts, runtime kernels): E/ep experts per rank; divides --dp x --sp")
        ->capture_default_str()->check(decimal());
    cmd.add_option("--moe-imbalance", moe_imbalance,
                   "Pairs the busiest rank's experts receive over a uniform routing's, in [1, ep] (default 1: uniform)")
        ->check(finite(1.0, static_cast<double>(limits::kGpus)));
}

bool SetupOptions::given(const char* name) const { return cmd_->count(name) > 0; }

void SetupOptions::take_fsdp2(TrainingSetup& s) const {
    if (given("--fsdp2-no-sync")) s.fsdp2_no_sync = fsdp2_knobs.no_sync;
    if (given("--fsdp2-reshard-after-forward")) s.fsdp2_reshard_after_forward = fsdp2_knobs.reshard_after_forward;
    if (given("--fsdp2-groups")) s.fsdp2_groups = parse_fsdp2_groups(fsdp2_knobs.groups, "command line");
}

void SetupOptions::take_deepspeed(TrainingSetup& s) const {
    if (given("--reduce-bucket-size")) s.reduce_bucket_size = reduce_bucket_size_;
    if (given("--overlap-comm")) s.overlap_comm = overlap_comm;
    if (given("--param-persistence-threshold")) s.param_persistence_threshold = persistence_;
    if (given("--prefetch-bucket-size")) s.prefetch_bucket_size = prefetch_bucket_;
}

TrainingSetup SetupOptions::build(const ModelSpec& model, bool with_deepspeed, std::int64_t gpus, ChunkTokens* chunk_tokens) const {
    TrainingSetup s;
    ChunkTokens file_tokens;
    if (!setup_file.empty()) s = load_setup_file(setup_file, model, parse_runtime(default_runtime_, "command line"), &file_tokens);
    const std::string w = "command line";
    if (!setup_file.empty() ? given("--seq") : true) s.seq_len = seq;
    if (!setup_file.empty() ? given("--batch") : true) s.micro_batch = batch;
    if (!setup_file.empty() ? given("--grad-accum") : true) s.grad_accum = grad_accum;
    // Flags take a value too (--padded=no): the value given wins, not the flag's presence.
    if (given("--padded")) s.padded = padded;
    if (given("--precision")) s.precision = parse_precision(precision, w);
    if (given("--optimizer")) s.optimizer = parse_optimizer(optimizer, w);
    if (given("--optimizer-state-dtype")) s.state_dtype = parse_state_dtype(state_dtype, w);
    if (given("--optimizer-in-backward")) s.optimizer_in_backward = opt_in_backward;
    if (given("--hf-trainer-bf16")) s.hf_trainer_bf16 = hf_trainer_bf16;
    if (given("--optimizer-impl")) s.optimizer_impl = parse_optimizer_impl(optimizer_impl, w);
    // Unnamed, the attention is the runtime's default; a file's at its runtime's default follows
    // the runtime given here (gpt-oss: eager in hf, flash in kernels).
    const bool default_attention_before = s.attention == default_attention(model, s.runtime);
    if (given("--runtime") || setup_file.empty()) s.runtime = parse_runtime(runtime, w);
    if (given("--model-code") || setup_file.empty()) s.model_code = parse_model_code(model_code, w);
    if (given("--attention")) s.attention = parse_attention(attention, w);
    else if (setup_file.empty() || default_attention_before) s.attention = default_attention(model, s.runtime);
    if (given("--mlp-impl")) s.mlp_impl = parse_mlp_impl(mlp_impl, w);
    if (given("--lm-impl")) s.lm_impl = parse_lm_impl(lm_impl, w);
    if (given("--checkpoint")) s.checkpoint = parse_checkpoint_spec(checkpoint, model.num_layers, w);
    if (given("--offload")) s.offload_checkpoints = offload;
    if (given("--dp")) s.dp = dp;
    if (given("--zero")) s.zero_stage = zero;
    if (given("--zero3-prefetch")) s.zero3_prefetch = zero3_prefetch;
    if (given("--fsdp2")) s.fsdp2 = fsdp2;
    if (with_deepspeed) take_deepspeed(s), take_fsdp2(s);
    if (given("--sp")) s.sp = sp;
    if (gpus > 1 && !given("--dp") && setup_file.empty()) {
        if (s.sp < 1 || gpus % s.sp != 0) fail(w, "sp", fmt::format("expected a divisor of --gpus {}, got {}", gpus, s.sp));
        s.dp = gpus / s.sp;
    }
    if (given("--sp-impl")) s.sp_impl = parse_sp_impl(sp_impl, w);
    if (given("--ep")) s.ep = ep;
    if (given("--moe-imbalance")) s.moe_imbalance = moe_imbalance;
    // Chunk counts: a token size converts with the tokens each rank holds (validate() bounds them).
    if (given("--mlp-chunks") && given("--mlp-chunk-tokens")) fail(w, "mlp-chunk-tokens", "expected --mlp-chunks or --mlp-chunk-tokens, not both");
    if (given("--lm-chunks") && given("--lm-chunk-tokens")) fail(w, "lm-chunk-tokens", "expected --lm-chunks or --lm-chunk-tokens, not both");
    // (a file's sizes in tokens, converted again with the length, batch and sp given here)
    if (file_tokens.mlp) s.mlp_chunks = chunks_for_tokens(s, *file_tokens.mlp);
    if (file_tokens.lm) s.lm_chunks = chunks_for_tokens(s, *file_tokens.lm);
    if (given("--mlp-chunks")) s.mlp_chunks = mlp_chunks;
    if (given("--lm-chunks")) s.lm_chunks = lm_chunks;
    auto chunks_of = [&](const char* knob, std::int64_t tokens) {
        if (tokens < 1) fail(w, knob, fmt::format("expected a positive token count, got {}", tokens));
        return chunks_for_tokens(s, tokens);
    };
    if (given("--mlp-chunk-tokens")) s.mlp_chunks = chunks_of("mlp-chunk-tokens", mlp_chunk_tokens);
    if (given("--lm-chunk-tokens")) s.lm_chunks = chunks_of("lm-chunk-tokens", lm_chunk_tokens);
    if (chunk_tokens) {
        *chunk_tokens = {};
        if (given("--mlp-chunk-tokens")) chunk_tokens->mlp = mlp_chunk_tokens;
        else if (!given("--mlp-chunks")) chunk_tokens->mlp = file_tokens.mlp;
        if (given("--lm-chunk-tokens")) chunk_tokens->lm = lm_chunk_tokens;
        else if (!given("--lm-chunks")) chunk_tokens->lm = file_tokens.lm;
    }
    validate(s, model);
    return s;
}

}  // namespace mst::cli
