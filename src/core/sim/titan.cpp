// torchtitan 0.3.0's model code in the hf runtime (model_code torchtitan): its Llama-3 step as
// docs/torchtitan-model.md reads it from torchtitan's and torch's sources, each op's allocations and
// frees in the engine's order. The MLP is transformers' in the same order (hf_mlp_forward /
// backward); FSDP2's hooks are fsdp2.cpp's, on torchtitan's groups. Proven against the titan
// referee (python/mst_referee/titan.py) event by event.
#include "builder.hpp"

namespace mst::sim {

// Trainer.train_step's zero_grad(set_to_none=True) as the step begins: the previous step's sharded
// gradients, views of each FSDP2 group's bf16 buffer, which goes with its last view (model.parameters()
// order: the layers' buffers, then the root's with the final norm).
void StepBuilder::titan_zero_grad() {
    at("optimizer.zero_grad");
    for (int i : order_) {
        drop(fsdp2_.sharded_grads[static_cast<std::size_t>(i)]);
        if (i == embed_ && lm_head_ != embed_ && m_.tie_word_embeddings)  // (the tied LM head's FSDP parameter: the same shard)
            drop(fsdp2_.sharded_grads[static_cast<std::size_t>(lm_head_)]);
    }
}

// The flex block mask (torchtitan's get_attention_masks for one packed document a row, micro-batch 1):
// the document ids and the offsets its mask_mod closes over, then create_block_mask's eight int32 tensors
// (kv_num_blocks [B, 1, nb], kv_indices [B, 1, nb, nb], their full_ pair, the q pair and its full_ pair).
void StepBuilder::titan_block_mask() {
    at("attn.mask");
    const std::int64_t S = s_.seq_len, B = s_.micro_batch, nb = ceil_div(S, 128);
    T eq = act("eos", S, false);                       // (tokens == eos) bool [S]
    T cnt = act("eos_i32", elems(S, 1, 4), false);     // .int()
    T cum = act("cumsum", elems(S, 1, 8), false);      // cumsum (i64)
    drop(cnt);
    T doc32 = act("cumsum_i32", elems(S, 1, 4), false);
    drop(cum);
    T doc = act("document_id", elems(S, 1, 4), true);  // held by the mask_mod
    drop(doc32);
    T ar = act("arange", elems(S, 1, 4), false);
    T offsets = act("offsets", elems(round_up(S + 1, 128), 1, 4), true);
    T like = act("full_like", elems(S, 1, 4), false);
    T w1 = act("where", elems(S, 1, 4), false);
    drop(like);
    T idx = act("where_i64", elems(S, 1, 8), false);
    drop(w1);
    T like2 = act("full_like", elems(S, 1, 4), false);
    T w2 = act("where", elems(S, 1, 4), false);
    drop(like2), drop(idx), drop(w2), drop(eq), drop(ar);
    titan_mask_.clear();
    for (int pair = 0; pair < 4; ++pair) {
        titan_mask_.push_back(act("block_counts", elems(B, nb, 4), true));
        titan_mask_.push_back(act("block_indices", elems(B, checked_mul(nb, nb), 4), true));
    }
    // (they go in this order after backward: the block mask's tensors, then the mask_mod's closure)
    titan_mask_.push_back(offsets), titan_mask_.push_back(doc);
}

// nn.RMSNorm -> aten._fused_rms_norm (CUDA): the output and the fp32 reciprocal RMS of each row; its node
// saves the input, the weight and rstd.
T StepBuilder::titan_norm_forward(T x, TitanNorm& sv) {
    T y = act("norm_out", bf16(tokens_, m_.hidden_size), false);
    T rstd = act("rstd", elems(tokens_, 1, 4), true);
    sv.x = saved(x);
    sv.rstd = saved(rstd);
    drop(rstd);
    return y;
}

// _fused_rms_norm_backward: the input's gradient, then the weight's (its whole gradient, held to the
// group's post-backward); then the node lets go of the incoming gradient and its saved tensors.
T StepBuilder::titan_norm_backward(int p, TitanNorm& sv, T g) {
    T dx = alloc("d_norm_in", bf16(tokens_, m_.hidden_size), Category::Transient);
    T gw = grad_out(p);
    node_end({&sv.x, &sv.rstd}, &g, [&] { add_grad(p, gw, false, true); });
    return dx;
}

// A linear's backward (MmBackward0 of x @ w.T): the weight's gradient, then the input's; the node lets go
// of the incoming gradient and the input it saved.
T StepBuilder::titan_mm_backward(int p, T& g, T& x_saved, bytes_t input_grad_bytes) {
    T gw = grad_out(p);
    T dx = alloc("d_linear_in", input_grad_bytes, Category::Transient);
    node_end({&x_saved}, &g, [&] { add_grad(p, gw, false, true); });
    return dx;
}

// Attention.forward: the fused wqkv GEMM, q, k, v copied apart (reshape(...).contiguous()), complex RoPE
// in fp32 on q and k with this step's rows of the layer's table, flex attention, wo.
void StepBuilder::titan_attention_forward(TitanLayer& t, T h1, T& out) {
    const std::int64_t H = m_.num_heads, Hkv = m_.num_kv_heads, hd = m_.head_dim, S = s_.seq_len;
    at("attn.qkv");
    T qkv = act("qkv", bf16(tokens_, (H + 2 * Hkv) * hd), false);
    t.x_qkv = saved(h1);
    T q = act("q", bf16(tokens_, H * hd), false);
    T k = act("k", bf16(tokens_, Hkv * hd), false);
    T v = act("v", bf16(tokens_, Hkv * hd), false);
    drop(qkv);
    at("attn.rope");
    T le = act("position_check", tokens_, false);  // positions <= max_seq_len, then .all()
    T all = act("position_check_all", 1, false);
    drop(le), drop(all);
    T cache = act("rope_rows", elems(S, hd, 4), false);  // rope_cache[positions] complex64 [S, hd / 2]
    T qf = act("q_fp32", f32(tokens_, H * hd), false);
    T kf = act("k_fp32", f32(tokens_, Hkv * hd), false);
    T qc = act("q_rotated", f32(tokens_, H * hd), false);  // complex64 [.., hd / 2]
    T kc = act("k_rotated", f32(tokens_, Hkv * hd), false);
    t.cache = saved(cache);
    drop(cache);
    T qr = act("q_rope", bf16(tokens_, H * hd), false);
    T kr = act("k_rope", bf16(tokens_, Hkv * hd), false);
    drop(qf), drop(kf), drop(qc), drop(kc);
    drop(q), drop(k);
    at("attn.flex");
    T lse = act("logsumexp", f32(s_.micro_batch * H, S), false);
    T max_scores = act("max_scores", f32(s_.micro_batch * H, S), false);
    T o = act("attn_out", bf16(tokens_, H * hd), false);
    drop(max_scores);
    t.q = saved(qr), t.k = saved(kr), t.v = saved(v), t.o = saved(o), t.lse = saved(lse);
    drop(qr), drop(kr), drop(v), drop(lse);
    at("attn.wo");
    out = act("wo_out", bf16(tokens_, m_.hidden_size), false);
    t.o_wo = saved(o);
    drop(o);
}

T StepBuilder::titan_attention_backward(const LayerParams& lp, TitanLayer& t, T d_out) {
    const std::int64_t H = m_.num_heads, Hkv = m_.num_kv_heads, hd = m_.head_dim;
    at("attn.wo");
    T dattn = titan_mm_backward(lp.o, d_out, t.o_wo, bf16(tokens_, H * hd));
    at("attn.flex");  // the compiled kernel's backward: delta, then grad_query, the value's, the key's
    T delta = alloc("delta", f32(s_.micro_batch * H, s_.seq_len), Category::Transient);
    T dq = alloc("d_q", bf16(tokens_, H * hd), Category::Transient);
    T dv = alloc("d_v", bf16(tokens_, Hkv * hd), Category::Transient);
    T dk = alloc("d_k", bf16(tokens_, Hkv * hd), Category::Transient);
    drop(delta);
    node_end({&t.q, &t.k, &t.v, &t.o, &t.lse}, &dattn);
    at("attn.rope");  // type_as's backward (k, then q), the complex products' (the table's conj() copied), back to bf16
    T dkf = alloc("d_k_fp32", f32(tokens_, Hkv * hd), Category::Transient);
    drop(dk);
    T dqf = alloc("d_q_fp32", f32(tokens_, H * hd), Category::Transient);
    drop(dq);
    T conj = alloc("rope_conj", f32(tokens_, hd), Category::Transient);  // complex64 [B, S, 1, hd / 2]
    T dkc = alloc("d_k_rotated", f32(tokens_, Hkv * hd), Category::Transient);
    drop(conj), drop(dkf);
    conj = alloc("rope_conj", f32(tokens_, hd), Category::Transient);
    T dqc = alloc("d_q_rotated", f32(tokens_, H * hd), Category::Transient);
    drop(conj), drop(dqf);
    drop(t.cache);
    dk = alloc("d_k_bf16", bf16(tokens_, Hkv * hd), Category::Transient);
    drop(dkc);
    dq = alloc("d_q_bf16", bf16(tokens_, H * hd), Category::Transient);
    drop(dqc);
    at("attn.qkv");  // the copies' backward: one cat into wqkv's output's gradient
    T dqkv = alloc("d_qkv", bf16(tokens_, (H + 2 * Hkv) * hd), Category::Transient);
    drop(dq), drop(dk), drop(dv);
    return titan_mm_backward(lp.q, dqkv, t.x_qkv, bf16(tokens_, m_.hidden_size));
}

// TransformerBlock.forward: h = x + attention(attention_norm(x)); out = h + feed_forward(ffn_norm(h)).
T StepBuilder::titan_layer_forward(int l, T x, LayerSaved& sv) {
    layer_ = l;
    const LayerParams& lp = layer_params_[static_cast<std::size_t>(l)];
    TitanLayer& t = sv.titan;
    at("attn.norm");
    T h1 = titan_norm_forward(x, t.n1);
    T a;
    titan_attention_forward(t, h1, a);
    drop(h1);
    at("attn.residual");
    T h = act("h", bf16(tokens_, m_.hidden_size), false);
    drop(a);
    at("mlp.norm");
    T h2 = titan_norm_forward(h, t.n2);
    T y = hf_mlp_forward(lp, h2, sv.hf, false);
    drop(h2);
    at("mlp.residual");
    T out = act("x_out", bf16(tokens_, m_.hidden_size), false);
    drop(y), drop(h);
    return out;
}

// The residual adds' backward hands the stream's gradient to each branch; each add's sum is a new tensor.
void StepBuilder::titan_layer_backward(int l, LayerSaved& sv, T& dres) {
    layer_ = l;
    const LayerParams& lp = layer_params_[static_cast<std::size_t>(l)];
    TitanLayer& t = sv.titan;
    T dh2 = hf_mlp_backward(lp, sv.hf, hold(dres));
    at("mlp.norm");
    T gx = titan_norm_backward(lp.norm2, t.n2, dh2);
    at("mlp.residual");
    T sum = alloc("d_residual", bf16(tokens_, m_.hidden_size), Category::Transient);
    drop(dres), drop(gx);
    dres = sum;
    T dh1 = titan_attention_backward(lp, t, hold(dres));
    at("attn.norm");
    gx = titan_norm_backward(lp.norm1, t.n1, dh1);
    at("attn.residual");
    sum = alloc("d_residual", bf16(tokens_, m_.hidden_size), Category::Transient);
    drop(dres), drop(gx);
    dres = sum;
}

// Decoder.forward's final norm and LM head, then torchtitan's CrossEntropyLoss (sum over the tokens, divided
// by the step's valid tokens); the trainer deletes the logits before backward.
void StepBuilder::titan_head_forward(T x_last, HeadSaved& hs) {
    layer_ = -1;
    const std::int64_t V = m_.vocab_size;
    at("final_norm");
    if (fsdp2_own_embedding_group()) fsdp2_pre_forward(0);  // (untied: [final norm, LM head], at its first module)
    T h = titan_norm_forward(x_last, hs.titan_norm);
    drop(x_last);
    at("lm_head");
    T logits = act("logits", bf16(tokens_, V), false);
    hs.hf_logits_in = saved(h);
    drop(h);
    at("loss");
    T up = act("logits_fp32", f32(tokens_, V), false);
    T lp = act("log_probs", f32(tokens_, V), false);
    hs.logp = saved(lp);
    T nll = act("nll", 4, false);
    hs.hf_weight = act("total_weight", 4, true);
    drop(up);
    hs.hf_loss = act("loss", 4, false);  // / global_valid_tokens: held by the trainer to the step's end
    drop(nll), drop(lp);
    drop(logits);  // del pred
}

T StepBuilder::titan_head_backward(HeadSaved& hs) {
    layer_ = -1;
    const std::int64_t d = m_.hidden_size, V = m_.vocab_size;
    at("loss");
    hs.hf_root = alloc("d_loss", 4, Category::Transient);  // backward()'s grad_tensors, held until it returns
    T root = hold(hs.hf_root);
    T div = alloc("d_loss_sum", 4, Category::Transient);  // DivBackward0
    node_end({}, &root);
    T glp = alloc("d_log_probs", f32(tokens_, V), Category::Transient);  // NllLossBackward0
    node_end({&hs.hf_weight}, &div);
    T glf = alloc("d_logits_fp32", f32(tokens_, V), Category::Transient);  // LogSoftmaxBackward0
    node_end({&hs.logp}, &glp);
    at("lm_head");
    T gl = alloc("d_logits", bf16(tokens_, V), Category::Transient);  // ToCopyBackward0
    node_end({}, &glf);
    T dh = titan_mm_backward(lm_head_, gl, hs.hf_logits_in, bf16(tokens_, d));
    at("final_norm");
    T dx = titan_norm_backward(final_norm_, hs.titan_norm, dh);
    if (fsdp2_own_embedding_group()) fsdp2_post_backward(0);  // (untied: its first module's input gradient)
    return dx;
}

// Trainer.train_step for one micro-batch (docs/torchtitan-model.md): zero_grad, the batch to the device,
// the block mask, forward under FSDP2's hooks (the root group gathered from the embedding's forward to
// the final callback, each layer around its forward and again its backward), the loss, backward, the
// root's post-backward in the final callback; the batch and loss stay to the step's end.
void StepBuilder::titan_micro_step(int micro) {
    micro_ = micro;
    phase_ = Phase::Forward;
    layer_ = -1;
    const std::int64_t L = m_.num_layers;
    titan_zero_grad();
    at("inputs");
    titan_valid_ = alloc("valid_tokens", 8, Category::SavedActivation);
    titan_input_ = alloc("input", elems(tokens_, 1, 8), Category::SavedActivation);
    titan_positions_ = alloc("positions", elems(tokens_, 1, 8), Category::SavedActivation);
    titan_labels_ = alloc("labels", elems(tokens_, 1, 8), Category::SavedActivation);
    titan_block_mask();
    // the root group (tied: the embedding, the final norm, the LM head), or an untied embedding's own
    fsdp2_pre_forward(fsdp2_embedding_group());
    T x = embedding_forward(Category::SavedActivation);
    std::vector<LayerSaved> saved(static_cast<std::size_t>(L));
    for (std::int32_t l = 0; l < L; ++l) {
        layer_ = l;
        fsdp2_pre_forward(fsdp2_layer_group(l));
        T y = titan_layer_forward(l, x, saved[static_cast<std::size_t>(l)]);
        layer_ = -1;
        fsdp2_reshard(fsdp2_layer_group(l));
        drop(x);
        x = y;
    }
    HeadSaved head;
    titan_head_forward(x, head);

    phase_ = Phase::Backward;
    T dres = titan_head_backward(head);
    for (std::int32_t l = static_cast<std::int32_t>(L) - 1; l >= 0; --l) {
        layer_ = l;
        fsdp2_pre_backward(fsdp2_layer_group(l));
        titan_layer_backward(l, saved[static_cast<std::size_t>(l)], dres);
        fsdp2_post_backward(fsdp2_layer_group(l));
    }
    embedding_backward(dres);
    at("backward.end");
    fsdp2_after_backward();
    drop(head.hf_root);
    for (T& t : titan_mask_) drop(t);
    titan_loss_ = head.hf_loss;
}

// clip_grad_norm_(foreach) over the sharded gradients: each tensor's norm, their stack and its norm, the
// clip coefficient; the fused AdamW step updates in place; then the step's batch and loss go (the
// gradients stay to the next step's zero_grad).
void StepBuilder::titan_optimizer_step() {
    at("optimizer.clip");
    std::vector<T> norms;
    for (std::size_t i = 0; i < order_.size(); ++i) norms.push_back(act("grad_norm", 2, false));
    T stacked = act("grad_norms", elems(static_cast<std::int64_t>(norms.size()), 1, 2), false);
    T total = act("total_norm", 2, false);
    drop(stacked);
    for (auto it = norms.rbegin(); it != norms.rend(); ++it) drop(*it);
    T add = act("total_norm_eps", 2, false);
    T rec = act("reciprocal", 2, false);
    T coef = act("clip_coef", 2, false);
    drop(rec), drop(add);
    T clamped = act("clip_coef_clamped", 2, false);
    drop(coef), drop(clamped), drop(total);
    at("optimizer.step");
    drop(titan_valid_), drop(titan_input_), drop(titan_positions_), drop(titan_labels_), drop(titan_loss_);
}

}  // namespace mst::sim
