// DeviceAllocator. The "host" suite checks the bookkeeping on host memory (no device needed):
// the caching mode reserves and allocates exactly what the caching-allocator model of
// src/core/caching_allocator.hpp (PyTorch's algorithm) predicts, event by event, hands out
// non-overlapping blocks, and logs a consistent Timeline whose replay equals its own peaks.
// The "allocator" suite runs the same on the device.
#include <doctest/doctest.h>

#include <cstring>
#include <random>

#include "core/caching_allocator.hpp"
#include "cuda/device_allocator.cuh"
#include "support.hpp"

using namespace mst::cuda_test;
using mst::bytes_t;
using mst::kMiB;
using mst::cuda::DeviceAllocator;

namespace {

// A random mix of sizes across the pools' edges: tiny, just under/over 1 MiB (small/large
// pool), under/over 10 MiB (20 MiB segments / rounded segments), and a few large ones.
bytes_t random_size(std::mt19937& gen) {
    std::uniform_int_distribution<int> kind(0, 5);
    std::uniform_int_distribution<bytes_t> small(1, 4096), mid(512 * 1024, 2 * kMiB), large(9 * kMiB, 11 * kMiB),
        huge(20 * kMiB, 60 * kMiB);
    switch (kind(gen)) {
    case 0:
    case 1: return small(gen);
    case 2: return mid(gen);
    case 3: return large(gen);
    case 4: return huge(gen);
    default: return kMiB;  // exactly the small-pool limit
    }
}

// Drives `a` and the model with the same random allocate/free sequence; checks every step.
void run_against_model(DeviceAllocator& a, bool write_patterns, unsigned seed) {
    mst::detail::CachingAllocatorModel model(a.constants());
    std::mt19937 gen(seed);
    struct Held {
        void* p;
        bytes_t bytes;
        std::int64_t id;
    };
    std::vector<Held> held;
    std::int64_t next = 0;
    for (int step = 0; step < 500; ++step) {
        const bool do_alloc = held.empty() || std::uniform_int_distribution<int>(0, 9)(gen) < 5;
        if (do_alloc) {
            const bytes_t bytes = random_size(gen);
            a.set_context("op" + std::to_string(step % 7), step % 3, mst::Phase::Forward);
            void* p = a.allocate(bytes, "t" + std::to_string(next), mst::Category::Transient);
            REQUIRE(p != nullptr);
            model.allocate(next, bytes);
            if (write_patterns) std::memset(p, static_cast<int>(next & 0xff), static_cast<std::size_t>(bytes));
            held.push_back({p, bytes, next++});
        } else {
            const std::size_t k = std::uniform_int_distribution<std::size_t>(0, held.size() - 1)(gen);
            const Held h = held[k];
            held.erase(held.begin() + static_cast<std::ptrdiff_t>(k));
            if (write_patterns) {  // nothing else wrote into this block while it was live
                const auto* bytes = static_cast<const unsigned char*>(h.p);
                const auto expect = static_cast<unsigned char>(h.id & 0xff);
                bool intact = true;
                for (bytes_t i = 0; i < h.bytes; i += 97) intact = intact && bytes[i] == expect;
                REQUIRE(intact);
            }
            a.set_context("free", -1, mst::Phase::Backward);
            a.release(h.p);
            model.release(h.id);
        }
        REQUIRE(a.stats().allocated == model.allocated());
        REQUIRE(a.stats().reserved == model.reserved());
    }
    for (const Held& h : held) a.release(h.p);
}

}  // namespace

TEST_SUITE("host") {

TEST_CASE("caching DeviceAllocator: reserves and allocates what PyTorch's allocator model predicts, event by event") {
    DeviceAllocator a(DeviceAllocator::Mode::Caching, mst::cuda::host_segment_source());
    run_against_model(a, /*write_patterns=*/true, 7);
    // Its Timeline is consistent and the timeline's own replay reports the allocator's peaks.
    mst::check_consistent(a.timeline());
    const mst::AllocatorReplay replay = mst::replay_caching_allocator(a.timeline(), a.constants());
    CHECK(replay.peak_reserved == a.stats().peak_reserved);
    CHECK(replay.peak_allocated == a.stats().peak_allocated);
    CHECK(a.timeline().source == "cuda");
    CHECK(a.stats().allocated == 0);
    CHECK(a.stats().requested == 0);
}

TEST_CASE("caching DeviceAllocator: hand-derived segments and splits") {
    DeviceAllocator a(DeviceAllocator::Mode::Caching, mst::cuda::host_segment_source());
    // 1000 B -> a 1024 B block from a new 2 MiB small segment
    void* p1 = a.allocate(1000, "a", mst::Category::Transient);
    CHECK(a.stats().reserved == 2 * kMiB);
    CHECK(a.stats().allocated == 1024);
    CHECK(a.stats().requested == 1000);
    // the next small block is carved right after it, in the same segment
    void* p2 = a.allocate(512, "b", mst::Category::Transient);
    CHECK(static_cast<char*>(p2) == static_cast<char*>(p1) + 1024);
    CHECK(a.stats().segments == 1);
    // 3 MiB -> a 20 MiB large segment (below 10 MiB); the 17 MiB rest stays free for the next one
    void* p3 = a.allocate(3 * kMiB, "c", mst::Category::SavedActivation);
    CHECK(a.stats().reserved == 22 * kMiB);
    void* p4 = a.allocate(5 * kMiB, "d", mst::Category::SavedActivation);
    CHECK(static_cast<char*>(p4) == static_cast<char*>(p3) + 3 * kMiB);
    CHECK(a.stats().reserved == 22 * kMiB);
    // 11 MiB would still fit the 12 MiB left there (best fit); 13 MiB + 1 B (13 MiB + 512 rounded)
    // gets its own segment, rounded up to 14 MiB and not split (< 1 MiB would remain)
    void* p5 = a.allocate(13 * kMiB + 1, "e", mst::Category::Gradients);
    CHECK(a.stats().reserved == 36 * kMiB);
    CHECK(a.stats().allocated == 1024 + 512 + 3 * kMiB + 5 * kMiB + 14 * kMiB);
    // freeing c and d coalesces the whole 20 MiB segment; empty_cache returns it and e's
    a.release(p3);
    a.release(p4);
    a.release(p5);
    CHECK(a.stats().reserved == 36 * kMiB);  // segments are kept
    a.empty_cache();
    CHECK(a.stats().reserved == 2 * kMiB);  // the small segment still holds a and b
    a.release(p1);
    a.release(p2);
    CHECK(a.stats().peak_reserved == 36 * kMiB);
    CHECK(a.timeline().events.size() == 10);
    mst::check_consistent(a.timeline());
}

TEST_CASE("exact DeviceAllocator: one source allocation per buffer, events tagged with the context") {
    DeviceAllocator a(DeviceAllocator::Mode::Exact, mst::cuda::host_segment_source());
    a.set_context("mlp.gate_up", 3, mst::Phase::Forward, 1);
    void* g = a.allocate(4096 * 2, "g", mst::Category::SavedActivation);
    void* u = a.allocate(4096 * 2, "u", mst::Category::SavedActivation);
    CHECK(a.allocate(0, "empty", mst::Category::Transient) == nullptr);  // no event, like PyTorch
    a.set_context("mlp.down", 3, mst::Phase::Backward, 1);
    a.release(g);
    a.release(nullptr);
    CHECK_THROWS_AS(a.release(static_cast<char*>(u) + 16), std::logic_error);
    const auto& ev = a.timeline().events;
    REQUIRE(ev.size() == 3);
    CHECK(ev[0].alloc);
    CHECK(ev[0].op == "mlp.gate_up");
    CHECK(ev[0].layer == 3);
    CHECK(ev[0].micro_step == 1);
    CHECK(ev[0].name == "g");
    CHECK(ev[0].category == mst::Category::SavedActivation);
    CHECK_FALSE(ev[2].alloc);
    CHECK(ev[2].tensor == ev[0].tensor);
    CHECK(ev[2].op == "mlp.down");  // a free carries the op it happens in, as the simulator's
    CHECK(ev[2].phase == mst::Phase::Backward);
    CHECK(ev[2].name == "g");
    CHECK(a.stats().segment_maps == 2);
    CHECK(a.stats().segment_unmaps == 1);
    CHECK(a.stats().peak_requested == 2 * 4096 * 2);
    CHECK(a.records()[0].address == reinterpret_cast<std::uint64_t>(g));
    CHECK(a.records()[0].timestamp_ns <= a.records()[2].timestamp_ns);
    a.release(u);
}

}  // TEST_SUITE("host")

TEST_SUITE("allocator") {

TEST_CASE("caching DeviceAllocator on the device: cudaMalloc segments, blocks the kernels can write") {
    MST_REQUIRE_DEVICE();
    DeviceAllocator a(DeviceAllocator::Mode::Caching, mst::cuda::cuda_segment_source(false));
    mst::detail::CachingAllocatorModel model(a.constants());
    std::vector<void*> ps;
    const bytes_t sizes[] = {1000, 512, 3 * kMiB, 5 * kMiB, 11 * kMiB + 1, 700 * 1024};
    std::int64_t id = 0;
    for (bytes_t s : sizes) {
        void* p = a.allocate(s, "t", mst::Category::Transient);
        model.allocate(id++, s);
        // a kernel writes the whole block: an overlap or a bad address shows as a fault or a wrong sum
        mst::cuda::zero(mst::cuda::Tensor(p, mst::cuda::DType::BF16), s / 2);
        ps.push_back(p);
    }
    cuda_ok(cudaDeviceSynchronize(), "zero kernels");
    CHECK(a.stats().reserved == model.reserved());
    CHECK(a.stats().allocated == model.allocated());
    for (void* p : ps) a.release(p);
    a.empty_cache();
    CHECK(a.stats().reserved == 0);
}

TEST_CASE("exact DeviceAllocator on the device: cudaMallocAsync per buffer") {
    MST_REQUIRE_DEVICE();
    DeviceAllocator a(DeviceAllocator::Mode::Exact, mst::cuda::cuda_segment_source(true));
    void* p = a.allocate(3 * kMiB, "x", mst::Category::Weights);
    mst::cuda::zero(mst::cuda::Tensor(p, mst::cuda::DType::F32), 3 * kMiB / 4);
    a.release(p);
    cuda_ok(cudaDeviceSynchronize(), "async free");
    CHECK(a.stats().segment_maps == 1);
    CHECK(a.stats().segment_unmaps == 1);
    CHECK(a.stats().peak_requested == 3 * kMiB);
}

}  // TEST_SUITE("allocator")
