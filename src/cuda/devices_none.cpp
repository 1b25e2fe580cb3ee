#include "mst/devices.hpp"

namespace mst {

DeviceQuery query_local_devices() {
    DeviceQuery q;
    q.cuda_built = false;
    q.status = "this mst-plan was built without CUDA (configure with -DMST_WITH_CUDA=ON)";
    return q;
}

}  // namespace mst
