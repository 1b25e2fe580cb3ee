#pragma once
// The simulator: walks the op sequence of one training step of a decoder-only
// transformer and predicts every allocation and free (see docs/memory-model.md).
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "mst/gpu.hpp"
#include "mst/model.hpp"
#include "mst/setup.hpp"
#include "mst/timeline.hpp"

namespace mst {

// The predicted timeline of one optimizer step (validate(setup, model) first). When ranks differ
// (walked_ranks: ring attention, DeepSpeed's ZeRO in the hf runtime), the step of the rank with
// the highest requested peak.
Timeline simulate(const ModelSpec& model, const TrainingSetup& setup, const GpuProfile& gpu);
// The step of rank `rank`: of ring attention's sp, or of DeepSpeed's dp.
Timeline simulate_rank(const ModelSpec& model, const TrainingSetup& setup, const GpuProfile& gpu, std::int64_t rank);

// Only the peaks, without keeping the events: what the tuner evaluates thousands of times.
struct MemoryPeaks {
    bytes_t peak_bytes = 0;            // requested bytes
    bytes_t peak_allocated_bytes = 0;  // caching-allocator blocks
    bytes_t peak_reserved_bytes = 0;   // caching-allocator segments
    bytes_t host_peak_bytes = 0;       // offloaded checkpoints
    std::int64_t segments_released = 0;  // cached segments the allocator released at the device's capacity
};
// Without `allocator`, only peak_bytes and host_peak_bytes are filled (several times faster):
// enough to rule a setup out, since reserved >= allocated >= requested. `capacity`: the device
// bytes where the allocator model releases its cached segments (none by default).
inline constexpr bytes_t kNoCapacity = std::numeric_limits<bytes_t>::max();
MemoryPeaks simulate_peaks(const ModelSpec& model, const TrainingSetup& setup, const GpuProfile& gpu,
                           bool allocator = true, bytes_t capacity = kNoCapacity);

// simulate_peaks for many setups of one model on one GPU (the tuner, max-seq): one simulator
// whose tables are reused from setup to setup, and a fits() that stops a step as soon as a peak
// is over budget. The same numbers as simulate_peaks (a test holds them equal).
class PeakSimulator {
public:
    // `workers`: threads that walk the ranks of a step whose ranks differ (ring attention's,
    // DeepSpeed's), each with tables of its own; 0: one per CPU this process may run on (at most
    // 16). The numbers do not depend on it (a test holds them equal).
    PeakSimulator(const ModelSpec& model, const GpuProfile& gpu, int workers = 0);  // both must outlive it
    ~PeakSimulator();
    PeakSimulator(const PeakSimulator&) = delete;
    PeakSimulator& operator=(const PeakSimulator&) = delete;

    MemoryPeaks peaks(const TrainingSetup& setup, bool allocator = true, bytes_t capacity = kNoCapacity);
    // Peak reserved within `budget_bytes` and offloaded bytes within `host_budget_bytes`; then
    // `out` (when given) receives the peaks. The budget is the device's capacity as planned: the
    // allocator model releases its cached segments there before it gives up, as PyTorch does.
    // Without `allocator`, the requested peak stands for reserved: a setup it rules out does not
    // fit, one it admits may still not.
    bool fits(const TrainingSetup& setup, bytes_t budget_bytes, bytes_t host_budget_bytes, MemoryPeaks* out = nullptr,
              bool allocator = true);
    // Events the allocator replays skipped so far (repeating chunk-loop iterations; tests).
    std::int64_t skipped_events() const;

private:
    // One step under the budgets (each the numeric maximum when there is none): false as soon as
    // a peak passes one; else the peaks into `out`.
    bool run(const TrainingSetup& setup, bool allocator, bytes_t budget_bytes, bytes_t host_budget_bytes, bytes_t capacity,
             MemoryPeaks& out);
    struct Scratch;
    // One rank's step (`rank` < 0: ranks alike) with `scratch`'s tables: false when a peak passes a budget.
    bool walk(Scratch& scratch, const TrainingSetup& setup, std::int64_t rank, bool allocator, bytes_t budget_bytes,
              bytes_t host_budget_bytes, bytes_t capacity, MemoryPeaks& out);
    // The allocator model over `scratch`'s captured events on a device of `capacity` bytes; false as
    // soon as reserved bytes pass `limit`.
    bool replay(Scratch& scratch, bytes_t capacity, bytes_t limit, MemoryPeaks& out);
    const ModelSpec& model_;
    const GpuProfile& gpu_;
    std::vector<std::unique_ptr<Scratch>> scratch_;  // one per worker; the first walks alone
};

// Everything `estimate` prints: the timeline and its views.
struct Estimate {
    Timeline timeline;
    Summary summary;
    AllocatorReplay allocator;  // torch-style allocated / reserved peaks
    bytes_t usable_bytes = 0;   // GPU memory the process can reserve
    bytes_t context_bytes = 0;  // CUDA context, outside the allocator
    bytes_t headroom_bytes = 0; // usable - peak reserved (negative: does not fit)
    bool fits = false;
    std::int64_t ranks_walked = 0;  // walked_ranks(): the ranks whose steps the peaks and verdict cover
};

// `capacity`: where the allocator model releases its cached segments; the GPU's usable bytes when absent.
// When ranks differ (walked_ranks) every rank's step is walked (the timeline: the highest requested
// peak; the allocator's peaks: the highest of any rank's), or only `rank`'s when given.
Estimate estimate(const ModelSpec& model, const TrainingSetup& setup, const GpuProfile& gpu,
                  std::optional<bytes_t> capacity = std::nullopt, std::optional<std::int64_t> rank = std::nullopt);
nlohmann::json to_json(const Estimate& e, const ModelSpec& model, const TrainingSetup& setup, const GpuProfile& gpu);

}  // namespace mst
