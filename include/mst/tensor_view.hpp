#pragma once
// A caller-owned buffer and how its elements are stored: the argument type of every
// kernel, on the CPU (Bf16 = Eigen::bfloat16) and on CUDA (Bf16 = __nv_bfloat16). The
// converting constructors let typed pointers be passed directly.
#include <cstdint>

namespace mst {

enum class DType : std::uint8_t { F32, BF16 };

constexpr std::int64_t dtype_bytes(DType t) { return t == DType::F32 ? 4 : 2; }

template <class Bf16>
struct BasicTensor {
    void* data = nullptr;
    DType dtype = DType::F32;
    BasicTensor() = default;
    BasicTensor(void* p, DType t) : data(p), dtype(t) {}
    BasicTensor(float* p) : data(p), dtype(DType::F32) {}  // NOLINT(google-explicit-constructor)
    BasicTensor(Bf16* p) : data(p), dtype(DType::BF16) {}  // NOLINT(google-explicit-constructor)
    explicit operator bool() const { return data != nullptr; }
};

template <class Bf16>
struct BasicConstTensor {
    const void* data = nullptr;
    DType dtype = DType::F32;
    BasicConstTensor() = default;
    BasicConstTensor(const void* p, DType t) : data(p), dtype(t) {}
    BasicConstTensor(BasicTensor<Bf16> t) : data(t.data), dtype(t.dtype) {}  // NOLINT(google-explicit-constructor)
    BasicConstTensor(const float* p) : data(p), dtype(DType::F32) {}         // NOLINT(google-explicit-constructor)
    BasicConstTensor(const Bf16* p) : data(p), dtype(DType::BF16) {}         // NOLINT(google-explicit-constructor)
    explicit operator bool() const { return data != nullptr; }
};

}  // namespace mst
