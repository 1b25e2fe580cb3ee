#pragma once
// Helpers for simulator tests: small setups and views of a timeline restricted to
// some events.
#include <functional>
#include <optional>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "mst/catalog.hpp"
#include "mst/compare.hpp"
#include "mst/gpu.hpp"
#include "mst/setup.hpp"
#include "mst/timeline.hpp"
#include "mst/tune.hpp"

namespace mst::test {

// The allocations whose tensor name starts with `name`, in order (of one phase, when given).
inline std::vector<const Event*> allocs(const Timeline& t, std::string_view name, std::optional<Phase> phase = std::nullopt) {
    std::vector<const Event*> out;
    for (const Event& e : t.events)
        if (e.alloc && e.name.starts_with(name) && (!phase || e.phase == *phase)) out.push_back(&e);
    return out;
}

// The phase in which the tensor of allocation `a` is freed (none: it outlives the step).
inline std::optional<Phase> freed_in(const Timeline& t, const Event* a) {
    for (const Event& e : t.events)
        if (!e.alloc && e.tensor == a->tensor) return e.phase;
    return std::nullopt;
}

// A measurement of `setup` on `model`'s step as rank `rank` recorded it (its events left out).
inline StepFile measured_rank(const TrainingSetup& setup, const char* model, std::int64_t rank) {
    StepFile measured;
    measured.path = "m.json";
    measured.format = "mst-measure/1";
    measured.setup_json = to_json(setup).dump();
    measured.timeline.model = model;
    measured.timeline.rank = rank;
    return measured;
}

inline std::vector<bytes_t> bytes_of(const std::vector<const Event*>& events) {
    std::vector<bytes_t> out;
    for (const Event* e : events) out.push_back(e->bytes);
    return out;
}

// A GPU profile without a cuBLAS workspace, so that hand counts need not include it.
inline GpuProfile test_gpu() {
    GpuProfile g;
    g.name = "test";
    g.memory_total_bytes = 80 * kGiB;
    g.calibration.cublas_workspace_bytes = 0;
    return g;
}

// The kernels runtime (mst-plan's executor): the hand counts, invariants and executor
// comparisons of these tests are derived for its op rules; the hf runtime has its own tests
// against the referee (python/tests/test_referee.py).
inline TrainingSetup kernels_setup() {
    TrainingSetup s;
    s.runtime = Runtime::Kernels;
    return s;
}

// A search for `model` on `gpus` x `gpu` at `seq` tokens, in the hf runtime (the default).
inline TuneRequest hf_request(const char* model, const char* gpu, std::int64_t gpus, std::int64_t seq) {
    TuneRequest rq;
    rq.model = find_model(model);
    rq.gpu = find_gpu(gpu);
    rq.gpus = gpus;
    rq.seq_len = seq;
    return rq;
}

inline TrainingSetup tiny_setup(std::int64_t seq) {
    TrainingSetup s = kernels_setup();
    s.seq_len = seq;
    return s;
}

// Largest live bytes of `category` right after any event matching `pred`.
inline bytes_t max_live_during(const Timeline& t, Category category, const std::function<bool(const Event&)>& pred) {
    bytes_t live = 0, best = 0;
    for (const Event& e : t.events) {
        if (e.device == Device::Gpu && e.category == category) live += e.alloc ? e.bytes : -e.bytes;
        if (pred(e)) best = std::max(best, live);
    }
    return best;
}

// How far live GPU bytes rise above their level before the first matching event,
// over the first contiguous run of matching events.
inline bytes_t block_growth(const Timeline& t, const std::function<bool(const Event&)>& pred) {
    bytes_t live = 0, base = 0, best = 0;
    bool inside = false, done = false;
    for (const Event& e : t.events) {
        const bool match = pred(e);
        if (match && !inside && !done) inside = true, base = live;
        if (!match && inside) inside = false, done = true;
        if (e.device == Device::Gpu) live += e.alloc ? e.bytes : -e.bytes;
        if (inside) best = std::max(best, live - base);
    }
    return best;
}

inline bytes_t live_at_end(const Timeline& t, Category category) {
    bytes_t live = 0;
    for (const Event& e : t.events)
        if (e.device == Device::Gpu && e.category == category) live += e.alloc ? e.bytes : -e.bytes;
    return live;
}

}  // namespace mst::test
