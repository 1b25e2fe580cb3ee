// The gated MLP's activation: m = act(g) * u, with g = x W_gate^T and u = x W_up^T.
//   silu(x) = x * sigmoid(x),                     silu'(x) = s * (1 + x * (1 - s)), s = sigmoid(x)
//   gelu_tanh(x) = x/2 * (1 + tanh(k (x + a x^3))), k = sqrt(2/pi), a = 0.044715 (PyTorch's
//   approximate="tanh", Gemma's hidden_activation "gelu_pytorch_tanh");
//   gelu_tanh'(x) = (1 + th)/2 + x/2 * (1 - th^2) * k * (1 + 3 a x^2).
// Scratch: float[kBlock] blocks on the stack.
#include "kernels.hpp"

#include <algorithm>
#include <cmath>

namespace mst::exec::cpu {
namespace {

constexpr double kSqrt2OverPi = 0.7978845608028654;
constexpr double kGeluA = 0.044715;

// act(x) and act'(x) in the precision T (float for the kernel, double for the reference)
template <class T>
void activate(GatedAct act, T x, T* y, T* dy) {
    if (act == GatedAct::Silu) {
        const T s = T(1) / (T(1) + std::exp(-x));
        *y = x * s;
        *dy = s * (T(1) + x * (T(1) - s));
    } else {
        const T k = static_cast<T>(kSqrt2OverPi), a = static_cast<T>(kGeluA);
        const T th = std::tanh(k * (x + a * x * x * x));
        *y = T(0.5) * x * (T(1) + th);
        *dy = T(0.5) * (T(1) + th) + T(0.5) * x * (T(1) - th * th) * k * (T(1) + T(3) * a * x * x);
    }
}

}  // namespace

// m[n] = act(g[n]) * u[n]
void swiglu_forward(Tensor m, ConstTensor g, ConstTensor u, std::int64_t n, GatedAct act) {
    float gb[kBlock], ub[kBlock];
    for (std::int64_t i0 = 0; i0 < n; i0 += kBlock) {
        const std::int64_t nb = std::min(kBlock, n - i0);
        load_block(g, i0, nb, gb);
        load_block(u, i0, nb, ub);
        for (std::int64_t j = 0; j < nb; ++j) {
            float y, dy;
            activate(act, gb[j], &y, &dy);
            gb[j] = y * ub[j];
        }
        store_block(m, i0, nb, gb);
    }
}

// dg[n] = dm * u * act'(g), du[n] = dm * act(g)  (dg may alias g, du may alias u)
void swiglu_backward(Tensor dg, Tensor du, ConstTensor dm, ConstTensor g, ConstTensor u, std::int64_t n,
                     GatedAct act) {
    float gb[kBlock], ub[kBlock], mb[kBlock];
    for (std::int64_t i0 = 0; i0 < n; i0 += kBlock) {
        const std::int64_t nb = std::min(kBlock, n - i0);
        load_block(g, i0, nb, gb);
        load_block(u, i0, nb, ub);
        load_block(dm, i0, nb, mb);
        for (std::int64_t j = 0; j < nb; ++j) {
            float y, dy;
            activate(act, gb[j], &y, &dy);
            gb[j] = mb[j] * ub[j] * dy;
            ub[j] = mb[j] * y;
        }
        store_block(dg, i0, nb, gb);
        store_block(du, i0, nb, ub);
    }
}

namespace reference {

void swiglu_forward(Tensor m, ConstTensor g, ConstTensor u, std::int64_t n, GatedAct act) {
    for (std::int64_t i = 0; i < n; ++i) {
        double y, dy;
        activate<double>(act, load(g, i), &y, &dy);
        store(m, i, static_cast<float>(y * load(u, i)));
    }
}

void swiglu_backward(Tensor dg, Tensor du, ConstTensor dm, ConstTensor g, ConstTensor u, std::int64_t n,
                     GatedAct act) {
    for (std::int64_t i = 0; i < n; ++i) {
        double y, dy;
        activate<double>(act, load(g, i), &y, &dy);
        const double gm = load(dm, i), uu = load(u, i);
        store(dg, i, static_cast<float>(gm * uu * dy));
        store(du, i, static_cast<float>(gm * y));
    }
}

}  // namespace reference
}  // namespace mst::exec::cpu
