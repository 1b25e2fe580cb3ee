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

namespace mst::sim {

T StepBuilder::embedding_forward(Category out_category) {
    layer_ = -1;
    at("embedding");
    const bool gemma = m_.family == Family::Gemma2;
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
    (void)dres;
    T scaled;  // Gemma: the gradient through the sqrt(d) scale, a new tensor
    if (m_.family == Family::Gemma2) {
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
        at("lm_head");
        use_weight(lm_head_);
        T logits = act("logits", bf16(tokens_, V), false);
        hs.hf = saved(hin);
        drop(hin);
        if (m_.final_logit_softcapping) {  // Gemma-2: logits = tanh(logits / cap) * cap
            at("lm_head.softcap");
            logits = softcap_forward(logits, bf16(tokens_, V), {"logits_div", "logits_tanh", "logits_capped"}, hs.logits_tanh);
        }
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
