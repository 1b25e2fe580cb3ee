#pragma once
// `mst-plan bench kernels`: times the two blocks that MsT chunks, the MLP and the LM head with
// its loss, on the local GPU through the CUDA backend's kernels (cuBLASLt GEMMs, SwiGLU, fused
// cross-entropy), unchunked (M = 1) and split into M mini-sequences, forward and backward.
// The claim it checks: chunking costs almost no throughput (chunked/unchunked >= 0.95 at
// S >= 16k). Implemented in src/cuda/kernel_bench.cu; a build without CUDA, or a machine
// without a usable device, reports a UserError (exit code 2).
#include <cstdint>
#include <string>
#include <vector>

namespace mst {

struct KernelBenchRequest {
    std::string model = "llama-3-8b";  // where the shapes came from (reported)
    std::int64_t hidden = 4096, intermediate = 14336, vocab = 128256;
    std::vector<std::int64_t> seqs{4096, 16384, 65536};
    std::vector<std::int64_t> chunks{1, 2, 4, 8, 16, 32};  // M; 1 = unchunked, always measured
    int warmup = 1;                     // untimed runs per case
    int reps = 5;                       // timed runs per case; the median is reported
    std::string gpu = "h100-sxm-80gb";  // the profile whose peak is the reference
    double peak_tflops = 989.4;         // its bf16 dense peak
};

struct KernelBenchRow {
    std::string block;  // "mlp" or "lm_head"
    std::string pass;   // "forward" or "backward"
    std::int64_t seq = 0, chunks = 1;
    double flops = 0;                // matrix FLOPs of the pass (2 m n k per GEMM)
    double ms = 0;                   // median over reps, CUDA events around the M chunks
    double ms_min = 0, ms_max = 0;   // spread of the reps
    double tflops = 0;               // flops / ms
    double peak_fraction = 0;        // tflops / peak_tflops
    double ratio_vs_unchunked = 0;   // tflops / tflops at M = 1 (same block, pass and seq)
};

struct KernelBenchResult {
    std::string device;  // the GPU's name as CUDA reports it
    KernelBenchRequest request;
    std::vector<KernelBenchRow> rows;
    std::vector<std::string> notes;  // skipped cases and why
};

KernelBenchResult run_kernel_bench(const KernelBenchRequest& request);

}  // namespace mst
