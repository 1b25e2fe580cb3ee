#include <doctest/doctest.h>

#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

#include "mst/catalog.hpp"
#include "test_support.hpp"

using namespace mst;

TEST_CASE("every GPU profile parses and leaves usable memory") {
    const auto names = gpu_names();
    CHECK(names.size() >= 8);
    for (const auto& n : names) {
        CAPTURE(n);
        const GpuProfile g = find_gpu(n);
        CHECK(g.usable_bytes() > 0);
        CHECK(g.usable_bytes() < g.memory_total_bytes);
        CHECK(g.calibration.allocator.round_bytes == 512);
    }
}

TEST_CASE("datasheet numbers of the H100 SXM and A100 80GB profiles") {
    const GpuProfile h100 = find_gpu("h100-sxm-80gb");
    CHECK(h100.bf16_dense_tflops == doctest::Approx(989.4));  // 1979 with sparsity, halved
    CHECK(h100.hbm_gbps == doctest::Approx(3350));
    CHECK(h100.memory_total_bytes == 81559LL * 1024 * 1024);  // nvidia-smi: 81559 MiB
    const GpuProfile a100 = find_gpu("a100-80gb");
    CHECK(a100.bf16_dense_tflops == doctest::Approx(312));
    CHECK(a100.memory_total_bytes == 80LL * 1024 * 1024 * 1024);
}

TEST_CASE("a profile whose overheads eat all memory is rejected on that field") {
    const std::string path = test::data("broken/gpu_no_usable_memory.json");
    const auto msg = test::expect_user_error([&] { (void)load_gpu_file(path); });
    CHECK(msg.rfind(path + ": reserved_overhead_bytes: ", 0) == 0);
}

// Found by the simulate fuzzer: a large request under min_large_alloc_bytes gets one segment of
// large_min_segment_bytes; a smaller segment than the request would hand out a block smaller than
// the tensor (allocated bytes under requested ones).
TEST_CASE("allocator constants whose smallest large segment cannot hold a large block are refused") {
    std::ifstream in(std::string(MST_SOURCE_DATA_DIR) + "/profiles/h100-sxm-80gb.json");
    nlohmann::json j = nlohmann::json::parse(in);
    j["calibration"]["allocator"]["min_large_alloc_bytes"] = 34288183;  // over the 20 MiB segment
    const auto msg = test::expect_user_error([&] { (void)parse_gpu(j, "g.json", "g"); });
    CHECK(msg.rfind("g.json: calibration.allocator.large_min_segment_bytes: expected at least min_large_alloc_bytes (34288183)", 0) == 0);
    j["calibration"]["allocator"]["min_large_alloc_bytes"] = 20971520;  // equal: the segment holds it
    CHECK_NOTHROW((void)parse_gpu(j, "g.json", "g"));
}
