// The CUDA test runner. With --requires-device it first asks CUDA for a device and, when none
// is usable (no GPU, no driver: CI and this project's build machines), prints one line and exits
// with kSkipExitCode (77), which ctest reports as "skipped" (SKIP_RETURN_CODE). Every test that
// needs a device also checks on its own (MST_REQUIRE_DEVICE), so running the binary by hand
// without the flag passes with "skipped" messages instead of failing.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "support.hpp"

namespace mst::cuda_test {

bool has_device(std::string* why) {
    static const auto probe = [] {
        int count = 0;
        const cudaError_t err = cudaGetDeviceCount(&count);
        if (err != cudaSuccess) return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
        if (count == 0) return std::string("cudaGetDeviceCount found no device");
        return std::string();
    }();
    if (why) *why = probe;
    return probe.empty();
}

}  // namespace mst::cuda_test

int main(int argc, char** argv) {
    bool requires_device = false;
    std::vector<char*> args;
    for (int i = 0; i < argc; ++i) {
        if (std::strcmp(argv[i], "--requires-device") == 0)
            requires_device = true;
        else
            args.push_back(argv[i]);
    }
    std::string why;
    if (requires_device && !mst::cuda_test::has_device(&why)) {
        std::printf("no CUDA device: skipped (%s)\n", why.c_str());
        return mst::cuda_test::kSkipExitCode;
    }
    doctest::Context context(static_cast<int>(args.size()), args.data());
    return context.run();
}
