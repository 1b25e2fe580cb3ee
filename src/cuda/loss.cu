// Cross-entropy over V classes, rows whose label is kIgnoreIndex skipped: the device twin of
// src/exec/cpu/loss.cpp.
//  * Hugging Face style: logp [n, V] fp32 written out, the backward forms softmax - onehot (or,
//    unfused as PyTorch runs it, nll_loss's dense gradient then log_softmax's backward).
//  * Fused (MsT / Liger): one block per row; pass 1 reads the row once with an online max/sum
//    (per-thread running max m and sum s of exp(z - m), then merged across the block), giving
//    lse; pass 2 reads it again and overwrites it with (softmax - onehot) * scale * dz/dx. The
//    only [n, V] buffer is the logits chunk itself. bf16 rows move 8 elements per 16-byte access
//    when V % 8 == 0 (Llama-3's 128256 is): 6 bytes of traffic per logit in all.
// The loss is accumulated in float64 (atomicAdd) so that chunks add up to the unchunked sum up
// to float64 rounding; each row's loss is fp32, as the CPU kernel's.
// A label that is neither kIgnoreIndex nor in [0, V) is a caller bug the host cannot see: the
// row's loss and gradient become NaN (the CPU kernel throws).
#include <cmath>

#include "common.cuh"

namespace mst::cuda {

using detail::ld;
using detail::MaxSum;
using detail::online_add;
using detail::st;

namespace {

constexpr int kRowThreads = 512;  // threads per row block

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void from_float(float* p, float v) { *p = v; }
__device__ __forceinline__ void from_float(bf16* p, float v) { *p = __float2bfloat16_rn(v); }

// N consecutive elements at p (16-byte aligned when N > 1) as float, and back
template <class T, int N>
__device__ __forceinline__ void load_n(const T* p, float* out) {
    if constexpr (N == 1)
        out[0] = to_float(p[0]);
    else
        detail::load16(p, out);
}
template <class T, int N>
__device__ __forceinline__ void store_n(T* p, const float* in) {
    if constexpr (N == 1)
        from_float(p, in[0]);
    else
        detail::store16(p, in);
}

// labels[n] != kIgnoreIndex, counted into *count
__global__ void count_valid_kernel(std::int64_t* count, const std::int64_t* labels, std::int64_t n) {
    __shared__ float red[32];
    float c = 0.0f;
    for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n;
         i += std::int64_t(gridDim.x) * blockDim.x)
        c += labels[i] != kIgnoreIndex ? 1.0f : 0.0f;  // < 2^24 per thread: exact
    const float total = detail::block_sum(c, red);
    if (threadIdx.x == 0 && total > 0.0f)
        atomicAdd(reinterpret_cast<unsigned long long*>(count), static_cast<unsigned long long>(total));
}

// HF style, one block per row: logp[r, :] = x - lse(x), *loss_sum += lse - x[label]
__global__ void ce_forward_kernel(float* logp, ConstTensor logits, const std::int64_t* labels, std::int64_t V,
                                  double* loss_sum) {
    __shared__ float red[64];
    const std::int64_t r = blockIdx.x, base = r * V;
    MaxSum acc{-INFINITY, 0.0f};
    for (std::int64_t j = threadIdx.x; j < V; j += blockDim.x) acc = online_add(acc, ld(logits, base + j));
    acc = detail::block_combine(acc, red);  // synchronises: every read above precedes the writes below
    const float lse = acc.m + logf(acc.s);
    const std::int64_t label = labels[r];
    if (threadIdx.x == 0 && label != kIgnoreIndex && loss_sum) {
        const bool valid = label >= 0 && label < V;
        atomicAdd(loss_sum, valid ? double(lse) - double(ld(logits, base + label)) : double(NAN));
    }
    __syncthreads();  // the label's logit is read before logp (which may be the logits) is written
    for (std::int64_t j = threadIdx.x; j < V; j += blockDim.x) logp[base + j] = ld(logits, base + j) - lse;
}

// dlogits[r, j] = (exp(logp) - onehot) * scale, 0 on ignored rows; grid-stride over n*V
__global__ void ce_backward_kernel(Tensor dlogits, const float* logp, const std::int64_t* labels, std::int64_t n,
                                   std::int64_t V, float scale) {
    for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n * V;
         i += std::int64_t(gridDim.x) * blockDim.x) {
        const std::int64_t r = i / V, j = i - r * V, label = labels[r];
        float g = 0.0f;
        if (label != kIgnoreIndex)
            g = label >= 0 && label < V ? (expf(logp[i]) - (j == label ? 1.0f : 0.0f)) * scale : NAN;
        st(dlogits, i, g);
    }
}

// dlogp[r, j] = -scale where j is the row's valid label, else 0 (NaN rows for a bad label);
// grid-stride over n*V
__global__ void nll_backward_kernel(float* dlogp, const std::int64_t* labels, std::int64_t n, std::int64_t V,
                                    float scale) {
    for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n * V;
         i += std::int64_t(gridDim.x) * blockDim.x) {
        const std::int64_t r = i / V, j = i - r * V, label = labels[r];
        float g = 0.0f;
        if (label != kIgnoreIndex) g = label >= 0 && label < V ? (j == label ? -scale : 0.0f) : NAN;
        dlogp[i] = g;
    }
}

// dx[r, :] = dy - exp(logp) * rowsum(dy); one block per row, dx may be dy
__global__ void log_softmax_backward_kernel(float* dx, const float* dy, const float* logp, std::int64_t V) {
    __shared__ float red[32];
    const std::int64_t base = std::int64_t(blockIdx.x) * V;
    float sum = 0.0f;
    for (std::int64_t j = threadIdx.x; j < V; j += blockDim.x) sum += dy[base + j];
    sum = detail::block_sum(sum, red);  // synchronises: every read of dy precedes the writes
    for (std::int64_t j = threadIdx.x; j < V; j += blockDim.x) dx[base + j] = dy[base + j] - expf(logp[base + j]) * sum;
}

// Fused: one block per row of logits[n, V] (T = float or bf16), N elements per access.
template <class T, int N>
__global__ void __launch_bounds__(kRowThreads) ce_fused_kernel(T* logits, float* row_loss, double* loss_sum,
                                                               const std::int64_t* labels, std::int64_t V,
                                                               float scale, float softcap) {
    __shared__ float red[64];
    const std::int64_t r = blockIdx.x;
    T* row = logits + r * V;
    const std::int64_t label = labels[r];
    const std::int64_t nv = V / N;  // V % N == 0 (checked on the host)
    if (label == kIgnoreIndex || label < 0 || label >= V) {
        // ignored: zero gradient and loss; invalid: NaN, visible in the loss
        const float fill = label == kIgnoreIndex ? 0.0f : NAN;
        float f[N];
#pragma unroll
        for (int k = 0; k < N; ++k) f[k] = fill;
        for (std::int64_t v = threadIdx.x; v < nv; v += blockDim.x) store_n<T, N>(row + v * N, f);
        if (threadIdx.x == 0) {
            if (row_loss) row_loss[r] = fill;
            if (loss_sum && label != kIgnoreIndex) atomicAdd(loss_sum, double(NAN));
        }
        return;
    }
    // z = softcap * tanh(x / softcap), or x
    auto cap = [softcap](float x) { return softcap > 0.0f ? softcap * tanhf(x / softcap) : x; };
    // pass 1: online logsumexp
    MaxSum acc{-INFINITY, 0.0f};
    for (std::int64_t v = threadIdx.x; v < nv; v += blockDim.x) {
        float z[N];
        load_n<T, N>(row + v * N, z);
#pragma unroll
        for (int k = 0; k < N; ++k) acc = online_add(acc, cap(z[k]));
    }
    float z_label = 0.0f;
    if (threadIdx.x == 0) z_label = cap(to_float(row[label]));  // before any thread overwrites the row
    acc = detail::block_combine(acc, red);                        // synchronises the block
    const float lse = acc.m + logf(acc.s);
    if (threadIdx.x == 0) {
        const float loss = lse - z_label;
        if (row_loss) row_loss[r] = loss;
        if (loss_sum) atomicAdd(loss_sum, double(loss));
    }
    // pass 2: the gradient in place
    for (std::int64_t v = threadIdx.x; v < nv; v += blockDim.x) {
        float x[N];
        load_n<T, N>(row + v * N, x);
#pragma unroll
        for (int k = 0; k < N; ++k) {
            float z = x[k], dcap = 1.0f;
            if (softcap > 0.0f) {
                const float th = tanhf(x[k] / softcap);
                z = softcap * th;
                dcap = 1.0f - th * th;
            }
            const float onehot = v * N + k == label ? 1.0f : 0.0f;
            x[k] = (expf(z - lse) - onehot) * scale * dcap;
        }
        store_n<T, N>(row + v * N, x);
    }
}

template <class T>
void launch_fused(T* logits, float* row_loss, double* loss_sum, const std::int64_t* labels, std::int64_t n,
                  std::int64_t V, float scale, float softcap, cudaStream_t stream) {
    constexpr int kN = detail::Vec16<T>::N;
    const auto rows = static_cast<unsigned>(n);
    if (V % kN == 0 && detail::aligned16(logits))
        ce_fused_kernel<T, kN><<<rows, kRowThreads, 0, stream>>>(logits, row_loss, loss_sum, labels, V, scale, softcap);
    else
        ce_fused_kernel<T, 1><<<rows, kRowThreads, 0, stream>>>(logits, row_loss, loss_sum, labels, V, scale, softcap);
    detail::check_launch("cross_entropy_fused");
}

void check_rows(const char* kernel, std::int64_t n, std::int64_t V) {
    detail::require(V > 0 && n >= 0, kernel, "need V > 0 and n >= 0");
    detail::require(n < (std::int64_t{1} << 31), kernel, "one block per row: n must be < 2^31");
}

}  // namespace

void count_valid_labels(std::int64_t* count, const std::int64_t* labels, std::int64_t n, cudaStream_t stream) {
    detail::require(count != nullptr && n >= 0, "count_valid_labels", "need a count and n >= 0");
    if (n == 0) return;
    count_valid_kernel<<<detail::grid_for(n), detail::kThreads, 0, stream>>>(count, labels, n);
    detail::check_launch("count_valid_labels");
}

// logp[n,V] fp32 from logits[n,V]; *loss_sum += sum over valid rows of -logp[label]
void cross_entropy_forward(float* logp, ConstTensor logits, const std::int64_t* labels, std::int64_t n,
                           std::int64_t V, double* loss_sum, cudaStream_t stream) {
    check_rows("cross_entropy_forward", n, V);
    if (n == 0) return;
    ce_forward_kernel<<<static_cast<unsigned>(n), kRowThreads, 0, stream>>>(logp, logits, labels, V, loss_sum);
    detail::check_launch("cross_entropy_forward");
}

// dlogits[n,V] = (exp(logp) - onehot) * scale
void cross_entropy_backward(Tensor dlogits, const float* logp, const std::int64_t* labels, std::int64_t n,
                            std::int64_t V, float scale, cudaStream_t stream) {
    check_rows("cross_entropy_backward", n, V);
    if (n == 0) return;
    ce_backward_kernel<<<detail::grid_for(n * V), detail::kThreads, 0, stream>>>(dlogits, logp, labels, n, V, scale);
    detail::check_launch("cross_entropy_backward");
}

// dlogp[n,V] = -scale at (r, labels[r]) for valid rows, else 0
void nll_loss_backward(float* dlogp, const std::int64_t* labels, std::int64_t n, std::int64_t V, float scale,
                       cudaStream_t stream) {
    check_rows("nll_loss_backward", n, V);
    if (n == 0) return;
    detail::require(dlogp != nullptr && labels != nullptr, "nll_loss_backward", "dlogp and labels are required");
    nll_backward_kernel<<<detail::grid_for(n * V), detail::kThreads, 0, stream>>>(dlogp, labels, n, V, scale);
    detail::check_launch("nll_loss_backward");
}

// dx[n,V] = dy - exp(logp) * rowsum(dy); dx may alias dy
void log_softmax_backward(float* dx, const float* dy, const float* logp, std::int64_t n, std::int64_t V,
                          cudaStream_t stream) {
    check_rows("log_softmax_backward", n, V);
    if (n == 0) return;
    detail::require(dx != nullptr && dy != nullptr && logp != nullptr, "log_softmax_backward",
                    "dx, dy and logp are required");
    log_softmax_backward_kernel<<<static_cast<unsigned>(n), kRowThreads, 0, stream>>>(dx, dy, logp, V);
    detail::check_launch("log_softmax_backward");
}

// logits[n,V] in place -> gradient; row_loss[n], *loss_sum (nullable)
void cross_entropy_fused(Tensor logits, float* row_loss, double* loss_sum, const std::int64_t* labels,
                         std::int64_t n, std::int64_t V, float scale, float softcap, cudaStream_t stream) {
    check_rows("cross_entropy_fused", n, V);
    detail::require(softcap >= 0.0f, "cross_entropy_fused", "softcap must be >= 0 (0: none)");
    if (n == 0) return;
    detail::require(logits && labels != nullptr, "cross_entropy_fused", "logits and labels are required");
    if (logits.dtype == DType::F32)
        launch_fused(static_cast<float*>(logits.data), row_loss, loss_sum, labels, n, V, scale, softcap, stream);
    else
        launch_fused(static_cast<bf16*>(logits.data), row_loss, loss_sum, labels, n, V, scale, softcap, stream);
}

}  // namespace mst::cuda
