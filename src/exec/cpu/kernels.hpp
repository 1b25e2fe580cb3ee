#pragma once
// The CPU backend's op kernels: forward and backward of every op of a decoder training step
// (Llama, Gemma-2/3, Qwen3, Phi-3 and Mixture-of-Experts layers), plus the optimizer steps.
//
// Contract shared by every kernel (it is what lets the executor *measure* memory):
//  * A kernel never allocates a tensor. Every input, output, saved tensor and workspace
//    is a caller-provided buffer (pointer + storage dtype, shapes as arguments), so the
//    executor allocates each one through its tracking allocator. Scratch is O(1): fixed
//    size arrays on the stack, bounded by the constants below, at most ~100 KiB (flash
//    attention backward: six float[kAttnTile][kMaxHeadDim] tiles, 96 KiB; GEMM: three tiles,
//    80 KiB). Eigen's products run on those stack tiles with `noalias()`, so Eigen allocates
//    nothing either: its packing buffers for tiles this small live on the stack, under
//    EIGEN_STACK_ALLOCATION_LIMIT. No kernel calls malloc.
//  * Storage dtype is float32 or bf16 per buffer, chosen by the caller; arithmetic is
//    always float32 with float32 accumulation. Statistics (rstd, logsumexp, delta) and
//    workspaces are always float32 (`float*`).
//  * Layouts are row-major, PyTorch's: activations [rows, features] with rows = B*S
//    (row b*S + t), heads packed along features (column h*hd + e), weights [out, in].
//  * A violated contract (bad shape, an id out of range) is a bug of the caller: the
//    kernel throws std::logic_error naming the kernel and the broken condition.
//
// Every kernel has a plain reference next to it in `namespace reference` (naive loops,
// double accumulation, may allocate: test-only), in the same .cpp file.
#include <cstdint>
#include <cstring>

#include <Eigen/Core>

#include "mst/kernel_types.hpp"

namespace mst::exec::cpu {

using bf16 = Eigen::bfloat16;

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

// ---- element access: one dtype switch per call; blocks keep inner loops tight ----------
inline float load(ConstTensor t, std::int64_t i) {
    return t.dtype == DType::F32 ? static_cast<const float*>(t.data)[i]
                                 : static_cast<float>(static_cast<const bf16*>(t.data)[i]);
}
inline void store(Tensor t, std::int64_t i, float v) {
    if (t.dtype == DType::F32)
        static_cast<float*>(t.data)[i] = v;
    else
        static_cast<bf16*>(t.data)[i] = bf16(v);  // round to nearest even
}
// dst[0..n) = t[i0..i0+n) as float
inline void load_block(ConstTensor t, std::int64_t i0, std::int64_t n, float* dst) {
    if (t.dtype == DType::F32) {
        std::memcpy(dst, static_cast<const float*>(t.data) + i0, static_cast<std::size_t>(n) * sizeof(float));
    } else {
        const bf16* p = static_cast<const bf16*>(t.data) + i0;
        for (std::int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(p[j]);
    }
}
// t[i0..i0+n) = src[0..n), rounded to the storage dtype
inline void store_block(Tensor t, std::int64_t i0, std::int64_t n, const float* src) {
    if (t.dtype == DType::F32) {
        std::memcpy(static_cast<float*>(t.data) + i0, src, static_cast<std::size_t>(n) * sizeof(float));
    } else {
        bf16* p = static_cast<bf16*>(t.data) + i0;
        for (std::int64_t j = 0; j < n; ++j) p[j] = bf16(src[j]);
    }
}

namespace detail {
// A broken kernel contract is a caller bug: throws std::logic_error("<kernel>: <what>").
[[noreturn]] void contract_violation(const char* kernel, const char* what);
inline void require(bool ok, const char* kernel, const char* what) {
    if (!ok) contract_violation(kernel, what);
}
}  // namespace detail

// ---- scratch bounds (the O(1) stack scratch every kernel documents) --------------------
inline constexpr std::int64_t kBlock = 256;         // elementwise/row kernels: float[kBlock] blocks
inline constexpr std::int64_t kMaxHeadDim = 256;    // RoPE and attention tiles hold float[tile][kMaxHeadDim]
inline constexpr std::int64_t kAttnTile = 16;       // flash attention: query and key tile rows
inline constexpr std::int64_t kGemmTileM = 64;      // GEMM output tile rows
inline constexpr std::int64_t kGemmTileN = 64;      // GEMM output tile columns
inline constexpr std::int64_t kGemmTileK = 128;     // GEMM reduction block

// ---- elementwise helpers ----------------------------------------------------------------
// out[n] = in[n] (dtype conversion, e.g. the bf16 copy of an fp32 weight under AMP)
void cast(Tensor out, ConstTensor in, std::int64_t n);
// out[n] = in[n] * s (Gemma's embedding scale sqrt(d); its backward is the same call)
void scale(Tensor out, ConstTensor in, std::int64_t n, float s);
// out[n] = 0
void zero(Tensor out, std::int64_t n);
// out[i] = value for i < n
void fill(Tensor out, std::int64_t n, float value);
// out[i] = half_width * (2 u_i - 1), uniform in [-half_width, half_width), for i < n, with
// u_i = (splitmix64(key + (i + 1) * 0x9E3779B97F4A7C15) >> 40) / 2^24, splitmix64's finaliser
// z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9; z = (z ^ (z >> 27)) * 0x94D049BB133111EB; z ^= z >> 31
// (element i is the (i+1)-th output of a splitmix64 generator seeded with key). Counter-based:
// element i depends on (key, i) only, so every backend and any split of the work write the same
// values. u is exact in fp32 (24 bits) and so is 2u - 1; the product rounds once, then the
// storage dtype rounds once: the CUDA twin writes the same bits.
void fill_uniform(Tensor out, std::int64_t n, float half_width, std::uint64_t key);

// ---- linear (GEMM), PyTorch layout: y = x W^T ---------------------------------------------
// out[n,o] (+)= in[n,i] W[o,i]^T.   `accumulate` adds into out (beta = 1), else overwrites.
void linear_forward(Tensor out, ConstTensor in, ConstTensor W, std::int64_t n, std::int64_t i, std::int64_t o,
                    bool accumulate = false);
// din[n,i] (+)= dout[n,o] W[o,i]. Accumulate to sum the input gradients of q, k and v.
void linear_backward_input(Tensor din, ConstTensor dout, ConstTensor W, std::int64_t n, std::int64_t i,
                           std::int64_t o, bool accumulate = false);
// dW[o,i] (+)= dout[n,o]^T in[n,i]. Accumulate across mini-sequences / micro-batches.
void linear_backward_weight(Tensor dW, ConstTensor dout, ConstTensor in, std::int64_t n, std::int64_t i,
                            std::int64_t o, bool accumulate);
// A linear's bias b[o] (the kernels runtime stores it after its weight's rows, in the same
// parameter): out[n,o] += b[o] in place; its gradient db[o] += sum over rows of dout[n,o].
void bias_forward(Tensor out, ConstTensor b, std::int64_t n, std::int64_t o);
void bias_backward(Tensor db, ConstTensor dout, std::int64_t n, std::int64_t o);

// ---- embedding -------------------------------------------------------------------------------
// out[n,d] = table[ids[n], :], table [V,d]
void embedding_forward(Tensor out, ConstTensor table, const std::int64_t* ids, std::int64_t n, std::int64_t d,
                       std::int64_t V);
// dtable[V,d] += scatter of dout[n,d] by ids[n] (accumulates; repeated ids add up)
void embedding_backward(Tensor dtable, ConstTensor dout, const std::int64_t* ids, std::int64_t n, std::int64_t d,
                        std::int64_t V);

// ---- RMSNorm ---------------------------------------------------------------------------------
// y[n,d] = x[n,d] * rstd[n] * g(w[d]), rstd = 1/sqrt(mean(x^2) + eps), saved as fp32
// (rstd may be nullptr: no-grad forward).
void rmsnorm_forward(Tensor y, float* rstd, ConstTensor x, ConstTensor w, std::int64_t n, std::int64_t d, float eps,
                     NormKind kind);
// dx[n,d] = rstd * (g*dy - xhat * mean(g*dy*xhat)), xhat = x*rstd; dw[d] += sum_rows dy*xhat
// (dw may be empty: frozen weight). dx may alias dy.
void rmsnorm_backward(Tensor dx, Tensor dw, ConstTensor dy, ConstTensor x, ConstTensor w, const float* rstd,
                      std::int64_t n, std::int64_t d, NormKind kind);

// ---- RoPE (Hugging Face Llama rotate_half convention) --------------------------------------
// x[B*S, heads*hd] in place: position of row b*S+t is t; only the first rot dims of each head
// rotate (rot even, 2 <= rot <= hd; rot < hd is Phi-3's partial rotary), the other hd - rot
// are left untouched. inv_freq[i] = theta^(-2i/rot) (fp32, as HF), for i < rot/2:
// (x_i, x_{i+rot/2}) is rotated by angle t*inv_freq[i].
// `inverse` rotates by -angle: the backward (the rotation is orthogonal).
void rope_apply(Tensor x, std::int64_t B, std::int64_t S, std::int64_t heads, std::int64_t hd, std::int64_t rot,
                float theta, bool inverse);
// q[B*S, nh*hd], k[B*S, nkv*hd] rotated in place
void rope_forward(Tensor q, Tensor k, std::int64_t B, std::int64_t S, std::int64_t nh, std::int64_t nkv,
                  std::int64_t hd, std::int64_t rot, float theta);
// dq[B*S, nh*hd], dk[B*S, nkv*hd] rotated back in place
void rope_backward(Tensor dq, Tensor dk, std::int64_t B, std::int64_t S, std::int64_t nh, std::int64_t nkv,
                   std::int64_t hd, std::int64_t rot, float theta);

// ---- attention: causal, GQA, optional sliding window and logit soft-capping ----------------
// q, o [B*S, nh*hd]; k, v [B*S, nkv*hd]; query head h reads kv head h / (nh/nkv) (HF repeat_kv).
// Score s(t,u) = q_t.k_u * scale, then (softcap > 0) s = softcap * tanh(s / softcap), masked
// unless u <= t and (window == 0 or t - u < window).
float default_scale(std::int64_t hd);  // 1/sqrt(hd)

// Workspace sizes, in floats (the executor allocates them as fp32 buffers).
std::int64_t flash_lse_floats(const AttentionConfig& c);              // lse [B, nh, S]
std::int64_t flash_dq_workspace_floats(const AttentionConfig& c);     // dq accumulator [B*S, nh*hd]
std::int64_t flash_delta_workspace_floats(const AttentionConfig& c);  // delta [B, nh, S]
std::int64_t eager_scores_floats(const AttentionConfig& c);           // probs32 / dscores [B, nh, S, S]

// Flash (tiled, online softmax, never S x S): o[B*S, nh*hd], lse[B, nh, S] (fp32, natural log).
void flash_attention_forward(Tensor o, float* lse, ConstTensor q, ConstTensor k, ConstTensor v,
                             const AttentionConfig& c);
// FlashAttention-2 backward: recomputes scores per tile from q, k and lse.
// dq[B*S, nh*hd], dk, dv[B*S, nkv*hd] (overwritten); dout, o [B*S, nh*hd]; lse [B, nh, S].
// Workspaces: dq_ws fp32 [B*S, nh*hd] (the dq accumulator; may be dq's own storage when dq is
// fp32), delta_ws fp32 [B, nh, S] (rowsum(dout * o)).
void flash_attention_backward(Tensor dq, Tensor dk, Tensor dv, float* dq_ws, float* delta_ws, ConstTensor dout,
                              ConstTensor q, ConstTensor k, ConstTensor v, ConstTensor o, const float* lse,
                              const AttentionConfig& c);
// The sinks' gradient (c.sinks set, after flash_attention_backward filled delta):
// dsinks[h] += -sum over (b, t) of exp(sinks[h] - lse[b,h,t]) * delta[b,h,t].
void attention_sinks_backward(Tensor dsinks, const float* lse, const float* delta, const AttentionConfig& c);
// Eager, mirroring Hugging Face eager attention (no sinks): probs32 fp32 [B, nh, S, S] (softmax in fp32,
// masked entries 0), probs [B, nh, S, S] in the storage dtype (the copy the PV matmul reads
// and saves), scores_tanh [B, nh, S, S] (tanh(s/softcap), saved by HF for the backward; required
// when softcap > 0, ignored otherwise). o[B*S, nh*hd] = probs @ v.
void eager_attention_forward(Tensor o, float* probs32, Tensor probs, Tensor scores_tanh, ConstTensor q,
                             ConstTensor k, ConstTensor v, const AttentionConfig& c);
// Backward from the saved probabilities. dq, dk, dv as in flash; dscores_ws fp32 [B, nh, S, S]
// holds the score gradient (as HF's backward materialises it).
void eager_attention_backward(Tensor dq, Tensor dk, Tensor dv, float* dscores_ws, ConstTensor dout, ConstTensor q,
                              ConstTensor k, ConstTensor v, const float* probs32, ConstTensor probs,
                              ConstTensor scores_tanh, const AttentionConfig& c);

// HF repeat_kv for eager GQA: out[B*S, nh*hd] holds kv head h / (nh/nkv) of in[B*S, nkv*hd] at
// head h (rows = B*S). Eager attention reads GQA heads directly; these let the executor mirror
// HF's repeated K/V copies (then run attention with nkv = nh) and measure them.
void repeat_kv_forward(Tensor out, ConstTensor in, std::int64_t rows, std::int64_t nh, std::int64_t nkv,
                       std::int64_t hd);
// din[B*S, nkv*hd] = sum of dout[B*S, nh*hd] over the nh/nkv copies of each kv head
void repeat_kv_backward(Tensor din, ConstTensor dout, std::int64_t rows, std::int64_t nh, std::int64_t nkv,
                        std::int64_t hd);

// ---- attention op by op (Hugging Face eager, unfused) ------------------------------------------
// The eager path as separate ops, each writing a new buffer, so an executor can run (and measure)
// the tensors HF's eager attention materialises: scores = q k^T, scaled, masked, softmax in fp32,
// its storage-dtype copy, o = probs v; and the backward's d_probs, d_scores ... Every op reads and
// writes all S x S entries (masking is the additive mask, as in HF). Heads of a, x, out are packed
// [B*S, nh*hd] (after repeat_kv: nh heads on both sides); p, scores [B, nh, S, S].
// scores[b,h,t,u] = a[b*S+t, h*hd ..] . b[b*S+u, h*hd ..]   (q k^T; dout v^T)
void attention_scores(Tensor scores, ConstTensor a, ConstTensor b, std::int64_t B, std::int64_t S, std::int64_t nh,
                      std::int64_t hd);
// out[b*S+t, h*hd ..] = sum_u p[b,h,t,u] x[b*S+u, h*hd ..]   (probs v; dscores k)
void attention_apply(Tensor out, ConstTensor p, ConstTensor x, std::int64_t B, std::int64_t S, std::int64_t nh,
                     std::int64_t hd);
// out[b*S+u, h*hd ..] = sum_t p[b,h,t,u] x[b*S+t, h*hd ..]   (probs^T dout; dscores^T q)
void attention_apply_transposed(Tensor out, ConstTensor p, ConstTensor x, std::int64_t B, std::int64_t S,
                                std::int64_t nh, std::int64_t hd);
// mask[B, 1, S, S] additive: 0 where query t sees key u (u <= t, and t - u < window unless window
// is 0), else the storage dtype's lowest finite value (HF's torch.finfo(dtype).min).
void causal_mask_fill(Tensor mask, std::int64_t B, std::int64_t S, std::int64_t window);
// y[rows, cols] fp32 = softmax of each row of x (any storage dtype)
void softmax_forward(float* y, ConstTensor x, std::int64_t rows, std::int64_t cols);
// dx[rows, cols] = y * (dy - rowsum(y * dy)) from softmax's fp32 output y and fp32 gradient dy
void softmax_backward(Tensor dx, const float* dy, const float* y, std::int64_t rows, std::int64_t cols);

// ---- gated MLP activation -------------------------------------------------------------------
// m[n] = act(g[n]) * b(u[n])   (n = rows * intermediate; b(u) = u, gpt-oss: clamp(u, -7, 7) + 1)
void swiglu_forward(Tensor m, ConstTensor g, ConstTensor u, std::int64_t n, GatedAct act);
// dg[n] = dm * b(u) * act'(g), du[n] = dm * act(g) * b'(u); dg may alias g and du may alias u.
void swiglu_backward(Tensor dg, Tensor du, ConstTensor dm, ConstTensor g, ConstTensor u, std::int64_t n,
                     GatedAct act);

// ---- Mixture-of-Experts routing, dispatch and combine (Mixtral, Qwen3-MoE) -------------------
// The experts' GEMMs are linears on row blocks: the n*k token-expert pairs sorted by expert.
// From the router's fp32 probabilities probs [n, E]: idx [n, k] each token's top-k experts,
// highest probability first (ties: the lower expert first); w [n, k] fp32 their probabilities,
// divided by their sum when `normalize`; pos [n, k] pair (t, j)'s row among the pairs sorted by
// expert, stable in token order; offsets [E + 1] each expert's first row (offsets[E] = n*k).
// NaN probabilities (a diverged step) pick expert 0 with a NaN weight, which shows in the loss.
void moe_route(float* w, std::int64_t* idx, std::int64_t* pos, std::int64_t* offsets, const float* probs,
               std::int64_t n, std::int64_t E, std::int64_t k, bool normalize);
// Its backward: dprobs [n, E] fp32 from dw [n, k]: 0 off each token's chosen experts; on them
// dw_j, or with `normalize` (w_j = p_j / s, s the chosen p's sum) (dw_j - sum_i dw_i w_i) / s.
void moe_route_backward(float* dprobs, const float* dw, const float* probs, const std::int64_t* idx, std::int64_t n,
                        std::int64_t E, std::int64_t k, bool normalize);
// xs[pos[t, j]] = x[t]: xs [n*k, d], x [n, d]
void moe_gather(Tensor xs, ConstTensor x, const std::int64_t* pos, std::int64_t n, std::int64_t k, std::int64_t d);
// y[t] (+)= sum_j w[t, j] * ys[pos[t, j]], summed in fp32; w nullptr: weights 1 (the gather's
// backward). y [n, d], ys [n*k, d].
void moe_combine(Tensor y, ConstTensor ys, const float* w, const std::int64_t* pos, std::int64_t n, std::int64_t k,
                 std::int64_t d, bool accumulate);
// The combine's backward: dys[pos[t, j]] = w[t, j] * dy[t]; dw[t, j] fp32 = dy[t] . ys[pos[t, j]].
void moe_combine_backward(Tensor dys, float* dw, ConstTensor dy, ConstTensor ys, const float* w,
                          const std::int64_t* pos, std::int64_t n, std::int64_t k, std::int64_t d);

// ---- residual --------------------------------------------------------------------------------
// out[n] = a[n] + b[n]
void residual_forward(Tensor out, ConstTensor a, ConstTensor b, std::int64_t n);
// a[n] += b[n] (the backward of a residual branch adds its input gradient into the stream)
void residual_accumulate(Tensor a, ConstTensor b, std::int64_t n);

// ---- logit soft-capping (Gemma-2 final logits) ------------------------------------------------
// y[n] = cap * tanh(x[n] / cap)
void softcap_forward(Tensor y, ConstTensor x, std::int64_t n, float cap);
// dx[n] = dy * (1 - (y/cap)^2), from the saved output y; dx may alias dy.
void softcap_backward(Tensor dx, ConstTensor dy, ConstTensor y, std::int64_t n, float cap);

// ---- cross-entropy over V classes, labels == kIgnoreIndex skipped ---------------------------
std::int64_t count_valid_labels(const std::int64_t* labels, std::int64_t n);
// Hugging Face style: logp[n,V] fp32 = log_softmax(float(logits[n,V])); logp may be the fp32
// logits buffer itself. Returns the loss SUM over rows with a valid label of -logp[label] (divide
// by the global valid count for the mean; sums of row chunks add up to the unchunked sum).
double cross_entropy_forward(float* logp, ConstTensor logits, const std::int64_t* labels, std::int64_t n,
                             std::int64_t V);
// dlogits[n,V] = (exp(logp) - onehot(label)) * scale, 0 on ignored rows (scale = dloss, 1/count
// for a mean). dlogits may be the logp buffer itself.
void cross_entropy_backward(Tensor dlogits, const float* logp, const std::int64_t* labels, std::int64_t n,
                            std::int64_t V, float scale);
// The same backward in PyTorch's two unfused steps, as Hugging Face's M = 1 loss runs it
// (loss = nll_loss(log_softmax(float(logits)))): nll_loss's backward writes the dense
// gradient of the log-probabilities, dlogp[n,V] fp32 = -scale at each valid label, 0
// elsewhere; log_softmax's backward turns it into the logits' gradient,
// dx[n,V] fp32 = dy - exp(logp) * rowsum(dy). Chained they equal cross_entropy_backward.
void nll_loss_backward(float* dlogp, const std::int64_t* labels, std::int64_t n, std::int64_t V, float scale);
void log_softmax_backward(float* dx, const float* dy, const float* logp, std::int64_t n, std::int64_t V);
// Fused (MsT / Liger): logits[n,V] in/out. With z = softcap > 0 ? softcap*tanh(x/softcap) : x,
// row_loss[n] (fp32, may be nullptr) = lse(z) - z[label] (0 on ignored rows) and the logits are
// overwritten with d(scale * sum loss)/dx = (softmax(z) - onehot) * scale * dz/dx.
// Returns the loss sum. No [n,V] buffer besides the logits themselves.
double cross_entropy_fused(Tensor logits, float* row_loss, const std::int64_t* labels, std::int64_t n,
                           std::int64_t V, float scale, float softcap);

// ---- optimizers (per tensor, n elements) ------------------------------------------------------
// PyTorch AdamW (decoupled decay, bias correction), step = 1 on the first call:
// p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
// p -= lr/(1-b1^step) * m / (sqrt(v)/sqrt(1-b2^step) + eps).
// param, m, v [n]: fp32 or bf16 each; grad [n].
void adamw_step(Tensor param, ConstTensor grad, Tensor m, Tensor v, std::int64_t n, const AdamWConfig& c,
                std::int64_t step);
// PyTorch SGD: g += wd*p; buf = step == 1 ? g : momentum*buf + (1-dampening)*g;
// g = nesterov ? g + momentum*buf : buf; p -= lr*g. buf [n] may be empty when momentum == 0.
void sgd_step(Tensor param, ConstTensor grad, Tensor momentum_buf, std::int64_t n, const SgdConfig& c,
              std::int64_t step);

// ---- references: naive loops, double accumulation, may allocate (test-only) -----------------
namespace reference {
void linear_forward(Tensor out, ConstTensor in, ConstTensor W, std::int64_t n, std::int64_t i, std::int64_t o,
                    bool accumulate = false);
void linear_backward_input(Tensor din, ConstTensor dout, ConstTensor W, std::int64_t n, std::int64_t i,
                           std::int64_t o, bool accumulate = false);
void linear_backward_weight(Tensor dW, ConstTensor dout, ConstTensor in, std::int64_t n, std::int64_t i,
                            std::int64_t o, bool accumulate);
void embedding_forward(Tensor out, ConstTensor table, const std::int64_t* ids, std::int64_t n, std::int64_t d,
                       std::int64_t V);
void embedding_backward(Tensor dtable, ConstTensor dout, const std::int64_t* ids, std::int64_t n, std::int64_t d,
                        std::int64_t V);
void rmsnorm_forward(Tensor y, float* rstd, ConstTensor x, ConstTensor w, std::int64_t n, std::int64_t d, float eps,
                     NormKind kind);
void rmsnorm_backward(Tensor dx, Tensor dw, ConstTensor dy, ConstTensor x, ConstTensor w, const float* rstd,
                      std::int64_t n, std::int64_t d, NormKind kind);
void rope_apply(Tensor x, std::int64_t B, std::int64_t S, std::int64_t heads, std::int64_t hd, std::int64_t rot,
                float theta, bool inverse);
// Full S x S scores per (b, h), softmax in double: o[B*S, nh*hd], lse[B, nh, S] (lse may be nullptr).
void attention_forward(Tensor o, float* lse, ConstTensor q, ConstTensor k, ConstTensor v, const AttentionConfig& c);
// Recomputes everything from q, k, v: dq, dk, dv.
void attention_backward(Tensor dq, Tensor dk, Tensor dv, ConstTensor dout, ConstTensor q, ConstTensor k,
                        ConstTensor v, const AttentionConfig& c);
// d sinks from q, k, v and dout (no lse or delta): dsinks[nh] (overwritten)
void attention_sinks_backward(Tensor dsinks, ConstTensor dout, ConstTensor q, ConstTensor k, ConstTensor v,
                              const AttentionConfig& c);
void bias_forward(Tensor out, ConstTensor b, std::int64_t n, std::int64_t o);
void bias_backward(Tensor db, ConstTensor dout, std::int64_t n, std::int64_t o);
void swiglu_forward(Tensor m, ConstTensor g, ConstTensor u, std::int64_t n, GatedAct act);
void swiglu_backward(Tensor dg, Tensor du, ConstTensor dm, ConstTensor g, ConstTensor u, std::int64_t n,
                     GatedAct act);
double cross_entropy_forward(float* logp, ConstTensor logits, const std::int64_t* labels, std::int64_t n,
                             std::int64_t V);
void cross_entropy_backward(Tensor dlogits, const float* logp, const std::int64_t* labels, std::int64_t n,
                            std::int64_t V, float scale);
void moe_route(float* w, std::int64_t* idx, std::int64_t* pos, std::int64_t* offsets, const float* probs,
               std::int64_t n, std::int64_t E, std::int64_t k, bool normalize);
void moe_route_backward(float* dprobs, const float* dw, const float* probs, const std::int64_t* idx, std::int64_t n,
                        std::int64_t E, std::int64_t k, bool normalize);
void moe_combine(Tensor y, ConstTensor ys, const float* w, const std::int64_t* pos, std::int64_t n, std::int64_t k,
                 std::int64_t d, bool accumulate);
void moe_combine_backward(Tensor dys, float* dw, ConstTensor dy, ConstTensor ys, const float* w,
                          const std::int64_t* pos, std::int64_t n, std::int64_t k, std::int64_t d);
void adamw_step(Tensor param, ConstTensor grad, Tensor m, Tensor v, std::int64_t n, const AdamWConfig& c,
                std::int64_t step);
void sgd_step(Tensor param, ConstTensor grad, Tensor momentum_buf, std::int64_t n, const SgdConfig& c,
              std::int64_t step);
}  // namespace reference

}  // namespace mst::exec::cpu
