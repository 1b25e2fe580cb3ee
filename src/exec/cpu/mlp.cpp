// The gated MLP's activation: m = act(g) * u, with g = x W_gate^T and u = x W_up^T.
//   silu(x) = x * sigmoid(x),                     silu'(x) = s * (1 + x * (1 - s)), s = sigmoid(x)
//   gelu_tanh(x) = x/2 * (1 + tanh(k (x + a x^3))), k = sqrt(2/pi), a = 0.044715 (PyTorch's
//   approximate="tanh", Gemma's hidden_activation "gelu_pytorch_tanh");
//   gelu_tanh'(x) = (1 + th)/2 + x/2 * (1 - th^2) * k * (1 + 3 a x^2).
// gpt-oss (GptOssExperts._apply_gate) clamps both inputs first, with L = 7 and alpha = 1.702:
//   m = glu(min(g, L)) * (clamp(u, -L, L) + 1), glu(x) = x * sigmoid(alpha x),
//   glu'(x) = s + alpha x s (1 - s); clamp passes the gradient where g <= L and -L <= u <= L
//   (torch's clamp backward keeps the bounds themselves).
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
    if (act.kind == GatedAct::GptOss) {
        const T L = static_cast<T>(act.limit), alpha = static_cast<T>(kGptOssAlpha);
        const T xc = std::min(x, L), s = T(1) / (T(1) + std::exp(-alpha * xc));
        *y = xc * s;
        *dy = x <= L ? s + alpha * xc * s * (T(1) - s) : T(0);
    } else if (act.kind == GatedAct::Silu) {
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

// The up input's factor b(u) and b'(u): u itself, or gpt-oss's clamp(u, -L, L) + 1.
template <class T>
void up_factor(GatedAct act, T u, T* b, T* db) {
    if (act.kind != GatedAct::GptOss) {
        *b = u, *db = T(1);
        return;
    }
    const T L = static_cast<T>(act.limit);
    *b = std::clamp(u, -L, L) + T(1);
    *db = -L <= u && u <= L ? T(1) : T(0);
}

}  // namespace

// m[n] = act(g[n]) * b(u[n])
void swiglu_forward(Tensor m, ConstTensor g, ConstTensor u, std::int64_t n, GatedAct act) {
    float gb[kBlock], ub[kBlock];
    for (std::int64_t i0 = 0; i0 < n; i0 += kBlock) {
        const std::int64_t nb = std::min(kBlock, n - i0);
        load_block(g, i0, nb, gb);
        load_block(u, i0, nb, ub);
        for (std::int64_t j = 0; j < nb; ++j) {
            float y, dy, b, db;
            activate(act, gb[j], &y, &dy);
            up_factor(act, ub[j], &b, &db);
            gb[j] = y * b;
        }
        store_block(m, i0, nb, gb);
    }
}

// dg[n] = dm * b(u) * act'(g), du[n] = dm * act(g) * b'(u)  (dg may alias g, du may alias u)
void swiglu_backward(Tensor dg, Tensor du, ConstTensor dm, ConstTensor g, ConstTensor u, std::int64_t n,
                     GatedAct act) {
    float gb[kBlock], ub[kBlock], mb[kBlock];
    for (std::int64_t i0 = 0; i0 < n; i0 += kBlock) {
        const std::int64_t nb = std::min(kBlock, n - i0);
        load_block(g, i0, nb, gb);
        load_block(u, i0, nb, ub);
        load_block(dm, i0, nb, mb);
        for (std::int64_t j = 0; j < nb; ++j) {
            float y, dy, b, db;
            activate(act, gb[j], &y, &dy);
            up_factor(act, ub[j], &b, &db);
            gb[j] = mb[j] * b * dy;
            ub[j] = mb[j] * y * db;
        }
        store_block(dg, i0, nb, gb);
        store_block(du, i0, nb, ub);
    }
}

namespace reference {

void swiglu_forward(Tensor m, ConstTensor g, ConstTensor u, std::int64_t n, GatedAct act) {
    for (std::int64_t i = 0; i < n; ++i) {
        double y, dy, b, db;
        activate<double>(act, load(g, i), &y, &dy);
        up_factor<double>(act, load(u, i), &b, &db);
        store(m, i, static_cast<float>(y * b));
    }
}

void swiglu_backward(Tensor dg, Tensor du, ConstTensor dm, ConstTensor g, ConstTensor u, std::int64_t n,
                     GatedAct act) {
    for (std::int64_t i = 0; i < n; ++i) {
        double y, dy, b, db;
        activate<double>(act, load(g, i), &y, &dy);
        up_factor<double>(act, load(u, i), &b, &db);
        const double gm = load(dm, i);
        store(dg, i, static_cast<float>(gm * b * dy));
        store(du, i, static_cast<float>(gm * y * db));
    }
}

}  // namespace reference
}  // namespace mst::exec::cpu
