// DeepSpeed's ZeRO-3 in the hf runtime (src/core/sim/zero3.cpp, zero3_coordinator.cpp). The referee
// runs DeepSpeed's stage-3 engine and every event is compared (python/tests/test_deepspeed_referee.py,
// results/referee/llama-3-8b.*.zero3.*); these pin what can be derived by hand from DeepSpeed's
// partitioning and coordinator rules (docs/deepspeed-zero3-model.md) and the config's defaults.
#include <doctest/doctest.h>

#include <algorithm>
#include <map>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "mst/catalog.hpp"
#include "mst/compare.hpp"
#include "mst/emit.hpp"
#include "mst/plan.hpp"
#include "mst/setup.hpp"
#include "mst/simulate.hpp"
#include "mst/tune.hpp"
#include "sim_test_support.hpp"
#include "test_support.hpp"

using namespace mst;
using test::allocs;
using test::bytes_of;

namespace {

TrainingSetup zero3(std::int64_t seq, std::int64_t dp) {
    TrainingSetup s;  // the hf runtime
    s.seq_len = seq;
    s.precision = Precision::Bf16Master;
    s.zero_stage = 3;
    s.dp = dp;
    return s;
}

// The step's forward allocations of `bytes` (a gathered expert weight's copy): all of them, those made
// inside the layers, and of each how many live into backward.
struct ForwardCopies {
    int all = 0, in_layers = 0, held = 0, held_in_layers = 0;
};
ForwardCopies forward_copies(const Timeline& t, bytes_t bytes) {
    std::map<std::int64_t, const Event*> live;
    ForwardCopies c;
    for (const Event& e : t.events) {
        if (e.alloc) {
            live[e.tensor] = &e;
            const bool copy = e.bytes == bytes && e.phase == Phase::Forward;
            c.all += copy, c.in_layers += copy && e.layer >= 0;
            continue;
        }
        const Event* a = live[e.tensor];
        const bool held = a->bytes == bytes && a->phase == Phase::Forward && e.phase == Phase::Backward;
        c.held += held, c.held_in_layers += held && a->layer >= 0;
    }
    return c;
}

std::vector<bytes_t> elements(std::initializer_list<std::int64_t> n, int bytes = 2) {
    std::vector<bytes_t> out;
    for (std::int64_t x : n) out.push_back(x * bytes);
    return out;
}

}  // namespace

// docs/deepspeed-zero3-model.md section 9, worked by hand from the coordinator's rules: Llama-3-8B on
// 8 ranks, DeepSpeed's defaults (prefetch 5e7 elements, 1e9 live, the norms persistent). Every
// parameter divides by 8, so a gather is its elements. The root's fetch prefetches the embedding
// (5e7 reached at once); the inner model's, layer 0's attention and gate projections together (a
// flat buffer: 16.8M + 4.2M + 4.2M + 16.8M + 58.7M = 100663296, the norms skipped as gathered); the
// embedding's, up_proj 0 alone; the embedding is then released (not used again within 1e9
// elements); the rotary embedding's fetch prefetches down_proj 0, layer 0's the next layer's
// projections, its input norm's up_proj 1, its attention's down_proj 1; q_proj 0's own fetch waits
// for the flat buffer: the five copies, in parameter order, then the prefetch of layer 2's.
TEST_CASE("ZeRO-3's first gathers of a step, as derived by hand from DeepSpeed's coordinator") {
    const ModelSpec m = find_model("llama-3-8b");
    const Timeline t = simulate(m, zero3(4096, 8), test::test_gpu());
    std::vector<const Event*> gathers;
    for (const Event& e : t.events)
        if (e.alloc && e.phase == Phase::Forward && e.category == Category::Weights) gathers.push_back(&e);
    REQUIRE(gathers.size() >= 13);
    gathers.resize(13);
    CHECK(bytes_of(gathers) == elements({525336576, 100663296, 58720256, 58720256, 100663296, 58720256, 58720256, 16777216,
                                         4194304, 4194304, 16777216, 58720256, 100663296}));
    // the embedding's buffer goes at its forward's end, before down_proj 0's is made
    std::size_t embedding_freed = 0, down0 = 0;
    for (std::size_t i = 0; i < t.events.size(); ++i) {
        if (!t.events[i].alloc && t.events[i].tensor == gathers[0]->tensor) embedding_freed = i;
        if (&t.events[i] == gathers[3]) down0 = i;
    }
    CHECK(embedding_freed > 0);
    CHECK(embedding_freed < down0);
}

// Llama-3-8B's norms (4096 elements <= the persistence threshold 1e5) stay gathered between steps:
// 65 buffers of 4096 bf16 (padded to a multiple of 8: 4096). The step releases them first and
// gathers them again last.
TEST_CASE("ZeRO-3's persistent parameters: gathered through the step, released and gathered again by the optimizer") {
    const ModelSpec m = find_model("llama-3-8b");
    const TrainingSetup s = zero3(4096, 8);
    const Timeline t = simulate(m, s, test::test_gpu());
    std::int64_t init = 0, step = 0, freed_in_step = 0;
    for (const Event& e : t.events) {
        if (!e.alloc || e.category != Category::Weights || e.bytes != 2 * 4096) continue;
        if (e.phase == Phase::Init) ++init;
        if (e.phase == Phase::Optimizer) ++step;
        for (const Event& f : t.events)
            if (!f.alloc && f.tensor == e.tensor && f.phase == Phase::Optimizer) ++freed_in_step;
    }
    CHECK(init == 2 * 32 + 1);
    CHECK(step == 2 * 32 + 1);
    CHECK(freed_in_step == 2 * 32 + 1);  // (the init's: the step's stay for the next one)
    // the partitions: 8030261248 / 8 = 1003782656 elements; one sub-group (1e9 is reached at the last parameter)
    CHECK(bytes_of(allocs(t, "lp_param_buffer", Phase::Init)) == elements({1003782656}));
    CHECK(bytes_of(allocs(t, "fp32_partition", Phase::Init)) == elements({1003782656}, 4));
    CHECK(bytes_of(allocs(t, "partition_grad_fp32", Phase::Optimizer)) == elements({1003782656}, 4));
    CHECK(bytes_of(allocs(t, "ipg_bucket", Phase::Init)) == elements({500000000}));
}

// Qwen3-8B: 36 layers of q, k, v, o (4096 x 4096, 1024 x 4096 twice, 4096 x 4096), the head norms
// (128 each, modules of the attention), gate, up, down (12288 x 4096) and the two 4096 norms:
// 192946432 a layer; with the embedding and lm_head (151936 x 4096 each) and the final norm,
// P = 8190735360. Every parameter divides by 8 ranks: the partition is P / 8 = 1023841920 elements,
// one sub-group (lm_head, the last parameter, takes it past 1e9). Every norm is persistent (<= 1e5):
// 73 of 4096 elements and 72 of 128 stay gathered from init (beside the rotary embedding's two
// buffers of 64 fp32).
TEST_CASE("ZeRO-3 for Qwen3: its head norms are modules of their own, persistent as the others") {
    const ModelSpec m = find_model("qwen3-8b");
    const Timeline t = simulate(m, zero3(4096, 8), test::test_gpu());
    std::int64_t wide = 0, heads = 0;
    for (const Event& e : t.events)
        if (e.alloc && e.phase == Phase::Init && e.category == Category::Weights && e.op == "init.weights") {
            wide += e.bytes == 2 * 4096;
            heads += e.bytes == 2 * 128;
        }
    CHECK(wide == 2 * 36 + 1);
    CHECK(heads == 2 * 36);
    CHECK(bytes_of(allocs(t, "lp_param_buffer", Phase::Init)) == elements({1023841920}));
    CHECK(bytes_of(allocs(t, "fp32_partition", Phase::Init)) == elements({1023841920}, 4));
}

// Qwen3-30B-A3B: a layer holds q and o 4096 x 2048, k and v 512 x 2048, two head norms of 128, the
// router 128 x 2048, the stacked experts' gate_up 128 x 1536 x 2048 = 402653184 and down 128 x 2048 x
// 768 = 201326592, two norms of 2048: 623120640; 48 layers, the embedding and lm_head (151936 x 2048
// each) and the final norm: P = 30532122624, the published total, every parameter divisible by 8, so
// the partition is P / 8. Its sparse block is one of DeepSpeed's default ZeRO-3 leaf modules: the router's
// and experts' parameters are fetched by the block's hooks, together. Each grouped_mm saves its weight's
// transpose, a view of the gathered storage, so DeepSpeed's release after the block's forward frees
// nothing: every layer's experts stay gathered until their backward (48 gate_up copies of 805 MB).
// With every layer checkpointed the first forward saves nothing and the release frees them, but for
// the last layer's: its leaf looks ahead through whole subtrees, and the backward's first module, the
// root, holds every parameter within max_reuse_distance (1e9; the final norm and lm_head hold 311166976).
TEST_CASE("ZeRO-3 for Qwen3-MoE: a leaf block whose experts stay gathered until backward unless checkpointed") {
    const ModelSpec m = find_model("qwen3-30b-a3b");
    REQUIRE(m.parameters().total() == 30532122624);
    auto held_experts = [&](bool checkpointed) {
        TrainingSetup s = zero3(4096, 8);
        if (checkpointed) s.checkpoint.assign(48, true);
        const Timeline t = simulate_rank(m, s, test::test_gpu(), 0);
        CHECK(bytes_of(allocs(t, "lp_param_buffer", Phase::Init)) == elements({30532122624 / 8}));
        return forward_copies(t, 2 * 402653184).held;
    };
    CHECK(held_experts(false) == 48);
    CHECK(held_experts(true) == 1);
}

// gpt-oss-20b stores its experts transposed and uses them as they are: grouped_mm saves the Parameter,
// which holds nothing DeepSpeed releases. Its block is no leaf, so the experts module's release looks
// ahead through direct parameters only: after the last layer's experts come the final norm and lm_head
// (201088 x 2880 = 579133440), and in backward lm_head again, past max_reuse_distance (1e9) before
// any layer's experts (32 x 2880 x 5760 = 530841600 in gate_up) come back. So each layer's experts are
// gathered once in its forward (24 gate_up copies) and freed there, none held into backward (the final
// norm's fetch then prefetches the last layer's for backward: a 25th copy, outside the layers).
TEST_CASE("ZeRO-3 for gpt-oss: its experts' modules release their weights after forward") {
    const ModelSpec m = find_model("gpt-oss-20b");
    TrainingSetup s = zero3(4096, 8);
    s.attention = Attention::Eager;
    const ForwardCopies gate_up = forward_copies(simulate_rank(m, s, test::test_gpu(), 0), 2 * 530841600);
    CHECK(gate_up.in_layers == 24);
    CHECK(gate_up.all == 25);
    CHECK(gate_up.held_in_layers == 0);
}

// Llama-3.2-1B ties lm_head to the embedding: one Parameter in both modules, fetched by each. A layer
// holds q and o 2048 x 2048, k and v 512 x 2048, gate, up, down 8192 x 2048 and two norms: 60821504; 16
// of them, the embedding (128256 x 2048 = 262668288, once) and the final norm make P = 1235814400, a
// partition of P / 8 = 154476800 on 8 ranks (every parameter divides by 8). The root's fetch prefetches
// the embedding (the first 5e7 elements of the queue); every release after that keeps it gathered,
// since the trace uses it again within max_reuse_distance (1e9 elements): the 16 layers and the final
// norm (973146112) lie between the embedding's forward and lm_head's, between lm_head's backward and
// the embedding's. So it is gathered once in the step and freed at backward's end with the modules whose
// post-backward never ran. lm_head's gradient [V, d] is not AccumulateGrad's yet: the embedding's
// joins it in place (autograd's input buffer), and only then does DeepSpeed's hook take it.
TEST_CASE("ZeRO-3 with tied embeddings: one gathered weight for the embedding and lm_head, one gradient for both") {
    const ModelSpec m = find_model("llama-3.2-1b");
    const Timeline t = simulate(m, zero3(4096, 8), test::test_gpu());
    const std::int64_t V = 128256, d = 2048;
    CHECK(bytes_of(allocs(t, "lp_param_buffer", Phase::Init)) == elements({154476800}));
    CHECK(bytes_of(allocs(t, "fp32_partition", Phase::Init)) == elements({154476800}, 4));
    std::vector<const Event*> gathered;
    for (const Event& e : t.events)
        if (e.alloc && e.bytes == V * d * 2 && e.category == Category::Weights && e.phase != Phase::Init) gathered.push_back(&e);
    REQUIRE(gathered.size() == 1);
    CHECK(gathered[0]->phase == Phase::Forward);
    CHECK(gathered[0]->op == "zero3.fetch");
    const auto freed = [&](const Event* a) {
        return std::find_if(t.events.begin(), t.events.end(), [&](const Event& e) { return !e.alloc && e.tensor == a->tensor; });
    };
    REQUIRE(freed(gathered[0]) != t.events.end());
    CHECK(freed(gathered[0])->op == "deepspeed.epilogue");
    // the gradient: made by lm_head's backward, added to by the embedding's (freed after it), then the bucket's
    std::vector<const Event*> grads;
    for (const Event& e : t.events)
        if (e.alloc && e.bytes == V * d * 2 && e.phase == Phase::Backward) grads.push_back(&e);
    REQUIRE(grads.size() == 2);
    CHECK((grads[0]->op == "lm_head" && grads[0]->name == "weight_grad" && grads[0]->category == Category::Gradients));
    CHECK((grads[1]->op == "embedding" && grads[1]->name == "weight_grad"));
    CHECK(freed(grads[1]) < freed(grads[0]));
    CHECK(freed(grads[0])->op.starts_with("deepspeed."));
}

// Phi-3-mini: fused projections, one parameter each: a layer holds o_proj 3072 x 3072 (registered
// first), qkv_proj 9216 x 3072 (32 query heads and 32 key/value heads of 96), gate_up_proj 16384 x 3072,
// down_proj 3072 x 8192 and two norms: 113252352; 32 of them, the embedding and lm_head (32064 x 3072
// each, untied) and the final norm make P = 3821079552, a partition of P / 8 = 477634944 on 8 ranks.
// Every layer's qkv_proj and gate_up_proj is gathered whole in forward (a gather of the fused parameter,
// python/mst_hf's MLP chunks calling it four times).
TEST_CASE("ZeRO-3 for Phi-3: the fused projections are one parameter each, gathered whole") {
    const ModelSpec m = find_model("phi-3-mini-4k");
    TrainingSetup s = zero3(4096, 8);
    s.mlp_chunks = 4;
    const Timeline t = simulate(m, s, test::test_gpu());
    CHECK(bytes_of(allocs(t, "lp_param_buffer", Phase::Init)) == elements({477634944}));
    CHECK(bytes_of(allocs(t, "fp32_partition", Phase::Init)) == elements({477634944}, 4));
    const auto gate_up = allocs(t, "gate_up_proj", Phase::Forward), qkv = allocs(t, "qkv_proj", Phase::Forward);
    CHECK(gate_up.size() >= 32);
    CHECK(qkv.size() >= 32);
    for (const Event* e : gate_up) CHECK((e->bytes == 16384 * 3072 * 2 && e->category == Category::Weights));
    for (const Event* e : qkv) CHECK((e->bytes == 9216 * 3072 * 2 && e->category == Category::Weights));
}

// Gemma-2-2B: a layer holds q and o 2304 x 2048 (8 heads of 256), k and v 2304 x 1024, gate, up and
// down 2304 x 9216 and four norms of 2304 (input, post-attention, pre- and post-feedforward, each a
// module): 77865984; 26 of them, the tied embedding (256000 x 2304) and the final norm make P =
// 2614341888, a partition of P / 8 = 326792736 on 8 ranks. All 105 norms are persistent (at most 1e5
// elements): gathered from init, 2304 elements each. The embedding scales its output inside its own
// forward (transformers' Gemma2ScaledWordEmbedding), so its weight, gathered for it and not used again
// within the 1e9-element reuse distance (26 layers of 77865984 lie before lm_head), is released after
// the scaled embeddings are made; in backward its pre-backward fetch, a hook on the module's output,
// comes before the scale's backward (here it waits for the weight prefetched in a coalesced gather
// and frees that gather's flat buffer).
TEST_CASE("ZeRO-3 for Gemma-2: four norms per layer, each a module of its own") {
    const ModelSpec m = find_model("gemma-2-2b");
    const Timeline t = simulate(m, zero3(4096, 8), test::test_gpu());
    CHECK(bytes_of(allocs(t, "lp_param_buffer", Phase::Init)) == elements({326792736}));
    CHECK(bytes_of(allocs(t, "fp32_partition", Phase::Init)) == elements({326792736}, 4));
    std::int64_t norms = 0;
    for (const Event& e : t.events)
        if (e.alloc && e.phase == Phase::Init && e.op == "init.weights" && e.bytes == 2 * 2304) ++norms;
    CHECK(norms == 4 * 26 + 1);
    const auto scaled = allocs(t, "embeddings_scaled", Phase::Forward);
    REQUIRE(scaled.size() == 1);
    const auto released = std::find_if(t.events.begin(), t.events.end(), [](const Event& e) {
        return !e.alloc && e.phase == Phase::Forward && e.bytes == std::int64_t{256000} * 2304 * 2;
    });
    REQUIRE(released != t.events.end());
    CHECK(&*released > scaled[0]);
    const auto d_scaled = allocs(t, "d_embeddings", Phase::Backward);
    REQUIRE(d_scaled.size() == 1);
    const Event& before = *(d_scaled[0] - 1);
    CHECK((before.op == "zero3.fetch" && !before.alloc && before.name == "all_gather_flat"));
}

// Gemma-3-1B: a layer holds q and o 1152 x 1024 (4 heads of 256), k and v 1152 x 256 (one key head),
// head norms of 256 each, gate, up and down 1152 x 6912 and four norms of 1152: 26842112; 26 of them,
// the tied embedding (262144 x 1152) and the final norm make P = 999885952 (the published count), a
// partition of 124985744 on 8 ranks. Persistent from init: 105 norms of 1152 and 52 head norms of 256.
TEST_CASE("ZeRO-3 for Gemma-3: head norms after the projections, four norms per layer") {
    const ModelSpec m = find_model("gemma-3-1b");
    const Timeline t = simulate(m, zero3(4096, 8), test::test_gpu());
    CHECK(bytes_of(allocs(t, "lp_param_buffer", Phase::Init)) == elements({124985744}));
    std::int64_t norms = 0, heads = 0;
    for (const Event& e : t.events)
        if (e.alloc && e.phase == Phase::Init && e.op == "init.weights") {
            norms += e.bytes == 2 * 1152;
            heads += e.bytes == 2 * 256;
        }
    CHECK(norms == 4 * 26 + 1);
    CHECK(heads == 2 * 26);
}

// Qwen2.5-7B: q, k and v have biases, second parameters of their modules (3584, 512 and 512 elements,
// persistent under 1e5). A layer: q and o 3584 x 3584, k and v 512 x 3584, the biases, gate, up, down
// 18944 x 3584, two norms: 233057792; with the embedding and lm_head (152064 x 3584 each) and the final
// norm, P = 7615616512, every parameter divisible by 8: a partition of 951952064 elements (one
// sub-group). Gathered from init: 57 norms and 28 q biases of 3584 elements, 56 k and v biases of 512.
// In backward each projection's node makes its bias's gradient last, after the weight's.
TEST_CASE("ZeRO-3 for Qwen2: the q, k and v biases are their modules' second parameters") {
    const ModelSpec m = find_model("qwen2.5-7b");
    const Timeline t = simulate(m, zero3(4096, 8), test::test_gpu());
    std::int64_t wide = 0, kv = 0;
    for (const Event& e : t.events)
        if (e.alloc && e.phase == Phase::Init && e.op == "init.weights") {
            wide += e.bytes == 2 * 3584;
            kv += e.bytes == 2 * 512;
        }
    CHECK(wide == 2 * 28 + 1 + 28);
    CHECK(kv == 2 * 28);
    CHECK(bytes_of(allocs(t, "lp_param_buffer", Phase::Init)) == elements({951952064}));
    CHECK(bytes_of(allocs(t, "fp32_partition", Phase::Init)) == elements({951952064}, 4));
    // layer 27's v_proj: its input's gradient [4096, 3584], then the weight's [512, 3584], then the bias's [512]
    std::vector<bytes_t> v_grads;
    for (const Event& e : t.events)
        if (e.alloc && e.phase == Phase::Backward && e.layer == 27 && v_grads.size() < 3 && (e.name == "d_h1_v" || !v_grads.empty()))
            v_grads.push_back(e.bytes);
    CHECK(v_grads == std::vector<bytes_t>{4096 * 3584 * 2, 512 * 3584 * 2, 512 * 2});
}

// tiny-llama on 3 ranks, nothing persistent, a 4096-element bucket (as python/tests/
// test_deepspeed_referee.py runs DeepSpeed). Gradients arrive in backward order: lm_head 16384, the
// final norm 64, then per layer down, up, gate (11264 each), the post-attention norm, o 4096, v and k
// 2048 each, q 4096, the input norm; the embedding last. A gradient that would take the bucket past
// 4096 elements reduce-scatters what it holds first; one larger stays alone; each reduce-scatter
// cats its gradients padded to a multiple of 3 (ceil(n / 3) x 3 each): lm_head 16386, a norm 66, an
// MLP projection 11265, o or q 4098, v and k together 2 x 683 x 3 = 4098; the epilogue the embedding's.
TEST_CASE("ZeRO-3's gradient bucket: reduce-scatters padded to the ranks, as derived by hand") {
    const ModelSpec m = find_model("tiny-llama");
    TrainingSetup s = zero3(256, 3);
    s.attention = Attention::Eager;
    s.reduce_bucket_size = 4096;
    s.param_persistence_threshold = 0;
    const Timeline t = simulate(m, s, test::test_gpu());
    const std::vector<std::int64_t> layer = {66, 11265, 11265, 11265, 66, 4098, 4098, 4098};
    std::vector<bytes_t> expected = elements({16386});
    for (int l = 0; l < 2; ++l)
        for (std::int64_t n : layer) expected.push_back(2 * n);
    expected.push_back(2 * 66);  // the input norm of layer 0, flushed by the embedding's gradient
    expected.push_back(2 * 16386);
    CHECK(bytes_of(allocs(t, "reduce_scatter_flat", Phase::Backward)) == expected);
    // Nothing persistent: the step's norm takes each parameter's partition piece in fp64, in parameter
    // order (ceil(n / 3): embedding 5462, q 1366, k and v 683, o 1366, the MLP's 3755, the norms 22).
    const std::vector<std::int64_t> piece = {1366, 683, 683, 1366, 3755, 3755, 3755, 22, 22};
    std::vector<bytes_t> pieces = elements({5462}, 8);
    for (int l = 0; l < 2; ++l)
        for (std::int64_t n : piece) pieces.push_back(8 * n);
    pieces.push_back(8 * 22), pieces.push_back(8 * 5462);
    CHECK(bytes_of(allocs(t, "grad_fp64", Phase::Optimizer)) == pieces);
    CHECK(bytes_of(allocs(t, "flat_grad_partition", Phase::Optimizer)) == elements({41760}));
    CHECK(allocs(t, "lp_param_buffer", Phase::Init).size() == 1);
    CHECK(bytes_of(allocs(t, "lp_param_buffer", Phase::Init)) == elements({41760}));
}

TEST_CASE("ZeRO-3 in the hf runtime: what is not modelled yet is a one-line error, its options DeepSpeed's") {
    const ModelSpec m = find_model("tiny-llama");
    TrainingSetup s = zero3(256, 3);
    CHECK_NOTHROW(validate(s, m));
    TrainingSetup other = s;
    other.dp = 1;
    CHECK(test::expect_user_error([&] { validate(other, m); }).rfind("setup: dp: expected 2 or more ranks with runtime hf and ZeRO-3", 0) == 0);
    other = s;
    other.precision = Precision::PureBf16;
    CHECK(test::expect_user_error([&] { validate(other, m); }).rfind("setup: precision: expected bf16-master", 0) == 0);
    other = s;
    other.mlp_chunks = 2;
    CHECK_NOTHROW(validate(other, m));  // (python/mst_hf's loop)
    other.mlp_impl = MlpImpl::Tiled;
    CHECK_NOTHROW(validate(other, m));  // (python/mst_hf's tiled MLP, ALST's way under ZeRO-3)
    other = s;
    other.lm_chunks = 2;
    CHECK_NOTHROW(validate(other, m));  // (python/mst_hf's, inside lm_head's forward)
    other = s;
    other.checkpoint.assign(2, true), other.offload_checkpoints = true;
    CHECK_NOTHROW(validate(other, m));  // (python/mst_hf's save_on_cpu)
    CHECK_NOTHROW(validate(s, find_model("llama-3.2-1b")));  // (tied embeddings)
    // Mixture-of-Experts: Mixtral's and Qwen3-MoE's blocks (leaf modules) and gpt-oss's (router and experts
    // modules, biases, sinks), with python/mst_hf's loop only; MLP biases are not modelled
    const ModelSpec mixtral = find_model("mixtral-8x7b");
    CHECK_NOTHROW(validate(s, mixtral));
    other = s;
    other.mlp_chunks = 2, other.mlp_impl = MlpImpl::Tiled;
    CHECK(test::expect_user_error([&] { validate(other, mixtral); }).rfind("setup: mlp_impl: expected loop for mixtral-8x7b", 0) == 0);
    other = s;
    other.attention = Attention::Eager;  // (transformers' flash path cannot run gpt-oss's sinks)
    CHECK_NOTHROW(validate(other, find_model("gpt-oss-20b")));
    CHECK(test::expect_user_error([&] { validate(s, find_model(std::string(MST_TEST_DATA_DIR) + "/tiny_llama_bias.json")); })
              .rfind("setup: zero_stage: expected 0, 1 or 2 for tiny_llama_bias", 0) == 0);
    // Gemma-2 soft-caps lm_head's output in the model's forward: python/mst_hf's chunked loss, inside
    // lm_head's forward under ZeRO-3, is refused there and here
    const ModelSpec gemma = find_model("gemma-2-2b");
    CHECK_NOTHROW(validate(s, gemma));
    other = s;
    other.lm_chunks = 2;
    CHECK(test::expect_user_error([&] { validate(other, gemma); }).rfind("setup: lm_chunks: expected 1 for gemma-2-2b", 0) == 0);
    // the options are ZeRO-3's: elsewhere they are DeepSpeed's defaults
    other = s;
    other.zero_stage = 2, other.param_persistence_threshold = 0;
    CHECK(test::expect_user_error([&] { validate(other, m); }).rfind("setup: param_persistence_threshold: expected DeepSpeed's default", 0) == 0);
    other = s;
    other.runtime = Runtime::Kernels, other.prefetch_bucket_size = 1;
    CHECK(test::expect_user_error([&] { validate(other, m); }).rfind("setup: prefetch_bucket_size: expected DeepSpeed's default", 0) == 0);
    // carried by the setup file (written where ZeRO-3 runs in the hf runtime only)
    s.param_persistence_threshold = 0, s.prefetch_bucket_size = 1000;
    const TrainingSetup back = parse_setup(to_json(s), m, "setup");
    CHECK(back.param_persistence_threshold == 0);
    CHECK(back.prefetch_bucket_size == 1000);
    CHECK(to_json(zero3(256, 3)).contains("param_persistence_threshold"));
    TrainingSetup kernels = s;
    kernels.runtime = Runtime::Kernels;
    CHECK_FALSE(to_json(kernels).contains("param_persistence_threshold"));
    CHECK(test::expect_user_error([&] { (void)parse_setup(nlohmann::json{{"param_persistence_threshold", -1}}, m, "setup"); })
              .rfind("setup: param_persistence_threshold: expected", 0) == 0);
}

TEST_CASE("ZeRO-3's ds_config.json names every option the plan depends on") {
    const ModelSpec m = find_model("tiny-llama");
    Plan plan;
    plan.model = m.name, plan.gpu = "h100-sxm-80gb", plan.gpus = 3, plan.setup = zero3(256, 3);
    plan.setup.param_persistence_threshold = 0, plan.setup.reduce_bucket_size = 4096;
    const nlohmann::json zero = nlohmann::json::parse(emit(plan, m, "deepspeed").at(0).content).at("zero_optimization");
    CHECK(zero.at("stage") == 3);
    CHECK(zero.at("reduce_bucket_size") == 4096);
    CHECK(zero.at("stage3_param_persistence_threshold") == 0);
    CHECK(zero.at("stage3_prefetch_bucket_size") == 50'000'000);
    CHECK(zero.at("stage3_max_live_parameters") == 1'000'000'000);
    CHECK(zero.at("stage3_max_reuse_distance") == 1'000'000'000);
    CHECK_FALSE(zero.contains("overlap_comm"));
}

TEST_CASE("a ZeRO-3 measurement of any rank is compared with the step every rank runs") {
    const ModelSpec m = find_model("tiny-llama");
    const TrainingSetup s = zero3(256, 3);
    CHECK(walked_ranks(s, m).empty());
    StepFile measured = test::measured_rank(s, "tiny-llama", 2);
    CHECK(predict_measured(measured).rank == 2);
    measured.timeline.rank = 3;
    CHECK(test::expect_user_error([&] { (void)predict_measured(measured); }).find("(0 .. 2: alike), got 3") != std::string::npos);
    CHECK(simulate_rank(find_model("tiny-llama"), s, test::test_gpu(), 1).rank == 1);  // (estimate --rank)
}

// Llama-3-8B (P = 8030261248) on 2 H100s in bf16 with fp32 masters: ZeRO 1 and 2 keep the whole bf16
// weights (2P), half the fp32 masters and Adam's states (12P / 2) and the partition's gradients on every
// GPU, past the budget; ZeRO-3 shards the weights too (2P / 2): the search finds it, and plans that
// both DeepSpeed's file and python/mst_hf's config express.
TEST_CASE("recommend --for deepspeed plans ZeRO-3 where ZeRO 1 and 2 cannot hold the states, a plan its emitter writes") {
    TuneRequest rq = test::hf_request("llama-3-8b", "h100-sxm-80gb", 2, 4096);
    rq.base.precision = Precision::Bf16Master;
    rq.for_format = "deepspeed";
    const Recommendation r = recommend(rq);
    REQUIRE(r.found);
    CHECK(r.best.setup.deepspeed_zero3());
    for (const Candidate& c : r.pareto) CHECK(c.setup.deepspeed_zero3());
    Plan plan;
    plan.model = rq.model.name, plan.gpu = rq.gpu.name, plan.gpus = 2;
    for (const Candidate& c : r.pareto) {
        plan.setup = c.setup;
        CHECK(nlohmann::json::parse(emit(plan, rq.model, "deepspeed").at(0).content).at("zero_optimization").at("stage") == 3);
        CHECK(nlohmann::json::parse(emit(plan, rq.model, "hf-mst").at(0).content).at("lm_head").at("chunks") == c.setup.lm_chunks);
    }
    rq.pins.zero_stage = 2;
    CHECK_FALSE(recommend(rq).found);
    // pure bf16 has no ZeRO-3 in the hf runtime: the pin says why
    rq.pins.zero_stage = 3;
    rq.base.precision = Precision::PureBf16;
    CHECK(test::expect_user_error([&] { (void)recommend(rq); }).rfind("setup: precision: expected bf16-master with runtime hf and ZeRO-3", 0) == 0);
}

// python/mst_hf's MLP mini-sequences call each projection once per chunk. DeepSpeed's post-backward hook
// counts a module's input gradients anew at every call (ds_grads_remaining, parameter_offload.py:497-526),
// so it releases in the backward of the call autograd runs first (the last chunk), where the weight is
// used again by the next chunk and stays; the first chunk's never releases: the weights wait for
// release_backward_leftovers at backward's end, which pops its modules last inserted first: the
// embedding's, then layer 0's gate, up and down (their last pre-backward fetches were layer 0's), then
// layer 1's. tiny-llama, 3 ranks, the norms persistent; parameter order: embedding, per layer q, k, v,
// o, gate, up, down (the norms after them), lm_head.
TEST_CASE("ZeRO-3 with MLP mini-sequences: the MLP's gathered weights wait for backward's end") {
    const ModelSpec m = find_model("tiny-llama");
    TrainingSetup s = zero3(256, 3);
    s.attention = Attention::Eager;
    s.param_persistence_threshold = 100;
    s.mlp_chunks = 2;
    // the weights gathered in forward and freed after the last layer's backward, in order
    const auto freed_at_end = [&](const TrainingSetup& setup) {
        const Timeline t = simulate(m, setup, test::test_gpu());
        std::size_t layer0_done = 0;
        for (std::size_t i = 0; i < t.events.size(); ++i)
            if (t.events[i].phase == Phase::Backward && t.events[i].layer == 0) layer0_done = i;
        std::vector<std::int64_t> gathered;
        for (const Event& e : t.events)
            if (e.alloc && e.category == Category::Weights && e.phase == Phase::Forward) gathered.push_back(e.tensor);
        std::vector<std::string> names;
        for (std::size_t i = layer0_done + 1; i < t.events.size(); ++i) {
            const Event& e = t.events[i];
            if (!e.alloc && e.phase == Phase::Backward && std::find(gathered.begin(), gathered.end(), e.tensor) != gathered.end())
                names.push_back(e.name);
        }
        return names;
    };
    CHECK(freed_at_end(s) ==
          std::vector<std::string>{"embed_tokens", "gate_proj", "up_proj", "down_proj", "gate_proj", "up_proj", "down_proj"});
    // without chunks each is released at its module's post-backward hook: the embedding alone is left
    s.mlp_chunks = 1;
    CHECK(freed_at_end(s) == std::vector<std::string>{"embed_tokens"});
}

// python/mst_hf's LM head mini-sequences under ZeRO-3 run inside lm_head's forward (mst_hf/patch.py),
// so lm_head keeps a plain linear's hooks: gathered at its forward fetch, and, its next use being its
// own backward right after (well within 1e9 elements), kept until its post-backward release, after the
// loss's backward and before the final norm's. Llama-3-8B at 16k on 8 ranks, 8 chunks of 2048 tokens:
// one gathered copy of 128256 x 4096 bf16 weights (1050673152 bytes) spans the 8 chunks' bf16 logits
// [2048, 128256] of forward and the 8 recomputed in backward; no [16384, 128256] tensor exists.
TEST_CASE("ZeRO-3 with python/mst_hf's chunked LM head: lm_head is gathered once, around every chunk") {
    const ModelSpec m = find_model("llama-3-8b");
    TrainingSetup s = zero3(16384, 8);
    s.checkpoint.assign(32, true);
    s.lm_chunks = 8;
    const Timeline t = simulate(m, s, test::test_gpu());
    const std::int64_t V = 128256, d = 4096, n = 2048;
    const auto index_of = [&](const Event* e) { return static_cast<std::size_t>(e - t.events.data()); };
    const auto weights = allocs(t, "lm_head");
    REQUIRE(weights.size() == 1);
    CHECK(weights[0]->category == Category::Weights);
    CHECK(weights[0]->bytes == V * d * 2);
    CHECK(weights[0]->phase == Phase::Forward);
    std::size_t freed = 0, final_norm = t.events.size();
    for (std::size_t i = 0; i < t.events.size(); ++i) {
        const Event& e = t.events[i];
        if (!e.alloc && e.tensor == weights[0]->tensor) freed = i;
        if (e.phase == Phase::Backward && e.op.starts_with("final_norm")) final_norm = std::min(final_norm, i);
    }
    REQUIRE(freed > 0);
    CHECK(t.events[freed].phase == Phase::Backward);
    CHECK(freed < final_norm);
    for (Phase phase : {Phase::Forward, Phase::Backward}) {
        const auto logits = allocs(t, "logits", phase);
        std::vector<const Event*> bf16;
        for (const Event* e : logits)
            if (e->name == "logits") bf16.push_back(e);
        CHECK(bf16.size() == 8);
        for (const Event* e : bf16) {
            CHECK(e->bytes == n * V * 2);
            CHECK((index_of(weights[0]) < index_of(e) && index_of(e) < freed));
        }
    }
    for (const Event& e : t.events)
        if (e.alloc && (e.phase == Phase::Forward || e.phase == Phase::Backward)) CHECK(e.bytes < 16384 * V * 2);
}

// python/mst_hf's tiled MLP under ZeRO-3 (ALST's way): each chunk's replay and backward call the
// projections' modules, so every chunk gathers and releases them, and each chunk's weight gradient
// reaches .grad on its own: the first becomes it, the next three are summed into it and freed, and the
// bucket takes the sum once, after the last. tiny-llama (down_proj 64 x 176) on 3 ranks, 4 chunks of 64.
TEST_CASE("ZeRO-3 with python/mst_hf's tiled MLP: a chunk's gradient at a time, one bucket add per step") {
    const ModelSpec m = find_model("tiny-llama");
    TrainingSetup s = zero3(256, 3);
    s.attention = Attention::Eager;
    s.param_persistence_threshold = 100;
    s.mlp_chunks = 4, s.mlp_impl = MlpImpl::Tiled;
    s.checkpoint = {false, true};
    const Timeline t = simulate(m, s, test::test_gpu());
    std::vector<Category> down_grads;
    std::int64_t layer0_d_m = 0;
    for (const Event& e : t.events) {
        if (!e.alloc || e.phase != Phase::Backward || e.layer != 0) continue;
        if (e.name == "weight_grad" && e.bytes == 64 * 176 * 2 && e.op == "mlp.down") down_grads.push_back(e.category);
        if (e.name == "d_m") layer0_d_m += e.bytes == 64 * 176 * 2;
    }
    CHECK(down_grads == std::vector<Category>{Category::Gradients, Category::Transient, Category::Transient, Category::Transient});
    CHECK(layer0_d_m == 4);
    // the tuner's peaks-only walk builds every chunk under ZeRO-3 (no folded repeats: the hooks' gathers
    // follow the coordinator's state) and finds the recorded timeline's peaks
    const MemoryPeaks fast = simulate_peaks(m, s, test::test_gpu());
    const Estimate full = estimate(m, s, test::test_gpu(), kNoCapacity);
    CHECK(fast.peak_bytes == full.summary.peak.bytes);
    CHECK(fast.peak_allocated_bytes == full.allocator.peak_allocated);
    CHECK(fast.peak_reserved_bytes == full.allocator.peak_reserved);
}

// Llama-3-8B, P = 8030261248, on 8 H100s (450 GB/s): an all-gather or reduce-scatter of N bf16 elements
// moves 7/8 x 2N bytes per rank. Per micro-step, every layer checkpointed: forward, backward and the
// recompute gather the parameters (3 x 7/8 x 2P), backward reduce-scatters the gradients (7/8 x 2P);
// the step waits for the first gather (the embedding, 128256 x 4096 = 525336576 elements) and for what
// backward's end flushes (the embedding's gradient and a full 5e8 bucket), the rest hides behind compute.
TEST_CASE("DeepSpeed ZeRO-3's communication: behind the compute but for the first gather and the last flush") {
    const ModelSpec m = find_model("llama-3-8b");
    const GpuProfile gpu = find_gpu("h100-sxm-80gb");
    const double P = 8030261248.0, E = 525336576.0, move = 1.75 / 450e9;  // seconds per element
    TrainingSetup s = zero3(4096, 8);
    s.checkpoint.assign(32, true);
    s.grad_accum = 2;
    const StepTime t = predict_time(m, s, gpu);
    CHECK(t.comm_seconds == doctest::Approx(2 * (3 * P + P) * move).epsilon(1e-12));
    REQUIRE(t.forward_seconds + t.backward_seconds > 3 * P * move);  // (the rest hides)
    CHECK(t.comm_exposed_seconds == doctest::Approx(2 * (E + (E + 5e8)) * move).epsilon(1e-12));
}

// Gemma-2 soft-caps lm_head's output: under ZeRO-3 python/mst_hf cannot chunk its loss, so max-seq's MsT
// rows for DeepSpeed shard at ZeRO 2 (chunked there), not at ZeRO-3 with a whole LM head that would stop
// them at the first length needing two chunks.
TEST_CASE("max-seq --for deepspeed for Gemma-2: the MsT rows leave ZeRO-3 for ZeRO 2, where the LM head is chunked") {
    TuneRequest rq = test::hf_request("gemma-2-2b", "h100-sxm-80gb", 8, 8192);
    rq.for_format = "deepspeed";
    rq.base.precision = Precision::Bf16Master;
    const MaxSeqResult r = max_seq(rq, std::nullopt);
    std::int64_t checkpointed = 0;
    for (const MaxSeqRow& row : r.rows) {
        CAPTURE(row.strategy);
        const bool mst = row.strategy.starts_with("checkpointing + MsT");
        CHECK(row.setup.zero_stage == (mst ? 2 : 3));
        if (row.strategy == "full checkpointing") checkpointed = row.max_seq;
        if (mst) {
            CHECK(row.setup.lm_chunks > 1);
            CHECK(row.max_seq > checkpointed);
        }
    }
    CHECK(checkpointed > 0);
}
