// Mixture-of-Experts routing, dispatch and combine, the device twins of src/exec/cpu/moe.cpp
// (same routing order: probability descending, then the lower expert; same stable sort).
// Top-k: one thread per token, O(E k) scans of its row. The sort by expert: one block, one
// thread per expert, two in-order scans of the n*k choices (count, then hand out rows), so the
// rows each expert gets are in token order as on the CPU. Gather and combine: one thread per
// element of a row; the combine's dot products: one warp per pair.
#include "common.cuh"

namespace mst::cuda {

namespace {

__device__ __forceinline__ bool before(float pa, std::int64_t a, float pb, std::int64_t b) {
    return pa > pb || (pa == pb && a < b);
}

__global__ void moe_topk_kernel(float* w, std::int64_t* idx, const float* probs, std::int64_t n, std::int64_t E,
                                std::int64_t k, bool normalize) {
    for (std::int64_t t = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; t < n;
         t += std::int64_t(gridDim.x) * blockDim.x) {
        const float* p = probs + t * E;
        float sum = 0;
        std::int64_t last = -1;
        for (std::int64_t j = 0; j < k; ++j) {
            std::int64_t best = -1;
            for (std::int64_t e = 0; e < E; ++e) {
                if (last >= 0 && !before(p[last], last, p[e], e)) continue;
                if (best < 0 || before(p[e], e, p[best], best)) best = e;
            }
            // None left (NaN probabilities): a valid index, and a NaN weight that shows in the loss.
            idx[t * k + j] = best < 0 ? 0 : best;
            w[t * k + j] = best < 0 ? __int_as_float(0x7fc00000) : p[best];
            sum += w[t * k + j];
            last = best < 0 ? 0 : best;
        }
        if (normalize)
            for (std::int64_t j = 0; j < k; ++j) w[t * k + j] /= sum;
    }
}

// One block of E threads: counts, an exclusive scan by thread 0, then rows handed out in order.
__global__ void moe_sort_kernel(std::int64_t* pos, std::int64_t* offsets, const std::int64_t* idx, std::int64_t pairs,
                                std::int64_t E) {
    const std::int64_t e = threadIdx.x;
    if (e < E) {
        std::int64_t count = 0;
        for (std::int64_t i = 0; i < pairs; ++i) count += idx[i] == e;
        offsets[e + 1] = count;
    }
    __syncthreads();
    if (e == 0) {
        offsets[0] = 0;
        for (std::int64_t x = 1; x <= E; ++x) offsets[x] += offsets[x - 1];
    }
    __syncthreads();
    if (e < E) {
        std::int64_t row = offsets[e];
        for (std::int64_t i = 0; i < pairs; ++i)
            if (idx[i] == e) pos[i] = row++;
    }
}

__global__ void moe_route_backward_kernel(float* dprobs, const float* dw, const float* probs, const std::int64_t* idx,
                                          std::int64_t n, std::int64_t E, std::int64_t k, bool normalize) {
    for (std::int64_t t = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; t < n;
         t += std::int64_t(gridDim.x) * blockDim.x) {
        float* dp = dprobs + t * E;
        for (std::int64_t e = 0; e < E; ++e) dp[e] = 0.0f;
        const std::int64_t* ix = idx + t * k;
        const float* g = dw + t * k;
        float sum = 1, dot = 0;
        if (normalize) {
            sum = 0;
            for (std::int64_t j = 0; j < k; ++j) sum += probs[t * E + ix[j]];
            for (std::int64_t j = 0; j < k; ++j) dot += g[j] * (probs[t * E + ix[j]] / sum);
        }
        for (std::int64_t j = 0; j < k; ++j) dp[ix[j]] = normalize ? (g[j] - dot) / sum : g[j];
    }
}

__global__ void moe_gather_kernel(Tensor xs, ConstTensor x, const std::int64_t* pos, std::int64_t n, std::int64_t k,
                                  std::int64_t d) {
    const std::int64_t total = n * k * d;
    for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < total;
         i += std::int64_t(gridDim.x) * blockDim.x) {
        const std::int64_t pair = i / d, c = i % d;
        detail::st(xs, pos[pair] * d + c, detail::ld(x, (pair / k) * d + c));
    }
}

__global__ void moe_combine_kernel(Tensor y, ConstTensor ys, const float* w, const std::int64_t* pos, std::int64_t n,
                                   std::int64_t k, std::int64_t d, bool accumulate) {
    const std::int64_t total = n * d;
    for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < total;
         i += std::int64_t(gridDim.x) * blockDim.x) {
        const std::int64_t t = i / d, c = i % d;
        float acc = accumulate ? detail::ld(y, i) : 0.0f;
        for (std::int64_t j = 0; j < k; ++j) acc += (w ? w[t * k + j] : 1.0f) * detail::ld(ys, pos[t * k + j] * d + c);
        detail::st(y, i, acc);
    }
}

// One warp per pair: dys's row and the dot product for dw.
__global__ void moe_combine_backward_kernel(Tensor dys, float* dw, ConstTensor dy, ConstTensor ys, const float* w,
                                            const std::int64_t* pos, std::int64_t pairs, std::int64_t k, std::int64_t d) {
    const int lane = threadIdx.x & 31;
    const std::int64_t warps = std::int64_t(gridDim.x) * (blockDim.x >> 5);
    for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x >> 5) + (threadIdx.x >> 5); i < pairs; i += warps) {
        const std::int64_t t = i / k, row = pos[i];
        float dot = 0;
        for (std::int64_t c = lane; c < d; c += 32) {
            const float g = detail::ld(dy, t * d + c);
            dot += g * detail::ld(ys, row * d + c);
            detail::st(dys, row * d + c, w[i] * g);
        }
        dot = detail::warp_sum(dot);
        if (lane == 0) dw[i] = dot;
    }
}

void check_route(const char* kernel, std::int64_t n, std::int64_t E, std::int64_t k) {
    detail::require(n >= 0, kernel, "n must be >= 0");
    detail::require(E >= 1 && k >= 1 && k <= E, kernel, "expected 1 <= k <= E");
    detail::require(E <= kMaxExperts, kernel, "expected at most kMaxExperts experts");
}

}  // namespace

void moe_route(float* w, std::int64_t* idx, std::int64_t* pos, std::int64_t* offsets, const float* probs,
               std::int64_t n, std::int64_t E, std::int64_t k, bool normalize, cudaStream_t stream) {
    check_route("moe_route", n, E, k);
    if (n > 0) {
        moe_topk_kernel<<<detail::grid_for(n), detail::kThreads, 0, stream>>>(w, idx, probs, n, E, k, normalize);
        detail::check_launch("moe_route (top-k)");
    }
    const int threads = static_cast<int>((E + 31) / 32 * 32);
    moe_sort_kernel<<<1, threads, 0, stream>>>(pos, offsets, idx, n * k, E);
    detail::check_launch("moe_route (sort)");
}

void moe_route_backward(float* dprobs, const float* dw, const float* probs, const std::int64_t* idx, std::int64_t n,
                        std::int64_t E, std::int64_t k, bool normalize, cudaStream_t stream) {
    check_route("moe_route_backward", n, E, k);
    if (n == 0) return;
    moe_route_backward_kernel<<<detail::grid_for(n), detail::kThreads, 0, stream>>>(dprobs, dw, probs, idx, n, E, k,
                                                                                     normalize);
    detail::check_launch("moe_route_backward");
}

void moe_gather(Tensor xs, ConstTensor x, const std::int64_t* pos, std::int64_t n, std::int64_t k, std::int64_t d,
                cudaStream_t stream) {
    detail::require(n >= 0 && k >= 1 && d >= 1, "moe_gather", "expected n >= 0, k >= 1, d >= 1");
    if (n == 0) return;
    moe_gather_kernel<<<detail::grid_for(n * k * d), detail::kThreads, 0, stream>>>(xs, x, pos, n, k, d);
    detail::check_launch("moe_gather");
}

void moe_combine(Tensor y, ConstTensor ys, const float* w, const std::int64_t* pos, std::int64_t n, std::int64_t k,
                 std::int64_t d, bool accumulate, cudaStream_t stream) {
    detail::require(n >= 0 && k >= 1 && d >= 1, "moe_combine", "expected n >= 0, k >= 1, d >= 1");
    if (n == 0) return;
    moe_combine_kernel<<<detail::grid_for(n * d), detail::kThreads, 0, stream>>>(y, ys, w, pos, n, k, d, accumulate);
    detail::check_launch("moe_combine");
}

void moe_combine_backward(Tensor dys, float* dw, ConstTensor dy, ConstTensor ys, const float* w,
                          const std::int64_t* pos, std::int64_t n, std::int64_t k, std::int64_t d, cudaStream_t stream) {
    detail::require(n >= 0 && k >= 1 && d >= 1, "moe_combine_backward", "expected n >= 0, k >= 1, d >= 1");
    if (n == 0) return;
    const std::int64_t warps_per_block = detail::kThreads / 32;
    moe_combine_backward_kernel<<<detail::grid_for(n * k, static_cast<int>(warps_per_block)), detail::kThreads, 0,
                                  stream>>>(dys, dw, dy, ys, w, pos, n * k, k, d);
    detail::check_launch("moe_combine_backward");
}

}  // namespace mst::cuda
