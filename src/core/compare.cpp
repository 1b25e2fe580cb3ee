#include "mst/compare.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <filesystem>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "json_read.hpp"
#include "mst/catalog.hpp"
#include "mst/error.hpp"
#include "mst/limits.hpp"
#include "mst/simulate.hpp"

namespace mst {

namespace {
constexpr const char* kTimelineFormat = "mst-timeline/1";
}  // namespace

bool same_event(const Event& a, const Event& b, bool names) {
    return a.alloc == b.alloc && a.tensor == b.tensor && a.bytes == b.bytes && a.category == b.category &&
           a.device == b.device && a.phase == b.phase && a.layer == b.layer && a.micro_step == b.micro_step &&
           (!names || (a.op == b.op && a.name == b.name));
}

namespace {

// Frees with no allocation between them leave the same memory whatever their order (the
// caching allocator merges the same free blocks), and PyTorch frees some in no fixed order: the
// autocast cache is a hash map, and DeepSpeed's ZeRO-3 releases a module's parameters in the order
// of a Python set of them (hashed by object address: docs/deepspeed-zero3-model.md, 5.1), at a hook
// or among the leftovers after backward. In a run of frees, those frees (the simulator names them)
// may trade places among themselves, compared as a set in tensor order; every other free keeps its
// place.
std::size_t free_run_end(const std::vector<Event>& events, std::size_t i) {
    while (i < events.size() && !events[i].alloc) ++i;
    return i;
}

bool unordered_free(const Event& e) {
    return e.name == "autocast_weight" || e.op == "zero3.release" || e.op == "deepspeed.epilogue";
}

// A side from the referee names no free; a simulator side must name the free at the same place.
bool same_free_runs(const Timeline& p, const Timeline& m, std::size_t from, std::size_t to, bool names) {
    const std::vector<Event>&a = p.events, &b = m.events;
    const auto copy = [](const Timeline& t, const Event& e) { return t.source == "referee" || unordered_free(e); };
    std::vector<const Event*> x, y;
    for (std::size_t i = from; i < to; ++i) {
        const bool named = unordered_free(a[i]) || unordered_free(b[i]);
        if (named && copy(p, a[i]) && copy(m, b[i])) {
            x.push_back(&a[i]), y.push_back(&b[i]);
        } else if (!same_event(a[i], b[i], names)) {
            return false;
        }
    }
    const auto by_tensor = [](const Event* e, const Event* f) { return e->tensor < f->tensor; };
    std::sort(x.begin(), x.end(), by_tensor);
    std::sort(y.begin(), y.end(), by_tensor);
    for (std::size_t i = 0; i < x.size(); ++i)
        if (!same_event(*x[i], *y[i], names)) return false;
    return true;
}

}  // namespace

std::optional<std::int64_t> first_divergence(const Timeline& predicted, const Timeline& measured) {
    const bool names = predicted.source != "referee" && measured.source != "referee";
    const std::size_t n = std::min(predicted.events.size(), measured.events.size());
    for (std::size_t i = 0; i < n; ++i) {
        if (same_event(predicted.events[i], measured.events[i], names)) continue;
        if (!predicted.events[i].alloc && !measured.events[i].alloc) {
            const std::size_t end = free_run_end(predicted.events, i);
            if (end == free_run_end(measured.events, i) && same_free_runs(predicted, measured, i, end, names)) {
                i = end - 1;
                continue;
            }
        }
        return static_cast<std::int64_t>(i);
    }
    if (predicted.events.size() != measured.events.size()) return static_cast<std::int64_t>(n);
    return std::nullopt;
}

double CompareRow::relative() const {
    if (predicted == 0) return measured == 0 ? 0.0 : std::copysign(std::numeric_limits<double>::infinity(), static_cast<double>(measured));
    return static_cast<double>(error()) / static_cast<double>(predicted);
}

std::string relative_text(double relative, const char* unit) {
    return std::isfinite(relative) ? fmt::format("{:+.3f}{}", 100.0 * relative, unit) : std::string("n/a (predicted 0)");
}

nlohmann::json relative_json(double relative) {
    return std::isfinite(relative) ? nlohmann::json(relative) : nlohmann::json(nullptr);
}

Comparison compare_timelines(const Timeline& predicted, const Timeline& measured, std::int64_t num_layers) {
    const Summary p = summarize(predicted, num_layers), m = summarize(measured, num_layers);
    Comparison c;
    c.rows.push_back({"peak", p.peak.bytes, m.peak.bytes});
    for (int i = 0; i < kPhaseCount; ++i) {
        const auto k = static_cast<std::size_t>(i);
        if (p.phase_seen[k] || m.phase_seen[k])
            c.rows.push_back({"phase " + to_string(static_cast<Phase>(i)), p.phase_peak[k], m.phase_peak[k]});
    }
    for (int i = 0; i < kCategoryCount; ++i) {
        const auto k = static_cast<std::size_t>(i);
        if (p.category_max[k] || m.category_max[k])
            c.rows.push_back({"category " + to_string(static_cast<Category>(i)), p.category_max[k], m.category_max[k]});
    }
    if (p.host_peak || m.host_peak) c.rows.push_back({"host peak", p.host_peak, m.host_peak});
    c.rows.push_back({"end (persistent)", p.end_bytes, m.end_bytes});
    c.predicted_events = static_cast<std::int64_t>(predicted.events.size());
    c.measured_events = static_cast<std::int64_t>(measured.events.size());
    c.divergence = first_divergence(predicted, measured);
    if (c.divergence) {
        const auto i = static_cast<std::size_t>(*c.divergence);
        if (i < predicted.events.size()) c.predicted_event = predicted.events[i];
        if (i < measured.events.size()) c.measured_event = measured.events[i];
    }
    return c;
}

namespace {
nlohmann::json event_json(const std::optional<Event>& e) {
    if (!e) return nullptr;
    return {{"kind", e->alloc ? "alloc" : "free"}, {"tensor", e->tensor},     {"bytes", e->bytes},
            {"category", to_string(e->category)},  {"device", to_string(e->device)}, {"phase", to_string(e->phase)},
            {"layer", e->layer},                   {"micro_step", e->micro_step}, {"op", e->op},
            {"name", e->name}};
}
}  // namespace

nlohmann::json to_json(const Comparison& c) {
    nlohmann::json rows = nlohmann::json::array();
    for (const CompareRow& r : c.rows)
        rows.push_back({{"label", r.label},
                        {"predicted_bytes", r.predicted},
                        {"measured_bytes", r.measured},
                        {"error_bytes", r.error()},
                        {"relative_error", relative_json(r.relative())}});
    nlohmann::json j = {{"rows", rows},
                        {"predicted_events", c.predicted_events},
                        {"measured_events", c.measured_events},
                        {"identical", c.identical()}};
    if (c.divergence)
        j["first_divergence"] = {{"index", *c.divergence},
                                 {"predicted", event_json(c.predicted_event)},
                                 {"measured", event_json(c.measured_event)}};
    else
        j["first_divergence"] = nullptr;
    return j;
}

// ---- files ---------------------------------------------------------------------------

namespace {
// A GPU run's device block of a measurement: what the CUDA backend saw.
nlohmann::json device_json(const DeviceReport& d) {
    return {{"device", d.device},
            {"allocator", d.allocator},
            {"recorder", d.recorder},
            {"timeline_note", d.timeline_note},
            {"from_cupti", d.from_cupti},
            {"dropped_records", d.dropped_records},
            {"unmatched_records", d.unmatched_records},
            {"size_mismatches", d.size_mismatches},
            {"matches_executor_log", d.matches_executor_log},
            {"first_difference", d.first_difference},
            {"peak_allocated_bytes", d.peak_allocated},
            {"peak_reserved_bytes", d.peak_reserved},
            {"used_before_bytes", d.used_before},
            {"used_after_bytes", d.used_after},
            {"total_bytes", d.total},
            {"kernels", d.kernels},
            {"kernel_seconds", d.kernel_seconds}};
}
}  // namespace

nlohmann::json measurement_json(const MeasuredStep& step, const std::string& backend, const ModelSpec& model,
                                const TrainingSetup& setup, std::uint64_t seed, bytes_t workspace_bytes) {
    const Summary s = summarize(step.timeline, model.num_layers);
    nlohmann::json phases = nlohmann::json::object(), categories = nlohmann::json::object();
    for (int i = 0; i < kPhaseCount; ++i)
        if (s.phase_seen[static_cast<std::size_t>(i)])
            phases[to_string(static_cast<Phase>(i))] = s.phase_peak[static_cast<std::size_t>(i)];
    for (int i = 0; i < kCategoryCount; ++i)
        categories[to_string(static_cast<Category>(i))] = s.category_max[static_cast<std::size_t>(i)];
    nlohmann::json ops = nlohmann::json::array();
    for (const auto& [op, seconds] : step.op_seconds) ops.push_back({op, seconds});
    nlohmann::json device = nullptr;
    if (step.device) {
        device = device_json(*step.device);
    }
    return {{"format", kMeasureFormat},
            {"backend", backend},
            {"device", device},
            {"model", model.name},
            {"model_path", model.source},
            {"seed", seed},
            {"workspace_bytes", workspace_bytes},
            {"setup", to_json(setup)},
            {"timeline", to_json(step.timeline)},
            {"summary",
             {{"peak_bytes", s.peak.bytes},
              {"phase_peak_bytes", phases},
              {"category_max_bytes", categories},
              {"host_peak_bytes", s.host_peak},
              {"persistent_bytes", s.end_bytes},
              {"loss", step.loss},
              {"wall_seconds", step.wall_seconds},
              {"op_seconds", ops}}}};
}

StepFile parse_step_file(const nlohmann::json& j, const std::string& path) {
    detail::JsonReader r(j, path);
    StepFile f;
    f.path = path;
    f.format = r.one_of("format", {kTimelineFormat, kMeasureFormat});
    if (f.format == kTimelineFormat) {
        f.timeline = timeline_from_json(j, path);  // its reader rejects unknown keys
        return f;
    }
    // Every key a measurement may hold: measure's (cpu, cuda), a trainer's (scripts/torch_crosscheck.py:
    // the run's name, its hf-mst config, notes, the plan's prediction, an error and its detail) and
    // the referee's (a full timeline).
    // (not read here, but of their writers' types: a field of another kind is a file something else wrote)
    // (measure's --seed is unsigned: up to 2^64 - 1)
    if (r.has("seed") && !r.raw("seed").is_number_unsigned())
        r.fail("seed", fmt::format("expected an integer in [0, 2^64 - 1], got {}", detail::shown(r.raw("seed"))));
    (void)r.opt_string("run"), (void)r.opt_string("hf_config_source");
    for (const char* key : {"hf_mst", "prediction", "error_detail"})
        if (r.has(key)) (void)r.object(key);
    if (r.has("notes") && !(r.raw("notes").is_array() &&
                            std::all_of(r.raw("notes").begin(), r.raw("notes").end(), [](const auto& n) { return n.is_string(); })))
        r.fail("notes", fmt::format("expected a list of strings, got {}", detail::shown(r.raw("notes"))));
    // (a run that failed recorded no step to compare: its error is what it holds)
    if (auto error = r.opt_string("error"))
        r.fail("error", fmt::format("expected none: this run failed ({}) and recorded no step", printable(*error)));
    const std::string backend = r.one_of("backend", {"cpu", "cuda", "torch", "referee"});
    f.backend = backend;
    if (!r.has("timeline")) {
        // A trainer's run (torch): no events, the model, the setup and the summary's peaks.
        if (!r.has("summary")) r.fail("summary", "expected the run's peaks (this run recorded none: out of memory?)");
        auto s = r.object("summary");
        f.peaks = MeasuredPeaks{s.integer("peak_allocated_bytes", 0, limits::kBytes),
                                s.integer("peak_reserved_bytes", 0, limits::kBytes)};
        // (the caching allocator's segments hold every block it hands out)
        if (f.peaks->reserved < f.peaks->allocated)
            s.fail("peak_reserved_bytes", fmt::format("expected at least peak_allocated_bytes ({}), got {}", f.peaks->allocated,
                                                      f.peaks->reserved));
        f.timeline.source = backend;
        f.timeline.model = r.string("model");
    } else {
        f.timeline = timeline_from_json(r.raw("timeline"), path + ": timeline");
        if (auto model = r.opt_string("model"); model && *model != f.timeline.model)
            r.fail("model", fmt::format("expected the timeline's model '{}', got '{}'", f.timeline.model, *model));
        if (r.has("summary")) (void)r.object("summary");
    }
    auto setup = r.raw("setup");
    if (!setup.is_object()) r.fail("setup", fmt::format("expected the setup object measure wrote, got {}", detail::shown(setup)));
    // Measurements written before the runtime knob existed: the executors (cpu, cuda) run
    // mst-plan's kernels, a trainer's run (torch) and the referee run Hugging Face's code.
    if (!setup.contains("runtime") || setup.at("runtime").is_null())  // (null reads as absent, as every key's)
        setup["runtime"] = to_string(backend == "cpu" || backend == "cuda" ? Runtime::Kernels : Runtime::Hf);
    f.setup_json = setup.dump();
    f.model_path = r.string("model_path");
    f.workspace_bytes = r.integer("workspace_bytes", 0, limits::kBytes);
    if (r.has("device")) {
        auto d = r.object("device");
        f.device = d.opt_string("device").value_or("");
        f.allocator = d.opt_string("allocator").value_or("");
        f.device_peak_reserved = d.opt_integer("peak_reserved_bytes", 0, limits::kBytes);
        const nlohmann::json written = device_json(DeviceReport{});  // the keys measure writes
        for (const auto& item : written.items()) d.known({item.key().c_str()});
        d.reject_unknown();
    }
    r.reject_unknown();
    return f;
}

StepFile load_step_file(const std::string& path) { return parse_step_file(detail::read_json_file(path), path); }

void check_same_step(const StepFile& predicted, const StepFile& measured) {
    const std::string both = predicted.path + " vs " + measured.path;
    if (predicted.timeline.model != measured.timeline.model)
        fail(both, "model", fmt::format("expected the same model, got '{}' and '{}'", predicted.timeline.model,
                                        measured.timeline.model));
    if (predicted.timeline.micro_steps != measured.timeline.micro_steps)
        fail(both, "micro_steps", fmt::format("expected the same gradient accumulation, got {} and {}",
                                              predicted.timeline.micro_steps, measured.timeline.micro_steps));
    if (!predicted.setup_json.empty() && !measured.setup_json.empty() && predicted.setup_json != measured.setup_json) {
        // Both were dumped from objects the readers already bounded: parsing them back cannot fail.
        const auto p = nlohmann::json::parse(predicted.setup_json), m = nlohmann::json::parse(measured.setup_json);
        std::string keys;
        for (const auto& [key, value] : p.items())
            if (!m.contains(key) || m[key] != value) keys += (keys.empty() ? "" : ", ") + key;
        fail(both, "setup", fmt::format("expected the same setup, they differ in {}", keys.empty() ? "their keys" : keys));
    }
}

namespace {

// The config a measurement ran, looked up where this checkout has it first: a file of that name
// beside the measurement or in a folder above it (a config committed with results measured
// elsewhere), then the catalog's models folder, then model_path as recorded (a file on the machine
// that measured); "" when none exists (the caller then asks the catalog for the model's name).
std::string resolve_model_path(const StepFile& measured) {
    namespace fs = std::filesystem;
    if (measured.model_path.empty()) return "";
    std::error_code ec;
    const fs::path name = fs::path(measured.model_path).filename();
    for (fs::path dir = fs::absolute(measured.path, ec).parent_path(); !dir.empty(); dir = dir.parent_path()) {
        if (fs::is_regular_file(dir / name, ec)) return (dir / name).string();
        if (dir == dir.parent_path()) break;
    }
    if (fs::is_regular_file(data_dir() / "models" / name, ec)) return (data_dir() / "models" / name).string();
    if (fs::is_regular_file(measured.model_path, ec)) return measured.model_path;
    return "";
}

// The model a measurement names and the setup it recorded, as written (not yet validated).
std::pair<ModelSpec, TrainingSetup> recorded_step(const StepFile& measured) {
    const std::string path = resolve_model_path(measured);
    ModelSpec model = find_model(path.empty() ? measured.timeline.model : path);
    // The config found by its model_path must be the model the measurement names (compare holds both
    // timelines to one model: a relabelled measurement is refused there, and here).
    if (model.name != measured.timeline.model)
        fail(measured.path, "model", fmt::format("expected the model its model_path holds ('{}'), got {}", model.name,
                                                 in_quotes(measured.timeline.model)));
    TrainingSetup setup = parse_setup(nlohmann::json::parse(measured.setup_json), model, measured.path + ": setup");
    return {std::move(model), std::move(setup)};
}

}  // namespace

std::pair<ModelSpec, TrainingSetup> measured_step(const StepFile& measured, std::string* note) {
    if (measured.setup_json.empty()) fail(measured.path, "format", "expected a measurement (mst-measure/1) to re-simulate");
    auto recorded = recorded_step(measured);  // (named references: a lambda below captures them)
    ModelSpec& model = recorded.first;
    TrainingSetup& setup = recorded.second;
    if (setup.model_code == ModelCode::Torchtitan) {  // (the titan referee's record of torchtitan's own model code)
        std::string why = setup.runtime == Runtime::Hf ? "" : "the plan's runtime is kernels";
        if (why.empty()) {
            try {
                validate_titan_scope(setup, model);
            } catch (const UserError& e) {
                why = e.what();
            }
        }
        if (!why.empty()) {
            setup.model_code = ModelCode::Transformers;
            if (note)
                *note = fmt::format("torchtitan's own step is not modelled for this run ({}): re-simulated as the plan "
                                    "predicts it",
                                    why);
        }
    }
    in_file(measured.path, [&] { validate(setup, model); });
    return recorded;
}

std::optional<StepFile> as_torchtitan_step(const StepFile& measured) {
    if (measured.setup_json.empty() || measured.peaks) return std::nullopt;
    auto recorded = recorded_step(measured);
    const ModelSpec& model = recorded.first;
    TrainingSetup& setup = recorded.second;
    if (setup.model_code != ModelCode::Torchtitan || setup.runtime != Runtime::Kernels) return std::nullopt;
    setup.runtime = Runtime::Hf;
    // (torchtitan's FSDP2 fully sharding over several ranks: ZeRO 2 is its fsdp_reshard_after_forward never)
    if (setup.dp > 1 && (setup.zero_stage == 2 || setup.zero_stage == 3)) {
        setup.fsdp2 = true;
        setup.fsdp2_reshard_after_forward = setup.zero_stage == 3;
        setup.zero_stage = 3;
    }
    if (titan_scope_refusal(setup, model)) return std::nullopt;
    try {
        validate(setup, model);
    } catch (const UserError&) {
        return std::nullopt;
    }
    StepFile titan = measured;
    titan.setup_json = to_json(setup).dump();
    return titan;
}

Timeline predict_measured(const StepFile& measured, std::string* note) {
    const auto [model, setup] = measured_step(measured, note);
    GpuProfile gpu;  // only the fixed workspace shapes the timeline
    gpu.name = "measured";
    gpu.calibration.cublas_workspace_bytes = measured.workspace_bytes;
    // a measured rank (ring attention's, DeepSpeed's) is compared with that rank's step
    if (measured.timeline.rank < 0 && setup.deepspeed_zero() && setup.dp > 1)
        fail(measured.path, "timeline.rank", fmt::format("expected the rank whose step was measured (DeepSpeed's {} ranks "
                                                         "differ: python -m mst_referee.deepspeed_zero writes it)",
                                                         setup.dp));
    if (measured.timeline.rank < 0 && setup.fsdp2_shards() && !walked_ranks(setup, model).empty())
        fail(measured.path, "timeline.rank", fmt::format("expected the rank whose step was measured (FSDP2's {} ranks hold "
                                                         "shards of other lengths for {}: the referee writes it)",
                                                         setup.dp, model.name));
    if (measured.timeline.rank >= 0) {
        const std::vector<std::int64_t> ranks = walked_ranks(setup, model);
        // (ranks the setup's runtime holds alike, such as a torchtitan run's FSDP ranks that the kernels runtime
        // planned: any one's step)
        const bool alike = ranks.empty() && !setup.deepspeed_engine() && !setup.fsdp2_shards();
        const std::int64_t all = checked_mul(setup.dp, setup.sp, "dp x sp");
        if (alike && measured.timeline.rank < all) return simulate(model, setup, gpu);
        if (!walks_rank(setup, model, measured.timeline.rank))
            fail(measured.path, "timeline.rank",
                 fmt::format("expected one of the setup's ranks ({}), got {}",
                             setup.deepspeed_zero3() ? fmt::format("0 .. {}: alike", setup.zero_ranks() - 1)
                             : setup.fsdp2_shards()  ? fmt::format("0 .. {}", setup.zero_ranks() - 1)
                             : ranks.empty()         ? fmt::format("0 .. {}: alike", all - 1)
                                                     : fmt::format("0 .. {}", ranks.size() - 1),
                             measured.timeline.rank));
        return simulate_rank(model, setup, gpu, measured.timeline.rank);
    }
    return simulate(model, setup, gpu);
}

std::vector<CompareRow> compare_peaks(const StepFile& measured, const GpuProfile& gpu, std::string* note) {
    if (!measured.peaks) fail(measured.path, "timeline", "expected a peaks-only measurement (\"timeline\": null)");
    const auto [model, setup] = measured_step(measured, note);
    const MemoryPeaks p = simulate_peaks(model, setup, gpu, true, gpu.usable_bytes());  // as the GPU holds it
    return {CompareRow{"peak allocated", p.peak_allocated_bytes, measured.peaks->allocated},
            CompareRow{"peak reserved", p.peak_reserved_bytes, measured.peaks->reserved}};
}

}  // namespace mst
