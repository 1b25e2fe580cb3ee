// emit: a plan (mst-plan/1 JSON) written as the config files of a trainer.
#include <filesystem>

#include <fmt/format.h>
#include <fmt/ranges.h>  // fmt::join
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "mst/emit.hpp"
#include "mst/error.hpp"

namespace mst::cli {

namespace {

struct EmitArgs {
    std::string plan_file, format, out_dir;
};

void run_emit(const GlobalOptions& g, const EmitArgs& a) {
    ModelSpec model;
    const Plan plan = load_plan_file(a.plan_file, &model);
    for (const auto& w : model.warnings) warn(fmt::format("{}: {}", model.source, w));
    const std::vector<EmittedFile> files = emit(plan, model, a.format);
    // The Hugging Face trainers run transformers' model, which the hf runtime predicts; a plan of mst-plan's
    // own kernels (--runtime kernels) carries their smaller numbers into the files (recommend --for says it too).
    // Said once the files stand: a failing command says one line.
    const auto caution = [&] {
        // A step over the GPU (a setup written or edited by hand, with no prediction to name the edit; or one
        // kept over the budget on purpose, as the validation matrices do): its files would not train.
        if (const Prediction& x = plan.prediction; x.peak_reserved_bytes > x.usable_bytes)
            warn(fmt::format("{}: setup: this step does not fit the GPU: the simulator predicts {} reserved of the {} a "
                             "process can use on {}; the trainer will run out of memory (recommend writes setups that fit)",
                             a.plan_file, format_bytes(x.peak_reserved_bytes), format_bytes(x.usable_bytes), plan.gpu));
        if (plan.setup.runtime == Runtime::Kernels && a.format != "torchtitan")
            warn(fmt::format("{}: setup.runtime: the numbers are mst-plan's own kernels' (runtime kernels), not those of "
                             "the Hugging Face model {} trains, which allocates more: plan with --runtime hf (the default) "
                             "for them",
                             a.plan_file, a.format == "hf-mst" ? "python/mst_hf" : a.format));
    };

    if (a.out_dir.empty()) {
        if (files.size() != 1) {
            std::vector<std::string> names;
            for (const auto& f : files) names.push_back(f.name);
            fail("command line", "out",
                 fmt::format("expected a directory (--out DIR): format {} writes {} files for this plan ({})", a.format,
                             files.size(), fmt::join(names, ", ")));
        }
        fmt::print("{}", files.front().content);
        return caution();
    }

    OutputFiles outputs(g.json);  // (--json: the document on stdout is this command's own)
    outputs.input(a.plan_file);
    outputs.make_directory(a.out_dir);
    std::vector<std::string> written;
    for (const auto& f : files) {
        const std::string path = (std::filesystem::path(a.out_dir) / f.name).string();
        outputs.add(path, f.content);
        written.push_back(path);
    }
    outputs.commit();
    caution();
    if (g.json) return print_json({{"files", written}});
    for (const auto& p : written) fmt::print("{}\n", p);
}

}  // namespace

void add_emit_command(CLI::App& app, const GlobalOptions& global) {
    auto args = std::make_shared<EmitArgs>();
    auto* cmd = app.add_subcommand("emit",
                                   "Write a plan as the config files of a trainer\n"
                                   "  mst-plan emit --plan plan.json --format deepspeed > ds_config.json\n"
                                   "  mst-plan emit --plan plan.json --format axolotl --out configs/");
    cmd->add_option("--plan", args->plan_file, "Plan file (mst-plan/1 JSON, as recommend --out writes)")->required();
    cmd->add_option("--format", args->format, fmt::format("Trainer format: {}", fmt::join(emit_formats(), " | ")))
        ->required();
    cmd->add_option("--out", args->out_dir,
                    "Write the files into this directory (created if missing) and print their paths; "
                    "without it a one-file format prints the file");
    cmd->callback([&global, args] { run_emit(global, *args); });
}

}  // namespace mst::cli
