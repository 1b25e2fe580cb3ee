// emit: trainer configs written from a plan.
//
// Golden files: tests/golden/plan_llama3_8b.json is the input (written by hand; its
// prediction is what `estimate` prints for that setup), tests/golden/<format>/<file>
// the expected output, compared byte for byte. After an intended change to an
// emitter, regenerate them and review the diff before committing:
//   MST_UPDATE_GOLDEN=1 build/tests/mst_tests -tc="*golden*" && git diff tests/golden
// The other tests parse each file back with the parser its trainer uses
// (nlohmann::json, yaml-cpp, toml++) and check the plan's numbers in it.
#include <doctest/doctest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>
#include <toml++/toml.h>
#include <yaml-cpp/yaml.h>

#include "mst/emit.hpp"
#include "mst/plan.hpp"
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

std::vector<bool> layers_where(std::int64_t num_layers, bool (*pick)(std::int64_t)) {
    std::vector<bool> v(static_cast<std::size_t>(num_layers));
    for (std::int64_t i = 0; i < num_layers; ++i) v[static_cast<std::size_t>(i)] = pick(i);
    return v;
}

std::string error_of(const Plan& plan, const ModelSpec& model, const std::string& format) {
    return test::expect_user_error([&] { (void)emit(plan, model, format); });
}

nlohmann::json ds_config(const Plan& plan, const ModelSpec& model) {
    return nlohmann::json::parse(named(emit(plan, model, "deepspeed"), "ds_config.json").content);
}

toml::table titan_config(const Plan& plan, const ModelSpec& model) {
    return toml::parse(named(emit(plan, model, "torchtitan"), "torchtitan.toml").content);
}

YAML::Node axolotl_config(const Plan& plan, const ModelSpec& model) {
    return YAML::Load(named(emit(plan, model, "axolotl"), "axolotl.yaml").content);
}

}  // namespace

TEST_CASE("emit: every format matches its golden files byte for byte") {
    ModelSpec model;
    const Plan plan = golden_plan(model);
    const bool update = std::getenv("MST_UPDATE_GOLDEN") && std::string(std::getenv("MST_UPDATE_GOLDEN")) == "1";
    for (const std::string& format : emit_formats()) {
        CAPTURE(format);
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
    CHECK(j["predicted"]["tokens_per_second"] == doctest::Approx(3150.0));
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
    CHECK(y["flash_attention"].as<bool>());
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
    CHECK(comments(text).find("The plan checkpoints 16 of 32 layers (0,2,4,6,8,10,12,14,16,18,20,22,24,26,28,30). "
                              "Axolotl has no per-layer placement") != std::string::npos);
    CHECK(named(files, "ds_config.json").content == named(emit(plan, model, "deepspeed"), "ds_config.json").content);
    const std::set<std::string> axolotl_keys = {
        "sequence_len", "micro_batch_size", "gradient_accumulation_steps", "sample_packing", "pad_to_sequence_len",
        "bf16", "flash_attention", "eager_attention", "gradient_checkpointing", "gradient_checkpointing_kwargs",
        "activation_offloading", "context_parallel_size", "tiled_mlp", "tiled_mlp_num_shards", "plugins",
        "cut_cross_entropy", "liger_fused_linear_cross_entropy", "optimizer", "deepspeed"};
    for (const auto& kv : y) CHECK_MESSAGE(axolotl_keys.count(kv.first.as<std::string>()) == 1, kv.first.as<std::string>());
}

TEST_CASE("emit torchtitan: torchtitan.toml has the job-config keys and the plan's numbers") {
    ModelSpec model;
    const Plan plan = golden_plan(model);
    const auto files = emit(plan, model, "torchtitan");
    REQUIRE(files.size() == 1);
    const std::string& text = named(files, "torchtitan.toml").content;
    const toml::table t = toml::parse(text);
    CHECK(t["training"]["seq_len"].value<std::int64_t>() == 65536);
    CHECK(t["training"]["local_batch_size"].value<std::int64_t>() == 1);
    CHECK(t["training"]["global_batch_size"].value<std::int64_t>() == 16);  // 1 x 4 accumulation x 4 dp
    CHECK(t["training"]["mixed_precision_param"].value<std::string>() == "bfloat16");
    CHECK(t["optimizer"]["name"].value<std::string>() == "AdamW");
    CHECK(t["activation_checkpoint"]["mode"].value<std::string>() == "selective");
    CHECK(t["activation_checkpoint"]["selective_ac_option"].value<std::string>() == "2");
    CHECK(t["parallelism"]["data_parallel_shard_degree"].value<std::int64_t>() == 4);
    CHECK(t["parallelism"]["data_parallel_replicate_degree"].value<std::int64_t>() == 1);
    CHECK(t["parallelism"]["context_parallel_degree"].value<std::int64_t>() == 2);
    CHECK(t["parallelism"]["fsdp_reshard_after_forward"].value<std::string>() == "never");  // ZeRO-2: whole parameters through backward
    // torchtitan has no key for MsT: the comment carries the chunk counts.
    CHECK(comments(text).find("MLP in 8 mini-sequences (tiled) and the LM head + loss in 16 (recompute)") !=
          std::string::npos);
    CHECK(comments(text).find("wraps one layer in 2, counting from 1 (layers 1, 3, ...)") != std::string::npos);
}

TEST_CASE("emit: checkpoint placement is exact where the trainer can say it, all layers where it cannot") {
    ModelSpec model;
    Plan plan = golden_plan(model);
    auto titan_ac = [&] {
        const toml::table t = titan_config(plan, model);
        return t["activation_checkpoint"]["mode"].value_or(std::string()) + " " +
               t["activation_checkpoint"]["selective_ac_option"].value_or(std::string("-"));
    };

    plan.setup.checkpoint = parse_checkpoint_spec("all", 32, "t");
    CHECK(titan_ac() == "full -");
    CHECK(axolotl_config(plan, model)["gradient_checkpointing"].as<bool>());
    CHECK(named(emit(plan, model, "axolotl"), "axolotl.yaml").content.find("per-layer") == std::string::npos);

    plan.setup.checkpoint = parse_checkpoint_spec("none", 32, "t");
    CHECK(titan_ac() == "none -");
    CHECK_FALSE(axolotl_config(plan, model)["gradient_checkpointing"].as<bool>());
    CHECK_FALSE(axolotl_config(plan, model)["gradient_checkpointing_kwargs"]);
    CHECK_FALSE(ds_config(plan, model).contains("activation_checkpointing"));

    // torchtitan's own "2": layers 1, 3, ..., 31 (the 2nd, 4th, ... counting from 1).
    plan.setup.checkpoint = layers_where(32, [](std::int64_t i) { return (i + 1) % 2 == 0; });
    CHECK(titan_ac() == "selective 2");
    CHECK(named(emit(plan, model, "torchtitan"), "torchtitan.toml").content.find("wraps one layer") == std::string::npos);

    // every:4 is 0,4,...,28 = 8 layers; torchtitan's "4" wraps 3,7,...,31, also 8.
    plan.setup.checkpoint = parse_checkpoint_spec("every:4", 32, "t");
    CHECK(titan_ac() == "selective 4");
    // every:3 is 0,3,...,30 = 11 layers; torchtitan's "3" wraps only 10: all layers instead.
    plan.setup.checkpoint = parse_checkpoint_spec("every:3", 32, "t");
    CHECK(titan_ac() == "full -");
    plan.setup.checkpoint = parse_checkpoint_spec("first:8", 32, "t");
    CHECK(titan_ac() == "full -");
    CHECK(comments(named(emit(plan, model, "torchtitan"), "torchtitan.toml").content)
              .find("The plan checkpoints 8 of 32 layers (0-7); torchtitan places selective checkpoints only every "
                    "k-th layer, so every layer is") != std::string::npos);
    CHECK(ds_config(plan, model)["activation_checkpointing"]["number_checkpoints"] == 8);
}

TEST_CASE("emit: offload, 8-bit AdamW and no sequence parallelism") {
    ModelSpec model;
    Plan plan = golden_plan(model);
    plan.setup.offload_checkpoints = true;
    CHECK(comments(named(emit(plan, model, "torchtitan"), "torchtitan.toml").content)
              .find("has no activation offload, so they stay on the GPU: memory above the prediction") !=
          std::string::npos);
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
    CHECK(y["activation_offloading"].as<bool>());
    CHECK(y["optimizer"].as<std::string>() == "adamw_bnb_8bit");
    CHECK_FALSE(y["context_parallel_size"]);

    CHECK(named(emit(plan, model, "hf-mst"), "mst_config.json").content.find("\"offload_checkpoints\": true") !=
          std::string::npos);
    CHECK(error_of(plan, model, "torchtitan").rfind("torchtitan: setup.optimizer: expected adamw", 0) == 0);
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

TEST_CASE("emit: precision maps to each trainer's own mechanism") {
    ModelSpec model;
    Plan plan = golden_plan(model);

    plan.setup.precision = Precision::PureBf16;  // states default to bf16
    plan.setup.state_dtype.reset();
    auto ds = ds_config(plan, model);
    CHECK(ds["bf16"]["bf16_master_weights_and_grads"] == true);
    CHECK(ds["bf16"]["bf16_optimizer_states"] == true);
    CHECK(error_of(plan, model, "torchtitan").rfind("torchtitan: setup.precision: expected bf16-master or amp", 0) == 0);

    // Pure bf16 without ZeRO needs no DeepSpeed under Axolotl: one file, plain DDP.
    plan.setup.zero_stage = 0;
    CHECK(error_of(plan, model, "deepspeed").rfind("deepspeed: setup.precision: ", 0) == 0);
    const auto files = emit(plan, model, "axolotl");
    CHECK(files.size() == 1);
    CHECK_FALSE(YAML::Load(files.front().content)["deepspeed"]);

    plan.setup.precision = Precision::AmpFp32;
    plan.setup.state_dtype = StateDtype::Fp32;
    ds = ds_config(plan, model);
    CHECK(ds["torch_autocast"] == nlohmann::json{{"enabled", true}, {"dtype", "bfloat16"}});
    CHECK_FALSE(ds.contains("bf16"));
    // The Trainer with --bf16 refuses a config without bf16.enabled (trainer_config_process).
    CHECK(ds["mst_plan_notes"].dump().find("run the Hugging Face Trainer without --bf16") != std::string::npos);
    const toml::table t = titan_config(plan, model);
    CHECK(t["parallelism"]["data_parallel_replicate_degree"].value<std::int64_t>() == 4);  // ZeRO-0: DDP
    CHECK(t["parallelism"]["data_parallel_shard_degree"].value<std::int64_t>() == 1);
    CHECK_FALSE(t["parallelism"]["fsdp_reshard_after_forward"]);
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
    };
    CHECK(refused("axolotl", plain_ddp_sgd).rfind("axolotl: setup.optimizer: ", 0) == 0);
    // accelerate (DeepSpeedSequenceParallelConfig) and DeepSpeed (UlyssesSPAttentionHF) refuse eager under Ulysses.
    CHECK(refused("deepspeed", [](TrainingSetup& s) { s.attention = Attention::Eager; })
              .rfind("deepspeed: setup.attention: expected flash with sp > 1", 0) == 0);
    // Axolotl hands ZeRO to DeepSpeed, so DeepSpeed's refusal is the one reported.
    CHECK(refused("axolotl", [](TrainingSetup& s) { s.state_dtype = StateDtype::Bf16; })
              .rfind("deepspeed: setup.optimizer_state_dtype: expected fp32 with precision bf16-master", 0) == 0);
    const auto in_backward = [](TrainingSetup& s) { s.grad_accum = 1, s.zero_stage = 1, s.optimizer_in_backward = true; };
    CHECK(refused("deepspeed", in_backward).rfind("deepspeed: setup.optimizer_in_backward: ", 0) == 0);
    CHECK(refused("axolotl", in_backward).rfind("axolotl: setup.optimizer_in_backward: ", 0) == 0);
    CHECK(refused("torchtitan", [](TrainingSetup& s) { s.state_dtype = StateDtype::Bf16; })
              .rfind("torchtitan: setup.optimizer_state_dtype: ", 0) == 0);
    // python/mst_hf refuses a chunked LM head under ZeRO-3 (it reads lm_head's weight outside its forward).
    CHECK(refused("hf-mst", [](TrainingSetup& s) { s.zero_stage = 3; })
              .rfind("hf-mst: setup.lm_chunks: expected 1 with zero_stage 3", 0) == 0);
    // Invalid setups are caught before any emitter sees them.
    CHECK(refused("hf-mst", [](TrainingSetup& s) { s.sp = 3; }).rfind("setup: sp: ", 0) == 0);
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
    const toml::table t = titan_config(plan, model);
    CHECK_FALSE(t.contains("job"));
    std::set<std::string> tables;
    for (const auto& [key, value] : t) tables.insert(std::string(key.str()));
    CHECK(tables == std::set<std::string>{"training", "optimizer", "activation_checkpoint", "parallelism"});
    const YAML::Node y = axolotl_config(plan, model);
    CHECK_FALSE(y["dump_folder"]);
    CHECK(y["deepspeed"].as<std::string>() == "ds_config.json");
    for (const std::string format : {"axolotl", "torchtitan"})
        for (const EmittedFile& f : emit(plan, model, format)) {
            if (f.name.ends_with(".json")) continue;
            // Every line is a comment, a key or a table: none starts with the injected text.
            std::istringstream lines(f.content);
            for (std::string line; std::getline(lines, line);) {
                CHECK(line.find('\r') == std::string::npos);
                CHECK_FALSE(line.starts_with("dump_folder"));
                CHECK_FALSE(line.starts_with("[job]"));
            }
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
    j = good;
    j["prediction"].erase("peak_allocated_bytes");
    j["prediction"].erase("peak_reserved_bytes");
    j["prediction"].erase("host_bytes");
    std::ofstream(dir / "plan.json", std::ios::binary) << j.dump();
    CHECK_NOTHROW((void)load_plan_file((dir / "plan.json").string()));  // nothing recorded, nothing to check
    fs::remove_all(dir);
}
