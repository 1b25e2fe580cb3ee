// report: the validation table of every committed measurement (results/README.md), and the
// check CI runs on it.
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "output.hpp"
#include "mst/catalog.hpp"
#include "mst/error.hpp"
#include "mst/limits.hpp"
#include "numbers.hpp"
#include "mst/report.hpp"

namespace mst::cli {

namespace {

struct ReportArgs {
    std::vector<std::string> roots;
    std::string out_file, gpu = "h100-sxm-80gb";
    bool check = false;
    double max_peak_percent = 100 * ReportLimits{}.peak, max_phase_percent = 100 * ReportLimits{}.phase;
    double max_trainer_percent = 100 * ReportLimits{}.trainer_peak;
};

void run_report(const GlobalOptions& g, const ReportArgs& a) {
    std::vector<SkippedFile> skipped;
    const std::vector<ReportRow> rows = build_report(a.roots, find_gpu(a.gpu), &skipped);
    const auto first_skipped = [&] {
        return fmt::format("{} *.json file{} left out: {} ({})", skipped.size(), skipped.size() > 1 ? "s" : "",
                           skipped.front().path, skipped.front().reason);
    };
    if (rows.empty())
        fail("report", "measurements",
             fmt::format("expected at least one mst-measure/1 file under the given paths{}",
                         skipped.empty() ? "" : "; " + first_skipped()));
    // The check vouches for every measurement under the paths: one it cannot read is not one that passed.
    if (a.check && !skipped.empty())
        fail("report", "check", fmt::format("expected every measurement under the paths readable as mst-measure/1; {}",
                                            first_skipped()));
    std::string command = "mst-plan report";
    for (const std::string& r : a.roots) command += " " + r;
    if (a.gpu != ReportArgs{}.gpu) command += " --gpu " + a.gpu;
    const std::string md = report_markdown(rows, command);
    OutputFiles outputs;
    for (const ReportRow& r : rows) outputs.input(r.file);
    if (!a.out_file.empty()) outputs.add(a.out_file, md);
    const auto outliers = report_outliers(
        rows, ReportLimits{a.max_peak_percent / 100.0, a.max_phase_percent / 100.0, a.max_trainer_percent / 100.0});
    if (a.check && !outliers.empty()) {
        std::string files;
        for (const ReportRow* r : outliers) files += (files.empty() ? "" : ", ") + r->file;
        fail("report", "check",
             fmt::format("expected every measurement within {} % of the predicted peak and {} % per phase; {} of {} are "
                         "not: {}",
                         a.max_peak_percent, a.max_phase_percent, outliers.size(), rows.size(), files));
    }
    outputs.commit();
    // Warnings only for a report that stands: a failing command says one line.
    for (const SkippedFile& f : skipped) warn(f.path + ": " + f.reason + ": left out of the report");
    if (!a.out_file.empty()) {
        fmt::print("wrote {} ({} measurements)\n", a.out_file, rows.size());
    } else if (g.json) {
        nlohmann::json out = nlohmann::json::array();
        for (const ReportRow& r : rows)
            out.push_back({{"file", r.file},
                           {"model", r.model},
                           {"backend", r.backend},
                           {"device", r.device},
                           {"setup", r.setup},
                           {"peak_predicted_bytes", r.peak.predicted},
                           {"peak_measured_bytes", r.peak.measured},
                           {"peak_relative_error", relative_json(r.peak.relative())},
                           {"worst_phase", r.worst_phase},
                           {"worst_phase_relative_error", relative_json(r.worst_phase_error)},
                           {"reserved_predicted_bytes", r.reserved ? nlohmann::json(r.reserved->predicted) : nullptr},
                           {"reserved_measured_bytes", r.reserved ? nlohmann::json(r.reserved->measured) : nullptr},
                           {"identical", r.identical ? nlohmann::json(*r.identical) : nullptr}});
        print_json(out);
    } else {
        fmt::print("{}", md);
    }
    if (a.check && !g.json)
        fmt::print("check: all {} measurements within {} % of the predicted peak and {} % per phase\n", rows.size(),
                   a.max_peak_percent, a.max_phase_percent);
}

}  // namespace

void add_report_command(CLI::App& app, const GlobalOptions& global) {
    auto args = std::make_shared<ReportArgs>();
    auto* cmd = app.add_subcommand("report",
                                   "Re-simulate every measurement under the given folders and tabulate predicted vs measured\n"
                                   "  mst-plan report results --out results/README.md\n"
                                   "  mst-plan report results --check");
    cmd->add_option("paths", args->roots, "Measurement files (mst-measure/1) or folders holding them")->required();
    cmd->add_option("--out", args->out_file, "Write the Markdown table to FILE");
    cmd->add_option("--gpu", args->gpu, "GPU profile of trainers' peaks-only runs (their cuBLAS workspace and allocator)")
        ->capture_default_str();
    add_switch(*cmd, "--check", args->check, "Exit 2 when a measurement is off by more than the limits below");
    const auto percent = finite(0, limits::kErrorPercent);
    cmd->add_option("--max-peak-error", args->max_peak_percent, "Limit on the peak's relative error, percent")
        ->capture_default_str()
        ->check(percent);
    cmd->add_option("--max-phase-error", args->max_phase_percent, "Limit on any phase peak's relative error, percent")
        ->capture_default_str()
        ->check(percent);
    cmd->add_option("--max-trainer-error", args->max_trainer_percent,
                    "Limit on a trainer's (peaks-only) allocated peak error, percent")
        ->capture_default_str()
        ->check(percent);
    cmd->callback([&global, args] { run_report(global, *args); });
}

}  // namespace mst::cli
