// The CPU backend's kernels, checked five ways:
//  (1) the fast kernel equals its naive reference (double accumulation) on random inputs;
//  (2) every backward equals central finite differences of its forward;
//  (3) flash and eager attention agree (GQA, sliding window, soft-capping, S not a tile multiple);
//  (4) bf16 storage agrees with fp32 within bf16 precision;
//  (5) the fused cross-entropy gradient equals the Hugging Face-style backward, and chunked losses
//      sum to the unchunked loss.
// Plus hand-derived values (RoPE angles, activations, optimizer steps) that pin the formulas.
//
// Tolerances, all norm-wise: max|a - b| / max|b| over the tensor (an element-wise relative error
// is meaningless where a value cancels to ~0).
//  * fast fp32 vs double reference, 1e-5: the kernels accumulate at most a few hundred fp32
//    terms; rounding grows like sqrt(terms) * 6e-8 ~ 1e-6, an order below the bound.
//  * finite differences, 1e-3: with eps = 1e-3 the truncation error is O(eps^2 f''') ~ 1e-6;
//    the loss is summed in double from fp32 outputs, and only outputs that depend on the
//    perturbed input change, so rounding contributes ~ sqrt(affected) * 6e-8 * |out| / (2 eps)
//    ~ 1e-4 of the gradient's scale. Outputs unaffected by the perturbation recompute bitwise
//    equal and cancel.
//  * bf16 vs fp32, 1e-2: both runs get the same bf16-representable inputs (bf16_exact), so the
//    difference is the kernel's own storage roundings (saved tensors, outputs, accumulated
//    states, HF's bf16 copies of probabilities and tanh), each <= 2^-8 = 3.9e-3 relative (bf16
//    keeps 8 significant bits); a few such errors add up (measured: <= 5.8e-3), and no input
//    sensitivity of the function (attention's is large) enters the comparison.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <initializer_list>
#include <limits>
#include <random>
#include <stdexcept>
#include <vector>

#include "../src/exec/cpu/kernels.hpp"
#include "test_support.hpp"

using namespace mst::exec::cpu;
namespace ref = mst::exec::cpu::reference;

namespace {

using Vec = std::vector<float>;
using BVec = std::vector<bf16>;

Vec randn(std::int64_t n, unsigned seed, float sd = 1.0f) {
    std::mt19937 gen(seed);
    std::normal_distribution<float> dist(0.0f, sd);
    Vec v(static_cast<std::size_t>(n));
    for (float& x : v) x = dist(gen);
    return v;
}

BVec to_bf16(const Vec& v) {
    BVec b(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) b[i] = bf16(v[i]);
    return b;
}

Vec to_f32(const BVec& b) {
    Vec v(b.size());
    for (std::size_t i = 0; i < b.size(); ++i) v[i] = static_cast<float>(b[i]);
    return v;
}

// v rounded to bf16 and back: values both an fp32 and a bf16 run can hold exactly
Vec bf16_exact(const Vec& v) { return to_f32(to_bf16(v)); }

using mst::test::rel_err;

double dot(const Vec& a, const Vec& w) {
    double s = 0.0;
    for (std::size_t i = 0; i < a.size(); ++i) s += double(a[i]) * double(w[i]);
    return s;
}

// Central differences of loss() with respect to `samples` random coordinates of x, against the
// analytic gradient; returns max |fd - analytic| / max|analytic| over the sampled coordinates.
double fd_error(Vec& x, const Vec& analytic, const std::function<double()>& loss, int samples, unsigned seed,
                float eps = 1e-3f) {
    REQUIRE(x.size() == analytic.size());
    std::mt19937 gen(seed);
    std::uniform_int_distribution<std::size_t> pick(0, x.size() - 1);
    double scale = 0.0;
    for (float g : analytic) scale = std::max(scale, std::fabs(double(g)));
    double worst = 0.0;
    for (int s = 0; s < samples; ++s) {
        const std::size_t i = samples >= static_cast<int>(x.size()) ? static_cast<std::size_t>(s) % x.size() : pick(gen);
        const float keep = x[i];
        x[i] = keep + eps;
        const double lp = loss();
        x[i] = keep - eps;
        const double lm = loss();
        x[i] = keep;
        const double fd = (lp - lm) / (2.0 * double(eps));
        worst = std::max(worst, std::fabs(fd - double(analytic[i])));
    }
    return scale == 0.0 ? worst : worst / scale;
}

std::vector<std::int64_t> random_ids(std::int64_t n, std::int64_t V, unsigned seed) {
    std::mt19937 gen(seed);
    std::uniform_int_distribution<std::int64_t> d(0, V - 1);
    std::vector<std::int64_t> ids(static_cast<std::size_t>(n));
    for (auto& id : ids) id = d(gen);
    return ids;
}

}  // namespace

// ---- linear ---------------------------------------------------------------------------------

TEST_CASE("linear: the tiled GEMMs equal the naive triple loop across tile edges") {
    // 70 x 150 x 67 crosses the 64-row, 64-column and 128-deep tile edges.
    const std::int64_t n = 70, i = 150, o = 67;
    const Vec x = randn(n * i, 1), W = randn(o * i, 2), dout = randn(n * o, 3);
    for (bool accumulate : {false, true}) {
        CAPTURE(accumulate);
        Vec y = randn(n * o, 4), y_ref = y;
        linear_forward(y.data(), x.data(), W.data(), n, i, o, accumulate);
        ref::linear_forward(y_ref.data(), x.data(), W.data(), n, i, o, accumulate);
        CHECK(rel_err(y, y_ref) < 1e-5);

        Vec dx = randn(n * i, 5), dx_ref = dx;
        linear_backward_input(dx.data(), dout.data(), W.data(), n, i, o, accumulate);
        ref::linear_backward_input(dx_ref.data(), dout.data(), W.data(), n, i, o, accumulate);
        CHECK(rel_err(dx, dx_ref) < 1e-5);

        Vec dW = randn(o * i, 6), dW_ref = dW;
        linear_backward_weight(dW.data(), dout.data(), x.data(), n, i, o, accumulate);
        ref::linear_backward_weight(dW_ref.data(), dout.data(), x.data(), n, i, o, accumulate);
        CHECK(rel_err(dW, dW_ref) < 1e-5);
    }
}

TEST_CASE("linear: a 2x2 product by hand (y = x W^T)") {
    const Vec x = {1, 2, 3, 4};         // [2, 2]
    const Vec W = {1, 0, 1, 1, 0, -1};  // [3, 2]
    Vec y(6);
    linear_forward(y.data(), x.data(), W.data(), 2, 2, 3);
    CHECK(y == Vec{1, 3, -2, 3, 7, -4});
}

TEST_CASE("linear: input and weight gradients equal finite differences") {
    const std::int64_t n = 5, i = 7, o = 6;
    Vec x = randn(n * i, 11), W = randn(o * i, 12);
    const Vec w = randn(n * o, 13);  // L = sum(w * y), so dL/dy = w
    auto loss = [&] {
        Vec y(static_cast<std::size_t>(n * o));
        linear_forward(y.data(), x.data(), W.data(), n, i, o);
        return dot(y, w);
    };
    Vec dx(x.size()), dW(W.size());
    linear_backward_input(dx.data(), w.data(), W.data(), n, i, o);
    linear_backward_weight(dW.data(), w.data(), x.data(), n, i, o, false);
    CHECK(fd_error(x, dx, loss, 35, 14) < 1e-3);
    CHECK(fd_error(W, dW, loss, 42, 15) < 1e-3);
}

TEST_CASE("linear: bf16 storage agrees with fp32 within bf16 precision") {
    const std::int64_t n = 33, i = 140, o = 70;
    const Vec x = bf16_exact(randn(n * i, 21)), W = bf16_exact(randn(o * i, 22)), dout = bf16_exact(randn(n * o, 23));
    const BVec xb = to_bf16(x), Wb = to_bf16(W), doutb = to_bf16(dout);
    Vec y(n * o), dx(n * i), dW(o * i);
    BVec yb(y.size()), dxb(dx.size()), dWb(dW.size());
    linear_forward(y.data(), x.data(), W.data(), n, i, o);
    linear_forward(yb.data(), xb.data(), Wb.data(), n, i, o);
    CHECK(rel_err(to_f32(yb), y) < 1e-2);
    linear_backward_input(dx.data(), dout.data(), W.data(), n, i, o);
    linear_backward_input(dxb.data(), doutb.data(), Wb.data(), n, i, o);
    CHECK(rel_err(to_f32(dxb), dx) < 1e-2);
    linear_backward_weight(dW.data(), dout.data(), x.data(), n, i, o, false);
    linear_backward_weight(dWb.data(), doutb.data(), xb.data(), n, i, o, false);
    CHECK(rel_err(to_f32(dWb), dW) < 1e-2);
    // Mixed storage (bf16 activations, fp32 master weight, fp32 output) goes through the same tiles.
    Vec y_mixed(y.size());
    linear_forward(y_mixed.data(), xb.data(), W.data(), n, i, o);
    CHECK(rel_err(y_mixed, y) < 1e-2);
}

// ---- embedding, residual, elementwise ---------------------------------------------------------

TEST_CASE("embedding: gathers rows and scatter-adds gradients of repeated ids") {
    const std::int64_t V = 50, d = 300, n = 40;  // d > kBlock: rows copy in blocks
    const Vec table = randn(V * d, 31), dout = randn(n * d, 32);
    auto ids = random_ids(n, V, 33);
    ids[5] = ids[9] = ids[17] = 7;  // a repeated token accumulates three rows
    Vec out(n * d), out_ref(n * d);
    embedding_forward(out.data(), table.data(), ids.data(), n, d, V);
    ref::embedding_forward(out_ref.data(), table.data(), ids.data(), n, d, V);
    CHECK(out == out_ref);
    CHECK(out[static_cast<std::size_t>(3 * d + 4)] == table[static_cast<std::size_t>(ids[3] * d + 4)]);

    Vec dt = randn(V * d, 34), dt_ref = dt;  // accumulates into what is there
    embedding_backward(dt.data(), dout.data(), ids.data(), n, d, V);
    ref::embedding_backward(dt_ref.data(), dout.data(), ids.data(), n, d, V);
    CHECK(rel_err(dt, dt_ref) < 1e-5);

    const Vec dt0 = bf16_exact(randn(V * d, 35)), doutb = bf16_exact(dout);
    Vec dt32 = dt0;
    BVec dtb = to_bf16(dt0);
    embedding_backward(dt32.data(), doutb.data(), ids.data(), n, d, V);
    embedding_backward(dtb.data(), to_bf16(doutb).data(), ids.data(), n, d, V);
    CHECK(rel_err(to_f32(dtb), dt32) < 1e-2);
}

TEST_CASE("residual add, accumulate, cast and scale") {
    const std::int64_t n = 600;
    const Vec a = bf16_exact(randn(n, 41)), b = bf16_exact(randn(n, 42));
    Vec out(n), acc = a;
    residual_forward(out.data(), a.data(), b.data(), n);
    residual_accumulate(acc.data(), b.data(), n);
    for (std::size_t i = 0; i < a.size(); ++i) {
        CHECK(out[i] == a[i] + b[i]);
        CHECK(acc[i] == a[i] + b[i]);
    }
    BVec outb(a.size());
    residual_forward(outb.data(), to_bf16(a).data(), to_bf16(b).data(), n);
    CHECK(rel_err(to_f32(outb), out) < 1e-2);

    BVec cb(a.size());
    cast(cb.data(), a.data(), n);
    CHECK(to_f32(cb) == to_f32(to_bf16(a)));
    Vec s(a.size());
    scale(s.data(), a.data(), n, 8.0f);
    CHECK(s[7] == 8.0f * a[7]);
    zero(s.data(), n);
    CHECK(std::all_of(s.begin(), s.end(), [](float v) { return v == 0.0f; }));
}

TEST_CASE("fill_uniform: element i is the (i+1)-th splitmix64 output from the key, uniform from -h up to h") {
    // Key 0: element 0 is splitmix64's first output from seed 0, the published 0xE220A8397B1DCDAF;
    // its top 24 bits 0xE220A8 = 14819496 give u = 14819496 / 2^24 and, with h = 1,
    // 2u - 1 = 12861776 / 2^24 (exact in fp32).
    Vec x(3);
    fill_uniform(x.data(), 3, 1.0f, 0);
    CHECK(x[0] == 12861776.0f / 16777216.0f);
    // Key 42, h = 0.02f: z = 0xBDD732262FEB6E95, top 24 bits 12441394, 2u - 1 = 8105572 / 2^23;
    // 0.02f times that, rounded once to fp32, is 0x1.3c9fb8p-7 (Python: struct-rounded product).
    fill_uniform(x.data(), 3, 0.02f, 42);
    CHECK(x[0] == 0x1.3c9fb8p-7f);
    CHECK(x[1] == -0x1.bdc324p-7f);

    // Counter-based: a shorter fill is a prefix of a longer one; another key gives other values.
    const std::int64_t n = 100000;
    const float h = 0.05f;
    Vec big(static_cast<std::size_t>(n)), other(big.size());
    fill_uniform(big.data(), n, h, 1234);
    fill_uniform(other.data(), n, h, 1235);
    Vec prefix(1000);
    fill_uniform(prefix.data(), 1000, h, 1234);
    CHECK(std::equal(prefix.begin(), prefix.end(), big.begin()));
    std::int64_t same = 0;  // 24-bit values: a position agrees by chance with probability 2^-24
    for (std::size_t i = 0; i < big.size(); ++i) same += big[i] == other[i] ? 1 : 0;
    CHECK(same < 5);

    // Uniform on [-h, h): mean 0 (sd of the sample mean h / sqrt(3 n) = 1.8e-3 h) and standard
    // deviation h / sqrt(3) (sample sd's relative sd ~1.4e-3 here); bounds 5 and 7 sigmas.
    double sum = 0.0, sq = 0.0;
    for (float v : big) {
        sum += v;
        sq += double(v) * v;
    }
    const double count = static_cast<double>(n), mean = sum / count, sd = std::sqrt(sq / count - mean * mean);
    CHECK(std::fabs(mean) < 0.01 * h);
    CHECK(sd == doctest::Approx(h / std::sqrt(3.0)).epsilon(0.01));
    CHECK(std::all_of(big.begin(), big.end(), [h](float v) { return v >= -h && v < h; }));

    // bf16 storage holds the fp32 values rounded once (round to nearest even)
    BVec b(big.size());
    fill_uniform(b.data(), n, h, 1234);
    CHECK(to_f32(b) == bf16_exact(big));
}

TEST_CASE("fill: every element takes the value, in either storage") {
    Vec x(300, 1.0f);
    fill(x.data(), 299, -2.5f);  // n > kBlock, and the last element untouched
    CHECK(std::count(x.begin(), x.end(), -2.5f) == 299);
    CHECK(x[299] == 1.0f);
    BVec b(300);
    fill(b.data(), 300, 0.1f);
    CHECK(std::all_of(b.begin(), b.end(), [](bf16 v) { return static_cast<float>(v) == static_cast<float>(bf16(0.1f)); }));
}

TEST_CASE("soft-capping: cap * tanh(x / cap) and its backward from the saved output") {
    const std::int64_t n = 40;
    const float cap = 2.5f;
    Vec x = randn(n, 51, 3.0f);
    Vec y(n);
    softcap_forward(y.data(), x.data(), n, cap);
    CHECK(y[3] == doctest::Approx(cap * std::tanh(x[3] / cap)));
    CHECK(std::all_of(y.begin(), y.end(), [&](float v) { return std::fabs(v) < cap; }));
    const Vec w = randn(n, 52);
    Vec dx(n);
    softcap_backward(dx.data(), w.data(), y.data(), n, cap);
    auto loss = [&] {
        Vec yy(static_cast<std::size_t>(n));
        softcap_forward(yy.data(), x.data(), n, cap);
        return dot(yy, w);
    };
    CHECK(fd_error(x, dx, loss, 40, 53) < 1e-3);
}

// ---- RMSNorm ------------------------------------------------------------------------------------

TEST_CASE("rmsnorm: fast equals the reference, Llama and Gemma gains") {
    const std::int64_t n = 9, d = 300;  // d > kBlock
    const Vec x = randn(n * d, 61), w = randn(d, 62), dy = randn(n * d, 63);
    for (NormKind kind : {NormKind::Llama, NormKind::Gemma}) {
        CAPTURE(static_cast<int>(kind));
        Vec y(n * d), y_ref(n * d), rs(n), rs_ref(n);
        rmsnorm_forward(y.data(), rs.data(), x.data(), w.data(), n, d, 1e-6f, kind);
        ref::rmsnorm_forward(y_ref.data(), rs_ref.data(), x.data(), w.data(), n, d, 1e-6f, kind);
        CHECK(rel_err(y, y_ref) < 1e-5);
        CHECK(rel_err(rs, rs_ref) < 1e-5);
        Vec dx(n * d), dx_ref(n * d), dw = randn(d, 64), dw_ref = dw;
        rmsnorm_backward(dx.data(), dw.data(), dy.data(), x.data(), w.data(), rs.data(), n, d, kind);
        ref::rmsnorm_backward(dx_ref.data(), dw_ref.data(), dy.data(), x.data(), w.data(), rs.data(), n, d, kind);
        CHECK(rel_err(dx, dx_ref) < 1e-5);
        CHECK(rel_err(dw, dw_ref) < 1e-5);
        // dx may overwrite dy in place.
        Vec inplace = dy, dw2 = randn(d, 64);
        rmsnorm_backward(inplace.data(), dw2.data(), inplace.data(), x.data(), w.data(), rs.data(), n, d, kind);
        CHECK(inplace == dx);
        CHECK(dw2 == dw);
    }
}

TEST_CASE("rmsnorm: a row by hand") {
    // x = (3, 4): mean(x^2) = 12.5, rstd = 1/sqrt(12.5); Gemma gain 1 + w with w = (0, 1).
    const Vec x = {3, 4}, w = {0, 1};
    Vec y(2), rs(1);
    rmsnorm_forward(y.data(), rs.data(), x.data(), w.data(), 1, 2, 0.0f, NormKind::Gemma);
    CHECK(rs[0] == doctest::Approx(1.0 / std::sqrt(12.5)));
    CHECK(y[0] == doctest::Approx(3.0 / std::sqrt(12.5)));
    CHECK(y[1] == doctest::Approx(8.0 / std::sqrt(12.5)));
}

TEST_CASE("rmsnorm: dx and dw equal finite differences") {
    const std::int64_t n = 4, d = 40;
    for (NormKind kind : {NormKind::Llama, NormKind::Gemma}) {
        CAPTURE(static_cast<int>(kind));
        Vec x = randn(n * d, 71), w = randn(d, 72, 0.5f);
        const Vec g = randn(n * d, 73);
        auto loss = [&] {
            Vec y(static_cast<std::size_t>(n * d));
            rmsnorm_forward(y.data(), nullptr, x.data(), w.data(), n, d, 1e-5f, kind);
            return dot(y, g);
        };
        Vec y(n * d), rs(n), dx(n * d), dw(d, 0.5f);
        rmsnorm_forward(y.data(), rs.data(), x.data(), w.data(), n, d, 1e-5f, kind);
        rmsnorm_backward(dx.data(), dw.data(), g.data(), x.data(), w.data(), rs.data(), n, d, kind);
        for (float& v : dw) v -= 0.5f;  // dw accumulated onto 0.5
        CHECK(fd_error(x, dx, loss, 60, 74) < 1e-3);
        CHECK(fd_error(w, dw, loss, 40, 75) < 1e-3);
    }
}

TEST_CASE("rmsnorm: bf16 storage agrees with fp32") {
    const std::int64_t n = 8, d = 64;
    const Vec x = bf16_exact(randn(n * d, 81)), w = bf16_exact(randn(d, 82)), dy = bf16_exact(randn(n * d, 83));
    Vec y(n * d), rs(n), dx(n * d), dw(d, 0.0f);
    rmsnorm_forward(y.data(), rs.data(), x.data(), w.data(), n, d, 1e-6f, NormKind::Llama);
    rmsnorm_backward(dx.data(), dw.data(), dy.data(), x.data(), w.data(), rs.data(), n, d, NormKind::Llama);
    const BVec xb = to_bf16(x), wb = to_bf16(w), dyb = to_bf16(dy);
    BVec yb(y.size()), dxb(dx.size()), dwb(dw.size(), bf16(0.0f));
    Vec rsb(n);
    rmsnorm_forward(yb.data(), rsb.data(), xb.data(), wb.data(), n, d, 1e-6f, NormKind::Llama);
    rmsnorm_backward(dxb.data(), dwb.data(), dyb.data(), xb.data(), wb.data(), rsb.data(), n, d, NormKind::Llama);
    CHECK(rel_err(to_f32(yb), y) < 1e-2);
    CHECK(rel_err(rsb, rs) < 1e-2);
    CHECK(rel_err(to_f32(dxb), dx) < 1e-2);
    CHECK(rel_err(to_f32(dwb), dw) < 1e-2);
}

// ---- RoPE -----------------------------------------------------------------------------------------

TEST_CASE("rope: rotates pair (i, i + rot/2) by t * theta^(-2i/rot), dims past rot (Phi-3's partial rotary) pass through") {
    // rot = 4, theta = 100: inv_freq = (1, 1/10) (divided by rot, not hd); pairs (0, 2), (1, 3). Row t
    // holds x = (1, 1, 0, 0) and, when hd = 6, (3, -2) after them. One head, S = 4.
    for (const std::int64_t hd : {4, 6}) {
        CAPTURE(hd);
        const std::int64_t S = 4, rot = 4;
        Vec x(S * hd, 0.0f);
        for (std::int64_t t = 0; t < S; ++t) {
            x[t * hd] = x[t * hd + 1] = 1.0f;
            if (hd == 6) x[t * hd + 4] = 3.0f, x[t * hd + 5] = -2.0f;
        }
        rope_apply(x.data(), 1, S, 1, hd, rot, 100.0f, false);
        for (std::int64_t t = 0; t < S; ++t) {
            const double a0 = double(t), a1 = double(t) / 10.0;
            CHECK(x[t * hd + 0] == doctest::Approx(std::cos(a0)).epsilon(1e-6));
            CHECK(x[t * hd + 2] == doctest::Approx(std::sin(a0)).epsilon(1e-6));
            CHECK(x[t * hd + 1] == doctest::Approx(std::cos(a1)).epsilon(1e-6));
            CHECK(x[t * hd + 3] == doctest::Approx(std::sin(a1)).epsilon(1e-6));
            if (hd == 6) CHECK((x[t * hd + 4] == 3.0f && x[t * hd + 5] == -2.0f));
        }
        // position 0 is the identity
        CHECK(x[0] == 1.0f);
        CHECK(x[2] == 0.0f);
    }
}

TEST_CASE("rope: fast equals the reference, each sequence of a micro-batch restarts at position 0") {
    const std::int64_t B = 2, S = 13, nh = 3, nkv = 1, hd = 16;
    const Vec q0 = bf16_exact(randn(B * S * nh * hd, 91)), k0 = randn(B * S * nkv * hd, 92);
    Vec q = q0, k = k0, q_ref = q0;
    rope_forward(q.data(), k.data(), B, S, nh, nkv, hd, hd, 10000.0f);
    ref::rope_apply(q_ref.data(), B, S, nh, hd, hd, 10000.0f, false);
    CHECK(rel_err(q, q_ref) < 1e-5);
    CHECK(std::equal(q.begin(), q.begin() + nh * hd, q0.begin()));
    CHECK(std::equal(q.begin() + S * nh * hd, q.begin() + (S + 1) * nh * hd, q0.begin() + S * nh * hd));
}

TEST_CASE("rope: whole and partial rotary equal the reference, pass the dims past rot through bit for bit, backward "
          "inverts forward and equals finite differences") {
    struct Case {
        std::int64_t hd, rot;
    };
    for (const Case pc : {Case{16, 16}, Case{16, 12}, Case{64, 48}, Case{16, 2}}) {
        CAPTURE(pc.hd);
        CAPTURE(pc.rot);
        const std::int64_t B = 2, S = 13, nh = 3, nkv = 2, hd = pc.hd, rot = pc.rot;
        const Vec q0 = bf16_exact(randn(B * S * nh * hd, 96)), k0 = randn(B * S * nkv * hd, 97);
        Vec q = q0, k = k0, q_ref = q0, k_ref = k0;
        rope_forward(q.data(), k.data(), B, S, nh, nkv, hd, rot, 10000.0f);
        ref::rope_apply(q_ref.data(), B, S, nh, hd, rot, 10000.0f, false);
        ref::rope_apply(k_ref.data(), B, S, nkv, hd, rot, 10000.0f, false);
        CHECK(rel_err(q, q_ref) < 1e-5);
        CHECK(rel_err(k, k_ref) < 1e-5);
        // dims [rot, hd) of every head pass through bit for bit (fast kernel and reference alike)
        bool pass_q = true, pass_k = true, pass_ref = true;
        for (std::int64_t rh = 0; rh < B * S * nh; ++rh)
            for (std::int64_t e = rot; e < hd; ++e) {
                pass_q = pass_q && q[rh * hd + e] == q0[rh * hd + e];
                pass_ref = pass_ref && q_ref[rh * hd + e] == q0[rh * hd + e];
            }
        for (std::int64_t rh = 0; rh < B * S * nkv; ++rh)
            for (std::int64_t e = rot; e < hd; ++e) pass_k = pass_k && k[rh * hd + e] == k0[rh * hd + e];
        CHECK(pass_q);
        CHECK(pass_k);
        CHECK(pass_ref);
        // the rotated dims do rotate (t > 0), so the check above is not vacuous
        CHECK(q[(S - 1) * nh * hd] != q0[(S - 1) * nh * hd]);

        rope_backward(q.data(), k.data(), B, S, nh, nkv, hd, rot, 10000.0f);
        CHECK(rel_err(q, q0) < 1e-6);
        CHECK(rel_err(k, k0) < 1e-6);

        Vec x = randn(B * S * nkv * hd, 98);
        const Vec w = randn(x.size(), 99);
        Vec dx = w;
        rope_apply(dx.data(), B, S, nkv, hd, rot, 500.0f, true);
        auto loss = [&] {
            Vec y = x;
            rope_apply(y.data(), B, S, nkv, hd, rot, 500.0f, false);
            return dot(y, w);
        };
        CHECK(fd_error(x, dx, loss, 60, 100) < 1e-3);

        BVec qb = to_bf16(q0);
        rope_apply(qb.data(), B, S, nh, hd, rot, 10000.0f, false);
        CHECK(rel_err(to_f32(qb), q_ref) < 1e-2);
        const Vec qbf = to_f32(qb);
        bool pass_b = true;
        for (std::int64_t rh = 0; rh < B * S * nh; ++rh)
            for (std::int64_t e = rot; e < hd; ++e) pass_b = pass_b && qbf[rh * hd + e] == q0[rh * hd + e];
        CHECK(pass_b);
    }
}

TEST_CASE("rope: rotary_dim must be even, at least 2 and at most head_dim") {
    Vec x(2 * 8, 0.0f);
    CHECK_THROWS_WITH_AS(rope_apply(x.data(), 1, 2, 1, 8, 7, 1e4f, false),
                         "rope_apply: rotary_dim must be even and in [2, head_dim]", std::logic_error);
    CHECK_THROWS_AS(rope_apply(x.data(), 1, 2, 1, 8, 0, 1e4f, false), std::logic_error);
    CHECK_THROWS_AS(rope_apply(x.data(), 1, 2, 1, 8, 10, 1e4f, false), std::logic_error);
    CHECK_THROWS_AS(rope_forward(x.data(), x.data(), 1, 2, 1, 1, 8, 5, 1e4f), std::logic_error);
    CHECK_NOTHROW(rope_apply(x.data(), 1, 2, 1, 8, 2, 1e4f, false));
}

// ---- attention ----------------------------------------------------------------------------------

namespace {

struct AttnCase {
    const char* name;
    AttentionConfig c;
};

AttentionConfig cfg(std::int64_t B, std::int64_t S, std::int64_t nh, std::int64_t nkv, std::int64_t hd,
                    std::int64_t window = 0, float softcap = 0.0f, float scale_ = 0.0f) {
    AttentionConfig c;
    c.B = B, c.S = S, c.nh = nh, c.nkv = nkv, c.hd = hd, c.window = window, c.softcap = softcap;
    c.scale = scale_ > 0.0f ? scale_ : default_scale(hd);
    return c;
}

// Sequence lengths are not multiples of kAttnTile (16), so every run has partial tiles.
const std::vector<AttnCase>& attention_cases() {
    static const std::vector<AttnCase> cases = {
        {"MHA", cfg(2, 37, 2, 2, 16)},
        {"GQA", cfg(1, 53, 4, 2, 16)},
        {"MQA + sliding window", cfg(1, 45, 3, 1, 8, 7)},
        {"window shorter than a tile, S < tile", cfg(2, 11, 2, 1, 8, 3)},
        {"soft-capping", cfg(1, 29, 2, 1, 32, 0, 1.5f)},
        {"GQA + window + soft-capping (Gemma-2)", cfg(2, 77, 4, 2, 16, 20, 3.0f, 0.4f)},
    };
    return cases;
}

struct AttnData {
    Vec q, k, v, dout;
};

AttnData attn_data(const AttentionConfig& c, unsigned seed) {
    const std::int64_t qn = c.B * c.S * c.nh * c.hd, kvn = c.B * c.S * c.nkv * c.hd;
    return {randn(qn, seed, 1.5f), randn(kvn, seed + 1, 1.5f), randn(kvn, seed + 2), randn(qn, seed + 3)};
}

struct AttnOut {
    Vec o, lse, dq, dk, dv;
};

// Flash forward and backward; with sinks (c.sinks set), their gradient from lse and delta into *dsinks.
AttnOut run_flash(const AttentionConfig& c, const AttnData& a, Vec* dsinks = nullptr) {
    AttnOut r{Vec(a.q.size()), Vec(static_cast<std::size_t>(flash_lse_floats(c))), Vec(a.q.size()), Vec(a.k.size()),
              Vec(a.k.size())};
    flash_attention_forward(r.o.data(), r.lse.data(), a.q.data(), a.k.data(), a.v.data(), c);
    Vec dq_ws(static_cast<std::size_t>(flash_dq_workspace_floats(c)));
    Vec delta(static_cast<std::size_t>(flash_delta_workspace_floats(c)));
    flash_attention_backward(r.dq.data(), r.dk.data(), r.dv.data(), dq_ws.data(), delta.data(), a.dout.data(),
                             a.q.data(), a.k.data(), a.v.data(), r.o.data(), r.lse.data(), c);
    if (dsinks) {
        dsinks->assign(static_cast<std::size_t>(c.nh), 0.0f);
        attention_sinks_backward(dsinks->data(), r.lse.data(), delta.data(), c);
    }
    return r;
}

AttnOut run_eager(const AttentionConfig& c, const AttnData& a, Vec* probs_out = nullptr) {
    AttnOut r{Vec(a.q.size()), {}, Vec(a.q.size()), Vec(a.k.size()), Vec(a.k.size())};
    const auto ss = static_cast<std::size_t>(eager_scores_floats(c));
    Vec p32(ss), p(ss), th(ss), ds(ss);
    eager_attention_forward(r.o.data(), p32.data(), p.data(), th.data(), a.q.data(), a.k.data(), a.v.data(), c);
    eager_attention_backward(r.dq.data(), r.dk.data(), r.dv.data(), ds.data(), a.dout.data(), a.q.data(), a.k.data(),
                             a.v.data(), p32.data(), p.data(), th.data(), c);
    if (probs_out) *probs_out = p32;
    return r;
}

AttnOut run_reference(const AttentionConfig& c, const AttnData& a) {
    AttnOut r{Vec(a.q.size()), Vec(static_cast<std::size_t>(flash_lse_floats(c))), Vec(a.q.size()), Vec(a.k.size()),
              Vec(a.k.size())};
    ref::attention_forward(r.o.data(), r.lse.data(), a.q.data(), a.k.data(), a.v.data(), c);
    ref::attention_backward(r.dq.data(), r.dk.data(), r.dv.data(), a.dout.data(), a.q.data(), a.k.data(), a.v.data(),
                            c);
    return r;
}

}  // namespace

TEST_CASE("attention: flash and eager equal the full-scores reference, forward and backward") {
    unsigned seed = 100;
    for (const auto& tc : attention_cases()) {
        CAPTURE(tc.name);
        const AttnData a = attn_data(tc.c, seed += 10);
        const AttnOut want = run_reference(tc.c, a), flash = run_flash(tc.c, a), eager = run_eager(tc.c, a);
        CHECK(rel_err(flash.o, want.o) < 1e-5);
        CHECK(rel_err(flash.lse, want.lse) < 1e-5);
        CHECK(rel_err(eager.o, want.o) < 1e-5);
        CHECK(rel_err(flash.o, eager.o) < 1e-5);
        for (auto [got, name] : {std::pair{&flash, "flash"}, std::pair{&eager, "eager"}}) {
            CAPTURE(name);
            CHECK(rel_err(got->dq, want.dq) < 1e-5);
            CHECK(rel_err(got->dk, want.dk) < 1e-5);
            CHECK(rel_err(got->dv, want.dv) < 1e-5);
        }
    }
}

TEST_CASE("attention: eager probabilities are causal, windowed and sum to one") {
    const AttentionConfig c = cfg(1, 21, 2, 1, 8, 5, 2.0f);
    const AttnData a = attn_data(c, 200);
    Vec p;
    run_eager(c, a, &p);
    for (std::int64_t h = 0; h < c.nh; ++h)
        for (std::int64_t t = 0; t < c.S; ++t) {
            double sum = 0.0;
            bool mask_ok = true;
            for (std::int64_t u = 0; u < c.S; ++u) {
                const float pu = p[static_cast<std::size_t>((h * c.S + t) * c.S + u)];
                const bool seen = u <= t && t - u < 5;
                mask_ok = mask_ok && (seen ? pu > 0.0f : pu == 0.0f);
                sum += pu;
            }
            CHECK(mask_ok);
            CHECK(sum == doctest::Approx(1.0).epsilon(1e-6));
        }
    // The first query sees only itself: its output is v_0 of its kv head.
    const AttnOut r = run_eager(c, a);
    CHECK(r.o[0] == doctest::Approx(a.v[0]));
}

TEST_CASE("attention: flash backward equals finite differences (GQA, window, soft-capping)") {
    const AttentionConfig c = cfg(1, 21, 4, 2, 8, 6, 2.0f);
    AttnData a = attn_data(c, 300);
    const AttnOut g = run_flash(c, a);  // dout plays the weights w of L = sum(w * o)
    auto loss = [&] {
        Vec o(a.q.size()), lse(static_cast<std::size_t>(flash_lse_floats(c)));
        flash_attention_forward(o.data(), lse.data(), a.q.data(), a.k.data(), a.v.data(), c);
        return dot(o, a.dout);
    };
    CHECK(fd_error(a.q, g.dq, loss, 60, 301) < 1e-3);
    CHECK(fd_error(a.k, g.dk, loss, 60, 302) < 1e-3);
    CHECK(fd_error(a.v, g.dv, loss, 60, 303) < 1e-3);
}

// ---- attention sinks (gpt-oss) -----------------------------------------------------------------

TEST_CASE("attention sinks: by hand, one key: o = v / (1 + exp(sink - s)), lse = log(exp(s) + exp(sink))") {
    AttentionConfig c = cfg(1, 1, 1, 1, 4, 0, 0.0f, 1.0f);
    const Vec sinks = {0.5f};
    c.sinks = sinks.data();
    const AttnData a{{1.0f, 0.0f, 0.0f, 0.0f}, {2.0f, 0.0f, 0.0f, 0.0f}, {1.0f, -2.0f, 3.0f, 4.0f}, {1.0f, 0.0f, 0.0f, 0.0f}};
    Vec dsinks;
    const AttnOut r = run_flash(c, a, &dsinks);
    const double p = 1.0 / (1.0 + std::exp(0.5 - 2.0));  // the key's probability; the sink takes the rest
    CHECK(r.o[0] == doctest::Approx(p * 1.0));
    CHECK(r.o[1] == doctest::Approx(p * -2.0));
    CHECK(r.lse[0] == doctest::Approx(std::log(std::exp(2.0) + std::exp(0.5))));
    // L = o_0 = p v_0: dL/dsink = -p (1 - p) v_0
    CHECK(dsinks[0] == doctest::Approx(-p * (1.0 - p) * 1.0));
}

TEST_CASE("attention sinks: flash equals the full-scores reference, forward and backward, and the sinks' gradient equals finite differences") {
    for (const auto& tc : attention_cases()) {
        CAPTURE(tc.name);
        AttentionConfig c = tc.c;
        Vec sinks = randn(c.nh, 700, 2.0f);
        c.sinks = sinks.data();
        AttnData a = attn_data(c, 710);
        Vec dsinks;
        const AttnOut got = run_flash(c, a, &dsinks);
        const AttnOut want = run_reference(c, a);
        CHECK(rel_err(got.o, want.o) < 1e-5);
        CHECK(rel_err(got.lse, want.lse) < 1e-5);
        CHECK(rel_err(got.dq, want.dq) < 1e-4);
        CHECK(rel_err(got.dk, want.dk) < 1e-4);
        CHECK(rel_err(got.dv, want.dv) < 1e-4);
        Vec dsinks_ref(static_cast<std::size_t>(c.nh));
        ref::attention_sinks_backward(dsinks_ref.data(), a.dout.data(), a.q.data(), a.k.data(), a.v.data(), c);
        CHECK(rel_err(dsinks, dsinks_ref) < 1e-4);
        // The sinks take probability away: a different output than without them.
        AttentionConfig plain = c;
        plain.sinks = nullptr;
        CHECK(rel_err(run_flash(plain, a).o, got.o) > 1e-2);

        auto loss = [&] {
            Vec o(a.q.size()), lse(static_cast<std::size_t>(flash_lse_floats(c)));
            flash_attention_forward(o.data(), lse.data(), a.q.data(), a.k.data(), a.v.data(), c);
            return dot(o, a.dout);
        };
        // A sink moves every output of its head (B*S*hd of them): eps = 1e-2 keeps their fp32
        // rounding (~sqrt(B*S*hd) * 6e-8 / (2 eps)) well under the bound; truncation is ~1e-4.
        CHECK(fd_error(sinks, dsinks, loss, static_cast<int>(c.nh), 720, 1e-2f) < 1e-3);
        CHECK(fd_error(a.q, got.dq, loss, 40, 721) < 1e-3);
        CHECK(fd_error(a.k, got.dk, loss, 40, 722) < 1e-3);
    }
}

TEST_CASE("attention sinks: the gradient accumulates, bf16 sinks read as stored, and eager refuses sinks") {
    AttentionConfig c = cfg(2, 19, 4, 2, 8, 5);
    const Vec sinks = bf16_exact(randn(c.nh, 730));
    c.sinks = sinks.data();
    const AttnData a = attn_data(c, 740);
    Vec once;
    const AttnOut r = run_flash(c, a, &once);
    const BVec sinks_b = to_bf16(sinks);
    AttentionConfig cb = c;
    cb.sinks = sinks_b.data(), cb.sinks_dtype = DType::BF16;
    Vec again;
    const AttnOut rb = run_flash(cb, a, &again);
    CHECK(rb.o == r.o);  // the same values, stored in bf16
    CHECK(again == once);
    Vec delta(static_cast<std::size_t>(flash_delta_workspace_floats(c))), dq_ws(a.q.size()), dq(a.q.size()),
        dk(a.k.size()), dv(a.k.size());
    flash_attention_backward(dq.data(), dk.data(), dv.data(), dq_ws.data(), delta.data(), a.dout.data(), a.q.data(),
                             a.k.data(), a.v.data(), r.o.data(), r.lse.data(), c);
    Vec twice = once;
    attention_sinks_backward(twice.data(), r.lse.data(), delta.data(), c);
    for (std::size_t h = 0; h < once.size(); ++h) CHECK(twice[h] == doctest::Approx(2.0 * once[h]));
    const auto ss = static_cast<std::size_t>(eager_scores_floats(c));
    Vec o(a.q.size()), p32(ss), p(ss), th(ss);
    CHECK_THROWS_AS(eager_attention_forward(o.data(), p32.data(), p.data(), th.data(), a.q.data(), a.k.data(), a.v.data(), c),
                    std::logic_error);
}

TEST_CASE("attention: the dq workspace may be dq itself when dq is fp32") {
    const AttentionConfig c = cfg(1, 19, 2, 1, 8);
    const AttnData a = attn_data(c, 400);
    const AttnOut want = run_flash(c, a);
    Vec dq(a.q.size()), dk(a.k.size()), dv(a.k.size()), delta(static_cast<std::size_t>(flash_delta_workspace_floats(c)));
    flash_attention_backward(dq.data(), dk.data(), dv.data(), dq.data(), delta.data(), a.dout.data(), a.q.data(),
                             a.k.data(), a.v.data(), want.o.data(), want.lse.data(), c);
    CHECK(dq == want.dq);
    CHECK(dk == want.dk);
}

TEST_CASE("attention: eager over HF's repeated K/V equals eager GQA, and repeat_kv's backward sums the copies") {
    const AttentionConfig gqa = cfg(1, 23, 6, 2, 8, 9);
    const AttnData a = attn_data(gqa, 450);
    const AttnOut want = run_eager(gqa, a);
    AttentionConfig mha = gqa;
    mha.nkv = gqa.nh;
    const std::int64_t rows = gqa.B * gqa.S;
    AttnData rep = a;
    rep.k.resize(a.q.size());
    rep.v.resize(a.q.size());
    repeat_kv_forward(rep.k.data(), a.k.data(), rows, gqa.nh, gqa.nkv, gqa.hd);
    repeat_kv_forward(rep.v.data(), a.v.data(), rows, gqa.nh, gqa.nkv, gqa.hd);
    CHECK(rep.k[static_cast<std::size_t>(2 * gqa.hd + 1)] == a.k[1]);  // head 2 reads kv head 0 (rep = 3)
    CHECK(rep.k[static_cast<std::size_t>(3 * gqa.hd + 1)] == a.k[static_cast<std::size_t>(gqa.hd + 1)]);
    const AttnOut got = run_eager(mha, rep);
    CHECK(rel_err(got.o, want.o) < 1e-6);
    CHECK(rel_err(got.dq, want.dq) < 1e-6);
    Vec dk(a.k.size()), dv(a.v.size());
    repeat_kv_backward(dk.data(), got.dk.data(), rows, gqa.nh, gqa.nkv, gqa.hd);
    repeat_kv_backward(dv.data(), got.dv.data(), rows, gqa.nh, gqa.nkv, gqa.hd);
    CHECK(rel_err(dk, want.dk) < 1e-6);
    CHECK(rel_err(dv, want.dv) < 1e-6);
}

TEST_CASE("attention op by op (HF eager: scores, scale, mask, softmax, probs v) equals the fused eager kernel") {
    for (const AttentionConfig& c : {cfg(2, 37, 4, 4, 16), cfg(1, 45, 3, 3, 8, 7)}) {  // full causal; sliding window
        CAPTURE(c.window);
        const AttnData a = attn_data(c, 610);
        const AttnOut want = run_eager(c, a);
        const std::int64_t ss = c.B * c.nh * c.S * c.S, rows = c.B * c.nh * c.S;
        Vec scores(static_cast<std::size_t>(ss)), masked(scores.size()), p32(scores.size()), o(a.q.size());
        Vec mask(static_cast<std::size_t>(c.B * c.S * c.S));
        causal_mask_fill(mask.data(), c.B, c.S, c.window);
        CHECK(mask[1] == std::numeric_limits<float>::lowest());  // t = 0 does not see u = 1
        CHECK(mask[static_cast<std::size_t>(c.S)] == 0.0f);      // t = 1 sees u = 0
        attention_scores(scores.data(), a.q.data(), a.k.data(), c.B, c.S, c.nh, c.hd);
        scale(scores.data(), scores.data(), ss, c.scale);
        for (std::int64_t bh = 0; bh < c.B * c.nh; ++bh)
            residual_forward(masked.data() + bh * c.S * c.S, scores.data() + bh * c.S * c.S,
                             mask.data() + (bh / c.nh) * c.S * c.S, c.S * c.S);
        softmax_forward(p32.data(), masked.data(), rows, c.S);
        attention_apply(o.data(), p32.data(), a.v.data(), c.B, c.S, c.nh, c.hd);
        CHECK(rel_err(o, want.o) < 1e-6);
        // backward: d_probs = dout v^T, dv = probs^T dout, d_scores = softmax', dq = ds k, dk = ds^T q
        Vec dp(scores.size()), ds(scores.size()), dq(a.q.size()), dk(a.k.size()), dv(a.v.size());
        attention_scores(dp.data(), a.dout.data(), a.v.data(), c.B, c.S, c.nh, c.hd);
        attention_apply_transposed(dv.data(), p32.data(), a.dout.data(), c.B, c.S, c.nh, c.hd);
        softmax_backward(ds.data(), dp.data(), p32.data(), rows, c.S);
        scale(ds.data(), ds.data(), ss, c.scale);
        attention_apply(dq.data(), ds.data(), a.k.data(), c.B, c.S, c.nh, c.hd);
        attention_apply_transposed(dk.data(), ds.data(), a.q.data(), c.B, c.S, c.nh, c.hd);
        CHECK(rel_err(dq, want.dq) < 1e-5);
        CHECK(rel_err(dk, want.dk) < 1e-5);
        CHECK(rel_err(dv, want.dv) < 1e-6);
    }
    BVec mask_bf16(9);
    causal_mask_fill(mask_bf16.data(), 1, 3, 0);
    CHECK(std::isfinite(static_cast<float>(mask_bf16[1])));  // finfo(bf16).min, not -inf
    CHECK(static_cast<float>(mask_bf16[1]) < -3e38f);
}

TEST_CASE("attention: bf16 storage agrees with fp32, flash and eager") {
    const AttentionConfig c = cfg(2, 37, 4, 2, 16, 12, 4.0f);
    AttnData a = attn_data(c, 500);
    for (Vec* t : {&a.q, &a.k, &a.v, &a.dout}) *t = bf16_exact(*t);
    const AttnOut f32 = run_flash(c, a);
    const BVec q = to_bf16(a.q), k = to_bf16(a.k), v = to_bf16(a.v), dout = to_bf16(a.dout);
    BVec o(a.q.size()), dq(a.q.size()), dk(a.k.size()), dv(a.k.size());
    Vec lse(static_cast<std::size_t>(flash_lse_floats(c))), dq_ws(a.q.size()),
        delta(static_cast<std::size_t>(flash_delta_workspace_floats(c)));
    flash_attention_forward(o.data(), lse.data(), q.data(), k.data(), v.data(), c);
    flash_attention_backward(dq.data(), dk.data(), dv.data(), dq_ws.data(), delta.data(), dout.data(), q.data(),
                             k.data(), v.data(), o.data(), lse.data(), c);
    CHECK(rel_err(to_f32(o), f32.o) < 1e-2);
    CHECK(rel_err(lse, f32.lse) < 1e-2);
    CHECK(rel_err(to_f32(dq), f32.dq) < 1e-2);
    CHECK(rel_err(to_f32(dk), f32.dk) < 1e-2);
    CHECK(rel_err(to_f32(dv), f32.dv) < 1e-2);

    const auto ss = static_cast<std::size_t>(eager_scores_floats(c));
    Vec p32(ss), ds(ss);
    BVec p(ss), th(ss), oe(a.q.size()), dqe(a.q.size()), dke(a.k.size()), dve(a.k.size());
    eager_attention_forward(oe.data(), p32.data(), p.data(), th.data(), q.data(), k.data(), v.data(), c);
    eager_attention_backward(dqe.data(), dke.data(), dve.data(), ds.data(), dout.data(), q.data(), k.data(), v.data(),
                             p32.data(), p.data(), th.data(), c);
    CHECK(rel_err(to_f32(oe), f32.o) < 1e-2);
    CHECK(rel_err(to_f32(dqe), f32.dq) < 1e-2);
    CHECK(rel_err(to_f32(dke), f32.dk) < 1e-2);
    CHECK(rel_err(to_f32(dve), f32.dv) < 1e-2);
}

TEST_CASE("attention: broken shapes are refused") {
    Vec x(64), lse(8);
    CHECK_THROWS_AS(flash_attention_forward(x.data(), lse.data(), x.data(), x.data(), x.data(), cfg(1, 2, 3, 2, 8)),
                    std::logic_error);
    CHECK_THROWS_AS(flash_attention_forward(x.data(), lse.data(), x.data(), x.data(), x.data(),
                                            cfg(1, 1, 1, 1, kMaxHeadDim + 2)),
                    std::logic_error);
}

// ---- gated MLP ------------------------------------------------------------------------------------

TEST_CASE("swiglu: values by hand") {
    const Vec g = {1.0f, -2.0f}, u = {1.0f, 2.0f};
    Vec m(2);
    swiglu_forward(m.data(), g.data(), u.data(), 2, GatedAct::Silu);
    CHECK(m[0] == doctest::Approx(0.7310585786300049));         // silu(1) = 1 / (1 + e^-1)
    CHECK(m[1] == doctest::Approx(2.0 * -0.2384058440442351));  // silu(-2) = -2 / (1 + e^2)
    swiglu_forward(m.data(), g.data(), u.data(), 2, GatedAct::GeluTanh);
    CHECK(m[0] == doctest::Approx(0.8411919906082768));  // PyTorch gelu(1, approximate="tanh")
    CHECK(m[1] == doctest::Approx(2.0 * -0.04540230591222494));
}

TEST_CASE("swiglu: fast equals the reference and the backward equals finite differences") {
    for (GatedAct act : std::initializer_list<GatedAct>{GatedAct::Silu, GatedAct::GeluTanh, GatedAct::GptOss,
                                                        {GatedAct::GptOss, 3.0f}}) {  // (a config's own swiglu_limit)
        CAPTURE(static_cast<int>(act.kind));
        CAPTURE(act.limit);
        const std::int64_t n = 1000;  // several kBlock blocks
        // gpt-oss: inputs wide enough that about a fifth of them are clamped (|x| > 7 at sd 5.5)
        const float sd = act.kind == GatedAct::GptOss ? 5.5f : 1.0f;
        const Vec g = bf16_exact(randn(n, 601, 2.0f * sd)), u = bf16_exact(randn(n, 602, sd)), dm = bf16_exact(randn(n, 603));
        Vec m(n), m_ref(n), dg(n), du(n), dg_ref(n), du_ref(n);
        swiglu_forward(m.data(), g.data(), u.data(), n, act);
        ref::swiglu_forward(m_ref.data(), g.data(), u.data(), n, act);
        CHECK(rel_err(m, m_ref) < 1e-5);
        swiglu_backward(dg.data(), du.data(), dm.data(), g.data(), u.data(), n, act);
        ref::swiglu_backward(dg_ref.data(), du_ref.data(), dm.data(), g.data(), u.data(), n, act);
        CHECK(rel_err(dg, dg_ref) < 1e-5);
        CHECK(rel_err(du, du_ref) < 1e-5);

        // in place: dg over g, du over u
        Vec gi = g, ui = u;
        swiglu_backward(gi.data(), ui.data(), dm.data(), gi.data(), ui.data(), n, act);
        CHECK(gi == dg);
        CHECK(ui == du);

        const std::int64_t s = 50;
        Vec gs(g.begin(), g.begin() + s), us(u.begin(), u.begin() + s);
        const Vec w(dm.begin(), dm.begin() + s);
        auto loss = [&] {
            Vec mm(static_cast<std::size_t>(s));
            swiglu_forward(mm.data(), gs.data(), us.data(), s, act);
            return dot(mm, w);
        };
        Vec dgs(s), dus(s);
        swiglu_backward(dgs.data(), dus.data(), w.data(), gs.data(), us.data(), s, act);
        CHECK(fd_error(gs, dgs, loss, 50, 604) < 1e-3);
        CHECK(fd_error(us, dus, loss, 50, 605) < 1e-3);

        BVec mb(m.size()), dgb(m.size()), dub(m.size());
        swiglu_forward(mb.data(), to_bf16(g).data(), to_bf16(u).data(), n, act);
        swiglu_backward(dgb.data(), dub.data(), to_bf16(dm).data(), to_bf16(g).data(), to_bf16(u).data(), n, act);
        CHECK(rel_err(to_f32(mb), m) < 1e-2);
        CHECK(rel_err(to_f32(dgb), dg) < 1e-2);
        CHECK(rel_err(to_f32(dub), du) < 1e-2);
    }
}

TEST_CASE("swiglu: gpt-oss's clamped activation by hand") {
    // g = 1, u = 0.5: m = 1 * sigmoid(1.702) * 1.5; g = 10 and u = -9 clamp to 7 and -7: m = 7
    // sigmoid(11.914) * -6, and neither passes a gradient; at the bounds themselves both do.
    const Vec g = {1.0f, 10.0f, 7.0f}, u = {0.5f, -9.0f, -7.0f}, dm = {1.0f, 1.0f, 1.0f};
    Vec m(3), dg(3), du(3);
    swiglu_forward(m.data(), g.data(), u.data(), 3, GatedAct::GptOss);
    swiglu_backward(dg.data(), du.data(), dm.data(), g.data(), u.data(), 3, GatedAct::GptOss);
    const double s1 = 1.0 / (1.0 + std::exp(-1.702)), s7 = 1.0 / (1.0 + std::exp(-1.702 * 7.0));
    CHECK(m[0] == doctest::Approx(s1 * 1.5));
    CHECK(dg[0] == doctest::Approx(1.5 * (s1 + 1.702 * s1 * (1.0 - s1))));
    CHECK(du[0] == doctest::Approx(s1));
    CHECK(m[1] == doctest::Approx(7.0 * s7 * -6.0));
    CHECK(dg[1] == 0.0f);
    CHECK(du[1] == 0.0f);
    CHECK(m[2] == doctest::Approx(7.0 * s7 * -6.0));
    CHECK(dg[2] == doctest::Approx(-6.0 * (s7 + 1.702 * 7.0 * s7 * (1.0 - s7))));
    CHECK(du[2] == doctest::Approx(7.0 * s7));
}

TEST_CASE("swiglu: gpt-oss's clamp is the config's swiglu_limit") {
    // L = 3: g = 5 and u = 4 clamp to 3: m = 3 sigmoid(1.702 x 3) x 4, no gradient; g = 2.5, u = -2.5 pass.
    const Vec g = {5.0f, 2.5f}, u = {4.0f, -2.5f}, dm = {1.0f, 1.0f};
    Vec m(2), dg(2), du(2);
    const GatedAct act(GatedAct::GptOss, 3.0f);
    swiglu_forward(m.data(), g.data(), u.data(), 2, act);
    swiglu_backward(dg.data(), du.data(), dm.data(), g.data(), u.data(), 2, act);
    const double s3 = 1.0 / (1.0 + std::exp(-1.702 * 3.0)), s25 = 1.0 / (1.0 + std::exp(-1.702 * 2.5));
    CHECK(m[0] == doctest::Approx(3.0 * s3 * 4.0));
    CHECK(dg[0] == 0.0f);
    CHECK(du[0] == 0.0f);
    CHECK(m[1] == doctest::Approx(2.5 * s25 * -1.5));
    CHECK(du[1] == doctest::Approx(2.5 * s25));
}

// ---- a linear's bias -------------------------------------------------------------------------

TEST_CASE("bias: fast equals the reference, the gradient accumulates and equals finite differences") {
    const std::int64_t n = 37, o = 300;  // columns span two kBlock blocks
    const Vec x = randn(n * o, 801), b = randn(o, 802), w = randn(n * o, 803);
    Vec y = x, y_ref = x;
    bias_forward(y.data(), b.data(), n, o);
    ref::bias_forward(y_ref.data(), b.data(), n, o);
    CHECK(rel_err(y, y_ref) < 1e-6);
    CHECK(y[static_cast<std::size_t>(2 * o + 5)] == x[static_cast<std::size_t>(2 * o + 5)] + b[5]);
    Vec db(o, 1.0f), db_ref(o, 1.0f);  // accumulates onto what is there
    bias_backward(db.data(), w.data(), n, o);
    ref::bias_backward(db_ref.data(), w.data(), n, o);
    CHECK(rel_err(db, db_ref) < 1e-5);
    Vec bb = b, g(o, 0.0f);
    bias_backward(g.data(), w.data(), n, o);
    auto loss = [&] {
        Vec out = x;
        bias_forward(out.data(), bb.data(), n, o);
        return dot(out, w);
    };
    CHECK(fd_error(bb, g, loss, 60, 804) < 1e-3);
    BVec yb = to_bf16(x);
    bias_forward(yb.data(), to_bf16(b).data(), n, o);
    CHECK(rel_err(to_f32(yb), y) < 1e-2);
}

// ---- Mixture-of-Experts routing, dispatch, combine ---------------------------------------------

TEST_CASE("moe_route: a routing by hand (ties to the lower expert, renormalised weights, pairs sorted by expert)") {
    const std::int64_t n = 3, E = 4, k = 2;
    const Vec probs = {0.1f, 0.4f, 0.3f, 0.2f,      // token 0: experts 1, 2
                       0.25f, 0.25f, 0.25f, 0.25f,  // token 1: a four-way tie -> experts 0, 1
                       0.5f, 0.1f, 0.1f, 0.3f};     // token 2: experts 0, 3
    for (bool normalize : {false, true}) {
        Vec w(n * k);
        std::vector<std::int64_t> idx(n * k), pos(n * k), offsets(E + 1);
        moe_route(w.data(), idx.data(), pos.data(), offsets.data(), probs.data(), n, E, k, normalize);
        CHECK(idx == std::vector<std::int64_t>{1, 2, 0, 1, 0, 3});
        // experts 0: pairs (1,0) (2,0) -> rows 0, 1; 1: (0,0) (1,1) -> 2, 3; 2: (0,1) -> 4; 3: (2,1) -> 5
        CHECK(offsets == std::vector<std::int64_t>{0, 2, 4, 5, 6});
        CHECK(pos == std::vector<std::int64_t>{2, 4, 0, 3, 1, 5});
        const Vec expected = normalize ? Vec{0.4f / 0.7f, 0.3f / 0.7f, 0.5f, 0.5f, 0.5f / 0.8f, 0.3f / 0.8f}
                                       : Vec{0.4f, 0.3f, 0.25f, 0.25f, 0.5f, 0.3f};
        CHECK(rel_err(w, expected) < 1e-6);
    }
}

TEST_CASE("moe_route: fast equals the reference, the backward equals finite differences") {
    const std::int64_t n = 40, E = 8, k = 3;
    // Per token a shuffle of well separated values (gaps 0.02 >> eps): no perturbation changes a choice.
    Vec probs(static_cast<std::size_t>(n * E));
    std::mt19937 gen(701);
    for (std::int64_t t = 0; t < n; ++t) {
        for (std::int64_t e = 0; e < E; ++e) probs[static_cast<std::size_t>(t * E + e)] = 0.05f + 0.02f * static_cast<float>(e);
        std::shuffle(probs.begin() + t * E, probs.begin() + (t + 1) * E, gen);
    }
    const Vec dw = randn(n * k, 702);
    for (bool normalize : {false, true}) {
        CAPTURE(normalize);
        Vec w(n * k), w_ref(n * k);
        std::vector<std::int64_t> idx(n * k), pos(n * k), offsets(E + 1), idx_ref(n * k), pos_ref(n * k), offsets_ref(E + 1);
        moe_route(w.data(), idx.data(), pos.data(), offsets.data(), probs.data(), n, E, k, normalize);
        ref::moe_route(w_ref.data(), idx_ref.data(), pos_ref.data(), offsets_ref.data(), probs.data(), n, E, k, normalize);
        CHECK(idx == idx_ref);
        CHECK(pos == pos_ref);
        CHECK(offsets == offsets_ref);
        CHECK(rel_err(w, w_ref) < 1e-6);

        Vec dprobs(n * E), dprobs_ref(n * E);
        moe_route_backward(dprobs.data(), dw.data(), probs.data(), idx.data(), n, E, k, normalize);
        ref::moe_route_backward(dprobs_ref.data(), dw.data(), probs.data(), idx.data(), n, E, k, normalize);
        CHECK(rel_err(dprobs, dprobs_ref) < 1e-5);
        Vec p = probs;
        auto loss = [&] {
            Vec ww(n * k);
            std::vector<std::int64_t> ii(n * k), pp(n * k), oo(E + 1);
            moe_route(ww.data(), ii.data(), pp.data(), oo.data(), p.data(), n, E, k, normalize);
            CHECK(ii == idx);
            return dot(ww, dw);
        };
        CHECK(fd_error(p, dprobs, loss, 200, 703) < 1e-3);
    }
}

TEST_CASE("moe gather and combine: the combine is the weighted sum of each token's rows, the gather its adjoint") {
    const std::int64_t n = 7, E = 5, k = 2, d = 300;  // d spans two kBlock blocks
    Vec probs = randn(n * E, 711);
    Vec w(n * k);
    std::vector<std::int64_t> idx(n * k), pos(n * k), offsets(E + 1);
    moe_route(w.data(), idx.data(), pos.data(), offsets.data(), probs.data(), n, E, k, true);
    const Vec x = randn(n * d, 712), ys = randn(n * k * d, 713), dy = randn(n * d, 714);

    Vec xs(n * k * d);
    moe_gather(xs.data(), x.data(), pos.data(), n, k, d);
    for (std::int64_t i = 0; i < n * k; ++i)
        for (std::int64_t c = 0; c < d; c += 37) CHECK(xs[pos[i] * d + c] == x[(i / k) * d + c]);

    Vec y(n * d), y_ref(n * d);
    moe_combine(y.data(), ys.data(), w.data(), pos.data(), n, k, d, false);
    ref::moe_combine(y_ref.data(), ys.data(), w.data(), pos.data(), n, k, d, false);
    CHECK(rel_err(y, y_ref) < 1e-6);
    Vec acc = x;  // accumulate: x + combine
    moe_combine(acc.data(), ys.data(), w.data(), pos.data(), n, k, d, true);
    for (std::size_t i = 0; i < acc.size(); ++i) acc[i] -= x[i];
    CHECK(rel_err(acc, y) < 1e-6);

    // <gather(x), z> = <x, combine with weights 1 (z)>
    Vec back(n * d);
    moe_combine(back.data(), ys.data(), nullptr, pos.data(), n, k, d, false);
    CHECK(std::fabs(dot(xs, ys) - dot(x, back)) < 1e-4 * std::fabs(dot(xs, ys)));

    Vec dys(n * k * d), dw(n * k), dys_ref(n * k * d), dw_ref(n * k);
    moe_combine_backward(dys.data(), dw.data(), dy.data(), ys.data(), w.data(), pos.data(), n, k, d);
    ref::moe_combine_backward(dys_ref.data(), dw_ref.data(), dy.data(), ys.data(), w.data(), pos.data(), n, k, d);
    CHECK(rel_err(dys, dys_ref) < 1e-6);
    CHECK(rel_err(dw, dw_ref) < 1e-5);
    Vec yv = ys, wv = w;
    auto loss = [&] {
        Vec out(n * d);
        moe_combine(out.data(), yv.data(), wv.data(), pos.data(), n, k, d, false);
        return dot(out, dy);
    };
    CHECK(fd_error(yv, dys, loss, 100, 715) < 1e-3);
    CHECK(fd_error(wv, dw, loss, n * k, 716) < 1e-3);

    // bf16 storage agrees with fp32
    BVec yb(n * d);
    moe_combine(yb.data(), to_bf16(ys).data(), w.data(), pos.data(), n, k, d, false);
    CHECK(rel_err(to_f32(yb), y) < 1e-2);
}

TEST_CASE("moe_route refuses a top-k outside 1..E") {
    Vec probs(4, 0.25f), w(8);
    std::vector<std::int64_t> idx(8), pos(8), offsets(5);
    CHECK_THROWS_AS(moe_route(w.data(), idx.data(), pos.data(), offsets.data(), probs.data(), 1, 4, 5, false), std::logic_error);
    CHECK_THROWS_AS(moe_route(w.data(), idx.data(), pos.data(), offsets.data(), probs.data(), 1, 4, 0, false), std::logic_error);
}

TEST_CASE("moe_route: NaN probabilities (a diverged step) route to expert 0 with NaN weights, in bounds") {
    const Vec nans(2 * 4, std::numeric_limits<float>::quiet_NaN());
    Vec w(2 * 2);
    std::vector<std::int64_t> idx(4), pos(4), offsets(5);
    moe_route(w.data(), idx.data(), pos.data(), offsets.data(), nans.data(), 2, 4, 2, true);
    CHECK(idx == std::vector<std::int64_t>{0, 0, 0, 0});
    CHECK(std::all_of(w.begin(), w.end(), [](float x) { return std::isnan(x); }));
    CHECK(pos == std::vector<std::int64_t>{0, 1, 2, 3});
    CHECK(offsets == std::vector<std::int64_t>{0, 4, 4, 4, 4});
}

// ---- cross-entropy -----------------------------------------------------------------------------

namespace {
// The loss is a log of a sum of V fp32 exponentials: its rounding (~1e-6 absolute) divided by
// 2*eps would reach a few 1e-4 of the gradient's scale (1/count) at eps = 1e-3. Log-softmax
// is smooth on the scale of 1 (third derivative <= 1), so eps = 1e-2 keeps the truncation
// error ~1e-5 while cutting the rounding term tenfold.
constexpr float kLogitEps = 1e-2f;

std::vector<std::int64_t> ce_labels(std::int64_t n, std::int64_t V, unsigned seed) {
    auto labels = random_ids(n, V, seed);
    labels[1] = labels[6] = labels[static_cast<std::size_t>(n - 1)] = kIgnoreIndex;  // padding / prompt tokens
    return labels;
}
}  // namespace

TEST_CASE("cross-entropy: uniform logits by hand") {
    // All-zero logits: loss = log V per row, gradient (1/V - onehot) * scale.
    const std::int64_t n = 2, V = 4;
    const std::vector<std::int64_t> labels = {2, kIgnoreIndex};
    Vec logits(n * V, 0.0f), logp(n * V);
    CHECK(cross_entropy_forward(logp.data(), logits.data(), labels.data(), n, V) == doctest::Approx(std::log(4.0)));
    Vec row_loss(n);
    CHECK(cross_entropy_fused(logits.data(), row_loss.data(), labels.data(), n, V, 0.5f, 0.0f) ==
          doctest::Approx(std::log(4.0)));
    CHECK(row_loss[1] == 0.0f);
    CHECK(logits == Vec{0.125f, 0.125f, -0.375f, 0.125f, 0, 0, 0, 0});
    CHECK(count_valid_labels(labels.data(), n) == 1);
}

TEST_CASE("cross-entropy (HF style): fast equals the reference, backward equals finite differences") {
    const std::int64_t n = 12, V = 97;
    Vec logits = randn(n * V, 701, 2.0f);
    const auto labels = ce_labels(n, V, 702);
    const auto count = static_cast<float>(count_valid_labels(labels.data(), n));
    Vec logp(n * V), logp_ref(n * V);
    const double loss = cross_entropy_forward(logp.data(), logits.data(), labels.data(), n, V);
    const double loss_ref = ref::cross_entropy_forward(logp_ref.data(), logits.data(), labels.data(), n, V);
    CHECK(loss == doctest::Approx(loss_ref).epsilon(1e-6));
    CHECK(rel_err(logp, logp_ref) < 1e-5);

    Vec grad(n * V), grad_ref(n * V);
    cross_entropy_backward(grad.data(), logp.data(), labels.data(), n, V, 1.0f / count);
    ref::cross_entropy_backward(grad_ref.data(), logp.data(), labels.data(), n, V, 1.0f / count);
    CHECK(rel_err(grad, grad_ref) < 1e-5);
    Vec inplace = logits;  // log_softmax over the fp32 logits buffer itself
    CHECK(cross_entropy_forward(inplace.data(), inplace.data(), labels.data(), n, V) == loss);
    CHECK(inplace == logp);
    cross_entropy_backward(inplace.data(), inplace.data(), labels.data(), n, V, 1.0f / count);  // over logp
    CHECK(inplace == grad);
    auto mean_loss = [&] {
        Vec lp(static_cast<std::size_t>(n * V));
        return cross_entropy_forward(lp.data(), logits.data(), labels.data(), n, V) / count;
    };
    CHECK(fd_error(logits, grad, mean_loss, 80, 703, kLogitEps) < 1e-3);
}

TEST_CASE("cross-entropy: nll_loss then log_softmax backward (HF's unfused path) equals the fused backward") {
    const std::int64_t n = 5, V = 37;
    const Vec logits = randn(n * V, 41, 2.0f);
    std::vector<std::int64_t> labels = {3, kIgnoreIndex, 36, 0, 17};
    Vec logp(static_cast<std::size_t>(n * V)), grad(logp.size()), dlogp(logp.size()), dx(logp.size());
    cross_entropy_forward(logp.data(), logits.data(), labels.data(), n, V);
    cross_entropy_backward(grad.data(), logp.data(), labels.data(), n, V, 0.25f);
    nll_loss_backward(dlogp.data(), labels.data(), n, V, 0.25f);
    CHECK(dlogp[3] == -0.25f);  // row 0, label 3
    CHECK(std::count(dlogp.begin(), dlogp.end(), 0.0f) == n * V - 4);
    log_softmax_backward(dx.data(), dlogp.data(), logp.data(), n, V);
    CHECK(rel_err(dx, grad) < 1e-6);
    log_softmax_backward(dlogp.data(), dlogp.data(), logp.data(), n, V);  // in place
    CHECK(dlogp == dx);
}

TEST_CASE("cross-entropy (fused): gradient equals the HF-style backward, with and without soft-capping") {
    const std::int64_t n = 12, V = 300;  // V > kBlock: the online logsumexp spans blocks
    const Vec logits = randn(n * V, 711, 3.0f);
    const auto labels = ce_labels(n, V, 712);
    const float scale_ = 1.0f / static_cast<float>(count_valid_labels(labels.data(), n));
    for (float cap : {0.0f, 5.0f}) {
        CAPTURE(cap);
        // HF: (softcap) -> log_softmax -> NLL; backward through each op.
        Vec z = logits;
        if (cap > 0.0f) softcap_forward(z.data(), logits.data(), n * V, cap);
        Vec logp(n * V), grad(n * V);
        const double loss = cross_entropy_forward(logp.data(), z.data(), labels.data(), n, V);
        cross_entropy_backward(grad.data(), logp.data(), labels.data(), n, V, scale_);
        if (cap > 0.0f) softcap_backward(grad.data(), grad.data(), z.data(), n * V, cap);

        Vec fused = logits, row_loss(n);
        const double fused_loss = cross_entropy_fused(fused.data(), row_loss.data(), labels.data(), n, V, scale_, cap);
        CHECK(fused_loss == doctest::Approx(loss).epsilon(1e-6));
        CHECK(rel_err(fused, grad) < 1e-5);
        double rows = 0.0;
        for (float r : row_loss) rows += r;
        CHECK(rows == doctest::Approx(fused_loss).epsilon(1e-6));
        for (std::int64_t j = 0; j < V; ++j) CHECK(fused[static_cast<std::size_t>(V + j)] == 0.0f);  // ignored row 1

        // finite differences of the fused loss itself
        Vec x = logits;
        auto mean_loss = [&] {
            Vec tmp = x;
            return cross_entropy_fused(tmp.data(), nullptr, labels.data(), n, V, scale_, cap) * double(scale_);
        };
        CHECK(fd_error(x, fused, mean_loss, 60, 713, kLogitEps) < 1e-3);
    }
}

TEST_CASE("cross-entropy: mini-sequence chunks of rows sum to the unchunked loss and gradient") {
    const std::int64_t n = 12, V = 60;
    const Vec logits = randn(n * V, 721, 2.0f);
    const auto labels = ce_labels(n, V, 722);
    const float scale_ = 1.0f / static_cast<float>(count_valid_labels(labels.data(), n));  // global count
    Vec whole = logits;
    const double loss = cross_entropy_fused(whole.data(), nullptr, labels.data(), n, V, scale_, 2.0f);
    Vec chunked = logits;
    double chunk_sum = 0.0, hf_sum = 0.0;
    for (std::int64_t r0 : {0, 5, 10}) {
        const std::int64_t rows = std::min<std::int64_t>(5, n - r0);
        chunk_sum += cross_entropy_fused(chunked.data() + r0 * V, nullptr, labels.data() + r0, rows, V, scale_, 2.0f);
        Vec logp(static_cast<std::size_t>(rows * V)), capped(logp.size());
        softcap_forward(capped.data(), logits.data() + r0 * V, rows * V, 2.0f);
        hf_sum += cross_entropy_forward(logp.data(), capped.data(), labels.data() + r0, rows, V);
    }
    CHECK(chunk_sum == doctest::Approx(loss).epsilon(1e-12));
    CHECK(hf_sum == doctest::Approx(loss).epsilon(1e-6));
    CHECK(chunked == whole);  // rows are independent: bitwise equal
}

TEST_CASE("cross-entropy: bf16 logits agree with fp32") {
    const std::int64_t n = 10, V = 100;
    const Vec logits = bf16_exact(randn(n * V, 731, 2.0f));
    const auto labels = ce_labels(n, V, 732);
    Vec f = logits;
    BVec b = to_bf16(logits);
    const double lf = cross_entropy_fused(f.data(), nullptr, labels.data(), n, V, 0.1f, 0.0f);
    const double lb = cross_entropy_fused(b.data(), nullptr, labels.data(), n, V, 0.1f, 0.0f);
    CHECK(lb == doctest::Approx(lf).epsilon(1e-2));
    CHECK(rel_err(to_f32(b), f) < 1e-2);
    Vec logp(n * V);
    CHECK(cross_entropy_forward(logp.data(), to_bf16(logits).data(), labels.data(), n, V) ==
          doctest::Approx(lf).epsilon(1e-2));
}

TEST_CASE("cross-entropy: a label outside the vocabulary is refused") {
    Vec logits(8, 0.0f), logp(8);
    const std::vector<std::int64_t> bad = {1, 4};
    CHECK_THROWS_AS(cross_entropy_forward(logp.data(), logits.data(), bad.data(), 2, 4), std::logic_error);
    CHECK_THROWS_AS(cross_entropy_fused(logits.data(), nullptr, bad.data(), 2, 4, 1.0f, 0.0f), std::logic_error);
    const std::vector<std::int64_t> ids = {0, 9};
    CHECK_THROWS_AS(embedding_forward(logits.data(), logp.data(), ids.data(), 2, 1, 4), std::logic_error);
}

// ---- optimizers ---------------------------------------------------------------------------------

TEST_CASE("adamw: the first step moves each weight by lr * sign(g) after decay") {
    // step 1: m_hat = g, v_hat = g^2, so the update is lr * g / (|g| + eps).
    const AdamWConfig c{0.01f, 0.9f, 0.999f, 1e-8f, 0.1f};
    Vec p = {1.0f, -2.0f, 0.5f}, m(3, 0.0f), v(3, 0.0f);
    const Vec g = {0.3f, -4.0f, 1e-3f};
    adamw_step(p.data(), g.data(), m.data(), v.data(), 3, c, 1);
    const float decay = 1.0f - 0.01f * 0.1f;
    CHECK(p[0] == doctest::Approx(1.0f * decay - 0.01f).epsilon(1e-6));
    CHECK(p[1] == doctest::Approx(-2.0f * decay + 0.01f).epsilon(1e-6));
    CHECK(p[2] == doctest::Approx(0.5f * decay - 0.01f).epsilon(1e-5));
    CHECK(m[1] == doctest::Approx(-0.4f));
    CHECK(v[1] == doctest::Approx(0.001f * 16.0f));
}

TEST_CASE("adamw: fast equals the reference over steps, bf16 params and states agree with fp32") {
    const std::int64_t n = 700;
    const AdamWConfig c{3e-3f, 0.9f, 0.95f, 1e-8f, 0.1f};
    Vec p = bf16_exact(randn(n, 801)), m(n, 0.0f), v(n, 0.0f);
    Vec pr = p, mr = m, vr = v;
    BVec pb = to_bf16(p), mb(n, bf16(0.0f)), vb(n, bf16(0.0f));
    Vec pmix = p;  // fp32 master weights with bf16 states
    for (std::int64_t step = 1; step <= 3; ++step) {
        const Vec g = bf16_exact(randn(n, 810 + static_cast<unsigned>(step)));
        adamw_step(p.data(), g.data(), m.data(), v.data(), n, c, step);
        ref::adamw_step(pr.data(), g.data(), mr.data(), vr.data(), n, c, step);
        BVec mb2 = mb, vb2 = vb;
        adamw_step(pb.data(), to_bf16(g).data(), mb.data(), vb.data(), n, c, step);
        adamw_step(pmix.data(), g.data(), mb2.data(), vb2.data(), n, c, step);
    }
    CHECK(rel_err(p, pr) < 1e-6);
    CHECK(rel_err(m, mr) < 1e-6);
    CHECK(rel_err(v, vr) < 1e-6);
    CHECK(rel_err(to_f32(pb), p) < 1e-2);
    CHECK(rel_err(to_f32(mb), m) < 1e-2);
    CHECK(rel_err(to_f32(vb), v) < 1e-2);
    CHECK(rel_err(pmix, p) < 1e-2);
}

TEST_CASE("sgd: momentum and Nesterov by hand, fast equals the reference") {
    // Constant gradient g: buf_1 = g, buf_2 = 0.9 g + g = 1.9 g.
    SgdConfig c;
    c.lr = 0.1f;
    c.momentum = 0.9f;
    Vec p = {1.0f}, buf = {0.0f};
    const Vec g = {2.0f};
    sgd_step(p.data(), g.data(), buf.data(), 1, c, 1);
    CHECK(p[0] == doctest::Approx(1.0 - 0.1 * 2.0));
    sgd_step(p.data(), g.data(), buf.data(), 1, c, 2);
    CHECK(p[0] == doctest::Approx(1.0 - 0.2 - 0.1 * 3.8));
    c.nesterov = true;
    p = {1.0f};
    sgd_step(p.data(), g.data(), buf.data(), 1, c, 1);  // g + 0.9 * buf_1 = 1.9 g
    CHECK(p[0] == doctest::Approx(1.0 - 0.1 * 3.8));

    const std::int64_t n = 500;
    SgdConfig c2{0.05f, 0.8f, 0.1f, 0.01f, true};
    Vec q = randn(n, 901), b(n), qr = q, br(n);
    for (std::int64_t step = 1; step <= 3; ++step) {
        const Vec gg = randn(n, 910 + static_cast<unsigned>(step));
        sgd_step(q.data(), gg.data(), b.data(), n, c2, step);
        ref::sgd_step(qr.data(), gg.data(), br.data(), n, c2, step);
    }
    CHECK(rel_err(q, qr) < 1e-6);
    CHECK(rel_err(b, br) < 1e-6);
    SgdConfig plain{0.1f, 0.0f, 0.0f, 0.0f, false};
    Vec r = {1.0f};
    sgd_step(r.data(), g.data(), Tensor{}, 1, plain, 1);  // no momentum: no buffer
    CHECK(r[0] == doctest::Approx(0.8));
}
