// Memory rule of ring attention (sp_impl ring): PyTorch's context parallelism
// (torch.distributed.tensor.experimental.context_parallel, what accelerate 1.15's cp_backend "torch"
// runs for transformers' sdpa attention), which sends SDPA through PyTorch 2.15's
// _templated_ring_attention and its backward
// (torch/distributed/tensor/experimental/_context_parallel/_attention.py) with torch's defaults:
// the K/V all-gathered once per call (_AllGatherRotater), every block's output merged in fp32
// (_SDPAMerger, convert_to_f32), head-tail load balance. Each SDPA call is aten's FlashAttention-2
// on CUDA (the output like q, fp32 logsumexp; its backward's mha_bwd scratch).
//
// Shapes (one rank of sp): T = B x S_l rows, S_l = seq_len / sp tokens per sequence in two halves
// (chunks r and 2 sp - 1 - r of the sequence); q [B, S_l, nh, hd] and k, v [B, S_l, nkv, hd] as the
// projections leave them, handed to SDPA transposed ([B, H, S_l, hd] views). Block i of the ring
// holds rank (r - i) mod sp's keys; with load balance the steps i <= r see half of them (full q),
// the steps i > r the second half of q (all keys): a "partial" merge into the second half.
//
// The code below walks torch's Python line by line: each T is a Python name (or a C++ local of
// aten's kernels), rebinding one drops what it held, and a view holds its base (hold()). Proven
// event by event against that code on fake tensors (python/mst_referee/ring.py,
// python/tests/test_ring.py).
#include "builder.hpp"

namespace mst::sim {

namespace {

// A 4-D tensor's layout: is it contiguous? (PyTorch's rule: dimensions of size 1 do not count.)
struct Layout {
    std::int64_t size[4];
    std::int64_t stride[4];
    bool contiguous() const {
        std::int64_t expected = 1;
        for (int d = 3; d >= 0; --d) {
            if (size[d] == 1) continue;
            if (stride[d] != expected) return false;
            expected *= size[d];
        }
        return true;
    }
    Layout transposed() const {  // transpose(1, 2)
        return {{size[0], size[2], size[1], size[3]}, {stride[0], stride[2], stride[1], stride[3]}};
    }
    Layout second_half() const {  // chunk(2, dim=2)[1]: [.., .., n/2, ..], the same strides
        return {{size[0], size[1], size[2] / 2, size[3]}, {stride[0], stride[1], stride[2], stride[3]}};
    }
};

// [B, H, S, D] views of a [B, S, H, D] tensor (what the projections and flash's outputs are) and
// of a contiguous [B, H, S, D] one (what torch.cat makes).
Layout heads_view_of_bshd(std::int64_t B, std::int64_t H, std::int64_t S, std::int64_t D) {
    return {{B, H, S, D}, {S * H * D, D, H * D, 1}};
}
Layout contiguous_bhsd(std::int64_t B, std::int64_t H, std::int64_t S, std::int64_t D) {
    return {{B, H, S, D}, {H * S * D, S * D, D, 1}};
}

std::int64_t round_up_to(std::int64_t x, std::int64_t m) { return (x + m - 1) / m * m; }

}  // namespace

void StepBuilder::ring_forward(T q, T k, T v, T& out, T& lse, T& attn_out) {
    (void)q;  // read as views; held by the caller
    at("attn.ring");
    const std::int64_t cp = s_.sp, rank = rank_, B = s_.micro_batch, S = s_.seq_len / cp;
    const std::int64_t nh = m_.num_heads, nkv = m_.num_kv_heads, hd = m_.head_dim, qd = m_.q_dim(), kvd = m_.kv_dim();
    const std::int64_t rows = tokens_, half = tokens_ / 2;
    const bool copy_kv = !heads_view_of_bshd(B, nkv, S, hd).contiguous();
    const Category kept = grad_ ? Category::SavedActivation : Category::Transient;  // the flash node's lse

    // key = key.contiguous(); value = value.contiguous()
    T key = copy_kv ? alloc("ring_k", bf16(rows, kvd), Category::Transient) : hold(k);
    T value = copy_kv ? alloc("ring_v", bf16(rows, kvd), Category::Transient) : hold(v);
    T merger_out, merger_lse;  // _SDPAMerger's _out, _lse (fp32)
    T gathered;                // _AllGatherRotater's buffer: every rank's K and V
    T kb, vb;                  // the loop's k, v
    T block_out, block_lse;    // the loop's out, logsumexp
    bool any_partial = false;
    for (std::int64_t i = 0; i < cp; ++i) {
        if (i > 0) {  // key, value = views of the gathered buffer
            T key_view = hold(gathered), value_view = hold(gathered);
            drop(key), drop(value);
            key = key_view, value = value_view;
        }
        if (i < cp - 1) {  // next_kv = torch.cat([key.flatten(), value.flatten()]); the first exchange gathers it
            T next_kv = alloc("ring_kv_send", bf16(rows, 2 * kvd), Category::Transient);
            if (i == 0) gathered = alloc("ring_kv_gathered", bf16(checked_mul(rows, cp), 2 * kvd), Category::Transient);
            drop(next_kv);
        }
        const bool partial = i > rank;  // i == 0 and i <= rank: the whole q
        any_partial = any_partial || partial;
        {  // q, k, v, partial = ...
            T kn = hold(key), vn = hold(value);
            drop(kb), drop(vb);
            kb = kn, vb = vn;
        }
        // out, logsumexp, *rest = op(q, k, v): aten flash's output like q and fp32 logsumexp
        const std::int64_t n = partial ? half : rows;
        const bool last = i == cp - 1;
        T o = alloc("ring_block_out", bf16(n, qd), Category::Transient);
        T l = alloc("ring_block_lse", f32(n, nh), Category::Transient);
        drop(block_out), drop(block_lse);
        block_out = o, block_lse = l;

        // sdpa_merger.step(out, logsumexp, partial): out.to(float32); the merge
        T out32 = alloc("ring_block_out_fp32", f32(n, qd), Category::Transient);
        if (i == 0) {
            merger_out = out32;
            merger_lse = hold(block_lse);
            continue;
        }
        // out = out - sigmoid(block_lse - lse) * (out - block_out)
        T a = alloc("ring_lse_diff", f32(n, nh), Category::Transient);
        T sg = alloc("ring_sigmoid", f32(n, nh), Category::Transient);
        drop(a);
        T diff = alloc("ring_out_diff", f32(n, qd), Category::Transient);
        T prod = alloc("ring_out_scaled", f32(n, qd), Category::Transient);
        drop(sg), drop(diff);
        T merged = alloc("ring_out_merged", f32(n, qd), Category::Transient);
        drop(prod);
        // lse = lse - logsigmoid(lse - block_lse) (on CUDA log_sigmoid_forward's buffer is empty)
        T b = alloc("ring_lse_diff", f32(n, nh), Category::Transient);
        T ls = alloc("ring_logsigmoid", f32(n, nh), Category::Transient);
        drop(b);
        T merged_lse = alloc("ring_lse_merged", f32(n, nh), last && !partial ? kept : Category::Transient);
        drop(ls);
        if (partial) {  // _partial_update: torch.cat of the first half and the merged second half
            T whole_lse = alloc("ring_lse_cat", f32(rows, nh), last ? kept : Category::Transient);
            drop(merger_lse);
            merger_lse = whole_lse;
            T whole_out = alloc("ring_out_cat", f32(rows, qd), Category::Transient);
            drop(merger_out);
            merger_out = whole_out;
            drop(merged_lse), drop(merged);  // _merge_one's locals
        } else {
            drop(merger_lse);
            merger_lse = merged_lse;
            drop(merger_out);
            merger_out = merged;
        }
        drop(out32);  // step()'s local
    }
    // sdpa_merger.results(): the output back in bf16 (the logsumexp is the merger's, squeezed)
    out = act("ring_out", bf16(rows, qd), true);
    lse = merger_lse;
    // the function returns: the merger, the rotater (its buffer once the views go), the last block
    drop(key), drop(value);
    drop(merger_out);
    drop(gathered);
    drop(kb), drop(vb);
    drop(block_out), drop(block_lse);
    // The caller (transformers' sdpa_attention_forward): out.transpose(1, 2).contiguous() before
    // o_proj. A partial merge's torch.cat left the output [B, H, S, D]-contiguous, so its
    // [B, S, H, D] view is copied (ranks 0 .. sp - 2); flash's own layout is not.
    const Layout final_layout = any_partial ? contiguous_bhsd(B, nh, S, hd) : heads_view_of_bshd(B, nh, S, hd);
    attn_out = final_layout.transposed().contiguous() ? hold(out) : act("ring_out_contiguous", bf16(rows, qd), true);
}

void StepBuilder::ring_backward(T d_out, T q, T k, T v, T out, T lse, T& dq, T& dk, T& dv) {
    (void)d_out, (void)q, (void)lse;  // read, held by the caller
    at("attn.ring");
    const std::int64_t cp = s_.sp, rank = rank_, B = s_.micro_batch, S = s_.seq_len / cp;
    const std::int64_t nh = m_.num_heads, nkv = m_.num_kv_heads, hd = m_.head_dim, qd = m_.q_dim(), kvd = m_.kv_dim();
    const std::int64_t rows = tokens_, half = tokens_ / 2;
    const bool copy_kv = !heads_view_of_bshd(B, nkv, S, hd).contiguous();
    // The forward's output: torch.cat's layout when its last merge was partial (rank < sp - 1)
    const Layout out_layout = rank < cp - 1 ? contiguous_bhsd(B, nh, S, hd) : heads_view_of_bshd(B, nh, S, hd);
    const Layout grad_layout = heads_view_of_bshd(B, nh, S, hd);  // wo's input gradient, [B, S, H, D]
    const Layout lse_layout = {{B, nh, S, 1}, {nh * S, S, 1, 1}};  // [B, H, S] as 4-D

    // grad_query/key/value = zeros_like(..., dtype=float32): fp32 accumulators, q's and k's strides
    T grad_query = alloc("ring_dq_acc", f32(rows, qd), Category::Transient);
    T grad_key = alloc("ring_dk_acc", f32(rows, kvd), Category::Transient);
    T grad_value = alloc("ring_dv_acc", f32(rows, kvd), Category::Transient);
    bool gk_strided = copy_kv;  // grad_key/value in k's transposed layout (zeros_like), not contiguous
    T key = copy_kv ? alloc("ring_k", bf16(rows, kvd), Category::Transient) : hold(k);
    T value = copy_kv ? alloc("ring_v", bf16(rows, kvd), Category::Transient) : hold(v);
    T next_kv, gathered;              // the K/V sent on, the kv rotater's buffer
    T dkv_buffer;                     // the dK/dV rotater's _buffer (its last all_to_all output)
    T next_grad_kv;                   // the name next_grad_kv
    T kb, vb, lse_block;              // the loop's k, v, lse
    T dq_b, dk_b, dv_b;               // grad_query_, grad_key_, grad_value_
    for (std::int64_t i = 0; i < cp; ++i) {
        if (i > 0) {  // buffer = kv_rotater.next_buffer(); key, value = views of it
            T key_view = hold(gathered), value_view = hold(gathered);
            drop(key), drop(value);
            key = key_view, value = value_view;
        }
        if (i != cp - 1) {  // next_kv = torch.cat(...); kv_rotater.exchange_buffers(next_kv)
            T sent = alloc("ring_kv_send", bf16(rows, 2 * kvd), Category::Transient);
            drop(next_kv);
            next_kv = sent;
            if (i == 0) gathered = alloc("ring_kv_gathered", bf16(checked_mul(rows, cp), 2 * kvd), Category::Transient);
        }
        const bool partial = i > rank;
        const std::int64_t nq = partial ? half : rows, nk = i > 0 && !partial ? half : rows;
        {  // q, k, v, out_, dout, lse = ...; the partial step's logsumexp half made contiguous
            T lse_now = partial && !lse_layout.second_half().contiguous()
                            ? alloc("ring_lse_half", f32(half, nh), Category::Transient)
                            : T{};
            T kn = hold(key), vn = hold(value);
            drop(kb), drop(vb);
            kb = kn, vb = vn;
            drop(lse_block);
            lse_block = lse_now;
        }
        // aten._scaled_dot_product_flash_attention_backward: dout and out made contiguous ([B, S, H, D]),
        // dq, dk, dv like q, k, v, then mha_bwd's scratch (flash_api.cpp), freed as its locals go
        const Layout g = partial ? grad_layout.second_half() : grad_layout;
        const Layout o = partial ? out_layout.second_half() : out_layout;
        T g_copy = g.transposed().contiguous() ? T{} : alloc("ring_dout_contiguous", bf16(nq, qd), Category::Transient);
        T o_copy = o.transposed().contiguous() ? T{} : alloc("ring_out_contiguous", bf16(nq, qd), Category::Transient);
        T dq_new = alloc("ring_block_dq", bf16(nq, qd), Category::Transient);
        T dk_new = alloc("ring_block_dk", bf16(nk, kvd), Category::Transient);
        T dv_new = alloc("ring_block_dv", bf16(nk, kvd), Category::Transient);
        const std::int64_t sq = nq / B, sk = nk / B;
        T softmax_d = alloc("softmax_d", f32(B * nh, round_up_to(sq, 128)), Category::Transient);
        T dq_accum = alloc("dq_accum_fp32",
                           f32(checked_mul(B, round_up_to(sq, 128)) * nh, hd <= 192 ? round_up_to(hd, 32) : 256),
                           Category::Transient);
        T dk_expanded, dv_expanded;
        if (nkv != nh) {  // grouped-query attention: dK, dV for every query head, summed into dk, dv
            dk_expanded = alloc("dk_expanded", bf16(checked_mul(B, sk) * nh, hd), Category::Transient);
            dv_expanded = alloc("dv_expanded", bf16(checked_mul(B, sk) * nh, hd), Category::Transient);
        }
        drop(dv_expanded), drop(dk_expanded), drop(dq_accum), drop(softmax_d), drop(o_copy), drop(g_copy);
        drop(dq_b), drop(dk_b), drop(dv_b);
        dq_b = dq_new, dk_b = dk_new, dv_b = dv_new;

        if (i > 0) {  // next_grad_kv = dkv_rotater.next_buffer(); grad_key, grad_value = views of it
            T received = hold(dkv_buffer);
            drop(next_grad_kv);
            next_grad_kv = received;
            T key_view = hold(next_grad_kv), value_view = hold(next_grad_kv);
            drop(grad_key);
            grad_key = key_view;
            drop(grad_value);
            grad_value = value_view;
            gk_strided = false;
            if (i <= rank) {  // _partial_update(..., idx=0, add=True): a new whole tensor each
                T whole_k = alloc("ring_dk_cat", f32(rows, kvd), Category::Transient);
                drop(grad_key);
                grad_key = whole_k;
                T whole_v = alloc("ring_dv_cat", f32(rows, kvd), Category::Transient);
                drop(grad_value);
                grad_value = whole_v;
            }
        }
        {  // next_grad_kv = torch.cat([grad_key.flatten(), grad_value.flatten()]): flatten copies k's layout
            T fk = gk_strided ? alloc("ring_dk_flat", f32(rows, kvd), Category::Transient) : T{};
            T fv = gk_strided ? alloc("ring_dv_flat", f32(rows, kvd), Category::Transient) : T{};
            T cat = alloc("ring_dkv_send", f32(rows, 2 * kvd), Category::Transient);
            drop(fk), drop(fv);
            drop(next_grad_kv);
            next_grad_kv = cat;
        }
        {  // dkv_rotater.exchange_buffers(next_grad_kv): an all_to_all into a new buffer
            T received = alloc("ring_dkv_recv", f32(rows, 2 * kvd), Category::Transient);
            drop(dkv_buffer);
            dkv_buffer = received;
        }
        if (partial) {  // grad_query = _partial_update(grad_query, grad_query_, idx=1, add=True)
            T whole = alloc("ring_dq_cat", f32(rows, qd), Category::Transient);
            drop(grad_query);
            grad_query = whole;
        }
    }
    // grad_query.to(bf16); next_grad_kv = dkv_rotater.next_buffer().to(bf16): dk and dv views of it
    dq = alloc("dq", bf16(rows, qd), Category::Transient);
    drop(grad_query);
    T dkv = alloc("dkv", bf16(rows, 2 * kvd), Category::Transient);
    drop(next_grad_kv);
    drop(grad_key), drop(grad_value);
    dk = dkv, dv = hold(dkv);
    // the function returns: its locals go in their order
    drop(key), drop(value), drop(next_kv), drop(dq_b), drop(dk_b), drop(dv_b), drop(dkv_buffer), drop(gathered);
    drop(kb), drop(vb), drop(lse_block);
    (void)out;
}

}  // namespace mst::sim
