// The simulator against the CPU executor's measured memory: for each setup, the
// predicted and the measured timelines must be the same, event by event (same
// allocations and frees, in the same order, with the same bytes, categories, phases,
// layers and ops), hence the same peak to the byte. The executor sizes every buffer
// from the kernel it feeds, never from the simulator's rules (src/exec/executor.cpp).
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <random>
#include <stdexcept>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "mst/catalog.hpp"
#include "mst/compare.hpp"
#include "mst/execute.hpp"
#include "mst/simulate.hpp"
#include "../src/exec/cpu_backend.hpp"
#include "../src/exec/executor.hpp"
#include "executor_matrix.hpp"
#include "sim_test_support.hpp"
#include "test_support.hpp"

using namespace mst;
using namespace mst::test;

namespace {

std::string describe(const Event& e) {
    return fmt::format("{} {} #{} {} B {} {} layer {} micro {} op {}", e.alloc ? "alloc" : "free", e.name, e.tensor, e.bytes,
                       to_string(e.category), to_string(e.phase), e.layer, e.micro_step, e.op);
}

// Simulates and executes `s`; checks peak and every event.
void check_exact(const ModelSpec& m, const TrainingSetup& s) {
    const Timeline predicted = simulate(m, s, test_gpu());
    const MeasuredStep measured = execute_cpu(m, s, 7);
    const Comparison c = compare_timelines(predicted, measured.timeline, m.num_layers);
    if (c.divergence) {
        const auto i = static_cast<std::size_t>(*c.divergence);
        MESSAGE("first divergence at event ", i, "\n  predicted: ",
                c.predicted_event ? describe(*c.predicted_event) : std::string("(end)"),
                "\n  measured:  ", c.measured_event ? describe(*c.measured_event) : std::string("(end)"));
    }
    CHECK(c.rows.front().measured == c.rows.front().predicted);
    CHECK(c.identical());
    CHECK(measured.timeline.micro_steps == predicted.micro_steps);
    CHECK(measured.timeline.micro_steps_recorded == predicted.micro_steps_recorded);
    CHECK(std::isfinite(measured.loss));
}

}  // namespace

TEST_CASE("CPU executor: the default setup (pure bf16, AdamW, flash, unchunked) measures what the simulator predicts") {
    check_exact(find_model("tiny-llama"), tiny_setup(32));
}

namespace {

// Runs the matrix cases on `model`; returns how many.
int run_matrix(const char* model) {
    int count = 0;
    for (const MatrixCase& c : kMatrix) {
        if (std::string(c.model) != model) continue;
        CAPTURE(c.name);
        CAPTURE(c.model);
        const std::string name = c.model;
        const ModelSpec m = find_model(name.ends_with(".json") ? data(name) : name);
        TrainingSetup s = tiny_setup(c.seq);
        c.knobs(s, m.num_layers);
        check_exact(m, s);
        ++count;
    }
    return count;
}

}  // namespace

TEST_CASE("CPU executor: the simulator predicts every measured allocation and free, byte for byte (tiny-llama matrix)") {
    CHECK(run_matrix("tiny-llama") == 29);
}

TEST_CASE("CPU executor: ... (sliding-window model with tied embeddings)") {
    CHECK(run_matrix("tiny_sliding_tied.json") == 4);
}

TEST_CASE("CPU executor: ... (Gemma-2 shaped model: post-norms, soft-capping, sliding window, tied)") {
    CHECK(run_matrix("tiny_gemma2.json") == 5);
}

TEST_CASE("CPU executor: ... (Qwen3 shaped model: a norm over every query and key head, head_dim != hidden / heads)") {
    CHECK(run_matrix("tiny_qwen3.json") == 4);
}

TEST_CASE("CPU executor: ... (Gemma-3 shaped model: q/k head norms, post-norms, 2 local : 1 global layers, tied)") {
    CHECK(run_matrix("tiny_gemma3.json") == 4);
}

TEST_CASE("CPU executor: ... (Phi-3 shaped models: partial rotary, every layer sliding)") {
    CHECK(run_matrix("tiny_phi3.json") + run_matrix("tiny_phi3_sliding.json") == 3);
}

TEST_CASE("CPU executor: ... (Mixture-of-Experts: Mixtral, Qwen3-MoE, gpt-oss with sinks and biased experts)") {
    CHECK(run_matrix("tiny_mixtral.json") + run_matrix("tiny_qwen3_moe.json") + run_matrix("tiny_qwen3_moe_top1.json") == 6);
    CHECK(run_matrix("tiny_gpt_oss.json") == 4);
}

TEST_CASE("CPU executor: ... (biases: Qwen2's q/k/v, a Llama with attention and MLP biases)") {
    CHECK(run_matrix("tiny_qwen2.json") + run_matrix("tiny_llama_bias.json") == 3);
}

TEST_CASE("CPU executor: the simulator predicts every measured allocation and free, byte for byte (small-llama matrix)") {
    CHECK(run_matrix("small-llama") == 7);
}

TEST_CASE("CPU executor: a fixed workspace is allocated at init like the simulator's cuBLAS workspace") {
    const ModelSpec m = find_model("tiny-llama");
    const TrainingSetup s = tiny_setup(16);
    GpuProfile gpu = test_gpu();
    gpu.calibration.cublas_workspace_bytes = 3 * kMiB;
    ExecuteOptions o;
    o.workspace_bytes = 3 * kMiB;
    const Comparison c = compare_timelines(simulate(m, s, gpu), execute_cpu(m, s, 1, o).timeline, m.num_layers);
    CHECK(c.identical());
}

TEST_CASE("CPU executor: what one CPU process cannot run is refused with one line naming the knob") {
    const ModelSpec m = find_model("tiny-llama");
    auto refused = [&](TrainingSetup s) { return expect_user_error([&] { execute_cpu(m, s, 1); }); };
    TrainingSetup s = tiny_setup(16);
    s.dp = 2;
    CHECK(refused(s).starts_with("setup: dp: "));
    s = tiny_setup(16);
    s.dp = 2, s.zero_stage = 3;
    CHECK(refused(s).starts_with("setup: dp: "));
    s = tiny_setup(16);
    s.zero_stage = 1;
    CHECK(refused(s).starts_with("setup: zero_stage: "));
    s = tiny_setup(16);
    s.sp = 2;
    CHECK(refused(s).starts_with("setup: sp: "));
    s = tiny_setup(16);
    s.optimizer = Optimizer::AdamW8bit;
    CHECK(refused(s).starts_with("setup: optimizer: "));
    // (biases, q/k/v/o and MLP, are kernels of their own: Qwen2 and gpt-oss run, see the matrix)
    const ModelSpec gelu = parse_model(nlohmann::json{{"model_type", "llama"}, {"hidden_size", 32}, {"intermediate_size", 64},
                                                      {"num_hidden_layers", 1}, {"num_attention_heads", 2}, {"vocab_size", 64},
                                                      {"hidden_act", "gelu"}},
                                       "gelu.json", "gelu");
    const std::string act = expect_user_error([&] { execute_cpu(gelu, tiny_setup(16), 1); });
    CHECK(act.starts_with("gelu: hidden_act: "));
    CHECK(act.find('\n') == std::string::npos);
}

namespace {

// A random small model of a family the executor runs, and a random one-process setup for it.
struct Draw {
    std::mt19937_64 rng;
    std::int64_t in(std::int64_t lo, std::int64_t hi) { return std::uniform_int_distribution<std::int64_t>(lo, hi)(rng); }
    bool coin() { return in(0, 1) == 1; }
};

ModelSpec random_small_model(Draw& r) {
    const char* types[] = {"llama", "qwen2", "mistral", "gemma2", "qwen3", "mixtral", "qwen3_moe", "gpt_oss"};
    const std::string type = types[r.in(0, 7)];
    const std::int64_t heads = 2 * r.in(1, 2), head_dim = r.in(0, 4) == 0 ? 2 : 8 * r.in(1, 2);  // (2: gpt-oss's narrow heads)
    nlohmann::json j = {{"model_type", type}, {"hidden_size", heads * head_dim}, {"intermediate_size", 8 * r.in(2, 6)},
                        {"num_hidden_layers", r.in(1, 3)}, {"num_attention_heads", heads},
                        {"num_key_value_heads", heads / (r.coin() ? 2 : 1)}, {"head_dim", head_dim}, {"vocab_size", r.in(40, 200)}};
    if (type == "llama") j["attention_bias"] = r.coin(), j["mlp_bias"] = r.coin(), j["tie_word_embeddings"] = r.coin();
    if (type == "mistral" || type == "mixtral" || type == "gemma2" || type == "gpt_oss") j["sliding_window"] = r.in(3, 12);
    if (type == "gemma2") j["attn_logit_softcapping"] = 50.0, j["final_logit_softcapping"] = 30.0;
    if (type == "mixtral" || type == "gpt_oss") j["num_local_experts"] = r.in(2, 6), j["num_experts_per_tok"] = r.in(1, 2);
    if (type == "gpt_oss") j["attention_bias"] = true;
    if (type == "qwen3_moe")
        j["num_experts"] = r.in(2, 8), j["num_experts_per_tok"] = r.in(1, 2), j["moe_intermediate_size"] = 8 * r.in(1, 4);
    return parse_model(j, "random.json", type);
}

TrainingSetup random_one_process_setup(Draw& r, const ModelSpec& m) {
    TrainingSetup s = tiny_setup(r.in(5, 40));
    s.micro_batch = r.in(1, 2);
    s.precision = std::array{Precision::PureBf16, Precision::Bf16Master, Precision::AmpFp32}[static_cast<std::size_t>(r.in(0, 2))];
    s.optimizer = r.coin() ? Optimizer::AdamW : Optimizer::SgdMomentum;
    s.attention = m.attention_sinks || r.coin() ? Attention::Flash : Attention::Eager;
    s.mlp_chunks = std::min<std::int64_t>(r.in(1, 5), s.local_tokens());
    s.mlp_impl = r.coin() ? MlpImpl::Loop : MlpImpl::Tiled;
    s.lm_chunks = std::min<std::int64_t>(r.in(1, 5), s.local_tokens());
    s.lm_impl = r.coin() ? LmHeadImpl::Recompute : LmHeadImpl::FusedForward;
    s.checkpoint.resize(static_cast<std::size_t>(m.num_layers));
    for (std::size_t i = 0; i < s.checkpoint.size(); ++i) s.checkpoint[i] = r.coin();
    s.offload_checkpoints = s.checkpointed_count() > 0 && r.coin();
    s.grad_accum = r.coin() ? 1 : r.in(2, 3);
    s.optimizer_in_backward = s.grad_accum == 1 && r.in(0, 3) == 0;
    validate(s, m);
    return s;
}

}  // namespace

TEST_CASE("CPU executor: the simulator predicts every allocation and free of random small models and setups (every family the executor runs)") {
    Draw r{std::mt19937_64(2026)};
    for (int i = 0; i < 100; ++i) {
        const ModelSpec m = random_small_model(r);
        const TrainingSetup s = random_one_process_setup(r, m);
        CAPTURE(i);
        const std::string model_json = to_json(m).dump(), setup_json = to_json(s).dump();
        CAPTURE(model_json);
        CAPTURE(setup_json);
        check_exact(m, s);
    }
}

TEST_CASE("CPU executor: the same seed gives the same step, timings cover the ops") {
    const ModelSpec m = find_model("tiny-llama");
    const MeasuredStep a = execute_cpu(m, tiny_setup(16), 5), b = execute_cpu(m, tiny_setup(16), 5);
    const MeasuredStep c = execute_cpu(m, tiny_setup(16), 6);
    CHECK(a.loss == b.loss);
    CHECK(a.loss != c.loss);
    CHECK(a.wall_seconds > 0);
    bool has_flash = false;
    for (const auto& [op, seconds] : a.op_seconds) {
        CHECK(seconds >= 0);
        has_flash = has_flash || op == "attn.flash";
    }
    CHECK(has_flash);
}

namespace {

// The CPU backend with a device-memory limit: map() fails like the CUDA backend's once the live
// GPU bytes would pass `limit`.
class LimitedBackend : public exec::CpuBackend {
public:
    explicit LimitedBackend(bytes_t limit) : limit_(limit) {}
    void* map(const Event& e) override {
        if (e.device == Device::Gpu) {
            if (live_ + e.bytes > limit_) throw exec::BackendOutOfMemory("out of memory (test limit)");
            live_ += e.bytes;
        }
        return CpuBackend::map(e);
    }
    void unmap(void* p, const Event& e) override {
        if (e.device == Device::Gpu) live_ -= e.bytes;
        CpuBackend::unmap(p, e);
    }

private:
    bytes_t limit_, live_ = 0;
};

}  // namespace

TEST_CASE("executor out of memory: the step stops at the allocation the simulator puts at the peak") {
    const ModelSpec m = find_model("tiny-llama");
    TrainingSetup s = tiny_setup(32);
    s.checkpoint.assign(static_cast<std::size_t>(m.num_layers), true), s.mlp_chunks = 2, s.lm_chunks = 3;
    const Timeline predicted = simulate(m, s, test_gpu());
    // The simulator's first event that reaches the peak, and the live bytes just before it.
    const std::vector<bytes_t> live = live_curve(predicted);
    const bytes_t peak = *std::max_element(live.begin(), live.end());
    const auto at = static_cast<std::size_t>(std::find(live.begin(), live.end(), peak) - live.begin());
    const Event& first_peak = predicted.events[at];
    REQUIRE(first_peak.alloc);

    ExecuteOptions o;
    LimitedBackend fits(peak);
    CHECK_NOTHROW(exec::Step(m, s, 7, o, fits).run());
    LimitedBackend short_by_one(peak - 1);
    try {
        exec::Step(m, s, 7, o, short_by_one).run();
        FAIL("expected an OutOfMemoryError");
    } catch (const OutOfMemoryError& e) {
        CHECK(e.request.name == first_peak.name);
        CHECK(e.request.op == first_peak.op);
        CHECK(e.request.layer == first_peak.layer);
        CHECK(e.request.phase == first_peak.phase);
        CHECK(e.request.bytes == first_peak.bytes);
        CHECK(e.live_bytes == peak - first_peak.bytes);
        const std::string msg = e.what();
        CHECK(msg.starts_with("out of host memory on the cpu backend: allocating '" + first_peak.name + "'"));
        CHECK(msg.find('\n') == std::string::npos);
    }
}
