// Rotary position embedding in Hugging Face's rotate_half layout, the device twin of
// src/exec/cpu/rope.cpp: within the first rot dims of each head (rot == hd, or less for Phi-3's
// partial rotary), pairs (x_i, x_{i+rot/2}) rotate by t * inv_freq_i, inv_freq_i = theta^(-2i/rot),
//   x_i' = x_i cos - x_{i+rot/2} sin,   x_{i+rot/2}' = x_{i+rot/2} cos + x_i sin;
// dims [rot, hd) pass through (never read nor written). Like the CPU kernel, no longrope factors.
// inv_freq is computed on the host with the CPU kernel's expression (std::pow in fp32) and
// passed by value, so both backends rotate by the same fp32 angle t * inv_freq_i; cos and sin
// are the device's full-range cosf/sinf (a few ulp). The backward rotates by -angle.
// One thread per pair: B*S*heads*rot/2 threads, in place (a thread owns both elements).
#include <cmath>

#include "common.cuh"

namespace mst::cuda {

using detail::ld;
using detail::st;

namespace {

struct InvFreq {
    float v[kMaxHeadDim / 2];
};

// x[B*S, heads*hd] in place, the first rot dims of each head
__global__ void rope_kernel(Tensor x, std::int64_t rows, std::int64_t S, std::int64_t heads, std::int64_t hd,
                            std::int64_t rot, InvFreq inv_freq, float sign) {
    const std::int64_t half = rot / 2, total = rows * heads * half;
    for (std::int64_t p = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; p < total;
         p += std::int64_t(gridDim.x) * blockDim.x) {
        const std::int64_t i = p % half, rh = p / half;  // rh = row * heads + head
        const std::int64_t t = (rh / heads) % S;
        const float angle = static_cast<float>(t) * inv_freq.v[i];
        const float cs = cosf(angle), sn = sign * sinf(angle);
        const std::int64_t off = rh * hd;
        const float x1 = ld(x, off + i), x2 = ld(x, off + i + half);
        st(x, off + i, x1 * cs - x2 * sn);
        st(x, off + i + half, x2 * cs + x1 * sn);
    }
}

}  // namespace

// x[B*S, heads*hd]: the first rot dims of each head rotated in place (by -angle when inverse)
void rope_apply(Tensor x, std::int64_t B, std::int64_t S, std::int64_t heads, std::int64_t hd, std::int64_t rot,
                float theta, bool inverse, cudaStream_t stream) {
    detail::require(B >= 0 && S >= 0 && heads >= 0, "rope_apply", "sizes must be non-negative");
    detail::require(hd > 0 && hd % 2 == 0 && hd <= kMaxHeadDim, "rope_apply", "head_dim must be even and <= kMaxHeadDim");
    detail::require(rot >= 2 && rot % 2 == 0 && rot <= hd, "rope_apply", "rotary_dim must be even and in [2, head_dim]");
    const std::int64_t total = B * S * heads * (rot / 2);
    if (total == 0) return;
    InvFreq inv_freq{};
    // HF: 1.0 / (theta ** (arange(0, rot, 2).float() / rot)), all fp32 (the CPU kernel's expression)
    for (std::int64_t i = 0; i < rot / 2; ++i)
        inv_freq.v[i] = 1.0f / std::pow(theta, static_cast<float>(2 * i) / static_cast<float>(rot));
    rope_kernel<<<detail::grid_for(total), detail::kThreads, 0, stream>>>(x, B * S, S, heads, hd, rot, inv_freq,
                                                                          inverse ? -1.0f : 1.0f);
    detail::check_launch("rope_apply");
}

// q[B*S, nh*hd], k[B*S, nkv*hd] in place
void rope_forward(Tensor q, Tensor k, std::int64_t B, std::int64_t S, std::int64_t nh, std::int64_t nkv,
                  std::int64_t hd, std::int64_t rot, float theta, cudaStream_t stream) {
    rope_apply(q, B, S, nh, hd, rot, theta, false, stream);
    rope_apply(k, B, S, nkv, hd, rot, theta, false, stream);
}

// dq[B*S, nh*hd], dk[B*S, nkv*hd] in place
void rope_backward(Tensor dq, Tensor dk, std::int64_t B, std::int64_t S, std::int64_t nh, std::int64_t nkv,
                   std::int64_t hd, std::int64_t rot, float theta, cudaStream_t stream) {
    rope_apply(dq, B, S, nh, hd, rot, theta, true, stream);
    rope_apply(dk, B, S, nkv, hd, rot, theta, true, stream);
}

}  // namespace mst::cuda
