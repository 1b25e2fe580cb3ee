#pragma once
// The time model: a roofline per op (FLOPs against the profile's bf16 TFLOP/s,
// bytes against its HBM GB/s, each with a calibrated efficiency, and at least one
// kernel launch per kernel), plus recompute, chunking, offload and communication.
// It ranks setups in the tuner; absolute numbers are as good as the calibration.
#include <string>
#include <vector>

#include "mst/gpu.hpp"
#include "mst/model.hpp"
#include "mst/setup.hpp"

namespace mst {

// One op of one micro-step on one GPU, summed over layers and chunks.
struct OpTime {
    std::string name;    // "mlp.gate_up (fwd)", "attention (bwd)", "lm_head.loss (fwd)", ...
    double flops = 0;
    double bytes = 0;    // HBM traffic
    double kernels = 0;  // launches
    double seconds = 0;
};

struct StepTime {
    double forward_seconds = 0;       // per micro-step
    double backward_seconds = 0;      // per micro-step, recompute excluded
    double recompute_seconds = 0;     // per micro-step: checkpointed layers and tiled MLP re-run forward
    double optimizer_seconds = 0;     // per step
    double offload_exposed_seconds = 0;  // per micro-step: host transfers not hidden behind compute
    double comm_seconds = 0;          // per step: data-parallel + ZeRO + sequence- and expert-parallel traffic
    double comm_exposed_seconds = 0;  // per step: the part not overlapped with compute
    double ulysses_seconds = 0;          // per step: Ulysses' all-to-alls (exposed, part of the above)
    double ring_seconds = 0;             // per step: ring attention's K/V gathers and dK/dV passes not hidden by its blocks
    double expert_parallel_seconds = 0;  // per step: expert parallelism's all-to-alls (exposed, part of the above)
    double step_seconds = 0;          // one optimizer step, all micro-steps
    double model_flops = 0;           // per GPU per step: 6 N T + causal attention, no recompute
    double tokens_per_second = 0;     // per GPU
    double mfu = 0;                   // model_flops / (step_seconds * peak)
};

// Defaults for what a GPU profile does not say about the cluster.
struct ClusterShape {
    std::int64_t gpus_per_node = 8;
    double network_gbps = 50;  // per GPU between nodes: 400 Gb/s InfiniBand NDR
};

StepTime predict_time(const ModelSpec& model, const TrainingSetup& setup, const GpuProfile& gpu,
                      const ClusterShape& cluster = {});
// The compute ops of one micro-step that predict_time() sums (checkpoints' recomputation aside),
// one row per op name.
std::vector<OpTime> predict_op_times(const ModelSpec& model, const TrainingSetup& setup, const GpuProfile& gpu,
                                     const ClusterShape& cluster = {});

// Causal query-key pairs of one sequence of S tokens, each query attending to at most
// `window` keys (0 = no window): sum over t of min(t + 1, window).
double causal_pairs(std::int64_t seq_len, std::int64_t window);

}  // namespace mst
