#pragma once
// Timeline: every allocation and free of one training step, in order. The
// simulator predicts one, the executors measure one, in the same format; every
// peak, breakdown and plot is a view computed from it.
#include <array>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "mst/gpu.hpp"
#include "mst/units.hpp"

namespace mst {

enum class Phase { Init, Forward, Recompute, Backward, Optimizer };
enum class Category {
    Weights,          // parameters in their storage dtype (ZeRO-3: the shard, plus all-gathered copies)
    MasterWeights,    // fp32 master copy (Bf16Master)
    Gradients,        // parameter gradients
    OptimizerState,   // Adam moments, momentum, 8-bit quantisation state
    SavedActivation,  // tensors autograd holds for backward
    Transient,        // lives within one op or block
    Checkpoint,       // layer inputs kept by activation checkpointing
    Offloaded,        // checkpoints copied to host memory
    Workspace,        // cuBLAS workspace and other fixed buffers
};
enum class Device { Gpu, Host };

inline constexpr int kPhaseCount = 5;
inline constexpr int kCategoryCount = 9;

std::string to_string(Phase p);
std::string to_string(Category c);
std::string to_string(Device d);
Phase parse_phase(const std::string& s, const std::string& where);
Category parse_category(const std::string& s, const std::string& where);

struct Event {
    bool alloc = true;        // false: free
    std::int64_t tensor = 0;  // id, unique within the timeline; a free names its alloc's id
    bytes_t bytes = 0;        // requested bytes (the allocator's rounding is a view)
    Category category = Category::Transient;
    Device device = Device::Gpu;
    Phase phase = Phase::Forward;
    std::int32_t layer = -1;       // decoder layer, -1 outside the layers
    std::int32_t micro_step = 0;
    std::string op;                // "mlp.gate_up", "lm_head.loss", ...
    std::string name;              // the tensor: "g", "logits_fp32", ...
};

struct Timeline {
    std::string source;  // "simulator", "cpu", "cuda", "torch"
    std::string model;   // model name
    std::vector<Event> events;
    std::int32_t micro_steps = 1;            // micro-steps in the real step
    std::int32_t micro_steps_recorded = 1;   // the ones in `events`: the first two, later ones repeating the second;
                                             // FSDP2 accumulating unsynced: the first, one of the middle ones, the last
    std::int64_t rank = -1;  // the sequence-parallel rank walked where ranks differ (ring attention), else -1
};

// ---- views ---------------------------------------------------------------------

using CategoryBytes = std::array<bytes_t, kCategoryCount>;

struct Peak {
    bytes_t bytes = 0;
    std::int64_t event = -1;  // index of the event right after which the peak holds
    CategoryBytes by_category{};
};

struct Summary {
    Peak peak;                                     // GPU, requested bytes
    std::array<bytes_t, kPhaseCount> phase_peak{};  // GPU peak reached within each phase
    std::array<bool, kPhaseCount> phase_seen{};     // whether the phase has any event
    CategoryBytes category_max{};                   // largest live bytes of each category at any time
    bytes_t host_peak = 0;                          // offloaded bytes on the host
    bytes_t end_bytes = 0;                          // live GPU bytes at the end (persistent state)
    bytes_t largest_transient = 0;                  // largest live transient bytes at any time
    std::vector<bytes_t> layer_saved;               // per layer: saved + checkpoint bytes live after its forward
};

Summary summarize(const Timeline& t, std::int64_t num_layers);

// Replays the timeline through a model of PyTorch's CUDA caching allocator
// (512-byte rounding, small/large pools, best-fit with splitting, segments kept until the
// device is full): what torch.cuda.max_memory_allocated and max_memory_reserved report.
struct AllocatorReplay {
    bytes_t peak_allocated = 0;
    bytes_t peak_reserved = 0;
    std::int64_t segments_released = 0;  // cached segments released to make room (capacity reached)
    std::vector<bytes_t> reserved_after;  // per event
    std::vector<bytes_t> allocated_after;
};
// `capacity`: the device's bytes for the allocator; a segment that would pass them releases the
// cached segments first, as PyTorch does when cudaMalloc fails (no limit by default).
AllocatorReplay replay_caching_allocator(const Timeline& t, const AllocatorConstants& constants,
                                         bytes_t capacity = std::numeric_limits<bytes_t>::max());

// Live GPU bytes after each event.
std::vector<bytes_t> live_curve(const Timeline& t);

nlohmann::json to_json(const Timeline& t);
Timeline timeline_from_json(const nlohmann::json& j, const std::string& where);

// Checks that every free names a live allocation and sizes match: a bug otherwise.
void check_consistent(const Timeline& t);

}  // namespace mst
