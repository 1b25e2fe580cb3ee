#pragma once
// Command-line numbers are checked as text before CLI11 converts them: CLI11 reads "0100" as
// octal 64 and "0x100" as 256, clamps values beyond int64 and takes "nan" or "inf" for a number.
// A value that fails is CLI11's ValidationError, printed as one line:
// "error: --seq: 0100: expected a decimal integer in [...]".
#include <cstdint>
#include <limits>
#include <string>

#include <CLI/CLI.hpp>

namespace mst::cli {

// Decimal digits with an optional '-', no leading zeros, within [lo, hi]. Setup knobs take the
// whole int64 range here: their bounds are validate()'s, checked once for every input path.
CLI::Validator decimal(std::int64_t lo = std::numeric_limits<std::int64_t>::min(),
                       std::int64_t hi = std::numeric_limits<std::int64_t>::max());
// Decimal digits within [0, 2^64 - 1] (a seed): "-1" is refused, not wrapped.
CLI::Validator unsigned_decimal();
// A finite decimal number within [lo, hi].
CLI::Validator finite(double lo, double hi);
// "true" or "false" (CLI11 would read any integer as a boolean).
CLI::Validator true_or_false();
// An option `name` of `cmd` that sets `value` to true or false (true_or_false), its default shown.
CLI::Option* add_true_or_false(CLI::App& cmd, const std::string& name, bool& value, const std::string& help);
// A flag `name` of `cmd` (--name sets `value`) whose value, when one is given, is a boolean word
// (--padded=no, =true, =0), not any integer CLI11 would read as one (=2 as true, =-1 as false).
CLI::Option* add_switch(CLI::App& cmd, const std::string& name, bool& value, const std::string& help);
// --hf-trainer-bf16, one registration for the setup knobs and recommend's.
CLI::Option* add_hf_trainer_bf16(CLI::App& cmd, bool& value);

// FSDP2's loop and layout as given on the command line (unparsed), and their one registration for a
// setup's knobs (`scope` "With --fsdp2") and a search's ("Where the search plans FSDP2").
struct Fsdp2Knobs {
    bool no_sync = false, reshard_after_forward = true;
    std::string groups = "mst_hf";
};
void add_fsdp2_knobs(CLI::App& cmd, Fsdp2Knobs& knobs, const std::string& scope);

}  // namespace mst::cli
