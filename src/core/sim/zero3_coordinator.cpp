// DeepSpeed 0.19.8's ZeRO-3 parameter coordinator (zero3.hpp); file:line references are to its
// runtime/zero/ sources as docs/deepspeed-zero3-model.md cites them (ppc = partitioned_param_coordinator.py).
#include "zero3.hpp"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>

#include "mst/units.hpp"

namespace mst::sim {

namespace {
constexpr std::int64_t kNever = std::numeric_limits<std::int64_t>::min() / 2;  // defaultdict(lambda: int(-1e10))

[[noreturn]] void trace_error(const std::string& what) {
    throw std::logic_error("ZeRO-3 coordinator: " + what + " (a bug in the hf runtime's hooks)");
}
}  // namespace

Zero3Coordinator::Zero3Coordinator(std::vector<std::int64_t> numel, std::vector<std::vector<int>> modules,
                                   std::vector<Z3Hook> hooks, const Z3Config& config, std::vector<std::vector<int>> subtrees,
                                   std::vector<char> leaves)
    : modules_(std::move(modules)), subtrees_(std::move(subtrees)), leaves_(std::move(leaves)), hooks_(std::move(hooks)),
      config_(config) {
    if (subtrees_.empty()) subtrees_ = modules_;
    leaves_.resize(modules_.size(), 0);
    params_.resize(numel.size());
    grads_remaining_.assign(modules_.size(), 0);
    for (std::size_t p = 0; p < numel.size(); ++p) {
        params_[p].numel = numel[p];
        // ds_persist (parameter_offload.py:317-335; model_persistence_threshold is unbounded by default)
        params_[p].persistent = numel[p] <= config_.persistence;
    }
    // The trace: every fetch's module in order; the parameter order: each of its parameters, with
    // the step that uses it (ppc:233-248)
    for (const Z3Hook& h : hooks_) {
        if (h.kind != Z3Hook::Fetch) continue;
        const int step = static_cast<int>(trace_.size());
        trace_.push_back(h.module);
        for (int p : modules_[static_cast<std::size_t>(h.module)]) order_.push_back(Entry{p, step});
    }
}

std::int64_t Zero3Coordinator::part(int p) const {
    return ceil_div(params_[static_cast<std::size_t>(p)].numel, config_.ranks);  // ds_tensor.ds_numel (pp:1690-1699)
}

void Zero3Coordinator::warm_up(bool persistent_gathered) {
    for (Param& p : params_) p.status = p.persistent && persistent_gathered ? Status::Available : Status::NotAvailable;
    begin_micro_step();
    while (!done()) hook(hooks_[next_]);
    release_leftovers();
    // the step after it starts from here: the persistent parameters gathered, nothing else
    for (Param& p : params_) {
        p.status = p.persistent ? Status::Available : Status::NotAvailable;
        p.active.clear();
        p.gather = -1;
    }
}

void Zero3Coordinator::begin_micro_step() {
    events_.clear();
    // _clean_inflight_param_registry: nothing is in flight between micro-steps in a steady step
    for (const Param& p : params_)
        if (p.gather >= 0) trace_error("a gather outlived its micro-step");
    gathers_.clear();
    active_backward_.clear();
    for (Param& p : params_) p.most_recent = kNever;
    next_ = head_ = 0;
    step_ = 0;
    available_ = 0;
}

std::span<const Z3Event> Zero3Coordinator::hook(const Z3Hook& expected) {
    if (next_ >= hooks_.size() || !(hooks_[next_] == expected))
        trace_error("hook " + std::to_string(next_) + " is not the micro-step's next (module " + std::to_string(expected.module) +
                    (expected.kind == Z3Hook::Fetch ? " fetch" : " release") + ")");
    ++next_;
    events_.clear();
    if (expected.kind == Z3Hook::Fetch) fetch(expected.module, expected.forward);
    else release(expected.module, expected.forward);
    return events_;
}

// fetch_sub_module (ppc:307-490)
void Zero3Coordinator::fetch(int module, bool forward) {
    const std::vector<int>& own = modules_[static_cast<std::size_t>(module)];
    if (!forward && std::find(active_backward_.begin(), active_backward_.end(), module) == active_backward_.end())
        active_backward_.push_back(module);
    // _post_backward_module_hook: each call counts its input's gradient anew (ds_grads_remaining)
    if (forward) grads_remaining_[static_cast<std::size_t>(module)] = 1;
    std::vector<int> missing;
    for (int p : own)
        if (params_[static_cast<std::size_t>(p)].status == Status::NotAvailable) missing.push_back(p);
    if (!missing.empty()) gather(std::move(missing));
    for (int p : own) {
        params_[static_cast<std::size_t>(p)].active.push_back(module);
        if (params_[static_cast<std::size_t>(p)].gather >= 0) wait(p);
    }
    // its own entries leave the queue (unless a prefetch has already taken them past this step)
    std::size_t expected = 0;
    for (int p : own) expected += params_[static_cast<std::size_t>(p)].most_recent < step_ ? 1 : 0;
    for (std::size_t popped = 0; popped < expected; ++popped) {
        if (head_ >= order_.size()) trace_error("the queue ran out");
        const Entry e = order_[head_++];
        if (std::find(own.begin(), own.end(), e.param) == own.end()) trace_error("the queue's next is another module's");
        params_[static_cast<std::size_t>(e.param)].most_recent = e.step;
    }
    // prefetch (ppc:452-486)
    if (config_.prefetch_bucket > 0) {
        const std::int64_t room = std::min(config_.max_live - available_, config_.prefetch_bucket);
        std::vector<int> prefetch;
        std::int64_t numel = 0;
        while (head_ < order_.size() && numel < room) {
            const Entry e = order_[head_++];
            Param& P = params_[static_cast<std::size_t>(e.param)];
            const bool take = P.status == Status::NotAvailable &&
                              std::find(prefetch.begin(), prefetch.end(), e.param) == prefetch.end();
            P.most_recent = std::max(P.most_recent, static_cast<std::int64_t>(e.step));
            if (take) {
                prefetch.push_back(e.param);
                numel += P.numel;
            }
        }
        if (numel > 0) gather(std::move(prefetch));
    }
    ++step_;
}

// __all_gather_params (ppc:568-620) -> all_gather_coalesced (pp:1540-1602): sorted by ds_id
void Zero3Coordinator::gather(std::vector<int> params) {
    std::sort(params.begin(), params.end());
    const int g = static_cast<int>(gathers_.size());
    Gather& G = gathers_.emplace_back();
    G.params = params;
    G.coalesced = params.size() > 1;
    G.pending = static_cast<int>(params.size());
    std::int64_t flat = 0;
    for (int p : params) {
        Param& P = params_[static_cast<std::size_t>(p)];
        available_ += P.numel;  // counted at gather time (ppc:586-593)
        P.status = Status::Inflight;
        P.gather = g;
        flat += part(p);
    }
    if (G.coalesced) events_.push_back(Z3Event{Z3Event::Flat, g, checked_mul(flat, config_.ranks)});  // pp:1342-1345
    else events_.push_back(Z3Event{Z3Event::Single, params.front(), padded(params.front())});  // pp:1388-1393
}

// The registry's entry popped and waited (ppc:405; AllGatherCoalescedHandle.wait, pp:761-806)
void Zero3Coordinator::wait(int p) {
    const int g = std::exchange(params_[static_cast<std::size_t>(p)].gather, -1);
    Gather& G = gathers_[static_cast<std::size_t>(g)];
    if (!G.waited) {
        G.waited = true;
        for (int q : G.params) {
            if (G.coalesced) events_.push_back(Z3Event{Z3Event::Copy, q, params_[static_cast<std::size_t>(q)].numel});
            params_[static_cast<std::size_t>(q)].status = Status::Available;
        }
    }
    if (--G.pending == 0 && G.coalesced) events_.push_back(Z3Event{Z3Event::FreeFlat, g, 0});
}

// release_sub_module (ppc:492-533). In backward it runs when the module's input gradients counted
// since its last call have all arrived (parameter_offload.py:497-526): a module called several times
// in one forward (python/mst_hf's MLP mini-sequences) releases in the backward of its last call only,
// and its earlier calls' pre-backward fetches leave it to release_backward_leftovers.
void Zero3Coordinator::release(int module, bool forward) {
    if (!forward && --grads_remaining_[static_cast<std::size_t>(module)] != 0) return;
    const std::vector<int>& release = to_release(module);
    for (int p : modules_[static_cast<std::size_t>(module)]) {
        std::vector<int>& active = params_[static_cast<std::size_t>(p)].active;
        active.erase(std::remove(active.begin(), active.end(), module), active.end());
        if (std::find(release.begin(), release.end(), p) != release.end()) release_param(p);
    }
    if (!forward) active_backward_.erase(std::remove(active_backward_.begin(), active_backward_.end(), module), active_backward_.end());
}

// __release_param (ppc:622-630): frees only a gathered parameter no active module holds
void Zero3Coordinator::release_param(int p) {
    Param& P = params_[static_cast<std::size_t>(p)];
    if (P.status != Status::Available || !P.active.empty()) return;
    P.status = Status::NotAvailable;
    available_ -= P.numel;
    events_.push_back(Z3Event{Z3Event::FreeParam, p, 0});
}

// __params_to_release (ppc:632-664), lru_cache'd on (module, step id)
const std::vector<int>& Zero3Coordinator::to_release(int module) {
    const auto key = std::make_pair(step_, module);
    if (auto it = cache_.find(key); it != cache_.end()) return it->second;
    std::vector<int> release;
    for (int p : modules_[static_cast<std::size_t>(module)]) {
        const Param& P = params_[static_cast<std::size_t>(p)];
        if (!P.persistent && P.most_recent <= step_) release.push_back(p);
    }
    // (each later module's parameters as iter_params(module, recurse=<the released module is a leaf>)
    // sees them: a leaf's release counts whole subtrees, any other's only direct parameters, none of a
    // leaf's, which its children hold)
    const bool leaf = leaves_[static_cast<std::size_t>(module)];
    static const std::vector<int> none;
    std::int64_t traversed = 0;
    for (std::size_t s = static_cast<std::size_t>(step_); s < trace_.size() && traversed < config_.max_reuse; ++s) {
        const auto m = static_cast<std::size_t>(trace_[s]);
        for (int p : leaf ? subtrees_[m] : leaves_[m] ? none : modules_[m]) {
            release.erase(std::remove(release.begin(), release.end(), p), release.end());
            traversed += params_[static_cast<std::size_t>(p)].numel;
        }
    }
    return cache_.emplace(key, std::move(release)).first->second;
}

// release_backward_leftovers (ppc:552-566): the last inserted first
std::span<const Z3Event> Zero3Coordinator::release_leftovers() {
    events_.clear();
    while (!active_backward_.empty()) {
        const int module = active_backward_.back();
        active_backward_.pop_back();
        for (int p : modules_[static_cast<std::size_t>(module)]) {
            std::vector<int>& active = params_[static_cast<std::size_t>(p)].active;
            active.erase(std::remove(active.begin(), active.end(), module), active.end());
            if (!params_[static_cast<std::size_t>(p)].persistent) release_param(p);
        }
    }
    return events_;
}

// _partition_all_parameters -> release_and_reset_all (ppc:536-550), in parameter order
std::span<const Z3Event> Zero3Coordinator::release_all() {
    events_.clear();
    for (std::size_t p = 0; p < params_.size(); ++p) {
        params_[p].active.clear();
        release_param(static_cast<int>(p));
    }
    return events_;
}

// _post_step (stage3.py:2835-2852): the persistent parameters all-gathered, a buffer each
std::span<const Z3Event> Zero3Coordinator::gather_persistent() {
    events_.clear();
    for (std::size_t p = 0; p < params_.size(); ++p)
        if (params_[p].persistent) {
            events_.push_back(Z3Event{Z3Event::Single, static_cast<int>(p), padded(static_cast<int>(p))});
            params_[p].status = Status::Available;
        }
    return events_;
}

}  // namespace mst::sim
