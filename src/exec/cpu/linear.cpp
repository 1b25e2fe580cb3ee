// Linear layers as GEMMs in PyTorch's layout (y = x W^T, W [out, in]).
//
// One tiled GEMM serves all three products. Each output tile C[64, 64] accumulates in fp32
// on the stack over reduction blocks of 128: the operands' blocks are converted to fp32 stack
// tiles (bf16 or fp32 storage alike) and multiplied by Eigen. Scratch: three fp32 tiles,
// 80 KiB, on the stack; no temporary grows with n, i or o.
#include "kernels.hpp"

#include <algorithm>

namespace mst::exec::cpu {
namespace {

using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ColMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;

// The logical operand op(X) over a row-major buffer X with leading dimension ld:
// element (r, c) is X[r*ld + c], or X[c*ld + r] when transposed.
struct Operand {
    ConstTensor x;
    std::int64_t ld;
    bool trans;
};

// buf = op(X)[r0:r0+nr, c0:c0+nc] in fp32: row-major [nr, nc] when not transposed,
// column-major when transposed, so that every copy reads a contiguous run of X.
void load_tile(const Operand& a, std::int64_t r0, std::int64_t nr, std::int64_t c0, std::int64_t nc, float* buf) {
    if (!a.trans)
        for (std::int64_t r = 0; r < nr; ++r) load_block(a.x, (r0 + r) * a.ld + c0, nc, buf + r * nc);
    else
        for (std::int64_t c = 0; c < nc; ++c) load_block(a.x, (c0 + c) * a.ld + r0, nr, buf + c * nr);
}

// c[nr, nc] (row-major) += a[nr, nk] b[nk, nc], each operand in the layout load_tile gave it.
template <class AM, class BM>
void tile_product(float* c, std::int64_t nr, std::int64_t nc, const float* a, const float* b, std::int64_t nk) {
    Eigen::Map<RowMat> C(c, nr, nc);
    C.noalias() += Eigen::Map<const AM>(a, nr, nk) * Eigen::Map<const BM>(b, nk, nc);
}

// C[M,N] (row-major, leading dim N) = (accumulate ? C : 0) + op(A)[M,K] op(B)[K,N]
void gemm(Tensor c, const Operand& a, const Operand& b, std::int64_t M, std::int64_t N, std::int64_t K,
          bool accumulate) {
    alignas(64) float at[kGemmTileM * kGemmTileK];
    alignas(64) float bt[kGemmTileK * kGemmTileN];
    alignas(64) float ct[kGemmTileM * kGemmTileN];
    for (std::int64_t m0 = 0; m0 < M; m0 += kGemmTileM) {
        const std::int64_t nm = std::min(kGemmTileM, M - m0);
        for (std::int64_t n0 = 0; n0 < N; n0 += kGemmTileN) {
            const std::int64_t nn = std::min(kGemmTileN, N - n0);
            if (accumulate)
                for (std::int64_t r = 0; r < nm; ++r) load_block(c, (m0 + r) * N + n0, nn, ct + r * nn);
            else
                std::fill(ct, ct + nm * nn, 0.0f);
            for (std::int64_t k0 = 0; k0 < K; k0 += kGemmTileK) {
                const std::int64_t nk = std::min(kGemmTileK, K - k0);
                load_tile(a, m0, nm, k0, nk, at);
                load_tile(b, k0, nk, n0, nn, bt);
                if (!a.trans && !b.trans) tile_product<RowMat, RowMat>(ct, nm, nn, at, bt, nk);
                else if (!a.trans && b.trans) tile_product<RowMat, ColMat>(ct, nm, nn, at, bt, nk);
                else if (a.trans && !b.trans) tile_product<ColMat, RowMat>(ct, nm, nn, at, bt, nk);
                else tile_product<ColMat, ColMat>(ct, nm, nn, at, bt, nk);
            }
            for (std::int64_t r = 0; r < nm; ++r) store_block(c, (m0 + r) * N + n0, nn, ct + r * nn);
        }
    }
}

void check_linear(const char* kernel, Tensor c, ConstTensor a, ConstTensor b, std::int64_t n, std::int64_t i,
                  std::int64_t o) {
    detail::require(n >= 0 && i >= 0 && o >= 0, kernel, "sizes must be non-negative");
    detail::require(c && a && b, kernel, "buffers must be non-null");
}

}  // namespace

// out[n,o] (+)= in[n,i] W[o,i]^T
void linear_forward(Tensor out, ConstTensor in, ConstTensor W, std::int64_t n, std::int64_t i, std::int64_t o,
                    bool accumulate) {
    check_linear("linear_forward", out, in, W, n, i, o);
    gemm(out, {in, i, false}, {W, i, true}, n, o, i, accumulate);
}

// din[n,i] (+)= dout[n,o] W[o,i]
void linear_backward_input(Tensor din, ConstTensor dout, ConstTensor W, std::int64_t n, std::int64_t i,
                           std::int64_t o, bool accumulate) {
    check_linear("linear_backward_input", din, dout, W, n, i, o);
    gemm(din, {dout, o, false}, {W, i, false}, n, i, o, accumulate);
}

// dW[o,i] (+)= dout[n,o]^T in[n,i]
void linear_backward_weight(Tensor dW, ConstTensor dout, ConstTensor in, std::int64_t n, std::int64_t i,
                            std::int64_t o, bool accumulate) {
    check_linear("linear_backward_weight", dW, dout, in, n, i, o);
    gemm(dW, {dout, o, true}, {in, i, false}, o, i, n, accumulate);
}

// out[n,o] += b[o], a row block of kBlock columns at a time
void bias_forward(Tensor out, ConstTensor b, std::int64_t n, std::int64_t o) {
    detail::require(n >= 0 && o >= 0 && out && b, "bias_forward", "expected n, o >= 0 and non-null buffers");
    float bb[kBlock], rb[kBlock];
    for (std::int64_t c0 = 0; c0 < o; c0 += kBlock) {
        const std::int64_t nc = std::min(kBlock, o - c0);
        load_block(b, c0, nc, bb);
        for (std::int64_t r = 0; r < n; ++r) {
            load_block(out, r * o + c0, nc, rb);
            for (std::int64_t c = 0; c < nc; ++c) rb[c] += bb[c];
            store_block(out, r * o + c0, nc, rb);
        }
    }
}

// db[o] += sum_r dout[r, o], summed in fp32 per block of columns, then added once
void bias_backward(Tensor db, ConstTensor dout, std::int64_t n, std::int64_t o) {
    detail::require(n >= 0 && o >= 0 && db && dout, "bias_backward", "expected n, o >= 0 and non-null buffers");
    float acc[kBlock], rb[kBlock];
    for (std::int64_t c0 = 0; c0 < o; c0 += kBlock) {
        const std::int64_t nc = std::min(kBlock, o - c0);
        std::fill(acc, acc + nc, 0.0f);
        for (std::int64_t r = 0; r < n; ++r) {
            load_block(dout, r * o + c0, nc, rb);
            for (std::int64_t c = 0; c < nc; ++c) acc[c] += rb[c];
        }
        load_block(db, c0, nc, rb);
        for (std::int64_t c = 0; c < nc; ++c) rb[c] += acc[c];
        store_block(db, c0, nc, rb);
    }
}

namespace reference {

void bias_forward(Tensor out, ConstTensor b, std::int64_t n, std::int64_t o) {
    for (std::int64_t r = 0; r < n; ++r)
        for (std::int64_t c = 0; c < o; ++c) store(out, r * o + c, static_cast<float>(double(load(out, r * o + c)) + load(b, c)));
}

void bias_backward(Tensor db, ConstTensor dout, std::int64_t n, std::int64_t o) {
    for (std::int64_t c = 0; c < o; ++c) {
        double s = load(db, c);
        for (std::int64_t r = 0; r < n; ++r) s += load(dout, r * o + c);
        store(db, c, static_cast<float>(s));
    }
}

// out[n,o] (+)= in[n,i] W[o,i]^T
void linear_forward(Tensor out, ConstTensor in, ConstTensor W, std::int64_t n, std::int64_t i, std::int64_t o,
                    bool accumulate) {
    for (std::int64_t r = 0; r < n; ++r)
        for (std::int64_t c = 0; c < o; ++c) {
            double s = accumulate ? load(out, r * o + c) : 0.0;
            for (std::int64_t k = 0; k < i; ++k) s += double(load(in, r * i + k)) * load(W, c * i + k);
            store(out, r * o + c, static_cast<float>(s));
        }
}

// din[n,i] (+)= dout[n,o] W[o,i]
void linear_backward_input(Tensor din, ConstTensor dout, ConstTensor W, std::int64_t n, std::int64_t i,
                           std::int64_t o, bool accumulate) {
    for (std::int64_t r = 0; r < n; ++r)
        for (std::int64_t c = 0; c < i; ++c) {
            double s = accumulate ? load(din, r * i + c) : 0.0;
            for (std::int64_t k = 0; k < o; ++k) s += double(load(dout, r * o + k)) * load(W, k * i + c);
            store(din, r * i + c, static_cast<float>(s));
        }
}

// dW[o,i] (+)= dout[n,o]^T in[n,i]
void linear_backward_weight(Tensor dW, ConstTensor dout, ConstTensor in, std::int64_t n, std::int64_t i,
                            std::int64_t o, bool accumulate) {
    for (std::int64_t r = 0; r < o; ++r)
        for (std::int64_t c = 0; c < i; ++c) {
            double s = accumulate ? load(dW, r * i + c) : 0.0;
            for (std::int64_t k = 0; k < n; ++k) s += double(load(dout, k * o + r)) * load(in, k * i + c);
            store(dW, r * i + c, static_cast<float>(s));
        }
}

}  // namespace reference
}  // namespace mst::exec::cpu
