// `mst-plan bench kernels`: the MsT blocks, unchunked and in M mini-sequences, timed with CUDA
// events on the local GPU through the CUDA backend's own kernels.
//
//  MLP (per chunk of n rows; x [S,d], Wg, Wu [I,d], Wd [d,I], all bf16):
//    forward   g = x Wg^T, u = x Wu^T, m = silu(g) * u, y = m Wd^T          6 n d I FLOPs
//    backward  dWd += dy^T m, dm = dy Wd, (dg, du) = swiglu'(dm) in place,
//              dx = dg Wg + du Wu, dWg += dg^T x, dWu += du^T x             12 n d I FLOPs
//  LM head + loss (W [V,d] bf16, logits [n,V] bf16):
//    forward   logits = x W^T, then the fused cross-entropy writes the loss and
//              overwrites the logits with their gradient                     2 n d V FLOPs
//    backward  dx = dlogits W, dW += dlogits^T x                           4 n d V FLOPs
// (the FLOPs count the GEMMs, 2 m n k each; the elementwise and loss kernels are in the time but
// not the count, as a training step's MFU counts them.) The backward times the chunks' backward
// from their forward's buffers; a trainer that recomputes a chunk's forward in its backward adds
// one forward to both variants alike.
//
// Chunks reuse one set of [n, I] / [n, V] buffers (allocated for the unchunked case), so memory
// is S-sized once per S; a case that does not fit the free memory is skipped with a note. Inputs
// are random (never zeros: see METHOD.md); each case is run `warmup` times untimed (the cuBLASLt
// heuristic runs there), then `reps` times between events; the median is reported.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "common.cuh"
#include "gemm.cuh"
#include "mst/error.hpp"
#include "mst/kernel_bench.hpp"
#include "mst/units.hpp"

namespace mst {

namespace {

using cuda::bf16;
using cuda::ConstTensor;
using cuda::DType;
using cuda::Tensor;

// Uniform values in [-scale, scale) from a hash of (seed, index): random, reproducible, no state.
__global__ void fill_uniform_kernel(bf16* p, std::int64_t n, std::uint32_t seed, float scale) {
    for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n;
         i += std::int64_t(gridDim.x) * blockDim.x) {
        std::uint32_t h = static_cast<std::uint32_t>(i) * 2654435761u ^ seed ^ static_cast<std::uint32_t>(i >> 32);
        h ^= h >> 16, h *= 0x7feb352du, h ^= h >> 15, h *= 0x846ca68bu, h ^= h >> 16;
        p[i] = __float2bfloat16_rn((static_cast<float>(h >> 8) * (1.0f / 16777216.0f) * 2.0f - 1.0f) * scale);
    }
}

// labels[n] uniform in [0, V)
__global__ void fill_labels_kernel(std::int64_t* labels, std::int64_t n, std::int64_t V, std::uint32_t seed) {
    for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n;
         i += std::int64_t(gridDim.x) * blockDim.x) {
        std::uint32_t h = static_cast<std::uint32_t>(i) * 2246822519u ^ seed;
        h ^= h >> 15, h *= 0x2c1b3c6du, h ^= h >> 12, h *= 0x297a2d39u, h ^= h >> 15;
        labels[i] = static_cast<std::int64_t>(h % static_cast<std::uint32_t>(V));
    }
}

void check(cudaError_t e, const std::string& what) {
    if (e != cudaSuccess) {
        cudaGetLastError();
        throw std::runtime_error("bench kernels: " + what + ": " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
    }
}

// One device buffer for the bench's lifetime of a case.
class Buffer {
public:
    explicit Buffer(std::size_t bytes) {
        if (bytes > 0) check(cudaMalloc(&p_, bytes), "cudaMalloc of " + std::to_string(bytes) + " bytes");
    }
    ~Buffer() {
        if (p_) cudaFree(p_);
    }
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;
    Buffer(Buffer&& o) noexcept : p_(o.p_) { o.p_ = nullptr; }
    Buffer& operator=(Buffer&&) = delete;
    template <class T>
    T* as() const {
        return static_cast<T*>(p_);
    }

private:
    void* p_ = nullptr;
};

Buffer random_bf16(std::int64_t n, std::uint32_t seed, float scale, cudaStream_t s) {
    Buffer b(static_cast<std::size_t>(n) * 2);
    fill_uniform_kernel<<<cuda::detail::grid_for(n), 256, 0, s>>>(b.as<bf16>(), n, seed, scale);
    check(cudaGetLastError(), "fill");
    return b;
}

bf16* rows(bf16* base, std::int64_t row, std::int64_t cols) { return base + row * cols; }

// Median, min and max of `reps` timings of `body` (after `warmup` untimed runs).
struct Timing {
    double median_ms, min_ms, max_ms;
};
template <class Body>
Timing time_it(int warmup, int reps, cudaStream_t s, Body body) {
    for (int i = 0; i < warmup; ++i) body();
    cudaEvent_t start, stop;
    check(cudaEventCreate(&start), "cudaEventCreate");
    check(cudaEventCreate(&stop), "cudaEventCreate");
    std::vector<double> ms;
    for (int i = 0; i < reps; ++i) {
        check(cudaEventRecord(start, s), "cudaEventRecord");
        body();
        check(cudaEventRecord(stop, s), "cudaEventRecord");
        check(cudaEventSynchronize(stop), "the timed kernels");
        float t = 0;
        check(cudaEventElapsedTime(&t, start, stop), "cudaEventElapsedTime");
        ms.push_back(t);
    }
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    std::sort(ms.begin(), ms.end());
    return {ms[ms.size() / 2], ms.front(), ms.back()};
}

// The rows of chunk c of M over S: the first S % M chunks get one more row (MsT's split).
std::pair<std::int64_t, std::int64_t> chunk_rows(std::int64_t S, std::int64_t M, std::int64_t c) {
    const std::int64_t base = S / M, extra = S % M;
    const std::int64_t begin = c * base + std::min(c, extra);
    return {begin, base + (c < extra ? 1 : 0)};
}

struct Shapes {
    std::int64_t d, I, V;
};

void add_rows(KernelBenchResult& out, const KernelBenchRequest& rq, const char* block, const char* pass,
              std::int64_t S, std::int64_t M, double flops, const Timing& t) {
    KernelBenchRow r;
    r.block = block;
    r.pass = pass;
    r.seq = S;
    r.chunks = M;
    r.flops = flops;
    r.ms = t.median_ms;
    r.ms_min = t.min_ms;
    r.ms_max = t.max_ms;
    r.tflops = flops / (t.median_ms * 1e-3) / 1e12;
    r.peak_fraction = rq.peak_tflops > 0 ? r.tflops / rq.peak_tflops : 0;
    r.ratio_vs_unchunked = 1.0;
    for (const KernelBenchRow& u : out.rows)
        if (u.block == r.block && u.pass == r.pass && u.seq == S && u.chunks == 1) r.ratio_vs_unchunked = r.tflops / u.tflops;
    out.rows.push_back(r);
}

void bench_mlp(KernelBenchResult& out, const KernelBenchRequest& rq, const Shapes& sh, std::int64_t S,
               cuda::GemmContext& gemm, cudaStream_t s) {
    const std::int64_t d = sh.d, I = sh.I;
    Buffer x = random_bf16(S * d, 1, 1.0f, s), dy = random_bf16(S * d, 2, 1.0f, s);
    Buffer wg = random_bf16(I * d, 3, 0.02f, s), wu = random_bf16(I * d, 4, 0.02f, s), wd = random_bf16(d * I, 5, 0.02f, s);
    Buffer y(std::size_t(S * d) * 2), dx(std::size_t(S * d) * 2);
    Buffer dwg(std::size_t(I * d) * 2), dwu(std::size_t(I * d) * 2), dwd(std::size_t(d * I) * 2);
    Buffer g = random_bf16(S * I, 6, 1.0f, s), u = random_bf16(S * I, 7, 1.0f, s), m = random_bf16(S * I, 8, 1.0f, s);
    Buffer dm(std::size_t(S * I) * 2), dg(std::size_t(S * I) * 2), du(std::size_t(S * I) * 2);
    for (std::int64_t M : rq.chunks) {
        // Both passes leave their inputs alone, so every rep does the same work on the same values.
        auto forward = [&] {
            for (std::int64_t c = 0; c < M; ++c) {
                const auto [r0, n] = chunk_rows(S, M, c);
                const ConstTensor xc(rows(x.as<bf16>(), r0, d));
                cuda::linear_forward(gemm, g.as<bf16>(), xc, wg.as<bf16>(), n, d, I, false, s);
                cuda::linear_forward(gemm, u.as<bf16>(), xc, wu.as<bf16>(), n, d, I, false, s);
                cuda::swiglu_forward(m.as<bf16>(), g.as<bf16>(), u.as<bf16>(), n * I, cuda::GatedAct::Silu, s);
                cuda::linear_forward(gemm, rows(y.as<bf16>(), r0, d), m.as<bf16>(), wd.as<bf16>(), n, I, d, false, s);
            }
        };
        auto backward = [&] {
            for (std::int64_t c = 0; c < M; ++c) {
                const auto [r0, n] = chunk_rows(S, M, c);
                const ConstTensor xc(rows(x.as<bf16>(), r0, d)), dyc(rows(dy.as<bf16>(), r0, d));
                cuda::linear_backward_weight(gemm, dwd.as<bf16>(), dyc, m.as<bf16>(), n, I, d, c > 0, s);
                cuda::linear_backward_input(gemm, dm.as<bf16>(), dyc, wd.as<bf16>(), n, I, d, false, s);
                cuda::swiglu_backward(dg.as<bf16>(), du.as<bf16>(), dm.as<bf16>(), g.as<bf16>(), u.as<bf16>(), n * I,
                                      cuda::GatedAct::Silu, s);
                const Tensor dxc(rows(dx.as<bf16>(), r0, d));
                cuda::linear_backward_input(gemm, dxc, dg.as<bf16>(), wg.as<bf16>(), n, d, I, false, s);
                cuda::linear_backward_input(gemm, dxc, du.as<bf16>(), wu.as<bf16>(), n, d, I, true, s);
                cuda::linear_backward_weight(gemm, dwg.as<bf16>(), dg.as<bf16>(), xc, n, d, I, c > 0, s);
                cuda::linear_backward_weight(gemm, dwu.as<bf16>(), du.as<bf16>(), xc, n, d, I, c > 0, s);
            }
        };
        const double f = double(S) * double(d) * double(I);
        add_rows(out, rq, "mlp", "forward", S, M, 6 * f, time_it(rq.warmup, rq.reps, s, forward));
        add_rows(out, rq, "mlp", "backward", S, M, 12 * f, time_it(rq.warmup, rq.reps, s, backward));
    }
}

void bench_lm_head(KernelBenchResult& out, const KernelBenchRequest& rq, const Shapes& sh, std::int64_t S,
                   cuda::GemmContext& gemm, cudaStream_t s) {
    const std::int64_t d = sh.d, V = sh.V;
    Buffer x = random_bf16(S * d, 11, 1.0f, s), w = random_bf16(V * d, 12, 0.02f, s);
    Buffer dx(std::size_t(S * d) * 2), dw(std::size_t(V * d) * 2), logits(std::size_t(S * V) * 2);
    Buffer labels(std::size_t(S) * 8), loss(sizeof(double));
    fill_labels_kernel<<<cuda::detail::grid_for(S), 256, 0, s>>>(labels.as<std::int64_t>(), S, V, 13);
    check(cudaGetLastError(), "labels");
    const float scale = 1.0f / static_cast<float>(S);
    for (std::int64_t M : rq.chunks) {
        auto forward = [&] {
            check(cudaMemsetAsync(loss.as<double>(), 0, sizeof(double), s), "cudaMemsetAsync");
            for (std::int64_t c = 0; c < M; ++c) {
                const auto [r0, n] = chunk_rows(S, M, c);
                cuda::linear_forward(gemm, logits.as<bf16>(), rows(x.as<bf16>(), r0, d), w.as<bf16>(), n, d, V, false, s);
                cuda::cross_entropy_fused(logits.as<bf16>(), nullptr, loss.as<double>(), labels.as<std::int64_t>() + r0, n, V,
                                          scale, 0.0f, s);
            }
        };
        auto backward = [&] {
            for (std::int64_t c = 0; c < M; ++c) {
                const auto [r0, n] = chunk_rows(S, M, c);
                cuda::linear_backward_input(gemm, rows(dx.as<bf16>(), r0, d), logits.as<bf16>(), w.as<bf16>(), n, d, V,
                                            false, s);
                cuda::linear_backward_weight(gemm, dw.as<bf16>(), logits.as<bf16>(), rows(x.as<bf16>(), r0, d), n, d, V,
                                             c > 0, s);
            }
        };
        const double f = double(S) * double(d) * double(V);
        add_rows(out, rq, "lm_head", "forward", S, M, 2 * f, time_it(rq.warmup, rq.reps, s, forward));
        add_rows(out, rq, "lm_head", "backward", S, M, 4 * f, time_it(rq.warmup, rq.reps, s, backward));
    }
}

// Device bytes a block's case needs at S (the buffers above).
std::int64_t mlp_bytes(const Shapes& sh, std::int64_t S) { return 2 * (4 * S * sh.d + 6 * sh.I * sh.d + 6 * S * sh.I); }
std::int64_t lm_head_bytes(const Shapes& sh, std::int64_t S) {
    return 2 * (2 * S * sh.d + 2 * sh.V * sh.d + S * sh.V) + 8 * S + 8;
}

}  // namespace

KernelBenchResult run_kernel_bench(const KernelBenchRequest& request) {
    KernelBenchRequest rq = request;
    if (rq.hidden <= 0 || rq.intermediate <= 0 || rq.vocab <= 0)
        fail("bench kernels", "model", "expected positive hidden_size, intermediate_size and vocab_size");
    if (rq.vocab >= (std::int64_t{1} << 32)) fail("bench kernels", "model", "expected a vocabulary below 2^32");
    if (rq.reps < 1 || rq.warmup < 0) fail("command line", "reps", "expected reps >= 1 and warmup >= 0");
    for (std::int64_t S : rq.seqs)
        if (S < 1) fail("command line", "seq", "expected positive sequence lengths, got " + std::to_string(S));
    for (std::int64_t M : rq.chunks)
        if (M < 1) fail("command line", "chunks", "expected positive mini-sequence counts, got " + std::to_string(M));
    // M = 1 first: the ratios divide by it
    rq.chunks.erase(std::remove(rq.chunks.begin(), rq.chunks.end(), std::int64_t{1}), rq.chunks.end());
    std::sort(rq.chunks.begin(), rq.chunks.end());
    rq.chunks.erase(std::unique(rq.chunks.begin(), rq.chunks.end()), rq.chunks.end());
    rq.chunks.insert(rq.chunks.begin(), 1);

    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
        cudaGetLastError();
        fail("bench kernels", "device",
             "expected a usable CUDA device, got " +
                 (e != cudaSuccess ? std::string(cudaGetErrorName(e)) + " (" + cudaGetErrorString(e) + ")"
                                   : std::string("none")));
    }
    cudaDeviceProp prop{};
    check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
    check(cudaSetDevice(0), "cudaSetDevice");

    KernelBenchResult out;
    out.device = prop.name;
    out.request = rq;
    const Shapes sh{rq.hidden, rq.intermediate, rq.vocab};
    cudaStream_t s = nullptr;
    check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
    {
        Buffer workspace(cuda::kDefaultGemmWorkspaceBytes);
        cuda::GemmContext gemm(workspace.as<void>(), cuda::kDefaultGemmWorkspaceBytes);
        for (std::int64_t S : rq.seqs) {
            for (int block = 0; block < 2; ++block) {
                const char* name = block == 0 ? "mlp" : "lm_head";
                const std::int64_t need = block == 0 ? mlp_bytes(sh, S) : lm_head_bytes(sh, S);
                std::size_t free_bytes = 0, total_bytes = 0;
                check(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
                if (need > static_cast<std::int64_t>(free_bytes) - (std::int64_t{256} << 20)) {
                    out.notes.push_back(std::string(name) + " at S = " + std::to_string(S) + " skipped: needs " +
                                        format_bytes(need) + ", " + format_bytes(static_cast<bytes_t>(free_bytes)) +
                                        " free");
                    continue;
                }
                if (block == 0)
                    bench_mlp(out, rq, sh, S, gemm, s);
                else
                    bench_lm_head(out, rq, sh, S, gemm, s);
                check(cudaStreamSynchronize(s), std::string(name) + " at S = " + std::to_string(S));
            }
        }
        check(cudaStreamSynchronize(s), "the last case");
    }
    cudaStreamDestroy(s);
    return out;
}

}  // namespace mst
