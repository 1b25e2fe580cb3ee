#pragma once
// The one way mst-plan reads JSON: files are bounded in size and nesting before they are parsed,
// every nlohmann exception becomes a one-line UserError naming the file, and typed reads from an
// object fail as "<file>: <field>: expected <what>, got <value>".
//
// Unknown keys: a reader remembers every key it was asked about; reject_unknown() then refuses a
// key nobody asked about, naming the closest known one. Setup, plan, GPU profile, timeline and
// measurement files call it (a misspelled "sequence_length" must not be silently ignored); a
// Hugging Face config.json does not (it carries many fields mst-plan has no use for).
#include <cstdint>
#include <filesystem>
#include <initializer_list>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace mst::detail {

// Reads and parses a JSON file. Missing, unreadable, not a regular file (a directory, a FIFO),
// larger than limits::kJsonBytes, nested deeper than limits::kJsonDepth or malformed: a UserError.
nlohmann::json read_json_file(const std::filesystem::path& path);
// The same checks on text already in memory; `where` names its origin in errors.
nlohmann::json parse_json_text(const std::string& text, const std::string& where);

// A JSON value as a message quotes it: scalars as written (strings escaped and cut at 40
// characters), arrays and objects by their kind only.
std::string shown(const nlohmann::json& v);

// `v` as an integer in [min, max] (an integral float such as 4096.0 counts), else nullopt.
std::optional<std::int64_t> as_integer(const nlohmann::json& v, std::int64_t min, std::int64_t max);

class JsonReader {
public:
    JsonReader(const nlohmann::json& object, std::string where, std::string prefix = "");

    bool has(const std::string& key) const;
    std::int64_t integer(const std::string& key, std::int64_t min, std::int64_t max) const;
    std::optional<std::int64_t> opt_integer(const std::string& key, std::int64_t min, std::int64_t max) const;
    double number(const std::string& key, double min, double max) const;
    std::optional<double> opt_number(const std::string& key, double min, double max) const;
    std::string string(const std::string& key) const;
    std::optional<std::string> opt_string(const std::string& key) const;
    // One of `values` (an enumeration written as a string).
    std::string one_of(const std::string& key, const std::vector<std::string>& values) const;
    bool boolean(const std::string& key) const;
    std::optional<bool> opt_boolean(const std::string& key) const;
    JsonReader object(const std::string& key) const;
    const nlohmann::json& raw(const std::string& key) const;

    // Keys this format allows but this reader does not read (documentation, other tools' fields).
    void known(std::initializer_list<const char*> keys) const;
    // A UserError for the first key of the object that no read asked about and known() did not name.
    void reject_unknown() const;

    const std::string& where() const { return where_; }
    std::string field(const std::string& key) const { return prefix_ + key; }
    [[noreturn]] void fail(const std::string& key, const std::string& expected) const;

private:
    const nlohmann::json& obj_;
    std::string where_;
    std::string prefix_;
    mutable std::vector<std::string> asked_;  // every key a read or known() named, in order
};

}  // namespace mst::detail
