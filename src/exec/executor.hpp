#pragma once
// The executor's state while it runs one training step on a backend (see executor.cpp).
//
// Tensors are shared handles on tracked buffers, so lifetimes are PyTorch's: the code
// that produced a tensor holds it, every op that keeps it for its backward holds a
// copy (only while autograd records), a checkpoint holds its layer input, and the
// buffer is freed -- and the free recorded -- when the last holder lets go. Every drop
// is explicit and in program order, never left to the end of a scope, so the event
// order is the program's.
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "backend.hpp"
#include "mst/execute.hpp"
#include "mst/model.hpp"
#include "mst/setup.hpp"
#include "tracking_allocator.hpp"

namespace mst::exec {

// A tensor: its storage dtype and a holder of its buffer (empty: none).
struct Ten {
    std::shared_ptr<Buffer> buf;
    DType dtype = DType::F32;

    explicit operator bool() const { return buf != nullptr; }
    Tensor t() const { return {buf->data(), dtype}; }
    // A view starting `elements` into the buffer (a row block of a chunk).
    Tensor at(std::int64_t elements) const {
        return {static_cast<char*>(buf->data()) + elements * dtype_bytes(dtype), dtype};
    }
    float* f32() const;  // the buffer as fp32 (a bug when it is not)
    std::int64_t* i64() const { return static_cast<std::int64_t*>(buf->data()); }  // an index buffer (alloc_i64)
};

// One parameter tensor [rows, cols] (a norm weight is [1, d]) with its persistent state. A
// linear's bias [rows] is stored after its weight's rows, in the same tensor (the kernels
// runtime's layout: one parameter per projection, as the simulator counts it).
struct Param {
    std::string name;         // "q_proj", ... (the timeline's tensor name)
    std::int32_t layer = -1;  // -1 outside the decoder layers
    std::int64_t rows = 0, cols = 0;
    bool bias = false;        // a bias [rows] follows the weight [rows, cols]
    bool gain = false;        // a norm's gain, initialised to the identity (1, Gemma's 0)
    Ten weight, master;       // master: fp32 copy under Bf16Master
    Ten state1, state2;       // AdamW exp_avg, exp_avg_sq; SGD momentum in state1
    Ten grad;                 // live from its first write in backward to the step
    Ten amp_copy;             // AMP: the autocast cache's bf16 copy, while cached
    std::vector<Ten> amp_saved;  // AMP: that copy, once per op that saved it for backward
    std::int64_t numel() const { return rows * cols + (bias ? rows : 0); }
};

// The element `elements` into t (a row block of a stacked parameter, a bias after its weight).
inline Tensor offset(Tensor t, std::int64_t elements) {
    return {static_cast<char*>(t.data) + elements * dtype_bytes(t.dtype), t.dtype};
}

struct LayerParams {
    int norm1 = -1, q = -1, k = -1, v = -1, o = -1, post_attn_norm = -1, norm2 = -1, post_ff_norm = -1;
    int gate = -1, up = -1, down = -1;  // post_*_norm: Gemma-2 only
    int q_norm = -1, k_norm = -1;       // Qwen3: RMSNorm over each query and key head
    int router = -1;                    // MoE: the router [E, d]; gate, up, down are then every expert's, stacked
    int sinks = -1;                     // gpt-oss: the attention's sink logits [nh]
};

// What one MLP mini-sequence (Loop) keeps for its backward. MoE: g, u, m are the experts' [n*k, Ie]
// on the token-expert pairs sorted by expert, and the routing's tensors below.
struct MlpChunk {
    Ten g, u, m, h2;  // g, u, m [n, I]; h2: a holder of the block input [T, d] (its gate/up's view)
    std::int64_t row0 = 0, tokens = 0;
    Ten probs, w, idx, pos;          // MoE: router probabilities [n, E] fp32, top-k weights [n, k] fp32,
                                     // experts [n, k] and sorted rows [n, k] int64
    Ten xs, ys;                      // MoE: the gathered inputs and the experts' outputs [n*k, d]
    std::vector<std::int64_t> rows;  // MoE: each expert's first sorted row [E + 1] (host: the GEMMs' sizes)
};

// What one layer's forward leaves for its backward.
struct LayerSaved {
    Ten x, h1, rstd1;            // layer input [T,d], norm output [T,d], rstd [T] fp32
    Ten q, k, v, o, lse;         // flash: q, o [T,q_dim]; k, v [T,kv_dim]; lse [B,nh,S] fp32
    Ten k_rep, v_rep, probs32, probs;  // eager: k, v repeated to nh heads [T,q_dim]; probabilities [B,nh,S,S]
    Ten scores_tanh;             // eager with soft-capping (Gemma-2): tanh(scores / cap) [B,nh,S,S]
    Ten a, rstd_pa;              // Gemma-2: attention output [T,d] (the post-attention norm's input), rstd
    Ten y, rstd_pf;              // Gemma-2: MLP output [T,d] (the post-feed-forward norm's input), rstd
    Ten o_seq;                   // the o_proj input (o)
    Ten q_raw, k_raw, rstd_q, rstd_k;  // Qwen3: the projections' outputs and rstd [T x heads] of the head norms
    Ten x2, h2, rstd2;           // residual [T,d], MLP input [T,d] (Tiled), rstd [T]
    std::vector<MlpChunk> mlp;   // Loop: one entry per mini-sequence
};

struct HeadSaved {
    Ten x_last, hf, rstd_f;  // last layer output, final-norm output (matmul input), rstd
    Ten logp;                // M = 1: fp32 log-probabilities [T,V]
    Ten logits_tanh;         // M = 1 with final soft-capping: tanh(logits / cap) [T,V]
    Ten dhf, grad_partial;   // fused: d_hidden [T,d] and a separate lm_head gradient, from forward
};

class Step {
public:
    // `backend` runs the kernels and provides the memory; it must outlive the step.
    Step(const ModelSpec& model, const TrainingSetup& setup, std::uint64_t seed, const ExecuteOptions& options,
         Backend& backend);
    MeasuredStep run();

private:
    // ---- tensors ---------------------------------------------------------------
    Ten alloc(const char* name, std::int64_t numel, DType dtype, Category category,
              Device device = Device::Gpu);
    Buffer& raw(const Ten& t) { return *t.buf; }
    // An activation: SavedActivation when autograd records and an op saves it, else Transient.
    Ten act(const char* name, std::int64_t numel, DType dtype, bool saved);
    Ten alloc_i64(const char* name, std::int64_t numel, bool saved_by_op);  // an int64 index activation (as act)
    Ten saved(const Ten& t) const { return grad_ ? t : Ten{}; }  // a holder for backward (none without grad)
    static void drop(Ten& t) { t.buf.reset(); }
    void at(const char* op);  // the op the next events belong to; also charges wall time to ops

    // ---- parameters and their state ----------------------------------------------
    void build_params();
    void init_state();
    Tensor grad_write(int p);        // p's gradient buffer, allocated (zeroed) at its first write
    void grad_done(int p);                // p's gradient is complete for this micro-step
    Tensor use_weight(int p);        // the weight a forward matmul reads (AMP: the autocast copy)
    Tensor backward_weight(int p);   // the weight that op's backward reads
    void release_weight(int p);           // that backward is done with it
    void clear_autocast_cache();
    Ten cast_for_matmul(Ten x, std::int64_t cols);  // AMP: a bf16 copy of an fp32 activation
    Ten uncast_grad(Ten g, std::int64_t cols);      // its backward: back to fp32
    // A linear through parameter p (weight w: its use_weight or backward_weight), on the output
    // rows [first, first + o) of the parameter (a stacked expert's block): out[n, o] = in W^T,
    // plus the bias when p has one; and its gradients' accumulation into p's gradient.
    void linear_forward(Tensor out, ConstTensor in, int p, Tensor w, std::int64_t n, std::int64_t i, std::int64_t o,
                        std::int64_t first = 0);
    void linear_weight_grad(int p, ConstTensor dout, ConstTensor in, std::int64_t n, std::int64_t i, std::int64_t o,
                            std::int64_t first = 0);
    void optimizer_update(Param& P);
    void capture_gradient(const Param& P);
    std::string qualified_name(const Param& P) const;  // "layers.L.NAME", as capture names it
    void nudge_weight(const ExecuteOptions::Nudge& n);

    // ---- ops ---------------------------------------------------------------------
    Ten norm_forward(int p, const Ten& x, Ten& rstd, bool output_saved, DType out_dtype);
    Ten norm_backward(int p, Ten& rstd, Ten& x_saved, const Ten& dy, DType dx_dtype);
    void head_norm_forward(int p, Ten& x, std::int64_t heads, Ten& x_saved, Ten& rstd);
    void head_norm_backward(int p, Ten& dx, std::int64_t heads, Ten& x_saved, Ten& rstd);
    // Soft-capping as HF writes it, three ops: x / cap, tanh (saved), * cap; and its backward.
    Ten softcap_forward(const char* prefix, Ten x, std::int64_t n, float cap, Ten& tanh_saved);
    Ten softcap_backward(const char* prefix, Ten dy, std::int64_t n, float cap, Ten& tanh_saved);
    Ten layer_forward(int l, Ten x, LayerSaved& sv, Category out_category);
    void layer_backward(int l, LayerSaved& sv, const Ten& dres);
    Ten attention_forward(int l, Ten h1, LayerSaved& sv);
    Ten attention_backward(int l, LayerSaved& sv, const Ten& d_out);
    Ten eager_forward(int l, Ten q, Ten k, Ten v, LayerSaved& sv);
    void eager_backward(int l, Ten d_o, LayerSaved& sv, Ten& dq, Ten& dk, Ten& dv);
    Ten mlp_forward(int l, Ten h2, LayerSaved& sv);
    Ten mlp_backward(int l, LayerSaved& sv, const Ten& dy);
    void mlp_chunk_forward(const LayerParams& lp, const Ten& hin, std::int64_t row0, std::int64_t n, Ten& y,
                           MlpChunk* keep);
    // A Mixture-of-Experts block on n tokens from row row0 of hin (executor_moe.cpp): routes, runs
    // the experts and combines into y's rows; `recompute` (tiled backward): stops before the combine
    // and keeps everything in `keep` as transients.
    void moe_chunk_forward(const LayerParams& lp, const Ten& hin, std::int64_t row0, std::int64_t n, Ten& y,
                           MlpChunk* keep, bool recompute = false);
    // Its backward from dy's rows: writes dh2's rows (allocated by the first chunk), consumes c.
    void moe_chunk_backward(const LayerParams& lp, MlpChunk& c, const Ten& h2, const Ten& dy, Ten& dh2);
    Ten embedding_forward(Category out_category);
    float embedding_scale() const;
    void embedding_backward(const Ten& dres);
    void head_forward(Ten x_last, HeadSaved& hs);
    Ten head_backward(HeadSaved& hs);
    AttentionConfig attention_config(int l) const;
    std::vector<std::int64_t> chunks(std::int64_t count) const;  // mini-sequence sizes of T tokens

    void micro_step(int micro);
    void optimizer_step();

    const ModelSpec& m_;
    const TrainingSetup& s_;
    const ExecuteOptions& opt_;
    Backend& b_;
    TrackingAllocator alloc_;  // declared before every Ten so that it outlives them

    DType act_ = DType::BF16;  // activations
    DType res_ = DType::BF16;  // residual stream and norm outputs (fp32 under AMP)
    DType pw_ = DType::BF16;   // parameters
    DType pg_ = DType::BF16;   // gradients
    DType sd_ = DType::BF16;   // optimizer states
    bool amp_ = false;
    std::int64_t B_ = 1, S_ = 1, T_ = 1;  // micro-batch, sequence, tokens
    GatedAct gated_ = GatedAct::Silu;
    // MoE: the top-k weights are divided by their sum (Mixtral, Qwen3-MoE's norm_topk_prob; gpt-oss,
    // whose softmax over its top-k logits is exactly that)
    bool normalize_ = false;
    NormKind norm_kind_ = NormKind::Llama;
    bool gemma_ = false;  // Gemma-2: post-norms, sqrt(d) embedding scale, soft-capping

    std::vector<Param> params_;
    std::vector<LayerParams> layer_params_;
    int embed_ = -1, final_norm_ = -1, lm_head_ = -1;  // lm_head_ == embed_ when tied
    std::vector<int> autocast_cache_;                   // params whose copy the cache holds, in order

    Ten workspace_;        // options.workspace_bytes, for the whole step
    Ten mask_full_, mask_sliding_;  // eager: the additive 4-D masks [B,1,S,S] of this micro-step
    Ten ids_, labels_;     // this micro-step's tokens and targets [T] int64
    float loss_scale_ = 1;  // d(loss)/d(row loss): 1 / (valid tokens * grad_accum)
    std::int64_t loss_rows_ = 0;
    std::uint64_t rng_ = 0;  // SplitMix64 state
    std::uint64_t random();
    bool grad_ = true;
    MeasuredStep result_;

    std::chrono::steady_clock::time_point op_start_;
    std::string op_;

    friend class NoGrad;
};

// torch.no_grad() for the duration of a scope.
class NoGrad {
public:
    explicit NoGrad(Step& s) : s_(s), prev_(s.grad_) { s_.grad_ = false; }
    ~NoGrad() { s_.grad_ = prev_; }
    NoGrad(const NoGrad&) = delete;
    NoGrad& operator=(const NoGrad&) = delete;

private:
    Step& s_;
    bool prev_;
};

}  // namespace mst::exec
