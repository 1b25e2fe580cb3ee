// The executor's embedding, final norm, LM head and loss, forward and backward. The
// independence rule at the top of executor.cpp holds here too.
//
// Shapes: hidden [T, d]; logits [n, V] per mini-sequence of n tokens (n = T unchunked).
//  * M = 1, the Hugging Face path: bf16 logits, their fp32 upcast, fp32 log-softmax (saved);
//    backward: nll_loss's dense fp32 gradient of the log-probabilities, log_softmax's fp32
//    gradient of the logits, its bf16 cast for the two GEMMs.
//  * Recompute (MsT reference): per chunk under no-grad, bf16 logits, fp32 upcast, fp32
//    log-softmax, all freed per chunk; only the hidden states are saved. Backward recomputes
//    each chunk's fp32 logits, turns them into their gradient in place, casts to bf16.
//  * Fused (Liger FLCE / ALST tiled logits): per chunk bf16 logits turned into their gradient
//    in place inside forward; d_hidden and the weight gradient are held until backward.
#include <cassert>
#include <cmath>

#include "executor.hpp"

namespace mst::exec {

namespace {
const std::int64_t* i64(const Ten& t) { return static_cast<const std::int64_t*>(t.buf->data()); }
}  // namespace

// x [T, d] = embed_tokens[ids] (Gemma-2: times sqrt(d), a new tensor)
Ten Step::embedding_forward(Category out_category) {
    alloc_.set_layer(-1);
    at("embedding");
    const std::int64_t d = m_.hidden_size;
    Ten x = alloc("embeddings", T_ * d, res_, gemma_ ? Category::Transient : out_category);
    b_.embedding_forward(x.t(), params_[static_cast<std::size_t>(embed_)].weight.t(), i64(ids_), T_, d, m_.vocab_size);
    if (gemma_) {
        at("embedding.scale");
        Ten scaled = alloc("embeddings_scaled", T_ * d, res_, out_category);
        b_.scale(scaled.t(), x.t(), T_ * d, embedding_scale());
        drop(x);
        x = std::move(scaled);
    }
    return x;
}

// HF Gemma multiplies by sqrt(d) rounded to the activations' dtype.
float Step::embedding_scale() const {
    const float s = std::sqrt(static_cast<float>(m_.hidden_size));
    return res_ == DType::BF16 ? round_to_bf16(s) : s;
}

// dres [T, d] scatter-added into the table's gradient [V, d] (Gemma-2: through the scale first)
void Step::embedding_backward(const Ten& dres) {
    alloc_.set_layer(-1);
    const std::int64_t d = m_.hidden_size;
    Ten scaled;
    if (gemma_) {
        at("embedding.scale");
        scaled = alloc("d_embeddings", T_ * d, res_, Category::Transient);
        b_.scale(scaled.t(), dres.t(), T_ * d, embedding_scale());
    }
    at("embedding");
    b_.embedding_backward(grad_write(embed_), gemma_ ? scaled.t() : dres.t(), i64(ids_), T_, d, m_.vocab_size);
    drop(scaled);
    grad_done(embed_);
}

void Step::head_forward(Ten x_last, HeadSaved& hs) {
    alloc_.set_layer(-1);
    const std::int64_t d = m_.hidden_size, V = m_.vocab_size;
    const bool chunked = s_.lm_chunks > 1;
    const bool fused = chunked && s_.lm_impl == LmHeadImpl::FusedForward;
    const std::int64_t* labels = i64(labels_);
    const float softcap = m_.final_logit_softcapping ? static_cast<float>(*m_.final_logit_softcapping) : 0.0f;

    at("final_norm");
    // The hidden states are saved by the head's matmul, except by the fused head (it
    // finishes their gradient in forward) and under AMP (the matmul saves their bf16 cast).
    Ten hf = norm_forward(final_norm_, x_last, hs.rstd_f, !amp_ && !fused, res_);
    hs.x_last = saved(x_last);
    drop(x_last);
    Ten hin = cast_for_matmul(std::move(hf), d);

    if (!chunked) {
        at("lm_head");
        const Tensor w = use_weight(lm_head_);
        Ten logits = act("logits", T_ * V, act_, false);  // [T, V]
        b_.linear_forward(logits.t(), hin.t(), w, T_, d, V);
        hs.hf = saved(hin);
        drop(hin);
        if (softcap > 0.0f) {  // Gemma-2: logits = tanh(logits / cap) * cap
            at("lm_head.softcap");
            logits = softcap_forward("logits", std::move(logits), T_ * V, softcap, hs.logits_tanh);
        }
        at("loss");
        Ten up = act("logits_fp32", T_ * V, DType::F32, false);  // logits.float()
        b_.cast(up.t(), logits.t(), T_ * V);
        Ten logp = act("log_probs", T_ * V, DType::F32, true);  // log_softmax, saved by nll_loss
        b_.cross_entropy_forward(logp.f32(), up.t(), labels, T_, V);
        drop(up);
        hs.logp = saved(logp);
        drop(logp);
        drop(logits);  // the trainer drops the model outputs before backward
        return;
    }

    if (!fused) {
        hs.hf = saved(hin);
        NoGrad no_grad(*this);
        const Tensor w = use_weight(lm_head_);
        std::int64_t row0 = 0;
        for (std::int64_t n : chunks(s_.lm_chunks)) {
            at("lm_head");
            Ten lc = alloc("logits", n * V, act_, Category::Transient);
            b_.linear_forward(lc.t(), hin.at(row0 * d), w, n, d, V);
            Ten lf = alloc("logits_fp32", n * V, DType::F32, Category::Transient);
            b_.cast(lf.t(), lc.t(), n * V);
            drop(lc);
            if (softcap > 0.0f) b_.softcap_forward(lf.t(), lf.t(), n * V, softcap);  // in place, fp32
            at("loss");
            Ten lp = alloc("log_probs", n * V, DType::F32, Category::Transient);
            b_.cross_entropy_forward(lp.f32(), lf.t(), labels + row0, n, V);
            drop(lp), drop(lf);
            row0 += n;
        }
        drop(hin);
        return;
    }

    at("lm_head.fused");
    Tensor w;
    {
        NoGrad no_grad(*this);
        w = use_weight(lm_head_);
    }
    const Param& P = params_[static_cast<std::size_t>(lm_head_)];
    hs.dhf = alloc("d_hidden", T_ * d, act_, Category::SavedActivation);
    // The op returns its weight gradient as an output that autograd hands to the parameter in
    // backward: the first time it becomes the gradient; when one exists (accumulation) it is a
    // separate buffer, added in backward.
    Tensor dw;
    if (P.grad) {
        hs.grad_partial = alloc("lm_head_grad", P.numel(), pg_, Category::Gradients);
        b_.zero(hs.grad_partial.t(), P.numel());
        dw = hs.grad_partial.t();
    } else {
        dw = grad_write(lm_head_);
    }
    std::int64_t row0 = 0;
    for (std::int64_t n : chunks(s_.lm_chunks)) {
        Ten lc = alloc("logits", n * V, act_, Category::Transient);
        b_.linear_forward(lc.t(), hin.at(row0 * d), w, n, d, V);
        b_.cross_entropy_fused(lc.t(), labels + row0, n, V, loss_scale_, softcap, true);
        b_.linear_backward_input(hs.dhf.at(row0 * d), lc.t(), w, n, d, V);
        b_.linear_backward_weight(dw, lc.t(), hin.at(row0 * d), n, d, V, true);
        drop(lc);
        row0 += n;
    }
    drop(hin);
}

// -> the residual stream's gradient [T, d] (the final norm's input gradient)
Ten Step::head_backward(HeadSaved& hs) {
    alloc_.set_layer(-1);
    const std::int64_t d = m_.hidden_size, V = m_.vocab_size;
    const std::int64_t* labels = i64(labels_);
    const float softcap = m_.final_logit_softcapping ? static_cast<float>(*m_.final_logit_softcapping) : 0.0f;
    Ten dh;
    if (s_.lm_chunks == 1) {
        at("loss");
        Ten glp = alloc("d_log_probs", T_ * V, DType::F32, Category::Transient);
        b_.nll_loss_backward(glp.f32(), labels, T_, V, loss_scale_);
        Ten glf = alloc("d_logits_fp32", T_ * V, DType::F32, Category::Transient);
        b_.log_softmax_backward(glf.f32(), glp.f32(), hs.logp.f32(), T_, V);
        drop(glp), drop(hs.logp);
        at("lm_head");
        Ten gl = alloc("d_logits", T_ * V, act_, Category::Transient);  // the .float() cast's backward
        b_.cast(gl.t(), glf.t(), T_ * V);
        drop(glf);
        if (hs.logits_tanh) {
            at("lm_head.softcap");
            gl = softcap_backward("d_logits", std::move(gl), T_ * V, softcap, hs.logits_tanh);
            at("lm_head");
        }
        dh = alloc("d_hidden", T_ * d, act_, Category::Transient);
        b_.linear_backward_input(dh.t(), gl.t(), backward_weight(lm_head_), T_, d, V);
        b_.linear_backward_weight(grad_write(lm_head_), gl.t(), hs.hf.t(), T_, d, V, true);
        release_weight(lm_head_);
        drop(gl), drop(hs.hf);
    } else if (s_.lm_impl == LmHeadImpl::Recompute) {
        at("lm_head");
        dh = alloc("d_hidden", T_ * d, act_, Category::Transient);
        const Param& P = params_[static_cast<std::size_t>(lm_head_)];
        Ten w_copy;  // AMP: the recompute's own bf16 weight copy
        if (amp_) {
            w_copy = alloc("autocast_bf16", P.numel(), opt_.storage_fp32 ? DType::F32 : DType::BF16, Category::Weights);
            b_.cast(w_copy.t(), P.weight.t(), P.numel());
        }
        const Tensor w = amp_ ? w_copy.t() : P.weight.t();
        std::int64_t row0 = 0;
        for (std::int64_t n : chunks(s_.lm_chunks)) {
            Ten lc = alloc("logits", n * V, act_, Category::Transient);
            b_.linear_forward(lc.t(), hs.hf.at(row0 * d), w, n, d, V);
            Ten lf = alloc("logits_fp32", n * V, DType::F32, Category::Transient);
            b_.cast(lf.t(), lc.t(), n * V);
            drop(lc);
            // softmax - one-hot, scaled, in place in the fp32 logits
            b_.cross_entropy_fused(lf.t(), labels + row0, n, V, loss_scale_, softcap, false);
            Ten gc = alloc("d_logits", n * V, act_, Category::Transient);
            b_.cast(gc.t(), lf.t(), n * V);
            drop(lf);
            b_.linear_backward_input(dh.at(row0 * d), gc.t(), w, n, d, V);
            b_.linear_backward_weight(grad_write(lm_head_), gc.t(), hs.hf.at(row0 * d), n, d, V, true);
            drop(gc);
            row0 += n;
        }
        drop(w_copy);
        drop(hs.hf);
    } else {
        at("lm_head.fused");
        dh = std::move(hs.dhf);  // computed in forward
        if (hs.grad_partial)
            b_.residual_accumulate(grad_write(lm_head_), hs.grad_partial.t(), params_[static_cast<std::size_t>(lm_head_)].numel());
        drop(hs.grad_partial);
    }
    if (!m_.tie_word_embeddings) grad_done(lm_head_);
    dh = uncast_grad(std::move(dh), d);
    at("final_norm");
    Ten dres = norm_backward(final_norm_, hs.rstd_f, hs.x_last, dh, res_);
    drop(dh);
    return dres;
}

}  // namespace mst::exec
