// Attention op by op, as Hugging Face's eager path runs it: the device twins of
// src/exec/cpu/attention_ops.cpp. Every op reads and writes whole [B, nh, S, S] tensors; they
// serve the eager path at small S, so the kernels are plain but not naive:
//  * attention_scores, attention_apply, attention_apply_transposed: one batched small GEMM
//    per (b, h), one block (32 x 8 threads) per 32 x 32 output tile; the reduction runs over
//    tiles of 32 staged in shared memory (rows padded to 33 floats: the 32 lanes of a warp hit
//    32 banks), each thread accumulates 4 outputs in fp32 and the reduction index runs in
//    ascending order, as the CPU's loops. Out-of-range rows and columns stage zeros.
//  * softmax_forward, softmax_backward: one block per row, block reductions from common.cuh
//    (an online max/sum for the softmax, a block sum for rowsum(y * dy)); every thread reads its
//    own elements again after the reduction, so nothing is staged.
//  * causal_mask_fill: a grid-stride loop; the value is 0 or the storage dtype's lowest
//    finite value (HF's torch.finfo(dtype).min), chosen on the host.
// Layouts: a, b, x, out [B*S, nh*hd] (row b*S + t, column h*hd + e); p, scores [B, nh, S, S];
// mask [B, 1, S, S].
#include <limits>

#include "common.cuh"

namespace mst::cuda {

using detail::ld;
using detail::MaxSum;
using detail::online_add;
using detail::st;

namespace {

constexpr int kTile = 32;                   // output tile edge and reduction step
constexpr int kTileRows = 8;                // threadIdx.y: each thread owns kTile / kTileRows rows
constexpr int kPerThread = kTile / kTileRows;
constexpr int kMaxRowThreads = 256;         // softmax rows: threads per block at most

// element offset of row (b, t), head h, element e in a [B*S, nh*hd] tensor
__device__ __forceinline__ std::int64_t head_off(std::int64_t S, std::int64_t nh, std::int64_t hd, std::int64_t b,
                                                 std::int64_t t, std::int64_t h, std::int64_t e) {
    return ((b * S + t) * nh + h) * hd + e;
}

// scores[b,h,t,u] = a[b*S+t, h*hd ..] . b[b*S+u, h*hd ..]. Grid (u tiles, t tiles, B*nh).
// Both operands are staged along e (coalesced): At[t][e], Bt[u][e]; thread (tx, ty) owns
// keys u0 + tx and queries t0 + ty + 8i.
__global__ void __launch_bounds__(kTile * kTileRows) attention_scores_kernel(Tensor scores, ConstTensor a,
                                                                            ConstTensor bm, std::int64_t S,
                                                                            std::int64_t nh, std::int64_t hd) {
    __shared__ float At[kTile][kTile + 1], Bt[kTile][kTile + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const std::int64_t bh = blockIdx.z, b = bh / nh, h = bh % nh;
    const std::int64_t u0 = std::int64_t(blockIdx.x) * kTile, t0 = std::int64_t(blockIdx.y) * kTile;
    float acc[kPerThread] = {};
    for (std::int64_t e0 = 0; e0 < hd; e0 += kTile) {
        const std::int64_t e = e0 + tx;
        for (int r = ty; r < kTile; r += kTileRows) {
            const std::int64_t t = t0 + r, u = u0 + r;
            At[r][tx] = t < S && e < hd ? ld(a, head_off(S, nh, hd, b, t, h, e)) : 0.0f;
            Bt[r][tx] = u < S && e < hd ? ld(bm, head_off(S, nh, hd, b, u, h, e)) : 0.0f;
        }
        __syncthreads();
        const int ke = static_cast<int>(detail::min64(kTile, hd - e0));
#pragma unroll 8
        for (int k = 0; k < ke; ++k) {
            const float bv = Bt[tx][k];
#pragma unroll
            for (int i = 0; i < kPerThread; ++i) acc[i] += At[ty + i * kTileRows][k] * bv;
        }
        __syncthreads();
    }
    const std::int64_t u = u0 + tx;
    if (u >= S) return;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
        const std::int64_t t = t0 + ty + i * kTileRows;
        if (t < S) st(scores, (bh * S + t) * S + u, acc[i]);
    }
}

// out[b*S+t, h*hd + e] = sum_u p[b,h,t,u] x[b*S+u, h*hd + e]. Grid (e tiles, t tiles, B*nh).
// Pt[t][u] staged along u, Xt[u][e] along e; thread (tx, ty) owns element e0 + tx of queries
// t0 + ty + 8i.
__global__ void __launch_bounds__(kTile * kTileRows) attention_apply_kernel(Tensor out, ConstTensor p,
                                                                           ConstTensor x, std::int64_t S,
                                                                           std::int64_t nh, std::int64_t hd) {
    __shared__ float Pt[kTile][kTile + 1], Xt[kTile][kTile + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const std::int64_t bh = blockIdx.z, b = bh / nh, h = bh % nh;
    const std::int64_t e0 = std::int64_t(blockIdx.x) * kTile, t0 = std::int64_t(blockIdx.y) * kTile;
    const std::int64_t e = e0 + tx;
    float acc[kPerThread] = {};
    for (std::int64_t v0 = 0; v0 < S; v0 += kTile) {
        for (int r = ty; r < kTile; r += kTileRows) {
            const std::int64_t t = t0 + r, u = v0 + r, pu = v0 + tx;
            Pt[r][tx] = t < S && pu < S ? ld(p, (bh * S + t) * S + pu) : 0.0f;
            Xt[r][tx] = u < S && e < hd ? ld(x, head_off(S, nh, hd, b, u, h, e)) : 0.0f;
        }
        __syncthreads();
        const int ku = static_cast<int>(detail::min64(kTile, S - v0));
#pragma unroll 8
        for (int k = 0; k < ku; ++k) {
            const float xv = Xt[k][tx];
#pragma unroll
            for (int i = 0; i < kPerThread; ++i) acc[i] += Pt[ty + i * kTileRows][k] * xv;
        }
        __syncthreads();
    }
    if (e >= hd) return;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
        const std::int64_t t = t0 + ty + i * kTileRows;
        if (t < S) st(out, head_off(S, nh, hd, b, t, h, e), acc[i]);
    }
}

// out[b*S+u, h*hd + e] = sum_t p[b,h,t,u] x[b*S+t, h*hd + e]. Grid (e tiles, u tiles, B*nh).
// Pt[t][u] staged along u (read back as a broadcast: a warp shares its u), Xt[t][e] along e;
// thread (tx, ty) owns element e0 + tx of keys u0 + ty + 8i.
__global__ void __launch_bounds__(kTile * kTileRows) attention_apply_transposed_kernel(Tensor out, ConstTensor p,
                                                                                      ConstTensor x, std::int64_t S,
                                                                                      std::int64_t nh,
                                                                                      std::int64_t hd) {
    __shared__ float Pt[kTile][kTile + 1], Xt[kTile][kTile + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const std::int64_t bh = blockIdx.z, b = bh / nh, h = bh % nh;
    const std::int64_t e0 = std::int64_t(blockIdx.x) * kTile, u0 = std::int64_t(blockIdx.y) * kTile;
    const std::int64_t e = e0 + tx;
    float acc[kPerThread] = {};
    for (std::int64_t s0 = 0; s0 < S; s0 += kTile) {
        for (int r = ty; r < kTile; r += kTileRows) {
            const std::int64_t t = s0 + r, u = u0 + tx;
            Pt[r][tx] = t < S && u < S ? ld(p, (bh * S + t) * S + u) : 0.0f;
            Xt[r][tx] = t < S && e < hd ? ld(x, head_off(S, nh, hd, b, t, h, e)) : 0.0f;
        }
        __syncthreads();
        const int kt = static_cast<int>(detail::min64(kTile, S - s0));
#pragma unroll 8
        for (int k = 0; k < kt; ++k) {
            const float xv = Xt[k][tx];
#pragma unroll
            for (int i = 0; i < kPerThread; ++i) acc[i] += Pt[k][ty + i * kTileRows] * xv;
        }
        __syncthreads();
    }
    if (e >= hd) return;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
        const std::int64_t u = u0 + ty + i * kTileRows;
        if (u < S) st(out, head_off(S, nh, hd, b, u, h, e), acc[i]);
    }
}

// mask[B, 1, S, S]: 0 where query t sees key u, `lowest` elsewhere
__global__ void causal_mask_kernel(Tensor mask, std::int64_t n, std::int64_t S, std::int64_t window, float lowest) {
    for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n;
         i += std::int64_t(gridDim.x) * blockDim.x) {
        const std::int64_t u = i % S, t = (i / S) % S;
        st(mask, i, u <= t && (window == 0 || t - u < window) ? 0.0f : lowest);
    }
}

// y[r, :] = exp(x - m) / sum exp(x - m), m the row max; one block per row
__global__ void softmax_forward_kernel(float* y, ConstTensor x, std::int64_t cols) {
    __shared__ float red[64];
    const std::int64_t base = std::int64_t(blockIdx.x) * cols;
    MaxSum acc{-INFINITY, 0.0f};
    for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) acc = online_add(acc, ld(x, base + j));
    acc = detail::block_combine(acc, red);  // synchronises: all reads precede the writes (y may be x)
    const float inv = 1.0f / acc.s;
    for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) y[base + j] = expf(ld(x, base + j) - acc.m) * inv;
}

// dx[r, :] = y * (dy - rowsum(y * dy)); one block per row
__global__ void softmax_backward_kernel(Tensor dx, const float* dy, const float* y, std::int64_t cols) {
    __shared__ float red[32];
    const std::int64_t base = std::int64_t(blockIdx.x) * cols;
    float dot = 0.0f;
    for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) dot += y[base + j] * dy[base + j];
    dot = detail::block_sum(dot, red);  // synchronises: all reads of dy precede the writes of dx
    for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x)
        st(dx, base + j, y[base + j] * (dy[base + j] - dot));
}

void check_heads(const char* kernel, std::int64_t B, std::int64_t S, std::int64_t nh, std::int64_t hd) {
    detail::require(B >= 0 && S >= 0 && nh > 0, kernel, "need B, S >= 0 and nh > 0");
    detail::require(hd > 0 && hd <= kMaxHeadDim, kernel, "head_dim must be in (0, kMaxHeadDim]");
    detail::require(B * nh <= 65535 && (S + kTile - 1) / kTile <= 65535, kernel,
                    "grid: B*nh and S/32 must be <= 65535");
}

// grid of 32 x 32 output tiles over [S, cols] per (b, h): (column tiles, row tiles, B*nh)
dim3 tile_grid(std::int64_t cols, std::int64_t S, std::int64_t B, std::int64_t nh) {
    return dim3(static_cast<unsigned>((cols + kTile - 1) / kTile), static_cast<unsigned>((S + kTile - 1) / kTile),
                static_cast<unsigned>(B * nh));
}

void check_rows(const char* kernel, std::int64_t rows, std::int64_t cols) {
    detail::require(rows >= 0 && cols > 0, kernel, "need rows >= 0 and cols > 0");
    detail::require(rows < (std::int64_t{1} << 31), kernel, "one block per row: rows must be < 2^31");
}

// threads for one block per row: the row's width rounded up to whole warps, at most 256
int row_threads(std::int64_t cols) {
    return static_cast<int>(detail::min64(kMaxRowThreads, (cols + 31) / 32 * 32));
}

}  // namespace

// scores[B, nh, S, S] from a, b [B*S, nh*hd]
void attention_scores(Tensor scores, ConstTensor a, ConstTensor b, std::int64_t B, std::int64_t S, std::int64_t nh,
                      std::int64_t hd, cudaStream_t stream) {
    check_heads("attention_scores", B, S, nh, hd);
    if (B == 0 || S == 0) return;
    detail::require(scores && a && b, "attention_scores", "scores, a and b are required");
    attention_scores_kernel<<<tile_grid(S, S, B, nh), dim3(kTile, kTileRows), 0, stream>>>(scores, a, b, S, nh, hd);
    detail::check_launch("attention_scores");
}

// out[B*S, nh*hd] = p[B, nh, S, S] applied to x[B*S, nh*hd] along u
void attention_apply(Tensor out, ConstTensor p, ConstTensor x, std::int64_t B, std::int64_t S, std::int64_t nh,
                     std::int64_t hd, cudaStream_t stream) {
    check_heads("attention_apply", B, S, nh, hd);
    if (B == 0 || S == 0) return;
    detail::require(out && p && x, "attention_apply", "out, p and x are required");
    attention_apply_kernel<<<tile_grid(hd, S, B, nh), dim3(kTile, kTileRows), 0, stream>>>(out, p, x, S, nh, hd);
    detail::check_launch("attention_apply");
}

// out[B*S, nh*hd] = p[B, nh, S, S] transposed, applied to x[B*S, nh*hd] along t
void attention_apply_transposed(Tensor out, ConstTensor p, ConstTensor x, std::int64_t B, std::int64_t S,
                                std::int64_t nh, std::int64_t hd, cudaStream_t stream) {
    check_heads("attention_apply_transposed", B, S, nh, hd);
    if (B == 0 || S == 0) return;
    detail::require(out && p && x, "attention_apply_transposed", "out, p and x are required");
    attention_apply_transposed_kernel<<<tile_grid(hd, S, B, nh), dim3(kTile, kTileRows), 0, stream>>>(out, p, x, S,
                                                                                                       nh, hd);
    detail::check_launch("attention_apply_transposed");
}

// mask[B, 1, S, S]: 0 where visible, the dtype's lowest finite value elsewhere
void causal_mask_fill(Tensor mask, std::int64_t B, std::int64_t S, std::int64_t window, cudaStream_t stream) {
    detail::require(B >= 0 && S >= 0 && window >= 0, "causal_mask_fill", "need B, S, window >= 0");
    const std::int64_t n = B * S * S;
    if (n == 0) return;
    detail::require(static_cast<bool>(mask), "causal_mask_fill", "mask is required");
    // bf16's lowest finite value is -(2 - 2^-7) * 2^127; fp32's would round to -inf in bf16.
    const float lowest = mask.dtype == DType::F32 ? std::numeric_limits<float>::lowest() : -3.38953139e38f;
    causal_mask_kernel<<<detail::grid_for(n), detail::kThreads, 0, stream>>>(mask, n, S, window, lowest);
    detail::check_launch("causal_mask_fill");
}

// y[rows, cols] = softmax(x) per row, in fp32
void softmax_forward(float* y, ConstTensor x, std::int64_t rows, std::int64_t cols, cudaStream_t stream) {
    check_rows("softmax_forward", rows, cols);
    if (rows == 0) return;
    detail::require(y != nullptr && x, "softmax_forward", "y and x are required");
    softmax_forward_kernel<<<static_cast<unsigned>(rows), row_threads(cols), 0, stream>>>(y, x, cols);
    detail::check_launch("softmax_forward");
}

// dx[rows, cols] = y * (dy - rowsum(y * dy))
void softmax_backward(Tensor dx, const float* dy, const float* y, std::int64_t rows, std::int64_t cols,
                      cudaStream_t stream) {
    check_rows("softmax_backward", rows, cols);
    if (rows == 0) return;
    detail::require(dx && dy != nullptr && y != nullptr, "softmax_backward", "dx, dy and y are required");
    softmax_backward_kernel<<<static_cast<unsigned>(rows), row_threads(cols), 0, stream>>>(dx, dy, y, cols);
    detail::check_launch("softmax_backward");
}

}  // namespace mst::cuda
