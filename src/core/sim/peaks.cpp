// PeakSimulator: the peaks-only simulator reused across setups (include/mst/simulate.hpp).
//
// A step is simulated once for its requested and offloaded bytes, its GPU allocations and
// frees captured in order; the caching-allocator model then replays them in a tight loop for
// allocated and reserved bytes. Reserved bytes are never fewer than requested ones, so a
// budget check stops the step as soon as requested bytes pass the budget, and the replay as
// soon as reserved bytes do; most setups the tuner rules out never reach the allocator. Setups
// the tuner compares one after the other often share the start of the step, and a replay
// resumes from a snapshot of the previous one where they do (replay()). Chunk loops skip the
// iterations that repeat (loop_replay.hpp).
#include <algorithm>
#include <atomic>

#include "../caching_allocator.hpp"
#include "../parallel_for.hpp"
#include "builder.hpp"
#include "loop_replay.hpp"
#include "mst/simulate.hpp"

namespace mst {

struct PeakSimulator::Scratch {
    // The allocator model after the first `at` events of the last replay, and the peak allocated
    // bytes until then.
    struct Snapshot {
        std::size_t at = 0;
        bytes_t peak_allocated = 0, peak_reserved = 0;
        detail::CachingAllocatorModel model{AllocatorConstants{}};
    };
    sim::PeakScratch step;
    detail::CachingAllocatorModel allocator{AllocatorConstants{}};
    std::vector<sim::GpuEvent> replayed;  // the events of the last replay
    std::vector<std::size_t> replayed_marks;      // and its chunk loops' iterations
    std::vector<std::int64_t> replayed_counts;
    std::vector<Snapshot> snapshots;      // the first `valid` hold prefixes of `replayed`, ascending
    std::size_t valid = 0;
    bytes_t capacity = -1;  // the device capacity the snapshots were replayed under
    sim::LoopReplay loops;  // chunk loops, skipping their repeats
};

namespace {

// The threads this process may run on, at most 16: each worker's tables take tens of MiB on a large step.
int default_workers() {
    constexpr int kMostWorkers = 16;
    return std::min(detail::usable_cpus(), kMostWorkers);
}

}  // namespace

PeakSimulator::PeakSimulator(const ModelSpec& model, const GpuProfile& gpu, int workers) : model_(model), gpu_(gpu) {
    const int n = workers > 0 ? workers : default_workers();
    for (int i = 0; i < n; ++i) scratch_.push_back(std::make_unique<Scratch>());
}

PeakSimulator::~PeakSimulator() = default;

std::int64_t PeakSimulator::skipped_events() const {
    std::int64_t n = 0;
    for (const auto& s : scratch_) n += s->loops.skipped();
    return n;
}

namespace {

std::size_t common_prefix(const std::vector<sim::GpuEvent>& a, const std::vector<sim::GpuEvent>& b) {
    const std::size_t n = std::min(a.size(), b.size());
    std::size_t i = 0;
    while (i < n && a[i].tensor == b[i].tensor && a[i].bytes == b[i].bytes) ++i;
    return i;
}

// The events before `shared` that two steps share are the same step only where their chunk loops'
// iterations start at the same places and stand for as many (folded repeats are not events):
// the shared part ends at the first iteration where they do not.
std::size_t same_loops_before(std::size_t shared, const std::vector<std::size_t>& marks, const std::vector<std::int64_t>& counts,
                              const std::vector<std::size_t>& old_marks, const std::vector<std::int64_t>& old_counts) {
    for (std::size_t j = 0; j < marks.size() && marks[j] < shared; ++j)
        if (j >= old_marks.size() || marks[j] != old_marks[j] || counts[j] != old_counts[j]) return marks[j];
    return shared;
}

}  // namespace

// Peak allocated and reserved bytes of the captured events into `p`; false as soon as reserved
// bytes pass `limit`, the capacity of the device as the caller plans it (the model releases its
// cached segments before passing it, as PyTorch does when cudaMalloc fails). The model is
// deterministic, so after the events this step shares with the last replay it is in the state
// a snapshot of that replay holds: the replay resumes from the last snapshot within the shared
// prefix, and takes its own at the boundaries after it. Chunk loops skip their repeats.
bool PeakSimulator::replay(Scratch& s, bytes_t capacity, bytes_t limit, MemoryPeaks& p) {
    const std::vector<sim::GpuEvent>& events = s.step.gpu_events;
    const std::size_t shared = same_loops_before(common_prefix(events, s.replayed), s.step.loop_marks, s.step.loop_counts,
                                                 s.replayed_marks, s.replayed_counts);
    if (s.capacity != capacity) s.valid = 0;  // snapshots of replays on another device
    s.capacity = capacity;
    while (s.valid > 0 && s.snapshots[s.valid - 1].at > shared) --s.valid;
    std::size_t from = 0;
    if (s.valid > 0) {
        const Scratch::Snapshot& snap = s.snapshots[s.valid - 1];
        s.allocator = snap.model;
        from = snap.at;
        p.peak_allocated_bytes = snap.peak_allocated;
        p.peak_reserved_bytes = snap.peak_reserved;
    } else {
        s.allocator.reset(gpu_.calibration.allocator, capacity);
    }
    const auto& boundaries = s.step.boundaries;
    const auto& loops = s.step.loops;
    const auto& marks = s.step.loop_marks;
    auto next = std::upper_bound(boundaries.begin(), boundaries.end(), from);
    auto loop = std::find_if(loops.begin(), loops.end(), [&](const auto& l) { return marks[l.first] >= from; });
    bool fits = true;
    for (std::size_t i = from; fits && i < events.size();) {
        const std::size_t stop = std::min({events.size(), next != boundaries.end() ? *next : events.size(),
                                           loop != loops.end() ? marks[loop->first] : events.size()});
        if (!sim::replay_events(s.allocator, events, i, stop, limit, p)) {
            fits = false;
            break;
        }
        i = stop;
        if (next != boundaries.end() && *next == i) {
            // A snapshot is a copy of the model, which grows with the step: take them at doubling
            // distances, and at the last boundary (the LM head, where setups differing only in
            // its chunks part).
            const std::size_t last = s.valid > 0 ? s.snapshots[s.valid - 1].at : 0;
            if (i >= 2 * last || next + 1 == boundaries.end()) {
                if (s.valid == s.snapshots.size()) s.snapshots.emplace_back();
                Scratch::Snapshot& snap = s.snapshots[s.valid++];
                snap.at = i, snap.peak_allocated = p.peak_allocated_bytes, snap.peak_reserved = p.peak_reserved_bytes;
                snap.model = s.allocator;
            }
            ++next;
        }
        if (loop != loops.end() && marks[loop->first] == i) {
            try {
                fits = s.loops.run(s.allocator, events, marks, s.step.loop_counts, loop->first, loop->iterations, limit, p);
            } catch (...) {  // (a folding the replay cannot run: a bug) no snapshot of this step is trusted again
                s.valid = 0;
                s.replayed.clear();
                throw;
            }
            i = marks[loop->first + loop->iterations];
            ++loop;
            while (next != boundaries.end() && *next < i) ++next;  // no snapshot within a loop
        }
    }
    s.replayed.swap(s.step.gpu_events);  // the snapshots hold prefixes of these now
    s.replayed_marks.swap(s.step.loop_marks);
    s.replayed_counts.swap(s.step.loop_counts);
    p.segments_released = s.allocator.segments_released();
    return fits;
}

bool PeakSimulator::walk(Scratch& scratch, const TrainingSetup& setup, std::int64_t rank, bool allocator, bytes_t budget_bytes,
                         bytes_t host_budget_bytes, bytes_t capacity, MemoryPeaks& out) {
    sim::StepBuilder b(model_, setup, gpu_, false, sim::PeakRun{&scratch.step, {budget_bytes, host_budget_bytes}, allocator});
    if (rank >= 0) b.walk_rank(rank);
    try {
        b.run();
    } catch (const sim::OverBudget&) {
        return false;
    }
    out = b.peaks();
    return !allocator || replay(scratch, capacity, budget_bytes, out);
}

namespace {

// `into` holds the highest of each peak of it and `p` (every rank's step must fit: the busiest rank's).
void take_highest(MemoryPeaks& into, const MemoryPeaks& p) {
    into.peak_bytes = std::max(into.peak_bytes, p.peak_bytes);
    into.peak_allocated_bytes = std::max(into.peak_allocated_bytes, p.peak_allocated_bytes);
    into.peak_reserved_bytes = std::max(into.peak_reserved_bytes, p.peak_reserved_bytes);
    into.host_peak_bytes = std::max(into.host_peak_bytes, p.host_peak_bytes);
    into.segments_released = std::max(into.segments_released, p.segments_released);
}

}  // namespace

bool PeakSimulator::run(const TrainingSetup& setup, bool allocator, bytes_t budget_bytes, bytes_t host_budget_bytes,
                        bytes_t capacity, MemoryPeaks& out) {
    validate(setup, model_);
    // Ranks that differ (ring attention, DeepSpeed's ZeRO): every rank's step must fit; each peak is the
    // highest of any rank's. Ring attention's rank 1 (a whole-q merge and the half-size ones) first: a
    // setup over budget usually stops there.
    std::vector<std::int64_t> ranks = walked_ranks(setup, model_);  // (empty when the ranks are alike: one walk)
    if (ranks.empty()) return walk(*scratch_.front(), setup, -1, allocator, budget_bytes, host_budget_bytes, capacity, out);
    if (setup.ring() && ranks.size() > 1) std::swap(ranks[0], ranks[1]);
    // The first alone: a setup over budget is usually over on every rank.
    MemoryPeaks first;
    if (!walk(*scratch_.front(), setup, ranks.front(), allocator, budget_bytes, host_budget_bytes, capacity, first)) return false;
    // The rest side by side, each worker with tables of its own (a replay resumes from its own last
    // one); a rank over budget stops them all. Each walk is the step one walk alone makes, and the
    // highest of each peak is the same in any order: the numbers do not depend on the workers. (An
    // error, a bug or an overflow, is raised; which one, when several ranks would raise one, or
    // whether a rank over budget stopped the walks first, may depend on them.)
    std::atomic<bool> over{false};
    std::vector<MemoryPeaks> highest(scratch_.size());
    detail::parallel_for(ranks.size() - 1, scratch_.size(), [&](std::size_t i, std::size_t w) {
        if (over.load(std::memory_order_relaxed)) return;
        try {
            MemoryPeaks p;
            if (!walk(*scratch_[w], setup, ranks[1 + i], allocator, budget_bytes, host_budget_bytes, capacity, p)) {
                over = true;
                return;
            }
            take_highest(highest[w], p);
        } catch (...) {
            over = true;
            throw;
        }
    });
    if (over) return false;
    out = first;
    for (const MemoryPeaks& p : highest) take_highest(out, p);
    return true;
}

MemoryPeaks PeakSimulator::peaks(const TrainingSetup& setup, bool allocator, bytes_t capacity) {
    MemoryPeaks p;
    run(setup, allocator, kNoCapacity, kNoCapacity, capacity, p);
    return p;
}

bool PeakSimulator::fits(const TrainingSetup& setup, bytes_t budget_bytes, bytes_t host_budget_bytes, MemoryPeaks* out,
                         bool allocator) {
    MemoryPeaks p;
    if (!run(setup, allocator, budget_bytes, host_budget_bytes, budget_bytes, p)) return false;
    if (out) *out = p;
    return true;
}

}  // namespace mst
