// bench: benchmarks that print ratios against their targets. Each subcommand lives with its
// subject: `bench tuner` in cmd_recommend.cpp, `bench kernels` in cmd_bench_kernels.cpp.
#include "commands.hpp"

namespace mst::cli {

void add_bench_commands(CLI::App& app, const GlobalOptions& global) {
    auto* bench = app.add_subcommand("bench", "Benchmarks that print ratios against their targets");
    bench->require_subcommand(1);
    add_bench_tuner_command(*bench, global);
    add_bench_kernels_command(*bench, global);
}

}  // namespace mst::cli
