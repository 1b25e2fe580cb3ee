// The executor's Mixture-of-Experts block (Mixtral, Qwen3-MoE, gpt-oss) on one mini-sequence of n tokens:
// router -> fp32 softmax -> top-k (and the pairs sorted by expert) -> gather -> each expert's
// gate/up GEMM on its rows -> activation -> down GEMM -> weighted combine. Every size is n, k,
// E, d and Ie, never a routing count: what lands on which expert changes the GEMMs' row blocks,
// not one allocation, so the step's memory does not depend on the routing (the simulator's rule,
// src/core/sim/mlp.cpp, has no data). The row blocks' sizes come to the host once per chunk
// (E + 1 int64) to size the GEMMs.
//
// Shapes: x [T, d]; logits [n, E] bf16, probs [n, E] fp32; w [n, k] fp32; idx, pos [n, k] int64;
// offsets [E + 1] int64; xs, ys [n*k, d]; g, u, m [n*k, Ie]. Expert e's weights are row blocks of
// the stacked parameters: gate, up [E*Ie, d], down [E*d, Ie].
// gpt-oss, as policies of the same block: the router and every expert projection add their bias
// (stored after the stacked weights, expert e's at rows e*out ..); top-k of the softmax over all
// experts, renormalised, is its softmax over the top-k logits; the activation is its clamped
// SwiGLU (GatedAct::GptOss), which saves the same g and u. No tensor differs in size.
#include "executor.hpp"

namespace mst::exec {

void Step::moe_chunk_forward(const LayerParams& lp, const Ten& hin, std::int64_t row0, std::int64_t n, Ten& y,
                             MlpChunk* keep, bool recompute) {
    const std::int64_t d = m_.hidden_size, E = m_.moe->experts, k = m_.moe->top_k, Ie = m_.moe->intermediate;
    const std::int64_t pairs = n * k;
    // What backward needs: saved activations under autograd; the tiled backward's recomputation
    // keeps the same tensors as transients of its chunk.
    auto kept = [&](const Ten& t) { return !keep ? Ten{} : recompute ? t : saved(t); };
    const bool saves = !recompute;

    at("moe.router");
    const Tensor wr = use_weight(lp.router);
    Ten logits = act("router_logits", n * E, act_, false);
    linear_forward(logits.t(), hin.at(row0 * d), lp.router, wr, n, d, E);
    Ten probs = act("router_probs", n * E, DType::F32, saves);  // saved by the softmax
    b_.softmax_forward(probs.f32(), logits.t(), n, E);
    drop(logits);

    at("moe.route");
    Ten w = act("route_weights", pairs, DType::F32, saves);  // saved by the combine
    Ten idx = alloc_i64("route_experts", pairs, saves);     // saved by the top-k
    Ten pos = alloc_i64("route_rows", pairs, saves);        // saved by the gather and the combine
    Ten offsets = alloc_i64("expert_offsets", E + 1, false);
    b_.moe_route(w.f32(), idx.i64(), pos.i64(), offsets.i64(), probs.f32(), n, E, k, normalize_);
    std::vector<std::int64_t> rows(static_cast<std::size_t>(E + 1));
    b_.copy(rows.data(), offsets.i64(), rows.size() * sizeof(std::int64_t));
    drop(offsets);
    if (keep) keep->probs = kept(probs), keep->idx = kept(idx);
    drop(probs), drop(idx);

    at("moe.gather");
    Ten xs = act("x_sorted", pairs * d, act_, saves);  // saved by the experts' gate/up
    b_.moe_gather(xs.t(), hin.at(row0 * d), pos.i64(), n, k, d);

    at("moe.gate_up");
    const Tensor wg = use_weight(lp.gate), wu = use_weight(lp.up);
    Ten g = act("g", pairs * Ie, act_, saves);
    Ten u = act("u", pairs * Ie, act_, saves);
    for (std::int64_t e = 0; e < E; ++e) {
        const std::int64_t r0 = rows[static_cast<std::size_t>(e)], r = rows[static_cast<std::size_t>(e) + 1] - r0;
        if (r == 0) continue;
        linear_forward(g.at(r0 * Ie), xs.at(r0 * d), lp.gate, wg, r, d, Ie, e * Ie);
        linear_forward(u.at(r0 * Ie), xs.at(r0 * d), lp.up, wu, r, d, Ie, e * Ie);
    }
    if (keep) keep->xs = kept(xs);
    drop(xs);

    at("moe.act");
    Ten m = act("m", pairs * Ie, act_, saves);
    b_.swiglu_forward(m.t(), g.t(), u.t(), pairs * Ie, gated_);
    if (keep) keep->g = kept(g), keep->u = kept(u);
    drop(g), drop(u);

    at("moe.down");
    const Tensor wd = use_weight(lp.down);
    Ten ys = act("y_sorted", pairs * d, act_, saves);  // saved by the combine (its weights' gradient)
    for (std::int64_t e = 0; e < E; ++e) {
        const std::int64_t r0 = rows[static_cast<std::size_t>(e)], r = rows[static_cast<std::size_t>(e) + 1] - r0;
        if (r > 0) linear_forward(ys.at(r0 * d), m.at(r0 * Ie), lp.down, wd, r, Ie, d, e * d);
    }
    if (keep) keep->m = kept(m);
    drop(m);

    if (!recompute) {
        at("moe.combine");
        if (!y) y = act("y", T_ * d, act_, gemma_);  // as the dense block's
        b_.moe_combine(y.at(row0 * d), ys.t(), w.f32(), pos.i64(), n, k, d, false);
    }
    if (keep) {
        keep->ys = kept(ys), keep->w = kept(w), keep->pos = kept(pos);
        keep->rows = std::move(rows), keep->row0 = row0, keep->tokens = n;
    }
    drop(ys), drop(w), drop(pos);
}

void Step::moe_chunk_backward(const LayerParams& lp, MlpChunk& c, const Ten& h2, const Ten& dy, Ten& dh2) {
    const std::int64_t d = m_.hidden_size, E = m_.moe->experts, k = m_.moe->top_k, Ie = m_.moe->intermediate;
    const std::int64_t n = c.tokens, row0 = c.row0, pairs = n * k;
    auto expert_rows = [&](std::int64_t e) {
        const std::int64_t r0 = c.rows[static_cast<std::size_t>(e)];
        return std::pair{r0, c.rows[static_cast<std::size_t>(e) + 1] - r0};
    };

    at("moe.combine");
    Ten dys = alloc("d_y_sorted", pairs * d, act_, Category::Transient);
    Ten dw = alloc("d_route_weights", pairs, DType::F32, Category::Transient);
    b_.moe_combine_backward(dys.t(), dw.f32(), dy.at(row0 * d), c.ys.t(), c.w.f32(), c.pos.i64(), n, k, d);
    drop(c.ys), drop(c.w);

    at("moe.down");
    Ten dm = alloc("dm", pairs * Ie, act_, Category::Transient);
    const Tensor wd = backward_weight(lp.down);
    for (std::int64_t e = 0; e < E; ++e) {
        const auto [r0, r] = expert_rows(e);
        if (r == 0) continue;
        b_.linear_backward_input(dm.at(r0 * Ie), dys.at(r0 * d), offset(wd, e * d * Ie), r, Ie, d);
        linear_weight_grad(lp.down, dys.at(r0 * d), c.m.at(r0 * Ie), r, Ie, d, e * d);
    }
    release_weight(lp.down);
    drop(c.m), drop(dys);

    at("moe.act");
    Ten dg = alloc("dg", pairs * Ie, act_, Category::Transient);
    Ten du = alloc("du", pairs * Ie, act_, Category::Transient);
    b_.swiglu_backward(dg.t(), du.t(), dm.t(), c.g.t(), c.u.t(), pairs * Ie, gated_);
    drop(dm), drop(c.g), drop(c.u);

    at("moe.gate_up");
    Ten dxs = alloc("d_x_sorted", pairs * d, act_, Category::Transient);
    const Tensor wg = backward_weight(lp.gate), wu = backward_weight(lp.up);
    for (std::int64_t e = 0; e < E; ++e) {
        const auto [r0, r] = expert_rows(e);
        if (r == 0) continue;
        b_.linear_backward_input(dxs.at(r0 * d), dg.at(r0 * Ie), offset(wg, e * Ie * d), r, d, Ie);
        b_.linear_backward_input(dxs.at(r0 * d), du.at(r0 * Ie), offset(wu, e * Ie * d), r, d, Ie, true);
        linear_weight_grad(lp.gate, dg.at(r0 * Ie), c.xs.at(r0 * d), r, d, Ie, e * Ie);
        linear_weight_grad(lp.up, du.at(r0 * Ie), c.xs.at(r0 * d), r, d, Ie, e * Ie);
    }
    release_weight(lp.gate), release_weight(lp.up);
    drop(dg), drop(du), drop(c.xs);

    at("moe.gather");  // its backward sums each token's k rows
    if (!dh2) dh2 = alloc("dh2", T_ * d, act_, Category::Transient);
    b_.moe_combine(dh2.at(row0 * d), dxs.t(), nullptr, c.pos.i64(), n, k, d, false);
    drop(dxs), drop(c.pos);

    at("moe.route");
    Ten dprobs = alloc("d_router_probs", n * E, DType::F32, Category::Transient);
    b_.moe_route_backward(dprobs.f32(), dw.f32(), c.probs.f32(), c.idx.i64(), n, E, k, normalize_);
    drop(dw), drop(c.idx);

    at("moe.router");
    Ten dlogits = alloc("d_router_logits", n * E, act_, Category::Transient);
    b_.softmax_backward(dlogits.t(), dprobs.f32(), c.probs.f32(), n, E);
    drop(dprobs), drop(c.probs);
    b_.linear_backward_input(dh2.at(row0 * d), dlogits.t(), backward_weight(lp.router), n, d, E, true);
    linear_weight_grad(lp.router, dlogits.t(), h2.at(row0 * d), n, d, E);
    release_weight(lp.router);
    drop(dlogits);
}

}  // namespace mst::exec
