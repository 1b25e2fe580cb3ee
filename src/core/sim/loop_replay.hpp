#pragma once
// The caching-allocator model over captured GPU events, skipping the iterations of chunk loops
// that repeat (used by PeakSimulator, peaks.cpp; tests compare it with a plain replay).
//
// A chunk loop runs the same ops on each mini-sequence. Iterations that repeat the one before
// them (the same allocations in the same order, freeing only what they or the iteration before
// allocated, at the same places) do what it did if the allocator is in the state it found it in.
// After iteration i the allocator is in the state it was in after iteration i - p (up to which
// tensor holds which block) when iterations i - p + 1 .. i all repeat, made no segment, and i
// keeps exactly the blocks i - p kept: the same number, each where its counterpart was. Then no
// tensor of iterations i - p .. i - 1 is still live: a repeating iteration frees only its own or
// the previous iteration's tensors, so one it does not free stays live for good, and i - p's copy
// of it would hold a block that i's copy holds too. (Tensors from before the repeats, such as the
// first iteration's, stay where they are and are no part of the comparison.)
// The repeats that follow then do what i - p + 1 .. i did, period after period: whole periods
// of them are skipped, their last iteration's tensors taking over iteration i's blocks. Peaks
// are unchanged by a skipped iteration: it runs as one already replayed on the same state did.
// (Period 1: the hf runtime's tiled MLP forward and loss chunks; 2: the tiled MLP's backward,
// whose weight gradient alternates between two blocks.)
//
// A recorded iteration may stand for several (PeakScratch::loop_counts: the builder folds the
// repeats of a steady iteration into it). Its repeats run its own events again: before each, the
// tensors it kept take the names of the previous iteration's tensors it frees (the same places in
// both, which the check below requires), so that its frees find them. Whether they are run or
// skipped is decided as for recorded iterations.
#include <array>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#include "../caching_allocator.hpp"
#include "builder.hpp"
#include "mst/simulate.hpp"

namespace mst::sim {

// Events [a, b) into `allocator`, peaks into `p`; false as soon as reserved bytes pass `limit`.
inline bool replay_events(detail::CachingAllocatorModel& allocator, const std::vector<GpuEvent>& events, std::size_t a,
                          std::size_t b, bytes_t limit, MemoryPeaks& p) {
    const GpuEvent* e = events.data();
    for (std::size_t i = a; i < b; ++i) {
        if (e[i].bytes >= 0) allocator.allocate(e[i].tensor, e[i].bytes);
        else allocator.release(e[i].tensor);
        p.peak_allocated_bytes = std::max(p.peak_allocated_bytes, allocator.allocated());
        p.peak_reserved_bytes = std::max(p.peak_reserved_bytes, allocator.reserved());
        if (allocator.reserved() > limit) return false;
    }
    return true;
}

class LoopReplay {
public:
    // skip: false runs every iteration (the repeats of folded ones too): the plain replay tests
    // compare with.
    explicit LoopReplay(bool skip = true) : skip_(skip) {}
    // The loop whose iterations start at marks[first], .., marks[first + iterations - 1] and which
    // ends at marks[first + iterations] (PeakScratch::Loop), as replay_events would replay it.
    // counts[first + i]: how many iterations recorded iteration i stands for.
    bool run(detail::CachingAllocatorModel& allocator, const std::vector<GpuEvent>& events,
             const std::vector<std::size_t>& marks, const std::vector<std::int64_t>& counts, std::size_t first,
             std::size_t iterations, bytes_t limit, MemoryPeaks& p);
    std::int64_t skipped() const { return skipped_; }  // events not replayed so far

private:
    static constexpr std::size_t kPeriods = 4;  // the longest period of repeating state looked for
    // A block an iteration leaves allocated: its allocation's place in the iteration, and the
    // block (segment, offset, bytes).
    struct Carried {
        std::size_t at = 0;
        std::tuple<std::int64_t, bytes_t, bytes_t> block;
        bool operator==(const Carried&) const = default;
    };
    struct Replayed {
        std::int64_t segments_before = 0;  // segments the allocator had made when the iteration began
        std::vector<Carried> carried;
    };
    void find_repeats(const std::vector<GpuEvent>& events, const std::vector<std::size_t>& marks, std::size_t first,
                      std::size_t iterations);
    // The renames before a repeat of recorded iteration r (which stands for more than one), as
    // (its tensor, the previous iteration's): one per tensor of the previous iteration it frees.
    // Throws std::logic_error when the repeats cannot be run (a folding the builder must not do).
    void repeat_renames(const std::vector<GpuEvent>& events, const std::vector<std::size_t>& marks, std::size_t first,
                        std::size_t r);

    std::vector<std::uint8_t> repeats_;  // per recorded iteration: it repeats the one before
    std::vector<std::size_t> recorded_;  // per iteration: the recorded one it runs
    std::vector<std::pair<std::int64_t, std::int64_t>> renames_;
    // per tensor: the event that allocated it in the loop being read, with that loop's stamp
    std::vector<std::pair<std::uint32_t, std::size_t>> allocated_at_;
    std::uint32_t stamp_ = 0;
    std::vector<std::pair<bytes_t, std::int64_t>> shape_, previous_shape_;
    std::array<Replayed, kPeriods + 1> history_;  // the last iterations replayed, by index mod kPeriods + 1
    std::int64_t skipped_ = 0;
    bool skip_ = true;
};

}  // namespace mst::sim
