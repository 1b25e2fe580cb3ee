// Memory rules of a decoder layer's attention block, its norms and residuals.
//
// Shapes (per rank): tokens_ = B*S/sp rows; d = hidden, q_dim = nh*hd, kv_dim = nkv*hd.
// Under Ulysses (sp > 1) attention runs on the full sequence with nh/sp heads: the
// same number of bytes per tensor, moved by all-to-all.
#include "builder.hpp"

namespace mst::sim {

T StepBuilder::norm_forward(T& rstd, int bpe, bool output_saved) {
    T out = act("norm_out", elems(tokens_, m_.hidden_size, bpe), output_saved);
    rstd = grad_ ? alloc("rstd", f32(tokens_, 1), Category::SavedActivation) : T{};
    return out;
}

T StepBuilder::softcap_forward(T x, bytes_t bytes, const SoftcapNames& names, T& saved_tanh) {
    T div = act(names[0], bytes, false);
    drop(x);
    T th = act(names[1], bytes, true);
    drop(div);
    T capped = act(names[2], bytes, false);
    saved_tanh = saved(th);
    drop(th);
    return capped;
}

T StepBuilder::softcap_backward(T g, bytes_t bytes, const SoftcapNames& names, T& saved_tanh) {
    T t1 = alloc(names[0], bytes, Category::Transient);  // the * cap backward
    drop(g);
    T t2 = alloc(names[1], bytes, Category::Transient);  // tanh backward, from its saved output
    drop(t1), drop(saved_tanh);
    T dx = alloc(names[2], bytes, Category::Transient);  // the / cap backward
    drop(t2);
    return dx;
}

T StepBuilder::post_norm_forward(const char* op, T x, T& saved_input, T& rstd) {
    at(op);
    T out = norm_forward(rstd, 2, false);
    saved_input = saved(x);
    drop(x);
    return out;
}

T StepBuilder::norm_backward(int p, T& rstd, T& x_saved, int bpe) {
    T dx = alloc("d_norm_in", elems(tokens_, m_.hidden_size, bpe), Category::Transient);
    grad_write(p);
    drop(rstd);
    drop(x_saved);
    grad_done(p);
    return dx;
}

std::int64_t StepBuilder::attention_masks() const {
    if (s_.attention != Attention::Eager) return 0;
    bool any_sliding = false, any_full = false;
    for (bool sl : m_.sliding_layers) (sl ? any_sliding : any_full) = true;
    return (any_sliding ? 1 : 0) + (any_full ? 1 : 0);
}

T StepBuilder::layer_forward(int l, T x, LayerSaved& sv, Category out_category) {
    layer_ = l;
    const std::int64_t d = m_.hidden_size;
    const bool gemma = m_.family == Family::Gemma2;

    at("attn.norm");
    T h1 = norm_forward(sv.rstd1, rb_, rb_ == 2);
    sv.x = saved(x);
    T a;
    attention_forward(l, h1, sv, a);
    if (gemma) a = post_norm_forward("attn.post_norm", a, sv.a, sv.rstd_pa);
    at("attn.residual");
    T x2 = act("x2", res(tokens_, d), true);
    drop(a);
    drop(x);

    at("mlp.norm");
    T h2 = norm_forward(sv.rstd2, rb_, rb_ == 2);
    sv.x2 = saved(x2);
    T y = mlp_forward(l, h2, sv);
    if (gemma) y = post_norm_forward("mlp.post_norm", y, sv.y, sv.rstd_pf);
    at("mlp.residual");
    T out = alloc("x_out", res(tokens_, d), out_category);
    drop(y);
    drop(x2);
    return out;
}

void StepBuilder::layer_backward(int l, LayerSaved& sv, T dres) {
    layer_ = l;
    const LayerParams& lp = layer_params_[static_cast<std::size_t>(l)];
    const bool gemma = m_.family == Family::Gemma2;

    // MLP block: the residual passes dres through; the branch adds its input gradient back.
    T dy_post;
    if (gemma) {
        at("mlp.post_norm");
        dy_post = norm_backward(lp.post_ff_norm, sv.rstd_pf, sv.y, 2);
    }
    T dh2 = mlp_backward(l, sv, gemma ? dy_post : dres);
    drop(dy_post);
    at("mlp.norm");
    T dx = norm_backward(lp.norm2, sv.rstd2, sv.x2, rb_);
    drop(dh2);
    drop(dx);  // added into dres in place

    T da_post;
    if (gemma) {
        at("attn.post_norm");
        da_post = norm_backward(lp.post_attn_norm, sv.rstd_pa, sv.a, 2);
    }
    T dh1 = attention_backward(l, sv, gemma ? da_post : dres);
    drop(da_post);
    at("attn.norm");
    dx = norm_backward(lp.norm1, sv.rstd1, sv.x, rb_);
    drop(dh1);
    drop(dx);
}

void StepBuilder::attention_forward(int l, T h1, LayerSaved& sv, T& attn_out) {
    const LayerParams& lp = layer_params_[static_cast<std::size_t>(l)];
    const std::int64_t d = m_.hidden_size, qd = m_.q_dim(), kvd = m_.kv_dim();

    at("attn.qkv");
    T hin = cast_for_matmul(h1, d);
    use_weight(lp.q);
    use_weight(lp.k);
    use_weight(lp.v);
    T q = act("q", bf16(tokens_, qd), true);
    T k = act("k", bf16(tokens_, kvd), true);
    T v = act("v", bf16(tokens_, kvd), true);
    sv.h1 = saved(hin);
    drop(hin);
    // RoPE rotates q and k in place.
    if (s_.sp > 1) {
        at("attn.all_to_all");  // sequence-sharded -> head-sharded
        for (T* t : {&q, &k, &v}) {
            T moved = act("a2a_out", table_[static_cast<std::size_t>(t->id)].bytes, true);
            drop(*t);
            *t = moved;
        }
    }

    T o;
    if (s_.attention == Attention::Flash) {
        at("attn.flash");
        o = act("o", bf16(tokens_, qd), true);
        T lse = act("lse", f32(tokens_, m_.num_heads), true);  // [B, nh/sp, S] fp32
        sv.q = saved(q);
        sv.k = saved(k);
        sv.v = saved(v);
        sv.o = saved(o);
        sv.lse = saved(lse);
        drop(q), drop(k), drop(v), drop(lse);
    } else {
        // Hugging Face eager attention: repeat_kv copies, scores, scaling, mask add,
        // softmax in fp32 (saved), cast back to bf16 (saved by the PV matmul).
        at("attn.eager");
        const std::int64_t rows = s_.micro_batch * (m_.num_heads / s_.sp);
        const std::int64_t cols = checked_mul(s_.seq_len, s_.seq_len);
        T k_rep = k, v_rep = v;
        if (m_.num_kv_heads < m_.num_heads) {
            k_rep = act("k_rep", bf16(tokens_, qd), true);
            v_rep = act("v_rep", bf16(tokens_, qd), true);
            drop(k), drop(v);
        }
        T scores = act("scores", bf16(rows, cols), false);
        sv.q = saved(q);
        sv.k_rep = saved(k_rep);
        drop(q), drop(k_rep);
        T scaled = act("scores_scaled", bf16(rows, cols), false);
        drop(scores);
        scores = scaled;
        if (m_.attn_logit_softcapping) {  // Gemma-2: tanh(s / cap) * cap, tanh saves its output
            scores = softcap_forward(scores, bf16(rows, cols), {"scores_div", "scores_tanh", "scores_capped"}, sv.scores_tanh);
        }
        T masked = act("scores_masked", bf16(rows, cols), false);
        drop(scores);
        T p32 = act("probs_fp32", f32(rows, cols), true);
        drop(masked);
        T p = act("probs", bf16(rows, cols), true);
        sv.probs32 = saved(p32);
        drop(p32);
        o = act("o", bf16(tokens_, qd), true);
        sv.probs = saved(p);
        sv.v_rep = saved(v_rep);
        drop(p), drop(v_rep);
    }
    if (s_.sp > 1) {
        at("attn.all_to_all");  // head-sharded -> sequence-sharded
        T o_seq = act("o_seq", bf16(tokens_, qd), true);
        drop(o);
        o = o_seq;
    }
    at("attn.o_proj");
    use_weight(lp.o);
    attn_out = act("attn_out", bf16(tokens_, d), m_.family == Family::Gemma2);
    sv.o_seq = saved(o);  // the o_proj input
    drop(o);
}

T StepBuilder::attention_backward(int l, LayerSaved& sv, T d_out) {
    (void)d_out;  // read, not owned: the residual gradient or the post-norm's
    const LayerParams& lp = layer_params_[static_cast<std::size_t>(l)];
    const std::int64_t d = m_.hidden_size, qd = m_.q_dim(), kvd = m_.kv_dim();

    at("attn.o_proj");
    T d_o = alloc("d_o", bf16(tokens_, qd), Category::Transient);
    grad_write(lp.o);
    release_weight(lp.o);
    drop(sv.o_seq);
    grad_done(lp.o);
    if (s_.sp > 1) {
        at("attn.all_to_all");
        T t = alloc("d_o_heads", bf16(tokens_, qd), Category::Transient);
        drop(d_o);
        d_o = t;
    }

    T dq, dk, dv;
    if (s_.attention == Attention::Flash) {
        // FlashAttention-2 backward: fp32 dq accumulator and the rowsum(dO * O) term.
        at("attn.flash");
        T dq_acc = alloc("dq_accum_fp32", f32(tokens_, qd), Category::Transient);
        T delta = alloc("softmax_d", f32(tokens_, m_.num_heads), Category::Transient);
        dq = alloc("dq", bf16(tokens_, qd), Category::Transient);
        dk = alloc("dk", bf16(tokens_, kvd), Category::Transient);
        dv = alloc("dv", bf16(tokens_, kvd), Category::Transient);
        drop(dq_acc), drop(delta), drop(d_o);
        drop(sv.q), drop(sv.k), drop(sv.v), drop(sv.o), drop(sv.lse);
    } else {
        at("attn.eager");
        const std::int64_t rows = s_.micro_batch * (m_.num_heads / s_.sp);
        const std::int64_t cols = checked_mul(s_.seq_len, s_.seq_len);
        T dp = alloc("d_probs", bf16(rows, cols), Category::Transient);
        T dv_rep = alloc("d_v_rep", bf16(tokens_, qd), Category::Transient);
        drop(d_o), drop(sv.probs), drop(sv.v_rep);
        T dp32 = alloc("d_probs_fp32", f32(rows, cols), Category::Transient);
        drop(dp);
        T ds = alloc("d_scores", bf16(rows, cols), Category::Transient);
        drop(dp32), drop(sv.probs32);
        if (m_.attn_logit_softcapping) {
            ds = softcap_backward(ds, bf16(rows, cols), {"d_scores_capped", "d_scores_tanh", "d_scores_div"}, sv.scores_tanh);
        }
        T unscaled = alloc("d_scores_unscaled", bf16(rows, cols), Category::Transient);
        drop(ds);
        dq = alloc("dq", bf16(tokens_, qd), Category::Transient);
        T dk_rep = alloc("d_k_rep", bf16(tokens_, qd), Category::Transient);
        drop(unscaled), drop(sv.q), drop(sv.k_rep);
        if (m_.num_kv_heads < m_.num_heads) {  // repeat_kv backward sums the head groups
            dk = alloc("dk", bf16(tokens_, kvd), Category::Transient);
            drop(dk_rep);
            dv = alloc("dv", bf16(tokens_, kvd), Category::Transient);
            drop(dv_rep);
        } else {
            dk = dk_rep, dv = dv_rep;
        }
    }
    if (s_.sp > 1) {
        at("attn.all_to_all");
        for (T* t : {&dq, &dk, &dv}) {
            T moved = alloc("d_a2a_out", table_[static_cast<std::size_t>(t->id)].bytes, Category::Transient);
            drop(*t);
            *t = moved;
        }
    }
    at("attn.qkv");
    T dh = alloc("d_h1", bf16(tokens_, d), Category::Transient);
    for (int p : {lp.q, lp.k, lp.v}) {
        grad_write(p);
        release_weight(p);
    }
    drop(dq), drop(dk), drop(dv), drop(sv.h1);
    for (int p : {lp.q, lp.k, lp.v}) grad_done(p);
    return uncast_grad(dh, d);
}

}  // namespace mst::sim
