#pragma once
// StepBuilder: the simulator's state while it walks one training step.
//
// Tensors are reference counted the way PyTorch's are: an allocation starts with
// one holder (the code that produced it); `save` adds a holder when autograd is
// recording (a tensor an op keeps for its backward); `drop` removes one, and the
// last drop frees the memory. Writing every op as "allocate outputs, save what the
// backward needs, drop the inputs" makes the no-grad forward of a checkpointed
// layer, the recompute and the normal forward come out of the same code.
#include <algorithm>
#include <array>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <iterator>
#include <limits>
#include <memory>
#include <span>
#include <utility>
#include <vector>

#include "mst/gpu.hpp"
#include "mst/model.hpp"
#include "mst/simulate.hpp"
#include "mst/setup.hpp"
#include "mst/timeline.hpp"
#include "zero3.hpp"

namespace mst::sim {

struct T {
    std::int64_t id = -1;
    bool valid() const { return id >= 0; }
};

// An autograd node's input buffer for one gradient: the first one received (and whether it is a
// view of another tensor's storage), the later ones added into it (StepBuilder::buffer_add).
struct GradBuffer {
    T sum;
    bool view = false;
    // Gradients from a Python autograd Function (ZeRO-3's linear): the engine never adds into them in
    // place, so with a view first every sum is a new tensor; else only the first sum is.
    bool python = false;
};

// One parameter tensor (bias folded into its weight) and its gradient's life.
struct Param {
    const char* name = "";
    std::int32_t layer = -1;
    std::int64_t numel = 0;   // on this rank (expert parallelism: its E / ep experts)
    std::int64_t rows = 0;    // its first dimension (FSDP2 shards it)
    // The ranks ZeRO shards it over (experts: the expert-data-parallel ones); with one, ZeRO leaves
    // it whole (no gather, no gradient shard: its gradient lives to the step, as without ZeRO).
    std::int64_t shard_ranks = 1;
    T weight;                 // the stored parameter (a shard under ZeRO-3)
    T grad;                   // full gradient, live between its first write and the step (or reduce)
    T master_grad;            // hf bf16-master: the fp32 gradient of its master copy (mst_hf's hooks)
    GradBuffer pending;       // hf: gradients waiting in its AccumulateGrad node's input buffer
    T amp_copy;               // AmpFp32: the autocast cache's bf16 copy, while cached
    bool cast = false;        // hf AmpFp32: autocast has cast it (its gradient reaches AccumulateGrad through the copy's node)
    GradBuffer cast_pending;  // hf AmpFp32: gradients waiting in that copy's ToCopyBackward0 buffer
    std::vector<T> amp_saved; // AmpFp32: that copy, once per op that saved it for backward
};

// Parameter indices of one decoder layer.
struct LayerParams {
    int norm1, q, k, v, o, post_attn_norm = -1, norm2, post_ff_norm = -1, gate, up, down;
    int q_bias = -1, k_bias = -1, v_bias = -1, o_bias = -1;  // hf: biases are parameters of their own
    int q_norm = -1, k_norm = -1;                             // Qwen3: RMSNorm over each head's head_dim
    int router = -1;  // MoE: the router's [E, d]; `gate` is then the experts' gate_up_proj, `down` their down_proj
    int sinks = -1;   // gpt-oss: the attention's per-head sink logits [heads]
    int router_bias = -1, gate_bias = -1, down_bias = -1;  // gpt-oss: the router's [E], the experts' [E, 2I] and [E, d]
};

// hf runtime: what autograd and Python hold for one Hugging Face RMSNorm, one handle per
// holder (each node that saved the tensor drops its own).
struct HfNorm {
    T a_pow, a_mul;    // the fp32 upcast, saved by pow and by the mul with rsqrt
    T r_rsqrt, r_mul;  // rsqrt of the variance, saved by rsqrt (its result) and by that mul
    T c;               // Llama: the normalised bf16 copy, saved by the weight mul
    T n, w1;           // Gemma-2: the normalised fp32 tensor and 1 + weight (fp32), saved by their mul
    T w;               // ZeRO-3: the weight as a recompute saves it for the weight's mul (z3_recompute_alias)
    bool fp32_in = false;  // under autocast: the input was the fp32 residual stream (its upcast is itself)
};

// hf runtime: one MLP chunk's saved tensors (the whole block when unchunked).
struct HfMlpChunk {
    T x_gate, x_up;  // the block input (a view of it per chunk), saved by gate_proj and up_proj
    T g;             // gate_proj output, saved by the activation
    T s, u;          // activation and up_proj outputs, saved by their product
    T m;             // the product, saved by down_proj
    T gate_view;     // Phi-3: the forward's local `gate` (a view of gate_up_proj's output) until it returns
    std::int64_t tokens = 0;
};

// hf runtime: what one Mixture-of-Experts block (or one chunk of it) keeps for its backward in
// transformers' grouped_mm experts path; S = n x top_k token-expert pairs. One handle per holder.
struct HfMoe {
    T x_router;                  // the block input, saved by the router's linear
    T probs;                     // softmax of the fp32 logits [n, E] (gpt-oss: of the top-k [n, k]), saved by softmax
    T top_idx;                   // topk's indices [n, k] i64, saved by topk
    T norm_sum, norm_self;       // the in-place normalisation: divisor [n, 1] and the dividend's clone [n, k]
    T perm;                      // sort's permutation [S] i64, saved by the routing weights' gather
    T token_idx;                 // perm // k [S] i64, saved by the hidden states' gather
    T x_sorted;                  // the gathered hidden states [S, d], saved by gate_up's grouped_mm
    T w_sorted;                  // the gathered routing weights [S], saved by the weighting product
    T offs_up, offs_down;        // cumsum of tokens per expert [E] i32, saved by each grouped_mm
    // ZeRO-3: what each grouped_mm keeps of the gathered storage of its weight whatever DeepSpeed
    // releases meanwhile (the Parameter's .data is swapped, not freed): z3_saved_weight
    T w_up, w_down;
    T gate_view, up_view;        // gate_up's output [S, 2I] as saved by the activation and the product
    T s;                         // silu(gate) [S, I], saved by the product
    T prod;                      // act(gate) * up [S, I], saved by down's grouped_mm
    T down_out;                  // down's output [S, d], saved by the weighting product
    T inv_perm;                  // the inverse permutation [S] i64, saved by the restoring gather
    // gpt-oss: the sorted expert ids [S] i64, saved by both bias gathers; its activation's saves:
    // clamp(gate) by the product with the sigmoid, sigmoid(alpha g) by itself and by that product,
    // whose result glu and up + 1 by theirs (prod).
    T ids_up, ids_down;
    T gate_c, sig, sig_mul, glu, up1;
    std::int64_t tokens = 0;
};

// hf runtime: what one decoder layer's forward left for its backward.
struct HfLayer {
    HfNorm n1, n2, n_pa, n_pf;  // the input and pre-MLP norms; Gemma-2's post-attention and post-MLP ones
    T h1_q, h1_k, h1_v;                        // the attention input, saved by q, k, v projections
    T cos_q, sin_q, cos_k, sin_k;              // the rotary tables, saved by RoPE's muls
    T cos_q2, sin_q2, cos_k2, sin_k2;          // gpt-oss: each table's second product
    T q_fa, k_fa, v_fa, o_fa, lse_fa, rng_fa;  // saved by flash-attn's FlashAttnFunc
    T q_bmm, k_rep, v_rep, probs32, probs;     // eager: saved by the two batched GEMMs and the softmax
    T scores_tanh;                             // eager Gemma-2: the soft-capping's tanh, saved by it
    T max_idx;                                 // eager gpt-oss: where each row's maximum is, saved by max
    T o_oproj;                                 // its output, saved by o_proj
    std::vector<HfMlpChunk> mlp;
    std::vector<HfMoe> moe;                    // MoE models: one per chunk
    T x_tiled;                                 // tiled MLP: the input its Function saved
    HfNorm nq, nk;                             // Qwen3: the query and key heads' norms
};

// torchtitan's model code (titan.cpp, docs/torchtitan-model.md): a fused RMSNorm's holders (its input and
// reciprocal RMS, saved by its node) and one layer's saved tensors beside the MLP's (HfLayer::mlp).
struct TitanNorm {
    T x, rstd;
};
struct TitanLayer {
    TitanNorm n1, n2;
    T x_qkv;            // the attention norm's output, saved by wqkv
    T cache;            // the RoPE table's rows for these positions (complex64), saved by both products
    T q, k, v, o, lse;  // saved by flex attention (o by wo too: o_wo)
    T o_wo;
    T frame;            // checkpointed (FullAC): the layer's input, which its checkpoint's frame keeps
};

// What one layer's forward left for its backward.
struct MlpChunk {
    T g, u, m;                   // MoE: the experts' [R, Ie] on the pairs they received (ep 1: n*k, sorted by expert)
    std::int64_t tokens = 0;
    // MoE: router probabilities, top-k weights, experts, sorted rows; x as the experts received it
    // [R, d]; y as it came back [n*k, d]
    T probs, w, idx, pos, xs, ys;
};
struct LayerSaved {
    HfLayer hf;  // the hf runtime's holders; the fields below are the kernels runtime's
    TitanLayer titan;  // the hf runtime's with torchtitan's model code
    T x, h1, rstd1;
    T q, k, v, o, lse;                       // flash
    T k_rep, v_rep, probs32, probs, scores_tanh;  // eager
    T o_seq;                                 // Ulysses: o back in sequence layout
    T q_raw, k_raw, rstd_q, rstd_k;          // Qwen3: the head norms' inputs and rstd
    T a, rstd_pa;                            // Gemma-2 post-attention norm
    T x2, h2, rstd2;
    std::vector<MlpChunk> mlp;               // Loop: one entry per chunk
    T y, rstd_pf;                            // Gemma-2 post-feed-forward norm
};

struct HeadSaved {
    HfNorm hf_norm;        // hf: the final norm's holders
    TitanNorm titan_norm;  // torchtitan's fused final norm
    T hf_logits_in;        // hf: the final norm output saved by lm_head (unchunked head)
    T hf_pad, hf_weight;   // hf: padded labels (nll_loss's target) and nll_loss's total_weight
    T hf_lp_nll;           // hf: the log-probabilities, saved by nll_loss (log_softmax's own hold is logp)
    T hf_loss, hf_root;    // hf: the loss the trainer holds; backward()'s grad_tensors (ones)
    T hf_logits;           // hf: the output's logits (unchunked head), dropped once the forward returns
    T hf_targets, hf_denominator;  // hf chunked loss: shifted targets and the mean's denominator
    T x_last, hf, rstd_f;
    T logp;              // standard: fp32 log-probabilities
    T logits_tanh;       // standard + final soft-capping
    T dhf, grad_partial; // fused-in-forward: gradients computed in forward
};

// One tensor of the step: its size and how many hold it (0: freed).
struct TableEntry {
    bytes_t bytes;
    const char* name;
    std::int32_t refs;
    Category category;
    Device device;
};

// Peaks-only runs stop at the first event that takes a peak past these (the rest of the step
// cannot lower a peak), by throwing OverBudget: the tuner needs only "does not fit" from them.
struct PeakLimits {
    bytes_t gpu_bytes = std::numeric_limits<bytes_t>::max();   // requested bytes on the GPU
    bytes_t host_bytes = std::numeric_limits<bytes_t>::max();  // offloaded
};
struct OverBudget {};

// A non-owning reference to a callable void(int param, T gradient, bool run): where an op rule
// hands each weight's gradient (AccumulateGrad, or a nested torch.autograd.grad's outputs). The
// gradient reaches the node's buffer; with `run` the node then runs if it was the last one it waits
// for. A node whose outputs reach their buffers before the node runs passes run = false, then
// calls run(p) (an invalid gradient: nothing more arrives).
class WeightGradRef {
public:
    template <class F>
    WeightGradRef(F& f) : obj_(&f), call_([](void* o, int p, T g, bool run) { (*static_cast<F*>(o))(p, g, run); }) {}
    void operator()(int p, T g, bool run = true) const { call_(obj_, p, g, run); }
    void run(int p) const { call_(obj_, p, T{}, true); }

private:
    void* obj_;
    void (*call_)(void*, int, T, bool);
};

// A GPU allocation or free of a peaks-only run, as the caching-allocator model replays it
// (PeakSimulator, peaks.cpp): the model needs only the order, the tensor and the bytes.
struct GpuEvent {
    std::int64_t tensor;
    bytes_t bytes;  // -1: the tensor's free
};

// The memory a peaks-only StepBuilder takes over from the previous one and hands back (the
// tuner and max-seq run hundreds of steps; growing these from empty each time costs more
// than a short step): its tensor table and parameters, and the GPU events it captures.
struct PeakScratch {
    std::vector<TableEntry> table;
    std::vector<Param> params;
    std::vector<int> order;
    std::vector<LayerParams> layer_params;
    std::vector<GpuEvent> gpu_events;
    // Where in gpu_events the first micro-step's forward enters another layer: setups the tuner
    // compares share the step up to the first layer whose knobs differ, so the allocator replay
    // resumes from the last such place they share (peaks.cpp).
    std::vector<std::size_t> boundaries;
    // Chunk loops whose iterations may repeat one another: the replay skips whole periods of
    // iterations that repeat what it has replayed on the same state (loop_replay.hpp). loop_marks[first + i] is where
    // in gpu_events iteration i starts, loop_marks[first + iterations] where the loop ends.
    struct Loop {
        std::size_t first = 0, iterations = 0;
    };
    std::vector<Loop> loops;
    std::vector<std::size_t> loop_marks;
    // loop_counts[first + i]: how many iterations recorded iteration i stands for (>= 1; the builder
    // folds repeats of a steady iteration into it: StepBuilder::fold_iteration).
    std::vector<std::int64_t> loop_counts;
};

// torch DDP's bucket assignment (ddp.cpp): the bytes of each bucket, for gradients of these bytes
// in the order they become ready.
std::vector<bytes_t> ddp_bucket_bytes(std::span<const bytes_t> grad_bytes, bytes_t first_limit, bytes_t limit);

// The order in which autograd's engine runs `count` AccumulateGrad nodes made ready together by one
// node (mlp.cpp).
std::vector<std::size_t> ready_queue_order(std::size_t count);

// How a peaks-only StepBuilder runs.
struct PeakRun {
    PeakScratch* scratch = nullptr;  // memory to reuse
    PeakLimits limits;
    bool capture = false;  // keep the GPU events in scratch->gpu_events (needs scratch)
};

class StepBuilder {
public:
    // record: keep every event (simulate); otherwise only the running peaks of requested and
    // offloaded bytes (the tuner's fast path; the allocator's come from replaying the captured
    // events: PeakSimulator).
    StepBuilder(const ModelSpec& model, const TrainingSetup& setup, const GpuProfile& gpu, bool record,
                PeakRun peak_run = {});
    ~StepBuilder();
    StepBuilder(const StepBuilder&) = delete;
    StepBuilder& operator=(const StepBuilder&) = delete;
    Timeline run();
    MemoryPeaks peaks() const { return peaks_; }
    // Which rank the step is walked for (walked_ranks(): of ring attention's sp, or of DeepSpeed's dp; 0 by default).
    void walk_rank(std::int64_t rank) { rank_ = rank; }

private:
    // ---- tensor table (inline: every op calls these, millions of times per tuner search) ----
    T alloc(const char* name, bytes_t bytes, Category category, Device device = Device::Gpu) {
        const T t{static_cast<std::int64_t>(table_.size())};
        table_.push_back(TableEntry{bytes, name, 1, category, device});
        if (record_) [[unlikely]] record(true, t.id);
        else account(t.id, bytes, device, true);
        return t;
    }
    // An activation: SavedActivation when autograd records and `saved`, else Transient.
    T act(const char* name, bytes_t bytes, bool saved) {
        return alloc(name, bytes, grad_ && saved ? Category::SavedActivation : Category::Transient);
    }
    void save(T t) {  // autograd keeps t for backward (no-op without grad)
        if (grad_ && t.valid()) ++table_[static_cast<std::size_t>(t.id)].refs;
    }
    bool drop(T& t) {  // one holder lets go; frees at the last (returns true); resets the handle
        if (!t.valid()) return false;
        TableEntry& l = table_[static_cast<std::size_t>(t.id)];
        if (l.refs <= 0) dropped_after_free(t);
        const bool freed = --l.refs == 0;
        if (freed) {
            if (record_) [[unlikely]] record(false, t.id);
            else account(t.id, l.bytes, l.device, false);
        }
        t = T{};
        return freed;
    }
    [[noreturn]] void dropped_after_free(T t) const;  // a bug in an op's rules
    void record(bool alloc, std::int64_t id);         // the event of tensor id's allocation or free, into tl_
    void at(const char* op) {
        op_ = op;
        if (peak_run_.capture) mark_boundary();
    }
    // Every op starts with at(); any event is a correct place for a boundary, these are useful ones.
    void mark_boundary() {
        if (micro_ != 0 || phase_ != Phase::Forward || layer_ == marked_layer_) return;
        marked_layer_ = layer_;
        peak_run_.scratch->boundaries.push_back(peak_run_.scratch->gpu_events.size());
    }
    std::int32_t marked_layer_ = -2;
    // A chunk loop's iterations, for the replay (captured runs only; loops do not nest): call
    // loop_iteration() as each iteration starts and loop_end() after the last.
    void loop_iteration() {
        if (!peak_run_.capture) return;
        PeakScratch& s = *peak_run_.scratch;
        if (!in_loop_) s.loops.push_back(PeakScratch::Loop{s.loop_marks.size(), 0});
        in_loop_ = true;
        s.loop_marks.push_back(s.gpu_events.size());
        s.loop_counts.push_back(1);
        ++s.loops.back().iterations;
    }
    void loop_end() {
        if (!peak_run_.capture || !in_loop_) return;
        peak_run_.scratch->loop_marks.push_back(peak_run_.scratch->gpu_events.size());
        peak_run_.scratch->loop_counts.push_back(0);
        in_loop_ = false;
    }
    // Peaks-only runs: an iteration the caller knows to repeat the last one it built exactly (the
    // same chunk, run from the same state up to which tensors hold which block, leaving it so) is
    // not built: the last one's count grows instead, and the replay runs or skips the repeats
    // (loop_replay.hpp checks that they can repeat). Returns whether the caller skips it.
    bool fold_iteration() {
        if (record_) return false;
        if (peak_run_.capture) ++peak_run_.scratch->loop_counts.back();
        return true;
    }
    bool in_loop_ = false;

    // ---- sizes ----------------------------------------------------------------
    bytes_t elems(std::int64_t rows, std::int64_t cols, int bytes_per_element) const {
        bytes_t r = 0;
        if (__builtin_mul_overflow(rows, cols, &r) || __builtin_mul_overflow(r, bytes_per_element, &r))
            return checked_product({rows, cols, bytes_per_element}, "tensor size");  // throws, naming the factors
        return r;
    }
    bytes_t bf16(std::int64_t rows, std::int64_t cols) const { return elems(rows, cols, 2); }
    bytes_t f32(std::int64_t rows, std::int64_t cols) const { return elems(rows, cols, 4); }
    bytes_t i64(std::int64_t rows, std::int64_t cols) const { return elems(rows, cols, 8); }
    // The residual stream and norm outputs: fp32 under AMP (fp32 embedding, fp32 adds), else bf16.
    bytes_t res(std::int64_t rows, std::int64_t cols) const { return elems(rows, cols, rb_); }

    // ---- parameters and their state -------------------------------------------
    void build_params();
    void init_state();                  // weights, master copy, optimizer states, workspace
    void init_workspace();              // cuBLAS's
    void grad_write(int p);             // a weight-gradient GEMM writes into p's gradient
    void grad_done(int p);              // p's gradient is complete for this micro-step
    void use_weight(int p, bool saved = true);  // a forward op reads p (AMP: autocast copy, saved by the op)
    void release_weight(int p);         // that op's backward is done with it
    void clear_autocast_cache();
    void gather_unit(int unit);         // ZeRO-3: all-gather a unit's parameters (unit -1 = embedding, L = head)
    void enter_unit(int unit, int dir); // gather it and prefetch the next ones in direction dir
    void release_unit(int unit);
    bytes_t unit_bytes(int unit) const { return unit_bytes_[static_cast<std::size_t>(unit + 1)]; }
    int zero_stage() const;             // the stage in effect (0 when dp == 1)
    // AMP: a linear's fp32 input is cast to a bf16 copy that the linear saves.
    T cast_for_matmul(T& x, std::int64_t cols);
    T uncast_grad(T& g, std::int64_t cols);  // the cast's backward: bf16 grad -> fp32

    // ---- ops (attention.cpp, mlp.cpp, lm_head.cpp) ---------------------------
    T layer_forward(int l, T x, LayerSaved& sv, Category out_category);
    void layer_backward(int l, LayerSaved& sv, T dres);
    void attention_forward(int l, T h1, LayerSaved& sv, T& attn_out);
    T attention_backward(int l, LayerSaved& sv, T d_attn_out);  // returns dh1
    // Ring attention (ring.cpp): q, k, v read; out and lse for the flash node, attn_out for o_proj.
    void ring_forward(T q, T k, T v, T& out, T& lse, T& attn_out);
    void ring_backward(T d_out, T q, T k, T v, T out, T lse, T& dq, T& dk, T& dv);
    T mlp_forward(int l, T h2, LayerSaved& sv);                   // returns y
    T mlp_backward(int l, LayerSaved& sv, T dy);                  // returns dh2
    void mlp_chunk_forward(const LayerParams& lp, std::int64_t n, T& y, MlpChunk* keep);
    // The kernels runtime's Mixture-of-Experts block on n tokens (mlp.cpp); `recompute`: the tiled
    // backward's replay, which stops before the combine and keeps everything as transients.
    void moe_chunk_forward(const LayerParams& lp, std::int64_t n, T& y, MlpChunk* keep, bool recompute = false);
    void moe_chunk_backward(const LayerParams& lp, MlpChunk& c, T& dh2);
    std::int64_t attention_masks() const;  // eager: 4-D masks the model builds (full and/or sliding)
    // RMSNorm: output of `bpe` bytes per element; rstd (fp32, one per token) kept for backward.
    T norm_forward(T& rstd, int bpe, bool output_saved);  // the caller saves the input
    T norm_backward(int p, T& rstd, T& x_saved, int bpe);  // returns d(norm input)
    // Gemma-2's soft-capping, tanh(x / cap) * cap, as the three bf16 ops eager PyTorch runs
    // (the tanh saves its output); names are {div, tanh, capped} and their gradients.
    using SoftcapNames = std::array<const char*, 3>;
    T softcap_forward(T x, bytes_t bytes, const SoftcapNames& names, T& saved_tanh);
    T logits_forward(T x, T& x_saved, T& logits_tanh);  // the unchunked head: lm_head, Gemma-2 soft-capping
    T softcap_backward(T g, bytes_t bytes, const SoftcapNames& names, T& saved_tanh);
    // Gemma-2's norm on a branch output (bf16), saving its input: returns the normed tensor.
    T post_norm_forward(const char* op, T x, T& saved_input, T& rstd);
    T saved(T t) {  // save(t) and return the handle backward drops (invalid without grad)
        save(t);
        return grad_ ? t : T{};
    }
    T hold(T t) {  // an extra holder regardless of grad mode (the checkpoint's reference)
        if (t.valid()) ++table_[static_cast<std::size_t>(t.id)].refs;
        return t;
    }

    T embedding_forward(Category out_category);
    void embedding_backward(T& dres);
    void head_forward(T x_last, HeadSaved& hs);
    T head_backward(HeadSaved& hs);  // returns the residual-stream gradient buffer

    // The chunk sizes of a loop whose iterations each free all they allocate (tiled MLP, LM head).
    // Recording, all of them. For peaks only, a third and later chunk of the same size is
    // dropped: it repeats the second exactly (same bytes, and the caching allocator hands
    // back the blocks the second one freed), so it cannot raise a peak; first-chunk effects
    // (gradient buffers, preallocated outputs) happen in the first. A test holds the two
    // paths equal. (Mixture-of-Experts blocks: every chunk, as recorded.)
    std::vector<std::int64_t> transient_chunks(std::int64_t chunks) const;

    void micro_step(int micro);
    void optimizer_step();

    // ---- hf runtime (Hugging Face transformers + PyTorch) ------------------------------------
    // Each op block holds its hf rule next to its kernels rule. Tensors are held the way
    // CPython and autograd hold them: an allocation's holder is the Python reference (or
    // temporary) that received it, `saved` adds one holder per autograd node that saved it,
    // and a layer's input is borrowed (its caller's variable holds it until the layer returns).
    // Hugging Face RMSNorm of the [T, d] input: returns its output (invalid when a checkpoint's
    // recomputation stops at its last save: Gemma-2's post-MLP norm ends a layer's saves).
    // The norm over `cols` of `rows` rows; the decoder's norms: [tokens, hidden_size].
    void head_norm_forward(int p, T& x, std::int64_t heads, T& x_saved, T& rstd);  // Qwen3, kernels runtime
    void head_norm_backward(int p, T& dx, std::int64_t heads, T& x_saved, T& rstd);
    // x: the input (borrowed); under autocast the decoder's norms take the fp32 residual stream,
    // whose upcast is x itself (the head norms pass T{}: their bf16 input is upcast).
    T hf_norm_forward(int p, T x, HfNorm& sv, bool stop_after_last_save, std::int64_t rows, std::int64_t cols);
    T hf_norm_forward(int p, T x, HfNorm& sv, bool stop_after_last_save = false) {
        return hf_norm_forward(p, x, sv, stop_after_last_save, tokens_, m_.hidden_size);
    }
    // g: the output's gradient (consumed); returns the input's gradient. last_unpack: its pow's
    // backward is the last node to unpack a checkpointed layer's tensors (the frame dies there).
    // into: the input's gradient buffer when the input has one already (a decoder layer's residual
    // stream: the residual add's backward ran first); the input's gradient is added into it and
    // invalid returned. Under autocast the norm's own fp32 gradients of x are x's: each is added as
    // its node finishes.
    T hf_norm_backward(int p, HfNorm& sv, T g, bool last_unpack, std::int64_t rows, std::int64_t cols, T* into = nullptr);
    T hf_norm_backward(int p, HfNorm& sv, T g, bool last_unpack = false, T* into = nullptr) {
        return hf_norm_backward(p, sv, g, last_unpack, tokens_, m_.hidden_size, into);
    }
    T hf_layer_forward(int l, T x, LayerSaved& sv, bool stop_after_last_save);
    void hf_layer_backward(int l, LayerSaved& sv, T& dres);
    void hf_attention_forward(HfLayer& sv, T h1, T& attn_out, T& weights);
    T hf_attention_backward(int l, HfLayer& sv, T d_out);  // returns the input's gradient
    // The backward of a Hugging Face linear on [B, S, in] (weight w, bias b or -1); returns the
    // input's gradient, which pass_input hands on to its next node (the view node's run).
    // Without a bias (MmBackward0) the node computes the weight's gradient [out, in], then the
    // input's; the input's view node runs before the weight's transpose node and AccumulateGrad.
    // With one (F.linear's fused path, AddmmBackward0): the input's, the weight's, then the bias's
    // (validate_outputs sums the output gradient over the tokens); then the accumulation nodes run
    // first, the bias's and the weight's, and the input's view node after them.
    // AMP (input_cast: autocast cast an fp32 input for it): the GEMMs' gradients are bf16; the node
    // lets go of the weight's bf16 copy (hf_mm_node_end, hf_addmm_node_end); the casts' nodes make
    // the gradients fp32 in reverse creation order: the input's, the weight's, the bias's
    // (hf_mm_outputs).
    template <class PassInput>
    T hf_linear_backward(int w, int b, const char* input_name, bytes_t input_bytes, std::initializer_list<T*> saved,
                         T& grad_in, PassInput pass_input, bool input_cast = false) {
        T input, weight, bias;
        if (z3_on_) return z3_linear_backward(w, input_name, input_bytes, saved, grad_in, [&](T& g) { pass_input(g); }, true, b);
        if (b < 0) {
            weight = hf_mm_grad(w);
            input = alloc(input_name, input_bytes, Category::Transient);
            hf_mm_node_end(w, saved, &grad_in);
            hf_mm_outputs(w, weight, input, input_cast, true, [&](int p, T g) { add_grad(p, g, !amp_, true); }, pass_input);
        } else if (!amp_) {
            input = alloc(input_name, input_bytes, Category::Transient);
            weight = grad_out(w);
            node_end(saved, &grad_in, [&] {
                bias = grad_out(b);
                fsdp2_upcast_output(b, bias);
            });
            add_grad(b, bias, false, true);
            add_grad(w, weight, true, true);
            pass_input(input);
        } else {
            // Under autocast the bias's copy (the cache's only) gets its gradient summed in bf16;
            // its cast node, made first (autocast casts the arguments last first), runs last.
            input = alloc(input_name, input_bytes, Category::Transient);
            weight = hf_mm_grad(w);
            bias = hf_addmm_node_end(w, b, saved, &grad_in);
            const auto accumulate_grad = [&](int p, T g) { add_grad(p, g, false, true); };
            hf_mm_outputs(w, weight, input, input_cast, true, accumulate_grad, pass_input);
            T f = grad_out(b);
            drop(bias);
            accumulate_grad(b, f);
        }
        return input;
    }
    // ZeRO-3's LinearFunctionForZeroStage3 (deepspeed/runtime/zero/linear.py), which replaces F.linear
    // (no bias here): its module's pre-backward fetch, then its backward, which unpacks its saved
    // tensors (a checkpointed layer's recompute runs there), makes the input's gradient and then the
    // weight's ([out, in], contiguous), and lets go of its output's gradient and then of what it saved;
    // AccumulateGrad takes the weight's (its hook: the bucket), the module's post-backward releases it,
    // and then the input's gradient goes on (pass_input; the caller holds no handle to it after).
    // last_use: the weight's last gradient of the step's backward (MLP mini-sequences: the first chunk's),
    // which lets its AccumulateGrad node run.
    // b: its bias (or -1), whose gradient the node makes last (the output's gradient summed over the tokens).
    // fetched: the module's pre-backward hook has run already (gpt-oss's router: F.linear inside a module
    // whose output is the softmax's).
    T z3_linear_backward(int w, const char* input_name, bytes_t input_bytes, std::initializer_list<T*> saved, T& grad_in,
                         const std::function<void(T&)>& pass_input, bool last_use = true, int b = -1, bool fetched = false);
    // ---- hf runtime under autocast (precision amp: fp32 weights and residual stream) -----------
    // F.linear's parameters under autocast: the bias's bf16 copy (b >= 0; the cache its only holder),
    // then the weight's (saved by the GEMM): autocast casts the arguments last first.
    void hf_linear_weights(int w, int b);
    // F.linear on x [rows, cols], a residual-stream tensor (fp32 under autocast), or a chunk of
    // one: under autocast, hf_linear_weights, then x's bf16 copy (a leaf x's, in the tiled MLP's
    // replay, is cached: later linears on it get the same copy); returns what the GEMM reads (x, or
    // its copy), held by the caller until the GEMM has run (saved() it, then drop it). Without
    // autocast: x, held. (A bf16 input needs hf_linear_weights only.)
    T hf_linear_input(int w, int b, T x, std::int64_t rows, std::int64_t cols);  // b: the bias, or -1
    T hf_mm_grad(int p);                 // a GEMM's weight gradient [out, in]: bf16 under autocast
    T hf_uncast(T g);                    // ToCopyBackward0 of a bf16 cast: the gradient back to fp32
    // After a GEMM node (hf_mm_node_end) its gradients go on in autograd's order: the input's
    // view node hands the input's gradient to its next node (to_input: a bf16 input's consumer,
    // or an autocast cast's buffer); the weight's transpose node hands gw (a view of the GEMM's
    // output) to AccumulateGrad (sink(w, gw)) or, under autocast, to the weight copy's
    // ToCopyBackward0, whose buffer sums every use's gradient (the chunks'); then an input cast's
    // node runs when its buffer is complete (cast_node: the gradient made fp32 and handed on);
    // then the weight copy's node, once its last use's gradient is in (last_use), hands the fp32
    // sum to AccumulateGrad (sink(w, fp32), not a view).
    template <class Sink, class ToInput, class CastNode>
    void hf_mm_outputs(int w, T gw, bool last_use, Sink sink, ToInput to_input, CastNode cast_node) {
        to_input();
        if (!amp_) {
            sink(w, gw);
            return;
        }
        GradBuffer& buffer = params_[static_cast<std::size_t>(w)].cast_pending;
        buffer_add(buffer, gw, true);
        cast_node();
        if (!last_use) return;
        T f = grad_out(w);
        drop(buffer.sum);
        sink(w, f);
    }
    // The same for an input cast by autocast (input_cast) or not: its gradient goes to pass_input.
    template <class Sink, class PassInput>
    void hf_mm_outputs(int w, T gw, T& input, bool input_cast, bool last_use, Sink sink, PassInput pass_input) {
        hf_mm_outputs(
            w, gw, last_use, sink,
            [&] {
                if (!input_cast) pass_input(input);
            },
            [&] {
                if (!input_cast) return;
                input = hf_uncast(input);
                pass_input(input);
            });
    }
    // A GEMM node's end: under autocast it saved the weight's copy first (hf_linear_input).
    void hf_mm_node_end(int w, std::initializer_list<T*> saved, T* grad_in);
    // Under autocast, a linear with a bias (AddmmBackward0): it saved the input's copy, then the
    // weight's; the bias's gradient (bf16, summed over the tokens) is returned.
    T hf_addmm_node_end(int w, int b, std::initializer_list<T*> saved, T* grad_in);
    void hf_eager_forward(HfLayer& sv, T qe, T ke, T v, T& attn_out, T& weights);
    void hf_o_proj_forward(HfLayer& sv, T o, T qe, T ke, T v, T& attn_out);
    void hf_eager_backward(HfLayer& sv, T d_o, T& dq, T& dk, T& dv);
    T hf_sinks_backward(HfLayer& sv, T gp);  // gpt-oss: attn_weights' gradient (consumed) -> the masked scores
    // Eager attention's [B, S, H, D] and [B, H, S, D] memory orders coincide: one head per rank or one position.
    bool hf_one_row() const { return m_.num_heads / s_.sp == 1 || s_.seq_len == 1; }
    // Under autocast Qwen3's head norms leave q and k fp32 (their fp32 weight times the bf16 value).
    bool hf_fp32_heads() const { return amp_ && m_.qk_norm && !m_.gemma(); }
    // Whether the rotated q is [B, heads, S, D] in memory: a cat's output (Phi-3's rotated and passed
    // shares, gpt-oss's halves); else it keeps the projection's [B, S, heads, D] order.
    bool hf_q_heads_first() const { return m_.rotary_concatenates() || m_.rotary_half_tables(); }
    T hf_rope_forward(T x, std::int64_t heads, T& cos_saved, T& sin_saved, T& cos2, T& sin2);
    T hf_rope_backward(T d, std::int64_t heads, T& cos_saved, T& sin_saved, T& cos2, T& sin2, T* pass = nullptr);
    T hf_rope_slices_backward(T pass, T rotated, std::int64_t heads);  // Phi-3's partial rotary
    void hf_packed_check();  // flash_attention_2's per-layer packed-sequence check (a single row)
    void hf_flash_forward(HfLayer& sv, T qe, T ke, T v, T& out);
    void hf_flash_backward(HfLayer& sv, T d_o, T& dq, T& dk, T& dv);
    T hf_mlp_chunk_forward(const LayerParams& lp, T x, std::int64_t n, HfMlpChunk& c);
    // last_use: the chunk is the last whose gradients the weights' autocast copies wait for.
    T hf_mlp_chunk_backward(const LayerParams& lp, HfMlpChunk& c, T& dy, bool view_sum, bool last_use, WeightGradRef weight_grad);
    // Phi-3's product, activation and split backward from d_m (consumed): gate_up_proj's output gradient [n, 2I].
    T hf_fused_act_backward(HfMlpChunk& c, T& gm);
    T hf_mlp_forward(const LayerParams& lp, T h2, HfLayer& sv, bool stop_after_last_save);
    T hf_mlp_backward(const LayerParams& lp, HfLayer& sv, T dy);
    T hf_tiled_mlp_backward(const LayerParams& lp, HfLayer& sv, T dy);
    T hf_block_chunk_forward(const LayerParams& lp, T x, std::int64_t n, HfMlpChunk* c, HfMoe* e, bool stop_after_last_save,
                             std::span<T> earlier);
    std::vector<T> hf_chunk_outputs_;  // hf_mlp_forward's list of chunk outputs (kept: no allocation per layer)
    // What the MLP block returns besides its output, which the decoder layer's `_` holds until it
    // returns (gpt-oss's router scores, unchunked; python/mst_hf's chunk loops drop each chunk's).
    T hf_mlp_aux_;
    // A Mixture-of-Experts block on n tokens of x (moe.cpp): returns its output [n, d] (invalid
    // when a checkpoint's recomputation stops at the block's last save; `earlier`: the outputs of
    // the chunks before this one, which the loop's list holds until then).
    T hf_moe_forward(const LayerParams& lp, T x, std::int64_t n, HfMoe& c, bool stop_after_last_save, std::span<T> earlier);
    // Bytes per element of the MLP block's output: down_proj's bf16, or the experts' weighted sum in
    // the stream's dtype (Mixtral casts its fp32 sum; Qwen3-MoE's bf16 sum is fp32 under autocast,
    // whose experts run in fp32).
    int hf_mlp_out_bytes() const { return m_.moe ? rb_ : 2; }
    // dy: the output's gradient (consumed); returns the input's gradient [n, d]. Each weight's
    // gradient goes to weight_grad(param, grad) as its node finishes (as hf_mlp_chunk_backward's).
    // last_use: as hf_mlp_chunk_backward's (the router's autocast copy is shared by the chunks).
    T hf_moe_backward(const LayerParams& lp, HfMoe& c, T dy, bool last_use, WeightGradRef weight_grad);
    T hf_gpt_oss_gate_backward(HfMoe& c, T gprod, std::int64_t S);  // the activation's: d(gated) -> d(gate_up)
    void hf_model_tensors();            // position ids, the packed-sequence check, rotary tables
    T hf_eager_mask(bool sliding);      // masking_utils' additive mask for eager attention
    void hf_head_forward(T x_last, HeadSaved& hs);
    T hf_head_backward(HeadSaved& hs);  // returns the residual-stream gradient
    // One chunk's logits (z, fp32; Gemma-2: z capped and t its tanh) and summed loss; with_grad:
    // z turned into the logits' gradient in place.
    // h: under autocast the chunk's bf16 copy of the fp32 hidden states (the caller's; with
    // gradients it lives until the chunk's backward returns, without them it dies with the logits).
    void hf_chunk_loss(std::int64_t n, bool with_grad, T& h, T& z, T& t, T& loss);
    T hf_chunk_backward(std::int64_t n);
    void hf_chunked_loss_forward(T h, HeadSaved& hs);
    T hf_chunked_loss_backward(HeadSaved& hs, T grad_in);
    void hf_optimizer_step();
    void hf_release_frame();            // a checkpointed layer's frame dies (its inputs are freed)
    // A checkpoint's recomputation has reached its last save: the stop unwinds out of the
    // recomputation's autocast region (its cache emptied, still in the recompute) before the
    // checkpoint catches it; the frames' locals go when the exception is dropped, in the backward.
    void hf_recomputation_stopped() {
        clear_autocast_cache();
        phase_ = Phase::Backward;
    }
    void hf_grad_hooks(int p);          // p's post-accumulate-grad hooks (python/mst_hf/optim.py)
    void hf_step_temporaries(bytes_t state_bytes);  // what torch.optim allocates stepping one parameter
    // The end of an autograd node's evaluation (torch/csrc/autograd/engine.cpp): tensors its
    // apply unpacked die with apply when checkpointing recomputed them (nothing else holds them;
    // in reverse unpack order); then validate_outputs reduces broadcast gradients (`reduce`);
    // then the node's input gradient is released; then, otherwise, its saved variables, in
    // `saved`'s order (the node's release_variables).
    template <class Reduce>
    void node_end(std::span<T* const> saved, T* grad_in, Reduce reduce) {
        if (recomputed_)
            for (auto it = saved.rbegin(); it != saved.rend(); ++it) drop(**it);
        reduce();
        if (grad_in) drop(*grad_in);
        if (!recomputed_)
            for (T* t : saved) drop(*t);
    }
    template <class Reduce>
    void node_end(std::initializer_list<T*> saved, T* grad_in, Reduce reduce) {
        node_end(std::span<T* const>(saved.begin(), saved.size()), grad_in, reduce);
    }
    void node_end(std::initializer_list<T*> saved, T* grad_in) { node_end(saved, grad_in, [] {}); }
    // The same for a custom autograd.Function (a PyNode): recomputed saved tensors are the locals
    // its backward unpacked ctx.saved_tensors into, which die in order when it returns.
    // Its input gradient goes as its apply returns, before validate_outputs (`validate`), its saved
    // tensors after.
    template <class Validate>
    void py_node_end(std::span<T* const> saved, T* grad_in, Validate validate) {
        if (recomputed_)
            for (T* t : saved) drop(*t);
        if (grad_in) drop(*grad_in);
        validate();
        if (!recomputed_)
            for (T* t : saved) drop(*t);
    }
    void py_node_end(std::span<T* const> saved, T* grad_in) { py_node_end(saved, grad_in, [] {}); }
    template <class Validate>
    void py_node_end(std::initializer_list<T*> saved, T* grad_in, Validate validate) {
        py_node_end(std::span<T* const>(saved.begin(), saved.size()), grad_in, validate);
    }
    void py_node_end(std::initializer_list<T*> saved, T* grad_in) {
        py_node_end(std::span<T* const>(saved.begin(), saved.size()), grad_in);
    }
    // autograd's InputBuffer: a second gradient of one tensor is added into the first in place,
    // unless the first is a view (its storage is shared with a base): then the sum is a new tensor.
    void accumulate(T& acc, T g, bool acc_is_view);
    void buffer_add(GradBuffer& b, T g, bool view);  // one more gradient reaches a node's buffer
    T grad_out(int p);  // the output of a gradient op for p ([out, in] for a weight)
    // One more gradient of p reaches its AccumulateGrad node's input buffer (a weight's: the
    // transpose of its GEMM's output, a view); the last one (`last`) lets the node run: it makes
    // the buffer p's .grad (or adds it into .grad in place) and runs p's hooks.
    void add_grad(int p, T g, bool view, bool last);
    void accumulate_grad_run(int p);  // p's AccumulateGrad node runs on its buffer (add_grad's last)
    void hf_classify();                 // saved vs transient activations, by what outlived its phase
    // DistributedDataParallel's gradient buckets (ddp.cpp), allocated with the persistent state.
    void hf_ddp_buckets();
    void hf_ddp_sync_buffers();  // each forward's broadcast of the module's buffers
    // The model's registered buffers (named_buffers order), as init_state holds them.
    struct HfBuffer {
        const char* name;
        int element_bytes;  // the dtype
        bytes_t bytes;
    };
    std::vector<HfBuffer> hf_buffers() const;
    // The tensors the hf model holds from step to step besides its parameters: its buffers, then
    // the plain attributes a forward computes and keeps (longrope's long_inv_freq).
    void init_hf_buffers();
    bool hf_ddp() const { return hf_ && s_.dp > 1 && !ds_on_ && !fsdp2_on_; }
    static constexpr bytes_t kDdpFirstBucketBytes = bytes_t{1} << 20;  // torch's _DEFAULT_FIRST_BUCKET_BYTES
    static constexpr bytes_t kDdpBucketBytes = 25 * (bytes_t{1} << 20);  // bucket_cap_mb's default
    // ---- DeepSpeed's ZeRO-1/2 engine in the hf runtime (deepspeed.cpp) ----
    void ds_init_state();                 // the flat parameters, this rank's partition and its states
    void ds_loss_scaling();               // engine.backward: loss / accumulation steps, x the loss scale
    void ds_grad_hook(int p);             // the engine's hook on p's AccumulateGrad
    void ds_after_backward(T& root);      // backward() returned: ZeRO-1's reduction, the epilogue
    void ds_optimizer_step();
    void ds_reduce_bucket();              // reduce_ipg_grads
    void ds_take_into_bucket(int p);      // reduce_independent_p_g_buckets_and_remove_grads
    void ds_copy_into_partition(int p);   // copy_grads_in_partition
    T ds_is_invalid(bytes_t element);     // (~isfinite(x) | (x < 0)).any() of a scalar x: returns the bool
    T ds_isfinite(bytes_t element);       // torch.isfinite of a scalar x: returns the bool
    T ds_then(T& from, const char* name, bytes_t bytes);  // an op on `from`, which then goes: returns its result
    void ds_clip(bytes_t element);        // unscale_and_clip_grads' scalars
    bool ds_on_ = false;  // s_.deepspeed_zero()
    struct DsPiece {
        int param;
        std::int64_t numel;  // of the param's elements, those in this rank's partition
    };
    struct DeepSpeedState {
        std::vector<std::int64_t> start;  // per parameter (params_ index): its first element in the flat buffer
        std::int64_t partition = 0, lo = 0, hi = 0;  // elements per rank; this rank's [lo, hi)
        std::vector<DsPiece> pieces;      // this rank's partition, in flat order
        std::int64_t pad = 0;             // the partition's elements past every parameter (the padding's)
        std::int64_t partition_grads = 0; // grads_in_partition: every parameter the partition touches, whole
        // The gradient bucket, from a backward's first hook to its epilogue (ZeRO-1's: from the first
        // micro-step's first hook to the last one's epilogue); with overlap_comm two of them, the
        // gradients going to the other (index) after each reduction that overflows one
        T bucket[2];
        int index = 0;
        std::int64_t elements = 0;        // in the bucket
        std::vector<int> in_bucket;       // its parameters, in hook order
        int extra = -1;                   // a parameter too large for the bucket, its gradient reduced where it is
        // ZeRO-1 keeps the .grad of other partitions' parameters to the epilogue: per parameter, such a
        // gradient too large for the bucket (its own tensor); the others are views of a bucket, which
        // goes with the last of them in parameter order (per bucket: that parameter, the one starting
        // furthest into the flat buffer)
        std::vector<T> held;
        int last_view[2] = {-1, -1};
        T partition_grad;                 // grads_in_partition of this backward
        T averaged;                       // the partition's gradients kept for the step (the first backward's)
        T pad_zeros;                      // the step's zero piece past the parameters (a partition with padding)
        std::vector<std::int64_t> slices; // a reduction's slices (scratch)
        T loss_div, loss_mul;             // engine.backward's scaled losses
        T global_norm;                    // the engine's gradient norm of the last step
    } ds_;
    bool ds_in_partition(int p) const;
    // The partition's master copy and its AdamW states: fp32, or bf16 with DeepSpeed's bf16 master
    // flags (precision pure-bf16)
    int ds_master_bytes() const { return s_.precision == Precision::PureBf16 ? 2 : 4; }
    // ---- DeepSpeed's ZeRO-3 engine in the hf runtime (zero3.cpp) ----
    void z3_build();                      // the modules, their hooks' order and the coordinator
    void z3_init_state();
    // A module's hook (its fetch or release, in forward or backward): what the coordinator gathers and frees then.
    void z3_hook(Z3Hook::Kind kind, int module, bool forward);
    void z3_fetch(int module, bool forward = true) {
        if (z3_on_) z3_hook(Z3Hook::Fetch, module, forward);
    }
    void z3_release(int module, bool forward = true) {
        if (z3_on_) z3_hook(Z3Hook::Release, module, forward);
    }
    // The hooks of the module that owns parameter p (a linear layer or a norm): the pre-backward
    // fetch as its output's gradient arrives, the post-backward release as its input's leaves.
    // (A leaf module's children have no hooks: its own fetch and release cover their parameters.)
    void z3_fetch_of(int p, bool forward = true) {
        if (z3_on_ && !z3_.leaf[static_cast<std::size_t>(p)]) z3_hook(Z3Hook::Fetch, z3_.module_of[static_cast<std::size_t>(p)], forward);
    }
    void z3_release_of(int p, bool forward = true) {
        if (z3_on_ && !z3_.leaf[static_cast<std::size_t>(p)]) z3_hook(Z3Hook::Release, z3_.module_of[static_cast<std::size_t>(p)], forward);
    }
    void z3_apply(std::span<const Z3Event> events);
    // The gathered copy of parameter p (its own buffer, or its copy out of a coalesced gather), one holder more.
    T z3_hold_gathered(int p) { return hold(z3_.gathered[static_cast<std::size_t>(z3_.ds_id[static_cast<std::size_t>(p)])]); }
    // A checkpointed layer's recompute saves a parameter (a linear's weight and bias, a norm's weight) as
    // checkpointing's pack hook does, a detached alias of the gathered storage current then
    // (torch/utils/checkpoint.py): it holds that storage until the node's backward has run, whatever
    // DeepSpeed releases meanwhile.
    T z3_recompute_alias(int p) {
        if (!z3_on_ || phase_ != Phase::Recompute || !grad_ || hf_leaf_input_) return T{};  // (not the tiled MLP's replay)
        return z3_hold_gathered(p);
    }
    void z3_alias(int p) {
        if (T alias = z3_recompute_alias(p); alias.valid())
            z3_.aliases[static_cast<std::size_t>(z3_.ds_id[static_cast<std::size_t>(p)])].push_back(alias);
    }
    // What a grouped_mm saves of a stacked expert weight under ZeRO-3 (HfMoe::w_up): Mixtral's and
    // Qwen3-MoE's transpose is a view of the gathered storage, in any pass autograd records (not a
    // checkpointed layer's first); gpt-oss's weight, used as stored, is the Parameter itself, which holds
    // nothing DeepSpeed releases, but a recompute saves a detached alias of it.
    T z3_saved_weight(int p) {
        if (m_.moe->gpt_oss) return z3_recompute_alias(p);
        return z3_on_ && grad_ ? z3_hold_gathered(p) : T{};
    }
    T z3_mlp_backward(const LayerParams& lp, HfMlpChunk& c, T& dy, bool last_use);  // one chunk's backward: its input's gradient
    T z3_tiled_mlp_backward(const LayerParams& lp, HfLayer& sv, T dy);  // python/mst_hf's tiled MLP (ALST's way)
    bool z3_grad_held_ = false;  // ds_grad_is_ready False: DeepSpeed's gradient hook adds nothing yet
    void z3_grad_hook(int p);             // reduce_independent_p_g_buckets_and_remove_grads
    void z3_flush();                      // __reduce_and_partition_ipg_grads
    void z3_after_backward(T& root);      // the epilogue's flush, release_backward_leftovers
    void z3_leaf_backward_end();          // an MoE block's input has its gradient: its backward hook, its release
    bool z3_leaf_block() const { return z3_on_ && m_.moe && !m_.moe->gpt_oss; }  // Mixtral's, Qwen3-MoE's: a leaf module
    void z3_optimizer_step();
    bool z3_on_ = false;  // s_.deepspeed_zero3()
    struct Z3Layer {
        int layer, attn, q, k, v, o, mlp, gate, up, down, act, input_ln, post_ln;
        int q_norm = -1, k_norm = -1;  // Qwen3's head norms (modules of the attention)
        // Phi-3's residual dropouts (no parameters; p = 0 returns its input): their hooks count
        int attn_dropout = -1, mlp_dropout = -1;
        int post_attn_ln = -1, post_ff_ln = -1;  // Gemma's norms of each branch's output (post_ln: pre-feedforward)
        int router = -1, experts = -1;            // gpt-oss's MoE block (no leaf): its router and experts modules
        std::array<int, 3> leaf_params{-1, -1, -1};  // an MoE block's (leaf `mlp`): its parameters in model.parameters() order
    };
    struct Zero3State {
        std::unique_ptr<Zero3Coordinator> coordinator;
        int root = -1, model = -1, embed = -1, norm = -1, rotary = -1, lm_head = -1;  // modules
        std::vector<Z3Layer> layers;
        std::vector<int> module_of;       // per parameter (params_ index): the module that owns it
        std::vector<int> ds_id;           // per parameter: its place in model.parameters()
        std::vector<char> leaf;           // per parameter: owned by a leaf module (an MoE block), reduced by its hook
        std::vector<char> layer_child;    // per module: a decoder layer's direct child
        std::vector<T> gathered;          // per ds_id: the gathered parameter (its own buffer, or its copy)
        std::vector<T> flats;             // per gather of the micro-step: a coalesced gather's flat buffer
        std::vector<std::vector<T>> aliases;  // per ds_id: the recompute's saved aliases (z3_alias), the last used first
        std::vector<std::int64_t> sub_groups;  // the optimizer's sub-groups: partition elements each
        std::int64_t elements = 0;        // in the gradient bucket
        std::vector<int> in_bucket;       // its parameters (params_ indices), in hook order
        T global_norm;                    // the engine's gradient norm of the last step (fp64)
    } z3_;
    // ---- torch's FSDP2 in the hf runtime (fsdp2.cpp) ----
    // fully_shard on every decoder layer, then on the model: one parameter group per layer (group
    // 1 + l) and the root's (group 0: the embedding, the final norm, the LM head). What each hook
    // allocates and frees, in torch's order; the tensors between them are the plain step's.
    bool fsdp2_on_ = false;  // s_.fsdp2_shards()
    bool fsdp2_no_sync_ = false;  // s_.fsdp2_no_sync: only the last micro-step reduce-scatters
    bool fsdp2_keep_gathered_ = false;  // !s_.fsdp2_reshard_after_forward: layers whole from forward to post-backward
    // accelerate's groups (s_.fsdp2_groups): group 0 is the tail (final norm, tied embedding, LM head), and an
    // untied embedding has a group of its own, the last (fsdp2_embedding_group)
    bool fsdp2_accelerate_ = false;
    // Axolotl's groups: the root (group 0, as mst_hf's) reshards after its forward as the layers do, and is
    // gathered again by its pre-backward (reshard_after_forward, which its fully_shard(model) is given)
    bool fsdp2_root_reshards_ = false;
    // torch 2.14's FSDP2 (Axolotl's: it requires torch < 2.15). It frees the forward's held all-gather buffer
    // where torch 2.15 does, but through a local (`if prev := comm_ctx.all_gather_state`) that keeps it until
    // the function returns: a layer's after its copy-out (wait_for_unshard), the last one after the output
    // cast (_post_forward). torch 2.15 releases it in a method of its own, before both.
    bool fsdp2_torch_2_14_ = false;
    // Bytes per element of the stored shards and of the reduce-scatter (its reduce dtype): bf16 for pure
    // bf16, fp32 for bf16-master (fp32 parameters, gathered in bf16 by its mixed-precision policy; the
    // whole parameters and their gradients are pw_'s and pg_'s, bf16), whose reduce dtype is bf16 under
    // accelerate's policy (TrainingSetup::fsdp2_reduce_bytes)
    int fsdp2_store_ = 2, fsdp2_reduce_ = 2;
    struct Fsdp2Group {
        std::vector<int> params;  // in model.parameters() order
        std::int64_t shard = 0;   // elements per rank: the sum of its parameters' padded shards
        T gathered;               // backward: its prefetched all-gather's output, until its copy-out
    };
    struct Fsdp2State {
        std::vector<Fsdp2Group> groups;
        std::vector<T> whole;  // per parameter (params_ index): its unsharded copy while the group is unsharded
        std::vector<T> sharded_grads;  // per parameter: its sharded gradient (a view of its group's reduce-scatter output)
        T held_gather;         // forward: the last all-gather's output, kept until the next all-gather
        T reduce_input;        // the last reduce-scatter's input, kept until the next one or backward's end
        std::vector<int> reduced;  // fsdp2_reduce's scratch: the parameters with a gradient
    } fsdp2_;
    std::int64_t fsdp2_shard_rows(int p) const;  // its padded shard's rows: ceil(rows / dp)
    std::int64_t fsdp2_local_rows(int p) const;  // this rank's rows of it (fewer on the last ranks, or none)
    std::int64_t fsdp2_elements(int p, std::int64_t rows) const;  // the elements of `rows` of parameter p
    void fsdp2_build();
    T fsdp2_all_gather(int group);         // its output buffer
    void fsdp2_copy_out(int group);        // the whole parameters, out of the all-gather's buffer
    void fsdp2_pre_forward(int group);     // all-gather, free the held one, copy out; hold this one
    void fsdp2_reshard(int group);         // free the whole parameters
    // the model's forward returns: the root reshards (Axolotl's), the held all-gather goes, the output cast
    // replaces the loss (fsdp2_casts_outputs)
    void fsdp2_root_post_forward(T& loss);
    void fsdp2_root_pre_backward();        // the model's output's gradient: the root's unshard, the last layer's prefetch
    void fsdp2_prefetch(int group);        // backward: the next group's all-gather
    // copy out, free the all-gather, prefetch the group before (`resharded`: a group resharded since its forward,
    // gathered again even where the layers are kept gathered)
    void fsdp2_pre_backward(int group, bool resharded = false);
    void fsdp2_post_backward(int group);   // reshard, reduce-scatter the gradients
    void fsdp2_reduce(int group);          // reduce-scatter the gradients its parameters have
    // The parameter whose shard p's is (torchtitan's tied LM head: the embedding), or -1.
    int fsdp2_same_shard(int p) const { return titan_ && m_.tie_word_embeddings && p == lm_head_ ? embed_ : -1; }
    void fsdp2_after_backward();           // the root's post-backward, then the final callback
    static int fsdp2_layer_group(int l) { return 1 + l; }
    // Group 0: the root's (mst_hf) or accelerate's tail; 1 + l: layer l; accelerate's untied embedding: after them.
    // accelerate's policy under bf16=True (bf16-master: MixedPrecisionPolicy(bf16, bf16, output_dtype=bf16)) casts the
    // root's floating outputs to bf16: the fp32 loss becomes a bf16 copy, and its gradient comes back through a cast
    bool fsdp2_casts_outputs() const { return fsdp2_on_ && s_.fsdp2_output_bf16(); }
    bytes_t hf_loss_bytes() const { return fsdp2_casts_outputs() ? 2 : 4; }  // the model's loss: fp32, or that cast
    bool fsdp2_own_embedding_group() const { return fsdp2_on_ && s_.fsdp2_embedding_alone(m_); }
    int fsdp2_embedding_group() const { return fsdp2_own_embedding_group() ? static_cast<int>(m_.num_layers) + 1 : 0; }
    // The embedding's post-forward (accelerate's own group: resharded as the layers are) and pre-backward
    void fsdp2_embedding_post_forward();
    void fsdp2_embedding_pre_backward();
    // The pre-backward hook that prefetches the last layer: the root's (mst_hf), accelerate's tail's (on the logits)
    void fsdp2_prefetch_last_layer();
    // Whether a gradient of p reaches it cast to the reduce dtype: under the bf16 policy, in an unsynced
    // micro-step, while p has no gradient yet (its grad_dtype is fp32 then: the engine's validate_outputs
    // casts each contribution); and the cast (+ fp32, - the bf16 gradient).
    bool fsdp2_upcasts(int p) const {
        return fsdp2_no_sync_ && fsdp2_reduce_ != pg_ && micro_ < tl_.micro_steps_recorded - 1 &&
               !params_[static_cast<std::size_t>(p)].grad.valid();
    }
    T fsdp2_upcast(int p, T g);  // (g itself where it is fp32 already)
    // The same in the validate_outputs of the node whose output reaches p's AccumulateGrad directly.
    void fsdp2_upcast_output(int p, T& g) {
        if (fsdp2_upcasts(p)) g = fsdp2_upcast(p, g);
    }
    // Set on the run that finds DDP's bucket order: each parameter as its gradient becomes ready
    // in the first micro-step's backward (AccumulateGrad's hooks run).
    std::vector<int>* grad_ready_ = nullptr;

    const ModelSpec& m_;
    const TrainingSetup& s_;
    const GpuProfile& gpu_;

    // bytes per element
    int pw_ = 2;   // parameter storage
    int pg_ = 2;   // gradient
    int rb_ = 2;   // residual stream / norm outputs
    std::int64_t tokens_ = 0;  // per rank outside attention (B * S / sp)
    std::int64_t rank_ = 0;  // walk_rank

    std::vector<Param> params_;
    std::vector<int> order_;  // params_ in the order the runtime holds them (hf: model.parameters())
    std::vector<LayerParams> layer_params_;
    int embed_ = -1, final_norm_ = -1, lm_head_ = -1;  // lm_head_ == embed_ when tied
    std::vector<int> autocast_cache_;                   // params whose copy the cache holds
    T autocast_leaf_;                                   // hf: the cached copy of a leaf input (the tiled MLP's replay)
    bool hf_leaf_input_ = false;                        // hf: the MLP's input is a leaf (the tiled MLP's replay)
    std::vector<T> gathered_;                           // ZeRO-3: per unit (index unit + 1)
    std::vector<bytes_t> unit_bytes_;                   // and its gathered bytes (unit_bytes)

    // tensor table and the timeline being written
    std::vector<TableEntry> table_;
    Timeline tl_;
    bool record_ = true;
    bytes_t live_ = 0, host_live_ = 0;
    MemoryPeaks peaks_;
    PeakRun peak_run_;
    // Running peaks for the fast path (the recorded timeline gets the same from its views). Called
    // for every allocation and free: the limits are checked only when a peak rises.
    void account(std::int64_t id, bytes_t bytes, Device device, bool alloc) {
        if (device == Device::Host) [[unlikely]] {
            account_host(bytes, alloc);
            return;
        }
        live_ = checked_add(live_, alloc ? bytes : -bytes, "live bytes");
        if (live_ > peaks_.peak_bytes) {
            peaks_.peak_bytes = live_;
            if (live_ > peak_run_.limits.gpu_bytes) over_budget();
        }
        if (peak_run_.capture) peak_run_.scratch->gpu_events.push_back(GpuEvent{id, alloc ? bytes : -1});
    }
    void account_host(bytes_t bytes, bool alloc);
    [[noreturn]] static void over_budget();
    bool grad_ = true;
    // Autograd builds the graph (grad_ or not): off under torch.no_grad(), on in a checkpoint's
    // first forward, whose pack hook only lets go of what the nodes save (NoGrad's `graph`).
    bool graph_ = true;
    bool hf_ = false;          // s_.runtime == Runtime::Hf
    // ---- torchtitan's model code in the hf runtime (titan.cpp, docs/torchtitan-model.md) ----
    bool titan_ = false;       // s_.titan()
    bool titan_chunked_loss() const { return titan_ && s_.lm_chunks > 1; }  // torchtitan's ChunkedLossWrapper
    // the step's own tensors: its valid-token count; each micro-batch's input and positions (written back into the
    // step's batch dicts: held to its end); the last micro-batch's labels and loss (each replaced by the next's)
    T titan_valid_, titan_labels_, titan_loss_;
    std::vector<T> titan_inputs_;
    // the flex block mask's document ids and offsets and its eight int32 block tensors, held through backward
    std::vector<T> titan_mask_;
    void titan_micro_step(int micro);
    void titan_middle_micro_steps();
    void titan_held_inputs();
    void titan_zero_grad();
    void titan_block_mask();
    std::vector<T> titan_mask_mod();          // the tensors the mask_mod closes over: one row
    std::vector<T> titan_mask_mod_batched();  // (micro-batch above 1)
    T titan_norm_forward(T x, TitanNorm& sv);
    T titan_norm_backward(int p, TitanNorm& sv, T g);  // returns d(input); the weight's gradient to p
    T titan_layer_forward(int l, T x, LayerSaved& sv);
    void titan_layer_backward(int l, LayerSaved& sv, T& dres);
    void titan_attention_forward(TitanLayer& t, T h1, T& out);
    T titan_attention_backward(const LayerParams& lp, TitanLayer& t, T d_out);
    T titan_mm_backward(int p, T& g, T& x_saved, bytes_t input_grad_bytes);  // a linear's weight and input gradients
    void titan_head_forward(T x_last, HeadSaved& hs);
    T titan_head_backward(HeadSaved& hs);
    void titan_chunked_head_forward(T x_last, HeadSaved& hs);
    T titan_chunked_head_backward(HeadSaved& hs);
    T titan_cross_entropy(std::int64_t rows, bool to_backward, T& logp, T& weight);  // returns the loss
    T titan_cross_entropy_backward(std::int64_t rows, T root, T& weight, T& logp);  // returns the logits' gradient
    void titan_optimizer_step();
    bool amp_ = false;         // hf under autocast (precision amp): fp32 weights, residual stream and norms
    bool recomputed_ = false;  // hf backward of a checkpointed layer: its saved tensors were recomputed
    // hf: the rotary tables of this micro-step, cos and sin [1, S, head_dim] bf16: one pair, or for
    // Gemma-3 one per layer type in the order transformers iterates a set of the types (full
    // attention, then sliding, when PYTHONHASHSEED=0; the pairs are alike in size).
    struct HfRope {
        T cos, sin;
    };
    std::array<HfRope, 2> hf_rope_;
    bool rope_table_used(std::size_t table) const;
    HfRope& hf_rope(std::int32_t l) {
        return hf_rope_[m_.rotary_per_layer_type() && m_.sliding_layers[static_cast<std::size_t>(l)] ? 1 : 0];
    }
    T hf_positions_, hf_embeddings_;  // hf: cache_position and the embeddings, held by the model's forward
    T hf_embed_scale_;  // hf Gemma: the embedding scale's bf16 copy its product saves (FSDP2 over an fp32 model)
    // hf eager: the 4-D additive masks [B, 1, S, S] bf16 the model builds, full and sliding-window
    // (the mapping's order), and which one a layer reads.
    std::array<T, 2> hf_masks_;
    T& hf_mask(int l) { return hf_masks_[m_.sliding_layers[static_cast<std::size_t>(l)] ? 1 : 0]; }
    std::vector<T> hf_frame_;  // hf: what the checkpointed layer being backpropagated keeps (its inputs)
    // hf: that layer's recomputation, run by the first node of its backward that unpacks a saved
    // tensor (unpack()): down_proj's, or Gemma-2's post-MLP norm's product after its cast.
    std::function<void()> pending_recompute_;
    void unpack() {
        if (pending_recompute_) std::exchange(pending_recompute_, {})();
    }
    Phase phase_ = Phase::Init;
    std::int32_t layer_ = -1;
    std::int32_t micro_ = 0;
    const char* op_ = "";

    friend class NoGrad;
};

// torch.no_grad() for the duration of a scope; with `graph`, a checkpoint's first forward instead:
// autograd records, but nothing a node saves is kept.
class NoGrad {
public:
    explicit NoGrad(StepBuilder& b, bool graph = false) : b_(b), prev_(b.grad_), prev_graph_(b.graph_) {
        b_.grad_ = false;
        b_.graph_ = graph && b.graph_;
    }
    ~NoGrad() { b_.grad_ = prev_, b_.graph_ = prev_graph_; }
    NoGrad(const NoGrad&) = delete;
    NoGrad& operator=(const NoGrad&) = delete;

private:
    StepBuilder& b_;
    bool prev_, prev_graph_;
};

}  // namespace mst::sim
