#pragma once
// The largest value mst-plan accepts for every knob and config field (README: "Bounds").
// Each is checked once, where the value enters: setup validation (validate()), model and GPU
// profile parsing, the command-line options, the file readers. Within them every tensor the
// simulator sizes stays inside 63 bits for all but the largest eager-attention scores (those,
// and any sum past 2^63, are the checked helpers' user errors), and every command's work is
// bounded: no loop runs over more GPUs, chunks, layers or events than these allow.
// None excludes a real model or cluster: the largest public models have d <= 25600,
// L <= 126 and V <= 262144; the longest published training runs use a few million tokens.
#include <cstdint>

namespace mst::limits {

// ---- training setup -------------------------------------------------------------------
inline constexpr std::int64_t kSeqLen = std::int64_t{1} << 30;             // tokens per sequence
inline constexpr std::int64_t kMicroBatch = std::int64_t{1} << 16;         // sequences per micro-step
inline constexpr std::int64_t kMicroStepTokens = std::int64_t{1} << 32;    // micro_batch x seq_len
inline constexpr std::int64_t kGradAccum = std::int64_t{1} << 20;          // micro-steps per optimizer step
inline constexpr std::int64_t kGpus = std::int64_t{1} << 16;               // dp, sp, dp x sp, --gpus
// mlp_chunks, lm_chunks: 4096 chunks are 256-token mini-sequences at a million tokens.
inline constexpr std::int64_t kChunks = std::int64_t{1} << 12;
// The loop MLP keeps every chunk of every layer until backward, and the simulator and executor
// walk each (the hf runtime a few dozen tensors per chunk and pass): num_hidden_layers x
// mlp_chunks is the work of one step (Llama-3.1-405B, 126 layers, at 128 chunks fits). The
// fuzzer found 2 layers x 16384 chunks taking 44 s of a sanitised build.
inline constexpr std::int64_t kLayerChunks = std::int64_t{1} << 14;
inline constexpr std::int64_t kZero3Prefetch = 8;  // layers all-gathered ahead
// Ring attention's sp: each layer's ring walks sp blocks, and the step is walked for every rank
// (their steps differ), so a step's work grows as sp^2; PyTorch's context parallelism runs on up
// to a few dozen ranks.
inline constexpr std::int64_t kRingRanks = 32;
// DeepSpeed's ZeRO in the hf runtime: every dp rank's step is walked (each owns another partition).
inline constexpr std::int64_t kDeepSpeedRanks = 128;
// torchtitan's own step holds every micro-batch's inputs to the step's end, each walked as an allocation
inline constexpr std::int64_t kTitanMicroSteps = 4096;
inline constexpr std::int64_t kReduceBucket = std::int64_t{1} << 40;  // reduce_bucket_size, elements

// ---- model config.json --------------------------------------------------------------
inline constexpr std::int64_t kHidden = std::int64_t{1} << 20;        // hidden_size, head_dim
inline constexpr std::int64_t kIntermediate = std::int64_t{1} << 23;  // intermediate_size
inline constexpr std::int64_t kLayers = 1024;                         // num_hidden_layers
inline constexpr std::int64_t kExperts = 4096;                        // num_experts / num_local_experts, and top-k
inline constexpr std::int64_t kHeads = std::int64_t{1} << 14;         // num_attention_heads, num_key_value_heads
inline constexpr std::int64_t kVocab = std::int64_t{1} << 24;         // vocab_size
inline constexpr std::int64_t kPositions = std::int64_t{1} << 40;     // max_position_embeddings, sliding_window

// ---- tuner and commands ---------------------------------------------------------------
inline constexpr std::int64_t kTokensPerStep = std::int64_t{1} << 40;  // recommend --tokens-per-step
inline constexpr double kHostGiB = 1 << 20;                           // --host-gib (1 PiB)
inline constexpr std::int64_t kWorkspaceBytes = std::int64_t{1} << 40;  // measure --workspace-bytes
inline constexpr double kErrorPercent = 1e6;                          // report --max-*-error
inline constexpr std::int64_t kBenchReps = 1000;                      // bench kernels --reps, --warmup
inline constexpr std::int64_t kThreads = 64;  // recommend, max-seq, bench tuner --threads (each a simulator's tables)

// ---- files ------------------------------------------------------------------------------
inline constexpr std::int64_t kJsonBytes = std::int64_t{512} << 20;  // any JSON file read
inline constexpr int kJsonDepth = 64;                                // nesting of arrays and objects
inline constexpr std::int64_t kBytes = std::int64_t{1} << 50;        // a byte count recorded in a file (1 PiB)

}  // namespace mst::limits
