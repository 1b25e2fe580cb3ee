#pragma once
// The measured side: run one real training step of a Llama-family decoder on a
// backend and record every allocation and free in a Timeline (the simulator's format),
// so that `compare` can diff a prediction against a measurement.
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "mst/error.hpp"
#include "mst/model.hpp"
#include "mst/setup.hpp"
#include "mst/timeline.hpp"

namespace mst {

struct ExecuteOptions {
    // The cuBLAS-workspace equivalent: a fixed buffer allocated at init when > 0 (the
    // simulator allocates the GPU profile's calibration.cublas_workspace_bytes).
    bytes_t workspace_bytes = 0;
    // Numerics tests only: every tensor (parameters, gradients, optimizer states and
    // activations) is stored in fp32 whatever the precision policy, so that chunked and
    // unchunked steps can be compared to fp32 rounding. The timeline then no longer
    // matches the simulator's bytes (its dtypes are the policy's).
    bool storage_fp32 = false;
    // Return every parameter's gradient (as the optimizer receives it) and value after
    // the step, as fp32 copies made outside the tracked memory.
    bool capture = false;
    // Numerics tests only (with storage_fp32): after init, element `index` of the parameter
    // `param` (as capture names it: "layers.L.NAME" or a model-level name) moves by `delta`,
    // so that a test can take finite differences of the loss.
    struct Nudge {
        std::string param;
        std::int64_t index = 0;
        float delta = 0;
    };
    std::optional<Nudge> nudge;
};

// A real step ran out of backend memory: the allocation that failed (its name, bytes, op, layer,
// phase) and the bytes live on the device at that moment. `memory` names what ran out ("gpu
// memory on the cuda backend", "host memory on the cpu backend"). `mst-plan measure` exits with
// code 4.
class OutOfMemoryError : public UserError {
public:
    OutOfMemoryError(const Event& request, bytes_t live_bytes, const std::string& memory, const std::string& cause);
    Event request;
    bytes_t live_bytes = 0;
};

struct NamedValues {
    std::string name;  // "embed_tokens", "layers.0.q_proj", ..., "lm_head"
    std::vector<float> values;
};

// What the CUDA backend reports besides the timeline: where its events came from and what the
// device said about memory the timeline cannot show.
struct DeviceReport {
    std::string device;         // "NVIDIA H100 80GB HBM3, sm_90, 79.1 GiB"
    std::string allocator;      // "exact (cudaMallocAsync ...)" / "caching (...)"
    std::string recorder;       // CUPTI's status
    std::string timeline_note;  // where the measured events came from, with CUPTI's counters
    bool from_cupti = false;    // the device events are CUPTI's MEMORY2 records
    std::int64_t dropped_records = 0, unmatched_records = 0, size_mismatches = 0;
    // The measured device events equal the executor's own log, event by event (kind, bytes,
    // name, category, op, layer, phase); else the first difference.
    bool matches_executor_log = false;
    std::string first_difference;
    bytes_t peak_allocated = 0, peak_reserved = 0;  // the device allocator's (caching: PyTorch's view)
    // cudaMemGetInfo: device memory in use before the step (the context, cuBLAS, the runtime)
    // and after it (the persistent state still alive), and the device's total.
    bytes_t used_before = 0, used_after = 0, total = 0;
    std::int64_t kernels = 0;     // CUPTI kernel records
    double kernel_seconds = 0;    // their summed durations
};

struct MeasuredStep {
    Timeline timeline;  // source "cpu" or "cuda"
    // Mean cross-entropy per token, averaged over the executed micro-steps.
    double loss = 0;
    // Wall seconds spent in each op (the timeline's op names), in first-seen order.
    std::vector<std::pair<std::string, double>> op_seconds;
    double wall_seconds = 0;
    std::vector<NamedValues> gradients;   // options.capture
    std::vector<NamedValues> parameters;  // options.capture
    std::optional<DeviceReport> device;   // the CUDA backend's
};

// One optimizer step on the CPU reference backend: random weights and tokens from
// `seed`, min(grad_accum, 2) micro-steps (the ones the simulator records), then the
// optimizer. A UserError names the knob when the setup cannot run in one CPU process
// (dp, ZeRO, sp) or needs a kernel the backend does not have.
MeasuredStep execute_cpu(const ModelSpec& model, const TrainingSetup& setup, std::uint64_t seed,
                         const ExecuteOptions& options = {});

struct CudaOptions {
    // PyTorch's caching allocator (the timeline is its per-tensor log; peak_reserved is what
    // torch.cuda.max_memory_reserved reports) instead of one cudaMallocAsync per tensor (which
    // CUPTI records tensor by tensor).
    bool caching_allocator = false;
    bool cupti = true;  // false: the allocator's own log, without CUPTI
};

// The same step, by the same executor, on the local GPU through the CUDA kernels: the same
// weights (counter-based), tokens, buffers and order as execute_cpu with the same seed. A
// UserError when this build has no CUDA backend or the machine no usable device.
MeasuredStep execute_cuda(const ModelSpec& model, const TrainingSetup& setup, std::uint64_t seed,
                          const ExecuteOptions& options = {}, const CudaOptions& cuda = {});

}  // namespace mst
