#pragma once
// DeepSpeed's ZeRO-3 parameter coordinator (deepspeed 0.19.8: runtime/zero/parameter_offload.py,
// partitioned_param_coordinator.py, partition_parameters.py), which decides when each parameter of
// the hf runtime's step is all-gathered and when its gathered copy is freed. It sees modules and
// parameter sizes only; the step builder (zero3.cpp) turns what it decides into tensors.
// docs/deepspeed-zero3-model.md is the specification, section by section.
//
// * Every module has four hooks: its forward pre-hook fetches its own parameters (and prefetches
//   those the trace uses next), its forward hook releases them, and the hooks DeepSpeed wraps
//   around its outputs and inputs fetch and release again in backward. The fetches of one micro-step,
//   in order, are the trace; step ids count them.
// * Fetch: the module's parameters not yet gathered are gathered in one call; a call with one
//   parameter gathers it into a buffer of its own (padded to the ranks), one with more into a flat
//   buffer of all of theirs, each parameter's copy cut out of it when the first of them is waited
//   for; the flat buffer goes when the last of them has been. Then the module's own entries leave
//   the queue of (parameter, step) in trace order, and up to prefetch_bucket_size elements of the
//   next ones not yet gathered are gathered together, while fewer than max_live_parameters are.
// * Release frees a module's parameters unless they are persistent (at most the persistence
//   threshold: gathered from one step to the next), a prefetch has already passed a later use of
//   them, or the trace uses them again within max_reuse_distance elements. DeepSpeed caches that
//   decision per (module, step id) the first time it is asked, in the first micro-step with a
//   complete trace, and never recomputes it: warm_up() walks that micro-step.
#include <cstdint>
#include <map>
#include <span>
#include <utility>
#include <vector>

namespace mst::sim {

// One hook of a micro-step: a module's fetch (pre-forward, or pre-backward with forward false) or
// release (post-forward, post-backward).
struct Z3Hook {
    enum Kind : std::uint8_t { Fetch, Release };
    Kind kind;
    int module;
    bool forward;
    bool operator==(const Z3Hook&) const = default;
};

// What a hook allocates or frees, in order.
struct Z3Event {
    enum Kind : std::uint8_t {
        Single,     // a parameter gathered alone: its buffer (padded to the ranks) is its data
        Flat,       // a coalesced gather's flat buffer (index: the gather)
        Copy,       // a parameter's copy out of its gather's flat buffer, made at the gather's first wait
        FreeFlat,   // the flat buffer, once every parameter of the gather has been waited for
        FreeParam,  // a parameter's gathered data (its Single buffer or its Copy)
    };
    Kind kind;
    int index;               // the parameter, or the gather for Flat and FreeFlat
    std::int64_t elements;   // bf16 elements allocated (0 for frees)
};

struct Z3Config {
    std::int64_t ranks = 1;
    std::int64_t prefetch_bucket = 0;
    std::int64_t max_live = 0;
    std::int64_t max_reuse = 0;
    std::int64_t persistence = 0;
};

class Zero3Coordinator {
public:
    // numel: per parameter, in model.parameters() order (the ds_id order); modules: each module's own
    // parameters in that order (a leaf module's: all of its subtree's); hooks: one micro-step's, in order.
    // subtrees (empty: modules): each module's subtree's parameters; leaves: per module, whether it is a
    // ZeRO-3 leaf (z3_leaf_module), whose release looks ahead through the later modules' subtrees.
    Zero3Coordinator(std::vector<std::int64_t> numel, std::vector<std::vector<int>> modules, std::vector<Z3Hook> hooks,
                     const Z3Config& config, std::vector<std::vector<int>> subtrees = {}, std::vector<char> leaves = {});

    // The first micro-step with a complete trace (it fills the release cache): with gradient
    // accumulation it is a step's second, whose persistent parameters are not gathered yet.
    void warm_up(bool persistent_gathered);
    void begin_micro_step();  // the root module's forward pre-hook: reset_step
    // The next hook of the micro-step, which must be `expected`: its events.
    std::span<const Z3Event> hook(const Z3Hook& expected);
    std::span<const Z3Event> release_leftovers();  // backward's end: modules whose post-backward never ran
    std::span<const Z3Event> release_all();        // the step's start: every gathered parameter, persistent ones too
    std::span<const Z3Event> gather_persistent();  // the step's end: the persistent parameters, one buffer each

    bool persistent(int p) const { return params_[static_cast<std::size_t>(p)].persistent; }
    std::int64_t part(int p) const;    // elements each rank holds
    std::int64_t padded(int p) const { return part(p) * config_.ranks; }
    bool done() const { return next_ == hooks_.size(); }

private:
    enum class Status : std::uint8_t { NotAvailable, Inflight, Available };
    struct Param {
        std::int64_t numel = 0;
        bool persistent = false;
        Status status = Status::NotAvailable;
        int gather = -1;               // its registry entry: the in-flight gather, until its module waits
        std::vector<int> active;       // ds_active_sub_modules
        std::int64_t most_recent = 0;  // the latest step the queue has handed out for it
    };
    struct Gather {
        std::vector<int> params;
        bool coalesced = false, waited = false;
        int pending = 0;  // registry entries left
    };
    struct Entry {
        int param;
        int step;
    };

    void fetch(int module, bool forward);
    void release(int module, bool forward);
    void gather(std::vector<int> params);
    void wait(int p);
    void release_param(int p);
    const std::vector<int>& to_release(int module);  // __params_to_release at the current step id

    std::vector<Param> params_;
    std::vector<std::vector<int>> modules_;
    std::vector<std::vector<int>> subtrees_;
    std::vector<char> leaves_;
    std::vector<Z3Hook> hooks_;
    Z3Config config_;
    std::vector<int> trace_;     // the module of each step id
    std::vector<Entry> order_;   // the parameter order: each fetched module's parameters with its step
    std::map<std::pair<int, int>, std::vector<int>> cache_;  // (step id, module): the release set first computed

    // one micro-step's state
    std::size_t next_ = 0;   // hook
    std::size_t head_ = 0;   // queue
    int step_ = 0;
    std::int64_t available_ = 0;
    std::vector<Gather> gathers_;
    std::vector<int> active_backward_;
    std::vector<int> grads_remaining_;  // per module: its post-backward hook's count (ds_grads_remaining)
    std::vector<Z3Event> events_;
};

}  // namespace mst::sim
