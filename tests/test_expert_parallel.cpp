// Expert parallelism (kernels runtime) against byte counts and times derived by hand. The tiny
// Mixtral has d = 64, experts of Ie = 112, E = 4 experts, top-2, 2 layers, V = 256, untied; at
// 64 tokens a rank sends S = 64 x 2 = 128 token-expert pairs per layer.
#include <doctest/doctest.h>

#include <algorithm>
#include <string>

#include <nlohmann/json.hpp>

#include "mst/catalog.hpp"
#include "mst/emit.hpp"
#include "mst/simulate.hpp"
#include "mst/timemodel.hpp"
#include "mst/tune.hpp"
#include "sim_test_support.hpp"
#include "test_support.hpp"

using namespace mst;
using namespace mst::test;

namespace {

constexpr std::int64_t d = 64, Ie = 112, E = 4, L = 2;
constexpr std::int64_t kExpertsPerLayer = E * 3 * d * Ie;  // gate, up, down of every expert

ModelSpec tiny_mixtral() { return find_model(data("tiny_mixtral.json")); }

TrainingSetup ep_setup(std::int64_t dp, std::int64_t ep, double imbalance = 1.0) {
    TrainingSetup s = tiny_setup(64);
    s.dp = dp, s.ep = ep, s.moe_imbalance = imbalance;
    validate(s, tiny_mixtral());
    return s;
}

// The first event allocating `name` (or an empty event).
Event first_alloc(const Timeline& t, const std::string& name) {
    for (const Event& e : t.events)
        if (e.alloc && e.name == name) return e;
    return Event{};
}

}  // namespace

TEST_CASE("expert parallelism: a rank holds E / ep experts, and ZeRO shards them over the ranks holding the same ones") {
    const ModelSpec m = tiny_mixtral();
    CHECK(m.expert_parameters() == L * kExpertsPerLayer);  // 172032
    const std::int64_t P = m.parameters().total(), P_dense = P - L * kExpertsPerLayer;
    // pure bf16, ZeRO 0: 2 bytes for every dense parameter and for half the experts
    const Timeline t = simulate(m, ep_setup(2, 2), test_gpu());
    CHECK(live_at_end(t, Category::Weights) == 2 * (P_dense + L * kExpertsPerLayer / 2));
    const Event gate = first_alloc(t, "experts.gate_proj");
    CHECK(gate.bytes == 2 * (E / 2) * Ie * d);
    // ZeRO 1 over dp 4: bf16 AdamW's two moments (4 bytes per element) of a quarter of every dense
    // parameter (each divides by 4) and of half the rank's experts (ep 2: 2 ranks hold each expert)
    TrainingSetup z = ep_setup(4, 2);
    z.zero_stage = 1;
    const Summary sum = summarize(simulate(m, z, test_gpu()), m.num_layers);
    CHECK(sum.category_max[static_cast<std::size_t>(Category::OptimizerState)] == 4 * (P_dense / 4 + L * kExpertsPerLayer / 2 / 2));
    // ep = dp: each expert on one rank, nothing of it to shard
    z.ep = 4;
    const Summary one = summarize(simulate(m, z, test_gpu()), m.num_layers);
    CHECK(one.category_max[static_cast<std::size_t>(Category::OptimizerState)] == 4 * (P_dense / 4 + L * kExpertsPerLayer / 4));
}

TEST_CASE("expert parallelism: the experts run on the R pairs their rank received, sent and returned by all-to-all") {
    const ModelSpec m = tiny_mixtral();
    constexpr std::int64_t S = 128;
    const Summary local = summarize(simulate(m, ep_setup(2, 1), test_gpu()), m.num_layers);
    // Uniform routing: R = S, and what is saved keeps its size (x as received instead of x sorted,
    // y as returned instead of y sorted).
    const Timeline uniform = simulate(m, ep_setup(2, 2), test_gpu());
    CHECK(summarize(uniform, m.num_layers).layer_saved == local.layer_saved);
    CHECK(first_alloc(uniform, "x_received").bytes == S * d * 2);
    CHECK(first_alloc(uniform, "x_received").op == "moe.dispatch");
    CHECK(first_alloc(uniform, "received_counts").bytes == E * 8);
    CHECK(first_alloc(uniform, "y_sorted").op == "moe.return");
    // The busiest rank receives 1.5 x: R = 192 rows for x received, g, u, m (saved) and the experts'
    // outputs (let go after the return); y returned stays [S, d].
    const Timeline busy = simulate(m, ep_setup(2, 2, 1.5), test_gpu());
    constexpr std::int64_t R = 192;
    CHECK(summarize(busy, m.num_layers).layer_saved[0] == local.layer_saved[0] + (R - S) * (d * 2 + 3 * Ie * 2));
    CHECK(first_alloc(busy, "x_received").bytes == R * d * 2);
    CHECK(first_alloc(busy, "y_expert").bytes == R * d * 2);
    CHECK(first_alloc(busy, "y_sorted").bytes == S * d * 2);
    // backward: the outputs' gradients go to the experts [R, d], the inputs' come back [S, d]
    CHECK(first_alloc(busy, "d_y_expert").bytes == R * d * 2);
    CHECK(first_alloc(busy, "d_x_received").bytes == R * d * 2);
    const Event back = first_alloc(busy, "d_x_sorted");
    CHECK(back.bytes == S * d * 2);
    CHECK(back.op == "moe.dispatch");
    // R = ceil(F S), at least S, at most ep S
    TrainingSetup s = ep_setup(4, 4, 1.1);
    CHECK(s.expert_rows(10) == 11);  // 1.1 x 10 lands a rounding above 11
    CHECK(s.expert_rows(7) == 8);
    s.moe_imbalance = 4;
    CHECK(s.expert_rows(7) == 28);
    s.ep = 1;
    CHECK(s.expert_rows(7) == 7);
}

TEST_CASE("expert parallelism: the time model's all-to-alls and the experts' gradients reduced over their holders") {
    const ModelSpec m = tiny_mixtral();
    const GpuProfile gpu = find_gpu("h100-sxm-80gb");
    const StepTime one = predict_time(m, ep_setup(2, 1), gpu), two = predict_time(m, ep_setup(2, 2), gpu);
    // With uniform routing a rank computes as much as without expert parallelism.
    CHECK(two.forward_seconds == doctest::Approx(one.forward_seconds));
    CHECK(two.backward_seconds == doctest::Approx(one.backward_seconds));
    // dp 2, ZeRO 0: gradients all-reduced once, 2 (N - 1) / N x bytes = P x 2 bytes over 2 ranks. With
    // ep 2 the experts have no second holder: only dense ones are reduced. Four all-to-alls per layer,
    // each sending half of the 128 pairs' rows (64 x 2 bytes): 4 x 2 x 64 x 128 = 65536 bytes.
    const double bw = gpu.nvlink_gbps * 1e9;
    const double P = static_cast<double>(m.parameters().total()), P_expert = static_cast<double>(m.expert_parameters());
    CHECK(one.comm_seconds == doctest::Approx(P * 2 / bw));
    CHECK(two.comm_seconds == doctest::Approx((P - P_expert) * 2 / bw + 65536 / bw));
}

TEST_CASE("expert parallelism: what cannot be planned is one line naming the knob") {
    const ModelSpec m = tiny_mixtral();
    auto error_for = [&](const ModelSpec& model, auto mutate) {
        TrainingSetup s = tiny_setup(64);
        s.dp = 4;
        mutate(s);
        return expect_user_error([&] { validate(s, model); });
    };
    CHECK(error_for(find_model("tiny-llama"), [](TrainingSetup& s) { s.ep = 2; }).starts_with("setup: ep: expected 1 for a dense model"));
    CHECK(error_for(m, [](TrainingSetup& s) { s.ep = 3, s.dp = 3; }).starts_with("setup: ep: expected a divisor of the experts (4)"));
    CHECK(error_for(m, [](TrainingSetup& s) { s.ep = 4, s.dp = 2; }).starts_with("setup: ep: expected a divisor of dp x sp (2 x 1"));
    CHECK(error_for(m, [](TrainingSetup& s) { s.ep = 2, s.moe_imbalance = 2.5; })
              .starts_with("setup: moe_imbalance: expected a number in [1, ep = 2]"));
    CHECK(error_for(m, [](TrainingSetup& s) { s.moe_imbalance = 1.5; }).find("with ep 1 every expert is local") != std::string::npos);
    CHECK(error_for(m, [](TrainingSetup& s) { s.ep = 2, s.moe_imbalance = 0.5; }).starts_with("setup: moe_imbalance: "));
    CHECK(error_for(m, [](TrainingSetup& s) { s.ep = 2, s.runtime = Runtime::Hf; }).starts_with("setup: ep: expected 1 with runtime hf"));
    // a setup file says it the same way
    CHECK(expect_user_error([&] { validate(parse_setup(nlohmann::json{{"runtime", "kernels"}, {"dp", 2}, {"ep", 4}}, m, "s.json"), m); })
              .starts_with("setup: ep: expected a divisor of dp x sp"));
    const TrainingSetup round = parse_setup(to_json(ep_setup(4, 2, 1.25)), m, "s.json");
    CHECK(round.ep == 2);
    CHECK(round.moe_imbalance == 1.25);
}

TEST_CASE("expert parallelism in the tuner: degrees dividing the experts and the GPUs, pinned or searched") {
    TuneRequest rq;
    rq.model = find_model("qwen3-30b-a3b");  // 128 experts
    rq.gpu = find_gpu("h100-sxm-80gb");
    rq.gpus = 8;
    rq.seq_len = 16384;
    rq.base.runtime = Runtime::Kernels;
    rq.pins.ep = 8;
    const Recommendation pinned = recommend(rq);
    REQUIRE(pinned.found);
    CHECK(pinned.best.setup.ep == 8);
    rq.pins.ep.reset();
    const Recommendation searched = recommend(rq);
    REQUIRE(searched.found);
    CHECK(8 % searched.best.setup.ep == 0);
    // (searching ep adds candidates: a plan at least as fast per GPU as the pinned one)
    CHECK(searched.best.time.tokens_per_second >= pinned.best.time.tokens_per_second * (1 - 1e-9));
    // the imbalance a rank can have is capped by its group: ep 1 candidates plan uniform routing
    rq.base.moe_imbalance = 1.5;
    rq.pins.ep = 1;
    const Recommendation capped = recommend(rq);
    REQUIRE(capped.found);
    CHECK(capped.best.setup.moe_imbalance == 1.0);
    // a dense model, the hf runtime and a degree dividing neither are refused before any search
    TuneRequest dense = rq;
    dense.model = find_model("llama-3-8b");
    dense.base.moe_imbalance = 1.0;
    dense.pins.ep = 2;
    CHECK(expect_user_error([&] { recommend(dense); }).starts_with("recommend: pin: ep=2: expected 1 for a dense model"));
    rq.pins.ep = 3;
    CHECK(expect_user_error([&] { recommend(rq); }).starts_with("recommend: pin: ep=3: expected a divisor of both the experts (128) and the GPUs (8)"));
    rq.pins.ep.reset();
    rq.base.runtime = Runtime::Hf;
    CHECK(expect_user_error([&] { recommend(rq); }).starts_with("recommend: moe-imbalance: expected 1"));
}

TEST_CASE("expert parallelism in max-seq: the widest degree dividing the experts and the GPUs, on top of sequence parallelism") {
    TuneRequest rq;
    rq.model = find_model("qwen3-30b-a3b");  // 128 experts, 4 KV heads
    rq.gpu = find_gpu("h100-sxm-80gb");
    rq.gpus = 8;
    rq.base.runtime = Runtime::Kernels;
    const MaxSeqResult r = max_seq(rq, std::nullopt);
    REQUIRE(r.rows.size() == 6);
    const MaxSeqRow& sp = r.rows[4];
    const MaxSeqRow& ep = r.rows[5];
    CHECK(ep.strategy == "+ expert parallel (ep 8)");
    CHECK(ep.setup.ep == 8);
    CHECK(ep.setup.sp == sp.setup.sp);  // (sp 4: the KV heads bound it)
    CHECK(ep.setup.zero_stage == 3);
    // (ZeRO-3 no longer gathers a layer's experts, each held by one rank, but their whole gradients
    // now arrive in backward among the activations: with the allocator's fragmentation about as
    // long a sequence, here 1 % shorter)
    CHECK(ep.max_seq > 0);
    // a dense model, or the hf runtime, has no such row
    rq.model = find_model("llama-3-8b");
    const MaxSeqResult dense = max_seq(rq, std::nullopt);
    CHECK(std::none_of(dense.rows.begin(), dense.rows.end(), [](const MaxSeqRow& row) { return row.setup.ep > 1; }));
}

TEST_CASE("expert parallelism with one holder per expert (ep = dp x sp): ZeRO leaves the experts whole") {
    const ModelSpec m = tiny_mixtral();
    TrainingSetup s = ep_setup(4, 4);
    s.zero_stage = 3;
    const Timeline t = simulate(m, s, test_gpu());
    // A layer's all-gather holds its dense parameters only: norms 2 x 64, q and o 2 x 4096, k and v
    // 2 x 2048, the router 4 x 64, in bf16.
    CHECK(first_alloc(t, "gathered_params").layer == -1);  // the embedding's unit comes first
    bytes_t layer0 = 0;
    for (const Event& e : t.events)
        if (e.alloc && e.name == "gathered_params" && e.layer == 0) {
            layer0 = e.bytes;
            break;
        }
    CHECK(layer0 == 2 * (2 * 64 + 2 * 4096 + 2 * 2048 + 4 * 64));
    // no gradient shard at init for an expert (its whole gradient lives to the step), one for the rest
    std::int64_t expert_shards = 0, shards = 0;
    for (const Event& e : t.events)
        if (e.alloc && e.op == "init.gradient_shards") {
            ++shards;
            if (std::string(e.name).starts_with("experts.")) ++expert_shards;
        }
    CHECK(expert_shards == 0);
    CHECK(shards > 0);
    // stored whole, as with ZeRO 0, and their gradients live to the step, not to a reduce-scatter
    TrainingSetup z0 = s;
    z0.zero_stage = 0;
    const Timeline t0 = simulate(m, z0, test_gpu());
    for (const char* name : {"experts.gate_proj", "experts.up_proj", "experts.down_proj"})
        CHECK(first_alloc(t, name).bytes == first_alloc(t0, name).bytes);
    CHECK(first_alloc(t, "experts.gate_proj").bytes == 2 * 1 * Ie * d);
    std::int64_t expert_grad_frees = 0;
    for (const Event& e : t.events)
        if (!e.alloc && e.category == Category::Gradients && std::string(e.name).starts_with("experts.")) {
            CHECK(e.op == "optimizer.zero_grad");
            ++expert_grad_frees;
        }
    CHECK(expert_grad_frees == 3 * L);
}

TEST_CASE("expert parallelism: recommend's reasons name it, torchtitan alone trains it, gpt-oss on flash is refused") {
    TuneRequest rq;
    rq.model = find_model("qwen3-30b-a3b");
    rq.gpu = find_gpu("h100-sxm-80gb");
    rq.gpus = 8;
    rq.seq_len = 16384;
    rq.base.runtime = Runtime::Kernels;
    rq.pins.ep = 8, rq.pins.sp = 1;
    const Recommendation r = recommend(rq);
    REQUIRE(r.found);
    CHECK(r.why.find("Expert parallelism over 8 GPUs holds 16 of the 128 experts on each; its all-to-alls cost") !=
          std::string::npos);
    CHECK(r.best.time.expert_parallel_seconds > 0);
    CHECK(r.best.time.ulysses_seconds == 0);
    // torchtitan's experts are sharded over ep ranks of its FSDP ones (expert_parallel_degree); the Hugging Face
    // trainers run transformers' MoE blocks, which have no expert parallelism
    for (const std::string& format : emit_formats()) {
        if (format == "torchtitan") {
            TuneRequest titan = rq;
            titan.for_format = format;
            const Recommendation t = recommend(titan);
            REQUIRE(t.found);
            CHECK(t.best.setup.ep == 8);
            check_expressible(format, t.best.setup, rq.model);
            TrainingSetup ddp = t.best.setup;
            ddp.zero_stage = 0;
            CHECK(expect_user_error([&] { check_expressible(format, ddp, rq.model); })
                      .starts_with("torchtitan: setup.ep: expected 1 without FSDP"));
            continue;
        }
        CHECK(expect_user_error([&] { check_expressible(format, r.best.setup, rq.model); }).starts_with(format + ": setup.ep: expected 1"));
    }
    // A kernels-runtime plan of gpt-oss runs its sinks in mst-plan's flash kernel; the trainers run
    // transformers' gpt-oss, whose modelled path is eager attention.
    const ModelSpec oss = find_model("gpt-oss-20b");
    TrainingSetup s;
    s.runtime = Runtime::Kernels, s.attention = Attention::Flash, s.seq_len = 2048;
    for (const std::string& format : emit_formats())
        CHECK(expect_user_error([&] { check_expressible(format, s, oss); }).starts_with(format + ": setup.attention: expected eager"));
}
