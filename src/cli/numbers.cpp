#include "numbers.hpp"

#include <charconv>

#include <fmt/format.h>

#include "mst/error.hpp"
#include "mst/units.hpp"

namespace mst::cli {

CLI::Validator decimal(std::int64_t lo, std::int64_t hi) {
    return CLI::Validator(
        [lo, hi](std::string& text) -> std::string {
            const auto v = parse_decimal(text);
            if (v && *v >= lo && *v <= hi) return "";
            if (lo == std::numeric_limits<std::int64_t>::min() && hi == std::numeric_limits<std::int64_t>::max())
                return fmt::format("{}: expected a decimal integer (digits, no leading zero, within 64 bits)", in_quotes(text));
            return fmt::format("{}: expected a decimal integer in [{}, {}]", in_quotes(text), lo, hi);
        },
        "");
}

CLI::Validator unsigned_decimal() {
    return CLI::Validator(
        [](std::string& text) -> std::string {
            std::uint64_t v = 0;
            const auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
            const bool leading_zero = text.size() > 1 && text.front() == '0';
            if (!text.empty() && ec == std::errc() && ptr == text.data() + text.size() && !leading_zero) return "";
            return fmt::format("{}: expected a decimal integer in [0, {}]", in_quotes(text),
                               std::numeric_limits<std::uint64_t>::max());
        },
        "");
}

CLI::Validator finite(double lo, double hi) {
    return CLI::Validator(
        [lo, hi](std::string& text) -> std::string {
            const auto v = parse_finite(text);
            if (v && *v >= lo && *v <= hi) return "";
            return fmt::format("{}: expected a finite number in [{}, {}]", in_quotes(text), lo, hi);
        },
        "");
}

CLI::Validator true_or_false() {
    return CLI::Validator(
        [](std::string& text) -> std::string {
            if (text == "true" || text == "false") return "";
            return fmt::format("{}: expected true or false", in_quotes(text));
        },
        "");
}

CLI::Option* add_true_or_false(CLI::App& cmd, const std::string& name, bool& value, const std::string& help) {
    return cmd.add_option(name, value, help)->default_str(value ? "true" : "false")->check(true_or_false());
}

CLI::Option* add_switch(CLI::App& cmd, const std::string& name, bool& value, const std::string& help) {
    const CLI::Validator boolean_word(
        [](std::string& text) -> std::string {
            for (const char* word : {"true", "false", "yes", "no", "on", "off", "1", "0"})
                if (text == word) return "";
            return fmt::format("{}: expected true or false", in_quotes(text));
        },
        "");
    return cmd.add_flag(name, value, help)->check(boolean_word);
}

void add_fsdp2_knobs(CLI::App& cmd, Fsdp2Knobs& knobs, const std::string& scope) {
    add_switch(cmd, "--fsdp2-no-sync", knobs.no_sync,
               scope + ", with accumulation: set_requires_gradient_sync(False) before every micro-step but the last, as "
                       "the Hugging Face Trainer and accelerate's accumulate() do (whole gradients stay until the last micro-step)");
    add_true_or_false(cmd, "--fsdp2-reshard-after-forward", knobs.reshard_after_forward,
                      scope + ": fully_shard's reshard_after_forward for the decoder layers, and in Axolotl's groups the "
                              "model's own (false: each stays gathered from its forward to its backward, no gathers in "
                              "backward)");
    cmd.add_option("--fsdp2-groups", knobs.groups,
                   scope + ": whose fully_shard calls group the parameters: mst_hf (mst_hf.shard: the layers, then the "
                           "model) | accelerate (the Hugging Face Trainer shards the unsharded model: the layers, an untied "
                           "embedding, a tail of the final norm, tied embedding and LM head; pure-bf16 is its bf16=False, "
                           "bf16-master its bf16=True) | axolotl (Axolotl 0.21's own: mst_hf's groups, the model's "
                           "resharded after forward; pure-bf16 under its bf16: true; torch 2.14; with --for axolotl its "
                           "ZeRO-3 is then FSDP2)")
        ->capture_default_str();
}

CLI::Option* add_hf_trainer_bf16(CLI::App& cmd, bool& value) {
    return add_switch(cmd, "--hf-trainer-bf16", value,
                      "The forward as the Hugging Face Trainer with bf16=True calls it (runtime hf): accelerate's bf16 autocast "
                      "around it and an fp32 copy of its bf16 outputs after it (the logits of an unchunked LM head)");
}

}  // namespace mst::cli
