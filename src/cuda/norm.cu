// RMSNorm, Llama (g = w) and Gemma (g = 1 + w), the device twin of src/exec/cpu/norm.cpp:
//   y = x * rstd * g,  rstd = (mean(x^2) + eps)^(-1/2)
//   dx = rstd * (g*dy - xhat * mean(g*dy*xhat)),  xhat = x * rstd,  dw += sum_rows dy * xhat
// Forward and dx: one warp per row (8 rows per 256-thread block), lanes stride the columns
// (coalesced), warp-shuffle reductions, the row re-read from L2 for the second pass.
// dw: a column-stripe kernel, one block per 32 columns, 16 warps splitting the rows, fp32
// partial sums reduced in shared memory and added to dw's storage once: no workspace, no
// atomics, deterministic. It runs before the dx kernel, so dx may overwrite dy.
#include "common.cuh"

namespace mst::cuda {

using detail::ld;
using detail::st;

namespace {

constexpr int kRowsPerBlock = 8;  // warps per block, one row each

__device__ __forceinline__ float gain(ConstTensor w, std::int64_t c, NormKind kind) {
    const float g = ld(w, c);
    return kind == NormKind::Gemma ? g + 1.0f : g;
}

// y[n,d], rstd[n] (nullable) from x[n,d], w[d]
__global__ void rmsnorm_forward_kernel(Tensor y, float* rstd, ConstTensor x, ConstTensor w, std::int64_t n,
                                       std::int64_t d, float eps, NormKind kind) {
    const std::int64_t r = std::int64_t(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (r >= n) return;
    float ss = 0.0f;
    for (std::int64_t c = lane; c < d; c += 32) {
        const float v = ld(x, r * d + c);
        ss += v * v;
    }
    ss = detail::warp_sum(ss);
    const float rs = rsqrtf(ss / static_cast<float>(d) + eps);
    if (rstd && lane == 0) rstd[r] = rs;
    for (std::int64_t c = lane; c < d; c += 32) st(y, r * d + c, ld(x, r * d + c) * rs * gain(w, c, kind));
}

// dx[n,d] from dy[n,d], x[n,d], w[d], rstd[n]; dx may alias dy (each lane reads its
// element of dy before writing that same element)
__global__ void rmsnorm_backward_dx_kernel(Tensor dx, ConstTensor dy, ConstTensor x, ConstTensor w,
                                           const float* rstd, std::int64_t n, std::int64_t d, NormKind kind) {
    const std::int64_t r = std::int64_t(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (r >= n) return;
    const float rs = rstd[r];
    float dot = 0.0f;  // sum_c g*dy*xhat
    for (std::int64_t c = lane; c < d; c += 32) dot += gain(w, c, kind) * ld(dy, r * d + c) * ld(x, r * d + c) * rs;
    const float mean = detail::warp_sum(dot) / static_cast<float>(d);
    for (std::int64_t c = lane; c < d; c += 32) {
        const float xhat = ld(x, r * d + c) * rs;
        st(dx, r * d + c, rs * (gain(w, c, kind) * ld(dy, r * d + c) - xhat * mean));
    }
}

constexpr int kStripe = 32;      // columns per dw block (one warp-wide row segment)
constexpr int kStripeRows = 16;  // warps per dw block, splitting the rows

// dw[d] += sum over rows of dy[r,c] * x[r,c] * rstd[r]; block (32 x 16), grid ceil(d/32)
__global__ void rmsnorm_backward_dw_kernel(Tensor dw, ConstTensor dy, ConstTensor x, const float* rstd,
                                           std::int64_t n, std::int64_t d) {
    __shared__ float partial[kStripeRows][kStripe + 1];
    const std::int64_t c = std::int64_t(blockIdx.x) * kStripe + threadIdx.x;
    float acc = 0.0f;
    if (c < d)
        for (std::int64_t r = threadIdx.y; r < n; r += kStripeRows) acc += ld(dy, r * d + c) * ld(x, r * d + c) * rstd[r];
    partial[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < d) {
        float s = 0.0f;
        for (int j = 0; j < kStripeRows; ++j) s += partial[j][threadIdx.x];
        st(dw, c, ld(dw, c) + s);
    }
}

void check_norm(const char* kernel, std::int64_t n, std::int64_t d) {
    detail::require(d > 0 && n >= 0, kernel, "need d > 0 and n >= 0");
    detail::require((n + kRowsPerBlock - 1) / kRowsPerBlock < (std::int64_t{1} << 31), kernel, "too many rows");
}

}  // namespace

void rmsnorm_forward(Tensor y, float* rstd, ConstTensor x, ConstTensor w, std::int64_t n, std::int64_t d, float eps,
                     NormKind kind, cudaStream_t stream) {
    check_norm("rmsnorm_forward", n, d);
    if (n == 0) return;
    const auto blocks = static_cast<unsigned>((n + kRowsPerBlock - 1) / kRowsPerBlock);
    rmsnorm_forward_kernel<<<blocks, 32 * kRowsPerBlock, 0, stream>>>(y, rstd, x, w, n, d, eps, kind);
    detail::check_launch("rmsnorm_forward");
}

void rmsnorm_backward(Tensor dx, Tensor dw, ConstTensor dy, ConstTensor x, ConstTensor w, const float* rstd,
                      std::int64_t n, std::int64_t d, NormKind kind, cudaStream_t stream) {
    check_norm("rmsnorm_backward", n, d);
    detail::require(rstd != nullptr, "rmsnorm_backward", "rstd (saved by the forward) is required");
    if (n == 0) return;
    if (dw) {
        const auto stripes = static_cast<unsigned>((d + kStripe - 1) / kStripe);
        rmsnorm_backward_dw_kernel<<<stripes, dim3(kStripe, kStripeRows), 0, stream>>>(dw, dy, x, rstd, n, d);
        detail::check_launch("rmsnorm_backward (dw)");
    }
    const auto blocks = static_cast<unsigned>((n + kRowsPerBlock - 1) / kRowsPerBlock);
    rmsnorm_backward_dx_kernel<<<blocks, 32 * kRowsPerBlock, 0, stream>>>(dx, dy, x, w, rstd, n, d, kind);
    detail::check_launch("rmsnorm_backward (dx)");
}

}  // namespace mst::cuda
