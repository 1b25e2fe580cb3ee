#pragma once
// Each subcommand registers itself on the app; its callback calls one library
// function and prints the result. No business logic lives in the CLI.
#include <CLI/CLI.hpp>

#include "output.hpp"

namespace mst::cli {

void add_catalog_commands(CLI::App& app, const GlobalOptions& global);  // models, gpus, show, devices
void add_estimate_command(CLI::App& app, const GlobalOptions& global);
void add_tuner_commands(CLI::App& app, const GlobalOptions& global);  // recommend, max-seq
void add_emit_command(CLI::App& app, const GlobalOptions& global);
void add_measure_command(CLI::App& app, const GlobalOptions& global);  // run a step on a backend
void add_compare_command(CLI::App& app, const GlobalOptions& global);  // predicted vs measured
void add_report_command(CLI::App& app, const GlobalOptions& global);   // the validation table
void add_bench_commands(CLI::App& app, const GlobalOptions& global);  // bench tuner, bench cli, bench kernels

// The `bench` subcommands, each registered on the `bench` parent by the file that owns it.
void add_bench_tuner_command(CLI::App& bench, const GlobalOptions& global);    // cmd_recommend.cpp
void add_bench_kernels_command(CLI::App& bench, const GlobalOptions& global);  // cmd_bench_kernels.cpp
void add_bench_cli_command(CLI::App& bench, const GlobalOptions& global);      // cmd_bench_cli.cpp

}  // namespace mst::cli
