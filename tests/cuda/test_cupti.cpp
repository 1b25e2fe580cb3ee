// CuptiRecorder. "host": without a driver (or without CUPTI in the toolkit) start() refuses
// with a reason, and the measured timeline is the allocator's own log, saying so. "cupti": on a
// device, every Exact-mode allocation appears as one MEMORY2 allocation and release at the
// allocator's address, attributed to the op marker it was made under, and kernel records name
// the kernels that ran.
#include <doctest/doctest.h>

#include <algorithm>

#include "cuda/cupti_recorder.cuh"
#include "support.hpp"

using namespace mst::cuda_test;
using mst::cuda::CuptiRecorder;
using mst::cuda::DeviceAllocator;

TEST_SUITE("host") {

TEST_CASE("CUPTI recorder without a device: refuses with a reason and falls back to the allocator's log") {
    if (has_device()) {
        MESSAGE("a CUDA device is present: the fallback is exercised by the cupti suite's caching case");
        return;
    }
    CuptiRecorder& rec = CuptiRecorder::instance();
    CHECK_FALSE(rec.start());
    CHECK_FALSE(rec.active());
    INFO(rec.status());
    CHECK(rec.status().rfind("CUPTI unavailable: ", 0) == 0);
    CHECK(rec.status().find("allocator's own log") != std::string::npos);
    CHECK_FALSE(rec.mem_before().valid);
    CHECK_FALSE(rec.mem_before().error.empty());

    // markers still work (host timestamps) and the timeline is the allocator's log
    DeviceAllocator a(DeviceAllocator::Mode::Exact, mst::cuda::host_segment_source());
    rec.begin_op("embedding", -1, mst::Phase::Forward);
    a.set_context("embedding", -1, mst::Phase::Forward);
    void* x = a.allocate(4096, "x", mst::Category::Checkpoint);
    rec.end_op();
    a.release(x);
    rec.flush();
    rec.stop();
    CHECK(rec.markers().size() == 1);
    CHECK(rec.markers()[0].end_ns >= rec.markers()[0].begin_ns);
    const mst::cuda::MeasuredTimeline m = rec.measured_timeline(a, "tiny-llama");
    CHECK_FALSE(m.from_cupti);
    CHECK(m.note.find("allocator's own log") != std::string::npos);
    CHECK(m.timeline.events.size() == 2);
    CHECK(m.timeline.model == "tiny-llama");
    CHECK(m.timeline.source == "cuda");
    CHECK(rec.dropped_records() == 0);
    rec.clear();
}

}  // TEST_SUITE("host")

TEST_SUITE("cupti") {

TEST_CASE("CUPTI recorder on a device: MEMORY2 records match the exact allocator, markers attribute them") {
    MST_REQUIRE_DEVICE();
    CuptiRecorder& rec = CuptiRecorder::instance();
    if (!rec.start()) {
        MESSAGE("CUPTI could not record here: " << rec.status());
        return;
    }
    rec.clear();
    REQUIRE(rec.mem_before().valid);
    {
        DeviceAllocator a(DeviceAllocator::Mode::Exact, mst::cuda::cuda_segment_source(false));
        a.set_clock([&rec] { return rec.now_ns(); });
        const std::int64_t n = 1 << 20;
        rec.begin_op("mlp.gate_up", 0, mst::Phase::Forward);
        a.set_context("mlp.gate_up", 0, mst::Phase::Forward);
        void* g = a.allocate(n * 2, "g", mst::Category::SavedActivation);
        void* u = a.allocate(n * 2, "u", mst::Category::SavedActivation);
        void* m = a.allocate(n * 2, "m", mst::Category::Transient);
        mst::cuda::zero(mst::cuda::Tensor(g, mst::cuda::DType::BF16), n);
        mst::cuda::zero(mst::cuda::Tensor(u, mst::cuda::DType::BF16), n);
        mst::cuda::swiglu_forward(mst::cuda::Tensor(m, mst::cuda::DType::BF16), mst::cuda::ConstTensor(g, mst::cuda::DType::BF16),
                                  mst::cuda::ConstTensor(u, mst::cuda::DType::BF16), n, mst::cuda::GatedAct::Silu);
        rec.begin_op("mlp.down", 0, mst::Phase::Forward);
        a.set_context("mlp.down", 0, mst::Phase::Forward);
        a.release(m);
        rec.end_op();
        a.set_context("step.end", -1, mst::Phase::Optimizer);
        a.release(g);
        a.release(u);
        rec.flush();

        const auto mem = rec.memory();
        const auto allocs = std::count_if(mem.begin(), mem.end(), [](const auto& r) { return r.allocation && r.memory_kind == 3; });
        CHECK(allocs >= 3);
        const mst::cuda::MeasuredTimeline t = rec.measured_timeline(a, "test");
        INFO(t.note);
        CHECK(t.from_cupti);
        CHECK(t.size_mismatches == 0);
        // the allocator's three tensors, in CUPTI's events, with the allocator's names and the markers' ops
        std::vector<const mst::Event*> ours;
        for (const auto& e : t.timeline.events)
            if (e.alloc && (e.name == "g" || e.name == "u" || e.name == "m")) ours.push_back(&e);
        REQUIRE(ours.size() == 3);
        for (const auto* e : ours) {
            CHECK(e->bytes == 2 * n);
            CHECK(e->op == "mlp.gate_up");
        }
        mst::check_consistent(t.timeline);
        const auto kernels = rec.kernels();
        CHECK(std::any_of(kernels.begin(), kernels.end(),
                          [](const auto& k) { return k.name.find("swiglu") != std::string::npos; }));
        CHECK(rec.dropped_records() == 0);
    }
    rec.stop();
    CHECK(rec.mem_after().valid);
}

// The executor's exact mode: cudaMallocAsync/cudaFreeAsync from the stream-ordered pool, buffers
// down to 8 bytes, and a free followed by an allocation that may reuse its address. CUPTI must
// give one device record per call, with the requested bytes, in the calls' order, so that the
// measured timeline is the allocator's log event by event.
TEST_CASE("CUPTI recorder with cudaMallocAsync: one record per call, requested bytes, in call order") {
    MST_REQUIRE_DEVICE();
    CuptiRecorder& rec = CuptiRecorder::instance();
    if (!rec.start()) {
        MESSAGE("CUPTI could not record here: " << rec.status());
        return;
    }
    {
        DeviceAllocator a(DeviceAllocator::Mode::Exact, mst::cuda::cuda_segment_source(true));
        a.set_clock([&rec] { return rec.now_ns(); });
        rec.flush();
        rec.clear();
        rec.begin_op("op.a", 0, mst::Phase::Forward);
        a.set_context("op.a", 0, mst::Phase::Forward);
        void* x = a.allocate(8, "x", mst::Category::Transient);
        void* y = a.allocate(128, "y", mst::Category::SavedActivation);
        rec.begin_op("op.b", 1, mst::Phase::Backward);
        a.set_context("op.b", 1, mst::Phase::Backward);
        a.release(y);
        void* z = a.allocate(128, "z", mst::Category::Transient);  // may take y's address
        void* w = a.allocate(256, "w", mst::Category::Gradients);
        a.release(x);
        a.release(z);
        a.release(w);
        rec.end_op();
        rec.flush();
        const mst::cuda::MeasuredTimeline t = rec.measured_timeline(a, "test");
        INFO(t.note);
        CHECK(t.from_cupti);
        CHECK(t.unmatched_records == 0);
        CHECK(t.size_mismatches == 0);
        REQUIRE(t.timeline.events.size() == a.timeline().events.size());
        for (std::size_t i = 0; i < t.timeline.events.size(); ++i) {
            const mst::Event &m = t.timeline.events[i], &l = a.timeline().events[i];
            CAPTURE(i);
            CHECK(m.alloc == l.alloc);
            CHECK(m.name == l.name);
            CHECK(m.bytes == l.bytes);
            CHECK(m.op == l.op);
            CHECK(m.layer == l.layer);
            CHECK(m.phase == l.phase);
        }
        CHECK(rec.dropped_records() == 0);
    }
    rec.stop();
    rec.clear();
}

TEST_CASE("CUPTI recorder with the caching allocator: segments only, the timeline is the allocator's log") {
    MST_REQUIRE_DEVICE();
    CuptiRecorder& rec = CuptiRecorder::instance();
    if (!rec.start()) {
        MESSAGE("CUPTI could not record here: " << rec.status());
        return;
    }
    rec.clear();
    DeviceAllocator a(DeviceAllocator::Mode::Caching, mst::cuda::cuda_segment_source(false));
    void* p = a.allocate(1000, "a", mst::Category::Transient);
    void* q = a.allocate(2000, "b", mst::Category::Transient);
    a.release(p);
    a.release(q);
    rec.flush();
    const mst::cuda::MeasuredTimeline t = rec.measured_timeline(a, "test");
    CHECK_FALSE(t.from_cupti);
    CHECK(t.note.find("segment") != std::string::npos);
    CHECK(t.timeline.events.size() == 4);
    rec.stop();
}

}  // TEST_SUITE("cupti")
