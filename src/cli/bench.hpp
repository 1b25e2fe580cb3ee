#pragma once
// What the `bench` subcommands that time mst-plan itself share (`bench tuner`: the search in
// this process, cmd_recommend.cpp; `bench cli`: whole mst-plan processes, cmd_bench_cli.cpp):
// repeated runs, their medians, the ratio of each median to its target, one table and one JSON
// shape. They measure and print; they never fail (the targets are for this kind of machine, and
// CI's are busier).
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "mst/setup.hpp"
#include "output.hpp"

namespace mst::cli {

// One run: wall-clock and CPU (user + system) milliseconds, and for a process its peak
// resident memory.
struct Timing {
    double wall_ms = 0;
    double cpu_ms = 0;
    double rss_mib = 0;
};

struct BenchCase {
    std::string name;                     // what ran
    std::string detail;                   // e.g. "906 simulations"
    std::optional<double> target_ms;      // none: shown for context
    std::optional<double> target_rss_mib;
    std::vector<Timing> runs;
};

// The targets, for a 2-core machine like the development one: planning at interactive speed.
struct RecommendCase {
    const char* model;
    const char* gpu;
    std::int64_t gpus, seq;
    double target_ms;
    Runtime runtime;  // hf plans one GPU; several are planned with the kernels runtime
};
inline constexpr RecommendCase kRecommendCases[] = {
    {"llama-3-8b", "h100-sxm-80gb", 1, 8192, 40, Runtime::Hf},       // one GPU, 8k to 128k tokens: 40 ms
    {"llama-3-8b", "h100-sxm-80gb", 1, 32768, 40, Runtime::Hf},
    {"llama-3-8b", "h100-sxm-80gb", 1, 65536, 40, Runtime::Hf},
    {"llama-3-8b", "h100-sxm-80gb", 1, 131072, 40, Runtime::Kernels},  // beyond one H100 with transformers' tensors
    {"llama-3-8b", "a100-80gb", 1, 32768, 40, Runtime::Hf},
    {"llama-3-8b", "h100-sxm-80gb", 8, 262144, 250, Runtime::Kernels},    // 8 GPUs at 256k tokens: 250 ms
    {"llama-3.1-70b", "h100-sxm-80gb", 64, 131072, 150, Runtime::Kernels},  // 70B on 64 GPUs: 150 ms
};
inline constexpr const char* kMaxSeqModel = "llama-3-8b";
inline constexpr const char* kMaxSeqGpu = "a100-80gb";
inline constexpr double kMaxSeqTargetMs = 30;
// The whole `estimate` process (README's example), CUDA libraries not loaded: 10 ms, 20 MiB.
inline constexpr double kEstimateTargetMs = 10, kEstimateTargetRssMib = 20;

// Times `run` `reps` times in this process (wall clock and this process's CPU time).
std::vector<Timing> time_in_process(int reps, const std::function<void()>& run);

// Registers `bench NAME [--reps N]`, which calls run(N); returns it, for options of its own.
CLI::App& add_timed_bench(CLI::App& bench, const std::string& name, const std::string& help, int default_reps,
                          std::function<void(int)> run);

// The table (or JSON) of the cases: medians of wall, CPU and resident memory, and each median
// over its target (<= 1 meets it). On a shared machine wall time includes waiting for a core;
// CPU time does not, so both are compared with the target.
void print_bench(const GlobalOptions& g, const std::string& title, const std::vector<BenchCase>& cases);

}  // namespace mst::cli
