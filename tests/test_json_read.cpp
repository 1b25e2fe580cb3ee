// The JSON reading layer every file goes through (src/core/json_read): bounded before parsing,
// one-line errors for everything nlohmann can throw, strict integers, and unknown keys named.
#include <doctest/doctest.h>

#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <string>

#include <nlohmann/json.hpp>

#include "json_read.hpp"
#include "mst/limits.hpp"
#include "test_support.hpp"

using namespace mst;
namespace fs = std::filesystem;

namespace {

struct TempDir {
    fs::path path;
    TempDir() : path(fs::temp_directory_path() / ("mst-plan-test-json-" + std::to_string(std::random_device{}()))) {
        fs::create_directories(path);
    }
    ~TempDir() { fs::remove_all(path); }
    std::string file(const std::string& name, const std::string& text) const {
        std::ofstream(path / name, std::ios::binary) << text;
        return (path / name).string();
    }
};

std::string parse_error(const std::string& text) {
    return test::expect_user_error([&] { (void)detail::parse_json_text(text, "t.json"); });
}

}  // namespace

TEST_CASE("JSON nested deeper than the bound is refused before parsing, wherever the brackets are") {
    const std::string ok = std::string(64, '[') + std::string(64, ']');
    CHECK(detail::parse_json_text(ok, "t.json").is_array());
    CHECK(parse_error(std::string(65, '[') + std::string(65, ']')) ==
          "t.json: json: expected arrays and objects nested at most 64 deep, got deeper at byte 65");
    // 100,000 levels: dump() would recurse 100,000 times.
    CHECK(parse_error("{\"a\": " + std::string(100000, '[') + std::string(100000, ']') + "}").find("nested at most 64") !=
          std::string::npos);
    // Brackets inside strings, escaped quotes included, are not nesting.
    const std::string in_string = "{\"a\": \"" + std::string(100, '[') + "\\\"" + std::string(100, '{') + "\"}";
    CHECK(detail::parse_json_text(in_string, "t.json")["a"].get<std::string>().size() == 201);
}

TEST_CASE("every nlohmann exception is one line naming the file: syntax, numbers beyond a double") {
    CHECK(parse_error("{\"a\": 1,}").rfind("t.json: json: expected valid JSON, parse error at byte ", 0) == 0);
    CHECK(parse_error("{\"a\": 1e309}") ==
          "t.json: json: expected valid JSON with numbers a double can hold, got number overflow parsing '1e309'");
    CHECK(parse_error("-1e400").find("number overflow") != std::string::npos);
    CHECK(parse_error(std::string("{\"a\": \"\xff\"}")).find("parse error at byte") != std::string::npos);
    CHECK(parse_error("").find("parse error") != std::string::npos);
}

TEST_CASE("files: only regular files within the size bound are opened") {
    TempDir dir;
    CHECK(detail::read_json_file(dir.file("ok.json", "{\"a\": 1}"))["a"] == 1);
    CHECK(test::expect_user_error([&] { (void)detail::read_json_file(dir.path); }) ==
          dir.path.string() + ": file: expected a JSON file, got a directory");
    const fs::path fifo = dir.path / "fifo.json";
    REQUIRE(mkfifo(fifo.c_str(), 0600) == 0);
    // Opening a FIFO would block until a writer comes: refused from its type alone.
    CHECK(test::expect_user_error([&] { (void)detail::read_json_file(fifo); }).find("expected a regular JSON file") !=
          std::string::npos);
    CHECK(test::expect_user_error([&] { (void)detail::read_json_file("/dev/zero"); }).find("expected a regular") !=
          std::string::npos);
    CHECK(test::expect_user_error([&] { (void)detail::read_json_file(dir.path / "missing.json"); }).find(": file: ") !=
          std::string::npos);
    // One byte over the bound, without writing 512 MiB: a sparse file.
    const fs::path big = dir.path / "big.json";
    std::ofstream(big, std::ios::binary) << "[";
    fs::resize_file(big, static_cast<std::uintmax_t>(limits::kJsonBytes) + 1);
    CHECK(test::expect_user_error([&] { (void)detail::read_json_file(big); }).find("expected a JSON file of at most 512 MiB") !=
          std::string::npos);
}

TEST_CASE("integers are read strictly: no fraction, no boolean, nothing cast from beyond int64") {
    const auto j = nlohmann::json::parse(
        R"({"ok": 4096, "float_ok": 4096.0, "frac": 4096.5, "big": 18446744073709551615, "huge": 1e20,
            "neg": -3, "yes": true, "text": "4096"})");
    const detail::JsonReader r(j, "t.json");
    CHECK(r.integer("ok", 1, 1 << 20) == 4096);
    CHECK(r.integer("float_ok", 1, 1 << 20) == 4096);
    CHECK(test::expect_user_error([&] { (void)r.integer("frac", 1, 1 << 20); }) ==
          "t.json: frac: expected an integer in [1, 1048576], got 4096.5");
    // Shown as written, not clamped or wrapped.
    CHECK(test::expect_user_error([&] { (void)r.integer("big", 1, INT64_MAX); }) ==
          "t.json: big: expected an integer in [1, 9223372036854775807], got 18446744073709551615");
    CHECK(test::expect_user_error([&] { (void)r.integer("huge", 1, INT64_MAX); }).ends_with("got 1e+20"));
    CHECK(test::expect_user_error([&] { (void)r.integer("neg", 0, 10); }).ends_with("got -3"));
    CHECK(test::expect_user_error([&] { (void)r.integer("yes", 0, 10); }).ends_with("got true"));
    CHECK(test::expect_user_error([&] { (void)r.integer("text", 0, 10000); }).ends_with("got \"4096\""));
    CHECK(detail::as_integer(nlohmann::json(9.3e18), 0, INT64_MAX) == std::nullopt);  // rounds past INT64_MAX
    CHECK(detail::shown(nlohmann::json::parse(R"([[1, 2], {"a": 1}])")) == "an array");
    CHECK(detail::shown(nlohmann::json("line\nbreak")) == "\"line\\nbreak\"");  // JSON-escaped, one line
}

TEST_CASE("unknown keys are refused with the closest known one, keys named known() are allowed") {
    const auto j = nlohmann::json::parse(R"({"seq_len": 1, "notes": "x", "sequence_length": 4096})");
    const detail::JsonReader r(j, "s.json");
    (void)r.opt_integer("seq_len", 1, 10);
    (void)r.opt_integer("micro_batch", 1, 10);
    r.known({"notes"});
    CHECK(test::expect_user_error([&] { r.reject_unknown(); }) ==
          "s.json: sequence_length: unknown key; expected one of the keys this file takes (the closest is seq_len)");
    const auto nested = nlohmann::json::parse(R"({"calibration": {"gemm_eff": 1}})");
    const detail::JsonReader top(nested, "g.json");
    const detail::JsonReader cal = top.object("calibration");
    (void)cal.opt_number("gemm_efficiency", 0, 1);
    CHECK(test::expect_user_error([&] { cal.reject_unknown(); }).rfind("g.json: calibration.gemm_eff: unknown key", 0) == 0);
}

TEST_CASE("a key given twice in one object is refused, naming it, and the same key in two objects is not") {
    CHECK(parse_error("{\"seq_len\": 8192, \"seq_len\": 16}") ==
          "t.json: json: expected each key once in an object, got \"seq_len\" twice");
    CHECK(parse_error("{\"a\": {\"b\": 1, \"c\": [{\"d\": 1, \"d\": 2}]}}") ==
          "t.json: json: expected each key once in an object, got \"d\" twice");
    const nlohmann::json ok = detail::parse_json_text("{\"a\": {\"b\": 1}, \"c\": {\"b\": 2}, \"d\": [{\"b\": 3}, {\"b\": 4}]}", "t.json");
    CHECK(ok["d"][1]["b"] == 4);
    // (the name is printed as a message prints user text: on its line)
    CHECK(parse_error("{\"a\\nb\": 1, \"a\\nb\": 2}") == "t.json: json: expected each key once in an object, got \"a\\nb\" twice");
}
