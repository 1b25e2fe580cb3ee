// Memory rules of a Mixture-of-Experts block (Mixtral, Qwen3-MoE, gpt-oss) in both
// runtimes; the MLP's chunk loops (mlp.cpp) call them per mini-sequence.
//
// ---- hf runtime: MixtralSparseMoeBlock, Qwen3MoeSparseMoeBlock, GptOssMLP ----
//
// transformers 5's default experts path (integrations/moe.py, grouped_mm_experts_forward) on n
// tokens x [n, d], with E experts of intermediate size I, top_k = k and S = n k token-expert pairs:
//   router:  logits = x W_r^T [n, E] bf16; probs = softmax(logits.float()) [n, E] fp32;
//            w, idx = topk(probs, k) [n, k] fp32 / i64; w /= w.sum(-1, keepdim) (in place);
//            Qwen3-MoE then casts w to bf16.
//   experts: ids, perm = sort(idx.flatten()) [S] i64; xs = x[perm // k] [S, d];
//            ws = w.flatten()[perm] [S]; offsets = cumsum(histc(ids)) [E] i32;
//            gate_up = grouped_mm(xs, W_gu) [S, 2I]; m = silu(gate) * up [S, I];
//            o = grouped_mm(m, W_d) [S, d]; wo = o * ws[:, None] [S, d] (fp32 for Mixtral's fp32 w);
//            inv_perm [S] i64; y = wo[inv_perm].view(n, k, d).sum(1) [n, d], cast back to bf16.
// gpt-oss (GptOssMLP, its experts is_transposed with biases) differs in three places, a policy of
// each rule (MoeSpec::gpt_oss): its router is a biased linear whose top-k logits get a bf16 softmax
// [n, k] (no fp32 probabilities over all experts); each projection's bias rows are gathered per
// pair by the sorted expert ids ([S, 2I] and [S, d]) and added in place; its activation clamps the
// interleaved gate and up views and saves five [S, I] tensors (clamped gate, sigmoid, glu, up + 1,
// their product). Its block returns the router's weights with its output. Under autocast the router
// is an autocast linear (its bias's copy cached like the weight's) and the rest runs in fp32.
// Every size is fixed by n, k and E: none depends on how the tokens are routed, which is what
// lets the referee run it on fake tensors and the simulator predict it exactly.
//
// MsT for MoE (python/mst_hf's loop over [1, n, d] chunks of the tokens): every one of these
// tensors scales with the chunk's n, so the routing and dispatch buffers shrink by the chunk count
// in a no-grad forward and in backward (the saved ones, as for the dense MLP, still add up).
#include "builder.hpp"

#include <algorithm>

#include <span>
#include <utility>
#include <vector>

namespace mst::sim {

// ---- kernels runtime: a Mixture-of-Experts block (src/exec/executor_moe.cpp runs it) ----
// Per chunk of n tokens, S = n*k pairs: router logits [n, E] bf16 -> probs [n, E] fp32 (saved) ->
// top-k weights [n, k] fp32, experts and sorted rows [n, k] i64 (saved), offsets [E + 1] i64 ->
// x sorted [S, d] (saved by gate/up) -> g, u [S, Ie] (saved by the activation) -> m [S, Ie] (saved
// by down) -> y sorted [S, d] (saved by the combine) -> y's rows. No size depends on the routing.
//
// Expert parallelism (ep > 1), a policy of the same block: x sorted by expert is also sorted by
// the rank holding the expert, so it is the all-to-all's send buffer (then let go), and the
// experts run on what their rank received, R = expert_rows(S) rows [R, d] (saved by gate/up; its
// counts per expert, [E] int64, come to the host to size the GEMMs, which run on each (source
// rank, local expert) block of it: no permutation copy). g, u, m and the experts' outputs are
// [R, *]; the outputs go back by the second all-to-all into [S, d] (saved by the combine). Backward
// mirrors both exchanges: d y [S, d] -> [R, d] before the experts, d x [R, d] -> [S, d] after.
// With uniform routing R = S; moe_imbalance sizes the busiest rank's.

void StepBuilder::moe_chunk_forward(const LayerParams& lp, std::int64_t n, T& y, MlpChunk* keep, bool recompute) {
    const std::int64_t d = m_.hidden_size, E = m_.moe->experts, k = m_.moe->top_k, Ie = m_.moe->intermediate;
    const std::int64_t S = n * k, R = s_.expert_rows(S);
    const bool saves = !recompute, ep = s_.ep > 1;
    auto kept = [&](T t) { return !keep ? T{} : recompute ? hold(t) : saved(t); };

    at("moe.router");
    use_weight(lp.router);
    T logits = act("router_logits", bf16(n, E), false);
    T probs = act("router_probs", f32(n, E), saves);
    drop(logits);

    at("moe.route");
    T w = act("route_weights", f32(n, k), saves);
    T idx = act("route_experts", i64(n, k), saves);
    T pos = act("route_rows", i64(n, k), saves);
    T offsets = act("expert_offsets", i64(E + 1, 1), false);
    drop(offsets);
    if (keep) keep->probs = kept(probs), keep->idx = kept(idx);
    drop(probs), drop(idx);

    at("moe.gather");
    T xs = act("x_sorted", bf16(S, d), saves && !ep);
    if (ep) {
        at("moe.dispatch");  // the all-to-all to the experts' ranks
        T counts = act("received_counts", i64(E, 1), false);
        T received = act("x_received", bf16(R, d), saves);
        drop(counts);
        drop(xs);
        xs = received;
    }

    at("moe.gate_up");
    use_weight(lp.gate);
    use_weight(lp.up);
    T g = act("g", bf16(R, Ie), saves);
    T u = act("u", bf16(R, Ie), saves);
    if (keep) keep->xs = kept(xs);
    drop(xs);

    at("moe.act");
    T m = act("m", bf16(R, Ie), saves);
    if (keep) keep->g = kept(g), keep->u = kept(u);
    drop(g), drop(u);

    at("moe.down");
    use_weight(lp.down);
    T ys = act(ep ? "y_expert" : "y_sorted", bf16(R, d), saves && !ep);
    if (keep) keep->m = kept(m);
    drop(m);
    if (ep) {
        at("moe.return");  // the all-to-all back to the tokens' ranks
        T back = act("y_sorted", bf16(S, d), saves);
        drop(ys);
        ys = back;
    }

    if (!recompute) {
        at("moe.combine");
        if (!y.valid()) y = act("y", bf16(tokens_, d), m_.gemma());
    }
    if (keep) keep->ys = kept(ys), keep->w = kept(w), keep->pos = kept(pos), keep->tokens = n;
    drop(ys), drop(w), drop(pos);
}

void StepBuilder::moe_chunk_backward(const LayerParams& lp, MlpChunk& c, T& dh2) {
    const std::int64_t d = m_.hidden_size, E = m_.moe->experts, k = m_.moe->top_k, Ie = m_.moe->intermediate;
    const std::int64_t n = c.tokens, S = n * k, R = s_.expert_rows(S);
    const bool ep = s_.ep > 1;

    at("moe.combine");
    T dys = alloc("d_y_sorted", bf16(S, d), Category::Transient);
    T dw = alloc("d_route_weights", f32(n, k), Category::Transient);
    drop(c.ys), drop(c.w);
    if (ep) {
        at("moe.return");  // the outputs' gradients to the experts' ranks
        T received = alloc("d_y_expert", bf16(R, d), Category::Transient);
        drop(dys);
        dys = received;
    }

    at("moe.down");
    T dm = alloc("dm", bf16(R, Ie), Category::Transient);
    grad_write(lp.down);
    release_weight(lp.down);
    drop(c.m), drop(dys);

    at("moe.act");
    T dg = alloc("dg", bf16(R, Ie), Category::Transient);
    T du = alloc("du", bf16(R, Ie), Category::Transient);
    drop(dm), drop(c.g), drop(c.u);

    at("moe.gate_up");
    T dxs = alloc(ep ? "d_x_received" : "d_x_sorted", bf16(R, d), Category::Transient);
    grad_write(lp.gate);
    grad_write(lp.up);
    release_weight(lp.gate);
    release_weight(lp.up);
    drop(dg), drop(du), drop(c.xs);
    if (ep) {
        at("moe.dispatch");  // the inputs' gradients back to the tokens' ranks
        T back = alloc("d_x_sorted", bf16(S, d), Category::Transient);
        drop(dxs);
        dxs = back;
    }

    at("moe.gather");
    if (!dh2.valid()) dh2 = alloc("dh2", bf16(tokens_, d), Category::Transient);
    drop(dxs), drop(c.pos);

    at("moe.route");
    T dprobs = alloc("d_router_probs", f32(n, E), Category::Transient);
    drop(dw), drop(c.idx);

    at("moe.router");
    T dlogits = alloc("d_router_logits", bf16(n, E), Category::Transient);
    drop(dprobs), drop(c.probs);
    grad_write(lp.router);
    release_weight(lp.router);
    drop(dlogits);
}

T StepBuilder::hf_moe_forward(const LayerParams& lp, T x, std::int64_t n, HfMoe& c, bool stop_after_last_save,
                               std::span<T> earlier) {
    const MoeSpec& e = *m_.moe;
    const std::int64_t d = m_.hidden_size, E = e.experts, k = e.top_k, I = e.intermediate;
    const std::int64_t S = checked_mul(n, k, "tokens x top_k");
    // Bytes per element: routing weight; the experts' tensors (x's dtype: their grouped_mm has no
    // autocast policy, so under autocast they run on the fp32 stream with the fp32 weights); the
    // weighted outputs and their sum (the wider of the two).
    const int wb = e.fp32_routing_weights ? 4 : 2, xb = rb_, ob = std::max(wb, xb);
    c.tokens = n;

    // ZeRO-3: gpt-oss's router and experts are modules with hooks (Mixtral's and Qwen3-MoE's blocks are
    // leaves: the block's hooks, hf_mlp_forward's)
    const Z3Layer* z3 = z3_on_ && e.gpt_oss ? &z3_.layers[static_cast<std::size_t>(layer_)] : nullptr;
    at("moe.router");
    if (z3) z3_fetch(z3->router);
    T in = hf_linear_input(lp.router, lp.router_bias, x, n, d);
    T logits = act("router_logits", bf16(n, E), false);  // the block's `_` until it returns
    c.x_router = saved(in);
    drop(in);
    T weights, index;
    if (e.gpt_oss) {
        // GptOssTopKRouter: top-k of the bf16 logits (topk saves the indices), softmax over those k in
        // their dtype (saved): the routing weights.
        T top = act("top_k_logits", bf16(n, k), false);
        index = act("top_k_index", elems(n, k, 8), false);
        c.top_idx = saved(index);
        weights = act("top_k_weights", bf16(n, k), false);
        c.probs = saved(weights);
        drop(top);
        if (z3) z3_release(z3->router);
    } else {
        T logits32 = act("router_logits_fp32", f32(n, E), false);
        T probs = act("router_probs", f32(n, E), false);
        c.probs = saved(probs);
        drop(logits32);
        weights = act("top_k_weights", f32(n, k), false);
        index = act("top_k_index", elems(n, k, 8), false);
        c.top_idx = saved(index);
        if (e.normalize_top_k) {  // w /= w.sum(-1, keepdim=True): div_ saves the divisor and a copy of w
            T sum = act("top_k_sum", f32(n, 1), false);
            c.norm_sum = saved(sum);
            // The node's copy of w, held by it alone: made whenever autograd records (in a checkpoint's
            // first forward its pack hook lets go of it at once), not under no_grad (tiled experts).
            if (graph_) {
                T clone = act("top_k_weights_clone", f32(n, k), false);
                if (grad_) c.norm_self = clone;
                else drop(clone);
            }
            drop(sum);
        }
        if (!e.fp32_routing_weights) {  // Qwen3-MoE: router_top_value.to(router_logits.dtype) rebinds
            T cast = act("top_k_weights_bf16", bf16(n, k), false);
            drop(weights);
            weights = cast;
        }
        drop(probs);  // the router returns (logits, weights, index)
    }

    at("moe.experts");
    if (z3) z3_fetch(z3->experts);
    T ids_sorted = act("expert_ids_sorted", elems(S, 1, 8), false);
    T perm = act("perm", elems(S, 1, 8), false);
    T token_idx = act("token_idx", elems(S, 1, 8), false);  // perm // k, a temporary the gather saves
    c.token_idx = saved(token_idx);
    T xs = act("x_sorted", elems(S, d, xb), false);
    drop(token_idx);
    c.perm = saved(perm);
    T ws = act("w_sorted", elems(S, 1, wb), false);
    T hist_in = act("histc_input", elems(S, 1, 4), false);  // expert ids as f32 (CPU) or i32 (CUDA)
    T hist = act("tokens_per_expert", elems(E, 1, 4), false);
    T offsets = act("offsets", elems(E, 1, 4), false);
    // gpt-oss: each projection's bias rows for the sorted pairs, gathered by the sorted expert ids
    // (saved) and added to the GEMM's output in place.
    T bias_rows = e.gpt_oss ? act("gate_up_bias_rows", elems(S, 2 * I, xb), false) : T{};
    if (e.gpt_oss) c.ids_up = saved(ids_sorted);
    c.x_sorted = saved(xs), c.offs_up = saved(offsets), c.w_up = z3_saved_weight(lp.gate);
    T gate_up = act("gate_up", elems(S, 2 * I, xb), false);
    at("moe.act");
    T prod;
    if (e.gpt_oss) {
        // GptOssExperts._apply_gate: gate, up = gate_up[..., ::2], gate_up[..., 1::2] (views; each
        // clamp saves its input); g = gate.clamp(max=l); u = up.clamp(-l, l); glu = g * sigmoid(g * alpha);
        // (u + 1) * glu. u dies at return (the others are saved).
        T g = act("gate_clamped", elems(S, I, xb), false);
        c.gate_view = saved(gate_up);
        T u = act("up_clamped", elems(S, I, xb), false);
        c.up_view = saved(gate_up);
        T ga = act("gate_alpha", elems(S, I, xb), false);
        T sig = act("sigmoid", elems(S, I, xb), false);
        c.sig = saved(sig);
        drop(ga);
        T glu = act("glu", elems(S, I, xb), false);
        c.sig_mul = saved(sig), c.gate_c = saved(g);
        drop(sig);
        T up1 = act("up_plus_1", elems(S, I, xb), false);
        prod = act("gated", elems(S, I, xb), false);
        c.glu = saved(glu), c.up1 = saved(up1);
        drop(up1);
        drop(g), drop(u), drop(glu);  // the locals, at return
    } else {  // _apply_gate: gate, up = gate_up.chunk(2); act(gate) * up
        T s = act("silu", elems(S, I, xb), false);
        c.gate_view = saved(gate_up);
        prod = act("act_mul", elems(S, I, xb), false);
        c.up_view = saved(gate_up), c.s = saved(s);
        drop(s);  // act(gate), a temporary of the product
    }
    drop(gate_up);  // proj_out rebinds
    at("moe.experts");
    if (e.gpt_oss) {
        T down_rows = act("down_bias_rows", elems(S, d, xb), false);
        c.ids_down = saved(ids_sorted);
        drop(bias_rows);  // selected_biases rebinds
        bias_rows = down_rows;
    }
    c.prod = saved(prod), c.offs_down = saved(offsets), c.w_down = z3_saved_weight(lp.down);
    T down = act("down_out", elems(S, d, xb), false);
    drop(prod);  // proj_out rebinds
    c.down_out = saved(down), c.w_sorted = saved(ws);
    T weighted = act("weighted_out", elems(S, d, ob), false);
    T inv_perm = act("inv_perm", elems(S, 1, 8), false);
    T arange = act("arange", elems(S, 1, 8), false);  // inv_perm[perm] = arange, in place
    drop(arange);
    // Unwinding the experts' frame drops its locals in order, then the block's (the router's outputs).
    auto experts_return = [&](T restored, T sum, bool returns) {
        drop(ids_sorted), drop(perm), drop(xs), drop(ws), drop(hist_in), drop(hist), drop(offsets), drop(bias_rows), drop(down);
        drop(restored), drop(inv_perm), drop(sum);
        if (z3 && returns) z3_release(z3->experts);
        // GptOssMLP returns the router's weights with its output (the caller holds them); the
        // stopped recomputation unwinds them with the rest.
        if (e.gpt_oss && returns) hf_mlp_aux_ = hold(weights);
        drop(logits), drop(weights), drop(index);
    };
    c.inv_perm = saved(inv_perm);  // the layer's last save: a checkpoint's recomputation stops here
    if (stop_after_last_save) {
        // The stop unwinds the evaluation stacks first (the loop's list of earlier chunk outputs, last
        // first); the frames' locals go when the checkpoint has caught the stop, in the backward.
        for (auto it = earlier.rbegin(); it != earlier.rend(); ++it) drop(*it);
        hf_recomputation_stopped();
        experts_return(weighted, T{}, false);
        return T{};
    }
    T restored = act("weighted_out_restored", elems(S, d, ob), false);
    drop(weighted);  // weighted_out rebinds
    T sum = act("expert_sum", elems(n, d, ob), false);
    T y = sum;
    // Mixtral's .to(hidden_states.dtype): a copy when the sum is wider than the stream
    if (e.fp32_routing_weights && ob != xb) y = act("moe_out", elems(n, d, xb), false);
    else sum = T{};  // the same tensor, returned
    experts_return(restored, sum, true);
    return y;
}

// gpt-oss's clamped activation backward from the gradient of (u + 1) * glu (consumed) to
// gate_up's [S, 2I]. Nodes run last made first: the product's (glu's gradient, then u + 1's), glu =
// g * sig's (sig's, then g's), the sigmoid's, g * alpha's (added into g's in place), u + 1's (passes
// it on), each clamp's (where(in bounds, grad, 0): a zero scalar and a bool mask per bound), then the
// two strided views' SliceBackward0 (zeros of [S, 2I] with the share copied in; up's first, summed).
T StepBuilder::hf_gpt_oss_gate_backward(HfMoe& c, T gprod, std::int64_t S) {
    const std::int64_t I = m_.moe->intermediate;
    const int xb = rb_;
    const bytes_t half = elems(S, I, xb), mask = elems(S, I, 1);
    T gglu = alloc("d_glu", half, Category::Transient);
    T gup1 = alloc("d_up_plus_1", half, Category::Transient);
    node_end({&c.glu, &c.up1}, &gprod);
    T gsig = alloc("d_sigmoid", half, Category::Transient);
    T gg = alloc("d_gate_clamped", half, Category::Transient);
    node_end({&c.sig_mul, &c.gate_c}, &gglu);
    T galpha = alloc("d_gate_alpha", half, Category::Transient);  // SigmoidBackward0
    node_end({&c.sig}, &gsig);
    T gg2 = alloc("d_gate_clamped", half, Category::Transient);  // MulBackward0 (by alpha)
    node_end({}, &galpha);
    accumulate(gg, gg2, false);
    auto clamp_backward = [&](T& g, T& input, int bounds, const char* name) {
        T zero = alloc("zero", xb, Category::Transient);
        T m1 = alloc("in_bounds", mask, Category::Transient);
        T m2 = bounds == 2 ? alloc("in_bounds", mask, Category::Transient) : T{};
        T out = alloc(name, half, Category::Transient);
        drop(m2), drop(m1), drop(zero);
        node_end({&input}, &g);
        return out;
    };
    T gu = clamp_backward(gup1, c.up_view, 2, "d_up");
    T gga = clamp_backward(gg, c.gate_view, 1, "d_gate");
    T joined = alloc("d_gate_up", elems(S, 2 * I, xb), Category::Transient);
    node_end({}, &gu);
    T joined2 = alloc("d_gate_up", elems(S, 2 * I, xb), Category::Transient);
    node_end({}, &gga);
    accumulate(joined, joined2, false);
    return joined;
}

T StepBuilder::hf_moe_backward(const LayerParams& lp, HfMoe& c, T dy, bool last_use, WeightGradRef weight_grad) {
    const MoeSpec& e = *m_.moe;
    const std::int64_t d = m_.hidden_size, E = e.experts, k = e.top_k, I = e.intermediate, n = c.tokens;
    const std::int64_t S = checked_mul(n, k, "tokens x top_k");
    const int wb = e.fp32_routing_weights ? 4 : 2, xb = rb_, ob = std::max(wb, xb);  // as hf_moe_forward's
    const bool fp32 = e.fp32_routing_weights;

    const Z3Layer* z3 = z3_on_ && e.gpt_oss ? &z3_.layers[static_cast<std::size_t>(layer_)] : nullptr;
    at("moe.experts");
    if (z3) z3_fetch(z3->experts, false);
    T g = dy;
    if (fp32 && ob != xb) {  // ToCopyBackward0
        g = alloc("d_expert_sum", f32(n, d), Category::Transient);
        node_end({}, &dy);
    }
    // SumBackward0 expands the gradient over the k pairs of a token (a view, stride 0 over k); the
    // view(n, k, d)'s backward reshapes it to [n k, d], a copy unless n or k is 1 (then a view).
    T gw_out = g;
    if (n > 1 && k > 1) {
        gw_out = alloc("d_weighted_out_restored", elems(S, d, ob), Category::Transient);
        drop(g);
    }
    unpack();  // the restoring gather is the block's first node to unpack a saved tensor
    T zeros = alloc("zeros", elems(S, d, ob), Category::Transient);
    T gw_sorted_out = alloc("d_weighted_out", elems(S, d, ob), Category::Transient);  // index_put
    drop(zeros);
    node_end({&c.inv_perm}, &gw_out);
    // MulBackward0 (o * ws[:, None]): ws's gradient, then o's; validate_outputs casts o's to its
    // dtype (Mixtral's fp32 product of bf16 experts) and sums ws's over d.
    T gw_full = alloc("d_w_full", elems(S, d, ob), Category::Transient);
    T gdown = alloc("d_down_out", elems(S, d, ob), Category::Transient);
    T gw;
    node_end({&c.w_sorted, &c.down_out}, &gw_sorted_out, [&] {
        if (ob != xb) {
            T cast = alloc("d_down_out_bf16", elems(S, d, xb), Category::Transient);
            drop(gdown);
            gdown = cast;
        }
        gw = alloc("d_w_sorted", elems(S, 1, ob), Category::Transient);
        drop(gw_full);
        if (ob != wb) {  // Qwen3-MoE under autocast: its bf16 routing weights' gradient, cast
            T cast = alloc("d_w_sorted_bf16", elems(S, 1, wb), Category::Transient);
            drop(gw);
            gw = cast;
        }
    });
    // down's grouped_mm: the weight's gradient, then the input's; the weight's transpose node and
    // AccumulateGrad run next (created last).
    // gpt-oss: the in-place bias add hands the gradient to the GEMM and to the bias rows' gather,
    // whose IndexBackward0 (after the GEMM's node) accumulates the rows into zeros of the bias's shape.
    auto bias_grad = [&](int bias, T& ids, T& rows_grad) {
        const bytes_t bytes = checked_mul(params_[static_cast<std::size_t>(bias)].numel, pg_);
        T zeros_b = alloc("zeros", bytes, Category::Transient);
        T gb = grad_out(bias);
        drop(zeros_b);
        node_end({&ids}, &rows_grad);
        weight_grad(bias, gb);
    };
    T gdown_bias = e.gpt_oss ? hold(gdown) : T{};
    T gwd = grad_out(lp.down);
    T gprod = alloc("d_act_mul", elems(S, I, xb), Category::Transient);
    node_end({&c.w_down, &c.offs_down, &c.prod}, &gdown);
    weight_grad(lp.down, gwd);
    if (e.gpt_oss) bias_grad(lp.down_bias, c.ids_down, gdown_bias);
    at("moe.act");
    T joined = e.gpt_oss ? hf_gpt_oss_gate_backward(c, gprod, S) : T{};
    if (!e.gpt_oss) {
        T gup = alloc("d_up", elems(S, I, xb), Category::Transient);  // MulBackward0: up's, then act's
        T gs = alloc("d_silu", elems(S, I, xb), Category::Transient);
        node_end({&c.up_view, &c.s}, &gprod);
        T gg = alloc("d_gate", elems(S, I, xb), Category::Transient);  // SiluBackward0
        node_end({&c.gate_view}, &gs);
        joined = alloc("d_gate_up", elems(S, 2 * I, xb), Category::Transient);  // SplitBackward0
        node_end({}, &gg);
        drop(gup);
    }
    at("moe.experts");
    T gup_bias = e.gpt_oss ? hold(joined) : T{};
    T gwu = grad_out(lp.gate);
    T gxs = alloc("d_x_sorted", elems(S, d, xb), Category::Transient);
    node_end({&c.w_up, &c.offs_up, &c.x_sorted}, &joined);
    weight_grad(lp.gate, gwu);
    if (e.gpt_oss) bias_grad(lp.gate_bias, c.ids_up, gup_bias);
    // The two gathers in reverse creation order: the routing weights', then the hidden states'.
    zeros = alloc("zeros", elems(S, 1, wb), Category::Transient);
    T gws = alloc("d_w_flat", elems(S, 1, wb), Category::Transient);
    drop(zeros);
    node_end({&c.perm}, &gw);
    zeros = alloc("zeros", elems(n, d, xb), Category::Transient);
    T dx = alloc("d_x_moe", elems(n, d, xb), Category::Transient);
    drop(zeros);
    node_end({&c.token_idx}, &gxs);
    if (z3) {  // both inputs' gradients: the experts' post-backward; the router's output's gradient: its pre-backward
        z3_release(z3->experts, false);
        z3_fetch(z3->router, false);
    }

    at("moe.router");
    if (e.gpt_oss) {
        // SoftmaxBackward0 (over the top-k logits), TopkBackward0 (zeros [n, E], the gradient
        // scattered in), then the router's linear with its bias (AddmmBackward0: the input's
        // gradient, the weight's, the bias's; the accumulation nodes, bias first, then the input's
        // gradient joins the experts' in place).
        T gtop = alloc("d_top_k_logits", bf16(n, k), Category::Transient);
        node_end({&c.probs}, &gws);
        T zeros_r = alloc("zeros", bf16(n, E), Category::Transient);
        T glog = alloc("d_router_logits", bf16(n, E), Category::Transient);
        drop(zeros_r);
        node_end({&c.top_idx}, &gtop);
        if (z3) {
            // DeepSpeed's linear with its bias (zero3.cpp), its module's pre-backward already run. Both input
            // gradients come out of DeepSpeed's post-backward Functions (Python nodes), which autograd
            // never adds into in place: their sum is a new tensor.
            z3_linear_backward(lp.router, "d_x_router", bf16(n, d), {&c.x_router}, glog,
                               [&](T& gx) { accumulate(dx, gx, true); }, last_use, lp.router_bias, true);
            return dx;
        }
        T gxr = alloc("d_x_router", bf16(n, d), Category::Transient);
        if (amp_) {
            // Under autocast the GEMM's gradients are bf16. The bias's reaches its copy's cast node
            // first (the node's first edge; the buffer sums every chunk's); then the weight's and the
            // input's (hf_mm_outputs: the input's cast node makes it fp32 and it joins the experts'
            // in place); the bias copy's node runs last, handing on an fp32 gradient.
            T gwr = hf_mm_grad(lp.router);
            T gbr = hf_addmm_node_end(lp.router, lp.router_bias, {&c.x_router}, &glog);
            GradBuffer& bias_copy = params_[static_cast<std::size_t>(lp.router_bias)].cast_pending;
            buffer_add(bias_copy, gbr, true);
            const auto sink = [&](int p, T grad) { weight_grad(p, grad); };
            hf_mm_outputs(lp.router, gwr, last_use, sink, [] {}, [&] {
                gxr = hf_uncast(gxr);
                accumulate(dx, gxr, false);
            });
            if (last_use) {
                T f = grad_out(lp.router_bias);
                drop(bias_copy.sum);
                sink(lp.router_bias, f);
            }
            return dx;
        }
        T gwr = grad_out(lp.router);
        T gbr;
        node_end({&c.x_router}, &glog, [&] { gbr = grad_out(lp.router_bias); });
        // The node's outputs reach their buffers in its edges' order (the bias's AccumulateGrad, the
        // input's reshape, summed into the experts' gradient in place, the weight's transpose); then
        // the bias's node runs, then the transpose's hands the weight's on to its own.
        weight_grad(lp.router_bias, gbr, false);
        accumulate(dx, gxr, false);
        weight_grad.run(lp.router_bias);
        weight_grad(lp.router, gwr);
        return dx;
    }
    T gtop = gws;  // through reshape(-1)'s view
    if (!fp32) {   // ToCopyBackward0 of the bf16 routing weights
        gtop = alloc("d_top_k_weights", f32(n, k), Category::Transient);
        node_end({}, &gws);
    }
    if (e.normalize_top_k) {
        // DivBackward0 of w /= sum: the divisor's gradient -grad * ((w / sum) / sum) (its temporaries
        // die at the end of the expression, last first), then w's grad / sum; validate_outputs sums
        // the divisor's over k (when k > 1: [n, k] to [n, 1]). SumBackward0 then adds its expansion
        // into w's gradient in place.
        T a = alloc("div", f32(n, k), Category::Transient);
        T b = alloc("div", f32(n, k), Category::Transient);
        T neg = alloc("neg", f32(n, k), Category::Transient);
        T gsum = alloc("d_top_k_sum_full", f32(n, k), Category::Transient);
        drop(neg), drop(b), drop(a);
        T gself = alloc("d_top_k_weights", f32(n, k), Category::Transient);
        node_end({&c.norm_sum, &c.norm_self}, &gtop, [&] {
            if (k == 1) return;
            T reduced = alloc("d_top_k_sum", f32(n, 1), Category::Transient);
            drop(gsum);
            gsum = reduced;
        });
        drop(gsum);
        gtop = gself;
    }
    zeros = alloc("zeros", f32(n, E), Category::Transient);
    T gprobs = alloc("d_router_probs", f32(n, E), Category::Transient);  // TopkBackward0's scatter
    drop(zeros);
    node_end({&c.top_idx}, &gtop);
    T g32 = alloc("d_router_logits_fp32", f32(n, E), Category::Transient);  // SoftmaxBackward0
    node_end({&c.probs}, &gprobs);
    T glog = alloc("d_router_logits", bf16(n, E), Category::Transient);  // ToCopyBackward0
    node_end({}, &g32);
    if (z3_on_) {  // DeepSpeed's linear (zero3.cpp): the input's gradient first, joining the experts' in place
        z3_linear_backward(lp.router, "d_x_router", bf16(n, d), {&c.x_router}, glog, [&](T& gx) { accumulate(dx, gx, false); },
                           last_use);
        return dx;
    }
    // The router's 2-D linear (MmBackward0): the weight's gradient, then the input's; its transpose
    // node runs before the input's reshape node, whose gradient joins the experts' in place.
    T gwr = hf_mm_grad(lp.router);
    T gxr = alloc("d_x_router", bf16(n, d), Category::Transient);
    hf_mm_node_end(lp.router, {&c.x_router}, &glog);
    hf_mm_outputs(
        lp.router, gwr, last_use, [&](int p, T w) { weight_grad(p, w); }, [] {}, [&] { gxr = hf_uncast(gxr); });
    accumulate(dx, gxr, false);
    return dx;
}

}  // namespace mst::sim
