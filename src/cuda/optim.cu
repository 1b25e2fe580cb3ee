// Optimizer steps, the device twins of src/exec/cpu/optim.cpp, fused and multi-tensor like
// PyTorch's `fused=True` / `foreach=True` paths (aten/src/ATen/native/cuda/MultiTensorApply.cuh):
// a launch carries, by value, a table of up to kMultiTensorMax tensors and a map from each of its
// (up to kMultiTensorBlocks) blocks to a (tensor, chunk of kMultiTensorChunk elements) pair; a
// tensor that does not fit in one launch continues in the next. The formulas are the CPU
// kernel's, in fp32, each value rounded once into its storage dtype; the bias corrections are
// computed on the host in double, as the CPU kernel does.
#include <cmath>
#include <vector>

#include "common.cuh"

namespace mst::cuda {

using detail::ld;
using detail::st;

namespace {

// The launch's tensor table: Depth buffers per tensor (AdamW: param, grad, m, v).
template <int Depth>
struct TensorList {
    void* ptr[Depth][kMultiTensorMax];
    DType dtype[Depth][kMultiTensorMax];
    std::int64_t n[kMultiTensorMax];
    unsigned char block_tensor[kMultiTensorBlocks];
    int block_chunk[kMultiTensorBlocks];
};
static_assert(sizeof(TensorList<4>) <= 4096, "kernel parameters stay under the classic 4 KiB limit");

struct AdamWArgs {
    float beta1, beta2, eps, step_size, bc2_sqrt, decay;
};

__global__ void adamw_kernel(TensorList<4> tl, AdamWArgs a) {
    const int t = tl.block_tensor[blockIdx.x];
    const std::int64_t n = tl.n[t], begin = std::int64_t(tl.block_chunk[blockIdx.x]) * kMultiTensorChunk;
    const std::int64_t end = begin + kMultiTensorChunk < n ? begin + kMultiTensorChunk : n;
    void *p = tl.ptr[0][t], *m = tl.ptr[2][t], *v = tl.ptr[3][t];
    const void* g = tl.ptr[1][t];
    const DType pt = tl.dtype[0][t], gt = tl.dtype[1][t], mt = tl.dtype[2][t], vt = tl.dtype[3][t];
    for (std::int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
        float pi = ld(p, pt, i) * a.decay;
        const float gi = ld(g, gt, i);
        const float mi = a.beta1 * ld(m, mt, i) + (1.0f - a.beta1) * gi;
        const float vi = a.beta2 * ld(v, vt, i) + (1.0f - a.beta2) * gi * gi;
        pi -= a.step_size * mi / (sqrtf(vi) / a.bc2_sqrt + a.eps);
        st(p, pt, i, pi);
        st(m, mt, i, mi);
        st(v, vt, i, vi);
    }
}

struct SgdArgs {
    float lr, momentum, dampening, weight_decay;
    bool nesterov, first_step;
};

__global__ void sgd_kernel(TensorList<3> tl, SgdArgs a) {
    const int t = tl.block_tensor[blockIdx.x];
    const std::int64_t n = tl.n[t], begin = std::int64_t(tl.block_chunk[blockIdx.x]) * kMultiTensorChunk;
    const std::int64_t end = begin + kMultiTensorChunk < n ? begin + kMultiTensorChunk : n;
    void *p = tl.ptr[0][t], *b = tl.ptr[2][t];
    const void* g = tl.ptr[1][t];
    const DType pt = tl.dtype[0][t], gt = tl.dtype[1][t], bt = tl.dtype[2][t];
    for (std::int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const float pi = ld(p, pt, i);
        float d = ld(g, gt, i) + a.weight_decay * pi;
        if (a.momentum != 0.0f) {
            const float buf = a.first_step ? d : a.momentum * ld(b, bt, i) + (1.0f - a.dampening) * d;
            st(b, bt, i, buf);
            d = a.nesterov ? d + a.momentum * buf : buf;
        }
        st(p, pt, i, pi - a.lr * d);
    }
}

// Walks the tensors, filling tables and launching `launch(table, blocks)` whenever a table's
// blocks or tensors run out. `fill(table, slot, i)` copies tensor i's buffers into a slot.
template <int Depth, class Fill, class Launch>
void multi_tensor_apply(std::int64_t count, const std::int64_t* sizes, Fill fill, Launch launch) {
    TensorList<Depth> tl{};
    int slot = 0, blocks = 0;
    for (std::int64_t i = 0; i < count; ++i) {
        const std::int64_t n = sizes[i];
        if (n == 0) continue;
        fill(tl, slot, i);
        tl.n[slot] = n;
        const std::int64_t chunks = (n + kMultiTensorChunk - 1) / kMultiTensorChunk;
        for (std::int64_t c = 0; c < chunks; ++c) {
            tl.block_tensor[blocks] = static_cast<unsigned char>(slot);
            tl.block_chunk[blocks] = static_cast<int>(c);
            ++blocks;
            const bool last_chunk = c + 1 == chunks;
            if (blocks == kMultiTensorBlocks || (last_chunk && slot + 1 == kMultiTensorMax)) {
                launch(tl, blocks);
                blocks = 0;
                if (last_chunk) {
                    slot = -1;  // the next tensor starts a fresh table
                } else {        // this tensor continues in the next launch, from slot 0
                    for (int d = 0; d < Depth; ++d) {
                        tl.ptr[d][0] = tl.ptr[d][slot];
                        tl.dtype[d][0] = tl.dtype[d][slot];
                    }
                    tl.n[0] = tl.n[slot];
                    slot = 0;
                }
            }
        }
        ++slot;
    }
    if (blocks > 0) launch(tl, blocks);
}

constexpr int kOptimThreads = 512;

}  // namespace

void adamw_step(const AdamWTensor* tensors, std::int64_t count, const AdamWConfig& c, std::int64_t step,
                cudaStream_t stream) {
    detail::require(step >= 1, "adamw_step", "step counts from 1");
    detail::require(count >= 0 && (count == 0 || tensors != nullptr), "adamw_step", "a list of count tensors");
    std::vector<std::int64_t> sizes(static_cast<std::size_t>(count));
    for (std::int64_t i = 0; i < count; ++i) {
        const AdamWTensor& t = tensors[i];
        detail::require(t.n >= 0, "adamw_step", "n must be >= 0");
        detail::require(t.n == 0 || (t.param && t.grad && t.m && t.v), "adamw_step", "param, grad, m and v are required");
        detail::require((t.n + kMultiTensorChunk - 1) / kMultiTensorChunk < (std::int64_t{1} << 31), "adamw_step",
                        "tensor too large");
        sizes[static_cast<std::size_t>(i)] = t.n;
    }
    const double bc1 = 1.0 - std::pow(double(c.beta1), double(step));
    const double bc2 = 1.0 - std::pow(double(c.beta2), double(step));
    const AdamWArgs args{c.beta1, c.beta2, c.eps, static_cast<float>(c.lr / bc1), static_cast<float>(std::sqrt(bc2)),
                         1.0f - c.lr * c.weight_decay};
    multi_tensor_apply<4>(
        count, sizes.data(),
        [tensors](TensorList<4>& tl, int slot, std::int64_t i) {
            const AdamWTensor& t = tensors[i];
            tl.ptr[0][slot] = t.param.data, tl.dtype[0][slot] = t.param.dtype;
            tl.ptr[1][slot] = const_cast<void*>(t.grad.data), tl.dtype[1][slot] = t.grad.dtype;
            tl.ptr[2][slot] = t.m.data, tl.dtype[2][slot] = t.m.dtype;
            tl.ptr[3][slot] = t.v.data, tl.dtype[3][slot] = t.v.dtype;
        },
        [&](const TensorList<4>& tl, int blocks) {
            adamw_kernel<<<static_cast<unsigned>(blocks), kOptimThreads, 0, stream>>>(tl, args);
            detail::check_launch("adamw_step");
        });
}

void adamw_step(Tensor param, ConstTensor grad, Tensor m, Tensor v, std::int64_t n, const AdamWConfig& c,
                std::int64_t step, cudaStream_t stream) {
    const AdamWTensor t{param, grad, m, v, n};
    adamw_step(&t, 1, c, step, stream);
}

void sgd_step(const SgdTensor* tensors, std::int64_t count, const SgdConfig& c, std::int64_t step,
              cudaStream_t stream) {
    detail::require(step >= 1, "sgd_step", "step counts from 1");
    detail::require(count >= 0 && (count == 0 || tensors != nullptr), "sgd_step", "a list of count tensors");
    std::vector<std::int64_t> sizes(static_cast<std::size_t>(count));
    for (std::int64_t i = 0; i < count; ++i) {
        const SgdTensor& t = tensors[i];
        detail::require(t.n >= 0, "sgd_step", "n must be >= 0");
        detail::require(t.n == 0 || (t.param && t.grad), "sgd_step", "param and grad are required");
        detail::require(t.n == 0 || c.momentum == 0.0f || t.momentum_buf, "sgd_step", "momentum needs a momentum buffer");
        detail::require((t.n + kMultiTensorChunk - 1) / kMultiTensorChunk < (std::int64_t{1} << 31), "sgd_step",
                        "tensor too large");
        sizes[static_cast<std::size_t>(i)] = t.n;
    }
    const SgdArgs args{c.lr, c.momentum, c.dampening, c.weight_decay, c.nesterov, step == 1};
    multi_tensor_apply<3>(
        count, sizes.data(),
        [tensors](TensorList<3>& tl, int slot, std::int64_t i) {
            const SgdTensor& t = tensors[i];
            tl.ptr[0][slot] = t.param.data, tl.dtype[0][slot] = t.param.dtype;
            tl.ptr[1][slot] = const_cast<void*>(t.grad.data), tl.dtype[1][slot] = t.grad.dtype;
            tl.ptr[2][slot] = t.momentum_buf.data, tl.dtype[2][slot] = t.momentum_buf.dtype;
        },
        [&](const TensorList<3>& tl, int blocks) {
            sgd_kernel<<<static_cast<unsigned>(blocks), kOptimThreads, 0, stream>>>(tl, args);
            detail::check_launch("sgd_step");
        });
}

void sgd_step(Tensor param, ConstTensor grad, Tensor momentum_buf, std::int64_t n, const SgdConfig& c,
              std::int64_t step, cudaStream_t stream) {
    const SgdTensor t{param, grad, momentum_buf, n};
    sgd_step(&t, 1, c, step, stream);
}

}  // namespace mst::cuda
