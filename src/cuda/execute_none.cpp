// execute_cuda in a build without CUDA: a user error that says so.
#include "mst/error.hpp"
#include "mst/execute.hpp"

namespace mst {

MeasuredStep execute_cuda(const ModelSpec&, const TrainingSetup&, std::uint64_t, const ExecuteOptions&,
                          const CudaOptions&) {
    fail("--backend", "cuda", "this mst-plan was built without CUDA (configure with -DMST_WITH_CUDA=ON); use --backend cpu");
}

}  // namespace mst
