#pragma once
// The CUDA devices visible to this process. Implemented by src/cuda/devices.cu
// when built with CUDA; otherwise reports that the build has no CUDA backend.
#include <cstdint>
#include <string>
#include <vector>

namespace mst {

struct LocalDevice {
    int index = 0;
    std::string name;
    int compute_major = 0;
    int compute_minor = 0;
    std::int64_t memory_total_bytes = 0;
    std::int64_t memory_free_bytes = 0;
};

struct DeviceQuery {
    bool cuda_built = false;      // this binary has the CUDA backend
    std::string status;           // "ok", or why no device can be used
    std::vector<LocalDevice> devices;
};

DeviceQuery query_local_devices();

}  // namespace mst
