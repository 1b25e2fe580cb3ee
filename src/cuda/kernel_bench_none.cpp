// `bench kernels` in a build without CUDA: one clear line (exit code 2), never a crash.
#include "mst/error.hpp"
#include "mst/kernel_bench.hpp"

namespace mst {

KernelBenchResult run_kernel_bench(const KernelBenchRequest&) {
    fail("bench kernels", "build",
         "expected an mst-plan built with CUDA (configure with -DMST_WITH_CUDA=ON on a machine with the CUDA toolkit)");
}

}  // namespace mst
