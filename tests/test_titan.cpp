// torchtitan's own step in the hf runtime (model_code torchtitan, src/core/sim/titan.cpp). The titan referee
// runs torchtitan 0.3.0 on fake tensors and compare --run finds every event equal
// (python/tests/test_titan_referee.py); these pin what docs/torchtitan-model.md derives by hand from
// torchtitan's and torch's sources for Llama-3.2-1B (d 2048, 32 heads, 8 KV heads of 64, I 8192, V 128256,
// 16 layers, tied) on one GPU at S 256, and the scope the model is proven for.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include "mst/catalog.hpp"
#include "mst/compare.hpp"
#include "mst/emit.hpp"
#include "mst/error.hpp"
#include "mst/setup.hpp"
#include "mst/simulate.hpp"
#include "mst/timeline.hpp"
#include "sim_test_support.hpp"
#include "test_support.hpp"

using namespace mst;

namespace {

TrainingSetup titan_setup(std::int64_t seq) {
    TrainingSetup s;  // the hf runtime, pure bf16, one GPU, no checkpointing, the unchunked loss
    s.seq_len = seq;
    s.model_code = ModelCode::Torchtitan;
    return s;
}

// torchtitan's ChunkedLossWrapper (loss.num_chunks): each chunk's backward runs in the forward (lm_impl fused)
TrainingSetup chunked_setup(std::int64_t seq, std::int64_t chunks) {
    TrainingSetup s = titan_setup(seq);
    s.lm_chunks = chunks;
    s.lm_impl = LmHeadImpl::FusedForward;
    return s;
}

// torchtitan's FSDP2 over `dp` GPUs (data_parallel_shard_degree): the plan's fsdp2 with ZeRO 3
TrainingSetup sharded_setup(std::int64_t seq, std::int64_t dp) {
    TrainingSetup s = titan_setup(seq);
    s.dp = dp, s.zero_stage = 3, s.fsdp2 = true;
    return s;
}

// FullAC (activation_checkpoint full): every block wrapped in torch's non-reentrant checkpoint
TrainingSetup full_ac_setup(std::int64_t seq) {
    TrainingSetup s = titan_setup(seq);
    s.checkpoint.assign(16, true);
    return s;
}

constexpr std::int64_t kV = 128256, kD = 2048, kL = 16, kHd = 64, kS = 256;
// a layer's parameters: the fused wqkv (32 + 2 x 8 heads of 64), wo, w1, w2, w3, two norms
constexpr std::int64_t kLayer = (32 + 16) * kHd * kD + kD * kD + 3 * 8192 * kD + 2 * kD;

}  // namespace

TEST_CASE("torchtitan's step holds its FSDP2 groups' gradients from the last step and peaks at the root's reduction") {
    const ModelSpec m = find_model("llama-3.2-1b");
    const Timeline t = simulate(m, titan_setup(kS), test::test_gpu());
    // Persistent: the bf16 weights (the tied embedding once), every layer's complex64 RoPE table [S, hd / 2],
    // AdamW's two bf16 states and 114 fp32 step counters, the previous step's sharded gradients: a bf16 buffer
    // per layer and the root's (the embedding, the final norm and torchtitan's untied LM-head parameter: 2 V d + d)
    const std::int64_t params = kV * kD + kL * kLayer + kD;
    const std::int64_t R = 2 * kV * kD + kD;
    const bytes_t weights = 2 * params + kL * 4 * kS * kHd;
    const bytes_t optimizer = 4 * params + 114 * 4;
    const bytes_t grads = kL * 2 * kLayer + 2 * R;
    const Summary sum = summarize(t, m.num_layers);
    CHECK(sum.end_bytes == weights + optimizer + grads);
    // The peak is the root group's post-backward: its fp32 reduce-scatter input and output (4 R each) and its
    // bf16 cast (2 R), beside every layer's new gradient buffer and the step's own tensors (the batch 3 x 8 S + 8,
    // the block mask 96, the document ids 4 S and offsets 4 x 384, the loss and backward's ones 4 each)
    const bytes_t step = 3 * 8 * kS + 8 + 96 + 4 * kS + 4 * 384 + 4 + 4;
    CHECK(sum.peak.bytes == weights + optimizer + kL * 2 * kLayer + 4 * R + 4 * R + 2 * R + step);
    CHECK(sum.peak.bytes == 14'615'618'616);  // the referee's record of torchtitan's step (docs/torchtitan-model.md)
    // Two sequences a micro-batch: the same state, the step's own tensors for T = 2 S tokens, the mask mod's other
    // branch holding doc_end_by_token (4 T) instead of the document ids and offsets, the block tensors per row
    TrainingSetup two = titan_setup(kS);
    two.micro_batch = 2;
    const std::int64_t T = 2 * kS, nb = 2;
    const bytes_t step2 = 3 * 8 * T + 8 + 4 * (4 * 2 * nb + 4 * 2 * nb * nb) + 4 * T + 4 + 4;
    const Summary batched = summarize(simulate(m, two, test::test_gpu()), m.num_layers);
    CHECK(batched.peak.bytes == weights + optimizer + kL * 2 * kLayer + 4 * R + 4 * R + 2 * R + step2);
    CHECK(batched.peak.bytes == 14'615'624'344);  // the referee's record (micro-batch 2: docs/torchtitan-model.md, section 1)
}

TEST_CASE("torchtitan accumulating micro-batches adds each later one's gradients into the sharded ones and keeps their inputs") {
    // Trainer.train_step: gradients zeroed and valid tokens counted once; FSDP2 reduce-scatters every micro-batch,
    // a later one's bf16 cast added into the sharded gradients; each micro-batch's input and positions (2 x 8 S)
    // written back into the step's batch dicts, held to its end; the previous micro-batch's loss (4) held to the
    // end of the next one's backward. The peak, the root's post-backward of the last micro-batch, holds the root's
    // sharded gradient from the ones before (2 R) beside what one micro-batch's holds.
    const ModelSpec m = find_model("llama-3.2-1b");
    const std::int64_t R = 2 * kV * kD + kD;
    const Summary one = summarize(simulate(m, titan_setup(kS), test::test_gpu()), m.num_layers);
    for (const auto& [accumulation, referee] : {std::pair<std::int64_t, bytes_t>{2, 15'666'299'964}, {3, 15'666'304'060}}) {
        CAPTURE(accumulation);
        TrainingSetup s = titan_setup(kS);
        s.grad_accum = accumulation;
        const Summary sum = summarize(simulate(m, s, test::test_gpu()), m.num_layers);
        CHECK(sum.end_bytes == one.end_bytes);
        CHECK(sum.peak.bytes == one.peak.bytes + 2 * R + 2 * 8 * kS * (accumulation - 1) + 4);
        CHECK(sum.peak.bytes == referee);  // the referee's records (python/tests/test_titan_referee.py)
    }
}

TEST_CASE("torchtitan's FSDP2 kept gathered from forward to backward (fsdp_reshard_after_forward never) is its referee's step") {
    // Each layer's group stays gathered from its forward to its post-backward; the tail's, resharded by the chunked
    // loss after the final norm, is gathered again for its backward. The titan referee's records of the plans
    // `recommend --model M --gpu h100-sxm-80gb --gpus N --seq S --for torchtitan --fsdp2-reshard-after-forward false
    // --pin lm_chunks=C --pin checkpoint=all` (python/tests/test_titan_referee.py), event for event:
    struct Case {
        const char* model;
        std::int64_t dp, seq, chunks;
        bytes_t referee;
    };
    for (const Case& c : {Case{"llama-3.2-1b", 2, 1024, 4, 9'485'926'492}, Case{"llama-3-8b", 4, 1024, 1, 30'500'913'692}}) {
        CAPTURE(c.model);
        const ModelSpec m = find_model(c.model);
        TrainingSetup s = c.chunks > 1 ? chunked_setup(c.seq, c.chunks) : titan_setup(c.seq);
        s.dp = c.dp, s.zero_stage = 3, s.fsdp2 = true, s.fsdp2_reshard_after_forward = false;
        s.checkpoint.assign(static_cast<std::size_t>(m.num_layers), true);
        const Summary kept = summarize(simulate(m, s, test::test_gpu()), m.num_layers);
        CHECK(kept.peak.bytes == c.referee);
        // every layer's parameters gathered at once at the end of forward: more than resharding after each holds
        TrainingSetup resharded = s;
        resharded.fsdp2_reshard_after_forward = true;
        CHECK(kept.peak.bytes > summarize(simulate(m, resharded, test::test_gpu()), m.num_layers).peak.bytes);
    }
}

TEST_CASE("torchtitan's chunked loss reduces its LM head's gradient alone and keeps a second root buffer") {
    const ModelSpec m = find_model("llama-3.2-1b");
    const Summary sum = summarize(simulate(m, chunked_setup(kS, 2), test::test_gpu()), m.num_layers);
    const std::int64_t params = kV * kD + kL * kLayer + kD, Vd = kV * kD;
    const bytes_t weights = 2 * params + kL * 4 * kS * kHd;
    const bytes_t optimizer = 4 * params + 114 * 4;
    // The LM head's gradient is reduce-scattered alone with the last chunk (its bf16 shard, 2 V d, is the tied
    // embedding's too), the embedding's and the final norm's at the end of backward into a buffer of their own
    // (2 (V d + d)), which the norm's sharded gradient views: both stay to the next step's zero_grad.
    const bytes_t grads = kL * 2 * kLayer + 2 * Vd + 2 * (Vd + kD);
    CHECK(sum.end_bytes == weights + optimizer + grads);
    // The peak is that last reduction: fp32 input and output (4 (V d + d) each) and the bf16 cast, beside the
    // layers' new gradients, the LM head's shard and the step's tensors (as unchunked: the loss is the chunks' sum)
    const bytes_t step = 3 * 8 * kS + 8 + 96 + 4 * kS + 4 * 384 + 4 + 4;
    CHECK(sum.peak.bytes == weights + optimizer + kL * 2 * kLayer + 2 * Vd + 10 * (Vd + kD) + step);
    CHECK(sum.peak.bytes == 12'514'272'312);  // the referee's record (docs/torchtitan-model.md, section 6)
}

TEST_CASE("torchtitan with every layer checkpointed keeps each layer's input and recomputes the layer before its backward") {
    const ModelSpec m = find_model("llama-3.2-1b");
    const Summary sum = summarize(simulate(m, full_ac_setup(kS), test::test_gpu()), m.num_layers);
    const std::int64_t params = kV * kD + kL * kLayer + kD, Vd = kV * kD, T = kS, R = 2 * Vd + kD;
    const bytes_t weights = 2 * params + kL * 4 * kS * kHd, optimizer = 4 * params + 114 * 4;
    const bytes_t step = 3 * 8 * kS + 8 + 96 + 4 * kS + 4 * 384 + 4 + 4;
    // Forward keeps the layers' inputs alone (the embedding's output and layers 0-14's: the last one's output is
    // the final norm's saved input)
    CHECK(sum.category_max[static_cast<std::size_t>(Category::Checkpoint)] == kL * 2 * T * kD);
    // The step still peaks at the root's reduction, every activation gone by then: the unchecked step's peak
    CHECK(sum.peak.bytes == weights + optimizer + kL * 2 * kLayer + 10 * R + step);
    // The recompute peaks at layer 0's, as its output is made: the persistent state and the step's tensors (the
    // backward's ones among them), the
    // root group's two whole V x d weights and the LM head's and final norm's whole gradients, layer 0's input, the
    // final norm's input gradient (2 T d) and the residual stream's, the 15 later layers' sharded gradients and
    // layer 1's reduce-scatter input (4 P), layer 0's gathered weights, what its backward will unpack (the norms'
    // outputs and rstd, v, the RoPE rows, roped q and k, the logsumexp, flex's output, h, the MLP's four), then w2's
    // output and the layer's output
    const std::int64_t H = 32, Hkv = 8, I = 8192;
    const bytes_t unpacked = 3 * 2 * T * kD + 2 * 4 * T + 2 * T * Hkv * kHd + 4 * kS * kHd + 2 * T * H * kHd +
                             2 * T * Hkv * kHd + 4 * T * H + 2 * T * H * kHd + 4 * 2 * T * I;
    const bytes_t root = 2 * 2 * Vd + 2 * kD, head_grads = 2 * Vd + 2 * kD;
    const bytes_t recompute_peak = weights + optimizer + step + root + head_grads + 2 * 2 * T * kD +
                                   15 * 2 * kLayer + 4 * kLayer + 2 * kLayer + unpacked + 2 * 2 * T * kD;
    CHECK(sum.phase_peak[static_cast<std::size_t>(Phase::Recompute)] == recompute_peak);
    CHECK(recompute_peak == 11'208'375'352);  // the referee's record (docs/torchtitan-fullac.md)
}

TEST_CASE("torchtitan in bf16-master keeps fp32 parameters, states and gradients and casts each shard for its unshard") {
    const ModelSpec m = find_model("llama-3.2-1b");
    TrainingSetup s = titan_setup(kS);
    s.precision = Precision::Bf16Master, s.state_dtype = StateDtype::Fp32;
    const Summary sum = summarize(simulate(m, s, test::test_gpu()), m.num_layers);
    const std::int64_t params = kV * kD + kL * kLayer + kD, R = 2 * kV * kD + kD;
    const bytes_t weights = 4 * params + kL * 4 * kS * kHd, optimizer = 8 * params + 114 * 4;
    const bytes_t step = 3 * 8 * kS + 8 + 96 + 4 * kS + 4 * 384 + 4 + 4;
    CHECK(sum.end_bytes == weights + optimizer + kL * 4 * kLayer + 4 * R);
    // The root's post-backward: its fp32 reduce-scatter input and output (the gradients themselves: no cast)
    CHECK(sum.peak.bytes == weights + optimizer + kL * 4 * kLayer + 4 * R + 4 * R + step);
    CHECK(sum.peak.bytes == 22'926'115'896);  // the referee's record (docs/torchtitan-model.md, section 0b)
    // The largest transient: the embedding's shard cast to bf16, kept while the next parameter's (the final norm's)
    // is cast
    CHECK(sum.category_max[static_cast<std::size_t>(Category::Transient)] == 2 * kV * kD + 2 * kD);
}

TEST_CASE("torchtitan's FSDP2 over two GPUs shards the state and peaks at the root's reduction of both ranks' gradients") {
    const ModelSpec m = find_model("llama-3.2-1b");
    const Summary sum = summarize(simulate(m, sharded_setup(kS, 2), test::test_gpu()), m.num_layers);
    const std::int64_t params = kV * kD + kL * kLayer + kD, R = 2 * kV * kD + kD;  // (every row count even: halves)
    const bytes_t weights = 2 * params / 2 + kL * 4 * kS * kHd, optimizer = 4 * params / 2 + 114 * 4;
    const bytes_t step = 3 * 8 * kS + 8 + 96 + 4 * kS + 4 * 384 + 4 + 4;
    // Each rank's half of the layers' bf16 gradient buffers; the root's reduce-scatter input of both ranks' fp32
    // gradients (4 R), its output (this rank's half, fp32) and the bf16 cast of that
    CHECK(sum.peak.bytes == weights + optimizer + kL * 2 * kLayer / 2 + 4 * R + 4 * R / 2 + 2 * R / 2 + step);
    CHECK(sum.peak.bytes == 8'359'015'480);  // the referee's record (python/tests/test_titan_referee.py)
    CHECK(sum.end_bytes == weights + optimizer + kL * 2 * kLayer / 2 + 2 * R / 2);
}

TEST_CASE("torchtitan's model code is refused in one line outside the setups it is proven for") {
    const ModelSpec m = find_model("llama-3.2-1b");
    auto refused = [&](auto edit) {
        TrainingSetup s = titan_setup(kS);
        edit(s);
        return test::expect_user_error([&] { validate(s, m); });
    };
    CHECK_NOTHROW(validate(titan_setup(kS), m));
    CHECK_NOTHROW(validate(full_ac_setup(kS), m));
    CHECK(refused([](TrainingSetup& s) { s.checkpoint.assign(16, false), s.checkpoint[0] = true; })
              .starts_with("setup: checkpoint: expected none or all 16 layers with model_code torchtitan"));
    CHECK_NOTHROW(validate(chunked_setup(kS, 2), m));
    CHECK(refused([](TrainingSetup& s) { s.lm_chunks = 2; }).starts_with("setup: lm_impl: expected fused with lm_chunks > 1"));
    CHECK(refused([](TrainingSetup& s) { s.lm_chunks = 3, s.lm_impl = LmHeadImpl::FusedForward; })
              .starts_with("setup: lm_chunks: expected a divisor of seq_len 256"));
    CHECK(refused([](TrainingSetup& s) { s.dp = 2; }).starts_with("setup: dp: expected 1, or several with fsdp2 and zero_stage 3"));
    // several GPUs: torchtitan's FSDP2 fully sharding, in its own layout
    CHECK_NOTHROW(validate(sharded_setup(kS, 2), m));
    CHECK(refused([](TrainingSetup& s) { s = sharded_setup(kS, 2), s.fsdp2_no_sync = true; })
              .starts_with("setup: fsdp2_no_sync: expected false (torchtitan's loop reduce-scatters"));
    CHECK(refused([](TrainingSetup& s) { s.fsdp2 = true; }).starts_with("setup: zero_stage: expected 0 without fsdp2 on one GPU"));
    CHECK_NOTHROW(validate([] { TrainingSetup s = titan_setup(kS); s.grad_accum = 3; return s; }(), m));
    CHECK(refused([](TrainingSetup& s) { s.optimizer_impl = OptimizerImpl::Foreach; }).starts_with("setup: optimizer_impl: expected fused"));
    CHECK(refused([](TrainingSetup& s) { s.precision = Precision::AmpFp32, s.state_dtype = StateDtype::Fp32; })
              .starts_with("setup: precision: expected pure-bf16 or bf16-master"));
    CHECK(refused([](TrainingSetup& s) { s.runtime = Runtime::Kernels; })
              .starts_with("setup: model_code: expected transformers with runtime kernels"));
    // a model torchtitan builds with its own Llama-3 code only: Qwen3 is its qwen3 code's, Llama-2 (vocabulary
    // 32000) goes through its transformers backend
    for (const char* other : {"qwen3-8b", "llama-2-7b", "tiny-llama"})
        CHECK(test::expect_user_error([&] { validate(titan_setup(kS), find_model(other)); })
                  .starts_with("setup: model_code: expected a model torchtitan trains with its own Llama-3 code"));
    CHECK_NOTHROW(validate(titan_setup(kS), find_model("llama-3-8b")));
    // a setup file says it, and says it back
    const TrainingSetup read = parse_setup(to_json(titan_setup(kS)), m, "setup");
    CHECK(read.model_code == ModelCode::Torchtitan);
    CHECK(to_json(TrainingSetup{}).contains("model_code") == false);  // (setups without it read and write as before)
    CHECK(test::expect_user_error([&] { parse_setup(nlohmann::json{{"model_code", "titan"}}, m, "setup.json"); })
              .find("model_code") != std::string::npos);
}

TEST_CASE("a plan of torchtitan's own model code is emitted for torchtitan alone") {
    const ModelSpec m = find_model("llama-3.2-1b");
    const TrainingSetup s = titan_setup(kS);
    check_expressible("torchtitan", s, m);
    for (const std::string format : {"hf-mst", "deepspeed", "axolotl"})
        CHECK(test::expect_user_error([&] { check_expressible(format, s, m); })
                  .starts_with(format + ": setup.model_code: expected transformers"));
    // over several GPUs its FSDP2 is the plan's fsdp2 (zero_stage 3): torchtitan's own sharding, not refused as torch's
    check_expressible("torchtitan", sharded_setup(kS, 2), m);
}

TEST_CASE("compare takes a kernels-runtime plan's torchtitan run as torchtitan's own step too, where that is modelled") {
    // The titan referee records torchtitan's own code whatever runtime planned it: a kernels-runtime plan of ZeRO 3
    // over two ranks is, as torchtitan runs it, the hf runtime's fsdp2 with model_code torchtitan.
    const ModelSpec m = find_model("llama-3.2-1b");
    TrainingSetup planned = sharded_setup(kS, 2);
    planned.runtime = Runtime::Kernels, planned.fsdp2 = false;  // (the kernels runtime's ZeRO 3)
    StepFile run = test::measured_rank(planned, "llama-3.2-1b", -1);
    run.timeline = simulate(m, sharded_setup(kS, 2), test::test_gpu());  // (what the referee records: section 3)
    run.timeline.model = "llama-3.2-1b";
    const auto titan = as_torchtitan_step(run);
    REQUIRE(titan);
    const TrainingSetup s = parse_setup(nlohmann::json::parse(titan->setup_json), m, "setup");
    CHECK((s.runtime == Runtime::Hf && s.titan() && s.fsdp2 && s.zero_stage == 3 && s.dp == 2));
    CHECK(compare_timelines(predict_measured(*titan), run.timeline, m.num_layers).identical());
    // ZeRO 2 is its fsdp_reshard_after_forward never: the hf runtime's fsdp2 kept gathered from forward to backward
    TrainingSetup zero2 = planned;
    zero2.zero_stage = 2;
    const auto never = as_torchtitan_step(test::measured_rank(zero2, "llama-3.2-1b", -1));
    REQUIRE(never);
    const TrainingSetup kept = parse_setup(nlohmann::json::parse(never->setup_json), m, "setup");
    CHECK((kept.fsdp2 && kept.zero_stage == 3 && !kept.fsdp2_reshard_after_forward));
    // Its replicate degree (ZeRO 0 over several ranks) is not modelled for its step; a run of transformers' code, or
    // one the hf runtime planned (compare re-simulates it as it is), has nothing more to show
    for (const auto& edit : std::vector<void (*)(TrainingSetup&)>{[](TrainingSetup& t) { t.zero_stage = 0; },
                                                                  [](TrainingSetup& t) { t.model_code = ModelCode::Transformers; },
                                                                  [](TrainingSetup& t) { t.runtime = Runtime::Hf, t.fsdp2 = true; }}) {
        TrainingSetup other = planned;
        edit(other);
        CHECK_FALSE(as_torchtitan_step(test::measured_rank(other, "llama-3.2-1b", -1)));
    }
}
