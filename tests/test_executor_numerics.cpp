// MsT changes memory, not math: a step with mini-sequences (every MLP and LM-head
// implementation, M in {1, 2, 3, 4, 8}, with and without checkpointing) computes the same
// loss and the same gradient of every parameter as the unchunked step.
//
// The runs store every tensor in fp32 (ExecuteOptions::storage_fp32), so the only
// differences left are fp32 rounding in a different order: a chunked weight gradient is a
// sum of M partial GEMM sums instead of one; the chunked LM head computes the log-sum-exp
// online per row where the unchunked one writes log-softmax out; checkpointing recomputes
// bit-identical values. Each reordered sum has at most T (< 40) or V (4096) fp32 terms, so
// its rounding is ~ sqrt(terms) * 6e-8 relative, <= 4e-6 and in practice ~1e-7; 1e-5 keeps an
// order of magnitude of margin while a dropped or double-counted token (1/T > 2.5e-2 of the
// loss) or a wrong chunk offset fails by orders of magnitude. Errors are norm-wise,
// max|a - b| / max|b| over a tensor (element-wise relative errors are meaningless where a
// gradient entry cancels to ~0).
// Sequences are prime (37, 11) so that every M > 1 splits them unevenly.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>

#include "mst/catalog.hpp"
#include "mst/execute.hpp"
#include "sim_test_support.hpp"
#include "test_support.hpp"

using namespace mst;
using mst::test::kernels_setup;
using mst::test::rel_err;

namespace {

constexpr double kTolerance = 1e-5;


MeasuredStep run_fp32(const ModelSpec& m, const TrainingSetup& s) {
    ExecuteOptions o;
    o.storage_fp32 = true;
    o.capture = true;
    return execute_cpu(m, s, 11, o);
}

// Every chunked variant, with or without checkpointing every layer, against the unchunked
// step without checkpointing; returns the worst error seen.
double check_chunked_equals_unchunked(const char* model, std::int64_t seq, bool checkpoint) {
    const ModelSpec m = find_model(model);
    TrainingSetup base = kernels_setup();
    base.seq_len = seq;
    const MeasuredStep ref = run_fp32(m, base);
    REQUIRE(ref.gradients.size() == static_cast<std::size_t>(9 * m.num_layers + 3));  // every parameter
    double worst = 0.0;
    for (bool tiled_fused : {false, true})
        for (std::int64_t M : {1, 2, 3, 4, 8}) {
            TrainingSetup s = base;
            s.mlp_chunks = s.lm_chunks = M;
            s.mlp_impl = tiled_fused ? MlpImpl::Tiled : MlpImpl::Loop;
            s.lm_impl = tiled_fused ? LmHeadImpl::FusedForward : LmHeadImpl::Recompute;
            if (checkpoint) s.checkpoint.assign(static_cast<std::size_t>(m.num_layers), true);
            CAPTURE(model);
            CAPTURE(M);
            CAPTURE(checkpoint);
            CAPTURE(to_string(s.mlp_impl));
            CAPTURE(to_string(s.lm_impl));
            const MeasuredStep r = run_fp32(m, s);
            const double loss_err = std::fabs(r.loss - ref.loss) / std::fabs(ref.loss);
            CHECK(loss_err <= kTolerance);
            worst = std::max(worst, loss_err);
            REQUIRE(r.gradients.size() == ref.gradients.size());
            for (std::size_t i = 0; i < r.gradients.size(); ++i) {
                CAPTURE(r.gradients[i].name);
                REQUIRE(r.gradients[i].name == ref.gradients[i].name);
                const double e = rel_err(r.gradients[i].values, ref.gradients[i].values);
                CHECK(e <= kTolerance);
                worst = std::max(worst, e);
            }
        }
    return worst;
}

}  // namespace

TEST_CASE("numerics: tiny-llama, chunked steps (loop/recompute and tiled/fused, M = 1..8) equal the unchunked step") {
    MESSAGE("worst relative error ", check_chunked_equals_unchunked("tiny-llama", 37, false));
}

TEST_CASE("numerics: tiny-llama, chunked steps with every layer checkpointed equal the unchunked step") {
    MESSAGE("worst relative error ", check_chunked_equals_unchunked("tiny-llama", 37, true));
}

TEST_CASE("numerics: small-llama, chunked steps equal the unchunked step") {
    MESSAGE("worst relative error ", check_chunked_equals_unchunked("small-llama", 11, false));
}

TEST_CASE("numerics: small-llama, chunked steps with every layer checkpointed equal the unchunked step") {
    MESSAGE("worst relative error ", check_chunked_equals_unchunked("small-llama", 11, true));
}

TEST_CASE("numerics: M = 1 is the unchunked step exactly, whatever the implementation") {
    const ModelSpec m = find_model("tiny-llama");
    TrainingSetup base = kernels_setup();
    base.seq_len = 37;
    const MeasuredStep ref = run_fp32(m, base);
    TrainingSetup s = base;
    s.mlp_impl = MlpImpl::Tiled;
    s.lm_impl = LmHeadImpl::FusedForward;
    const MeasuredStep r = run_fp32(m, s);
    CHECK(r.loss == ref.loss);
    for (std::size_t i = 0; i < r.gradients.size(); ++i) CHECK(r.gradients[i].values == ref.gradients[i].values);
}

TEST_CASE("numerics: the loss is the mean cross-entropy of random weights, near log(V)") {
    // Weights ~ N(0, 0.02) make the logits nearly uniform: the loss is log(V) to a few percent.
    const ModelSpec m = find_model("tiny-llama");
    TrainingSetup s = kernels_setup();
    s.seq_len = 37;
    const MeasuredStep r = run_fp32(m, s);
    CHECK(r.loss == doctest::Approx(std::log(256.0)).epsilon(0.02));
}

TEST_CASE("numerics: eager attention (op by op) computes the same step as flash attention (GQA, sliding window, tied)") {
    const ModelSpec m = find_model(mst::test::data("tiny_sliding_tied.json"));
    TrainingSetup flash = kernels_setup();
    flash.seq_len = 37;
    TrainingSetup eager = flash;
    eager.attention = Attention::Eager;
    const MeasuredStep a = run_fp32(m, flash), b = run_fp32(m, eager);
    CHECK(std::fabs(a.loss - b.loss) / a.loss <= kTolerance);
    REQUIRE(a.gradients.size() == b.gradients.size());
    for (std::size_t i = 0; i < a.gradients.size(); ++i) {
        CAPTURE(a.gradients[i].name);
        CHECK(rel_err(b.gradients[i].values, a.gradients[i].values) <= kTolerance);
    }
}

TEST_CASE("numerics: tied embeddings, chunked LM heads equal the unchunked step (both heads write the embedding's gradient)") {
    const ModelSpec m = find_model(mst::test::data("tiny_sliding_tied.json"));
    TrainingSetup base = kernels_setup();
    base.seq_len = 37;
    const MeasuredStep ref = run_fp32(m, base);
    for (LmHeadImpl impl : {LmHeadImpl::Recompute, LmHeadImpl::FusedForward}) {
        TrainingSetup s = base;
        s.lm_chunks = 3;
        s.lm_impl = impl;
        CAPTURE(to_string(impl));
        const MeasuredStep r = run_fp32(m, s);
        CHECK(std::fabs(r.loss - ref.loss) / ref.loss <= kTolerance);
        for (std::size_t i = 0; i < r.gradients.size(); ++i) {
            CAPTURE(r.gradients[i].name);
            CHECK(rel_err(r.gradients[i].values, ref.gradients[i].values) <= kTolerance);
        }
    }
}

namespace {

// A model file's step under chunking (loop M=3 and recompute M=3; tiled M=4 and fused M=4 with
// every layer checkpointed) and under eager attention equals its unchunked flash step; returns
// how many gradients each step has. (A model with attention sinks runs them on flash only.)
std::size_t check_variants_equal_unchunked(const char* model_file) {
    const ModelSpec m = find_model(mst::test::data(model_file));
    TrainingSetup base = kernels_setup();
    base.seq_len = 37;
    const MeasuredStep ref = run_fp32(m, base);
    auto variant = [&](const char* name, auto knobs) {
        TrainingSetup s = base;
        knobs(s);
        CAPTURE(model_file);
        CAPTURE(name);
        const MeasuredStep r = run_fp32(m, s);
        CHECK(std::fabs(r.loss - ref.loss) / ref.loss <= kTolerance);
        REQUIRE(r.gradients.size() == ref.gradients.size());
        for (std::size_t i = 0; i < r.gradients.size(); ++i) {
            CAPTURE(r.gradients[i].name);
            CHECK(rel_err(r.gradients[i].values, ref.gradients[i].values) <= kTolerance);
        }
    };
    variant("loop M=3, recompute M=3", [](TrainingSetup& s) { s.mlp_chunks = s.lm_chunks = 3; });
    variant("tiled M=4, fused M=4, checkpoint all", [&](TrainingSetup& s) {
        s.mlp_chunks = s.lm_chunks = 4, s.mlp_impl = MlpImpl::Tiled, s.lm_impl = LmHeadImpl::FusedForward;
        s.checkpoint.assign(static_cast<std::size_t>(m.num_layers), true);
    });
    if (!m.attention_sinks) variant("eager attention", [](TrainingSetup& s) { s.attention = Attention::Eager; });
    return ref.gradients.size();
}

}  // namespace

TEST_CASE("numerics: Gemma-2 shape (soft-capping, post-norms, GeGLU), chunked and eager steps equal the unchunked flash step") {
    check_variants_equal_unchunked("tiny_gemma2.json");
}

TEST_CASE("numerics: Qwen3 shape (q/k head norms), chunked, checkpointed and eager steps equal the unchunked flash step") {
    // every parameter, the two head norms of each of the 2 layers included (tied: no lm_head)
    CHECK(check_variants_equal_unchunked("tiny_qwen3.json") == 11 * 2 + 2);
}

TEST_CASE("numerics: Gemma-3 shape (q/k head norms, post-norms, local and global layers), chunked, checkpointed and eager steps equal the unchunked flash step") {
    // every parameter: 6 norms (4 around the blocks, the q and k head norms) and 7 projections in
    // each of the 3 layers, the embedding and the final norm (tied: no lm_head)
    CHECK(check_variants_equal_unchunked("tiny_gemma3.json") == 13 * 3 + 2);
}

TEST_CASE("numerics: Phi-3 shape (3/4 of each head rotated), chunked, checkpointed and eager steps equal the unchunked flash step") {
    // the kernels runtime runs the fused projections as their row blocks: q, k, v, o, gate, up, down
    // and 2 norms per layer, the embedding and the final norm (tied: no lm_head)
    CHECK(check_variants_equal_unchunked("tiny_phi3.json") == 9 * 2 + 2);
}

TEST_CASE("numerics: Mixture-of-Experts (Mixtral: top-2 of 4, renormalised), chunked, checkpointed and eager steps equal the unchunked flash step") {
    // per layer: 2 norms, q, k, v, o, the router and the experts' gate, up and down; the
    // embedding, the final norm and lm_head
    CHECK(check_variants_equal_unchunked("tiny_mixtral.json") == 10 * 2 + 3);
}

TEST_CASE("numerics: Mixture-of-Experts (Qwen3-MoE: top-3 of 8, raw weights, q/k norms, tied), chunked, checkpointed and eager steps equal the unchunked flash step") {
    CHECK(check_variants_equal_unchunked("tiny_qwen3_moe.json") == 12 * 2 + 2);
    CHECK(check_variants_equal_unchunked("tiny_qwen3_moe_top1.json") > 0);  // top-1: each token on one expert
}

TEST_CASE("numerics: gpt-oss shape (sinks, biased router and experts, clamped SwiGLU, top-3 of 8), chunked and checkpointed steps equal the unchunked step") {
    // per layer: 2 norms, q, k, v, o (their biases folded in), the sinks, the router and the
    // experts' gate, up and down; the embedding, the final norm and lm_head
    CHECK(check_variants_equal_unchunked("tiny_gpt_oss.json") == 11 * 2 + 3);
}

TEST_CASE("numerics: biases (Qwen2's q/k/v, a Llama's attention and MLP biases), chunked, checkpointed and eager steps equal the unchunked flash step") {
    CHECK(check_variants_equal_unchunked("tiny_qwen2.json") == 9 * 3 + 2);
    CHECK(check_variants_equal_unchunked("tiny_llama_bias.json") == 9 * 2 + 3);
}

namespace {

// The step's gradient of `param` at `index` against central differences of its loss (fp32
// storage; the loss is a mean of fp32 row losses summed in double): returns |fd - grad| / |grad|,
// after checking that the probed element matters (|grad| at least 1 % of the parameter's largest:
// a bias never applied nor written would give fd = grad = 0).
double fd_error(const ModelSpec& m, const TrainingSetup& s, const MeasuredStep& ref, const std::string& param,
                std::int64_t index, float eps) {
    auto loss_at = [&](float delta) {
        ExecuteOptions o;
        o.storage_fp32 = true;
        o.nudge = ExecuteOptions::Nudge{param, index, delta};
        return execute_cpu(m, s, 11, o).loss;
    };
    const double fd = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps);
    for (const NamedValues& g : ref.gradients)
        if (g.name == param) {
            double scale = 0;
            for (float v : g.values) scale = std::max(scale, std::fabs(double(v)));
            const double grad = g.values[static_cast<std::size_t>(index)];
            CHECK(std::fabs(grad) >= 1e-2 * scale);
            return std::fabs(fd - grad) / std::fabs(grad);
        }
    FAIL("no gradient named " << param);
    return 1;
}

}  // namespace

TEST_CASE("numerics: the step's gradients of biases, sinks and clamped experts equal finite differences of its loss") {
    // Wiring the kernels' own tests cannot check: each bias sits after its weight's rows (an
    // expert's at its own rows), the sinks' gradient comes from the attention's lse and delta, the
    // router's bias moves the routing weights. The loss is piecewise smooth (a nudge that flips a
    // token's top-k jumps it) and its fp32 rounding is ~1e-7: eps is 1e-2 where no routing flips,
    // smaller before a layer's router (3e-3) and larger for a sink whose gradient is ~1e-5 (3e-2).
    // Measured here: every probe within 2 % of its own gradient (the worst, a layer-1 sink of
    // ~3e-5, is the loss's noise); the bound is 5 %, so a misplaced bias, or a gradient of the wrong
    // sign or scale by 1.05x or more, fails.
    struct Probe {
        const char* model;
        const char* param;
        std::int64_t index;
        float eps;
    };
    // tiny_gpt_oss: d 64, 4 heads of 32 (q 128 rows), 8 experts of 48, top-3; tiny_llama_bias: d 48, I 96
    const Probe probes[] = {
        {"tiny_gpt_oss.json", "layers.0.q_proj", 128 * 64 + 5, 1e-2f},                  // q's bias, row 5
        {"tiny_gpt_oss.json", "layers.1.o_proj", 64 * 128 + 7, 3e-3f},                  // o's bias
        {"tiny_gpt_oss.json", "layers.0.sinks", 2, 1e-2f},
        {"tiny_gpt_oss.json", "layers.1.sinks", 0, 3e-2f},
        {"tiny_gpt_oss.json", "layers.0.experts.gate_proj", 8 * 48 * 64 + 3 * 48 + 4, 1e-2f},  // expert 3's gate bias
        {"tiny_gpt_oss.json", "layers.1.experts.down_proj", 8 * 64 * 48 + 5 * 64 + 9, 1e-2f},  // expert 5's down bias
        {"tiny_gpt_oss.json", "layers.0.router", 8 * 64 + 2, 3e-3f},                     // the router's bias
        {"tiny_gpt_oss.json", "layers.0.experts.up_proj", 2 * 48 * 64 + 7 * 64 + 11, 1e-2f},   // expert 2's up weight
        {"tiny_llama_bias.json", "layers.0.q_proj", 48 * 48 + 3, 1e-2f},                 // q's bias
        {"tiny_llama_bias.json", "layers.1.down_proj", 48 * 96 + 10, 1e-2f},             // down's bias
        {"tiny_llama_bias.json", "layers.0.gate_proj", 96 * 48 + 50, 1e-2f},             // gate's bias
    };
    for (const char* model : {"tiny_gpt_oss.json", "tiny_llama_bias.json"}) {
        const ModelSpec m = find_model(mst::test::data(model));
        TrainingSetup s = kernels_setup();
        s.seq_len = 37;
        s.mlp_chunks = 3;  // chunked: the biases' gradients add up over chunks
        const MeasuredStep ref = run_fp32(m, s);
        for (const Probe& p : probes) {
            if (std::string(p.model) != model) continue;
            CAPTURE(std::string(p.param));
            CAPTURE(p.index);
            CHECK(fd_error(m, s, ref, p.param, p.index, p.eps) < 5e-2);
        }
    }
}
