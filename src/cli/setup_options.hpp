#pragma once
// The training-setup knobs shared by estimate, measure and recommend: each is a
// command-line option, and --setup FILE.json gives the same knobs from a file
// (options given on the command line win).
#include <memory>
#include <string>

#include <CLI/CLI.hpp>

#include "mst/model.hpp"
#include "mst/setup.hpp"
#include "numbers.hpp"

namespace mst::cli {

class SetupOptions {
public:
    // default_runtime: what --runtime is when neither it nor a setup file says (measure: kernels).
    void add_to(CLI::App& cmd, const char* default_runtime = "hf");
    std::string default_runtime_ = "hf";
    // Validated. Without `with_deepspeed` DeepSpeed's engine options (--reduce-bucket-size,
    // --overlap-comm) and FSDP2's loop and layout (--fsdp2-no-sync, --fsdp2-reshard-after-forward, --fsdp2-groups) are
    // left out (max-seq's strategies template, whose stages the search picks: take_deepspeed() and
    // take_fsdp2() give them to the strategies those engines run).
    // gpus: those the command plans (max-seq's --gpus); without --dp or a setup file the data-parallel
    // degree fills them (gpus / sp).
    // chunk_tokens: the chunk sizes given in tokens (on the command line, or in the file unless a count
    // was given here), for a caller that plans other lengths (max-seq).
    TrainingSetup build(const ModelSpec& model, bool with_deepspeed = true, std::int64_t gpus = 1,
                        ChunkTokens* chunk_tokens = nullptr) const;
    // DeepSpeed's engine options given here (unvalidated), over `s`'s
    void take_deepspeed(TrainingSetup& s) const;
    // FSDP2's loop and layout options given here (unvalidated), over `s`'s
    void take_fsdp2(TrainingSetup& s) const;
    const std::string& file() const { return setup_file; }  // --setup's ("" when none)

private:
    CLI::App* cmd_ = nullptr;
    std::string setup_file;
    std::int64_t seq = 4096, batch = 1, grad_accum = 1, dp = 1, sp = 1, ep = 1, reduce_bucket_size_ = kDeepSpeedReduceBucket,
                 persistence_ = kDeepSpeedPersistence, prefetch_bucket_ = kDeepSpeedPrefetchBucket;
    double moe_imbalance = 1.0;
    std::int64_t mlp_chunks = 1, lm_chunks = 1, mlp_chunk_tokens = 0, lm_chunk_tokens = 0;
    int zero = 0, zero3_prefetch = 1;
    bool fsdp2 = false;
    Fsdp2Knobs fsdp2_knobs;
    std::string precision = "pure-bf16", optimizer = "adamw", state_dtype, optimizer_impl = "fused", runtime = "hf",
                model_code = "transformers", attention;
    std::string mlp_impl = "loop", lm_impl = "recompute", checkpoint = "none", sp_impl = "ulysses";
    bool padded = false, offload = false, opt_in_backward = false, overlap_comm = false, hf_trainer_bf16 = false;

    bool given(const char* name) const;
};

}  // namespace mst::cli
