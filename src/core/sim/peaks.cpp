// PeakSimulator: the peaks-only simulator reused across setups (include/mst/simulate.hpp).
//
// A step is simulated once for its requested and offloaded bytes, its GPU allocations and
// frees captured in order; the caching-allocator model then replays them in a tight loop for
// allocated and reserved bytes. Reserved bytes are never fewer than requested ones, so a
// budget check stops the step as soon as requested bytes pass the budget, and the replay as
// soon as reserved bytes do; most setups the tuner rules out never reach the allocator.
#include "../caching_allocator.hpp"
#include "builder.hpp"
#include "mst/simulate.hpp"

namespace mst {

struct PeakSimulator::Scratch {
    sim::PeakScratch step;
    detail::CachingAllocatorModel allocator{AllocatorConstants{}};
};

PeakSimulator::PeakSimulator(const ModelSpec& model, const GpuProfile& gpu)
    : model_(model), gpu_(gpu), scratch_(std::make_unique<Scratch>()) {}

PeakSimulator::~PeakSimulator() = default;

namespace {

// Peak allocated and reserved bytes of the captured events into `p`; false as soon as reserved
// bytes pass `limit` (reserved bytes only grow: segments are never returned).
bool replay(detail::CachingAllocatorModel& allocator, const std::vector<sim::GpuEvent>& events, bytes_t limit,
            MemoryPeaks& p) {
    for (const sim::GpuEvent& e : events) {
        if (e.bytes >= 0) allocator.allocate(e.tensor, e.bytes);
        else allocator.release(e.tensor);
        p.peak_allocated_bytes = std::max(p.peak_allocated_bytes, allocator.allocated());
        p.peak_reserved_bytes = allocator.reserved();
        if (p.peak_reserved_bytes > limit) return false;
    }
    return true;
}

}  // namespace

bool PeakSimulator::run(const TrainingSetup& setup, bool allocator, bytes_t budget_bytes, bytes_t host_budget_bytes,
                        MemoryPeaks& out) {
    validate(setup, model_);
    sim::StepBuilder b(model_, setup, gpu_, false, sim::PeakRun{&scratch_->step, {budget_bytes, host_budget_bytes}, allocator});
    try {
        b.run();
    } catch (const sim::OverBudget&) {
        return false;
    }
    out = b.peaks();
    if (!allocator) return true;
    scratch_->allocator.reset(gpu_.calibration.allocator);
    return replay(scratch_->allocator, scratch_->step.gpu_events, budget_bytes, out);
}

MemoryPeaks PeakSimulator::peaks(const TrainingSetup& setup, bool allocator) {
    MemoryPeaks p;
    run(setup, allocator, std::numeric_limits<bytes_t>::max(), std::numeric_limits<bytes_t>::max(), p);
    return p;
}

bool PeakSimulator::fits(const TrainingSetup& setup, bytes_t budget_bytes, bytes_t host_budget_bytes, MemoryPeaks* out,
                         bool allocator) {
    MemoryPeaks p;
    if (!run(setup, allocator, budget_bytes, host_budget_bytes, p)) return false;
    if (out) *out = p;
    return true;
}

}  // namespace mst
