// Properties of the simulator checked over many random models and setups.
#include <doctest/doctest.h>

#include <random>

#include <nlohmann/json.hpp>

#include "mst/catalog.hpp"
#include "mst/model.hpp"
#include "mst/simulate.hpp"
#include "caching_allocator.hpp"
#include "sim/builder.hpp"
#include "sim/loop_replay.hpp"
#include "reference_caching_allocator.hpp"
#include "sim_test_support.hpp"
#include "test_support.hpp"

using namespace mst;
using namespace mst::test;

namespace {

struct Random {
    std::mt19937_64 rng;
    explicit Random(std::uint64_t seed) : rng(seed) {}
    std::int64_t in(std::int64_t lo, std::int64_t hi) { return std::uniform_int_distribution<std::int64_t>(lo, hi)(rng); }
    bool coin() { return in(0, 1) == 1; }
    template <class T, std::size_t N>
    T pick(const T (&xs)[N]) { return xs[static_cast<std::size_t>(in(0, N - 1))]; }
};

ModelSpec random_model(Random& r) {
    const std::int64_t heads = r.pick({2, 4, 8});
    const std::int64_t head_dim = r.pick({8, 16});
    const std::int64_t d = heads * head_dim;
    const char* types[] = {"llama", "qwen2", "mistral", "gemma2", "mixtral", "qwen3_moe", "gpt_oss"};
    const std::string type = r.pick(types);
    nlohmann::json j = {{"model_type", type},
                        {"hidden_size", d},
                        {"intermediate_size", d * r.in(2, 4)},
                        {"num_hidden_layers", r.in(1, 4)},
                        {"num_attention_heads", heads},
                        {"num_key_value_heads", heads / r.pick({1, 2})},
                        {"vocab_size", r.in(64, 512)}};
    if (type == "gemma2") {
        j["attn_logit_softcapping"] = 50.0;
        j["final_logit_softcapping"] = 30.0;
        j["sliding_window"] = 32;
    }
    if (type == "mistral" || type == "mixtral") j["sliding_window"] = 32;
    if (type == "mixtral") j["num_local_experts"] = r.in(2, 8), j["num_experts_per_tok"] = r.in(1, 2);
    if (type == "gpt_oss") {  // sinks, biased experts; alternating local and global layers
        j["num_local_experts"] = r.in(2, 8), j["num_experts_per_tok"] = r.in(1, 2), j["head_dim"] = head_dim;
        j["sliding_window"] = r.in(4, 32), j["attention_bias"] = true;
    }
    if (type == "qwen3_moe") {
        j["num_experts"] = r.in(2, 16), j["num_experts_per_tok"] = r.in(1, 2), j["moe_intermediate_size"] = d;
        j["norm_topk_prob"] = r.coin(), j["use_sliding_window"] = false, j["head_dim"] = head_dim;
    }
    return parse_model(j, "random", type);
}

TrainingSetup random_setup(Random& r, const ModelSpec& m) {
    TrainingSetup s = kernels_setup();
    s.micro_batch = r.in(1, 2);
    s.sp = r.pick({1, 1, 2});
    if (m.num_kv_heads % s.sp != 0) s.sp = 1;
    s.seq_len = s.sp * r.in(8, 96);
    // Ring attention where the model has plain causal attention: any degree, 2 sp chunks a sequence.
    const bool sliding = m.sliding_window && std::find(m.sliding_layers.begin(), m.sliding_layers.end(), true) != m.sliding_layers.end();
    if (!sliding && !m.attention_sinks && !m.attn_logit_softcapping && r.in(0, 3) == 0) {
        s.sp_impl = SpImpl::Ring;
        s.sp = r.pick({2, 3, 4});
        s.seq_len = 2 * s.sp * r.in(4, 48);
    }
    s.precision = r.pick({Precision::PureBf16, Precision::Bf16Master, Precision::AmpFp32});
    s.optimizer = r.pick({Optimizer::AdamW, Optimizer::AdamW8bit, Optimizer::SgdMomentum});
    s.attention = m.attention_sinks ? Attention::Flash : r.pick({Attention::Flash, Attention::Eager});  // (kernels: sinks on flash)
    if (s.sp_impl == SpImpl::Ring) s.attention = Attention::Flash;
    s.mlp_chunks = r.in(1, 5);
    s.mlp_impl = r.pick({MlpImpl::Loop, MlpImpl::Tiled});
    s.lm_chunks = r.in(1, 5);
    s.lm_impl = r.pick({LmHeadImpl::Recompute, LmHeadImpl::FusedForward});
    s.checkpoint.resize(static_cast<std::size_t>(m.num_layers));
    for (std::size_t i = 0; i < s.checkpoint.size(); ++i) s.checkpoint[i] = r.coin();
    s.offload_checkpoints = s.checkpointed_count() > 0 && r.coin();
    s.dp = r.pick({1, 2, 4});
    s.zero_stage = static_cast<int>(r.in(0, 3));
    s.grad_accum = r.pick({1, 1, 3});
    s.optimizer_in_backward = s.grad_accum == 1 && s.zero_stage < 2 && r.in(0, 3) == 0;
    if (m.moe && r.coin()) {  // expert parallelism: a degree dividing the experts and dp x sp, uniform or not
        std::vector<std::int64_t> eps;
        for (std::int64_t ep = 2; ep <= s.zero_ranks(); ++ep)
            if (s.zero_ranks() % ep == 0 && m.moe->experts % ep == 0) eps.push_back(ep);
        if (!eps.empty()) {
            s.ep = eps[static_cast<std::size_t>(r.in(0, static_cast<std::int64_t>(eps.size()) - 1))];
            s.moe_imbalance = 1.0 + static_cast<double>(s.ep - 1) * static_cast<double>(r.in(0, 4)) / 4.0;
        }
    }
    validate(s, m);
    return s;
}

bytes_t peak(const ModelSpec& m, const TrainingSetup& s) {
    return summarize(simulate(m, s, test_gpu()), m.num_layers).peak.bytes;
}

// Live saved + checkpoint bytes when the first micro-step's backward begins.
bytes_t saved_at_forward_end(const Timeline& t) {
    bytes_t live = 0;
    for (const Event& e : t.events) {
        if (e.phase == Phase::Backward) break;
        if (e.device == Device::Gpu && (e.category == Category::SavedActivation || e.category == Category::Checkpoint))
            live += e.alloc ? e.bytes : -e.bytes;
    }
    return live;
}

bool same_events(const Timeline& a, const Timeline& b) {
    if (a.events.size() != b.events.size()) return false;
    for (std::size_t i = 0; i < a.events.size(); ++i) {
        const Event &x = a.events[i], &y = b.events[i];
        if (x.alloc != y.alloc || x.bytes != y.bytes || x.category != y.category || x.op != y.op || x.name != y.name ||
            x.phase != y.phase || x.layer != y.layer)
            return false;
    }
    return true;
}

constexpr int kCases = 300;

// The test GPU with a cuBLAS workspace, which the peaks must include.
GpuProfile gpu_with_workspace() {
    GpuProfile gpu = test_gpu();
    gpu.calibration.cublas_workspace_bytes = 8 * kMiB;
    return gpu;
}

// The fast path's peaks against those of the recorded timeline's views.
void check_same_peaks(const MemoryPeaks& p, const Estimate& e) {
    CHECK(p.peak_bytes == e.summary.peak.bytes);
    CHECK(p.peak_allocated_bytes == e.allocator.peak_allocated);
    CHECK(p.peak_reserved_bytes == e.allocator.peak_reserved);
    CHECK(p.host_peak_bytes == e.summary.host_peak);
    CHECK(p.segments_released == e.allocator.segments_released);
}

// On a device of `capacity` bytes (where the allocator model releases its cached segments), the
// fast path fits exactly when the recorded timeline's replay stays within it, with its peaks.
void check_same_fit(PeakSimulator& sim, const ModelSpec& m, const TrainingSetup& s, const GpuProfile& gpu, bytes_t capacity) {
    CAPTURE(capacity);
    const Estimate e = estimate(m, s, gpu, capacity);
    MemoryPeaks p;
    const bool fits = sim.fits(s, capacity, e.summary.host_peak, &p);
    CHECK(fits == (e.allocator.peak_reserved <= capacity));
    if (fits) check_same_peaks(p, e);
}

}  // namespace

TEST_CASE("every random setup yields a consistent timeline that ends with only persistent state") {
    Random r(1);
    for (int i = 0; i < kCases; ++i) {
        const ModelSpec m = random_model(r);
        const TrainingSetup s = random_setup(r, m);
        CAPTURE(i);
        const Timeline t = simulate(m, s, test_gpu());
        REQUIRE_NOTHROW(check_consistent(t));
        bytes_t after_init = 0, live = 0;
        for (const Event& e : t.events) {
            if (e.device == Device::Gpu) live += e.alloc ? e.bytes : -e.bytes;
            if (e.phase == Phase::Init) after_init = live;
        }
        CHECK(live == after_init);
        for (Category c : {Category::SavedActivation, Category::Transient, Category::Checkpoint, Category::Offloaded})
            CHECK(live_at_end(t, c) == 0);
    }
}

TEST_CASE("with M = 1 the MsT implementation makes no difference: it is the unchunked timeline") {
    Random r(2);
    for (int i = 0; i < kCases; ++i) {
        const ModelSpec m = random_model(r);
        TrainingSetup s = random_setup(r, m);
        CAPTURE(i);
        s.mlp_chunks = 1;
        s.lm_chunks = 1;
        s.mlp_impl = MlpImpl::Loop;
        s.lm_impl = LmHeadImpl::Recompute;
        const Timeline a = simulate(m, s, test_gpu());
        s.mlp_impl = MlpImpl::Tiled;
        s.lm_impl = LmHeadImpl::FusedForward;
        CHECK(same_events(a, simulate(m, s, test_gpu())));
    }
}

// Chunk sizes ceil(T/M) never grow with M, and every M-dependent buffer of the tiled
// MLP and of the recompute LM head is one chunk's: their peak never rises with M.
// The fused LM head holds a V x d gradient from forward, so only from M = 2 on.
// The MsT loop MLP is NOT monotone: its chunks' saved tensors are released one chunk
// at a time in backward, so a gradient buffer allocated during the first chunk's
// backward can meet (M-1)/M of the saved g, u, m, which M = 1 had already freed
// (see "the loop MLP can raise the peak" below). What holds for the loop is that
// its saved activations do not depend on M.
// The property needs the long-sequence regime MsT is for, T >= 4 (d + I) tokens per
// rank: for shorter ones, weight gradients (d x I) allocated lazily during the first
// chunk's backward can outweigh what chunking saves (n x I per temporary).
TEST_CASE("the peak never rises when M grows (tiled MLP, recompute and fused LM head)") {
    Random r(3);
    for (int i = 0; i < kCases; ++i) {
        const ModelSpec m = random_model(r);
        TrainingSetup s = random_setup(r, m);
        // (a Mixture-of-Experts block's weights, whose gradients are the lazily allocated ones, are
        // E / k times a dense block's per token routed: so is its regime)
        const std::int64_t moe_factor = m.moe ? ceil_div(m.moe->experts, m.moe->top_k) : 1;
        s.seq_len = s.sp * ceil_div(4 * (m.hidden_size + m.intermediate_size) * moe_factor * r.in(1, 3), s.micro_batch);
        CAPTURE(i);
        const std::string model_json = to_json(m).dump();
        CAPTURE(model_json);
        const std::int64_t tokens = s.local_tokens();
        auto check_monotone = [&](std::int64_t& knob, std::int64_t first) {
            bytes_t prev = INT64_MAX;
            for (std::int64_t M = first; M <= std::min<std::int64_t>(tokens, 9); ++M) {
                knob = M;
                const std::string setup_json = to_json(s).dump();
                CAPTURE(setup_json);
                const bytes_t p = peak(m, s);
                CHECK(p <= prev);
                prev = p;
            }
            knob = 1;
        };
        s.mlp_impl = MlpImpl::Tiled;
        check_monotone(s.mlp_chunks, 1);
        s.lm_impl = LmHeadImpl::Recompute;
        check_monotone(s.lm_chunks, 1);
        s.lm_impl = LmHeadImpl::FusedForward;
        check_monotone(s.lm_chunks, 2);
    }
}

TEST_CASE("the loop MLP saves the same activations for every M") {
    Random r(6);
    for (int i = 0; i < kCases; ++i) {
        const ModelSpec m = random_model(r);
        TrainingSetup s = random_setup(r, m);
        CAPTURE(i);
        s.mlp_impl = MlpImpl::Loop;
        s.mlp_chunks = 1;
        // (an imbalanced expert-parallel rank receives ceil(F n k) rows per chunk: the chunks' sum
        // rounds up once per chunk, by design)
        s.moe_imbalance = 1.0;
        const bytes_t base = saved_at_forward_end(simulate(m, s, test_gpu()));
        for (std::int64_t M = 2; M <= std::min<std::int64_t>(s.local_tokens(), 6); ++M) {
            s.mlp_chunks = M;
            CHECK(saved_at_forward_end(simulate(m, s, test_gpu())) == base);
        }
    }
}

TEST_CASE("the loop MLP can raise the peak: a counterexample found by the property test") {
    // A small Gemma-2-shaped model on the kernels runtime, optimizer in backward: each layer's weight gradients
    // are allocated inside its MLP backward. With M = 1 the up_proj gradient arrives
    // after g, u, m are gone; with M = 2 the other chunk's g, u, m are still saved
    // then (3/2 n I elements more) while dg, du are half as large: the peak, set at
    // that allocation, rises with M.
    const ModelSpec m = load_model_file(data("loop_counterexample_model.json"));
    TrainingSetup s = load_setup_file(data("loop_counterexample_setup.json"), m);
    REQUIRE(s.mlp_impl == MlpImpl::Loop);
    const bytes_t one = peak(m, s);
    s.mlp_chunks = 2;
    CHECK(peak(m, s) > one);
}

TEST_CASE("checkpointing more layers never raises the saved activations") {
    Random r(4);
    for (int i = 0; i < kCases; ++i) {
        const ModelSpec m = random_model(r);
        TrainingSetup s = random_setup(r, m);
        s.offload_checkpoints = false;
        CAPTURE(i);
        s.checkpoint.assign(static_cast<std::size_t>(m.num_layers), false);
        bytes_t prev = saved_at_forward_end(simulate(m, s, test_gpu()));
        // Add layers one at a time in a random order.
        std::vector<std::size_t> order(s.checkpoint.size());
        for (std::size_t k = 0; k < order.size(); ++k) order[k] = k;
        std::shuffle(order.begin(), order.end(), r.rng);
        for (std::size_t l : order) {
            s.checkpoint[l] = true;
            const bytes_t now = saved_at_forward_end(simulate(m, s, test_gpu()));
            CHECK(now <= prev);
            prev = now;
        }
    }
}

TEST_CASE("ZeRO-3 over N ranks divides the parameter state by N (up to per-tensor rounding)") {
    Random r(5);
    for (int i = 0; i < 100; ++i) {
        const ModelSpec m = random_model(r);
        TrainingSetup s = random_setup(r, m);
        s.optimizer_in_backward = false;
        // bitsandbytes keeps fp32 states for tensors under 4096 values: shards cross that line.
        if (s.optimizer == Optimizer::AdamW8bit) s.optimizer = Optimizer::AdamW;
        // (expert parallelism divides the experts' state further: tests/test_expert_parallel.cpp)
        s.ep = 1, s.moe_imbalance = 1.0;
        CAPTURE(i);
        auto init_bytes = [&](std::int64_t dp, int stage) {
            s.dp = dp;
            s.zero_stage = stage;
            bytes_t live = 0;
            for (const Event& e : simulate(m, s, test_gpu()).events) {
                if (e.phase != Phase::Init) break;
                live += e.bytes;
            }
            return live;
        };
        const bytes_t one = init_bytes(1, 0);
        // Stage 0 keeps no gradient shards at init; stage 3 does: add the full gradients to compare.
        const bytes_t grads = m.parameters().total() * (s.precision == Precision::PureBf16 ? 2 : 4);
        for (std::int64_t dp : {2, 4, 8}) {
            const std::int64_t N = dp * s.sp;  // ZeRO shards over every data- and sequence-parallel rank
            CAPTURE(N);
            const bytes_t sharded = init_bytes(dp, 3);
            const std::int64_t per_layer = 9 + (m.family == Family::Gemma2 ? 4 : 0) + (m.moe ? 1 : 0) + (m.qk_norm ? 2 : 0) +
                                           (m.attention_sinks ? 1 : 0);
            const std::int64_t tensors = 3 + per_layer * m.num_layers;
            CHECK(sharded * N >= one + grads);
            CHECK(sharded * N - (one + grads) <= N * tensors * 8 * 5);  // < one element per tensor and state
        }
    }
}

TEST_CASE("the tuner's fast path reports exactly the peaks of the recorded timeline") {
    Random r(7);
    const GpuProfile gpu = gpu_with_workspace();
    for (int i = 0; i < 200; ++i) {
        const ModelSpec m = random_model(r);
        TrainingSetup s = random_setup(r, m);
        // Many chunks, so that the fast path's skipped repeats are exercised.
        if (r.coin()) s.mlp_chunks = std::min<std::int64_t>(s.local_tokens(), r.in(3, 40));
        if (r.coin()) s.lm_chunks = std::min<std::int64_t>(s.local_tokens(), r.in(3, 40));
        CAPTURE(i);
        check_same_peaks(simulate_peaks(m, s, gpu), estimate(m, s, gpu, kNoCapacity));
    }
}

// A setup of the hf runtime (transformers + PyTorch on one GPU), with chunk loops long enough
// that the allocator replay's skipped repeats (src/core/sim/peaks.cpp) are exercised.
TrainingSetup random_hf_setup(Random& r, const ModelSpec& m, std::int64_t max_seq) {
    TrainingSetup s;
    s.runtime = Runtime::Hf;
    s.micro_batch = r.in(1, 2);
    s.seq_len = r.in(8, max_seq);
    s.precision = r.pick({Precision::PureBf16, Precision::Bf16Master, Precision::AmpFp32});
    s.optimizer = r.pick({Optimizer::AdamW, Optimizer::SgdMomentum});
    s.optimizer_impl = r.pick({OptimizerImpl::Fused, OptimizerImpl::Foreach, OptimizerImpl::ForLoop});
    s.attention = m.attention_sinks ? Attention::Flash : r.pick({Attention::Flash, Attention::Eager});  // (kernels: sinks on flash)
    s.mlp_impl = r.pick({MlpImpl::Loop, MlpImpl::Tiled});
    s.lm_impl = r.pick({LmHeadImpl::Recompute, LmHeadImpl::FusedForward});
    s.mlp_chunks = std::min<std::int64_t>(s.local_tokens(), r.pick({1, 2, 3, 7, 16, 40}));
    s.lm_chunks = std::min<std::int64_t>(s.local_tokens(), r.pick({1, 2, 3, 7, 16, 40}));
    s.checkpoint.resize(static_cast<std::size_t>(m.num_layers));
    for (std::size_t i = 0; i < s.checkpoint.size(); ++i) s.checkpoint[i] = r.coin();
    s.offload_checkpoints = s.checkpointed_count() > 0 && r.coin();
    s.grad_accum = r.pick({1, 1, 3});
    s.optimizer_in_backward = s.grad_accum == 1 && r.in(0, 3) == 0;
    if (m.attention_sinks) s.attention = Attention::Eager;  // gpt-oss: the hf runtime's scope
    validate(s, m);
    return s;
}

// A tiny gpt-oss: sinks, alternating sliding and full layers, biased experts.
ModelSpec random_gpt_oss(Random& r) {
    const std::int64_t heads = r.pick({2, 4}), head_dim = r.pick({8, 16}), layers = r.in(1, 4);
    nlohmann::json types = nlohmann::json::array();
    for (std::int64_t l = 0; l < layers; ++l) types.push_back(l % 2 == 0 ? "sliding_attention" : "full_attention");
    const nlohmann::json j = {{"model_type", "gpt_oss"},      {"hidden_size", heads * head_dim},
                              {"intermediate_size", 8 * r.in(2, 6)}, {"num_hidden_layers", layers},
                              {"num_attention_heads", heads}, {"num_key_value_heads", heads / r.pick({1, 2})},
                              {"head_dim", head_dim},         {"num_local_experts", r.in(2, 8)},
                              {"num_experts_per_tok", r.in(1, 2)}, {"sliding_window", r.in(4, 32)},
                              {"layer_types", types},         {"vocab_size", r.in(64, 512)}};
    return parse_model(j, "random", "gpt_oss");
}

// Tiny models (blocks from the small pool; every fifth a gpt-oss) and, every third, larger ones
// (the large pool's segments).
ModelSpec random_hf_model(Random& r, bool large) {
    if (!large) return r.in(0, 4) == 0 ? random_gpt_oss(r) : random_model(r);
    const nlohmann::json j = {{"model_type", "llama"}, {"hidden_size", 512}, {"intermediate_size", 512 * r.in(2, 4)},
                              {"num_hidden_layers", r.in(1, 3)}, {"num_attention_heads", 8}, {"num_key_value_heads", 4},
                              {"vocab_size", r.in(4000, 32000)}};
    return parse_model(j, "random", "llama");
}

// Derived by hand from libstdc++'s push_heap/pop_heap (equal keys never swap; pop moves the larger
// child up, the right one on ties) and seen on the referee: gpt-oss's tiled MLP hands six gradients,
// and a second micro-step frees them (added into .grad) in this order.
TEST_CASE("autograd's ready queue runs AccumulateGrad nodes made ready together in its heap's order") {
    CHECK(sim::ready_queue_order(1) == std::vector<std::size_t>{0});
    CHECK(sim::ready_queue_order(3) == std::vector<std::size_t>{0, 1, 2});
    CHECK(sim::ready_queue_order(4) == std::vector<std::size_t>{0, 1, 3, 2});
    CHECK(sim::ready_queue_order(6) == std::vector<std::size_t>{0, 1, 4, 5, 3, 2});
}

TEST_CASE("a chunk loop's replay that skips repeating iterations leaves every tensor in the block a plain replay does") {
    Random r(12);
    const GpuProfile gpu = gpu_with_workspace();
    const AllocatorConstants& c = gpu.calibration.allocator;
    constexpr bytes_t kNoLimit = std::numeric_limits<bytes_t>::max();
    sim::LoopReplay loops;
    std::int64_t periodic = 0;  // loops whose skipped repeats cover two or more periods' worth
    std::int64_t folded = 0;    // loops with an iteration the builder folded repeats into
    for (int i = 0; i < 120; ++i) {
        const bool large = i % 3 == 0;
        const ModelSpec m = random_hf_model(r, large);
        const TrainingSetup s = random_hf_setup(r, m, large ? 4096 : 160);
        CAPTURE(i);
        sim::PeakScratch step;
        sim::StepBuilder(m, s, gpu, false, sim::PeakRun{&step, {}, true}).run();
        const std::vector<sim::GpuEvent>& events = step.gpu_events;
        std::int64_t tensors = 0;
        for (const sim::GpuEvent& e : events) tensors = std::max(tensors, e.tensor + 1);
        detail::CachingAllocatorModel plain(c), skipping(c);
        MemoryPeaks plain_peaks, skipping_peaks;
        sim::LoopReplay every(false);  // runs every iteration, the folded ones' repeats too
        std::size_t at = 0;
        bool same = true;
        for (const sim::PeakScratch::Loop& loop : step.loops) {
            const std::size_t begin = step.loop_marks[loop.first], end = step.loop_marks[loop.first + loop.iterations];
            sim::replay_events(plain, events, at, begin, kNoLimit, plain_peaks);
            every.run(plain, events, step.loop_marks, step.loop_counts, loop.first, loop.iterations, kNoLimit, plain_peaks);
            sim::replay_events(skipping, events, at, begin, kNoLimit, skipping_peaks);
            const std::int64_t before = loops.skipped();
            loops.run(skipping, events, step.loop_marks, step.loop_counts, loop.first, loop.iterations, kNoLimit, skipping_peaks);
            if (loops.skipped() - before >= 2 * static_cast<std::int64_t>(end - begin) / static_cast<std::int64_t>(loop.iterations))
                ++periodic;
            const auto counts = step.loop_counts.begin() + static_cast<std::ptrdiff_t>(loop.first);
            folded += std::any_of(counts, counts + static_cast<std::ptrdiff_t>(loop.iterations), [](std::int64_t n) { return n > 1; });
            at = end;
            same = same && plain.allocated() == skipping.allocated() && plain.reserved() == skipping.reserved() &&
                   plain_peaks.peak_allocated_bytes == skipping_peaks.peak_allocated_bytes;
            for (std::int64_t t = 0; same && t < tensors; ++t) same = plain.placement(t) == skipping.placement(t);
        }
        CHECK(same);
    }
    CHECK(periodic > 50);  // the skipping is exercised, not bypassed
    CHECK(folded > 20);    // and so is the builder's folding (tiled MLP loops of 7, 16 and 40 chunks)
}

TEST_CASE("hf runtime: the fast path, which skips repeating chunk-loop iterations, reports exactly the recorded timeline's peaks") {
    Random r(11);
    const GpuProfile gpu = gpu_with_workspace();
    std::int64_t skipped = 0;
    for (int i = 0; i < 150; ++i) {
        const bool large = i % 3 == 0;
        const ModelSpec m = random_hf_model(r, large);
        PeakSimulator sim(m, gpu);
        CAPTURE(i);
        for (int j = 0; j < 3; ++j) {
            const TrainingSetup s = random_hf_setup(r, m, large ? 4096 : 160);
            CAPTURE(j);
            const Estimate e = estimate(m, s, gpu, kNoCapacity);
            check_same_peaks(sim.peaks(s), e);
            CHECK(sim.fits(s, e.allocator.peak_reserved, e.summary.host_peak));
            // Below the peak the allocator model releases cached segments, as PyTorch does.
            check_same_fit(sim, m, s, gpu, e.allocator.peak_reserved - 1);
            check_same_fit(sim, m, s, gpu, (e.summary.peak.bytes + e.allocator.peak_reserved) / 2);
        }
        skipped += sim.skipped_events();
    }
    CHECK(skipped > 100000);  // the skipping is exercised, not bypassed
}

TEST_CASE("the caching-allocator model places every block of the random setups' timelines where its reference does") {
    Random r(18);  // a seed whose setups release cached segments (checked below)
    std::int64_t released = 0;
    for (int i = 0; i < kCases; ++i) {
        const ModelSpec m = random_model(r);
        const TrainingSetup s = random_setup(r, m);
        CAPTURE(i);
        const Timeline t = simulate(m, s, test_gpu());
        const AllocatorConstants& c = test_gpu().calibration.allocator;
        // On an unlimited device, and on one between the step's requested and reserved peaks
        // (where cached segments are released).
        const Summary sum = summarize(t, m.num_layers);
        const bytes_t unlimited = replay_caching_allocator(t, c).peak_reserved;
        for (const bytes_t capacity : {kNoCapacity, sum.peak.bytes + (unlimited - sum.peak.bytes) / 3}) {
            CAPTURE(capacity);
            detail::CachingAllocatorModel flat(c);
            flat.set_capacity(capacity);
            ReferenceCachingAllocator reference(c, capacity);
            bool same = true;
            for (const Event& e : t.events) {
                if (e.device != Device::Gpu) continue;
                if (e.alloc) flat.allocate(e.tensor, e.bytes), reference.allocate(e.tensor, e.bytes);
                else flat.release(e.tensor), reference.release(e.tensor);
                same = same && flat.allocated() == reference.allocated() && flat.reserved() == reference.reserved() &&
                       flat.placement(e.tensor) == reference.placement(e.tensor) &&
                       flat.segments_released() == reference.segments_released();
            }
            CHECK(same);
            released += flat.segments_released();
        }
    }
    CHECK(released > 0);  // the release path is exercised
}

TEST_CASE("one PeakSimulator reused across setups reports what a fresh estimate does, and fits() stops exactly at the budget") {
    Random r(9);
    const GpuProfile gpu = gpu_with_workspace();
    for (int i = 0; i < 60; ++i) {
        const ModelSpec m = random_model(r);
        PeakSimulator sim(m, gpu);  // its tables carry over from setup to setup
        for (int j = 0; j < 5; ++j) {
            TrainingSetup s = random_setup(r, m);
            if (r.coin()) s.mlp_chunks = std::min<std::int64_t>(s.local_tokens(), r.in(3, 40));
            CAPTURE(i);
            CAPTURE(j);
            const std::string model_json = to_json(m).dump(), setup_json = to_json(s).dump();
            CAPTURE(model_json);
            CAPTURE(setup_json);
            const Estimate e = estimate(m, s, gpu, kNoCapacity);
            const bytes_t reserved = e.allocator.peak_reserved, host = e.summary.host_peak;
            check_same_peaks(sim.peaks(s), e);
            CHECK(sim.peaks(s, false).peak_bytes == e.summary.peak.bytes);
            // At the budget it fits with the same peaks; one byte less, on either device, it does not.
            MemoryPeaks at;
            CHECK(sim.fits(s, reserved, host, &at));
            check_same_peaks(at, e);
            // (one byte less can still fit where releasing cached segments, as PyTorch does before
            // it reports out of memory, brings the reserved peak under it: the capped estimate says)
            check_same_fit(sim, m, s, gpu, reserved - 1);
            if (host > 0) CHECK_FALSE(sim.fits(s, reserved, host - 1));
            // Without the allocator model, requested bytes stand for reserved ones.
            CHECK(sim.fits(s, e.summary.peak.bytes, host, nullptr, false));
            CHECK_FALSE(sim.fits(s, e.summary.peak.bytes - 1, host, nullptr, false));
        }
    }
}

TEST_CASE("a PeakSimulator resuming setups that share the step up to a layer or the LM head reports a fresh estimate's peaks") {
    // The tuner's probes: the same knobs but for the checkpointed layers (they share the forward up
    // to the first layer they differ in) or the LM head's chunks (they share all the layers).
    Random r(10);
    const GpuProfile gpu = gpu_with_workspace();
    for (int i = 0; i < 40; ++i) {
        const ModelSpec m = random_model(r);
        const TrainingSetup base = random_setup(r, m);
        PeakSimulator sim(m, gpu);
        const std::int64_t L = m.num_layers;
        for (int j = 0; j < 12; ++j) {
            TrainingSetup s = base;
            s.checkpoint.assign(static_cast<std::size_t>(L), false);
            for (std::int64_t l = 0, k = r.in(0, L); l < k; ++l) s.checkpoint[static_cast<std::size_t>(l)] = true;
            s.offload_checkpoints = base.offload_checkpoints && s.checkpointed_count() > 0;
            s.lm_chunks = r.in(1, std::min<std::int64_t>(6, s.local_tokens()));
            CAPTURE(i);
            CAPTURE(j);
            const std::string model_json = to_json(m).dump(), setup_json = to_json(s).dump();
            CAPTURE(model_json);
            CAPTURE(setup_json);
            const Estimate e = estimate(m, s, gpu, kNoCapacity);
            MemoryPeaks p;
            if (r.coin()) {
                p = sim.peaks(s);
            } else {
                REQUIRE(sim.fits(s, e.allocator.peak_reserved, e.summary.host_peak, &p));
            }
            check_same_peaks(p, e);
            if (r.in(0, 3) == 0) check_same_fit(sim, m, s, gpu, e.allocator.peak_reserved - 1);
        }
    }
}
