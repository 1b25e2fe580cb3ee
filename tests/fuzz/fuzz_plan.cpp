// A plan (emit --plan): plan_from_json, then every emitter. What they write must parse as the
// format it claims, and no string of the plan may add a key or table of its own (injection).
#include <algorithm>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <sstream>
#ifndef MST_NO_YAML
#include <yaml-cpp/yaml.h>
#endif

#include "fuzz_support.hpp"
#include "mst/catalog.hpp"
#include "mst/emit.hpp"
#include "mst/plan.hpp"

namespace {

// The model a plan names when it is a catalog entry (a fuzzer's path is not opened), else tiny-llama.
const mst::ModelSpec& model_for(const nlohmann::json& j) {
    static const std::vector<std::string> names = mst::model_names();
    static std::map<std::string, mst::ModelSpec> cache;
    std::string name = "tiny-llama";
    if (j.is_object() && j.contains("model") && j["model"].is_string() &&
        std::find(names.begin(), names.end(), j["model"].get<std::string>()) != names.end())
        name = j["model"].get<std::string>();
    auto it = cache.find(name);
    if (it == cache.end()) it = cache.emplace(name, mst::find_model(name)).first;
    return it->second;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    return mst::fuzz::run(data, size, [](const nlohmann::json& j) {
        const mst::ModelSpec& model = model_for(j);
        const mst::Plan plan = mst::plan_from_json(j, model, "fuzz.json");
        for (const std::string& format : mst::emit_formats()) {
            std::vector<mst::EmittedFile> files;
            try {
                files = mst::emit(plan, model, format);
            } catch (const mst::UserError&) {
                continue;  // a trainer that cannot train the plan says so
            }
            for (const mst::EmittedFile& f : files) {
                if (f.name.ends_with(".json")) {
                    const nlohmann::json parsed = nlohmann::json::parse(f.content);  // throws (a finding) when not JSON
                    mst::fuzz::require(parsed.is_object(), "a JSON config is an object");
                } else if (f.name.ends_with(".py")) {
                    // torchtitan's module: one docstring (the plan's strings escaped inside it), then
                    // only the module's own imports and assignments.
                    mst::fuzz::require(f.content.starts_with("\"\"\""), "mst_torchtitan.py opens with its docstring");
                    const std::size_t end = f.content.find("\"\"\"", 3);
                    mst::fuzz::require(end != std::string::npos, "mst_torchtitan.py closes its docstring");
                    std::istringstream code(f.content.substr(end + 3));
                    for (std::string line; std::getline(code, line);)
                        mst::fuzz::require(
                            line.empty() || line.starts_with("from torchtitan.") || line == "import dataclasses" ||
                                line.starts_with("ROPE_TABLE_BYTES = ") || line == "def mst_plan():" ||
                                line.starts_with("    config") || line.starts_with("    #") || line == "    return config" ||
                                line == "    for layer in config.model_spec.model.layers:" ||
                                line.starts_with("        layer.attention.rope = dataclasses.replace(layer.attention.rope, "
                                                 "theta="),
                            "mst_torchtitan.py holds only its own code after the docstring");
                } else {
#ifndef MST_NO_YAML
                    const YAML::Node y = YAML::Load(f.content);
                    const std::set<std::string> allowed{
                        "sequence_len", "micro_batch_size", "gradient_accumulation_steps", "sample_packing",
                        "pad_to_sequence_len", "bf16", "attn_implementation", "gradient_checkpointing",
                        "gradient_checkpointing_kwargs", "activation_offloading", "context_parallel_size", "tiled_mlp",
                        "tiled_mlp_num_shards", "plugins", "liger_fused_linear_cross_entropy", "cut_cross_entropy",
                        "optimizer", "deepspeed", "multipack_real_batches"};
                    for (const auto& kv : y)
                        mst::fuzz::require(allowed.count(kv.first.as<std::string>()) == 1, "axolotl.yaml holds only its keys");
#endif
                }
            }
        }
    });
}
