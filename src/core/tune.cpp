#include "mst/tune.hpp"

#include <algorithm>
#include <atomic>
#include <limits>
#include <cctype>
#include <cmath>
#include <exception>
#include <map>
#include <memory>
#include <numeric>
#include <optional>
#include <stop_token>
#include <system_error>
#include <thread>
#include <tuple>

#include <fmt/format.h>
#include <fmt/ranges.h>  // fmt::join

#include "mst/catalog.hpp"
#include "mst/emit.hpp"
#include "mst/error.hpp"
#include "mst/limits.hpp"
#include "least_fitting.hpp"
#include "parallel_for.hpp"

namespace mst {

namespace {
constexpr std::int64_t kMaxChunks = 1024;  // mini-sequences per block, at most
// Threads searching the outer choices side by side by default, at most (Search::search_all): each
// block of them starts without the hints of the one before it.
constexpr std::size_t kSearchThreads = 8;

// Whether validate() accepts the setup: the tuner evaluates only setups a user could give it (a
// pin or a batch beyond the bounds of include/mst/limits.hpp is a setup that does not fit).
bool valid(const TrainingSetup& s, const ModelSpec& m) {
    try {
        validate(s, m);
        return true;
    } catch (const UserError&) {
        return false;
    }
}
}

// ---- pins ------------------------------------------------------------------------------

namespace {

std::int64_t pin_int(const std::string& key, const std::string& value, std::int64_t lo, std::int64_t hi) {
    const auto v = parse_decimal(value);
    if (!v || *v < lo || *v > hi) fail("--pin", key, fmt::format("expected an integer in [{}, {}], got {}", lo, hi, in_quotes(value)));
    return *v;
}

}  // namespace

bool parse_yes_no(const std::string& where, const std::string& key, const std::string& value) {
    if (value == "yes" || value == "true" || value == "on" || value == "1") return true;
    if (value == "no" || value == "false" || value == "off" || value == "0") return false;
    fail(where, key, fmt::format("expected yes or no, got {}", in_quotes(value)));
}

void parse_pin(const std::string& text, const ModelSpec& model, Pins& pins) {
    const auto eq = text.find('=');
    if (eq == std::string::npos || eq == 0)
        fail("--pin", text,
             "expected KEY=VALUE (keys: M_mlp, M_lm, mlp_impl, lm_impl, checkpoint, offload, sp, ep, zero, micro_batch, "
             "overlap_comm)");
    const std::string key = text.substr(0, eq), value = text.substr(eq + 1);
    // One value per knob: a second --pin of it (or of its other name) would silently replace the first.
    const auto twice = [&] { fail("--pin", key, fmt::format("expected one value (it is pinned twice; the second is '{}')", value)); };
    const auto set = [&](auto& field, auto parsed) {
        if (field) twice();
        field = parsed;
    };
    if (key == "M_mlp" || key == "mlp_chunks") set(pins.mlp_chunks, pin_int(key, value, 1, max_mlp_chunks(model)));
    else if (key == "M_lm" || key == "lm_chunks") set(pins.lm_chunks, pin_int(key, value, 1, limits::kChunks));
    else if (key == "mlp_impl") set(pins.mlp_impl, parse_mlp_impl(value, "--pin"));
    else if (key == "lm_impl") set(pins.lm_impl, parse_lm_impl(value, "--pin"));
    else if (key == "sp") set(pins.sp, pin_int(key, value, 1, limits::kGpus));
    else if (key == "ep") set(pins.ep, pin_int(key, value, 1, limits::kGpus));
    else if (key == "zero") set(pins.zero_stage, static_cast<int>(pin_int(key, value, 0, 3)));
    else if (key == "micro_batch") set(pins.micro_batch, pin_int(key, value, 1, limits::kMicroBatch));
    else if (key == "offload") set(pins.offload, parse_yes_no("--pin", key, value));
    else if (key == "overlap_comm") set(pins.overlap_comm, parse_yes_no("--pin", key, value));
    else if (key == "checkpoint") {
        // (an empty value, an unset shell variable, is an error as every empty argument is: not "none")
        if (value.empty()) fail("--pin", key, "expected a count, a placement (all, none, 0-15, every:2), got ''");
        // A plain number is a count (the tuner places them); anything else is a placement: one of the two.
        const bool count = !value.empty() && std::all_of(value.begin(), value.end(), [](char ch) {
            return std::isdigit(static_cast<unsigned char>(ch)) != 0;
        });
        if (pins.checkpoint || pins.checkpoint_count) twice();
        if (count) pins.checkpoint_count = pin_int(key, value, 0, model.num_layers);
        else pins.checkpoint = parse_checkpoint_spec(value, model.num_layers, "--pin");
    } else {
        fail("--pin", key,
             "expected one of M_mlp, M_lm, mlp_impl, lm_impl, checkpoint, offload, sp, ep, zero, micro_batch, overlap_comm");
    }
}

// ---- recommend -------------------------------------------------------------------------

namespace {

// Below this a chunk's GEMMs stop filling a large GPU (and the MsT paper's chunks are thousands of tokens).
constexpr std::int64_t kMinChunkTokens = 1024;
// Setups up to this much slower than the best so far are still evaluated: they are the runner-ups.
constexpr double kRunnerUpSlack = 1.15;

// Chunk counts worth trying: 1 and powers of two down to chunks of kMinChunkTokens.
// `most`: the bound validate() puts on this block's chunks for the model.
std::vector<std::int64_t> chunk_options(std::int64_t tokens, std::optional<std::int64_t> pinned, std::int64_t most) {
    if (pinned) return {*pinned};
    std::vector<std::int64_t> out{1};
    for (std::int64_t m = 2; m <= std::min(kMaxChunks, most) && tokens / m >= kMinChunkTokens; m *= 2) out.push_back(m);
    return out;
}

// torchtitan's ChunkedLossWrapper splits each rank's sequence evenly (its emitter refuses another count): the
// smallest divisor of `seq` of at least `at_least`, at most `most`, else the largest below it (1 for a prime).
bool even_lm_chunks(const std::string& format) { return format == "torchtitan"; }
// torchtitan 0.3.0 checkpoints every block or none (its emitter refuses a count between).
bool every_layer_or_none(const std::string& format) { return format == "torchtitan"; }
std::int64_t dividing_chunks(std::int64_t seq, std::int64_t at_least, std::int64_t most) {
    for (std::int64_t c = std::max<std::int64_t>(at_least, 1); c <= most; ++c)
        if (seq % c == 0) return c;
    for (std::int64_t c = std::min(at_least, most); c > 1; --c)
        if (seq % c == 0) return c;
    return 1;
}

// Checkpoint the first k layers: they are differentiated last, when the other layers'
// saved activations are already gone, so their recompute adds least to the peak.
std::vector<bool> first_layers(std::int64_t k, std::int64_t layers) {
    std::vector<bool> v(static_cast<std::size_t>(layers), false);
    for (std::int64_t i = 0; i < k; ++i) v[static_cast<std::size_t>(i)] = true;
    return v;
}

// Whether sp ranks can split a sequence of seq_len tokens: the GPUs in whole groups, and the
// sequence as validate() requires (sp_refusal).
bool sp_degree_fits(const TuneRequest& rq, std::int64_t sp, std::int64_t seq_len) {
    return rq.gpus % sp == 0 && !sp_refusal(rq.model, rq.base.sp_impl, sp, seq_len);
}

// The widest expert-parallel degree: the largest dividing both the experts and the GPUs (1 for a
// dense model, or where the runtime has no expert parallelism).
std::int64_t widest_expert_parallel(const TuneRequest& rq) {
    if (!rq.model.moe || rq.base.runtime == Runtime::Hf) return 1;
    for (std::int64_t ep = rq.gpus; ep > 1; --ep)
        if (rq.gpus % ep == 0 && rq.model.moe->experts % ep == 0) return ep;
    return 1;
}

// torchtitan over several GPUs in the hf runtime: why its own step (its FSDP2 fully sharding, which is what this
// runtime plans for it) is not modelled for the knobs asked (none: it is). A step of one micro-batch with no layer
// checkpointed is the search's start; the rest of the setup is the user's.
std::optional<FieldRefusal> titan_fsdp2_refusal(const TuneRequest& rq) {
    TrainingSetup probe = rq.base;
    probe.zero_stage = 3, probe.dp = std::max<std::int64_t>(rq.gpus, 2), probe.fsdp2 = true;
    probe.model_code = ModelCode::Torchtitan;
    probe.micro_batch = probe.grad_accum = probe.mlp_chunks = probe.lm_chunks = 1;
    probe.checkpoint.clear(), probe.offload_checkpoints = false;
    return titan_scope_refusal(probe, rq.model);
}

// Whether the hf runtime's ZeRO-3 for `rq` is torch's FSDP2: the plan's trainer is no DeepSpeed format
// (a script of python/mst_hf's users, which shards with fully_shard; torchtitan, whose FSDP2 fully shards by
// default), or Axolotl asked to shard with its own FSDP2 (--fsdp2-groups axolotl), and FSDP2 is modelled for
// the model and the knobs (validate_fsdp2_scope, probed at ZeRO 3 over two ranks: the stage and the ranks are
// the search's).
bool fsdp2_is_zero3(const TuneRequest& rq) {
    const bool axolotl = rq.base.fsdp2_groups == Fsdp2Groups::Axolotl;
    const bool torch_trainer = rq.for_format.empty() || rq.for_format == "hf-mst" || rq.for_format == "torchtitan";
    if (rq.base.runtime != Runtime::Hf) return false;
    if (rq.for_format == "axolotl" ? !axolotl : !(torch_trainer && !axolotl)) return false;
    if (rq.for_format == "torchtitan") return !titan_fsdp2_refusal(rq);  // (its own step's FSDP2 alone)
    TrainingSetup probe = rq.base;
    probe.zero_stage = 3, probe.dp = 2, probe.fsdp2 = true;
    try {
        validate_fsdp2_scope(probe, rq.model);
        return true;
    } catch (const UserError&) {
        return false;
    }
}

// The engine of `s`'s stage as `rq` trains it: FSDP2 for the hf runtime's ZeRO-3 where fsdp2_is_zero3,
// else DeepSpeed's; DeepSpeed's engine options as asked where its engine runs `s` (the bucket;
// overlap_comm under ZeRO 1/2, the gathering options under ZeRO-3), DeepSpeed's defaults elsewhere: the
// searches move setups between stages, and only that engine has them (validate()).
void take_engine(TrainingSetup& s, const TuneRequest& rq) {
    const TrainingSetup& asked = rq.base;
    s.fsdp2 = s.zero_stage == 3 && fsdp2_is_zero3(rq);
    // (the user's loop and layout, where FSDP2 runs it; Axolotl's is the Hugging Face Trainer's: no_sync)
    s.fsdp2_no_sync = s.fsdp2 && (asked.fsdp2_no_sync || rq.for_format == "axolotl");
    s.fsdp2_reshard_after_forward = !s.fsdp2 || asked.fsdp2_reshard_after_forward;
    s.fsdp2_groups = s.fsdp2 ? asked.fsdp2_groups : Fsdp2Groups::MstHf;
    s.reduce_bucket_size = s.deepspeed_engine() ? asked.reduce_bucket_size : kDeepSpeedReduceBucket;
    s.overlap_comm = s.deepspeed_zero() && asked.overlap_comm;
    const bool zero3 = s.deepspeed_zero3();
    s.param_persistence_threshold = zero3 ? asked.param_persistence_threshold : kDeepSpeedPersistence;
    s.prefetch_bucket_size = zero3 ? asked.prefetch_bucket_size : kDeepSpeedPrefetchBucket;
    // The Hugging Face Trainer's bf16=True as asked, and always for Axolotl, which runs the Trainer with bf16: true:
    // accelerate's native amp around the forward, where it has one (not under DeepSpeed's engine or FSDP2, whose
    // preparation adds none). Axolotl's Qwen3-MoE and gpt-oss in bf16, where it is not modelled, are planned
    // without it (check_request refuses it asked for them).
    s.hf_trainer_bf16 = asked.hf_trainer_bf16 || rq.for_format == "axolotl";
    if (s.hf_trainer_bf16 && !hf_trainer_bf16_refusal(s, rq.model).empty()) s.hf_trainer_bf16 = false;
}

// --for torchtitan with the hf runtime: torchtitan's own model code where its step is modelled (its Llama-3 code
// on one GPU or its FSDP2 over several, pure bf16 or bf16-master, every layer checkpointed or none:
// titan_scope_refusal), else transformers' (one GPU: the runtime's model, which the recommendation's caution says;
// over several the format's emitter refuses it).
void take_model_code(TrainingSetup& s, const std::string& format, const ModelSpec& m) {
    s.model_code = ModelCode::Transformers;
    if (format != "torchtitan" || s.runtime != Runtime::Hf) return;
    s.model_code = ModelCode::Torchtitan;
    if (titan_scope_refusal(s, m)) s.model_code = ModelCode::Transformers;
}
void take_model_code(TrainingSetup& s, const TuneRequest& rq) { take_model_code(s, rq.for_format, rq.model); }

// --for: why the format's trainer cannot train `s` as planned, in its emitter's words ("" when it can).
std::string refusal_of(const std::string& format, const TrainingSetup& s, const ModelSpec& m);

class Search {
public:
    // `trainer_extra`: kept free for what the --for trainer allocates beyond the runtime's prediction (none of
    // it beyond torchtitan's own step, which holds its RoPE tables)
    // `workers`: the simulator's, for the ranks of one setup (0: one per CPU, at most 16).
    Search(const TuneRequest& rq, bytes_t budget, bytes_t trainer_extra, int workers = 0)
        : rq_(rq), budget_(budget), trainer_extra_(trainer_extra), sim_(rq.model, rq.gpu, workers) {}

    // The budget the search fits `s` in.
    bytes_t budget_for(const TrainingSetup& s) const { return s.titan() ? budget_ : budget_ - trainer_extra_; }

    // Within one outer choice a setup is known by its checkpoints and chunk counts: the
    // binary searches probe the same ones more than once.
    bool fits(const TrainingSetup& s, MemoryPeaks* out = nullptr) {
        Key key{s.checkpoint, s.mlp_chunks, s.lm_chunks};
        if (auto it = memo_.find(key); it != memo_.end()) {
            if (out) *out = it->second.second;
            return it->second.first;
        }
        std::pair<bool, MemoryPeaks> found;
        if (const auto* ahead = simulated_ahead(key)) {  // (counted as this search's own simulation)
            found = *ahead;
            if (valid(s, rq_.model)) ++sims_;
        } else {
            found.first = simulate_fits(s, &found.second);
        }
        memo_.emplace(std::move(key), found);
        if (out) *out = found.second;
        return found.first;
    }

    // Searches every choice of the outer knobs, in order (inner()). On several threads
    // (TuneRequest::search_threads; by default one per CPU, at most 8), workers search ahead: the
    // choices fall into contiguous blocks, one per thread; this thread searches the first, and a
    // worker each other block, with a Search of its own (its own simulator, and hints and a fastest
    // setup from its block alone), keeping what each of its simulations found. Coming to a worker's
    // block, this thread searches it in order too, taking a setup's result from the worker's where
    // the worker simulated that setup: whether a setup fits, and its peaks, depend on the setup
    // alone, so the picks, the front and the count of simulations are those of this thread's search
    // alone. (Where the worker's hints and bound led it elsewhere, this thread simulates what it
    // lacks; a worker not yet done with the choice this thread comes to stops after it; a
    // simulation that raised an error left nothing: this thread raises it again, in order.)
    void search_all(const std::vector<TrainingSetup>& outers) {
        const std::size_t n = outers.size();
        const std::size_t threads = rq_.search_threads > 0 ? static_cast<std::size_t>(rq_.search_threads)
                                                            : std::min(static_cast<std::size_t>(detail::usable_cpus()), kSearchThreads);
        const std::size_t blocks = std::max<std::size_t>(1, std::min(threads, n));
        const auto start = [&](std::size_t b) { return b * n / blocks; };
        ahead_by_outer_.assign(n, Memo{});
        std::vector<std::atomic<std::size_t>> done(blocks);  // block b's worker: the choices before it are searched
        std::vector<std::jthread> workers;  // (stopped and joined on the way out, an error's too)
        for (std::size_t b = 1; b < blocks; ++b) {
            done[b] = start(b);
            try {
                workers.emplace_back([&, b](std::stop_token stop) {
                    Search ahead(rq_, budget_, trainer_extra_, 1);
                    for (std::size_t i = start(b); i < start(b + 1) && !stop.stop_requested(); ++i) {
                        try {
                            ahead.inner(outers[i]);
                        } catch (...) {  // (what it simulated before the error stands)
                        }
                        ahead_by_outer_[i] = std::move(ahead.memo_);
                        done[b].store(i + 1, std::memory_order_release);
                    }
                });
            } catch (const std::system_error&) {  // (a limit on threads: the blocks from here on are this thread's)
                break;
            }
        }
        for (std::size_t i = 0, b = 0; i < n; ++i) {
            if (b + 1 <= workers.size() && i == start(b + 1)) ++b;  // (block b's worker is workers[b - 1])
            bool ahead = false;
            if (b > 0) {
                if (done[b].load(std::memory_order_acquire) <= i && workers[b - 1].joinable()) {
                    workers[b - 1].request_stop();
                    workers[b - 1].join();
                }
                ahead = done[b].load(std::memory_order_acquire) > i;
            }
            inner(outers[i], ahead ? std::optional<std::size_t>{i} : std::nullopt);
        }
    }

    bool simulate_fits(const TrainingSetup& s, MemoryPeaks* out) {
        if (!valid(s, rq_.model)) return false;
        ++sims_;
        return sim_.fits(s, budget_for(s), rq_.host_bytes_per_gpu, out);
    }
    double seconds(const TrainingSetup& s) const { return per_token(predict_time(rq_.model, s, rq_.gpu, rq_.cluster), s); }

    // Searches checkpoint count and chunk counts for one choice of the outer knobs (with what a
    // worker of search_all's found for the `index`-th choice, if given).
    void inner(const TrainingSetup& outer, std::optional<std::size_t> index = std::nullopt) {
        memo_.clear();
        ahead_ = index && *index < ahead_by_outer_.size() ? &ahead_by_outer_[*index] : nullptr;
        const std::int64_t L = rq_.model.num_layers, tokens = outer.local_tokens();
        auto mlp_opts = chunk_options(tokens, rq_.pins.mlp_chunks, max_mlp_chunks(rq_.model));
        auto lm_opts = chunk_options(tokens, rq_.pins.lm_chunks, limits::kChunks);
        if (even_lm_chunks(rq_.for_format) && !rq_.pins.lm_chunks) {  // (each count the next that splits a rank's sequence)
            const std::int64_t seq = outer.seq_len / outer.sp;
            const bool chunked = lm_opts.size() > 1;
            for (std::int64_t& c : lm_opts) c = dividing_chunks(seq, c, limits::kChunks);
            std::sort(lm_opts.begin(), lm_opts.end());
            lm_opts.erase(std::unique(lm_opts.begin(), lm_opts.end()), lm_opts.end());
            if (chunked && lm_opts.size() == 1 && refusal_.empty())  // (what --for excluded: every chunked loss)
                refusal_ = fmt::format("{}: setup.lm_chunks: expected a divisor of each rank's sequence ({} tokens: torchtitan's "
                                       "chunked loss splits it evenly), and none of 2 to {} is",
                                       rq_.for_format, seq, limits::kChunks);
        }
        // --for: chunk counts the format's trainer cannot run with these outer knobs are not searched
        // (python/mst_hf's chunked loss under ZeRO-3 for a soft-capping model; torchtitan has no MLP
        // mini-sequences).
        // The last refusal is kept: when a filter leaves nothing to search, it is the reason said.
        std::string last_refusal;
        const auto refused = [&](const TrainingSetup& t) {
            if (rq_.for_format.empty()) return false;
            last_refusal = refusal_of(rq_.for_format, t, rq_.model);
            return !last_refusal.empty();
        };
        const auto nothing_left = [&] {
            if (refusal_.empty()) refusal_ = last_refusal;
        };
        const auto unsearched = [&] {  // refused after it was counted as searched
            --searched_;
            nothing_left();
        };
        // (and those the runtime does not model with them, whatever the checkpoints)
        const auto modelled = [&](TrainingSetup t) {
            t.checkpoint.assign(static_cast<std::size_t>(L), true);
            try {
                validate(t, rq_.model);
                return true;
            } catch (const UserError& e) {
                last_refusal = e.what();
                return false;
            }
        };
        std::erase_if(mlp_opts, [&](std::int64_t mm) {
            TrainingSetup t = outer;
            t.mlp_chunks = mm;
            return refused(t) || !modelled(t);
        });
        if (mlp_opts.empty()) return nothing_left();
        std::erase_if(lm_opts, [&](std::int64_t ml) {
            TrainingSetup t = outer;
            t.lm_chunks = ml;
            return refused(t) || !modelled(t);
        });
        if (lm_opts.empty()) return nothing_left();
        ++searched_;  // (undone when every checkpoint count is refused: unsearched())
        auto with = [&](std::int64_t k, std::int64_t mm, std::int64_t ml, const std::vector<bool>* placement = nullptr) {
            TrainingSetup t = outer;
            t.checkpoint = placement ? *placement : first_layers(k, L);
            t.offload_checkpoints = outer.offload_checkpoints && t.checkpointed_count() > 0;
            t.mlp_chunks = mm;
            t.lm_chunks = ml;
            take_model_code(t, rq_);
            return t;
        };
        // The time model is asked about the same setups again and again (the bounds below, then
        // the picks): remember its answers for this outer choice.
        times_.clear();
        auto seconds_at = [&](std::int64_t k, std::int64_t mm, std::int64_t ml, const std::vector<bool>* placement) {
            const auto key = std::make_tuple(k, placement, mm, ml);
            if (auto it = times_.find(key); it != times_.end()) return it->second;
            return times_.emplace(key, seconds(with(k, mm, ml, placement))).first->second;
        };
        // Whether some chunking of this placement beats `limit` seconds per token (the search's bound).
        auto can_beat = [&](std::int64_t k, const std::vector<bool>* placement, double limit) {
            for (auto mm : mlp_opts)
                for (auto ml : lm_opts)
                    if (seconds_at(k, mm, ml, placement) < limit) return true;
            return false;
        };
        std::vector<std::pair<std::int64_t, const std::vector<bool>*>> ks;
        if (rq_.pins.checkpoint) {
            ks.push_back({0, &*rq_.pins.checkpoint});
            if (refused(with(0, mlp_opts.back(), lm_opts.back(), &*rq_.pins.checkpoint))) return unsearched();
        } else if (rq_.pins.checkpoint_count) {
            ks.push_back({*rq_.pins.checkpoint_count, nullptr});
            if (refused(with(*rq_.pins.checkpoint_count, mlp_opts.back(), lm_opts.back()))) return unsearched();
        } else {
            // Offloading checkpoints (pinned: offload=yes) needs at least one checkpointed layer.
            const std::int64_t k_min = outer.offload_checkpoints ? 1 : 0;
            if (fastest_ && !can_beat(k_min, nullptr, *fastest_ * kRunnerUpSlack)) return;  // cannot compete
            if (every_layer_or_none(rq_.for_format)) {
                // (no count between: none where it fits with the most chunks, then every layer)
                if (k_min == 0 && fits(with(0, mlp_opts.back(), lm_opts.back()))) ks.push_back({0, nullptr});
                ks.push_back({L, nullptr});
            } else {
                // Fewest checkpointed layers that fit with the most chunks (the previous outer choice's
                // count is where the search starts).
                const auto least_k = detail::least_fitting(k_min, L, hints_.k, [&](std::int64_t k) {
                    return fits(with(k, mlp_opts.back(), lm_opts.back()));
                });
                if (!least_k) return;
                hints_.k = *least_k;
                for (std::int64_t k = *least_k, step = 1; k <= L; k = (k == L ? L + 1 : std::min(L, k + step)), step *= 2)
                    ks.push_back({k, nullptr});
            }
            // --for: checkpoint counts the format cannot place (torchtitan: every layer or none)
            std::erase_if(ks, [&](const auto& c) { return refused(with(c.first, mlp_opts.back(), lm_opts.back())); });
            if (ks.empty()) return unsearched();
        }
        // More checkpoints never need more chunks: each k searches below the previous k's counts.
        std::size_t lm_hi = lm_opts.size() - 1, mlp_hi = mlp_opts.size() - 1;
        bool first = true;
        bool first_counts = true;  // no k has found its chunk counts yet
        for (const auto& choice : ks) {
            // Named copies, not structured bindings: the lambdas below capture them (clang 14, which
            // builds the fuzz targets, cannot capture a binding).
            const std::int64_t k = choice.first;
            const std::vector<bool>* placement = choice.second;
            // Time grows with k: stop once even the best chunking cannot compete (the first k of
            // each outer choice may trail by kRunnerUpSlack, to offer runner-ups).
            // (within best()'s 0.5 % band a slower setup may still be the pick)
            if (fastest_ && !can_beat(k, placement, *fastest_ * (first ? kRunnerUpSlack : 1.005))) break;
            first = false;
            // Fewest LM-head chunks that fit with the most MLP chunks, then fewest MLP chunks.
            // The search starts at the previous k's counts (the first k: at the previous outer choice's).
            const auto smallest = [&](const std::vector<std::int64_t>& opts, std::size_t hi, std::optional<std::int64_t> hint,
                                      auto make) -> std::optional<std::size_t> {
                std::optional<std::int64_t> at;  // the hint's index: the first option of at least its count
                if (hint)
                    at = std::min<std::int64_t>(static_cast<std::int64_t>(hi),
                                                std::lower_bound(opts.begin(), opts.end(), *hint) - opts.begin());
                const auto i = detail::least_fitting(0, static_cast<std::int64_t>(hi), at, [&](std::int64_t j) {
                    return fits(make(opts[static_cast<std::size_t>(j)]));
                });
                if (!i) return std::nullopt;
                return static_cast<std::size_t>(*i);
            };
            const auto il = smallest(lm_opts, lm_hi, first_counts ? hints_.lm_chunks : lm_opts[lm_hi],
                                     [&](std::int64_t ml) { return with(k, mlp_opts[mlp_hi], ml, placement); });
            if (!il) continue;
            const auto im = smallest(mlp_opts, mlp_hi, first_counts ? hints_.mlp_chunks : mlp_opts[mlp_hi],
                                     [&](std::int64_t mm) { return with(k, mm, lm_opts[*il], placement); });
            if (!im) continue;
            if (first_counts) hints_.lm_chunks = lm_opts[*il], hints_.mlp_chunks = mlp_opts[*im];
            first_counts = false;
            lm_hi = *il, mlp_hi = *im;
            // More chunks than needed still fit; keep the fastest (verified below).
            std::size_t pick_a = *im, pick_b = *il;
            double pick_s = seconds_at(k, mlp_opts[pick_a], lm_opts[pick_b], placement);
            for (std::size_t a = *im; a < mlp_opts.size(); ++a)
                for (std::size_t b = *il; b < lm_opts.size(); ++b) {
                    const double ts = seconds_at(k, mlp_opts[a], lm_opts[b], placement);
                    if (ts < pick_s * (1 - 1e-9)) pick_a = a, pick_b = b, pick_s = ts;
                }
            TrainingSetup pick = with(k, mlp_opts[pick_a], lm_opts[pick_b], placement);
            MemoryPeaks mem;
            if (!fits(pick, &mem)) {
                pick = with(k, mlp_opts[*im], lm_opts[*il], placement);
                if (!fits(pick, &mem)) continue;  // the loop MLP is not monotone in M
            }
            consider(Candidate{pick, mem, predict_time(rq_.model, pick, rq_.gpu, rq_.cluster)});
            if (*il == 0 && *im == 0) break;  // fits unchunked: more checkpoints only cost time
        }
    }

    void consider(Candidate c) {
        fastest_ = std::min(fastest_.value_or(c.cost()), c.cost());
        evaluated_.push_back(std::move(c));
    }

    // The fastest setup, or, among those within 0.5 % of it, the simplest parallel layout (lowest
    // ZeRO stage), then the most headroom, then the faster. Decided over all candidates at once: a
    // running choice could drift, each step within 0.5 % of the last, far from the fastest.
    std::optional<Candidate> best() const {
        if (!fastest_) return std::nullopt;
        const Candidate* pick = nullptr;
        for (const Candidate& c : evaluated_) {
            if (c.cost() > *fastest_ * 1.005) continue;
            const auto rank = [](const Candidate& x) {
                return std::make_tuple(x.setup.zero_stage, x.memory.peak_reserved_bytes, x.cost());
            };
            if (!pick || rank(c) < rank(*pick)) pick = &c;
        }
        return *pick;
    }

    PeakSimulator& simulator() { return sim_; }

    std::optional<double> fastest_;  // the least cost considered
    std::vector<Candidate> evaluated_;
    std::int64_t sims_ = 0;
    std::string refusal_;  // --for: why a filter left an outer choice nothing to search (the first such)
    std::int64_t searched_ = 0;  // outer choices with something left to search after --for's filters

private:
    const TuneRequest& rq_;
    bytes_t budget_, trainer_extra_;
    PeakSimulator sim_;
    // Where the one-dimensional searches start (detail::least_fitting): the answers of the last
    // outer choice searched, whose neighbour in the loops is usually alike.
    struct {
        std::optional<std::int64_t> k, lm_chunks, mlp_chunks;
    } hints_;
    std::map<std::tuple<std::int64_t, const std::vector<bool>*, std::int64_t, std::int64_t>, double> times_;
    // What fits() found for a setup of the outer choice searched, known by its checkpoints and chunk counts.
    using Key = std::tuple<std::vector<bool>, std::int64_t, std::int64_t>;
    using Memo = std::map<Key, std::pair<bool, MemoryPeaks>>;
    Memo memo_;
    std::vector<Memo> ahead_by_outer_;  // search_all's workers', by outer choice
    const Memo* ahead_ = nullptr;       // the outer choice's of them, while it is searched
    // What a worker of search_all's found for the setup known by `key` (null: it did not simulate it).
    const std::pair<bool, MemoryPeaks>* simulated_ahead(const Key& key) const {
        if (!ahead_) return nullptr;
        const auto it = ahead_->find(key);
        return it == ahead_->end() ? nullptr : &it->second;
    }
};

std::vector<Candidate> pareto_front(std::vector<Candidate> all) {
    std::sort(all.begin(), all.end(), [](const Candidate& a, const Candidate& b) {
        return a.memory.peak_reserved_bytes < b.memory.peak_reserved_bytes ||
               (a.memory.peak_reserved_bytes == b.memory.peak_reserved_bytes && a.cost() < b.cost());
    });
    std::vector<Candidate> front;
    double best_tps = -1;
    for (auto& c : all)
        if (c.time.tokens_per_second > best_tps * 1.001) {
            best_tps = c.time.tokens_per_second;
            front.push_back(std::move(c));
        }
    return front;
}

std::string percent(double x) { return fmt::format("{:.0f} %", 100 * x); }

// A candidate's memory as the GPU holds it (the allocator releasing at its usable memory): the
// search's numbers came from a device of the budget's size (at most the usable memory:
// check_request() keeps the margin in [0, 1)).
void on_the_gpu(Candidate& c, PeakSimulator& gpu_sim, const GpuProfile& gpu, bytes_t budget) {
    c.releases_at_budget = c.memory.segments_released;
    // The model consults the capacity only when a new segment would take reserved bytes past it
    // (then it releases, or the step does not fit). A step that fit the budget without a release
    // never met that case, so on a device at least as large it runs the same, peaks and all.
    if (c.releases_at_budget == 0 && budget <= gpu.usable_bytes()) return;
    c.memory = gpu_sim.peaks(c.setup, true, gpu.usable_bytes());
}

// Whether DeepSpeed's ZeRO 1/2 engine, as the hf runtime models it, runs the knobs of `base`.
bool deepspeed_runs(TrainingSetup base, const ModelSpec& m, int stage = 2) {
    base.zero_stage = stage;
    base.fsdp2 = false;  // (DeepSpeed's engine: whatever a setup file asked of torch's)
    try {
        validate_hf_scope(base, m);
        return true;
    } catch (const UserError&) {
        return false;
    }
}

// The ZeRO stages a search tries. The kernels runtime: 0, 2 and 3 over several ranks; on one, 0 (and
// 1 for a format, whose trainer may need it: DeepSpeed keeps bf16 master weights only under ZeRO 1-3).
// The hf runtime: with ZeRO 0 its data parallelism is torch's DDP (python/mst_hf's), with 3 over
// several GPUs torch's FSDP2 where it is modelled (fsdp2_is_zero3; the only one for bf16-master), and
// for the deepspeed and axolotl formats, with 1 and 2 DeepSpeed's engine (its ZeRO-0 engine and
// Axolotl's DDP are not modelled). On one GPU Axolotl runs the plain Trainer too (ZeRO 0, when it
// needs no DeepSpeed: pure bf16), and DeepSpeed's engine when the knobs are its. Over several GPUs its
// ZeRO-3 too, where it is modelled for the model and the precision (validate_hf_scope); or, asked for
// with --fsdp2-groups axolotl, Axolotl's own FSDP2 alone.
std::vector<int> zero_stages(const TuneRequest& rq) {
    if (rq.base.runtime == Runtime::Kernels) {
        if (rq.gpus > 1) return {0, 2, 3};
        return rq.for_format.empty() ? std::vector<int>{0} : std::vector<int>{0, 1};
    }
    // (over several ranks its ZeRO-3 is FSDP2's fully_shard, for a script of python/mst_hf's users; DDP
    // cannot step bf16-master's fp32 masters on gradients it has not reduced: FSDP2's fp32 shards can)
    // (torchtitan over several: its default, FSDP2 fully sharding; its replicate degree, DDP, is not modelled)
    if (!trains_in_deepspeed(rq.for_format)) {
        if (rq.gpus == 1 || !fsdp2_is_zero3(rq)) return {0};
        return rq.base.precision == Precision::Bf16Master || rq.for_format == "torchtitan" ? std::vector<int>{3}
                                                                                            : std::vector<int>{0, 3};
    }
    // (Axolotl's own FSDP2, asked for: its ZeRO-3 over several GPUs; its DDP is not modelled)
    if (rq.gpus > 1 && rq.for_format == "axolotl" && fsdp2_is_zero3(rq)) return {3};
    if (rq.gpus == 1 && rq.for_format == "axolotl" && rq.base.precision == Precision::PureBf16)
        return deepspeed_runs(rq.base, rq.model) ? std::vector<int>{0, 1, 2} : std::vector<int>{0};
    TrainingSetup many = rq.base;  // (max-seq: the user's own setup may be the base; its blocks are not the search's)
    many.dp = rq.gpus;
    many.mlp_chunks = many.lm_chunks = 1, many.offload_checkpoints = false, many.checkpoint.clear();
    if (rq.gpus > 1 && deepspeed_runs(many, rq.model, 3)) return {1, 2, 3};
    return {1, 2};
}

// Whether the search tries stepping the optimizer inside backward for an outer choice of `grad_accum`
// accumulation steps at ZeRO `zero`: asked for, no accumulation, and every gradient whole on its
// rank (not reduce-scattered by ZeRO 2/3, not bucketed by the hf runtime's DDP).
bool searches_step_in_backward(const TuneRequest& rq, std::int64_t grad_accum, int zero) {
    return rq.allow_optimizer_in_backward && grad_accum == 1 &&
           !(rq.gpus > 1 && (zero >= 2 || rq.base.runtime == Runtime::Hf));
}

// Weights, master weights, gradients, optimizer states and workspace at their most, as `s`'s layout
// holds them (a short step of it: they do not depend on the length).
bytes_t persistent_state_bytes(const ModelSpec& m, TrainingSetup s, const GpuProfile& gpu) {
    s.seq_len = 1024 * s.sp;
    const Estimate e = estimate(m, s, gpu);
    const auto& mx = e.summary.category_max;
    return checked_sum({mx[static_cast<std::size_t>(Category::Weights)], mx[static_cast<std::size_t>(Category::MasterWeights)],
                        mx[static_cast<std::size_t>(Category::Gradients)], mx[static_cast<std::size_t>(Category::OptimizerState)],
                        mx[static_cast<std::size_t>(Category::Workspace)]},
                       "persistent bytes");
}

// `sim`: the search's simulator (warm tables), for the same plan without each technique.
std::string explain(const TuneRequest& rq, const Candidate& best, bytes_t budget, PeakSimulator& sim) {
    const ModelSpec& m = rq.model;
    const TrainingSetup& s = best.setup;
    const Estimate e = estimate(m, s, rq.gpu);
    const Summary& sum = e.summary;
    auto cat = [&](Category c) { return sum.peak.by_category[static_cast<std::size_t>(c)]; };
    const bytes_t state = checked_sum({cat(Category::Weights), cat(Category::MasterWeights), cat(Category::OptimizerState),
                                       sum.category_max[static_cast<std::size_t>(Category::Gradients)]},
                                      "persistent bytes");
    const Event& at = e.timeline.events[static_cast<std::size_t>(sum.peak.event)];
    std::string why = fmt::format(
        "Weights, gradients and optimizer states take {} of the {} budget (what the {} leaves a process, less a {} "
        "safety margin). ",
        format_bytes(state), format_bytes(budget), rq.gpu.display_name, percent(rq.safety_margin));
    if (e.timeline.rank >= 0)  // ring attention: the reserved peak is the busiest rank's, the place the step shown
        why += fmt::format("The highest rank reserves {}; on rank {} (the highest requested peak) the peak comes in {} at "
                           "{}{}, where saved activations hold {} and transients {}. ",
                           format_bytes(e.allocator.peak_reserved), e.timeline.rank, to_string(at.phase), at.op,
                           at.layer >= 0 ? fmt::format(" of layer {}", at.layer) : "",
                           format_bytes(cat(Category::SavedActivation)), format_bytes(cat(Category::Transient)));
    else
        why += fmt::format("The peak ({} reserved) comes in {} at {}{}, where saved activations hold {} and transients {}. ",
                           format_bytes(e.allocator.peak_reserved), to_string(at.phase), at.op,
                           at.layer >= 0 ? fmt::format(" of layer {}", at.layer) : "",
                           format_bytes(cat(Category::SavedActivation)), format_bytes(cat(Category::Transient)));
    // What each technique buys here: the same plan without it.
    auto without = [&](auto change) {
        TrainingSetup t = s;
        change(t);
        take_model_code(t, rq);  // (--for torchtitan: its own step where that plan is inside what is modelled of it)
        return sim.peaks(t, true, budget).peak_reserved_bytes;
    };
    if (s.mlp_chunks > 1 || s.lm_chunks > 1) {
        const bytes_t no_mst = without([](TrainingSetup& t) { t.mlp_chunks = 1, t.lm_chunks = 1; });
        why += fmt::format("Mini-sequences (MLP x{}, LM head x{}) keep the logits and MLP intermediates small: without "
                           "them the peak would be {}{}. ",
                           s.mlp_chunks, s.lm_chunks, format_bytes(no_mst), no_mst > budget ? ", over budget" : "");
    }
    const std::int64_t k = s.checkpointed_count();
    if (k > 0) {
        const bytes_t no_ckpt = without([](TrainingSetup& t) { t.checkpoint.clear(), t.offload_checkpoints = false; });
        const double total = best.time.forward_seconds + best.time.backward_seconds + best.time.recompute_seconds;
        why += fmt::format("Checkpointing {} of {} layers ({}) trades {} of compute for recomputation; without it the "
                           "peak would be {}{}. ",
                           k, m.num_layers, describe_checkpoints(s.checkpoint), percent(best.time.recompute_seconds / total),
                           format_bytes(no_ckpt), no_ckpt > budget ? ", over budget" : "");
    } else {
        why += "Every layer keeps its activations: no recomputation is needed. ";
    }
    if (s.offload_checkpoints)
        why += fmt::format("Checkpoints go to host memory ({} pinned per GPU); {} of transfer time per step is not hidden. ",
                           format_bytes(best.memory.host_peak_bytes),
                           fmt::format("{:.1f} ms", 1e3 * best.time.offload_exposed_seconds * static_cast<double>(s.grad_accum)));
    if (s.ulysses())
        why += fmt::format("Ulysses sequence parallelism over {} GPUs gives each rank {} tokens outside attention; its "
                           "all-to-all costs {:.1f} ms per step. ",
                           s.sp, s.local_tokens(), 1e3 * best.time.ulysses_seconds);
    if (s.ring())
        why += fmt::format("Ring attention (context parallelism) over {} GPUs gives each rank {} tokens and every head; "
                           "{:.1f} ms per step of its K/V exchange is not hidden behind its blocks. ",
                           s.sp, s.local_tokens(), 1e3 * best.time.ring_seconds);
    if (s.ep > 1)
        why += fmt::format("Expert parallelism over {} GPUs holds {} of the {} experts on each; its all-to-alls cost {:.1f} ms "
                           "per step{}. ",
                           s.ep, m.moe->experts / s.ep, m.moe->experts, 1e3 * best.time.expert_parallel_seconds,
                           s.moe_imbalance > 1.0 ? fmt::format(" (the busiest rank receiving {}x its share)", s.moe_imbalance) : "");
    if (s.dp > 1) why += fmt::format("Data parallelism over {} GPUs. ", s.dp);
    if (s.runtime == Runtime::Hf && s.zero_stage == 0 && s.dp > 1)
        why += fmt::format("torch's DDP all-reduces the gradients once per step, behind the last micro-step's backward but "
                           "for the embedding's gradient, ready last: {:.1f} ms per step not hidden. ",
                           1e3 * best.time.comm_exposed_seconds);
    if (s.deepspeed_zero())
        why += fmt::format("DeepSpeed's engine holds the bf16 parameters in one flat buffer, moves each gradient into its "
                           "bucket of {} elements ({}{}) and keeps the gradients of the parameters its partition "
                           "touches{}. ",
                           s.reduce_bucket_size == kDeepSpeedReduceBucket ? "5e8" : std::to_string(s.reduce_bucket_size),
                           format_bytes(checked_mul(s.reduce_bucket_size, 2)),
                           s.overlap_comm ? "; overlap_comm: two of them, the reductions running behind backward" : "",
                           s.dp > 1 ? "; every rank's step is walked" : "");
    if (s.deepspeed_zero() && s.zero_ranks() > 1)
        why += fmt::format("Its gradient reductions ({}) and the all-gather of the updated parameters after the step leave "
                           "{:.1f} ms per step not hidden behind compute. ",
                           s.overlap_comm ? (s.zero_stage == 2 ? "behind every backward, but for what its end flushes"
                                                               : "behind the last micro-step's backward, but for what its end flushes")
                                          : (s.zero_stage == 2 ? "waited for in backward's hooks, without overlap_comm"
                                                               : "after the last micro-step's backward, without overlap_comm"),
                           1e3 * best.time.comm_exposed_seconds);
    if (s.fsdp2_shards() && s.zero_ranks() > 1 && s.titan()) {
        // (torchtitan's apply_fsdp, docs/torchtitan-model.md sections 0 and 3: its tail kept after the forward; a tied
        // model's embedding in the tail's group; gradients reduced in fp32 whatever the parameters)
        const bool tied = rq.model.tie_word_embeddings;
        const bool kept = !s.fsdp2_reshard_after_forward;  // (fsdp_reshard_after_forward never)
        why += fmt::format("torchtitan's FSDP2 (fully_shard on {}, every decoder layer and the model) all-gathers a layer's "
                           "parameters{} for its forward and {} and reduce-scatters its gradients in "
                           "fp32; {}{} {}, whose first gather and last reduce-scatter leave {:.1f} ms per step not hidden "
                           "behind compute. ",
                           tied ? "the embedding with the final norm and the LM head" : "the embedding, the final norm with the LM head",
                           s.precision == Precision::Bf16Master ? " in bf16 (its fp32 shards are the master weights)" : "",
                           kept ? "keeps them to its backward (fsdp_reshard_after_forward never)" : "again for its backward",
                           tied ? ""
                           : kept ? "the embedding's group is kept gathered as a layer's is; "
                                  : "the embedding's group is resharded after its forward as a layer's is; ",
                           tied ? "the tail's group (embedding, final norm, LM head)" : "the tail's (final norm, LM head)",
                           s.lm_chunks > 1 ? "is resharded after the final norm and gathered again for the loss's chunks and for "
                                             "its backward"
                           : tied          ? "stays gathered from the forward to the end of backward"
                                           : "stays gathered from its forward to its backward",
                           1e3 * best.time.comm_exposed_seconds);
    } else if (s.fsdp2_shards() && s.zero_ranks() > 1) {
        // (accelerate's groups: an untied embedding is gathered as a layer is; the tail keeps the rest; its bf16 policy
        // reduces in bf16)
        // (Axolotl's: the model's own group reshards after its forward as the layers do)
        const bool accelerate = s.fsdp2_groups == Fsdp2Groups::Accelerate, master = s.precision == Precision::Bf16Master;
        const bool axolotl = s.fsdp2_groups == Fsdp2Groups::Axolotl;
        const bool own_embedding = s.fsdp2_embedding_alone(rq.model);
        why += fmt::format("torch's FSDP2 ({}) all-gathers a layer's parameters{} for its forward and again for its "
                           "backward and reduce-scatters its gradients{}; {} {}, whose first gather{} and last "
                           "reduce-scatter leave {:.1f} ms per step not hidden behind compute. ",
                           accelerate ? "accelerate's fully_shard groups, as the Hugging Face Trainer shards the model"
                           : axolotl  ? "Axolotl's fsdp2_prepare_model: fully_shard on every decoder layer and the model, in "
                                        "torch 2.14"
                                      : "fully_shard on every decoder layer and the model",
                           master ? " in bf16 (its fp32 shards are the master weights)" : "",
                           master ? (accelerate ? " in bf16, cast into fp32 shards" : " in fp32") : "",
                           own_embedding ? "the tail's (final norm, LM head)"
                           : accelerate  ? "the tail's (final norm, tied embedding and LM head)"
                                         : "the model's own (embedding, final norm, LM head)",
                           own_embedding ? "stay gathered from its forward to its backward (the embedding, a group of its "
                                           "own, is gathered as a layer is)"
                           : s.fsdp2_root_reshards()
                               ? "are gathered for the forward and again as backward starts, and stay to the end of backward"
                               : "stay gathered from its forward to the end of backward",
                           s.fsdp2_root_reshards() ? "s" : "", 1e3 * best.time.comm_exposed_seconds);
    }
    if (s.fsdp2_unsynced())
        why += "Its gradients are synced in the last micro-step only (set_requires_gradient_sync(False) before the "
               "others, as the Hugging Face Trainer accumulates): every layer's whole gradients stay until then. ";
    if (s.deepspeed_zero3() && s.zero_ranks() > 1)
        why += fmt::format("DeepSpeed's stage-3 engine gathers each module's parameters as its trace comes to them, up "
                           "to {} elements ahead, keeps those of at most {} elements gathered, and reduce-scatters the "
                           "gradients per bucket of {} elements ({}); its first gather and backward's last flush leave "
                           "{:.1f} ms per step not hidden behind compute. ",
                           s.prefetch_bucket_size, s.param_persistence_threshold, s.reduce_bucket_size,
                           format_bytes(checked_mul(s.reduce_bucket_size, 2)), 1e3 * best.time.comm_exposed_seconds);
    if (s.zero_stage > 0 && s.zero_ranks() > 1)
        why += fmt::format("ZeRO stage {} shards {} over all {} ranks{}. ", s.zero_stage,
                           s.zero_stage == 1   ? "the optimizer states"
                           : s.zero_stage == 2 ? "optimizer states and gradients"
                           : s.fsdp2_unsynced()
                               ? "parameters, optimizer states and the gradients once reduce-scattered"
                               : "parameters, gradients and optimizer states",
                           s.zero_ranks(),
                           s.ep == 1 ? "" : s.expert_data_ranks() == 1 ? " (the experts' not at all: one rank holds each)"
                                                                        : fmt::format(" (the experts' over the {} holding each)", s.expert_data_ranks()));
    why += fmt::format("Predicted: {:.0f} tokens/s per GPU, MFU {}.", best.time.tokens_per_second, percent(best.time.mfu));
    return why;
}

}  // namespace

namespace {
// The GPU count within its bound, and a base setup the runtime models: the hf runtime plans DDP or
// DeepSpeed's ZeRO 1/2 (zero_stages) and refuses some knobs (validate_hf_scope) with a pointer to
// the kernels runtime, which the user should read rather than a search that finds nothing.
void check_request(const TuneRequest& rq, const char* command) {
    // (the budget is the usable memory less this fraction: never more than the GPU holds)
    if (!(rq.safety_margin >= 0 && rq.safety_margin < 1))
        fail(command, "margin", fmt::format("expected a fraction in [0, 1), got {}", rq.safety_margin));
    if (rq.gpus < 1 || rq.gpus > limits::kGpus)
        fail(command, "gpus", fmt::format("expected a count in [1, {}], got {}", limits::kGpus, rq.gpus));
    // --hf-trainer-bf16 for a runtime or model it is not modelled for (the engines without native amp drop it: take_engine)
    if (rq.base.hf_trainer_bf16) {
        TrainingSetup plain = rq.base;
        plain.zero_stage = 0, plain.fsdp2 = false;
        if (const std::string why = hf_trainer_bf16_refusal(plain, rq.model); !why.empty()) fail(command, "hf_trainer_bf16", why);
    }
    // What the runtime cannot plan for the format, the GPUs or the pins is named here, not searched for.
    if (const auto formats = emit_formats();
        !rq.for_format.empty() && std::find(formats.begin(), formats.end(), rq.for_format) == formats.end())
        fail(command, "for", fmt::format("expected one of {}, got '{}'", fmt::join(formats, ", "), rq.for_format));
    // FSDP2's groups are one trainer's: Axolotl's its own (bf16 weights only), the others python/mst_hf's users'.
    // The deepspeed and torchtitan formats' trainers never run the hf runtime's FSDP2 (fsdp2_is_zero3).
    if (rq.base.fsdp2_groups != Fsdp2Groups::MstHf && (rq.for_format == "deepspeed" || rq.for_format == "torchtitan"))
        fail(command, "fsdp2_groups",
             fmt::format("expected mst_hf, the default, with --for {} (its trainer shards with {}, not the hf runtime's "
                         "FSDP2), got {}",
                         rq.for_format, rq.for_format == "deepspeed" ? "DeepSpeed's ZeRO engine" : "torchtitan's own FSDP",
                         to_string(rq.base.fsdp2_groups)));
    if (rq.base.fsdp2_groups == Fsdp2Groups::Axolotl && !(rq.for_format.empty() || rq.for_format == "axolotl"))
        fail(command, "fsdp2_groups",
             fmt::format("expected mst_hf or accelerate with --for {} (Axolotl shards with its own fsdp2_prepare_model: "
                         "--for axolotl), got axolotl",
                         rq.for_format));
    if (rq.base.fsdp2_groups != Fsdp2Groups::Axolotl && rq.base.fsdp2_groups != Fsdp2Groups::MstHf && rq.for_format == "axolotl")
        fail(command, "fsdp2_groups",
             fmt::format("expected axolotl with --for axolotl (Axolotl shards with its own fsdp2_prepare_model), got {}",
                         to_string(rq.base.fsdp2_groups)));
    if (rq.base.fsdp2_groups != Fsdp2Groups::MstHf && rq.base.runtime != Runtime::Hf)
        fail(command, "fsdp2_groups",
             fmt::format("expected mst_hf with runtime kernels (FSDP2 is the hf runtime's), got {}", to_string(rq.base.fsdp2_groups)));
    if (rq.base.fsdp2_groups == Fsdp2Groups::Axolotl && rq.base.precision != Precision::PureBf16)
        fail(command, "fsdp2_groups",
             fmt::format("expected --precision pure-bf16 with axolotl (Axolotl trains the bf16 weights it loads: no fp32 "
                         "master), got {}",
                         to_string(rq.base.precision)));
    // Axolotl's own FSDP2 over several GPUs is its ZeRO-3, without DeepSpeed's engine: for a model FSDP2 is modelled
    // for, no DeepSpeed stage, bucket or overlap
    if (rq.base.fsdp2_groups == Fsdp2Groups::Axolotl && rq.gpus > 1) {
        TrainingSetup probe = rq.base;
        probe.zero_stage = 3, probe.dp = 2, probe.fsdp2 = true;
        try {
            validate_fsdp2_scope(probe, rq.model);
        } catch (const UserError& e) {
            fail(command, "fsdp2_groups", fmt::format("expected mst_hf where FSDP2 is not modelled, got axolotl ({})", e.what()));
        }
        if (rq.pins.zero_stage && *rq.pins.zero_stage != 3)
            fail(command, "pin", fmt::format("zero={}: expected 3 with --fsdp2-groups axolotl (Axolotl's FSDP2 is its ZeRO-3; "
                                             "without the option --for axolotl plans DeepSpeed's ZeRO 1 to 3)",
                                             *rq.pins.zero_stage));
        if (rq.pins.overlap_comm.value_or(false))
            fail(command, "pin", "overlap_comm=yes: expected no with --fsdp2-groups axolotl (FSDP2 has no DeepSpeed bucket)");
        if (!rq.base.deepspeed_defaults())
            fail(command, "fsdp2_groups",
                 fmt::format("expected DeepSpeed's defaults with axolotl (Axolotl's FSDP2 runs no DeepSpeed engine), got {}",
                             deepspeed_options(rq.base)));
    }
    // The hf runtime's data parallelism is torch's DDP or FSDP2 as python/mst_hf's users run them, DeepSpeed's
    // ZeRO engine (deepspeed, axolotl), or torchtitan's default: FSDP2 fully sharding (zero_stages), in its own
    // layout (resharded after each forward, or with --fsdp2-reshard-after-forward false kept gathered to backward:
    // its fsdp_reshard_after_forward never; gradients reduce-scattered every micro-batch: its loop never skips the
    // sync), inside what its own step models (titan_scope_refusal: its Llama-3 code in pure bf16 or bf16-master).
    if (rq.base.runtime == Runtime::Hf && rq.gpus > 1 && rq.for_format == "torchtitan") {
        // (named by the option asked for: the model, not its model code)
        if (const auto outside = titan_fsdp2_refusal(rq))
            fail(command, std::string_view(outside->field) == "model_code" ? "model" : outside->field,
                 fmt::format("{} (torchtitan over {} GPUs is planned with its own step in runtime hf; --runtime kernels plans "
                             "others with mst-plan's own kernels' memory)",
                             outside->expected, rq.gpus));
    }
    if (rq.base.runtime == Runtime::Hf && trains_in_deepspeed(rq.for_format) && rq.gpus > limits::kDeepSpeedRanks)
        fail(command, "gpus", fmt::format("expected at most {} with runtime hf and --for {} (every rank of DeepSpeed's engine "
                                          "is walked; --runtime kernels plans more), got {}",
                                          limits::kDeepSpeedRanks, rq.for_format, rq.gpus));
    TrainingSetup as_planned = rq.base;
    as_planned.dp = rq.gpus;
    const std::vector<int> zeros = zero_stages(rq);
    // A pinned DeepSpeed stage whose engine cannot run the knobs: DeepSpeed's own reason, not the stages left.
    if (rq.base.runtime == Runtime::Hf && rq.pins.zero_stage && trains_in_deepspeed(rq.for_format) && *rq.pins.zero_stage >= 1) {
        TrainingSetup pinned = as_planned;
        pinned.zero_stage = *rq.pins.zero_stage;
        take_engine(pinned, rq);
        validate_hf_scope(pinned, rq.model);
        // with the other pins it has to run with (a checkpoint to offload, where offload is pinned)
        pinned.seq_len = rq.seq_len;
        if (rq.pins.mlp_chunks) pinned.mlp_chunks = *rq.pins.mlp_chunks;
        if (rq.pins.lm_chunks) pinned.lm_chunks = *rq.pins.lm_chunks;
        if (rq.pins.mlp_impl) pinned.mlp_impl = *rq.pins.mlp_impl;
        if (rq.pins.overlap_comm) pinned.overlap_comm = *rq.pins.overlap_comm;
        if (rq.pins.offload) pinned.offload_checkpoints = *rq.pins.offload;
        pinned.checkpoint.assign(static_cast<std::size_t>(rq.model.num_layers), true);
        validate(pinned, rq.model);
    }
    if (rq.base.runtime == Runtime::Hf && rq.pins.zero_stage &&
        std::find(zeros.begin(), zeros.end(), *rq.pins.zero_stage) == zeros.end())
        fail(command, "pin", fmt::format("zero={}: expected {} with runtime hf{} ({})", *rq.pins.zero_stage, fmt::join(zeros, " or "),
                                         rq.for_format.empty() ? "" : " and --for " + rq.for_format,
                                         rq.for_format == "torchtitan" && rq.gpus > 1
                                             ? "torchtitan's default, FSDP2 fully sharding, is what it plans over several GPUs; "
                                               "--runtime kernels plans its ZeRO 2, reshard never, and its replicate degree"
                                             : "ZeRO 0 is torch's DDP, 3 torch's FSDP2 for a dense model with bf16 weights or fp32 "
                                               "ones under its bf16 policy, 1 to 3 DeepSpeed's engine, which --for deepspeed and "
                                               "axolotl train in"));
    as_planned.zero_stage = rq.pins.zero_stage.value_or(zeros.front());  // (the hf runtime: DDP's or DeepSpeed's rules)
    // (at the length asked for, which an error names: sdpa under a sliding window; max-seq: the setup's)
    if (rq.seq_len >= 1 && rq.seq_len <= limits::kSeqLen) as_planned.seq_len = rq.seq_len;
    take_engine(as_planned, rq);
    validate_model_scope(as_planned, rq.model);
    validate_hf_scope(as_planned, rq.model);
    // (asked for, and some layout can use it)
    if (as_planned.sp_impl == SpImpl::Ring && rq.gpus > 1 && !(rq.pins.sp && *rq.pins.sp == 1))
        validate_ring_scope(as_planned, rq.model);
    if (rq.pins.offload && *rq.pins.offload && !rq.allow_offload)
        fail(command, "pin", "offload=yes: expected --allow offload=yes (or no --allow offload=no): the two contradict");
    if (rq.pins.offload && *rq.pins.offload &&
        ((rq.pins.checkpoint_count && *rq.pins.checkpoint_count == 0) ||
         (rq.pins.checkpoint && std::none_of(rq.pins.checkpoint->begin(), rq.pins.checkpoint->end(), [](bool b) { return b; }))))
        fail(command, "pin", "offload=yes: expected checkpointed layers to offload (the pinned checkpointing has none)");
    if (rq.base.runtime == Runtime::Hf && rq.pins.sp && *rq.pins.sp > 1)
        fail(command, "pin", fmt::format("sp={}: expected 1 with runtime hf (sequence parallelism is not modelled in it yet: "
                                         "--runtime kernels plans it)", *rq.pins.sp));
    if (rq.base.moe_imbalance != 1.0 && (!rq.model.moe || rq.base.runtime == Runtime::Hf))
        fail(command, "moe-imbalance", fmt::format("expected 1 (it sizes expert parallelism's buffers: a Mixture-of-Experts "
                                                   "model with --runtime kernels), got {}", rq.base.moe_imbalance));
    if (rq.pins.ep && *rq.pins.ep > 1) {
        if (!rq.model.moe)
            fail(command, "pin", fmt::format("ep={}: expected 1 for a dense model (expert parallelism shards a "
                                             "Mixture-of-Experts block's experts)", *rq.pins.ep));
        if (rq.base.runtime == Runtime::Hf)
            fail(command, "pin", fmt::format("ep={}: expected 1 with runtime hf (expert parallelism is not modelled in it "
                                             "yet: --runtime kernels plans it)", *rq.pins.ep));
        if (rq.model.moe->experts % *rq.pins.ep != 0 || rq.gpus % *rq.pins.ep != 0)
            fail(command, "pin", fmt::format("ep={}: expected a divisor of both the experts ({}) and the GPUs ({})", *rq.pins.ep,
                                             rq.model.moe->experts, rq.gpus));
    }
}

// --for: why the format's trainer cannot train `s` as planned, in its emitter's words ("" when it can).
std::string refusal_of(const std::string& format, const TrainingSetup& s, const ModelSpec& m) {
    try {
        check_expressible(format, s, m);
        return "";
    } catch (const UserError& e) {
        return e.what();
    }
}
}  // namespace

bool trains_in_deepspeed(const std::string& format) { return format == "deepspeed" || format == "axolotl"; }

std::string deepspeed_options(const TrainingSetup& s) {
    std::string out;
    if (s.reduce_bucket_size != kDeepSpeedReduceBucket) out = fmt::format("--reduce-bucket-size {}", s.reduce_bucket_size);
    if (s.overlap_comm) out += out.empty() ? "--overlap-comm" : " --overlap-comm";
    return out;
}

namespace {
// The first of them as an error's field
const char* deepspeed_field(const TrainingSetup& s) {
    return s.reduce_bucket_size != kDeepSpeedReduceBucket ? "reduce-bucket-size" : "overlap-comm";
}
}  // namespace

namespace {

// When nothing fits: a setup of the search with each memory-saving knob at its most, within the pins
// and what --for's trainer runs (the widest sequence- and expert-parallel degrees searched, the
// highest ZeRO stage over several ranks and the lowest on one, where a higher one shards nothing and
// adds DeepSpeed's buffers; the smallest micro-batch; every layer checkpointed and offloaded, as
// allowed; the most chunks of both blocks; the tiled MLP where it runs; the optimizer stepped in
// backward where allowed), and where its step peaks, on the first rank its step walks. It is a guide
// to what no knob shrank enough, not always the least memory of all searched (the LM head's
// implementation is the one asked for). None when the knobs or the trainer refuse it, its sizes pass
// 64 bits, or it fits (then it explains nothing).
std::optional<Recommendation::Leanest> leanest(const TuneRequest& rq, std::int64_t sp, std::int64_t ep, bytes_t budget,
                                               bytes_t trainer_extra, PeakSimulator& sim) {
    const ModelSpec& m = rq.model;
    TrainingSetup s = rq.base;
    s.seq_len = rq.seq_len;
    s.sp = sp, s.dp = rq.gpus / sp, s.ep = ep;
    s.moe_imbalance = std::min(rq.base.moe_imbalance, static_cast<double>(ep));
    const std::vector<int> zeros = zero_stages(rq);
    s.zero_stage = rq.pins.zero_stage ? *rq.pins.zero_stage : rq.gpus == 1 ? zeros.front() : zeros.back();
    take_engine(s, rq);
    s.overlap_comm = s.deepspeed_zero() && rq.pins.overlap_comm.value_or(false);
    s.micro_batch = rq.pins.micro_batch.value_or(rq.tokens_per_step ? 1 : rq.base.micro_batch);
    if (rq.tokens_per_step)  // (the accumulation that reaches the tokens per step, as the search pairs them)
        s.grad_accum = ceil_div(std::max<std::int64_t>(1, ceil_div(*rq.tokens_per_step, checked_mul(rq.seq_len, s.dp))),
                                s.micro_batch);
    s.optimizer_in_backward = rq.base.optimizer_in_backward || searches_step_in_backward(rq, s.grad_accum, s.zero_stage);
    s.checkpoint = rq.pins.checkpoint ? *rq.pins.checkpoint : first_layers(rq.pins.checkpoint_count.value_or(m.num_layers), m.num_layers);
    s.offload_checkpoints = rq.allow_offload && rq.pins.offload.value_or(true) && s.checkpointed_count() > 0;
    s.mlp_chunks = chunk_options(s.local_tokens(), rq.pins.mlp_chunks, max_mlp_chunks(m)).back();
    s.lm_chunks = chunk_options(s.local_tokens(), rq.pins.lm_chunks, limits::kChunks).back();
    if (even_lm_chunks(rq.for_format) && !rq.pins.lm_chunks)
        s.lm_chunks = dividing_chunks(s.seq_len / s.sp, s.lm_chunks, limits::kChunks);
    if (rq.pins.lm_impl) s.lm_impl = *rq.pins.lm_impl;
    s.mlp_impl = rq.pins.mlp_impl.value_or(MlpImpl::Tiled);
    const auto runs = [&](TrainingSetup t) {
        take_model_code(t, rq);
        return valid(t, m) && (rq.for_format.empty() || refusal_of(rq.for_format, t, m).empty());
    };
    // What the runtime or the trainer refuses gives way, one knob after the other (those not pinned):
    // the tiled MLP, offload, MLP chunks, expert and sequence parallelism, the LM head's implementation.
    for (int step = 0; step < 6 && !runs(s); ++step) {
        if (step == 0 && !rq.pins.mlp_impl) s.mlp_impl = MlpImpl::Loop;
        if (step == 1 && !rq.pins.offload) s.offload_checkpoints = false;
        if (step == 2 && !rq.pins.mlp_chunks) s.mlp_chunks = 1;
        if (step == 3 && !rq.pins.ep) s.ep = 1, s.moe_imbalance = 1.0;
        if (step == 4 && !rq.pins.sp) s.sp = 1, s.dp = rq.gpus;
        if (step == 5 && !rq.pins.lm_impl) s.lm_impl = s.lm_impl == LmHeadImpl::Recompute ? LmHeadImpl::FusedForward : LmHeadImpl::Recompute;
    }
    if (!runs(s)) return std::nullopt;
    take_model_code(s, rq);  // (--for torchtitan: its own step where it is modelled, with the whole budget)
    if (!s.titan()) budget -= trainer_extra;
    try {
        const MemoryPeaks p = sim.peaks(s, true, budget);
        if (p.peak_reserved_bytes <= budget && p.host_peak_bytes <= rq.host_bytes_per_gpu) return std::nullopt;
        const std::vector<std::int64_t> ranks = walked_ranks(s, m);
        const std::optional<std::int64_t> rank = ranks.empty() ? std::nullopt : std::optional(ranks.front());
        const Estimate e = estimate(m, s, rq.gpu, budget, rank);
        const Summary& sum = e.summary;
        const Event& at = e.timeline.events[static_cast<std::size_t>(sum.peak.event)];
        const auto cat = [&](Category c) { return sum.peak.by_category[static_cast<std::size_t>(c)]; };
        return Recommendation::Leanest{.setup = s,
                                       .peak_reserved_bytes = p.peak_reserved_bytes,
                                       .host_bytes = p.host_peak_bytes,
                                       .rank = rank.value_or(-1),
                                       .phase = at.phase,
                                       .op = at.op,
                                       .layer = at.layer,
                                       .saved_bytes = cat(Category::SavedActivation),
                                       .transient_bytes = cat(Category::Transient)};
    } catch (const UserError&) {  // (a size past 64 bits, such as eager scores at 2^30 tokens: "no setup fits" stands)
        return std::nullopt;
    }
}

}  // namespace

Recommendation recommend(const TuneRequest& rq) {
    const ModelSpec& m = rq.model;
    Recommendation out;
    check_request(rq, "recommend");
    const std::string ds_option = deepspeed_options(rq.base);
    if (!ds_option.empty() && !(rq.base.runtime == Runtime::Hf && trains_in_deepspeed(rq.for_format)))
        fail("recommend", deepspeed_field(rq.base),
             fmt::format("expected --for deepspeed or axolotl with runtime hf (DeepSpeed's ZeRO 1/2 engine has it), or "
                         "DeepSpeed's default, got {}",
                         ds_option));
    if (!ds_option.empty() && rq.pins.zero_stage && *rq.pins.zero_stage == 0)
        fail("recommend", "pin", fmt::format("zero=0: expected 1 or 2 with {} (only DeepSpeed's ZeRO 1/2 engine has it)",
                                             ds_option));
    if (rq.pins.overlap_comm && *rq.pins.overlap_comm) {
        if (!(rq.base.runtime == Runtime::Hf && trains_in_deepspeed(rq.for_format)))
            fail("--pin", "overlap_comm", "yes: expected --for deepspeed or axolotl with runtime hf (DeepSpeed's ZeRO 1/2 engine has it)");
        if (rq.pins.zero_stage && *rq.pins.zero_stage == 0)
            fail("recommend", "pin", "zero=0: expected 1 or 2 with overlap_comm=yes (only DeepSpeed's ZeRO 1/2 engine has it)");
    }
    out.budget_bytes = static_cast<bytes_t>(static_cast<double>(rq.gpu.usable_bytes()) * (1 - rq.safety_margin));
    if (rq.seq_len < 1 || rq.seq_len > limits::kSeqLen)
        fail("recommend", "seq_len", fmt::format("expected a length in [1, {}], got {}", limits::kSeqLen, rq.seq_len));
    if (rq.tokens_per_step) {
        // The most one step can hold: every GPU a data-parallel rank, each at the largest micro-batch
        // and accumulation the bounds allow.
        const std::int64_t batch = std::min(limits::kMicroBatch, limits::kMicroStepTokens / rq.seq_len);
        const std::int64_t most = checked_product({batch, limits::kGradAccum, rq.gpus, rq.seq_len}, "tokens per step");
        if (*rq.tokens_per_step < 1 || *rq.tokens_per_step > most)
            fail("recommend", "tokens_per_step",
                 fmt::format("expected [1, {}] tokens (micro-batch {} x accumulation {} x {} GPUs x seq {}), got {}", most,
                             batch, limits::kGradAccum, rq.gpus, rq.seq_len, *rq.tokens_per_step));
    }
    // --for: what the format's trainer allocates beyond the runtime's prediction stays free.
    TrainingSetup at_length = rq.base;
    at_length.seq_len = rq.seq_len;
    const bytes_t trainer_extra = rq.for_format.empty() ? 0 : trainer_extra_bytes(rq.for_format, at_length, m);
    out.trainer_extra_bytes = trainer_extra;
    if (trainer_extra >= out.budget_bytes)
        fail("recommend", "seq_len",
             fmt::format("expected a length at which {}'s own allocations beyond the prediction fit the {} budget (its "
                         "RoPE tables take {} at {} tokens), got {}",
                         rq.for_format, format_bytes(out.budget_bytes), format_bytes(trainer_extra), rq.seq_len, rq.seq_len));
    Search search(rq, out.budget_bytes, trainer_extra, rq.search_threads);  // (--threads 1: the ranks' walks too)
    // --for: only what the format's trainer can train as planned; the first refusal is kept to say
    // why nothing was searched, when nothing was.
    std::string refusal;
    std::int64_t expressible_setups = 0;
    auto expressible = [&](const TrainingSetup& s) {
        if (rq.for_format.empty()) return true;
        const std::string why = refusal_of(rq.for_format, s, m);
        if (!why.empty()) {
            if (refusal.empty()) refusal = why;
            return false;
        }
        ++expressible_setups;
        return true;
    };

    std::vector<std::int64_t> sps;
    const bool hf = rq.base.runtime == Runtime::Hf;  // the hf runtime: DDP or DeepSpeed's engine, no sp
    for (std::int64_t sp = 1; sp <= (hf ? 1 : rq.gpus); ++sp) {
        if (rq.pins.sp && sp != *rq.pins.sp) continue;
        if (sp_degree_fits(rq, sp, rq.seq_len)) sps.push_back(sp);
    }
    if (sps.empty())
        fail("recommend", "sp",
             rq.base.sp_impl == SpImpl::Ring
                 ? fmt::format("no sequence-parallel degree of at most {} ranks (ring attention's) divides the GPUs ({}) "
                               "with 2 sp dividing the sequence ({}){}",
                               limits::kRingRanks, rq.gpus, rq.seq_len, rq.pins.sp ? " with the pinned sp" : "")
                 : fmt::format("no sequence-parallel degree divides the GPUs ({}), heads ({}), KV heads ({}) and sequence ({}) "
                               "together{}",
                               rq.gpus, m.num_heads, m.num_kv_heads, rq.seq_len, rq.pins.sp ? " with the pinned sp" : ""));
    // Expert parallelism (kernels runtime, Mixture-of-Experts; its group is drawn from the dp x sp
    // ranks): none, and the widest degree dividing both the experts and the GPUs. Between them a
    // degree holds more experts per rank than the widest (memory) and moves fewer pairs (time);
    // --pin ep=N plans one of those.
    std::vector<std::int64_t> eps;
    if (rq.pins.ep) {
        eps.push_back(*rq.pins.ep);
    } else {
        eps.push_back(1);
        if (const std::int64_t widest = widest_expert_parallel(rq); widest > 1) eps.push_back(widest);
    }
    std::vector<std::pair<std::int64_t, std::int64_t>> layouts;  // (sp, ep)
    for (std::int64_t sp : sps)
        for (std::int64_t ep : eps) layouts.push_back({sp, ep});
    std::vector<TrainingSetup> outers;  // every choice of the outer knobs, in the order searched
    for (const auto& [sp, ep] : layouts) {
        const std::int64_t dp = rq.gpus / sp;
        std::vector<int> zeros = zero_stages(rq);  // over dp x sp ranks
        if (rq.pins.zero_stage) zeros = {*rq.pins.zero_stage};
        // Micro-batch and accumulation: reach the tokens per step when asked, else one sequence.
        std::vector<std::pair<std::int64_t, std::int64_t>> batches;  // (micro_batch, grad_accum)
        if (rq.tokens_per_step) {
            const std::int64_t per_rank_seqs = std::max<std::int64_t>(1, ceil_div(*rq.tokens_per_step, checked_mul(rq.seq_len, dp)));
            // (a pinned micro-batch of any size takes the accumulation that reaches the tokens; unpinned, powers of two)
            if (rq.pins.micro_batch) batches.push_back({*rq.pins.micro_batch, ceil_div(per_rank_seqs, *rq.pins.micro_batch)});
            for (std::int64_t b = 1; !rq.pins.micro_batch && b <= per_rank_seqs && b <= limits::kMicroBatch; b *= 2)
                batches.push_back({b, ceil_div(per_rank_seqs, b)});
        } else {
            batches.push_back({rq.pins.micro_batch.value_or(rq.base.micro_batch), rq.base.grad_accum});
        }
        for (int zero : zeros)
            for (const auto& [b, ga] : batches)
                for (bool offload : {false, true}) {
                    if (offload && (!rq.allow_offload || (rq.pins.offload && !*rq.pins.offload))) continue;
                    if (!offload && rq.pins.offload && *rq.pins.offload) continue;
                    for (MlpImpl mi : {MlpImpl::Loop, MlpImpl::Tiled}) {
                        if (rq.pins.mlp_impl && mi != *rq.pins.mlp_impl) continue;
                        for (LmHeadImpl li : {LmHeadImpl::Recompute, LmHeadImpl::FusedForward}) {
                            if (rq.pins.lm_impl && li != *rq.pins.lm_impl) continue;
                            for (auto [in_bwd, overlap] : {std::pair{false, false}, {false, true}, {true, false}, {true, true}}) {
                                if (in_bwd && !searches_step_in_backward(rq, ga, zero)) continue;
                                TrainingSetup s = rq.base;
                                s.seq_len = rq.seq_len;
                                s.sp = sp, s.dp = dp, s.zero_stage = zero, s.ep = ep;
                                take_engine(s, rq);
                                // DeepSpeed's overlap_comm: a second bucket for its reductions hidden behind backward
                                // (one rank reduces nothing: unpinned, the second bucket is not tried)
                                if (overlap && (!s.deepspeed_zero() || (s.zero_ranks() == 1 && !rq.pins.overlap_comm))) continue;
                                if (rq.pins.overlap_comm && overlap != *rq.pins.overlap_comm) continue;
                                s.overlap_comm = overlap;
                                // (the busiest of ep ranks receives at most everything)
                                s.moe_imbalance = std::min(rq.base.moe_imbalance, static_cast<double>(ep));
                                s.micro_batch = b, s.grad_accum = ga;
                                s.offload_checkpoints = offload;
                                s.mlp_impl = mi, s.lm_impl = li;
                                s.optimizer_in_backward = in_bwd || rq.base.optimizer_in_backward;
                                if (s.optimizer_in_backward && (s.grad_accum > 1 || (rq.gpus > 1 && zero >= 2))) continue;
                                take_model_code(s, rq);  // (--for torchtitan: its FSDP2 runs its own model code only)
                                if (!expressible(s)) continue;
                                outers.push_back(std::move(s));
                            }
                        }
                    }
                }
    }
    search.search_all(outers);
    out.simulations = search.sims_;
    out.fsdp2_shards = fsdp2_is_zero3(rq);
    if (rq.base.runtime == Runtime::Hf) {
        const std::vector<int> zeros = zero_stages(rq);
        out.zero3_searched = rq.pins.zero_stage ? *rq.pins.zero_stage == 3 : std::find(zeros.begin(), zeros.end(), 3) != zeros.end();
    }
    // Nothing searched: every outer choice, or every chunk or checkpoint count left with one, refused.
    if (!rq.for_format.empty() && (expressible_setups == 0 || search.searched_ == 0))
        fail("recommend", "for",
             fmt::format("a setup {} can train as planned; none of those searched is: {}", rq.for_format,
                         search.refusal_.empty() ? refusal : search.refusal_));
    // When nothing fits, what --for excluded may be why: a refused chunk or checkpoint count of an
    // outer choice the format accepts says more than a refused outer choice.
    out.refusal = search.refusal_.empty() ? refusal : search.refusal_;
    const std::optional<Candidate> best = search.best();
    if (!best) {
        // Where one layout is all there is to search (one GPU; the hf runtime's DDP or DeepSpeed, sp 1),
        // whether its persistent state alone passes the budget says why nothing fits: the least of
        // it the search could have met (stepping in backward, where allowed, holds fewer gradients).
        if (rq.gpus == 1 || hf) {
            TrainingSetup one = rq.base;
            one.dp = rq.gpus, one.sp = 1, one.ep = 1, one.moe_imbalance = 1.0;
            one.checkpoint.assign(static_cast<std::size_t>(m.num_layers), true);
            one.offload_checkpoints = false;
            // (the hf runtime: over the stages searched, DDP's or DeepSpeed's; the kernels runtime's one
            // rank or DDP: ZeRO 0)
            const std::vector<int> zeros = rq.pins.zero_stage                   ? std::vector<int>{*rq.pins.zero_stage}
                                           : rq.base.runtime == Runtime::Hf ? zero_stages(rq)
                                                                            : std::vector<int>{0};
            try {
                out.persistent_bytes = std::numeric_limits<bytes_t>::max();
                for (int zero : zeros) {
                    one.zero_stage = zero, one.optimizer_in_backward = rq.base.optimizer_in_backward;
                    take_engine(one, rq);
                    take_model_code(one, rq);
                    one.overlap_comm = one.deepspeed_zero() && rq.pins.overlap_comm.value_or(false);  // (pinned: two buckets)
                    out.persistent_bytes = std::min(out.persistent_bytes, persistent_state_bytes(m, one, rq.gpu));
                    if (!one.optimizer_in_backward && searches_step_in_backward(rq, one.grad_accum, one.zero_stage)) {
                        one.optimizer_in_backward = true;
                        out.persistent_bytes = std::min(out.persistent_bytes, persistent_state_bytes(m, one, rq.gpu));
                    }
                }
            } catch (const UserError&) {
                out.persistent_bytes = 0;  // (a probe the knobs refuse: nothing to say)
            }
        }
        if (out.persistent_bytes <= out.budget_bytes)
            out.leanest = leanest(rq, sps.back(), eps.back(), out.budget_bytes, trainer_extra, search.simulator());
        if (out.leanest && out.leanest->setup.titan()) out.trainer_extra_bytes = 0;  // (its step holds the RoPE tables)
        return out;
    }
    out.found = true;
    out.best = *best;
    out.pareto = pareto_front(search.evaluated_);
    // Chosen on the budget's device; reported as the GPU holds them (releasing only at its end).
    PeakSimulator& sim = search.simulator();  // (its tables have grown in the search, for the choices it simulated itself)
    on_the_gpu(out.best, sim, rq.gpu, search.budget_for(out.best.setup));
    for (Candidate& c : out.pareto) on_the_gpu(c, sim, rq.gpu, search.budget_for(c.setup));
    if (out.best.setup.titan()) out.trainer_extra_bytes = 0;  // (nothing kept free: its prediction holds it)
    // (a front of what is shown: two setups apart on the budget's device may hold the same on the GPU)
    out.pareto = pareto_front(std::move(out.pareto));
    out.why = explain(rq, out.best, out.budget_bytes, sim);
    return out;
}

Plan to_plan(const Recommendation& r, const TuneRequest& rq, const std::string& model_ref, const std::string& gpu_ref) {
    Plan p;
    p.model = portable_ref(model_ref);  // (emit may run elsewhere)
    p.gpu = portable_ref(gpu_ref);
    p.gpus = rq.gpus;
    p.setup = r.best.setup;
    Prediction& x = p.prediction;
    x.peak_allocated_bytes = r.best.memory.peak_allocated_bytes;
    x.peak_reserved_bytes = r.best.memory.peak_reserved_bytes;
    x.usable_bytes = rq.gpu.usable_bytes();
    x.headroom_bytes = r.budget_bytes - r.trainer_extra_bytes - r.best.memory.peak_reserved_bytes;  // (--for: kept free)
    x.releases_at_budget = r.best.releases_at_budget;
    x.host_bytes = r.best.memory.host_peak_bytes;
    x.step_seconds = r.best.time.step_seconds;
    x.tokens_per_second = r.best.time.tokens_per_second;
    x.mfu = r.best.time.mfu;
    p.why = r.why;
    return p;
}

// ---- max-seq ---------------------------------------------------------------------------

std::int64_t longest_fitting(const ModelSpec& m, const GpuProfile& gpu, const Strategy& st, bytes_t budget,
                             bytes_t host_budget, std::int64_t granule, MaxSeqRow* row, int workers) {
    PeakSimulator sim(m, gpu, workers);
    auto setup_at = [&](std::int64_t S) {
        TrainingSetup t = st.setup;
        t.seq_len = S;
        if (st.mst) {
            // MsT chunks of hidden_size tokens (the ALST TiledMLP and HF integration heuristic),
            // at most kMaxChunks of them.
            const std::int64_t chunks = std::clamp<std::int64_t>(ceil_div(t.local_tokens(), m.hidden_size), 1, kMaxChunks);
            t.mlp_chunks = st.mst_mlp ? std::min(chunks, max_mlp_chunks(m)) : 1;
            t.lm_chunks = even_lm_chunks(st.trainer) ? dividing_chunks(t.seq_len / t.sp, chunks, kMaxChunks) : chunks;
        }
        if (st.chunk_tokens.mlp) t.mlp_chunks = chunks_for_tokens(t, *st.chunk_tokens.mlp);
        if (st.chunk_tokens.lm) t.lm_chunks = chunks_for_tokens(t, *st.chunk_tokens.lm);
        take_model_code(t, st.trainer, m);  // (--for torchtitan: its own step where it is modelled)
        return t;
    };
    auto at = [&](std::int64_t S, MaxSeqRow* r, bytes_t host = -1) {
        const TrainingSetup t = setup_at(S);
        if (!valid(t, m)) return false;
        const bytes_t extra = st.trainer.empty() ? 0 : trainer_extra_bytes(st.trainer, t, m);
        MemoryPeaks p;
        const bool ok = sim.fits(t, budget - extra, host < 0 ? host_budget : host, &p);
        if (ok && r) r->memory = p, r->setup = t, r->max_seq = S, r->trainer_extra_bytes = extra;
        return ok;
    };
    // Whether the host's budget, not the GPU's, is what `S` does not fit.
    auto host_bound = [&](std::int64_t S) {
        return st.setup.offload_checkpoints && at(S, nullptr, std::numeric_limits<bytes_t>::max());
    };
    constexpr std::int64_t kLimit = limits::kSeqLen;
    // The shortest length the knobs are valid at: a setup's chunk counts need as many tokens per rank
    // (more tokens never make them invalid).
    std::int64_t lo = granule;
    while (lo <= kLimit / 2 && !valid(setup_at(lo), m)) lo *= 2;
    if (!at(lo, row)) {
        if (row) row->host_bound = host_bound(lo);
        return 0;
    }
    std::int64_t hi = lo;
    while (hi <= kLimit / 2 && at(hi * 2, row)) hi *= 2;
    lo = hi, hi = std::min(hi * 2, kLimit + granule);  // lo fits, hi does not (or past the limit)
    while (hi - lo > granule) {
        const std::int64_t mid = (lo + hi) / 2 / granule * granule;
        if (mid <= lo) break;
        if (at(mid, row)) lo = mid;
        else hi = mid;
    }
    // (a setup's chunk counts may pass their bound first: chunk sizes in tokens, a long sequence; or the
    // length its own: --seq's bound)
    if (row) {
        try {
            validate(setup_at(lo + granule), m);
            row->host_bound = lo + granule <= kLimit && host_bound(lo + granule);
        } catch (const UserError& e) {
            row->invalid_beyond = e.what();
        }
    }
    return lo;
}

MaxSeqResult max_seq(const TuneRequest& rq, const std::optional<TrainingSetup>& user, const ChunkTokens& user_chunk_tokens) {
    const ModelSpec& m = rq.model;
    const std::int64_t L = m.num_layers;
    MaxSeqResult out;
    check_request(rq, "max-seq");
    if (const std::string option = deepspeed_options(rq.base);
        !option.empty() && !(rq.base.runtime == Runtime::Hf && trains_in_deepspeed(rq.for_format)) &&
        !(user && user->deepspeed_zero()))
        fail("max-seq", deepspeed_field(rq.base),
             fmt::format("expected --for deepspeed or axolotl with runtime hf, or your setup under DeepSpeed's ZeRO 1/2 "
                         "(--zero 1 or 2: its engine has it), or DeepSpeed's default, got {}",
                         option));
    out.budget_bytes = static_cast<bytes_t>(static_cast<double>(rq.gpu.usable_bytes()) * (1 - rq.safety_margin));

    const bool hf = rq.base.runtime == Runtime::Hf;  // the hf runtime: DDP or DeepSpeed's engine, no sp
    TrainingSetup base = rq.base;
    base.dp = rq.gpus;
    // (the hf runtime: over several GPUs FSDP2 where it is searched, the most sharded; else DDP or the plain
    // step where searched, else DeepSpeed's most sharded stage)
    const std::vector<int> zeros = zero_stages(rq);
    const bool fsdp2 = hf && zeros.back() == 3 && fsdp2_is_zero3(rq);
    base.zero_stage = !hf ? (rq.gpus > 1 ? 3 : 0) : fsdp2 || zeros.front() != 0 ? zeros.back() : 0;
    take_engine(base, rq);
    base.sp = 1;
    base.ep = 1, base.moe_imbalance = 1.0;  // (the expert-parallel row sets its own)
    base.mlp_chunks = base.lm_chunks = 1;
    base.checkpoint.clear();
    base.offload_checkpoints = false;

    std::vector<Strategy> strategies;
    strategies.push_back({.name = "no checkpointing", .setup = base});
    TrainingSetup ckpt = base;
    ckpt.checkpoint.assign(static_cast<std::size_t>(L), true);
    strategies.push_back({.name = "full checkpointing", .setup = ckpt});
    strategies.push_back({.name = "checkpointing + MsT", .setup = ckpt, .mst = true});
    TrainingSetup off = ckpt;
    off.offload_checkpoints = true;
    if (rq.allow_offload) strategies.push_back({.name = "checkpointing + MsT + offload", .setup = off, .mst = true});
    std::int64_t sp = 1;
    for (std::int64_t c = hf ? 1 : rq.gpus; c > 1; --c)
        if (sp_degree_fits(rq, c, 2 * c)) {  // (max-seq's lengths are multiples of 1024 sp)
            sp = c;
            break;
        }
    TrainingSetup widest = rq.allow_offload ? off : ckpt;  // the last strategy so far, each adding to the one before
    if (sp > 1) {
        widest.sp = sp;
        widest.dp = rq.gpus / sp;
        widest.zero_stage = 3;  // over all dp x sp ranks
        strategies.push_back({.name = fmt::format("+ {} (sp {})", widest.ring() ? "ring attention" : "Ulysses sequence parallel", sp),
                              .setup = widest, .mst = true});
    }
    // Mixture-of-Experts (kernels runtime): the widest expert parallelism, a degree dividing the
    // experts and the GPUs; ZeRO-3 then gathers a layer's E / ep experts, not all of them.
    if (const std::int64_t ep = widest_expert_parallel(rq); ep > 1) {
        widest.ep = ep;
        widest.zero_stage = 3;
        widest.moe_imbalance = std::min(rq.base.moe_imbalance, static_cast<double>(ep));
        strategies.push_back({.name = fmt::format("+ expert parallel (ep {})", ep), .setup = widest, .mst = true});
    }
    for (Strategy& st : strategies) {
        take_engine(st.setup, rq);
        // --allow optimizer-in-backward: a row steps in backward where recommend's search would try it (and
        // --for's trainer runs it)
        if (searches_step_in_backward(rq, st.setup.grad_accum, st.setup.zero_stage)) {
            TrainingSetup t = st.setup;
            t.optimizer_in_backward = true;
            if (rq.for_format.empty() || refusal_of(rq.for_format, t, m).empty()) st.setup = t;
        }
    }
    if (user) strategies.push_back({.name = "your setup", .setup = *user, .chunk_tokens = user_chunk_tokens});

    // Each strategy's search is its own (a simulator of its own): they run side by side, each row
    // what it is alone.
    std::vector<MaxSeqRow> rows(strategies.size());
    std::vector<std::optional<Strategy>> searches(strategies.size());
    for (std::size_t i = 0; i < strategies.size(); ++i) {
        const Strategy& st = strategies[i];
        MaxSeqRow& row = rows[i];
        row.strategy = st.name;
        row.setup = st.setup;  // what the strategy is, also when nothing fits
        Strategy run = st;
        run.trainer = rq.for_format;
        if (!rq.for_format.empty()) {  // --for: a strategy the format's trainer cannot train is not searched
            // An MsT strategy chunks both blocks (or the LM head only) at every length: checked with
            // chunks, as it runs.
            auto refusal = [&](TrainingSetup t, bool mst_mlp) {
                if (run.mst) t.mlp_chunks = mst_mlp ? 2 : 1, t.lm_chunks = 2;
                take_model_code(t, rq);  // (--for torchtitan: its FSDP2 runs its own model code only)
                std::string why = refusal_of(rq.for_format, t, m);
                // (and the hf runtime's ZeRO-3 scope: no chunked loss for a model that soft-caps lm_head's output)
                if (why.empty() && t.deepspeed_zero3()) {
                    try {
                        validate(t, m);
                    } catch (const UserError& e) {
                        why = e.what();
                    }
                }
                return why;
            };
            // The user's own setup is theirs: refused as it is, never moved to another ZeRO stage.
            const bool ours = &st != &strategies.back() || !user;
            row.refused = refusal(run.setup, run.mst_mlp);
            // A trainer without MLP mini-sequences (torchtitan) chunks the LM head alone in the MsT rows,
            // with its chunked loss (fused: each chunk's backward in the forward).
            if (ours && !row.refused.empty() && run.mst)
                for (LmHeadImpl impl : {run.setup.lm_impl, LmHeadImpl::FusedForward}) {
                    TrainingSetup t = run.setup;
                    t.lm_impl = impl;
                    const std::string why = refusal(t, false);
                    if (!why.empty()) {
                        row.refused = why;  // what stands in the way without MLP chunks too
                        continue;
                    }
                    run.setup = t, run.mst_mlp = false;
                    row.setup = t, row.strategy += " (LM head only)", row.refused.clear();
                    break;
                }
            // A row the trainer refuses at ZeRO-3 (python/mst_hf's chunked loss for a model that soft-caps
            // lm_head's output) shards at ZeRO 2 there (not torchtitan's: the hf runtime plans its FSDP2 alone).
            if (ours && !row.refused.empty() && run.setup.zero_stage == 3 && !(hf && rq.for_format == "torchtitan")) {
                TrainingSetup z2 = run.setup;
                z2.zero_stage = 2;
                take_engine(z2, rq);
                if (refusal(z2, run.mst_mlp).empty()) run.setup = z2, row.setup = z2, row.refused.clear();
            }
            // One rank: ZeRO 1 shards nothing and is what DeepSpeed needs for bf16 master weights.
            if (ours && !row.refused.empty() && run.setup.zero_ranks() == 1 && run.setup.zero_stage == 0 &&
                run.setup.runtime == Runtime::Kernels) {
                TrainingSetup z1 = run.setup;
                z1.zero_stage = 1;
                take_engine(z1, rq);
                if (refusal(z1, run.mst_mlp).empty()) run.setup = z1, row.setup = z1, row.refused.clear();
            }
            if (!row.refused.empty()) continue;
        }
        searches[i] = run;
    }
    // (the threads shared among the searches: each simulator's tables are its own)
    const int threads = rq.search_threads > 0 ? rq.search_threads : detail::usable_cpus();
    const auto searched = std::count_if(searches.begin(), searches.end(), [](const auto& x) { return x.has_value(); });
    const int workers = std::max(1, threads / static_cast<int>(std::max<std::ptrdiff_t>(1, searched)));
    // (the last first: the rows further down fit longer sequences, whose searches take longest; an error
    // is the first row's that raised one, as in a loop over the rows)
    std::vector<std::exception_ptr> errors(strategies.size());
    detail::parallel_for(strategies.size(), static_cast<std::size_t>(threads), [&](std::size_t job, std::size_t) {
        const std::size_t i = strategies.size() - 1 - job;
        if (!searches[i]) return;
        MaxSeqRow& row = rows[i];
        // (torchtitan's chunks split each rank's sequence evenly: an MsT row's lengths are multiples of its chunk,
        // hidden_size tokens, so that its count of chunks does not jump from one length to the next)
        const std::int64_t ranks = searches[i]->setup.sp;
        const std::int64_t granule = searches[i]->mst && even_lm_chunks(rq.for_format)
                                         ? std::lcm(1024 * ranks, m.hidden_size * ranks)
                                         : 1024 * ranks;
        try {
            longest_fitting(m, rq.gpu, *searches[i], out.budget_bytes, rq.host_bytes_per_gpu, granule, &row, workers);
            // found on the budget's device; reported as the GPU holds it
            if (row.max_seq > 0) row.memory = simulate_peaks(m, row.setup, rq.gpu, true, rq.gpu.usable_bytes());
        } catch (...) {
            errors[i] = std::current_exception();
        }
    });
    for (const std::exception_ptr& e : errors)
        if (e) std::rethrow_exception(e);
    out.rows = std::move(rows);

    // The floor: persistent state, and the length at which one checkpoint per layer fills the rest.
    TrainingSetup full = strategies[1].setup;  // (full checkpointing, as the rows run it: --for torchtitan, its own step)
    take_model_code(full, rq.for_format, m);
    out.persistent_bytes = persistent_state_bytes(m, full, rq.gpu);
    const bytes_t left = out.budget_bytes - out.persistent_bytes;
    const std::int64_t bytes_per_token = checked_product(
        {L, m.hidden_size, base.precision == Precision::AmpFp32 ? 4 : 2, base.micro_batch}, "checkpoint bytes per token");
    out.checkpoint_floor_seq = left > 0 ? left / bytes_per_token : 0;
    return out;
}

}  // namespace mst
