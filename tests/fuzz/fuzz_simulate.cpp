// simulate on any setup that validates: {"model": catalog name or config.json object, "gpu":
// catalog name or profile object, "setup": {...}}. The simulator's two paths (recorded timeline and
// running peaks) must agree, and its numbers must be the sizes of memory.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "fuzz_support.hpp"
#include "mst/catalog.hpp"
#include "mst/simulate.hpp"
#include "mst/timemodel.hpp"

namespace {

template <class T, class Parse, class Find>
T pick(const nlohmann::json& j, const char* key, const std::vector<std::string>& names, const std::string& fallback,
       Parse parse, Find find) {
    if (!j.contains(key)) return find(fallback);
    const nlohmann::json& v = j[key];
    if (v.is_object()) return parse(v);
    // Only catalog names: the fuzzer does not get to open paths.
    if (v.is_string() && std::find(names.begin(), names.end(), v.get<std::string>()) != names.end())
        return find(v.get<std::string>());
    return find(fallback);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    static const std::vector<std::string> models = mst::model_names(), gpus = mst::gpu_names();
    return mst::fuzz::run(data, size, [](const nlohmann::json& j) {
        mst::detail::JsonReader r(j, "fuzz.json");  // an object
        const mst::ModelSpec m = pick<mst::ModelSpec>(
            j, "model", models, "tiny-llama", [](const nlohmann::json& v) { return mst::parse_model(v, "model", "fuzz"); },
            [](const std::string& n) { return mst::find_model(n); });
        const mst::GpuProfile gpu = pick<mst::GpuProfile>(
            j, "gpu", gpus, "h100-sxm-80gb", [](const nlohmann::json& v) { return mst::parse_gpu(v, "gpu", "fuzz"); },
            [](const std::string& n) { return mst::find_gpu(n); });
        const mst::TrainingSetup s =
            mst::parse_setup(j.contains("setup") ? j["setup"] : nlohmann::json::object(), m, "setup");
        mst::validate(s, m);

        const mst::Estimate e = mst::estimate(m, s, gpu);
        mst::check_consistent(e.timeline);
        // both on the device: the allocator model releases its cache at the usable memory
        const mst::MemoryPeaks fast = mst::simulate_peaks(m, s, gpu, true, gpu.usable_bytes());
        const mst::MemoryPeaks quick = mst::simulate_peaks(m, s, gpu, false);
        using mst::fuzz::require;
        require(fast.peak_bytes == e.summary.peak.bytes, "running peak = the timeline's peak");
        require(quick.peak_bytes == e.summary.peak.bytes, "peaks without the allocator = the timeline's peak");
        require(fast.host_peak_bytes == e.summary.host_peak, "running host peak = the timeline's host peak");
        require(fast.peak_allocated_bytes == e.allocator.peak_allocated, "running allocated peak = the replay's");
        require(fast.peak_reserved_bytes == e.allocator.peak_reserved, "running reserved peak = the replay's");
        require(fast.segments_released == e.allocator.segments_released, "segments released = the replay's");
        require(0 <= e.summary.peak.bytes && e.summary.peak.bytes <= e.allocator.peak_allocated &&
                    e.allocator.peak_allocated <= e.allocator.peak_reserved,
                "0 <= requested <= allocated <= reserved");
        const mst::StepTime t = mst::predict_time(m, s, gpu, mst::ClusterShape{});
        require(std::isfinite(t.step_seconds) && t.step_seconds > 0, "a step takes a finite positive time");
    });
}
