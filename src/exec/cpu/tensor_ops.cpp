// Elementwise ops (cast, scale, fills, residual, soft-capping) and the embedding.
// Scratch: float[kBlock] blocks on the stack.
#include "kernels.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace mst::exec::cpu {

namespace detail {
void contract_violation(const char* kernel, const char* what) {
    throw std::logic_error(std::string(kernel) + ": " + what);
}
}  // namespace detail

// out[n] = in[n]
void cast(Tensor out, ConstTensor in, std::int64_t n) {
    float buf[kBlock];
    for (std::int64_t i0 = 0; i0 < n; i0 += kBlock) {
        const std::int64_t nb = std::min(kBlock, n - i0);
        load_block(in, i0, nb, buf);
        store_block(out, i0, nb, buf);
    }
}

// out[n] = in[n] * s
void scale(Tensor out, ConstTensor in, std::int64_t n, float s) {
    float buf[kBlock];
    for (std::int64_t i0 = 0; i0 < n; i0 += kBlock) {
        const std::int64_t nb = std::min(kBlock, n - i0);
        load_block(in, i0, nb, buf);
        for (std::int64_t j = 0; j < nb; ++j) buf[j] *= s;
        store_block(out, i0, nb, buf);
    }
}

// out[n] = 0 (all-zero bits are 0.0 in fp32 and bf16 alike)
void zero(Tensor out, std::int64_t n) {
    std::memset(out.data, 0, static_cast<std::size_t>(n * dtype_bytes(out.dtype)));
}

// out[n] = value
void fill(Tensor out, std::int64_t n, float value) {
    detail::require(n >= 0, "fill", "n must be >= 0");
    float buf[kBlock];
    std::fill(buf, buf + kBlock, value);
    for (std::int64_t i0 = 0; i0 < n; i0 += kBlock) store_block(out, i0, std::min(kBlock, n - i0), buf);
}

// out[n] uniform in [-half_width, half_width) from (key, i): see kernels.hpp
void fill_uniform(Tensor out, std::int64_t n, float half_width, std::uint64_t key) {
    detail::require(n >= 0, "fill_uniform", "n must be >= 0");
    float buf[kBlock];
    for (std::int64_t i0 = 0; i0 < n; i0 += kBlock) {
        const std::int64_t nb = std::min(kBlock, n - i0);
        for (std::int64_t j = 0; j < nb; ++j) {
            const auto i = static_cast<std::uint64_t>(i0 + j);
            std::uint64_t z = key + (i + 1) * 0x9E3779B97F4A7C15ull;  // wraps mod 2^64, as splitmix64
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
            z ^= z >> 31;
            const float u = static_cast<float>(z >> 40) * (1.0f / 16777216.0f);  // 24 bits: exact
            buf[j] = half_width * (2.0f * u - 1.0f);                              // 2u - 1 exact: one rounding
        }
        store_block(out, i0, nb, buf);
    }
}

// out[n] = a[n] + b[n]
void residual_forward(Tensor out, ConstTensor a, ConstTensor b, std::int64_t n) {
    float x[kBlock], y[kBlock];
    for (std::int64_t i0 = 0; i0 < n; i0 += kBlock) {
        const std::int64_t nb = std::min(kBlock, n - i0);
        load_block(a, i0, nb, x);
        load_block(b, i0, nb, y);
        for (std::int64_t j = 0; j < nb; ++j) x[j] += y[j];
        store_block(out, i0, nb, x);
    }
}

// a[n] += b[n]
void residual_accumulate(Tensor a, ConstTensor b, std::int64_t n) { residual_forward(a, a, b, n); }

// y[n] = cap * tanh(x[n] / cap)
void softcap_forward(Tensor y, ConstTensor x, std::int64_t n, float cap) {
    detail::require(cap > 0.0f, "softcap_forward", "cap must be positive");
    float buf[kBlock];
    for (std::int64_t i0 = 0; i0 < n; i0 += kBlock) {
        const std::int64_t nb = std::min(kBlock, n - i0);
        load_block(x, i0, nb, buf);
        for (std::int64_t j = 0; j < nb; ++j) buf[j] = cap * std::tanh(buf[j] / cap);
        store_block(y, i0, nb, buf);
    }
}

// dx[n] = dy[n] * (1 - tanh^2), tanh = y / cap
void softcap_backward(Tensor dx, ConstTensor dy, ConstTensor y, std::int64_t n, float cap) {
    detail::require(cap > 0.0f, "softcap_backward", "cap must be positive");
    float g[kBlock], t[kBlock];
    for (std::int64_t i0 = 0; i0 < n; i0 += kBlock) {
        const std::int64_t nb = std::min(kBlock, n - i0);
        load_block(dy, i0, nb, g);
        load_block(y, i0, nb, t);
        for (std::int64_t j = 0; j < nb; ++j) {
            const float th = t[j] / cap;
            g[j] *= 1.0f - th * th;
        }
        store_block(dx, i0, nb, g);
    }
}

namespace {
void check_ids(const char* kernel, const std::int64_t* ids, std::int64_t n, std::int64_t V) {
    for (std::int64_t r = 0; r < n; ++r) detail::require(ids[r] >= 0 && ids[r] < V, kernel, "token id out of [0, V)");
}
}  // namespace

// out[n,d] = table[ids[n], :]; table [V,d]
void embedding_forward(Tensor out, ConstTensor table, const std::int64_t* ids, std::int64_t n, std::int64_t d,
                       std::int64_t V) {
    check_ids("embedding_forward", ids, n, V);
    float buf[kBlock];
    for (std::int64_t r = 0; r < n; ++r)
        for (std::int64_t c0 = 0; c0 < d; c0 += kBlock) {
            const std::int64_t nb = std::min(kBlock, d - c0);
            load_block(table, ids[r] * d + c0, nb, buf);
            store_block(out, r * d + c0, nb, buf);
        }
}

// dtable[V,d] += scatter(dout[n,d] by ids[n]). Each token's row is added in fp32 and rounded
// once per token into the storage dtype (as PyTorch's index_add on a bf16 gradient).
void embedding_backward(Tensor dtable, ConstTensor dout, const std::int64_t* ids, std::int64_t n, std::int64_t d,
                        std::int64_t V) {
    check_ids("embedding_backward", ids, n, V);
    float acc[kBlock], g[kBlock];
    for (std::int64_t r = 0; r < n; ++r)
        for (std::int64_t c0 = 0; c0 < d; c0 += kBlock) {
            const std::int64_t nb = std::min(kBlock, d - c0);
            load_block(dtable, ids[r] * d + c0, nb, acc);
            load_block(dout, r * d + c0, nb, g);
            for (std::int64_t j = 0; j < nb; ++j) acc[j] += g[j];
            store_block(dtable, ids[r] * d + c0, nb, acc);
        }
}

namespace reference {

// out[n,d] = table[ids[n], :]
void embedding_forward(Tensor out, ConstTensor table, const std::int64_t* ids, std::int64_t n, std::int64_t d,
                       std::int64_t V) {
    for (std::int64_t r = 0; r < n; ++r) {
        detail::require(ids[r] >= 0 && ids[r] < V, "reference::embedding_forward", "token id out of [0, V)");
        for (std::int64_t c = 0; c < d; ++c) store(out, r * d + c, load(table, ids[r] * d + c));
    }
}

// dtable[V,d] += sum over rows r with ids[r] == v of dout[r, :]
void embedding_backward(Tensor dtable, ConstTensor dout, const std::int64_t* ids, std::int64_t n, std::int64_t d,
                        std::int64_t V) {
    for (std::int64_t v = 0; v < V; ++v)
        for (std::int64_t c = 0; c < d; ++c) {
            double s = load(dtable, v * d + c);
            for (std::int64_t r = 0; r < n; ++r)
                if (ids[r] == v) s += load(dout, r * d + c);
            store(dtable, v * d + c, static_cast<float>(s));
        }
}

}  // namespace reference
}  // namespace mst::exec::cpu
