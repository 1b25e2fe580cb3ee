// Skipping the repeats of chunk loops in the allocator replay (loop_replay.hpp).
#include "loop_replay.hpp"

namespace mst::sim {

// Per iteration, whether it repeats the one before: its events' bytes, and for each free whether
// it frees the iteration's own allocation or the previous one's, and which, are the same.
void LoopReplay::find_repeats(const std::vector<GpuEvent>& events, const std::vector<std::size_t>& marks,
                              std::size_t first, std::size_t iterations) {
    if (++stamp_ == 0) {  // wrapped: stamps of old loops could match again
        allocated_at_.assign(allocated_at_.size(), {0, 0});
        stamp_ = 1;
    }
    repeats_.assign(iterations, 0);
    previous_shape_.clear();
    for (std::size_t i = 0; i < iterations; ++i) {
        const std::size_t a = marks[first + i], b = marks[first + i + 1];
        const std::size_t before = i > 0 ? marks[first + i - 1] : a;
        shape_.clear();
        bool outside = false;  // frees a tensor from before the previous iteration
        for (std::size_t k = a; k < b; ++k) {
            const GpuEvent& e = events[k];
            const auto t = static_cast<std::size_t>(e.tensor);
            if (t >= allocated_at_.size()) allocated_at_.resize(t * 2 + 16, {0, 0});
            if (e.bytes >= 0) {
                allocated_at_[t] = {stamp_, k};
                shape_.emplace_back(e.bytes, 0);
                continue;
            }
            const auto [stamp, at] = allocated_at_[t];
            std::int64_t ref = 0;  // > 0: this iteration's allocation ref - 1; < 0: the previous one's
            if (stamp == stamp_ && at >= a) ref = static_cast<std::int64_t>(at - a) + 1;
            else if (stamp == stamp_ && i > 0 && at >= before) ref = -static_cast<std::int64_t>(at - before) - 1;
            else outside = true;
            shape_.emplace_back(-1, ref);
        }
        repeats_[i] = i > 0 && !outside && shape_ == previous_shape_;
        shape_.swap(previous_shape_);
    }
}

bool LoopReplay::run(detail::CachingAllocatorModel& allocator, const std::vector<GpuEvent>& events,
                     const std::vector<std::size_t>& marks, std::size_t first, std::size_t iterations, bytes_t limit,
                     MemoryPeaks& p) {
    if (iterations < 3) return replay_events(allocator, events, marks[first], marks[first + iterations], limit, p);
    find_repeats(events, marks, first, iterations);
    auto slot = [](std::size_t i) { return i % (kPeriods + 1); };
    std::size_t since = 0;  // the first iteration replayed since the start or the last skip
    for (std::size_t i = 0; i < iterations; ++i) {
        const std::size_t a = marks[first + i], b = marks[first + i + 1];
        Replayed& now = history_[slot(i)];
        now.segments_before = allocator.segments_made();
        if (!replay_events(allocator, events, a, b, limit, p)) return false;
        now.carried.clear();
        for (std::size_t k = a; k < b; ++k) {
            if (events[k].bytes < 0) continue;
            const auto block = allocator.placement(events[k].tensor);
            if (std::get<0>(block) >= 0) now.carried.push_back(Carried{k - a, block});
        }
        // The shortest period p after which the state repeats: iterations i - p + 1 .. i repeat and
        // made no segment (both only get harder as p grows), and i kept the blocks i - p kept.
        for (std::size_t period = 1; period <= kPeriods && i >= since + period; ++period) {
            const std::size_t start = i - period + 1;
            if (!repeats_[start] || history_[slot(start)].segments_before != allocator.segments_made()) break;
            if (now.carried != history_[slot(i - period)].carried) continue;
            std::size_t run = 0;
            while (i + 1 + run < iterations && repeats_[i + 1 + run]) ++run;
            const std::size_t skip = run / period * period;
            if (skip == 0) break;
            const std::size_t to = marks[first + i + skip];  // the last skipped iteration, which mirrors i
            for (const Carried& c : now.carried) allocator.rename(events[a + c.at].tensor, events[to + c.at].tensor);
            skipped_ += static_cast<std::int64_t>(marks[first + i + skip + 1] - b);
            i += skip;
            since = i + 1;
            break;
        }
    }
    return true;
}

}  // namespace mst::sim
