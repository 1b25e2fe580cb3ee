// measure: run one real training step on a backend and record its memory timeline.
#include <filesystem>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "mst/catalog.hpp"
#include "mst/compare.hpp"
#include "mst/error.hpp"
#include "mst/execute.hpp"
#include "mst/limits.hpp"
#include "numbers.hpp"
#include "setup_options.hpp"

namespace mst::cli {

namespace {

struct MeasureArgs {
    std::string backend = "cpu", model, out_dir, allocator = "exact";
    bool no_cupti = false;
    std::uint64_t seed = 0;
    std::int64_t workspace_bytes = 0;
    SetupOptions setup;
};

void run_measure(const GlobalOptions& g, const MeasureArgs& a) {
    if (a.backend != "cpu" && a.backend != "cuda") fail("--backend", a.backend, "expected cpu or cuda");
    if (a.allocator != "exact" && a.allocator != "caching") fail("--allocator", a.allocator, "expected exact or caching");
    // (the CUDA backend's options: on the CPU they would be taken and do nothing)
    if (a.backend == "cpu" && a.allocator != "exact")
        fail("--allocator", a.allocator, "expected exact with --backend cpu (the caching allocator is the CUDA backend's)");
    if (a.backend == "cpu" && a.no_cupti) fail("--no-cupti", "backend", "expected --backend cuda (CUPTI records a GPU's timeline)");
    if (a.workspace_bytes < 0) fail("--workspace-bytes", "value", "expected a non-negative byte count");
    const ModelSpec model = find_model(a.model);
    for (const auto& w : model.warnings) warn(fmt::format("{}: {}", model.source, w));
    const TrainingSetup setup = a.setup.build(model);
    ExecuteOptions options;
    options.workspace_bytes = a.workspace_bytes;
    CudaOptions cuda;
    cuda.caching_allocator = a.allocator == "caching";
    cuda.cupti = !a.no_cupti;
    const MeasuredStep step =
        a.backend == "cuda" ? execute_cuda(model, setup, a.seed, options, cuda) : execute_cpu(model, setup, a.seed, options);
    const nlohmann::json j = measurement_json(step, a.backend, model, setup, a.seed, a.workspace_bytes);

    std::string written;
    OutputFiles outputs(g.json);  // (--json: the document on stdout is this command's own)
    for (const std::string& in : {a.model, a.setup.file()}) outputs.input(in);
    if (!a.out_dir.empty()) {
        outputs.make_directory(a.out_dir);
        written = (std::filesystem::path(a.out_dir) / "measured.json").string();
        outputs.add(written, json_text(j) + "\n");
    }
    outputs.commit();
    if (g.json) return print_json(j["summary"]);

    const Summary s = summarize(step.timeline, model.num_layers);
    fmt::print("{} on the {} backend: seq {} x micro-batch {}, {} events, loss {:.4f}, {:.3f} s\n", model.display_name,
               a.backend == "cuda" ? "CUDA" : "CPU", setup.seq_len, setup.micro_batch, step.timeline.events.size(),
               step.loss, step.wall_seconds);
    if (step.device) {
        const DeviceReport& d = *step.device;
        fmt::print("device: {}\nallocator: {}\nrecorder: {}\nevents: {}\n", d.device, d.allocator, d.recorder,
                   d.timeline_note);
        fmt::print("executor log vs measured device events: {}\n",
                   d.matches_executor_log ? "equal, event by event" : "DIFFERENT: " + d.first_difference);
    }
    Table t({"measured", "bytes", ""});
    t.row({"peak", std::to_string(s.peak.bytes), format_bytes(s.peak.bytes)});
    for (int p = 0; p < kPhaseCount; ++p) {
        const auto i = static_cast<std::size_t>(p);
        if (s.phase_seen[i])
            t.row({"peak in " + to_string(static_cast<Phase>(p)), std::to_string(s.phase_peak[i]), format_bytes(s.phase_peak[i])});
    }
    if (s.host_peak > 0) t.row({"host (offloaded)", std::to_string(s.host_peak), format_bytes(s.host_peak)});
    if (step.device) {
        const DeviceReport& d = *step.device;
        t.row({"allocator: peak allocated", std::to_string(d.peak_allocated), format_bytes(d.peak_allocated)});
        t.row({"allocator: peak reserved", std::to_string(d.peak_reserved), format_bytes(d.peak_reserved)});
        t.row({"device in use before the step", std::to_string(d.used_before), format_bytes(d.used_before)});
        t.row({"device in use after the step", std::to_string(d.used_after), format_bytes(d.used_after)});
    }
    t.print();
    // The slowest ops, for a feel of where the time goes on this backend.
    auto ops = step.op_seconds;
    std::sort(ops.begin(), ops.end(), [](const auto& x, const auto& y) { return x.second > y.second; });
    std::string slow;
    for (std::size_t i = 0; i < ops.size() && i < 4; ++i)
        slow += fmt::format("{}{} {:.3f} s", i ? ", " : "", ops[i].first, ops[i].second);
    fmt::print("slowest ops: {}\n", slow);
    if (!written.empty()) fmt::print("wrote {}\n", written);
}

}  // namespace

void add_measure_command(CLI::App& app, const GlobalOptions& global) {
    auto args = std::make_shared<MeasureArgs>();
    auto* cmd = app.add_subcommand("measure",
                                   "Run one real training step on a backend and record its memory timeline\n"
                                   "  mst-plan measure --backend cpu --model tiny-llama --seq 256 --mlp-chunks 4 --out run1\n"
                                   "  mst-plan compare --run run1/measured.json");
    cmd->add_option("--backend", args->backend, "cpu (the reference backend) or cuda (the local GPU)")->capture_default_str();
    cmd->add_option("--allocator", args->allocator,
                    "cuda: exact (one cudaMallocAsync per tensor, recorded by CUPTI) or caching (PyTorch's caching "
                    "allocator: allocated and reserved)")
        ->capture_default_str();
    add_switch(*cmd, "--no-cupti", args->no_cupti, "cuda: take the timeline from the allocator's own log, without CUPTI");
    cmd->add_option("--model", args->model, "Catalog name or path to a config.json")->required();
    cmd->add_option("--out", args->out_dir, "Write DIR/measured.json (setup, timeline and summary)");
    cmd->add_option("--seed", args->seed, "Seed of the random weights and tokens")->capture_default_str()->check(unsigned_decimal());
    cmd->add_option("--workspace-bytes", args->workspace_bytes, "A fixed workspace allocated at init (the cuBLAS workspace's equivalent)")
        ->capture_default_str()
        ->check(decimal(0, limits::kWorkspaceBytes));
    args->setup.add_to(*cmd, "kernels");  // the executor runs mst-plan's kernels
    cmd->callback([&global, args] { run_measure(global, *args); });
}

}  // namespace mst::cli
