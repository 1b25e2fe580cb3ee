// The tracking allocator: every allocation and free is an event stamped with the context
// at that moment, with the exact requested bytes; buffers free themselves (RAII).
#include <doctest/doctest.h>

#include <cstdint>
#include <utility>

#include "../src/exec/cpu_backend.hpp"
#include "../src/exec/tracking_allocator.hpp"

using namespace mst;
using mst::exec::Buffer;
using mst::exec::CpuBackend;
using mst::exec::TrackingAllocator;

TEST_CASE("tracking allocator: events carry the context, exact bytes, and the free repeats the allocation's tags") {
    CpuBackend cpu;
    TrackingAllocator a(cpu, "tiny");
    a.set_phase(Phase::Forward);
    a.set_layer(3);
    a.set_micro_step(1);
    a.set_op("mlp.gate_up");
    Buffer g = a.allocate("g", 1001, Category::SavedActivation);
    CHECK(reinterpret_cast<std::uintptr_t>(g.data()) % CpuBackend::kAlignment == 0);
    CHECK(a.live_bytes() == 1001);
    a.set_phase(Phase::Backward);
    a.set_op("mlp.act");
    g.reset();
    CHECK(!g);
    CHECK(a.live_bytes() == 0);
    CHECK(a.peak_bytes() == 1001);
    const Timeline& t = a.timeline();
    REQUIRE(t.events.size() == 2);
    const Event& e0 = t.events[0];
    CHECK((e0.alloc && e0.tensor == 0 && e0.bytes == 1001 && e0.name == "g" && e0.op == "mlp.gate_up"));
    CHECK((e0.phase == Phase::Forward && e0.layer == 3 && e0.micro_step == 1 && e0.category == Category::SavedActivation));
    const Event& e1 = t.events[1];
    CHECK((!e1.alloc && e1.tensor == 0 && e1.bytes == 1001 && e1.name == "g" && e1.category == Category::SavedActivation));
    CHECK((e1.phase == Phase::Backward && e1.op == "mlp.act"));
}

TEST_CASE("tracking allocator: a moved buffer frees once, where its last owner lets go, host memory is separate") {
    CpuBackend cpu;
    TrackingAllocator a(cpu, "tiny");
    {
        Buffer x = a.allocate("x", 64, Category::Checkpoint);
        Buffer h = a.allocate("checkpoint", 64, Category::Offloaded, Device::Host);
        CHECK(a.live_bytes(Device::Gpu) == 64);
        CHECK(a.live_bytes(Device::Host) == 64);
        Buffer y = std::move(x);
        CHECK(!x);
        CHECK(a.timeline().events.size() == 2);  // moving records nothing
        x = a.allocate("z", 8, Category::Transient);
        x = std::move(y);  // frees z, takes x
        CHECK(a.timeline().events.size() == 4);
        CHECK(a.timeline().events[3].name == "z");
    }
    CHECK(a.live_count() == 0);
    const Timeline t = a.finish();
    CHECK(t.events.size() == 6);
    check_consistent(t);
    CHECK(t.source == "cpu");
}

TEST_CASE("tracking allocator: after finish() the step's persistent buffers free without being recorded") {
    CpuBackend cpu;
    TrackingAllocator a(cpu, "tiny");
    Buffer w = a.allocate("weights", 128, Category::Weights);
    const Timeline t = a.finish();
    w.reset();
    CHECK(t.events.size() == 1);
    CHECK(a.timeline().events.empty());
    CHECK(a.live_count() == 0);
}
