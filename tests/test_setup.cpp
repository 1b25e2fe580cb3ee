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

TEST_CASE("amp in the hf runtime: every family, flash and eager attention") {
    TrainingSetup s;  // runtime hf
    s.precision = Precision::AmpFp32;
    s.seq_len = 4096;
    for (Attention a : {Attention::Flash, Attention::Eager}) {
        s.attention = a;
        for (const char* m : {"llama-3-8b", "mistral-7b-v0.1", "qwen2-7b", "llama-3.2-1b", "qwen3-8b", "phi-4-mini",
                              "gemma-2-9b", "gemma-3-12b", "mixtral-8x7b", "qwen3-30b-a3b"})
            CHECK_NOTHROW(validate(s, find_model(m)));
    }
}

TEST_CASE("gpt-oss: the hf runtime with eager attention, the kernels runtime with flash, the rest is one line") {
    const ModelSpec m = find_model("gpt-oss-20b");
    TrainingSetup s;  // runtime hf
    s.seq_len = 4096;
    s.attention = Attention::Eager;
    CHECK_NOTHROW(validate(s, m));
    for (Precision p : {Precision::Bf16Master, Precision::AmpFp32}) {
        s.precision = p;
        CHECK_NOTHROW(validate(s, m));
    }
    auto error_for = [&](auto mutate) {
        TrainingSetup t = s;
        mutate(t);
        return test::expect_user_error([&] { validate(t, m); });
    };
    CHECK(error_for([](TrainingSetup& t) { t.attention = Attention::Flash; }).rfind("setup: attention: expected eager", 0) == 0);
    // Heads of 2: their 1-wide rotary halves join channels-last with several sequences (not modelled).
    const ModelSpec narrow = parse_model(nlohmann::json{{"model_type", "gpt_oss"}, {"head_dim", 2}}, "g.json", "g");
    TrainingSetup two = s;
    two.micro_batch = 2;
    CHECK(test::expect_user_error([&] { validate(two, narrow); }).rfind("setup: micro_batch: expected 1 for gpt-oss heads of 2", 0) == 0);
    two.runtime = Runtime::Kernels, two.attention = Attention::Flash;  // (mst-plan's own rotary kernel has no such layout)
    CHECK_NOTHROW(validate(two, narrow));
    two.micro_batch = 1;
    CHECK_NOTHROW(validate(two, narrow));
    // torch's grouped_mm multiplies rows of 16 bytes: an expert size of 7 bf16 cannot run.
    const ModelSpec odd = parse_model(nlohmann::json{{"model_type", "mixtral"}, {"hidden_size", 64}, {"intermediate_size", 7},
                                                     {"num_hidden_layers", 1}, {"num_attention_heads", 4}, {"num_key_value_heads", 2}, {"vocab_size", 64}},
                                      "m.json", "m");
    TrainingSetup mixtral;
    mixtral.seq_len = 64;
    CHECK(test::expect_user_error([&] { validate(mixtral, odd); }).rfind("setup: runtime: expected a hidden size (64) and an expert", 0) == 0);
    mixtral.runtime = Runtime::Kernels;
    CHECK_NOTHROW(validate(mixtral, odd));
    // Unasked, the attention is the runtime's own choice: transformers' SDPA (flash) where the model
    // has that path, else eager; mst-plan's executor runs sinks in its flash kernel.
    CHECK(default_attention(m, Runtime::Hf) == Attention::Eager);
    CHECK(default_attention(m, Runtime::Kernels) == Attention::Flash);
    CHECK(default_attention(find_model("llama-3-8b"), Runtime::Hf) == Attention::Flash);
    CHECK(parse_setup(nlohmann::json::object(), m, "s.json").attention == Attention::Eager);
    CHECK(parse_setup(nlohmann::json{{"runtime", "kernels"}}, m, "s.json").attention == Attention::Flash);
    CHECK(parse_setup(nlohmann::json{{"attention", "flash"}}, find_model("llama-3-8b"), "s.json").attention == Attention::Flash);
    CHECK(error_for([](TrainingSetup& t) { t.runtime = Runtime::Kernels; }).rfind("setup: attention: expected flash", 0) == 0);
    CHECK_NOTHROW(validate([&] {
        TrainingSetup t = s;
        t.runtime = Runtime::Kernels, t.attention = Attention::Flash;
        return t;
    }(), m));
}

TEST_CASE("the bounds of every knob are validate()'s, whatever path the setup came by") {
    const ModelSpec m = find_model("llama-3-8b");  // 32 layers
    auto error_for = [&](auto mutate) {
        TrainingSetup s;
        mutate(s);
        return test::expect_user_error([&] { validate(s, m); });
    };
    CHECK(error_for([](TrainingSetup& s) { s.seq_len = (std::int64_t{1} << 30) + 1; }) ==
          "setup: seq_len: expected an integer in [1, 1073741824], got 1073741825");
    CHECK(error_for([](TrainingSetup& s) { s.micro_batch = 65537; }).rfind("setup: micro_batch: expected an integer in [1, 65536]", 0) == 0);
    CHECK(error_for([](TrainingSetup& s) { s.micro_batch = 8, s.seq_len = 1 << 30; })
              .rfind("setup: micro_batch: expected micro_batch x seq_len at most 4294967296 tokens", 0) == 0);
    CHECK(error_for([](TrainingSetup& s) { s.grad_accum = std::int64_t{1} << 31; })
              .rfind("setup: grad_accum: expected an integer in [1, 1048576]", 0) == 0);
    CHECK(error_for([](TrainingSetup& s) { s.dp = 1 << 16, s.sp = 2; }).rfind("setup: dp: expected dp x sp at most 65536", 0) == 0);
    CHECK(error_for([](TrainingSetup& s) { s.seq_len = 1 << 24, s.lm_chunks = 4097; })
              .rfind("setup: lm_chunks: expected an integer in [1, 4096]", 0) == 0);
    // 32 layers x 513 chunks is past 2^14 layer-chunks: the loop MLP keeps every one of them.
    CHECK(max_mlp_chunks(m) == 512);
    CHECK(error_for([](TrainingSetup& s) { s.seq_len = 1 << 24, s.mlp_chunks = 513; })
              .rfind("setup: mlp_chunks: expected at most 512 for 32 layers", 0) == 0);
    TrainingSetup edge;
    edge.seq_len = 1 << 24, edge.mlp_chunks = 512, edge.lm_chunks = 4096;
    CHECK_NOTHROW(validate(edge, m));
}

TEST_CASE("chunk groups: at most two sizes, no token dropped, never one entry per token") {
    const auto g = chunk_groups(10, 4);
    REQUIRE(g.size() == 2);
    CHECK((g[0].tokens == 3 && g[0].count == 2 && g[1].tokens == 2 && g[1].count == 2));
    CHECK(chunk_groups(9, 3).size() == 1);
    // A billion tokens in 16384 chunks: two groups, whatever the count.
    const auto big = chunk_groups(1'000'000'007, 16384);
    REQUIRE(big.size() == 2);
    CHECK(big[0].tokens * big[0].count + big[1].tokens * big[1].count == 1'000'000'007);
    // Chunks of a token size: ceil(tokens per rank / size), with no overflow for any knob values.
    TrainingSetup s;
    s.micro_batch = 2, s.seq_len = 4096, s.sp = 2;
    CHECK(chunks_for_tokens(s, 1000) == 5);  // 4096 tokens per rank
    s.micro_batch = -1, s.sp = 0;            // invalid knobs (validate() reports them): still no division by zero
    CHECK(chunks_for_tokens(s, 1) == 4096);
}

TEST_CASE("setup files: unknown keys name the closest known one, and a model config is not a setup") {
    const ModelSpec m = find_model("tiny-llama");
    CHECK(test::expect_user_error([&] { (void)parse_setup({{"sequence_length", 4096}}, m, "s.json"); }) ==
          "s.json: sequence_length: unknown key; expected one of the keys this file takes (the closest is seq_len)");
    CHECK(test::expect_user_error([&] { (void)parse_setup({{"mlp_chunk", 4}}, m, "s.json"); }).find("the closest is mlp_chunks") !=
          std::string::npos);
    const std::string config = test::expect_user_error([&] {
        (void)parse_setup(nlohmann::json::parse(R"({"hidden_size": 64, "num_hidden_layers": 2})"), m, "config.json");
    });
    CHECK(config.find("config.json: hidden_size: unknown key") != std::string::npos);
    CHECK(test::expect_user_error([&] { (void)parse_setup({{"checkpoint", {0, 1.5}}}, m, "s.json"); }) ==
          "s.json: checkpoint: expected layer indices in 0..1, got 1.5");
    CHECK(test::expect_user_error([] { (void)parse_checkpoint_spec("5-2", 8, "t"); }) ==
          "t: checkpoint: expected a layer range LO-HI with LO <= HI, got '5-2'");
}
