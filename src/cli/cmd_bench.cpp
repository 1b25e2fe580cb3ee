// bench: benchmarks that print ratios against their targets. Each subcommand lives with its
// subject: `bench tuner` in cmd_recommend.cpp, `bench kernels` in cmd_bench_kernels.cpp,
// `bench cli` in cmd_bench_cli.cpp; what they share is here (bench.hpp).
#include <time.h>

#include <algorithm>
#include <chrono>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "bench.hpp"
#include "commands.hpp"
#include "mst/error.hpp"

namespace mst::cli {

namespace {

double cpu_ms_now() {
    timespec t{};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return static_cast<double>(t.tv_sec) * 1e3 + static_cast<double>(t.tv_nsec) * 1e-6;
}

double median(std::vector<double> v) {
    if (v.empty()) return 0;
    std::sort(v.begin(), v.end());
    const std::size_t n = v.size();
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

double median_of(const std::vector<Timing>& runs, double Timing::*field) {
    std::vector<double> v;
    for (const Timing& t : runs) v.push_back(t.*field);
    return median(v);
}

}  // namespace

std::vector<Timing> time_in_process(int reps, const std::function<void()>& run) {
    std::vector<Timing> out;
    for (int i = 0; i < reps; ++i) {
        const auto wall0 = std::chrono::steady_clock::now();
        const double cpu0 = cpu_ms_now();
        run();
        out.push_back({std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - wall0).count(),
                       cpu_ms_now() - cpu0, 0});
    }
    return out;
}

CLI::App& add_timed_bench(CLI::App& bench, const std::string& name, const std::string& help, int default_reps,
                          std::function<void(int)> run) {
    auto reps = std::make_shared<int>(default_reps);
    auto* cmd = bench.add_subcommand(name, help);
    cmd->add_option("--reps", *reps, "Timed runs per case (median reported)")->capture_default_str();
    cmd->callback([reps, run = std::move(run)] {
        if (*reps < 1) fail("command line", "reps", "expected a positive count");
        run(*reps);
    });
    return *cmd;
}

void print_bench(const GlobalOptions& g, const std::string& title, const std::vector<BenchCase>& cases) {
    nlohmann::json rows = nlohmann::json::array();
    Table t({"case", "", "runs", "wall ms", "cpu ms", "target ms", "wall/target", "cpu/target", "RSS MiB", "target MiB"});
    int targets = 0, met_wall = 0, met_cpu = 0;
    for (const BenchCase& c : cases) {
        const double wall = median_of(c.runs, &Timing::wall_ms), cpu = median_of(c.runs, &Timing::cpu_ms);
        const double rss = median_of(c.runs, &Timing::rss_mib);
        nlohmann::json row = {{"case", c.name}, {"detail", c.detail}, {"runs", c.runs.size()},
                              {"median_wall_ms", wall}, {"median_cpu_ms", cpu}};
        auto verdict = [](double ratio) { return fmt::format("{:.2f} {}", ratio, ratio <= 1 ? "ok" : "MISSED"); };
        std::string wall_ratio = "-", cpu_ratio = "-", rss_cell = "-", rss_target = "-";
        if (c.target_ms) {
            ++targets;
            met_wall += wall <= *c.target_ms ? 1 : 0;
            met_cpu += cpu <= *c.target_ms ? 1 : 0;
            wall_ratio = verdict(wall / *c.target_ms);
            cpu_ratio = verdict(cpu / *c.target_ms);
            row["target_ms"] = *c.target_ms;
            row["wall_ratio"] = wall / *c.target_ms;
            row["cpu_ratio"] = cpu / *c.target_ms;
        }
        if (rss > 0) {
            rss_cell = fmt::format("{:.1f}", rss);
            row["median_rss_mib"] = rss;
        }
        if (c.target_rss_mib) {
            ++targets;
            const bool ok = rss <= *c.target_rss_mib;
            met_wall += ok ? 1 : 0, met_cpu += ok ? 1 : 0;
            rss_target = fmt::format("{:.0f} {}", *c.target_rss_mib, ok ? "ok" : "MISSED");
            row["target_rss_mib"] = *c.target_rss_mib;
            row["rss_ratio"] = rss / *c.target_rss_mib;
        }
        rows.push_back(row);
        t.row({c.name, c.detail, std::to_string(c.runs.size()), fmt::format("{:.1f}", wall), fmt::format("{:.1f}", cpu),
               c.target_ms ? fmt::format("{:.0f}", *c.target_ms) : "-", wall_ratio, cpu_ratio, rss_cell, rss_target});
    }
    if (g.json) return print_json({{"benchmark", title}, {"cases", rows}});
    fmt::print("{} (medians; ratio = median / target, <= 1 meets it)\n", title);
    t.print();
    fmt::print("{} of {} targets met by wall time, {} by CPU time (wall time includes waiting for a core on a busy "
               "machine)\n",
               met_wall, targets, met_cpu);
}

void add_bench_commands(CLI::App& app, const GlobalOptions& global) {
    auto* bench = app.add_subcommand("bench", "Benchmarks that print ratios against their targets");
    bench->require_subcommand(1);
    add_bench_tuner_command(*bench, global);
    add_bench_cli_command(*bench, global);
    add_bench_kernels_command(*bench, global);
}

}  // namespace mst::cli
