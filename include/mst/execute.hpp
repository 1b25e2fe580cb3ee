#pragma once
// The measured side: run one real training step of a Llama-family decoder on a
// backend and record every allocation and free in a Timeline (the simulator's format),
// so that `compare` can diff a prediction against a measurement.
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

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
};

struct NamedValues {
    std::string name;  // "embed_tokens", "layers.0.q_proj", ..., "lm_head"
    std::vector<float> values;
};

struct MeasuredStep {
    Timeline timeline;  // source "cpu"
    // Mean cross-entropy per token, averaged over the executed micro-steps.
    double loss = 0;
    // Wall seconds spent in each op (the timeline's op names), in first-seen order.
    std::vector<std::pair<std::string, double>> op_seconds;
    double wall_seconds = 0;
    std::vector<NamedValues> gradients;   // options.capture
    std::vector<NamedValues> parameters;  // options.capture
};

// One optimizer step on the CPU reference backend: random weights and tokens from
// `seed`, min(grad_accum, 2) micro-steps (the ones the simulator records), then the
// optimizer. A UserError names the knob when the setup cannot run in one CPU process
// (dp, ZeRO, sp) or needs a kernel the backend does not have.
MeasuredStep execute_cpu(const ModelSpec& model, const TrainingSetup& setup, std::uint64_t seed,
                         const ExecuteOptions& options = {});

}  // namespace mst
