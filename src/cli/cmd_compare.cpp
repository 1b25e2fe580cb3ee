// compare: predicted vs measured memory of one step, from two timeline or measurement
// files, or from one measurement re-simulated (--run).
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "mst/compare.hpp"
#include "mst/catalog.hpp"
#include "mst/error.hpp"
#include "mst/svg.hpp"

namespace mst::cli {

namespace {

struct CompareArgs {
    std::vector<std::string> files;
    std::string run_file, svg_file, gpu = "h100-sxm-80gb";
};

// A trainer's run recorded only its peaks: compare them with the simulator's allocator peaks.
void run_compare_peaks(const GlobalOptions& g, const CompareArgs& a, const StepFile& measured) {
    const GpuProfile gpu = find_gpu(a.gpu);
    std::string note;  // a torchtitan run re-simulated as its plan predicts it, and why
    const auto rows = compare_peaks(measured, gpu, &note);
    if (g.json) {
        nlohmann::json out = nlohmann::json::array();
        for (const CompareRow& r : rows)
            out.push_back({{"label", r.label}, {"predicted", r.predicted}, {"measured", r.measured},
                           {"error", r.error()}, {"relative", relative_json(r.relative())}});
        nlohmann::json doc = {{"model", measured.timeline.model}, {"gpu", gpu.name}, {"rows", out}};
        if (!note.empty()) doc["note"] = note;
        return print_json(doc);
    }
    fmt::print("{}: predicted (simulator, {}) vs measured ({}, peaks only)\n\n", measured.timeline.model, gpu.name,
               measured.timeline.source);
    Table t({"", "predicted", "measured", "error", "relative"});
    for (const CompareRow& r : rows)
        t.row({r.label, std::to_string(r.predicted), std::to_string(r.measured), fmt::format("{:+d}", r.error()),
               relative_text(r.relative())});
    t.print();
    if (!note.empty()) fmt::print("\nnote: {}\n", note);
}

std::string describe(const std::optional<Event>& e) {
    if (!e) return "(no more events)";
    return fmt::format("{} '{}' (tensor {}) {} bytes, {}, {}, {}, micro-step {}, op {}", e->alloc ? "alloc" : "free", e->name,
                       e->tensor, e->bytes, to_string(e->category), to_string(e->phase),
                       e->layer >= 0 ? fmt::format("layer {}", e->layer) : std::string("outside the layers"),
                       e->micro_step, e->op);
}

// A torchtitan run of a kernels-runtime plan, compared twice: with the plan's prediction, then as torchtitan's step.
constexpr const char* kKernelsPlanNote =
    "the plan's runtime is kernels: its prediction is the first comparison, the run as torchtitan's own step the second";

// The rows of a comparison, then where its timelines first part (or that they do not).
void print_comparison(const Comparison& c) {
    Table t({"", "predicted", "measured", "error", "relative"});
    for (const CompareRow& r : c.rows)
        t.row({r.label, std::to_string(r.predicted), std::to_string(r.measured), fmt::format("{:+d}", r.error()),
               relative_text(r.relative())});
    t.print();
    if (c.identical()) {
        fmt::print("\ntimelines identical: every allocation and free matches\n");
    } else {
        fmt::print("\nfirst divergence at event {}:\n  predicted: {}\n  measured:  {}\n", *c.divergence,
                   describe(c.predicted_event), describe(c.measured_event));
    }
}

void run_compare(const GlobalOptions& g, const CompareArgs& a) {
    StepFile predicted, measured;
    std::string note;  // --run: a torchtitan run re-simulated as its plan predicted it, and why
    if (!a.run_file.empty()) {
        if (!a.files.empty()) fail("compare", "--run", "expected either --run MEASURED.json or two files, not both");
        measured = load_step_file(a.run_file);
        if (measured.peaks) return run_compare_peaks(g, a, measured);
        predicted.path = "simulator";
        predicted.format = "mst-timeline/1";
        predicted.timeline = predict_measured(measured, &note);
        predicted.setup_json = measured.setup_json;
    } else {
        if (a.files.size() != 2) fail("compare", "files", "expected PREDICTED.json MEASURED.json, or --run MEASURED.json");
        predicted = load_step_file(a.files[0]);
        measured = load_step_file(a.files[1]);
        if (predicted.peaks || measured.peaks)
            fail(measured.peaks ? measured.path : predicted.path, "timeline",
                 "a peaks-only measurement compares with --run FILE (it has no events to diff)");
    }
    check_same_step(predicted, measured);
    std::int64_t layers = 0;
    for (const Timeline* t : {&predicted.timeline, &measured.timeline})
        for (const Event& e : t->events) layers = std::max<std::int64_t>(layers, e.layer + 1);
    const Comparison c = compare_timelines(predicted.timeline, measured.timeline, layers);
    // --run of a torchtitan run a kernels-runtime plan made: also torchtitan's own step, where it is modelled
    std::optional<Comparison> titan;
    std::string titan_layout;  // (its FSDP2 over several ranks)
    if (!a.run_file.empty())
        if (const auto as_titan = as_torchtitan_step(measured)) {
            try {
                titan = compare_timelines(predict_measured(*as_titan), measured.timeline, layers);
            } catch (const UserError& e) {  // (the plan's own comparison stands; this one is said not to)
                note += fmt::format("; as torchtitan's own step it is not compared: {}", e.what());
            }
            const nlohmann::json s = nlohmann::json::parse(as_titan->setup_json);
            if (s.value("fsdp2", false))
                titan_layout = s.value("fsdp2_reshard_after_forward", true)
                                   ? " and fsdp2"
                                   : " and fsdp2 kept gathered from forward to backward (fsdp_reshard_after_forward never)";
        }

    OutputFiles outputs(g.json);  // (--json: the document on stdout is this command's own)
    for (const std::string& in : a.files) outputs.input(in);
    outputs.input(a.run_file);
    if (!a.svg_file.empty())
        outputs.add(a.svg_file, overlay_svg(predicted.timeline, measured.timeline,
                                        fmt::format("{}: predicted ({}) vs measured ({})", measured.timeline.model,
                                                    predicted.timeline.source, measured.timeline.source)));
    outputs.commit();
    if (g.json) {
        nlohmann::json doc = to_json(c);
        if (!note.empty()) doc["note"] = titan ? std::string(kKernelsPlanNote) : note;
        if (titan) doc["as_torchtitan_step"] = to_json(*titan);
        return print_json(doc);
    }

    fmt::print("{}: predicted ({}, {} events) vs measured ({}, {} events)\n\n", measured.timeline.model,
               predicted.timeline.source, c.predicted_events, measured.timeline.source, c.measured_events);
    print_comparison(c);
    if (titan) {  // (the plan's prediction above; the run as the step mst-plan models below)
        fmt::print("\nnote: {}\n", kKernelsPlanNote);
        fmt::print("\nas torchtitan's own step (model_code torchtitan: the same setup with runtime hf{}, as recommend --for "
                   "torchtitan plans it):\n\n",
                   titan_layout);
        print_comparison(*titan);
    } else if (!note.empty()) {
        fmt::print("\nnote: {}\n", note);
    }
}

}  // namespace

void add_compare_command(CLI::App& app, const GlobalOptions& global) {
    auto args = std::make_shared<CompareArgs>();
    auto* cmd = app.add_subcommand("compare",
                                   "Compare predicted and measured memory of one step (timeline or measure files)\n"
                                   "  mst-plan compare predicted.json run1/measured.json --svg overlay.svg\n"
                                   "  mst-plan compare --run run1/measured.json");
    cmd->add_option("files", args->files, "PREDICTED.json MEASURED.json: timelines (estimate --timeline) or measurements");
    cmd->add_option("--run", args->run_file, "Re-simulate the model and setup of this measurement and compare");
    cmd->add_option("--svg", args->svg_file, "Write both memory curves overlaid");
    cmd->add_option("--gpu", args->gpu, "GPU profile for peaks-only measurements (a trainer's run: its cuBLAS workspace "
                                        "and allocator)")
        ->capture_default_str();
    cmd->callback([&global, args] { run_compare(global, *args); });
}

}  // namespace mst::cli
