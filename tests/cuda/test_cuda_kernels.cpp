// Every CUDA kernel against its CPU twin (src/exec/cpu, itself checked against naive double
// references and finite differences in tests/test_cpu_kernels.cpp), on the same random inputs
// and the same starting bytes. Each test skips itself without a device.
//
// Tolerances, norm-wise (max|gpu - cpu| / max|cpu| over the tensor):
//  * fp32 storage, elementwise ops: 1e-6. Both sides evaluate the same fp32 formula; the device's
//    expf/tanhf/cosf differ from glibc's by at most a few ulp (~2e-7 relative).
//  * fp32 storage, reductions (norms, softmax, attention, GEMMs): 1e-4. The same sums in another
//    order: rounding grows like sqrt(terms) * 6e-8 per term, ~1e-6 for the few hundred terms
//    here, far under the bound; the bound leaves room for the GEMMs' k = 128..192-term dots and
//    attention's exp(s - lse) amplifying a 1e-6 score difference.
//  * bf16 storage: 1e-2. Each side rounds its outputs into bf16 once (2^-8 = 3.9e-3 relative
//    half-ulp); fp32 differences in front of the rounding flip a rounding now and then, so two
//    correct kernels differ by up to one bf16 ulp (7.8e-3 relative to the element, less
//    norm-wise). Saved bf16 intermediates (attention's o, the dq cast) add one rounding each.
//  * loss sums: relative 1e-5 (fp32 rows summed in float64 on both sides).
#include <doctest/doctest.h>

#include <cmath>
#include <initializer_list>
#include <limits>
#include <numeric>

#include "cuda/gemm.cuh"
#include "support.hpp"

using namespace mst::cuda_test;

namespace {

constexpr cpu::DType kDtypes[] = {cpu::DType::F32, cpu::DType::BF16};

double tol(cpu::DType t, double f32_tol) { return t == cpu::DType::F32 ? f32_tol : 1e-2; }

// inputs both storages hold exactly, so fp32 and bf16 runs start from equal values
Vec input(std::int64_t n, unsigned seed, cpu::DType t, float sd = 1.0f) {
    return t == cpu::DType::BF16 ? bf16_exact(randn(n, seed, sd)) : randn(n, seed, sd);
}

}  // namespace

TEST_SUITE("kernels") {

TEST_CASE("cuda elementwise: cast, scale, residual and soft-cap equal the CPU kernels") {
    MST_REQUIRE_DEVICE();
    const std::int64_t n = 10007;  // not a multiple of any block size
    for (cpu::DType t : kDtypes) {
        CAPTURE(int(t));
        Pair a(input(n, 1, t), t), b(input(n, 2, t), t), out(Vec(n, 0.0f), t);
        cpu::residual_forward(out.cpu(), a.cpu(), b.cpu(), n);
        gpu::residual_forward(out.gpu(), a.gpu(), b.gpu(), n);
        CHECK(rel_err(out.gpu_values(), out.cpu_values()) <= tol(t, 1e-6));

        cpu::residual_accumulate(a.cpu(), b.cpu(), n);
        gpu::residual_accumulate(a.gpu(), b.gpu(), n);
        CHECK(rel_err(a.gpu_values(), a.cpu_values()) <= tol(t, 1e-6));

        cpu::scale(out.cpu(), b.cpu(), n, 64.0f);
        gpu::scale(out.gpu(), b.gpu(), n, 64.0f);
        CHECK(rel_err(out.gpu_values(), out.cpu_values()) == 0.0);  // a power of two scales exactly

        Pair capped(Vec(n, 0.0f), t), dx(Vec(n, 0.0f), t), big(input(n, 3, t, 40.0f), t);
        cpu::softcap_forward(capped.cpu(), big.cpu(), n, 30.0f);
        gpu::softcap_forward(capped.gpu(), big.gpu(), n, 30.0f);
        CHECK(rel_err(capped.gpu_values(), capped.cpu_values()) <= tol(t, 1e-6));
        cpu::softcap_backward(dx.cpu(), b.cpu(), capped.cpu(), n, 30.0f);
        gpu::softcap_backward(dx.gpu(), b.gpu(), capped.gpu(), n, 30.0f);
        CHECK(rel_err(dx.gpu_values(), dx.cpu_values()) <= tol(t, 1e-6));

        // cast fp32 -> storage dtype: the same round-to-nearest-even on both sides
        Pair src(randn(n, 4), cpu::DType::F32), dst(Vec(n, 0.0f), t);
        cpu::cast(dst.cpu(), src.cpu(), n);
        gpu::cast(dst.gpu(), src.gpu(), n);
        CHECK(rel_err(dst.gpu_values(), dst.cpu_values()) == 0.0);

        gpu::zero(dst.gpu(), n);
        const Vec z = dst.gpu_values();
        CHECK(std::all_of(z.begin(), z.end(), [](float v) { return v == 0.0f; }));
    }
}

TEST_CASE("cuda fill_uniform and fill: bitwise the CPU kernels' values, fp32 and bf16") {
    MST_REQUIRE_DEVICE();
    const std::int64_t n = 100003;  // not a multiple of the block size
    const std::uint64_t key = 0xFEDCBA9876543210ull;  // high bits set: the 64-bit wrap-around matters
    for (cpu::DType t : kDtypes) {
        CAPTURE(int(t));
        Pair w(Vec(n, 0.0f), t), c(Vec(n, 0.0f), t);
        cpu::fill_uniform(w.cpu(), n, 0.02f, key);
        gpu::fill_uniform(w.gpu(), n, 0.02f, key);
        const Vec got = w.gpu_values(), want = w.cpu_values();
        CHECK(got == want);  // counter-based, one rounding each: the same bits, not merely close
        CHECK(std::count(want.begin(), want.end(), 0.0f) < 10);  // the CPU side really wrote values
        cpu::fill(c.cpu(), n, -0.3f);
        gpu::fill(c.gpu(), n, -0.3f);
        CHECK(c.gpu_values() == c.cpu_values());
    }
}

TEST_CASE("cuda embedding: gathers rows and scatter-adds the gradients of repeated ids") {
    MST_REQUIRE_DEVICE();
    const std::int64_t V = 50, d = 300, n = 40;
    auto ids = random_ids(n, V, 33);
    ids[5] = ids[9] = ids[17] = 7;  // a token three times: three rows add up
    const DeviceArray<std::int64_t> ids_dev(ids);
    for (cpu::DType t : kDtypes) {
        CAPTURE(int(t));
        Pair table(input(V * d, 31, t), t), out(Vec(n * d, 0.0f), t), dout(input(n * d, 32, t), t),
            dtable(input(V * d, 34, t), t);
        cpu::embedding_forward(out.cpu(), table.cpu(), ids.data(), n, d, V);
        gpu::embedding_forward(out.gpu(), table.gpu(), ids_dev.get(), n, d, V);
        CHECK(rel_err(out.gpu_values(), out.cpu_values()) == 0.0);  // a copy
        cpu::embedding_backward(dtable.cpu(), dout.cpu(), ids.data(), n, d, V);
        gpu::embedding_backward(dtable.gpu(), dout.gpu(), ids_dev.get(), n, d, V);
        // atomics add repeated ids in another order: fp32 rounding, or one bf16 rounding each
        CHECK(rel_err(dtable.gpu_values(), dtable.cpu_values()) <= tol(t, 1e-6));
    }
}

TEST_CASE("cuda RMSNorm: Llama and Gemma forward and backward equal the CPU kernels") {
    MST_REQUIRE_DEVICE();
    const std::int64_t n = 37, d = 300;  // d not a multiple of 32: partial lanes
    for (cpu::DType t : kDtypes)
        for (cpu::NormKind kind : {cpu::NormKind::Llama, cpu::NormKind::Gemma}) {
            CAPTURE(int(t));
            CAPTURE(int(kind));
            const auto gkind = kind == cpu::NormKind::Llama ? gpu::NormKind::Llama : gpu::NormKind::Gemma;
            Pair x(input(n * d, 41, t), t), w(input(d, 42, t, 0.5f), t), y(Vec(n * d, 0.0f), t),
                rstd(Vec(n, 0.0f), cpu::DType::F32);
            cpu::rmsnorm_forward(y.cpu(), static_cast<float*>(rstd.cpu().data), x.cpu(), w.cpu(), n, d, 1e-6f, kind);
            gpu::rmsnorm_forward(y.gpu(), static_cast<float*>(rstd.gpu().data), x.gpu(), w.gpu(), n, d, 1e-6f, gkind);
            CHECK(rel_err(y.gpu_values(), y.cpu_values()) <= tol(t, 1e-5));
            CHECK(rel_err(rstd.gpu_values(), rstd.cpu_values()) <= 1e-5);

            // backward with dx written over dy (the aliasing the executor uses)
            Pair dy(input(n * d, 43, t), t), dw(input(d, 44, t), t);
            cpu::rmsnorm_backward(dy.cpu(), dw.cpu(), dy.cpu(), x.cpu(), w.cpu(),
                                  static_cast<const float*>(rstd.cpu().data), n, d, kind);
            gpu::rmsnorm_backward(dy.gpu(), dw.gpu(), dy.gpu(), x.gpu(), w.gpu(),
                                  static_cast<const float*>(rstd.gpu().data), n, d, gkind);
            CHECK(rel_err(dy.gpu_values(), dy.cpu_values()) <= tol(t, 1e-4));
            CHECK(rel_err(dw.gpu_values(), dw.cpu_values()) <= tol(t, 1e-4));
        }
}

TEST_CASE("cuda RoPE: rotates q and k as the CPU kernel, and the backward undoes it (full and partial rotary)") {
    MST_REQUIRE_DEVICE();
    const std::int64_t B = 2, S = 33, nh = 4, nkv = 2, hd = 64;
    for (const std::int64_t rot : {hd, std::int64_t{48}})  // 48: Phi-3's partial rotary, dims [48, 64) pass through
        for (cpu::DType t : kDtypes) {
            CAPTURE(rot);
            CAPTURE(int(t));
            const Vec q0 = input(B * S * nh * hd, 51, t), k0 = input(B * S * nkv * hd, 52, t);
            Pair q(q0, t), k(k0, t);
            cpu::rope_forward(q.cpu(), k.cpu(), B, S, nh, nkv, hd, rot, 10000.0f);
            gpu::rope_forward(q.gpu(), k.gpu(), B, S, nh, nkv, hd, rot, 10000.0f);
            // angles up to 32 rad: cosf/sinf of the same fp32 angle agree to a few ulp
            CHECK(rel_err(q.gpu_values(), q.cpu_values()) <= tol(t, 1e-5));
            CHECK(rel_err(k.gpu_values(), k.cpu_values()) <= tol(t, 1e-5));
            const Vec qg = q.gpu_values();
            bool pass = true;  // the pass-through dims are untouched, bit for bit
            for (std::int64_t rh = 0; rh < B * S * nh; ++rh)
                for (std::int64_t e = rot; e < hd; ++e) pass = pass && qg[rh * hd + e] == q0[rh * hd + e];
            CHECK(pass);
            gpu::rope_backward(q.gpu(), k.gpu(), B, S, nh, nkv, hd, rot, 10000.0f);
            CHECK(rel_err(q.gpu_values(), q0) <= tol(t, 1e-5) * 2);  // bf16: rounded twice
        }
}

TEST_CASE("cuda flash attention: forward and backward equal the CPU flash kernels (GQA, window, soft-cap)") {
    MST_REQUIRE_DEVICE();
    struct Case {
        std::int64_t B, S, nh, nkv, hd, window;
        float softcap;
    };
    // S = 45 and 77 are no tile multiples; hd 16 and 40 leave lanes idle; 128 is Llama's.
    const Case cases[] = {{1, 45, 2, 2, 16, 0, 0.0f}, {2, 77, 4, 2, 40, 0, 0.0f}, {1, 70, 4, 1, 64, 20, 0.0f},
                          {1, 64, 2, 1, 32, 0, 5.0f}, {1, 50, 4, 2, 128, 17, 3.0f}};
    for (const Case& cs : cases)
        for (cpu::DType t : kDtypes) {
            CAPTURE(cs.S);
            CAPTURE(cs.hd);
            CAPTURE(cs.window);
            CAPTURE(cs.softcap);
            CAPTURE(int(t));
            cpu::AttentionConfig cc;
            cc.B = cs.B, cc.S = cs.S, cc.nh = cs.nh, cc.nkv = cs.nkv, cc.hd = cs.hd, cc.window = cs.window;
            cc.softcap = cs.softcap, cc.scale = cpu::default_scale(cs.hd);
            gpu::AttentionConfig gc;
            gc.B = cc.B, gc.S = cc.S, gc.nh = cc.nh, gc.nkv = cc.nkv, gc.hd = cc.hd, gc.window = cc.window;
            gc.softcap = cc.softcap, gc.scale = cc.scale;
            const std::int64_t nq = cc.B * cc.S * cc.nh * cc.hd, nkv = cc.B * cc.S * cc.nkv * cc.hd;
            Pair q(input(nq, 61, t), t), k(input(nkv, 62, t), t), v(input(nkv, 63, t), t), o(Vec(nq, 0.0f), t),
                lse(Vec(cpu::flash_lse_floats(cc), 0.0f), cpu::DType::F32);
            cpu::flash_attention_forward(o.cpu(), static_cast<float*>(lse.cpu().data), q.cpu(), k.cpu(), v.cpu(), cc);
            gpu::flash_attention_forward(o.gpu(), static_cast<float*>(lse.gpu().data), q.gpu(), k.gpu(), v.gpu(), gc);
            CHECK(rel_err(o.gpu_values(), o.cpu_values()) <= tol(t, 1e-4));
            CHECK(rel_err(lse.gpu_values(), lse.cpu_values()) <= 1e-5);

            // backward from the CPU's saved o (equal bytes on both sides: o.cpu() was copied up)
            Pair o_saved(o.cpu_values(), t), dout(input(nq, 64, t), t), dq(Vec(nq, 0.0f), t),
                dk(Vec(nkv, 0.0f), t), dv(Vec(nkv, 0.0f), t), lse_saved(lse.cpu_values(), cpu::DType::F32),
                dq_ws(Vec(nq, 0.0f), cpu::DType::F32), delta_ws(Vec(cpu::flash_delta_workspace_floats(cc), 0.0f),
                                                                cpu::DType::F32);
            cpu::flash_attention_backward(dq.cpu(), dk.cpu(), dv.cpu(), static_cast<float*>(dq_ws.cpu().data),
                                          static_cast<float*>(delta_ws.cpu().data), dout.cpu(), q.cpu(), k.cpu(),
                                          v.cpu(), o_saved.cpu(), static_cast<const float*>(lse_saved.cpu().data), cc);
            gpu::flash_attention_backward(dq.gpu(), dk.gpu(), dv.gpu(), static_cast<float*>(dq_ws.gpu().data),
                                          static_cast<float*>(delta_ws.gpu().data), dout.gpu(), q.gpu(), k.gpu(),
                                          v.gpu(), o_saved.gpu(), static_cast<const float*>(lse_saved.gpu().data), gc);
            CHECK(rel_err(dq.gpu_values(), dq.cpu_values()) <= tol(t, 1e-4));
            CHECK(rel_err(dk.gpu_values(), dk.cpu_values()) <= tol(t, 1e-4));
            CHECK(rel_err(dv.gpu_values(), dv.cpu_values()) <= tol(t, 1e-4));
            CHECK(rel_err(dq_ws.gpu_values(), dq_ws.cpu_values()) <= 1e-4);
        }
}

TEST_CASE("cuda attention sinks (gpt-oss): flash forward, backward and the sinks' gradient equal the CPU kernels") {
    MST_REQUIRE_DEVICE();
    for (cpu::DType t : kDtypes) {
        CAPTURE(int(t));
        cpu::AttentionConfig cc;
        cc.B = 2, cc.S = 45, cc.nh = 4, cc.nkv = 2, cc.hd = 64, cc.window = 9, cc.scale = cpu::default_scale(64);
        const std::int64_t nq = cc.B * cc.S * cc.nh * cc.hd, nkv = cc.B * cc.S * cc.nkv * cc.hd;
        Pair sinks(input(cc.nh, 160, t, 2.0f), t), q(input(nq, 161, t), t), k(input(nkv, 162, t), t),
            v(input(nkv, 163, t), t), o(Vec(nq, 0.0f), t), lse(Vec(cpu::flash_lse_floats(cc), 0.0f), cpu::DType::F32);
        cc.sinks = sinks.cpu().data, cc.sinks_dtype = t;
        gpu::AttentionConfig gc;
        gc.B = cc.B, gc.S = cc.S, gc.nh = cc.nh, gc.nkv = cc.nkv, gc.hd = cc.hd, gc.window = cc.window, gc.scale = cc.scale;
        gc.sinks = sinks.gpu().data, gc.sinks_dtype = t;
        cpu::flash_attention_forward(o.cpu(), static_cast<float*>(lse.cpu().data), q.cpu(), k.cpu(), v.cpu(), cc);
        gpu::flash_attention_forward(o.gpu(), static_cast<float*>(lse.gpu().data), q.gpu(), k.gpu(), v.gpu(), gc);
        CHECK(rel_err(o.gpu_values(), o.cpu_values()) <= tol(t, 1e-4));
        CHECK(rel_err(lse.gpu_values(), lse.cpu_values()) <= 1e-5);

        Pair o_saved(o.cpu_values(), t), dout(input(nq, 164, t), t), dq(Vec(nq, 0.0f), t), dk(Vec(nkv, 0.0f), t),
            dv(Vec(nkv, 0.0f), t), lse_saved(lse.cpu_values(), cpu::DType::F32), dq_ws(Vec(nq, 0.0f), cpu::DType::F32),
            delta_ws(Vec(cpu::flash_delta_workspace_floats(cc), 0.0f), cpu::DType::F32), dsinks(Vec(cc.nh, 0.5f), t);
        cpu::flash_attention_backward(dq.cpu(), dk.cpu(), dv.cpu(), static_cast<float*>(dq_ws.cpu().data),
                                      static_cast<float*>(delta_ws.cpu().data), dout.cpu(), q.cpu(), k.cpu(), v.cpu(),
                                      o_saved.cpu(), static_cast<const float*>(lse_saved.cpu().data), cc);
        gpu::flash_attention_backward(dq.gpu(), dk.gpu(), dv.gpu(), static_cast<float*>(dq_ws.gpu().data),
                                      static_cast<float*>(delta_ws.gpu().data), dout.gpu(), q.gpu(), k.gpu(), v.gpu(),
                                      o_saved.gpu(), static_cast<const float*>(lse_saved.gpu().data), gc);
        CHECK(rel_err(dq.gpu_values(), dq.cpu_values()) <= tol(t, 1e-4));
        CHECK(rel_err(dk.gpu_values(), dk.cpu_values()) <= tol(t, 1e-4));
        CHECK(rel_err(dv.gpu_values(), dv.cpu_values()) <= tol(t, 1e-4));
        // each side's gradient from its own delta, onto the same 0.5 (it accumulates)
        cpu::attention_sinks_backward(dsinks.cpu(), static_cast<const float*>(lse_saved.cpu().data),
                                      static_cast<const float*>(delta_ws.cpu().data), cc);
        gpu::attention_sinks_backward(dsinks.gpu(), static_cast<const float*>(lse_saved.gpu().data),
                                      static_cast<const float*>(delta_ws.gpu().data), gc);
        CHECK(rel_err(dsinks.gpu_values(), dsinks.cpu_values()) <= tol(t, 1e-4));
    }
}

TEST_CASE("cuda bias: the forward add and the column-sum gradient equal the CPU kernels") {
    MST_REQUIRE_DEVICE();
    const std::int64_t n = 77, o = 1000;  // neither a multiple of the 32-column stripes nor of 16 rows
    for (cpu::DType t : kDtypes) {
        CAPTURE(int(t));
        Pair out(input(n * o, 170, t), t), b(input(o, 171, t), t), dout(input(n * o, 172, t), t), db(input(o, 173, t), t);
        cpu::bias_forward(out.cpu(), b.cpu(), n, o);
        gpu::bias_forward(out.gpu(), b.gpu(), n, o);
        CHECK(rel_err(out.gpu_values(), out.cpu_values()) <= tol(t, 1e-6));
        cpu::bias_backward(db.cpu(), dout.cpu(), n, o);
        gpu::bias_backward(db.gpu(), dout.gpu(), n, o);
        CHECK(rel_err(db.gpu_values(), db.cpu_values()) <= tol(t, 1e-4));
    }
}

TEST_CASE("cuda flash attention: dq may accumulate in its own fp32 storage") {
    MST_REQUIRE_DEVICE();
    gpu::AttentionConfig gc;
    gc.B = 1, gc.S = 40, gc.nh = 2, gc.nkv = 1, gc.hd = 32, gc.scale = gpu::default_scale(32);
    const std::int64_t nq = 40 * 2 * 32, nkv = 40 * 32;
    const auto f32 = cpu::DType::F32;
    Pair q(randn(nq, 71), f32), k(randn(nkv, 72), f32), v(randn(nkv, 73), f32), o(Vec(nq, 0.0f), f32),
        lse(Vec(2 * 40, 0.0f), f32), dout(randn(nq, 74), f32), dq(Vec(nq, 0.0f), f32), dk(Vec(nkv, 0.0f), f32),
        dv(Vec(nkv, 0.0f), f32), delta(Vec(2 * 40, 0.0f), f32), dq_ref(Vec(nq, 0.0f), f32), dq_ws_ref(Vec(nq, 0.0f), f32);
    float* lse_g = static_cast<float*>(lse.gpu().data);
    gpu::flash_attention_forward(o.gpu(), lse_g, q.gpu(), k.gpu(), v.gpu(), gc);
    gpu::flash_attention_backward(dq.gpu(), dk.gpu(), dv.gpu(), static_cast<float*>(dq.gpu().data),
                                  static_cast<float*>(delta.gpu().data), dout.gpu(), q.gpu(), k.gpu(), v.gpu(), o.gpu(),
                                  lse_g, gc);
    gpu::flash_attention_backward(dq_ref.gpu(), dk.gpu(), dv.gpu(), static_cast<float*>(dq_ws_ref.gpu().data),
                                  static_cast<float*>(delta.gpu().data), dout.gpu(), q.gpu(), k.gpu(), v.gpu(), o.gpu(),
                                  lse_g, gc);
    CHECK(rel_err(dq.gpu_values(), dq_ref.gpu_values()) <= 1e-5);  // atomics: order may differ
}

TEST_CASE("cuda repeat_kv: copies kv heads and sums their gradients") {
    MST_REQUIRE_DEVICE();
    const std::int64_t rows = 19, nh = 6, nkv = 2, hd = 24;
    for (cpu::DType t : kDtypes) {
        Pair in(input(rows * nkv * hd, 81, t), t), out(Vec(rows * nh * hd, 0.0f), t), dout(input(rows * nh * hd, 82, t), t),
            din(Vec(rows * nkv * hd, 0.0f), t);
        cpu::repeat_kv_forward(out.cpu(), in.cpu(), rows, nh, nkv, hd);
        gpu::repeat_kv_forward(out.gpu(), in.gpu(), rows, nh, nkv, hd);
        CHECK(rel_err(out.gpu_values(), out.cpu_values()) == 0.0);
        cpu::repeat_kv_backward(din.cpu(), dout.cpu(), rows, nh, nkv, hd);
        gpu::repeat_kv_backward(din.gpu(), dout.gpu(), rows, nh, nkv, hd);
        CHECK(rel_err(din.gpu_values(), din.cpu_values()) <= tol(t, 1e-6));
    }
}

TEST_CASE("cuda eager attention ops: scores, apply and apply-transposed equal the CPU kernels") {
    MST_REQUIRE_DEVICE();
    struct Case {
        std::int64_t B, S, nh, hd;
    };
    // S = 37, 70 and hd = 20, 40 are no multiples of the 32-wide tiles: partial tiles both ways
    for (const Case cs : {Case{2, 37, 3, 20}, Case{1, 70, 2, 40}})
        for (cpu::DType t : kDtypes) {
            CAPTURE(cs.S);
            CAPTURE(cs.hd);
            CAPTURE(int(t));
            const std::int64_t B = cs.B, S = cs.S, nh = cs.nh, hd = cs.hd;
            const std::int64_t nx = B * S * nh * hd, np = B * nh * S * S;
            Pair a(input(nx, 201, t), t), b(input(nx, 202, t), t), scores(Vec(np, 0.0f), t);
            cpu::attention_scores(scores.cpu(), a.cpu(), b.cpu(), B, S, nh, hd);
            gpu::attention_scores(scores.gpu(), a.gpu(), b.gpu(), B, S, nh, hd);
            CHECK(rel_err(scores.gpu_values(), scores.cpu_values()) <= tol(t, 1e-4));

            // p with causal zeros, as probabilities have (the CPU skips them; adding 0 is exact)
            Vec pv = input(np, 203, t);
            for (std::int64_t i = 0; i < np; ++i)
                if (i % S > (i / S) % S) pv[static_cast<std::size_t>(i)] = 0.0f;
            Pair p(pv, t), out(Vec(nx, 0.0f), t), out_t(Vec(nx, 0.0f), t);
            cpu::attention_apply(out.cpu(), p.cpu(), b.cpu(), B, S, nh, hd);
            gpu::attention_apply(out.gpu(), p.gpu(), b.gpu(), B, S, nh, hd);
            CHECK(rel_err(out.gpu_values(), out.cpu_values()) <= tol(t, 1e-4));
            cpu::attention_apply_transposed(out_t.cpu(), p.cpu(), a.cpu(), B, S, nh, hd);
            gpu::attention_apply_transposed(out_t.gpu(), p.gpu(), a.gpu(), B, S, nh, hd);
            CHECK(rel_err(out_t.gpu_values(), out_t.cpu_values()) <= tol(t, 1e-4));
        }
}

TEST_CASE("cuda causal mask: zeros and the dtype's lowest finite value, bitwise the CPU's") {
    MST_REQUIRE_DEVICE();
    const std::int64_t B = 2, S = 37;
    for (cpu::DType t : kDtypes)
        for (std::int64_t window : {0, 5}) {
            CAPTURE(int(t));
            CAPTURE(window);
            Pair mask(Vec(B * S * S, 1.0f), t);
            cpu::causal_mask_fill(mask.cpu(), B, S, window);
            gpu::causal_mask_fill(mask.gpu(), B, S, window);
            const Vec got = mask.gpu_values();
            CHECK(got == mask.cpu_values());
            CHECK(got[1] == (t == cpu::DType::F32 ? std::numeric_limits<float>::lowest() : -3.3895314e38f));  // t=0 misses u=1
            CHECK(got[static_cast<std::size_t>(S)] == 0.0f);  // t = 1 sees u = 0
        }
}

TEST_CASE("cuda softmax: forward and backward over rows equal the CPU kernels") {
    MST_REQUIRE_DEVICE();
    for (cpu::DType t : kDtypes) {
        CAPTURE(int(t));
        // 1000 columns: several per thread; 37 columns with the causal mask added, as HF's
        // eager scores: masked entries come out exactly 0 on both sides
        const std::int64_t rows = 13, cols = 1000, S = 37;
        Pair x(input(rows * cols, 211, t, 3.0f), t), y(Vec(rows * cols, 0.0f), cpu::DType::F32);
        cpu::softmax_forward(static_cast<float*>(y.cpu().data), x.cpu(), rows, cols);
        gpu::softmax_forward(static_cast<float*>(y.gpu().data), x.gpu(), rows, cols);
        CHECK(rel_err(y.gpu_values(), y.cpu_values()) <= 1e-4);

        const float lowest = t == cpu::DType::F32 ? std::numeric_limits<float>::lowest() : -3.38953139e38f;
        Vec sv = input(S * S, 212, t, 2.0f);
        for (std::int64_t r = 0; r < S; ++r)
            for (std::int64_t u = r + 1; u < S; ++u) sv[static_cast<std::size_t>(r * S + u)] = lowest;
        Pair masked(sv, t), pm(Vec(S * S, 0.0f), cpu::DType::F32);
        cpu::softmax_forward(static_cast<float*>(pm.cpu().data), masked.cpu(), S, S);
        gpu::softmax_forward(static_cast<float*>(pm.gpu().data), masked.gpu(), S, S);
        const Vec pg = pm.gpu_values();
        CHECK(rel_err(pg, pm.cpu_values()) <= 1e-4);
        CHECK(pg[1] == 0.0f);
        CHECK(pg[0] == 1.0f);  // row 0 sees only itself

        // backward from the CPU's y (the same bytes up), dx in the storage dtype
        Pair y_saved(y.cpu_values(), cpu::DType::F32), dy(randn(rows * cols, 213), cpu::DType::F32),
            dx(Vec(rows * cols, 0.0f), t);
        cpu::softmax_backward(dx.cpu(), static_cast<const float*>(dy.cpu().data),
                              static_cast<const float*>(y_saved.cpu().data), rows, cols);
        gpu::softmax_backward(dx.gpu(), static_cast<const float*>(dy.gpu().data),
                              static_cast<const float*>(y_saved.gpu().data), rows, cols);
        CHECK(rel_err(dx.gpu_values(), dx.cpu_values()) <= tol(t, 1e-4));
    }
}

TEST_CASE("cuda unfused cross-entropy backward: nll_loss then log_softmax equal the CPU kernels") {
    MST_REQUIRE_DEVICE();
    const std::int64_t n = 9, V = 1001;
    auto labels = random_ids(n, V, 221);
    labels[2] = labels[6] = cpu::kIgnoreIndex;
    labels[4] = V - 1;
    const DeviceArray<std::int64_t> labels_dev(labels);
    for (cpu::DType t : kDtypes) {  // the logits' storage; log-probabilities and gradients are fp32
        CAPTURE(int(t));
        Pair logits(input(n * V, 222, t, 3.0f), t);
        Vec logp(static_cast<std::size_t>(n * V));
        cpu::cross_entropy_forward(logp.data(), logits.cpu(), labels.data(), n, V);
        Pair lp(logp, cpu::DType::F32), dlogp(Vec(n * V, 7.0f), cpu::DType::F32), dx(Vec(n * V, 0.0f), cpu::DType::F32);
        auto* dlogp_h = static_cast<float*>(dlogp.cpu().data);
        auto* dlogp_d = static_cast<float*>(dlogp.gpu().data);
        cpu::nll_loss_backward(dlogp_h, labels.data(), n, V, 0.125f);
        gpu::nll_loss_backward(dlogp_d, labels_dev.get(), n, V, 0.125f);
        const Vec g = dlogp.gpu_values();
        CHECK(g == dlogp.cpu_values());  // -scale or 0: exact
        CHECK(g[static_cast<std::size_t>(4 * V + V - 1)] == -0.125f);
        CHECK(std::count(g.begin(), g.end(), 0.0f) == n * V - (n - 2));  // ignored rows are all zero

        const auto* logp_h = static_cast<const float*>(lp.cpu().data);
        const auto* logp_d = static_cast<const float*>(lp.gpu().data);
        cpu::log_softmax_backward(static_cast<float*>(dx.cpu().data), dlogp_h, logp_h, n, V);
        gpu::log_softmax_backward(static_cast<float*>(dx.gpu().data), dlogp_d, logp_d, n, V);
        CHECK(rel_err(dx.gpu_values(), dx.cpu_values()) <= 1e-5);
        // in place over dy, as the executor may run it
        gpu::log_softmax_backward(dlogp_d, dlogp_d, logp_d, n, V);
        CHECK(rel_err(dlogp.gpu_values(), dx.gpu_values()) == 0.0);
    }
}

TEST_CASE("cuda SwiGLU, GeGLU and gpt-oss's clamped SwiGLU: forward and backward equal the CPU kernels, vectorised and tail") {
    MST_REQUIRE_DEVICE();
    const std::int64_t n = 8 * 1000 + 5;  // bf16: 1000 16-byte vectors, then a tail of 5
    for (cpu::DType t : kDtypes)
        for (cpu::GatedAct act : std::initializer_list<cpu::GatedAct>{cpu::GatedAct::Silu, cpu::GatedAct::GeluTanh,
                                                                        cpu::GatedAct::GptOss, {cpu::GatedAct::GptOss, 3.0f}}) {
            CAPTURE(int(t));
            CAPTURE(int(act.kind));
            const auto gact = act;  // one type (mst::GatedAct) on both sides
            const float sd = act.kind == cpu::GatedAct::GptOss ? 5.5f : 1.0f;  // gpt-oss: some inputs clamped
            Pair g(input(n, 91, t, 2.0f * sd), t), u(input(n, 92, t, sd), t), m(Vec(n, 0.0f), t), dm(input(n, 93, t), t);
            cpu::swiglu_forward(m.cpu(), g.cpu(), u.cpu(), n, act);
            gpu::swiglu_forward(m.gpu(), g.gpu(), u.gpu(), n, gact);
            CHECK(rel_err(m.gpu_values(), m.cpu_values()) <= tol(t, 1e-6));
            // backward in place: dg over g, du over u
            cpu::swiglu_backward(g.cpu(), u.cpu(), dm.cpu(), g.cpu(), u.cpu(), n, act);
            gpu::swiglu_backward(g.gpu(), u.gpu(), dm.gpu(), g.gpu(), u.gpu(), n, gact);
            CHECK(rel_err(g.gpu_values(), g.cpu_values()) <= tol(t, 1e-6));
            CHECK(rel_err(u.gpu_values(), u.cpu_values()) <= tol(t, 1e-6));
        }
}

TEST_CASE("cuda Mixture-of-Experts: routing, its backward, gather and combine equal the CPU kernels") {
    MST_REQUIRE_DEVICE();
    const std::int64_t n = 300, E = 16, k = 4, d = 72;
    Vec probs = randn(n * E, 91);
    for (std::int64_t t = 0; t < n; ++t) {  // softmax rows, a few exact ties among them
        float sum = 0;
        for (std::int64_t e = 0; e < E; ++e) sum += probs[t * E + e] = std::exp(t % 7 == 0 ? 0.0f : probs[t * E + e]);
        for (std::int64_t e = 0; e < E; ++e) probs[t * E + e] /= sum;
    }
    for (bool normalize : {false, true}) {
        CAPTURE(normalize);
        Pair p(probs, cpu::DType::F32), w(Vec(n * k, 0.0f), cpu::DType::F32);
        std::vector<std::int64_t> idx(n * k), pos(n * k), offsets(E + 1);
        DeviceArray<std::int64_t> idx_dev(idx.size()), pos_dev(pos.size()), offsets_dev(offsets.size());
        cpu::moe_route(static_cast<float*>(w.cpu().data), idx.data(), pos.data(), offsets.data(),
                       static_cast<const float*>(p.cpu().data), n, E, k, normalize);
        gpu::moe_route(static_cast<float*>(w.gpu().data), idx_dev.get(), pos_dev.get(), offsets_dev.get(),
                       static_cast<const float*>(p.gpu().data), n, E, k, normalize);
        CHECK(rel_err(w.gpu_values(), w.cpu_values()) <= 1e-6);
        CHECK(idx_dev.download() == idx);
        CHECK(pos_dev.download() == pos);
        CHECK(offsets_dev.download() == offsets);

        Pair dw(randn(n * k, 92), cpu::DType::F32), dprobs(Vec(n * E, 1.0f), cpu::DType::F32);
        cpu::moe_route_backward(static_cast<float*>(dprobs.cpu().data), static_cast<const float*>(dw.cpu().data),
                                static_cast<const float*>(p.cpu().data), idx.data(), n, E, k, normalize);
        gpu::moe_route_backward(static_cast<float*>(dprobs.gpu().data), static_cast<const float*>(dw.gpu().data),
                                static_cast<const float*>(p.gpu().data), idx_dev.get(), n, E, k, normalize);
        CHECK(rel_err(dprobs.gpu_values(), dprobs.cpu_values()) <= 1e-6);

        for (cpu::DType t : kDtypes) {
            CAPTURE(int(t));
            Pair x(input(n * d, 93, t), t), xs(Vec(n * k * d, 0.0f), t), ys(input(n * k * d, 94, t), t),
                y(input(n * d, 95, t), t), dy(input(n * d, 96, t), t), dys(Vec(n * k * d, 0.0f), t),
                dwc(Vec(n * k, 0.0f), cpu::DType::F32);
            cpu::moe_gather(xs.cpu(), x.cpu(), pos.data(), n, k, d);
            gpu::moe_gather(xs.gpu(), x.gpu(), pos_dev.get(), n, k, d);
            CHECK(rel_err(xs.gpu_values(), xs.cpu_values()) == 0.0);  // a copy
            for (bool accumulate : {false, true}) {
                cpu::moe_combine(y.cpu(), ys.cpu(), static_cast<const float*>(w.cpu().data), pos.data(), n, k, d, accumulate);
                gpu::moe_combine(y.gpu(), ys.gpu(), static_cast<const float*>(w.gpu().data), pos_dev.get(), n, k, d, accumulate);
                CHECK(rel_err(y.gpu_values(), y.cpu_values()) <= tol(t, 1e-6));
            }
            cpu::moe_combine(y.cpu(), ys.cpu(), nullptr, pos.data(), n, k, d, false);
            gpu::moe_combine(y.gpu(), ys.gpu(), nullptr, pos_dev.get(), n, k, d, false);
            CHECK(rel_err(y.gpu_values(), y.cpu_values()) <= tol(t, 1e-6));
            cpu::moe_combine_backward(dys.cpu(), static_cast<float*>(dwc.cpu().data), dy.cpu(), ys.cpu(),
                                      static_cast<const float*>(w.cpu().data), pos.data(), n, k, d);
            gpu::moe_combine_backward(dys.gpu(), static_cast<float*>(dwc.gpu().data), dy.gpu(), ys.gpu(),
                                      static_cast<const float*>(w.gpu().data), pos_dev.get(), n, k, d);
            CHECK(rel_err(dys.gpu_values(), dys.cpu_values()) <= tol(t, 1e-6));
            CHECK(rel_err(dwc.gpu_values(), dwc.cpu_values()) <= 1e-4);  // a d-term dot in another order
        }
    }
}

TEST_CASE("cuda fused cross-entropy: loss and in-place gradient equal the CPU kernel") {
    MST_REQUIRE_DEVICE();
    const std::int64_t n = 24;
    for (std::int64_t V : {1000, 1003})  // 1000: 16-byte vectors; 1003: one element at a time
        for (cpu::DType t : kDtypes)
            for (float softcap : {0.0f, 30.0f}) {
                CAPTURE(V);
                CAPTURE(int(t));
                CAPTURE(softcap);
                auto labels = random_ids(n, V, 101);
                labels[3] = labels[10] = cpu::kIgnoreIndex;
                labels[4] = V - 1;  // the last class: the tail of a row
                const DeviceArray<std::int64_t> labels_dev(labels);
                Pair logits(input(n * V, 102, t, 4.0f), t), row_loss(Vec(n, -1.0f), cpu::DType::F32);
                DeviceArray<double> loss_dev(1);
                const float scale = 1.0f / static_cast<float>(cpu::count_valid_labels(labels.data(), n));
                const double loss_cpu = cpu::cross_entropy_fused(logits.cpu(), static_cast<float*>(row_loss.cpu().data),
                                                                 labels.data(), n, V, scale, softcap);
                gpu::cross_entropy_fused(logits.gpu(), static_cast<float*>(row_loss.gpu().data), loss_dev.get(),
                                         labels_dev.get(), n, V, scale, softcap);
                CHECK(rel_err(logits.gpu_values(), logits.cpu_values()) <= tol(t, 1e-5));
                CHECK(rel_err(row_loss.gpu_values(), row_loss.cpu_values()) <= 1e-5);
                CHECK(std::fabs(loss_dev.download()[0] - loss_cpu) <= 1e-5 * std::fabs(loss_cpu));
                const Vec rl = row_loss.gpu_values();
                CHECK(rl[3] == 0.0f);
                CHECK(rl[10] == 0.0f);
            }
}

TEST_CASE("cuda fused cross-entropy: chunks of rows add up to the unchunked loss") {
    MST_REQUIRE_DEVICE();
    const std::int64_t n = 64, V = 512, M = 4, rows = n / M;
    const auto labels = random_ids(n, V, 111);
    const DeviceArray<std::int64_t> labels_dev(labels);
    const Vec x = bf16_exact(randn(n * V, 112, 3.0f));
    Pair whole(x, cpu::DType::BF16), chunked(x, cpu::DType::BF16);
    DeviceArray<double> loss_whole(1), loss_chunked(1);
    gpu::cross_entropy_fused(whole.gpu(), nullptr, loss_whole.get(), labels_dev.get(), n, V, 1.0f, 0.0f);
    for (std::int64_t c = 0; c < M; ++c) {
        gpu::Tensor part(static_cast<gpu::bf16*>(chunked.gpu().data) + c * rows * V, gpu::DType::BF16);
        gpu::cross_entropy_fused(part, nullptr, loss_chunked.get(), labels_dev.get() + c * rows, rows, V, 1.0f, 0.0f);
    }
    CHECK(std::fabs(loss_chunked.download()[0] - loss_whole.download()[0]) <= 1e-9 * loss_whole.download()[0]);
    CHECK(rel_err(chunked.gpu_values(), whole.gpu_values()) == 0.0);  // rows are independent
}

TEST_CASE("cuda Hugging Face cross-entropy: log-softmax, loss sum and backward equal the CPU kernels") {
    MST_REQUIRE_DEVICE();
    const std::int64_t n = 20, V = 777;
    auto labels = random_ids(n, V, 121);
    labels[7] = cpu::kIgnoreIndex;
    const DeviceArray<std::int64_t> labels_dev(labels);
    for (cpu::DType t : kDtypes) {
        CAPTURE(int(t));
        Pair logits(input(n * V, 122, t, 3.0f), t), logp(Vec(n * V, 0.0f), cpu::DType::F32),
            dlogits(Vec(n * V, 0.0f), t);
        DeviceArray<double> loss_dev(1);
        const double loss_cpu = cpu::cross_entropy_forward(static_cast<float*>(logp.cpu().data), logits.cpu(),
                                                           labels.data(), n, V);
        gpu::cross_entropy_forward(static_cast<float*>(logp.gpu().data), logits.gpu(), labels_dev.get(), n, V,
                                   loss_dev.get());
        CHECK(rel_err(logp.gpu_values(), logp.cpu_values()) <= 1e-5);
        CHECK(std::fabs(loss_dev.download()[0] - loss_cpu) <= 1e-5 * std::fabs(loss_cpu));
        cpu::cross_entropy_backward(dlogits.cpu(), static_cast<const float*>(logp.cpu().data), labels.data(), n, V,
                                    0.5f);
        gpu::cross_entropy_backward(dlogits.gpu(), static_cast<const float*>(logp.gpu().data), labels_dev.get(), n, V,
                                    0.5f);
        CHECK(rel_err(dlogits.gpu_values(), dlogits.cpu_values()) <= tol(t, 1e-5));
    }
    DeviceArray<std::int64_t> count(1);
    gpu::count_valid_labels(count.get(), labels_dev.get(), n);
    CHECK(count.download()[0] == cpu::count_valid_labels(labels.data(), n));
}

TEST_CASE("cuda AdamW: one multi-tensor launch list equals the CPU kernel tensor by tensor") {
    MST_REQUIRE_DEVICE();
    // 30 tensors (> kMultiTensorMax per launch), two larger than a chunk, one empty, and
    // 12 x 40000 + 2 x 300000 elements > 320 chunks: the tables roll over mid-tensor.
    std::vector<std::int64_t> sizes;
    for (int i = 0; i < 30; ++i) sizes.push_back(i == 5 ? 300000 : i == 17 ? 300001 : i == 9 ? 0 : 1000 + 37 * i);
    for (int i = 0; i < 12; ++i) sizes.push_back(40000);
    std::vector<Pair> p, g, m, v;
    p.reserve(sizes.size()), g.reserve(sizes.size()), m.reserve(sizes.size()), v.reserve(sizes.size());
    for (std::size_t i = 0; i < sizes.size(); ++i) {
        const auto n = sizes[i];
        const unsigned s = static_cast<unsigned>(10 * i);
        // mixed storage: bf16 params and grads, fp32 moments (pure bf16 with fp32 states)
        p.emplace_back(bf16_exact(randn(n, s + 1)), cpu::DType::BF16);
        g.emplace_back(bf16_exact(randn(n, s + 2)), cpu::DType::BF16);
        m.emplace_back(randn(n, s + 3, 0.1f), cpu::DType::F32);
        v.emplace_back(Vec(static_cast<std::size_t>(n), 0.01f), cpu::DType::F32);
    }
    const cpu::AdamWConfig cc;
    gpu::AdamWConfig gc;
    gc.lr = cc.lr, gc.beta1 = cc.beta1, gc.beta2 = cc.beta2, gc.eps = cc.eps, gc.weight_decay = cc.weight_decay;
    for (std::int64_t step : {1, 2}) {
        std::vector<gpu::AdamWTensor> list;
        for (std::size_t i = 0; i < sizes.size(); ++i) {
            if (sizes[i] > 0)  // the CPU kernel wants buffers even for an empty tensor
                cpu::adamw_step(p[i].cpu(), g[i].cpu(), m[i].cpu(), v[i].cpu(), sizes[i], cc, step);
            list.push_back({p[i].gpu(), g[i].gpu(), m[i].gpu(), v[i].gpu(), sizes[i]});
        }
        gpu::adamw_step(list.data(), static_cast<std::int64_t>(list.size()), gc, step);
        for (std::size_t i = 0; i < sizes.size(); ++i) {
            CAPTURE(i);
            CHECK(rel_err(p[i].gpu_values(), p[i].cpu_values()) <= 1e-2);  // bf16 params
            CHECK(rel_err(m[i].gpu_values(), m[i].cpu_values()) <= 1e-6);
            CHECK(rel_err(v[i].gpu_values(), v[i].cpu_values()) <= 1e-6);
        }
    }
}

TEST_CASE("cuda SGD: momentum and Nesterov steps equal the CPU kernel") {
    MST_REQUIRE_DEVICE();
    const std::int64_t n = 70001;
    for (bool nesterov : {false, true}) {
        cpu::SgdConfig cc;
        cc.lr = 0.1f, cc.momentum = 0.9f, cc.dampening = 0.1f, cc.weight_decay = 0.01f, cc.nesterov = nesterov;
        gpu::SgdConfig gc;
        gc.lr = cc.lr, gc.momentum = cc.momentum, gc.dampening = cc.dampening, gc.weight_decay = cc.weight_decay;
        gc.nesterov = nesterov;
        Pair p(randn(n, 131), cpu::DType::F32), g(randn(n, 132), cpu::DType::F32), buf(Vec(n, 0.0f), cpu::DType::F32);
        for (std::int64_t step : {1, 2, 3}) {
            cpu::sgd_step(p.cpu(), g.cpu(), buf.cpu(), n, cc, step);
            gpu::sgd_step(p.gpu(), g.gpu(), buf.gpu(), n, gc, step);
        }
        CHECK(rel_err(p.gpu_values(), p.cpu_values()) <= 1e-6);
        CHECK(rel_err(buf.gpu_values(), buf.cpu_values()) <= 1e-6);
    }
}

TEST_CASE("cuda GEMMs (cuBLASLt): y = x W^T and both backward products equal the CPU reference") {
    MST_REQUIRE_DEVICE();
    const std::int64_t n = 37, i = 192, o = 136;  // rows not a multiple of 8
    DeviceBuffer workspace(gpu::kDefaultGemmWorkspaceBytes);
    gpu::GemmContext ctx(workspace.get(), workspace.bytes());
    for (cpu::DType t : kDtypes)
        for (cpu::DType out_t : kDtypes)
            for (bool accumulate : {false, true}) {
                if (t == cpu::DType::F32 && out_t == cpu::DType::BF16) continue;  // no fp32 -> bf16 GEMM
                CAPTURE(int(t));
                CAPTURE(int(out_t));
                CAPTURE(accumulate);
                Pair x(input(n * i, 141, t), t), W(input(o * i, 142, t), t), dout(input(n * o, 143, t), t);
                Pair y(input(n * o, 144, out_t), out_t), dx(input(n * i, 145, out_t), out_t),
                    dW(input(o * i, 146, out_t), out_t);
                // the CPU reference: naive loops in double, rounded once
                cpu::reference::linear_forward(y.cpu(), x.cpu(), W.cpu(), n, i, o, accumulate);
                gpu::linear_forward(ctx, y.gpu(), x.gpu(), W.gpu(), n, i, o, accumulate);
                CHECK(rel_err(y.gpu_values(), y.cpu_values()) <= tol(out_t, 1e-4));
                cpu::reference::linear_backward_input(dx.cpu(), dout.cpu(), W.cpu(), n, i, o, accumulate);
                gpu::linear_backward_input(ctx, dx.gpu(), dout.gpu(), W.gpu(), n, i, o, accumulate);
                CHECK(rel_err(dx.gpu_values(), dx.cpu_values()) <= tol(out_t, 1e-4));
                cpu::reference::linear_backward_weight(dW.cpu(), dout.cpu(), x.cpu(), n, i, o, accumulate);
                gpu::linear_backward_weight(ctx, dW.gpu(), dout.gpu(), x.gpu(), n, i, o, accumulate);
                CHECK(rel_err(dW.gpu_values(), dW.cpu_values()) <= tol(out_t, 1e-4));
            }
}

TEST_CASE("cuda GEMMs: a chunk of rows at an offset (MsT) is the same product") {
    MST_REQUIRE_DEVICE();
    const std::int64_t n = 64, i = 128, o = 96, M = 4, rows = n / M;
    DeviceBuffer workspace(gpu::kDefaultGemmWorkspaceBytes);
    gpu::GemmContext ctx(workspace.get(), workspace.bytes());
    const auto b = cpu::DType::BF16;
    Pair x(bf16_exact(randn(n * i, 151)), b), W(bf16_exact(randn(o * i, 152)), b), y(Vec(n * o, 0.0f), b),
        y_chunked(Vec(n * o, 0.0f), b), dW(Vec(o * i, 0.0f), cpu::DType::F32), dW_chunked(Vec(o * i, 0.0f), cpu::DType::F32);
    gpu::linear_forward(ctx, y.gpu(), x.gpu(), W.gpu(), n, i, o);
    gpu::linear_backward_weight(ctx, dW.gpu(), y.gpu(), x.gpu(), n, i, o, false);
    for (std::int64_t c = 0; c < M; ++c) {
        const gpu::Tensor xc(static_cast<gpu::bf16*>(x.gpu().data) + c * rows * i, gpu::DType::BF16);
        const gpu::Tensor yc(static_cast<gpu::bf16*>(y_chunked.gpu().data) + c * rows * o, gpu::DType::BF16);
        gpu::linear_forward(ctx, yc, xc, W.gpu(), rows, i, o);
        gpu::linear_backward_weight(ctx, dW_chunked.gpu(), yc, xc, rows, i, o, c > 0);
    }
    CHECK(rel_err(y_chunked.gpu_values(), y.gpu_values()) <= 1e-2);
    CHECK(rel_err(dW_chunked.gpu_values(), dW.gpu_values()) <= 1e-4);  // fp32 sums of 4 chunks vs one
}

}  // TEST_SUITE("kernels")

TEST_SUITE("host") {

TEST_CASE("cuda kernels: a broken contract throws before anything is launched") {
    // Host-side checks only: no device needed.
    CHECK_THROWS_WITH_AS(gpu::rmsnorm_forward({}, nullptr, {}, {}, 4, 0, 1e-6f, gpu::NormKind::Llama),
                         "rmsnorm_forward: need d > 0 and n >= 0", std::logic_error);
    gpu::AttentionConfig c;
    c.nh = 3, c.nkv = 2;
    CHECK_THROWS_WITH_AS(gpu::flash_attention_forward({}, nullptr, {}, {}, {}, c), "flash_attention_forward: nkv must divide nh",
                         std::logic_error);
    CHECK_THROWS_WITH_AS(gpu::adamw_step({}, {}, {}, {}, 4, gpu::AdamWConfig{}, 0), "adamw_step: step counts from 1",
                         std::logic_error);
    CHECK_THROWS_WITH_AS(gpu::rope_apply({}, 1, 1, 1, 7, 7, 1e4f, false), "rope_apply: head_dim must be even and <= kMaxHeadDim",
                         std::logic_error);
    CHECK_THROWS_WITH_AS(gpu::rope_apply({}, 1, 1, 1, 8, 7, 1e4f, false),
                         "rope_apply: rotary_dim must be even and in [2, head_dim]", std::logic_error);
    CHECK_THROWS_WITH_AS(gpu::attention_scores({}, {}, {}, 1, 4, 2, gpu::kMaxHeadDim + 1),
                         "attention_scores: head_dim must be in (0, kMaxHeadDim]", std::logic_error);
    CHECK_THROWS_WITH_AS(gpu::softmax_forward(nullptr, {}, 4, 0), "softmax_forward: need rows >= 0 and cols > 0",
                         std::logic_error);
    CHECK_THROWS_WITH_AS(gpu::fill_uniform({}, -1, 1.0f, 0), "fill_uniform: n must be >= 0", std::logic_error);
}

}  // TEST_SUITE
