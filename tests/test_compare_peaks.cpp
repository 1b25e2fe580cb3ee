// Peaks-only measurements (a trainer's run: scripts/torch_crosscheck.py) against the simulator.
#include <doctest/doctest.h>

#include <fstream>

#include <nlohmann/json.hpp>

#include "mst/catalog.hpp"
#include "mst/compare.hpp"
#include "mst/simulate.hpp"
#include "sim_test_support.hpp"
#include "test_support.hpp"

using namespace mst;

TEST_CASE("a peaks-only measurement compares its allocated and reserved peaks with the simulator's") {
    const StepFile f = load_step_file(test::data("torch_measure_tiny.json"));
    REQUIRE(f.peaks.has_value());
    CHECK(f.timeline.events.empty());
    CHECK(f.timeline.source == "torch");
    const GpuProfile gpu = find_gpu("h100-sxm-80gb");
    const auto rows = compare_peaks(f, gpu);
    REQUIRE(rows.size() == 2);
    // The measured side is the file's numbers; the predicted side is the simulation of the
    // setup the file names, on the profile given (its 32 MiB cuBLAS workspace included). A
    // trainer's file without a runtime ran transformers + PyTorch: the hf runtime.
    CHECK(rows[0].measured == 40'000'000);
    CHECK(rows[1].measured == 44'040'192);
    const ModelSpec m = find_model("tiny-llama");
    TrainingSetup s;
    CHECK(s.runtime == Runtime::Hf);
    s.seq_len = 256, s.mlp_chunks = 2, s.lm_chunks = 4, s.checkpoint = {true, true};
    const MemoryPeaks p = simulate_peaks(m, s, gpu);
    CHECK(rows[0].predicted == p.peak_allocated_bytes);
    CHECK(rows[1].predicted == p.peak_reserved_bytes);
    CHECK(p.peak_allocated_bytes > 32 * kMiB);  // the workspace is in
    CHECK(rows[0].relative() == doctest::Approx(static_cast<double>(40'000'000 - p.peak_allocated_bytes) /
                                                static_cast<double>(p.peak_allocated_bytes)));
}

TEST_CASE("a run that ran out of memory has no peaks to compare: one error naming its error") {
    const std::string path = test::data("torch_measure_oom.json");
    const auto msg = test::expect_user_error([&] { (void)load_step_file(path); });
    CHECK(msg == path + ": error: expected none: this run failed (oom) and recorded no step");
    // Its error left out, the missing peaks are named.
    nlohmann::json j = nlohmann::json::parse(std::ifstream(path));
    j.erase("error");
    const auto no_error = test::expect_user_error([&] { (void)parse_step_file(j, path); });
    CHECK(no_error.rfind(path + ": summary: expected the run's peaks", 0) == 0);
}

TEST_CASE("a measurement's setup with runtime null is its backend's default runtime, as one without the key") {
    // (null reads as absent everywhere; the cpu executor runs mst-plan's kernels)
    const std::string path = std::string(MST_SOURCE_DATA_DIR) + "/results/cpu/tiny-default/measured.json";
    nlohmann::json j = nlohmann::json::parse(std::ifstream(path));
    REQUIRE(j.at("backend") == "cpu");
    for (const bool null : {false, true}) {
        if (null) j["setup"]["runtime"] = nullptr;
        else j["setup"].erase("runtime");
        const StepFile f = parse_step_file(j, path);
        CHECK(measured_step(f).second.runtime == Runtime::Kernels);
    }
}
