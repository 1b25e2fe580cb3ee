#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include "mst/catalog.hpp"
#include "mst/setup.hpp"
#include "sim_test_support.hpp"
#include "test_support.hpp"

using namespace mst;
using mst::test::kernels_setup;

namespace {
std::string layers(const std::vector<bool>& v) {
    std::string s;
    for (bool b : v) s += b ? '1' : '0';
    return s;
}
}  // namespace

TEST_CASE("checkpoint placement specs") {
    CHECK(layers(parse_checkpoint_spec("none", 4, "t")) == "0000");
    CHECK(layers(parse_checkpoint_spec("all", 4, "t")) == "1111");
    CHECK(layers(parse_checkpoint_spec("every:2", 5, "t")) == "10101");
    CHECK(layers(parse_checkpoint_spec("first:2", 5, "t")) == "11000");
    CHECK(layers(parse_checkpoint_spec("last:2", 5, "t")) == "00011");
    CHECK(layers(parse_checkpoint_spec("spread:3", 6, "t")) == "101010");
    CHECK(layers(parse_checkpoint_spec("0,2-3", 5, "t")) == "10110");
    CHECK(describe_checkpoints(parse_checkpoint_spec("0,2-3", 5, "t")) == "0,2-3");
    CHECK(test::expect_user_error([] { (void)parse_checkpoint_spec("0,9", 4, "t"); }).find("checkpoint") != std::string::npos);
    CHECK_THROWS_AS((void)parse_checkpoint_spec("some", 4, "t"), UserError);
}

TEST_CASE("mini-sequence chunks never drop a token and differ by at most one") {
    CHECK(chunk_sizes(10, 4) == std::vector<std::int64_t>{3, 3, 2, 2});
    CHECK(chunk_sizes(9, 3) == std::vector<std::int64_t>{3, 3, 3});
    CHECK(chunk_sizes(5, 5) == std::vector<std::int64_t>{1, 1, 1, 1, 1});
}

TEST_CASE("setup JSON round-trips and chunk sizes in tokens convert to counts") {
    const ModelSpec m = find_model("llama-3-8b");
    const nlohmann::json j = {{"seq_len", 32768}, {"micro_batch", 2},       {"precision", "bf16-master"},
                              {"mlp_chunk_tokens", 4096}, {"lm_chunks", 16}, {"lm_impl", "fused"},
                              {"checkpoint", "spread:8"}, {"offload_checkpoints", true}, {"dp", 8}, {"zero_stage", 3},
                              {"optimizer_impl", "for-loop"}};
    const TrainingSetup s = parse_setup(j, m, "s.json");
    CHECK(s.mlp_chunks == 16);  // 2 * 32768 tokens / 4096
    CHECK(s.optimizer_impl == OptimizerImpl::ForLoop);
    CHECK(parse_setup(nlohmann::json::object(), m, "s.json").optimizer_impl == OptimizerImpl::Fused);  // the HF Trainer's default (torch >= 2.8)
    CHECK(s.checkpointed_count() == 8);
    const TrainingSetup back = parse_setup(to_json(s), m, "back");
    CHECK(to_json(back) == to_json(s));
}

TEST_CASE("impossible setups are one-line errors naming the knob") {
    const ModelSpec m = find_model("llama-3-8b");  // 32 heads, 8 KV heads
    auto error_for = [&](auto mutate) {
        TrainingSetup s = kernels_setup();
        mutate(s);
        return test::expect_user_error([&] { validate(s, m); });
    };
    CHECK(error_for([](TrainingSetup& s) { s.seq_len = 100, s.mlp_chunks = 101; }).rfind("setup: mlp_chunks: ", 0) == 0);
    CHECK(error_for([](TrainingSetup& s) { s.sp = 16; }).rfind("setup: sp: ", 0) == 0);  // 8 KV heads
    CHECK(error_for([](TrainingSetup& s) { s.micro_batch = -1; }).rfind("setup: micro_batch: ", 0) == 0);
    CHECK(error_for([](TrainingSetup& s) { s.offload_checkpoints = true; }).rfind("setup: offload_checkpoints: ", 0) == 0);
    CHECK(error_for([](TrainingSetup& s) { s.grad_accum = 4, s.optimizer_in_backward = true; })
              .rfind("setup: optimizer_in_backward: ", 0) == 0);
    // 2^45 tokens x 128256 (about 2^17) vocab x 8 bytes is about 2^65: refused, not wrapped.
    CHECK(error_for([](TrainingSetup& s) { s.seq_len = std::int64_t{1} << 45; }).find("overflows") != std::string::npos);
}
