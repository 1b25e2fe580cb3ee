// The validation table (include/mst/report.hpp): every measurement re-simulated, one row each.
#include "mst/report.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>

#include <fmt/format.h>

#include "json_read.hpp"
#include "mst/error.hpp"
#include "mst/simulate.hpp"
#include "mst/units.hpp"

namespace mst {

namespace {

std::string describe(const TrainingSetup& s, std::int64_t layers) {
    auto chunks = [](std::int64_t m, const std::string& impl) { return m == 1 ? std::string("1") : fmt::format("{} {}", m, impl); };
    std::int64_t checkpointed = 0;
    for (bool c : s.checkpoint) checkpointed += c ? 1 : 0;
    std::string text = fmt::format("seq {}{}, {}, {}", s.seq_len, s.micro_batch > 1 ? fmt::format(" x {}", s.micro_batch) : "",
                                   to_string(s.precision), to_string(s.attention));
    if (s.optimizer != Optimizer::AdamW) text += ", " + to_string(s.optimizer);
    if (s.optimizer_in_backward) text += ", optimizer in backward";
    if (s.grad_accum > 1) text += fmt::format(", accumulation {}", s.grad_accum);
    if (s.dp > 1 || s.zero_stage > 0 || s.sp > 1)
        text += fmt::format(", dp {} ZeRO {}{} sp {}", s.dp, s.zero_stage,
                            s.deepspeed_engine() ? " (DeepSpeed" + describe_deepspeed(s) + ")"
                            : s.fsdp2 ? (s.fsdp2_groups == Fsdp2Groups::Accelerate ? " (FSDP2, accelerate's groups)"
                                         : s.fsdp2_groups == Fsdp2Groups::Axolotl  ? " (FSDP2, Axolotl's groups)"
                                                                                   : " (FSDP2)")
                                      : "",
                            s.sp);
    text += fmt::format(", MLP {}, LM head {}, checkpoint {}/{}{}", chunks(s.mlp_chunks, to_string(s.mlp_impl)),
                        chunks(s.lm_chunks, to_string(s.lm_impl)), checkpointed, layers,
                        s.offload_checkpoints && checkpointed ? " offloaded" : "");
    return text;
}

std::vector<std::string> measurement_files(const std::vector<std::string>& roots, std::vector<SkippedFile>* skipped) {
    namespace fs = std::filesystem;
    std::vector<std::string> files;
    auto consider = [&](const fs::path& p) {
        if (p.extension() != ".json") return;
        try {
            const nlohmann::json j = detail::read_json_file(p);
            if (!j.is_object() || !j.contains("format") || !j.at("format").is_string()) return;
            const std::string format = j.at("format").get<std::string>();
            // (a format name a measurement's might be: spaced, in capitals, another version)
            std::string name;
            for (const char c : format)
                if (!std::isspace(static_cast<unsigned char>(c))) name += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
            const bool failed_run = j.contains("error") && !j.at("error").is_null();
            if (format == kMeasureFormat && !failed_run) files.push_back(p.lexically_normal().string());
            else if (format == kMeasureFormat && skipped)  // a trainer's run that failed (out of memory): no peaks
                skipped->push_back({p.string(), "a run that failed, with no peaks to compare"});
            else if (name.starts_with("mst-measure") && skipped)
                skipped->push_back({p.string(), fmt::format("format '{}', not {}", printable(format), kMeasureFormat)});
        } catch (const UserError& e) {  // (the reader's reason: not JSON, nested too deep, too large)
            std::string why = e.what();
            if (const std::string prefix = p.string() + ": "; why.starts_with(prefix)) why = why.substr(prefix.size());
            if (skipped) skipped->push_back({p.string(), why});
        }
    };
    for (const std::string& root : roots) {
        std::error_code ec;
        const fs::file_status status = fs::status(root, ec);
        if (ec || !fs::exists(status)) fail(root, "file", "expected a measurement file or a folder of them");
        if (!fs::is_directory(status)) {
            consider(root);
            continue;
        }
        // Walked with error codes: an unreadable folder is the user's to fix, named in one line.
        auto it = fs::recursive_directory_iterator(root, ec);
        for (; !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
            std::error_code entry;  // a dangling link is skipped, not an error
            if (it->is_regular_file(entry)) consider(it->path());
        }
        if (ec) fail(root, "folder", fmt::format("expected a readable folder of measurements ({})", ec.message()));
    }
    std::sort(files.begin(), files.end());
    files.erase(std::unique(files.begin(), files.end()), files.end());
    return files;
}

std::string compare_cell(const CompareRow& r) {
    return fmt::format("{} / {} / {}", format_bytes(r.predicted), format_bytes(r.measured), relative_text(r.relative(), " %"));
}

}  // namespace

std::vector<ReportRow> build_report(const std::vector<std::string>& roots, const GpuProfile& trainer_gpu,
                                    std::vector<SkippedFile>* skipped) {
    std::vector<ReportRow> rows;
    for (const std::string& path : measurement_files(roots, skipped)) {
        const StepFile f = load_step_file(path);
        const auto [model, setup] = measured_step(f);
        ReportRow row;
        row.file = path;
        row.model = f.timeline.model;
        row.backend = f.timeline.source;
        row.device = f.device;
        row.setup = describe(setup, model.num_layers);
        if (f.timeline.rank >= 0) row.setup += fmt::format(", rank {}", f.timeline.rank);  // (ranks that differ: its own step)
        if (f.peaks) {
            const std::vector<CompareRow> peaks = compare_peaks(f, trainer_gpu);
            row.peaks_only = true;
            row.peak = peaks.at(0);
            row.reserved = peaks.at(1);
        } else {
            const Timeline predicted = predict_measured(f);
            const Comparison c = compare_timelines(predicted, f.timeline, model.num_layers);
            row.peak = c.rows.front();
            row.identical = c.identical();
            for (const CompareRow& r : c.rows)
                if (r.label.starts_with("phase ") &&
                    (row.worst_phase.empty() || std::fabs(r.relative()) > std::fabs(row.worst_phase_error))) {
                    row.worst_phase = r.label.substr(6);
                    row.worst_phase_error = r.relative();
                }
            if (f.device_peak_reserved && f.allocator.starts_with("caching"))
                row.reserved = CompareRow{"peak reserved",
                                          replay_caching_allocator(predicted, AllocatorConstants{}).peak_reserved,
                                          *f.device_peak_reserved};
        }
        rows.push_back(std::move(row));
    }
    return rows;
}

std::vector<const ReportRow*> report_outliers(const std::vector<ReportRow>& rows, const ReportLimits& limits) {
    std::vector<const ReportRow*> out;
    for (const ReportRow& r : rows) {
        const bool off = r.peaks_only ? std::fabs(r.peak.relative()) > limits.trainer_peak
                                      : std::fabs(r.peak.relative()) > limits.peak ||
                                            std::fabs(r.worst_phase_error) > limits.phase ||
                                            (r.reserved && std::fabs(r.reserved->relative()) > limits.peak);
        if (off) out.push_back(&r);
    }
    return out;
}

namespace {

// Text from a measurement (its file's name, its model's) in a table cell: on one line, its bars escaped,
// no backtick to end a code span.
std::string md_cell(const std::string& text) {
    std::string out;
    for (const char c : printable(text)) {
        if (c == '|') out += "\\|";
        else out += c == '`' ? '\'' : c;
    }
    return out;
}

}  // namespace

std::string report_markdown(const std::vector<ReportRow>& rows, const std::string& command) {
    std::string md = "# Predicted vs measured memory\n\n";
    md += fmt::format("Generated by `{} --out FILE` from the measurements below; do not edit by hand.\n"
                      "Each measurement is re-simulated from the model and setup it recorded.\n\n",
                      md_cell(command));
    md += "| measurement | model | backend | setup | peak: predicted / measured / error | worst phase | reserved: "
          "predicted / measured / error | events |\n";
    md += "| --- | --- | --- | --- | --- | --- | --- | --- |\n";
    for (const ReportRow& r : rows) {
        const std::string backend = r.device.empty() ? r.backend : fmt::format("{} ({})", r.backend, r.device);
        const std::string phase = r.worst_phase.empty() || r.worst_phase_error == 0
                                      ? "-"
                                      : fmt::format("{} {}", r.worst_phase, relative_text(r.worst_phase_error, " %"));
        const std::string events = !r.identical ? "peaks only" : *r.identical ? "identical" : "differ";
        md += fmt::format("| `{}` | {} | {} | {} | {} | {} | {} | {} |\n", md_cell(r.file), md_cell(r.model), md_cell(backend), r.setup,
                          compare_cell(r.peak), phase, r.reserved ? compare_cell(*r.reserved) : "-", events);
    }
    md += "\nPeak: the largest live bytes (requested sizes; a trainer's run: `torch.cuda.max_memory_allocated`). "
          "Reserved: what a caching allocator held (`measure --allocator caching`, or a trainer's "
          "`max_memory_reserved`), predicted by replaying the prediction through the allocator model. "
          "Worst phase: the phase (init, forward, recompute, backward, optimizer) whose peak differs most "
          "(- when every phase peak is equal). "
          "Events: whether every allocation and free matches in order, bytes, category, op and layer.\n";
    return md;
}

}  // namespace mst
