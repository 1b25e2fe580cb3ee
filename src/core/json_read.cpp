#include "json_read.hpp"

#include <fstream>
#include <sstream>

#include <fmt/format.h>

#include "mst/error.hpp"

namespace mst::detail {

nlohmann::json read_json_file(const std::filesystem::path& path) {
    std::ifstream in(path);
    if (!in) mst::fail(path.string(), "file", "expected a readable JSON file (not found or not readable)");
    std::stringstream buffer;
    buffer << in.rdbuf();
    try {
        return nlohmann::json::parse(buffer.str());
    } catch (const nlohmann::json::parse_error& e) {
        // e.byte is the position where parsing stopped: enough for a person to find it.
        mst::fail(path.string(), "json", fmt::format("expected valid JSON, parse error at byte {}", e.byte));
    }
}

namespace {
std::string shown(const nlohmann::json& v) {
    std::string s = v.dump();
    if (s.size() > 40) s = s.substr(0, 37) + "...";
    return s;
}
}  // namespace

JsonReader::JsonReader(const nlohmann::json& object, std::string where, std::string prefix)
    : obj_(object), where_(std::move(where)), prefix_(std::move(prefix)) {
    if (!obj_.is_object()) mst::fail(where_, prefix_.empty() ? "(top level)" : prefix_, "expected a JSON object");
}

void JsonReader::fail(const std::string& key, const std::string& expected) const {
    mst::fail(where_, field(key), expected);
}

bool JsonReader::has(const std::string& key) const { return obj_.contains(key) && !obj_.at(key).is_null(); }

const nlohmann::json& JsonReader::raw(const std::string& key) const {
    if (!has(key)) fail(key, "missing (required field)");
    return obj_.at(key);
}

std::optional<std::int64_t> JsonReader::opt_integer(const std::string& key, std::int64_t min, std::int64_t max) const {
    if (!has(key)) return std::nullopt;
    const auto& v = obj_.at(key);
    const bool integral = v.is_number_integer() || (v.is_number_float() && v.get<double>() == static_cast<double>(static_cast<std::int64_t>(v.get<double>())));
    if (!integral || v.is_boolean())
        fail(key, fmt::format("expected an integer in [{}, {}], got {}", min, max, shown(v)));
    std::int64_t x = 0;
    if (v.is_number_unsigned() && v.get<std::uint64_t>() > static_cast<std::uint64_t>(INT64_MAX))
        fail(key, fmt::format("expected an integer in [{}, {}], got {}", min, max, shown(v)));
    x = v.is_number_float() ? static_cast<std::int64_t>(v.get<double>()) : v.get<std::int64_t>();
    if (x < min || x > max) fail(key, fmt::format("expected an integer in [{}, {}], got {}", min, max, x));
    return x;
}

std::int64_t JsonReader::integer(const std::string& key, std::int64_t min, std::int64_t max) const {
    if (!has(key)) fail(key, fmt::format("missing (expected an integer in [{}, {}])", min, max));
    return *opt_integer(key, min, max);
}

std::optional<double> JsonReader::opt_number(const std::string& key, double min, double max) const {
    if (!has(key)) return std::nullopt;
    const auto& v = obj_.at(key);
    if (!v.is_number() || v.is_boolean()) fail(key, fmt::format("expected a number in [{}, {}], got {}", min, max, shown(v)));
    const double x = v.get<double>();
    if (!(x >= min && x <= max)) fail(key, fmt::format("expected a number in [{}, {}], got {}", min, max, x));
    return x;
}

double JsonReader::number(const std::string& key, double min, double max) const {
    if (!has(key)) fail(key, fmt::format("missing (expected a number in [{}, {}])", min, max));
    return *opt_number(key, min, max);
}

std::optional<std::string> JsonReader::opt_string(const std::string& key) const {
    if (!has(key)) return std::nullopt;
    const auto& v = obj_.at(key);
    if (!v.is_string()) fail(key, fmt::format("expected a string, got {}", shown(v)));
    return v.get<std::string>();
}

std::string JsonReader::string(const std::string& key) const {
    if (!has(key)) fail(key, "missing (expected a string)");
    return *opt_string(key);
}

std::optional<bool> JsonReader::opt_boolean(const std::string& key) const {
    if (!has(key)) return std::nullopt;
    const auto& v = obj_.at(key);
    if (!v.is_boolean()) fail(key, fmt::format("expected true or false, got {}", shown(v)));
    return v.get<bool>();
}

bool JsonReader::boolean(const std::string& key) const {
    if (!has(key)) fail(key, "missing (expected true or false)");
    return *opt_boolean(key);
}

JsonReader JsonReader::object(const std::string& key) const {
    const auto& v = raw(key);
    if (!v.is_object()) fail(key, fmt::format("expected a JSON object, got {}", shown(v)));
    return JsonReader(v, where_, field(key) + ".");
}

}  // namespace mst::detail
