#pragma once
// Shared by the CUDA tests: device detection (tests skip cleanly without one), random inputs,
// and `Pair`, one tensor held twice with the same bytes: a host buffer for the CPU kernel and a
// device buffer for its CUDA twin.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "cuda/kernels.cuh"
#include "exec/cpu/kernels.hpp"
#include "../test_support.hpp"

namespace mst::cuda_test {

namespace cpu = mst::exec::cpu;
namespace gpu = mst::cuda;
using Vec = std::vector<float>;

// The exit code ctest reads as "skipped" (SKIP_RETURN_CODE in tests/cuda/CMakeLists.txt).
inline constexpr int kSkipExitCode = 77;

// Whether a usable CUDA device exists; `why` says what cudaGetDeviceCount answered otherwise.
bool has_device(std::string* why = nullptr);

// First line of every test that needs a device.
#define MST_REQUIRE_DEVICE()                                                       \
    do {                                                                           \
        std::string why_;                                                          \
        if (!::mst::cuda_test::has_device(&why_)) {                                \
            MESSAGE("no CUDA device: skipped (" << why_ << ")");                   \
            return;                                                                \
        }                                                                          \
    } while (0)

inline Vec randn(std::int64_t n, unsigned seed, float sd = 1.0f) {
    std::mt19937 gen(seed);
    std::normal_distribution<float> dist(0.0f, sd);
    Vec v(static_cast<std::size_t>(n));
    for (float& x : v) x = dist(gen);
    return v;
}

// v rounded to bf16: values an fp32 and a bf16 buffer hold alike
inline Vec bf16_exact(Vec v) {
    for (float& x : v) x = static_cast<float>(cpu::bf16(x));
    return v;
}

inline std::vector<std::int64_t> random_ids(std::int64_t n, std::int64_t V, unsigned seed) {
    std::mt19937 gen(seed);
    std::uniform_int_distribution<std::int64_t> d(0, V - 1);
    std::vector<std::int64_t> ids(static_cast<std::size_t>(n));
    for (auto& id : ids) id = d(gen);
    return ids;
}

using mst::test::rel_err;

inline void cuda_ok(cudaError_t e, const char* what) {
    INFO(what << ": " << cudaGetErrorString(e));
    REQUIRE(e == cudaSuccess);
}

// A device allocation, freed on scope exit.
class DeviceBuffer {
public:
    explicit DeviceBuffer(std::size_t bytes) : bytes_(bytes) {
        if (bytes_ > 0) cuda_ok(cudaMalloc(&p_, bytes_), "cudaMalloc");
    }
    ~DeviceBuffer() {
        if (p_) cudaFree(p_);
    }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    DeviceBuffer(DeviceBuffer&& o) noexcept : p_(o.p_), bytes_(o.bytes_) { o.p_ = nullptr, o.bytes_ = 0; }
    DeviceBuffer& operator=(DeviceBuffer&&) = delete;
    void* get() const { return p_; }
    std::size_t bytes() const { return bytes_; }

private:
    void* p_ = nullptr;
    std::size_t bytes_ = 0;
};

// Host vector -> device array of T (int64 ids, labels), and back.
template <class T>
class DeviceArray {
public:
    explicit DeviceArray(const std::vector<T>& host) : buf_(host.size() * sizeof(T)) {
        if (!host.empty()) cuda_ok(cudaMemcpy(buf_.get(), host.data(), buf_.bytes(), cudaMemcpyHostToDevice), "upload");
    }
    explicit DeviceArray(std::size_t n) : buf_(n * sizeof(T)) {
        if (n > 0) cuda_ok(cudaMemset(buf_.get(), 0, buf_.bytes()), "cudaMemset");
    }
    T* get() const { return static_cast<T*>(buf_.get()); }
    std::vector<T> download() const {
        std::vector<T> h(buf_.bytes() / sizeof(T));
        if (!h.empty()) cuda_ok(cudaMemcpy(h.data(), buf_.get(), buf_.bytes(), cudaMemcpyDeviceToHost), "download");
        return h;
    }

private:
    DeviceBuffer buf_;
};

// One tensor stored in `dtype` on the host (for the CPU kernel) and on the device (for the CUDA
// kernel), both starting from `values` rounded once into the dtype.
class Pair {
public:
    Pair(const Vec& values, cpu::DType dtype)
        : dtype_(dtype), n_(values.size()), host_(n_ * static_cast<std::size_t>(cpu::dtype_bytes(dtype))),
          dev_(host_.size()) {
        cpu::Tensor h(host_.data(), dtype_);
        for (std::size_t i = 0; i < n_; ++i) cpu::store(h, static_cast<std::int64_t>(i), values[i]);
        if (!host_.empty()) cuda_ok(cudaMemcpy(dev_.get(), host_.data(), host_.size(), cudaMemcpyHostToDevice), "upload");
    }
    cpu::Tensor cpu() { return {host_.data(), dtype_}; }
    gpu::Tensor gpu() { return {dev_.get(), dtype_ == cpu::DType::F32 ? gpu::DType::F32 : gpu::DType::BF16}; }
    // The host buffer's values (what the CPU kernel left there)
    Vec cpu_values() const {
        Vec v(n_);
        const cpu::ConstTensor h(host_.data(), dtype_);
        for (std::size_t i = 0; i < n_; ++i) v[i] = cpu::load(h, static_cast<std::int64_t>(i));
        return v;
    }
    // The device buffer's values (what the CUDA kernel left there); synchronises
    Vec gpu_values() const {
        std::vector<unsigned char> raw(host_.size());
        cuda_ok(cudaDeviceSynchronize(), "kernel");
        if (!raw.empty()) cuda_ok(cudaMemcpy(raw.data(), dev_.get(), raw.size(), cudaMemcpyDeviceToHost), "download");
        Vec v(n_);
        const cpu::ConstTensor h(raw.data(), dtype_);
        for (std::size_t i = 0; i < n_; ++i) v[i] = cpu::load(h, static_cast<std::int64_t>(i));
        return v;
    }

private:
    cpu::DType dtype_;
    std::size_t n_;
    std::vector<unsigned char> host_;
    DeviceBuffer dev_;
};

inline gpu::DType to_gpu(cpu::DType t) { return t == cpu::DType::F32 ? gpu::DType::F32 : gpu::DType::BF16; }

}  // namespace mst::cuda_test
