#include "mst/gpu.hpp"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "json_read.hpp"

namespace mst {

namespace {
constexpr std::int64_t kMaxMemory = std::int64_t{1} << 44;  // 16 TiB: far above any single GPU
}

GpuProfile parse_gpu(const nlohmann::json& profile, const std::string& where, const std::string& name) {
    detail::JsonReader r(profile, where);
    GpuProfile g;
    g.name = r.opt_string("name").value_or(name);
    g.display_name = r.opt_string("display_name").value_or(g.name);
    g.source = where;
    g.memory_total_bytes = r.integer("memory_total_bytes", kMiB, kMaxMemory);
    g.cuda_context_bytes = r.integer("cuda_context_bytes", 0, kMaxMemory);
    g.reserved_overhead_bytes = r.integer("reserved_overhead_bytes", 0, kMaxMemory);
    if (g.usable_bytes() <= 0)
        r.fail("reserved_overhead_bytes", "expected cuda_context_bytes + reserved_overhead_bytes below memory_total_bytes");
    g.bf16_dense_tflops = r.number("bf16_dense_tflops", 1e-3, 1e6);
    g.hbm_gbps = r.number("hbm_gbps", 1e-3, 1e6);
    g.host_link_gbps = r.number("host_link_gbps", 1e-3, 1e6);  // (every GPU has one; nvlink 0 means none: over the host link)
    g.nvlink_gbps = r.number("nvlink_gbps", 0.0, 1e6);

    auto c = r.object("calibration");
    auto& cal = g.calibration;
    cal.gemm_efficiency = c.number("gemm_efficiency", 1e-3, 1.0);
    cal.memory_bound_efficiency = c.number("memory_bound_efficiency", 1e-3, 1.0);
    cal.attention_efficiency = c.number("attention_efficiency", 1e-3, 1.0);
    cal.kernel_launch_seconds = c.number("kernel_launch_seconds", 0.0, 1.0);
    cal.cublas_workspace_bytes = c.integer("cublas_workspace_bytes", 0, kMaxMemory);
    cal.fitted = c.opt_boolean("fitted").value_or(false);
    auto a = c.object("allocator");
    auto& al = cal.allocator;
    al.round_bytes = a.integer("round_bytes", 1, kGiB);
    al.small_size_bytes = a.integer("small_size_bytes", 1, kMaxMemory);
    al.small_segment_bytes = a.integer("small_segment_bytes", 1, kMaxMemory);
    al.min_large_alloc_bytes = a.integer("min_large_alloc_bytes", 1, kMaxMemory);
    al.large_min_segment_bytes = a.integer("large_min_segment_bytes", 1, kMaxMemory);
    al.large_segment_round_bytes = a.integer("large_segment_round_bytes", 1, kMaxMemory);
    if (al.small_segment_bytes < al.small_size_bytes)
        a.fail("small_segment_bytes", "expected at least small_size_bytes (a small segment must hold a small block)");
    // A large request under min_large_alloc_bytes gets a segment of large_min_segment_bytes (PyTorch:
    // kMinLargeAlloc 10 MiB, kLargeBuffer 20 MiB), which must hold it.
    if (al.large_min_segment_bytes < al.min_large_alloc_bytes)
        a.fail("large_min_segment_bytes", fmt::format("expected at least min_large_alloc_bytes ({}): the segment a large block "
                                                      "under that size gets must hold it, got {}",
                                                      al.min_large_alloc_bytes, al.large_min_segment_bytes));
    a.reject_unknown();
    c.known({"note"});  // where the constants come from, for a person
    c.reject_unknown();
    r.known({"sources"});
    r.reject_unknown();
    return g;
}

GpuProfile load_gpu_file(const std::filesystem::path& path) {
    return parse_gpu(detail::read_json_file(path), path.string(), path.stem().string());
}

nlohmann::json to_json(const GpuProfile& g) {
    return {
        {"name", g.name},
        {"display_name", g.display_name},
        {"source", g.source},
        {"memory_total_bytes", g.memory_total_bytes},
        {"cuda_context_bytes", g.cuda_context_bytes},
        {"reserved_overhead_bytes", g.reserved_overhead_bytes},
        {"usable_bytes", g.usable_bytes()},
        {"bf16_dense_tflops", g.bf16_dense_tflops},
        {"hbm_gbps", g.hbm_gbps},
        {"host_link_gbps", g.host_link_gbps},
        {"nvlink_gbps", g.nvlink_gbps},
        {"calibration",
         {{"gemm_efficiency", g.calibration.gemm_efficiency},
          {"memory_bound_efficiency", g.calibration.memory_bound_efficiency},
          {"attention_efficiency", g.calibration.attention_efficiency},
          {"kernel_launch_seconds", g.calibration.kernel_launch_seconds},
          {"cublas_workspace_bytes", g.calibration.cublas_workspace_bytes},
          {"fitted", g.calibration.fitted}}},
    };
}

}  // namespace mst
