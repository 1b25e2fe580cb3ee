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
#include <limits>
#include <vector>

#include "mst/gpu.hpp"
#include "mst/model.hpp"
#include "mst/simulate.hpp"
#include "mst/setup.hpp"
#include "mst/timeline.hpp"

namespace mst::sim {

struct T {
    std::int64_t id = -1;
    bool valid() const { return id >= 0; }
};

// One parameter tensor (bias folded into its weight) and its gradient's life.
struct Param {
    const char* name = "";
    std::int32_t layer = -1;
    std::int64_t numel = 0;
    T weight;                 // the stored parameter (a shard under ZeRO-3)
    T grad;                   // full gradient, live between its first write and the step (or reduce)
    T amp_copy;               // AmpFp32: the autocast cache's bf16 copy, while cached
    std::vector<T> amp_saved; // AmpFp32: that copy, once per op that saved it for backward
};

// Parameter indices of one decoder layer.
struct LayerParams {
    int norm1, q, k, v, o, post_attn_norm = -1, norm2, post_ff_norm = -1, gate, up, down;
};

// What one layer's forward left for its backward.
struct MlpChunk {
    T g, u, m;
    std::int64_t tokens = 0;
};
struct LayerSaved {
    T x, h1, rstd1;
    T q, k, v, o, lse;                       // flash
    T k_rep, v_rep, probs32, probs, scores_tanh;  // eager
    T o_seq;                                 // Ulysses: o back in sequence layout
    T a, rstd_pa;                            // Gemma-2 post-attention norm
    T x2, h2, rstd2;
    std::vector<MlpChunk> mlp;               // Loop: one entry per chunk
    T y, rstd_pf;                            // Gemma-2 post-feed-forward norm
};

struct HeadSaved {
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

// A GPU allocation or free of a peaks-only run, as the caching-allocator model replays it
// (PeakSimulator, peaks.cpp): the model needs only the order, the tensor and the bytes.
struct GpuEvent {
    std::int64_t tensor;
    bytes_t bytes;  // -1: the tensor's free
};

// The memory a peaks-only StepBuilder takes over from the previous one and hands back (the
// tuner and max-seq run hundreds of steps; growing these from empty each time costs more
// than a short step): its tensor table, and the GPU events it captures.
struct PeakScratch {
    std::vector<TableEntry> table;
    std::vector<GpuEvent> gpu_events;
    // Where in gpu_events the first micro-step's forward enters another layer: setups the tuner
    // compares share the step up to the first layer whose knobs differ, so the allocator replay
    // resumes from the last such place they share (peaks.cpp).
    std::vector<std::size_t> boundaries;
};

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

    // ---- sizes ----------------------------------------------------------------
    bytes_t elems(std::int64_t rows, std::int64_t cols, int bytes_per_element) const {
        bytes_t r = 0;
        if (__builtin_mul_overflow(rows, cols, &r) || __builtin_mul_overflow(r, bytes_per_element, &r))
            return checked_product({rows, cols, bytes_per_element}, "tensor size");  // throws, naming the factors
        return r;
    }
    bytes_t bf16(std::int64_t rows, std::int64_t cols) const { return elems(rows, cols, 2); }
    bytes_t f32(std::int64_t rows, std::int64_t cols) const { return elems(rows, cols, 4); }
    // The residual stream and norm outputs: fp32 under AMP (fp32 embedding, fp32 adds), else bf16.
    bytes_t res(std::int64_t rows, std::int64_t cols) const { return elems(rows, cols, rb_); }

    // ---- parameters and their state -------------------------------------------
    void build_params();
    void init_state();                  // weights, master copy, optimizer states, workspace
    void grad_write(int p);             // a weight-gradient GEMM writes into p's gradient
    void grad_done(int p);              // p's gradient is complete for this micro-step
    void use_weight(int p);             // a forward op reads p (AMP: autocast copy, saved)
    void release_weight(int p);         // that op's backward is done with it
    void clear_autocast_cache();
    void gather_unit(int unit);         // ZeRO-3: all-gather a unit's parameters (unit -1 = embedding, L = head)
    void enter_unit(int unit, int dir); // gather it and prefetch the next ones in direction dir
    void release_unit(int unit);
    bytes_t unit_bytes(int unit) const;
    int zero_stage() const;             // the stage in effect (0 when dp == 1)
    // AMP: a linear's fp32 input is cast to a bf16 copy that the linear saves.
    T cast_for_matmul(T& x, std::int64_t cols);
    T uncast_grad(T& g, std::int64_t cols);  // the cast's backward: bf16 grad -> fp32

    // ---- ops (attention.cpp, mlp.cpp, lm_head.cpp) ---------------------------
    T layer_forward(int l, T x, LayerSaved& sv, Category out_category);
    void layer_backward(int l, LayerSaved& sv, T dres);
    void attention_forward(int l, T h1, LayerSaved& sv, T& attn_out);
    T attention_backward(int l, LayerSaved& sv, T d_attn_out);  // returns dh1
    T mlp_forward(int l, T h2, LayerSaved& sv);                   // returns y
    T mlp_backward(int l, LayerSaved& sv, T dy);                  // returns dh2
    void mlp_chunk_forward(const LayerParams& lp, std::int64_t n, T& y, MlpChunk* keep);
    std::int64_t attention_masks() const;  // eager: 4-D masks the model builds (full and/or sliding)
    // RMSNorm: output of `bpe` bytes per element; rstd (fp32, one per token) kept for backward.
    T norm_forward(T& rstd, int bpe, bool output_saved);  // the caller saves the input
    T norm_backward(int p, T& rstd, T& x_saved, int bpe);  // returns d(norm input)
    // Gemma-2's soft-capping, tanh(x / cap) * cap, as the three bf16 ops eager PyTorch runs
    // (the tanh saves its output); names are {div, tanh, capped} and their gradients.
    using SoftcapNames = std::array<const char*, 3>;
    T softcap_forward(T x, bytes_t bytes, const SoftcapNames& names, T& saved_tanh);
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
    // paths equal.
    std::vector<std::int64_t> transient_chunks(std::int64_t chunks) const;

    void micro_step(int micro);
    void optimizer_step();

    const ModelSpec& m_;
    const TrainingSetup& s_;
    const GpuProfile& gpu_;

    // bytes per element
    int pw_ = 2;   // parameter storage
    int pg_ = 2;   // gradient
    int rb_ = 2;   // residual stream / norm outputs
    std::int64_t tokens_ = 0;  // per rank outside attention (B * S / sp)

    std::vector<Param> params_;
    std::vector<LayerParams> layer_params_;
    int embed_ = -1, final_norm_ = -1, lm_head_ = -1;  // lm_head_ == embed_ when tied
    std::vector<int> autocast_cache_;                   // params whose copy the cache holds
    std::vector<T> gathered_;                           // ZeRO-3: per unit (index unit + 1)

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
        live_ += alloc ? bytes : -bytes;
        if (live_ > peaks_.peak_bytes) {
            peaks_.peak_bytes = live_;
            if (live_ > peak_run_.limits.gpu_bytes) over_budget();
        }
        if (peak_run_.capture) peak_run_.scratch->gpu_events.push_back(GpuEvent{id, alloc ? bytes : -1});
    }
    void account_host(bytes_t bytes, bool alloc);
    [[noreturn]] static void over_budget();
    bool grad_ = true;
    Phase phase_ = Phase::Init;
    std::int32_t layer_ = -1;
    std::int32_t micro_ = 0;
    const char* op_ = "";

    friend class NoGrad;
};

// torch.no_grad() for the duration of a scope.
class NoGrad {
public:
    explicit NoGrad(StepBuilder& b) : b_(b), prev_(b.grad_) { b_.grad_ = false; }
    ~NoGrad() { b_.grad_ = prev_; }
    NoGrad(const NoGrad&) = delete;
    NoGrad& operator=(const NoGrad&) = delete;

private:
    StepBuilder& b_;
    bool prev_;
};

}  // namespace mst::sim
