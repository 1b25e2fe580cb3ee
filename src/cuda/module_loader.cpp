// query_local_devices, run_kernel_bench and execute_cuda as mst-plan sees them: the CUDA
// module (module.hpp) opened on first use, so that only these three reach the CUDA libraries.
// When the module cannot be used -- this build has no CUDA, the file is missing, or the CUDA
// libraries it needs are not installed -- they say why the way the backend says it has no
// device: `devices` prints it, the other two raise the one-line UserError (exit code 2).
#include <dlfcn.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include <fmt/format.h>

#include "cuda/module.hpp"
#include "mst/error.hpp"

namespace mst {

namespace {

constexpr const char* kNoCuda = "this mst-plan was built without CUDA (configure with -DMST_WITH_CUDA=ON)";

struct Backend {
    const cuda_module::Entry* entry = nullptr;
    bool built = false;  // this build has the module
    std::string why;     // without entry: why the module cannot be used
};

#ifdef MST_CUDA_MODULE_FILE
// The module next to the running binary (the build tree and an install put it there), or the
// file MST_CUDA_MODULE names.
std::string module_path() {
    if (const char* env = std::getenv("MST_CUDA_MODULE"); env && *env) return env;
    std::error_code ec;
    const std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", ec);
    return ec ? std::string(MST_CUDA_MODULE_FILE) : (exe.parent_path() / MST_CUDA_MODULE_FILE).string();
}

Backend open_module() {
    Backend b;
    b.built = true;
    const std::string path = module_path();
    // Never closed: the functions, and exceptions thrown from the module, live in it.
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        const char* e = dlerror();
        b.why = fmt::format("cannot load the CUDA backend module {} ({})", path, e ? e : "unknown error");
        return b;
    }
    auto* get = reinterpret_cast<const cuda_module::Entry* (*)()>(dlsym(handle, cuda_module::kEntryPoint));
    const cuda_module::Entry* entry = get ? get() : nullptr;
    if (!entry || entry->version != cuda_module::kVersion || entry->layout != cuda_module::layout()) {
        b.why = fmt::format("the CUDA backend module {} does not belong to this mst-plan (rebuild both)", path);
        return b;
    }
    b.entry = entry;
    return b;
}
#else
Backend open_module() { return Backend{nullptr, false, kNoCuda}; }
#endif

const Backend& backend() {
    static const Backend b = open_module();
    return b;
}

}  // namespace

DeviceQuery query_local_devices() {
    const Backend& b = backend();
    if (b.entry) return b.entry->query_local_devices();
    DeviceQuery q;
    q.cuda_built = b.built;
    q.status = b.built ? "no usable CUDA device: " + b.why : b.why;
    return q;
}

KernelBenchResult run_kernel_bench(const KernelBenchRequest& request) {
    const Backend& b = backend();
    if (b.entry) return b.entry->run_kernel_bench(request);
    if (!b.built)
        fail("bench kernels", "build",
             "expected an mst-plan built with CUDA (configure with -DMST_WITH_CUDA=ON on a machine with the CUDA toolkit)");
    fail("bench kernels", "device", "expected a usable CUDA device, got " + b.why);
}

MeasuredStep execute_cuda(const ModelSpec& model, const TrainingSetup& setup, std::uint64_t seed,
                          const ExecuteOptions& options, const CudaOptions& cuda) {
    const Backend& b = backend();
    if (b.entry) return b.entry->execute_cuda(model, setup, seed, options, cuda);
    fail("--backend", "cuda", (b.built ? "no usable CUDA device: " + b.why : b.why) + "; use --backend cpu");
}

}  // namespace mst
