// Cross-entropy over a vocabulary of V classes, rows whose label is kIgnoreIndex skipped.
//  * Hugging Face style: the fp32 log-softmax [n, V] is written out (the tensor HF saves for the
//    backward), the backward forms softmax - onehot from it.
//  * Fused (MsT "mini-sequence" LM head, Liger fused linear cross-entropy): per row, an online
//    max/sum pass gives lse, the row's loss is lse - z[label], and a second pass overwrites the
//    logits with (softmax - onehot) * scale (times the soft-cap derivative). The only [n, V]
//    buffer is the logits chunk itself, so a chunk of n rows costs n*V storage elements.
// The loss is returned as a sum over valid rows: chunks of rows add up to the unchunked sum.
// Scratch: float[kBlock] blocks on the stack.
#include "kernels.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace mst::exec::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

bool valid_label(const char* kernel, std::int64_t label, std::int64_t V) {
    if (label == kIgnoreIndex) return false;
    detail::require(label >= 0 && label < V, kernel, "label out of [0, V) and not kIgnoreIndex");
    return true;
}

}  // namespace

std::int64_t count_valid_labels(const std::int64_t* labels, std::int64_t n) {
    return std::count_if(labels, labels + n, [](std::int64_t l) { return l != kIgnoreIndex; });
}

// logp[n,V] fp32 from logits[n,V]; returns sum over valid rows of -logp[label]
double cross_entropy_forward(float* logp, ConstTensor logits, const std::int64_t* labels, std::int64_t n,
                             std::int64_t V) {
    detail::require(V > 0 && n >= 0, "cross_entropy_forward", "need V > 0 and n >= 0");
    double loss_sum = 0.0;
    for (std::int64_t r = 0; r < n; ++r) {
        float* row = logp + r * V;
        if (logits.dtype != DType::F32 || logits.data != logp) load_block(logits, r * V, V, row);
        float mx = kNegInf;
        for (std::int64_t j = 0; j < V; ++j) mx = std::max(mx, row[j]);
        float sum = 0.0f;
        for (std::int64_t j = 0; j < V; ++j) sum += std::exp(row[j] - mx);
        const float lse = mx + std::log(sum);
        for (std::int64_t j = 0; j < V; ++j) row[j] -= lse;
        if (valid_label("cross_entropy_forward", labels[r], V)) loss_sum -= row[labels[r]];
    }
    return loss_sum;
}

// dlogits[n,V] = (exp(logp) - onehot) * scale, 0 on ignored rows; may overwrite logp
void cross_entropy_backward(Tensor dlogits, const float* logp, const std::int64_t* labels, std::int64_t n,
                            std::int64_t V, float scale) {
    float buf[kBlock];
    for (std::int64_t r = 0; r < n; ++r) {
        const std::int64_t label = labels[r];
        const bool valid = valid_label("cross_entropy_backward", label, V);
        for (std::int64_t c0 = 0; c0 < V; c0 += kBlock) {
            const std::int64_t nb = std::min(kBlock, V - c0);
            for (std::int64_t j = 0; j < nb; ++j) {
                const float onehot = c0 + j == label ? 1.0f : 0.0f;
                buf[j] = valid ? (std::exp(logp[r * V + c0 + j]) - onehot) * scale : 0.0f;
            }
            store_block(dlogits, r * V + c0, nb, buf);
        }
    }
}

// dlogp[n,V] = -scale at (r, labels[r]) for valid rows, else 0
void nll_loss_backward(float* dlogp, const std::int64_t* labels, std::int64_t n, std::int64_t V, float scale) {
    detail::require(V > 0 && n >= 0, "nll_loss_backward", "need V > 0 and n >= 0");
    std::fill(dlogp, dlogp + n * V, 0.0f);
    for (std::int64_t r = 0; r < n; ++r)
        if (valid_label("nll_loss_backward", labels[r], V)) dlogp[r * V + labels[r]] = -scale;
}

// dx[n,V] = dy - exp(logp) * rowsum(dy); dx may alias dy
void log_softmax_backward(float* dx, const float* dy, const float* logp, std::int64_t n, std::int64_t V) {
    detail::require(V > 0 && n >= 0, "log_softmax_backward", "need V > 0 and n >= 0");
    for (std::int64_t r = 0; r < n; ++r) {
        float sum = 0.0f;
        for (std::int64_t j = 0; j < V; ++j) sum += dy[r * V + j];
        for (std::int64_t j = 0; j < V; ++j) dx[r * V + j] = dy[r * V + j] - std::exp(logp[r * V + j]) * sum;
    }
}

// logits[n,V] in place -> gradient; row_loss[n] (nullable); returns the loss sum
double cross_entropy_fused(Tensor logits, float* row_loss, const std::int64_t* labels, std::int64_t n,
                           std::int64_t V, float scale, float softcap) {
    detail::require(V > 0 && n >= 0, "cross_entropy_fused", "need V > 0 and n >= 0");
    detail::require(softcap >= 0.0f, "cross_entropy_fused", "softcap must be >= 0 (0: none)");
    float z[kBlock];
    // z = softcap(x) in place over a block; returns nothing, the derivative is recomputed in pass 2.
    auto capped = [softcap](float* x, std::int64_t nb) {
        if (softcap > 0.0f)
            for (std::int64_t j = 0; j < nb; ++j) x[j] = softcap * std::tanh(x[j] / softcap);
    };
    double loss_sum = 0.0;
    for (std::int64_t r = 0; r < n; ++r) {
        const std::int64_t label = labels[r];
        if (!valid_label("cross_entropy_fused", label, V)) {
            std::fill(z, z + kBlock, 0.0f);
            for (std::int64_t c0 = 0; c0 < V; c0 += kBlock) store_block(logits, r * V + c0, std::min(kBlock, V - c0), z);
            if (row_loss) row_loss[r] = 0.0f;
            continue;
        }
        // pass 1: online logsumexp (running max m, running sum s relative to m)
        float m = kNegInf, s = 0.0f;
        for (std::int64_t c0 = 0; c0 < V; c0 += kBlock) {
            const std::int64_t nb = std::min(kBlock, V - c0);
            load_block(logits, r * V + c0, nb, z);
            capped(z, nb);
            float bm = kNegInf;
            for (std::int64_t j = 0; j < nb; ++j) bm = std::max(bm, z[j]);
            const float m_new = std::max(m, bm);
            s *= std::exp(m - m_new);
            for (std::int64_t j = 0; j < nb; ++j) s += std::exp(z[j] - m_new);
            m = m_new;
        }
        const float lse = m + std::log(s);
        z[0] = load(logits, r * V + label);
        capped(z, 1);
        const float loss = lse - z[0];
        if (row_loss) row_loss[r] = loss;
        loss_sum += loss;
        // pass 2: gradient in place
        for (std::int64_t c0 = 0; c0 < V; c0 += kBlock) {
            const std::int64_t nb = std::min(kBlock, V - c0);
            load_block(logits, r * V + c0, nb, z);
            for (std::int64_t j = 0; j < nb; ++j) {
                float x = z[j], dcap = 1.0f;
                if (softcap > 0.0f) {
                    const float th = std::tanh(x / softcap);
                    x = softcap * th;
                    dcap = 1.0f - th * th;
                }
                const float onehot = c0 + j == label ? 1.0f : 0.0f;
                z[j] = (std::exp(x - lse) - onehot) * scale * dcap;
            }
            store_block(logits, r * V + c0, nb, z);
        }
    }
    return loss_sum;
}

namespace reference {

double cross_entropy_forward(float* logp, ConstTensor logits, const std::int64_t* labels, std::int64_t n,
                             std::int64_t V) {
    double loss_sum = 0.0;
    std::vector<double> x(static_cast<std::size_t>(V));
    for (std::int64_t r = 0; r < n; ++r) {
        double mx = -std::numeric_limits<double>::infinity();
        for (std::int64_t j = 0; j < V; ++j) mx = std::max(mx, x[j] = load(logits, r * V + j));
        double sum = 0;
        for (std::int64_t j = 0; j < V; ++j) sum += std::exp(x[j] - mx);
        const double lse = mx + std::log(sum);
        for (std::int64_t j = 0; j < V; ++j) logp[r * V + j] = static_cast<float>(x[j] - lse);
        if (labels[r] != kIgnoreIndex) loss_sum += lse - x[labels[r]];
    }
    return loss_sum;
}

void cross_entropy_backward(Tensor dlogits, const float* logp, const std::int64_t* labels, std::int64_t n,
                            std::int64_t V, float scale) {
    for (std::int64_t r = 0; r < n; ++r)
        for (std::int64_t j = 0; j < V; ++j) {
            double g = 0.0;
            if (labels[r] != kIgnoreIndex) g = (std::exp(double(logp[r * V + j])) - (j == labels[r] ? 1.0 : 0.0)) * scale;
            store(dlogits, r * V + j, static_cast<float>(g));
        }
}

}  // namespace reference
}  // namespace mst::exec::cpu
