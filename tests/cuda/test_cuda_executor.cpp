// The CUDA executor (src/cuda/cuda_backend.cpp): the executor of src/exec, checked on the CPU
// against the simulator event by event, run on the GPU through the CUDA kernels, cuBLASLt and
// a DeviceAllocator watched by CUPTI. On the device, for every setup of the executor matrix:
//  * CUPTI's MEMORY2 records equal the executor's own log, event by event (every tensor the
//    executor asked for reached the device as one allocation, in order, with its bytes), with no
//    dropped, unmatched or mis-sized record;
//  * the measured timeline equals the simulator's prediction, event by event (peak to the byte);
//  * the loss equals the CPU backend's on the same weights and tokens (counter-based init):
//    bf16 storage rounds each side's activations once per op, in a different summation order,
//    so the two mean cross-entropies (~ln V) differ by far less than 1 %.
// Without a device the "host" case checks the user error instead.
#include <doctest/doctest.h>

#include <cmath>

#include "../executor_matrix.hpp"
#include "../sim_test_support.hpp"
#include "../test_support.hpp"
#include "mst/catalog.hpp"
#include "mst/compare.hpp"
#include "mst/execute.hpp"
#include "mst/simulate.hpp"
#include "support.hpp"

using namespace mst;
using namespace mst::test;

namespace {

constexpr bytes_t kWorkspace = 4 * kMiB;  // the cuBLASLt workspace, predicted and measured alike

GpuProfile profile() {
    GpuProfile g = test_gpu();
    g.calibration.cublas_workspace_bytes = kWorkspace;
    return g;
}

ExecuteOptions options() {
    ExecuteOptions o;
    o.workspace_bytes = kWorkspace;
    return o;
}

ModelSpec model_named(const std::string& name) { return find_model(name.ends_with(".json") ? data(name) : name); }

void check_on_device(const ModelSpec& m, const TrainingSetup& s) {
    const Timeline predicted = simulate(m, s, profile());
    const MeasuredStep cpu = execute_cpu(m, s, 7, options());
    const MeasuredStep gpu = execute_cuda(m, s, 7, options());
    REQUIRE(gpu.device);
    const DeviceReport& d = *gpu.device;
    INFO("recorder: ", d.recorder);
    INFO("events: ", d.timeline_note);
    INFO("first difference: ", d.first_difference);
    CHECK(d.matches_executor_log);
    if (d.recorder.rfind("CUPTI recording", 0) == 0) {
        CHECK(d.from_cupti);
        CHECK(d.dropped_records == 0);
        CHECK(d.unmatched_records == 0);
        CHECK(d.size_mismatches == 0);
    }
    const Comparison c = compare_timelines(predicted, gpu.timeline, m.num_layers);
    CHECK(c.identical());
    CHECK(c.peak_error() == 0);
    CHECK(std::isfinite(gpu.loss));
    CHECK(std::fabs(gpu.loss - cpu.loss) <= 1e-2 * std::fabs(cpu.loss));
}

}  // namespace

TEST_SUITE("host") {

TEST_CASE("cuda executor: without a usable device, execute_cuda is a user error that says so") {
    std::string why;
    if (cuda_test::has_device(&why)) {
        MESSAGE("a device is present: the no-device error is not exercised here");
        return;
    }
    const std::string msg = expect_user_error([] { execute_cuda(find_model("tiny-llama"), tiny_setup(16), 1); });
    CHECK(msg.find("no usable CUDA device") != std::string::npos);
    CHECK(msg.find("--backend cpu") != std::string::npos);
}

}  // TEST_SUITE("host")

TEST_SUITE("executor") {

TEST_CASE("cuda executor: the default setup equals the executor's log, the prediction and the CPU loss") {
    MST_REQUIRE_DEVICE();
    check_on_device(find_model("tiny-llama"), tiny_setup(32));
}

TEST_CASE("cuda executor: every setup of the executor matrix, on four models") {
    MST_REQUIRE_DEVICE();
    int count = 0;
    for (const MatrixCase& c : kMatrix) {
        CAPTURE(c.name);
        CAPTURE(c.model);
        const ModelSpec m = model_named(c.model);
        TrainingSetup s = tiny_setup(c.seq);
        c.knobs(s, m.num_layers);
        check_on_device(m, s);
        ++count;
    }
    CHECK(count == 45);
}

TEST_CASE("cuda executor: the caching allocator's allocated and reserved peaks are the allocator model's") {
    MST_REQUIRE_DEVICE();
    const ModelSpec m = find_model("small-llama");
    TrainingSetup s = tiny_setup(12);
    s.mlp_chunks = 3, s.lm_chunks = 2, s.checkpoint = parse_checkpoint_spec("spread:2", m.num_layers, "test");
    CudaOptions caching;
    caching.caching_allocator = true;
    const MeasuredStep gpu = execute_cuda(m, s, 7, options(), caching);
    REQUIRE(gpu.device);
    const AllocatorReplay replay = replay_caching_allocator(simulate(m, s, profile()), AllocatorConstants{});
    CHECK(gpu.device->peak_allocated == replay.peak_allocated);
    CHECK(gpu.device->peak_reserved == replay.peak_reserved);
    CHECK(gpu.device->matches_executor_log);
}

TEST_CASE("cuda executor: gradients equal the CPU backend's (bf16 + fp32 master, chunked, checkpointed)") {
    MST_REQUIRE_DEVICE();
    const ModelSpec m = find_model("tiny-llama");
    TrainingSetup s = tiny_setup(32);
    s.precision = Precision::Bf16Master, s.mlp_chunks = 2, s.lm_chunks = 4, s.lm_impl = LmHeadImpl::FusedForward;
    s.checkpoint.assign(static_cast<std::size_t>(m.num_layers), true);
    ExecuteOptions o = options();
    o.capture = true;
    const MeasuredStep cpu = execute_cpu(m, s, 3, o);
    const MeasuredStep gpu = execute_cuda(m, s, 3, o);
    REQUIRE(cpu.gradients.size() == gpu.gradients.size());
    // fp32 gradients accumulated from bf16 activations: each backend rounds an activation to
    // bf16 (2^-9 relative) where its fp32 sums differ, so a gradient moves by a few bf16 ulps
    // of its largest terms: norm-wise well under 5 %.
    for (std::size_t i = 0; i < cpu.gradients.size(); ++i) {
        CAPTURE(cpu.gradients[i].name);
        REQUIRE(cpu.gradients[i].name == gpu.gradients[i].name);
        CHECK(cuda_test::rel_err(gpu.gradients[i].values, cpu.gradients[i].values) <= 5e-2);
    }
}

}  // TEST_SUITE("executor")
