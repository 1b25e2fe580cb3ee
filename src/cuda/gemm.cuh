#pragma once
// The linear layers' GEMMs through cuBLASLt, in the CPU kernels' layout (PyTorch's: y = x W^T,
// weights [out, in], row-major activations): the device twins of linear_forward,
// linear_backward_input and linear_backward_weight in src/exec/cpu/kernels.hpp.
// bf16 (or fp32) inputs, fp32 compute (CUBLAS_COMPUTE_32F: no TF32 for fp32 inputs), bf16 or
// fp32 outputs; `accumulate` adds into the output (beta = 1).
//
// A GemmContext owns the cuBLASLt handle and a per-shape cache of descriptors and the
// heuristic's algorithm; the workspace is a caller buffer (the executor allocates it through
// its DeviceAllocator, category Workspace: PyTorch gives cuBLAS 32 MiB on Hopper), so the
// GEMMs allocate nothing. Includable from plain C++.
#include <cstddef>
#include <cstdint>
#include <memory>

#include "kernels.cuh"

namespace mst::cuda {

class GemmContext {
public:
    // workspace: device buffer of workspace_bytes (>= 0; more lets cuBLASLt pick split-K kernels)
    GemmContext(void* workspace, std::size_t workspace_bytes);
    ~GemmContext();
    // A new workspace (the old one's plans are dropped); the handle stays.
    void set_workspace(void* workspace, std::size_t workspace_bytes);
    GemmContext(const GemmContext&) = delete;
    GemmContext& operator=(const GemmContext&) = delete;

    struct Impl;
    Impl& impl() { return *impl_; }

private:
    std::unique_ptr<Impl> impl_;
};

inline constexpr std::size_t kDefaultGemmWorkspaceBytes = 32u << 20;  // PyTorch's cuBLAS workspace on Hopper

// out[n,o] (+)= in[n,i] W[o,i]^T
void linear_forward(GemmContext& ctx, Tensor out, ConstTensor in, ConstTensor W, std::int64_t n, std::int64_t i,
                    std::int64_t o, bool accumulate = false, cudaStream_t stream = nullptr);
// din[n,i] (+)= dout[n,o] W[o,i]
void linear_backward_input(GemmContext& ctx, Tensor din, ConstTensor dout, ConstTensor W, std::int64_t n,
                           std::int64_t i, std::int64_t o, bool accumulate = false, cudaStream_t stream = nullptr);
// dW[o,i] (+)= dout[n,o]^T in[n,i]
void linear_backward_weight(GemmContext& ctx, Tensor dW, ConstTensor dout, ConstTensor in, std::int64_t n,
                            std::int64_t i, std::int64_t o, bool accumulate, cudaStream_t stream = nullptr);

}  // namespace mst::cuda
