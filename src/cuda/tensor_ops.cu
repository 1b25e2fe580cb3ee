// Elementwise ops (cast, scale, fills, residual, soft-capping), the embedding and repeat_kv: the
// device twins of src/exec/cpu/tensor_ops.cpp and attention.cpp's repeat_kv. Memory-bound
// grid-stride loops, one element per thread per step; the dtype branch is uniform.
#include <cmath>
#include <stdexcept>
#include <string>

#include "common.cuh"

namespace mst::cuda {

namespace detail {
void contract_violation(const char* kernel, const char* what) {
    throw std::logic_error(std::string(kernel) + ": " + what);
}
void cuda_failure(const char* what, cudaError_t err) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}
}  // namespace detail

using detail::grid_for;
using detail::kThreads;
using detail::ld;
using detail::st;

namespace {

// out[n] = in[n] * s
__global__ void scale_kernel(Tensor out, ConstTensor in, std::int64_t n, float s) {
    for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n;
         i += std::int64_t(gridDim.x) * blockDim.x)
        st(out, i, ld(in, i) * s);
}

// out[n] = value
__global__ void fill_kernel(Tensor out, std::int64_t n, float value) {
    for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n;
         i += std::int64_t(gridDim.x) * blockDim.x)
        st(out, i, value);
}

// out[n] = half_width * (2 u_i - 1) from splitmix64(key + (i + 1) * golden); see kernels.hpp.
// u and 2u - 1 are exact in fp32 (an FMA contraction of 2u - 1 changes nothing), the product
// rounds once and st() rounds to the storage dtype as the CPU does: bitwise the CPU's values.
__global__ void fill_uniform_kernel(Tensor out, std::int64_t n, float half_width, std::uint64_t key) {
    for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n;
         i += std::int64_t(gridDim.x) * blockDim.x) {
        std::uint64_t z = key + (static_cast<std::uint64_t>(i) + 1) * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        const float u = static_cast<float>(z >> 40) * (1.0f / 16777216.0f);
        st(out, i, half_width * (2.0f * u - 1.0f));
    }
}

// out[n] = a[n] + b[n]
__global__ void add_kernel(Tensor out, ConstTensor a, ConstTensor b, std::int64_t n) {
    for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n;
         i += std::int64_t(gridDim.x) * blockDim.x)
        st(out, i, ld(a, i) + ld(b, i));
}

// y[n] = cap * tanh(x[n] / cap)
__global__ void softcap_forward_kernel(Tensor y, ConstTensor x, std::int64_t n, float cap) {
    for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n;
         i += std::int64_t(gridDim.x) * blockDim.x)
        st(y, i, cap * tanhf(ld(x, i) / cap));
}

// dx[n] = dy[n] * (1 - (y/cap)^2)
__global__ void softcap_backward_kernel(Tensor dx, ConstTensor dy, ConstTensor y, std::int64_t n, float cap) {
    for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n;
         i += std::int64_t(gridDim.x) * blockDim.x) {
        const float th = ld(y, i) / cap;
        st(dx, i, ld(dy, i) * (1.0f - th * th));
    }
}

// out[n,d] = table[ids[n], :]; an id outside [0, V) writes a NaN row
__global__ void embedding_forward_kernel(Tensor out, ConstTensor table, const std::int64_t* ids, std::int64_t n,
                                         std::int64_t d, std::int64_t V) {
    for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n * d;
         i += std::int64_t(gridDim.x) * blockDim.x) {
        const std::int64_t r = i / d, c = i - r * d, id = ids[r];
        st(out, i, id >= 0 && id < V ? ld(table, id * d + c) : NAN);
    }
}

// dtable[V,d] += dout[n,d] scattered by ids[n], one atomic add per element; an id outside
// [0, V) is skipped (nothing valid to poison: its gradient has nowhere to go)
__global__ void embedding_backward_kernel(Tensor dtable, ConstTensor dout, const std::int64_t* ids, std::int64_t n,
                                          std::int64_t d, std::int64_t V) {
    for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n * d;
         i += std::int64_t(gridDim.x) * blockDim.x) {
        const std::int64_t r = i / d, c = i - r * d, id = ids[r];
        if (id < 0 || id >= V) continue;
        const float g = ld(dout, i);
        if (dtable.dtype == DType::F32)
            atomicAdd(static_cast<float*>(dtable.data) + id * d + c, g);
        else
            atomicAdd(static_cast<bf16*>(dtable.data) + id * d + c, __float2bfloat16_rn(g));
    }
}

// out[rows, nh*hd] from in[rows, nkv*hd]: head h of row r is kv head h / rep
__global__ void repeat_kv_forward_kernel(Tensor out, ConstTensor in, std::int64_t rows, std::int64_t nh,
                                         std::int64_t nkv, std::int64_t hd) {
    const std::int64_t rep = nh / nkv, total = rows * nh * hd;
    for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < total;
         i += std::int64_t(gridDim.x) * blockDim.x) {
        const std::int64_t e = i % hd, h = (i / hd) % nh, r = i / (hd * nh);
        st(out, i, ld(in, (r * nkv + h / rep) * hd + e));
    }
}

// din[rows, nkv*hd] = sum over the rep copies of dout[rows, nh*hd], in fp32
__global__ void repeat_kv_backward_kernel(Tensor din, ConstTensor dout, std::int64_t rows, std::int64_t nh,
                                          std::int64_t nkv, std::int64_t hd) {
    const std::int64_t rep = nh / nkv, total = rows * nkv * hd;
    for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < total;
         i += std::int64_t(gridDim.x) * blockDim.x) {
        const std::int64_t e = i % hd, j = (i / hd) % nkv, r = i / (hd * nkv);
        float acc = 0.0f;
        for (std::int64_t h = j * rep; h < (j + 1) * rep; ++h) acc += ld(dout, (r * nh + h) * hd + e);
        st(din, i, acc);
    }
}

// out[r, c] += b[c] over n x o elements, grid-stride
__global__ void bias_forward_kernel(Tensor out, ConstTensor b, std::int64_t n, std::int64_t o) {
    for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n * o;
         i += std::int64_t(gridDim.x) * blockDim.x)
        st(out, i, ld(out, i) + ld(b, i % o));
}

constexpr int kBiasStripe = 32;      // columns per bias-gradient block
constexpr int kBiasStripeRows = 16;  // warps per block, splitting the rows

// db[c] += sum over rows of dout[r, c]; block (32 x 16), grid ceil(o / 32) (rmsnorm's dw shape)
__global__ void bias_backward_kernel(Tensor db, ConstTensor dout, std::int64_t n, std::int64_t o) {
    __shared__ float partial[kBiasStripeRows][kBiasStripe + 1];
    const std::int64_t c = std::int64_t(blockIdx.x) * kBiasStripe + threadIdx.x;
    float acc = 0.0f;
    if (c < o)
        for (std::int64_t r = threadIdx.y; r < n; r += kBiasStripeRows) acc += ld(dout, r * o + c);
    partial[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < o) {
        float s = 0.0f;
        for (int j = 0; j < kBiasStripeRows; ++j) s += partial[j][threadIdx.x];
        st(db, c, ld(db, c) + s);
    }
}

}  // namespace

// out[n] = in[n]
void cast(Tensor out, ConstTensor in, std::int64_t n, cudaStream_t stream) { scale(out, in, n, 1.0f, stream); }

// out[n] = in[n] * s
void scale(Tensor out, ConstTensor in, std::int64_t n, float s, cudaStream_t stream) {
    detail::require(n >= 0, "scale", "n must be >= 0");
    if (n == 0) return;
    detail::require(out && in, "scale", "out and in are required");
    scale_kernel<<<grid_for(n), kThreads, 0, stream>>>(out, in, n, s);
    detail::check_launch("scale");
}

// out[n] = 0 (all-zero bits are 0.0 in fp32 and bf16 alike)
void zero(Tensor out, std::int64_t n, cudaStream_t stream) {
    detail::require(n >= 0, "zero", "n must be >= 0");
    if (n == 0) return;
    detail::check(cudaMemsetAsync(out.data, 0, static_cast<std::size_t>(n * dtype_bytes(out.dtype)), stream), "zero");
}

// out[n] = value
void fill(Tensor out, std::int64_t n, float value, cudaStream_t stream) {
    detail::require(n >= 0, "fill", "n must be >= 0");
    if (n == 0) return;
    detail::require(static_cast<bool>(out), "fill", "out is required");
    fill_kernel<<<grid_for(n), kThreads, 0, stream>>>(out, n, value);
    detail::check_launch("fill");
}

// out[n] uniform in [-half_width, half_width) from (key, i)
void fill_uniform(Tensor out, std::int64_t n, float half_width, std::uint64_t key, cudaStream_t stream) {
    detail::require(n >= 0, "fill_uniform", "n must be >= 0");
    if (n == 0) return;
    detail::require(static_cast<bool>(out), "fill_uniform", "out is required");
    fill_uniform_kernel<<<grid_for(n), kThreads, 0, stream>>>(out, n, half_width, key);
    detail::check_launch("fill_uniform");
}

// out[n, o] += b[o]
void bias_forward(Tensor out, ConstTensor b, std::int64_t n, std::int64_t o, cudaStream_t stream) {
    detail::require(n >= 0 && o >= 0, "bias_forward", "n and o must be >= 0");
    if (n == 0 || o == 0) return;
    bias_forward_kernel<<<grid_for(n * o), kThreads, 0, stream>>>(out, b, n, o);
    detail::check_launch("bias_forward");
}

// db[o] += column sums of dout[n, o]
void bias_backward(Tensor db, ConstTensor dout, std::int64_t n, std::int64_t o, cudaStream_t stream) {
    detail::require(n >= 0 && o >= 0, "bias_backward", "n and o must be >= 0");
    if (n == 0 || o == 0) return;
    const auto stripes = static_cast<unsigned>((o + kBiasStripe - 1) / kBiasStripe);
    bias_backward_kernel<<<stripes, dim3(kBiasStripe, kBiasStripeRows), 0, stream>>>(db, dout, n, o);
    detail::check_launch("bias_backward");
}

// out[n] = a[n] + b[n]
void residual_forward(Tensor out, ConstTensor a, ConstTensor b, std::int64_t n, cudaStream_t stream) {
    detail::require(n >= 0, "residual_forward", "n must be >= 0");
    if (n == 0) return;
    add_kernel<<<grid_for(n), kThreads, 0, stream>>>(out, a, b, n);
    detail::check_launch("residual_forward");
}

// a[n] += b[n]
void residual_accumulate(Tensor a, ConstTensor b, std::int64_t n, cudaStream_t stream) {
    detail::require(n >= 0, "residual_accumulate", "n must be >= 0");
    if (n == 0) return;
    add_kernel<<<grid_for(n), kThreads, 0, stream>>>(a, a, b, n);
    detail::check_launch("residual_accumulate");
}

// y[n] = cap * tanh(x[n] / cap)
void softcap_forward(Tensor y, ConstTensor x, std::int64_t n, float cap, cudaStream_t stream) {
    detail::require(cap > 0.0f, "softcap_forward", "cap must be positive");
    if (n <= 0) return;
    softcap_forward_kernel<<<grid_for(n), kThreads, 0, stream>>>(y, x, n, cap);
    detail::check_launch("softcap_forward");
}

// dx[n] = dy * (1 - (y/cap)^2)
void softcap_backward(Tensor dx, ConstTensor dy, ConstTensor y, std::int64_t n, float cap, cudaStream_t stream) {
    detail::require(cap > 0.0f, "softcap_backward", "cap must be positive");
    if (n <= 0) return;
    softcap_backward_kernel<<<grid_for(n), kThreads, 0, stream>>>(dx, dy, y, n, cap);
    detail::check_launch("softcap_backward");
}

// out[n,d] = table[ids[n], :]; table [V,d]
void embedding_forward(Tensor out, ConstTensor table, const std::int64_t* ids, std::int64_t n, std::int64_t d,
                       std::int64_t V, cudaStream_t stream) {
    detail::require(n >= 0 && d > 0 && V > 0, "embedding_forward", "need n >= 0, d > 0, V > 0");
    if (n == 0) return;
    detail::require(ids != nullptr, "embedding_forward", "ids are required");
    embedding_forward_kernel<<<grid_for(n * d), kThreads, 0, stream>>>(out, table, ids, n, d, V);
    detail::check_launch("embedding_forward");
}

// dtable[V,d] += scatter(dout[n,d] by ids[n])
void embedding_backward(Tensor dtable, ConstTensor dout, const std::int64_t* ids, std::int64_t n, std::int64_t d,
                        std::int64_t V, cudaStream_t stream) {
    detail::require(n >= 0 && d > 0 && V > 0, "embedding_backward", "need n >= 0, d > 0, V > 0");
    if (n == 0) return;
    detail::require(ids != nullptr, "embedding_backward", "ids are required");
    embedding_backward_kernel<<<grid_for(n * d), kThreads, 0, stream>>>(dtable, dout, ids, n, d, V);
    detail::check_launch("embedding_backward");
}

// out[rows, nh*hd] = in[rows, nkv*hd] with kv heads repeated
void repeat_kv_forward(Tensor out, ConstTensor in, std::int64_t rows, std::int64_t nh, std::int64_t nkv,
                       std::int64_t hd, cudaStream_t stream) {
    detail::require(nh > 0 && nkv > 0 && nh % nkv == 0, "repeat_kv_forward", "nkv must divide nh");
    detail::require(hd > 0 && hd <= kMaxHeadDim, "repeat_kv_forward", "head_dim must be in (0, kMaxHeadDim]");
    if (rows <= 0) return;
    repeat_kv_forward_kernel<<<grid_for(rows * nh * hd), kThreads, 0, stream>>>(out, in, rows, nh, nkv, hd);
    detail::check_launch("repeat_kv_forward");
}

// din[rows, nkv*hd] = sum of the copies in dout[rows, nh*hd]
void repeat_kv_backward(Tensor din, ConstTensor dout, std::int64_t rows, std::int64_t nh, std::int64_t nkv,
                        std::int64_t hd, cudaStream_t stream) {
    detail::require(nh > 0 && nkv > 0 && nh % nkv == 0, "repeat_kv_backward", "nkv must divide nh");
    detail::require(hd > 0 && hd <= kMaxHeadDim, "repeat_kv_backward", "head_dim must be in (0, kMaxHeadDim]");
    if (rows <= 0) return;
    repeat_kv_backward_kernel<<<grid_for(rows * nkv * hd), kThreads, 0, stream>>>(din, dout, rows, nh, nkv, hd);
    detail::check_launch("repeat_kv_backward");
}

}  // namespace mst::cuda
