// Attention op by op, as Hugging Face's eager path runs it (see kernels.hpp): every op reads
// and writes whole [B, nh, S, S] tensors. The fused eager kernel in attention.cpp is the
// reference these are tested against (their composition must equal it).
// Scratch: rows of float[kMaxHeadDim] and float[kBlock] on the stack.
#include "kernels.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace mst::exec::cpu {
namespace {

void check_heads(const char* kernel, std::int64_t B, std::int64_t S, std::int64_t nh, std::int64_t hd) {
    detail::require(B >= 0 && S >= 0 && nh > 0, kernel, "need B, S >= 0 and nh > 0");
    detail::require(hd > 0 && hd <= kMaxHeadDim, kernel, "head_dim must be in (0, kMaxHeadDim]");
}

// element offset of row (b, t), head h in a [B*S, nh*hd] tensor
std::int64_t head_off(std::int64_t S, std::int64_t nh, std::int64_t hd, std::int64_t b, std::int64_t t, std::int64_t h) {
    return ((b * S + t) * nh + h) * hd;
}

}  // namespace

// scores[B, nh, S, S] from a, b [B*S, nh*hd]
void attention_scores(Tensor scores, ConstTensor a, ConstTensor b, std::int64_t B, std::int64_t S, std::int64_t nh,
                      std::int64_t hd) {
    check_heads("attention_scores", B, S, nh, hd);
    float ar[kMaxHeadDim], br[kMaxHeadDim], out[kBlock];
    for (std::int64_t bi = 0; bi < B; ++bi)
        for (std::int64_t h = 0; h < nh; ++h)
            for (std::int64_t t = 0; t < S; ++t) {
                load_block(a, head_off(S, nh, hd, bi, t, h), hd, ar);
                const std::int64_t row = ((bi * nh + h) * S + t) * S;
                for (std::int64_t u0 = 0; u0 < S; u0 += kBlock) {
                    const std::int64_t nb = std::min(kBlock, S - u0);
                    for (std::int64_t j = 0; j < nb; ++j) {
                        load_block(b, head_off(S, nh, hd, bi, u0 + j, h), hd, br);
                        float dot = 0.0f;
                        for (std::int64_t e = 0; e < hd; ++e) dot += ar[e] * br[e];
                        out[j] = dot;
                    }
                    store_block(scores, row + u0, nb, out);
                }
            }
}

// out[B*S, nh*hd] = p[B, nh, S, S] applied to x[B*S, nh*hd] along u
void attention_apply(Tensor out, ConstTensor p, ConstTensor x, std::int64_t B, std::int64_t S, std::int64_t nh,
                     std::int64_t hd) {
    check_heads("attention_apply", B, S, nh, hd);
    float pr[kBlock], xr[kMaxHeadDim], acc[kMaxHeadDim];
    for (std::int64_t bi = 0; bi < B; ++bi)
        for (std::int64_t h = 0; h < nh; ++h)
            for (std::int64_t t = 0; t < S; ++t) {
                std::fill(acc, acc + hd, 0.0f);
                const std::int64_t row = ((bi * nh + h) * S + t) * S;
                for (std::int64_t u0 = 0; u0 < S; u0 += kBlock) {
                    const std::int64_t nb = std::min(kBlock, S - u0);
                    load_block(p, row + u0, nb, pr);
                    for (std::int64_t j = 0; j < nb; ++j) {
                        if (pr[j] == 0.0f) continue;  // masked: adds exactly nothing
                        load_block(x, head_off(S, nh, hd, bi, u0 + j, h), hd, xr);
                        for (std::int64_t e = 0; e < hd; ++e) acc[e] += pr[j] * xr[e];
                    }
                }
                store_block(out, head_off(S, nh, hd, bi, t, h), hd, acc);
            }
}

// out[B*S, nh*hd] = p[B, nh, S, S] transposed, applied to x[B*S, nh*hd] along t
void attention_apply_transposed(Tensor out, ConstTensor p, ConstTensor x, std::int64_t B, std::int64_t S,
                                std::int64_t nh, std::int64_t hd) {
    check_heads("attention_apply_transposed", B, S, nh, hd);
    float xr[kMaxHeadDim], acc[kMaxHeadDim];
    for (std::int64_t bi = 0; bi < B; ++bi)
        for (std::int64_t h = 0; h < nh; ++h)
            for (std::int64_t u = 0; u < S; ++u) {
                std::fill(acc, acc + hd, 0.0f);
                for (std::int64_t t = 0; t < S; ++t) {
                    const float pv = load(p, ((bi * nh + h) * S + t) * S + u);
                    if (pv == 0.0f) continue;
                    load_block(x, head_off(S, nh, hd, bi, t, h), hd, xr);
                    for (std::int64_t e = 0; e < hd; ++e) acc[e] += pv * xr[e];
                }
                store_block(out, head_off(S, nh, hd, bi, u, h), hd, acc);
            }
}

// mask[B, 1, S, S]: 0 where visible, the dtype's lowest finite value elsewhere
void causal_mask_fill(Tensor mask, std::int64_t B, std::int64_t S, std::int64_t window) {
    detail::require(B >= 0 && S >= 0 && window >= 0, "causal_mask_fill", "need B, S, window >= 0");
    // bf16's lowest finite value is -(2 - 2^-7) * 2^127; fp32's rounds to -inf in bf16.
    const float lowest = mask.dtype == DType::F32 ? std::numeric_limits<float>::lowest() : -3.38953139e38f;
    float row[kBlock];
    for (std::int64_t bi = 0; bi < B; ++bi)
        for (std::int64_t t = 0; t < S; ++t)
            for (std::int64_t u0 = 0; u0 < S; u0 += kBlock) {
                const std::int64_t nb = std::min(kBlock, S - u0);
                for (std::int64_t j = 0; j < nb; ++j) {
                    const std::int64_t u = u0 + j;
                    row[j] = u <= t && (window == 0 || t - u < window) ? 0.0f : lowest;
                }
                store_block(mask, (bi * S + t) * S + u0, nb, row);
            }
}

// y[rows, cols] = softmax(x) per row, in fp32
void softmax_forward(float* y, ConstTensor x, std::int64_t rows, std::int64_t cols) {
    detail::require(rows >= 0 && cols > 0, "softmax_forward", "need rows >= 0 and cols > 0");
    for (std::int64_t r = 0; r < rows; ++r) {
        float* row = y + r * cols;
        load_block(x, r * cols, cols, row);
        float mx = -std::numeric_limits<float>::infinity();
        for (std::int64_t j = 0; j < cols; ++j) mx = std::max(mx, row[j]);
        float sum = 0.0f;
        for (std::int64_t j = 0; j < cols; ++j) sum += row[j] = std::exp(row[j] - mx);
        const float inv = 1.0f / sum;
        for (std::int64_t j = 0; j < cols; ++j) row[j] *= inv;
    }
}

// dx[rows, cols] = y * (dy - rowsum(y * dy))
void softmax_backward(Tensor dx, const float* dy, const float* y, std::int64_t rows, std::int64_t cols) {
    detail::require(rows >= 0 && cols > 0, "softmax_backward", "need rows >= 0 and cols > 0");
    float buf[kBlock];
    for (std::int64_t r = 0; r < rows; ++r) {
        const float* yr = y + r * cols;
        const float* gr = dy + r * cols;
        float dot = 0.0f;
        for (std::int64_t j = 0; j < cols; ++j) dot += yr[j] * gr[j];
        for (std::int64_t c0 = 0; c0 < cols; c0 += kBlock) {
            const std::int64_t nb = std::min(kBlock, cols - c0);
            for (std::int64_t j = 0; j < nb; ++j) buf[j] = yr[c0 + j] * (gr[c0 + j] - dot);
            store_block(dx, r * cols + c0, nb, buf);
        }
    }
}

}  // namespace mst::exec::cpu
