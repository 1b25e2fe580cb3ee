// RMSNorm (Zhang & Sennrich 2019) as Hugging Face Llama and Gemma compute it: in fp32,
// y = x * rstd * g with g = w (Llama) or 1 + w (Gemma), rstd = (mean(x^2) + eps)^(-1/2).
// HF rounds xhat to the input dtype before the Llama weight multiply; here the product is
// formed in fp32 and rounded once, the same value to within one bf16 rounding.
//
// Backward, with xhat = x*rstd and gy = g*dy:
//   dx = rstd * (gy - xhat * mean(gy * xhat)),   dw += sum_rows dy * xhat.
// Scratch: float[kBlock] blocks on the stack; dw is accumulated in fp32 per column block over
// all rows before it is added to its storage once.
#include "kernels.hpp"

#include <algorithm>
#include <cmath>

namespace mst::exec::cpu {
namespace {

// g[0..nb) = w (Llama) or 1 + w (Gemma) at columns c0..c0+nb
void load_gain(ConstTensor w, std::int64_t c0, std::int64_t nb, NormKind kind, float* g) {
    load_block(w, c0, nb, g);
    if (kind == NormKind::Gemma)
        for (std::int64_t j = 0; j < nb; ++j) g[j] += 1.0f;
}

}  // namespace

// y[n,d], rstd[n] (fp32, nullable) from x[n,d], w[d]
void rmsnorm_forward(Tensor y, float* rstd, ConstTensor x, ConstTensor w, std::int64_t n, std::int64_t d, float eps,
                     NormKind kind) {
    detail::require(d > 0 && n >= 0, "rmsnorm_forward", "need d > 0 and n >= 0");
    float xb[kBlock], g[kBlock];
    for (std::int64_t r = 0; r < n; ++r) {
        float ss = 0.0f;
        for (std::int64_t c0 = 0; c0 < d; c0 += kBlock) {
            const std::int64_t nb = std::min(kBlock, d - c0);
            load_block(x, r * d + c0, nb, xb);
            for (std::int64_t j = 0; j < nb; ++j) ss += xb[j] * xb[j];
        }
        const float rs = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
        if (rstd) rstd[r] = rs;
        for (std::int64_t c0 = 0; c0 < d; c0 += kBlock) {
            const std::int64_t nb = std::min(kBlock, d - c0);
            load_block(x, r * d + c0, nb, xb);
            load_gain(w, c0, nb, kind, g);
            for (std::int64_t j = 0; j < nb; ++j) xb[j] = xb[j] * rs * g[j];
            store_block(y, r * d + c0, nb, xb);
        }
    }
}

// dx[n,d] (may alias dy), dw[d] += ..., from dy[n,d], x[n,d], w[d], rstd[n]
void rmsnorm_backward(Tensor dx, Tensor dw, ConstTensor dy, ConstTensor x, ConstTensor w, const float* rstd,
                      std::int64_t n, std::int64_t d, NormKind kind) {
    detail::require(d > 0 && n >= 0, "rmsnorm_backward", "need d > 0 and n >= 0");
    detail::require(rstd != nullptr, "rmsnorm_backward", "rstd (saved by the forward) is required");
    float a[kBlock], b[kBlock], g[kBlock];
    // dw first: dx may overwrite dy.
    if (dw) {
        for (std::int64_t c0 = 0; c0 < d; c0 += kBlock) {
            const std::int64_t nb = std::min(kBlock, d - c0);
            float acc[kBlock] = {};
            for (std::int64_t r = 0; r < n; ++r) {
                load_block(dy, r * d + c0, nb, a);
                load_block(x, r * d + c0, nb, b);
                for (std::int64_t j = 0; j < nb; ++j) acc[j] += a[j] * b[j] * rstd[r];
            }
            load_block(dw, c0, nb, a);
            for (std::int64_t j = 0; j < nb; ++j) a[j] += acc[j];
            store_block(dw, c0, nb, a);
        }
    }
    for (std::int64_t r = 0; r < n; ++r) {
        const float rs = rstd[r];
        float dot = 0.0f;  // sum_j g*dy*xhat
        for (std::int64_t c0 = 0; c0 < d; c0 += kBlock) {
            const std::int64_t nb = std::min(kBlock, d - c0);
            load_block(dy, r * d + c0, nb, a);
            load_block(x, r * d + c0, nb, b);
            load_gain(w, c0, nb, kind, g);
            for (std::int64_t j = 0; j < nb; ++j) dot += g[j] * a[j] * b[j] * rs;
        }
        const float mean = dot / static_cast<float>(d);
        for (std::int64_t c0 = 0; c0 < d; c0 += kBlock) {
            const std::int64_t nb = std::min(kBlock, d - c0);
            load_block(dy, r * d + c0, nb, a);
            load_block(x, r * d + c0, nb, b);
            load_gain(w, c0, nb, kind, g);
            for (std::int64_t j = 0; j < nb; ++j) a[j] = rs * (g[j] * a[j] - b[j] * rs * mean);
            store_block(dx, r * d + c0, nb, a);
        }
    }
}

namespace reference {

void rmsnorm_forward(Tensor y, float* rstd, ConstTensor x, ConstTensor w, std::int64_t n, std::int64_t d, float eps,
                     NormKind kind) {
    for (std::int64_t r = 0; r < n; ++r) {
        double ss = 0;
        for (std::int64_t c = 0; c < d; ++c) ss += double(load(x, r * d + c)) * load(x, r * d + c);
        const double rs = 1.0 / std::sqrt(ss / double(d) + eps);
        if (rstd) rstd[r] = static_cast<float>(rs);
        for (std::int64_t c = 0; c < d; ++c) {
            const double g = kind == NormKind::Gemma ? 1.0 + load(w, c) : double(load(w, c));
            store(y, r * d + c, static_cast<float>(load(x, r * d + c) * rs * g));
        }
    }
}

void rmsnorm_backward(Tensor dx, Tensor dw, ConstTensor dy, ConstTensor x, ConstTensor w, const float* rstd,
                      std::int64_t n, std::int64_t d, NormKind kind) {
    // Derived directly from y_j = x_j * r * g_j, r = (sum_k x_k^2 / d + eps)^(-1/2):
    // dr/dx_i = -r^3 x_i / d, so dx_i = r g_i dy_i - r^3 x_i / d * sum_j dy_j g_j x_j.
    if (dw)
        for (std::int64_t c = 0; c < d; ++c) {
            double s = load(dw, c);
            for (std::int64_t r = 0; r < n; ++r) s += double(load(dy, r * d + c)) * load(x, r * d + c) * rstd[r];
            store(dw, c, static_cast<float>(s));
        }
    for (std::int64_t r = 0; r < n; ++r) {
        const double rs = rstd[r];
        double s = 0;
        for (std::int64_t c = 0; c < d; ++c) {
            const double g = kind == NormKind::Gemma ? 1.0 + load(w, c) : double(load(w, c));
            s += double(load(dy, r * d + c)) * g * load(x, r * d + c);
        }
        for (std::int64_t c = 0; c < d; ++c) {
            const double g = kind == NormKind::Gemma ? 1.0 + load(w, c) : double(load(w, c));
            const double xi = load(x, r * d + c);
            store(dx, r * d + c, static_cast<float>(rs * g * load(dy, r * d + c) - rs * rs * rs * xi / double(d) * s));
        }
    }
}

}  // namespace reference
}  // namespace mst::exec::cpu
