#pragma once
// The CUDA backend as a shared module (libmst-plan-cuda.so, built next to mst-plan). Planning
// commands never touch a GPU, so the mst-plan binary links none of the CUDA code or libraries
// (loading libcudart, libcublasLt and libcupti alone costs about 70 ms and 200 MiB of resident
// memory); the commands that use a GPU (`measure --backend cuda`, `bench kernels`, `devices`)
// open the module on first use (module_loader.cpp). The module holds src/cuda with its own
// copy of the core and the executor, and exports one symbol: the entry point below.
//
// The binary and the module come from the same build, but a module copied from another one
// could disagree on the types that cross; the entry carries their sizes as the module saw
// them, and the loader refuses a module whose sizes differ from its own.
#include <array>
#include <cstddef>
#include <cstdint>

#include "mst/devices.hpp"
#include "mst/execute.hpp"
#include "mst/kernel_bench.hpp"

namespace mst::cuda_module {

constexpr std::uint32_t kVersion = 1;  // raise when Entry changes
constexpr const char* kEntryPoint = "mst_cuda_module_entry";

using Layout = std::array<std::size_t, 9>;
constexpr Layout layout() {
    return {sizeof(ModelSpec),    sizeof(TrainingSetup),      sizeof(ExecuteOptions),
            sizeof(CudaOptions),  sizeof(MeasuredStep),       sizeof(DeviceReport),
            sizeof(DeviceQuery),  sizeof(KernelBenchRequest), sizeof(KernelBenchResult)};
}

struct Entry {
    std::uint32_t version = kVersion;  // first, so that any module's can be read
    Layout layout{};
    DeviceQuery (*query_local_devices)() = nullptr;
    KernelBenchResult (*run_kernel_bench)(const KernelBenchRequest&) = nullptr;
    MeasuredStep (*execute_cuda)(const ModelSpec&, const TrainingSetup&, std::uint64_t, const ExecuteOptions&,
                                 const CudaOptions&) = nullptr;
};

}  // namespace mst::cuda_module

// Defined by the module (module.cpp): its functions, valid as long as the module stays loaded.
extern "C" const mst::cuda_module::Entry* mst_cuda_module_entry();
