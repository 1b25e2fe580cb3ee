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

// Indices of the checkpointed decoder layers, ascending.
std::vector<std::int64_t> checkpoint_layers(const TrainingSetup& s);

// "16 of 32 layers (0,2,4,...)": the plan's placement in words, for comments.
std::string describe_placement(const TrainingSetup& s, const ModelSpec& model);

// Header lines for YAML/TOML comments: which plan this is and what it predicts.
std::vector<std::string> plan_header(const Plan& plan);

// `text` broken at spaces into lines of at most `width` characters (a longer word
// gets a line of its own), for comments a person reads in an editor.
std::vector<std::string> wrap(const std::string& text, std::size_t width = 96);

}  // namespace mst::emit_detail
