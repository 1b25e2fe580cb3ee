// estimate: the predicted memory of one training step, op by op.

#include <optional>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "mst/catalog.hpp"
#include "mst/error.hpp"
#include "mst/simulate.hpp"
#include "mst/svg.hpp"
#include "numbers.hpp"
#include "setup_options.hpp"

namespace mst::cli {

namespace {

struct EstimateArgs {
    std::string model, gpu = "h100-sxm-80gb", timeline_file, svg_file;
    std::optional<std::int64_t> rank;
    SetupOptions setup;
};

std::string describe_setup(const TrainingSetup& s) {
    std::string mst = fmt::format("MLP {} chunk{}{}, LM head {} chunk{}{}", s.mlp_chunks, s.mlp_chunks > 1 ? "s" : "",
                                  s.mlp_chunks > 1 ? " (" + to_string(s.mlp_impl) + ")" : "", s.lm_chunks,
                                  s.lm_chunks > 1 ? "s" : "", s.lm_chunks > 1 ? " (" + to_string(s.lm_impl) + ")" : "");
    return fmt::format(
        "seq {} x micro-batch {} (x{} accumulation), {}, {} ({} states){}, {}\n"
        "MsT: {}; checkpoint: {}{}; dp {}, ZeRO {}{}, sp {}{}{}",
        s.seq_len, s.micro_batch, s.grad_accum, describe_precision(s),
        to_string(s.optimizer),
        to_string(s.effective_state_dtype()), s.optimizer_in_backward ? " stepped in backward" : "",
        describe_model_code(s),
        mst, describe_checkpoints(s.checkpoint), s.offload_checkpoints ? " (offloaded to host)" : "", s.dp, s.zero_stage, describe_sharding(s), s.sp,
        s.ring() ? " (ring attention)" : "", describe_expert_parallelism(s));
}

// Per-layer view with runs of equal layers folded: "0-31  1.23 GiB each".
void print_layers(const Summary& s) {
    Table t({"layers", "saved + checkpoint per layer"});
    for (std::size_t i = 0; i < s.layer_saved.size();) {
        std::size_t j = i;
        while (j + 1 < s.layer_saved.size() && s.layer_saved[j + 1] == s.layer_saved[i]) ++j;
        t.row({j == i ? fmt::format("{}", i) : fmt::format("{}-{}", i, j), format_bytes(s.layer_saved[i])});
        i = j + 1;
    }
    t.print();
}

void run_estimate(const GlobalOptions& g, const EstimateArgs& a) {
    const ModelSpec model = find_model(a.model);
    for (const auto& w : model.warnings) warn(fmt::format("{}: {}", model.source, w));
    const GpuProfile gpu = find_gpu(a.gpu);
    const TrainingSetup setup = a.setup.build(model);
    const Estimate e = estimate(model, setup, gpu, std::nullopt, a.rank);

    OutputFiles outputs(g.json);  // (--json: the document on stdout is this command's own)
    for (const std::string& in : {a.model, a.gpu, a.setup.file()}) outputs.input(in);
    if (!a.timeline_file.empty()) outputs.add(a.timeline_file, json_text(to_json(e.timeline)) + "\n");
    if (!a.svg_file.empty())
        outputs.add(a.svg_file, timeline_svg(e.timeline, fmt::format("{} on {}: seq {}, predicted memory over one step",
                                                                 model.display_name, gpu.display_name, setup.seq_len)));
    outputs.commit();
    if (g.json) return print_json(to_json(e, model, setup, gpu));

    const Summary& s = e.summary;
    fmt::print("{} on {}\n{}\n\n", model.display_name, gpu.display_name, describe_setup(setup));
    Table t({"memory", "at peak", "largest in step"});
    for (int c = 0; c < kCategoryCount; ++c) {
        const auto i = static_cast<std::size_t>(c);
        if (s.category_max[i] == 0) continue;
        t.row({to_string(static_cast<Category>(c)), format_bytes(s.peak.by_category[i]), format_bytes(s.category_max[i])});
    }
    t.rule();
    t.row({"peak, requested bytes", format_bytes(s.peak.bytes), ""});
    t.row({"peak allocated (allocator blocks)", format_bytes(e.allocator.peak_allocated), ""});
    t.row({"peak reserved (allocator segments)", format_bytes(e.allocator.peak_reserved), ""});
    t.row({"+ CUDA context", format_bytes(e.context_bytes), ""});
    t.row({"= device memory used", format_bytes(checked_add(e.allocator.peak_reserved, e.context_bytes)), ""});
    t.print();
    if (s.peak.event >= 0) {
        const Event& ev = e.timeline.events[static_cast<std::size_t>(s.peak.event)];
        // (FSDP2 accumulating unsynced records the first, one of the middle ones, which are alike, and the last)
        const std::int32_t n = e.timeline.micro_steps, r = ev.micro_step;
        const std::string micro = e.timeline.micro_steps_recorded == 3 && n > 3
                                      ? (r == 2 ? fmt::format("{} (the last)", n - 1) : r == 1 ? fmt::format("1-{} (alike)", n - 2) : "0")
                                      : std::to_string(r);
        fmt::print("\npeak at {} ({}), {}{}, micro-step {}, allocating '{}'\n", ev.op, to_string(ev.phase),
                   ev.layer >= 0 ? "layer " : "outside the layers", ev.layer >= 0 ? std::to_string(ev.layer) : "", micro,
                   ev.name);
    }
    std::string phases;
    for (Phase p : {Phase::Forward, Phase::Recompute, Phase::Backward, Phase::Optimizer}) {
        const auto i = static_cast<std::size_t>(p);
        if (!s.phase_seen[i]) continue;
        phases += fmt::format("{}{} {}", phases.empty() ? "" : ", ", to_string(p), format_bytes(s.phase_peak[i]));
    }
    fmt::print("phase peaks: {}\n", phases);
    if (e.timeline.rank >= 0) {
        const bool ring = setup.ring();
        const std::int64_t ranks = ring ? setup.sp : setup.dp;
        fmt::print("{}: {}\n", ring ? "ring attention"
                              : setup.fsdp2 ? "FSDP2 (the last ranks' shards are shorter where a dimension does not divide)"
                                            : "DeepSpeed ZeRO (each rank owns another partition)",
                   a.rank ? fmt::format("the step of rank {} of {} alone (--rank; the plan fits when every rank's does)",
                                        e.timeline.rank, ranks)
                          : fmt::format("every rank's step walked (they differ); the allocated and reserved peaks and the "
                                        "verdict are the highest rank's, the rest rank {}'s of {} (the highest requested "
                                        "peak)",
                                        e.timeline.rank, ranks));
    }
    if (s.host_peak > 0) fmt::print("host memory for offloaded checkpoints: {}\n", format_bytes(s.host_peak));
    if (e.fits && e.allocator.segments_released > 0)
        fmt::print("fits because the allocator releases {} cached segments when a new one would pass the usable memory "
                   "(PyTorch's retry before an out-of-memory error)\n",
                   e.allocator.segments_released);
    fmt::print("{}: usable {} (total {} - context - {} reserve), headroom {}\n\n",
               e.fits ? "FITS" : "DOES NOT FIT", format_bytes(e.usable_bytes), format_bytes(gpu.memory_total_bytes),
               format_bytes(gpu.reserved_overhead_bytes), format_bytes(e.headroom_bytes));
    print_layers(s);
}

}  // namespace

void add_estimate_command(CLI::App& app, const GlobalOptions& global) {
    auto args = std::make_shared<EstimateArgs>();
    auto* cmd = app.add_subcommand("estimate",
                                   "Predict the memory of one training step, op by op\n"
                                   "  mst-plan estimate --model llama-3-8b --gpu a100-80gb --seq 8192\n"
                                   "  mst-plan estimate --model llama-3-8b --gpu h100-sxm-80gb --seq 65536 "
                                   "--checkpoint all --mlp-chunks 8 --lm-chunks 32 --svg step.svg");
    cmd->add_option("--model", args->model, "Catalog name or path to a config.json")->required();
    cmd->add_option("--gpu", args->gpu, "GPU profile name or path")->capture_default_str();
    cmd->add_option("--timeline", args->timeline_file, "Write the full event list as JSON");
    cmd->add_option("--rank,--ring-rank", args->rank,
                    "Ranks whose steps differ (ring attention's sp, DeepSpeed ZeRO's or FSDP2's dp): walk only this rank's step (default: "
                    "every rank's, showing the highest requested peak)")
        ->check(decimal());
    cmd->add_option("--svg", args->svg_file, "Write a plot of memory over the step");
    args->setup.add_to(*cmd);
    cmd->callback([&global, args] { run_estimate(global, *args); });
}

}  // namespace mst::cli
