// mst-plan: plan memory and mini-sequence settings for long-context LLM training.
#include <cstdio>
#include <exception>

#include <fmt/format.h>

#include "commands.hpp"
#include "mst/error.hpp"
#include "mst/execute.hpp"

int main(int argc, char** argv) {
    using namespace mst::cli;
    CLI::App app{
        "mst-plan: predicts, op by op, the GPU memory of a long-context training step and the Mini-Sequence\n"
        "Transformer settings (mini-sequence counts, checkpointing, offload, parallelism) that make it fit.\n\n"
        "Examples:\n"
        "  mst-plan models\n"
        "  mst-plan gpus\n"
        "  mst-plan show llama-3-8b\n"
        "  mst-plan show path/to/config.json --json\n"
        "  mst-plan estimate --model llama-3-8b --gpu a100-80gb --seq 8192 --checkpoint all --mlp-chunks 4 --lm-chunks 16\n"
        "  mst-plan measure --backend cpu --model tiny-llama --seq 256 --mlp-chunks 4 --out run1\n"
        "  mst-plan compare --run run1/measured.json\n",
        "mst-plan"};
    app.set_version_flag("--version", std::string("mst-plan ") + MST_VERSION);
    app.require_subcommand(1);
    app.fallthrough();
    GlobalOptions global;
    app.add_flag("--json", global.json, "Print JSON instead of tables");

    add_catalog_commands(app, global);
    add_estimate_command(app, global);
    add_tuner_commands(app, global);
    add_emit_command(app, global);
    add_bench_commands(app, global);
    add_measure_command(app, global);
    add_compare_command(app, global);
    add_report_command(app, global);

    try {
        app.parse(argc, argv);
    } catch (const CLI::CallForHelp& e) {
        return app.exit(e);
    } catch (const CLI::CallForAllHelp& e) {
        return app.exit(e);
    } catch (const CLI::CallForVersion& e) {
        return app.exit(e);
    } catch (const CLI::ParseError& e) {
        // Usage mistakes: one line and exit code 2, like every other user error.
        fmt::print(stderr, "error: {}\nRun with --help for usage.\n", e.what());
        return 2;
    } catch (const mst::OutOfMemoryError& e) {  // a real step that did not fit (measure)
        fmt::print(stderr, "error: {}\n", e.what());
        return 4;
    } catch (const mst::UserError& e) {
        fmt::print(stderr, "error: {}\n", e.what());
        return 2;
    } catch (const std::exception& e) {
        fmt::print(stderr, "internal error (please report): {}\n", e.what());
        return 3;
    }
    return 0;
}
