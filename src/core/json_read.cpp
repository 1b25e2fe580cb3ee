#include "json_read.hpp"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>
#include <unordered_set>

#include <fmt/format.h>

#include "mst/error.hpp"
#include "mst/limits.hpp"

namespace mst::detail {

namespace {

// The byte at which arrays and objects nest deeper than kJsonDepth, if they do. nlohmann parses
// any depth, but its dump() and comparisons recurse once per level: 100,000 levels overflow the
// stack. Strings are skipped, so brackets inside them do not count.
std::optional<std::size_t> too_deep(const std::string& text) {
    int depth = 0;
    bool in_string = false, escaped = false;
    for (std::size_t i = 0; i < text.size(); ++i) {
        const char c = text[i];
        if (in_string) {
            if (escaped) escaped = false;
            else if (c == '\\') escaped = true;
            else if (c == '"') in_string = false;
        } else if (c == '"') {
            in_string = true;
        } else if (c == '[' || c == '{') {
            if (++depth > limits::kJsonDepth) return i;
        } else if (c == ']' || c == '}') {
            --depth;
        }
    }
    return std::nullopt;
}

}  // namespace

nlohmann::json parse_json_text(const std::string& text, const std::string& where) {
    if (auto at = too_deep(text))
        mst::fail(where, "json", fmt::format("expected arrays and objects nested at most {} deep, got deeper at byte {}",
                                             limits::kJsonDepth, *at + 1));
    // A key given twice in one object is refused, not read as its last value (nlohmann's way): which one the
    // writer meant is not ours to guess.
    std::vector<std::unordered_set<std::string>> open_objects;  // the keys of each object being read, innermost last
    std::string duplicate;
    const auto each = [&](int, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
        using Event = nlohmann::json::parse_event_t;
        if (event == Event::object_start) {
            open_objects.emplace_back();
        } else if (event == Event::object_end) {
            open_objects.pop_back();
        } else if (event == Event::key && duplicate.empty()) {
            const std::string& key = parsed.get_ref<const std::string&>();
            if (!open_objects.back().insert(key).second) duplicate = key;
        }
        return true;
    };
    try {
        nlohmann::json j = nlohmann::json::parse(text, each);
        if (!duplicate.empty())
            mst::fail(where, "json", fmt::format("expected each key once in an object, got \"{}\" twice", printable(duplicate)));
        return j;
    } catch (const nlohmann::json::parse_error& e) {
        // e.byte is the position where parsing stopped: enough for a person to find it.
        mst::fail(where, "json", fmt::format("expected valid JSON, parse error at byte {}", e.byte));
    } catch (const nlohmann::json::exception& e) {
        // out_of_range 406 ("number overflow parsing '1e309'") and its kin: nlohmann's own words,
        // without the "[json.exception....]" tag and kept on one line.
        std::string what = e.what();
        if (const auto close = what.find("] "); close != std::string::npos) what = what.substr(close + 2);
        mst::fail(where, "json", "expected valid JSON with numbers a double can hold, got " + printable(what.substr(0, 120)));
    }
}

nlohmann::json read_json_file(const std::filesystem::path& path) {
    namespace fs = std::filesystem;
    const std::string where = path.string();
    std::error_code ec;
    const fs::file_status status = fs::status(path, ec);
    if (ec || !fs::exists(status)) mst::fail(where, "file", "expected a readable JSON file (not found or not readable)");
    if (fs::is_directory(status)) mst::fail(where, "file", "expected a JSON file, got a directory");
    // A FIFO or a device would block or never end: only regular files are opened.
    if (!fs::is_regular_file(status)) mst::fail(where, "file", "expected a regular JSON file, got a FIFO, socket or device");
    const auto size = fs::file_size(path, ec);
    if (ec) mst::fail(where, "file", "expected a readable JSON file (its size cannot be read)");
    if (size > static_cast<std::uintmax_t>(limits::kJsonBytes))
        mst::fail(where, "file", fmt::format("expected a JSON file of at most {} MiB, got {} bytes", limits::kJsonBytes >> 20, size));
    std::ifstream in(path, std::ios::binary);
    if (!in) mst::fail(where, "file", "expected a readable JSON file (not found or not readable)");
    // Read in blocks up to one byte past the limit: a file that grows while read (or a /proc file
    // whose size reads 0) is still bounded.
    std::string text;
    std::string block(1 << 16, '\0');
    while (in && text.size() <= static_cast<std::size_t>(limits::kJsonBytes)) {
        in.read(block.data(), static_cast<std::streamsize>(block.size()));
        text.append(block.data(), static_cast<std::size_t>(in.gcount()));
    }
    if (in.bad()) mst::fail(where, "file", "expected a readable JSON file (reading it failed)");
    if (text.size() > static_cast<std::size_t>(limits::kJsonBytes))
        mst::fail(where, "file", fmt::format("expected a JSON file of at most {} MiB", limits::kJsonBytes >> 20));
    return parse_json_text(text, where);
}

std::string shown(const nlohmann::json& v) {
    if (v.is_array()) return "an array";
    if (v.is_object()) return "an object";
    // Scalars only: dump() cannot recurse. Invalid UTF-8 cannot come from the parser; replace anyway.
    std::string s = v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    if (s.size() > 40) s = s.substr(0, 37) + "...";
    return printable(s);
}

std::optional<std::int64_t> as_integer(const nlohmann::json& v, std::int64_t min, std::int64_t max) {
    if (v.is_number_integer()) {
        if (v.is_number_unsigned() && v.get<std::uint64_t>() > static_cast<std::uint64_t>(INT64_MAX)) return std::nullopt;
        const std::int64_t x = v.get<std::int64_t>();
        if (x < min || x > max) return std::nullopt;
        return x;
    }
    if (v.is_number_float()) {
        // Range first (as doubles): casting a double beyond int64 is undefined.
        const double d = v.get<double>();
        if (!(d >= static_cast<double>(min) && d <= static_cast<double>(max)) || d != std::floor(d)) return std::nullopt;
        const auto x = static_cast<std::int64_t>(d);
        if (x < min || x > max) return std::nullopt;  // max near 2^63 rounds up as a double
        return x;
    }
    return std::nullopt;
}

JsonReader::JsonReader(const nlohmann::json& object, std::string where, std::string prefix)
    : obj_(object), where_(std::move(where)), prefix_(std::move(prefix)) {
    if (!obj_.is_object())
        mst::fail(where_, prefix_.empty() ? "(top level)" : prefix_.substr(0, prefix_.size() - 1),
                  fmt::format("expected a JSON object, got {}", shown(obj_)));
}

void JsonReader::fail(const std::string& key, const std::string& expected) const {
    mst::fail(where_, field(key), expected);
}

bool JsonReader::has(const std::string& key) const {
    if (std::find(asked_.begin(), asked_.end(), key) == asked_.end()) asked_.push_back(key);
    return obj_.contains(key) && !obj_.at(key).is_null();
}

void JsonReader::known(std::initializer_list<const char*> keys) const {
    for (const char* k : keys) (void)has(k);
}

void JsonReader::reject_unknown() const {
    for (const auto& [key, value] : obj_.items()) {
        if (std::find(asked_.begin(), asked_.end(), key) != asked_.end()) continue;
        const std::string name = key.size() > 64 ? key.substr(0, 61) + "..." : key;
        fail(printable(name), fmt::format("unknown key; expected one of the keys this file takes (the closest is {})",
                                          closest(key, asked_)));
    }
}

const nlohmann::json& JsonReader::raw(const std::string& key) const {
    if (!has(key)) fail(key, "missing (required field)");
    return obj_.at(key);
}

std::optional<std::int64_t> JsonReader::opt_integer(const std::string& key, std::int64_t min, std::int64_t max) const {
    if (!has(key)) return std::nullopt;
    const auto& v = obj_.at(key);
    const auto x = as_integer(v, min, max);
    if (!x) fail(key, fmt::format("expected an integer in [{}, {}], got {}", min, max, shown(v)));
    return x;
}

std::int64_t JsonReader::integer(const std::string& key, std::int64_t min, std::int64_t max) const {
    if (!has(key)) fail(key, fmt::format("missing (expected an integer in [{}, {}])", min, max));
    return *opt_integer(key, min, max);
}

std::optional<double> JsonReader::opt_number(const std::string& key, double min, double max) const {
    if (!has(key)) return std::nullopt;
    const auto& v = obj_.at(key);
    if (!v.is_number()) fail(key, fmt::format("expected a number in [{}, {}], got {}", min, max, shown(v)));
    const double x = v.get<double>();
    if (!(x >= min && x <= max)) fail(key, fmt::format("expected a number in [{}, {}], got {}", min, max, shown(v)));
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

std::string JsonReader::one_of(const std::string& key, const std::vector<std::string>& values) const {
    std::string list;
    for (const auto& v : values) list += (list.empty() ? "" : ", ") + v;
    if (!has(key)) fail(key, fmt::format("missing (expected one of {})", list));
    const auto& v = obj_.at(key);
    if (!v.is_string() || std::find(values.begin(), values.end(), v.get<std::string>()) == values.end())
        fail(key, fmt::format("expected one of {}, got {}", list, shown(v)));
    return v.get<std::string>();
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
