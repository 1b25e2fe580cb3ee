// The simulator against byte counts derived by hand. The tiny test model has
// d = 64, I = 176, 4 heads of 16 (q_dim 64), 2 KV heads (kv_dim 32), V = 256,
// 2 layers, untied: every expected number below is written out from those.
#include <doctest/doctest.h>

#include <functional>
#include <tuple>

#include <fmt/format.h>

#include "mst/catalog.hpp"
#include "mst/error.hpp"
#include "mst/setup.hpp"
#include "mst/simulate.hpp"
#include "sim_test_support.hpp"
#include "test_support.hpp"

using namespace mst;
using namespace mst::test;

TEST_CASE("persistent state for each precision policy (AdamW)") {
    const ModelSpec m = find_model("tiny-llama");
    const std::int64_t P = m.parameters().total();
    CHECK(P == 2 * 256 * 64 + 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 176 + 2 * 64) + 64);
    struct Case {
        Precision precision;
        std::int64_t weights, master, grads, optim;
    };
    // pure bf16: 2-byte params, grads, and (default) bf16 moments: 2 x 2 bytes.
    // bf16 + fp32 master: 2-byte params, 4-byte master, 4-byte grads, 2 x 4-byte moments.
    // AMP: 4-byte params and grads, 2 x 4-byte moments.
    for (const Case c : {Case{Precision::PureBf16, 2 * P, 0, 2 * P, 4 * P}, Case{Precision::Bf16Master, 2 * P, 4 * P, 4 * P, 8 * P},
                         Case{Precision::AmpFp32, 4 * P, 0, 4 * P, 8 * P}}) {
        CAPTURE(to_string(c.precision));
        TrainingSetup s = tiny_setup(128);
        s.precision = c.precision;
        const Summary sum = summarize(simulate(m, s, test_gpu()), m.num_layers);
        // AMP's autocast bf16 copies are weights too, transient ones: the persistent part is at the end.
        CHECK(live_at_end(simulate(m, s, test_gpu()), Category::Weights) == c.weights);
        CHECK(sum.category_max[static_cast<std::size_t>(Category::MasterWeights)] == c.master);
        CHECK(sum.category_max[static_cast<std::size_t>(Category::Gradients)] == c.grads);
        CHECK(sum.category_max[static_cast<std::size_t>(Category::OptimizerState)] == c.optim);
    }
}

TEST_CASE("8-bit AdamW: one byte per moment plus one fp32 absmax per 2048 values, fp32 below 4096 elements") {
    const ModelSpec m = find_model("tiny-llama");
    TrainingSetup s = tiny_setup(128);
    s.optimizer = Optimizer::AdamW8bit;
    const Summary sum = summarize(simulate(m, s, test_gpu()), m.num_layers);
    // embed / lm_head 16384 values: 2*16384 + 2*4*8 = 32832 each
    // norms (64 values): fp32 moments, 2*4*64 = 512 each (5 norms)
    // q, o (4096 values): 2*4096 + 2*4*2 = 8208 each; k, v (2048 values): fp32, 16384 each
    // gate, up, down (11264 values): 2*11264 + 2*4*6 = 22576 each
    const std::int64_t per_layer = 2 * 512 + 2 * 8208 + 2 * 16384 + 3 * 22576;
    CHECK(sum.category_max[static_cast<std::size_t>(Category::OptimizerState)] == 2 * 32832 + 512 + 2 * per_layer);
}

// Per layer at T = 128 tokens, flash attention, bf16, no checkpointing, what the
// forward leaves saved: rstd1 4T, h1 2dT, q 2*q_dim*T, k+v 4*kv_dim*T, o 2*q_dim*T,
// lse 4*nh*T, x2 2dT, rstd2 4T, h2 2dT, g+u+m 6IT, and the layer's output 2dT.
constexpr std::int64_t kSavedPerToken = 4 + 128 + 128 + 128 + 128 + 16 + 128 + 4 + 128 + 6 * 176 + 128;

TEST_CASE("saved activations per layer, flash attention, no checkpointing") {
    CHECK(kSavedPerToken == 1976);
    const ModelSpec m = find_model("tiny-llama");
    const Summary sum = summarize(simulate(m, tiny_setup(128), test_gpu()), m.num_layers);
    CHECK(sum.layer_saved[0] == 128 * kSavedPerToken);
    CHECK(sum.layer_saved[1] == 128 * kSavedPerToken);
}

TEST_CASE("checkpointing every layer leaves only each layer's output (the next checkpoint)") {
    const ModelSpec m = find_model("tiny-llama");
    TrainingSetup s = tiny_setup(128);
    s.checkpoint = {true, true};
    const Summary sum = summarize(simulate(m, s, test_gpu()), m.num_layers);
    CHECK(sum.layer_saved[0] == 128 * 64 * 2);
    CHECK(sum.layer_saved[1] == 128 * 64 * 2);
    // Offloaded: the checkpoints leave the GPU (the layer-0 input and layer 1's) and
    // the host holds both at once.
    s.offload_checkpoints = true;
    const Summary off = summarize(simulate(m, s, test_gpu()), m.num_layers);
    CHECK(off.host_peak == 2 * 128 * 64 * 2);
    CHECK(off.layer_saved[0] == 0);  // layer 0's output is layer 1's checkpoint, offloaded
}

TEST_CASE("eager attention saves S x S probabilities in fp32 and bf16 and the repeated K/V") {
    const ModelSpec m = find_model("tiny-llama");
    TrainingSetup s = tiny_setup(128);
    s.attention = Attention::Eager;
    const Summary eager = summarize(simulate(m, s, test_gpu()), m.num_layers);
    // eager adds k_rep, v_rep (2 * 2*q_dim*T = 32768) and probs fp32 + bf16 (6 * nh*S*S = 393216),
    // and drops k, v (4*kv_dim*T = 16384) and lse (4*nh*T = 2048) from the saved set.
    CHECK(eager.layer_saved[0] - 128 * kSavedPerToken == 32768 + 393216 - 16384 - 2048);
}

TEST_CASE("MLP transient peaks in backward for M = 1, 2, 4 (MsT loop)") {
    const ModelSpec m = find_model("tiny-llama");
    // In layer 0's MLP backward the residual gradient dres (2dT = 16384) is live. A chunk of
    // n tokens needs dm, dg, du (3 * 2*I*n) at once; dh2 (2dT) exists from the first chunk on.
    // M = 1: 16384 + max(6*I*T, 2dT + 4*I*T) = 16384 + 135168
    // M = 2: 16384 + 16384 + 6*I*64 = 100352;  M = 4: 32768 + 6*I*32 = 66560
    const std::pair<std::int64_t, std::int64_t> cases[] = {{1, 151552}, {2, 100352}, {4, 66560}};
    for (auto [M, expected] : cases) {
        CAPTURE(M);
        TrainingSetup s = tiny_setup(128);
        s.mlp_chunks = M;
        const Timeline t = simulate(m, s, test_gpu());
        CHECK(max_live_during(t, Category::Transient, [](const Event& e) {
                  return e.phase == Phase::Backward && e.layer == 0 && e.op.rfind("mlp.", 0) == 0;
              }) == expected);
    }
}

TEST_CASE("MLP transient peaks in a checkpointed layer's no-grad forward shrink with M") {
    const ModelSpec m = find_model("tiny-llama");
    // Live transients in layer 0's MLP forward: x2 and h2 (2dT each = 16384), then per chunk
    // g, u, m (2*I*n each) and, from the first chunk on, y (2dT).
    // M = 1: max(x2+h2+g+u+m, x2+h2+m+y) = 32768 + 135168 = 167936
    // M = 2: later chunks hold x2+h2+y + g+u+m = 49152 + 67584 = 116736
    // M = 4: 49152 + 33792 = 82944
    const std::pair<std::int64_t, std::int64_t> cases[] = {{1, 167936}, {2, 116736}, {4, 82944}};
    for (auto [M, expected] : cases) {
        CAPTURE(M);
        TrainingSetup s = tiny_setup(128);
        s.mlp_chunks = M;
        s.checkpoint = {true, true};
        const Timeline t = simulate(m, s, test_gpu());
        CHECK(max_live_during(t, Category::Transient, [](const Event& e) {
                  return e.phase == Phase::Forward && e.layer == 0 && e.op.rfind("mlp.", 0) == 0;
              }) == expected);
    }
}

TEST_CASE("tiled MLP saves only its input") {
    const ModelSpec m = find_model("tiny-llama");
    TrainingSetup s = tiny_setup(128);
    s.mlp_chunks = 2;
    s.mlp_impl = MlpImpl::Tiled;
    const Summary sum = summarize(simulate(m, s, test_gpu()), m.num_layers);
    CHECK(sum.layer_saved[0] == 128 * (kSavedPerToken - 6 * 176));  // g, u, m are not kept
}

TEST_CASE("LM head + loss growth in forward for M = 1, 2, 4 and in backward") {
    const ModelSpec m = find_model("tiny-llama");
    auto head_forward = [](const Event& e) {
        return e.phase == Phase::Forward && (e.op == "lm_head" || e.op == "loss");
    };
    // M = 1 (Hugging Face): bf16 logits 2TV + fp32 copy 4TV + fp32 log-probs 4TV = 10TV = 327680.
    // Recompute, n = T/M tokens per chunk: logits 2nV + fp32 4nV, then log-probs 4nV
    // after the bf16 logits go: max(6nV, 8nV) = 8nV: 131072 (M = 2), 65536 (M = 4).
    const std::pair<std::int64_t, std::int64_t> cases[] = {{1, 327680}, {2, 131072}, {4, 65536}};
    for (auto [M, expected] : cases) {
        CAPTURE(M);
        TrainingSetup s = tiny_setup(128);
        s.lm_chunks = M;
        CHECK(block_growth(simulate(m, s, test_gpu()), head_forward) == expected);
    }
    auto head_backward = [](const Event& e) {
        return e.phase == Phase::Backward && (e.op == "lm_head" || e.op == "loss");
    };
    // M = 1 backward: d_log_probs 4TV and d_logits_fp32 4TV at once = 262144.
    CHECK(block_growth(simulate(m, tiny_setup(128), test_gpu()), head_backward) == 262144);
    // Recompute M = 2: d_hidden 2dT (16384), the lm_head gradient 2Vd (32768) from the
    // first chunk on, and per chunk fp32 logits 4nV with the bf16 gradient 2nV (98304).
    TrainingSetup s = tiny_setup(128);
    s.lm_chunks = 2;
    CHECK(block_growth(simulate(m, s, test_gpu()), head_backward) == 16384 + 32768 + 98304);
}

TEST_CASE("fused LM head holds its gradients from forward and never saves the hidden states") {
    const ModelSpec m = find_model("tiny-llama");
    TrainingSetup s = tiny_setup(128);
    s.lm_chunks = 4;
    s.lm_impl = LmHeadImpl::FusedForward;
    const Timeline t = simulate(m, s, test_gpu());
    // In forward: d_hidden (2dT = 16384) and the lm_head gradient (2Vd = 32768) stay,
    // and one chunk of bf16 logits (2 * 32 * V = 16384) comes and goes.
    CHECK(block_growth(t, [](const Event& e) { return e.phase == Phase::Forward && e.op == "lm_head.fused"; }) ==
          16384 + 32768 + 16384);
}

TEST_CASE("gradients persist between accumulation micro-steps") {
    const ModelSpec m = find_model("tiny-llama");
    TrainingSetup s = tiny_setup(64);
    s.grad_accum = 4;
    const Timeline t = simulate(m, s, test_gpu());
    CHECK(t.micro_steps == 4);
    CHECK(t.micro_steps_recorded == 2);  // micro-steps 3 and 4 repeat the second exactly
    // At the start of micro-step 1 every parameter's bf16 gradient is live.
    bytes_t grads = 0;
    for (const Event& e : t.events) {
        if (e.micro_step == 1 && e.phase == Phase::Forward) break;
        if (e.category == Category::Gradients) grads += e.alloc ? e.bytes : -e.bytes;
    }
    CHECK(grads == 2 * m.parameters().total());
}

TEST_CASE("optimizer in backward holds only the gradients of the block being differentiated") {
    const ModelSpec m = find_model("tiny-llama");
    TrainingSetup s = tiny_setup(64);
    s.optimizer_in_backward = true;
    const Summary sum = summarize(simulate(m, s, test_gpu()), m.num_layers);
    // Each parameter steps as soon as its gradient is complete. The most that coexist
    // are the MLP's gate, up and down gradients (complete together at the end of the
    // MLP backward): 3 * 2 * d * I = 67584 bytes, more than the lm_head's 2 * V * d = 32768.
    CHECK(sum.category_max[static_cast<std::size_t>(Category::Gradients)] == 3 * 2 * 64 * 176);
}

TEST_CASE("Gemma-2: the embedding's scatter-add reads d_embeddings, so it lives until the table's gradient exists") {
    // With untied embeddings the table's gradient is first written by the scatter-add of the
    // scaled token gradients: d_embeddings [T, d] (2dT = 8192 bytes at T = 64) and the table's
    // gradient [V, d] (2Vd = 32768) must be live together.
    ModelSpec m = find_model(std::string(MST_TEST_DATA_DIR) + "/tiny_gemma2.json");
    m.tie_word_embeddings = false;
    const Timeline t = simulate(m, tiny_setup(64), test_gpu());
    bool scaled_live = false, checked = false;
    for (const Event& e : t.events) {
        if (e.phase != Phase::Backward || e.name != "d_embeddings") {
            if (e.phase == Phase::Backward && e.alloc && e.name == "embed_tokens" && e.category == Category::Gradients) {
                CHECK(scaled_live);
                CHECK(e.bytes == 2 * 256 * 64);
                checked = true;
            }
            continue;
        }
        CHECK(e.bytes == 2 * 64 * 64);
        scaled_live = e.alloc;
    }
    CHECK(checked);
}

TEST_CASE("hf runtime: sdpa is PyTorch's flash kernel, and a concatenated q's output is copied before o_proj") {
    // Phi-4-mini (Phi-3's code: q is the cat of its rotated and passed shares, [B, H, S, D] in memory):
    // both kernels make their output empty_like(q), which transformers copies before o_proj, [T,
    // q_dim] bf16 per layer; aten's backward (sdpa) copies the saved output once more. Llama's q keeps
    // the projection's memory order: no copy.
    const auto copies = [](const char* model, Attention a, Phase phase) {
        TrainingSetup s;
        s.runtime = Runtime::Hf;
        s.seq_len = 1024;
        s.attention = a;
        const ModelSpec m = find_model(model);
        const Estimate e = estimate(m, s, find_gpu("h100-sxm-80gb"));
        std::int64_t n = 0;
        for (const Event& ev : e.timeline.events)
            if (ev.alloc && ev.name == "o_contiguous" && ev.phase == phase) {
                CHECK(ev.bytes == 1024 * m.q_dim() * 2);
                ++n;
            }
        return n;
    };
    CHECK(copies("phi-4-mini", Attention::Flash, Phase::Forward) == 32);
    CHECK(copies("phi-4-mini", Attention::Sdpa, Phase::Forward) == 32);
    CHECK(copies("phi-4-mini", Attention::Flash, Phase::Backward) == 0);
    CHECK(copies("phi-4-mini", Attention::Sdpa, Phase::Backward) == 32);
    CHECK(copies("llama-3-8b", Attention::Sdpa, Phase::Forward) == 0);
    CHECK(copies("llama-3-8b", Attention::Sdpa, Phase::Backward) == 0);
    // Against flash_attention_2, sdpa saves no 16-byte RNG state per layer and asks no packed-sequence
    // question: Llama-3-8B's peak is the same bytes less the RNG states alive at it.
    TrainingSetup s;
    s.runtime = Runtime::Hf;
    s.seq_len = 4096;
    const ModelSpec m = find_model("llama-3-8b");
    const GpuProfile g = find_gpu("h100-sxm-80gb");
    const bytes_t flash = estimate(m, s, g).summary.peak.bytes;
    s.attention = Attention::Sdpa;
    const bytes_t sdpa = estimate(m, s, g).summary.peak.bytes;
    CHECK(flash - sdpa == 16 * 32);  // the peak is in backward's first layer: every layer's state still saved
}

TEST_CASE("sdpa is refused where it is not PyTorch's flash kernel on unmasked causal attention") {
    TrainingSetup s;
    s.runtime = Runtime::Hf;
    s.attention = Attention::Sdpa;
    for (const char* model : {"mistral-7b-v0.1", "gemma-2-9b", "gemma-3-1b", "phi-3-mini-4k"}) {
        CAPTURE(model);
        CHECK(test::expect_user_error([&] { validate(s, find_model(model)); }).find("attention: expected flash or eager") !=
              std::string::npos);
    }
    CHECK(test::expect_user_error([&] { validate(s, find_model("gpt-oss-20b")); }).find("got sdpa") != std::string::npos);
    s.runtime = Runtime::Kernels;
    CHECK(test::expect_user_error([&] { validate(s, find_model("llama-3-8b")); }).find("with runtime kernels") !=
          std::string::npos);
    s.runtime = Runtime::Hf;
    validate(s, find_model("llama-3-8b"));  // (no throw)
    validate(s, find_model("phi-4-mini"));
}

TEST_CASE("the hf runtime keeps optimizer states in the dtype of what the optimizer steps, as torch does") {
    // torch's AdamW and SGD make their states like the tensors they update (zeros_like): bf16 for
    // pure-bf16 weights, fp32 for python/mst_hf's fp32 masters (bf16-master) and for amp's fp32
    // weights. python/mst_hf's make_optimizer refuses any other, and so does the hf runtime; the
    // kernels runtime's own optimizer keeps either.
    const ModelSpec m = find_model("qwen3-4b");
    TrainingSetup s;
    s.runtime = Runtime::Hf;
    for (const auto& [precision, states, other] : {std::tuple{Precision::PureBf16, StateDtype::Bf16, StateDtype::Fp32},
                                                   std::tuple{Precision::Bf16Master, StateDtype::Fp32, StateDtype::Bf16},
                                                   std::tuple{Precision::AmpFp32, StateDtype::Fp32, StateDtype::Bf16}}) {
        CAPTURE(to_string(precision));
        s.precision = precision;
        for (const Optimizer o : {Optimizer::AdamW, Optimizer::SgdMomentum}) {
            s.optimizer = o;
            s.state_dtype.reset();
            validate(s, m);  // (the default: the precision's)
            s.state_dtype = states;
            validate(s, m);
            s.state_dtype = other;
            CHECK(test::expect_user_error([&] { validate(s, m); })
                      .rfind(fmt::format("setup: optimizer_state_dtype: expected {} with precision {} with runtime hf (torch keeps",
                                         to_string(states), to_string(precision)),
                             0) == 0);
            s.runtime = Runtime::Kernels;
            validate(s, m);
            s.runtime = Runtime::Hf;
        }
    }
}

TEST_CASE("hf runtime: the Hugging Face Trainer's bf16=True copies an unchunked head's logits to fp32 as the forward returns") {
    // accelerate's convert_outputs_to_fp32 (the referee's --trainer hf-trainer showed it): a new output whose
    // bf16 logits are an fp32 copy, [B S, V] x 4 bytes, made after the model's forward returns and gone with
    // the output once the Trainer takes its loss; the model's bf16 logits go in between. A chunked head
    // returns no logits: nothing.
    const ModelSpec m = find_model("tiny-llama");  // V = 256
    const auto copies = [&](std::int64_t lm_chunks, bool trainer) {
        TrainingSetup s = tiny_setup(128);
        s.runtime = Runtime::Hf;
        s.micro_batch = 2, s.grad_accum = 2;
        s.lm_chunks = lm_chunks;
        s.hf_trainer_bf16 = trainer;
        const Timeline t = simulate(m, s, test_gpu());
        std::vector<std::pair<bool, std::string>> around;  // the forward's end: the copy and the logits it replaces
        for (std::size_t i = 0; i < t.events.size(); ++i) {
            const Event& e = t.events[i];
            if (e.name != "logits_fp32_output") continue;
            CHECK(e.bytes == 2 * 128 * 256 * 4);
            CHECK(e.op == std::string("forward.end"));
            CHECK(e.category == Category::Transient);
            if (e.alloc) {
                REQUIRE(i + 2 < t.events.size());
                around.push_back({t.events[i + 1].alloc, t.events[i + 1].name});  // the model's logits go
                CHECK(t.events[i + 1].bytes == 2 * 128 * 256 * 2);
                CHECK((!t.events[i + 2].alloc && t.events[i + 2].tensor == e.tensor));  // then the copy
            }
        }
        return around;
    };
    const auto two = copies(1, true);
    CHECK(two.size() == 2);  // one per micro-step recorded
    for (const auto& [alloc, name] : two) CHECK((!alloc && name == "logits"));
    CHECK(copies(1, false).empty());
    CHECK(copies(2, true).empty());
    // The copy is transient: the step's peak is the same where the forward's end is not its peak (the loss's
    // own fp32 logits and log-probabilities, [B S, V] x 4 bytes each, came before it)
    TrainingSetup s = tiny_setup(128);
    s.runtime = Runtime::Hf;
    const bytes_t plain = summarize(simulate(m, s, test_gpu()), m.num_layers).peak.bytes;
    s.hf_trainer_bf16 = true;
    CHECK(summarize(simulate(m, s, test_gpu()), m.num_layers).peak.bytes == plain);
    CHECK(to_json(s).at("hf_trainer_bf16") == true);  // (a setup file and a plan carry it)
    CHECK(parse_setup(to_json(s), m, "setup").hf_trainer_bf16);
    CHECK_FALSE(to_json(tiny_setup(128)).contains("hf_trainer_bf16"));
    // Refused where it does not apply: the kernels runtime, DeepSpeed's engine and FSDP2 (accelerate prepares
    // them without its native amp), and the Mixture-of-Experts models whose experts' combine CUDA's autocast
    // sums in fp32
    s.runtime = Runtime::Kernels;
    CHECK_THROWS_WITH_AS(validate(s, m), doctest::Contains("hf_trainer_bf16"), UserError);
    s.runtime = Runtime::Hf, s.zero_stage = 2, s.dp = 2;
    CHECK_THROWS_WITH_AS(validate(s, m), doctest::Contains("DeepSpeed's engine"), UserError);
    s.zero_stage = 3, s.fsdp2 = true;  // (accelerate's FSDP2 preparation adds no native amp either)
    CHECK_THROWS_WITH_AS(validate(s, m), doctest::Contains("with fsdp2"), UserError);
    TrainingSetup moe;
    moe.runtime = Runtime::Hf, moe.hf_trainer_bf16 = true;
    CHECK_THROWS_WITH_AS(validate(moe, find_model("qwen3-30b-a3b")), doctest::Contains("experts' combine"), UserError);
    moe.precision = Precision::AmpFp32;  // (fp32 experts: the referee records gpt-oss under amp)
    CHECK_NOTHROW(validate(moe, find_model("mixtral-8x7b")));
    moe.attention = Attention::Eager;  // (gpt-oss's sinks: eager in this runtime)
    CHECK_NOTHROW(validate(moe, find_model("gpt-oss-20b")));
    moe.precision = Precision::PureBf16;
    CHECK_THROWS_WITH_AS(validate(moe, find_model("gpt-oss-20b")), doctest::Contains("experts' combine"), UserError);
}
