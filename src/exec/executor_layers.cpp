// The executor's decoder layer: norms, attention, MLP (unchunked and as MsT
// mini-sequences), residuals; forward and backward. The independence rule at the top of
// executor.cpp holds here too: buffers are sized from shapes and the kernel API only.
//
// Shapes: x, x2, h1, h2, y [T, d]; q, o [T, q_dim]; k, v [T, kv_dim]; lse [B, nh, S] fp32;
// g, u, m [n, I] per mini-sequence of n tokens; rstd [T] fp32.
#include <cassert>
#include <string>

#include "executor.hpp"

namespace mst::exec {

// RMSNorm: out [T, d]; rstd [T] fp32 kept for backward (none without grad). The caller
// saves the input.
Ten Step::norm_forward(int p, const Ten& x, Ten& rstd, bool output_saved, DType out_dtype) {
    const std::int64_t d = m_.hidden_size;
    Ten out = act("norm_out", T_ * d, out_dtype, output_saved);
    rstd = grad_ ? alloc("rstd", T_, DType::F32, Category::SavedActivation) : Ten{};
    b_.rmsnorm_forward(out.t(), rstd ? rstd.f32() : nullptr, x.t(), params_[static_cast<std::size_t>(p)].weight.t(), T_,
                         d, static_cast<float>(m_.rms_norm_eps), norm_kind_);
    return out;
}

// dx [T, d] from dy [T, d], the saved input and rstd; the gain's gradient accumulates.
Ten Step::norm_backward(int p, Ten& rstd, Ten& x_saved, const Ten& dy, DType dx_dtype) {
    const std::int64_t d = m_.hidden_size;
    Ten dx = alloc("d_norm_in", T_ * d, dx_dtype, Category::Transient);
    const Tensor dw = grad_write(p);
    b_.rmsnorm_backward(dx.t(), dw, dy.t(), x_saved.t(), params_[static_cast<std::size_t>(p)].weight.t(), rstd.f32(),
                          T_, d, norm_kind_);
    drop(rstd);
    drop(x_saved);
    grad_done(p);
    return dx;
}

// Qwen3's norm over each of x's heads ([T x heads, head_dim]): x becomes the normalised copy;
// the projection's output is kept for the backward with rstd [T x heads] (none without grad).
void Step::head_norm_forward(int p, Ten& x, std::int64_t heads, Ten& x_saved, Ten& rstd) {
    if (p < 0) return;
    const std::int64_t rows = T_ * heads, hd = m_.head_dim;
    Ten out = act("head_norm_out", rows * hd, act_, true);
    rstd = grad_ ? alloc("rstd_heads", rows, DType::F32, Category::SavedActivation) : Ten{};
    b_.rmsnorm_forward(out.t(), rstd ? rstd.f32() : nullptr, x.t(), params_[static_cast<std::size_t>(p)].weight.t(), rows,
                         hd, static_cast<float>(m_.rms_norm_eps), norm_kind_);
    x_saved = saved(x);
    drop(x);
    x = std::move(out);
}

// dx: the normalised heads' gradient in, the projection output's out; the gain's accumulates.
void Step::head_norm_backward(int p, Ten& dx, std::int64_t heads, Ten& x_saved, Ten& rstd) {
    if (p < 0) return;
    const std::int64_t rows = T_ * heads, hd = m_.head_dim;
    Ten d_in = alloc("d_head_norm_in", rows * hd, act_, Category::Transient);
    b_.rmsnorm_backward(d_in.t(), grad_write(p), dx.t(), x_saved.t(), params_[static_cast<std::size_t>(p)].weight.t(),
                          rstd.f32(), rows, hd, norm_kind_);
    drop(rstd), drop(x_saved), drop(dx);
    grad_done(p);
    dx = std::move(d_in);
}

Ten Step::layer_forward(int l, Ten x, LayerSaved& sv, Category out_category) {
    alloc_.set_layer(l);
    const LayerParams& lp = layer_params_[static_cast<std::size_t>(l)];
    const std::int64_t d = m_.hidden_size;

    at("attn.norm");
    // Without AMP the QKV matmul saves the norm output; under AMP it saves its bf16 cast.
    Ten h1 = norm_forward(lp.norm1, x, sv.rstd1, !amp_, res_);
    sv.x = saved(x);
    Ten a = attention_forward(l, std::move(h1), sv);
    if (gemma_) {  // the post-attention norm: bf16 in, bf16 out, saves its input
        at("attn.post_norm");
        Ten an = norm_forward(lp.post_attn_norm, a, sv.rstd_pa, false, act_);
        sv.a = saved(a);
        drop(a);
        a = std::move(an);
    }
    at("attn.residual");
    Ten x2 = act("x2", T_ * d, res_, true);  // x + attn_out, saved by the second norm
    b_.residual_forward(x2.t(), x.t(), a.t(), T_ * d);
    drop(a);
    drop(x);

    at("mlp.norm");
    Ten h2 = norm_forward(lp.norm2, x2, sv.rstd2, !amp_, res_);
    sv.x2 = saved(x2);
    Ten y = mlp_forward(l, std::move(h2), sv);
    if (gemma_) {
        at("mlp.post_norm");
        Ten yn = norm_forward(lp.post_ff_norm, y, sv.rstd_pf, false, act_);
        sv.y = saved(y);
        drop(y);
        y = std::move(yn);
    }
    at("mlp.residual");
    Ten out = alloc("x_out", T_ * d, res_, out_category);
    b_.residual_forward(out.t(), x2.t(), y.t(), T_ * d);
    drop(y);
    drop(x2);
    return out;
}

// dres [T, d]: the residual stream's gradient, read by both branches and accumulated in place.
void Step::layer_backward(int l, LayerSaved& sv, const Ten& dres) {
    alloc_.set_layer(l);
    const LayerParams& lp = layer_params_[static_cast<std::size_t>(l)];
    const std::int64_t d = m_.hidden_size;

    // Gemma-2: the branches end in post-norms, whose input gradients the branches read.
    Ten dy_post;
    if (gemma_) {
        at("mlp.post_norm");
        dy_post = norm_backward(lp.post_ff_norm, sv.rstd_pf, sv.y, dres, act_);
    }
    Ten dh2 = mlp_backward(l, sv, gemma_ ? dy_post : dres);
    drop(dy_post);
    at("mlp.norm");
    Ten dx = norm_backward(lp.norm2, sv.rstd2, sv.x2, dh2, res_);
    drop(dh2);
    b_.residual_accumulate(dres.t(), dx.t(), T_ * d);
    drop(dx);

    Ten da_post;
    if (gemma_) {
        at("attn.post_norm");
        da_post = norm_backward(lp.post_attn_norm, sv.rstd_pa, sv.a, dres, act_);
    }
    Ten dh1 = attention_backward(l, sv, gemma_ ? da_post : dres);
    drop(da_post);
    at("attn.norm");
    dx = norm_backward(lp.norm1, sv.rstd1, sv.x, dh1, res_);
    drop(dh1);
    b_.residual_accumulate(dres.t(), dx.t(), T_ * d);
    drop(dx);
}

// h1 [T, d] -> attn_out [T, d]: QKV, RoPE (in place), flash attention, O projection.
Ten Step::attention_forward(int l, Ten h1, LayerSaved& sv) {
    const LayerParams& lp = layer_params_[static_cast<std::size_t>(l)];
    const std::int64_t d = m_.hidden_size, qd = m_.q_dim(), kvd = m_.kv_dim();
    const AttentionConfig c = attention_config(l);

    at("attn.qkv");
    Ten hin = cast_for_matmul(std::move(h1), d);
    const Tensor wq = use_weight(lp.q), wk = use_weight(lp.k), wv = use_weight(lp.v);
    Ten q = act("q", T_ * qd, act_, true);
    Ten k = act("k", T_ * kvd, act_, true);
    Ten v = act("v", T_ * kvd, act_, true);
    linear_forward(q.t(), hin.t(), lp.q, wq, T_, d, qd);
    linear_forward(k.t(), hin.t(), lp.k, wk, T_, d, kvd);
    linear_forward(v.t(), hin.t(), lp.v, wv, T_, d, kvd);
    at("attn.qk_norm");
    head_norm_forward(lp.q_norm, q, m_.num_heads, sv.q_raw, sv.rstd_q);
    head_norm_forward(lp.k_norm, k, m_.num_kv_heads, sv.k_raw, sv.rstd_k);
    at("attn.qkv");
    b_.rope_forward(q.t(), k.t(), B_, S_, m_.num_heads, m_.num_kv_heads, m_.head_dim, m_.rotary_dim,
                    static_cast<float>(m_.rope_theta));
    sv.h1 = saved(hin);
    drop(hin);

    Ten o;
    if (s_.attention == Attention::Flash) {
        at("attn.flash");
        o = act("o", T_ * qd, act_, true);
        Ten lse = act("lse", b_.flash_lse_floats(c), DType::F32, true);
        b_.flash_attention_forward(o.t(), lse.f32(), q.t(), k.t(), v.t(), c);
        sv.q = saved(q), sv.k = saved(k), sv.v = saved(v), sv.o = saved(o), sv.lse = saved(lse);
        drop(q), drop(k), drop(v), drop(lse);
    } else {
        o = eager_forward(l, std::move(q), std::move(k), std::move(v), sv);
    }

    at("attn.o_proj");
    const Tensor wo = use_weight(lp.o);
    Ten a = act("attn_out", T_ * d, act_, gemma_);  // Gemma-2: saved by the post-attention norm
    linear_forward(a.t(), o.t(), lp.o, wo, T_, qd, d);
    sv.o_seq = saved(o);
    drop(o);
    return a;
}

// d_out [T, d] (read, not owned) -> d h1 [T, d]
Ten Step::attention_backward(int l, LayerSaved& sv, const Ten& d_out) {
    const LayerParams& lp = layer_params_[static_cast<std::size_t>(l)];
    const std::int64_t d = m_.hidden_size, qd = m_.q_dim(), kvd = m_.kv_dim();
    const AttentionConfig c = attention_config(l);

    at("attn.o_proj");
    Ten d_o = alloc("d_o", T_ * qd, act_, Category::Transient);
    b_.linear_backward_input(d_o.t(), d_out.t(), backward_weight(lp.o), T_, qd, d);
    linear_weight_grad(lp.o, d_out.t(), sv.o_seq.t(), T_, qd, d);
    release_weight(lp.o);
    drop(sv.o_seq);
    grad_done(lp.o);

    Ten dq, dk, dv;
    if (s_.attention == Attention::Flash) {
        // FlashAttention-2 backward: the fp32 dq accumulator and delta = rowsum(dO * O) workspaces.
        at("attn.flash");
        Ten dq_acc = alloc("dq_accum_fp32", b_.flash_dq_workspace_floats(c), DType::F32, Category::Transient);
        Ten delta = alloc("softmax_d", b_.flash_delta_workspace_floats(c), DType::F32, Category::Transient);
        dq = alloc("dq", T_ * qd, act_, Category::Transient);
        dk = alloc("dk", T_ * kvd, act_, Category::Transient);
        dv = alloc("dv", T_ * kvd, act_, Category::Transient);
        b_.flash_attention_backward(dq.t(), dk.t(), dv.t(), dq_acc.f32(), delta.f32(), d_o.t(), sv.q.t(), sv.k.t(),
                                      sv.v.t(), sv.o.t(), sv.lse.f32(), c);
        if (lp.sinks >= 0) b_.attention_sinks_backward(grad_write(lp.sinks), sv.lse.f32(), delta.f32(), c);
        drop(dq_acc), drop(delta), drop(d_o);
        drop(sv.q), drop(sv.k), drop(sv.v), drop(sv.o), drop(sv.lse);
        if (lp.sinks >= 0) grad_done(lp.sinks);
    } else {
        eager_backward(l, std::move(d_o), sv, dq, dk, dv);
    }
    b_.rope_backward(dq.t(), dk.t(), B_, S_, m_.num_heads, m_.num_kv_heads, m_.head_dim, m_.rotary_dim,
                     static_cast<float>(m_.rope_theta));
    at("attn.qk_norm");
    head_norm_backward(lp.q_norm, dq, m_.num_heads, sv.q_raw, sv.rstd_q);
    head_norm_backward(lp.k_norm, dk, m_.num_kv_heads, sv.k_raw, sv.rstd_k);

    at("attn.qkv");
    Ten dh = alloc("d_h1", T_ * d, act_, Category::Transient);
    b_.linear_backward_input(dh.t(), dq.t(), backward_weight(lp.q), T_, d, qd);
    b_.linear_backward_input(dh.t(), dk.t(), backward_weight(lp.k), T_, d, kvd, true);
    b_.linear_backward_input(dh.t(), dv.t(), backward_weight(lp.v), T_, d, kvd, true);
    const std::pair<int, const Ten*> projections[] = {{lp.q, &dq}, {lp.k, &dk}, {lp.v, &dv}};
    for (const auto& [p, dp] : projections) {
        linear_weight_grad(p, dp->t(), sv.h1.t(), T_, d, params_[static_cast<std::size_t>(p)].rows);
        release_weight(p);
    }
    drop(dq), drop(dk), drop(dv), drop(sv.h1);
    for (int p : {lp.q, lp.k, lp.v}) grad_done(p);
    return uncast_grad(std::move(dh), d);
}

// Soft-capping as Hugging Face writes it (Gemma-2): x / cap, tanh (saved for backward), * cap,
// each a new tensor of n elements. Returns the capped tensor; `x` is let go.
Ten Step::softcap_forward(const char* prefix, Ten x, std::int64_t n, float cap, Ten& tanh_saved) {
    const std::string p = prefix;
    Ten div = act((p + "_div").c_str(), n, act_, false);
    b_.scale(div.t(), x.t(), n, 1.0f / cap);
    drop(x);
    Ten th = act((p + "_tanh").c_str(), n, act_, true);
    b_.softcap_forward(th.t(), div.t(), n, 1.0f);  // 1 * tanh(x / 1)
    drop(div);
    Ten capped = act((p + "_capped").c_str(), n, act_, false);
    b_.scale(capped.t(), th.t(), n, cap);
    tanh_saved = saved(th);
    drop(th);
    return capped;
}

// Its backward from dy (the capped tensor's gradient, let go): * cap, * (1 - tanh^2), / cap.
Ten Step::softcap_backward(const char* prefix, Ten dy, std::int64_t n, float cap, Ten& tanh_saved) {
    const std::string p = prefix;
    Ten t1 = alloc((p + "_capped").c_str(), n, act_, Category::Transient);
    b_.scale(t1.t(), dy.t(), n, cap);
    drop(dy);
    Ten t2 = alloc((p + "_tanh").c_str(), n, act_, Category::Transient);
    b_.softcap_backward(t2.t(), t1.t(), tanh_saved.t(), n, 1.0f);
    drop(t1), drop(tanh_saved);
    Ten dx = alloc((p + "_div").c_str(), n, act_, Category::Transient);
    b_.scale(dx.t(), t2.t(), n, 1.0f / cap);
    drop(t2);
    return dx;
}

// Hugging Face eager attention op by op: q, k, v [T, *] (post-RoPE, owned) -> o [T, q_dim].
// repeat_kv copies (GQA), scores = q k^T, scaled, plus the additive mask, softmax in fp32
// (saved), its storage-dtype copy (saved by the PV product), o = probs v.
// Every S x S tensor is [B, nh, S, S] over all (t, u), masked or not, as HF materialises it.
Ten Step::eager_forward(int l, Ten q, Ten k, Ten v, LayerSaved& sv) {
    const std::int64_t qd = m_.q_dim(), nh = m_.num_heads, hd = m_.head_dim;
    const std::int64_t ss = B_ * nh * S_ * S_;
    const AttentionConfig c = attention_config(l);
    at("attn.eager");
    Ten k_rep, v_rep;
    if (m_.num_kv_heads < nh) {
        k_rep = act("k_rep", T_ * qd, act_, true);
        v_rep = act("v_rep", T_ * qd, act_, true);
        b_.repeat_kv_forward(k_rep.t(), k.t(), T_, nh, m_.num_kv_heads, hd);
        b_.repeat_kv_forward(v_rep.t(), v.t(), T_, nh, m_.num_kv_heads, hd);
        drop(k), drop(v);
    } else {
        k_rep = std::move(k), v_rep = std::move(v);
    }
    Ten scores = act("scores", ss, act_, false);
    b_.attention_scores(scores.t(), q.t(), k_rep.t(), B_, S_, nh, hd);
    sv.q = saved(q), sv.k_rep = saved(k_rep);
    drop(q), drop(k_rep);
    Ten scaled = act("scores_scaled", ss, act_, false);
    b_.scale(scaled.t(), scores.t(), ss, c.scale);
    drop(scores);
    if (c.softcap > 0.0f) scaled = softcap_forward("scores", std::move(scaled), ss, c.softcap, sv.scores_tanh);
    Ten masked = act("scores_masked", ss, act_, false);
    const Ten& mask = c.window > 0 ? mask_sliding_ : mask_full_;
    for (std::int64_t bh = 0; bh < B_ * nh; ++bh)  // the [B, 1, S, S] mask broadcast over heads
        b_.residual_forward(masked.at(bh * S_ * S_), scaled.at(bh * S_ * S_), mask.at((bh / nh) * S_ * S_), S_ * S_);
    drop(scaled);
    Ten p32 = act("probs_fp32", ss, DType::F32, true);
    b_.softmax_forward(p32.f32(), masked.t(), B_ * nh * S_, S_);
    drop(masked);
    Ten p = act("probs", ss, act_, true);
    b_.cast(p.t(), p32.t(), ss);
    sv.probs32 = saved(p32);
    drop(p32);
    Ten o = act("o", T_ * qd, act_, true);
    b_.attention_apply(o.t(), p.t(), v_rep.t(), B_, S_, nh, hd);
    sv.probs = saved(p), sv.v_rep = saved(v_rep);
    drop(p), drop(v_rep);
    return o;
}

// The backward of eager_forward from d_o [T, q_dim] (owned): dq [T, q_dim], dk, dv [T, kv_dim].
void Step::eager_backward(int l, Ten d_o, LayerSaved& sv, Ten& dq, Ten& dk, Ten& dv) {
    const std::int64_t qd = m_.q_dim(), kvd = m_.kv_dim(), nh = m_.num_heads, hd = m_.head_dim;
    const std::int64_t ss = B_ * nh * S_ * S_;
    const AttentionConfig c = attention_config(l);
    at("attn.eager");
    Ten dp = alloc("d_probs", ss, act_, Category::Transient);  // d_o v^T
    b_.attention_scores(dp.t(), d_o.t(), sv.v_rep.t(), B_, S_, nh, hd);
    Ten dv_rep = alloc("d_v_rep", T_ * qd, act_, Category::Transient);  // probs^T d_o
    b_.attention_apply_transposed(dv_rep.t(), sv.probs.t(), d_o.t(), B_, S_, nh, hd);
    drop(d_o), drop(sv.probs), drop(sv.v_rep);
    Ten dp32 = alloc("d_probs_fp32", ss, DType::F32, Category::Transient);  // the storage cast's backward
    b_.cast(dp32.t(), dp.t(), ss);
    drop(dp);
    Ten ds = alloc("d_scores", ss, act_, Category::Transient);
    b_.softmax_backward(ds.t(), dp32.f32(), sv.probs32.f32(), B_ * nh * S_, S_);
    drop(dp32), drop(sv.probs32);
    if (c.softcap > 0.0f) ds = softcap_backward("d_scores", std::move(ds), ss, c.softcap, sv.scores_tanh);
    Ten unscaled = alloc("d_scores_unscaled", ss, act_, Category::Transient);  // the mask passes it through
    b_.scale(unscaled.t(), ds.t(), ss, c.scale);
    drop(ds);
    dq = alloc("dq", T_ * qd, act_, Category::Transient);
    b_.attention_apply(dq.t(), unscaled.t(), sv.k_rep.t(), B_, S_, nh, hd);
    Ten dk_rep = alloc("d_k_rep", T_ * qd, act_, Category::Transient);
    b_.attention_apply_transposed(dk_rep.t(), unscaled.t(), sv.q.t(), B_, S_, nh, hd);
    drop(unscaled), drop(sv.q), drop(sv.k_rep);
    if (m_.num_kv_heads < nh) {  // repeat_kv's backward sums the head groups
        dk = alloc("dk", T_ * kvd, act_, Category::Transient);
        b_.repeat_kv_backward(dk.t(), dk_rep.t(), T_, nh, m_.num_kv_heads, hd);
        drop(dk_rep);
        dv = alloc("dv", T_ * kvd, act_, Category::Transient);
        b_.repeat_kv_backward(dv.t(), dv_rep.t(), T_, nh, m_.num_kv_heads, hd);
        drop(dv_rep);
    } else {
        dk = std::move(dk_rep), dv = std::move(dv_rep);
    }
}

// One mini-sequence of n tokens from row row0 of hin [T, d]: g, u [n, I] = hin W^T,
// m = silu(g) * u, y[row0 .. row0 + n) = m W_down^T. y [T, d] is allocated by the first.
void Step::mlp_chunk_forward(const LayerParams& lp, const Ten& hin, std::int64_t row0, std::int64_t n, Ten& y,
                             MlpChunk* keep) {
    if (m_.moe) return moe_chunk_forward(lp, hin, row0, n, y, keep);
    const std::int64_t d = m_.hidden_size, I = m_.intermediate_size;
    at("mlp.gate_up");
    const Tensor wg = use_weight(lp.gate), wu = use_weight(lp.up);
    Ten g = act("g", n * I, act_, true);
    Ten u = act("u", n * I, act_, true);
    linear_forward(g.t(), hin.at(row0 * d), lp.gate, wg, n, d, I);
    linear_forward(u.t(), hin.at(row0 * d), lp.up, wu, n, d, I);
    at("mlp.act");
    Ten m = act("m", n * I, act_, true);
    b_.swiglu_forward(m.t(), g.t(), u.t(), n * I, gated_);
    if (keep) keep->g = saved(g), keep->u = saved(u);
    drop(g), drop(u);
    at("mlp.down");
    const Tensor wd = use_weight(lp.down);
    if (!y) y = act("y", T_ * d, act_, gemma_);  // Gemma-2: saved by the post-feed-forward norm
    linear_forward(y.at(row0 * d), m.t(), lp.down, wd, n, I, d);
    if (keep) keep->m = saved(m), keep->row0 = row0, keep->tokens = n;
    drop(m);
}

// h2 [T, d] -> y [T, d].
//  * Loop (MsT reference), and M = 1: each chunk under autograd saves its g, u, m and a
//    holder of h2 (its gate/up's input view).
//  * Tiled (ALST TiledMLP): every chunk without autograd; only h2 is saved.
Ten Step::mlp_forward(int l, Ten h2, LayerSaved& sv) {
    const LayerParams& lp = layer_params_[static_cast<std::size_t>(l)];
    Ten hin = cast_for_matmul(std::move(h2), m_.hidden_size);
    Ten y;
    std::int64_t row0 = 0;
    if (s_.mlp_chunks > 1 && s_.mlp_impl == MlpImpl::Tiled) {
        sv.h2 = saved(hin);
        NoGrad no_grad(*this);
        for (std::int64_t n : chunks(s_.mlp_chunks)) {
            mlp_chunk_forward(lp, hin, row0, n, y, nullptr);
            row0 += n;
        }
    } else {
        for (std::int64_t n : chunks(s_.mlp_chunks)) {
            MlpChunk c;
            mlp_chunk_forward(lp, hin, row0, n, y, &c);
            c.h2 = saved(hin);
            if (grad_) sv.mlp.push_back(std::move(c));
            row0 += n;
        }
    }
    drop(hin);
    return y;
}

// dy [T, d] (the residual gradient, read chunk by chunk) -> dh2 [T, d], written slice by slice.
Ten Step::mlp_backward(int l, LayerSaved& sv, const Ten& dy) {
    const LayerParams& lp = layer_params_[static_cast<std::size_t>(l)];
    const std::int64_t d = m_.hidden_size, I = m_.intermediate_size;
    Ten dh2;
    // One chunk's backward from its g, u, m and the MLP input h2.
    auto chunk_backward = [&](std::int64_t row0, std::int64_t n, Ten& g, Ten& u, Ten& m, const Ten& h2) {
        at("mlp.down");
        Ten dm = alloc("dm", n * I, act_, Category::Transient);
        b_.linear_backward_input(dm.t(), dy.at(row0 * d), backward_weight(lp.down), n, I, d);
        linear_weight_grad(lp.down, dy.at(row0 * d), m.t(), n, I, d);
        release_weight(lp.down);
        drop(m);
        at("mlp.act");
        Ten dg = alloc("dg", n * I, act_, Category::Transient);
        Ten du = alloc("du", n * I, act_, Category::Transient);
        b_.swiglu_backward(dg.t(), du.t(), dm.t(), g.t(), u.t(), n * I, gated_);
        drop(dm), drop(g), drop(u);
        at("mlp.gate_up");
        if (!dh2) dh2 = alloc("dh2", T_ * d, act_, Category::Transient);
        b_.linear_backward_input(dh2.at(row0 * d), dg.t(), backward_weight(lp.gate), n, d, I);
        b_.linear_backward_input(dh2.at(row0 * d), du.t(), backward_weight(lp.up), n, d, I, true);
        linear_weight_grad(lp.gate, dg.t(), h2.at(row0 * d), n, d, I);
        linear_weight_grad(lp.up, du.t(), h2.at(row0 * d), n, d, I);
        release_weight(lp.gate);
        release_weight(lp.up);
        drop(dg), drop(du);
    };

    if (m_.moe && s_.mlp_chunks > 1 && s_.mlp_impl == MlpImpl::Tiled) {
        std::int64_t row0 = 0;
        for (std::int64_t n : chunks(s_.mlp_chunks)) {  // each chunk's block again, then its backward
            MlpChunk c;
            Ten none;
            moe_chunk_forward(lp, sv.h2, row0, n, none, &c, /*recompute=*/true);
            moe_chunk_backward(lp, c, sv.h2, dy, dh2);
            row0 += n;
        }
        drop(sv.h2);
        clear_autocast_cache();  // the backward's own autocast region ends
    } else if (m_.moe) {
        for (auto it = sv.mlp.rbegin(); it != sv.mlp.rend(); ++it) {
            moe_chunk_backward(lp, *it, it->h2, dy, dh2);
            drop(it->h2);
        }
        sv.mlp.clear();
    } else if (s_.mlp_chunks > 1 && s_.mlp_impl == MlpImpl::Tiled) {
        std::int64_t row0 = 0;
        for (std::int64_t n : chunks(s_.mlp_chunks)) {
            at("mlp.recompute");  // the chunk's forward again, without saving anything
            const Tensor wg = use_weight(lp.gate), wu = use_weight(lp.up);
            Ten g = alloc("g", n * I, act_, Category::Transient);
            Ten u = alloc("u", n * I, act_, Category::Transient);
            Ten m = alloc("m", n * I, act_, Category::Transient);
            linear_forward(g.t(), sv.h2.at(row0 * d), lp.gate, wg, n, d, I);
            linear_forward(u.t(), sv.h2.at(row0 * d), lp.up, wu, n, d, I);
            b_.swiglu_forward(m.t(), g.t(), u.t(), n * I, gated_);
            use_weight(lp.down);
            chunk_backward(row0, n, g, u, m, sv.h2);
            row0 += n;
        }
        drop(sv.h2);
        clear_autocast_cache();  // the backward's own autocast region ends
    } else {
        // Autograd runs the chunks' backward in reverse creation order.
        for (auto it = sv.mlp.rbegin(); it != sv.mlp.rend(); ++it) {
            chunk_backward(it->row0, it->tokens, it->g, it->u, it->m, it->h2);
            drop(it->h2);
        }
        sv.mlp.clear();
    }
    for (int p : {lp.down, lp.gate, lp.up, lp.router})
        if (p >= 0) grad_done(p);
    return uncast_grad(std::move(dh2), d);
}

}  // namespace mst::exec
