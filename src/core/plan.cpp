#include "mst/plan.hpp"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "json_read.hpp"
#include "mst/catalog.hpp"
#include "mst/error.hpp"
#include "mst/limits.hpp"
#include "mst/simulate.hpp"

namespace mst {

namespace {
constexpr const char* kPlanFormat = "mst-plan/1";
}

nlohmann::json to_json(const Plan& p) {
    const Prediction& r = p.prediction;
    return {{"format", kPlanFormat},
            {"model", p.model},
            {"gpu", p.gpu},
            {"gpus", p.gpus},
            {"setup", to_json(p.setup)},
            {"prediction",
             {{"peak_allocated_bytes", r.peak_allocated_bytes},
              {"peak_reserved_bytes", r.peak_reserved_bytes},
              {"usable_bytes", r.usable_bytes},
              {"headroom_bytes", r.headroom_bytes},
              {"host_bytes", r.host_bytes},
              {"step_seconds", r.step_seconds},
              {"tokens_per_second", r.tokens_per_second},
              {"mfu", r.mfu},
              {"peak_at", r.peak_at}}},
            {"why", p.why}};
}

Plan plan_from_json(const nlohmann::json& j, const ModelSpec& model, const std::string& where) {
    detail::JsonReader r(j, where);
    if (r.string("format") != kPlanFormat) r.fail("format", fmt::format("expected \"{}\"", kPlanFormat));
    Plan p;
    p.model = r.string("model");
    p.gpu = r.string("gpu");
    p.gpus = r.integer("gpus", 1, limits::kGpus);
    p.setup = parse_setup(r.raw("setup"), model, where + ": setup");
    validate(p.setup, model);
    if (p.gpus != p.setup.dp * p.setup.sp)
        r.fail("gpus", fmt::format("expected dp x sp = {} x {} = {}, got {}", p.setup.dp, p.setup.sp,
                                   p.setup.dp * p.setup.sp, p.gpus));
    if (r.has("prediction")) {
        auto q = r.object("prediction");
        constexpr std::int64_t kMax = limits::kBytes;
        Prediction& x = p.prediction;
        x.peak_allocated_bytes = q.opt_integer("peak_allocated_bytes", 0, kMax).value_or(0);
        x.peak_reserved_bytes = q.opt_integer("peak_reserved_bytes", 0, kMax).value_or(0);
        x.usable_bytes = q.opt_integer("usable_bytes", 0, kMax).value_or(0);
        x.headroom_bytes = q.opt_integer("headroom_bytes", -kMax, kMax).value_or(0);
        x.host_bytes = q.opt_integer("host_bytes", 0, kMax).value_or(0);
        x.step_seconds = q.opt_number("step_seconds", 0, 1e12).value_or(0);
        x.tokens_per_second = q.opt_number("tokens_per_second", 0, 1e15).value_or(0);
        x.mfu = q.opt_number("mfu", 0, 1).value_or(0);
        x.peak_at = q.opt_string("peak_at").value_or("");
        q.reject_unknown();
    }
    p.why = r.opt_string("why").value_or("");
    r.reject_unknown();
    return p;
}

Plan load_plan_file(const std::string& path, ModelSpec* model_out) {
    const nlohmann::json j = detail::read_json_file(path);
    detail::JsonReader r(j, path);
    for (const char* key : {"model", "gpu"})
        if (r.string(key).empty()) r.fail(key, "expected a catalog name or a path to a .json file, got ''");
    const ModelSpec model = find_model(r.string("model"));
    const GpuProfile gpu = find_gpu(r.string("gpu"));
    Plan p = plan_from_json(j, model, path);
    // The numbers emitters print must be the simulator's for this model, GPU and setup: a plan
    // relabelled to another model or GPU, edited, or written by another version is refused.
    if (r.has("prediction")) {
        // as the GPU holds it: the allocator model releases its cache at the usable memory (estimate's)
        const MemoryPeaks memory = simulate_peaks(model, p.setup, gpu, true, gpu.usable_bytes());
        const Prediction& x = p.prediction;
        const auto recorded_fields = r.object("prediction");
        auto check = [&](const char* field, bytes_t recorded, bytes_t simulated) {
            if (recorded_fields.has(field) && recorded != simulated)
                mst::fail(path, fmt::format("prediction.{}", field),
                          fmt::format("expected {} (the simulator's for model {}, GPU {} and this setup), got {}: the plan "
                                      "was edited or written by another version; run recommend again",
                                      simulated, p.model, p.gpu, recorded));
        };
        check("peak_allocated_bytes", x.peak_allocated_bytes, memory.peak_allocated_bytes);
        check("peak_reserved_bytes", x.peak_reserved_bytes, memory.peak_reserved_bytes);
        check("host_bytes", x.host_bytes, memory.host_peak_bytes);
    }
    if (model_out) *model_out = model;
    return p;
}

}  // namespace mst
