// The flat caching-allocator model (src/core/caching_allocator.hpp) against its reference, the
// std::set/std::map formulation it replaced (reference_caching_allocator.hpp): over random
// request streams, every block lands in the same segment at the same offset with the same size,
// and allocated and reserved bytes agree after every request. (test_invariants.cpp checks the
// same on the simulator's random-setup timelines; test_timeline.cpp holds hand-derived cases.)
#include <doctest/doctest.h>

#include <limits>
#include <random>
#include <vector>

#include "caching_allocator.hpp"
#include "reference_caching_allocator.hpp"

using namespace mst;

namespace {

// PyTorch's constants scaled down 256x, so that a few thousand requests fill, split and merge
// many segments of both pools.
AllocatorConstants scaled_down() {
    AllocatorConstants c;
    c.round_bytes = 512;
    c.small_size_bytes = 4096;
    c.small_segment_bytes = 8192;
    c.min_large_alloc_bytes = 40960;
    c.large_min_segment_bytes = 81920;
    c.large_segment_round_bytes = 8192;
    return c;
}

// Requests shaped like a training step's: a few sizes repeated (chunked tensors), odd sizes,
// empty tensors, small and large ones; frees mostly in reverse order (a backward), some random.
// On a device of `capacity` bytes the models release their wholly free cached segments before
// passing it; returns how many they released.
std::int64_t compare_random_stream(const AllocatorConstants& c, std::uint64_t seed, int requests,
                                   bytes_t capacity = std::numeric_limits<bytes_t>::max()) {
    std::mt19937_64 rng(seed);
    auto in = [&](std::int64_t lo, std::int64_t hi) { return std::uniform_int_distribution<std::int64_t>(lo, hi)(rng); };
    const bytes_t big = c.min_large_alloc_bytes;
    std::vector<bytes_t> popular;
    for (int i = 0; i < 6; ++i) popular.push_back(in(1, 3 * big));
    detail::CachingAllocatorModel flat(c);
    flat.set_capacity(capacity);
    test::ReferenceCachingAllocator reference(c, capacity);
    std::vector<std::int64_t> live;
    std::int64_t next_id = 0;
    for (int r = 0; r < requests; ++r) {
        std::int64_t id = -1;
        if (live.empty() || in(0, 99) < 55) {
            bytes_t bytes = 0;
            switch (in(0, 5)) {
                case 0: bytes = in(0, c.small_size_bytes); break;
                case 1: bytes = in(c.small_size_bytes, big); break;
                case 2: bytes = in(big, 4 * big); break;
                case 3: bytes = 0; break;
                default: bytes = popular[static_cast<std::size_t>(in(0, 5))]; break;
            }
            // Ids beyond the dense range and negative ones take the model's hash-map path.
            id = in(0, 49) == 0 ? (std::int64_t{1} << 30) + next_id : (in(0, 49) == 0 ? -1 - next_id : next_id);
            ++next_id;
            flat.allocate(id, bytes);
            reference.allocate(id, bytes);
            live.push_back(id);
        } else {
            const std::size_t i = in(0, 3) == 0 ? static_cast<std::size_t>(in(0, static_cast<std::int64_t>(live.size()) - 1))
                                                : live.size() - 1;
            id = live[i];
            live.erase(live.begin() + static_cast<std::ptrdiff_t>(i));
            flat.release(id);
            reference.release(id);
        }
        if (flat.allocated() != reference.allocated() || flat.reserved() != reference.reserved() ||
            flat.placement(id) != reference.placement(id) || flat.segments_released() != reference.segments_released()) {
            FAIL("seed " << seed << ", request " << r << " (tensor " << id << "): allocated " << flat.allocated() << " vs "
                         << reference.allocated() << ", reserved " << flat.reserved() << " vs " << reference.reserved());
        }
    }
    for (std::int64_t id : live) CHECK(flat.placement(id) == reference.placement(id));
    return flat.segments_released();
}

}  // namespace

TEST_CASE("the flat caching-allocator model places every block where the reference does (PyTorch's constants)") {
    for (std::uint64_t seed = 1; seed <= 20; ++seed) compare_random_stream(AllocatorConstants{}, seed, 3000);
}

TEST_CASE("the flat caching-allocator model places every block where the reference does (small segments: many splits and merges)") {
    for (std::uint64_t seed = 100; seed <= 140; ++seed) compare_random_stream(scaled_down(), seed, 4000);
}

TEST_CASE("the flat caching-allocator model releases the cached segments the reference does on a device of limited capacity") {
    std::int64_t released = 0;
    for (std::uint64_t seed = 200; seed <= 230; ++seed)
        released += compare_random_stream(AllocatorConstants{}, seed, 3000, static_cast<bytes_t>(seed - 150) * kMiB * 4);
    for (std::uint64_t seed = 300; seed <= 330; ++seed)
        released += compare_random_stream(scaled_down(), seed, 4000, static_cast<bytes_t>(seed - 280) * kMiB / 2);
    CHECK(released > 1000);  // the release path is exercised
}
