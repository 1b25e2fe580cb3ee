// recommend, max-seq, bench tuner: the tuner's commands (`bench` itself: cmd_bench.cpp).
#include <algorithm>
#include <chrono>

#include <fmt/format.h>
#include <fmt/ranges.h>  // fmt::join
#include <nlohmann/json.hpp>

#include "bench.hpp"
#include "commands.hpp"
#include "mst/catalog.hpp"
#include "mst/emit.hpp"
#include "mst/error.hpp"
#include "mst/limits.hpp"
#include "mst/tune.hpp"
#include "numbers.hpp"
#include "setup_options.hpp"

namespace mst::cli {

namespace {

// FSDP2's layout options asked for away from their defaults, as the note where no plan shards with FSDP2
// says them: "<options> do(es) not apply" ("" when none). (--fsdp2-no-sync is the loop's: its own note says more.)
std::string fsdp2_layout_unused(const TrainingSetup& asked) {
    const bool groups = asked.fsdp2_groups != Fsdp2Groups::MstHf, reshard = !asked.fsdp2_reshard_after_forward;
    if (groups && reshard) return "--fsdp2-groups and --fsdp2-reshard-after-forward false do not apply";
    if (groups) return "--fsdp2-groups does not apply";
    if (reshard) return "--fsdp2-reshard-after-forward false does not apply";
    return "";
}

// --threads: what recommend's search and max-seq's strategies run on (TuneRequest::search_threads).
void add_threads_option(CLI::App& cmd, int& threads) {
    cmd.add_option("--threads", threads,
                   "Threads the search runs on (0: one per CPU this process may run on; recommend: at most 8); the "
                   "answer is the same on any number")
        ->capture_default_str()
        ->check(decimal(0, limits::kThreads));
}

// Options every tuner command shares: the cluster, the fixed training choices, pins.
struct TunerArgs {
    std::string model, gpu = "h100-sxm-80gb", out;
    std::int64_t gpus = 1, seq = TuneRequest{}.seq_len, tokens_per_step = 0;
    std::vector<std::string> pins, allows;
    double margin = 0.03, host_gib = 128, moe_imbalance = 1.0;
    int threads = 0;
    bool hf_trainer_bf16 = false;
    Fsdp2Knobs fsdp2;
    std::int64_t reduce_bucket_size = kDeepSpeedReduceBucket;
    std::string precision = "pure-bf16", optimizer = "adamw", state_dtype, attention, sp_impl = "ulysses";
    std::string optimizer_impl = "fused", runtime = "hf";
    std::string for_format;  // recommend --for
    const CLI::Option* attention_option = nullptr;  // given: parsed (an empty value is an error), else the model's default

    // training_knobs: --seq, --precision, ... here (recommend), or from SetupOptions (max-seq).
    void add_to(CLI::App& cmd, bool training_knobs) {
        cmd.add_option("--model", model, "Catalog name or path to a config.json")->required();
        cmd.add_option("--gpu", gpu, "GPU profile name or path")->capture_default_str();
        cmd.add_option("--gpus", gpus, "Number of GPUs (data x sequence parallel)")
            ->capture_default_str()
            ->check(decimal(1, limits::kGpus));
        cmd.add_option("--margin", margin, "Fraction of usable memory kept free")->capture_default_str()->check(finite(0, 1));
        cmd.add_option("--host-gib", host_gib, "Pinned host memory per GPU for offloaded checkpoints (GiB)")
            ->capture_default_str()
            ->check(finite(0, limits::kHostGiB));
        cmd.add_option("--allow", allows, "offload=yes|no, optimizer-in-backward=yes|no (default: offload yes, the other no)");
        add_threads_option(cmd, threads);
        if (!training_knobs) return;
        cmd.add_option("--seq", seq, "Sequence length in tokens")->capture_default_str()->check(decimal(1, limits::kSeqLen));
        cmd.add_option("--precision", precision, "pure-bf16 | bf16-master | amp")->capture_default_str();
        add_hf_trainer_bf16(cmd, hf_trainer_bf16);
        cmd.add_option("--optimizer", optimizer, "adamw | adamw-8bit | sgd")->capture_default_str();
        cmd.add_option("--optimizer-state-dtype", state_dtype, "fp32 | bf16");
        attention_option = cmd.add_option("--attention", attention,
                                          "flash | sdpa | eager (default: flash; sdpa: transformers' default, PyTorch's flash "
                                          "kernel, runtime hf; with runtime hf, gpt-oss's default is eager, which SDPA cannot run)");
        cmd.add_option("--optimizer-impl", optimizer_impl, "fused (the HF Trainer's default) | foreach | for-loop")
            ->capture_default_str();
        cmd.add_option("--runtime", runtime, "hf (transformers + PyTorch: what users run) | kernels (mst-plan's executor)")
            ->capture_default_str();
        cmd.add_option("--sp-impl", sp_impl, "ulysses | ring (PyTorch's context-parallel ring attention): how sequence "
                                             "parallelism runs, where the search uses it")
            ->capture_default_str();
        cmd.add_option("--reduce-bucket-size", reduce_bucket_size,
                       "DeepSpeed's gradient bucket in elements (--for deepspeed|axolotl, runtime hf: its reduce_bucket_size, "
                       "written into the ds_config.json; the Hugging Face Trainer's \"auto\" is hidden_size^2)")
            ->capture_default_str()
            ->check(decimal(1, limits::kReduceBucket));
        cmd.add_option("--moe-imbalance", moe_imbalance,
                       "Expert parallelism: pairs the busiest rank's experts receive over a uniform routing's (capped at ep)")
            ->capture_default_str()
            ->check(finite(1, limits::kGpus));
        add_fsdp2_knobs(cmd, fsdp2, "Where the search plans FSDP2");
    }

    TuneRequest request() const {
        TuneRequest rq;
        rq.model = find_model(model);
        for (const auto& w : rq.model.warnings) warn(fmt::format("{}: {}", rq.model.source, w));
        rq.gpu = find_gpu(gpu);
        rq.gpus = gpus;
        rq.search_threads = threads;
        if (margin >= 1) fail("--margin", fmt::format("{}", margin), "expected a fraction in [0, 1)");
        rq.safety_margin = margin;
        rq.host_bytes_per_gpu = static_cast<bytes_t>(host_gib * static_cast<double>(kGiB));
        rq.base.precision = parse_precision(precision, "command line");
        rq.base.optimizer = parse_optimizer(optimizer, "command line");
        if (!state_dtype.empty()) rq.base.state_dtype = parse_state_dtype(state_dtype, "command line");
        rq.base.runtime = parse_runtime(runtime, "command line");
        rq.base.hf_trainer_bf16 = hf_trainer_bf16;  // (check_request refuses it where it is not modelled)
        const bool given = attention_option && attention_option->count() > 0;
        rq.base.attention = given ? parse_attention(attention, "command line") : default_attention(rq.model, rq.base.runtime);
        rq.base.optimizer_impl = parse_optimizer_impl(optimizer_impl, "command line");
        rq.base.moe_imbalance = moe_imbalance;
        rq.base.reduce_bucket_size = reduce_bucket_size;
        rq.base.sp_impl = parse_sp_impl(sp_impl, "command line");
        rq.base.fsdp2_no_sync = fsdp2.no_sync;  // (the search's FSDP2 setups take these: take_engine)
        rq.base.fsdp2_reshard_after_forward = fsdp2.reshard_after_forward;
        rq.base.fsdp2_groups = parse_fsdp2_groups(fsdp2.groups, "command line");
        rq.seq_len = seq;
        rq.for_format = for_format;
        if (tokens_per_step > 0) rq.tokens_per_step = tokens_per_step;  // the option's check: >= 1 when given
        for (const auto& p : pins) parse_pin(p, rq.model, rq.pins);
        for (const auto& a : allows) {
            const auto eq = a.find('=');
            const std::string key = a.substr(0, eq), value = eq == std::string::npos ? "" : a.substr(eq + 1);
            const bool yes = parse_yes_no("--allow", key, value);
            if (key == "offload") rq.allow_offload = yes;
            else if (key == "optimizer-in-backward") rq.allow_optimizer_in_backward = yes;
            else fail("--allow", key, "expected offload or optimizer-in-backward");
        }
        return rq;
    }
};

std::string describe_chunks(const TrainingSetup& s) {
    auto one = [](std::int64_t m, const std::string& impl) { return m == 1 ? std::string("1") : fmt::format("{} ({})", m, impl); };
    return fmt::format("MLP {}, LM head {}", one(s.mlp_chunks, to_string(s.mlp_impl)), one(s.lm_chunks, to_string(s.lm_impl)));
}

// Why max-seq's rows may not all shard at ZeRO-3: the format's refusals.
std::string zero3_limits(const TuneRequest& rq) {
    return rq.for_format.empty() ? std::string("what their knobs need") : fmt::format("--for {} refuses some setups there", rq.for_format);
}

std::string wrap(const std::string& text, std::size_t width) {
    std::string out, line;
    std::size_t pos = 0;
    while (pos < text.size()) {
        std::size_t next = text.find(' ', pos);
        if (next == std::string::npos) next = text.size();
        const std::string word = text.substr(pos, next - pos);
        if (!line.empty() && line.size() + 1 + word.size() > width) out += line + "\n", line.clear();
        line += (line.empty() ? "" : " ") + word;
        pos = next + 1;
    }
    return out + line + "\n";
}

void run_recommend(const GlobalOptions& g, const TunerArgs& a) {
    const TuneRequest rq = a.request();
    const auto t0 = std::chrono::steady_clock::now();
    const Recommendation r = recommend(rq);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (!r.found) {
        // (against the whole budget: what --for keeps free for a trainer's tables shrinks with the length)
        const bool deepspeed = rq.base.runtime == Runtime::Hf && trains_in_deepspeed(rq.for_format);
        // (the hf runtime's torch data parallelism: DDP, and for a dense model FSDP2, which more GPUs shard further)
        const bool fsdp2 = rq.base.runtime == Runtime::Hf && !deepspeed && r.fsdp2_shards;
        const bool fsdp2_searched = fsdp2 && rq.gpus > 1 && r.zero3_searched;
        const bool two_buckets = rq.pins.overlap_comm.value_or(false);  // (recommend searches overlap_comm)
        const std::string options = two_buckets ? fmt::format("{}--pin overlap_comm=yes", rq.base.deepspeed_defaults()
                                                                                                ? ""
                                                                                                : deepspeed_options(rq.base) + " ")
                                                : deepspeed_options(rq.base);
        if (r.persistent_bytes > r.budget_bytes)  // no length, chunking or checkpointing can help
            fail(rq.model.name, "no setup fits",
                 fmt::format("expected one for {} tokens on {} x {} within {}: weights, gradients{}, optimizer states and "
                             "cuBLAS's workspace alone take {} per GPU; {}more GPUs with ZeRO sharding them{}, a GPU with "
                             "more memory or a lighter optimizer state can help",
                             rq.seq_len, rq.gpus, rq.gpu.name, format_bytes(r.budget_bytes),
                             rq.gpus > 1 && !deepspeed && !fsdp2_searched ? " (and DDP's buckets of them)" : "",
                             format_bytes(r.persistent_bytes),
                             !rq.base.deepspeed_defaults() || two_buckets
                                 ? fmt::format("DeepSpeed's {} ({}) take{} {} on every GPU, whatever the GPUs; ",
                                               two_buckets ? "two buckets" : "bucket", options, two_buckets ? "" : "s",
                                               format_bytes(checked_mul(rq.base.reduce_bucket_size, two_buckets ? 4 : 2)))
                                 : "",
                             rq.base.runtime != Runtime::Hf ? ""
                             : deepspeed ? " (ZeRO 1 and 2 leave every GPU the whole bf16 weights; the hf runtime's ZeRO-3 "
                                           "shards them with bf16-master for Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma-2, Gemma-3, "
                                           "Mixtral, Qwen3-MoE and gpt-oss; --runtime kernels plans it for others)"
                             : fsdp2     ? " (torch's FSDP2 in this runtime, as ZeRO 3)"
                                         : " (--runtime kernels)"));
        // What a setup with every memory-saving knob at its most still holds: what no knob shrank enough.
        std::string leanest;
        if (r.leanest) {
            const Recommendation::Leanest& l = *r.leanest;
            const TrainingSetup& s = l.setup;
            const std::int64_t k = s.checkpointed_count();
            std::string knobs = fmt::format("{}{}, {}, ZeRO {}",
                                            k == 0 ? "no checkpointing"
                                            : k == rq.model.num_layers ? "every layer checkpointed"
                                                                       : fmt::format("{} layers checkpointed", k),
                                            s.offload_checkpoints ? " and offloaded" : "", describe_chunks(s), s.zero_stage);
            if (s.sp > 1) knobs += fmt::format(", sp {} ({})", s.sp, to_string(s.sp_impl));
            if (s.ep > 1) knobs += fmt::format(", ep {}", s.ep);
            if (s.micro_batch > 1 || s.grad_accum > 1)
                knobs += fmt::format(", micro-batch {} x {} accumulation", s.micro_batch, s.grad_accum);
            if (s.optimizer_in_backward) knobs += ", the optimizer stepped in backward";
            leanest = fmt::format(
                "; with every memory-saving knob at its most ({}) the step reserves {}{}; its requested bytes peak in {} at "
                "{}{}{}, where saved activations hold {} and transients {}",
                knobs, format_bytes(l.peak_reserved_bytes),
                l.host_bytes > rq.host_bytes_per_gpu
                    ? fmt::format(" and offloads {} to the host, over --host-gib's {}", format_bytes(l.host_bytes),
                                  format_bytes(rq.host_bytes_per_gpu))
                    : "",
                to_string(l.phase), l.op, l.layer >= 0 ? fmt::format(" of layer {}", l.layer) : "",
                l.rank >= 0 ? fmt::format(" (rank {})", l.rank) : "", format_bytes(l.saved_bytes),
                format_bytes(l.transient_bytes));
        }
        fail(rq.model.name, "no setup fits",
             fmt::format("expected one for {} tokens on {} x {} within {} (try {}{}a shorter --seq or fewer pins){}{}{}",
                         rq.seq_len, rq.gpus, rq.gpu.name,
                         r.trainer_extra_bytes > 0
                             ? fmt::format("{} ({} of {} kept free for {}'s RoPE tables)",
                                           format_bytes(r.budget_bytes - r.trainer_extra_bytes),
                                           format_bytes(r.trainer_extra_bytes), format_bytes(r.budget_bytes), rq.for_format)
                             : format_bytes(r.budget_bytes),
                         // (DDP: each holds it all; FSDP2 shards it further)
                         rq.gpus > 1 && rq.base.runtime == Runtime::Hf && !deepspeed && !fsdp2 ? "" : "more GPUs, ",
                         rq.allow_offload || rq.for_format == "torchtitan" ? "" : "--allow offload=yes, ", leanest,
                         r.refusal.empty()         ? ""
                         : rq.for_format.empty()   ? fmt::format("; the runtime also refused setups, e.g. {}", r.refusal)
                                                   : fmt::format("; --for {} also excluded setups, e.g. {}", rq.for_format, r.refusal),
                         rq.gpus == 1 || rq.base.runtime != Runtime::Hf ? ""
                         : deepspeed ? (r.zero3_searched
                                            ? "; --runtime kernels plans sequence parallelism"  // (ZeRO-3 was searched)
                                            : "; the hf runtime plans DeepSpeed's ZeRO 1 and 2 for it, and its ZeRO-3 for "
                                              "Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma-2, Gemma-3, Mixtral, Qwen3-MoE and gpt-oss "
                                              "with bf16-master: --runtime kernels plans more, and sequence parallelism")
                         : fsdp2_searched && rq.for_format == "torchtitan"
                             ? "; the hf runtime plans torchtitan over several GPUs as its FSDP2 fully sharding (ZeRO 3): "
                               "its context parallelism is not modelled yet"
                         : fsdp2_searched ? "; the hf runtime plans several GPUs as torch's DDP or FSDP2 (ZeRO 3; --for deepspeed or "
                                            "axolotl: DeepSpeed's ZeRO 1 to 3): --runtime kernels plans sequence parallelism"
                                     : "; the hf runtime plans several GPUs as torch's DDP, each holding the whole model, its "
                                       "gradients and optimizer states, or for dense models with bf16 weights or fp32 ones under "
                                       "its bf16 policy as torch's FSDP2 (ZeRO 3; --for deepspeed or axolotl: DeepSpeed's ZeRO 1 "
                                       "to 3): --runtime kernels plans ZeRO-3 with chunked blocks, and sequence parallelism"));
    }
    const Plan plan = to_plan(r, rq, a.model, a.gpu);
    OutputFiles outputs(g.json);  // (--json: the document on stdout is this command's own)
    for (const std::string& in : {a.model, a.gpu}) outputs.input(in);
    if (!a.out.empty()) outputs.add(a.out, json_text(to_json(plan), 2) + "\n");
    outputs.commit();
    if (g.json) {
        nlohmann::json front = nlohmann::json::array();
        for (const auto& c : r.pareto)
            front.push_back({{"setup", to_json(c.setup)},
                             {"peak_reserved_bytes", c.memory.peak_reserved_bytes},
                             {"releases_at_budget", c.releases_at_budget},
                             {"tokens_per_second", c.time.tokens_per_second},
                             {"mfu", c.time.mfu}});
        return print_json({{"plan", to_json(plan)},
                           {"pareto", front},
                           {"trainer_extra_bytes", r.trainer_extra_bytes},
                           {"simulations", r.simulations},
                           {"search_ms", ms}});
    }
    const TrainingSetup& s = r.best.setup;
    fmt::print("{} on {} x {}, sequence {} tokens\n\n", rq.model.display_name, rq.gpus, rq.gpu.display_name, rq.seq_len);
    Table t({"recommended", ""});
    if (s.titan()) t.row({"model code", describe_model_code(s)});  // (--for torchtitan: its own step, where modelled)
    t.row({"mini-sequences", describe_chunks(s)});
    t.row({"checkpointing", s.checkpointed_count() == 0 ? "none"
                                                         : fmt::format("{} of {} layers ({}){}", s.checkpointed_count(),
                                                                       rq.model.num_layers, describe_checkpoints(s.checkpoint),
                                                                       s.offload_checkpoints ? ", offloaded to host" : "")});
    t.row({"parallelism", fmt::format("dp {} (ZeRO {}{}), {} sp {}{}", s.dp, s.zero_stage, describe_sharding(s),
                                      s.ring() ? "ring attention" : "Ulysses", s.sp, describe_expert_parallelism(s))});
    t.row({"batch", fmt::format("micro-batch {} x {} accumulation x dp {} = {} tokens per step", s.micro_batch, s.grad_accum,
                                s.dp, checked_product({s.micro_batch, s.grad_accum, s.dp, s.seq_len}, "tokens per step"))});
    t.row({"optimizer", fmt::format("{} ({} states){}, {}", to_string(s.optimizer), to_string(s.effective_state_dtype()),
                                    s.optimizer_in_backward ? ", stepped in backward" : "", describe_precision(s))});
    // The memory is the GPU's own (it releases its cache only when full); the plan fits on a device of the
    // budget's size, where it may release earlier: then the GPU's reserved bytes can pass the budget.
    const MemoryPeaks& mem = r.best.memory;
    const bool cached_past_budget = mem.peak_reserved_bytes > r.budget_bytes;
    t.row({"memory", fmt::format(fmt::runtime(cached_past_budget ? "{} allocated, {} reserved on the GPU (budget {})"
                                                                 : "{} allocated, {} reserved of {} budget"),
                                 format_bytes(mem.peak_allocated_bytes), format_bytes(mem.peak_reserved_bytes),
                                 format_bytes(r.budget_bytes))});
    if (r.trainer_extra_bytes > 0)
        t.row({"kept free", fmt::format("{} of the budget for what {} allocates beyond the prediction (its RoPE tables)",
                                        format_bytes(r.trainer_extra_bytes), rq.for_format)});
    // Within the budget only by PyTorch's retry after cudaMalloc fails (it synchronises and frees its cache).
    if (r.best.releases_at_budget > 0)
        t.row({"allocator", fmt::format("fits the budget by releasing {} cached segments{}", r.best.releases_at_budget,
                                        cached_past_budget ? " (held until a cudaMalloc fails)" : "")});
    t.row({"throughput", fmt::format("{:.0f} tokens/s per GPU, MFU {:.1f} %, {:.2f} s per step", r.best.time.tokens_per_second,
                                     100 * r.best.time.mfu, r.best.time.step_seconds)});
    t.print();
    // (measured: the referee running DeepSpeed's engine on the emitted file, README "DeepSpeed's ZeRO engine")
    if (rq.base.runtime == Runtime::Kernels && (trains_in_deepspeed(rq.for_format) || rq.for_format == "hf-mst"))
        fmt::print("\ncaution: {}",
                   wrap(fmt::format("this is the memory of mst-plan's own kernels (--runtime kernels), not of the Hugging "
                                    "Face model {} trains, which allocates more; the default runtime (hf) plans it{}, which "
                                    "the referee measures event for event (README).",
                                    rq.for_format == "hf-mst" ? "python/mst_hf" : rq.for_format,
                                    rq.for_format == "hf-mst" ? " as python/mst_hf patches it" : " as DeepSpeed's ZeRO 1/2 engine runs it"),
                        100));
    if (const std::string unmodelled = unmodelled_trainer(rq.for_format, s, rq.model); !unmodelled.empty())
        fmt::print("\ncaution: {}", wrap(unmodelled, 100));
    // (--for axolotl on one GPU: the plain Trainer, without DeepSpeed, may be the pick)
    if (!rq.base.deepspeed_defaults() && !s.deepspeed_engine())
        fmt::print("\ncaution: {}",
                   wrap(fmt::format("the recommended setup trains without DeepSpeed's engine (ZeRO {}), which has no gradient "
                                    "bucket: {} does not apply to it (--pin zero=1 or zero=2 plans DeepSpeed's).",
                                    s.zero_stage, deepspeed_options(rq.base)),
                        100));
    // FSDP2 under accumulation: the plan is for one way of syncing the gradients; the Trainer's is the other
    // (torchtitan's loop syncs every micro-step, as its plan does)
    if (s.fsdp2_shards() && s.grad_accum > 1 && !s.fsdp2_no_sync && !s.titan())
        fmt::print("\ncaution: {}",
                   wrap("this FSDP2 plan reduce-scatters the gradients in every micro-step; the Hugging Face Trainer (and "
                        "accelerate's accumulate()) syncs them in the last one only, every layer's whole gradients held until "
                        "then: for that loop plan with --fsdp2-no-sync.",
                        100));
    if (rq.base.fsdp2_no_sync && !(s.fsdp2_shards() && s.grad_accum > 1))
        fmt::print("\nnote: {}",
                   wrap(fmt::format("--fsdp2-no-sync does not apply to the recommended setup ({}): it is for FSDP2 plans with "
                                    "accumulation.",
                                    s.fsdp2_shards() ? "no accumulation" : "not FSDP2"),
                        100));
    // --tokens-per-step: whole sequences on every data-parallel rank, at least the tokens asked for
    if (const std::int64_t planned = checked_product({s.micro_batch, s.grad_accum, s.dp, s.seq_len}, "tokens per step");
        rq.tokens_per_step && planned != *rq.tokens_per_step)
        fmt::print("\nnote: {}",
                   wrap(fmt::format("--tokens-per-step {}: the plan trains {} tokens per step, in whole sequences of {} tokens "
                                    "(micro-batch {} x accumulation {} x dp {}{}).",
                                    *rq.tokens_per_step, planned, s.seq_len, s.micro_batch, s.grad_accum, s.dp,
                                    rq.pins.micro_batch ? ", the micro-batch pinned" : ""),
                        100));
    if (const std::string unused = fsdp2_layout_unused(rq.base); !unused.empty() && !s.fsdp2_shards())
        fmt::print("\nnote: {}", wrap(unused + " to the recommended setup (not FSDP2).", 100));
    if (rq.base.hf_trainer_bf16 && !s.hf_trainer_bf16)
        fmt::print("\nnote: {}",
                   wrap(fmt::format("--hf-trainer-bf16 does not apply to the recommended setup ({}): accelerate prepares it "
                                    "without its native amp, so the Trainer's bf16=True adds no autocast and no fp32 outputs.",
                                    s.fsdp2_shards() ? "FSDP2" : "DeepSpeed's engine"),
                        100));
    fmt::print("\nwhy: {}\n", wrap(r.why, 100));
    if (r.pareto.size() > 1) {
        // (a Mixture-of-Experts plan in the kernels runtime may differ in its expert-parallel degree too)
        const bool ep = rq.model.moe && rq.base.runtime == Runtime::Kernels;
        Table p({"reserved", "tokens/s", "MFU", "mini-sequences", "checkpoint", "offload", ep ? "dp/zero/sp/ep" : "dp/zero/sp"});
        for (const auto& c : r.pareto)
            p.row({format_bytes(c.memory.peak_reserved_bytes), fmt::format("{:.0f}", c.time.tokens_per_second),
                   fmt::format("{:.1f} %", 100 * c.time.mfu), describe_chunks(c.setup),
                   fmt::format("{}/{}", c.setup.checkpointed_count(), rq.model.num_layers), c.setup.offload_checkpoints ? "yes" : "no",
                   (ep ? fmt::format("{}/{}/{}/{}", c.setup.dp, c.setup.zero_stage, c.setup.sp, c.setup.ep)
                       : fmt::format("{}/{}/{}", c.setup.dp, c.setup.zero_stage, c.setup.sp)) +
                       (c.setup.overlap_comm ? " overlap_comm" : "")});
        fmt::print("memory-vs-throughput front (runner-ups):\n");
        p.print();
    }
    fmt::print("\nsearched with {} simulations in {:.0f} ms{}\n", r.simulations, ms, a.out.empty() ? "" : "; plan written to " + a.out);
}

void run_max_seq(const GlobalOptions& g, const TunerArgs& a, const SetupOptions& knobs, bool user_knobs, bool gpus_given) {
    TuneRequest rq = a.request();
    std::optional<TrainingSetup> user;
    ChunkTokens user_chunk_tokens;  // (chunk sizes given in tokens: kept at every length)
    // the user's own setup, as given (--dp: all the GPUs)
    if (user_knobs) user = knobs.build(rq.model, true, rq.gpus, &user_chunk_tokens);
    if (user && !gpus_given) rq.gpus = checked_mul(user->dp, user->sp, "dp x sp");  // (--gpus: what --dp and --sp span)
    // (your setup is a row of the same table: on the GPUs the others plan)
    if (user && gpus_given && checked_mul(user->dp, user->sp, "dp x sp") != rq.gpus)
        fail("command line", "dp", fmt::format("expected --dp x --sp = --gpus {} (your setup's row is on the GPUs the others "
                                               "plan{}), got {} x {}",
                                               rq.gpus, knobs.file().empty() ? "" : "; a setup file's dp stands unless --dp is given",
                                               user->dp, user->sp));
    // precision, optimizer, attention, micro-batch ...; DeepSpeed's bucket goes to the strategies its engine runs
    rq.base = user ? *user : knobs.build(rq.model, false);
    if (!user) knobs.take_deepspeed(rq.base), knobs.take_fsdp2(rq.base);
    if (rq.base.titan())  // (a row's code follows its strategy: --for torchtitan takes torchtitan's where it is modelled)
        fail("command line", "model_code", "expected transformers with max-seq (--for torchtitan plans each row with "
                                           "torchtitan's own step where it is modelled), got torchtitan");
    // Your setup under DeepSpeed's engine (hf runtime, ZeRO 1-3): the strategies too, as --for deepspeed plans them
    // (the hf runtime's other multi-GPU step, DDP, keeps no fp32 master weights nor shards anything)
    if (user && user->deepspeed_engine() && rq.for_format.empty()) rq.for_format = "deepspeed";
    const MaxSeqResult r = max_seq(rq, user, user_chunk_tokens);
    if (g.json) {
        nlohmann::json rows = nlohmann::json::array();
        for (const auto& row : r.rows) {
            rows.push_back({{"strategy", row.strategy},
                            {"max_seq", row.max_seq},
                            {"fits", row.refused.empty() ? nlohmann::json(row.max_seq > 0) : nlohmann::json(nullptr)},
                            {"peak_reserved_bytes", row.memory.peak_reserved_bytes},
                            {"host_bytes", row.memory.host_peak_bytes},
                            {"setup", to_json(row.setup)},
                            {"trainer_extra_bytes", row.trainer_extra_bytes},
                            {"host_bound", row.host_bound}});
            if (!row.refused.empty()) rows.back()["refused"] = row.refused;  // --for: not searched, and why
        }
        return print_json({{"model", rq.model.name},
                           {"gpu", rq.gpu.name},
                           {"gpus", rq.gpus},
                           {"budget_bytes", r.budget_bytes},
                           {"persistent_bytes", r.persistent_bytes},
                           {"checkpoint_floor_seq", r.checkpoint_floor_seq},
                           {"rows", rows}});
    }
    // (--allow optimizer-in-backward: the rows that step in backward)
    std::size_t in_backward = 0, strategies = 0;
    for (const auto& row : r.rows)
        if (row.strategy != "your setup") ++strategies, in_backward += row.setup.optimizer_in_backward ? 1 : 0;
    fmt::print("{} on {} x {} ({}, {}{}): longest sequence per strategy (micro-batch {})\n\n", rq.model.display_name, rq.gpus,
               rq.gpu.display_name, to_string(rq.base.precision), to_string(rq.base.optimizer),
               in_backward == 0               ? ""
               : in_backward == strategies    ? "; the strategies step it in backward"
                                              : "; strategies step it in backward where it runs",
               rq.base.micro_batch);
    const std::int64_t base = r.rows.empty() ? 0 : r.rows.front().max_seq;
    Table t({"strategy", "max seq", "vs none", "reserved at max", "host"});
    for (const auto& row : r.rows)
        t.row({row.strategy, row.max_seq > 0 ? fmt::format("{}", row.max_seq) : !row.refused.empty() ? "refused" : "does not fit",
               base > 0 && row.max_seq > 0 ? fmt::format("{:.1f}x", static_cast<double>(row.max_seq) / static_cast<double>(base)) : "-",
               row.max_seq > 0 ? format_bytes(row.memory.peak_reserved_bytes) : "-",
               row.memory.host_peak_bytes > 0 ? format_bytes(row.memory.host_peak_bytes) : "-"});
    t.print();
    // --for: why rows were not searched, in the format's words, once per reason
    std::vector<std::pair<std::string, std::vector<std::string>>> refusals;
    for (const auto& row : r.rows) {
        if (row.refused.empty()) continue;
        auto it = std::find_if(refusals.begin(), refusals.end(), [&](const auto& x) { return x.first == row.refused; });
        if (it == refusals.end()) it = refusals.insert(refusals.end(), {row.refused, {}});
        it->second.push_back(row.strategy);
    }
    for (const auto& [reason, rows] : refusals) fmt::print("refused ({}): {}\n", fmt::join(rows, "; "), reason);
    // DeepSpeed's options given, and no row searched trains with its engine (Axolotl's plain Trainer on
    // one GPU)
    if (!rq.base.deepspeed_defaults() && std::none_of(r.rows.begin(), r.rows.end(), [](const MaxSeqRow& row) {
            return row.refused.empty() && row.setup.deepspeed_engine();
        }))
        fmt::print("caution: no row trains with DeepSpeed's engine (ZeRO 1 to 3): {} does not apply to them\n",
                   deepspeed_options(rq.base));
    // Reserved bytes past the budget: the GPU's own, which fit the budget's device by releasing (as recommend says)
    if (std::any_of(r.rows.begin(), r.rows.end(), [&](const MaxSeqRow& row) {
            return row.max_seq > 0 && row.memory.peak_reserved_bytes > r.budget_bytes;
        }))
        fmt::print("note: \"reserved at max\" is what the GPU holds, which keeps its cached segments until a cudaMalloc "
                   "fails: rows over the budget fit it by releasing them\n");
    // --for torchtitan: the rows planned with torchtitan's own step (the caution below is of the others)
    std::vector<std::string> titan_rows;
    std::string titan_code;
    for (const auto& row : r.rows)
        if (row.max_seq > 0 && row.setup.titan()) titan_rows.push_back(row.strategy), titan_code = describe_model_code(row.setup);
    if (!titan_rows.empty())
        fmt::print("note: predicted as torchtitan's own step at their longest, with {}: {}\n", titan_code, fmt::join(titan_rows, "; "));
    // A row ended by its own knobs or --seq's bound, not the budget: the next length's setup is invalid
    for (const auto& row : r.rows)
        if (row.max_seq > 0 && !row.invalid_beyond.empty())
            fmt::print("note: {} ends at {} tokens because a longer sequence makes its setup invalid, not the budget: {}\n",
                       row.strategy, row.max_seq, row.invalid_beyond);
    // A row that offloads every checkpoint, ended by the host's memory for them (less than the rows before it may reach)
    for (const auto& row : r.rows)
        if (row.refused.empty() && row.host_bound)
            fmt::print("note: {} {} because its offloaded checkpoints need more host memory than --host-gib's {} per GPU "
                       "(every checkpointed layer is offloaded), not because of the GPU's\n",
                       row.strategy, row.max_seq > 0 ? fmt::format("ends at {} tokens", row.max_seq) : std::string("fits no length"),
                       format_bytes(rq.host_bytes_per_gpu));
    // FSDP2's layout options given, and no row shards with FSDP2 (one GPU; a model or knobs FSDP2 is not modelled for)
    if (const std::string unused = fsdp2_layout_unused(rq.base);
        !unused.empty() && std::none_of(r.rows.begin(), r.rows.end(), [](const MaxSeqRow& row) {
            return row.refused.empty() && row.setup.fsdp2_shards();
        }))
        fmt::print("note: no row shards with FSDP2: {} to them\n", unused);
    // --for: the trainer's own allocations beyond the prediction, kept free at each length
    for (const auto& row : r.rows)
        if (row.trainer_extra_bytes > 0)
            fmt::print("{}: {} kept free at {} tokens for what {} allocates beyond the prediction (its RoPE tables)\n",
                       row.strategy, format_bytes(row.trainer_extra_bytes), row.max_seq, rq.for_format);
    // (of the rows predicted with a runtime's model: none where torchtitan's own step predicts them all)
    if (const std::string unmodelled = unmodelled_trainer(rq.for_format);
        !unmodelled.empty() && std::any_of(r.rows.begin(), r.rows.end(), [](const MaxSeqRow& row) {
            return row.max_seq > 0 && !row.setup.titan();
        }))
        fmt::print("caution: {}\n", wrap(unmodelled, 100));
    const std::string margin = fmt::format("{:.0f} %", 100 * rq.safety_margin);
    if (r.persistent_bytes >= r.budget_bytes)
        fmt::print("\nbudget {} ({} safety margin); weights, gradients, optimizer states and cuBLAS's workspace alone "
                   "take {}, {} more: no sequence fits (more GPUs with ZeRO, or a GPU with more memory).\n",
                   format_bytes(r.budget_bytes), margin, format_bytes(r.persistent_bytes),
                   format_bytes(r.persistent_bytes - r.budget_bytes));
    else
        fmt::print("\nbudget {} ({} safety margin); weights, gradients, optimizer states and cuBLAS's workspace take "
                   "{}, leaving {}.\nOne checkpoint per layer fills what is left at {} tokens: beyond that only offload "
                   "or sequence parallelism help{}.\n",
                   format_bytes(r.budget_bytes), margin, format_bytes(r.persistent_bytes),
                   format_bytes(r.budget_bytes - r.persistent_bytes), r.checkpoint_floor_seq,
                   rq.for_format == "torchtitan" ? " (torchtitan has no activation offload; its context parallelism is not "
                                                   "modelled yet)"
                   : rq.base.runtime == Runtime::Hf ? " (sequence parallelism: --runtime kernels)"
                                                    : "");
    fmt::print("MsT rows chunk the MLP (not in rows marked \"LM head only\") and LM head in mini-sequences of hidden_size "
               "tokens (1024 at most); lengths are multiples of 1024 tokens (x sp){}.\n",
               rq.for_format == "torchtitan" ? ", an MsT row's of hidden_size tokens too (torchtitan's chunks split the "
                                               "sequence evenly)"
                                             : "");
    std::string stages;
    for (const auto& row : r.rows)
        if (row.strategy != "your setup") stages += fmt::format("{}{}: ZeRO {}", stages.empty() ? "" : "; ", row.strategy, row.setup.zero_stage);
    if (std::any_of(r.rows.begin(), r.rows.end(), [&](const MaxSeqRow& row) { return row.setup.zero_stage != r.rows.front().setup.zero_stage && row.strategy != "your setup"; }))
        fmt::print("{}\n", wrap(fmt::format("The rows shard differently ({}): the others cannot train at ZeRO-3 as planned "
                                           "({}), so they use ZeRO 2, whose state is larger than the footer's.",
                                           stages, zero3_limits(rq)),
                                100));
}

void run_bench_tuner(const GlobalOptions& g, int reps, int threads) {
    std::vector<BenchCase> cases;
    for (const RecommendCase& rc : kRecommendCases) {
        TuneRequest rq;
        rq.model = find_model(rc.model);
        rq.gpu = find_gpu(rc.gpu);
        rq.gpus = rc.gpus;
        rq.seq_len = rc.seq;
        rq.base.runtime = rc.runtime;
        rq.search_threads = threads;
        std::int64_t simulations = 0;
        BenchCase c{fmt::format("recommend {} {} x{} {}k", rc.model, rc.gpu, rc.gpus, rc.seq / 1024), "", rc.target_ms,
                    std::nullopt, {}};
        c.runs = time_in_process(reps, [&] { simulations = recommend(rq).simulations; });
        c.detail = fmt::format("{} simulations", simulations);
        cases.push_back(std::move(c));
    }
    TuneRequest rq;
    rq.model = find_model(kMaxSeqModel);
    rq.gpu = find_gpu(kMaxSeqGpu);
    rq.search_threads = threads;
    BenchCase c{fmt::format("max-seq {} {}", kMaxSeqModel, kMaxSeqGpu), "5 strategies", kMaxSeqTargetMs, std::nullopt, {}};
    c.runs = time_in_process(reps, [&] { max_seq(rq, std::nullopt); });
    cases.push_back(std::move(c));
    print_bench(g,
                fmt::format("bench tuner: the search in this process, on {}",
                            threads > 0 ? fmt::format("{} thread{}", threads, threads > 1 ? "s" : "") : "one thread per CPU"),
                cases);
}

}  // namespace

void add_tuner_commands(CLI::App& app, const GlobalOptions& global) {
    auto rec = std::make_shared<TunerArgs>();
    auto* cmd = app.add_subcommand("recommend",
                                   "Find the fastest setup that fits: mini-sequence counts, checkpoint placement, offload,\n"
                                   "micro-batch and parallel layout, with the reasoning\n"
                                   "  mst-plan recommend --model llama-3-8b --gpu a100-80gb --seq 32768\n"
                                   "  mst-plan recommend --model llama-3-8b --gpu h100-sxm-80gb --gpus 8 --seq 262144 --runtime kernels --out plan.json\n"
                                   "  mst-plan recommend --model llama-3-8b --seq 65536 --pin M_lm=32 --allow offload=no");
    rec->seq = 8192;
    rec->add_to(*cmd, true);
    cmd->add_option("--tokens-per-step", rec->tokens_per_step, "Global tokens per optimizer step (micro-batch x accumulation x dp)")
        ->check(decimal(1, limits::kTokensPerStep));
    cmd->add_option("--pin", rec->pins, "Fix a knob: M_mlp=8, M_lm=32, mlp_impl=tiled, lm_impl=fused, checkpoint=16|all|0-7, "
                                        "offload=no, sp=4, ep=8 (Mixture-of-Experts, runtime kernels), zero=3, micro_batch=2, "
                                        "overlap_comm=yes|no (DeepSpeed's; searched unless pinned)");
    cmd->add_option("--out", rec->out, "Write the plan as JSON (input of `mst-plan emit`)");
    cmd->add_option("--for", rec->for_format,
                    "Search only setups this trainer format can train as planned (emit's formats: hf-mst, deepspeed, "
                    "axolotl, torchtitan), so that `emit --format` accepts the plan")
        ->check(CLI::Validator([](std::string& v) { return v.empty() ? std::string("expected a format name") : std::string(); },
                               "FORMAT"));
    cmd->callback([&global, rec] { run_recommend(global, *rec); });

    auto ms = std::make_shared<TunerArgs>();
    auto knobs = std::make_shared<SetupOptions>();
    auto* mcmd = app.add_subcommand("max-seq",
                                    "The longest sequence that fits, per strategy: none, checkpointing, + MsT, + offload,\n"
                                    "+ sequence parallel; with knobs (--checkpoint, --mlp-chunks, ...) also under yours\n"
                                    "  mst-plan max-seq --model llama-3-8b --gpu a100-80gb\n"
                                    "  mst-plan max-seq --model llama-3-8b --gpu h100-sxm-80gb --gpus 8 --runtime kernels");
    ms->add_to(*mcmd, false);
    mcmd->add_option("--for", ms->for_format,
                     "Only strategies this trainer format can train as planned (hf-mst, deepspeed, axolotl, torchtitan); "
                     "the others are listed as refused, with the reason")
        ->check(CLI::Validator([](std::string& v) { return v.empty() ? std::string("expected a format name") : std::string(); },
                               "FORMAT"));
    knobs->add_to(*mcmd);  // the training knobs; checkpoint/chunk knobs add a "your setup" row
    mcmd->callback([&global, ms, knobs, mcmd] {
        bool user = false;
        for (const char* k : {"--setup", "--mlp-chunks", "--lm-chunks", "--mlp-chunk-tokens", "--lm-chunk-tokens",
                              "--checkpoint", "--offload", "--sp", "--zero", "--dp", "--ep", "--moe-imbalance"})
            user = user || mcmd->count(k) > 0;
        run_max_seq(global, *ms, *knobs, user, mcmd->count("--gpus") > 0);
    });

}

void add_bench_tuner_command(CLI::App& bench, const GlobalOptions& global) {
    auto threads = std::make_shared<int>(0);
    CLI::App& cmd = add_timed_bench(bench, "tuner",
                                    "Time `recommend` and `max-seq` in this process against their targets: <= 40 ms on one GPU "
                                    "(8k-128k tokens),\n<= 250 ms on 8 GPUs at 256k, <= 150 ms for 70B on 64 GPUs, max-seq <= 30 ms",
                                    5, [&global, threads](int reps) { run_bench_tuner(global, reps, *threads); });
    add_threads_option(cmd, *threads);
}

}  // namespace mst::cli
