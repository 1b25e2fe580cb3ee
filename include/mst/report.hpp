#pragma once
// The validation table: every measurement (mst-measure/1) under some folders re-simulated and
// compared, one row each, as Markdown -- `mst-plan report results --out results/README.md`
// writes the committed table, and `--check` (run by CI) fails when a committed measurement no
// longer agrees with the simulator.
#include <optional>
#include <string>
#include <vector>

#include "mst/compare.hpp"
#include "mst/gpu.hpp"

namespace mst {

struct ReportRow {
    std::string file;                    // the measurement, as found under its root
    std::string model, backend, setup;   // setup: one line
    std::string device;                  // the GPU it ran on ("" for the CPU backend)
    bool peaks_only = false;             // a trainer's run: peaks, no events
    CompareRow peak;                     // predicted vs measured peak (allocated for a trainer's run)
    std::optional<CompareRow> reserved;  // the caching allocator's reserved peak, when measured
    std::string worst_phase;             // the phase with the largest relative error ("" if none)
    double worst_phase_error = 0;        // its relative error
    std::optional<bool> identical;       // timelines: equal event by event
};

// A *.json file a report leaves out although it may be a measurement: one that does not parse (a
// run killed while writing), or one whose format names another measurement format ("mst-measure/1 ",
// "mst-measure/2"), with why.
struct SkippedFile {
    std::string path, reason;
};

// Every *.json of format mst-measure/1 under `roots` (files or folders, recursively), once each, in
// path order. Peaks-only runs are simulated on `trainer_gpu` (its cuBLAS workspace and allocator).
// The files left out that may be measurements are listed in `skipped` when given (other JSON, such
// as a plan, is not).
std::vector<ReportRow> build_report(const std::vector<std::string>& roots, const GpuProfile& trainer_gpu,
                                    std::vector<SkippedFile>* skipped = nullptr);

// The Markdown page: a title, how it was made (`command`), the table, and the legend.
std::string report_markdown(const std::vector<ReportRow>& rows, const std::string& command);

// What --check accepts, relative errors. A measured step (a timeline) must match the simulator to
// `peak` (its peak and, with the caching allocator, its reserved peak) and `phase` (every phase
// peak); a trainer's peaks-only run holds PyTorch's own temporaries the executor does not model
// (docs/executor.md), so its allocated peak is held to `trainer_peak` and its reserved peak is
// reported, not checked.
struct ReportLimits {
    double peak = 0.01, phase = 0.02, trainer_peak = 0.05;
};
std::vector<const ReportRow*> report_outliers(const std::vector<ReportRow>& rows, const ReportLimits& limits);

}  // namespace mst
