// DeepSpeed's ZeRO 1 and 2 in the hf runtime (src/core/sim/deepspeed.cpp). The referee runs
// DeepSpeed's engine and every event is compared (python/tests/test_deepspeed_referee.py,
// results/referee/*.ds-zero*); these pin what can be derived by hand from DeepSpeed's
// partitioning rule and the config's defaults.
#include <doctest/doctest.h>

#include <algorithm>
#include <numeric>

#include <nlohmann/json.hpp>

#include "mst/catalog.hpp"
#include "mst/compare.hpp"
#include "mst/simulate.hpp"
#include "mst/emit.hpp"
#include "mst/limits.hpp"
#include "mst/plan.hpp"
#include "mst/tune.hpp"
#include "mst/setup.hpp"
#include "sim_test_support.hpp"
#include "test_support.hpp"

using namespace mst;
using test::allocs;
using test::bytes_of;
using test::freed_in;

namespace {

TrainingSetup zero(const ModelSpec& m, int stage, std::int64_t dp) {
    TrainingSetup s;  // the hf runtime
    s.seq_len = 256;
    s.attention = Attention::Eager;
    s.precision = Precision::Bf16Master;
    s.zero_stage = stage;
    s.dp = dp;
    (void)m;
    return s;
}

// Llama-3-8B at 4k on 8 ranks, bf16 with fp32 masters, under DeepSpeed's ZeRO-2.
TrainingSetup llama_zero2() {
    TrainingSetup s;  // the hf runtime
    s.seq_len = 4096;
    s.precision = Precision::Bf16Master;
    s.zero_stage = 2;
    s.dp = 8;
    return s;
}

}  // namespace

// tiny-llama: P = 125248 parameters (embedding 256 x 64 = 16384; per layer q 4096, k and v 2048, o
// 4096, gate/up/down 11264, two norms of 64: 46208; two layers; the final norm 64; lm_head 16384).
// On 8 ranks P is a multiple of 2 x 8: no padding, a partition is 15656. Rank 6 owns [93936, 109592):
// the last 3472 of layer 1's up_proj (which starts at 86144), down_proj (11264), both norms, the
// final norm and the first 728 of lm_head (from 108864); the parameters it touches hold 39104.
TEST_CASE("DeepSpeed ZeRO-2: the flat buffer, the partition and its states, by DeepSpeed's partitioning") {
    const ModelSpec m = find_model("tiny-llama");
    const TrainingSetup s = zero(m, 2, 8);
    const Timeline t = simulate_rank(m, s, test::test_gpu(), 6);
    CHECK(t.rank == 6);
    CHECK(bytes_of(allocs(t, "flat_bf16", Phase::Init)) == std::vector<bytes_t>{2 * 125248});
    CHECK(bytes_of(allocs(t, "partition_master", Phase::Init)) == std::vector<bytes_t>{4 * 15656});
    CHECK(bytes_of(allocs(t, "exp_avg", Phase::Init)) == std::vector<bytes_t>{4 * 15656, 4 * 15656});
    // No parameter of its own: every weight is a view of the flat buffer.
    for (const Event& e : t.events) CHECK_FALSE((e.alloc && e.phase == Phase::Init && e.name == "q_proj"));
}

TEST_CASE("DeepSpeed ZeRO-2: one bucket per backward, the partition's gradients whole, the step's pieces") {
    const ModelSpec m = find_model("tiny-llama");
    const TrainingSetup s = zero(m, 2, 8);
    const Timeline t = simulate_rank(m, s, test::test_gpu(), 6);
    // reduce_bucket_size's default, 5e8 bf16 elements, made at the first gradient and freed in backward
    const auto bucket = allocs(t, "ipg_bucket");
    REQUIRE(bucket.size() == 1);
    CHECK(bucket[0]->bytes == 1'000'000'000);
    CHECK(bucket[0]->category == Category::Gradients);
    CHECK(freed_in(t, bucket[0]) == Phase::Backward);
    // Every gradient fits: the epilogue reduces them all at once, slices for all 8 ranks flattened.
    CHECK(bytes_of(allocs(t, "reduce_flat")) == std::vector<bytes_t>{2 * 125248});
    const auto grads = allocs(t, "grads_in_partition");
    REQUIRE(grads.size() == 1);
    CHECK(grads[0]->bytes == 2 * 39104);
    CHECK(freed_in(t, grads[0]) == Phase::Optimizer);
    // The step: each piece of the partition copied to fp64 for the norm, then the partition
    // flattened (bf16) and made fp32.
    std::vector<bytes_t> pieces = bytes_of(allocs(t, "grad_fp64", Phase::Optimizer));
    std::sort(pieces.begin(), pieces.end());
    CHECK(pieces == std::vector<bytes_t>{8 * 64, 8 * 64, 8 * 64, 8 * 728, 8 * 3472, 8 * 11264});
    CHECK(bytes_of(allocs(t, "flat_grad_partition")) == std::vector<bytes_t>{2 * 15656});
    CHECK(bytes_of(allocs(t, "partition_grad_fp32")) == std::vector<bytes_t>{4 * 15656});
    // Autograd's gradients are moved into the bucket as they come: none reaches the step.
    for (const Event& e : t.events)
        if (e.alloc && e.category == Category::Gradients && e.phase == Phase::Backward && e.name == "weight_grad")
            CHECK(freed_in(t, &e) == Phase::Backward);
}

// A bucket of 4096 elements (the plan's reduce_bucket_size, as a ds_config.json sets it): lm_head's
// gradient (16384 elements, flat offset 108864) is larger than the bucket, so it is reduced alone, by
// the next hook: its slices for rank 6 ([108864, 109592): 728) and rank 7 (the other 15656) are
// flattened into one group (728 <= 4096 goes on; 16384 passes it and ends the list). The partition's
// gradients are the same parameters, whole, whatever the bucket.
TEST_CASE("DeepSpeed ZeRO-2 with the plan's reduce_bucket_size: the bucket's bytes and its reductions") {
    const ModelSpec m = find_model("tiny-llama");
    TrainingSetup s = zero(m, 2, 8);
    s.reduce_bucket_size = 4096;
    const Timeline t = simulate_rank(m, s, test::test_gpu(), 6);
    CHECK(bytes_of(allocs(t, "ipg_bucket")) == std::vector<bytes_t>{2 * 4096});
    const auto flat = allocs(t, "reduce_flat");
    REQUIRE(flat.size() >= 2);  // several reductions, where the default bucket makes one
    CHECK(flat[0]->bytes == 2 * 16384);
    CHECK(bytes_of(allocs(t, "grads_in_partition")) == std::vector<bytes_t>{2 * 39104});
    // The knob is DeepSpeed's: only its ZeRO 1/2 engine in the hf runtime takes another value.
    CHECK_NOTHROW(validate(s, m));
    TrainingSetup other = s;
    other.zero_stage = 0, other.dp = 1;
    CHECK(test::expect_user_error([&] { validate(other, m); })
              .rfind("setup: reduce_bucket_size: expected DeepSpeed's default 500000000 unless DeepSpeed's ZeRO engine", 0) == 0);
    other = s;
    other.runtime = Runtime::Kernels;
    CHECK(test::expect_user_error([&] { validate(other, m); }).rfind("setup: reduce_bucket_size: expected DeepSpeed's default", 0) == 0);
    other = s;
    other.reduce_bucket_size = 0;
    CHECK(test::expect_user_error([&] { validate(other, m); }) == "setup: reduce_bucket_size: expected an integer in [1, 1099511627776], got 0");
    other.reduce_bucket_size = limits::kReduceBucket + 1;
    CHECK(test::expect_user_error([&] { validate(other, m); }).rfind("setup: reduce_bucket_size: expected an integer in [1, ", 0) == 0);
    // The setup file carries it (a plan's ds_config.json is written from it).
    const TrainingSetup back = parse_setup(to_json(s), m, "setup");
    CHECK(back.reduce_bucket_size == 4096);
    CHECK(parse_setup(nlohmann::json{{"dp", 8}, {"zero_stage", 2}}, m, "setup").reduce_bucket_size == kDeepSpeedReduceBucket);
    // ... and the ds_config.json says it (left out, DeepSpeed's default is the plan's).
    Plan plan;
    plan.model = m.name, plan.gpu = "h100-sxm-80gb", plan.gpus = 8, plan.setup = s;
    const auto zero_block = [&] {
        return nlohmann::json::parse(emit(plan, m, "deepspeed").at(0).content).at("zero_optimization");
    };
    CHECK(zero_block().at("reduce_bucket_size") == 4096);
    CHECK(test::expect_user_error([&] { (void)emit(plan, m, "hf-mst"); }).rfind("hf-mst: setup.reduce_bucket_size: expected DeepSpeed's default", 0) == 0);
    plan.setup.reduce_bucket_size = kDeepSpeedReduceBucket;
    CHECK_FALSE(zero_block().contains("reduce_bucket_size"));
}

TEST_CASE("DeepSpeed ZeRO-1 keeps autograd's gradients and reduces them after the last micro-step's backward") {
    const ModelSpec m = find_model("tiny-llama");
    TrainingSetup s = zero(m, 1, 8);
    s.grad_accum = 3;
    const Timeline t = simulate_rank(m, s, test::test_gpu(), 6);
    const auto grads = allocs(t, "grads_in_partition");
    REQUIRE(grads.size() == 1);
    CHECK(grads[0]->micro_step == 1);  // the last micro-step (recorded as the second)
    CHECK(grads[0]->bytes == 2 * 39104);
    // The bucket is made in the first micro-step's backward and kept to the last one's epilogue.
    const auto bucket = allocs(t, "ipg_bucket");
    REQUIRE(bucket.size() == 1);
    CHECK(bucket[0]->micro_step == 0);
}

// On 3 ranks P is padded to a multiple of 6: 125250, partitions of 41750. The last rank owns
// [83500, 125250): 2 elements past the parameters, a zero piece the step flattens with the rest.
TEST_CASE("DeepSpeed: the last rank's partition ends in padding, a zero piece of the step") {
    const ModelSpec m = find_model("tiny-llama");
    const TrainingSetup s = zero(m, 2, 3);
    const Timeline t = simulate_rank(m, s, test::test_gpu(), 2);
    CHECK(bytes_of(allocs(t, "flat_bf16")) == std::vector<bytes_t>{2 * 125250});
    const auto pad = allocs(t, "partition_pad");
    REQUIRE(pad.size() == 1);
    CHECK(pad[0]->bytes == 2 * 2);
    CHECK(freed_in(t, pad[0]) == Phase::Optimizer);
    // The other ranks end inside a parameter.
    CHECK(allocs(simulate_rank(m, s, test::test_gpu(), 1), "partition_pad").empty());
}

// Llama-3-8B: P = 8030261248, a multiple of 16: partitions of 1003782656. Rank 0 owns the embedding
// (525336576), layers 0 and 1 (218112000 each) and layer 2 up to inside its gate_proj: q, k, v, o
// (16777216 + 4194304 + 4194304 + 16777216 = 41943040) and gate's first 279040 of 58720256. The
// parameters it touches hold 525336576 + 2 x 218112000 + 41943040 + 58720256 = 1062223872.
TEST_CASE("DeepSpeed ZeRO-2 on Llama-3-8B: a rank's gradients in partition, and gradients too large for the bucket") {
    const ModelSpec m = find_model("llama-3-8b");
    TrainingSetup s = llama_zero2();
    s.mlp_chunks = 4;
    s.lm_chunks = 8;
    s.checkpoint.assign(static_cast<std::size_t>(m.num_layers), true);
    const Timeline t = simulate_rank(m, s, test::test_gpu(), 0);
    CHECK(bytes_of(allocs(t, "partition_master")) == std::vector<bytes_t>{4 * bytes_t{1003782656}});
    CHECK(bytes_of(allocs(t, "grads_in_partition")) == std::vector<bytes_t>{2 * bytes_t{1062223872}});
    const auto pieces = allocs(t, "grad_fp64");
    CHECK(pieces.size() == 1 + 2 * 9 + 4 + 1);
    bytes_t sum = 0;
    for (const Event* e : pieces) sum += e->bytes;
    CHECK(sum == 8 * bytes_t{1003782656});
    // A reduction whose bucket spans two ranks' partitions flattens it (a cat); every bucket holds at
    // most 5e8 elements.
    const auto flats = allocs(t, "reduce_flat");
    CHECK_FALSE(flats.empty());
    for (const Event* e : flats) CHECK(e->bytes <= 1'000'000'000);
    // The embedding's and lm_head's gradients (525336576 elements) are larger than the bucket: they
    // stay where autograd made them until reduced; rank 0 owns the embedding's, which is copied into
    // its partition's gradients and freed at the epilogue, after the last hook.
    const Event* embedding = nullptr;
    for (const Event& e : t.events)
        if (e.alloc && e.category == Category::Gradients && e.bytes == 2 * bytes_t{525336576} && e.layer == -1) embedding = &e;
    REQUIRE(embedding != nullptr);
    CHECK(freed_in(t, embedding) == Phase::Backward);
}

TEST_CASE("DeepSpeed in the hf runtime: every rank is walked, the busiest is shown, and --rank picks one") {
    const ModelSpec m = find_model("tiny-llama");
    const TrainingSetup s = zero(m, 2, 3);
    CHECK(walked_ranks(s, m) == std::vector<std::int64_t>{0, 1, 2});
    const Estimate e = estimate(m, s, test::test_gpu());
    CHECK(e.ranks_walked == 3);
    bytes_t highest = 0;
    for (std::int64_t r = 0; r < 3; ++r) highest = std::max(highest, summarize(simulate_rank(m, s, test::test_gpu(), r), m.num_layers).peak.bytes);
    CHECK(e.summary.peak.bytes == highest);
    CHECK(test::expect_user_error([&] { (void)simulate_rank(m, s, test::test_gpu(), 3); }).starts_with("setup: rank: "));
    // DDP (ZeRO 0) ranks are alike: one walk.
    TrainingSetup ddp = s;
    ddp.zero_stage = 0;
    ddp.precision = Precision::PureBf16;
    CHECK(walked_ranks(ddp, m).empty());
}

TEST_CASE("the tuner's simulator walks DeepSpeed's ranks on several threads with the numbers of one") {
    // Setups one after the other, as a search makes them (each worker resumes from its own last
    // replay): every peak equals a fresh simulator's, and whether a setup fits a budget (the
    // device's capacity, where cached segments are released) and the peaks under it are one
    // worker's, at budgets about the peak; under the requested peak nothing fits.
    const GpuProfile gpu = test::test_gpu();
    int busier_rank_cases = 0;  // setups where a rank after the first is the busiest
    for (const char* name : {"tiny-llama", "llama-3.2-1b"}) {
        const ModelSpec m = find_model(name);
        PeakSimulator one(m, gpu, 1), four(m, gpu, 4);
        for (int stage : {1, 2})
            for (std::int64_t dp : {2, 3, 8, 13})
                for (std::int64_t ga : {1, 2}) {
                    TrainingSetup s = zero(m, stage, dp);
                    s.seq_len = name == std::string("tiny-llama") ? 256 : 2048;
                    s.grad_accum = ga;
                    s.checkpoint.assign(static_cast<std::size_t>(m.num_layers), ga == 2);
                    CAPTURE(name);
                    CAPTURE(stage);
                    CAPTURE(dp);
                    CAPTURE(ga);
                    const MemoryPeaks fresh = simulate_peaks(m, s, gpu, true, gpu.usable_bytes());
                    for (PeakSimulator* sim : {&one, &four}) {
                        MemoryPeaks p;
                        REQUIRE(sim->fits(s, gpu.usable_bytes(), kNoCapacity, &p));
                        CHECK(p.peak_bytes == fresh.peak_bytes);
                        CHECK(p.peak_allocated_bytes == fresh.peak_allocated_bytes);
                        CHECK(p.peak_reserved_bytes == fresh.peak_reserved_bytes);
                        CHECK(p.segments_released == fresh.segments_released);
                        CHECK_FALSE(sim->fits(s, fresh.peak_bytes - 1, kNoCapacity));
                    }
                    // A budget rank 0 fits in and a busier rank does not (requested bytes): no simulator admits it.
                    bytes_t first = 0, busiest = 0;
                    for (std::int64_t r = 0; r < dp; ++r) {
                        const bytes_t peak = estimate(m, s, gpu, std::nullopt, r).summary.peak.bytes;
                        if (r == 0) first = peak;
                        busiest = std::max(busiest, peak);
                    }
                    if (busiest > first) {
                        ++busier_rank_cases;
                        for (PeakSimulator* sim : {&one, &four}) {
                            CHECK_FALSE(sim->fits(s, first, kNoCapacity, nullptr, false));
                            CHECK(sim->fits(s, busiest, kNoCapacity, nullptr, false));
                        }
                    }
                    for (const bytes_t budget : {fresh.peak_reserved_bytes, fresh.peak_reserved_bytes - 1,
                                                 fresh.peak_reserved_bytes - (bytes_t{2} << 20), fresh.peak_allocated_bytes}) {
                        MemoryPeaks a, b;
                        const bool fits_one = one.fits(s, budget, kNoCapacity, &a), fits_four = four.fits(s, budget, kNoCapacity, &b);
                        CHECK(fits_one == fits_four);
                        if (fits_one && fits_four) {
                            CHECK(a.peak_reserved_bytes == b.peak_reserved_bytes);
                            CHECK(a.segments_released == b.segments_released);
                        }
                    }
                }
    }
    CHECK(busier_rank_cases > 0);
}

TEST_CASE("DeepSpeed in the hf runtime: what its engine does not run as modelled is a one-line error") {
    const ModelSpec m = find_model("tiny-llama");
    TrainingSetup s = zero(m, 2, 8);
    s.precision = Precision::AmpFp32;
    CHECK(test::expect_user_error([&] { validate(s, m); }).rfind("setup: precision: expected bf16-master or pure-bf16", 0) == 0);
    s.precision = Precision::PureBf16;
    s.state_dtype = StateDtype::Fp32;
    CHECK(test::expect_user_error([&] { validate(s, m); }).rfind("setup: optimizer_state_dtype: expected bf16", 0) == 0);
    s.state_dtype.reset();
    s.optimizer_impl = OptimizerImpl::Foreach;
    CHECK(test::expect_user_error([&] { validate(s, m); }).rfind("setup: optimizer: expected adamw with optimizer_impl fused", 0) == 0);
    s.optimizer_impl = OptimizerImpl::Fused;
    s.dp = limits::kDeepSpeedRanks + 1;
    CHECK(test::expect_user_error([&] { validate(s, m); }).rfind("setup: dp: expected at most", 0) == 0);
}

TEST_CASE("the tuner keeps the asked reduce_bucket_size where DeepSpeed's engine runs, and only there") {
    // recommend: every candidate of --for deepspeed is DeepSpeed's ZeRO 1/2, so each carries the bucket.
    TuneRequest rq = test::hf_request("tiny-llama", "h100-sxm-80gb", 8, 256);
    rq.base.attention = Attention::Eager;
    rq.base.precision = Precision::Bf16Master;
    rq.base.reduce_bucket_size = 4096;
    rq.for_format = "deepspeed";
    const Recommendation r = recommend(rq);
    REQUIRE(r.found);
    CHECK(r.best.setup.deepspeed_zero());
    CHECK(r.best.setup.reduce_bucket_size == 4096);
    for (const Candidate& c : r.pareto) CHECK(c.setup.reduce_bucket_size == 4096);
    // Without a format that trains in DeepSpeed, no candidate has the bucket: said, not ignored.
    rq.for_format.clear();
    rq.base.precision = Precision::PureBf16;  // (DDP's, which bf16 master weights cannot run)
    CHECK(test::expect_user_error([&] { (void)recommend(rq); }).rfind("recommend: reduce-bucket-size: expected --for deepspeed or axolotl", 0) == 0);
    // max-seq: DDP's rows (zero 0, the hf runtime's without --for) keep DeepSpeed's default; the user's
    // own setup, DeepSpeed's ZeRO-2, keeps its bucket.
    TrainingSetup user = zero(find_model("tiny-llama"), 2, 8);
    user.precision = Precision::PureBf16;
    user.reduce_bucket_size = 4096;
    rq.base = user;
    const MaxSeqResult ms = max_seq(rq, user);
    REQUIRE(ms.rows.size() >= 2);
    for (std::size_t i = 0; i + 1 < ms.rows.size(); ++i) CHECK(ms.rows[i].setup.reduce_bucket_size == kDeepSpeedReduceBucket);
    CHECK(ms.rows.back().strategy == "your setup");
    CHECK(ms.rows.back().setup.reduce_bucket_size == 4096);
    // With --for deepspeed every row is DeepSpeed's (ZeRO 2, its most sharded): each has the bucket.
    rq.for_format = "deepspeed";
    const MaxSeqResult ds = max_seq(rq, std::nullopt);
    REQUIRE_FALSE(ds.rows.empty());
    for (const MaxSeqRow& row : ds.rows) CHECK((row.setup.zero_stage == 2 && row.setup.reduce_bucket_size == 4096));
    // Neither a format nor the user's own setup under DeepSpeed: no row could have it.
    rq.for_format.clear();
    CHECK(test::expect_user_error([&] { (void)max_seq(rq, std::nullopt); }).rfind("max-seq: reduce-bucket-size: expected --for deepspeed", 0) == 0);
    // Axolotl on one GPU in pure bf16 searches ZeRO 0 (the plain Trainer) too: pinned there, the bucket is contradicted.
    TuneRequest one = test::hf_request("tiny-llama", "h100-sxm-80gb", 1, 256);
    one.base.reduce_bucket_size = 4096;
    one.for_format = "axolotl";
    one.pins.zero_stage = 0;
    CHECK(test::expect_user_error([&] { (void)recommend(one); }).rfind("recommend: pin: zero=0: expected 1 or 2 with --reduce-bucket-size", 0) == 0);
}

TEST_CASE("recommend --for deepspeed in the hf runtime: ZeRO 1 or 2 as DeepSpeed runs it, a plan its emitter writes") {
    // Llama-3-8B on 8 GPUs at 8k: under DDP every GPU holds 8.03 B x (2 + 2 + 2 + 2) bytes of bf16
    // state (64 GB) and DDP's buckets (16 GB), more than an 80 GB GPU; DeepSpeed's partitions fit.
    TuneRequest rq = test::hf_request("llama-3-8b", "h100-sxm-80gb", 8, 8192);
    rq.for_format = "hf-mst";
    rq.pins.zero_stage = 0;
    CHECK_FALSE(recommend(rq).found);
    rq.pins.zero_stage.reset();  // (python/mst_hf's users shard with torch's FSDP2: test_tune.cpp)
    rq.for_format = "deepspeed";
    const Recommendation r = recommend(rq);
    REQUIRE(r.found);
    CHECK(r.best.setup.runtime == Runtime::Hf);
    CHECK(r.best.setup.deepspeed_zero());
    Plan plan;
    plan.model = rq.model.name;
    plan.gpu = rq.gpu.name;
    plan.gpus = rq.gpus;
    plan.setup = r.best.setup;
    CHECK_FALSE(emit(plan, rq.model, "deepspeed").empty());  // emit refuses nothing recommend --for produced
    // What the hf runtime does not model for DeepSpeed is named (its ZeRO-3 with pure bf16: test_zero3.cpp).
    rq.pins.zero_stage = 3;
    CHECK(test::expect_user_error([&] { (void)recommend(rq); }).rfind("setup: precision: expected bf16-master with runtime hf and ZeRO-3", 0) == 0);
    rq.pins.zero_stage = 0;
    CHECK(test::expect_user_error([&] { (void)recommend(rq); }).rfind("recommend: pin: zero=0: expected 1 or 2", 0) == 0);
    // max-seq plans the same trainer: its rows use DeepSpeed's ZeRO-2.
    rq.pins.zero_stage.reset();
    for (const MaxSeqRow& row : max_seq(rq, std::nullopt).rows) {
        CAPTURE(row.strategy);
        CHECK(row.setup.zero_stage == 2);
    }
}

TEST_CASE("Axolotl on one GPU: the plain Trainer with pure bf16, DeepSpeed's engine when its knobs need it") {
    TuneRequest rq = test::hf_request("llama-3.2-1b", "h100-sxm-80gb", 1, 8192);
    rq.for_format = "axolotl";
    const Recommendation plain = recommend(rq);
    REQUIRE(plain.found);
    CHECK(plain.best.setup.zero_stage == 0);  // (DeepSpeed's flat buffer and bucket cost more on one GPU)
    // max-seq plans the same trainer: the plain step, not DeepSpeed's ZeRO-2
    TuneRequest big = test::hf_request("llama-3-8b", "h100-sxm-80gb", 1, 8192);
    big.for_format = "axolotl";
    for (const MaxSeqRow& row : max_seq(big, std::nullopt).rows) CHECK(row.setup.zero_stage == 0);
    // bf16 master weights need DeepSpeed in Axolotl (its emitter writes a ds_config.json): ZeRO 1 or 2
    rq.base.precision = Precision::Bf16Master;
    const Recommendation ds = recommend(rq);
    REQUIRE(ds.found);
    CHECK(ds.best.setup.deepspeed_zero());
    // One DeepSpeed rank: nothing differs between ranks, one step is walked.
    CHECK(walked_ranks(ds.best.setup, rq.model).empty());
    CHECK(simulate_rank(rq.model, ds.best.setup, test::test_gpu(), 0).rank == 0);
}

TEST_CASE("DeepSpeed formats in the hf runtime: what the search cannot plan is named before it starts") {
    TuneRequest rq = test::hf_request("llama-3-8b", "h100-sxm-80gb", limits::kDeepSpeedRanks + 1, 8192);
    rq.for_format = "deepspeed";
    CHECK(test::expect_user_error([&] { (void)recommend(rq); }).rfind("recommend: gpus: expected at most 128 with runtime hf and --for deepspeed", 0) == 0);
    CHECK(test::expect_user_error([&] { (void)max_seq(rq, std::nullopt); }).rfind("max-seq: gpus: expected at most 128", 0) == 0);
    // torchtitan over several GPUs in the hf runtime: its FSDP2 fully sharding alone (no ZeRO 1 in torchtitan)
    rq.gpus = 8;
    rq.for_format = "torchtitan";
    rq.pins.zero_stage = 1;
    CHECK(test::expect_user_error([&] { (void)recommend(rq); }).rfind("recommend: pin: zero=1: expected 3 with runtime hf and --for torchtitan", 0) == 0);
    // Axolotl without DeepSpeed names the Trainer's fused AdamW: another implementation is not its plan.
    TuneRequest one = test::hf_request("llama-3.2-1b", "h100-sxm-80gb", 1, 8192);
    one.for_format = "axolotl";
    one.base.optimizer_impl = OptimizerImpl::Foreach;
    CHECK(test::expect_user_error([&] { (void)recommend(one); }).find("axolotl: setup.optimizer_impl: expected fused without DeepSpeed") != std::string::npos);
}

TEST_CASE("a DeepSpeed measurement is compared with its rank's step, and must say which rank it is") {
    const ModelSpec m = find_model("tiny-llama");
    const TrainingSetup s = zero(m, 2, 8);
    StepFile measured = test::measured_rank(s, "tiny-llama", 6);
    CHECK(predict_measured(measured).rank == 6);
    measured.timeline.rank = -1;
    CHECK(test::expect_user_error([&] { (void)predict_measured(measured); }).rfind("m.json: timeline.rank: expected the rank", 0) == 0);
}

// overlap_comm (DeepSpeed's stage_1_and_2.py setup_buckets): a second bucket is made with the first,
// at a backward's first gradient, and each reduction that overflows a bucket turns to the other one.
// _release_ipg_buffers clears the list of buckets: the second goes first.
TEST_CASE("DeepSpeed ZeRO-2 with overlap_comm: two buckets from the first gradient to the epilogue") {
    const ModelSpec m = find_model("tiny-llama");
    TrainingSetup s = zero(m, 2, 8);
    s.reduce_bucket_size = 4096;
    s.overlap_comm = true;
    CHECK_NOTHROW(validate(s, m));
    const Timeline t = simulate_rank(m, s, test::test_gpu(), 6);
    const auto buckets = allocs(t, "ipg_bucket");
    REQUIRE(buckets.size() == 2);
    CHECK(bytes_of(buckets) == std::vector<bytes_t>{2 * 4096, 2 * 4096});
    CHECK(buckets[0]->op == buckets[1]->op);  // made together, at lm_head's gradient
    std::vector<std::int64_t> freed;
    for (const Event& e : t.events)
        if (!e.alloc && (e.tensor == buckets[0]->tensor || e.tensor == buckets[1]->tensor)) freed.push_back(e.tensor);
    CHECK(freed == std::vector<std::int64_t>{buckets[1]->tensor, buckets[0]->tensor});
    // The reductions and the partition's gradients are the one bucket's: which bucket a gradient goes
    // to moves no byte.
    TrainingSetup one = s;
    one.overlap_comm = false;
    const Timeline u = simulate_rank(m, one, test::test_gpu(), 6);
    CHECK(bytes_of(allocs(t, "reduce_flat")) == bytes_of(allocs(u, "reduce_flat")));
    CHECK(bytes_of(allocs(t, "grads_in_partition")) == std::vector<bytes_t>{2 * 39104});
    CHECK(t.events.size() == u.events.size() + 2);
}

// ZeRO-1 with overlap_comm reduces in the last micro-step's hooks (process_gradients at the
// accumulation boundary), not after its backward: rank 6's gradients of other partitions up to the
// bucket's size become views of the buckets, so autograd's go in backward.
TEST_CASE("DeepSpeed ZeRO-1 with overlap_comm reduces in the last micro-step's backward") {
    const ModelSpec m = find_model("tiny-llama");
    TrainingSetup s = zero(m, 1, 8);
    s.grad_accum = 3;
    s.reduce_bucket_size = 4096;
    s.overlap_comm = true;
    const Timeline t = simulate_rank(m, s, test::test_gpu(), 6);
    const auto buckets = allocs(t, "ipg_bucket");
    REQUIRE(buckets.size() == 2);
    CHECK((buckets[0]->micro_step == 0 && buckets[1]->micro_step == 0));  // kept to the last micro-step's epilogue
    const auto flat = allocs(t, "reduce_flat");
    REQUIRE_FALSE(flat.empty());
    for (const Event* e : flat) CHECK((e->micro_step == 1 && e->op != "deepspeed.reduce_gradients"));
    CHECK(flat.front()->bytes == 2 * 16384);  // lm_head's gradient, the first to come and larger than the bucket
    // The first comes before the embedding's gradient, backward's last; without overlap_comm they all
    // wait for backward's end.
    auto first_reduction_after_embedding = [](const Timeline& timeline) {
        bool embedding = false;
        for (const Event& e : timeline.events) {
            if (e.alloc && e.micro_step == 1 && e.op == "embedding" && e.name == "weight_grad") embedding = true;
            if (e.alloc && e.name == "reduce_flat") return embedding;
        }
        FAIL("no reduction");
        return false;
    };
    CHECK_FALSE(first_reduction_after_embedding(t));
    TrainingSetup late = s;
    late.overlap_comm = false;
    CHECK(first_reduction_after_embedding(simulate_rank(m, late, test::test_gpu(), 6)));
}

TEST_CASE("overlap_comm is DeepSpeed's: validated, carried by the setup file, written by the emitter") {
    const ModelSpec m = find_model("tiny-llama");
    TrainingSetup s = zero(m, 2, 8);
    s.overlap_comm = true;
    TrainingSetup other = s;
    other.zero_stage = 0;
    CHECK(test::expect_user_error([&] { validate(other, m); })
              .rfind("setup: overlap_comm: expected false unless DeepSpeed's ZeRO 1/2 engine runs the step", 0) == 0);
    other = s;
    other.runtime = Runtime::Kernels;
    CHECK(test::expect_user_error([&] { validate(other, m); }).rfind("setup: overlap_comm: expected false unless", 0) == 0);
    CHECK(parse_setup(to_json(s), m, "setup").overlap_comm);
    CHECK_FALSE(parse_setup(nlohmann::json{{"dp", 8}, {"zero_stage", 2}}, m, "setup").overlap_comm);
    CHECK(test::expect_user_error([&] { (void)parse_setup(nlohmann::json{{"dp", 8}, {"zero_stage", 2}, {"overlap_comm", "yes"}}, m, "setup"); })
              .rfind("setup: overlap_comm: expected", 0) == 0);
    Plan plan;
    plan.model = m.name, plan.gpu = "h100-sxm-80gb", plan.gpus = 8, plan.setup = s;
    const auto zero_block = [&] { return nlohmann::json::parse(emit(plan, m, "deepspeed").at(0).content).at("zero_optimization"); };
    CHECK(zero_block().at("overlap_comm") == true);
    CHECK(test::expect_user_error([&] { (void)emit(plan, m, "hf-mst"); }).rfind("hf-mst: setup.overlap_comm: expected false", 0) == 0);
    CHECK(test::expect_user_error([&] { (void)emit(plan, m, "torchtitan"); }).rfind("torchtitan: setup.overlap_comm: expected false", 0) == 0);
    // (a plan of the kernels runtime models no DeepSpeed engine: its file leaves DeepSpeed's defaults)
    Plan kernels = plan;
    kernels.setup.overlap_comm = false, kernels.setup.runtime = Runtime::Kernels;
    CHECK_FALSE(nlohmann::json::parse(emit(kernels, m, "deepspeed").at(0).content).at("zero_optimization").contains("overlap_comm"));
    plan.setup.overlap_comm = false;  // written either way: a file copied over it cannot turn it on unseen
    CHECK(zero_block().at("overlap_comm") == false);
}

// Llama-3-8B, P = 8030261248, on 8 H100s (NVLink 450 GB/s per direction): an all-reduce of the bf16
// gradients moves 2 x 7/8 x 2P bytes per rank, 3.5 P / 450e9 = 62.46 ms; the all-gather of the
// updated bf16 parameters after the step 7/8 x 2P, 31.23 ms.
TEST_CASE("DeepSpeed's communication: waited for without overlap_comm, behind backward with it") {
    const ModelSpec m = find_model("llama-3-8b");
    const GpuProfile gpu = find_gpu("h100-sxm-80gb");
    const double P = 8030261248.0;
    REQUIRE(static_cast<double>(m.parameters().total()) == P);
    const double all_reduce = 3.5 * P / 450e9, all_gather = 1.75 * P / 450e9;
    TrainingSetup s = llama_zero2();
    s.grad_accum = 2;
    StepTime t = predict_time(m, s, gpu);
    CHECK(t.comm_exposed_seconds == doctest::Approx(2 * all_reduce + all_gather).epsilon(1e-12));
    CHECK(t.comm_seconds == doctest::Approx(2 * all_reduce + all_gather).epsilon(1e-12));
    s.zero_stage = 1;  // one reduction, in the last micro-step
    CHECK(predict_time(m, s, gpu).comm_exposed_seconds == doctest::Approx(all_reduce + all_gather).epsilon(1e-12));
    // overlap_comm: backward (longer than the reduction) hides all but what its end flushes, in each
    // micro-step's backward (ZeRO-2): the embedding's gradient, ready last (128256 x 4096 = 525336576
    // elements), and what the bucket held when it came (taken full, 5e8): 3.5 x 1025336576 / 450e9 = 7.97 ms
    s.zero_stage = 2;
    s.overlap_comm = true;
    t = predict_time(m, s, gpu);
    REQUIRE(t.backward_seconds > all_reduce);
    CHECK(t.comm_exposed_seconds == doctest::Approx(2 * 3.5 * (525336576.0 + 5e8) / 450e9 + all_gather).epsilon(1e-12));
    CHECK(t.comm_seconds == doctest::Approx(2 * all_reduce + all_gather).epsilon(1e-12));
    // The Trainer's "auto" bucket (hidden_size^2 = 16777216): the embedding and one such bucket
    s.reduce_bucket_size = 16777216;
    CHECK(predict_time(m, s, gpu).comm_exposed_seconds ==
          doctest::Approx(2 * 3.5 * (525336576.0 + 16777216.0) / 450e9 + all_gather).epsilon(1e-12));
    // A bucket larger than the embedding: the same rule (what it held, and the embedding after it or with
    // it), never less waited for than with a smaller bucket
    s.reduce_bucket_size = 1'000'000'000;
    CHECK(predict_time(m, s, gpu).comm_exposed_seconds ==
          doctest::Approx(2 * 3.5 * (525336576.0 + 1e9) / 450e9 + all_gather).epsilon(1e-12));
}

TEST_CASE("recommend --for deepspeed searches overlap_comm: a second bucket for hidden reductions, where it fits") {
    TuneRequest rq = test::hf_request("llama-3-8b", "h100-sxm-80gb", 8, 4096);
    rq.for_format = "deepspeed";
    const Recommendation r = recommend(rq);
    REQUIRE(r.found);
    CHECK(r.best.setup.deepspeed_zero());
    CHECK(r.best.setup.overlap_comm);  // 0.93 GiB more, and its reductions hidden: it fits at 4k
    rq.pins.overlap_comm = false;
    const Recommendation off = recommend(rq);
    REQUIRE(off.found);
    CHECK_FALSE(off.best.setup.overlap_comm);
    CHECK(off.best.time.tokens_per_second < r.best.time.tokens_per_second);
    // Pinned on where DeepSpeed's engine cannot run: said before the search.
    rq.pins.overlap_comm = true;
    rq.for_format.clear();
    CHECK(test::expect_user_error([&] { (void)recommend(rq); }) ==
          "--pin: overlap_comm: yes: expected --for deepspeed or axolotl with runtime hf (DeepSpeed's ZeRO 1/2 engine has it)");
    // Axolotl on one GPU searches ZeRO 0 (the plain Trainer) too: pinned there, overlap_comm is contradicted.
    TuneRequest one = test::hf_request("tiny-llama", "h100-sxm-80gb", 1, 256);
    one.for_format = "axolotl";
    one.pins.zero_stage = 0;
    one.pins.overlap_comm = true;
    CHECK(test::expect_user_error([&] { (void)recommend(one); }).rfind("recommend: pin: zero=0: expected 1 or 2 with overlap_comm=yes", 0) == 0);
}
