#pragma once
// The per-format emitters behind mst::emit (include/mst/emit.hpp) and the few
// helpers they share. Internal to mst_core.
#include <cstdint>
#include <string>
#include <vector>

#include "mst/emit.hpp"

namespace mst::emit_detail {

std::vector<EmittedFile> emit_hf_mst(const Plan& plan, const ModelSpec& model);
std::vector<EmittedFile> emit_deepspeed(const Plan& plan, const ModelSpec& model);
std::vector<EmittedFile> emit_axolotl(const Plan& plan, const ModelSpec& model);
std::vector<EmittedFile> emit_torchtitan(const Plan& plan, const ModelSpec& model);

// What each format refuses (a UserError "<format>: setup.<knob>: ..."), checked by its emitter
// before it writes anything and by check_expressible (include/mst/emit.hpp). hf-mst refuses
// nothing validate() accepts.
void check_hf_mst(const TrainingSetup& s, const ModelSpec& model);
void check_deepspeed(const TrainingSetup& s, const ModelSpec& model);
void check_axolotl(const TrainingSetup& s, const ModelSpec& model);
// What torchtitan's own model allocates on every GPU beyond the runtime's prediction (its RoPE tables).
bytes_t torchtitan_extra_bytes(const TrainingSetup& s, const ModelSpec& model);
void check_torchtitan(const TrainingSetup& s, const ModelSpec& model);

// Indices of the checkpointed decoder layers, ascending.
std::vector<std::int64_t> checkpoint_layers(const TrainingSetup& s);

// "16 of 32 layers (0,2,4,...)": the plan's placement in words, for comments.
std::string describe_placement(const TrainingSetup& s, const ModelSpec& model);

// Header lines for comments and notes: which plan this is and what it predicts. They quote the
// plan's model and GPU as written: a comment writes them through comment_line().
std::vector<std::string> plan_header(const Plan& plan);

// The YAML writer escapes values but cannot write comments safely (yaml-cpp passes a carriage
// return through), nor does a Python docstring: every comment line goes through these.
// comment_line: `text` with control characters escaped (a "\r" or "\n" in a model path must not
// start a live line). comment_lines: the same, broken at spaces into lines of at most `width`
// characters (a longer word gets a line of its own), for comments a person reads in an editor.
std::string comment_line(const std::string& text);
std::vector<std::string> comment_lines(const std::string& text, std::size_t width = 96);

}  // namespace mst::emit_detail
