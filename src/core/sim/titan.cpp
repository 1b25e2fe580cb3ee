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

// The flex block mask (torchtitan's get_attention_masks for one packed document a row): the tensors its mask_mod
// closes over (titan_mask_mod), then create_block_mask's eight int32 tensors (kv_num_blocks [B, 1, nb], kv_indices
// [B, 1, nb, nb], their full_ pair, the q pair and its full_ pair), all held to the end of backward.
void StepBuilder::titan_block_mask() {
    at("attn.mask");
    const std::int64_t B = s_.micro_batch, nb = ceil_div(s_.seq_len, 128);
    const std::vector<T> closure = B > 1 ? titan_mask_mod_batched() : titan_mask_mod();
    titan_mask_.clear();
    for (int pair = 0; pair < 4; ++pair) {
        titan_mask_.push_back(act("block_counts", elems(B, nb, 4), true));
        titan_mask_.push_back(act("block_indices", elems(B, checked_mul(nb, nb), 4), true));
    }
    // (they go in this order after backward: the block mask's tensors, then the mask_mod's closure)
    titan_mask_.insert(titan_mask_.end(), closure.begin(), closure.end());
}

// One row (get_efficient_causal_mask_mod_for_packed_document's batch-1 branch): the offsets and the document ids.
std::vector<T> StepBuilder::titan_mask_mod() {
    const std::int64_t S = s_.seq_len;
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
    return {offsets, doc};
}

// Several rows (its other branch): each row's document ends, the next document's start scattered per row and
// gathered back per token: doc_end_by_token.
std::vector<T> StepBuilder::titan_mask_mod_batched() {
    const std::int64_t S = s_.seq_len, n = checked_mul(s_.micro_batch, S);
    T starts = act("eos", n, false);                    // positions == 0, bool [B, S]
    T cnt = act("eos_i32", elems(n, 1, 4), false);      // .int()
    T cum = act("cumsum", elems(n, 1, 8), false);       // cumsum (i64)
    drop(cnt);
    T cum32 = act("cumsum_i32", elems(n, 1, 4), false);
    drop(cum);
    T doc = act("document_id", elems(n, 1, 4), false);  // - 1
    drop(cum32);
    T ar = act("arange", elems(S, 1, 4), false);        // token_idx, expanded to [B, S]
    T next_start = act("next_doc_start", elems(n, 1, 4), false);
    T gt = act("gt", n, false);
    T next_doc = act("next_doc", n, false);
    drop(gt);
    T prev = act("document_id_minus_1", elems(n, 1, 4), false);
    T like = act("full_like", elems(n, 1, 4), false);
    T w1 = act("where", elems(n, 1, 4), false);
    drop(prev), drop(like);
    T idx = act("where_i64", elems(n, 1, 8), false);
    drop(w1);
    T like2 = act("full_like", elems(n, 1, 4), false);
    T w2 = act("where", elems(n, 1, 4), false);
    drop(like2), drop(idx), drop(w2);  // (scatter_ in place)
    T doc64 = act("document_id_i64", elems(n, 1, 8), false);
    T gathered = act("gather", elems(n, 1, 4), false);
    drop(doc64);
    T doc_end = act("doc_end_by_token", elems(n, 1, 4), true);  // held by the mask_mod
    drop(gathered);
    drop(starts), drop(ar), drop(next_start), drop(next_doc), drop(doc);
    return {doc_end};
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
// group's post-backward); then the node lets go of the incoming gradient and its saved tensors (an
// autograd.Function on the referee: recomputed ones go first, as its backward's locals).
T StepBuilder::titan_norm_backward(int p, TitanNorm& sv, T g) {
    T dx = alloc("d_norm_in", bf16(tokens_, m_.hidden_size), Category::Transient);
    T gw = grad_out(p);
    py_node_end({&sv.x, &sv.rstd}, &g, [&] { add_grad(p, gw, false, true); });
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
    T cache = act("rope_rows", elems(tokens_, hd, 4), false);  // rope_cache[positions]: complex64 [S, hd / 2] (B > 1: gathered, [B, S, 1, hd / 2])
    T qf = act("q_fp32", f32(tokens_, H * hd), false);
    T kf = act("k_fp32", f32(tokens_, Hkv * hd), false);
    T qc = act("q_rotated", f32(tokens_, H * hd), false);  // complex64 [.., hd / 2]
    T kc = act("k_rotated", f32(tokens_, Hkv * hd), false);
    t.cache = saved(cache);
    T qr = act("q_rope", bf16(tokens_, H * hd), false);
    T kr = act("k_rope", bf16(tokens_, Hkv * hd), false);
    drop(qf), drop(kf), drop(qc), drop(kc);
    drop(cache), drop(q), drop(k);
    at("attn.flex");
    T lse = act("logsumexp", f32(s_.micro_batch * H, S), false);
    T max_scores = act("max_scores", f32(s_.micro_batch * H, S), false);
    T o = act("attn_out", bf16(tokens_, H * hd), false);
    drop(max_scores);
    t.q = saved(qr), t.k = saved(kr), t.v = saved(v), t.o = saved(o), t.lse = saved(lse);
    drop(lse);  // (its forward returns the output alone)
    at("attn.wo");
    out = act("wo_out", bf16(tokens_, m_.hidden_size), false);
    t.o_wo = saved(o);
    drop(qr), drop(kr), drop(v), drop(o);  // Attention.forward's locals, as it returns
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
    py_node_end({&t.q, &t.k, &t.v, &t.o, &t.lse}, &dattn);  // (an autograd.Function)
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
    drop(conj);
    node_end({&t.cache}, &dqf);  // (the table's last holder: q's product)
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
    drop(t.frame);  // (checkpointed: the frame dies with the last node holding its hooks, the block's first)
    at("attn.residual");
    sum = alloc("d_residual", bf16(tokens_, m_.hidden_size), Category::Transient);
    drop(dres), drop(gx);
    dres = sum;
}

// torchtitan's CrossEntropyLoss over `rows` rows of logits: the fp32 copy, log_softmax (kept for backward),
// nll_loss's sum and its total weight (kept), divided by the step's valid tokens: the loss it returns. Kept to
// backward (`to_backward`), or for the backward the chunked loss runs inside the forward.
T StepBuilder::titan_cross_entropy(std::int64_t rows, bool to_backward, T& logp, T& weight) {
    const std::int64_t V = m_.vocab_size;
    T up = act("logits_fp32", f32(rows, V), false);
    T lp = act("log_probs", f32(rows, V), false);
    logp = saved(lp);
    T nll = act("nll", 4, false);
    weight = act("total_weight", 4, to_backward);
    drop(up);
    T loss = act("loss", 4, false);
    drop(nll), drop(lp);
    return loss;
}

// Its backward from `root` (a holder of backward()'s ones): the division's, nll_loss's, log_softmax's, the cast
// back to bf16: the logits' gradient.
T StepBuilder::titan_cross_entropy_backward(std::int64_t rows, T root, T& weight, T& logp) {
    const std::int64_t V = m_.vocab_size;
    T div = alloc("d_loss_sum", 4, Category::Transient);  // DivBackward0
    node_end({}, &root);
    T glp = alloc("d_log_probs", f32(rows, V), Category::Transient);  // NllLossBackward0
    node_end({&weight}, &div);
    T glf = alloc("d_logits_fp32", f32(rows, V), Category::Transient);  // LogSoftmaxBackward0
    node_end({&logp}, &glp);
    at("lm_head");
    T gl = alloc("d_logits", bf16(rows, V), Category::Transient);  // ToCopyBackward0
    node_end({}, &glf);
    return gl;
}

// Decoder.forward's final norm and LM head, then torchtitan's CrossEntropyLoss (sum over the tokens, divided
// by the step's valid tokens); the trainer deletes the logits before backward.
void StepBuilder::titan_head_forward(T x_last, HeadSaved& hs) {
    if (titan_chunked_loss()) return titan_chunked_head_forward(x_last, hs);
    layer_ = -1;
    at("final_norm");
    if (fsdp2_own_embedding_group()) fsdp2_pre_forward(0);  // (untied: [final norm, LM head], at its first module)
    T h = titan_norm_forward(x_last, hs.titan_norm);
    drop(x_last);
    at("lm_head");
    T logits = act("logits", bf16(tokens_, m_.vocab_size), false);
    hs.hf_logits_in = saved(h);
    drop(h);
    at("fsdp2.post_forward");
    drop(fsdp2_.held_gather);  // (the model's forward returns: the root's post-forward lets go of the last all-gather)
    at("loss");
    hs.hf_loss = titan_cross_entropy(tokens_, true, hs.logp, hs.hf_weight);  // held by the trainer to the step's end
    drop(logits);  // del pred
}

T StepBuilder::titan_head_backward(HeadSaved& hs) {
    if (titan_chunked_loss()) return titan_chunked_head_backward(hs);
    layer_ = -1;
    at("loss");
    hs.hf_root = alloc("d_loss", 4, Category::Transient);  // backward()'s grad_tensors, held until it returns
    T gl = titan_cross_entropy_backward(tokens_, hold(hs.hf_root), hs.hf_weight, hs.logp);
    fsdp2_prefetch_last_layer();  // (the root's pre-backward hook, on the model's output: several ranks gather)
    at("lm_head");
    T dh = titan_mm_backward(lm_head_, gl, hs.hf_logits_in, bf16(tokens_, m_.hidden_size));
    at("final_norm");
    T dx = titan_norm_backward(final_norm_, hs.titan_norm, dh);
    if (fsdp2_own_embedding_group()) fsdp2_post_backward(0);  // (untied: its first module's input gradient)
    return dx;
}

// ChunkedLossWrapper (loss.num_chunks N, docs/torchtitan-model.md section 6): the decoder stops at the final norm
// (the LM head never runs, so its group's post-forward reshards it), and the wrapper runs each sequence chunk's LM
// head, loss and backward inside the forward: the LM head's group gathered once for every chunk, its gradient
// kept whole in fp32 (the group does not reduce) and reduce-scattered alone with the last chunk's; each chunk's
// input gradient summed into an fp32 buffer, whose bf16 copy backward starts from.
void StepBuilder::titan_chunked_head_forward(T x_last, HeadSaved& hs) {
    layer_ = -1;
    const std::int64_t d = m_.hidden_size, V = m_.vocab_size, N = s_.lm_chunks, rows = tokens_ / N;
    at("final_norm");
    if (fsdp2_own_embedding_group()) fsdp2_pre_forward(0);
    T h = titan_norm_forward(x_last, hs.titan_norm);
    drop(x_last);
    at("fsdp2.post_forward");
    fsdp2_reshard(0);
    drop(fsdp2_.held_gather);  // (the model's forward returns: the root's post-forward lets go of the last all-gather)
    at("loss");
    // split(...).contiguous() of the hidden states, the labels and the loss's other per-token input: copies where a
    // chunk of each row is not contiguous (micro-batch above 1), kept to the wrapper's end
    std::vector<T> hidden, labels, inputs;
    if (s_.micro_batch > 1)
        for (auto [chunks, bytes] : {std::pair{&hidden, bf16(rows, d)}, {&labels, elems(rows, 1, 8)}, {&inputs, elems(rows, 1, 8)}})
            for (std::int64_t i = 0; i < N; ++i) chunks->push_back(act("chunk_copy", bytes, false));
    T sum = act("grad_accumulator", f32(tokens_, d), false);  // GradAccumulator
    T total = act("total_loss", 4, false);
    at("fsdp2.all_gather");
    T gathered = fsdp2_all_gather(0);  // lm_head.unshard() outside the hooks: copied out, its buffer goes at once
    fsdp2_copy_out(0);  // (resharded after the loop)
    drop(gathered);
    T logits, loss;
    for (std::int64_t i = 0; i < N; ++i) {
        at("lm_head");
        T next = act("logits", bf16(rows, V), false);  // the previous chunk's go as the name is rebound
        drop(logits);
        logits = next;
        at("loss");
        T logp, weight;
        T chunk_loss = titan_cross_entropy(rows, false, logp, weight);
        drop(loss);
        loss = chunk_loss;
        T added = act("total_loss", 4, i == N - 1);  // total_loss + chunk_loss.detach(): the step's loss at the end
        drop(total);
        total = added;
        T root = alloc("d_loss", 4, Category::Transient);  // chunk_loss.backward()
        T gl = titan_cross_entropy_backward(rows, hold(root), weight, logp);
        T gw = grad_out(lm_head_);
        T dh = alloc("d_linear_in", bf16(rows, d), Category::Transient);  // h_chunk.grad
        node_end({}, &gl);
        // (the whole weight's gradient dtype is fp32 while its group does not reduce: cast, then kept or added)
        add_grad(lm_head_, fsdp2_upcast(lm_head_, gw), false, true);
        if (i == N - 1) {  // gradient sync on for the last chunk: the group's post-backward reduces the LM head's alone
            at("fsdp2.reduce_scatter");
            fsdp2_reduce(0);
        }
        drop(root);
        at("loss");
        T part = alloc("d_hidden_fp32", f32(rows, d), Category::Transient);  // grad_accumulator.add
        drop(part), drop(dh);
    }
    at("fsdp2.reshard");
    fsdp2_reshard(0);
    at("loss");
    hs.dhf = act("d_hidden", bf16(tokens_, d), true);  // accumulated_grad, saved by _DecoderOutputGradientBackProp
    // The wrapper's locals as it returns: the chunk lists (each from its end) but their last chunks, which the loop's
    // variables hold, the accumulator, then those variables
    for (std::vector<T>* chunks : {&hidden, &labels, &inputs})
        for (std::size_t i = chunks->size(); i-- > 1;) drop((*chunks)[i - 1]);
    drop(sum);
    if (!labels.empty()) drop(labels.back());
    drop(logits);
    if (!inputs.empty()) drop(inputs.back()), drop(hidden.back());
    drop(loss), drop(h);
    hs.hf_loss = total;
}

// _DecoderOutputGradientBackProp hands the saved gradient to the final norm, whose group is gathered again.
T StepBuilder::titan_chunked_head_backward(HeadSaved& hs) {
    layer_ = -1;
    at("loss");
    hs.hf_root = alloc("d_loss", 4, Category::Transient);
    at("final_norm");
    fsdp2_pre_backward(0, true);  // (resharded after the chunks, whatever the layers' resharding)
    fsdp2_prefetch_last_layer();  // (its pre-backward hook: several ranks gather the last layer)
    T dx = titan_norm_backward(final_norm_, hs.titan_norm, hs.dhf);
    if (fsdp2_own_embedding_group()) fsdp2_post_backward(0);
    return dx;
}

// Trainer.train_step for one micro-batch (docs/torchtitan-model.md): the first zeroes the gradients and
// counts the step's valid tokens (all its micro-batches', on the host: all-reduced over the data-parallel
// ranks); each takes its batch to the device, makes the block mask, runs forward under FSDP2's hooks (the
// root group gathered from the embedding's forward to the final callback, each layer around its forward and
// again its backward), the loss, backward (FSDP2 reduce-scatters every micro-batch's gradients, a later one's
// added into the sharded gradients: fsdp2_reduce), the root's post-backward in the final callback. The
// micro-batches' inputs and positions stay to the step's end (written back into its batch dicts), its labels
// and loss until the next micro-batch's replace them.
void StepBuilder::titan_micro_step(int micro) {
    micro_ = micro;
    phase_ = Phase::Forward;
    layer_ = -1;
    const std::int64_t L = m_.num_layers;
    if (micro == 0) {
        titan_zero_grad();
        at("inputs");
        T local, waited;
        if (s_.dp > 1) {  // (the valid tokens all-reduced over the data-parallel ranks: a functional collective and its wait)
            local = act("valid_tokens_local", 8, false);
            T reduced = act("all_reduce", 8, false);
            waited = act("wait_tensor", 8, false);
            drop(reduced);
        }
        titan_valid_ = alloc("valid_tokens", 8, Category::SavedActivation);
        drop(waited), drop(local);
    }
    at("inputs");
    if (micro == 1) titan_middle_micro_steps();
    titan_held_inputs();
    T labels = alloc("labels", elems(tokens_, 1, 8), Category::SavedActivation);
    drop(titan_labels_);  // (the previous micro-batch's)
    titan_labels_ = labels;
    titan_block_mask();
    // the root group (tied: the embedding, the final norm, the LM head), or an untied embedding's own
    fsdp2_pre_forward(fsdp2_embedding_group());
    T x = embedding_forward(Category::SavedActivation);
    std::vector<LayerSaved> saved(static_cast<std::size_t>(L));
    for (std::int32_t l = 0; l < L; ++l) {
        const auto i = static_cast<std::size_t>(l);
        layer_ = l;
        fsdp2_pre_forward(fsdp2_layer_group(l));  // (FSDP2's hooks are on the checkpoint wrapper)
        T y;
        if (s_.checkpointed(l)) {  // FullAC: torch.utils.checkpoint, non-reentrant; nothing inside is kept
            table_[static_cast<std::size_t>(x.id)].category = Category::Checkpoint;
            saved[i].titan.frame = hold(x);
            NoGrad no_grad(*this, true);
            y = titan_layer_forward(l, x, saved[i]);
        } else {
            y = titan_layer_forward(l, x, saved[i]);
        }
        layer_ = -1;
        if (!fsdp2_keep_gathered_) fsdp2_reshard(fsdp2_layer_group(l));  // (fsdp_reshard_after_forward "never": kept)
        drop(x);
        x = y;
    }
    HeadSaved head;
    titan_head_forward(x, head);

    phase_ = Phase::Backward;
    T dres = titan_head_backward(head);
    for (std::int32_t l = static_cast<std::int32_t>(L) - 1; l >= 0; --l) {
        const auto i = static_cast<std::size_t>(l);
        layer_ = l;
        fsdp2_pre_backward(fsdp2_layer_group(l));
        if (s_.checkpointed(l)) {
            // Its first node that unpacks (w2's, after the residual add's) recomputes the whole layer with the
            // weights just gathered (early_stop off: its output too, which goes); each recomputed tensor dies in
            // its last user's backward, before that node's incoming gradient; the input with the frame, after.
            phase_ = Phase::Recompute;
            T out = titan_layer_forward(l, saved[i].titan.frame, saved[i]);
            drop(out);
            phase_ = Phase::Backward;
            recomputed_ = true;
            titan_layer_backward(l, saved[i], dres);
            recomputed_ = false;
        } else {
            titan_layer_backward(l, saved[i], dres);
        }
        fsdp2_post_backward(fsdp2_layer_group(l));
    }
    embedding_backward(dres);
    at("backward.end");
    fsdp2_after_backward();
    drop(head.hf_root);
    for (T& t : titan_mask_) drop(t);
    drop(titan_loss_);  // (the previous micro-batch's, as the next one's returns)
    titan_loss_ = head.hf_loss;
}

// A micro-batch's input and positions on the device, written back into the step's batch dict: held to its end.
void StepBuilder::titan_held_inputs() {
    titan_inputs_.push_back(alloc("input", elems(tokens_, 1, 8), Category::SavedActivation));
    titan_inputs_.push_back(alloc("positions", elems(tokens_, 1, 8), Category::SavedActivation));
}

// The micro-steps between the first and the last (the second recorded stands for the last, as the referee
// records it): each keeps its input and positions to the step's end, so that the last holds every micro-batch's;
// the first's labels go as the next's are copied, its loss as the next one's backward returns; the loss of the
// one before the last (an fp32 scalar) stays into the last, to its end. Their other tensors come and go within
// them (each later micro-batch's gradients added into the sharded ones).
void StepBuilder::titan_middle_micro_steps() {
    for (std::int64_t k = 1; k + 1 < s_.grad_accum; ++k) {
        phase_ = Phase::Forward;
        titan_held_inputs();
        if (k == 1) drop(titan_labels_);
        phase_ = Phase::Backward;
        if (k == 1) drop(titan_loss_);
        if (k + 2 == s_.grad_accum) titan_loss_ = alloc("loss", 4, Category::SavedActivation);
    }
    phase_ = Phase::Forward;
}

// clip_grad_norm_(foreach) over the sharded gradients: each tensor's norm, their stack and its norm, the
// clip coefficient; the fused AdamW step updates in place; then the step's batch and loss go (the
// gradients stay to the next step's zero_grad).
void StepBuilder::titan_optimizer_step() {
    at("optimizer.clip");
    const int g = fsdp2_store_;  // (the scalars are in the sharded gradients' dtype: bf16, fp32 under bf16-master)
    std::vector<T> norms;
    for (std::size_t i = 0; i < order_.size(); ++i) norms.push_back(act("grad_norm", g, false));
    T stacked = act("grad_norms", elems(static_cast<std::int64_t>(norms.size()), 1, g), false);
    T total = act("total_norm", g, false);
    drop(stacked);
    for (auto it = norms.rbegin(); it != norms.rend(); ++it) drop(*it);
    T add = act("total_norm_eps", g, false);
    T rec = act("reciprocal", g, false);
    T coef = act("clip_coef", g, false);
    drop(rec), drop(add);
    T clamped = act("clip_coef_clamped", g, false);
    drop(coef), drop(clamped), drop(total);
    at("optimizer.step");
    // (the step's locals as its frame goes: the count, then its list of batch dicts, which Python frees last to
    // first, but for the last micro-batch's, which its loop variable still holds: that one after them)
    drop(titan_valid_);
    const std::size_t pairs = titan_inputs_.size() / 2;
    for (std::size_t k = pairs - 1; k-- > 0;) drop(titan_inputs_[2 * k]), drop(titan_inputs_[2 * k + 1]);
    drop(titan_inputs_[2 * pairs - 2]), drop(titan_inputs_[2 * pairs - 1]);
    drop(titan_labels_), drop(titan_loss_);
}

}  // namespace mst::sim
