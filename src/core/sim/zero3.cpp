// ZeRO-3 in the hf runtime: DeepSpeed 0.19.8's stage-3 engine (runtime/zero/stage3.py, its
// parameter coordinator, runtime/zero/linear.py) with the defaults mst-plan's ds_config.json keeps
// (bf16 with fp32 master weights, contiguous gradients, reduce-scatter) and the setup's
// reduce_bucket_size, param_persistence_threshold and prefetch_bucket_size, as the Hugging Face
// Trainer sets it up: the trainable parameters as one group, DeepSpeed's FusedAdam. The referee runs
// that engine on fake tensors and records it (python/mst_referee/deepspeed_zero.py);
// docs/deepspeed-zero3-model.md is the specification, read from DeepSpeed's source.
//
// * Init. Each parameter is partitioned on its own: every rank holds ceil(n / dp) of its elements,
//   all of them in one bf16 buffer (lp_param_buffer); the persistent parameters (at most
//   param_persistence_threshold elements: Llama's norms) stay gathered, a buffer each. The gradient
//   bucket (reduce_bucket_size bf16 elements) and the partitions' gradients are made once. The
//   master partitions (fp32) and Adam's states come in sub-groups of consecutive parameters of about
//   sub_group_size (1e9) elements.
// * Forward and backward. Every module's hooks ask the coordinator (zero3.hpp) to gather and
//   release parameters: the gathers' buffers, copies and frees happen at the hooks. Linear layers run
//   DeepSpeed's LinearFunctionForZeroStage3: its backward makes the input's gradient first, then the
//   weight's (contiguous [out, in]), and AccumulateGrad's hook moves the weight's gradient into the
//   bucket (freeing autograd's) unless it would not fit: a gradient that would take the bucket past
//   its size reduce-scatters what the bucket holds first, and one larger than the bucket stays where
//   it is. A reduce-scatter cats its gradients, each padded to a multiple of the ranks (unless it is
//   one that needs no padding), and frees the standalone gradients and then the cat.
//   python/mst_hf's MLP mini-sequences call each projection per chunk: its post-backward hook releases
//   only in the chunk autograd runs first (ds_grads_remaining), and a checkpointed layer's recompute
//   saves an alias of each linear's gathered weight, which outlives a release in the recompute.
// * Mixtral's and Qwen3-MoE's sparse blocks are DeepSpeed's default leaf modules: one module for the
//   router's and the experts' parameters, whose backward hook reduces their gradients together; the
//   experts' grouped_mm saves views of the gathered weights, which outlive DeepSpeed's release.
//   gpt-oss's block is none: its router and experts are modules of their own, called per chunk.
// * After backward: the bucket reduce-scatters what it holds, and the modules whose post-backward
//   hook never ran (the embedding's; with mini-sequences every MLP projection's) release their parameters.
// * Step. The persistent parameters are released, the norm taken in fp64 (a copy of each partition
//   piece, one at a time), then per sub-group its gradient flattened (a cat) and made fp32 for the
//   step, which is freed after it; then the persistent parameters are gathered again.
//
// Ranks are alike: every rank builds every rank's padded chunks, and its partition of each
// parameter has the same size.
#include <algorithm>

#include "builder.hpp"
#include "zero3.hpp"

namespace mst::sim {

namespace {
constexpr int kBf16 = 2;
constexpr std::int64_t kSubGroupSize = 1'000'000'000;  // zero_optimization.sub_group_size's default
}  // namespace

// The modules of the Hugging Face model in registration order, their own parameters, and the order
// in which one micro-step runs their hooks (docs/deepspeed-zero3-model.md, sections 1.2 and 1.3; the
// families' differences, 13 to 18). Modules without parameters fetch (their step ids and prefetches
// count); their releases free nothing and are left out. An MoE block is a leaf module (section 18):
// its hooks stand for its children's, which have none.
void StepBuilder::z3_build() {
    std::vector<std::vector<int>> modules;
    z3_.module_of.assign(params_.size(), -1);
    auto add_module = [&](std::span<const int> own) {  // (a -1, an absent bias, is skipped)
        const int id = static_cast<int>(modules.size());
        std::vector<int> params;
        for (int p : own) {
            if (p < 0) continue;
            z3_.module_of[static_cast<std::size_t>(p)] = id;
            params.push_back(z3_.ds_id[static_cast<std::size_t>(p)]);
        }
        modules.push_back(std::move(params));
        return id;
    };
    auto module = [&](std::initializer_list<int> own) { return add_module(std::span<const int>(own.begin(), own.size())); };
    z3_.ds_id.assign(params_.size(), -1);
    z3_.leaf.assign(params_.size(), 0);
    // (every weight's gradient comes from DeepSpeed's linear but an MoE block's experts', from grouped_mm)
    for (Param& P : params_) P.pending.python = true;
    // (and gpt-oss's experts' biases, from their gathers, and its sinks, from an expand)
    for (const LayerParams& lp : layer_params_)
        for (int p : {lp.gate, lp.down, lp.gate_bias, lp.down_bias, lp.sinks})
            if (m_.moe && p >= 0) params_[static_cast<std::size_t>(p)].pending.python = false;
    for (std::size_t i = 0; i < order_.size(); ++i) z3_.ds_id[static_cast<std::size_t>(order_[i])] = static_cast<int>(i);
    z3_.root = module({});
    z3_.model = module({});
    z3_.embed = module({embed_});
    z3_.layers.clear();
    for (const LayerParams& lp : layer_params_) {
        Z3Layer L{};
        L.layer = module({});
        L.attn = module({lp.sinks});  // (gpt-oss's sinks: the attention's own parameter)
        if (m_.fused_projections()) {  // Phi-3: o_proj before qkv_proj; gate_up_proj (L.gate), down_proj
            L.o = module({lp.o}), L.q = module({lp.q});
            L.k = L.v = L.up = -1;
            L.mlp = module({});
            L.gate = module({lp.gate}), L.down = module({lp.down});
        } else {
            L.q = module({lp.q, lp.q_bias}), L.k = module({lp.k, lp.k_bias}), L.v = module({lp.v, lp.v_bias}),
            L.o = module({lp.o, lp.o_bias});
            if (lp.q_norm >= 0) L.q_norm = module({lp.q_norm}), L.k_norm = module({lp.k_norm});  // (Qwen3: after o_proj)
            if (m_.moe && m_.moe->gpt_oss) {  // GptOssMLP: no leaf; its router, then its experts (each with biases)
                L.mlp = module({});
                L.router = module({lp.router, lp.router_bias});
                L.experts = module({lp.gate, lp.gate_bias, lp.down, lp.down_bias});
                L.gate = L.up = L.down = -1;
            } else if (m_.moe) {
                // Mixtral's and Qwen3-MoE's sparse block: a leaf module (zero_optimization.leaf_module's
                // default classes), whose hooks fetch and release the router's and the experts' parameters
                // together; its children have none
                std::vector<int> own;
                for (int p : order_)
                    if (p == lp.router || p == lp.gate || p == lp.down) {
                        L.leaf_params[own.size()] = p;
                        own.push_back(p);
                        z3_.leaf[static_cast<std::size_t>(p)] = 1;
                    }
                L.mlp = add_module(own);
                L.gate = L.up = L.down = -1;
            } else {
                L.mlp = module({});
                L.gate = module({lp.gate}), L.up = module({lp.up}), L.down = module({lp.down});
            }
        }
        L.act = m_.moe ? -1 : module({});
        L.input_ln = module({lp.norm1});
        if (lp.post_attn_norm >= 0) L.post_attn_ln = module({lp.post_attn_norm});  // (Gemma: before pre_feedforward)
        L.post_ln = module({lp.norm2});
        if (lp.post_ff_norm >= 0) L.post_ff_ln = module({lp.post_ff_norm});
        if (m_.family == Family::Phi3) L.attn_dropout = module({}), L.mlp_dropout = module({});
        z3_.layers.push_back(L);
    }
    z3_.norm = module({final_norm_});
    z3_.rotary = module({});
    z3_.lm_head = module({lm_head_});
    z3_.layer_child.assign(modules.size(), 0);
    for (const Z3Layer& L : z3_.layers)
        for (int child : {L.input_ln, L.attn, L.post_attn_ln, L.post_ln, L.post_ff_ln, L.mlp, L.attn_dropout, L.mlp_dropout})
            if (child >= 0) z3_.layer_child[static_cast<std::size_t>(child)] = 1;

    std::vector<Z3Hook> hooks;
    auto fetch = [&](int m, bool forward) { hooks.push_back(Z3Hook{Z3Hook::Fetch, m, forward}); };
    auto release = [&](int m, bool forward) { hooks.push_back(Z3Hook{Z3Hook::Release, m, forward}); };
    auto leaf = [&](int m) {
        if (m >= 0) fetch(m, true), release(m, true);
    };
    // the layer's forward inside its own hooks, the MLP's projections once per mini-sequence (python/mst_hf's
    // loop calls them per chunk); a recompute stops at the last chunk's down_proj save (no post-forward
    // hooks of that down_proj and the MLP)
    const std::int64_t chunks = s_.mlp_chunks;
    const bool tiled = chunks > 1 && s_.mlp_impl == MlpImpl::Tiled;
    // one chunk's forward (a tiled MLP's chunks each run whole: its Function saves after the last)
    auto chunk_forward = [&](const Z3Layer& L, bool stops) {
        leaf(L.gate);
        fetch(L.act, true);
        leaf(L.up);
        fetch(L.down, true);
        if (!stops) release(L.down, true);
    };
    // (Gemma: the recompute stops in the norm after the MLP, before its post-forward hook)
    const bool gemma = m_.gemma();
    auto layer_inside = [&](const Z3Layer& L, bool recompute) {
        leaf(L.input_ln);
        fetch(L.attn, true);
        if (m_.qk_norms_after_projections()) {  // Gemma-3: both head norms after the three projections
            leaf(L.q), leaf(L.k), leaf(L.v), leaf(L.q_norm), leaf(L.k_norm), leaf(L.o);
        } else {  // (Qwen3: each head norm after its projection)
            leaf(L.q), leaf(L.q_norm), leaf(L.k), leaf(L.k_norm), leaf(L.v), leaf(L.o);
        }
        if (m_.attention_sinks) release(L.attn, true);  // (gpt-oss: its sinks, the attention's own)
        if (L.attn_dropout >= 0) fetch(L.attn_dropout, true);
        leaf(L.post_attn_ln);
        leaf(L.post_ln);
        fetch(L.mlp, true);
        if (L.experts >= 0) {  // gpt-oss: per chunk the router, then the experts (a recompute stops in the last's)
            for (std::int64_t c = 0; c < chunks; ++c) {
                leaf(L.router);
                fetch(L.experts, true);
                if (!(recompute && c + 1 == chunks)) release(L.experts, true);
            }
        } else if (m_.moe) {  // (a leaf: its post-forward hook releases; a recompute stops in its experts)
            if (!recompute) release(L.mlp, true);
        } else {
            for (std::int64_t c = 0; c < chunks; ++c) chunk_forward(L, recompute && !gemma && !tiled && c + 1 == chunks);
        }
        // (a recompute has stopped in the MLP)
        if (!recompute && L.mlp_dropout >= 0) fetch(L.mlp_dropout, true);
        if (L.post_ff_ln >= 0) {
            fetch(L.post_ff_ln, true);
            if (!recompute) release(L.post_ff_ln, true);
        }
    };
    fetch(z3_.root, true), fetch(z3_.model, true);
    leaf(z3_.embed);
    for (std::size_t table = 0; table < hf_rope_.size(); ++table)  // (Gemma-3: called once per layer type)
        if (rope_table_used(table)) fetch(z3_.rotary, true);
    for (const Z3Layer& L : z3_.layers) {
        fetch(L.layer, true);
        layer_inside(L, false);
    }
    leaf(z3_.norm);
    leaf(z3_.lm_head);
    // backward
    auto back = [&](int m) {
        if (m >= 0) fetch(m, false), release(m, false);
    };
    // one chunk's backward; down_proj's node unpacks first: a checkpointed layer's recompute runs there
    auto chunk_backward = [&](const Z3Layer& L, bool recompute) {
        fetch(L.down, false);
        if (recompute) layer_inside(L, true);
        release(L.down, false);
        back(L.up);
        fetch(L.act, false);
        back(L.gate);
    };
    fetch(z3_.root, false);
    back(z3_.lm_head);
    fetch(z3_.model, false);
    back(z3_.norm);
    for (std::size_t i = z3_.layers.size(); i-- > 0;) {
        const Z3Layer& L = z3_.layers[i];
        fetch(L.layer, false);
        bool recompute = s_.checkpointed(static_cast<std::int64_t>(i));
        if (L.post_ff_ln >= 0) {  // Gemma: the norm after the MLP, whose backward unpacks first
            fetch(L.post_ff_ln, false);
            if (std::exchange(recompute, false)) layer_inside(L, true);
            release(L.post_ff_ln, false);
        }
        if (L.mlp_dropout >= 0) fetch(L.mlp_dropout, false);
        fetch(L.mlp, false);
        if (L.experts >= 0) {
            // per chunk, the last first: the experts' pre-backward (its first unpack runs the recompute); both
            // inputs' gradients (the routing weights', then the hidden states') release them; then the router's
            for (std::int64_t c = chunks; c-- > 0;) {
                fetch(L.experts, false);
                if (recompute && c + 1 == chunks) layer_inside(L, true);
                release(L.experts, false);
                back(L.router);
            }
        } else if (m_.moe) {
            // the leaf's first node to unpack a saved tensor runs the recompute; its post-backward hook
            // releases once the block's input has its gradient (and the block's hook has reduced its parameters')
            if (recompute) layer_inside(L, true);
            release(L.mlp, false);
        } else if (tiled) {
            // the tiled MLP's Function: the layer's recompute at its unpack, then per chunk in order its
            // replay and its own backward
            if (recompute) layer_inside(L, true);
            for (std::int64_t c = 0; c < chunks; ++c) chunk_forward(L, false), chunk_backward(L, false);
        } else {
            for (std::int64_t c = chunks; c-- > 0;)  // (autograd runs the last chunk's nodes first)
                chunk_backward(L, recompute && c + 1 == chunks);
        }
        back(L.post_ln);
        back(L.post_attn_ln);
        if (L.attn_dropout >= 0) fetch(L.attn_dropout, false);
        fetch(L.attn, false);
        if (m_.qk_norms_after_projections()) back(L.o), back(L.k_norm), back(L.q_norm), back(L.v), back(L.k), back(L.q);
        else back(L.o), back(L.v), back(L.k_norm), back(L.k), back(L.q_norm), back(L.q);
        back(L.input_ln);
    }
    fetch(z3_.embed, false);

    std::vector<std::int64_t> numel;
    for (int p : order_) numel.push_back(params_[static_cast<std::size_t>(p)].numel);
    Z3Config config;
    config.ranks = s_.dp;
    config.prefetch_bucket = s_.prefetch_bucket_size;
    config.max_live = kDeepSpeedMaxLive;
    config.max_reuse = kDeepSpeedMaxReuse;
    config.persistence = s_.param_persistence_threshold;
    // With a leaf module (an MoE block), whose release looks ahead through whole subtrees: each module's
    // subtree (the model's: all but an untied lm_head's; a layer's, its attention's, a dense MLP's)
    std::vector<std::vector<int>> subtrees;
    std::vector<char> leaves;
    if (z3_leaf_block()) {
        subtrees = modules;
        leaves.assign(modules.size(), 0);
        auto ids = [&](std::initializer_list<int> params) {
            std::vector<int> out;
            for (int p : params)
                if (p >= 0) out.push_back(z3_.ds_id[static_cast<std::size_t>(p)]);
            std::sort(out.begin(), out.end());
            return out;
        };
        std::vector<int>& all = subtrees[static_cast<std::size_t>(z3_.root)];
        for (std::size_t i = 0; i < order_.size(); ++i) all.push_back(static_cast<int>(i));
        for (int id : all)
            if (m_.tie_word_embeddings || order_[static_cast<std::size_t>(id)] != lm_head_)
                subtrees[static_cast<std::size_t>(z3_.model)].push_back(id);
        for (int id : all)
            if (const std::int32_t l = params_[static_cast<std::size_t>(order_[static_cast<std::size_t>(id)])].layer; l >= 0)
                subtrees[static_cast<std::size_t>(z3_.layers[static_cast<std::size_t>(l)].layer)].push_back(id);
        for (std::size_t l = 0; l < z3_.layers.size(); ++l) {
            const Z3Layer& L = z3_.layers[l];
            const LayerParams& lp = layer_params_[l];
            subtrees[static_cast<std::size_t>(L.attn)] = ids({lp.q, lp.q_bias, lp.k, lp.k_bias, lp.v, lp.v_bias, lp.o, lp.o_bias, lp.q_norm, lp.k_norm});
            leaves[static_cast<std::size_t>(L.mlp)] = 1;
        }
    }
    z3_.coordinator = std::make_unique<Zero3Coordinator>(std::move(numel), std::move(modules), std::move(hooks), config,
                                                         std::move(subtrees), std::move(leaves));
    // the first micro-step with a complete trace: a step's second with accumulation (the persistent
    // parameters not gathered yet), else the next step's first
    z3_.coordinator->warm_up(s_.grad_accum == 1);
}

void StepBuilder::z3_hook(Z3Hook::Kind kind, int module, bool forward) {
    const char* op = op_;
    const std::int32_t layer = layer_;
    const Phase phase = phase_;
    // (The referee counts what a recompute's post-forward hook of a layer's direct child frees as
    // backward's: checkpointing calls the layer's forward, not the module, and the hook runs without
    // grad outside any module of the layer.)
    if (kind == Z3Hook::Release && forward && phase_ == Phase::Recompute && z3_.layer_child[static_cast<std::size_t>(module)])
        phase_ = Phase::Backward;
    at(kind == Z3Hook::Fetch ? "zero3.fetch" : "zero3.release");
    z3_apply(z3_.coordinator->hook(Z3Hook{kind, module, forward}));
    phase_ = phase;
    layer_ = layer;
    at(op);
}

void StepBuilder::z3_apply(std::span<const Z3Event> events) {
    for (const Z3Event& e : events) {
        const auto i = static_cast<std::size_t>(e.index);
        switch (e.kind) {
            case Z3Event::Single:
            case Z3Event::Copy:
                if (phase_ == Phase::Init) layer_ = params_[static_cast<std::size_t>(order_[i])].layer;  // (registered by name)
                z3_.gathered[i] = alloc(params_[static_cast<std::size_t>(order_[i])].name, checked_mul(e.elements, kBf16),
                                        Category::Weights);
                break;
            case Z3Event::Flat:
                if (z3_.flats.size() <= i) z3_.flats.resize(i + 1);
                z3_.flats[i] = alloc("all_gather_flat", checked_mul(e.elements, kBf16), Category::Weights);
                break;
            case Z3Event::FreeFlat: drop(z3_.flats[i]); break;
            case Z3Event::FreeParam: drop(z3_.gathered[i]); break;
        }
    }
}

void StepBuilder::z3_init_state() {
    z3_build();
    const Zero3Coordinator& c = *z3_.coordinator;
    const auto n = static_cast<int>(order_.size());
    std::int64_t partition = 0;
    for (int i = 0; i < n; ++i) partition = checked_add(partition, c.part(i), "parameters");
    // sub-groups: consecutive parameters until their partitions reach sub_group_size (_create_fp16_sub_groups)
    z3_.sub_groups.clear();
    if (partition <= kSubGroupSize) {
        z3_.sub_groups.push_back(partition);
    } else {
        std::int64_t group = 0;
        for (int i = 0; i < n; ++i) {
            group += c.part(i);
            if (group >= kSubGroupSize || i == n - 1) z3_.sub_groups.push_back(std::exchange(group, 0));
        }
    }
    z3_.gathered.assign(order_.size(), T{});
    z3_.aliases.assign(order_.size(), {});
    z3_.flats.clear();

    at("init.weights");
    layer_ = -1;
    alloc("lp_param_buffer", checked_mul(partition, kBf16), Category::Weights);
    z3_apply(z3_.coordinator->gather_persistent());  // (gathered by the previous step)
    at("init.gradients");
    layer_ = -1;
    alloc("ipg_bucket", checked_mul(s_.reduce_bucket_size, kBf16), Category::Gradients);
    alloc("grad_partitions_flat_buffer", checked_mul(partition, kBf16), Category::Gradients);
    init_hf_buffers();
    at("init.master_weights");
    for (std::int64_t g : z3_.sub_groups) alloc("fp32_partition", checked_mul(g, 4), Category::MasterWeights);
    at("init.optimizer_state");
    for (std::int64_t g : z3_.sub_groups) {
        alloc("exp_avg", checked_mul(g, 4), Category::OptimizerState);
        alloc("exp_avg_sq", checked_mul(g, 4), Category::OptimizerState);
    }
    at("init.deepspeed");
    alloc("fused_adam_overflow_buf", 4, Category::Workspace);
    alloc("inf_or_nan_tracker", 1, Category::Workspace);
    z3_.global_norm = alloc("global_grad_norm", 8, Category::Workspace);  // fp64
}

T StepBuilder::z3_linear_backward(int w, const char* input_name, bytes_t input_bytes, std::initializer_list<T*> saved,
                                  T& grad_in, const std::function<void(T&)>& pass_input, bool last_use, int b, bool fetched) {
    if (!fetched) z3_fetch_of(w, false);
    unpack();
    T input = alloc(input_name, input_bytes, Category::Transient);
    T weight = grad_out(w);
    T bias = b >= 0 ? grad_out(b) : T{};
    // the node's saved input, then its weight and bias (a recompute's aliases of them; else the parameters)
    auto alias_of = [&](int p) {
        if (p < 0 || !recomputed_) return T{};
        std::vector<T>& aliases = z3_.aliases[static_cast<std::size_t>(z3_.ds_id[static_cast<std::size_t>(p)])];
        if (aliases.empty()) return T{};
        T alias = aliases.back();
        aliases.pop_back();
        return alias;
    };
    T alias = alias_of(w), bias_alias = alias_of(b);
    std::vector<T*> all(saved);
    all.push_back(&alias);
    all.push_back(&bias_alias);
    py_node_end(all, &grad_in);
    // A chunk's joins the next one's into a new sum (the bias's too: gpt-oss's chunked router); the tied
    // LM head's takes the embedding's in place, a whole backward later (the referee: autograd's InputBuffer
    // adds into it). The node's outputs reach their buffers in order and die together after the last;
    // then the AccumulateGrad nodes run, the weight's first.
    const T outputs[] = {hold(weight), hold(bias)};
    add_grad(w, weight, !(w == lm_head_ && m_.tie_word_embeddings), false);
    if (b >= 0) add_grad(b, bias, true, false);
    for (T t : outputs) drop(t);
    if (last_use) {
        accumulate_grad_run(w);
        if (b >= 0) accumulate_grad_run(b);
    }
    z3_release_of(w, false);
    pass_input(input);
    return input;
}

// One MLP chunk's backward (the whole block's, unchunked): down_proj, the product, up_proj, the
// activation module's pre-backward and SiLU's backward, gate_proj; its input's two gradients are summed
// into a new tensor. last_use: the chunk autograd runs last (the first), whose weight gradients complete them.
T StepBuilder::z3_mlp_backward(const LayerParams& lp, HfMlpChunk& c, T& dy, bool last_use) {
    const std::int64_t d = m_.hidden_size, I = m_.intermediate_size, n = c.tokens;
    const auto keep = [](T&) {};
    at("mlp.down");
    T gm = z3_linear_backward(lp.down, "d_m", bf16(n, I), {&c.m}, dy, keep, last_use);
    if (m_.fused_projections()) {  // Phi-3
        T joined = hf_fused_act_backward(c, gm);
        return z3_linear_backward(lp.gate, "d_x_gate_up", bf16(n, d), {&c.x_gate}, joined, keep, last_use);
    }
    at("mlp.act");
    T gu = alloc("d_u", bf16(n, I), Category::Transient);
    T gs = alloc("d_s", bf16(n, I), Category::Transient);
    node_end({&c.u, &c.s}, &gm);
    at("mlp.gate_up");
    T dx = z3_linear_backward(lp.up, "d_x_up", bf16(n, d), {&c.x_up}, gu, keep, last_use);
    at("mlp.act");
    z3_fetch(z3_.layers[static_cast<std::size_t>(layer_)].act, false);
    T gg = alloc("d_g", bf16(n, I), Category::Transient);
    node_end({&c.g}, &gs);
    at("mlp.gate_up");
    z3_linear_backward(lp.gate, "d_x_gate", bf16(n, d), {&c.x_gate}, gg, [&](T& g) { accumulate(dx, g, true); }, last_use);
    return dx;
}

// python/mst_hf's tiled MLP under ZeRO-3 (_TiledMlpZero3.backward, ALST's TiledMLP): dx =
// empty_like(x); per chunk in order, the chunk replayed with autograd on a detached leaf (its modules'
// forward hooks fetch and release), its own torch.autograd.backward (the MLP chunk's backward, each
// weight's gradient accumulated into .grad: the first chunk's becomes it, later ones are summed in
// place; DeepSpeed's hook runs every time, may flush the bucket, and adds the sum to it after the
// last chunk only: ds_grad_is_ready), then yc deleted, dx[chunk] = xc.grad copied, xc and its
// gradient deleted. The weights leave the node no gradient.
T StepBuilder::z3_tiled_mlp_backward(const LayerParams& lp, HfLayer& sv, T dy) {
    at("mlp.tiled");
    T dx = alloc("d_x", res(tokens_, m_.hidden_size), Category::Transient);
    const bool checkpointed = std::exchange(recomputed_, false);  // the replays' tensors are their own
    const std::vector<std::int64_t> sizes = chunk_sizes(tokens_, s_.mlp_chunks);
    for (std::size_t chunk = 0; chunk < sizes.size(); ++chunk) {
        z3_grad_held_ = chunk + 1 < sizes.size();
        phase_ = Phase::Recompute;
        HfMlpChunk c;
        hf_leaf_input_ = true;  // xc = x[chunk].detach().requires_grad_()
        T yc = hf_block_chunk_forward(lp, sv.x_tiled, sizes[chunk], &c, nullptr, false, {});
        hf_leaf_input_ = false;
        phase_ = Phase::Backward;
        T dyc = hold(dy);  // dy[chunk], a view
        T dxc = z3_mlp_backward(lp, c, dyc, true);  // (its sum becomes xc.grad)
        at("mlp.tiled");
        drop(yc);   // del yc
        drop(dxc);  // dx[chunk] = xc.grad; del xc
    }
    z3_grad_held_ = false;
    recomputed_ = checkpointed;
    if (checkpointed) drop(sv.x_tiled);  // the unpacked input, recomputed by checkpointing
    node_end({&sv.x_tiled}, &dy);
    return dx;
}

// A leaf module's parameters have no gradient hooks of their own: the module's full backward hook
// (stage3.py reduce_leaf_module_grads) reduces each, in model.parameters() order, once the block's input
// has its gradient (every chunk's summed); then its post-backward hook releases them.
void StepBuilder::z3_leaf_backward_end() {
    const Z3Layer& L = z3_.layers[static_cast<std::size_t>(layer_)];
    for (int p : L.leaf_params) z3_grad_hook(p);
    z3_release(L.mlp, false);
}

// reduce_independent_p_g_buckets_and_remove_grads (stage3.py:1569-1590)
void StepBuilder::z3_grad_hook(int p) {
    const char* op = op_;
    at("deepspeed.grad_hook");
    Param& P = params_[static_cast<std::size_t>(p)];
    if (z3_.elements + P.numel > s_.reduce_bucket_size && z3_.elements > 0) z3_flush();
    if (z3_grad_held_) {  // ds_grad_is_ready False (a tiled MLP's chunk but the last): the flush only
        at(op);
        return;
    }
    if (z3_.elements + P.numel <= s_.reduce_bucket_size) drop(P.grad);  // copied in; .grad becomes a view of the bucket
    z3_.elements += P.numel;
    z3_.in_bucket.push_back(p);
    at(op);
}

// __reduce_and_partition_ipg_grads (stage3.py:1648-1695) with reduce_scatter_coalesced
// (runtime/comm/coalesced_collectives.py:79-141) and partition_grads
void StepBuilder::z3_flush() {
    at("deepspeed.reduce_scatter");
    std::vector<int>& params = z3_.in_bucket;
    std::sort(params.begin(), params.end(), [&](int a, int b) {
        return z3_.ds_id[static_cast<std::size_t>(a)] < z3_.ds_id[static_cast<std::size_t>(b)];
    });
    const std::int64_t W = s_.dp;
    T flat;
    std::vector<T> pads;
    const bool whole = params.size() == 1 && params_[static_cast<std::size_t>(params.front())].numel % W == 0;
    if (!whole) {
        std::int64_t total = 0;
        for (std::int64_t r = 0; r < W; ++r)
            for (int p : params) {
                const std::int64_t n = params_[static_cast<std::size_t>(p)].numel, c = ceil_div(n, W);
                const std::int64_t chunk = std::clamp<std::int64_t>(n - r * c, 0, c);
                if (c > chunk) pads.push_back(alloc("reduce_scatter_pad", checked_mul(c - chunk, kBf16), Category::Transient));
                if (r == 0) total += c;
            }
        flat = alloc("reduce_scatter_flat", checked_mul(checked_mul(total, W), kBf16), Category::Transient);
        for (auto it = pads.rbegin(); it != pads.rend(); ++it) drop(*it);  // the list's items, last first
    }
    for (int p : params) drop(params_[static_cast<std::size_t>(p)].grad);  // partition_grads: standalone ones go
    drop(flat);
    params.clear();
    z3_.elements = 0;
}

void StepBuilder::z3_after_backward(T& root) {
    drop(root);  // backward() returns
    // independent_gradient_partition_epilogue, then release_backward_leftovers
    if (!z3_.in_bucket.empty()) z3_flush();
    at("deepspeed.epilogue");
    z3_apply(z3_.coordinator->release_leftovers());
    drop(ds_.loss_mul), drop(ds_.loss_div);  // engine.backward returns
}

void StepBuilder::z3_optimizer_step() {
    layer_ = -1;
    at("deepspeed.partition_all");  // _partition_all_parameters: the persistent ones too
    z3_apply(z3_.coordinator->release_all());

    at("deepspeed.grad_norm");  // get_grad_norm_direct per sub-group: each piece in fp64
    std::vector<T> groups;
    std::size_t piece = 0;
    for (std::int64_t g : z3_.sub_groups) {
        std::vector<T> norms;
        for (std::int64_t seen = 0; seen < g && piece < order_.size(); ++piece) {
            const std::int64_t part = z3_.coordinator->part(static_cast<int>(piece));
            T copy = alloc("grad_fp64", checked_mul(part, 8), Category::Transient);
            norms.push_back(alloc("norm_fp64", 8, Category::Transient));
            drop(copy);
            seen += part;
        }
        const auto k = static_cast<std::int64_t>(norms.size());
        T norm = alloc("norms", checked_mul(k, 8), Category::Transient);  // stack(norms).pow(2).sum().pow(0.5)
        norm = ds_then(norm, "norms_pow", checked_mul(k, 8));
        T sum = ds_then(norm, "norm_sum", 8);
        T root = alloc("norm", 8, Category::Transient);
        T inf = alloc("isinf", 1, Category::Transient);
        T nan = alloc("isnan", 1, Category::Transient);
        T either = alloc("inf_or_nan", 1, Category::Transient);
        groups.push_back(alloc("norm_group", 8, Category::Transient));  // where(inf_or_nan, -1, norm)
        drop(root), drop(sum);
        for (auto it = norms.rbegin(); it != norms.rend(); ++it) drop(*it);
        drop(inf), drop(nan), drop(either);
    }
    // combine_grad_norm_groups
    const auto k = static_cast<std::int64_t>(groups.size());
    T stacked = alloc("norm_groups", checked_mul(k, 8), Category::Transient);
    T invalid;
    {  // is_invalid of the stacked groups
        T a = alloc("abs", checked_mul(k, 8), Category::Transient);
        T ne = alloc("ne", k, Category::Transient);
        T eq = alloc("eq", k, Category::Transient);
        T f = alloc("isfinite", k, Category::Transient);
        drop(eq), drop(ne), drop(a);
        T n = ds_then(f, "not", k);
        T lt = alloc("lt", k, Category::Transient);
        T o = alloc("or", k, Category::Transient);
        drop(n), drop(lt);
        invalid = ds_then(o, "any", 1);
    }
    T combined = alloc("vector_norm", 8, Category::Transient);
    T full = alloc("full_like", 8, Category::Transient);
    T scaled_norm = alloc("global_norm", 8, Category::Transient);
    drop(full), drop(stacked), drop(invalid), drop(combined);
    T checked = ds_is_invalid(8);  // step(): is_invalid_grad_norm
    drop(checked);
    T new_norm = alloc("global_grad_norm", 8, Category::Transient);  // scaled / loss scale: the engine keeps it

    for (std::int64_t g : z3_.sub_groups) {
        at("deepspeed.flatten_partition");  // _prepare_fp32_grad_for_sub_group
        T flat = alloc("flat_grad_partition", checked_mul(g, kBf16), Category::Transient);
        T grad = alloc("partition_grad_fp32", checked_mul(g, 4), Category::Gradients);
        drop(flat);
        at("deepspeed.clip");
        ds_clip(8);  // (the norm is fp64)
        at("optimizer.step");  // FusedAdam in place; _release_sub_group frees the gradient
        drop(grad);
    }
    at("deepspeed.post_step");
    z3_apply(z3_.coordinator->gather_persistent());
    drop(scaled_norm);
    for (auto it = groups.rbegin(); it != groups.rend(); ++it) drop(*it);  // step()'s locals: the list, last first
    drop(z3_.global_norm);  // the engine's last norm gives way to this step's
    z3_.global_norm = new_norm;
}

}  // namespace mst::sim
