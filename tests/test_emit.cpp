// emit: trainer configs written from a plan.
//
// Golden files: tests/golden/plan_llama3_8b.json is the input (written by hand; its
// prediction is what `estimate` and the time model give for that setup, as emit checks; torchtitan's is
// plan_llama3_8b_torchtitan.json, recommend --for torchtitan's), tests/golden/<format>/<file>
// the expected output, compared byte for byte. After an intended change to an
// emitter, regenerate them and review the diff before committing:
//   MST_UPDATE_GOLDEN=1 build/tests/mst_tests -tc="*golden*" && git diff tests/golden
// The other tests parse each file back with the parser its trainer uses (nlohmann::json,
// yaml-cpp), or read torchtitan's Python module line by line, and check the plan's numbers.
#include <doctest/doctest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <sstream>
#include <utility>

#include <nlohmann/json.hpp>
#include <yaml-cpp/yaml.h>

#include "mst/catalog.hpp"
#include "mst/emit.hpp"
#include "mst/plan.hpp"
#include "mst/timemodel.hpp"
#include "test_support.hpp"

using namespace mst;
namespace fs = std::filesystem;

namespace {

fs::path golden_dir() { return fs::path(MST_TEST_DATA_DIR).parent_path() / "golden"; }

std::string read_text(const fs::path& path) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
}

// The golden plan: Llama-3-8B (32 layers) on 8 GPUs = dp 4 x sp 2, seq 65536,
// micro-batch 1, grad-accum 4, ZeRO-3, bf16-master + AdamW, MLP 8 tiled chunks,
// LM head 16 recompute chunks, layers 0,2,...,30 checkpointed.
Plan golden_plan(ModelSpec& model) { return load_plan_file((golden_dir() / "plan_llama3_8b.json").string(), &model); }
// torchtitan trains neither Ulysses nor MsT MLP chunks: its golden plan is `recommend --for torchtitan`'s
// for Llama-3-8B on 8 H100s at 32k (dp 8, ZeRO-2, bf16-master, every layer checkpointed, LM head in
// 2 fused chunks; tests/golden/plan_llama3_8b_torchtitan.json).
Plan titan_plan(ModelSpec& model) {
    return load_plan_file((golden_dir() / "plan_llama3_8b_torchtitan.json").string(), &model);
}
Plan plan_for(const std::string& format, ModelSpec& model) {
    return format == "torchtitan" ? titan_plan(model) : golden_plan(model);
}

const EmittedFile& named(const std::vector<EmittedFile>& files, const std::string& name) {
    for (const auto& f : files)
        if (f.name == name) return f;
    FAIL("no emitted file named " << name);
    return files.front();
}

// "line 12: expected <...>, got <...>": the first line where two texts part.
std::string first_difference(const std::string& expected, const std::string& actual) {
    std::istringstream e(expected), a(actual);
    std::string le, la;
    for (int line = 1;; ++line) {
        const bool he = static_cast<bool>(std::getline(e, le)), ha = static_cast<bool>(std::getline(a, la));
        if (!he && !ha) return "(equal lines; the files differ in a trailing newline)";
        if (he != ha || le != la)
            return "line " + std::to_string(line) + ": expected <" + (he ? le : "end of file") + ">, got <" +
                   (ha ? la : "end of file") + ">";
    }
}

// The comment lines of a YAML or TOML file joined into one text, so a check can
// quote a sentence however the emitter wrapped it.
std::string comments(const std::string& text) {
    std::istringstream in(text);
    std::string line, out;
    while (std::getline(in, line))
        if (line.rfind("# ", 0) == 0) out += (out.empty() ? "" : " ") + line.substr(2);
    return out;
}

std::string error_of(const Plan& plan, const ModelSpec& model, const std::string& format) {
    return test::expect_user_error([&] { (void)emit(plan, model, format); });
}

nlohmann::json ds_config(const Plan& plan, const ModelSpec& model) {
    return nlohmann::json::parse(named(emit(plan, model, "deepspeed"), "ds_config.json").content);
}

std::string titan_module(const Plan& plan, const ModelSpec& model) {
    return named(emit(plan, model, "torchtitan"), "mst_torchtitan.py").content;
}

// A line of mst_torchtitan.py's code (after its docstring): imports, the function, assignments to
// the config, comments, the RoPE loop.
bool titan_code_line(const std::string& line) {
    return line.empty() || line.starts_with("from torchtitan.") || line == "import dataclasses" ||
           line.starts_with("ROPE_TABLE_BYTES = ") || line == "def mst_plan():" || line.starts_with("    config") ||
           line.starts_with("    #") || line == "    return config" ||
           line == "    for layer in config.model_spec.model.layers:" ||
           line.starts_with("        layer.attention.rope = dataclasses.replace(layer.attention.rope, theta=");
}

bool has_line(const std::string& text, const std::string& line) {
    std::istringstream in(text);
    for (std::string l; std::getline(in, l);)
        if (l == line) return true;
    return false;
}

YAML::Node axolotl_config(const Plan& plan, const ModelSpec& model) {
    return YAML::Load(named(emit(plan, model, "axolotl"), "axolotl.yaml").content);
}

}  // namespace

TEST_CASE("emit: every format matches its golden files byte for byte") {
    const bool update = std::getenv("MST_UPDATE_GOLDEN") && std::string(std::getenv("MST_UPDATE_GOLDEN")) == "1";
    for (const std::string& format : emit_formats()) {
        CAPTURE(format);
        ModelSpec model;
        const Plan plan = plan_for(format, model);
        const fs::path dir = golden_dir() / format;
        const auto files = emit(plan, model, format);
        if (update) {
            fs::remove_all(dir);
            fs::create_directories(dir);
            for (const auto& f : files) std::ofstream(dir / f.name, std::ios::binary) << f.content;
            MESSAGE("rewrote " << dir.string());
            continue;
        }
        std::set<std::string> emitted, golden;
        for (const auto& f : files) {
            emitted.insert(f.name);
            const fs::path path = dir / f.name;
            REQUIRE_MESSAGE(fs::exists(path), path.string() << " is missing: run with MST_UPDATE_GOLDEN=1");
            const std::string expected = read_text(path);
            CHECK_MESSAGE(f.content == expected, path.string() << ": " << first_difference(expected, f.content));
        }
        for (const auto& entry : fs::directory_iterator(dir)) golden.insert(entry.path().filename().string());
        CHECK(emitted == golden);  // no stale golden file left behind
    }
}

TEST_CASE("emit hf-mst: mst_config.json carries every knob of the plan") {
    ModelSpec model;
    const Plan plan = golden_plan(model);
    const auto files = emit(plan, model, "hf-mst");
    REQUIRE(files.size() == 1);
    const auto j = nlohmann::json::parse(named(files, "mst_config.json").content);
    CHECK(j["format"] == "hf-mst/1");
    CHECK(j["model"] == "llama-3-8b");
    CHECK(j["seq_len"] == 65536);
    CHECK(j["micro_batch"] == 1);
    CHECK(j["grad_accum"] == 4);
    CHECK(j["precision"] == "bf16-master");
    CHECK(j["attention"] == "flash");
    CHECK(j["mlp"] == nlohmann::json{{"chunks", 8}, {"impl", "tiled"}});
    CHECK(j["lm_head"] == nlohmann::json{{"chunks", 16}, {"impl", "recompute"}});
    std::vector<std::int64_t> even_layers;
    for (std::int64_t i = 0; i < 32; i += 2) even_layers.push_back(i);
    CHECK(j["checkpoint_layers"].get<std::vector<std::int64_t>>() == even_layers);
    CHECK(j["offload_checkpoints"] == false);
    CHECK(j["optimizer"] ==
          nlohmann::json{{"name", "adamw"}, {"state_dtype", "fp32"}, {"in_backward", false}, {"impl", "fused"}});
    CHECK(j["data_parallel"] == 4);
    CHECK(j["sequence_parallel"] == 2);
    CHECK(j["zero_stage"] == 2);
    CHECK(j["predicted"]["peak_allocated_bytes"] == std::int64_t{73216442368});
    CHECK(j["predicted"]["peak_reserved_bytes"] == std::int64_t{75942068224});
    // the time model's for the setup, whatever a plan would say (emit derives it: the relabelling test)
    CHECK(j["predicted"]["tokens_per_second"] == predict_time(model, plan.setup, find_gpu("h100-sxm-80gb")).tokens_per_second);
}

TEST_CASE("emit deepspeed: ds_config.json has DeepSpeed's keys and the plan's numbers") {
    ModelSpec model;
    const Plan plan = golden_plan(model);
    const auto j = ds_config(plan, model);
    // With sp 2 DeepSpeed derives train_batch_size over the world / sequence_parallel_size ranks
    // (1 x 4 accumulation x 4 = 16) while the Hugging Face Trainer would check world x 1 x 4 = 32:
    // the key is left out (scripts/check-clients runs both checks).
    CHECK_FALSE(j.contains("train_batch_size"));
    CHECK(j["train_micro_batch_size_per_gpu"] == 1);
    CHECK(j["gradient_accumulation_steps"] == 4);
    CHECK(j["sequence_parallel_size"] == 2);
    CHECK(j["bf16"] == nlohmann::json{{"enabled", true}});
    CHECK(j["zero_optimization"]["stage"] == 2);
    CHECK_FALSE(j["zero_optimization"].contains("stage3_prefetch_bucket_size"));
    Plan zero3 = plan;
    zero3.setup.zero_stage = 3;
    // One Llama-3-8B layer: q 4096x4096 + k, v 4096x1024 each + o 4096x4096 = 41 943 040,
    // gate, up, down 3 x 4096x14336 = 176 160 768, two RMSNorms 8 192: 218 112 000 elements.
    CHECK(ds_config(zero3, model)["zero_optimization"]["stage3_prefetch_bucket_size"] == 218112000);
    // What DeepSpeed's stage 3 holds beyond the plan is said (docs/deepspeed-zero3.md), and only there.
    const auto says_zero3 = [](const nlohmann::json& notes) {
        return std::any_of(notes.begin(), notes.end(), [](const nlohmann::json& n) {
            return n.get<std::string>().starts_with("ZeRO-3: DeepSpeed's engine gathers ahead by elements");
        });
    };
    CHECK(says_zero3(ds_config(zero3, model)["mst_plan_notes"]));
    CHECK_FALSE(says_zero3(j["mst_plan_notes"]));
    CHECK(j["activation_checkpointing"]["number_checkpoints"] == 16);
    CHECK(j["activation_checkpointing"]["cpu_checkpointing"] == false);
    CHECK(j["optimizer"]["type"] == "AdamW");
    CHECK_FALSE(j.contains("zero_allow_untested_optimizer"));
    const std::set<std::string> deepspeed_keys = {
        "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
        "bf16", "torch_autocast", "zero_optimization", "activation_checkpointing", "optimizer",
        "zero_allow_untested_optimizer", "sequence_parallel_size"};
    for (const auto& [key, value] : j.items())
        CHECK_MESSAGE((deepspeed_keys.count(key) == 1 || key == "mst_plan_notes"), key);
    // What DeepSpeed has no key for is explained, with the plan's chunk counts.
    const std::string notes = j["mst_plan_notes"].dump();
    CHECK(notes.find("MLP: 8 mini-sequences (tiled)") != std::string::npos);
    CHECK(notes.find("LM head + loss: 16 mini-sequences (recompute)") != std::string::npos);
    CHECK(notes.find("16 of 32 layers") != std::string::npos);
}

TEST_CASE("emit axolotl: axolotl.yaml has Axolotl's keys and ships ds_config.json for ZeRO") {
    ModelSpec model;
    const Plan plan = golden_plan(model);
    const auto files = emit(plan, model, "axolotl");
    REQUIRE(files.size() == 2);
    const std::string& text = named(files, "axolotl.yaml").content;
    const YAML::Node y = YAML::Load(text);
    CHECK(y["sequence_len"].as<std::int64_t>() == 65536);
    CHECK(y["micro_batch_size"].as<std::int64_t>() == 1);
    CHECK(y["gradient_accumulation_steps"].as<std::int64_t>() == 4);
    CHECK(y["bf16"].as<bool>());
    CHECK(y["attn_implementation"].as<std::string>() == "flash_attention_2");  // Axolotl 0.21 deprecates flash_attention
    CHECK(y["gradient_checkpointing"].as<bool>());
    CHECK_FALSE(y["gradient_checkpointing_kwargs"]["use_reentrant"].as<bool>());
    CHECK(y["context_parallel_size"].as<std::int64_t>() == 2);
    CHECK(y["tiled_mlp"].as<bool>());
    CHECK(y["tiled_mlp_num_shards"].as<std::int64_t>() == 8);
    CHECK(y["plugins"][0].as<std::string>() == "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin");
    CHECK(y["cut_cross_entropy"].as<bool>());
    CHECK(y["optimizer"].as<std::string>() == "adamw_torch_fused");
    CHECK(y["deepspeed"].as<std::string>() == "ds_config.json");
    CHECK_FALSE(y["activation_offloading"]);
    // Axolotl checkpoints all layers or none: the comment keeps the plan's placement.
    CHECK(text.rfind("# mst-plan: ", 0) == 0);
    CHECK(comments(text).find("For Axolotl 0.21.0 (pip install \"axolotl[deepspeed]==0.21.0\")") != std::string::npos);
    // Cut Cross Entropy is Axolotl's fork, installed apart: the command sits on a line of its own.
    CHECK(text.find("\n# pip uninstall -y cut-cross-entropy && pip install \"cut-cross-entropy[transformers] @ "
                    "git+https://github.com/axolotl-ai-cloud/ml-cross-entropy.git@v0.1.1\"\n") != std::string::npos);
    CHECK(comments(text).find("DeepSpeed Ulysses over 2 ranks") != std::string::npos);
    CHECK(comments(text).find("The plan checkpoints 16 of 32 layers (0,2,4,6,8,10,12,14,16,18,20,22,24,26,28,30). "
                              "Axolotl has no per-layer placement") != std::string::npos);
    CHECK(named(files, "ds_config.json").content == named(emit(plan, model, "deepspeed"), "ds_config.json").content);
    const std::set<std::string> axolotl_keys = {
        "sequence_len", "micro_batch_size", "gradient_accumulation_steps", "sample_packing", "pad_to_sequence_len",
        "bf16", "attn_implementation", "gradient_checkpointing", "gradient_checkpointing_kwargs",
        "activation_offloading", "context_parallel_size", "tiled_mlp", "tiled_mlp_num_shards", "plugins",
        "cut_cross_entropy", "liger_fused_linear_cross_entropy", "optimizer", "deepspeed", "multipack_real_batches"};
    for (const auto& kv : y) CHECK_MESSAGE(axolotl_keys.count(kv.first.as<std::string>()) == 1, kv.first.as<std::string>());
}

TEST_CASE("emit torchtitan: mst_torchtitan.py sets the plan's knobs on torchtitan 0.3.0's config") {
    ModelSpec model;
    const Plan plan = titan_plan(model);
    const auto files = emit(plan, model, "torchtitan");
    REQUIRE(files.size() == 1);
    const std::string& py = named(files, "mst_torchtitan.py").content;
    // torchtitan's own Llama-3 code: its "8B" flavor (dim 4096, 32 layers, vocabulary 128256)
    CHECK(has_line(py, "from torchtitan.models.llama3.config_registry import llama3_8b as base_config"));
    CHECK(has_line(py, "    config.model_spec = model_registry(\"8B\")"));
    CHECK(has_line(py, "    config.hf_assets_path = \"./assets/hf/Meta-Llama-3-8B\""));
    CHECK(has_line(py, "    config.training.seq_len = 32768"));
    // the model's own RoPE (Llama-3-8B: theta 500000, no scaling; torchtitan's 8B flavor scales by 8)
    CHECK(has_line(py, "        layer.attention.rope = dataclasses.replace(layer.attention.rope, theta=500000.0, "
                       "scaling=\"none\")"));
    // its per-layer RoPE tables: 32 layers x 32768 positions x complex64 [64] = 512 MiB
    CHECK(has_line(py, "ROPE_TABLE_BYTES = 536870912  # per GPU, beyond the prediction"));
    CHECK(has_line(py, "    config.training.disable_cuda_graphs = True  # (a captured step keeps its own memory pool)"));
    CHECK(has_line(py, "    config.training.local_batch_size = 1"));
    CHECK(has_line(py, "    config.training.global_batch_size = 8"));  // 1 x 1 accumulation x dp 8
    CHECK(has_line(py, "    config.training.dtype = \"float32\""));    // bf16-master: fp32 parameters
    CHECK(has_line(py, "    config.parallelism.data_parallel_replicate_degree = 1"));
    CHECK(has_line(py, "    config.parallelism.data_parallel_shard_degree = 8"));
    CHECK(has_line(py, "    config.parallelism.fsdp_reshard_after_forward = \"never\""));  // ZeRO-2
    CHECK(has_line(py, "    config.parallelism.tensor_parallel_degree = 1"));
    CHECK(has_line(py, "    config.activation_checkpoint = FullAC.Config()"));
    CHECK(has_line(py, "    config.loss = ChunkedLossWrapper.Config(num_chunks=2, "
                       "loss_fn=CrossEntropyLoss.Config(global_vocab_size=128256))"));
    CHECK(has_line(py, "    config.optimizer.implementation = \"fused\""));
    CHECK(has_line(py, "    PYTHONPATH=. torchrun --nproc_per_node=8 -m torchtitan.train --module mst_torchtitan "
                       "--config mst_plan"));

    // ZeRO-3 reshards after forward; ZeRO-0 is DDP; pure bf16 is training.dtype bfloat16.
    Plan p = plan;
    p.setup.zero_stage = 3;
    CHECK(has_line(titan_module(p, model), "    config.parallelism.fsdp_reshard_after_forward = \"default\""));
    p.setup.zero_stage = 0;
    p.setup.precision = Precision::AmpFp32;
    const std::string ddp = titan_module(p, model);
    CHECK(has_line(ddp, "    config.parallelism.data_parallel_replicate_degree = 8"));
    CHECK(has_line(ddp, "    config.parallelism.data_parallel_shard_degree = 1"));
    CHECK(ddp.find("fsdp_reshard_after_forward") == std::string::npos);
    p.setup.precision = Precision::PureBf16;
    p.setup.state_dtype.reset();  // bf16 states
    p.setup.checkpoint = parse_checkpoint_spec("none", 32, "t");
    p.setup.lm_chunks = 1;
    const std::string pure = titan_module(p, model);
    CHECK(has_line(pure, "    config.training.dtype = \"bfloat16\""));
    CHECK(has_line(pure, "    config.activation_checkpoint = None"));
    CHECK(has_line(pure, "    config.loss = CrossEntropyLoss.Config(global_vocab_size=128256)"));
}

TEST_CASE("emit torchtitan: the model is torchtitan's own where a flavor has its shape, else the transformers backend") {
    ModelSpec model;
    Plan plan = titan_plan(model);
    auto module_for = [&](const std::string& name) {
        const ModelSpec m = find_model(name);
        Plan p = plan;
        p.model = name;
        p.setup.checkpoint = parse_checkpoint_spec("none", m.num_layers, "t");
        p.setup.lm_chunks = 1;
        return titan_module(p, m);
    };
    // torchtitan/models/llama3: 1B is dim 2048 x 16 layers; qwen3: 30B-A3B is dim 2048 x 48 layers
    const std::string llama1b = module_for("llama-3.2-1b");
    CHECK(has_line(llama1b, "    config.model_spec = model_registry(\"1B\")"));
    CHECK(has_line(llama1b, "        layer.attention.rope = dataclasses.replace(layer.attention.rope, theta=500000.0, "
                            "scaling=\"llama\", scaling_factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, "
                            "original_max_position_embeddings=8192)"));
    const std::string qwen = module_for("qwen3-30b-a3b");
    CHECK(has_line(qwen, "from torchtitan.models.qwen3 import model_registry"));
    CHECK(has_line(qwen, "    config.model_spec = model_registry(\"30B-A3B\")"));
    // Llama-2 (vocabulary 32000) and Mistral have no flavor: the backend loads the HF repository.
    const std::string llama2 = module_for("llama-2-7b");
    CHECK(has_line(llama2, "from torchtitan.experiments.transformers_modeling_backend import model_registry"));
    CHECK(has_line(llama2, "    config.hf_model = \"meta-llama/Llama-2-7b-hf\""));
    CHECK(has_line(module_for("mistral-7b-v0.1"), "    config.hf_model = \"mistralai/Mistral-7B-v0.1\""));
    // expert parallelism: torchtitan takes its ep ranks from the FSDP ones
    Plan ep = plan;
    ep.model = "qwen3-30b-a3b";
    ep.setup.checkpoint = parse_checkpoint_spec("all", 48, "t");
    ep.setup.ep = 8;
    const std::string qwen_ep = titan_module(ep, find_model("qwen3-30b-a3b"));
    CHECK(has_line(qwen_ep, "    config.parallelism.data_parallel_shard_degree = 8"));
    CHECK(has_line(qwen_ep, "    config.parallelism.expert_parallel_degree = 8"));
    CHECK(qwen_ep.find("on 8 x h100-sxm-80gb (dp 8 x sp 1, ep 8), seq") != std::string::npos);  // (the header says it)
    ep.setup.moe_imbalance = 1.5;  // (and the routing it assumes, where not uniform)
    CHECK(titan_module(ep, find_model("qwen3-30b-a3b")).find("(dp 8 x sp 1, ep 8, imbalance 1.5)") != std::string::npos);
    CHECK(has_line(qwen, "    config.parallelism.expert_parallel_degree = 1"));
    const std::string mixtral = module_for("mixtral-8x7b");
    CHECK(has_line(mixtral, "    config.model_spec.model = HFTransformerModel.Config(model_config=TitanMoeModelConfig())"));
    CHECK(has_line(mixtral, "    config.loss = CrossEntropyLoss.Config()"));
    // A flavor matches only with every dimension: Llama-3-8B's width, depth and vocabulary with
    // twice its MLP is another model, which the backend loads by its repository.
    ModelSpec wider = find_model("llama-3-8b");
    wider.intermediate_size *= 2;
    Plan w = plan;
    w.setup.lm_chunks = 1;
    const std::string wide = titan_module(w, wider);
    CHECK(has_line(wide, "    config.model_spec = model_registry(\"full\")"));
    CHECK(has_line(wide, "    config.hf_model = \"meta-llama/Meta-Llama-3-8B\""));
    // Beyond a flavor's RoPE table (Qwen3: 40960 positions) torchtitan refuses the run: the
    // module lengthens the table.
    Plan long_qwen = plan;
    long_qwen.setup.seq_len = 65536;
    long_qwen.setup.checkpoint = parse_checkpoint_spec("none", 36, "t");
    long_qwen.setup.lm_chunks = 1;
    const std::string qwen_long = titan_module(long_qwen, find_model("qwen3-8b"));
    CHECK(has_line(qwen_long, "        layer.attention.rope = dataclasses.replace(layer.attention.rope, theta=1000000.0, "
                              "scaling=\"none\", max_seq_len=65536)"));
    // Qwen3's tables: fp32 cos|sin [S, 2 x 128] in each of 36 layers = 36 x 65536 x 1 KiB
    CHECK(has_line(qwen_long, "ROPE_TABLE_BYTES = 2415919104  # per GPU, beyond the prediction"));
    CHECK(titan_module(plan, model).find("max_seq_len") == std::string::npos);  // 32k: within Llama-3's 131072
    // The transformers backend computes its rotary embedding per forward: no tables, no RoPE lines.
    CHECK(wide.find("ROPE_TABLE_BYTES") == std::string::npos);
    CHECK(wide.find("dataclasses") == std::string::npos);
    // A config.json with no Hugging Face source cannot name the backend's model.
    ModelSpec anonymous = find_model("mistral-7b-v0.1");
    anonymous.source_url.clear();
    Plan p = plan;
    p.setup.lm_chunks = 1;
    CHECK(error_of(p, anonymous, "torchtitan").rfind("torchtitan: model: expected a model whose config.json names its "
                                                       "Hugging Face repository", 0) == 0);
}

TEST_CASE("emit torchtitan: what torchtitan 0.3.0 cannot train as planned is refused, naming the knob") {
    ModelSpec model;
    const Plan plan = titan_plan(model);
    auto refused = [&](auto mutate) {
        Plan p = plan;
        mutate(p.setup);
        const std::string msg = error_of(p, model, "torchtitan");
        CHECK(msg.find('\n') == std::string::npos);
        return msg;
    };
    CHECK(refused([](TrainingSetup& s) { s.mlp_chunks = 4; }).rfind("torchtitan: setup.mlp_chunks: expected 1", 0) == 0);
    CHECK(refused([](TrainingSetup& s) { s.lm_impl = LmHeadImpl::Recompute; })
              .rfind("torchtitan: setup.lm_impl: expected fused with lm_chunks > 1", 0) == 0);
    // ChunkedLossWrapper's torch._check: each rank's sequence a multiple of the chunks
    CHECK(refused([](TrainingSetup& s) { s.seq_len = 1000, s.lm_chunks = 16; })
              .rfind("torchtitan: setup.lm_chunks: expected a divisor of each rank's sequence (1000 tokens", 0) == 0);
    CHECK(refused([](TrainingSetup& s) { s.checkpoint = parse_checkpoint_spec("first:8", 32, "t"); })
              .rfind("torchtitan: setup.checkpoint: expected none or all 32 layers", 0) == 0);
    CHECK(refused([](TrainingSetup& s) { s.offload_checkpoints = true; })
              .rfind("torchtitan: setup.offload_checkpoints: ", 0) == 0);
    CHECK(refused([](TrainingSetup& s) { s.sp = 2, s.dp = 4; }).rfind("torchtitan: setup.sp: expected 1", 0) == 0);
    CHECK(refused([](TrainingSetup& s) { s.zero_stage = 1; }).rfind("torchtitan: setup.zero_stage: expected 0, 2 or 3", 0) == 0);
    CHECK(refused([](TrainingSetup& s) { s.optimizer = Optimizer::SgdMomentum; })
              .rfind("torchtitan: setup.optimizer: expected adamw", 0) == 0);
    CHECK(refused([](TrainingSetup& s) { s.precision = Precision::PureBf16, s.state_dtype = StateDtype::Fp32; })
              .rfind("torchtitan: setup.optimizer_state_dtype: expected bf16 with precision pure-bf16", 0) == 0);
    // the transformers backend runs HF's model: no chunked loss
    Plan p = plan;
    p.model = "mistral-7b-v0.1";
    CHECK(error_of(p, find_model("mistral-7b-v0.1"), "torchtitan").rfind("torchtitan: setup.lm_chunks: expected 1 for mistral", 0) == 0);
    // what the backend cannot build, as torchtitan's parallelize_hf_transformers raises it on the referee: Gemma's
    // scaled embedding, Phi-3's fused qkv_proj (Phi-4 is a phi3 model too)
    p.setup.lm_chunks = 1;
    p.setup.checkpoint.clear();  // (valid for any depth)
    for (const char* name : {"gemma-2-9b", "gemma-3-1b"})
        CHECK(error_of(p, find_model(name), "torchtitan").find("ScaledWordEmbedding: local_map is set but in_dst_shardings "
                                                              "is missing entries for: ['input_ids']") != std::string::npos);
    // torchtitan's MoE, which the backend builds in fp32 inside parallelize, beside a pure-bf16 model's layers
    Plan moe = p;
    moe.setup.precision = Precision::PureBf16, moe.setup.state_dtype = StateDtype::Bf16;
    CHECK(error_of(moe, find_model("mixtral-8x7b"), "torchtitan")
              .rfind("torchtitan: setup.precision: expected fp32 parameters (bf16-master or amp) for mixtral-8x7b", 0) == 0);
    moe.setup.precision = Precision::Bf16Master, moe.setup.state_dtype = StateDtype::Fp32;
    CHECK(titan_module(moe, find_model("mixtral-8x7b")).find("model_registry(\"full_moe\")") != std::string::npos);
    for (const char* name : {"phi-3-mini-4k", "phi-4"})
        CHECK(error_of(p, find_model(name), "torchtitan")
                  .rfind("torchtitan: model: expected a model torchtitan 0.3.0 can parallelize; its transformers backend "
                         "cannot build phi3 (ValueError: Phi3Attention: no recognized query projection",
                         0) == 0);
}

TEST_CASE("emit: checkpoint placement is exact where the trainer can say it, all layers where it cannot") {
    ModelSpec model;
    Plan plan = golden_plan(model);

    plan.setup.checkpoint = parse_checkpoint_spec("all", 32, "t");
    CHECK(axolotl_config(plan, model)["gradient_checkpointing"].as<bool>());
    CHECK(named(emit(plan, model, "axolotl"), "axolotl.yaml").content.find("per-layer") == std::string::npos);

    plan.setup.checkpoint = parse_checkpoint_spec("none", 32, "t");
    CHECK_FALSE(axolotl_config(plan, model)["gradient_checkpointing"].as<bool>());
    CHECK_FALSE(axolotl_config(plan, model)["gradient_checkpointing_kwargs"]);
    CHECK_FALSE(ds_config(plan, model).contains("activation_checkpointing"));

    plan.setup.checkpoint = parse_checkpoint_spec("first:8", 32, "t");
    CHECK(ds_config(plan, model)["activation_checkpointing"]["number_checkpoints"] == 8);
}

TEST_CASE("emit: offload, 8-bit AdamW and no sequence parallelism") {
    ModelSpec model;
    Plan plan = golden_plan(model);
    plan.setup.offload_checkpoints = true;
    // Axolotl checkpoints and offloads every layer: with 16 of 32 planned it would hold twice the
    // plan's host memory.
    CHECK(error_of(plan, model, "axolotl").rfind("axolotl: setup.checkpoint: expected all 32 layers with "
                                                "offload_checkpoints", 0) == 0);
    plan.setup.checkpoint = parse_checkpoint_spec("all", model.num_layers, "t");
    plan.setup.optimizer = Optimizer::AdamW8bit;
    plan.setup.sp = 1;
    plan.setup.dp = 8;

    const auto ds = ds_config(plan, model);
    CHECK(ds["activation_checkpointing"]["cpu_checkpointing"] == true);
    CHECK_FALSE(ds.contains("optimizer"));  // DeepSpeed has no bitsandbytes type: the client brings it
    CHECK(ds["zero_allow_untested_optimizer"] == true);
    CHECK_FALSE(ds.contains("sequence_parallel_size"));
    CHECK(ds["train_batch_size"] == 32);  // 1 x 4 x 8

    const YAML::Node y = axolotl_config(plan, model);
    // Axolotl's checkpoint-input offload; `true` would be TRL's offloader of every saved tensor.
    CHECK(y["activation_offloading"].as<std::string>() == "hidden_states");
    CHECK_FALSE(y["gradient_checkpointing_kwargs"]["use_reentrant"].as<bool>());
    CHECK(y["optimizer"].as<std::string>() == "adamw_bnb_8bit");
    CHECK_FALSE(y["context_parallel_size"]);
    plan.setup.attention = Attention::Eager;  // data parallelism only: Axolotl takes eager attention
    CHECK(axolotl_config(plan, model)["attn_implementation"].as<std::string>() == "eager");

    CHECK(named(emit(plan, model, "hf-mst"), "mst_config.json").content.find("\"offload_checkpoints\": true") !=
          std::string::npos);
}

TEST_CASE("emit deepspeed: torch's SGD under ZeRO carries DeepSpeed's untested-optimizer flag") {
    ModelSpec model;
    Plan plan = golden_plan(model);
    plan.setup.optimizer = Optimizer::SgdMomentum;
    const auto zero2 = ds_config(plan, model);
    CHECK(zero2["optimizer"]["type"] == "SGD");
    // engine.py asserts zero_allow_untested_optimizer for an optimizer outside ZeRO's tested list
    CHECK(zero2["zero_allow_untested_optimizer"] == true);
    plan.setup.zero_stage = 0;  // no ZeRO optimizer wraps it
    CHECK_FALSE(ds_config(plan, model).contains("zero_allow_untested_optimizer"));
}

TEST_CASE("emit axolotl: packed micro-batches keep their rows, ZeRO-3 checkpoints reentrantly, MoE experts are not tiled") {
    ModelSpec model;
    Plan plan = golden_plan(model);
    CHECK_FALSE(axolotl_config(plan, model)["multipack_real_batches"]);  // one row: nothing to keep apart
    plan.setup.micro_batch = 2;
    // Unset, flash attention packs both sequences into one row of 2 x 65536 tokens, which
    // DeepSpeed Ulysses (built for micro_batch_size rows) refuses.
    CHECK(axolotl_config(plan, model)["multipack_real_batches"].as<bool>());
    plan.setup.padded = true;  // padded rows are [micro_batch, seq_len] already
    CHECK_FALSE(axolotl_config(plan, model)["multipack_real_batches"]);

    // ZeRO-3: reentrant checkpointing, Axolotl's own default there (normalize_config).
    CHECK_FALSE(axolotl_config(plan, model)["gradient_checkpointing_kwargs"]["use_reentrant"].as<bool>());
    plan.setup.zero_stage = 3;
    CHECK(axolotl_config(plan, model)["gradient_checkpointing_kwargs"]["use_reentrant"].as<bool>());

    // Axolotl's tiled_mlp patches the dense MLP class: Mixtral has none, Qwen3-MoE's experts skip it.
    for (const char* name : {"mixtral-8x7b", "qwen3-30b-a3b"}) {
        const ModelSpec moe = find_model(name);
        TrainingSetup s = plan.setup;
        s.checkpoint = parse_checkpoint_spec("all", moe.num_layers, "t");
        CHECK_THROWS_WITH_AS(check_expressible("axolotl", s, moe),
                             "axolotl: setup.mlp_chunks: expected 1 for a Mixture-of-Experts model (Axolotl's "
                             "tiled_mlp tiles the dense MLP class, not the experts), got 8",
                             UserError);
        s.mlp_chunks = 1;
        CHECK_NOTHROW(check_expressible("axolotl", s, moe));
    }
}

TEST_CASE("emit: precision maps to each trainer's own mechanism") {
    ModelSpec model;
    Plan plan = golden_plan(model);

    plan.setup.precision = Precision::PureBf16;  // states default to bf16
    plan.setup.state_dtype.reset();
    auto ds = ds_config(plan, model);
    CHECK(ds["bf16"]["bf16_master_weights_and_grads"] == true);
    CHECK(ds["bf16"]["bf16_optimizer_states"] == true);

    // Pure bf16 without ZeRO needs no DeepSpeed under Axolotl: one file, plain DDP...
    plan.setup.zero_stage = 0;
    CHECK(error_of(plan, model, "deepspeed").rfind("deepspeed: setup.precision: ", 0) == 0);
    // ...but Ulysses does: without deepspeed: Axolotl's context_parallel_size is the ringmaster
    // plugin's (its own choice of Ulysses, ring or both): sp is refused, with DeepSpeed's reason.
    REQUIRE(plan.setup.sp == 2);
    CHECK(error_of(plan, model, "axolotl")
              .rfind("axolotl: setup.sp: expected 1, or a setup DeepSpeed accepts (Axolotl runs sp > 1 as DeepSpeed "
                     "Ulysses), got 2; deepspeed: setup.precision: ",
                     0) == 0);
    plan.setup.sp = 1, plan.setup.dp = 8;
    const auto files = emit(plan, model, "axolotl");
    CHECK(files.size() == 1);
    CHECK_FALSE(YAML::Load(files.front().content)["deepspeed"]);
    // (its tiled_mlp imports DeepSpeed's TiledMLP, ds_config.json or not)
    REQUIRE(plan.setup.mlp_chunks > 1);
    CHECK(files.front().content.find("pip install \"axolotl[deepspeed]==0.21.0\"") != std::string::npos);
    const std::int64_t mlp_chunks = std::exchange(plan.setup.mlp_chunks, 1);
    CHECK(emit(plan, model, "axolotl").front().content.find("pip install \"axolotl==0.21.0\"") != std::string::npos);
    plan.setup.mlp_chunks = mlp_chunks;

    plan.setup.precision = Precision::AmpFp32;
    plan.setup.state_dtype = StateDtype::Fp32;
    ds = ds_config(plan, model);
    CHECK(ds["torch_autocast"] == nlohmann::json{{"enabled", true}, {"dtype", "bfloat16"}});
    CHECK_FALSE(ds.contains("bf16"));
    // The Trainer with --bf16 refuses a config without bf16.enabled (trainer_config_process).
    CHECK(ds["mst_plan_notes"].dump().find("run the Hugging Face Trainer without --bf16") != std::string::npos);
    CHECK(error_of(plan, model, "axolotl").rfind("axolotl: setup.precision: expected pure-bf16 or bf16-master", 0) == 0);
}

TEST_CASE("emit: what a trainer cannot train as planned is a one-line error naming the knob") {
    ModelSpec model;
    const Plan golden = golden_plan(model);
    auto refused = [&](const std::string& format, auto mutate) {
        Plan p = golden;
        mutate(p.setup);
        const std::string msg = error_of(p, model, format);
        CHECK(msg.find('\n') == std::string::npos);
        return msg;
    };
    CHECK(refused("axolotl", [](TrainingSetup& s) { s.attention = Attention::Eager; })
              .rfind("axolotl: setup.attention: expected flash with sp > 1", 0) == 0);
    const auto plain_ddp_sgd = [](TrainingSetup& s) {
        s.precision = Precision::PureBf16, s.zero_stage = 0, s.optimizer = Optimizer::SgdMomentum;
        s.sp = 1, s.dp = 8;  // (Ulysses would need DeepSpeed)
    };
    CHECK(refused("axolotl", plain_ddp_sgd).rfind("axolotl: setup.optimizer: ", 0) == 0);
    // accelerate (DeepSpeedSequenceParallelConfig) and DeepSpeed (UlyssesSPAttentionHF) refuse eager under Ulysses.
    CHECK(refused("deepspeed", [](TrainingSetup& s) { s.attention = Attention::Eager; })
              .rfind("deepspeed: setup.attention: expected flash with sp > 1", 0) == 0);
    // Axolotl hands ZeRO to DeepSpeed, so DeepSpeed's refusal is the one reported.
    CHECK(refused("axolotl", [](TrainingSetup& s) { s.state_dtype = StateDtype::Bf16; })
              .rfind("deepspeed: setup.optimizer_state_dtype: expected fp32 with precision bf16-master", 0) == 0);
    // DeepSpeed 0.19.8 keeps fp32 states beside bf16 master weights only with its CPU-offloaded optimizer.
    CHECK(refused("deepspeed", [](TrainingSetup& s) { s.precision = Precision::PureBf16, s.state_dtype = StateDtype::Fp32; })
              .rfind("deepspeed: setup.optimizer_state_dtype: expected bf16 with precision pure-bf16", 0) == 0);
    const auto in_backward = [](TrainingSetup& s) { s.grad_accum = 1, s.zero_stage = 1, s.optimizer_in_backward = true; };
    CHECK(refused("deepspeed", in_backward).rfind("deepspeed: setup.optimizer_in_backward: ", 0) == 0);
    CHECK(refused("axolotl", in_backward).rfind("axolotl: setup.optimizer_in_backward: ", 0) == 0);
    CHECK(refused("torchtitan", [](TrainingSetup& s) { s.state_dtype = StateDtype::Bf16; })
              .rfind("torchtitan: setup.optimizer_state_dtype: ", 0) == 0);
    // python/mst_hf runs a chunked loss inside lm_head's forward under ZeRO-3: its output must reach the
    // loss as it is, which a soft-capping model's forward (Gemma-2) changes.
    Plan z3 = golden;
    z3.setup.zero_stage = 3;
    REQUIRE(z3.setup.lm_chunks > 1);
    CHECK(nlohmann::json::parse(emit(z3, model, "hf-mst").at(0).content).at("zero_stage") == 3);
    const ModelSpec gemma = find_model("gemma-2-9b");
    REQUIRE(gemma.final_logit_softcapping);
    z3.setup.checkpoint.assign(static_cast<std::size_t>(gemma.num_layers), true);
    CHECK(error_of(z3, gemma, "hf-mst")
              .rfind("hf-mst: setup.lm_chunks: expected 1 with zero_stage 3 for gemma-2-9b (python/mst_hf runs the chunked "
                     "loss inside lm_head's forward under ZeRO-3, and this model's forward soft-caps that output: "
                     "final_logit_softcapping 30), got ",
                     0) == 0);
    z3.setup.lm_chunks = 1;
    CHECK_NOTHROW(emit(z3, gemma, "hf-mst"));
    // Axolotl's chunked losses (Liger, Cut Cross Entropy) read lm_head's weight outside its forward: the
    // file says what that costs; DeepSpeed's own file points to python/mst_hf's, which the plan counts.
    z3 = golden;
    z3.setup.zero_stage = 3;
    std::string yaml = emit(z3, model, "axolotl").front().content;
    for (std::size_t at; (at = yaml.find("\n# ")) != std::string::npos;) yaml.replace(at, 3, " ");  // (wrapped comments)
    CHECK(yaml.find("up to one gathered lm_head weight more than the plan counts") != std::string::npos);
    const std::string notes = nlohmann::json::parse(emit(z3, model, "deepspeed").at(0).content).at("mst_plan_notes").dump();
    CHECK(notes.find("python/mst_hf, which under ZeRO-3 computes the loss inside lm_head's forward") != std::string::npos);
    CHECK(notes.find("Liger") == std::string::npos);
    // Invalid setups are caught before any emitter sees them.
    CHECK(refused("hf-mst", [](TrainingSetup& s) { s.sp = 3; }).rfind("setup: sp: ", 0) == 0);
    // DeepSpeed's ZeRO-3 gathering options live in a ds_config.json: hf-mst and torchtitan write none
    // (review finding: hf-mst dropped them, and the plan's numbers depend on them).
    const auto deepspeed_zero3 = [](bytes_t persistence, bytes_t prefetch) {
        return [=](TrainingSetup& s) {
            s.runtime = Runtime::Hf, s.sp = 1, s.dp = 8, s.zero_stage = 3;
            s.param_persistence_threshold = persistence, s.prefetch_bucket_size = prefetch;
        };
    };
    for (const std::string format : {"hf-mst", "torchtitan"}) {
        CHECK(refused(format, deepspeed_zero3(0, kDeepSpeedPrefetchBucket))
                  .rfind(format + ": setup.param_persistence_threshold: expected DeepSpeed's default 100000 (" + format +
                             " writes no ds_config.json to hold it",
                         0) == 0);
        CHECK(refused(format, deepspeed_zero3(kDeepSpeedPersistence, 4096))
                  .rfind(format + ": setup.prefetch_bucket_size: expected DeepSpeed's default 50000000 (", 0) == 0);
    }
    Plan ds = golden;
    deepspeed_zero3(0, 4096)(ds.setup);
    CHECK_NOTHROW(emit(ds, model, "deepspeed"));  // (its file holds them)
}

TEST_CASE("emit: an unknown format is a one-line error listing the formats") {
    ModelSpec model;
    const Plan plan = golden_plan(model);
    CHECK(error_of(plan, model, "megatron") ==
          "emit: format: expected one of hf-mst, deepspeed, axolotl, torchtitan, got 'megatron'");
}

TEST_CASE("emit: bad plan files are one-line errors naming the file and the field") {
    std::random_device random;
    const fs::path dir = fs::temp_directory_path() / ("mst-plan-test-emit-" + std::to_string(random()));
    fs::create_directories(dir);
    const nlohmann::json good = nlohmann::json::parse(read_text(golden_dir() / "plan_llama3_8b.json"));
    auto load_error = [&](const std::string& name, const std::string& text) {
        const fs::path path = dir / name;
        std::ofstream(path, std::ios::binary) << text;
        const std::string msg = test::expect_user_error([&] { (void)load_plan_file(path.string()); });
        CHECK(msg.find('\n') == std::string::npos);
        CHECK(msg.rfind(path.string() + ": ", 0) == 0);
        return msg;
    };

    CHECK(test::expect_user_error([&] { (void)load_plan_file((dir / "missing.json").string()); }).find(": file: ") !=
          std::string::npos);
    const std::string dumped = good.dump();
    CHECK(load_error("truncated.json", dumped.substr(0, dumped.size() / 2)).find(": json: expected valid JSON") !=
          std::string::npos);
    nlohmann::json j = good;
    j["setup"]["micro_batch"] = "one";
    CHECK(load_error("wrong_type.json", j.dump()).find("setup: micro_batch: expected an integer") != std::string::npos);
    j = good;
    j["format"] = "mst-plan/2";
    CHECK(load_error("wrong_format.json", j.dump()).find(": format: expected \"mst-plan/1\"") != std::string::npos);
    j = good;
    j["gpus"] = 6;
    CHECK(load_error("wrong_gpus.json", j.dump()).find(": gpus: expected dp x sp = 4 x 2 = 8, got 6") !=
          std::string::npos);
    j = good;
    j.erase("model");
    CHECK(load_error("no_model.json", j.dump()).find(": model: missing") != std::string::npos);
    fs::remove_all(dir);
}

TEST_CASE("emit: a model or GPU name holding line breaks stays inside its comment in every format") {
    ModelSpec model;
    Plan plan = golden_plan(model);
    // What a hostile plan could carry: TOML and YAML lines that would set the trainer's job folder.
    plan.model = "llama\n[job]\ndump_folder = \"/\"\rdump_folder: /\r\n";
    plan.gpu = "h100\ndeepspeed: /tmp/evil.json";
    const YAML::Node y = axolotl_config(plan, model);
    CHECK_FALSE(y["dump_folder"]);
    CHECK(y["deepspeed"].as<std::string>() == "ds_config.json");
    for (const EmittedFile& f : emit(plan, model, "axolotl")) {
        if (f.name.ends_with(".json")) continue;
        // Every line is a comment, a key or a table: none starts with the injected text.
        std::istringstream lines(f.content);
        for (std::string line; std::getline(lines, line);) {
            CHECK(line.find('\r') == std::string::npos);
            CHECK_FALSE(line.starts_with("dump_folder"));
            CHECK_FALSE(line.starts_with("[job]"));
        }
    }
    // torchtitan's module: the names sit escaped in its docstring, which they cannot close; the
    // code after it is only the module's own lines.
    Plan titan = plan;
    ModelSpec titan_model;
    titan.setup = titan_plan(titan_model).setup;
    titan.model = "x\"\"\"\nimport os\nos.system('rm -rf /')\n\"\"\"\\";
    const std::string py = titan_module(titan, model);
    const std::size_t doc_end = py.find("\"\"\"", 3);
    REQUIRE(doc_end != std::string::npos);
    CHECK(py.substr(0, doc_end).find("\\\"\\\"\\\"") != std::string::npos);  // the quotes arrive escaped
    std::istringstream code(py.substr(doc_end + 3));
    for (std::string line; std::getline(code, line);) {
        CAPTURE(line);
        CHECK(titan_code_line(line));
    }
    // JSON formats carry the names as escaped strings, unchanged.
    CHECK(nlohmann::json::parse(named(emit(plan, model, "hf-mst"), "mst_config.json").content)["model"] == plan.model);
}

TEST_CASE("emit: a plan relabelled to another model or edited is refused, naming the prediction") {
    std::random_device random;
    const fs::path dir = fs::temp_directory_path() / ("mst-plan-test-relabel-" + std::to_string(random()));
    fs::create_directories(dir);
    const nlohmann::json good = nlohmann::json::parse(read_text(golden_dir() / "plan_llama3_8b.json"));
    auto error_for = [&](const nlohmann::json& j) {
        const fs::path path = dir / "plan.json";
        std::ofstream(path, std::ios::binary) << j.dump();
        return test::expect_user_error([&] { (void)load_plan_file(path.string()); });
    };
    nlohmann::json j = good;
    j["model"] = "mistral-7b-v0.1";  // same layer count and heads, other sizes: other numbers
    CHECK(error_for(j).find(": prediction.peak_allocated_bytes: expected ") != std::string::npos);
    j = good;
    j["gpu"] = "a100-80gb";  // another allocator workspace: other reserved bytes
    CHECK(error_for(j).find(": prediction.peak_") != std::string::npos);
    j = good;
    j["prediction"]["peak_reserved_bytes"] = 1;
    CHECK(error_for(j).find(": prediction.peak_reserved_bytes: expected 75942068224") != std::string::npos);
    j = good;
    j["setup"]["sequence_length"] = 4096;
    CHECK(error_for(j).find(": setup: sequence_length: unknown key; expected one of the keys this file takes (the "
                            "closest is seq_len)") != std::string::npos);
    // The time model's numbers are checked as the simulator's are (an edited throughput went into the files).
    j = good;
    j["prediction"]["tokens_per_second"] = 1e15;
    CHECK(error_for(j).find(": prediction.tokens_per_second: expected 3912.928774315865 (the time model's for model "
                            "llama-3-8b, GPU h100-sxm-80gb and this setup), got 1000000000000000") != std::string::npos);
    j = good;
    j["prediction"]["mfu"] = 0.5;
    CHECK(error_for(j).find(": prediction.mfu: expected ") != std::string::npos);
    j = good;
    j["prediction"]["usable_bytes"] = 1;
    CHECK(error_for(j).find(": prediction.usable_bytes: expected 83922780160 (the GPU profile's") != std::string::npos);
    // Fields left out, or the whole prediction: nothing recorded to check, and the numbers emitters print
    // are still the simulator's and the time model's, not zeros.
    for (const bool whole : {false, true}) {
        j = good;
        if (whole) {
            j.erase("prediction");
        } else {
            for (const char* key : {"peak_allocated_bytes", "peak_reserved_bytes", "host_bytes", "tokens_per_second"})
                j["prediction"].erase(key);
        }
        std::ofstream(dir / "plan.json", std::ios::binary) << j.dump();
        Plan p;
        CHECK_NOTHROW(p = load_plan_file((dir / "plan.json").string()));
        CHECK(p.prediction.peak_allocated_bytes == good["prediction"]["peak_allocated_bytes"].get<std::int64_t>());
        CHECK(p.prediction.peak_reserved_bytes == good["prediction"]["peak_reserved_bytes"].get<std::int64_t>());
        CHECK(p.prediction.tokens_per_second == good["prediction"]["tokens_per_second"].get<double>());
    }
    fs::remove_all(dir);
}

TEST_CASE("emit axolotl: a plan without the Trainer's bf16 forward says what its numbers leave out") {
    // Axolotl's bf16: true is the Trainer's bf16=True: without DeepSpeed, accelerate's native amp copies an
    // unchunked head's logits to fp32 (hf_trainer_bf16, which recommend --for axolotl sets)
    const ModelSpec m = find_model("llama-3.2-1b");
    Plan plan;
    plan.model = "llama-3.2-1b", plan.gpu = "h100-sxm-80gb";
    plan.setup.runtime = Runtime::Hf, plan.setup.seq_len = 8192;
    const auto noted = [&] {
        return named(emit(plan, m, "axolotl"), "axolotl.yaml").content.find("made without hf_trainer_bf16") != std::string::npos;
    };
    CHECK(noted());
    plan.setup.hf_trainer_bf16 = true;
    CHECK_FALSE(noted());
    plan.setup.hf_trainer_bf16 = false, plan.setup.runtime = Runtime::Kernels;  // (mst-plan's own kernels: no Trainer)
    CHECK_FALSE(noted());
}
