// A Hugging Face config.json: parse_model (unknown fields ignored, every read field bounded), then
// what the catalog commands compute from it.
#include "fuzz_support.hpp"
#include "mst/model.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    return mst::fuzz::run(data, size, [](const nlohmann::json& j) {
        const mst::ModelSpec m = mst::parse_model(j, "fuzz.json", "fuzz");
        const mst::ParameterCounts p = m.parameters();
        mst::fuzz::require(p.total() > 0 && m.layer_parameters() > 0, "a parsed model has parameters");
        mst::fuzz::require(static_cast<std::int64_t>(m.sliding_layers.size()) == m.num_layers, "one sliding flag per layer");
        (void)mst::to_json(m).dump();
    });
}
