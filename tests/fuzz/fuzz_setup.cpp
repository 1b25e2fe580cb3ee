// A setup file (--setup): parse_setup against two catalog models, validate, and the round trip
// through to_json that plans and measurements rely on.
#include "fuzz_support.hpp"
#include "mst/catalog.hpp"
#include "mst/setup.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    static const mst::ModelSpec models[] = {mst::find_model("tiny-llama"), mst::find_model("gemma-2-2b")};
    return mst::fuzz::run(data, size, [](const nlohmann::json& j) {
        for (const mst::ModelSpec& m : models) {
            try {
                const mst::TrainingSetup s = mst::parse_setup(j, m, "fuzz.json");
                mst::validate(s, m);
                const mst::TrainingSetup back = mst::parse_setup(mst::to_json(s), m, "back");
                mst::fuzz::require(mst::to_json(back) == mst::to_json(s), "a valid setup round-trips through to_json");
            } catch (const mst::UserError&) {
            }
        }
    });
}
