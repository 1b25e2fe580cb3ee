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

// Every *.json of format mst-measure/1 under `roots` (files or folders, recursively), in path
// order. Peaks-only runs are simulated on `trainer_gpu` (its cuBLAS workspace and allocator).
std::vector<ReportRow> build_report(const std::vector<std::string>& roots, const GpuProfile& trainer_gpu);

// The Markdown page: a title, how it was made (`command`), the table, and the legend.
std::string report_markdown(const std::vector<ReportRow>& rows, const std::string& command);

// The rows whose peak error exceeds max_peak or any phase error exceeds max_phase (relative).
std::vector<const ReportRow*> report_outliers(const std::vector<ReportRow>& rows, double max_peak, double max_phase);

}  // namespace mst
