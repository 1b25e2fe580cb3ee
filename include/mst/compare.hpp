#pragma once
// Predicted vs measured: two timelines of the same step (simulator vs an executor, or
// any two) compared by their views -- peak, per-phase peaks, per-category maxima -- and
// event by event, down to the first event where they diverge.
#include <cstdint>
#include <optional>
#include <utility>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "mst/execute.hpp"
#include "mst/gpu.hpp"
#include "mst/model.hpp"
#include "mst/setup.hpp"
#include "mst/timeline.hpp"

namespace mst {

// Two events are the same when every field is (kind, tensor id, bytes, category,
// device, phase, layer, micro-step, op and tensor name); with `names` false, all but the op
// and the tensor name.
bool same_event(const Event& a, const Event& b, bool names = true);

// Index of the first event that differs, or where the shorter timeline ends; nullopt when
// both have the same events. Against the referee (source "referee": the real PyTorch step,
// whose events name aten ops and module paths, not the simulator's ops) the op and tensor
// names are not compared.
std::optional<std::int64_t> first_divergence(const Timeline& predicted, const Timeline& measured);

struct CompareRow {
    std::string label;  // "peak", "phase forward", "category gradients", "host peak"
    bytes_t predicted = 0, measured = 0;
    bytes_t error() const { return measured - predicted; }  // absolute, bytes
    // error / predicted: 0 when both are 0, infinite (of the error's sign) when only the prediction
    // is 0 (no finite relative error: relative_text() says so, relative_json() is null).
    double relative() const;
};

// A relative error as text ("+1.234%", or "n/a (predicted 0)" where it is not finite) and as JSON (null there).
std::string relative_text(double relative, const char* unit = "%");
nlohmann::json relative_json(double relative);

struct Comparison {
    std::vector<CompareRow> rows;  // peak first, then phases, categories, host
    std::int64_t predicted_events = 0, measured_events = 0;
    std::optional<std::int64_t> divergence;  // first differing event
    std::optional<Event> predicted_event, measured_event;  // at the divergence (absent past an end)
    bool identical() const { return !divergence; }
    bytes_t peak_error() const { return rows.front().error(); }
};

Comparison compare_timelines(const Timeline& predicted, const Timeline& measured, std::int64_t num_layers);
nlohmann::json to_json(const Comparison& c);

// ---- the files compare reads ----------------------------------------------------------

inline constexpr const char* kMeasureFormat = "mst-measure/1";

// A measurement (`mst-plan measure --out DIR` writes DIR/measured.json):
// {"format": "mst-measure/1", "backend", "model", "model_path", "seed", "workspace_bytes",
//  "setup": to_json(setup), "timeline": to_json(timeline), "summary": {...}}.
nlohmann::json measurement_json(const MeasuredStep& step, const std::string& backend, const ModelSpec& model,
                                const TrainingSetup& setup, std::uint64_t seed, bytes_t workspace_bytes);

// A timeline file (mst-timeline/1, `estimate --timeline`) or a measurement file.
// What a trainer reports without a timeline (scripts/torch_crosscheck.py: "timeline": null):
// torch.cuda.max_memory_allocated / max_memory_reserved of a steady-state step.
struct MeasuredPeaks {
    bytes_t allocated = 0;
    bytes_t reserved = 0;
};

struct StepFile {
    std::string path;
    std::string format;               // "mst-timeline/1" or "mst-measure/1"
    Timeline timeline;                // events empty for a peaks-only measurement
    std::optional<MeasuredPeaks> peaks;  // a peaks-only measurement (backend "torch")
    std::string setup_json;           // measurement: to_json(setup), serialised; empty for a timeline
    std::string backend;              // measurement: cpu, cuda (mst-plan's kernels), torch or referee (Hugging Face)
    std::string model_path;           // measurement: the config.json it ran
    bytes_t workspace_bytes = 0;      // measurement: the fixed workspace it allocated
    // measurement on the CUDA backend: the device report's GPU, allocator and reserved peak
    std::string device, allocator;
    std::optional<bytes_t> device_peak_reserved;
};
StepFile load_step_file(const std::string& path);  // UserError naming the file and field on bad input
// The same from a document already read; `path` names it in errors (and locates its model config).
StepFile parse_step_file(const nlohmann::json& j, const std::string& path);

// UserError unless both describe the same step: same model, same micro-steps, and the same
// setup when both files record one.
void check_same_step(const StepFile& predicted, const StepFile& measured);

// The model and setup a measurement ran. The model is a file of its model_path's name beside the
// measurement or in a folder above it (a config committed with results measured elsewhere), else
// in the catalog's models folder, else model_path as recorded, else the catalog entry of the
// model's name.
// A torchtitan run (model_code torchtitan) whose setup torchtitan's step is not modelled for is re-simulated
// as its plan predicted it (its runtime, transformers' model code): `note` (when given) says so and why.
std::pair<ModelSpec, TrainingSetup> measured_step(const StepFile& measured, std::string* note = nullptr);

// The simulator's prediction for the model and setup a measurement recorded.
Timeline predict_measured(const StepFile& measured, std::string* note = nullptr);

// A torchtitan run of a kernels-runtime plan (model_code torchtitan, runtime kernels) as torchtitan's own step
// would predict it: the measurement with its setup's runtime hf (over several ranks ZeRO 3 as fsdp2, ZeRO 2 as
// fsdp2 kept gathered from forward to backward: torchtitan's fsdp_reshard_after_forward never), as recommend
// --for torchtitan plans it; none where that step is not modelled for the setup or the run is another.
std::optional<StepFile> as_torchtitan_step(const StepFile& measured);

// A peaks-only measurement against the simulator's allocated and reserved peaks for the
// same model and setup on `gpu` (whose cuBLAS workspace a real trainer allocates too).
std::vector<CompareRow> compare_peaks(const StepFile& measured, const GpuProfile& gpu, std::string* note = nullptr);

}  // namespace mst
