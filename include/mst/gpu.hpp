#pragma once
// GpuProfile: what a training process can use on one GPU and how fast it runs.
#include <cstdint>
#include <filesystem>
#include <string>

#include <nlohmann/json_fwd.hpp>

#include "mst/units.hpp"

namespace mst {

// PyTorch CUDA caching-allocator constants (c10/cuda/CUDACachingAllocator.cpp).
struct AllocatorConstants {
    bytes_t round_bytes = 512;                    // kMinBlockSize: every size rounds up to this
    bytes_t small_size_bytes = 1 * kMiB;          // kSmallSize: <= this comes from the small pool
    bytes_t small_segment_bytes = 2 * kMiB;       // kSmallBuffer: small-pool segment size
    bytes_t min_large_alloc_bytes = 10 * kMiB;    // kMinLargeAlloc: below this, 20 MiB segments
    bytes_t large_min_segment_bytes = 20 * kMiB;  // kLargeBuffer
    bytes_t large_segment_round_bytes = 2 * kMiB; // kRoundLarge: larger segments round to this
};

struct Calibration {
    double gemm_efficiency = 0.7;          // fraction of bf16_dense_tflops large GEMMs reach
    double memory_bound_efficiency = 0.8;  // fraction of hbm_gbps elementwise kernels reach
    double attention_efficiency = 0.5;     // fraction of peak FLOP/s flash attention reaches
    double kernel_launch_seconds = 4e-6;
    bytes_t cublas_workspace_bytes = 32 * kMiB;
    AllocatorConstants allocator;
    bool fitted = false;  // true once fitted from measurements
};

struct GpuProfile {
    std::string name;
    std::string display_name;
    std::string source;
    bytes_t memory_total_bytes = 0;
    bytes_t cuda_context_bytes = 0;       // taken by the driver context + loaded kernels
    bytes_t reserved_overhead_bytes = 0;  // left free for NCCL, workspaces, fragmentation
    double bf16_dense_tflops = 0;
    double hbm_gbps = 0;
    double host_link_gbps = 0;  // per direction
    double nvlink_gbps = 0;     // per GPU per direction; 0 = no NVLink
    Calibration calibration;

    // Memory a training process's caching allocator can reserve.
    bytes_t usable_bytes() const { return memory_total_bytes - cuda_context_bytes - reserved_overhead_bytes; }
};

GpuProfile parse_gpu(const nlohmann::json& profile, const std::string& where, const std::string& name);
GpuProfile load_gpu_file(const std::filesystem::path& path);
nlohmann::json to_json(const GpuProfile& g);

}  // namespace mst
