// compare_timelines: the views and the first divergence, on timelines altered by hand.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>

#include <fmt/format.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "mst/catalog.hpp"
#include "mst/compare.hpp"
#include "mst/execute.hpp"
#include "mst/report.hpp"
#include "mst/simulate.hpp"
#include "sim_test_support.hpp"

using namespace mst;
using namespace mst::test;

TEST_CASE("compare: a timeline against itself is identical with zero errors") {
    const ModelSpec m = find_model("tiny-llama");
    const Timeline t = simulate(m, tiny_setup(32), test_gpu());
    const Comparison c = compare_timelines(t, t, m.num_layers);
    CHECK(c.identical());
    CHECK(c.rows.front().label == "peak");
    for (const CompareRow& r : c.rows) CHECK(r.error() == 0);
}

TEST_CASE("compare: one event 512 bytes larger is found, and so is the peak it raises") {
    const ModelSpec m = find_model("tiny-llama");
    const Timeline predicted = simulate(m, tiny_setup(32), test_gpu());
    const Summary s = summarize(predicted, m.num_layers);
    Timeline measured = predicted;
    // Grow the allocation that sets the peak, and its free, by 512 bytes.
    const auto peak = static_cast<std::size_t>(s.peak.event);
    const std::int64_t id = measured.events[peak].tensor;
    for (Event& e : measured.events)
        if (e.tensor == id) e.bytes += 512;
    const Comparison c = compare_timelines(predicted, measured, m.num_layers);
    REQUIRE(c.divergence);
    CHECK(*c.divergence <= static_cast<std::int64_t>(peak));
    CHECK(c.predicted_event->tensor == id);
    CHECK(c.measured_event->bytes == c.predicted_event->bytes + 512);
    CHECK(c.peak_error() == 512);
    CHECK(c.rows.front().relative() == doctest::Approx(512.0 / double(s.peak.bytes)));
}

TEST_CASE("compare: a row predicted as 0 and measured otherwise has no finite relative error, and says so") {
    // 0 -> 3 MiB is not "+100 %" (what an older rule printed: it read as off by two): the relative error is
    // infinite, printed "n/a", null in JSON; a 2 MiB prediction measured 3 MiB is +50 %.
    const CompareRow zero{"category host", 0, 3 << 20}, both{"category host", 0, 0}, half{"peak", 2 << 20, 3 << 20};
    CHECK(std::isinf(zero.relative()));
    CHECK(zero.relative() > 0);
    CHECK(relative_text(zero.relative()) == "n/a (predicted 0)");
    CHECK(relative_json(zero.relative()).is_null());
    CHECK(both.relative() == 0);
    CHECK(relative_text(both.relative()) == "+0.000%");
    CHECK(relative_text(half.relative(), " %") == "+50.000 %");
    CHECK(relative_json(half.relative()) == 0.5);
    // report: its outliers hold such a row over any limit.
    ReportRow r;
    r.file = "m.json", r.peak = zero;
    const std::vector<ReportRow> rows{r};
    CHECK(report_outliers(rows, ReportLimits{}).size() == 1);
}

TEST_CASE("compare: the frees that empty the autocast cache match in any order, other frees and allocations do not") {
    // amp with every layer checkpointed: the forward's weight copies are held by autocast's cache
    // alone and freed together as the forward's autocast region ends (a hash map: in no fixed order).
    const ModelSpec m = find_model("tiny-llama");
    TrainingSetup s;
    s.seq_len = 32;
    s.precision = Precision::AmpFp32;
    s.checkpoint = parse_checkpoint_spec("all", m.num_layers, "test");
    const Timeline predicted = simulate(m, s, test_gpu());
    // Two consecutive frees (of different sizes) that are, or are not, autocast copies, swapped.
    auto swapped = [&](bool autocast) {
        Timeline t = predicted;
        for (std::size_t i = 0; i + 1 < t.events.size(); ++i) {
            const Event &a = t.events[i], &b = t.events[i + 1];
            if (!a.alloc && !b.alloc && a.bytes != b.bytes && (a.name == "autocast_weight") == autocast &&
                (b.name == "autocast_weight") == autocast) {
                std::swap(t.events[i], t.events[i + 1]);
                return std::make_pair(t, static_cast<std::int64_t>(i));
            }
        }
        FAIL("no two such frees");
        return std::make_pair(t, std::int64_t{-1});
    };
    const auto [cache, i] = swapped(true);
    CHECK(compare_timelines(predicted, cache, m.num_layers).identical());
    const auto [other, j] = swapped(false);
    const Comparison c = compare_timelines(predicted, other, m.num_layers);
    REQUIRE(c.divergence);
    CHECK(*c.divergence == j);
    // Allocations in another order diverge where they do.
    Timeline allocs = predicted;
    for (std::size_t k = 0; k + 1 < allocs.events.size(); ++k)
        if (allocs.events[k].alloc && allocs.events[k + 1].alloc && allocs.events[k].bytes != allocs.events[k + 1].bytes) {
            std::swap(allocs.events[k], allocs.events[k + 1]);
            REQUIRE(compare_timelines(predicted, allocs, m.num_layers).divergence);
            CHECK(*compare_timelines(predicted, allocs, m.num_layers).divergence == static_cast<std::int64_t>(k));
            break;
        }
    // A cache-emptying run with another tensor in it still diverges.
    Timeline bigger = cache;
    bigger.events[static_cast<std::size_t>(i)].bytes += 2;
    CHECK_FALSE(compare_timelines(predicted, bigger, m.num_layers).identical());
    // In a run that empties the cache, a free of anything else keeps its place: moved to the run's
    // start (past the copies' frees before it), it diverges there.
    Timeline moved = predicted;
    for (std::size_t k = 1; k < moved.events.size(); ++k) {
        const Event& e = moved.events[k];
        if (e.alloc || e.name == "autocast_weight" || moved.events[k - 1].alloc || moved.events[k - 1].name != "autocast_weight")
            continue;
        std::size_t start = k - 1;
        while (start > 0 && !moved.events[start - 1].alloc && moved.events[start - 1].name == "autocast_weight") --start;
        const Event stray = e;
        moved.events.erase(moved.events.begin() + static_cast<std::ptrdiff_t>(k));
        moved.events.insert(moved.events.begin() + static_cast<std::ptrdiff_t>(start), stray);
        const Comparison d = compare_timelines(predicted, moved, m.num_layers);
        REQUIRE(d.divergence);
        CHECK(*d.divergence == static_cast<std::int64_t>(start));
        break;
    }
}

TEST_CASE("compare: a missing last event diverges where the shorter timeline ends") {
    const ModelSpec m = find_model("tiny-llama");
    const Timeline predicted = simulate(m, tiny_setup(32), test_gpu());
    Timeline measured = predicted;
    measured.events.pop_back();
    const Comparison c = compare_timelines(predicted, measured, m.num_layers);
    REQUIRE(c.divergence);
    CHECK(*c.divergence == static_cast<std::int64_t>(measured.events.size()));
    CHECK(c.predicted_event);
    CHECK(!c.measured_event);
}

TEST_CASE("report: committed measurements re-simulate to their own rows, a measurement that is off is an outlier") {
    namespace fs = std::filesystem;
    const fs::path dir = fs::temp_directory_path() / fmt::format("mst_report_test_{}", ::getpid());
    fs::remove_all(dir);
    fs::create_directories(dir / "good");
    fs::create_directories(dir / "doubled");
    const ModelSpec m = find_model("tiny-llama");
    TrainingSetup s = kernels_setup();
    s.seq_len = 64, s.mlp_chunks = 2, s.lm_chunks = 2;
    s.checkpoint.assign(static_cast<std::size_t>(m.num_layers), true);
    const MeasuredStep step = execute_cpu(m, s, 3);
    nlohmann::json j = measurement_json(step, "cpu", m, s, 3, 0);
    std::ofstream(dir / "good" / "measured.json") << j.dump();
    for (auto& e : j["timeline"]["events"]) e[2] = e[2].get<std::int64_t>() * 2;  // [kind, tensor, bytes, ...]: every tensor twice its size
    std::ofstream(dir / "doubled" / "measured.json") << j.dump();
    std::ofstream(dir / "not_a_measurement.json") << R"({"format": "something else"})";
    std::ofstream(dir / "killed_while_writing.json") << R"({"format": "mst-measure/1", "timel)";
    j["format"] = "mst-measure/1 ";  // a measurement under a format name report does not read
    std::ofstream(dir / "mislabelled.json") << j.dump();
    j["format"] = " MST-Measure/1";
    std::ofstream(dir / "mislabelled_capitals.json") << j.dump();
    j["format"] = "mst-measure/1";
    j["error"] = "oom";  // a trainer's run that failed: no peaks to compare
    std::ofstream(dir / "out_of_memory.json") << j.dump();

    std::vector<SkippedFile> skipped;
    const std::vector<ReportRow> rows =
        build_report({dir.string(), (dir / "good" / "measured.json").string()}, find_gpu("h100-sxm-80gb"), &skipped);
    REQUIRE(rows.size() == 2);  // path order: doubled, good (given twice, reported once)
    REQUIRE(skipped.size() == 4);  // in the order met: not the other JSON
    std::sort(skipped.begin(), skipped.end(), [](const SkippedFile& a, const SkippedFile& b) { return a.path < b.path; });
    CHECK(skipped[0].path.ends_with("killed_while_writing.json"));
    CHECK(skipped[0].reason.rfind("json: expected valid JSON, parse error at byte ", 0) == 0);  // (the reader's words)
    CHECK(skipped[1].path.ends_with("mislabelled.json"));
    CHECK(skipped[1].reason == "format 'mst-measure/1 ', not mst-measure/1");
    CHECK(skipped[2].path.ends_with("mislabelled_capitals.json"));
    CHECK(skipped[3].path.ends_with("out_of_memory.json"));
    CHECK(skipped[3].reason == "a run that failed, with no peaks to compare");
    const ReportRow& doubled = rows[0];
    const ReportRow& good = rows[1];
    CHECK(good.identical == std::optional<bool>(true));
    CHECK(good.peak.error() == 0);
    CHECK(good.peak.measured == summarize(step.timeline, m.num_layers).peak.bytes);
    CHECK(good.setup == "seq 64, pure-bf16, flash, MLP 2 loop, LM head 2 recompute, checkpoint 2/2");
    CHECK(doubled.identical == std::optional<bool>(false));
    CHECK(doubled.peak.measured == 2 * doubled.peak.predicted);
    CHECK(doubled.peak.relative() == doctest::Approx(1.0));
    const auto outliers = report_outliers(rows, ReportLimits{});
    REQUIRE(outliers.size() == 1);
    CHECK(outliers[0]->file == doubled.file);
    const std::string md = report_markdown(rows, "mst-plan report X");
    CHECK(md.find("| `" + good.file + "` | tiny-llama | cpu |") != std::string::npos);
    CHECK(md.find("+100.000 %") != std::string::npos);
    // What a measurement names stays in its cell: a file or model name with a bar, a line break or a
    // backtick neither adds a row nor ends a code span.
    std::vector<ReportRow> odd = {rows[1]};
    odd[0].file = "a|b`c\nd.json";
    odd[0].model = "tiny\n| fake | row |";
    const std::string odd_md = report_markdown(odd, "mst-plan report X");
    CHECK(odd_md.find("| `a\\|b'c\\nd.json` | tiny\\n\\| fake \\| row \\| | cpu |") != std::string::npos);
    CHECK(std::count(odd_md.begin(), odd_md.end(), '\n') == std::count(md.begin(), md.end(), '\n') - 1);
    fs::remove_all(dir);
}
