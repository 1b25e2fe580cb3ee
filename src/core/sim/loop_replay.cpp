// Skipping the repeats of chunk loops in the allocator replay (loop_replay.hpp).
#include "loop_replay.hpp"

#include <stdexcept>

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

void LoopReplay::repeat_renames(const std::vector<GpuEvent>& events, const std::vector<std::size_t>& marks,
                                std::size_t first, std::size_t r) {
    renames_.clear();
    const std::size_t a = marks[first + r], b = marks[first + r + 1];
    const std::size_t before = r > 0 ? marks[first + r - 1] : a;
    // Which of its allocations it frees itself, and which earlier tensors it frees (by place).
    std::size_t kept = 0;
    for (std::size_t k = a; k < b; ++k) {
        const GpuEvent& e = events[k];
        const auto [stamp, at] = allocated_at_[static_cast<std::size_t>(e.tensor)];
        if (e.bytes >= 0) {
            bool freed = false;
            for (std::size_t j = k + 1; j < b && !freed; ++j) freed = events[j].bytes < 0 && events[j].tensor == e.tensor;
            kept += freed ? 0 : 1;
            continue;
        }
        if (stamp == stamp_ && at >= a) continue;  // its own
        if (stamp != stamp_ || at < before || !(r > 0 && repeats_[r]))
            throw std::logic_error("loop replay: a folded chunk iteration frees a tensor its repeats cannot free");
        // The previous iteration's tensor at offset q: this iteration's own at q takes its name.
        const std::size_t q = at - before, mine = a + q;
        if (mine >= b || events[mine].bytes < 0)
            throw std::logic_error("loop replay: a folded chunk iteration keeps no tensor where it frees one");
        renames_.emplace_back(events[mine].tensor, e.tensor);
    }
    if (kept != renames_.size())
        throw std::logic_error("loop replay: a folded chunk iteration keeps what its repeats would not free");
}

bool LoopReplay::run(detail::CachingAllocatorModel& allocator, const std::vector<GpuEvent>& events,
                     const std::vector<std::size_t>& marks, const std::vector<std::int64_t>& counts, std::size_t first,
                     std::size_t iterations, bytes_t limit, MemoryPeaks& p) {
    recorded_.clear();
    for (std::size_t r = 0; r < iterations; ++r) recorded_.insert(recorded_.end(), static_cast<std::size_t>(counts[first + r]), r);
    const std::size_t n = recorded_.size();  // iterations, the repeats included
    if (n == iterations && iterations < 3)
        return replay_events(allocator, events, marks[first], marks[first + iterations], limit, p);
    find_repeats(events, marks, first, iterations);
    auto slot = [](std::size_t i) { return i % (kPeriods + 1); };
    auto start = [&](std::size_t i) { return marks[first + recorded_[i]]; };
    auto end = [&](std::size_t i) { return marks[first + recorded_[i] + 1]; };
    // Iteration i repeats iteration i - 1: a repeat of the same recorded one, or as recorded.
    auto repeats = [&](std::size_t i) { return i > 0 && (recorded_[i] == recorded_[i - 1] || repeats_[recorded_[i]]); };
    std::size_t renamed_for = iterations;  // the recorded iteration renames_ holds (none yet)
    std::size_t since = 0;  // the first iteration replayed since the start or the last skip
    for (std::size_t i = 0; i < n; ++i) {
        const std::size_t a = start(i), b = end(i);
        if (i > 0 && recorded_[i] == recorded_[i - 1]) {  // a repeat: the previous one's kept tensors are renamed
            if (renamed_for != recorded_[i]) repeat_renames(events, marks, first, renamed_for = recorded_[i]);
            for (const auto& [mine, previous] : renames_) allocator.rename(mine, previous);
        }
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
        for (std::size_t period = 1; skip_ && period <= kPeriods && i >= since + period; ++period) {
            const std::size_t from = i - period + 1;
            if (!repeats(from) || history_[slot(from)].segments_before != allocator.segments_made()) break;
            if (now.carried != history_[slot(i - period)].carried) continue;
            std::size_t run = 0;
            while (i + 1 + run < n && repeats(i + 1 + run)) ++run;
            const std::size_t skip = run / period * period;
            if (skip == 0) break;
            const std::size_t to = start(i + skip);  // the last skipped iteration, which mirrors i
            for (const Carried& c : now.carried) allocator.rename(events[a + c.at].tensor, events[to + c.at].tensor);
            for (std::size_t j = i + 1; j <= i + skip; ++j) skipped_ += static_cast<std::int64_t>(end(j) - start(j));
            i += skip;
            since = i + 1;
            break;
        }
    }
    return true;
}

}  // namespace mst::sim
