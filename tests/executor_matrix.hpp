#pragma once
// The executor's setup matrix: knobs varied one or a few at a time over four small models, run by
// the CPU executor against the simulator (tests/test_executor_memory.cpp) and by the CUDA
// executor against both (tests/cuda/test_cuda_executor.cpp).
#include <cstdint>

#include "mst/setup.hpp"

namespace mst::test {

struct MatrixCase {
    const char* name;
    const char* model;
    std::int64_t seq;
    void (*knobs)(TrainingSetup&, std::int64_t layers);
};

// Knobs varied one or a few at a time: MsT chunk counts (even and uneven splits) and
// implementations, checkpointing none / all / some, offload, precision policies,
// optimizers and their state dtype, micro-batch, gradient accumulation, optimizer in backward.
inline const MatrixCase kMatrix[] = {
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
    {"Qwen3: q/k head norms, tied (M = 1)", "tiny_qwen3.json", 32, [](TrainingSetup&, std::int64_t) {}},
    {"Qwen3: eager, checkpoint all, loop M=2", "tiny_qwen3.json", 32, [](TrainingSetup& s, std::int64_t L) {
         s.attention = Attention::Eager, s.checkpoint.assign(static_cast<std::size_t>(L), true), s.mlp_chunks = 2;
     }},
    {"Qwen3: AMP, grad_accum 2, fused M=2, checkpoint layer 1 offloaded", "tiny_qwen3.json", 32, [](TrainingSetup& s, std::int64_t) {
         s.precision = Precision::AmpFp32, s.grad_accum = 2, s.lm_chunks = 2, s.lm_impl = LmHeadImpl::FusedForward;
         s.checkpoint = {false, true}, s.offload_checkpoints = true;
     }},
    {"Qwen3: bf16 master, optimizer in backward, tiled M=3", "tiny_qwen3.json", 32, [](TrainingSetup& s, std::int64_t) {
         s.precision = Precision::Bf16Master, s.optimizer_in_backward = true, s.mlp_chunks = 3, s.mlp_impl = MlpImpl::Tiled;
     }},
    {"Gemma-3: q/k head norms after the projections, 2 local : 1 global layers, tied (M = 1)", "tiny_gemma3.json", 32,
     [](TrainingSetup&, std::int64_t) {}},
    {"Gemma-3: eager (two masks), checkpoint all, loop M=2", "tiny_gemma3.json", 32, [](TrainingSetup& s, std::int64_t L) {
         s.attention = Attention::Eager, s.checkpoint.assign(static_cast<std::size_t>(L), true), s.mlp_chunks = 2;
     }},
    {"Gemma-3: AMP, grad_accum 2, fused M=2, checkpoint the global layer offloaded", "tiny_gemma3.json", 32,
     [](TrainingSetup& s, std::int64_t) {
         s.precision = Precision::AmpFp32, s.grad_accum = 2, s.lm_chunks = 2, s.lm_impl = LmHeadImpl::FusedForward;
         s.checkpoint = {false, false, true}, s.offload_checkpoints = true;
     }},
    {"Gemma-3: bf16 master, optimizer in backward, tiled M=3", "tiny_gemma3.json", 32, [](TrainingSetup& s, std::int64_t) {
         s.precision = Precision::Bf16Master, s.optimizer_in_backward = true, s.mlp_chunks = 3, s.mlp_impl = MlpImpl::Tiled;
     }},
    {"Phi-3: 3/4 of each head rotated, GQA, tied (M = 1)", "tiny_phi3.json", 32, [](TrainingSetup&, std::int64_t) {}},
    {"Phi-3: eager, checkpoint all, loop M=2, sliding window in every layer", "tiny_phi3_sliding.json", 32,
     [](TrainingSetup& s, std::int64_t L) {
         s.attention = Attention::Eager, s.checkpoint.assign(static_cast<std::size_t>(L), true), s.mlp_chunks = 2;
     }},
    {"Phi-3: AMP, grad_accum 2, fused M=2, checkpoint layer 1 offloaded", "tiny_phi3.json", 32, [](TrainingSetup& s, std::int64_t) {
         s.precision = Precision::AmpFp32, s.grad_accum = 2, s.lm_chunks = 2, s.lm_impl = LmHeadImpl::FusedForward;
         s.checkpoint = {false, true}, s.offload_checkpoints = true;
     }},
    {"Mixtral: top-2 of 4 experts, renormalised (M = 1)", "tiny_mixtral.json", 32, [](TrainingSetup&, std::int64_t) {}},
    {"Mixtral: loop M=3, checkpoint all", "tiny_mixtral.json", 32, [](TrainingSetup& s, std::int64_t L) {
         s.mlp_chunks = 3, s.checkpoint.assign(static_cast<std::size_t>(L), true);
     }},
    {"Mixtral: AMP, tiled M=4, optimizer in backward, fused M=2", "tiny_mixtral.json", 32, [](TrainingSetup& s, std::int64_t) {
         s.precision = Precision::AmpFp32, s.mlp_chunks = 4, s.mlp_impl = MlpImpl::Tiled, s.optimizer_in_backward = true;
         s.lm_chunks = 2, s.lm_impl = LmHeadImpl::FusedForward;
     }},
    {"Qwen3-MoE: top-3 of 8, eager, bf16 master, loop M=2", "tiny_qwen3_moe.json", 32, [](TrainingSetup& s, std::int64_t) {
         s.attention = Attention::Eager, s.precision = Precision::Bf16Master, s.mlp_chunks = 2;
     }},
    {"Qwen3-MoE: grad_accum 2, tiled M=3, checkpoint layer 1 offloaded, recompute M=2", "tiny_qwen3_moe.json", 32,
     [](TrainingSetup& s, std::int64_t) {
         s.grad_accum = 2, s.mlp_chunks = 3, s.mlp_impl = MlpImpl::Tiled, s.lm_chunks = 2;
         s.checkpoint = {false, true}, s.offload_checkpoints = true;
     }},
    {"Qwen3-MoE top-1: one-token chunks (loop M=32), micro-batch 2", "tiny_qwen3_moe_top1.json", 16, [](TrainingSetup& s, std::int64_t) {
         s.micro_batch = 2, s.mlp_chunks = 32;
     }},
    {"gpt-oss: sinks, biased router and experts, clamped SwiGLU, local + global layers (M = 1)", "tiny_gpt_oss.json", 32,
     [](TrainingSetup&, std::int64_t) {}},
    {"gpt-oss: loop M=3, checkpoint all, AMP", "tiny_gpt_oss.json", 32, [](TrainingSetup& s, std::int64_t L) {
         s.mlp_chunks = 3, s.checkpoint.assign(static_cast<std::size_t>(L), true), s.precision = Precision::AmpFp32;
     }},
    {"gpt-oss: tiled M=4, optimizer in backward, fused M=2, bf16 master", "tiny_gpt_oss.json", 32,
     [](TrainingSetup& s, std::int64_t) {
         s.mlp_chunks = 4, s.mlp_impl = MlpImpl::Tiled, s.optimizer_in_backward = true, s.precision = Precision::Bf16Master;
         s.lm_chunks = 2, s.lm_impl = LmHeadImpl::FusedForward;
     }},
    {"gpt-oss: grad_accum 2, micro-batch 2, checkpoint layer 1 offloaded, SGD", "tiny_gpt_oss.json", 16,
     [](TrainingSetup& s, std::int64_t) {
         s.grad_accum = 2, s.micro_batch = 2, s.checkpoint = {false, true}, s.offload_checkpoints = true;
         s.optimizer = Optimizer::SgdMomentum;
     }},
    {"Qwen2: q/k/v biases, sliding window above layer 1, tied (M = 1)", "tiny_qwen2.json", 32, [](TrainingSetup&, std::int64_t) {}},
    {"Qwen2: eager, AMP, loop M=2, checkpoint all", "tiny_qwen2.json", 32, [](TrainingSetup& s, std::int64_t L) {
         s.attention = Attention::Eager, s.precision = Precision::AmpFp32, s.mlp_chunks = 2;
         s.checkpoint.assign(static_cast<std::size_t>(L), true);
     }},
    {"Llama with attention and MLP biases: tiled M=3, optimizer in backward", "tiny_llama_bias.json", 32,
     [](TrainingSetup& s, std::int64_t) { s.mlp_chunks = 3, s.mlp_impl = MlpImpl::Tiled, s.optimizer_in_backward = true; }},
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

}  // namespace mst::test
