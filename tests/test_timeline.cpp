#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include "mst/catalog.hpp"
#include "mst/simulate.hpp"
#include "sim_test_support.hpp"
#include "test_support.hpp"

using namespace mst;

namespace {
Timeline events(std::initializer_list<std::pair<std::int64_t, bytes_t>> allocs_and_frees) {
    // (id, +bytes) allocates, (id, -bytes) frees.
    Timeline t;
    for (auto [id, b] : allocs_and_frees) {
        Event e;
        e.alloc = b > 0;
        e.tensor = id;
        e.bytes = b > 0 ? b : -b;
        t.events.push_back(e);
    }
    return t;
}
}  // namespace

TEST_CASE("caching allocator: small requests share 2 MiB segments, sizes round to 512 bytes") {
    const AllocatorConstants c;
    // 100 B -> one 512 B block in a fresh 2 MiB small segment; 1000 B -> 1024 B in the same one.
    const auto r = replay_caching_allocator(events({{1, 100}, {2, 1000}}), c);
    CHECK(r.peak_allocated == 512 + 1024);
    CHECK(r.peak_reserved == 2 * kMiB);
}

TEST_CASE("caching allocator: large requests use 20 MiB segments below 10 MiB, else round to 2 MiB") {
    const AllocatorConstants c;
    // 3 MiB -> a 20 MiB segment; its 17 MiB remainder is split off (> 1 MiB) and serves 5 MiB next.
    auto r = replay_caching_allocator(events({{1, 3 * kMiB}, {2, 5 * kMiB}}), c);
    CHECK(r.peak_reserved == 20 * kMiB);
    CHECK(r.peak_allocated == 8 * kMiB);
    // 11 MiB + 1 B -> a segment of 12 MiB (rounded to 2 MiB); the 1 MiB - 1 B rest is not split
    // (a large block splits only when more than 1 MiB remains), so the block counts whole.
    r = replay_caching_allocator(events({{1, 11 * kMiB + 1}}), c);
    CHECK(r.peak_reserved == 12 * kMiB);
    CHECK(r.peak_allocated == 12 * kMiB);
}

TEST_CASE("caching allocator: freed blocks are reused and coalesced, segments are kept") {
    const AllocatorConstants c;
    // Two 12 MiB blocks, both freed, then 24 MiB: no coalescing across segments, so a new segment.
    auto r = replay_caching_allocator(events({{1, 12 * kMiB}, {2, 12 * kMiB}, {1, -12 * kMiB}, {2, -12 * kMiB}, {3, 24 * kMiB}}), c);
    CHECK(r.peak_reserved == 48 * kMiB);
    // 4 MiB + 4 MiB from one 20 MiB segment, freed, merge back: 16 MiB then fits in it.
    r = replay_caching_allocator(events({{1, 4 * kMiB}, {2, 4 * kMiB}, {1, -4 * kMiB}, {2, -4 * kMiB}, {3, 16 * kMiB}}), c);
    CHECK(r.peak_reserved == 20 * kMiB);
}

TEST_CASE("caching allocator: a segment past the device's capacity first releases the wholly free cached segments") {
    // PyTorch's malloc when cudaMalloc fails: release_cached_blocks() (every free block that is a
    // whole segment, both pools), then one retry; out of memory only if that fails too.
    const AllocatorConstants c;
    const bytes_t capacity = 100 * kMiB;
    // 40 MiB (segment A) and 40 MiB (B), A freed: 80 MiB reserved. 50 MiB fits in no free block and
    // 80 + 50 > 100: A is released (40 reserved), then the new 50 MiB segment: 90.
    auto t = events({{1, 40 * kMiB}, {2, 40 * kMiB}, {1, -40 * kMiB}, {3, 50 * kMiB}});
    auto r = replay_caching_allocator(t, c, capacity);
    CHECK(r.peak_reserved == 90 * kMiB);
    CHECK(r.segments_released == 1);
    CHECK(r.reserved_after.back() == 90 * kMiB);
    // Without a capacity nothing is released: 130 MiB.
    CHECK(replay_caching_allocator(t, c).peak_reserved == 130 * kMiB);
    CHECK(replay_caching_allocator(t, c).segments_released == 0);
    // A free block that is part of a segment still in use (a split remainder) is not released: 4 MiB
    // in a 20 MiB segment leaves 16 MiB free in it; 50 + 20 + 40 > 100 with nothing to release.
    r = replay_caching_allocator(events({{1, 50 * kMiB}, {2, 4 * kMiB}, {3, 40 * kMiB}}), c, capacity);
    CHECK(r.segments_released == 0);
    CHECK(r.peak_reserved == 110 * kMiB);  // past the capacity: out of memory on this device
    // The small pool's free 2 MiB segments go too: a 1 KiB block freed, then 99 MiB needs room.
    r = replay_caching_allocator(events({{1, 1024}, {1, -1024}, {2, 99 * kMiB}}), c, capacity);
    CHECK(r.segments_released == 1);
    CHECK(r.peak_reserved == 100 * kMiB);  // 2 MiB, then 0, then 100 MiB (99 rounded to 2 MiB)
}

TEST_CASE("a timeline survives its JSON form unchanged") {
    const ModelSpec m = find_model("tiny-llama");
    TrainingSetup s = test::tiny_setup(64);
    s.checkpoint = {true, false};
    s.offload_checkpoints = true;
    const Timeline t = simulate(m, s, test::test_gpu());
    const Timeline back = timeline_from_json(nlohmann::json::parse(to_json(t).dump()), "test");
    REQUIRE(back.events.size() == t.events.size());
    for (std::size_t i = 0; i < t.events.size(); ++i) {
        const Event &a = t.events[i], &b = back.events[i];
        CHECK((a.alloc == b.alloc && a.tensor == b.tensor && a.bytes == b.bytes && a.category == b.category &&
               a.device == b.device && a.phase == b.phase && a.layer == b.layer && a.op == b.op && a.name == b.name));
    }
}

TEST_CASE("a timeline that frees what it never allocated is rejected with the event named") {
    nlohmann::json j = to_json(events({{1, 512}, {2, -512}}));
    j["source"] = "cpu";
    const auto msg = test::expect_user_error([&] { (void)timeline_from_json(j, "run.json"); });
    CHECK(msg.rfind("run.json: events: ", 0) == 0);
    CHECK(msg.find("event 1") != std::string::npos);
}
