#pragma once
// The tuner: searches the setups that fit and picks the fastest (`recommend`), and
// finds the longest sequence each strategy fits (`max-seq`).
#include <optional>
#include <string>
#include <vector>

#include "mst/gpu.hpp"
#include "mst/model.hpp"
#include "mst/plan.hpp"
#include "mst/setup.hpp"
#include "mst/simulate.hpp"
#include "mst/timemodel.hpp"

namespace mst {

// Knobs the user fixed (`--pin key=value`); unset ones are searched.
struct Pins {
    std::optional<std::int64_t> mlp_chunks, lm_chunks, sp, ep, micro_batch, checkpoint_count;
    std::optional<int> zero_stage;
    std::optional<MlpImpl> mlp_impl;
    std::optional<LmHeadImpl> lm_impl;
    std::optional<bool> offload;
    std::optional<bool> overlap_comm;  // DeepSpeed's (ZeRO 1/2 in the hf runtime); unpinned, both are searched
    std::optional<std::vector<bool>> checkpoint;  // an explicit placement
};
// "M_mlp=8", "zero=3", "checkpoint=spread:8", "offload=yes", ... into `pins`.
void parse_pin(const std::string& text, const ModelSpec& model, Pins& pins);
// yes/true/on/1 or no/false/off/0; else a UserError "<where>: <key>: expected yes or no".
bool parse_yes_no(const std::string& where, const std::string& key, const std::string& value);

struct TuneRequest {
    ModelSpec model;
    GpuProfile gpu;
    std::int64_t gpus = 1;
    std::int64_t seq_len = 4096;
    std::optional<std::int64_t> tokens_per_step;  // global; micro-batch and accumulation reach it
    TrainingSetup base;   // precision, optimizer, attention ...: not searched
    Pins pins;
    bool allow_offload = true;
    bool allow_optimizer_in_backward = false;
    double safety_margin = 0.03;                 // fraction of usable memory kept free
    bytes_t host_bytes_per_gpu = 128 * kGiB;     // pinned host memory an offloading rank may use
    ClusterShape cluster;
    // A trainer format (emit's: hf-mst, deepspeed, axolotl, torchtitan) whose trainer must be able to
    // train the plan as it is: setups its emitter would refuse are not searched. Empty: any.
    std::string for_format;
    // Threads recommend's search and max-seq's strategies run on: 0, one per CPU this process may run
    // on (recommend's at most 8), or the number given (each thread holds a simulator's tables, tens of
    // MiB on a large step; more threads than CPUs only wait). The answers are the same on any number.
    int search_threads = 0;
};

// Seconds per trained token of a step: step_seconds / (micro-batch x seq x accumulation x dp).
inline double per_token(const StepTime& t, const TrainingSetup& s) {
    return t.step_seconds / (static_cast<double>(s.tokens()) * static_cast<double>(s.grad_accum) * static_cast<double>(s.dp));
}

struct Candidate {
    TrainingSetup setup;
    // What the GPU holds (torch.cuda.max_memory_*): the allocator model releases cached segments
    // at the usable memory. The search decides on the device as planned (the budget), where a step
    // may fit only by releasing some; then releases_at_budget says how many.
    MemoryPeaks memory;
    StepTime time;
    std::int64_t releases_at_budget = 0;
    // What the search minimises: seconds per token trained, the step's time over the tokens all
    // data-parallel ranks train in it (a layout with more ranks trains more tokens per step).
    double cost() const { return per_token(time, setup); }
};

struct Recommendation {
    bool found = false;
    Candidate best;
    std::vector<Candidate> pareto;  // fitting setups no other beats in both memory and speed, by memory
    std::string why;
    std::int64_t simulations = 0;
    bytes_t budget_bytes = 0;       // usable memory minus the safety margin
    std::string refusal;            // --for: the first setup the format refused ("" when none was)
    bytes_t trainer_extra_bytes = 0;  // --for: kept free of the budget for the trainer's own allocations
    // When nothing fits on one GPU or under DDP (one layout): its weights, master weights, gradients,
    // optimizer states and workspace (0 otherwise).
    bytes_t persistent_bytes = 0;
    // When nothing fits and the persistent state does not pass the budget alone: a setup of the
    // search with each memory-saving knob at its most (tune.cpp's leanest()), what it reserves and
    // offloads, and where its requested bytes peak (on `rank`, -1: the ranks are alike): what no knob
    // shrank enough. Absent where the trainer refuses it, or it fits.
    struct Leanest {
        TrainingSetup setup;
        bytes_t peak_reserved_bytes = 0;
        bytes_t host_bytes = 0;  // offloaded checkpoints (the budget: --host-gib)
        std::int64_t rank = -1;
        // Where its requested bytes peak, and what saved activations and transients hold there.
        Phase phase = Phase::Init;
        std::string op;
        std::int64_t layer = -1;
        bytes_t saved_bytes = 0, transient_bytes = 0;
    };
    std::optional<Leanest> leanest;
    bool zero3_searched = false;  // the hf runtime: whether ZeRO-3 (DeepSpeed's, or FSDP2's) was among the stages searched
    // The hf runtime without a DeepSpeed format: whether FSDP2 shards this model and precision over
    // several GPUs (what more of them would buy)
    bool fsdp2_shards = false;
};

Recommendation recommend(const TuneRequest& request);

// Whether a format's trainer runs the Hugging Face model in DeepSpeed's engine when the plan uses
// ZeRO (deepspeed, axolotl): the hf runtime plans those with DeepSpeed's ZeRO 1/2.
bool trains_in_deepspeed(const std::string& format);
// DeepSpeed's engine options of `s` that are not DeepSpeed's defaults, as the command line gives them
// ("--reduce-bucket-size 4096 --overlap-comm"; "" when there are none)
std::string deepspeed_options(const TrainingSetup& s);
Plan to_plan(const Recommendation& r, const TuneRequest& request, const std::string& model_ref, const std::string& gpu_ref);

// ---- max-seq -------------------------------------------------------------------------
struct Strategy {
    std::string name;
    TrainingSetup setup;  // seq_len and chunk counts are set per length tried
    bool mst = false;     // MsT chunks of hidden_size tokens (the ALST / HF heuristic)
    bool mst_mlp = true;  // MsT chunks the MLP too (false: the LM head only, for a trainer without MLP chunks)
    std::string trainer{};  // --for: the format whose extra allocations (trainer_extra_bytes) stay free
    ChunkTokens chunk_tokens{};  // chunk sizes in tokens, kept at every length (the user's, when given so)
};

struct MaxSeqRow {
    std::string strategy;
    std::int64_t max_seq = 0;  // 0: not even the shortest length fits
    MemoryPeaks memory;        // at max_seq, what the GPU holds (fitting the budget: the search's device)
    TrainingSetup setup;       // at max_seq
    std::string refused;       // --for: why that format's trainer cannot train the strategy (then not searched)
    bytes_t trainer_extra_bytes = 0;  // --for: kept free of the budget at max_seq for the trainer's own allocations
    std::string invalid_beyond;       // why the next length's setup is invalid, where that, not the budget, ends the row
    // The host's memory for offloaded checkpoints (--host-gib), not the GPU's, ends the row: the next length
    // (or, when nothing fits, the shortest) fits the GPU's budget with more host memory.
    bool host_bound = false;
};

struct MaxSeqResult {
    std::vector<MaxSeqRow> rows;
    bytes_t budget_bytes = 0;
    bytes_t persistent_bytes = 0;     // weights, master, gradients, optimizer states, workspace
    std::int64_t checkpoint_floor_seq = 0;  // the length at which one checkpoint per layer fills what is left
};

// The strategies side by side: no checkpointing, full checkpointing, + MsT, + offload,
// + sequence parallelism (when gpus > 1). `user` adds a row under the user's own knobs (its chunk sizes
// in tokens, where given so, kept at every length).
MaxSeqResult max_seq(const TuneRequest& request, const std::optional<TrainingSetup>& user, const ChunkTokens& user_chunk_tokens = {});

// Longest multiple of `granule` tokens that fits `budget` under `strategy`, from the shortest at which
// its knobs are valid (a setup's chunks need as many tokens) up to limits::kSeqLen, --seq's bound (0
// when none fits). `workers`: the threads its simulator may walk ranks on (0: PeakSimulator's default).
std::int64_t longest_fitting(const ModelSpec& model, const GpuProfile& gpu, const Strategy& strategy,
                             bytes_t budget, bytes_t host_budget, std::int64_t granule, MaxSeqRow* row = nullptr,
                             int workers = 0);

}  // namespace mst
