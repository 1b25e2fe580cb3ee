// A measurement or timeline file (compare, report): parse_step_file, the views compare prints, and
// the re-simulation `compare --run` does.
#include <algorithm>

#include "fuzz_support.hpp"
#include "mst/catalog.hpp"
#include "mst/compare.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    static const mst::GpuProfile gpu = mst::find_gpu("h100-sxm-80gb");
    return mst::fuzz::run(data, size, [](const nlohmann::json& j) {
        const mst::StepFile f = mst::parse_step_file(j, "fuzz/measured.json");
        std::int64_t layers = 0;
        for (const mst::Event& e : f.timeline.events) layers = std::max<std::int64_t>(layers, e.layer + 1);
        mst::check_same_step(f, f);
        const mst::Comparison self = mst::compare_timelines(f.timeline, f.timeline, layers);
        mst::fuzz::require(self.identical() && self.peak_error() == 0, "a timeline equals itself");
        (void)mst::to_json(self).dump();
        (void)mst::replay_caching_allocator(f.timeline, mst::AllocatorConstants{});
        if (f.setup_json.empty()) return;
        if (f.peaks) {
            (void)mst::compare_peaks(f, gpu);
        } else {
            const mst::Timeline predicted = mst::predict_measured(f);
            (void)mst::compare_timelines(predicted, f.timeline, layers);
        }
    });
}
