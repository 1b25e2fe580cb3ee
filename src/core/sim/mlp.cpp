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
#include "builder.hpp"

namespace mst::sim {

void StepBuilder::mlp_chunk_forward(const LayerParams& lp, std::int64_t n, T& y, MlpChunk* keep) {
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
    if (!y.valid()) y = act("y", bf16(tokens_, d), m_.family == Family::Gemma2);
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

    if (s_.mlp_chunks > 1 && s_.mlp_impl == MlpImpl::Tiled) {
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
    for (int p : {lp.down, lp.gate, lp.up}) grad_done(p);
    return uncast_grad(dh2, d);
}

}  // namespace mst::sim
