#pragma once
// Typed reads from a JSON object with errors of the form
// "<file>: <field>: expected <what>, got <value>".
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

namespace mst::detail {

// Reads and parses a JSON file: missing file and malformed JSON become UserErrors.
nlohmann::json read_json_file(const std::filesystem::path& path);

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
    bool boolean(const std::string& key) const;
    std::optional<bool> opt_boolean(const std::string& key) const;
    JsonReader object(const std::string& key) const;
    const nlohmann::json& raw(const std::string& key) const;

    const std::string& where() const { return where_; }
    std::string field(const std::string& key) const { return prefix_ + key; }
    [[noreturn]] void fail(const std::string& key, const std::string& expected) const;

private:
    const nlohmann::json& obj_;
    std::string where_;
    std::string prefix_;
};

}  // namespace mst::detail
