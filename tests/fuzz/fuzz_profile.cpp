// A GPU profile (--gpu FILE.json): parse_gpu with unknown keys refused and every number bounded.
#include "fuzz_support.hpp"
#include "mst/gpu.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    return mst::fuzz::run(data, size, [](const nlohmann::json& j) {
        const mst::GpuProfile g = mst::parse_gpu(j, "fuzz.json", "fuzz");
        mst::fuzz::require(g.usable_bytes() > 0, "a parsed profile leaves a process some memory");
        (void)mst::to_json(g).dump();
    });
}
