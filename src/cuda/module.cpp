// The CUDA module's one exported symbol: the backend's functions for mst-plan (module.hpp).
#include "cuda/module.hpp"

extern "C" __attribute__((visibility("default"))) const mst::cuda_module::Entry* mst_cuda_module_entry() {
    static const mst::cuda_module::Entry entry{mst::cuda_module::kVersion, mst::cuda_module::layout(),
                                               &mst::query_local_devices, &mst::run_kernel_bench, &mst::execute_cuda};
    return &entry;
}
