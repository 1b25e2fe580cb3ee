// Optimizer steps, one tensor at a time, as PyTorch's single-tensor (foreach=False) paths.
// Parameters and states may each be fp32 or bf16; the arithmetic is fp32 and each value is
// rounded once into its storage. Scratch: float[kBlock] blocks on the stack.
#include "kernels.hpp"

#include <algorithm>
#include <cmath>

namespace mst::exec::cpu {

// param, m, v [n] updated in place from grad [n]
void adamw_step(Tensor param, ConstTensor grad, Tensor m, Tensor v, std::int64_t n, const AdamWConfig& c,
                std::int64_t step) {
    detail::require(step >= 1, "adamw_step", "step counts from 1");
    detail::require(param && grad && m && v, "adamw_step", "param, grad, m and v are required");
    const double bc1 = 1.0 - std::pow(double(c.beta1), double(step));
    const double bc2 = 1.0 - std::pow(double(c.beta2), double(step));
    const float step_size = static_cast<float>(c.lr / bc1);
    const float bc2_sqrt = static_cast<float>(std::sqrt(bc2));
    const float decay = 1.0f - c.lr * c.weight_decay;
    float p[kBlock], g[kBlock], mb[kBlock], vb[kBlock];
    for (std::int64_t i0 = 0; i0 < n; i0 += kBlock) {
        const std::int64_t nb = std::min(kBlock, n - i0);
        load_block(param, i0, nb, p);
        load_block(grad, i0, nb, g);
        load_block(m, i0, nb, mb);
        load_block(v, i0, nb, vb);
        for (std::int64_t j = 0; j < nb; ++j) {
            p[j] *= decay;
            mb[j] = c.beta1 * mb[j] + (1.0f - c.beta1) * g[j];
            vb[j] = c.beta2 * vb[j] + (1.0f - c.beta2) * g[j] * g[j];
            p[j] -= step_size * mb[j] / (std::sqrt(vb[j]) / bc2_sqrt + c.eps);
        }
        store_block(param, i0, nb, p);
        store_block(m, i0, nb, mb);
        store_block(v, i0, nb, vb);
    }
}

// param [n] (and momentum_buf [n] when momentum != 0) updated in place from grad [n]
void sgd_step(Tensor param, ConstTensor grad, Tensor momentum_buf, std::int64_t n, const SgdConfig& c,
              std::int64_t step) {
    detail::require(step >= 1, "sgd_step", "step counts from 1");
    detail::require(c.momentum == 0.0f || momentum_buf, "sgd_step", "momentum needs a momentum buffer");
    float p[kBlock], g[kBlock], b[kBlock];
    for (std::int64_t i0 = 0; i0 < n; i0 += kBlock) {
        const std::int64_t nb = std::min(kBlock, n - i0);
        load_block(param, i0, nb, p);
        load_block(grad, i0, nb, g);
        if (c.momentum != 0.0f && step > 1) load_block(momentum_buf, i0, nb, b);
        for (std::int64_t j = 0; j < nb; ++j) {
            float d = g[j] + c.weight_decay * p[j];
            if (c.momentum != 0.0f) {
                b[j] = step == 1 ? d : c.momentum * b[j] + (1.0f - c.dampening) * d;
                d = c.nesterov ? d + c.momentum * b[j] : b[j];
            }
            p[j] -= c.lr * d;
        }
        store_block(param, i0, nb, p);
        if (c.momentum != 0.0f) store_block(momentum_buf, i0, nb, b);
    }
}

namespace reference {

void adamw_step(Tensor param, ConstTensor grad, Tensor m, Tensor v, std::int64_t n, const AdamWConfig& c,
                std::int64_t step) {
    const double b1 = c.beta1, b2 = c.beta2, lr = c.lr;
    for (std::int64_t i = 0; i < n; ++i) {
        double p = load(param, i);
        const double g = load(grad, i);
        p = p - lr * c.weight_decay * p;
        const double mi = b1 * load(m, i) + (1 - b1) * g;
        const double vi = b2 * load(v, i) + (1 - b2) * g * g;
        const double m_hat = mi / (1 - std::pow(b1, double(step)));
        const double v_hat = vi / (1 - std::pow(b2, double(step)));
        p -= lr * m_hat / (std::sqrt(v_hat) + c.eps);
        store(param, i, static_cast<float>(p));
        store(m, i, static_cast<float>(mi));
        store(v, i, static_cast<float>(vi));
    }
}

void sgd_step(Tensor param, ConstTensor grad, Tensor momentum_buf, std::int64_t n, const SgdConfig& c,
              std::int64_t step) {
    for (std::int64_t i = 0; i < n; ++i) {
        double p = load(param, i);
        double d = load(grad, i) + double(c.weight_decay) * p;
        if (c.momentum != 0.0f) {
            const double b = step == 1 ? d : double(c.momentum) * load(momentum_buf, i) + (1.0 - c.dampening) * d;
            store(momentum_buf, i, static_cast<float>(b));
            d = c.nesterov ? d + double(c.momentum) * b : b;
        }
        store(param, i, static_cast<float>(p - double(c.lr) * d));
    }
}

}  // namespace reference
}  // namespace mst::exec::cpu
