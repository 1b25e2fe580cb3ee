// Mixture-of-Experts routing, dispatch and combine (Mixtral, Qwen3-MoE): the kernels around the
// experts' GEMMs, which the executor runs as one linear per expert on its rows of the sorted
// pairs. A token's top-k choice is a total order, (probability descending, expert ascending), so
// the k-th pick is the greatest expert strictly after the (k-1)-th: O(E k) per token and no
// scratch. The sort of the n*k pairs by expert is a counting sort whose cursors are the offsets
// array itself. Scratch: float[kBlock] blocks on the stack.
#include "kernels.hpp"

#include <algorithm>
#include <limits>
#include <numeric>
#include <vector>

namespace mst::exec::cpu {
namespace {

// (p_a, a) before (p_b, b) in the routing order: higher probability first, then the lower expert.
bool before(float pa, std::int64_t a, float pb, std::int64_t b) { return pa > pb || (pa == pb && a < b); }

void check_route(const char* kernel, std::int64_t n, std::int64_t E, std::int64_t k) {
    detail::require(n >= 0, kernel, "n must be >= 0");
    detail::require(E >= 1 && k >= 1 && k <= E, kernel, "expected 1 <= k <= E");
}

}  // namespace

void moe_route(float* w, std::int64_t* idx, std::int64_t* pos, std::int64_t* offsets, const float* probs,
               std::int64_t n, std::int64_t E, std::int64_t k, bool normalize) {
    check_route("moe_route", n, E, k);
    for (std::int64_t t = 0; t < n; ++t) {
        const float* p = probs + t * E;
        float sum = 0;
        for (std::int64_t j = 0; j < k; ++j) {
            std::int64_t best = -1;
            for (std::int64_t e = 0; e < E; ++e) {
                if (j > 0 && !before(p[idx[t * k + j - 1]], idx[t * k + j - 1], p[e], e)) continue;  // not after the last pick
                if (best < 0 || before(p[e], e, p[best], best)) best = e;
            }
            // None left (NaN probabilities, a diverged step): a valid index, and a NaN weight that
            // shows in the loss, as the CUDA twin does.
            idx[t * k + j] = best < 0 ? 0 : best;
            w[t * k + j] = best < 0 ? std::numeric_limits<float>::quiet_NaN() : p[best];
            sum += w[t * k + j];
        }
        if (normalize)
            for (std::int64_t j = 0; j < k; ++j) w[t * k + j] /= sum;
    }
    // Counting sort, stable in token order: offsets[e] counts, becomes expert e's first row, is
    // advanced past each row it hands out (ending at expert e + 1's first row), then shifted back.
    std::fill(offsets, offsets + E + 1, 0);
    for (std::int64_t i = 0; i < n * k; ++i) ++offsets[idx[i]];
    std::exclusive_scan(offsets, offsets + E, offsets, std::int64_t{0});
    for (std::int64_t i = 0; i < n * k; ++i) pos[i] = offsets[idx[i]]++;
    for (std::int64_t e = E; e > 0; --e) offsets[e] = offsets[e - 1];
    offsets[0] = 0;
}

void moe_route_backward(float* dprobs, const float* dw, const float* probs, const std::int64_t* idx, std::int64_t n,
                        std::int64_t E, std::int64_t k, bool normalize) {
    check_route("moe_route_backward", n, E, k);
    for (std::int64_t t = 0; t < n; ++t) {
        float* dp = dprobs + t * E;
        std::fill(dp, dp + E, 0.0f);
        const std::int64_t* ix = idx + t * k;
        const float* g = dw + t * k;
        if (!normalize) {
            for (std::int64_t j = 0; j < k; ++j) dp[ix[j]] = g[j];
            continue;
        }
        float sum = 0, dot = 0;
        for (std::int64_t j = 0; j < k; ++j) sum += probs[t * E + ix[j]];
        for (std::int64_t j = 0; j < k; ++j) dot += g[j] * (probs[t * E + ix[j]] / sum);
        for (std::int64_t j = 0; j < k; ++j) dp[ix[j]] = (g[j] - dot) / sum;
    }
}

void moe_gather(Tensor xs, ConstTensor x, const std::int64_t* pos, std::int64_t n, std::int64_t k, std::int64_t d) {
    detail::require(n >= 0 && k >= 1 && d >= 1, "moe_gather", "expected n >= 0, k >= 1, d >= 1");
    float b[kBlock];
    for (std::int64_t i = 0; i < n * k; ++i) {
        const std::int64_t t = i / k;
        for (std::int64_t c0 = 0; c0 < d; c0 += kBlock) {
            const std::int64_t nb = std::min(kBlock, d - c0);
            load_block(x, t * d + c0, nb, b);
            store_block(xs, pos[i] * d + c0, nb, b);
        }
    }
}

void moe_combine(Tensor y, ConstTensor ys, const float* w, const std::int64_t* pos, std::int64_t n, std::int64_t k,
                 std::int64_t d, bool accumulate) {
    detail::require(n >= 0 && k >= 1 && d >= 1, "moe_combine", "expected n >= 0, k >= 1, d >= 1");
    float acc[kBlock], b[kBlock];
    for (std::int64_t t = 0; t < n; ++t)
        for (std::int64_t c0 = 0; c0 < d; c0 += kBlock) {
            const std::int64_t nb = std::min(kBlock, d - c0);
            if (accumulate)
                load_block(y, t * d + c0, nb, acc);
            else
                std::fill(acc, acc + nb, 0.0f);
            for (std::int64_t j = 0; j < k; ++j) {
                load_block(ys, pos[t * k + j] * d + c0, nb, b);
                const float s = w ? w[t * k + j] : 1.0f;
                for (std::int64_t c = 0; c < nb; ++c) acc[c] += s * b[c];
            }
            store_block(y, t * d + c0, nb, acc);
        }
}

void moe_combine_backward(Tensor dys, float* dw, ConstTensor dy, ConstTensor ys, const float* w,
                          const std::int64_t* pos, std::int64_t n, std::int64_t k, std::int64_t d) {
    detail::require(n >= 0 && k >= 1 && d >= 1, "moe_combine_backward", "expected n >= 0, k >= 1, d >= 1");
    float g[kBlock], b[kBlock];
    for (std::int64_t i = 0; i < n * k; ++i) {
        const std::int64_t t = i / k, row = pos[i];
        float dot = 0;
        for (std::int64_t c0 = 0; c0 < d; c0 += kBlock) {
            const std::int64_t nb = std::min(kBlock, d - c0);
            load_block(dy, t * d + c0, nb, g);
            load_block(ys, row * d + c0, nb, b);
            for (std::int64_t c = 0; c < nb; ++c) {
                dot += g[c] * b[c];
                g[c] *= w[i];
            }
            store_block(dys, row * d + c0, nb, g);
        }
        dw[i] = dot;
    }
}

namespace reference {

// std::stable_sort of each token's experts by probability, then of the pairs by expert.
void moe_route(float* w, std::int64_t* idx, std::int64_t* pos, std::int64_t* offsets, const float* probs,
               std::int64_t n, std::int64_t E, std::int64_t k, bool normalize) {
    std::vector<std::int64_t> order(static_cast<std::size_t>(E));
    for (std::int64_t t = 0; t < n; ++t) {
        std::iota(order.begin(), order.end(), std::int64_t{0});
        std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) { return probs[t * E + a] > probs[t * E + b]; });
        double sum = 0;
        for (std::int64_t j = 0; j < k; ++j) sum += probs[t * E + order[static_cast<std::size_t>(j)]];
        for (std::int64_t j = 0; j < k; ++j) {
            const std::int64_t e = order[static_cast<std::size_t>(j)];
            idx[t * k + j] = e;
            w[t * k + j] = normalize ? static_cast<float>(probs[t * E + e] / sum) : probs[t * E + e];
        }
    }
    std::vector<std::int64_t> pairs(static_cast<std::size_t>(n * k));
    std::iota(pairs.begin(), pairs.end(), std::int64_t{0});
    std::stable_sort(pairs.begin(), pairs.end(), [&](std::int64_t a, std::int64_t b) { return idx[a] < idx[b]; });
    for (std::size_t r = 0; r < pairs.size(); ++r) pos[pairs[r]] = static_cast<std::int64_t>(r);
    for (std::int64_t e = 0; e <= E; ++e)
        offsets[e] = std::count_if(idx, idx + n * k, [&](std::int64_t x) { return x < e; });
}

void moe_route_backward(float* dprobs, const float* dw, const float* probs, const std::int64_t* idx, std::int64_t n,
                        std::int64_t E, std::int64_t k, bool normalize) {
    for (std::int64_t t = 0; t < n; ++t) {
        double sum = 0;
        for (std::int64_t j = 0; j < k; ++j) sum += probs[t * E + idx[t * k + j]];
        for (std::int64_t e = 0; e < E; ++e) {
            // d(loss)/d(p_e) = sum_j dw_j * d(w_j)/d(p_e), w_j = p_j / sum (or p_j)
            double g = 0;
            for (std::int64_t j = 0; j < k; ++j) {
                const std::int64_t c = idx[t * k + j];
                if (!normalize) {
                    g += c == e ? dw[t * k + j] : 0.0;
                    continue;
                }
                bool chosen = false;
                for (std::int64_t i = 0; i < k; ++i) chosen = chosen || idx[t * k + i] == e;
                if (!chosen) continue;
                g += dw[t * k + j] * ((c == e ? 1.0 : 0.0) / sum - probs[t * E + c] / (sum * sum));
            }
            dprobs[t * E + e] = static_cast<float>(g);
        }
    }
}

void moe_combine(Tensor y, ConstTensor ys, const float* w, const std::int64_t* pos, std::int64_t n, std::int64_t k,
                 std::int64_t d, bool accumulate) {
    for (std::int64_t t = 0; t < n; ++t)
        for (std::int64_t c = 0; c < d; ++c) {
            double acc = accumulate ? load(y, t * d + c) : 0.0;
            for (std::int64_t j = 0; j < k; ++j) acc += (w ? w[t * k + j] : 1.0) * load(ys, pos[t * k + j] * d + c);
            store(y, t * d + c, static_cast<float>(acc));
        }
}

void moe_combine_backward(Tensor dys, float* dw, ConstTensor dy, ConstTensor ys, const float* w,
                          const std::int64_t* pos, std::int64_t n, std::int64_t k, std::int64_t d) {
    for (std::int64_t i = 0; i < n * k; ++i) {
        const std::int64_t t = i / k;
        double dot = 0;
        for (std::int64_t c = 0; c < d; ++c) {
            dot += static_cast<double>(load(dy, t * d + c)) * load(ys, pos[i] * d + c);
            store(dys, pos[i] * d + c, static_cast<float>(static_cast<double>(w[i]) * load(dy, t * d + c)));
        }
        dw[i] = static_cast<float>(dot);
    }
}

}  // namespace reference
}  // namespace mst::exec::cpu
