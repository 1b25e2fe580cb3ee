// torchtitan's own step in the hf runtime (model_code torchtitan, src/core/sim/titan.cpp). The titan referee
// runs torchtitan 0.3.0 on fake tensors and compare --run finds every event equal
// (python/tests/test_titan_referee.py); these pin what docs/torchtitan-model.md derives by hand from
// torchtitan's and torch's sources for Llama-3.2-1B (d 2048, 32 heads, 8 KV heads of 64, I 8192, V 128256,
// 16 layers, tied) on one GPU at S 256, and the scope the model is proven for.
#include <doctest/doctest.h>

#include "mst/catalog.hpp"
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
}

TEST_CASE("torchtitan's model code is refused in one line outside the setups it is proven for") {
    const ModelSpec m = find_model("llama-3.2-1b");
    auto refused = [&](auto edit) {
        TrainingSetup s = titan_setup(kS);
        edit(s);
        return test::expect_user_error([&] { validate(s, m); });
    };
    CHECK_NOTHROW(validate(titan_setup(kS), m));
    CHECK(refused([](TrainingSetup& s) { s.checkpoint.assign(16, true); }).starts_with("setup: checkpoint: expected none with model_code torchtitan"));
    CHECK(refused([](TrainingSetup& s) { s.lm_chunks = 2; }).starts_with("setup: lm_chunks: expected 1"));
    CHECK(refused([](TrainingSetup& s) { s.dp = 2; }).starts_with("setup: dp: expected 1 (one GPU)"));
    CHECK(refused([](TrainingSetup& s) { s.grad_accum = 2; }).starts_with("setup: grad_accum: expected 1"));
    CHECK(refused([](TrainingSetup& s) { s.optimizer_impl = OptimizerImpl::Foreach; }).starts_with("setup: optimizer_impl: expected fused"));
    CHECK(refused([](TrainingSetup& s) { s.precision = Precision::Bf16Master, s.state_dtype = StateDtype::Fp32; })
              .starts_with("setup: precision: expected pure-bf16"));
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
}
