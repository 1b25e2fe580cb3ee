// Memory rules of the embedding, the final norm, the LM head and the loss.
//
// Shapes: hidden [T, d], logits [n, V] per chunk of n tokens (T = tokens per rank).
//  * M = 1 (Hugging Face): bf16 logits, an fp32 upcast, fp32 log-softmax saved for
//    backward; backward holds the fp32 gradient of the log-probabilities and of the
//    logits, then a bf16 copy for the GEMMs. The 4*T*V-byte tensors set the peak.
//  * Recompute (MsT reference): forward per chunk under no-grad (bf16 logits, fp32
//    upcast, fp32 log-softmax, all freed per chunk), saves only the hidden states;
//    backward recomputes each chunk's logits in fp32, turns them into the gradient in
//    place, casts to bf16 and accumulates d_hidden and the weight gradient.
//  * Fused (Liger fused-linear-cross-entropy / ALST tiled logits): per chunk bf16
//    logits whose gradient is formed in place, and the input and weight gradients
//    computed inside forward and held until backward; the hidden states are not saved.
#include "builder.hpp"

#include <utility>

namespace mst::sim {

// The unchunked LM head's logits [T, V] from its input x (consumed; the GEMM saves it in
// x_saved), Gemma-2's final soft-capping after them (its tanh saved): the same in both runtimes.
T StepBuilder::logits_forward(T x, T& x_saved, T& logits_tanh) {
    at("lm_head");
    T in = hf_ ? hf_linear_input(lm_head_, -1, x, tokens_, m_.hidden_size) : (use_weight(lm_head_), hold(x));
    T logits = act("logits", bf16(tokens_, m_.vocab_size), false);
    x_saved = saved(in);
    drop(in);
    if (!hf_) drop(x);  // (hf: the model's forward holds its hidden states until it returns)
    if (m_.final_logit_softcapping) {  // logits = tanh(logits / cap) * cap
        at("lm_head.softcap");
        logits = softcap_forward(logits, bf16(tokens_, m_.vocab_size), {"logits_div", "logits_tanh", "logits_capped"},
                                 logits_tanh);
    }
    return logits;
}

T StepBuilder::embedding_forward(Category out_category) {
    layer_ = -1;
    at("embedding");
    const bool gemma = m_.gemma();
    if (hf_) {
        z3_fetch(z3_.embed);  // (its module: with tied embeddings the weight is lm_head's too)
        T x = act("embeddings", res(tokens_, m_.hidden_size), false);
        if (gemma) {  // Gemma2ScaledWordEmbedding: times embed_scale, a new tensor (inside the module's forward)
            at("embedding.scale");
            // embed_scale.to(weight.dtype): a bf16 copy of the fp32 buffer of a model built in fp32 (FSDP2's
            // bf16 policy gathers the weight in bf16), which the product saves
            if (fsdp2_on_ && fsdp2_store_ != pw_) hf_embed_scale_ = act("embed_scale", pw_, true);
            T scaled = act("embeddings_scaled", res(tokens_, m_.hidden_size), false);
            drop(x);
            x = scaled;
        }
        z3_release(z3_.embed);
        if (fsdp2_on_) fsdp2_embedding_post_forward();  // (as its module returns)
        return x;
    }
    T x = alloc("embeddings", res(tokens_, m_.hidden_size), gemma ? Category::Transient : out_category);
    if (gemma) {  // Gemma scales the embeddings by sqrt(d): a new tensor
        at("embedding.scale");
        T scaled = alloc("embeddings_scaled", res(tokens_, m_.hidden_size), out_category);
        drop(x);
        x = scaled;
    }
    return x;
}

void StepBuilder::embedding_backward(T& dres) {
    layer_ = -1;
    if (hf_) {  // EmbeddingBackward0: the table's gradient from the residual stream's
        // ZeRO-3: the module's pre-backward fetch, on its output (Gemma's scaled one: before the scale's
        // backward); its post-backward never runs (the ids need no gradient)
        at("embedding");
        z3_fetch(z3_.embed, false);
        if (fsdp2_on_) fsdp2_embedding_pre_backward();  // (FSDP2's on its output, as ZeRO-3's)
        if (m_.gemma()) {  // MulBackward0 of the scale first
            at("embedding.scale");
            T scaled = alloc("d_embeddings", res(tokens_, m_.hidden_size), Category::Transient);
            node_end({&hf_embed_scale_}, &dres);
            dres = scaled;
            at("embedding");
        }
        T g = grad_out(embed_);
        node_end({}, &dres, [&] { fsdp2_upcast_output(embed_, g); });
        add_grad(embed_, g, false, true);
        return;
    }
    (void)dres;
    T scaled;  // Gemma: the gradient through the sqrt(d) scale, a new tensor
    if (m_.gemma()) {
        at("embedding.scale");
        scaled = alloc("d_embeddings", res(tokens_, m_.hidden_size), Category::Transient);
    }
    at("embedding");
    grad_write(embed_);  // scatter-add of the token gradients into the table's gradient
    drop(scaled);        // read by the scatter: it lives until the table's gradient exists
    grad_done(embed_);
}

void StepBuilder::head_forward(T x_last, HeadSaved& hs) {
    layer_ = -1;
    const std::int64_t d = m_.hidden_size, V = m_.vocab_size;
    const bool chunked = s_.lm_chunks > 1;
    const bool fused = chunked && s_.lm_impl == LmHeadImpl::FusedForward;

    at("final_norm");
    T hf = norm_forward(hs.rstd_f, rb_, rb_ == 2 && !fused);
    hs.x_last = saved(x_last);
    drop(x_last);
    T hin = cast_for_matmul(hf, d);

    if (!chunked) {
        T logits = logits_forward(hin, hs.hf, hs.logits_tanh);
        at("loss");
        T up = act("logits_fp32", f32(tokens_, V), false);
        T logp = act("log_probs", f32(tokens_, V), true);
        drop(up);
        hs.logp = saved(logp);
        drop(logp);
        drop(logits);  // the trainer drops the model outputs before backward
        return;
    }

    const auto chunks = transient_chunks(s_.lm_chunks);
    if (!fused) {
        hs.hf = saved(hin);
        NoGrad no_grad(*this);
        use_weight(lm_head_);
        for (std::int64_t n : chunks) {
            at("lm_head");
            T lc = alloc("logits", bf16(n, V), Category::Transient);
            T lf = alloc("logits_fp32", f32(n, V), Category::Transient);
            drop(lc);
            at("loss");
            T lp = alloc("log_probs", f32(n, V), Category::Transient);
            drop(lp), drop(lf);
        }
        drop(hin);
        return;
    }

    at("lm_head.fused");
    {
        NoGrad no_grad(*this);
        use_weight(lm_head_);
    }
    hs.dhf = alloc("d_hidden", bf16(tokens_, d), Category::SavedActivation);
    if (params_[static_cast<std::size_t>(lm_head_)].grad.valid())  // accumulating: a separate buffer, added in backward
        hs.grad_partial = alloc("lm_head_grad", checked_mul(params_[static_cast<std::size_t>(lm_head_)].numel, pg_),
                                Category::Gradients);
    else
        grad_write(lm_head_);
    for (std::int64_t n : chunks) {
        T lc = alloc("logits", bf16(n, V), Category::Transient);
        drop(lc);
    }
    drop(hin);
}

T StepBuilder::head_backward(HeadSaved& hs) {
    layer_ = -1;
    const std::int64_t d = m_.hidden_size, V = m_.vocab_size;
    T dh;
    if (s_.lm_chunks == 1) {
        at("loss");
        T glp = alloc("d_log_probs", f32(tokens_, V), Category::Transient);
        T glf = alloc("d_logits_fp32", f32(tokens_, V), Category::Transient);
        drop(glp), drop(hs.logp);
        at("lm_head");
        T gl = alloc("d_logits", bf16(tokens_, V), Category::Transient);
        drop(glf);
        if (hs.logits_tanh.valid()) {
            at("lm_head.softcap");
            gl = softcap_backward(gl, bf16(tokens_, V), {"d_logits_capped", "d_logits_tanh", "d_logits_div"}, hs.logits_tanh);
            at("lm_head");
        }
        dh = alloc("d_hidden", bf16(tokens_, d), Category::Transient);
        grad_write(lm_head_);
        release_weight(lm_head_);
        drop(gl), drop(hs.hf);
    } else if (s_.lm_impl == LmHeadImpl::Recompute) {
        at("lm_head");
        dh = alloc("d_hidden", bf16(tokens_, d), Category::Transient);
        T w_copy;  // AMP: the recompute's own bf16 weight copy
        if (s_.precision == Precision::AmpFp32)
            w_copy = alloc("autocast_bf16", checked_mul(params_[static_cast<std::size_t>(lm_head_)].numel, 2), Category::Weights);
        for (std::int64_t n : transient_chunks(s_.lm_chunks)) {
            T lc = alloc("logits", bf16(n, V), Category::Transient);
            T lf = alloc("logits_fp32", f32(n, V), Category::Transient);
            drop(lc);
            // softmax - one-hot, scaled, in place in the fp32 logits
            T gc = alloc("d_logits", bf16(n, V), Category::Transient);
            drop(lf);
            grad_write(lm_head_);
            drop(gc);
        }
        drop(w_copy);
        drop(hs.hf);
    } else {
        at("lm_head.fused");
        dh = hs.dhf;  // computed in forward
        hs.dhf = T{};
        drop(hs.grad_partial);  // added into the gradient
    }
    if (!m_.tie_word_embeddings) grad_done(lm_head_);
    dh = uncast_grad(dh, d);
    at("final_norm");
    T dres = norm_backward(final_norm_, hs.rstd_f, hs.x_last, rb_);
    drop(dh);
    return dres;
}

}  // namespace mst::sim

// ---- hf runtime: the model's own tensors, the final norm, lm_head and ForCausalLMLoss -------
//
// LlamaModel.forward (transformers 5.24) builds, before the layers: cache_position
// (arange [S] int64), the packed-sequence check of masking_utils (position ids [1, S] expanded
// to the batch: is each row one sequence?) and the rotary tables cos, sin [1, S, D] (computed
// in fp32, cast to bf16; RoPE's products save them; D is the rotated share of a head). It holds the embeddings and
// cache_position until it returns.

namespace mst::sim {

void StepBuilder::hf_model_tensors() {
    const std::int64_t B = s_.micro_batch, S = s_.seq_len, D = m_.rotary_dim;
    at("model.positions");
    T arange = act("arange", elems(S, 1, 8), false);
    hf_positions_ = act("cache_position", elems(S, 1, 8), false);
    drop(arange);
    // The model's masks, in its mapping's order: Mistral and Phi-3 build one (sliding when they have a window),
    // Qwen2 and Gemma-2 the full one and, with sliding layers, the sliding one, Gemma-3 and gpt-oss both always,
    // Llama the full one. Each asks masking_utils whether the positions are packed; eager attention
    // gets them materialised (a mask no layer reads lives until the model's forward returns).
    bool any_sliding = false;
    for (bool sliding : m_.sliding_layers) any_sliding = any_sliding || sliding;
    const bool full = !m_.mistral_masking() || !any_sliding;
    const bool sliding_mask = any_sliding || m_.family == Family::Gemma3 || m_.family == Family::GptOss;
    for (const bool sliding : {false, true}) {
        if (sliding ? !sliding_mask : !full) continue;
        // find_packed_sequence_indices on [B, S] positions (gpt-oss passes no position ids to its
        // mask functions: none)
        if (m_.family == Family::GptOss) {
            if (s_.attention == Attention::Eager) hf_masks_[sliding ? 1 : 0] = hf_eager_mask(sliding);
            continue;
        }
        at("model.packed_check");
        T first = act("first_minus_1", elems(B, 1, 8), false);
        T prepended = act("prepended", elems(B, S + 1, 8), false);
        T diff = act("diff", elems(B, S, 8), false);
        drop(prepended);
        T starts = act("starts", elems(B, S, 1), false);
        T ids = act("sequence_ids", elems(B, S, 8), false);
        drop(starts);
        T last = act("last_is_0", elems(B, 1, 1), false);
        T all = act("all", 1, false);
        drop(last), drop(all), drop(first), drop(diff), drop(ids);
        if (s_.attention == Attention::Eager) hf_masks_[sliding ? 1 : 0] = hf_eager_mask(sliding);
    }
    at("model.rotary");  // LlamaRotaryEmbedding.forward for position ids [1, S]
    for (std::size_t table = 0; table < hf_rope_.size(); ++table) {
        if (!rope_table_used(table)) continue;
        if (z3_on_) z3_fetch(z3_.rotary);  // (Gemma-3: the module's call for each layer type)
        if (m_.longrope) {
            // dynamic_rope_update's longrope_frequency_update: seq_len = max(position_ids) + 1, then
            // inv_freq.copy_(torch.where(seq_len > original_max_position_embeddings, long, short))
            T top = act("max_position", 8, false);
            T len = act("seq_len", 8, false);
            drop(top);
            T longer = act("is_long", 1, false);
            T chosen = act("inv_freq_chosen", elems(D / 2, 1, 4), false);
            drop(longer), drop(len), drop(chosen);
        }
        T pos = act("positions_fp32", elems(S, 1, 4), false);
        T freqs = act("freqs", f32(S, D / 2), false);
        drop(pos);
        // emb = cat(freqs, freqs) [S, D]; gpt-oss's tables keep each frequency once: emb = freqs.
        const std::int64_t W = m_.rotary_half_tables() ? D / 2 : D;
        T emb = m_.rotary_half_tables() ? T{} : act("emb", f32(S, D), false);
        T c = act("cos_fp32", f32(S, W), false);
        T cs = act("cos_scaled", f32(S, W), false);
        drop(c);
        T sn = act("sin_fp32", f32(S, W), false);
        T ss = act("sin_scaled", f32(S, W), false);
        drop(sn);
        if (amp_) {  // .to(x.dtype) of the fp32 hidden states: the scaled tables themselves
            hf_rope_[table].cos = cs, hf_rope_[table].sin = ss;
            drop(freqs), drop(emb);
            continue;
        }
        hf_rope_[table].cos = act("cos", bf16(S, W), false);
        hf_rope_[table].sin = act("sin", bf16(S, W), false);
        drop(freqs), drop(emb), drop(cs), drop(ss);
    }
}

// Whether some layer reads rotary table 0 (every layer's, or Gemma-3's full-attention layers') or
// 1 (Gemma-3's sliding layers').
bool StepBuilder::rope_table_used(std::size_t table) const {
    if (!m_.rotary_per_layer_type()) return table == 0;
    for (bool sliding : m_.sliding_layers)
        if (sliding == (table == 1)) return true;
    return false;
}

// masking_utils.sdpa_mask + eager_mask on [B, S] positions: the batch, head, query and key index
// vectors, the boolean mask (causal: kv <= q; sliding: and_masks(kv > q - window, causal), from a
// scalar True), then torch.where(mask, 0, min) in bf16.
T StepBuilder::hf_eager_mask(bool sliding) {
    const std::int64_t B = s_.micro_batch, S = s_.seq_len;
    const bytes_t square = elems(S, S, 1);  // [1, 1, S, S] bool
    at("model.mask");
    T b = act("batch_idx", elems(B, 1, 8), false), h = act("head_idx", 8, false);
    T qa = act("q_arange", elems(S, 1, 8), false), q = act("q_idx", elems(S, 1, 8), false);
    drop(qa);
    T ka = act("kv_arange", elems(S, 1, 8), false), k = act("kv_idx", elems(S, 1, 8), false);
    drop(ka);
    T allowed;
    if (sliding) {
        T ones = act("true", 1, false);
        T lower = act("q_minus_window", elems(S, 1, 8), false);
        T in_window = act("in_window", square, false);
        drop(lower);
        T both = act("and", square, false);
        drop(in_window), drop(ones);
        T causal = act("causal", square, false);
        allowed = act("and", square, false);
        drop(causal), drop(both);
    } else {
        allowed = act("causal", square, false);
    }
    drop(b), drop(h), drop(q), drop(k);
    T zero = act("zero", rb_, false), min = act("min", rb_, false);  // in the embeddings' dtype
    T mask = act(sliding ? "sliding_mask" : "causal_mask", elems(B, checked_mul(S, S), rb_), false);
    drop(min), drop(zero), drop(allowed);
    return mask;
}

// LlamaForCausalLM.forward's head and Hugging Face's ForCausalLMLoss (loss/loss_utils.py):
// logits = lm_head(h) [T, V] bf16; upcast to fp32; labels padded by one ignore_index and shifted;
// cross_entropy = log_softmax [T, V] fp32 (saved) + nll_loss (the loss and its total_weight).
// x_last: the last layer's output, owned (the model's loop variable, rebound by the norm).
void StepBuilder::hf_head_forward(T x_last, HeadSaved& hs) {
    layer_ = -1;
    const std::int64_t V = m_.vocab_size;
    at("final_norm");
    if (fsdp2_own_embedding_group()) fsdp2_pre_forward(0);  // accelerate's tail, at its first module (untied)
    T h = hf_norm_forward(final_norm_, x_last, hs.hf_norm);
    drop(x_last);
    // The model's forward returns: its frame's variables go in their order, the position ids and
    // the embeddings (arguments) before the masks and the rotary (cos, sin); Qwen2 and Gemma-2 also
    // hold both arguments in a mask_kwargs dict that dies after their mask mapping.
    if (m_.family == Family::Qwen2 || m_.family == Family::Qwen3 || m_.gemma()) {
        for (T& mask : hf_masks_) drop(mask);
        drop(hf_embeddings_), drop(hf_positions_);
    } else if (m_.family == Family::GptOss) {  // its mask_kwargs hold the embeddings only
        drop(hf_positions_);
        for (T& mask : hf_masks_) drop(mask);
        drop(hf_embeddings_);
    } else {
        drop(hf_positions_), drop(hf_embeddings_);
        for (T& mask : hf_masks_) drop(mask);
    }
    for (HfRope& rope : hf_rope_) drop(rope.sin), drop(rope.cos);  // the dict's entries in order, a tuple's last first
    z3_fetch_of(lm_head_);  // (python/mst_hf's chunked loss runs inside lm_head's forward under ZeRO-3)
    if (s_.lm_chunks > 1) {
        hf_chunked_loss_forward(h, hs);
        z3_release_of(lm_head_);
        drop(h);  // the model's (and the training forward's) hidden
        return;
    }
    T logits = logits_forward(h, hs.hf_logits_in, hs.logits_tanh);
    z3_release_of(lm_head_);
    at("loss");
    T up = act("logits_fp32", f32(tokens_, V), false);
    T pad = act("labels_padded", elems(s_.micro_batch, s_.seq_len + 1, 8), false);
    // shift_labels = pad[..., 1:].contiguous(): a copy unless there is one row
    hs.hf_pad = s_.micro_batch > 1 ? act("labels_shifted", elems(tokens_, 1, 8), false) : hold(pad);
    T lp = act("log_probs", f32(tokens_, V), false);
    hs.logp = saved(lp);
    hs.hf_loss = act("loss", 4, false);  // held by the trainer until its backward is done
    hs.hf_weight = act("total_weight", 4, false);
    hs.hf_lp_nll = saved(lp);
    drop(lp);
    drop(up), drop(pad);  // the loss function's locals
    drop(h);              // the model's forward returns
    hs.hf_logits = logits;  // in its output, until the autocast region has ended (micro_step)
}

T StepBuilder::hf_head_backward(HeadSaved& hs) {
    layer_ = -1;
    const std::int64_t d = m_.hidden_size, V = m_.vocab_size;
    if (ds_on_) ds_loss_scaling();
    at("loss");
    hs.hf_root = alloc("d_loss", hf_loss_bytes(), Category::Transient);  // backward()'s grad_tensors, held until it returns
    T root = hold(hs.hf_root);
    if (ds_on_) {  // DeepSpeed's MulBackward0 (the loss scale), DivBackward0 (the accumulation steps)
        T g = alloc("d_loss_scaled", 4, Category::Transient);
        node_end({}, &root);
        root = alloc("d_loss_unscaled", 4, Category::Transient);
        node_end({}, &g);
    } else if (s_.grad_accum > 1) {  // DivBackward0
        T g = alloc("d_loss_unscaled", hf_loss_bytes(), Category::Transient);
        node_end({}, &root);
        root = g;
    }
    if (fsdp2_casts_outputs()) {  // ToCopyBackward0 of the root's output cast
        T g = alloc("d_loss_fp32", 4, Category::Transient);
        node_end({}, &root);
        root = g;
    }
    if (z3_on_) z3_fetch(z3_.root, false);  // the loss's pre-backward hook (the model's output)
    // FSDP2's pre-backward that prefetches the last layer: the root's, on the model's output (mst_hf's and
    // Axolotl's groups; Axolotl's root gathers itself again first);
    // accelerate's tail's, on lm_head's output: the logits' gradient below. (python/mst_hf's chunked loss has
    // lm_head's forward return an empty placeholder that no gradient reaches: no prefetch, the last layer
    // gathers its own.)
    if (fsdp2_on_ && !fsdp2_accelerate_) fsdp2_root_pre_backward();
    // accelerate's untied tail: its post-backward, on its first module's input (the final norm's)
    const auto norm_backward = [&](T dh) {
        T dx = hf_norm_backward(final_norm_, hs.hf_norm, dh);
        if (fsdp2_own_embedding_group()) fsdp2_post_backward(0);
        return dx;
    };
    if (s_.lm_chunks > 1) {
        z3_fetch_of(lm_head_, false);  // ZeRO-3: the loss is lm_head's output
        T dh = hf_chunked_loss_backward(hs, root);
        z3_release_of(lm_head_, false);  // as d_hidden reaches its input
        at("final_norm");
        if (z3_on_) z3_fetch(z3_.model, false);  // the inner model's output
        return norm_backward(dh);
    }
    T glp = alloc("d_log_probs", f32(tokens_, V), Category::Transient);  // NllLossBackward0
    node_end({&hs.hf_lp_nll, &hs.hf_pad, &hs.hf_weight}, &root);
    T glf = alloc("d_logits_fp32", f32(tokens_, V), Category::Transient);  // LogSoftmaxBackward0
    node_end({&hs.logp}, &glp);
    at("lm_head");
    T gl = alloc("d_logits", bf16(tokens_, V), Category::Transient);  // ToCopyBackward0
    node_end({}, &glf);
    if (m_.final_logit_softcapping) {  // MulBackward0, TanhBackward0, DivBackward0: each a new tensor
        at("lm_head.softcap");
        gl = softcap_backward(gl, bf16(tokens_, V), {"d_logits_capped", "d_logits_tanh", "d_logits_div"}, hs.logits_tanh);
        at("lm_head");
    }
    if (fsdp2_accelerate_) fsdp2_prefetch_last_layer();  // (on lm_head's output, the logits)
    if (z3_on_) {
        // (tied: the embedding's gradient joins the weight's before AccumulateGrad runs)
        T dh = z3_linear_backward(lm_head_, "d_hidden", bf16(tokens_, d), {&hs.hf_logits_in}, gl, [](T&) {},
                                  !m_.tie_word_embeddings);
        at("final_norm");
        z3_fetch(z3_.model, false);  // the inner model's output
        return hf_norm_backward(final_norm_, hs.hf_norm, dh);
    }
    T gw = hf_mm_grad(lm_head_);
    T dh = alloc("d_hidden", bf16(tokens_, d), Category::Transient);
    hf_mm_node_end(lm_head_, {&hs.hf_logits_in}, &gl);
    // tied: the embedding's gradient joins it
    hf_mm_outputs(lm_head_, gw, dh, amp_, true, [&](int p, T g) { add_grad(p, g, !amp_, !m_.tie_word_embeddings); },
                  [](T&) {});
    at("final_norm");
    return norm_backward(dh);
}

}  // namespace mst::sim

// ---- hf runtime: python/mst_hf's chunked LM head + loss (mst_hf/loss.py) ---------------------
//
// The model's lm_head hands its input over; causal_lm_loss pads the labels, counts the targets
// (the mean's denominator) and runs one autograd Function over [T, d] in chunks of n tokens.
// Per chunk: z = linear(h, w).float() [n, V] fp32 (the bf16 GEMM output dies), then the loss's
// per-token tensors; with gradients, z becomes d(loss)/d(logits) in place, and g = z.to(bf16)
// feeds the two gradient GEMMs (d_hidden's rows written in place, d_weight accumulated in place).
// recompute (MsT): forward without gradients saves hidden, targets, denominator; backward runs
// every chunk again with gradients. fused (Liger): forward computes the gradients and saves them.
// Under ZeRO-3 all of it runs inside lm_head's forward, which returns the loss (mst_hf/patch.py):
// the module's hooks gather its weight around it, and again around the Function's backward.

namespace mst::sim {

void StepBuilder::hf_chunk_loss(std::int64_t n, bool with_grad, T& h, T& z, T& t, T& loss) {
    const std::int64_t V = m_.vocab_size;
    T logits = alloc("logits", bf16(n, V), Category::Transient);
    z = alloc("logits_fp32", f32(n, V), Category::Transient);
    drop(logits);
    if (m_.final_logit_softcapping) {  // t = z.div_(cap).tanh_() in place; z = t * cap, a new tensor
        t = z;
        z = alloc("logits_capped", f32(n, V), Category::Transient);
    }
    if (!with_grad) drop(h);  // _chunk_logits' argument, as it returns
    T valid = alloc("valid", elems(n, 1, 1), Category::Transient);
    T invalid = alloc("invalid", elems(n, 1, 1), Category::Transient);
    T safe = alloc("safe_targets", elems(n, 1, 8), Category::Transient);
    drop(invalid);
    T picked = alloc("picked", f32(n, 1), Category::Transient);
    T peak = alloc("peak", f32(n, 1), Category::Transient);
    T total = alloc("sum_exp", f32(n, 1), Category::Transient);
    T lg = alloc("log_sum_exp_part", f32(n, 1), Category::Transient);
    T lse = alloc("log_sum_exp", f32(n, 1), Category::Transient);
    drop(lg);
    T diff = alloc("token_loss", f32(n, 1), Category::Transient);
    T invalid2 = alloc("invalid", elems(n, 1, 1), Category::Transient);
    T masked = alloc("token_loss_masked", f32(n, 1), Category::Transient);
    drop(diff), drop(invalid2);
    loss = alloc("chunk_loss", 4, Category::Transient);
    drop(masked);
    T weight;
    if (with_grad) {  // softmax - one-hot, scaled, in place in z
        weight = alloc("valid_fp32", f32(n, 1), Category::Transient);
        T neg = alloc("minus_valid", f32(n, 1), Category::Transient);
        drop(neg);
        T scaled = alloc("valid_scaled", f32(n, 1), Category::Transient);
        drop(scaled);
    }
    drop(valid), drop(safe), drop(picked), drop(peak), drop(total), drop(lse), drop(weight);
}

// One chunk's loss and gradients (_chunk_backward): the loss of the chunk, returned.
// Under autocast the chunk's fp32 hidden gradient is d_hidden[chunk].copy_(g @ w), through a bf16
// temporary.
T StepBuilder::hf_chunk_backward(std::int64_t n) {
    T h = amp_ ? alloc("hidden_chunk_bf16", bf16(n, m_.hidden_size), Category::Transient) : T{};
    T z, t, loss;
    hf_chunk_loss(n, true, h, z, t, loss);
    drop(t);  // del t
    T g = alloc("d_logits", bf16(n, m_.vocab_size), Category::Transient);
    drop(z);
    if (amp_) {
        T dh = alloc("d_hidden_chunk_bf16", bf16(n, m_.hidden_size), Category::Transient);
        drop(dh);
    }
    drop(h), drop(g);  // at return, in the frame's order
    return loss;
}

void StepBuilder::hf_chunked_loss_forward(T h, HeadSaved& hs) {
    const std::int64_t d = m_.hidden_size, V = m_.vocab_size;
    const bool fused = s_.lm_impl == LmHeadImpl::FusedForward;
    const auto chunks = chunk_sizes(tokens_, s_.lm_chunks);
    at("loss");
    T pad = act("labels_padded", elems(s_.micro_batch, s_.seq_len + 1, 8), false);
    T targets = s_.micro_batch > 1 ? act("targets", elems(tokens_, 1, 8), false) : hold(pad);  // reshape(-1)
    T valid = act("valid", elems(tokens_, 1, 1), false);
    T count = act("count", 8, false);
    drop(valid);
    T denominator = act("denominator", 4, false);
    drop(count);
    at("lm_head.chunked");
    // Under autocast: w = weight.to(bf16) for the chunks' GEMMs, each chunk of h cast too; the
    // gradients of h take its fp32, the weight's is summed in bf16 and cast back to fp32 at the end.
    const std::int64_t numel = params_[static_cast<std::size_t>(lm_head_)].numel;
    if (!fused) {
        hs.hf_logits_in = saved(h), hs.hf_targets = saved(targets), hs.hf_denominator = saved(denominator);
        T w = amp_ ? act("lm_head_weight_bf16", bf16(numel, 1), false) : T{};
        T total = act("loss_sum", 4, false);
        for (std::int64_t n : chunks) {
            loop_iteration();
            T hc = amp_ ? act("hidden_chunk_bf16", bf16(n, d), false) : T{};
            T z, t, loss;
            hf_chunk_loss(n, false, hc, z, t, loss);
            drop(loss), drop(z), drop(t);  // total += loss; del z, t
        }
        loop_end();
        drop(w);  // _loss_sum returns
        hs.hf_loss = act("loss", 4, false);
        drop(total);
    } else {
        T scale = act("scale", 4, false);
        T w = amp_ ? act("lm_head_weight_bf16", bf16(numel, 1), false) : T{};
        hs.dhf = act("d_hidden", res(tokens_, d), false);
        hs.grad_partial = act("d_weight", amp_ ? bf16(numel, 1) : checked_mul(numel, pg_), false);
        T total = act("loss_sum", 4, false);
        for (std::int64_t n : chunks) {
            loop_iteration();
            T loss = hf_chunk_backward(n);
            drop(loss);
        }
        loop_end();
        if (amp_) {  // d_weight = d_weight.to(fp32)
            T dw = act("d_weight_fp32", f32(numel, 1), false);
            drop(hs.grad_partial);
            hs.grad_partial = dw;
        }
        hs.hf_loss = act("loss", 4, false);
        drop(scale), drop(w), drop(total);
    }
    (void)V;
    drop(pad), drop(targets), drop(denominator);  // causal_lm_loss returns
}

T StepBuilder::hf_chunked_loss_backward(HeadSaved& hs, T grad_in) {
    const std::int64_t d = m_.hidden_size;
    at("lm_head.chunked");
    T dh, dw;
    if (s_.lm_impl == LmHeadImpl::FusedForward) {  // scaled in place
        dh = std::exchange(hs.dhf, T{}), dw = std::exchange(hs.grad_partial, T{});
        node_end({}, &grad_in);
    } else {
        const std::int64_t numel = params_[static_cast<std::size_t>(lm_head_)].numel;
        T scale = alloc("scale", 4, Category::Transient);
        T w = amp_ ? alloc("lm_head_weight_bf16", bf16(numel, 1), Category::Transient) : T{};
        dh = alloc("d_hidden", res(tokens_, d), Category::Transient);
        dw = alloc("d_weight", amp_ ? bf16(numel, 1) : checked_mul(numel, pg_), Category::Transient);
        for (std::int64_t n : chunk_sizes(tokens_, s_.lm_chunks)) {
            loop_iteration();
            T loss = hf_chunk_backward(n);
            drop(loss);
        }
        loop_end();
        if (amp_) {  // d_weight = d_weight.to(fp32)
            T dw32 = alloc("d_weight_fp32", f32(numel, 1), Category::Transient);
            drop(dw);
            dw = dw32;
        }
        drop(scale), drop(w);
        py_node_end({&hs.hf_logits_in, &hs.hf_targets, &hs.hf_denominator}, &grad_in, [&] { fsdp2_upcast_output(lm_head_, dw); });
    }
    add_grad(lm_head_, dw, false, !m_.tie_word_embeddings);
    return dh;
}

}  // namespace mst::sim
