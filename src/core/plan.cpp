#include "mst/plan.hpp"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "json_read.hpp"
#include "mst/catalog.hpp"
#include "mst/error.hpp"
#include "mst/limits.hpp"
#include "mst/simulate.hpp"
#include "mst/timemodel.hpp"

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
              {"releases_at_budget", r.releases_at_budget},
              {"host_bytes", r.host_bytes},
              {"step_seconds", r.step_seconds},
              {"tokens_per_second", r.tokens_per_second},
              {"mfu", r.mfu}}},
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
    in_file(where, [&] { validate(p.setup, model); });
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
        x.releases_at_budget = q.opt_integer("releases_at_budget", 0, limits::kBytes).value_or(0);
        x.host_bytes = q.opt_integer("host_bytes", 0, kMax).value_or(0);
        x.step_seconds = q.opt_number("step_seconds", 0, 1e12).value_or(0);
        x.tokens_per_second = q.opt_number("tokens_per_second", 0, 1e15).value_or(0);
        x.mfu = q.opt_number("mfu", 0, 1).value_or(0);
        (void)q.opt_string("peak_at");  // (written by older versions, never filled in: read and dropped)
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
    // The numbers emitters print are the simulator's and the time model's for this model, GPU and
    // setup, whatever the file holds; a prediction it records must be theirs: a plan relabelled to
    // another model or GPU, edited, or written by another version is refused. (The headroom is the
    // search's, under its margin and --for: not derived here, and printed by no emitter.)
    // Memory as the GPU holds it: the allocator model releases its cache at the usable memory (estimate's).
    const MemoryPeaks memory = simulate_peaks(model, p.setup, gpu, true, gpu.usable_bytes());
    const StepTime time = predict_time(model, p.setup, gpu);
    Prediction derived = p.prediction;
    derived.peak_allocated_bytes = memory.peak_allocated_bytes;
    derived.peak_reserved_bytes = memory.peak_reserved_bytes;
    derived.host_bytes = memory.host_peak_bytes;
    derived.usable_bytes = gpu.usable_bytes();
    derived.step_seconds = time.step_seconds;
    derived.tokens_per_second = time.tokens_per_second;
    derived.mfu = time.mfu;
    if (r.has("prediction")) {
        const Prediction& x = p.prediction;
        const auto recorded_fields = r.object("prediction");
        // (a recorded number is what recommend wrote: JSON gives the same double back)
        auto check = [&](const char* field, auto recorded, auto derived_value, const char* by) {
            if (recorded_fields.has(field) && recorded != derived_value)
                mst::fail(path, fmt::format("prediction.{}", field),
                          fmt::format("expected {} ({} for model {}, GPU {} and this setup), got {}: the plan was edited "
                                      "or written by another version; run recommend again",
                                      derived_value, by, p.model, p.gpu, recorded));
        };
        constexpr const char* kSimulator = "the simulator's";
        constexpr const char* kTimeModel = "the time model's";
        check("peak_allocated_bytes", x.peak_allocated_bytes, derived.peak_allocated_bytes, kSimulator);
        check("peak_reserved_bytes", x.peak_reserved_bytes, derived.peak_reserved_bytes, kSimulator);
        check("host_bytes", x.host_bytes, derived.host_bytes, kSimulator);
        check("usable_bytes", x.usable_bytes, derived.usable_bytes, "the GPU profile's");
        check("step_seconds", x.step_seconds, derived.step_seconds, kTimeModel);
        check("tokens_per_second", x.tokens_per_second, derived.tokens_per_second, kTimeModel);
        check("mfu", x.mfu, derived.mfu, kTimeModel);
    }
    p.prediction = derived;
    if (model_out) *model_out = model;
    return p;
}

}  // namespace mst
