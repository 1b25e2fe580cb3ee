// Causal self-attention with grouped-query heads, an optional sliding window and optional
// logit soft-capping: the device twin of the flash path of src/exec/cpu/attention.cpp
// (FlashAttention-2, Dao 2023), on CUDA cores with fp32 tiles in shared memory. Correct first:
// a straightforward tiling, not a tensor-core kernel (the CUDA backend measures memory, and
// attention's memory is its inputs, outputs and O(S) statistics whatever the kernel's speed).
//
// Score of query t and key u: x = (q_t . k_u) * scale, soft-capped x = cap * tanh(x/cap) (dx/draw
// = 1 - tanh^2), visible when u <= t and (window == 0 or t - u < window).
// Layouts: q, o, dq [B*S, nh*hd]; k, v, dk, dv [B*S, nkv*hd]; lse, delta [B, nh, S].
//
// Forward: grid (query tiles of kTq = 32, nh, B), 4 warps, each owning 8 query rows. Per key
// tile of kTk = 32 keys: lane c scores key c against each of its rows (dot over hd from shared
// memory; K rows padded to hd + 1 floats so the 32 lanes hit 32 banks), an online softmax
// updates the row's running max m and sum l, and the row's output accumulator (lane e holds
// elements e, e+32, ... in registers) adds P V, P broadcast from its lane by shuffles.
// Saves o and lse = m + log(l). A sink (gpt-oss) starts a row at m = sink, l = 1 (attention_sinks_backward
// then reads lse and delta for its gradient).
//
// Backward: delta = rowsum(dout * o) (one warp per row), dq_ws zeroed; then grid (key tiles,
// nkv, B), 4 warps. A block holds its 32 keys' K and V in shared memory and accumulates their dk
// and dv in registers (warp w owns keys 8w..8w+7, lane e their elements) over every query
// head of the GQA group and every query tile that sees them. Per query tile: P = exp(score -
// lse) and dS = P (dP - delta) dscore/draw * scale (lane = key), staged in shared memory;
// dv += P^T dout, dk += dS^T q, and dq += dS k goes to the fp32 workspace with atomic adds
// (other key tiles add to the same rows). dq is cast from the workspace at the end.
#include <algorithm>
#include <cmath>

#include "common.cuh"

namespace mst::cuda {

using detail::ld;
using detail::st;

namespace {

constexpr int kTq = 32;                    // query rows per tile
constexpr int kTk = 32;                    // keys per tile: one per lane
constexpr int kWarps = 4;                  // warps per block
constexpr int kRowsPerWarp = kTq / kWarps;  // 8 (also keys per warp in the backward)
static_assert(kTk == 32 && kTq == kWarps * kRowsPerWarp, "lane c <-> key c; warps split the rows");

__device__ __forceinline__ bool visible(const AttentionConfig& c, std::int64_t t, std::int64_t u) {
    return u <= t && (c.window == 0 || t - u < c.window);
}
__device__ __forceinline__ std::int64_t q_off(const AttentionConfig& c, std::int64_t b, std::int64_t t, std::int64_t h) {
    return ((b * c.S + t) * c.nh + h) * c.hd;
}
__device__ __forceinline__ std::int64_t kv_off(const AttentionConfig& c, std::int64_t b, std::int64_t t,
                                               std::int64_t j) {
    return ((b * c.S + t) * c.nkv + j) * c.hd;
}
__device__ __forceinline__ std::int64_t row_off(const AttentionConfig& c, std::int64_t b, std::int64_t h,
                                                std::int64_t t) {
    return (b * c.nh + h) * c.S + t;
}
// The score from a raw dot product; *dcap = d score / d (raw * scale).
__device__ __forceinline__ float transform_score(const AttentionConfig& c, float dot, float* dcap) {
    const float x = dot * c.scale;
    if (c.softcap == 0.0f) {
        *dcap = 1.0f;
        return x;
    }
    const float th = tanhf(x / c.softcap);
    *dcap = 1.0f - th * th;
    return c.softcap * th;
}

// rows [n_rows] of `src` (row i at element offset off(i), hd elements) into dst[i * stride + e]
// as float; rows n_rows..kRows are zero. All threads of the block take part.
template <class Off>
__device__ void load_tile(float* dst, int stride, ConstTensor src, int n_rows, int rows, std::int64_t hd, Off off) {
    for (int idx = threadIdx.x; idx < rows * hd; idx += blockDim.x) {
        const int i = static_cast<int>(idx / hd), e = static_cast<int>(idx - std::int64_t(i) * hd);
        dst[i * stride + e] = i < n_rows ? ld(src, off(i) + e) : 0.0f;
    }
}

// ---- forward --------------------------------------------------------------------------------
// E = ceil(hd / 32): head elements per lane. Dynamic shared memory: Qs [kTq][hd], Ks [kTk][hd+1],
// Vs [kTk][hd].
template <int E>
__global__ void __launch_bounds__(kWarps * 32) flash_forward_kernel(Tensor o, float* lse, ConstTensor q, ConstTensor k,
                                                                    ConstTensor v, AttentionConfig c) {
    extern __shared__ float smem[];
    const int hd = static_cast<int>(c.hd), ks = hd + 1;
    float* Qs = smem;
    float* Ks = Qs + kTq * hd;
    float* Vs = Ks + kTk * ks;
    const std::int64_t b = blockIdx.z, h = blockIdx.y, q0 = std::int64_t(blockIdx.x) * kTq;
    const std::int64_t j = h / (c.nh / c.nkv);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int nq = static_cast<int>(detail::min64(kTq, c.S - q0));

    load_tile(Qs, hd, q, nq, kTq, hd, [&](int i) { return q_off(c, b, q0 + i, h); });

    // A sink (gpt-oss) starts each row's online softmax as a column seen first, with a zero value row.
    const float m0 = c.sinks ? ld(c.sinks, c.sinks_dtype, h) : -INFINITY, l0 = c.sinks ? 1.0f : 0.0f;
    float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][E];
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        m[rr] = m0;
        l[rr] = l0;
#pragma unroll
        for (int jj = 0; jj < E; ++jj) acc[rr][jj] = 0.0f;
    }
    const std::int64_t k_begin = c.window == 0 ? 0 : detail::max64(0, q0 - c.window + 1);
    const std::int64_t k_end = q0 + nq;
    for (std::int64_t k0 = k_begin; k0 < k_end; k0 += kTk) {
        const int nk = static_cast<int>(detail::min64(kTk, k_end - k0));
        __syncthreads();  // the previous tile's Ks, Vs are no longer read (and Qs is loaded)
        load_tile(Ks, ks, k, nk, kTk, hd, [&](int i) { return kv_off(c, b, k0 + i, j); });
        load_tile(Vs, hd, v, nk, kTk, hd, [&](int i) { return kv_off(c, b, k0 + i, j); });
        __syncthreads();
        float p[kRowsPerWarp];
#pragma unroll
        for (int rr = 0; rr < kRowsPerWarp; ++rr) {
            const int r = warp * kRowsPerWarp + rr;
            const std::int64_t t = q0 + r, u = k0 + lane;
            float s = -INFINITY;
            if (r < nq && lane < nk && visible(c, t, u)) {
                float dot = 0.0f;
                for (int e = 0; e < hd; ++e) dot += Qs[r * hd + e] * Ks[lane * ks + e];
                float unused;
                s = transform_score(c, dot, &unused);
            }
            const float m_new = fmaxf(m[rr], detail::warp_max(s));
            if (m_new == -INFINITY) {  // nothing visible yet for this row
                p[rr] = 0.0f;
                continue;
            }
            const float alpha = expf(m[rr] - m_new);  // 0 while m was -inf
            p[rr] = s == -INFINITY ? 0.0f : expf(s - m_new);
            l[rr] = l[rr] * alpha + detail::warp_sum(p[rr]);
            m[rr] = m_new;
#pragma unroll
            for (int jj = 0; jj < E; ++jj) acc[rr][jj] *= alpha;
        }
        // acc[r][e] += sum_c P[r][c] V[c][e]
        for (int cc = 0; cc < nk; ++cc) {
            float vv[E];
#pragma unroll
            for (int jj = 0; jj < E; ++jj) {
                const int e = lane + 32 * jj;
                vv[jj] = e < hd ? Vs[cc * hd + e] : 0.0f;
            }
#pragma unroll
            for (int rr = 0; rr < kRowsPerWarp; ++rr) {
                const float pc = __shfl_sync(0xffffffffu, p[rr], cc);
#pragma unroll
                for (int jj = 0; jj < E; ++jj) acc[rr][jj] += pc * vv[jj];
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        const int r = warp * kRowsPerWarp + rr;
        if (r >= nq) continue;
        const std::int64_t t = q0 + r;
        const float inv = 1.0f / l[rr];
#pragma unroll
        for (int jj = 0; jj < E; ++jj) {
            const int e = lane + 32 * jj;
            if (e < hd) st(o, q_off(c, b, t, h) + e, acc[rr][jj] * inv);
        }
        if (lane == 0) lse[row_off(c, b, h, t)] = m[rr] + logf(l[rr]);
    }
}

// ---- backward ---------------------------------------------------------------------------------
// delta[b,h,t] = dout_t . o_t, one warp per (b, t, h) row
__global__ void flash_delta_kernel(float* delta, ConstTensor dout, ConstTensor o, AttentionConfig c) {
    const std::int64_t row = std::int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);  // (b*S + t)*nh + h
    const int lane = threadIdx.x & 31;
    if (row >= c.B * c.S * c.nh) return;
    const std::int64_t h = row % c.nh, bt = row / c.nh, t = bt % c.S, b = bt / c.S;
    float s = 0.0f;
    for (std::int64_t e = lane; e < c.hd; e += 32) s += ld(dout, row * c.hd + e) * ld(o, row * c.hd + e);
    s = detail::warp_sum(s);
    if (lane == 0) delta[row_off(c, b, h, t)] = s;
}

// dsinks[h] += -sum over (b, t) of exp(sinks[h] - lse) * delta; one block of 256 per head
__global__ void sinks_backward_kernel(Tensor dsinks, const float* lse, const float* delta, AttentionConfig c) {
    __shared__ float shared[32];
    const std::int64_t h = blockIdx.x;
    const float sink = ld(c.sinks, c.sinks_dtype, h);
    float s = 0.0f;
    for (std::int64_t i = threadIdx.x; i < c.B * c.S; i += blockDim.x) {
        const std::int64_t r = row_off(c, i / c.S, h, i % c.S);
        s += expf(sink - lse[r]) * delta[r];
    }
    s = detail::block_sum(s, shared);
    if (threadIdx.x == 0) st(dsinks, h, ld(dsinks, h) - s);
}

// Dynamic shared memory: Ks, Vs [kTk][hd+1], Qs, dOs [kTq][hd], Ps, dSs [kTq][kTk+1],
// lse_s, delta_s [kTq].
template <int E>
__global__ void __launch_bounds__(kWarps * 32)
    flash_backward_kernel(Tensor dk, Tensor dv, float* dq_ws, const float* delta, ConstTensor dout, ConstTensor q,
                          ConstTensor k, ConstTensor v, const float* lse, AttentionConfig c) {
    extern __shared__ float smem[];
    const int hd = static_cast<int>(c.hd), ks = hd + 1, ps = kTk + 1;
    float* Ks = smem;
    float* Vs = Ks + kTk * ks;
    float* Qs = Vs + kTk * ks;
    float* dOs = Qs + kTq * hd;
    float* Ps = dOs + kTq * hd;
    float* dSs = Ps + kTq * ps;
    float* lse_s = dSs + kTq * ps;
    float* delta_s = lse_s + kTq;
    const std::int64_t b = blockIdx.z, j = blockIdx.y, k0 = std::int64_t(blockIdx.x) * kTk;
    const std::int64_t rep = c.nh / c.nkv;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int nk = static_cast<int>(detail::min64(kTk, c.S - k0));

    load_tile(Ks, ks, k, nk, kTk, hd, [&](int i) { return kv_off(c, b, k0 + i, j); });
    load_tile(Vs, ks, v, nk, kTk, hd, [&](int i) { return kv_off(c, b, k0 + i, j); });

    float acc_k[kRowsPerWarp][E], acc_v[kRowsPerWarp][E];  // keys 8*warp + kk, elements lane + 32*jj
#pragma unroll
    for (int kk = 0; kk < kRowsPerWarp; ++kk)
#pragma unroll
        for (int jj = 0; jj < E; ++jj) acc_k[kk][jj] = acc_v[kk][jj] = 0.0f;

    const std::int64_t last_key = k0 + nk - 1;
    const std::int64_t q_end = c.window == 0 ? c.S : detail::min64(c.S, last_key + c.window);
    for (std::int64_t h = j * rep; h < (j + 1) * rep; ++h)
        for (std::int64_t q0 = k0; q0 < q_end; q0 += kTq) {
            const int nq = static_cast<int>(detail::min64(kTq, q_end - q0));
            __syncthreads();  // the previous tile's Qs, dOs, Ps, dSs are no longer read
            load_tile(Qs, hd, q, nq, kTq, hd, [&](int i) { return q_off(c, b, q0 + i, h); });
            load_tile(dOs, hd, dout, nq, kTq, hd, [&](int i) { return q_off(c, b, q0 + i, h); });
            if (threadIdx.x < kTq) {
                const int r = threadIdx.x;
                lse_s[r] = r < nq ? lse[row_off(c, b, h, q0 + r)] : 0.0f;
                delta_s[r] = r < nq ? delta[row_off(c, b, h, q0 + r)] : 0.0f;
            }
            __syncthreads();
            // P and dS of this warp's query rows; lane = key
#pragma unroll
            for (int rr = 0; rr < kRowsPerWarp; ++rr) {
                const int r = warp * kRowsPerWarp + rr;
                float p = 0.0f, ds = 0.0f;
                if (r < nq && lane < nk && visible(c, q0 + r, k0 + lane)) {
                    float dot = 0.0f, dp = 0.0f;
                    for (int e = 0; e < hd; ++e) {
                        dot += Qs[r * hd + e] * Ks[lane * ks + e];
                        dp += dOs[r * hd + e] * Vs[lane * ks + e];
                    }
                    float g;
                    p = expf(transform_score(c, dot, &g) - lse_s[r]);
                    ds = p * (dp - delta_s[r]) * g * c.scale;
                }
                Ps[r * ps + lane] = p;
                dSs[r * ps + lane] = ds;
            }
            __syncthreads();
            // dv[c] += sum_r P[r][c] dout[r];  dk[c] += sum_r dS[r][c] q[r]   (c = this warp's keys)
            for (int r = 0; r < nq; ++r) {
                float qv[E], dov[E];
#pragma unroll
                for (int jj = 0; jj < E; ++jj) {
                    const int e = lane + 32 * jj;
                    qv[jj] = e < hd ? Qs[r * hd + e] : 0.0f;
                    dov[jj] = e < hd ? dOs[r * hd + e] : 0.0f;
                }
#pragma unroll
                for (int kk = 0; kk < kRowsPerWarp; ++kk) {
                    const int key = warp * kRowsPerWarp + kk;
                    const float pv = Ps[r * ps + key], dsv = dSs[r * ps + key];
#pragma unroll
                    for (int jj = 0; jj < E; ++jj) {
                        acc_v[kk][jj] += pv * dov[jj];
                        acc_k[kk][jj] += dsv * qv[jj];
                    }
                }
            }
            // dq[r] += sum_c dS[r][c] k[c]   (r = this warp's rows), into the fp32 workspace
#pragma unroll
            for (int rr = 0; rr < kRowsPerWarp; ++rr) {
                const int r = warp * kRowsPerWarp + rr;
                if (r >= nq) continue;
                float dq[E];
#pragma unroll
                for (int jj = 0; jj < E; ++jj) dq[jj] = 0.0f;
                for (int key = 0; key < nk; ++key) {
                    const float dsv = dSs[r * ps + key];
#pragma unroll
                    for (int jj = 0; jj < E; ++jj) {
                        const int e = lane + 32 * jj;
                        dq[jj] += dsv * (e < hd ? Ks[key * ks + e] : 0.0f);
                    }
                }
                float* dst = dq_ws + q_off(c, b, q0 + r, h);
#pragma unroll
                for (int jj = 0; jj < E; ++jj) {
                    const int e = lane + 32 * jj;
                    if (e < hd) atomicAdd(dst + e, dq[jj]);
                }
            }
        }
#pragma unroll
    for (int kk = 0; kk < kRowsPerWarp; ++kk) {
        const int key = warp * kRowsPerWarp + kk;
        if (key >= nk) continue;
#pragma unroll
        for (int jj = 0; jj < E; ++jj) {
            const int e = lane + 32 * jj;
            if (e >= hd) continue;
            st(dk, kv_off(c, b, k0 + key, j) + e, acc_k[kk][jj]);
            st(dv, kv_off(c, b, k0 + key, j) + e, acc_v[kk][jj]);
        }
    }
}

void check_attention(const char* kernel, const AttentionConfig& c) {
    const char* why = attention_config_error(c, kMaxHeadDim);
    detail::require(why == nullptr, kernel, why);
    detail::require(c.B < 65536 && c.nh < 65536, kernel, "B and nh index grid dimensions: < 65536");
}

std::size_t forward_smem_bytes(std::int64_t hd) { return sizeof(float) * std::size_t(kTq * hd + kTk * (hd + 1) + kTk * hd); }
std::size_t backward_smem_bytes(std::int64_t hd) {
    return sizeof(float) * std::size_t(2 * kTk * (hd + 1) + 2 * kTq * hd + 2 * kTq * (kTk + 1) + 2 * kTq);
}

// Launches kernel<E> for the E that covers hd, after raising its dynamic shared memory limit
// (above 48 KiB needs the opt-in; H100 allows 227 KiB, A100 163 KiB: hd = 256 takes 98 KiB
// forward and 133 KiB backward).
template <class Kernel, class Launch>
void with_smem(Kernel kernel, std::size_t bytes, const char* name, Launch launch) {
    detail::check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
                  name);
    launch(kernel);
    detail::check_launch(name);
}

}  // namespace

float default_scale(std::int64_t hd) { return 1.0f / std::sqrt(static_cast<float>(hd)); }
std::int64_t flash_lse_floats(const AttentionConfig& c) { return c.B * c.nh * c.S; }
std::int64_t flash_dq_workspace_floats(const AttentionConfig& c) { return c.B * c.S * c.nh * c.hd; }
std::int64_t flash_delta_workspace_floats(const AttentionConfig& c) { return c.B * c.nh * c.S; }

// o[B*S, nh*hd], lse[B, nh, S] from q[B*S, nh*hd], k, v[B*S, nkv*hd]
void flash_attention_forward(Tensor o, float* lse, ConstTensor q, ConstTensor k, ConstTensor v,
                             const AttentionConfig& c, cudaStream_t stream) {
    check_attention("flash_attention_forward", c);
    detail::require(lse != nullptr, "flash_attention_forward", "lse [B, nh, S] is required");
    if (c.B == 0 || c.S == 0) return;
    const dim3 grid(static_cast<unsigned>((c.S + kTq - 1) / kTq), static_cast<unsigned>(c.nh),
                    static_cast<unsigned>(c.B));
    const std::size_t smem = forward_smem_bytes(c.hd);
    auto launch = [&](auto kernel) { kernel<<<grid, kWarps * 32, smem, stream>>>(o, lse, q, k, v, c); };
    const char* name = "flash_attention_forward";
    if (c.hd <= 32)
        with_smem(flash_forward_kernel<1>, smem, name, launch);
    else if (c.hd <= 64)
        with_smem(flash_forward_kernel<2>, smem, name, launch);
    else if (c.hd <= 128)
        with_smem(flash_forward_kernel<4>, smem, name, launch);
    else
        with_smem(flash_forward_kernel<8>, smem, name, launch);
}

// dq[B*S, nh*hd], dk, dv[B*S, nkv*hd]; workspaces dq_ws [B*S, nh*hd], delta_ws [B, nh, S] (fp32)
void flash_attention_backward(Tensor dq, Tensor dk, Tensor dv, float* dq_ws, float* delta_ws, ConstTensor dout,
                              ConstTensor q, ConstTensor k, ConstTensor v, ConstTensor o, const float* lse,
                              const AttentionConfig& c, cudaStream_t stream) {
    check_attention("flash_attention_backward", c);
    detail::require(dq_ws != nullptr && delta_ws != nullptr && lse != nullptr, "flash_attention_backward",
                    "dq_ws, delta_ws and lse are required");
    if (c.B == 0 || c.S == 0) return;
    const std::int64_t rows = c.B * c.S * c.nh;
    flash_delta_kernel<<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kWarps * 32, 0, stream>>>(delta_ws, dout,
                                                                                                          o, c);
    detail::check_launch("flash_attention_backward (delta)");
    detail::check(cudaMemsetAsync(dq_ws, 0, sizeof(float) * static_cast<std::size_t>(flash_dq_workspace_floats(c)), stream),
                  "flash_attention_backward (zero dq_ws)");
    const dim3 grid(static_cast<unsigned>((c.S + kTk - 1) / kTk), static_cast<unsigned>(c.nkv),
                    static_cast<unsigned>(c.B));
    const std::size_t smem = backward_smem_bytes(c.hd);
    auto launch = [&](auto kernel) {
        kernel<<<grid, kWarps * 32, smem, stream>>>(dk, dv, dq_ws, delta_ws, dout, q, k, v, lse, c);
    };
    const char* name = "flash_attention_backward";
    if (c.hd <= 32)
        with_smem(flash_backward_kernel<1>, smem, name, launch);
    else if (c.hd <= 64)
        with_smem(flash_backward_kernel<2>, smem, name, launch);
    else if (c.hd <= 128)
        with_smem(flash_backward_kernel<4>, smem, name, launch);
    else
        with_smem(flash_backward_kernel<8>, smem, name, launch);
    if (!(dq.dtype == DType::F32 && dq.data == dq_ws)) cast(dq, dq_ws, flash_dq_workspace_floats(c), stream);
}

// dsinks[nh] += -sum over (b, t) of exp(sinks[h] - lse) * delta
void attention_sinks_backward(Tensor dsinks, const float* lse, const float* delta, const AttentionConfig& c,
                              cudaStream_t stream) {
    check_attention("attention_sinks_backward", c);
    detail::require(c.sinks != nullptr && lse != nullptr && delta != nullptr, "attention_sinks_backward",
                    "sinks, lse and delta are required");
    if (c.B == 0 || c.S == 0) return;
    sinks_backward_kernel<<<static_cast<unsigned>(c.nh), 256, 0, stream>>>(dsinks, lse, delta, c);
    detail::check_launch("attention_sinks_backward");
}

}  // namespace mst::cuda
