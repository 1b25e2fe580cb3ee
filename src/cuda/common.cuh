#pragma once
// Internals shared by the kernel files: element access by dtype, 16-byte vector access,
// warp and block reductions, launch sizing and error checks. Device code: .cu files only.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "kernels.cuh"

namespace mst::cuda::detail {

// ---- host-side checks -----------------------------------------------------------------------
// A broken contract is a caller bug: std::logic_error("<kernel>: <what>").
[[noreturn]] void contract_violation(const char* kernel, const char* what);
inline void require(bool ok, const char* kernel, const char* what) {
    if (!ok) contract_violation(kernel, what);
}
// A CUDA error: std::runtime_error("<what>: <cuda error name>: <string>").
[[noreturn]] void cuda_failure(const char* what, cudaError_t err);
inline void check(cudaError_t err, const char* what) {
    if (err != cudaSuccess) cuda_failure(what, err);
}
// After a launch: a bad configuration shows here, asynchronous faults at the next sync.
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

inline constexpr int kThreads = 256;  // elementwise blocks

// Blocks for a grid-stride loop over n items: enough to fill any GPU, never more than needed.
inline unsigned grid_for(std::int64_t n, int threads = kThreads) {
    const std::int64_t blocks = (n + threads - 1) / threads;
    const std::int64_t cap = 132 * 32;  // 32 blocks per SM on a 132-SM H100: ample for a grid-stride loop
    return static_cast<unsigned>(blocks < 1 ? 1 : (blocks < cap ? blocks : cap));
}

// ---- element access: the dtype branch is uniform across a launch -------------------------
__device__ __forceinline__ float ld(const void* p, DType t, std::int64_t i) {
    return t == DType::F32 ? static_cast<const float*>(p)[i] : __bfloat162float(static_cast<const bf16*>(p)[i]);
}
__device__ __forceinline__ void st(void* p, DType t, std::int64_t i, float v) {
    if (t == DType::F32)
        static_cast<float*>(p)[i] = v;
    else
        static_cast<bf16*>(p)[i] = __float2bfloat16_rn(v);  // round to nearest even, as Eigen::bfloat16
}
__device__ __forceinline__ float ld(ConstTensor t, std::int64_t i) { return ld(t.data, t.dtype, i); }
__device__ __forceinline__ float ld(Tensor t, std::int64_t i) { return ld(t.data, t.dtype, i); }
__device__ __forceinline__ void st(Tensor t, std::int64_t i, float v) { st(t.data, t.dtype, i, v); }

// ---- 16-byte vectors: 8 bf16 or 4 floats per access ------------------------------------------
template <class T>
struct Vec16;
template <>
struct Vec16<float> {
    static constexpr int N = 4;
};
template <>
struct Vec16<bf16> {
    static constexpr int N = 8;
};

// out[0..N) = p[0..N) as float; p 16-byte aligned
__device__ __forceinline__ void load16(const float* p, float* out) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
}
__device__ __forceinline__ void load16(const bf16* p, float* out) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const float2 f = __bfloat1622float2(h[j]);
        out[2 * j] = f.x;
        out[2 * j + 1] = f.y;
    }
}
__device__ __forceinline__ void store16(float* p, const float* in) {
    *reinterpret_cast<float4*>(p) = make_float4(in[0], in[1], in[2], in[3]);
}
__device__ __forceinline__ void store16(bf16* p, const float* in) {
    uint4 raw;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
    for (int j = 0; j < 4; ++j) h[j] = __floats2bfloat162_rn(in[2 * j], in[2 * j + 1]);
    *reinterpret_cast<uint4*>(p) = raw;
}

__host__ __device__ constexpr std::int64_t min64(std::int64_t a, std::int64_t b) { return a < b ? a : b; }
__host__ __device__ constexpr std::int64_t max64(std::int64_t a, std::int64_t b) { return a > b ? a : b; }

inline bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

// ---- reductions ---------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the
// result. `shared` holds 32 floats; the call synchronises the block twice.
__device__ __forceinline__ float block_sum(float v, float* shared) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // `shared` may still be read from a previous call
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < warps ? shared[lane] : 0.0f;
    return warp_sum(v);
}

// Online softmax state: running max m and the sum s of exp(x - m) (s = 0 while m = -inf).
struct MaxSum {
    float m, s;
};
__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
    const float m = fmaxf(a.m, b.m);
    if (m == -INFINITY) return {m, 0.0f};
    return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};  // expf(-inf) = 0 for an empty side
}
// The state after one more element z
__device__ __forceinline__ MaxSum online_add(MaxSum a, float z) {
    if (z > a.m) {
        a.s = a.s * expf(a.m - z) + 1.0f;  // expf(-inf) = 0 on the first element
        a.m = z;
    } else {
        a.s += expf(z - a.m);
    }
    return a;
}
__device__ __forceinline__ MaxSum warp_combine(MaxSum v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        MaxSum other{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
        v = combine(v, other);
    }
    return v;
}
// Over the block; `shared` holds 64 floats.
__device__ __forceinline__ MaxSum block_combine(MaxSum v, float* shared) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_combine(v);
    __syncthreads();
    if (lane == 0) {
        shared[warp] = v.m;
        shared[32 + warp] = v.s;
    }
    __syncthreads();
    v = lane < warps ? MaxSum{shared[lane], shared[32 + lane]} : MaxSum{-INFINITY, 0.0f};
    return warp_combine(v);
}

}  // namespace mst::cuda::detail
