// Memory rules of the MLP block (gate/up -> act(gate) * up -> down), unchunked and
// as MsT mini-sequences.
//
// Shapes: h2 [T, d] (T = tokens per rank), g, u, m [n, I] per chunk of n tokens,
// y [T, d]. Chunks come from chunk_sizes(): sizes differ by at most one token.
//
//  * M = 1 is the plain block: g, u (saved by the activation), m (saved by down),
//    h2 (saved by gate/up).
//  * Loop (MsT reference): the same ops per chunk under autograd, writing into one
//    y. Every chunk's g, u, m stay saved until backward, so saved bytes equal M = 1;
//    what shrinks by M is the no-grad forward of a checkpointed layer and the
//    backward's gradient temporaries (dm, dg, du).
//  * Tiled (DeepSpeed ALST TiledMLP): forward per chunk without autograd, saving
//    only h2; backward recomputes each chunk's g, u, m, then runs its backward.
// A Mixture-of-Experts block runs in the same chunk loops; its rules per chunk are in moe.cpp.
#include "builder.hpp"

#include <algorithm>
#include <array>
#include <utility>
#include <vector>

namespace mst::sim {

void StepBuilder::mlp_chunk_forward(const LayerParams& lp, std::int64_t n, T& y, MlpChunk* keep) {
    if (m_.moe) return moe_chunk_forward(lp, n, y, keep);
    const std::int64_t d = m_.hidden_size, I = m_.intermediate_size;
    at("mlp.gate_up");
    use_weight(lp.gate);
    use_weight(lp.up);
    T g = act("g", bf16(n, I), true);
    T u = act("u", bf16(n, I), true);
    at("mlp.act");
    T m = act("m", bf16(n, I), true);
    if (keep) {
        keep->g = saved(g);
        keep->u = saved(u);
    }
    drop(g), drop(u);
    at("mlp.down");
    use_weight(lp.down);
    if (!y.valid()) y = act("y", bf16(tokens_, d), m_.gemma());
    if (keep) {
        keep->m = saved(m);
        keep->tokens = n;
    }
    drop(m);
}

T StepBuilder::mlp_forward(int l, T h2, LayerSaved& sv) {
    const LayerParams& lp = layer_params_[static_cast<std::size_t>(l)];
    T hin = cast_for_matmul(h2, m_.hidden_size);
    T y;
    if (s_.mlp_chunks > 1 && s_.mlp_impl == MlpImpl::Tiled) {
        sv.h2 = saved(hin);
        NoGrad no_grad(*this);
        for (std::int64_t n : transient_chunks(s_.mlp_chunks)) mlp_chunk_forward(lp, n, y, nullptr);
    } else {
        for (std::int64_t n : chunk_sizes(tokens_, s_.mlp_chunks)) {
            MlpChunk c;
            mlp_chunk_forward(lp, n, y, &c);
            sv.h2 = saved(hin);  // each chunk's gate/up saves (a view of) h2
            if (grad_) sv.mlp.push_back(c);
        }
    }
    drop(hin);
    return y;
}

T StepBuilder::mlp_backward(int l, LayerSaved& sv, T dy) {
    (void)dy;  // read chunk by chunk, not owned
    const LayerParams& lp = layer_params_[static_cast<std::size_t>(l)];
    const std::int64_t d = m_.hidden_size, I = m_.intermediate_size;
    T dh2;
    // One chunk's backward from its g, u, m; dh2 is written slice by slice.
    auto chunk_backward = [&](std::int64_t n, T& g, T& u, T& m) {
        at("mlp.down");
        T dm = alloc("dm", bf16(n, I), Category::Transient);
        grad_write(lp.down);
        release_weight(lp.down);
        drop(m);
        at("mlp.act");
        T dg = alloc("dg", bf16(n, I), Category::Transient);
        T du = alloc("du", bf16(n, I), Category::Transient);
        drop(dm), drop(g), drop(u);
        at("mlp.gate_up");
        if (!dh2.valid()) dh2 = alloc("dh2", bf16(tokens_, d), Category::Transient);
        grad_write(lp.gate);
        grad_write(lp.up);
        release_weight(lp.gate);
        release_weight(lp.up);
        drop(dg), drop(du);
    };

    if (m_.moe && s_.mlp_chunks > 1 && s_.mlp_impl == MlpImpl::Tiled) {
        for (std::int64_t n : transient_chunks(s_.mlp_chunks)) {  // each chunk's block again, then its backward
            MlpChunk c;
            T none;
            moe_chunk_forward(lp, n, none, &c, /*recompute=*/true);
            moe_chunk_backward(lp, c, dh2);
        }
        drop(sv.h2);
        clear_autocast_cache();  // the backward's own autocast region ends
    } else if (m_.moe) {
        for (auto it = sv.mlp.rbegin(); it != sv.mlp.rend(); ++it) {
            moe_chunk_backward(lp, *it, dh2);
            T h = sv.h2;
            drop(h);
        }
        sv.mlp.clear();
        sv.h2 = T{};
    } else if (s_.mlp_chunks > 1 && s_.mlp_impl == MlpImpl::Tiled) {
        for (std::int64_t n : transient_chunks(s_.mlp_chunks)) {
            at("mlp.recompute");
            use_weight(lp.gate);
            use_weight(lp.up);
            T g = alloc("g", bf16(n, I), Category::Transient);
            T u = alloc("u", bf16(n, I), Category::Transient);
            T m = alloc("m", bf16(n, I), Category::Transient);
            use_weight(lp.down);
            chunk_backward(n, g, u, m);
        }
        drop(sv.h2);
        clear_autocast_cache();  // the backward's own autocast region ends
    } else {
        // Autograd runs the chunks' backward in reverse creation order.
        for (auto it = sv.mlp.rbegin(); it != sv.mlp.rend(); ++it) {
            chunk_backward(it->tokens, it->g, it->u, it->m);
            T h = sv.h2;
            drop(h);
        }
        sv.mlp.clear();
        sv.h2 = T{};
    }
    for (int p : {lp.down, lp.gate, lp.up, lp.router})
        if (p >= 0) grad_done(p);
    return uncast_grad(dh2, d);
}

}  // namespace mst::sim

// ---- hf runtime: LlamaMLP (down(act(gate(x)) * up(x))) and python/mst_hf's mini-sequences ----
//
// Per chunk of n tokens: g = gate(x) [n, I] (saved by act), s = act(g) (saved by the product),
// u = up(x) (saved by the product), m = s * u (saved by down), y = down(m) [n, d].
// Loop (mst_hf.mlp.loop_mlp, MsT): each chunk under autograd, the outputs held by a list until
// torch.cat joins them [T, d]. Unchunked, it is the loop's single chunk without the cat.
// Tiled (mst_hf.mlp.tiled_mlp, ALST): an autograd Function that saves only its input and runs
// the chunks without autograd into one preallocated output; its backward replays each chunk
// with autograd and runs a nested torch.autograd.grad over it.

namespace mst::sim {

// One chunk of n tokens of the block input x through gate, the activation, up and their product,
// which it returns for down_proj; what each node saves goes into c (nothing without autograd).
T StepBuilder::hf_mlp_chunk_forward(const LayerParams& lp, T x, std::int64_t n, HfMlpChunk& c) {
    const std::int64_t I = m_.intermediate_size;
    c.tokens = n;
    if (m_.fused_projections()) {
        // Phi3MLP: gate, up = gate_up_proj(x).chunk(2); up * act(gate). Both halves are views of
        // one [n, 2I] output: the activation saves gate, the product saves up and act(gate).
        at("mlp.gate_up");
        z3_fetch_of(lp.gate);
        T in = hf_linear_input(lp.gate, -1, x, n, m_.hidden_size);
        T gate_up = act("gate_up", bf16(n, 2 * I), false);
        c.x_gate = saved(in);
        drop(in);
        z3_release_of(lp.gate);
        at("mlp.act");
        if (z3_on_) z3_fetch(z3_.layers[static_cast<std::size_t>(layer_)].act);
        T s = act("s", bf16(n, I), false);
        c.g = saved(gate_up);
        T m = act("m", bf16(n, I), false);
        c.u = saved(gate_up), c.s = saved(s);
        drop(s);
        at("mlp.down");
        z3_fetch_of(lp.down);
        use_weight(lp.down);
        z3_alias(lp.down);
        c.m = saved(m);
        c.gate_view = gate_up;  // the local `gate`, until the forward returns
        return m;
    }
    at("mlp.gate_up");
    z3_fetch_of(lp.gate);
    T in = hf_linear_input(lp.gate, -1, x, n, m_.hidden_size);  // (autocast: each projection casts x)
    T g = act("g", bf16(n, I), false);
    c.x_gate = saved(in);
    drop(in);
    z3_release_of(lp.gate);
    at("mlp.act");
    if (z3_on_) z3_fetch(z3_.layers[static_cast<std::size_t>(layer_)].act);
    T s = act("s", bf16(n, I), false);
    c.g = saved(g);
    drop(g);
    at("mlp.gate_up");
    z3_fetch_of(lp.up);
    in = hf_linear_input(lp.up, -1, x, n, m_.hidden_size);  // (the tiled replay's leaf x: gate's copy)
    T u = act("u", bf16(n, I), false);
    c.x_up = saved(in);
    drop(in);
    z3_release_of(lp.up);
    at("mlp.act");
    T m = act("m", bf16(n, I), false);
    c.s = saved(s), c.u = saved(u);
    drop(s), drop(u);
    at("mlp.down");
    z3_fetch_of(lp.down);
    use_weight(lp.down);
    z3_alias(lp.down);
    c.m = saved(m);
    return m;
}

// One chunk's backward in autograd's order (down, the product, up, the activation, gate; Phi-3:
// down, the product, the activation, the split, gate_up); dy, the chunk output's gradient, is
// consumed. Each weight's gradient goes to weight_grad(param, grad) as its node finishes, gate's
// after the input's two gradients are summed (a node's outputs reach their buffers in order:
// input, weight). Returns the chunk input's gradient; view_sum: up's input gradient is a view of
// its GEMM's output (the unchunked block), so the sum is a new tensor.
T StepBuilder::hf_mlp_chunk_backward(const LayerParams& lp, HfMlpChunk& c, T& dy, bool view_sum, bool last_use,
                                     WeightGradRef weight_grad) {
    if (z3_on_) return z3_mlp_backward(lp, c, dy, last_use);
    const std::int64_t d = m_.hidden_size, I = m_.intermediate_size, n = c.tokens;
    // Under autocast the tiled MLP's replay casts its input (a leaf) once: gate and up share the
    // copy, whose cast node sums both input gradients (bf16) before making them fp32.
    const bool shared_cast = amp_ && c.x_up.valid() && c.x_up.id == c.x_gate.id;
    const auto sink = [&](int p, T g) { weight_grad(p, g); };
    const auto keep = [](T&) {};  // the input's gradient goes on as the returned tensor
    at("mlp.down");
    T gwd = hf_mm_grad(lp.down);
    T gm = alloc("d_m", bf16(n, I), Category::Transient);
    hf_mm_node_end(lp.down, {&c.m}, &dy);
    hf_mm_outputs(lp.down, gwd, gm, false, last_use, sink, keep);
    if (m_.fused_projections()) {
        T joined = hf_fused_act_backward(c, gm);
        T gw = hf_mm_grad(lp.gate);
        T dx = alloc("d_x_gate_up", bf16(n, d), Category::Transient);
        hf_mm_node_end(lp.gate, {&c.x_gate}, &joined);
        hf_mm_outputs(lp.gate, gw, dx, amp_, last_use, sink, keep);
        return dx;
    }
    at("mlp.act");
    T gu = alloc("d_u", bf16(n, I), Category::Transient);
    T gs = alloc("d_s", bf16(n, I), Category::Transient);
    node_end({&c.u, &c.s}, &gm);
    at("mlp.gate_up");
    T gwu = hf_mm_grad(lp.up);
    T dxc = alloc("d_x_up", bf16(n, d), Category::Transient);
    hf_mm_node_end(lp.up, {&c.x_up}, &gu);
    hf_mm_outputs(lp.up, gwu, dxc, amp_ && !shared_cast, last_use, sink, keep);
    at("mlp.act");
    T gg = alloc("d_g", bf16(n, I), Category::Transient);
    node_end({&c.g}, &gs);
    at("mlp.gate_up");
    T gwg = hf_mm_grad(lp.gate);
    T dxg = alloc("d_x_gate", bf16(n, d), Category::Transient);
    hf_mm_node_end(lp.gate, {&c.x_gate}, &gg);
    if (shared_cast)
        hf_mm_outputs(
            lp.gate, gwg, last_use, sink, [&] { accumulate(dxc, dxg, false); }, [&] { dxc = hf_uncast(dxc); });
    else
        hf_mm_outputs(lp.gate, gwg, dxg, amp_, last_use, sink, [&](T& g) { accumulate(dxc, g, view_sum && !amp_); });
    return dxc;
}

// MulBackward0 (up * act(gate)): act's gradient, then up's; (ZeRO-3: the activation module's
// pre-backward fetch;) SiluBackward0 lets go of the last view of gate_up's output; SplitBackward0 joins
// the halves' gradients into [n, 2I].
T StepBuilder::hf_fused_act_backward(HfMlpChunk& c, T& gm) {
    const std::int64_t I = m_.intermediate_size, n = c.tokens;
    at("mlp.act");
    T gs = alloc("d_s", bf16(n, I), Category::Transient);
    T gu = alloc("d_u", bf16(n, I), Category::Transient);
    node_end({&c.s, &c.u}, &gm);
    if (z3_on_) z3_fetch(z3_.layers[static_cast<std::size_t>(layer_)].act, false);
    T gg = alloc("d_g", bf16(n, I), Category::Transient);
    node_end({&c.g}, &gs);
    at("mlp.gate_up");
    T joined = alloc("d_gate_up", bf16(n, 2 * I), Category::Transient);
    node_end({}, &gg);
    drop(gu);
    return joined;
}

// One chunk of n tokens of x through the whole block (the dense MLP, or the experts), returning its
// output [n, d]; what its nodes save goes into c (dense) or e (MoE), or nowhere when null. With
// stop_after_last_save a checkpoint's recomputation stops at the block's last save: invalid is
// returned once the unwinding has dropped the evaluation stack (`earlier`: the chunk outputs the
// loop's list holds) and what the block's own frames hold then (dense: the call's argument; MoE:
// every local of its frames, in the backward that asked for the recomputation).
T StepBuilder::hf_block_chunk_forward(const LayerParams& lp, T x, std::int64_t n, HfMlpChunk* c, HfMoe* e,
                                      bool stop_after_last_save, std::span<T> earlier) {
    if (m_.moe) {
        HfMoe unsaved;
        T y = hf_moe_forward(lp, x, n, e ? *e : unsaved, stop_after_last_save, earlier);
        // python/mst_hf's chunk loops keep a block's output only (gpt-oss's tuple dies at once)
        if (s_.mlp_chunks > 1) drop(hf_mlp_aux_);
        return y;
    }
    HfMlpChunk unsaved;
    HfMlpChunk& chunk = c ? *c : unsaved;
    T m = hf_mlp_chunk_forward(lp, x, n, chunk);
    if (stop_after_last_save) {
        // down_proj's save of m: the unwinding frees the evaluation stack (the call's argument, the
        // chunks' outputs so far, last first) while the recomputation still runs. (ZeRO-3's linear
        // is an autograd Function, which saves after its forward has made the output.)
        if (z3_on_) {
            T y = act("y", bf16(n, m_.hidden_size), false);
            drop(y);
        }
        drop(m), drop(chunk.gate_view);
        for (auto it = earlier.rbegin(); it != earlier.rend(); ++it) drop(*it);
        return T{};
    }
    T y = act("y", bf16(n, m_.hidden_size), false);
    z3_release_of(lp.down);
    drop(m), drop(chunk.gate_view);  // the forward's locals, at return
    return y;
}

T StepBuilder::hf_mlp_forward(const LayerParams& lp, T h2, HfLayer& sv, bool stop_after_last_save) {
    const std::int64_t d = m_.hidden_size;
    const bool chunked = s_.mlp_chunks > 1;
    sv.mlp.clear(), sv.moe.clear();
    if (chunked && s_.mlp_impl == MlpImpl::Tiled) {
        at("mlp.tiled");
        if (z3_on_) z3_fetch(z3_.layers[static_cast<std::size_t>(layer_)].mlp);
        T y;
        {
            NoGrad no_grad(*this);  // a Function's forward runs without autograd
            const std::vector<std::int64_t> sizes = chunk_sizes(tokens_, s_.mlp_chunks);
            for (std::size_t i = 0; i < sizes.size(); ++i) {
                const std::int64_t n = sizes[i];
                // From the second chunk on, an iteration frees all it allocates (the first makes the
                // output, and under autocast the weights' copies): a dense one of the same size repeats.
                // (Not under ZeRO-3, whose hooks' gathers depend on the coordinator's state.)
                if (!m_.moe && !z3_on_ && i >= 2 && n == sizes[i - 1] && fold_iteration()) continue;
                loop_iteration();
                T part = hf_block_chunk_forward(lp, h2, n, nullptr, nullptr, false, {});
                at("mlp.tiled");
                if (!y.valid()) y = act("y", elems(tokens_, d, hf_mlp_out_bytes()), false);  // part.new_empty((T, d))
                drop(part);  // copied into its rows
            }
            loop_end();
        }
        // ctx.save_for_backward(x) takes effect as the Function returns: the layer's last saved
        // tensor, where checkpointing's recomputation stops (the output dies unwinding).
        sv.x_tiled = saved(h2);
        if (stop_after_last_save) {
            drop(y);
            return T{};
        }
        return y;
    }
    // The block (one chunk), or python/mst_hf's loop: the chunks' outputs in a list torch.cat joins.
    if (z3_on_) z3_fetch(z3_.layers[static_cast<std::size_t>(layer_)].mlp);
    std::vector<T>& outs = hf_chunk_outputs_;
    outs.clear();
    const std::vector<std::int64_t> sizes = chunk_sizes(tokens_, s_.mlp_chunks);
    for (std::size_t i = 0; i < sizes.size(); ++i) {
        const bool stop = stop_after_last_save && i + 1 == sizes.size();
        T y = hf_block_chunk_forward(lp, h2, sizes[i], m_.moe ? nullptr : &sv.mlp.emplace_back(),
                                     m_.moe ? &sv.moe.emplace_back() : nullptr, stop, outs);
        if (!y.valid()) return T{};
        outs.push_back(y);
    }
    T y = outs.back();
    if (chunked) {
        at("mlp.cat");
        y = act("y", elems(tokens_, d, hf_mlp_out_bytes()), false);
        for (auto it = outs.rbegin(); it != outs.rend(); ++it) drop(*it);  // the list dies, last item first
    }
    if (z3_leaf_block()) z3_release(z3_.layers[static_cast<std::size_t>(layer_)].mlp);  // (a leaf: its post-forward hook)
    return y;
}

// dy: the block output's gradient (consumed); returns the input's gradient. Autograd runs the
// chunks' nodes in reverse creation order. Unchunked, the input is [B, S, d] and each linear's
// input gradient is a view of its GEMM's output (the sum of gate's and up's is a new tensor);
// a chunk is a [n, d] slice (no view on the way: summed in place), whose SliceBackward0 makes a
// zero-filled [T, d] gradient with the chunk copied in (the chunks' are summed in place). Each
// weight's gradients wait in its AccumulateGrad node's buffer until the last chunk's arrives.
T StepBuilder::hf_mlp_backward(const LayerParams& lp, HfLayer& sv, T dy) {
    const std::int64_t d = m_.hidden_size;
    const bool chunked = s_.mlp_chunks > 1;
    if (chunked && s_.mlp_impl == MlpImpl::Tiled) return z3_on_ ? z3_tiled_mlp_backward(lp, sv, dy) : hf_tiled_mlp_backward(lp, sv, dy);
    const std::size_t chunks = m_.moe ? sv.moe.size() : sv.mlp.size();
    std::vector<T> views;  // CatBackward0: one narrow view of dy per chunk
    if (chunked) {
        for (std::size_t i = 0; i < chunks; ++i) views.push_back(hold(dy));
        drop(dy);
    } else {
        views.push_back(dy);
    }
    T dx;
    for (std::size_t i = chunks; i-- > 0;) {
        const bool last = i == 0;  // the chunk whose weight gradients let AccumulateGrad run
        // (a gradient through an autocast copy's node is fp32, not a view of a GEMM's output)
        // (gpt-oss's experts' weights are used as they are stored, not transposed: their gradients
        // and the bias gathers' are tensors of their own; the router's are views: its weight's a
        // transpose, its bias's the [1, E] sum seen as [E])
        auto accumulate_grad = [&](int p, T g, bool run) {
            const bool own = m_.moe && m_.moe->gpt_oss && p != lp.router && p != lp.router_bias;
            if (g.valid()) add_grad(p, g, !params_[static_cast<std::size_t>(p)].cast && !own, false);
            if (run && last) accumulate_grad_run(p);
        };
        T dxc = m_.moe ? hf_moe_backward(lp, sv.moe[i], views[i], last, accumulate_grad)
                       : hf_mlp_chunk_backward(lp, sv.mlp[i], views[i], !chunked, last, accumulate_grad);
        if (!chunked) {
            dx = dxc;
            break;
        }
        at("mlp.chunk");
        T full = alloc("d_x_chunk", res(tokens_, d), Category::Transient);  // SliceBackward0
        node_end({}, &dxc);
        if (dx.valid()) accumulate(dx, full, false);
        else dx = full;
    }
    sv.mlp.clear(), sv.moe.clear();
    if (z3_leaf_block()) z3_leaf_backward_end();
    return dx;
}

}  // namespace mst::sim

namespace mst::sim {

// _TiledMlp.backward: dx = empty_like(x); per chunk in order, the chunk replayed with autograd
// (y_c = mlp(x_c), x_c a detached view), its nested backward (torch.autograd.grad for x_c and
// the weights), y_c deleted, dx[chunk] = x_c's gradient; the first chunk's weight gradients
// become the sums, later ones are added in place (the loop variable keeps the last one alive
// until it is rebound). The sums leave the node as the weights' gradients.
T StepBuilder::hf_tiled_mlp_backward(const LayerParams& lp, HfLayer& sv, T dy) {
    const std::int64_t d = m_.hidden_size;
    at("mlp.tiled");
    T dx = alloc("d_x", res(tokens_, d), Category::Transient);
    const bool checkpointed = std::exchange(recomputed_, false);  // the nested graph's tensors are its own
    // The MLP's parameters in their order (gate, up, down; Phi-3: gate_up, down): torch.autograd.grad's
    // outputs after the input's, and the node's.
    // (gpt-oss: router, its bias, gate_up, its bias, down, its bias)
    std::array<int, 6> params{};
    std::size_t count = 0;
    const bool router_first = m_.moe && m_.moe->router_first, router_last = m_.moe && !m_.moe->router_first;
    for (int p : {router_first ? lp.router : -1, router_first ? lp.router_bias : -1, lp.gate, lp.gate_bias, lp.up, lp.down,
                  lp.down_bias, router_last ? lp.router : -1})
        if (p >= 0) params[count++] = p;
    std::array<T, 6> sums;
    T loop_var;  // `g` of the last `for i, g in enumerate(grads)`
    bool first = true;
    const std::vector<std::int64_t> sizes = chunk_sizes(tokens_, s_.mlp_chunks);
    for (std::size_t chunk = 0; chunk < sizes.size(); ++chunk) {
        const std::int64_t n = sizes[chunk];
        // From the third chunk on, an iteration frees the previous one's loop variable and keeps its
        // own, all else it allocates freed (the first makes the sums, the second the first loop
        // variable): a dense one repeats the last built when the two before it had its size.
        if (!m_.moe && chunk >= 4 && n == sizes[chunk - 1] && n == sizes[chunk - 2] && fold_iteration()) continue;
        loop_iteration();
        phase_ = Phase::Recompute;
        HfMlpChunk c;
        HfMoe e;
        hf_leaf_input_ = true;  // xc = x[chunk].detach().requires_grad_()
        T yc = hf_block_chunk_forward(lp, sv.x_tiled, n, &c, &e, false, {});
        hf_leaf_input_ = false;
        clear_autocast_cache();  // the chunk's autocast region ends
        phase_ = Phase::Backward;
        T dyc = hold(dy);  // dy[chunk], a view
        std::array<T, 6> grads;
        auto grad_of = [&](int p, T g, bool) {
            if (!g.valid()) return;
            // (torch.autograd.grad's engine casts it to the weight's grad_dtype all the same: fp32 in
            // FSDP2's first unsynced micro-step under its bf16 policy; the sums are fp32 then)
            fsdp2_upcast_output(p, g);
            grads[static_cast<std::size_t>(std::find(params.begin(), params.begin() + count, p) - params.begin())] = g;
        };
        T dxc = m_.moe ? hf_moe_backward(lp, e, dyc, true, grad_of) : hf_mlp_chunk_backward(lp, c, dyc, false, true, grad_of);
        at("mlp.tiled");
        drop(yc);   // del yc
        drop(dxc);  // dx[chunk] = grads.pop(0)
        if (first) {
            sums = grads;  // sums[i] = g: the loop variable ends on the last, which sums holds too
        } else {
            drop(loop_var);  // rebound by the loop
            loop_var = grads[count - 1];  // del grads: the list, last first; its last item is the loop variable
            for (std::size_t i = count - 1; i-- > 0;) drop(grads[i]);
        }
        first = false;
    }
    loop_end();
    // At return the locals go in order: the unpacked input (recomputed by checkpointing, nothing else
    // holds it), then `g`; the node then releases its input gradient and saved input.
    recomputed_ = checkpointed;
    if (checkpointed) drop(sv.x_tiled);
    drop(loop_var);
    node_end({&sv.x_tiled}, &dy);
    // the node's outputs: dx, then the weights' gradients; their AccumulateGrad nodes run in the
    // engine's ready-queue order
    for (std::size_t i : ready_queue_order(count)) add_grad(params[i], sums[i], true, true);
    return dx;
}

// torch's autograd engine pops ready nodes from a std::priority_queue by sequence number; every
// AccumulateGrad node has the largest, so among them the order is the heap's (libstdc++'s
// push_heap / pop_heap), as pushed after the node's input gradient's next node (a lower number).
// Three come out in push order; six (gpt-oss's MLP parameters) as 0, 1, 4, 5, 3, 2.
std::vector<std::size_t> ready_queue_order(std::size_t count) {
    struct Item {
        bool accumulate;
        std::size_t index;
    };
    const auto less = [](const Item& a, const Item& b) { return !a.accumulate && b.accumulate; };
    std::vector<Item> heap{{false, 0}};
    for (std::size_t i = 0; i < count; ++i) {
        heap.push_back({true, i});
        std::push_heap(heap.begin(), heap.end(), less);
    }
    std::vector<std::size_t> order;
    while (!heap.empty()) {
        std::pop_heap(heap.begin(), heap.end(), less);
        if (heap.back().accumulate) order.push_back(heap.back().index);
        heap.pop_back();
    }
    return order;
}

}  // namespace mst::sim
