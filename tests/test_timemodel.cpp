#include <doctest/doctest.h>

#include <algorithm>

#include "mst/catalog.hpp"
#include "mst/timemodel.hpp"
#include "sim_test_support.hpp"

using namespace mst;
using mst::test::kernels_setup;

namespace {
OpTime op(const std::vector<OpTime>& ops, const std::string& name) {
    for (const auto& o : ops)
        if (o.name == name) return o;
    FAIL("no op " << name);
    return {};
}
}  // namespace

TEST_CASE("causal attention pairs, with and without a sliding window") {
    CHECK(causal_pairs(4, 0) == 10);  // 1 + 2 + 3 + 4
    CHECK(causal_pairs(5, 2) == 9);   // 1 + 2 + 2 + 2 + 2
    CHECK(causal_pairs(5, 8) == 15);  // a window longer than the sequence changes nothing
}

TEST_CASE("a large GEMM is compute-bound: FLOPs over peak times the GEMM efficiency") {
    const ModelSpec m = find_model("llama-3-8b");
    const GpuProfile g = find_gpu("h100-sxm-80gb");
    TrainingSetup s = kernels_setup();
    s.seq_len = 8192;
    // gate and up projections, forward, all 32 layers: 2 * T * d * 2I FLOPs each.
    const double flops = 32.0 * 2 * 8192 * 4096 * (2 * 14336);
    const OpTime gu = op(predict_op_times(m, s, g), "mlp.gate_up (fwd)");
    CHECK(gu.flops == doctest::Approx(flops).epsilon(1e-12));
    CHECK(gu.seconds == doctest::Approx(flops / (989.4e12 * g.calibration.gemm_efficiency)).epsilon(1e-9));
}

TEST_CASE("MsT chunks cost kernel launches and weight re-reads, nothing at long sequences") {
    const ModelSpec m = find_model("llama-3-8b");
    const GpuProfile g = find_gpu("h100-sxm-80gb");
    TrainingSetup s = kernels_setup();
    s.seq_len = 65536;
    s.checkpoint.assign(32, true);
    const double one = predict_time(m, s, g).step_seconds;
    s.mlp_chunks = 16;  // 4096-token chunks: still compute-bound
    const StepTime t16 = predict_time(m, s, g);
    CHECK(op(predict_op_times(m, s, g), "mlp.gate_up (fwd)").kernels == 32 * 16);
    CHECK(t16.step_seconds == doctest::Approx(one).epsilon(1e-3));
    s.mlp_chunks = 4096;  // 16-token chunks: each re-reads the weights, memory-bound
    CHECK(predict_time(m, s, g).step_seconds > 1.2 * one);
}

TEST_CASE("recompute costs one more forward per checkpointed layer") {
    const ModelSpec m = find_model("small-llama");
    const GpuProfile g = find_gpu("a100-80gb");
    TrainingSetup s = kernels_setup();
    s.seq_len = 4096;
    const StepTime none = predict_time(m, s, g);
    s.checkpoint = {true, true, false, false};
    const StepTime two = predict_time(m, s, g);
    // The layer forward is the whole forward minus embedding, final norm and LM head.
    double head = 0;
    s.checkpoint.clear();
    for (const auto& o : predict_op_times(m, s, g))
        if (o.name.rfind("embedding (fwd)", 0) == 0 || o.name.rfind("final_norm (fwd)", 0) == 0 ||
            o.name.rfind("lm_head (fwd)", 0) == 0 || o.name.rfind("loss (fwd)", 0) == 0)
            head += o.seconds;
    CHECK(two.recompute_seconds == doctest::Approx(2.0 / 4.0 * (none.forward_seconds - head)).epsilon(1e-9));
}

TEST_CASE("MFU counts 6 N FLOPs per token plus causal attention, and no recompute") {
    const ModelSpec m = find_model("tiny-llama");
    const GpuProfile g = find_gpu("a100-80gb");
    TrainingSetup s = kernels_setup();
    s.seq_len = 128;
    const StepTime t = predict_time(m, s, g);
    // Matmul weights: attention 2 * 12288 + MLP 2 * 33792 + LM head 256 * 64.
    const double n = 2 * 12288 + 2 * 33792 + 256 * 64;
    // Attention: 3 (fwd + bwd) x 4 x hd x pairs per head: 12 * 16 * 4 heads * (128 * 129 / 2) * 2 layers.
    const double attn = 12.0 * 16 * 4 * (128.0 * 129 / 2) * 2;
    CHECK(t.model_flops == doctest::Approx(6 * n * 128 + attn).epsilon(1e-12));
    CHECK(t.mfu == doctest::Approx(t.model_flops / (t.step_seconds * 312e12)).epsilon(1e-12));
}

TEST_CASE("the Hugging Face loss moves about 18 bytes per logit in forward and 22 in backward, in 3 kernels each") {
    const ModelSpec m = find_model("llama-3-8b");
    const GpuProfile g = find_gpu("h100-sxm-80gb");
    TrainingSetup s = kernels_setup();
    s.seq_len = 8192;
    const std::vector<OpTime> t = predict_op_times(m, s, g);
    const double logits = 8192.0 * 128256;
    CHECK(op(t, "loss (fwd)").bytes == doctest::Approx(18 * logits).epsilon(1e-12));
    CHECK(op(t, "loss (fwd)").kernels == 3);
    CHECK(op(t, "loss (bwd)").bytes == doctest::Approx(22 * logits).epsilon(1e-12));
    // Memory-bound: bytes over HBM bandwidth times its efficiency.
    CHECK(op(t, "loss (fwd)").seconds == doctest::Approx(18 * logits / (3350e9 * g.calibration.memory_bound_efficiency)).epsilon(1e-9));
}

TEST_CASE("the Trainer's bf16=True copies the unchunked head's bf16 logits to fp32: 6 bytes per logit, one kernel") {
    const ModelSpec m = find_model("llama-3-8b");
    const GpuProfile g = find_gpu("h100-sxm-80gb");
    TrainingSetup s;  // (the hf runtime)
    s.seq_len = 8192;
    const StepTime plain = predict_time(m, s, g);
    s.hf_trainer_bf16 = true;
    const std::vector<OpTime> t = predict_op_times(m, s, g);
    const double logits = 8192.0 * 128256, seconds = 6 * logits / (3350e9 * g.calibration.memory_bound_efficiency);
    CHECK(op(t, "logits fp32 copy (fwd)").bytes == doctest::Approx(6 * logits).epsilon(1e-12));
    CHECK(op(t, "logits fp32 copy (fwd)").kernels == 1);
    CHECK(predict_time(m, s, g).forward_seconds - plain.forward_seconds == doctest::Approx(seconds).epsilon(1e-9));
    s.lm_chunks = 8;  // (a chunked head returns no logits: nothing to copy)
    const auto chunked = predict_op_times(m, s, g);
    CHECK(std::none_of(chunked.begin(), chunked.end(), [](const OpTime& o) { return o.name == "logits fp32 copy (fwd)"; }));
}

TEST_CASE("eager attention does the same FLOPs as flash, plus about 30 bytes per score element") {
    const ModelSpec m = find_model("tiny-llama");
    const GpuProfile g = find_gpu("a100-80gb");
    TrainingSetup s = kernels_setup();
    s.seq_len = 512;
    const double flash = op(predict_op_times(m, s, g), "attention (fwd)").flops;
    s.attention = Attention::Eager;
    const OpTime eager = op(predict_op_times(m, s, g), "attention (fwd)");
    CHECK(eager.flops == doctest::Approx(flash).epsilon(1e-12));
    CHECK(eager.bytes == doctest::Approx(30.0 * 4 * 512 * 512 * 2).epsilon(1e-12));  // 4 heads, 2 layers
}

TEST_CASE("the op rows sum to the forward and backward the step time counts") {
    const GpuProfile g = find_gpu("h100-sxm-80gb");
    for (const char* name : {"llama-3-8b", "qwen3-30b-a3b", "gemma-2-2b"}) {
        const ModelSpec m = find_model(name);
        TrainingSetup s = kernels_setup();
        s.seq_len = 16384;
        s.mlp_chunks = 3;  // uneven chunks: groups of two sizes
        for (const std::int64_t lm_chunks : {1, 5})
            for (const LmHeadImpl li : {LmHeadImpl::Recompute, LmHeadImpl::FusedForward})
                for (const std::int64_t ring : {1, 4}) {
                    s.lm_chunks = lm_chunks, s.lm_impl = li;
                    s.sp = ring, s.sp_impl = ring > 1 ? SpImpl::Ring : SpImpl::Ulysses;
                    const StepTime t = predict_time(m, s, g);
                    double rows = 0;
                    for (const OpTime& o : predict_op_times(m, s, g)) rows += o.seconds;
                    CAPTURE(name);
                    CAPTURE(lm_chunks);
                    CAPTURE(ring);
                    CHECK(rows == doctest::Approx(t.forward_seconds + t.backward_seconds).epsilon(1e-12));
                }
    }
}

TEST_CASE("the op rows: one per name, ops of one name summed into it") {
    const ModelSpec m = find_model("llama-3-8b");
    const GpuProfile g = find_gpu("h100-sxm-80gb");
    TrainingSetup s = kernels_setup();
    s.seq_len = 8192;
    s.mlp_chunks = 3;  // 8192 = 2731 + 2731 + 2730: two groups of chunks, each added to the same row
    std::vector<std::string> names;
    for (const OpTime& o : predict_op_times(m, s, g)) names.push_back(o.name);
    const std::vector<std::string> expected = {
        "norm (fwd)", "attn.qkv (fwd)", "attn.rope (fwd)", "attention (fwd)", "attn.o_proj (fwd)", "residual (fwd)",
        "mlp.gate_up (fwd)", "mlp.act (fwd)", "mlp.down (fwd)", "norm (bwd)", "attn.qkv (bwd)", "attn.rope (bwd)",
        "attention (bwd)", "attn.o_proj (bwd)", "residual (bwd)", "mlp.down (bwd)", "mlp.act (bwd)", "mlp.gate_up (bwd)",
        "embedding (fwd)", "embedding (bwd)", "final_norm (fwd)", "final_norm (bwd)", "lm_head (fwd)", "loss (fwd)",
        "loss (bwd)", "lm_head (bwd)"};
    CHECK(names == expected);
    const std::vector<OpTime> rows = predict_op_times(m, s, g);
    // A tagged row gathers both chunk groups: 3 kernels per layer, 2 T d 2I FLOPs in all.
    CHECK(op(rows, "mlp.gate_up (fwd)").kernels == 32 * 3);
    CHECK(op(rows, "mlp.gate_up (fwd)").flops == doctest::Approx(32.0 * 2 * 8192 * 4096 * 2 * 14336).epsilon(1e-12));
    // An untagged one gathers the input gradient's GEMM and the weight gradient's: 2 x 2 T d (q + 2 kv) FLOPs.
    CHECK(op(rows, "attn.qkv (bwd)").flops == doctest::Approx(32.0 * 2 * 2 * 8192 * 4096 * (4096 + 2 * 1024)).epsilon(1e-12));
    // Rows appear with what the setup runs: soft-capped logits, ring attention's merges.
    s.mlp_chunks = 1;
    names.clear();
    for (const OpTime& o : predict_op_times(find_model("gemma-2-2b"), s, g)) names.push_back(o.name);
    CHECK(std::count(names.begin(), names.end(), "lm_head.softcap (fwd)") == 1);
    CHECK(std::count(names.begin(), names.end(), "lm_head.softcap (bwd)") == 1);
    s.sp = 4, s.sp_impl = SpImpl::Ring;
    names.clear();
    for (const OpTime& o : predict_op_times(m, s, g)) names.push_back(o.name);
    CHECK(std::count(names.begin(), names.end(), "attn.ring.merge (fwd)") == 1);
    CHECK(std::count(names.begin(), names.end(), "attn.ring.accumulate (bwd)") == 1);
}
