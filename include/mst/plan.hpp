#pragma once
// Plan: a training setup for one model on a GPU cluster, with what mst-plan predicts
// for it. `recommend` writes plans (--json / --out PLAN.json), `emit` turns a plan
// into trainer configs.
#include <cstdint>
#include <string>

#include <nlohmann/json_fwd.hpp>

#include "mst/model.hpp"
#include "mst/setup.hpp"
#include "mst/units.hpp"

namespace mst {

struct Prediction {
    bytes_t peak_allocated_bytes = 0;  // torch.cuda.max_memory_allocated
    bytes_t peak_reserved_bytes = 0;   // torch.cuda.max_memory_reserved
    bytes_t usable_bytes = 0;          // what the GPU profile leaves a process
    // usable - reserved - safety margin - the trainer's own extra (recommend --for). Negative where the step fits the
    // budget only as PyTorch's allocator frees its cached segments and retries (releases_at_budget > 0): the reserved
    // peak is the GPU's, whose allocator holds its cache until a cudaMalloc fails.
    bytes_t headroom_bytes = 0;
    std::int64_t releases_at_budget = 0;  // cached segments the allocator frees to stay within the budget
    bytes_t host_bytes = 0;            // pinned host memory for offloaded checkpoints
    double step_seconds = 0;           // one optimizer step (all micro-steps)
    double tokens_per_second = 0;      // per GPU
    double mfu = 0;                    // model FLOPs utilisation, 0..1
};

struct Plan {
    std::string model;      // catalog name or path of the config.json
    std::string gpu;        // profile name or path
    std::int64_t gpus = 1;  // total GPUs: dp * sp
    TrainingSetup setup;
    Prediction prediction;
    std::string why;  // one paragraph: what limits the plan, what was traded
};

nlohmann::json to_json(const Plan& p);
// `model` resolves the setup's per-layer fields; `where` names the file in errors.
Plan plan_from_json(const nlohmann::json& j, const ModelSpec& model, const std::string& where);
// Reads a plan file, finding its model and GPU profile in the catalog (or at their paths). A
// recorded prediction must hold the simulator's memory numbers for that model, GPU and setup.
Plan load_plan_file(const std::string& path, ModelSpec* model_out = nullptr);

}  // namespace mst
