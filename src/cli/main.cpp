// mst-plan: plan memory and mini-sequence settings for long-context LLM training.
#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <vector>
#include <exception>
#if defined(__GLIBC__)
#include <malloc.h>
#include <sys/mman.h>
#include <unistd.h>
#endif

#include <fmt/format.h>

#include "commands.hpp"
#include "mst/error.hpp"
#include "mst/execute.hpp"
#include "numbers.hpp"

namespace {

// "mst-plan estimate": the subcommands CLI11 had entered when it stopped.
std::string command_path(const CLI::App& app) {
    std::string path = app.get_name();
    for (const CLI::App* sub = &app; !sub->get_subcommands().empty();) {
        sub = sub->get_subcommands().front();
        path += " " + sub->get_name();
    }
    return path;
}

// The first word that is not an option names the subcommand (the global options are flags).
// CLI11 would answer a misspelled one with "A subcommand is required"; this names the closest.
std::optional<std::string> unknown_subcommand(const CLI::App& app, int argc, char** argv) {
    std::vector<std::string> names;
    for (const CLI::App* sub : app.get_subcommands([](const CLI::App*) { return true; })) names.push_back(sub->get_name());
    for (int i = 1; i < argc; ++i) {
        const std::string word = argv[i];
        if (word.starts_with("-")) continue;
        if (std::find(names.begin(), names.end(), word) != names.end()) return std::nullopt;
        std::string list;
        for (const auto& n : names) list += (list.empty() ? "" : ", ") + n;
        return fmt::format("command line: {}: expected a subcommand ({}); the closest is {}", word, list,
                           mst::closest(word, names));
    }
    return std::nullopt;
}

// Every argument names something (a model, a file, a value): an empty one, often an unset shell
// variable, is an error (saying what it follows, or the --option= it ends), not a default taken silently.
std::optional<std::string> empty_argument(int argc, char** argv) {
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (a.starts_with("--") && a.ends_with("=") && a.find('=') == a.size() - 1)
            return fmt::format("{}: '': expected a value", a.substr(0, a.size() - 1));
        if (!a.empty()) continue;
        // (what comes before may be an option taking it, or a flag: said as what it follows)
        if (i > 1) return fmt::format("command line: argument {}: expected a value, got an empty one after '{}'", i, argv[i - 1]);
        return fmt::format("command line: argument {}: expected a value, got an empty one", i);
    }
    return std::nullopt;
}

}  // namespace

namespace {
// A planning process answers one request and exits. Its simulators grow tables of tens of MiB
// (events, tensors, allocator snapshots) and free them between setups: glibc would map each large
// one afresh and unmap it on free, faulting its pages in every time. Keep them in the heap, and
// let it grow in large steps. (Untouched pages are never resident; max-seq runs a third faster.)
// Not for `measure`, whose executor holds the step's tensors in host memory: there, blocks mapped
// on their own go back to the system exactly when freed, as its memory check assumes.
void tune_malloc(int argc, char** argv) {
#if defined(__GLIBC__)
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (a.empty() || a[0] == '-') continue;  // global flags come before the subcommand
        if (a == "measure") return;
        break;
    }
    mallopt(M_MMAP_THRESHOLD, 512 << 20);
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
    mallopt(M_TOP_PAD, 32 << 20);
    // The search's and max-seq's threads take their tables from this heap too (an arena of their own would
    // fault its pages in 4 KiB at a time: a tenth of a whole recommend at 64k tokens).
    mallopt(M_ARENA_MAX, 1);
    // The heap grows into one range that the tables fill from the bottom: backed by 2 MiB pages where the
    // kernel's transparent huge pages are on for ranges that ask (its "madvise" mode), it takes one page
    // fault per 2 MiB instead of 512. (A recommend faults about 2100 pages in otherwise: a tenth of its
    // time on a VM. Resident memory rounds up to whole 2 MiB pages: a few MiB more.)
    constexpr std::size_t kHeapAhead = std::size_t{48} << 20, kHugePage = std::size_t{2} << 20;
    if (void* ahead = malloc(kHeapAhead)) {
        const auto from = (reinterpret_cast<std::uintptr_t>(ahead) + kHugePage - 1) & ~(kHugePage - 1);
        free(ahead);  // back to the top of the heap, which M_TRIM_THRESHOLD keeps
        const auto top = reinterpret_cast<std::uintptr_t>(sbrk(0));
        if (top > from && top - from <= (std::uintptr_t{1} << 30))  // (the heap's range: not mapped apart)
            madvise(reinterpret_cast<void*>(from), top - from, MADV_HUGEPAGE);  // (advice: a kernel may ignore it)
    }
#else
    (void)argc, (void)argv;
#endif
}
}  // namespace

int main(int argc, char** argv) {
    using namespace mst::cli;
    tune_malloc(argc, argv);
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
    add_switch(app, "--json", global.json, "Print JSON instead of tables");
    bool assume_llama = false;
    add_switch(app, "--assume-llama", assume_llama,
                 "Read a config.json of a model_type mst-plan does not model as Llama-shaped (with a warning) "
                 "instead of refusing it");
    app.parse_complete_callback([&assume_llama] { mst::set_assume_llama(assume_llama); });

    add_catalog_commands(app, global);
    add_estimate_command(app, global);
    add_tuner_commands(app, global);
    add_emit_command(app, global);
    add_bench_commands(app, global);
    add_measure_command(app, global);
    add_compare_command(app, global);
    add_report_command(app, global);

    // Every error is one line: control characters in a quoted file name or value are escaped.
    auto error = [](const std::string& message) { fmt::print(stderr, "error: {}\n", mst::printable(message)); };
    if (const auto empty = empty_argument(argc, argv)) {
        error(*empty);
        return 2;
    }
    if (const auto unknown = unknown_subcommand(app, argc, argv)) {
        error(*unknown);
        return 2;
    }
    // Files a command wrote are kept only when everything succeeded (finish_outputs(true) below).
    struct Discard {
        ~Discard() { mst::cli::finish_outputs(false); }
    } discard;
    try {
        app.parse(argc, argv);
    } catch (const CLI::CallForHelp& e) {
        return app.exit(e);
    } catch (const CLI::CallForAllHelp& e) {
        return app.exit(e);
    } catch (const CLI::CallForVersion& e) {
        return app.exit(e);
    } catch (const CLI::ValidationError& e) {
        error(e.what());  // our checks' own words: "--seq: '0100': expected a decimal integer in [...]"
        return 2;
    } catch (const CLI::ParseError& e) {
        // Usage mistakes: one line naming the subcommand and exit code 2, like every other user error.
        error(fmt::format("command line: {}: {}", command_path(app), e.what()));
        return 2;
    } catch (const mst::OutOfMemoryError& e) {  // a real step that did not fit (measure)
        error(e.what());
        return 4;
    } catch (const mst::UserError& e) {
        error(e.what());
        return 2;
    } catch (const std::exception& e) {
        fmt::print(stderr, "internal error (please report): {}\n", mst::printable(e.what()));
        return 3;
    }
    // Everything printed reached stdout (a full disk or a closed file would leave it cut short), then
    // the files the command wrote go into place.
    if (std::fflush(stdout) != 0 || std::ferror(stdout)) {
        const int err = errno;
        error(fmt::format("stdout: write: expected the output written, got {}", err != 0 ? std::strerror(err) : "an error"));
        return 2;
    }
    try {
        mst::cli::finish_outputs(true);
    } catch (const mst::UserError& e) {
        error(e.what());
        return 2;
    }
    return 0;
}
