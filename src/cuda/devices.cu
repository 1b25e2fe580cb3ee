// Queries the CUDA runtime for local devices. Never throws: a machine without a
// driver or GPU is a normal case (CI, laptops) and is reported in `status`.
#include <cuda_runtime.h>

#include "mst/devices.hpp"

namespace mst {

DeviceQuery query_local_devices() {
    DeviceQuery q;
    q.cuda_built = true;
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
        q.status = std::string("no usable CUDA device: ") + cudaGetErrorString(err);
        return q;
    }
    for (int i = 0; i < count; ++i) {
        cudaDeviceProp prop{};
        if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
        LocalDevice d;
        d.index = i;
        d.name = prop.name;
        d.compute_major = prop.major;
        d.compute_minor = prop.minor;
        size_t free_bytes = 0, total_bytes = 0;
        if (cudaSetDevice(i) == cudaSuccess && cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess) {
            d.memory_free_bytes = static_cast<std::int64_t>(free_bytes);
            d.memory_total_bytes = static_cast<std::int64_t>(total_bytes);
        } else {
            d.memory_total_bytes = static_cast<std::int64_t>(prop.totalGlobalMem);
        }
        q.devices.push_back(d);
    }
    q.status = count > 0 ? "ok" : "no CUDA device found";
    return q;
}

}  // namespace mst
