// The simulator against the CPU executor's measured memory: for each setup, the
// predicted and the measured timelines must be the same, event by event (same
// allocations and frees, in the same order, with the same bytes, categories, phases,
// layers and ops), hence the same peak to the byte. The executor sizes every buffer
// from the kernel it feeds, never from the simulator's rules (src/exec/executor.cpp).
#include <doctest/doctest.h>

#include <fmt/format.h>

#include "mst/catalog.hpp"
#include "mst/compare.hpp"
#include "mst/execute.hpp"
#include "mst/simulate.hpp"
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

struct MatrixCase {
    const char* name;
    const char* model;
    std::int64_t seq;
    void (*knobs)(TrainingSetup&, std::int64_t layers);
};

// Knobs varied one or a few at a time: MsT chunk counts (even and uneven splits) and
// implementations, checkpointing none / all / some, offload, precision policies,
// optimizers and their state dtype, micro-batch, gradient accumulation, optimizer in backward.
const MatrixCase kMatrix[] = {
    {"mlp loop M=2", "tiny-llama", 32, [](TrainingSetup& s, std::int64_t) { s.mlp_chunks = 2; }},
    {"mlp loop M=3 (uneven)", "tiny-llama", 32, [](TrainingSetup& s, std::int64_t) { s.mlp_chunks = 3; }},
    {"mlp tiled M=4", "tiny-llama", 32, [](TrainingSetup& s, std::int64_t) { s.mlp_chunks = 4, s.mlp_impl = MlpImpl::Tiled; }},
    {"mlp tiled M=5 (uneven)", "tiny-llama", 32, [](TrainingSetup& s, std::int64_t) { s.mlp_chunks = 5, s.mlp_impl = MlpImpl::Tiled; }},
    {"lm recompute M=2", "tiny-llama", 32, [](TrainingSetup& s, std::int64_t) { s.lm_chunks = 2; }},
    {"lm recompute M=5 (uneven)", "tiny-llama", 32, [](TrainingSetup& s, std::int64_t) { s.lm_chunks = 5; }},
    {"lm fused M=4", "tiny-llama", 32, [](TrainingSetup& s, std::int64_t) { s.lm_chunks = 4, s.lm_impl = LmHeadImpl::FusedForward; }},
    {"checkpoint all", "tiny-llama", 32, [](TrainingSetup& s, std::int64_t L) { s.checkpoint.assign(static_cast<std::size_t>(L), true); }},
    {"checkpoint all, offloaded", "tiny-llama", 32,
     [](TrainingSetup& s, std::int64_t L) { s.checkpoint.assign(static_cast<std::size_t>(L), true), s.offload_checkpoints = true; }},
    {"checkpoint layer 1 only", "tiny-llama", 32, [](TrainingSetup& s, std::int64_t) { s.checkpoint = {false, true}; }},
    {"checkpoint layer 0 only, offloaded, mlp loop M=2", "tiny-llama", 32,
     [](TrainingSetup& s, std::int64_t) { s.checkpoint = {true, false}, s.offload_checkpoints = true, s.mlp_chunks = 2; }},
    {"checkpoint all, tiled M=4, fused M=4", "tiny-llama", 32, [](TrainingSetup& s, std::int64_t L) {
         s.checkpoint.assign(static_cast<std::size_t>(L), true);
         s.mlp_chunks = 4, s.mlp_impl = MlpImpl::Tiled, s.lm_chunks = 4, s.lm_impl = LmHeadImpl::FusedForward;
     }},
    {"bf16 + fp32 master", "tiny-llama", 32, [](TrainingSetup& s, std::int64_t) { s.precision = Precision::Bf16Master; }},
    {"AMP", "tiny-llama", 32, [](TrainingSetup& s, std::int64_t) { s.precision = Precision::AmpFp32; }},
    {"AMP, checkpoint all, loop M=2, recompute M=2", "tiny-llama", 32, [](TrainingSetup& s, std::int64_t L) {
         s.precision = Precision::AmpFp32, s.checkpoint.assign(static_cast<std::size_t>(L), true);
         s.mlp_chunks = 2, s.lm_chunks = 2;
     }},
    {"AMP, tiled M=3, fused M=2", "tiny-llama", 32, [](TrainingSetup& s, std::int64_t) {
         s.precision = Precision::AmpFp32, s.mlp_chunks = 3, s.mlp_impl = MlpImpl::Tiled;
         s.lm_chunks = 2, s.lm_impl = LmHeadImpl::FusedForward;
     }},
    {"SGD with momentum", "tiny-llama", 32, [](TrainingSetup& s, std::int64_t) { s.optimizer = Optimizer::SgdMomentum; }},
    {"pure bf16 with fp32 AdamW states", "tiny-llama", 32, [](TrainingSetup& s, std::int64_t) { s.state_dtype = StateDtype::Fp32; }},
    {"grad_accum 2", "tiny-llama", 32, [](TrainingSetup& s, std::int64_t) { s.grad_accum = 2; }},
    {"grad_accum 4, fused M=2 (a separate lm_head gradient in micro-step 2)", "tiny-llama", 32,
     [](TrainingSetup& s, std::int64_t) { s.grad_accum = 4, s.lm_chunks = 2, s.lm_impl = LmHeadImpl::FusedForward; }},
    {"optimizer in backward", "tiny-llama", 32, [](TrainingSetup& s, std::int64_t) { s.optimizer_in_backward = true; }},
    {"optimizer in backward, AMP, checkpoint all, fused M=2", "tiny-llama", 32, [](TrainingSetup& s, std::int64_t L) {
         s.optimizer_in_backward = true, s.precision = Precision::AmpFp32;
         s.checkpoint.assign(static_cast<std::size_t>(L), true), s.lm_chunks = 2, s.lm_impl = LmHeadImpl::FusedForward;
     }},
    {"micro-batch 2", "tiny-llama", 16, [](TrainingSetup& s, std::int64_t) { s.micro_batch = 2, s.mlp_chunks = 3, s.lm_chunks = 3; }},
    {"bf16 master, SGD, checkpoint last layer offloaded", "tiny-llama", 32, [](TrainingSetup& s, std::int64_t) {
         s.precision = Precision::Bf16Master, s.optimizer = Optimizer::SgdMomentum;
         s.checkpoint = {false, true}, s.offload_checkpoints = true;
     }},
    {"AMP, grad_accum 3, offloaded checkpoints, tiled M=2, recompute M=3", "tiny-llama", 32, [](TrainingSetup& s, std::int64_t L) {
         s.precision = Precision::AmpFp32, s.grad_accum = 3;
         s.checkpoint.assign(static_cast<std::size_t>(L), true), s.offload_checkpoints = true;
         s.mlp_chunks = 2, s.mlp_impl = MlpImpl::Tiled, s.lm_chunks = 3;
     }},
    {"eager attention", "tiny-llama", 32, [](TrainingSetup& s, std::int64_t) { s.attention = Attention::Eager; }},
    {"eager, checkpoint all (the masks are kept as checkpoint inputs)", "tiny-llama", 32, [](TrainingSetup& s, std::int64_t L) {
         s.attention = Attention::Eager, s.checkpoint.assign(static_cast<std::size_t>(L), true);
     }},
    {"eager, AMP, loop M=2, recompute M=2", "tiny-llama", 32, [](TrainingSetup& s, std::int64_t) {
         s.attention = Attention::Eager, s.precision = Precision::AmpFp32, s.mlp_chunks = 2, s.lm_chunks = 2;
     }},
    {"eager, micro-batch 2, checkpoint layer 1 offloaded", "tiny-llama", 16, [](TrainingSetup& s, std::int64_t) {
         s.attention = Attention::Eager, s.micro_batch = 2, s.checkpoint = {false, true}, s.offload_checkpoints = true;
     }},
    {"sliding window + tied embeddings, flash", "tiny_sliding_tied.json", 32, [](TrainingSetup&, std::int64_t) {}},
    {"sliding window + tied embeddings, eager (two masks), checkpoint all, fused M=2", "tiny_sliding_tied.json", 32,
     [](TrainingSetup& s, std::int64_t L) {
         s.attention = Attention::Eager, s.checkpoint.assign(static_cast<std::size_t>(L), true);
         s.lm_chunks = 2, s.lm_impl = LmHeadImpl::FusedForward;
     }},
    {"tied embeddings, optimizer in backward, recompute M=3", "tiny_sliding_tied.json", 32, [](TrainingSetup& s, std::int64_t) {
         s.optimizer_in_backward = true, s.lm_chunks = 3;
     }},
    {"tied embeddings, grad_accum 2, fused M=2, AMP", "tiny_sliding_tied.json", 32, [](TrainingSetup& s, std::int64_t) {
         s.grad_accum = 2, s.lm_chunks = 2, s.lm_impl = LmHeadImpl::FusedForward, s.precision = Precision::AmpFp32;
     }},
    {"Gemma-2: post-norms, embedding scale, final soft-capping (M = 1)", "tiny_gemma2.json", 32, [](TrainingSetup&, std::int64_t) {}},
    {"Gemma-2: eager with soft-capped scores, two masks, checkpoint all", "tiny_gemma2.json", 32, [](TrainingSetup& s, std::int64_t L) {
         s.attention = Attention::Eager, s.checkpoint.assign(static_cast<std::size_t>(L), true);
     }},
    {"Gemma-2: AMP, loop M=2, recompute M=3", "tiny_gemma2.json", 32, [](TrainingSetup& s, std::int64_t) {
         s.precision = Precision::AmpFp32, s.mlp_chunks = 2, s.lm_chunks = 3;
     }},
    {"Gemma-2: grad_accum 2, fused M=2, eager", "tiny_gemma2.json", 32, [](TrainingSetup& s, std::int64_t) {
         s.grad_accum = 2, s.lm_chunks = 2, s.lm_impl = LmHeadImpl::FusedForward, s.attention = Attention::Eager;
     }},
    {"Gemma-2: bf16 master, optimizer in backward, tiled M=3, checkpoint layer 0 offloaded", "tiny_gemma2.json", 32,
     [](TrainingSetup& s, std::int64_t) {
         s.precision = Precision::Bf16Master, s.optimizer_in_backward = true, s.mlp_chunks = 3, s.mlp_impl = MlpImpl::Tiled;
         s.checkpoint = {true, false}, s.offload_checkpoints = true;
     }},
    {"default", "small-llama", 12, [](TrainingSetup&, std::int64_t) {}},
    {"eager, bf16 master, tiled M=2, fused M=2", "small-llama", 12, [](TrainingSetup& s, std::int64_t) {
         s.attention = Attention::Eager, s.precision = Precision::Bf16Master;
         s.mlp_chunks = 2, s.mlp_impl = MlpImpl::Tiled, s.lm_chunks = 2, s.lm_impl = LmHeadImpl::FusedForward;
     }},
    {"checkpoint spread:2, loop M=4, recompute M=4", "small-llama", 12, [](TrainingSetup& s, std::int64_t L) {
         s.checkpoint = parse_checkpoint_spec("spread:2", L, "test"), s.mlp_chunks = 4, s.lm_chunks = 4;
     }},
    {"AMP, checkpoint all offloaded, tiled M=3, fused M=3", "small-llama", 12, [](TrainingSetup& s, std::int64_t L) {
         s.precision = Precision::AmpFp32, s.checkpoint.assign(static_cast<std::size_t>(L), true), s.offload_checkpoints = true;
         s.mlp_chunks = 3, s.mlp_impl = MlpImpl::Tiled, s.lm_chunks = 3, s.lm_impl = LmHeadImpl::FusedForward;
     }},
    {"bf16 master, optimizer in backward, loop M=2", "small-llama", 12, [](TrainingSetup& s, std::int64_t) {
         s.precision = Precision::Bf16Master, s.optimizer_in_backward = true, s.mlp_chunks = 2;
     }},
    {"grad_accum 2, checkpoint all, fused M=8", "small-llama", 12, [](TrainingSetup& s, std::int64_t L) {
         s.grad_accum = 2, s.checkpoint.assign(static_cast<std::size_t>(L), true);
         s.lm_chunks = 8, s.lm_impl = LmHeadImpl::FusedForward;
     }},
    {"SGD, AMP, micro-batch 2, checkpoint first:1", "small-llama", 6, [](TrainingSetup& s, std::int64_t L) {
         s.optimizer = Optimizer::SgdMomentum, s.precision = Precision::AmpFp32, s.micro_batch = 2;
         s.checkpoint = parse_checkpoint_spec("first:1", L, "test");
     }},
};

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
    const std::string qwen = expect_user_error([] { execute_cpu(find_model("qwen2-7b"), tiny_setup(16), 1); });
    CHECK(qwen.find("attention_bias") != std::string::npos);
    CHECK(qwen.find('\n') == std::string::npos);
}

TEST_CASE("CPU executor: the same seed gives the same step; timings cover the ops") {
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
