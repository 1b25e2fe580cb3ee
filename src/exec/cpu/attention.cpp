// Causal self-attention with grouped-query heads, an optional sliding window and optional
// logit soft-capping (Gemma-2), in two forms that compute the same function:
//  * flash: FlashAttention-2 (Dao 2023). Forward walks query tiles of kAttnTile rows and key
//    tiles of kAttnTile rows with an online softmax (running max m and sum l), so it never
//    holds more than a tile of scores; it saves o and lse = m + log(l). Backward walks key
//    tiles outermost (dk, dv of a tile accumulate in fp32 on the stack over every query head
//    of its GQA group), recomputes P = exp(s - lse) per tile and adds dq into an fp32
//    workspace; delta = rowsum(dout * o) replaces rowsum(P * dP).
//  * sinks (gpt-oss): a row's online softmax starts from its head's sink logit as a column seen
//    first (m = sink, l = 1, no value), so lse counts it; attention_sinks_backward reads lse and
//    delta for its gradient. The eager path has no sinks (the executor runs gpt-oss on flash).
//  * eager: Hugging Face's eager path, which materialises the fp32 softmax probabilities
//    [B, nh, S, S], their storage-dtype copy (read by the PV product) and, with soft-capping,
//    the tanh of the scores; the backward reads them back.
// Score of query t and key u: x = (q_t . k_u) * scale; with soft-capping x = cap * tanh(x/cap),
// whose derivative is 1 - tanh^2. Masked unless u <= t and (window == 0 or t - u < window).
//
// Layouts: q, o, dq [B*S, nh*hd]; k, v, dk, dv [B*S, nkv*hd]; lse, delta [B, nh, S];
// probs [B, nh, S, S]. Query head h reads kv head h / (nh / nkv).
// Stack scratch: flash forward 4 tiles float[kAttnTile][kMaxHeadDim] (64 KiB), flash backward 6
// (96 KiB), eager 2-4 rows float[kMaxHeadDim].
#include "kernels.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace mst::exec::cpu {
namespace {

using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatMap = Eigen::Map<RowMat>;
using CMatMap = Eigen::Map<const RowMat>;
using StridedMap = Eigen::Map<RowMat, 0, Eigen::OuterStride<>>;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

void check_attention(const char* kernel, const AttentionConfig& c) {
    const char* why = attention_config_error(c, kMaxHeadDim);
    detail::require(why == nullptr, kernel, why);
}

std::int64_t q_off(const AttentionConfig& c, std::int64_t b, std::int64_t t, std::int64_t h) {
    return ((b * c.S + t) * c.nh + h) * c.hd;
}
std::int64_t kv_off(const AttentionConfig& c, std::int64_t b, std::int64_t t, std::int64_t j) {
    return ((b * c.S + t) * c.nkv + j) * c.hd;
}
std::int64_t row_off(const AttentionConfig& c, std::int64_t b, std::int64_t h, std::int64_t t) {
    return (b * c.nh + h) * c.S + t;
}
bool visible(const AttentionConfig& c, std::int64_t t, std::int64_t u) {
    return u <= t && (c.window == 0 || t - u < c.window);
}
// First key query t sees.
std::int64_t first_key(const AttentionConfig& c, std::int64_t t) {
    return c.window == 0 ? 0 : std::max<std::int64_t>(0, t - c.window + 1);
}
// One past the last query that sees key u.
std::int64_t query_end(const AttentionConfig& c, std::int64_t u) {
    return c.window == 0 ? c.S : std::min(c.S, u + c.window);
}

// The score from a raw dot product; *dcap = d(score)/d(raw*scale) (1 without soft-capping).
float transform_score(const AttentionConfig& c, float dot, float* dcap) {
    const float x = dot * c.scale;
    if (c.softcap == 0.0f) {
        *dcap = 1.0f;
        return x;
    }
    const float th = std::tanh(x / c.softcap);
    *dcap = 1.0f - th * th;
    return c.softcap * th;
}

// Head h's sink logit (gpt-oss); only called when c.sinks is set.
float sink_logit(const AttentionConfig& c, std::int64_t h) { return load(ConstTensor(c.sinks, c.sinks_dtype), h); }

float dot_hd(const float* a, const float* b, std::int64_t hd) {
    float s = 0.0f;
    for (std::int64_t e = 0; e < hd; ++e) s += a[e] * b[e];
    return s;
}

}  // namespace

float default_scale(std::int64_t hd) { return 1.0f / std::sqrt(static_cast<float>(hd)); }
std::int64_t flash_lse_floats(const AttentionConfig& c) { return c.B * c.nh * c.S; }
std::int64_t flash_dq_workspace_floats(const AttentionConfig& c) { return c.B * c.S * c.nh * c.hd; }
std::int64_t flash_delta_workspace_floats(const AttentionConfig& c) { return c.B * c.nh * c.S; }
std::int64_t eager_scores_floats(const AttentionConfig& c) { return c.B * c.nh * c.S * c.S; }

// o[B*S, nh*hd], lse[B, nh, S] from q[B*S, nh*hd], k, v[B*S, nkv*hd]
void flash_attention_forward(Tensor o, float* lse, ConstTensor q, ConstTensor k, ConstTensor v,
                             const AttentionConfig& c) {
    check_attention("flash_attention_forward", c);
    detail::require(lse != nullptr, "flash_attention_forward", "lse [B, nh, S] is required");
    constexpr std::int64_t T = kAttnTile;
    const std::int64_t hd = c.hd, rep = c.nh / c.nkv;
    alignas(64) float qt[T * kMaxHeadDim], kt[T * kMaxHeadDim], vt[T * kMaxHeadDim], acc[T * kMaxHeadDim];
    alignas(64) float st[T * T];
    float m[T], l[T];
    for (std::int64_t b = 0; b < c.B; ++b)
        for (std::int64_t h = 0; h < c.nh; ++h) {
            const std::int64_t j = h / rep;
            for (std::int64_t q0 = 0; q0 < c.S; q0 += T) {
                const std::int64_t nq = std::min(T, c.S - q0);
                for (std::int64_t r = 0; r < nq; ++r) load_block(q, q_off(c, b, q0 + r, h), hd, qt + r * hd);
                // A sink starts each row's online softmax as a column seen first, with a zero value row.
                std::fill(m, m + nq, c.sinks ? sink_logit(c, h) : kNegInf);
                std::fill(l, l + nq, c.sinks ? 1.0f : 0.0f);
                std::fill(acc, acc + nq * hd, 0.0f);
                const std::int64_t k_end = q0 + nq;
                for (std::int64_t k0 = first_key(c, q0); k0 < k_end; k0 += T) {
                    const std::int64_t nk = std::min(T, k_end - k0);
                    for (std::int64_t r = 0; r < nk; ++r) {
                        load_block(k, kv_off(c, b, k0 + r, j), hd, kt + r * hd);
                        load_block(v, kv_off(c, b, k0 + r, j), hd, vt + r * hd);
                    }
                    MatMap(st, nq, nk).noalias() = CMatMap(qt, nq, hd) * CMatMap(kt, nk, hd).transpose();
                    for (std::int64_t r = 0; r < nq; ++r) {
                        float* srow = st + r * nk;
                        float row_max = kNegInf;
                        for (std::int64_t cc = 0; cc < nk; ++cc) {
                            float unused;
                            srow[cc] = visible(c, q0 + r, k0 + cc) ? transform_score(c, srow[cc], &unused) : kNegInf;
                            row_max = std::max(row_max, srow[cc]);
                        }
                        const float m_new = std::max(m[r], row_max);
                        if (m_new == kNegInf) {  // nothing visible yet for this row
                            std::fill(srow, srow + nk, 0.0f);
                            continue;
                        }
                        const float alpha = std::exp(m[r] - m_new);  // 0 when m[r] was -inf
                        float sum = 0.0f;
                        for (std::int64_t cc = 0; cc < nk; ++cc) {
                            srow[cc] = std::exp(srow[cc] - m_new);
                            sum += srow[cc];
                        }
                        l[r] = l[r] * alpha + sum;
                        m[r] = m_new;
                        for (std::int64_t e = 0; e < hd; ++e) acc[r * hd + e] *= alpha;
                    }
                    MatMap(acc, nq, hd).noalias() += CMatMap(st, nq, nk) * CMatMap(vt, nk, hd);
                }
                for (std::int64_t r = 0; r < nq; ++r) {
                    const float inv = 1.0f / l[r];
                    for (std::int64_t e = 0; e < hd; ++e) acc[r * hd + e] *= inv;
                    store_block(o, q_off(c, b, q0 + r, h), hd, acc + r * hd);
                    lse[row_off(c, b, h, q0 + r)] = m[r] + std::log(l[r]);
                }
            }
        }
}

// dq[B*S, nh*hd], dk, dv[B*S, nkv*hd]; workspaces dq_ws [B*S, nh*hd], delta_ws [B, nh, S] (fp32)
void flash_attention_backward(Tensor dq, Tensor dk, Tensor dv, float* dq_ws, float* delta_ws, ConstTensor dout,
                              ConstTensor q, ConstTensor k, ConstTensor v, ConstTensor o, const float* lse,
                              const AttentionConfig& c) {
    check_attention("flash_attention_backward", c);
    detail::require(dq_ws != nullptr && delta_ws != nullptr && lse != nullptr, "flash_attention_backward",
                    "dq_ws, delta_ws and lse are required");
    constexpr std::int64_t T = kAttnTile;
    const std::int64_t hd = c.hd, rep = c.nh / c.nkv;
    alignas(64) float qt[T * kMaxHeadDim], dot_[T * kMaxHeadDim], kt[T * kMaxHeadDim], vt[T * kMaxHeadDim];
    alignas(64) float dkt[T * kMaxHeadDim], dvt[T * kMaxHeadDim];
    alignas(64) float pt[T * T], dpt[T * T], gt[T * T];

    // delta[b,h,t] = dout_t . o_t (= sum_u P dP, FlashAttention-2 eq. for D_i)
    for (std::int64_t b = 0; b < c.B; ++b)
        for (std::int64_t t = 0; t < c.S; ++t)
            for (std::int64_t h = 0; h < c.nh; ++h) {
                load_block(dout, q_off(c, b, t, h), hd, qt);
                load_block(o, q_off(c, b, t, h), hd, kt);
                delta_ws[row_off(c, b, h, t)] = dot_hd(qt, kt, hd);
            }
    std::fill(dq_ws, dq_ws + flash_dq_workspace_floats(c), 0.0f);

    for (std::int64_t b = 0; b < c.B; ++b)
        for (std::int64_t j = 0; j < c.nkv; ++j)
            for (std::int64_t k0 = 0; k0 < c.S; k0 += T) {
                const std::int64_t nk = std::min(T, c.S - k0);
                for (std::int64_t r = 0; r < nk; ++r) {
                    load_block(k, kv_off(c, b, k0 + r, j), hd, kt + r * hd);
                    load_block(v, kv_off(c, b, k0 + r, j), hd, vt + r * hd);
                }
                std::fill(dkt, dkt + nk * hd, 0.0f);
                std::fill(dvt, dvt + nk * hd, 0.0f);
                const std::int64_t q_end = query_end(c, k0 + nk - 1);
                for (std::int64_t h = j * rep; h < (j + 1) * rep; ++h)
                    for (std::int64_t q0 = k0; q0 < q_end; q0 += T) {
                        const std::int64_t nq = std::min(T, q_end - q0);
                        for (std::int64_t r = 0; r < nq; ++r) {
                            load_block(q, q_off(c, b, q0 + r, h), hd, qt + r * hd);
                            load_block(dout, q_off(c, b, q0 + r, h), hd, dot_ + r * hd);
                        }
                        // P = exp(score - lse), G = d score / d (raw*scale)
                        MatMap(pt, nq, nk).noalias() = CMatMap(qt, nq, hd) * CMatMap(kt, nk, hd).transpose();
                        for (std::int64_t r = 0; r < nq; ++r) {
                            const float row_lse = lse[row_off(c, b, h, q0 + r)];
                            for (std::int64_t cc = 0; cc < nk; ++cc) {
                                const std::int64_t i = r * nk + cc;
                                if (visible(c, q0 + r, k0 + cc)) {
                                    pt[i] = std::exp(transform_score(c, pt[i], &gt[i]) - row_lse);
                                } else {
                                    pt[i] = 0.0f;
                                    gt[i] = 0.0f;
                                }
                            }
                        }
                        // dv += P^T dout;  dP = dout v^T
                        MatMap(dvt, nk, hd).noalias() += CMatMap(pt, nq, nk).transpose() * CMatMap(dot_, nq, hd);
                        MatMap(dpt, nq, nk).noalias() = CMatMap(dot_, nq, hd) * CMatMap(vt, nk, hd).transpose();
                        // dS = P * (dP - delta) * G * scale   (gradient w.r.t. the raw dot product)
                        for (std::int64_t r = 0; r < nq; ++r) {
                            const float delta = delta_ws[row_off(c, b, h, q0 + r)];
                            for (std::int64_t cc = 0; cc < nk; ++cc) {
                                const std::int64_t i = r * nk + cc;
                                dpt[i] = pt[i] * (dpt[i] - delta) * gt[i] * c.scale;
                            }
                        }
                        // dq += dS k (fp32 workspace rows, stride nh*hd);  dk += dS^T q
                        StridedMap(dq_ws + q_off(c, b, q0, h), nq, hd, Eigen::OuterStride<>(c.nh * hd)).noalias() +=
                            CMatMap(dpt, nq, nk) * CMatMap(kt, nk, hd);
                        MatMap(dkt, nk, hd).noalias() += CMatMap(dpt, nq, nk).transpose() * CMatMap(qt, nq, hd);
                    }
                for (std::int64_t r = 0; r < nk; ++r) {
                    store_block(dk, kv_off(c, b, k0 + r, j), hd, dkt + r * hd);
                    store_block(dv, kv_off(c, b, k0 + r, j), hd, dvt + r * hd);
                }
            }
    if (!(dq.dtype == DType::F32 && dq.data == dq_ws)) cast(dq, dq_ws, flash_dq_workspace_floats(c));
}

// out[rows, nh*hd] = in[rows, nkv*hd] with kv head j copied to heads j*rep .. j*rep + rep - 1
void repeat_kv_forward(Tensor out, ConstTensor in, std::int64_t rows, std::int64_t nh, std::int64_t nkv,
                       std::int64_t hd) {
    detail::require(nh > 0 && nkv > 0 && nh % nkv == 0, "repeat_kv_forward", "nkv must divide nh");
    detail::require(hd > 0 && hd <= kMaxHeadDim, "repeat_kv_forward", "head_dim must be in (0, kMaxHeadDim]");
    float buf[kMaxHeadDim];
    const std::int64_t rep = nh / nkv;
    for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t h = 0; h < nh; ++h) {
            load_block(in, (r * nkv + h / rep) * hd, hd, buf);
            store_block(out, (r * nh + h) * hd, hd, buf);
        }
}

// din[rows, nkv*hd] = sum over the rep copies in dout[rows, nh*hd], accumulated in fp32
void repeat_kv_backward(Tensor din, ConstTensor dout, std::int64_t rows, std::int64_t nh, std::int64_t nkv,
                        std::int64_t hd) {
    detail::require(nh > 0 && nkv > 0 && nh % nkv == 0, "repeat_kv_backward", "nkv must divide nh");
    detail::require(hd > 0 && hd <= kMaxHeadDim, "repeat_kv_backward", "head_dim must be in (0, kMaxHeadDim]");
    float buf[kMaxHeadDim], acc[kMaxHeadDim];
    const std::int64_t rep = nh / nkv;
    for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t j = 0; j < nkv; ++j) {
            std::fill(acc, acc + hd, 0.0f);
            for (std::int64_t h = j * rep; h < (j + 1) * rep; ++h) {
                load_block(dout, (r * nh + h) * hd, hd, buf);
                for (std::int64_t e = 0; e < hd; ++e) acc[e] += buf[e];
            }
            store_block(din, (r * nkv + j) * hd, hd, acc);
        }
}

// o[B*S, nh*hd]; probs32 [B, nh, S, S] fp32; probs, scores_tanh [B, nh, S, S] storage dtype
void eager_attention_forward(Tensor o, float* probs32, Tensor probs, Tensor scores_tanh, ConstTensor q,
                             ConstTensor k, ConstTensor v, const AttentionConfig& c) {
    check_attention("eager_attention_forward", c);
    detail::require(c.sinks == nullptr, "eager_attention_forward", "sinks are a flash-path feature");
    detail::require(probs32 != nullptr && probs, "eager_attention_forward", "probs32 and probs are required");
    detail::require(c.softcap == 0.0f || scores_tanh, "eager_attention_forward",
                    "scores_tanh is required with soft-capping");
    const std::int64_t hd = c.hd, rep = c.nh / c.nkv, S = c.S;
    alignas(64) float qr[kMaxHeadDim], kr[kMaxHeadDim], acc[kMaxHeadDim];
    for (std::int64_t b = 0; b < c.B; ++b)
        for (std::int64_t h = 0; h < c.nh; ++h) {
            const std::int64_t j = h / rep;
            for (std::int64_t t = 0; t < S; ++t) {
                const std::int64_t base = row_off(c, b, h, t) * S;  // row [b, h, t, :]
                float* row = probs32 + base;
                const std::int64_t lo = first_key(c, t);
                load_block(q, q_off(c, b, t, h), hd, qr);
                float mx = kNegInf;
                for (std::int64_t u = lo; u <= t; ++u) {
                    load_block(k, kv_off(c, b, u, j), hd, kr);
                    float unused;
                    row[u] = transform_score(c, dot_hd(qr, kr, hd), &unused);
                    if (c.softcap > 0.0f) store(scores_tanh, base + u, row[u] / c.softcap);
                    mx = std::max(mx, row[u]);
                }
                float sum = 0.0f;
                for (std::int64_t u = lo; u <= t; ++u) {
                    row[u] = std::exp(row[u] - mx);
                    sum += row[u];
                }
                const float inv = 1.0f / sum;
                for (std::int64_t u = 0; u < S; ++u) row[u] = (u >= lo && u <= t) ? row[u] * inv : 0.0f;
                if (c.softcap > 0.0f) {
                    for (std::int64_t u = 0; u < lo; ++u) store(scores_tanh, base + u, 0.0f);
                    for (std::int64_t u = t + 1; u < S; ++u) store(scores_tanh, base + u, 0.0f);
                }
                store_block(probs, base, S, row);
                // o_t = sum_u probs[t,u] v_u with the storage-dtype probabilities (HF's PV matmul)
                std::fill(acc, acc + hd, 0.0f);
                for (std::int64_t u = lo; u <= t; ++u) {
                    const float p = load(probs, base + u);
                    load_block(v, kv_off(c, b, u, j), hd, kr);
                    for (std::int64_t e = 0; e < hd; ++e) acc[e] += p * kr[e];
                }
                store_block(o, q_off(c, b, t, h), hd, acc);
            }
        }
}

// dq, dk, dv from dout and the saved probabilities; dscores_ws fp32 [B, nh, S, S]
void eager_attention_backward(Tensor dq, Tensor dk, Tensor dv, float* dscores_ws, ConstTensor dout, ConstTensor q,
                              ConstTensor k, ConstTensor v, const float* probs32, ConstTensor probs,
                              ConstTensor scores_tanh, const AttentionConfig& c) {
    check_attention("eager_attention_backward", c);
    detail::require(c.sinks == nullptr, "eager_attention_backward", "sinks are a flash-path feature");
    detail::require(dscores_ws != nullptr && probs32 != nullptr && probs, "eager_attention_backward",
                    "dscores_ws, probs32 and probs are required");
    detail::require(c.softcap == 0.0f || scores_tanh, "eager_attention_backward",
                    "scores_tanh is required with soft-capping");
    const std::int64_t hd = c.hd, rep = c.nh / c.nkv, S = c.S;
    alignas(64) float ar[kMaxHeadDim], br[kMaxHeadDim], acc[kMaxHeadDim], acc2[kMaxHeadDim];
    // Per query row: dP = dout v^T, softmax backward with the fp32 probabilities, then the
    // soft-cap and scale chain rule; dq = dS k.
    for (std::int64_t b = 0; b < c.B; ++b)
        for (std::int64_t h = 0; h < c.nh; ++h) {
            const std::int64_t j = h / rep;
            for (std::int64_t t = 0; t < S; ++t) {
                const std::int64_t base = row_off(c, b, h, t) * S;
                float* ds = dscores_ws + base;
                const float* p = probs32 + base;
                const std::int64_t lo = first_key(c, t);
                load_block(dout, q_off(c, b, t, h), hd, ar);
                float rowsum = 0.0f;
                for (std::int64_t u = lo; u <= t; ++u) {
                    load_block(v, kv_off(c, b, u, j), hd, br);
                    ds[u] = dot_hd(ar, br, hd);
                    rowsum += p[u] * ds[u];
                }
                std::fill(acc, acc + hd, 0.0f);
                for (std::int64_t u = 0; u < S; ++u) {
                    if (u < lo || u > t) {
                        ds[u] = 0.0f;
                        continue;
                    }
                    float g = 1.0f;
                    if (c.softcap > 0.0f) {
                        const float th = load(scores_tanh, base + u);
                        g = 1.0f - th * th;
                    }
                    ds[u] = p[u] * (ds[u] - rowsum) * g * c.scale;
                    load_block(k, kv_off(c, b, u, j), hd, br);
                    for (std::int64_t e = 0; e < hd; ++e) acc[e] += ds[u] * br[e];
                }
                store_block(dq, q_off(c, b, t, h), hd, acc);
            }
        }
    // Per key row u of kv head j: dk_u = sum_{h in group, t} dS[t,u] q_t, dv_u = sum probs[t,u] dout_t.
    for (std::int64_t b = 0; b < c.B; ++b)
        for (std::int64_t j = 0; j < c.nkv; ++j)
            for (std::int64_t u = 0; u < S; ++u) {
                std::fill(acc, acc + hd, 0.0f);
                std::fill(acc2, acc2 + hd, 0.0f);
                for (std::int64_t h = j * rep; h < (j + 1) * rep; ++h)
                    for (std::int64_t t = u; t < query_end(c, u); ++t) {
                        const std::int64_t i = row_off(c, b, h, t) * S + u;
                        const float ds = dscores_ws[i], p = load(probs, i);
                        load_block(q, q_off(c, b, t, h), hd, ar);
                        load_block(dout, q_off(c, b, t, h), hd, br);
                        for (std::int64_t e = 0; e < hd; ++e) {
                            acc[e] += ds * ar[e];
                            acc2[e] += p * br[e];
                        }
                    }
                store_block(dk, kv_off(c, b, u, j), hd, acc);
                store_block(dv, kv_off(c, b, u, j), hd, acc2);
            }
}

// dsinks[nh] += -sum over (b, t) of exp(sinks[h] - lse) * delta, both [B, nh, S]
void attention_sinks_backward(Tensor dsinks, const float* lse, const float* delta, const AttentionConfig& c) {
    check_attention("attention_sinks_backward", c);
    detail::require(c.sinks != nullptr && lse != nullptr && delta != nullptr, "attention_sinks_backward",
                    "sinks, lse and delta are required");
    for (std::int64_t h = 0; h < c.nh; ++h) {
        const float sink = sink_logit(c, h);
        float sum = 0.0f;
        for (std::int64_t b = 0; b < c.B; ++b)
            for (std::int64_t t = 0; t < c.S; ++t) {
                const std::int64_t i = row_off(c, b, h, t);
                sum += std::exp(sink - lse[i]) * delta[i];
            }
        store(dsinks, h, load(dsinks, h) - sum);
    }
}

namespace reference {

namespace {
// P[t][u] (double) of one (b, h), and G[t][u] = d score / d (raw*scale); masked entries 0.
void probabilities(const AttentionConfig& c, ConstTensor q, ConstTensor k, std::int64_t b, std::int64_t h,
                   std::vector<double>& P, std::vector<double>& G, std::vector<double>& lse) {
    const std::int64_t S = c.S, hd = c.hd, j = h / (c.nh / c.nkv);
    P.assign(static_cast<std::size_t>(S * S), 0.0);
    G.assign(static_cast<std::size_t>(S * S), 0.0);
    lse.assign(static_cast<std::size_t>(S), 0.0);
    for (std::int64_t t = 0; t < S; ++t) {
        double mx = -std::numeric_limits<double>::infinity();
        for (std::int64_t u = 0; u < S; ++u) {
            if (!visible(c, t, u)) continue;
            double dot = 0;
            for (std::int64_t e = 0; e < hd; ++e)
                dot += double(load(q, q_off(c, b, t, h) + e)) * load(k, kv_off(c, b, u, j) + e);
            double x = dot * c.scale, g = 1.0;
            if (c.softcap > 0.0f) {
                const double th = std::tanh(x / c.softcap);
                x = c.softcap * th;
                g = 1.0 - th * th;
            }
            P[t * S + u] = x;
            G[t * S + u] = g;
            mx = std::max(mx, x);
        }
        const double sink = c.sinks ? sink_logit(c, h) : -std::numeric_limits<double>::infinity();
        mx = std::max(mx, sink);
        double sum = c.sinks ? std::exp(sink - mx) : 0.0;
        for (std::int64_t u = 0; u < S; ++u)
            if (visible(c, t, u)) sum += std::exp(P[t * S + u] - mx);
        for (std::int64_t u = 0; u < S; ++u) P[t * S + u] = visible(c, t, u) ? std::exp(P[t * S + u] - mx) / sum : 0.0;
        lse[t] = mx + std::log(sum);
    }
}
}  // namespace

void attention_forward(Tensor o, float* lse, ConstTensor q, ConstTensor k, ConstTensor v, const AttentionConfig& c) {
    check_attention("reference::attention_forward", c);
    const std::int64_t S = c.S, hd = c.hd;
    std::vector<double> P, G, L;
    for (std::int64_t b = 0; b < c.B; ++b)
        for (std::int64_t h = 0; h < c.nh; ++h) {
            const std::int64_t j = h / (c.nh / c.nkv);
            probabilities(c, q, k, b, h, P, G, L);
            for (std::int64_t t = 0; t < S; ++t) {
                if (lse) lse[row_off(c, b, h, t)] = static_cast<float>(L[t]);
                for (std::int64_t e = 0; e < hd; ++e) {
                    double s = 0;
                    for (std::int64_t u = 0; u < S; ++u) s += P[t * S + u] * load(v, kv_off(c, b, u, j) + e);
                    store(o, q_off(c, b, t, h) + e, static_cast<float>(s));
                }
            }
        }
}

void attention_backward(Tensor dq, Tensor dk, Tensor dv, ConstTensor dout, ConstTensor q, ConstTensor k,
                        ConstTensor v, const AttentionConfig& c) {
    check_attention("reference::attention_backward", c);
    const std::int64_t S = c.S, hd = c.hd;
    std::vector<double> gk(static_cast<std::size_t>(c.B * S * c.nkv * hd), 0.0), gv(gk.size(), 0.0);
    std::vector<double> P, G, L, dP(static_cast<std::size_t>(S * S));
    for (std::int64_t b = 0; b < c.B; ++b)
        for (std::int64_t h = 0; h < c.nh; ++h) {
            const std::int64_t j = h / (c.nh / c.nkv);
            probabilities(c, q, k, b, h, P, G, L);
            // o_t = sum_u P[t,u] v_u  =>  dv_u += sum_t P[t,u] dout_t,  dP[t,u] = dout_t . v_u
            for (std::int64_t t = 0; t < S; ++t)
                for (std::int64_t u = 0; u < S; ++u) {
                    double s = 0;
                    for (std::int64_t e = 0; e < hd; ++e) {
                        const double g = load(dout, q_off(c, b, t, h) + e);
                        s += g * load(v, kv_off(c, b, u, j) + e);
                        gv[kv_off(c, b, u, j) + e] += P[t * S + u] * g;
                    }
                    dP[t * S + u] = s;
                }
            // softmax: dx_u = P_u (dP_u - sum_w P_w dP_w); then the soft-cap and scale chain rule.
            for (std::int64_t t = 0; t < S; ++t) {
                double rowsum = 0;
                for (std::int64_t u = 0; u < S; ++u) rowsum += P[t * S + u] * dP[t * S + u];
                std::vector<double> gq(static_cast<std::size_t>(hd), 0.0);
                for (std::int64_t u = 0; u < S; ++u) {
                    const double ds = P[t * S + u] * (dP[t * S + u] - rowsum) * G[t * S + u] * c.scale;
                    for (std::int64_t e = 0; e < hd; ++e) {
                        gq[e] += ds * load(k, kv_off(c, b, u, j) + e);
                        gk[kv_off(c, b, u, j) + e] += ds * load(q, q_off(c, b, t, h) + e);
                    }
                }
                for (std::int64_t e = 0; e < hd; ++e) store(dq, q_off(c, b, t, h) + e, static_cast<float>(gq[e]));
            }
        }
    for (std::size_t i = 0; i < gk.size(); ++i) {
        store(dk, static_cast<std::int64_t>(i), static_cast<float>(gk[i]));
        store(dv, static_cast<std::int64_t>(i), static_cast<float>(gv[i]));
    }
}

// From q, k, v and dout, in double: d sinks[h] = sum over rows of dP_sink * d p_sink / d sink,
// i.e. -p_sink * sum_u P[t,u] (dout_t . v_u), with p_sink = exp(sinks[h] - lse_t).
void attention_sinks_backward(Tensor dsinks, ConstTensor dout, ConstTensor q, ConstTensor k, ConstTensor v,
                              const AttentionConfig& c) {
    check_attention("reference::attention_sinks_backward", c);
    const std::int64_t S = c.S, hd = c.hd;
    std::vector<double> P, G, L;
    for (std::int64_t h = 0; h < c.nh; ++h) {
        const std::int64_t j = h / (c.nh / c.nkv);
        double g = 0;
        for (std::int64_t b = 0; b < c.B; ++b) {
            probabilities(c, q, k, b, h, P, G, L);
            for (std::int64_t t = 0; t < S; ++t) {
                double rowsum = 0;
                for (std::int64_t u = 0; u < S; ++u) {
                    double dp = 0;
                    for (std::int64_t e = 0; e < hd; ++e)
                        dp += double(load(dout, q_off(c, b, t, h) + e)) * load(v, kv_off(c, b, u, j) + e);
                    rowsum += P[t * S + u] * dp;
                }
                g -= std::exp(sink_logit(c, h) - L[t]) * rowsum;
            }
        }
        store(dsinks, h, static_cast<float>(g));
    }
}

}  // namespace reference
}  // namespace mst::exec::cpu
