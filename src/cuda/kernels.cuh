#pragma once
// The CUDA backend's op kernels: the device twins of src/exec/cpu/kernels.hpp, one function
// for one CPU function, same names, same argument order, same layouts, plus a stream.
//
// Contract (the CPU kernels' contract, on the device):
//  * A kernel never allocates. Every input, output, saved tensor and workspace is a caller
//    provided *device* buffer, so the executor allocates each through its DeviceAllocator and
//    CUPTI sees it. Scratch lives in registers and shared memory. The GEMMs' cuBLASLt
//    workspace is a caller buffer too (GemmContext, gemm.cuh).
//  * Storage is float32 or bf16 per buffer; arithmetic is float32 with float32 accumulation
//    (the loss sum in float64). Statistics (rstd, logsumexp, delta) and workspaces are float32.
//  * Layouts are row-major, PyTorch's: activations [rows, features] with rows = B*S, heads
//    packed along features (column h*hd + e), weights [out, in].
//  * Every call is asynchronous on `stream`; nothing here synchronises. Host-checkable
//    contract violations (shapes, sizes, null buffers) throw std::logic_error("<kernel>:
//    <what>") before anything is launched; a failed launch throws std::runtime_error naming
//    the kernel and the CUDA error. Device data the host cannot see (a token id or a label
//    out of range) is not read out of bounds: the kernel writes NaN where the value would go,
//    so the bug shows in the loss instead of corrupting memory.
//  * Index arrays (ids, labels) are int64 device arrays.
//
// Every kernel is checked against its CPU twin in tests/cuda/test_cuda_kernels.cpp.
// Includable from plain C++ (no device code here).
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include "mst/kernel_types.hpp"

namespace mst::cuda {

using bf16 = __nv_bfloat16;

using mst::DType;
using mst::dtype_bytes;
using mst::AdamWConfig;
using mst::AttentionConfig;
using mst::GatedAct;
using mst::kIgnoreIndex;
using mst::NormKind;
using mst::SgdConfig;
using Tensor = mst::BasicTensor<bf16>;            // a caller-owned buffer and its storage dtype
using ConstTensor = mst::BasicConstTensor<bf16>;

inline constexpr std::int64_t kMaxHeadDim = 256;    // attention and RoPE: head_dim <= this

// ---- elementwise helpers ----------------------------------------------------------------
// out[n] = in[n] (dtype conversion)
void cast(Tensor out, ConstTensor in, std::int64_t n, cudaStream_t stream = nullptr);
// out[n] = in[n] * s
void scale(Tensor out, ConstTensor in, std::int64_t n, float s, cudaStream_t stream = nullptr);
// out[n] = 0
void zero(Tensor out, std::int64_t n, cudaStream_t stream = nullptr);
// out[i] = value for i < n
void fill(Tensor out, std::int64_t n, float value, cudaStream_t stream = nullptr);
// out[i] = half_width * (2 u_i - 1), u_i = (splitmix64(key + (i + 1) * 0x9E3779B97F4A7C15) >> 40)
// / 2^24: the CPU kernel's counter-based formula (kernels.hpp), evaluated with the same fp32
// operations, so both backends write the same bits for the same (key, i), whatever the grid.
void fill_uniform(Tensor out, std::int64_t n, float half_width, std::uint64_t key, cudaStream_t stream = nullptr);

// ---- a linear's bias (the GEMMs are in gemm.cuh) ------------------------------------------------
// out[n, o] += b[o]; db[o] += sum over rows of dout[n, o] (one block per 32 columns)
void bias_forward(Tensor out, ConstTensor b, std::int64_t n, std::int64_t o, cudaStream_t stream = nullptr);
void bias_backward(Tensor db, ConstTensor dout, std::int64_t n, std::int64_t o, cudaStream_t stream = nullptr);

// ---- embedding -------------------------------------------------------------------------------
// out[n,d] = table[ids[n], :], table [V,d]; ids int64 on the device
void embedding_forward(Tensor out, ConstTensor table, const std::int64_t* ids, std::int64_t n, std::int64_t d,
                       std::int64_t V, cudaStream_t stream = nullptr);
// dtable[V,d] += scatter of dout[n,d] by ids[n] (atomic adds: repeated ids add up, in an
// unspecified order; each token's row is rounded into the storage dtype once, as on the CPU)
void embedding_backward(Tensor dtable, ConstTensor dout, const std::int64_t* ids, std::int64_t n, std::int64_t d,
                        std::int64_t V, cudaStream_t stream = nullptr);

// ---- RMSNorm ---------------------------------------------------------------------------------
// y[n,d] = x[n,d] * rstd[n] * g(w[d]); rstd[n] fp32 (nullable). One warp per row.
void rmsnorm_forward(Tensor y, float* rstd, ConstTensor x, ConstTensor w, std::int64_t n, std::int64_t d, float eps,
                     NormKind kind, cudaStream_t stream = nullptr);
// dx[n,d] = rstd * (g*dy - xhat * mean(g*dy*xhat)); dw[d] += sum_rows dy*xhat (dw may be
// empty). dx may alias dy (dw is reduced first, by a column-stripe kernel, then dx per row).
void rmsnorm_backward(Tensor dx, Tensor dw, ConstTensor dy, ConstTensor x, ConstTensor w, const float* rstd,
                      std::int64_t n, std::int64_t d, NormKind kind, cudaStream_t stream = nullptr);

// ---- RoPE (Hugging Face rotate_half) ---------------------------------------------------------
// x[B*S, heads*hd] in place, the first rot dims of each head (rot even, 2 <= rot <= hd; the
// rest pass through); inv_freq computed on the host exactly as the CPU kernel does.
void rope_apply(Tensor x, std::int64_t B, std::int64_t S, std::int64_t heads, std::int64_t hd, std::int64_t rot,
                float theta, bool inverse, cudaStream_t stream = nullptr);
void rope_forward(Tensor q, Tensor k, std::int64_t B, std::int64_t S, std::int64_t nh, std::int64_t nkv,
                  std::int64_t hd, std::int64_t rot, float theta, cudaStream_t stream = nullptr);
void rope_backward(Tensor dq, Tensor dk, std::int64_t B, std::int64_t S, std::int64_t nh, std::int64_t nkv,
                   std::int64_t hd, std::int64_t rot, float theta, cudaStream_t stream = nullptr);

// ---- attention: causal, GQA, optional sliding window and logit soft-capping ----------------
// Same function as the CPU's: q, o [B*S, nh*hd]; k, v [B*S, nkv*hd]; query head h reads kv
// head h / (nh/nkv); score s = q.k * scale, soft-capped when softcap > 0, visible when u <= t
// and (window == 0 or t - u < window).
float default_scale(std::int64_t hd);                                 // 1/sqrt(hd)
std::int64_t flash_lse_floats(const AttentionConfig& c);              // lse [B, nh, S]
std::int64_t flash_dq_workspace_floats(const AttentionConfig& c);     // dq accumulator [B*S, nh*hd]
std::int64_t flash_delta_workspace_floats(const AttentionConfig& c);  // delta [B, nh, S]

// Flash forward (tiles of 32 queries x 32 keys in shared memory, online softmax):
// o[B*S, nh*hd], lse[B, nh, S] fp32 (natural log).
void flash_attention_forward(Tensor o, float* lse, ConstTensor q, ConstTensor k, ConstTensor v,
                             const AttentionConfig& c, cudaStream_t stream = nullptr);
// FlashAttention-2 backward: one block per (b, kv head, key tile) accumulates dk, dv of its 32
// keys over the GQA group's query heads; dq accumulates in the fp32 workspace dq_ws [B*S,
// nh*hd] with atomic adds (dq_ws may be dq's own storage when dq is fp32); delta_ws [B, nh, S].
void flash_attention_backward(Tensor dq, Tensor dk, Tensor dv, float* dq_ws, float* delta_ws, ConstTensor dout,
                              ConstTensor q, ConstTensor k, ConstTensor v, ConstTensor o, const float* lse,
                              const AttentionConfig& c, cudaStream_t stream = nullptr);
// The sinks' gradient after flash_attention_backward filled delta_ws (c.sinks set):
// dsinks[h] += -sum over (b, t) of exp(sinks[h] - lse) * delta; one block per head.
void attention_sinks_backward(Tensor dsinks, const float* lse, const float* delta, const AttentionConfig& c,
                              cudaStream_t stream = nullptr);
// HF repeat_kv: out[rows, nh*hd] holds kv head h/(nh/nkv) of in[rows, nkv*hd] at head h
void repeat_kv_forward(Tensor out, ConstTensor in, std::int64_t rows, std::int64_t nh, std::int64_t nkv,
                       std::int64_t hd, cudaStream_t stream = nullptr);
// din[rows, nkv*hd] = sum of dout[rows, nh*hd] over the copies of each kv head
void repeat_kv_backward(Tensor din, ConstTensor dout, std::int64_t rows, std::int64_t nh, std::int64_t nkv,
                        std::int64_t hd, cudaStream_t stream = nullptr);

// ---- attention op by op (Hugging Face eager, unfused) ------------------------------------------
// The CPU's eager ops (kernels.hpp) one by one, each writing a new buffer, for an executor at
// small S. Heads of a, b, x, out are packed [B*S, nh*hd] (after repeat_kv: nh heads on both
// sides); p, scores [B, nh, S, S]. The three products run one block per 32 x 32 output tile of
// one (b, h), fp32 accumulation over tiles of 32 in shared memory; B*nh and S/32 must each be
// <= 65535 (grid z and y).
// scores[b,h,t,u] = a[b*S+t, h*hd ..] . b[b*S+u, h*hd ..]   (q k^T; dout v^T)
void attention_scores(Tensor scores, ConstTensor a, ConstTensor b, std::int64_t B, std::int64_t S, std::int64_t nh,
                      std::int64_t hd, cudaStream_t stream = nullptr);
// out[b*S+t, h*hd ..] = sum_u p[b,h,t,u] x[b*S+u, h*hd ..]   (probs v; dscores k)
void attention_apply(Tensor out, ConstTensor p, ConstTensor x, std::int64_t B, std::int64_t S, std::int64_t nh,
                     std::int64_t hd, cudaStream_t stream = nullptr);
// out[b*S+u, h*hd ..] = sum_t p[b,h,t,u] x[b*S+t, h*hd ..]   (probs^T dout; dscores^T q)
void attention_apply_transposed(Tensor out, ConstTensor p, ConstTensor x, std::int64_t B, std::int64_t S,
                                std::int64_t nh, std::int64_t hd, cudaStream_t stream = nullptr);
// mask[B, 1, S, S] additive: 0 where query t sees key u (u <= t, and t - u < window unless window
// is 0), else the storage dtype's lowest finite value (-FLT_MAX; bf16: -3.3895314e38).
void causal_mask_fill(Tensor mask, std::int64_t B, std::int64_t S, std::int64_t window,
                      cudaStream_t stream = nullptr);
// y[rows, cols] fp32 = softmax of each row of x (any storage dtype); one block per row.
// y may be x's own storage when x is fp32.
void softmax_forward(float* y, ConstTensor x, std::int64_t rows, std::int64_t cols, cudaStream_t stream = nullptr);
// dx[rows, cols] = y * (dy - rowsum(y * dy)) from softmax's fp32 output y and fp32 gradient dy;
// one block per row. dx may be dy's own storage when dx is fp32.
void softmax_backward(Tensor dx, const float* dy, const float* y, std::int64_t rows, std::int64_t cols,
                      cudaStream_t stream = nullptr);

// ---- gated MLP activation -------------------------------------------------------------------
// m[n] = act(g[n]) * b(u[n])   (n = rows * intermediate; b(u) = u, gpt-oss: clamp(u, -7, 7) + 1)
void swiglu_forward(Tensor m, ConstTensor g, ConstTensor u, std::int64_t n, GatedAct act,
                    cudaStream_t stream = nullptr);
// dg[n] = dm * b(u) * act'(g), du[n] = dm * act(g) * b'(u); dg may alias g and du may alias u.
void swiglu_backward(Tensor dg, Tensor du, ConstTensor dm, ConstTensor g, ConstTensor u, std::int64_t n,
                     GatedAct act, cudaStream_t stream = nullptr);

// ---- Mixture-of-Experts routing, dispatch and combine -------------------------------------------
// The CPU twins' contracts (src/exec/cpu/kernels.hpp); idx, pos, offsets are int64 device arrays.
// moe_route runs one thread per token for the top-k, then one block of E threads (E <= 1024)
// for the stable sort by expert: each expert's thread scans the pairs in order (E x n*k reads,
// all threads reading the same address together).
inline constexpr std::int64_t kMaxExperts = 1024;
void moe_route(float* w, std::int64_t* idx, std::int64_t* pos, std::int64_t* offsets, const float* probs,
               std::int64_t n, std::int64_t E, std::int64_t k, bool normalize, cudaStream_t stream = nullptr);
void moe_route_backward(float* dprobs, const float* dw, const float* probs, const std::int64_t* idx, std::int64_t n,
                        std::int64_t E, std::int64_t k, bool normalize, cudaStream_t stream = nullptr);
void moe_gather(Tensor xs, ConstTensor x, const std::int64_t* pos, std::int64_t n, std::int64_t k, std::int64_t d,
                cudaStream_t stream = nullptr);
void moe_combine(Tensor y, ConstTensor ys, const float* w, const std::int64_t* pos, std::int64_t n, std::int64_t k,
                 std::int64_t d, bool accumulate, cudaStream_t stream = nullptr);
void moe_combine_backward(Tensor dys, float* dw, ConstTensor dy, ConstTensor ys, const float* w,
                          const std::int64_t* pos, std::int64_t n, std::int64_t k, std::int64_t d,
                          cudaStream_t stream = nullptr);

// ---- residual --------------------------------------------------------------------------------
// out[n] = a[n] + b[n]
void residual_forward(Tensor out, ConstTensor a, ConstTensor b, std::int64_t n, cudaStream_t stream = nullptr);
// a[n] += b[n]
void residual_accumulate(Tensor a, ConstTensor b, std::int64_t n, cudaStream_t stream = nullptr);

// ---- logit soft-capping ----------------------------------------------------------------------
// y[n] = cap * tanh(x[n] / cap)
void softcap_forward(Tensor y, ConstTensor x, std::int64_t n, float cap, cudaStream_t stream = nullptr);
// dx[n] = dy * (1 - (y/cap)^2); dx may alias dy
void softcap_backward(Tensor dx, ConstTensor dy, ConstTensor y, std::int64_t n, float cap,
                      cudaStream_t stream = nullptr);

// ---- cross-entropy over V classes, labels == kIgnoreIndex skipped ---------------------------
// *count (int64, device) += number of labels != kIgnoreIndex among labels[n]
void count_valid_labels(std::int64_t* count, const std::int64_t* labels, std::int64_t n,
                        cudaStream_t stream = nullptr);
// Hugging Face style: logp[n,V] fp32 = log_softmax(logits); *loss_sum (double, device,
// nullable) += sum over valid rows of -logp[label]. logp may be the fp32 logits themselves.
void cross_entropy_forward(float* logp, ConstTensor logits, const std::int64_t* labels, std::int64_t n,
                           std::int64_t V, double* loss_sum, cudaStream_t stream = nullptr);
// dlogits[n,V] = (exp(logp) - onehot(label)) * scale, 0 on ignored rows; may overwrite logp.
void cross_entropy_backward(Tensor dlogits, const float* logp, const std::int64_t* labels, std::int64_t n,
                            std::int64_t V, float scale, cudaStream_t stream = nullptr);
// PyTorch's two unfused steps of that backward, as Hugging Face's M = 1 loss runs it:
// nll_loss's backward, dlogp[n,V] fp32 = -scale at each valid label, 0 elsewhere (and on
// ignored rows; a label out of range makes its row NaN), grid-stride over n*V ...
void nll_loss_backward(float* dlogp, const std::int64_t* labels, std::int64_t n, std::int64_t V, float scale,
                       cudaStream_t stream = nullptr);
// ... then log_softmax's, dx[n,V] fp32 = dy - exp(logp) * rowsum(dy), one block per row; dx may
// be dy itself. Chained they equal cross_entropy_backward.
void log_softmax_backward(float* dx, const float* dy, const float* logp, std::int64_t n, std::int64_t V,
                          cudaStream_t stream = nullptr);
// Fused (MsT / Liger), one block per row, one read pass and one read-write pass over the
// row: with z = softcap > 0 ? softcap*tanh(x/softcap) : x, row_loss[n] (fp32, nullable) =
// lse(z) - z[label] (0 on ignored rows), *loss_sum (double, device, nullable) += the rows'
// losses, and the logits are overwritten with (softmax(z) - onehot) * scale * dz/dx.
void cross_entropy_fused(Tensor logits, float* row_loss, double* loss_sum, const std::int64_t* labels,
                         std::int64_t n, std::int64_t V, float scale, float softcap, cudaStream_t stream = nullptr);

// ---- optimizers -------------------------------------------------------------------------------
// One parameter tensor of an AdamW step: param, m, v [n] (fp32 or bf16 each), grad [n].
struct AdamWTensor {
    Tensor param;
    ConstTensor grad;
    Tensor m, v;
    std::int64_t n = 0;
};
// PyTorch AdamW (the CPU kernel's formula) over a list of tensors, fused and multi-tensor
// (PyTorch's multi_tensor_apply): each launch covers up to kMultiTensorMax tensors and
// kMultiTensorBlocks chunks of kMultiTensorChunk elements, so a model's parameters take a
// handful of launches instead of one per tensor.
void adamw_step(const AdamWTensor* tensors, std::int64_t count, const AdamWConfig& c, std::int64_t step,
                cudaStream_t stream = nullptr);
// The CPU's single-tensor signature
void adamw_step(Tensor param, ConstTensor grad, Tensor m, Tensor v, std::int64_t n, const AdamWConfig& c,
                std::int64_t step, cudaStream_t stream = nullptr);

struct SgdTensor {
    Tensor param;
    ConstTensor grad;
    Tensor momentum_buf;  // may be empty when momentum == 0
    std::int64_t n = 0;
};
// PyTorch SGD with momentum (the CPU kernel's formula), multi-tensor like adamw_step.
void sgd_step(const SgdTensor* tensors, std::int64_t count, const SgdConfig& c, std::int64_t step,
              cudaStream_t stream = nullptr);
void sgd_step(Tensor param, ConstTensor grad, Tensor momentum_buf, std::int64_t n, const SgdConfig& c,
              std::int64_t step, cudaStream_t stream = nullptr);

inline constexpr int kMultiTensorMax = 24;        // tensors per launch
inline constexpr int kMultiTensorBlocks = 320;    // chunks (blocks) per launch
inline constexpr int kMultiTensorChunk = 65536;   // elements per chunk

}  // namespace mst::cuda
