// Data parallelism in the hf runtime: torch DistributedDataParallel's gradient buckets
// (src/core/sim/ddp.cpp). python/tests/test_hf_runtime.py runs the real Reducer on the referee's
// fake process group and compares every event; these pin the parts that can be stated by hand.
#include <doctest/doctest.h>

#include <numeric>

#include "mst/catalog.hpp"
#include "mst/emit.hpp"
#include "mst/simulate.hpp"
#include "mst/timemodel.hpp"
#include "mst/tune.hpp"
#include "sim/builder.hpp"
#include "sim_test_support.hpp"
#include "test_support.hpp"

using namespace mst;

namespace {
constexpr bytes_t MiB = bytes_t{1} << 20;

std::vector<bytes_t> ddp_buckets(const Timeline& t) {
    std::vector<bytes_t> out;
    for (const Event& e : t.events)
        if (e.alloc && e.op == "init.ddp_buckets") out.push_back(e.bytes);
    return out;
}
}  // namespace

TEST_CASE("DDP's bucket assignment: torch's own answer for the same gradients") {
    // torch.distributed._compute_bucket_assignment_by_size on bf16 tensors of these bytes with
    // limits [1 MiB, 25 MiB] (torch 2.15) returned [[0], [1, 2, 3], [4, 5, 6]]: a bucket closes as
    // soon as it holds its limit (exactly 1 MiB closes the first), later ones at 25 MiB.
    const std::vector<bytes_t> grads{MiB, MiB / 2, 12 * MiB, 13 * MiB, 3 * MiB, MiB / 2, MiB};
    CHECK(sim::ddp_bucket_bytes(grads, MiB, 25 * MiB) == std::vector<bytes_t>{MiB, 51 * MiB / 2, 9 * MiB / 2});
    // And [[0, 1]] for half a MiB then half a MiB and a KiB: together past the first limit.
    CHECK(sim::ddp_bucket_bytes(std::vector<bytes_t>{MiB / 2, MiB / 2 + 1024}, MiB, 25 * MiB) ==
          std::vector<bytes_t>{MiB + 1024});
    CHECK(sim::ddp_bucket_bytes(std::vector<bytes_t>{}, MiB, 25 * MiB).empty());
}

TEST_CASE("DDP in the hf runtime: buckets as large as the gradients, held with the persistent state") {
    const ModelSpec m = find_model("llama-3.2-1b");
    TrainingSetup s;  // the hf runtime
    s.seq_len = 256;
    s.dp = 8;
    s.optimizer_impl = OptimizerImpl::Foreach;
    s.mlp_chunks = 4;
    s.checkpoint.assign(static_cast<std::size_t>(m.num_layers), true);
    const Timeline t = simulate(m, s, test::test_gpu());
    const std::vector<bytes_t> buckets = ddp_buckets(t);
    // Every gradient has a slice (bf16: 2 bytes per parameter); the referee's run of this setup
    // (torch 2.15's Reducer, rebuilt after the first iteration) held 49 buckets, the first 33558528
    // bytes: the final norm's gradient (2048 x 2) and the last layer's down_proj's (8192 x 2048 x 2),
    // the first two ready (the tied embedding's is ready last, after the embedding's backward).
    CHECK(std::accumulate(buckets.begin(), buckets.end(), bytes_t{0}) == 2 * m.parameters().total());
    CHECK(buckets.size() == 49);
    CHECK(buckets.front() == 33558528);
    for (const Event& e : t.events)
        if (e.op == "init.ddp_buckets") CHECK((e.phase == Phase::Init && e.category == Category::Gradients));
    // Each forward broadcasts the rotary buffers (inv_freq, original_inv_freq: 32 fp32 values each).
    std::int64_t broadcasts = 0;
    for (const Event& e : t.events)
        if (e.alloc && e.op == "ddp.broadcast_buffers") broadcasts += e.bytes == 2 * 32 * 4 ? 1 : 100;
    CHECK(broadcasts == 1);
    // One GPU: no buckets.
    s.dp = 1;
    CHECK(ddp_buckets(simulate(m, s, test::test_gpu())).empty());
}

TEST_CASE("DDP in the hf runtime: what it cannot run is a one-line error") {
    const ModelSpec m = find_model("llama-3.2-1b");
    TrainingSetup s;
    s.dp = 2;
    s.precision = Precision::Bf16Master;
    CHECK(test::expect_user_error([&] { validate(s, m); }).rfind("setup: precision: expected pure-bf16 or amp", 0) == 0);
    s.precision = Precision::PureBf16;
    s.optimizer_in_backward = true;
    CHECK(test::expect_user_error([&] { validate(s, m); }).rfind("setup: optimizer_in_backward: expected false", 0) == 0);
    s.optimizer_in_backward = false;
    s.zero_stage = 3;  // (ZeRO 1, 2 and 3 are DeepSpeed's engine: test_deepspeed.cpp, test_zero3.cpp)
    CHECK(test::expect_user_error([&] { validate(s, m); }).rfind("setup: precision: expected bf16-master", 0) == 0);
    s.zero_stage = 0;
    s.sp = 2;
    CHECK(test::expect_user_error([&] { validate(s, m); }).rfind("setup: sp: expected 1 with runtime hf", 0) == 0);
}

TEST_CASE("plain DDP plans for hf-mst: what python/mst_hf would step on unreduced gradients is refused, as it refuses it") {
    const ModelSpec m = find_model("llama-3.2-1b");
    TrainingSetup s;
    s.runtime = Runtime::Kernels;  // (the hf runtime refuses these setups itself)
    s.dp = 4;
    check_expressible("hf-mst", s, m);
    s.precision = Precision::Bf16Master;
    CHECK(test::expect_user_error([&] { check_expressible("hf-mst", s, m); })
              .rfind("hf-mst: setup.precision: expected pure-bf16 or amp with data_parallel > 1", 0) == 0);
    s.zero_stage = 2;  // DeepSpeed's optimizer: not refused
    check_expressible("hf-mst", s, m);
    s.zero_stage = 0, s.precision = Precision::PureBf16, s.optimizer_in_backward = true;
    CHECK(test::expect_user_error([&] { check_expressible("hf-mst", s, m); })
              .rfind("hf-mst: setup.optimizer_in_backward: expected false with data_parallel > 1", 0) == 0);
}

TEST_CASE("recommend --for with several GPUs in the hf runtime: hf-mst (torch's DDP or FSDP2), deepspeed and axolotl (DeepSpeed's engine)") {
    TuneRequest rq = test::hf_request("llama-3.2-1b", "h100-sxm-80gb", 8, 8192);
    rq.for_format = "hf-mst";
    const Recommendation torch_dp = recommend(rq);
    REQUIRE(torch_dp.found);
    for (const Candidate& c : torch_dp.pareto) CHECK((c.setup.zero_stage == 0 || (c.setup.zero_stage == 3 && c.setup.fsdp2)));
    rq.pins.zero_stage = 0;
    const Recommendation ddp = recommend(rq);
    REQUIRE(ddp.found);
    CHECK(ddp.best.setup.zero_stage == 0);
    rq.pins.zero_stage.reset();
    for (const char* format : {"deepspeed", "axolotl"}) {
        CAPTURE(format);
        rq.for_format = format;
        const Recommendation ds = recommend(rq);
        REQUIRE(ds.found);
        CHECK((ds.best.setup.zero_stage == 1 || ds.best.setup.zero_stage == 2));
        for (const Candidate& c : ds.pareto) CHECK((c.setup.zero_stage == 1 || c.setup.zero_stage == 2));
    }
}

// Llama-3.2-1B: P = 1235814400 (the embedding, tied: 128256 x 2048 = 262668288), pure bf16 on 8 H100s
// (NVLink 450 GB/s per direction): an all-reduce of x bf16 elements moves 2 x 7/8 x 2x bytes per rank,
// 3.5 x / 450e9 seconds: 9.61 ms for every gradient, 2.04 ms for the embedding's, ready last.
TEST_CASE("DDP's all-reduce in the hf runtime: once per step, behind the last backward but its last bucket") {
    const ModelSpec m = find_model("llama-3.2-1b");
    const GpuProfile gpu = find_gpu("h100-sxm-80gb");
    const double P = 1235814400.0, embedding = 128256.0 * 2048.0;
    REQUIRE(static_cast<double>(m.parameters().total()) == P);
    TrainingSetup s;  // the hf runtime, pure bf16
    s.seq_len = 8192;
    s.dp = 8;
    s.grad_accum = 4;  // (accelerate's no_sync: still one reduction)
    const StepTime t = predict_time(m, s, gpu);
    REQUIRE(t.backward_seconds > 3.5 * P / 450e9);
    CHECK(t.comm_seconds == doctest::Approx(3.5 * P / 450e9).epsilon(1e-12));
    CHECK(t.comm_exposed_seconds == doctest::Approx(3.5 * embedding / 450e9).epsilon(1e-12));
    // In amp the gradients are fp32, as the parameters: twice the bytes.
    s.precision = Precision::AmpFp32;
    CHECK(predict_time(m, s, gpu).comm_exposed_seconds == doctest::Approx(7 * embedding / 450e9).epsilon(1e-12));
}
