// bench kernels: the MsT blocks (MLP, LM head + loss) on the local GPU, unchunked vs M
// mini-sequences, forward and backward; TFLOP/s, fraction of the GPU profile's bf16 peak and
// the chunked/unchunked ratio (target >= 0.95 at S >= 16k). Without CUDA in the build or a
// device on the machine, run_kernel_bench reports a UserError: one line, exit code 2.
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "mst/catalog.hpp"
#include "mst/error.hpp"
#include "mst/kernel_bench.hpp"
#include "mst/limits.hpp"
#include "numbers.hpp"

namespace mst::cli {

namespace {

constexpr double kTargetRatio = 0.95;
constexpr std::int64_t kTargetMinSeq = 16384;

struct BenchKernelsArgs {
    std::string model = "llama-3-8b", gpu = "h100-sxm-80gb", out;
    std::vector<std::int64_t> seqs{4096, 16384, 65536};
    std::vector<std::int64_t> chunks{2, 4, 8, 16, 32};
    int reps = 5, warmup = 1;
};

bool has_target(const KernelBenchRow& r) { return r.chunks > 1 && r.seq >= kTargetMinSeq; }

nlohmann::json to_json(const KernelBenchResult& r, const GpuProfile& gpu) {
    nlohmann::json rows = nlohmann::json::array();
    for (const auto& x : r.rows)
        rows.push_back({{"block", x.block}, {"pass", x.pass}, {"seq", x.seq}, {"chunks", x.chunks}, {"flops", x.flops},
                        {"ms", x.ms}, {"ms_min", x.ms_min}, {"ms_max", x.ms_max}, {"tflops", x.tflops},
                        {"peak_fraction", x.peak_fraction}, {"ratio_vs_unchunked", x.ratio_vs_unchunked},
                        {"meets_target", has_target(x) ? nlohmann::json(x.ratio_vs_unchunked >= kTargetRatio)
                                                       : nlohmann::json(nullptr)}});
    return {{"benchmark", "kernels"},
            {"device", r.device},
            {"gpu_profile", gpu.name},
            {"peak_tflops", r.request.peak_tflops},
            {"model", r.request.model},
            {"shapes", {{"hidden", r.request.hidden}, {"intermediate", r.request.intermediate}, {"vocab", r.request.vocab}}},
            {"warmup", r.request.warmup},
            {"reps", r.request.reps},
            {"target", {{"ratio_vs_unchunked", kTargetRatio}, {"min_seq", kTargetMinSeq}}},
            {"rows", rows},
            {"notes", r.notes}};
}

void run_bench_kernels(const GlobalOptions& g, const BenchKernelsArgs& a) {
    const ModelSpec model = find_model(a.model);
    const GpuProfile gpu = find_gpu(a.gpu);
    if (model.moe)  // its kernels are the dense MLP's: an MoE model's experts are not among them
        fail("bench kernels", "model", fmt::format("expected a dense model (it times the dense MLP kernels; the expert kernels are not benchmarked yet), got {}", model.name));
    KernelBenchRequest rq;
    rq.model = model.name;
    rq.hidden = model.hidden_size;
    rq.intermediate = model.intermediate_size;
    rq.vocab = model.vocab_size;
    rq.seqs = a.seqs;
    rq.chunks = a.chunks;
    rq.reps = a.reps;
    rq.warmup = a.warmup;
    rq.gpu = gpu.name;
    rq.peak_tflops = gpu.bf16_dense_tflops;
    const KernelBenchResult r = run_kernel_bench(rq);
    const nlohmann::json j = to_json(r, gpu);
    OutputFiles outputs(g.json);  // (--json: the document on stdout is this command's own)
    for (const std::string& in : {a.model, a.gpu}) outputs.input(in);
    if (!a.out.empty()) outputs.add(a.out, json_text(j, 2) + "\n");
    outputs.commit();
    if (g.json) return print_json(j);

    fmt::print("{} on {} (peak {:.0f} bf16 TFLOP/s from profile {}); d {}, I {}, V {}; median of {} runs\n", model.name,
               r.device, rq.peak_tflops, gpu.name, rq.hidden, rq.intermediate, rq.vocab, rq.reps);
    Table t({"block", "pass", "seq", "M", "ms", "TFLOP/s", "% peak", "vs M=1", "target"});
    int met = 0, targets = 0;
    std::string last;
    for (const auto& x : r.rows) {
        const std::string group = x.block + x.pass + std::to_string(x.seq);
        if (!last.empty() && group != last) t.rule();
        last = group;
        std::string target = "";
        if (has_target(x)) {
            ++targets;
            met += x.ratio_vs_unchunked >= kTargetRatio ? 1 : 0;
            target = x.ratio_vs_unchunked >= kTargetRatio ? ">= 0.95 ok" : ">= 0.95 MISSED";
        }
        t.row({x.block, x.pass, std::to_string(x.seq), std::to_string(x.chunks), fmt::format("{:.2f}", x.ms),
               fmt::format("{:.0f}", x.tflops), fmt::format("{:.1f} %", 100 * x.peak_fraction),
               fmt::format("{:.3f}", x.ratio_vs_unchunked), target});
    }
    t.print();
    for (const auto& n : r.notes) fmt::print("note: {}\n", n);
    fmt::print("{} of {} chunked cases at S >= {} keep >= {:.2f} of the unchunked throughput\n", met, targets, kTargetMinSeq,
               kTargetRatio);
}

}  // namespace

void add_bench_kernels_command(CLI::App& bench, const GlobalOptions& global) {
    auto a = std::make_shared<BenchKernelsArgs>();
    auto* cmd = bench.add_subcommand(
        "kernels",
        "Time the MLP and the LM head + loss on this GPU, unchunked vs M mini-sequences, forward and backward\n"
        "(TFLOP/s, % of the profile's bf16 peak, chunked/unchunked; target >= 0.95 at S >= 16k). Needs CUDA.\n"
        "  mst-plan bench kernels\n"
        "  mst-plan bench kernels --seq 16384 --chunks 4,16 --gpu h200-141gb --json");
    cmd->add_option("--model", a->model, "Catalog name or config.json: hidden, intermediate and vocab sizes")->capture_default_str();
    cmd->add_option("--gpu", a->gpu, "GPU profile whose bf16 peak is the reference")->capture_default_str();
    cmd->add_option("--seq", a->seqs, "Sequence lengths (tokens)")
        ->delimiter(',')
        ->capture_default_str()
        ->check(decimal(1, limits::kSeqLen));
    cmd->add_option("--chunks", a->chunks, "Mini-sequence counts M (M = 1 is always measured)")
        ->delimiter(',')
        ->capture_default_str()
        ->check(decimal(1, limits::kChunks));
    cmd->add_option("--reps", a->reps, "Timed runs per case (median reported)")
        ->capture_default_str()
        ->check(decimal(1, limits::kBenchReps));
    cmd->add_option("--warmup", a->warmup, "Untimed runs per case")->capture_default_str()->check(decimal(0, limits::kBenchReps));
    cmd->add_option("--out", a->out, "Also write the JSON result to this file");
    cmd->callback([&global, a] { run_bench_kernels(global, *a); });
}

}  // namespace mst::cli
