#pragma once
// emit: a Plan written as the config files a real trainer reads. One small module
// per format under src/core/emit/, each citing the trainer's documentation for its
// keys; all of them are printers over the same Plan.
//
//   hf-mst      mst_config.json  read by python/mst_hf, which patches a transformers model
//   deepspeed   ds_config.json   DeepSpeed engine config (ZeRO, bf16, Ulysses SP degree)
//   axolotl     axolotl.yaml     fragment of an Axolotl config (+ ds_config.json when the
//                                plan needs DeepSpeed: ZeRO > 0 or bf16 master weights)
//   torchtitan  mst_torchtitan.py  torchtitan 0.3.0 config module (--module mst_torchtitan --config mst_plan)
//
// What a trainer cannot say, decided the same way for every format:
//  * It cannot train the way the plan says: precision mode, optimizer type or
//    state dtype, stepping inside backward, or a combination the trainer rejects.
//    -> UserError "<format>: setup.<knob>: expected ..., got ...". These change
//    the numbers the model trains on, or the persistent memory (weights, gradients,
//    optimizer states) the prediction is built on, so no comment makes the file honest.
//  * A memory technique has no key, or only a coarser one: MsT chunk counts,
//    per-layer checkpoint placement, checkpoint offload, attention kernel, the
//    flavour of sequence parallelism. -> the nearest key is written, plus a comment
//    (YAML, Python) or an entry of "mst_plan_notes" (JSON) that says what the plan
//    assumed and whether the trainer's memory lands above or below the prediction.
//    torchtitan refuses these instead (its module can state none of them), so
//    `recommend --for torchtitan` plans without them.
#include <string>
#include <vector>

#include "mst/model.hpp"
#include "mst/plan.hpp"

namespace mst {

struct EmittedFile {
    std::string name;     // file name without a directory: "ds_config.json"
    std::string content;  // the whole file, ending in a newline
};

// The format names emit() accepts, in the order `emit --help` lists them.
std::vector<std::string> emit_formats();

// The files of one format for a plan whose model is `model`. The plan's setup is
// validated first; an unknown format is "emit: format: expected one of ...".
std::vector<EmittedFile> emit(const Plan& plan, const ModelSpec& model, const std::string& format);

// Whether `format`'s trainer can train `setup` as planned: returns, or throws the UserError its
// emitter would ("<format>: setup.<knob>: expected ..."). recommend --for searches only such setups.
void check_expressible(const std::string& format, const TrainingSetup& setup, const ModelSpec& model);

// Whether torchtitan 0.3.0 trains `model` with its own Llama-3 code (one of its llama3 flavors has every
// dimension of it), not through its transformers backend: what model_code torchtitan simulates.
bool torchtitan_llama3(const ModelSpec& model);

// Bytes per GPU `format`'s trainer allocates for `setup` beyond what the runtime predicts, where
// its code is known to (torchtitan: its own model's per-layer RoPE tables); 0 otherwise.
// recommend --for keeps them free of the budget.
bytes_t trainer_extra_bytes(const std::string& format, const TrainingSetup& setup, const ModelSpec& model);

// What `format`'s trainer does that the runtime's prediction does not model, as the referee measured it
// (torchtitan's own step: python/mst_referee/titan.py); "" where the runtime models the trainer. max-seq
// --for prints it as a caution; recommend --for and the emitted files say it of their plan (`planned`: ""
// where its prediction is torchtitan's own step).
std::string unmodelled_trainer(const std::string& format);
std::string unmodelled_trainer(const std::string& format, const TrainingSetup& planned, const ModelSpec& model);

}  // namespace mst
