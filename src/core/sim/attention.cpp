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

// Gemma-2's soft-capping, tanh(x / cap) * cap: three new tensors, the tanh saved by its backward
// (the hf runtime classifies categories after the step: hf_classify).
T StepBuilder::softcap_forward(T x, bytes_t bytes, const SoftcapNames& names, T& saved_tanh) {
    T div = act(names[0], bytes, false);
    drop(x);
    T th = act(names[1], bytes, !hf_);
    drop(div);
    T capped = act(names[2], bytes, false);
    saved_tanh = saved(th);
    drop(th);
    return capped;
}

// MulBackward0, TanhBackward0 (from the saved output), DivBackward0; g is consumed.
T StepBuilder::softcap_backward(T g, bytes_t bytes, const SoftcapNames& names, T& saved_tanh) {
    T t1 = alloc(names[0], bytes, Category::Transient);
    node_end({}, &g);
    T t2 = alloc(names[1], bytes, Category::Transient);
    node_end({&saved_tanh}, &t1);
    T dx = alloc(names[2], bytes, Category::Transient);
    node_end({}, &t2);
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

// Qwen3's norm over each of x's heads ([T x heads, head_dim]) in mst-plan's kernel: x becomes
// the normalised copy; the projection's output stays for the backward with rstd [T x heads].
void StepBuilder::head_norm_forward(int p, T& x, std::int64_t heads, T& x_saved, T& rstd) {
    if (p < 0) return;
    const std::int64_t rows = checked_mul(tokens_, heads);
    T out = act("head_norm_out", bf16(rows, m_.head_dim), true);
    rstd = grad_ ? alloc("rstd_heads", f32(rows, 1), Category::SavedActivation) : T{};
    x_saved = saved(x);
    drop(x);
    x = out;
}

void StepBuilder::head_norm_backward(int p, T& dx, std::int64_t heads, T& x_saved, T& rstd) {
    if (p < 0) return;
    T d_in = alloc("d_head_norm_in", bf16(checked_mul(tokens_, heads), m_.head_dim), Category::Transient);
    grad_write(p);
    drop(rstd), drop(x_saved), drop(dx);
    grad_done(p);
    dx = d_in;
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
    const bool gemma = m_.gemma();

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
    const bool gemma = m_.gemma();

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
    at("attn.qk_norm");
    head_norm_forward(lp.q_norm, q, m_.num_heads, sv.q_raw, sv.rstd_q);
    head_norm_forward(lp.k_norm, k, m_.num_kv_heads, sv.k_raw, sv.rstd_k);
    at("attn.qkv");
    sv.h1 = saved(hin);
    drop(hin);
    // RoPE rotates q and k in place.
    if (s_.ulysses()) {
        at("attn.all_to_all");  // sequence-sharded -> head-sharded
        for (T* t : {&q, &k, &v}) {
            T moved = act("a2a_out", table_[static_cast<std::size_t>(t->id)].bytes, true);
            drop(*t);
            *t = moved;
        }
    }

    T o;
    if (s_.ring()) {  // torch's ring attention (src/core/sim/ring.cpp); o_proj reads the caller's contiguous copy
        T lse, o_seq;
        ring_forward(q, k, v, o, lse, o_seq);
        sv.q = saved(q), sv.k = saved(k), sv.v = saved(v), sv.o = saved(o), sv.lse = saved(lse);
        drop(q), drop(k), drop(v), drop(lse), drop(o);
        o = o_seq;
    } else if (s_.attention == Attention::Flash) {
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
    if (s_.ulysses()) {
        at("attn.all_to_all");  // head-sharded -> sequence-sharded
        T o_seq = act("o_seq", bf16(tokens_, qd), true);
        drop(o);
        o = o_seq;
    }
    at("attn.o_proj");
    use_weight(lp.o);
    attn_out = act("attn_out", bf16(tokens_, d), m_.gemma());
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
    if (s_.ulysses()) {
        at("attn.all_to_all");
        T t = alloc("d_o_heads", bf16(tokens_, qd), Category::Transient);
        drop(d_o);
        d_o = t;
    }

    T dq, dk, dv;
    if (s_.ring()) {  // the flash node's backward, then its saved tensors and d_o go
        ring_backward(d_o, sv.q, sv.k, sv.v, sv.o, sv.lse, dq, dk, dv);
        drop(d_o);
        drop(sv.q), drop(sv.k), drop(sv.v), drop(sv.o), drop(sv.lse);
    } else if (s_.attention == Attention::Flash) {
        // FlashAttention-2 backward: fp32 dq accumulator and the rowsum(dO * O) term.
        at("attn.flash");
        T dq_acc = alloc("dq_accum_fp32", f32(tokens_, qd), Category::Transient);
        T delta = alloc("softmax_d", f32(tokens_, m_.num_heads), Category::Transient);
        dq = alloc("dq", bf16(tokens_, qd), Category::Transient);
        dk = alloc("dk", bf16(tokens_, kvd), Category::Transient);
        dv = alloc("dv", bf16(tokens_, kvd), Category::Transient);
        // gpt-oss: the sinks' gradient from lse and delta, before the workspaces go (the forward
        // reads the parameter as stored: no autocast copy)
        if (lp.sinks >= 0) grad_write(lp.sinks);
        drop(dq_acc), drop(delta), drop(d_o);
        drop(sv.q), drop(sv.k), drop(sv.v), drop(sv.o), drop(sv.lse);
        if (lp.sinks >= 0) grad_done(lp.sinks);
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
    if (s_.ulysses()) {
        at("attn.all_to_all");
        for (T* t : {&dq, &dk, &dv}) {
            T moved = alloc("d_a2a_out", table_[static_cast<std::size_t>(t->id)].bytes, Category::Transient);
            drop(*t);
            *t = moved;
        }
    }
    at("attn.qk_norm");
    head_norm_backward(lp.q_norm, dq, m_.num_heads, sv.q_raw, sv.rstd_q);
    head_norm_backward(lp.k_norm, dk, m_.num_kv_heads, sv.k_raw, sv.rstd_k);
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

// ---- hf runtime: transformers' RMSNorm, attention and decoder layer ------------------------
//
// transformers/models/llama/modeling_llama.py (Mistral and Qwen2 share it) run on PyTorch:
// every aten op's output is a tensor of its own, held as long as a Python name, a temporary
// or an autograd node holds it. Shapes: [T, d] is [B, S, d] flattened; the attention heads
// are [B, H, S, D] (T x H*D elements), the rotary tables [1, S, D].

namespace mst::sim {

// LlamaRMSNorm.forward on the [T, d] bf16 input (borrowed):
//   a = x.to(fp32); v = a.pow(2).mean(-1, keepdim); n = a * rsqrt(v + eps); return w * n.to(bf16)
// Under autocast the input is fp32: both casts are no-ops (a is x, the output fp32).
T StepBuilder::hf_norm_forward(int p, T x, HfNorm& sv, bool stop_after_last_save, std::int64_t rows, std::int64_t d) {
    const bool gemma = m_.gemma();
    z3_fetch_of(p);  // (the weight is read as it is: autocast leaves elementwise ops alone)
    const bool fp32_in = amp_ && x.valid();
    sv.fp32_in = fp32_in;
    T a = fp32_in ? hold(x) : act("norm.upcast", f32(rows, d), false);
    T pw = act("norm.pow", f32(rows, d), false);
    sv.a_pow = saved(a);
    T v = act("norm.variance", f32(rows, 1), false);
    drop(pw);
    T e = act("norm.variance_eps", f32(rows, 1), false);
    if (gemma) drop(v);  // Gemma2RMSNorm._norm keeps no variance variable
    T r = act("norm.rsqrt", f32(rows, 1), false);
    sv.r_rsqrt = saved(r);  // rsqrt's backward reads its result
    drop(e);
    T n = act("norm.normed_fp32", f32(rows, d), false);
    sv.a_mul = saved(a);
    sv.r_mul = saved(r);
    drop(r);  // the rsqrt temporary dies with the expression
    drop(a);  // hidden_states = n
    if (gemma) {  // (n * (1 + weight.float())).type_as(x): under autocast the weight is fp32 (no copy)
        T wf = amp_ ? T{} : act("norm.weight_fp32", elems(d, 1, 4), false);
        T w1 = act("norm.one_plus_weight", elems(d, 1, 4), false);
        drop(wf);
        sv.n = saved(n), sv.w1 = saved(w1);  // saved before the product exists
        if (stop_after_last_save) {  // the layer's last saved tensor: the recomputation stops
            drop(w1), drop(n);
            return T{};
        }
        T o = act("norm.out_fp32", f32(rows, d), false);
        drop(w1), drop(n);  // the operand, then the variable it rebinds
        T out = o;
        if (!fp32_in) {  // type_as an fp32 x: no cast
            out = act("norm_out", bf16(rows, d), false);
            drop(o);
        }
        z3_release_of(p);
        return out;
    }
    if (m_.norm_scales_fp32()) {  // (weight * n).to(x's dtype): the product saves n (and the weight)
        sv.n = saved(n), sv.w = z3_recompute_alias(p);
        T o = act("norm.out_fp32", f32(rows, d), false);
        T out = fp32_in ? hold(o) : act("norm_out", bf16(rows, d), false);
        drop(o);
        drop(n), drop(v);  // the locals, at return
        z3_release_of(p);
        return out;
    }
    T c = fp32_in ? hold(n) : act("norm.normed", bf16(rows, d), false);  // weight * n.to(bf16)
    T out = act("norm_out", amp_ ? f32(rows, d) : bf16(rows, d), false);  // (autocast: an fp32 weight)
    sv.c = saved(c), sv.w = z3_recompute_alias(p);
    drop(c);
    drop(n), drop(v);  // the locals, at return
    z3_release_of(p);
    return out;
}

T StepBuilder::hf_norm_backward(int p, HfNorm& sv, T g, bool last_unpack, std::int64_t rows, std::int64_t d, T* into) {
    const bool fp32_in = sv.fp32_in;  // x was the fp32 residual stream (a is x)
    z3_fetch_of(p, false);
    // ZeRO-3: a buffer whose gradient came through DeepSpeed's hook Functions is never summed in place
    auto to_input = [&](T& grad) {  // x's gradient reaches its buffer
        if (!into) return;
        accumulate(*into, grad, z3_on_);
        grad = T{};
    };
    T gn;  // the gradient of n, fp32
    if (m_.gemma()) {
        T g32 = g;
        if (!fp32_in) {  // ToCopyBackward0 (type_as)
            g32 = alloc("d_norm_out_fp32", f32(rows, d), Category::Transient);
            node_end({}, &g);
        }
        unpack();
        // MulBackward0 (n * w1): w1's gradient (reduced to [d]), then n's
        T gw1_full = alloc("d_one_plus_weight_full", f32(rows, d), Category::Transient);
        gn = alloc("d_normed_fp32", f32(rows, d), Category::Transient);
        T gw1;
        node_end({&sv.w1, &sv.n}, &g32, [&] {
            gw1 = alloc("d_one_plus_weight", elems(d, 1, 4), Category::Transient);
            drop(gw1_full);
        });
        // AddBackward0 (1 + wf) passes it on; ToCopyBackward0 (weight.float()) casts it to the weight's
        // (under autocast the weight is fp32: no cast, the sum is its gradient)
        T gw = gw1;
        if (!amp_) {
            gw = grad_out(p);
            node_end({}, &gw1, [&] { fsdp2_upcast_output(p, gw); });
        }
        add_grad(p, gw, false, true);
    } else if (m_.norm_scales_fp32()) {
        T g32 = g;
        if (!fp32_in) {  // ToCopyBackward0
            g32 = alloc("d_norm_out_fp32", f32(rows, d), Category::Transient);
            node_end({}, &g);
        }
        unpack();
        // MulBackward0 (w * n): n's gradient, then w's, which validate_outputs reduces to [d] and casts
        // to the weight's dtype (under autocast the weight is fp32: the reduction is its gradient, a view)
        gn = alloc("d_normed_fp32", f32(rows, d), Category::Transient);
        T gw_full = alloc("d_norm_weight_full", f32(rows, d), Category::Transient);
        T gw;
        node_end({&sv.n, &sv.w}, &g32, [&] {
            gw = amp_ ? grad_out(p) : alloc("d_norm_weight_fp32", elems(d, 1, 4), Category::Transient);
            drop(gw_full);
            if (amp_ || fsdp2_upcasts(p)) return;  // (FSDP2's fp32 grad_dtype: no cast)
            T cast = grad_out(p);
            drop(gw);
            gw = cast;
        });
        add_grad(p, gw, amp_, true);
    } else {
        // MulBackward0 (w * c): the gradient of c, then w's (reduced to [d] by validate_outputs)
        // Under autocast w is fp32: both products are fp32, and validate_outputs casts c's to c's
        // dtype (bf16 unless x was fp32) after reducing w's.
        T gc = alloc("d_normed", amp_ || fp32_in ? f32(rows, d) : bf16(rows, d), Category::Transient);
        T gw_full = alloc("d_norm_weight_full", amp_ ? f32(rows, d) : bf16(rows, d), Category::Transient);
        T gw;
        node_end({&sv.c, &sv.w}, &g, [&] {
            gw = grad_out(p);
            drop(gw_full);
            fsdp2_upcast_output(p, gw);
            if (amp_ && !fp32_in) {
                T cast = alloc("d_normed_bf16", bf16(rows, d), Category::Transient);
                drop(gc);
                gc = cast;
            }
        });
        add_grad(p, gw, true, true);
        if (fp32_in) {
            gn = gc;
        } else {  // ToCopyBackward0 (n.to(bf16))
            gn = alloc("d_normed_fp32", f32(rows, d), Category::Transient);
            node_end({}, &gc);
        }
    }
    // MulBackward0 (a * r): the gradient of r (reduced to [T, 1]), then a's
    T gr_full = alloc("d_rsqrt_full", f32(rows, d), Category::Transient);
    T ga = alloc("d_upcast", f32(rows, d), Category::Transient);
    T gr;
    node_end({&sv.a_mul, &sv.r_mul}, &gn, [&] {
        gr = alloc("d_rsqrt", f32(rows, 1), Category::Transient);
        drop(gr_full);
    });
    if (fp32_in) to_input(ga);
    // RsqrtBackward0: -0.5 * grad * r^3
    T cube = alloc("d_rsqrt.pow", f32(rows, 1), Category::Transient);
    T half = alloc("d_rsqrt.mul", f32(rows, 1), Category::Transient);
    T ge = alloc("d_variance", f32(rows, 1), Category::Transient);
    drop(half), drop(cube);
    node_end({&sv.r_rsqrt}, &gr);
    // AddBackward0 (v + eps) passes ge on; MeanBackward1 spreads it over d
    T gp = alloc("d_pow", f32(rows, d), Category::Transient);
    node_end({}, &ge);
    // PowBackward0: grad * 2 * a
    T ap = alloc("d_pow.pow", f32(rows, d), Category::Transient);
    T two = alloc("d_pow.mul", f32(rows, d), Category::Transient);
    T ga2 = alloc("d_upcast_2", f32(rows, d), Category::Transient);
    drop(two), drop(ap);
    node_end({&sv.a_pow}, &gp);
    if (last_unpack) hf_release_frame();
    if (fp32_in) {  // no cast
        if (ga.valid()) accumulate(ga, ga2, false);
        else ga = ga2;
        to_input(ga);
        return ga;
    }
    accumulate(ga, ga2, false);
    // ToCopyBackward0 (x.to(fp32))
    T gx = alloc("d_norm_in", bf16(rows, d), Category::Transient);
    node_end({}, &ga);
    z3_release_of(p, false);
    to_input(gx);
    return gx;
}

// apply_rotary_pos_emb on one of q, k ([T, heads * D] as [B, heads, S, D]):
//   x * cos + cat(-x2, x1) * sin; each product saves its table. Phi-3 rotates the first
//   rotary_dim of each head's D (views x[..., :R] and x[..., R:]) and concatenates the rest after
//   the rotated share: a new [B, heads, S, D] tensor even when nothing passes through (R = D).
// Under autocast the tables are fp32: the products and their sum are promoted to fp32.
// gpt-oss (_apply_rotary_emb, tables [S, D/2]): x1, x2 = x.chunk(2) (views); cat(x1 cos - x2 sin,
// x2 cos + x1 sin): four products, each saving its table (cos2, sin2: the second ones).
T StepBuilder::hf_rope_forward(T x, std::int64_t heads, T& cos_saved, T& sin_saved, T& cos2, T& sin2) {
    (void)x;  // read, not owned
    const std::int64_t dim = checked_mul(heads, m_.rotary_dim);
    const int rb = amp_ ? 4 : 2;                  // the products' dtype
    if (m_.rotary_half_tables()) {
        const bytes_t half = elems(tokens_, dim / 2, rb);
        // a half's product with cos, then with sin (each saving its table), then their difference or sum
        auto combine = [&](const char* with_cos, T& cos_h, const char* with_sin, T& sin_h, const char* name) {
            T c = act(with_cos, half, false);
            cos_h = saved(hf_rope(layer_).cos);
            T sn = act(with_sin, half, false);
            sin_h = saved(hf_rope(layer_).sin);
            T r = act(name, half, false);
            drop(c), drop(sn);
            return r;
        };
        T first = combine("rope.x1_cos", cos_saved, "rope.x2_sin", sin_saved, "rope.first");   // x1 cos - x2 sin
        T second = combine("rope.x2_cos", cos2, "rope.x1_sin", sin2, "rope.second");          // x2 cos + x1 sin
        T out = act("rope.out", elems(tokens_, dim, rb), false);
        drop(first), drop(second);
        return out;
    }
    const int xb = hf_fp32_heads() ? 4 : 2;       // x's, and rotate_half's
    T xc = act("rope.x_cos", elems(tokens_, dim, rb), false);
    cos_saved = saved(hf_rope(layer_).cos);
    T neg = act("rope.neg", elems(tokens_, dim / 2, xb), false);
    T cat = act("rope.rotated", elems(tokens_, dim, xb), false);
    drop(neg);
    T rs = act("rope.rotated_sin", elems(tokens_, dim, rb), false);
    sin_saved = saved(hf_rope(layer_).sin);
    drop(cat);
    T out = act("rope.out", elems(tokens_, dim, rb), false);
    drop(xc), drop(rs);
    if (!m_.rotary_concatenates()) return out;
    // Under autocast the rotated share is fp32: cat's kernel promotes the bf16 pass-through share
    // as it copies it (CUDA's autocast has no policy for cat; the CPU's would copy it first).
    T joined = act("rope.joined", elems(tokens_, checked_mul(heads, m_.head_dim), rb), false);
    drop(out);
    return joined;
}

// d: the rotated tensor's gradient (consumed); returns the gradient of the rotated share.
// Phi-3: CatBackward0 first narrows d into the rotated share and the pass-through one, whose view
// `pass` receives (the caller runs both shares' SliceBackward0 later: hf_rope_slices_backward).
T StepBuilder::hf_rope_backward(T d, std::int64_t heads, T& cos_saved, T& sin_saved, T& cos2, T& sin2, T* pass) {
    const std::int64_t dim = checked_mul(heads, m_.rotary_dim);
    if (pass) {  // under autocast the pass-through share was promoted: CatBackward0 casts its gradient back
        const std::int64_t rest = checked_mul(heads, m_.head_dim - m_.rotary_dim);
        *pass = !amp_ ? hold(d) : rest > 0 ? alloc("d_rope.pass_bf16", bf16(tokens_, rest), Category::Transient) : T{};
    }
    // A product's gradient for its x-side factor ([T, width]): under autocast (fp32 tables) computed
    // in fp32, then cast to x's bf16 (Qwen3's normed heads are fp32 already).
    const int xb = hf_fp32_heads() ? 4 : 2;
    auto factor_grad = [&](const char* name, std::int64_t width) {
        T g32 = amp_ && xb == 2 ? alloc("d_rope.product_fp32", f32(tokens_, width), Category::Transient) : T{};
        T g = alloc(name, elems(tokens_, width, xb), Category::Transient);
        drop(g32);
        return g;
    };
    if (m_.rotary_half_tables()) {
        // Nodes run last made first. CatBackward0 hands views of d to the sum and the difference;
        // AddBackward0 (second) passes its gradient to both products, SubBackward0 (first) its
        // negation to x2 sin; each product's gradient reaches SplitBackward0's buffer for its half
        // (a second one is added in place), which joins the halves.
        const std::int64_t h = dim / 2;
        auto half_grad = [&](const char* name) { return factor_grad(name, h); };
        T g_first = hold(d), g_second = d;
        T g_second2 = hold(g_second);
        T gx1 = half_grad("d_rope.x1_sin");  // x1 * sin
        node_end({&sin2}, &g_second2);
        T gx2 = half_grad("d_rope.x2_cos");  // x2 * cos
        node_end({&cos2}, &g_second);
        T neg = alloc("d_rope.neg", elems(tokens_, h, amp_ ? 4 : xb), Category::Transient);
        T g2 = half_grad("d_rope.x2_sin");  // x2 * sin, from the negation
        node_end({&sin_saved}, &neg);
        accumulate(gx2, g2, false);
        T g1 = half_grad("d_rope.x1_cos");  // x1 * cos
        node_end({&cos_saved}, &g_first);
        accumulate(gx1, g1, false);
        T gx = alloc("d_rope.x", elems(tokens_, dim, xb), Category::Transient);
        drop(gx1), drop(gx2);
        return gx;
    }
    T d_cos = hold(d);  // AddBackward0 hands the gradient to both products
    // MulBackward0 (rotated * sin)
    T gr = factor_grad("d_rope.rotated", dim);
    node_end({&sin_saved}, &d);
    // CatBackward0 narrows gr into the halves' gradients (views); NegBackward0 on the first
    T half1 = hold(gr), half2 = hold(gr);
    drop(gr);
    T gneg = alloc("d_rope.neg", elems(tokens_, dim / 2, xb), Category::Transient);
    node_end({}, &half1);
    // SliceBackward0 (x2 = x[..., D/2:], then x1 = x[..., :D/2]): zeros of x's shape, the half copied in
    T gx = alloc("d_rope.slice_x2", elems(tokens_, dim, xb), Category::Transient);
    node_end({}, &gneg);
    T gx1 = alloc("d_rope.slice_x1", elems(tokens_, dim, xb), Category::Transient);
    node_end({}, &half2);
    accumulate(gx, gx1, false);
    // MulBackward0 (x * cos)
    T gc = factor_grad("d_rope.x_cos", dim);
    node_end({&cos_saved}, &d_cos);
    accumulate(gx, gc, false);
    return gx;
}

// Phi-3: the SliceBackward0 of x[..., R:] (its gradient `pass`, a view of the joined tensor's) and
// of x[..., :R] (`rotated`): each a zero-filled [B, heads, S, D] with its share copied in, summed in
// place. When R = D, x[..., :R] is an alias of x (indexing skips a full slice): its node hands the
// rotated gradient on as it is, after the pass-through's (created later, it runs first).
T StepBuilder::hf_rope_slices_backward(T pass, T rotated, std::int64_t heads) {
    const std::int64_t dim = checked_mul(heads, m_.head_dim);
    T g = alloc("d_rope.slice_pass", bf16(tokens_, dim), Category::Transient);
    node_end({}, &pass);
    if (m_.rotary_dim < m_.head_dim) {
        T g_rotated = alloc("d_rope.slice_rotated", bf16(tokens_, dim), Category::Transient);
        node_end({}, &rotated);
        rotated = g_rotated;
    }
    accumulate(g, rotated, false);
    return g;
}

// LlamaAttention.forward with the plan's attention: flash is transformers' flash_attention_2
// (flash-attn's kernels on [B, S, H, D] views, no repeat_kv: hf_flash_forward), eager its
// eager_attention_forward (hf_eager_forward).
// weights: what the attention returns besides its output (eager: the probabilities), which the
// decoder layer's `_` holds until it returns.
void StepBuilder::hf_attention_forward(HfLayer& sv, T h1, T& attn_out, T& weights) {
    const LayerParams& lp = layer_params_[static_cast<std::size_t>(layer_)];
    const std::int64_t d = m_.hidden_size, qd = m_.q_dim(), kvd = m_.kv_dim();
    // Qwen3 normalises each query and key head over head_dim right after its projection (the
    // projection's output then dies: the norm saved its fp32 upcast).
    auto head_norm = [&](T x, int p, HfNorm& n, std::int64_t heads) {
        if (p < 0) return x;
        at("attn.qk_norm");
        T out = hf_norm_forward(p, T{}, n, false, checked_mul(tokens_, heads), m_.head_dim);
        drop(x);
        at("attn.qkv");
        return out;
    };
    const bool norms_last = m_.qk_norms_after_projections();
    at("attn.qkv");
    if (z3_on_) z3_fetch(z3_.layers[static_cast<std::size_t>(layer_)].attn);
    T q, k, v;
    if (m_.fused_projections()) {
        // Phi-3: one qkv_proj; q, k and v are views of its output. v's view is what the attention
        // keeps, so the whole [T, q + 2 kv] output lives as long as v (one handle for both).
        z3_fetch_of(lp.q);
        T in = hf_linear_input(lp.q, lp.q_bias, h1, tokens_, d);
        v = act("qkv", bf16(tokens_, qd + 2 * kvd), false);
        sv.h1_q = saved(in);
        drop(in);
        z3_release_of(lp.q);
    } else {
        // each projection its own: under autocast each casts the fp32 input again
        auto project = [&](int w, int b, const char* name, std::int64_t cols, T& saved_in) {
            z3_fetch_of(w);
            T in = hf_linear_input(w, b, h1, tokens_, d);
            T out = act(name, bf16(tokens_, cols), false);
            saved_in = saved(in);
            drop(in);
            z3_release_of(w);
            return out;
        };
        q = project(lp.q, lp.q_bias, "q", qd, sv.h1_q);
        if (!norms_last) q = head_norm(q, lp.q_norm, sv.nq, m_.num_heads);
        k = project(lp.k, lp.k_bias, "k", kvd, sv.h1_k);
        if (!norms_last) k = head_norm(k, lp.k_norm, sv.nk, m_.num_kv_heads);
        v = project(lp.v, lp.v_bias, "v", kvd, sv.h1_v);
        if (norms_last) {
            q = head_norm(q, lp.q_norm, sv.nq, m_.num_heads);
            k = head_norm(k, lp.k_norm, sv.nk, m_.num_kv_heads);
        }
    }
    at("attn.rope");
    T qe = hf_rope_forward(q, m_.num_heads, sv.cos_q, sv.sin_q, sv.cos_q2, sv.sin_q2);
    T ke = hf_rope_forward(k, m_.num_kv_heads, sv.cos_k, sv.sin_k, sv.cos_k2, sv.sin_k2);
    drop(q), drop(k);  // query_states, key_states = the rotated ones
    if (s_.attention == Attention::Eager) {
        hf_eager_forward(sv, qe, ke, v, attn_out, weights);
        return;
    }
    T o;
    hf_flash_forward(sv, qe, ke, v, o);
    if (hf_q_heads_first()) {
        // The output is empty_like(q) in both kernels: [B, H, S, D] in memory like a joined q, so
        // transformers' reshape (flash_attention_2) or transpose(1, 2).contiguous() (sdpa) before
        // o_proj copies it; the kernel's node keeps the original, o_proj saves the copy.
        T copy = act("o_contiguous", bf16(tokens_, qd), false);
        drop(o);
        o = copy;
    }
    hf_o_proj_forward(sv, o, qe, ke, v, attn_out);
}

// o_proj on the attention's output o (the kernels' and eager's alike), which it saves; then the
// attention's locals (o, the rotated q and k, v) die as the call returns.
void StepBuilder::hf_o_proj_forward(HfLayer& sv, T o, T qe, T ke, T v, T& attn_out) {
    const LayerParams& lp = layer_params_[static_cast<std::size_t>(layer_)];
    at("attn.o_proj");
    z3_fetch_of(lp.o);
    hf_linear_weights(lp.o, lp.o_bias);
    attn_out = act("attn_out", bf16(tokens_, m_.hidden_size), false);
    z3_release_of(lp.o);
    sv.o_oproj = saved(o);
    drop(o), drop(qe), drop(ke), drop(v);
}

T StepBuilder::hf_attention_backward(int l, HfLayer& sv, T d_out) {
    const LayerParams& lp = layer_params_[static_cast<std::size_t>(l)];
    const std::int64_t d = m_.hidden_size, qd = m_.q_dim(), kvd = m_.kv_dim();
    at("attn.o_proj");
    if (z3_on_) {
        const Z3Layer& L = z3_.layers[static_cast<std::size_t>(l)];
        if (L.attn_dropout >= 0) z3_fetch(L.attn_dropout, false);  // (Phi-3: the branch's output passes it first)
        z3_fetch(L.attn, false);
    }
    T d_o = hf_linear_backward(lp.o, lp.o_bias, "d_o", bf16(tokens_, qd), {&sv.o_oproj}, d_out, [](T&) {});
    T dq, dk, dv;
    if (s_.attention == Attention::Eager) {
        hf_eager_backward(sv, d_o, dq, dk, dv);
    } else {
        hf_flash_backward(sv, d_o, dq, dk, dv);
    }
    at("attn.rope");  // k's products ran after q's in forward: their backward runs first
    const bool fused = m_.fused_projections();
    T k_pass, q_pass;
    T gk = hf_rope_backward(dk, m_.num_kv_heads, sv.cos_k, sv.sin_k, sv.cos_k2, sv.sin_k2, fused ? &k_pass : nullptr);
    T gq = hf_rope_backward(dq, m_.num_heads, sv.cos_q, sv.sin_q, sv.cos_q2, sv.sin_q2, fused ? &q_pass : nullptr);
    // Head norms that ran after all three projections: their backward runs before any of them.
    const bool norms_last = m_.qk_norms_after_projections();
    auto norm_backward = [&](int norm, HfNorm& n, T g, std::int64_t heads) {
        at("attn.qk_norm");
        return hf_norm_backward(norm, n, g, false, checked_mul(tokens_, heads), m_.head_dim);
    };
    if (norms_last) {
        gk = norm_backward(lp.k_norm, sv.nk, gk, m_.num_kv_heads);
        gq = norm_backward(lp.q_norm, sv.nq, gq, m_.num_heads);
    }
    at("attn.qkv");
    // A [B, heads, S, D] contiguous gradient seen as [B, S, heads * D] (the transposes back and the
    // reshape) is a view only with one head (or one position); else the reshape copies.
    auto reshape_copies = [&](std::int64_t heads) { return heads > 1 && s_.seq_len > 1; };
    auto contiguous = [&](T& g, std::int64_t heads, const char* name) {
        if (!reshape_copies(heads)) return;
        T g2 = alloc(name, bf16(tokens_, heads * m_.head_dim), Category::Transient);
        drop(g);
        g = g2;
    };
    // eager's v gradient is [B, heads, S, D] contiguous (flash-attn's is in v's layout: views).
    const bool eager_dv_copies = s_.attention == Attention::Eager;
    if (fused) {
        // Phi-3: the slices of the rotated shares (k's, then q's), the views' reshapes (v's, k's,
        // q's), then the SliceBackward0 of v, k and q on qkv: zero-filled [T, q + 2 kv] each, summed
        // in place, the qkv projection's output gradient.
        at("attn.rope");
        gk = hf_rope_slices_backward(k_pass, gk, m_.num_kv_heads);
        gq = hf_rope_slices_backward(q_pass, gq, m_.num_heads);
        at("attn.qkv");
        if (eager_dv_copies) contiguous(dv, m_.num_kv_heads, "d_v_contiguous");
        contiguous(gk, m_.num_kv_heads, "d_k_contiguous");
        contiguous(gq, m_.num_heads, "d_q_contiguous");
        T g = T{};
        for (T* part : {&dv, &gk, &gq}) {
            T full = alloc("d_qkv", bf16(tokens_, qd + 2 * kvd), Category::Transient);
            node_end({}, part);
            if (g.valid()) accumulate(g, full, false);
            else g = full;
        }
        return hf_linear_backward(lp.q, -1, "d_h1", bf16(tokens_, d), {&sv.h1_q}, g, [](T&) {}, amp_);
    }
    if (eager_dv_copies) contiguous(dv, m_.num_kv_heads, "d_v_contiguous");
    T dh = hf_linear_backward(lp.v, lp.v_bias, "d_h1_v", bf16(tokens_, d), {&sv.h1_v}, dv, [](T&) {}, amp_);
    // k, then q: Qwen3's head norm takes the gradient back to the projection's output; it is
    // contiguous as [B, heads, S, D], so the reshape to [T, heads * D] copies (reshape_copies); the
    // projection's input gradient joins dh (v's and k's are both views of their GEMMs' outputs: a new sum).
    auto head_backward = [&](int proj, int bias, int norm, HfNorm& n, T& saved_in, T g, std::int64_t heads,
                             const char* contiguous_name, const char* input_grad, bool dh_is_view) {
        if (norm >= 0 && !norms_last) {
            g = norm_backward(norm, n, g, heads);
            at("attn.qkv");
        }
        contiguous(g, heads, contiguous_name);
        hf_linear_backward(proj, bias, input_grad, bf16(tokens_, d), {&saved_in}, g,
                           [&](T& gx) { accumulate(dh, gx, (dh_is_view || z3_on_) && !amp_); }, amp_);
    };
    head_backward(lp.k, lp.k_bias, lp.k_norm, sv.nk, sv.h1_k, gk, m_.num_kv_heads, "d_k_contiguous", "d_h1_k", true);
    head_backward(lp.q, lp.q_bias, lp.q_norm, sv.nq, sv.h1_q, gq, m_.num_heads, "d_q_contiguous", "d_h1_q", false);
    return dh;
}

// transformers' _is_packed_sequence on the position ids [1, S] (flash_attention_2, every layer):
// (arange(S) + min) - position_ids, its abs, sum and bool; with B > 1 it answers without ops.
void StepBuilder::hf_packed_check() {
    if (s_.micro_batch != 1 || s_.seq_len == 1) return;
    const bytes_t ids = elems(1, s_.seq_len, 8);
    at("attn.packed_check");
    T range = alloc("arange", ids, Category::Transient);
    T min = alloc("positions_min", 8, Category::Transient);
    T inc = alloc("increasing", ids, Category::Transient);
    drop(range), drop(min);
    T diff = alloc("diff", ids, Category::Transient);
    T abs = alloc("abs", ids, Category::Transient);
    drop(diff);
    T sum = alloc("sum", 8, Category::Transient);
    drop(abs);
    T flag = alloc("packed", 1, Category::Transient);
    drop(sum), drop(flag), drop(inc);
}

// flash-attn 2.8's FlashAttnFunc on q, k, v as transformers passes them ([B, S, heads, D]
// transposes of the rotated q and k, and of v): mha_fwd allocates the output [B, S, H, D], the
// logsumexp [B, H, S] fp32 and the RNG state int64[2], and the node saves q, k, v, the output,
// the logsumexp and the RNG state (csrc/flash_attn/flash_api.cpp, flash_attn_interface.py).
// Under autocast the rotated q and k are fp32: transformers casts them to bf16 first (v is bf16),
// and the node saves the copies.
// sdpa (transformers' sdpa_attention_forward, causal without a mask): PyTorch's own FlashAttention-2,
// aten._scaled_dot_product_flash_attention on the [B, H, S, D] transposes, runs the same mha_fwd on
// [B, S, H, D] views; it asks no packed-sequence question, its RNG seeds are host tensors, and
// autocast (not transformers) casts the fp32 q and k in AMP.
void StepBuilder::hf_flash_forward(HfLayer& sv, T qe, T ke, T v, T& out) {
    const std::int64_t qd = m_.q_dim(), kvd = m_.kv_dim(), heads = m_.num_heads / s_.sp;
    if (amp_) {
        qe = act("q_bf16", bf16(tokens_, qd), false);
        ke = act("k_bf16", bf16(tokens_, kvd), false);
    }
    const bool sdpa = s_.attention == Attention::Sdpa;
    if (!sdpa) hf_packed_check();
    at("attn.flash");
    out = act("o", bf16(tokens_, qd), false);
    T lse = act("lse", elems(s_.micro_batch * heads, s_.seq_len, 4), false);
    T rng = sdpa ? T{} : act("rng_state", 16, false);
    sv.q_fa = saved(qe), sv.k_fa = saved(ke), sv.v_fa = saved(v);
    sv.o_fa = saved(out), sv.lse_fa = saved(lse);
    if (!sdpa) sv.rng_fa = saved(rng);
    drop(lse), drop(rng);  // the call returns only the output
    if (amp_) drop(qe), drop(ke);  // the casts, at return
}

// Its backward: dq, dk, dv like q, k, v; inside mha_bwd the row sums softmax_d [B, H, S128] fp32,
// the dQ accumulator [B, S128, H, D32] fp32 (S rounded to 128, D to 32) and, with grouped-query
// attention, dK and dV for every query head, which die at its return (dV's, dK's, the
// accumulator), then the returned softmax_d. flash-attn's node is a Python Function's; sdpa's is
// aten's ScaledDotProductFlashAttentionBackward0, whose saved inputs and outputs go in name order
// (key, query, value; logsumexp, output).
void StepBuilder::hf_flash_backward(HfLayer& sv, T d_o, T& dq, T& dk, T& dv) {
    const std::int64_t qd = m_.q_dim(), kvd = m_.kv_dim(), heads = m_.num_heads / s_.sp;
    const std::int64_t hd = m_.head_dim, hd_rounded = hd <= 192 ? round_up(hd, 32) : 256;
    const std::int64_t s128 = round_up(s_.seq_len, 128), rows = s_.micro_batch * heads;
    at("attn.flash");
    // aten's _flash_attention_backward (sdpa) makes the saved output contiguous first: a copy when it
    // is [B, H, S, D] in memory (a joined q's), freed after mha_bwd's row sums. (flash-attn only
    // needs a contiguous last dimension.)
    const bool out_copy = s_.attention == Attention::Sdpa && hf_q_heads_first();
    T o_contiguous = out_copy ? alloc("o_contiguous", bf16(tokens_, qd), Category::Transient) : T{};
    dq = alloc("dq", bf16(tokens_, qd), Category::Transient);
    dk = alloc("dk", bf16(tokens_, kvd), Category::Transient);
    dv = alloc("dv", bf16(tokens_, kvd), Category::Transient);
    T softmax_d = alloc("softmax_d", elems(rows, s128, 4), Category::Transient);
    T dq_accum = alloc("dq_accum", elems(rows * s128, hd_rounded, 4), Category::Transient);
    if (m_.num_kv_heads < m_.num_heads) {
        T dk_expanded = alloc("dk_expanded", bf16(tokens_, qd), Category::Transient);
        T dv_expanded = alloc("dv_expanded", bf16(tokens_, qd), Category::Transient);
        drop(dv_expanded), drop(dk_expanded);
    }
    drop(dq_accum), drop(softmax_d);
    if (out_copy) drop(o_contiguous);
    if (s_.attention == Attention::Sdpa) node_end({&sv.k_fa, &sv.q_fa, &sv.v_fa, &sv.lse_fa, &sv.o_fa}, &d_o);
    else py_node_end({&sv.q_fa, &sv.k_fa, &sv.v_fa, &sv.o_fa, &sv.lse_fa, &sv.rng_fa}, &d_o);
    dk = hf_uncast(dk);  // autocast: the casts' nodes, k's (the later) first
    dq = hf_uncast(dq);
}

// eager_attention_forward (modeling_llama.py) on the rotated q, k and v ([B, heads, S, D]):
// repeat_kv copies k and v to all heads (GQA; with one KV head, or none shared, matmul copies k
// and v itself when B > 1, each only for its product), scores = q @ k^T [B*H, S, S] bf16, times the
// scaling, plus the mask, softmax in fp32 (saved) cast back to bf16 (saved by P @ v), the
// output made contiguous as [B, S, H, D] (saved by o_proj). k, v and their repeats die at return.
// The rotated q keeps the projection's [B, S, H, D] memory order: with B > 1, matmul's reshape
// to [B*H, S, D] must copy it (and the copy is what the GEMM saves); likewise the gradient of the
// output in backward.
void StepBuilder::hf_eager_forward(HfLayer& sv, T qe, T ke, T v, T& attn_out, T& weights) {
    const std::int64_t qd = m_.q_dim();
    const std::int64_t rows = s_.micro_batch * (m_.num_heads / s_.sp), cols = checked_mul(s_.seq_len, s_.seq_len);
    // repeat_kv copies k and v to every query head when a KV head serves several (and more than one
    // KV head exists); with one KV head its reshape is a view, without grouping it returns k and v.
    const bool repeat_copies = m_.num_kv_heads < m_.num_heads && m_.num_kv_heads > 1;
    // matmul folds the batch into the heads ([B, H, ...] as [B*H, ...]) and copies an operand whose
    // memory is not in that order (micro-batch > 1): the projections' [B, S, H, D] order is not, nor
    // the rotated q and k that keep it, nor v, nor one KV head expanded to all heads (a zero stride);
    // Phi-3's rotated q and k are new [B, H, S, D] tensors.
    // With one head or one position the two orders coincide: only an expanded KV head's zero
    // stride still makes matmul copy.
    const bool fold_copies = s_.micro_batch > 1 && !hf_one_row();
    const bool rotated_contiguous = m_.rotary_concatenates() || m_.rotary_half_tables();
    const bool expanded = m_.num_kv_heads == 1 && m_.num_heads > 1;
    const bool expanded_copies = s_.micro_batch > 1 && expanded;
    // Under autocast the rotated q and k are fp32 (and k's repeats): matmul's autocast casts them
    // (k first: the arguments last first) and the GEMM saves the copies; the fp32 mask makes the
    // scores fp32, so softmax needs no upcast and its fp32 output is the probabilities (.to(q's
    // dtype) is a no-op), which autocast casts for P @ v.
    const int qb = amp_ ? 4 : 2;
    at("attn.eager");
    T k_rep = repeat_copies ? act("k_rep", elems(tokens_, qd, qb), false) : T{};
    T v_rep = repeat_copies ? act("v_rep", bf16(tokens_, qd), false) : T{};
    T scores;
    if (amp_) {
        T kc = act("k_bf16", bf16(tokens_, qd), false), qc = act("q_bf16", bf16(tokens_, qd), false);
        T q = fold_copies && !rotated_contiguous ? act("q_contiguous", bf16(tokens_, qd), false) : hold(qc);
        T k = fold_copies && !repeat_copies && !expanded && !rotated_contiguous ? act("k_contiguous", bf16(tokens_, qd), false)
                                                                                : hold(kc);
        scores = act("scores", bf16(rows, cols), false);
        sv.q_bmm = saved(q), sv.k_rep = saved(k);
        drop(k), drop(q);    // matmul's locals
        drop(qc), drop(kc);  // autocast's casts, last made first
    } else {
        T q = fold_copies && !rotated_contiguous ? act("q_contiguous", bf16(tokens_, qd), false) : hold(qe);
        if (!repeat_copies)
            k_rep = (fold_copies && !rotated_contiguous) || expanded_copies ? act("k_rep", bf16(tokens_, qd), false) : hold(ke);
        scores = act("scores", bf16(rows, cols), false);
        sv.q_bmm = saved(q), sv.k_rep = saved(k_rep);
        if (!repeat_copies) drop(k_rep);  // matmul's own copy (or view): it lets go of it before q's
        drop(q);
    }
    T scaled = act("scores_scaled", bf16(rows, cols), false);
    drop(scores);
    if (m_.attn_logit_softcapping)
        scaled = softcap_forward(scaled, bf16(rows, cols), {"scores_div", "scores_tanh", "scores_capped"}, sv.scores_tanh);
    T masked = act("scores_masked", elems(rows, cols, qb), false);
    drop(scaled);
    T p, pc, shifted, probs;
    if (m_.attention_sinks) {
        // gpt-oss: cat([scores, sinks], -1) [.., S + 1]; minus each row's maximum; softmax in that
        // dtype (saved); the sink column sliced off (a view) and .to(v's dtype): a bf16 copy under
        // autocast, which is the attn_weights P @ v reads and the attention returns.
        const bytes_t wide = elems(rows, checked_mul(s_.seq_len, s_.seq_len + 1), qb);
        T joined = act("scores_sinks", wide, false);
        T mx = act("row_max", elems(rows, s_.seq_len, qb), false);
        T mi = act("row_max_index", elems(rows, s_.seq_len, 8), false);
        sv.max_idx = saved(mi);
        drop(mi);  // of max's (values, indices), the expression keeps the values
        shifted = act("scores_shifted", wide, false);
        drop(mx), drop(joined);  // combined_logits rebinds
        probs = act("probs_sinks", wide, false);
        sv.probs32 = saved(probs);
        p = amp_ ? act("probs_bf16", bf16(rows, cols), false) : hold(probs);
        drop(masked);  // attn_weights rebinds
        pc = hold(p);
    } else {
        T up = amp_ ? T{} : act("scores_fp32", f32(rows, cols), false);
        T p32 = act("probs_fp32", f32(rows, cols), false);
        sv.probs32 = saved(p32);
        drop(up);
        p = amp_ ? hold(p32) : act("probs", bf16(rows, cols), false);
        drop(p32), drop(masked);  // attn_weights = the probabilities
        pc = amp_ ? act("probs_bf16", bf16(rows, cols), false) : hold(p);  // autocast's, before matmul's copy of v
    }
    if (!repeat_copies) v_rep = fold_copies || expanded_copies ? act("v_rep", bf16(tokens_, qd), false) : hold(v);
    T ob = act("pv", bf16(tokens_, qd), false);
    sv.probs = saved(pc), sv.v_rep = saved(v_rep);
    if (!repeat_copies) drop(v_rep);  // likewise (matmul's local), then autocast's cast
    drop(pc);
    // transpose(1, 2).contiguous(): a copy, unless one head or one position makes the transpose
    // contiguous already (then o is P @ v itself)
    T o = hf_one_row() ? hold(ob) : act("o", bf16(tokens_, qd), false);
    drop(ob);
    drop(k_rep), drop(v_rep);  // eager_attention_forward returns (the probabilities with the output)
    drop(shifted), drop(probs);
    weights = p;
    hf_o_proj_forward(sv, o, qe, ke, v, attn_out);
}

// d_o: the o_proj input's gradient (consumed); out: the rotated q's and k's and v's gradients.
void StepBuilder::hf_eager_backward(HfLayer& sv, T d_o, T& dq, T& dk, T& dv) {
    const std::int64_t qd = m_.q_dim(), kvd = m_.kv_dim();
    const std::int64_t rows = s_.micro_batch * (m_.num_heads / s_.sp), cols = checked_mul(s_.seq_len, s_.seq_len);
    const bool gqa = m_.num_kv_heads < m_.num_heads;
    at("attn.eager");
    if (s_.micro_batch > 1 && !hf_one_row()) {  // the reshape of the transposed gradient copies it
        T c = alloc("d_o_contiguous", bf16(tokens_, qd), Category::Transient);
        node_end({}, &d_o);
        d_o = c;
    }
    T gv = alloc("d_v_rep", bf16(tokens_, qd), Category::Transient);  // BmmBackward0 (P @ v)
    T gp = alloc("d_probs", bf16(rows, cols), Category::Transient);
    node_end({&sv.v_rep, &sv.probs}, &d_o);
    T gb;
    if (m_.attention_sinks) {
        gb = hf_sinks_backward(sv, gp);
    } else {
        T g32 = alloc("d_probs_fp32", f32(rows, cols), Category::Transient);  // ToCopyBackward0
        node_end({}, &gp);
        T gs = alloc("d_scores_fp32", f32(rows, cols), Category::Transient);  // SoftmaxBackward0
        node_end({&sv.probs32}, &g32);
        gb = alloc("d_scores_masked", bf16(rows, cols), Category::Transient);  // ToCopyBackward0
        node_end({}, &gs);
    }
    if (m_.attn_logit_softcapping)
        gb = softcap_backward(gb, bf16(rows, cols), {"d_scores_capped", "d_scores_tanh", "d_scores_div"}, sv.scores_tanh);
    T gm = alloc("d_scores", bf16(rows, cols), Category::Transient);  // MulBackward0 (the scaling)
    node_end({}, &gb);
    T gk = alloc("d_k_rep", bf16(tokens_, qd), Category::Transient);  // BmmBackward0 (q @ k^T)
    dq = alloc("dq", bf16(tokens_, qd), Category::Transient);
    node_end({&sv.k_rep, &sv.q_bmm}, &gm);
    dq = hf_uncast(dq);  // autocast: the casts' nodes, q's (the later) first
    gk = hf_uncast(gk);
    if (gqa) {  // repeat_kv's expand: its gradient sums the head groups
        dv = alloc("dv", bf16(tokens_, kvd), Category::Transient);
        node_end({}, &gv);
        dk = alloc("dk", elems(tokens_, kvd, amp_ ? 4 : 2), Category::Transient);
        node_end({}, &gk);
    } else {
        dv = gv, dk = gk;
    }
}

// gpt-oss's sink softmax backward from the gradient of attn_weights (consumed) to the masked
// scores' bf16 gradient. Nodes run last made first: the .to copy's (autocast), the slice's (zeros of
// [.., S + 1] with it copied in), softmax's; then the subtraction passes that on and sends the max its
// negation, summed to [.., 1]; the max scatters it where each row's maximum is, and the sum is added
// in place. CatBackward0 hands views of it on: the sinks' share (expanded from [H]) is summed to
// their gradient, the scores' share reaches the mask's add, which under autocast casts it to bf16.
T StepBuilder::hf_sinks_backward(HfLayer& sv, T gp) {
    const std::int64_t S = s_.seq_len, rows = s_.micro_batch * (m_.num_heads / s_.sp), cols = checked_mul(S, S);
    const int qb = amp_ ? 4 : 2;
    const bytes_t wide = elems(rows, checked_mul(S, S + 1), qb);
    if (amp_) {  // ToCopyBackward0 of .to(v's dtype)
        T g32 = alloc("d_probs_fp32", f32(rows, cols), Category::Transient);
        node_end({}, &gp);
        gp = g32;
    }
    T gw = alloc("d_probs_sinks", wide, Category::Transient);  // SliceBackward0
    node_end({}, &gp);
    T gs = alloc("d_scores_shifted", wide, Category::Transient);  // SoftmaxBackward0
    node_end({&sv.probs32}, &gw);
    T neg = alloc("d_row_max_full", wide, Category::Transient);  // SubBackward0: the max's share, reduced
    T gmax = alloc("d_row_max", elems(rows, S, qb), Category::Transient);
    drop(neg);
    T zeros = alloc("zeros", wide, Category::Transient);  // MaxBackward0
    T scattered = alloc("d_row_max_scattered", wide, Category::Transient);
    drop(zeros);
    node_end({&sv.max_idx}, &gmax);
    accumulate(gs, scattered, false);
    const int sinks = layer_params_[static_cast<std::size_t>(layer_)].sinks;
    add_grad(sinks, grad_out(sinks), true, true);  // ExpandBackward0's sum, seen as [H]
    if (!amp_) return gs;
    T gb = alloc("d_scores_masked", bf16(rows, cols), Category::Transient);
    node_end({}, &gs);
    return gb;
}

// LlamaDecoderLayer.forward on x [T, d] (borrowed: the model's loop variable holds it):
//   h = norm1(x); x2 = x + attn(h); h = norm2(x2); return x2 + mlp(h).
// stop_after_last_save: checkpointing's recomputation stops once the last tensor the layer's
// forward saved (down_proj's input) is recomputed; unwinding then drops the Python references.
T StepBuilder::hf_layer_forward(int l, T x, LayerSaved& sv, bool stop_after_last_save) {
    (void)x;
    layer_ = l;
    const LayerParams& lp = layer_params_[static_cast<std::size_t>(l)];
    const std::int64_t d = m_.hidden_size;
    const bool gemma = m_.gemma();
    at("attn.norm");
    T h1 = hf_norm_forward(lp.norm1, x, sv.hf.n1);
    T y, weights;
    hf_attention_forward(sv.hf, h1, y, weights);
    if (z3_on_ && m_.attention_sinks) z3_release(z3_.layers[static_cast<std::size_t>(l)].attn);  // (gpt-oss: its sinks)
    drop(h1);  // hidden_states = the attention's output
    if (z3_on_ && z3_.layers[static_cast<std::size_t>(l)].attn_dropout >= 0) {  // Phi-3's resid_attn_dropout (p = 0: itself)
        at("attn.residual");
        z3_fetch(z3_.layers[static_cast<std::size_t>(l)].attn_dropout);
    }
    if (gemma) {  // Gemma-2 normalises the branch's output before the residual add
        at("attn.post_norm");
        T normed = hf_norm_forward(lp.post_attn_norm, T{}, sv.hf.n_pa);
        drop(y);
        y = normed;
    }
    at("attn.residual");
    T x2 = act("x2", res(tokens_, d), false);
    drop(y);
    at("mlp.norm");
    T h2 = hf_norm_forward(lp.norm2, x2, sv.hf.n2);
    T y2 = hf_mlp_forward(lp, h2, sv.hf, stop_after_last_save && !gemma);
    if (m_.moe && m_.moe->gpt_oss && y2.valid()) {  // `hidden_states, _ = self.mlp(...)`: both rebind
        drop(h2);
        drop(weights);
        weights = std::exchange(hf_mlp_aux_, T{});
    }
    auto stopped = [&](T& out) {  // the frames' locals go when checkpointing has caught the stop
        if (out.valid()) return false;
        hf_recomputation_stopped();
        drop(h2), drop(y2), drop(x2), drop(weights);
        return true;
    };
    if (stopped(y2)) return T{};
    drop(h2);  // hidden_states = the MLP's output
    if (gemma) {
        at("mlp.post_norm");
        T normed = hf_norm_forward(lp.post_ff_norm, T{}, sv.hf.n_pf, stop_after_last_save);
        if (stopped(normed)) return T{};
        drop(y2);
        y2 = normed;
    }
    at("mlp.residual");
    if (z3_on_ && z3_.layers[static_cast<std::size_t>(l)].mlp_dropout >= 0)  // Phi-3's resid_mlp_dropout
        z3_fetch(z3_.layers[static_cast<std::size_t>(l)].mlp_dropout);
    T out = act("x_out", res(tokens_, d), false);
    drop(y2), drop(x2), drop(weights);
    return out;
}

// dres: the residual stream's gradient buffer (the layer output's gradient; this layer's input
// gradient is added into it). The residual adds hand it to their branch without a copy.
void StepBuilder::hf_layer_backward(int l, LayerSaved& sv, T& dres) {
    layer_ = l;
    const LayerParams& lp = layer_params_[static_cast<std::size_t>(l)];
    const bool gemma = m_.gemma();
    // down_proj's node (the MLP's first) unpacks a saved tensor first, or the tiled MLP's; an MoE
    // block's first unpacking node is inside it.
    const bool tiled = s_.mlp_chunks > 1 && s_.mlp_impl == MlpImpl::Tiled;
    // AddBackward0 hands the residual stream's gradient to the branch; under autocast
    // validate_outputs first casts it to the branch output's bf16.
    auto branch_grad = [&](bool bf16_branch) {
        return amp_ && bf16_branch ? alloc("d_branch_bf16", bf16(tokens_, m_.hidden_size), Category::Transient) : hold(dres);
    };
    const bool mlp_bf16 = hf_mlp_out_bytes() == 2;  // (under autocast the experts' sum is fp32)
    T dy2 = gemma ? T{} : branch_grad(mlp_bf16);
    if (z3_on_) {  // the layer's, the MLP's and down_proj's pre-backward fetches come first (down_proj's unpacks)
        layer_ = -1;  // (the layer's is a node its forward hook made, in the model's forward)
        z3_fetch(z3_.layers[static_cast<std::size_t>(l)].layer, false);
        layer_ = l;
        if (!gemma) {  // (Gemma: the MLP's after the norm of its output, whose backward unpacks first)
            if (z3_.layers[static_cast<std::size_t>(l)].mlp_dropout >= 0)
                z3_fetch(z3_.layers[static_cast<std::size_t>(l)].mlp_dropout, false);
            z3_fetch(z3_.layers[static_cast<std::size_t>(l)].mlp, false);
            if (tiled) unpack();  // (the tiled MLP's Function unpacks its input first)
        }
    } else if (!gemma && (!m_.moe || tiled)) {
        unpack();
    }
    at("mlp.post_norm");
    if (gemma) {
        dy2 = hf_norm_backward(lp.post_ff_norm, sv.hf.n_pf, branch_grad(true));
        if (z3_on_) z3_fetch(z3_.layers[static_cast<std::size_t>(l)].mlp, false);
    }
    T dh2 = hf_mlp_backward(lp, sv.hf, dy2);
    at("mlp.norm");
    hf_norm_backward(lp.norm2, sv.hf.n2, dh2, false, &dres);
    at("attn.post_norm");
    T dy = gemma ? hf_norm_backward(lp.post_attn_norm, sv.hf.n_pa, branch_grad(true)) : branch_grad(true);
    T dh1 = hf_attention_backward(l, sv.hf, dy);
    at("attn.norm");
    hf_norm_backward(lp.norm1, sv.hf.n1, dh1, recomputed_, &dres);
}

}  // namespace mst::sim
