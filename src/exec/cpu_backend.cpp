// The CPU backend: each call is the cpu:: kernel of the same name on the same buffers.
#include "cpu_backend.hpp"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <string>
#include <new>

#include "cpu/kernels.hpp"

namespace mst::exec {

namespace {
cpu::Tensor c(Tensor t) { return {t.data, t.dtype}; }
cpu::ConstTensor c(ConstTensor t) { return {t.data, t.dtype}; }
}  // namespace

std::int64_t CpuBackend::max_head_dim() const { return cpu::kMaxHeadDim; }

std::optional<bytes_t> available_host_bytes() {
    std::optional<bytes_t> available;
    std::ifstream meminfo("/proc/meminfo");
    for (std::string key; meminfo >> key;) {
        std::int64_t kib = 0;
        meminfo >> kib;
        if (key == "MemAvailable:") available = kib * 1024;
        meminfo.ignore(1 << 10, '\n');
    }
    // cgroup v2: the limit ("max" when none) less what the group already uses.
    std::ifstream max_file("/sys/fs/cgroup/memory.max"), current_file("/sys/fs/cgroup/memory.current");
    std::int64_t limit = 0, used = 0;
    if (max_file >> limit && current_file >> used) {
        const bytes_t left = std::max<bytes_t>(0, limit - used);
        available = available ? std::min(*available, left) : left;
    }
    return available;
}

void* CpuBackend::map(const Event& e) {
    // operator new never returns null for a size of 0, so every buffer has an address.
    return ::operator new(static_cast<std::size_t>(e.bytes), std::align_val_t{kAlignment});
}
void CpuBackend::unmap(void* p, const Event&) { ::operator delete(p, std::align_val_t{kAlignment}); }
void CpuBackend::copy(void* dst, const void* src, std::size_t bytes) { std::memcpy(dst, src, bytes); }
void CpuBackend::to_host(float* dst, ConstTensor src, std::int64_t n) { cpu::cast(dst, c(src), n); }

void CpuBackend::cast(Tensor out, ConstTensor in, std::int64_t n) { cpu::cast(c(out), c(in), n); }
void CpuBackend::scale(Tensor out, ConstTensor in, std::int64_t n, float s) { cpu::scale(c(out), c(in), n, s); }
void CpuBackend::zero(Tensor out, std::int64_t n) { cpu::zero(c(out), n); }
void CpuBackend::fill(Tensor out, std::int64_t n, float value) { cpu::fill(c(out), n, value); }
void CpuBackend::fill_uniform(Tensor out, std::int64_t n, float half_width, std::uint64_t key) {
    cpu::fill_uniform(c(out), n, half_width, key);
}

void CpuBackend::linear_forward(Tensor out, ConstTensor in, ConstTensor W, std::int64_t n, std::int64_t i,
                                std::int64_t o, bool accumulate) {
    cpu::linear_forward(c(out), c(in), c(W), n, i, o, accumulate);
}
void CpuBackend::linear_backward_input(Tensor din, ConstTensor dout, ConstTensor W, std::int64_t n, std::int64_t i,
                                       std::int64_t o, bool accumulate) {
    cpu::linear_backward_input(c(din), c(dout), c(W), n, i, o, accumulate);
}
void CpuBackend::linear_backward_weight(Tensor dW, ConstTensor dout, ConstTensor in, std::int64_t n, std::int64_t i,
                                        std::int64_t o, bool accumulate) {
    cpu::linear_backward_weight(c(dW), c(dout), c(in), n, i, o, accumulate);
}
void CpuBackend::bias_forward(Tensor out, ConstTensor b, std::int64_t n, std::int64_t o) {
    cpu::bias_forward(c(out), c(b), n, o);
}
void CpuBackend::bias_backward(Tensor db, ConstTensor dout, std::int64_t n, std::int64_t o) {
    cpu::bias_backward(c(db), c(dout), n, o);
}

void CpuBackend::embedding_forward(Tensor out, ConstTensor table, const std::int64_t* ids, std::int64_t n,
                                   std::int64_t d, std::int64_t V) {
    cpu::embedding_forward(c(out), c(table), ids, n, d, V);
}
void CpuBackend::embedding_backward(Tensor dtable, ConstTensor dout, const std::int64_t* ids, std::int64_t n,
                                    std::int64_t d, std::int64_t V) {
    cpu::embedding_backward(c(dtable), c(dout), ids, n, d, V);
}

void CpuBackend::rmsnorm_forward(Tensor y, float* rstd, ConstTensor x, ConstTensor w, std::int64_t n, std::int64_t d,
                                 float eps, NormKind kind) {
    cpu::rmsnorm_forward(c(y), rstd, c(x), c(w), n, d, eps, kind);
}
void CpuBackend::rmsnorm_backward(Tensor dx, Tensor dw, ConstTensor dy, ConstTensor x, ConstTensor w,
                                  const float* rstd, std::int64_t n, std::int64_t d, NormKind kind) {
    cpu::rmsnorm_backward(c(dx), c(dw), c(dy), c(x), c(w), rstd, n, d, kind);
}

void CpuBackend::rope_forward(Tensor q, Tensor k, std::int64_t B, std::int64_t S, std::int64_t nh, std::int64_t nkv,
                              std::int64_t hd, std::int64_t rot, float theta) {
    cpu::rope_forward(c(q), c(k), B, S, nh, nkv, hd, rot, theta);
}
void CpuBackend::rope_backward(Tensor dq, Tensor dk, std::int64_t B, std::int64_t S, std::int64_t nh,
                               std::int64_t nkv, std::int64_t hd, std::int64_t rot, float theta) {
    cpu::rope_backward(c(dq), c(dk), B, S, nh, nkv, hd, rot, theta);
}

std::int64_t CpuBackend::flash_lse_floats(const AttentionConfig& a) const { return cpu::flash_lse_floats(a); }
std::int64_t CpuBackend::flash_dq_workspace_floats(const AttentionConfig& a) const {
    return cpu::flash_dq_workspace_floats(a);
}
std::int64_t CpuBackend::flash_delta_workspace_floats(const AttentionConfig& a) const {
    return cpu::flash_delta_workspace_floats(a);
}
void CpuBackend::flash_attention_forward(Tensor o, float* lse, ConstTensor q, ConstTensor k, ConstTensor v,
                                         const AttentionConfig& a) {
    cpu::flash_attention_forward(c(o), lse, c(q), c(k), c(v), a);
}
void CpuBackend::flash_attention_backward(Tensor dq, Tensor dk, Tensor dv, float* dq_ws, float* delta_ws,
                                          ConstTensor dout, ConstTensor q, ConstTensor k, ConstTensor v,
                                          ConstTensor o, const float* lse, const AttentionConfig& a) {
    cpu::flash_attention_backward(c(dq), c(dk), c(dv), dq_ws, delta_ws, c(dout), c(q), c(k), c(v), c(o), lse, a);
}
void CpuBackend::attention_sinks_backward(Tensor dsinks, const float* lse, const float* delta,
                                          const AttentionConfig& a) {
    cpu::attention_sinks_backward(c(dsinks), lse, delta, a);
}
void CpuBackend::repeat_kv_forward(Tensor out, ConstTensor in, std::int64_t rows, std::int64_t nh, std::int64_t nkv,
                                   std::int64_t hd) {
    cpu::repeat_kv_forward(c(out), c(in), rows, nh, nkv, hd);
}
void CpuBackend::repeat_kv_backward(Tensor din, ConstTensor dout, std::int64_t rows, std::int64_t nh,
                                    std::int64_t nkv, std::int64_t hd) {
    cpu::repeat_kv_backward(c(din), c(dout), rows, nh, nkv, hd);
}
void CpuBackend::attention_scores(Tensor scores, ConstTensor a, ConstTensor b, std::int64_t B, std::int64_t S,
                                  std::int64_t nh, std::int64_t hd) {
    cpu::attention_scores(c(scores), c(a), c(b), B, S, nh, hd);
}
void CpuBackend::attention_apply(Tensor out, ConstTensor p, ConstTensor x, std::int64_t B, std::int64_t S,
                                 std::int64_t nh, std::int64_t hd) {
    cpu::attention_apply(c(out), c(p), c(x), B, S, nh, hd);
}
void CpuBackend::attention_apply_transposed(Tensor out, ConstTensor p, ConstTensor x, std::int64_t B,
                                            std::int64_t S, std::int64_t nh, std::int64_t hd) {
    cpu::attention_apply_transposed(c(out), c(p), c(x), B, S, nh, hd);
}
void CpuBackend::causal_mask_fill(Tensor mask, std::int64_t B, std::int64_t S, std::int64_t window) {
    cpu::causal_mask_fill(c(mask), B, S, window);
}
void CpuBackend::softmax_forward(float* y, ConstTensor x, std::int64_t rows, std::int64_t cols) {
    cpu::softmax_forward(y, c(x), rows, cols);
}
void CpuBackend::softmax_backward(Tensor dx, const float* dy, const float* y, std::int64_t rows, std::int64_t cols) {
    cpu::softmax_backward(c(dx), dy, y, rows, cols);
}

void CpuBackend::swiglu_forward(Tensor m, ConstTensor g, ConstTensor u, std::int64_t n, GatedAct act) {
    cpu::swiglu_forward(c(m), c(g), c(u), n, act);
}
void CpuBackend::swiglu_backward(Tensor dg, Tensor du, ConstTensor dm, ConstTensor g, ConstTensor u, std::int64_t n,
                                 GatedAct act) {
    cpu::swiglu_backward(c(dg), c(du), c(dm), c(g), c(u), n, act);
}
void CpuBackend::moe_route(float* w, std::int64_t* idx, std::int64_t* pos, std::int64_t* offsets, const float* probs,
                           std::int64_t n, std::int64_t E, std::int64_t k, bool normalize) {
    cpu::moe_route(w, idx, pos, offsets, probs, n, E, k, normalize);
}
void CpuBackend::moe_route_backward(float* dprobs, const float* dw, const float* probs, const std::int64_t* idx,
                                    std::int64_t n, std::int64_t E, std::int64_t k, bool normalize) {
    cpu::moe_route_backward(dprobs, dw, probs, idx, n, E, k, normalize);
}
void CpuBackend::moe_gather(Tensor xs, ConstTensor x, const std::int64_t* pos, std::int64_t n, std::int64_t k,
                            std::int64_t d) {
    cpu::moe_gather(c(xs), c(x), pos, n, k, d);
}
void CpuBackend::moe_combine(Tensor y, ConstTensor ys, const float* w, const std::int64_t* pos, std::int64_t n,
                             std::int64_t k, std::int64_t d, bool accumulate) {
    cpu::moe_combine(c(y), c(ys), w, pos, n, k, d, accumulate);
}
void CpuBackend::moe_combine_backward(Tensor dys, float* dw, ConstTensor dy, ConstTensor ys, const float* w,
                                      const std::int64_t* pos, std::int64_t n, std::int64_t k, std::int64_t d) {
    cpu::moe_combine_backward(c(dys), dw, c(dy), c(ys), w, pos, n, k, d);
}
void CpuBackend::residual_forward(Tensor out, ConstTensor a, ConstTensor b, std::int64_t n) {
    cpu::residual_forward(c(out), c(a), c(b), n);
}
void CpuBackend::residual_accumulate(Tensor a, ConstTensor b, std::int64_t n) { cpu::residual_accumulate(c(a), c(b), n); }
void CpuBackend::softcap_forward(Tensor y, ConstTensor x, std::int64_t n, float cap) {
    cpu::softcap_forward(c(y), c(x), n, cap);
}
void CpuBackend::softcap_backward(Tensor dx, ConstTensor dy, ConstTensor y, std::int64_t n, float cap) {
    cpu::softcap_backward(c(dx), c(dy), c(y), n, cap);
}

void CpuBackend::cross_entropy_forward(float* logp, ConstTensor logits, const std::int64_t* labels, std::int64_t n,
                                       std::int64_t V) {
    loss_sum_ += cpu::cross_entropy_forward(logp, c(logits), labels, n, V);
}
void CpuBackend::nll_loss_backward(float* dlogp, const std::int64_t* labels, std::int64_t n, std::int64_t V,
                                   float scale) {
    cpu::nll_loss_backward(dlogp, labels, n, V, scale);
}
void CpuBackend::log_softmax_backward(float* dx, const float* dy, const float* logp, std::int64_t n, std::int64_t V) {
    cpu::log_softmax_backward(dx, dy, logp, n, V);
}
void CpuBackend::cross_entropy_fused(Tensor logits, const std::int64_t* labels, std::int64_t n, std::int64_t V,
                                     float scale, float softcap, bool count_loss) {
    const double sum = cpu::cross_entropy_fused(c(logits), nullptr, labels, n, V, scale, softcap);
    if (count_loss) loss_sum_ += sum;
}

void CpuBackend::adamw_step(Tensor param, ConstTensor grad, Tensor m, Tensor v, std::int64_t n, const AdamWConfig& a,
                            std::int64_t step) {
    cpu::adamw_step(c(param), c(grad), c(m), c(v), n, a, step);
}
void CpuBackend::sgd_step(Tensor param, ConstTensor grad, Tensor momentum_buf, std::int64_t n, const SgdConfig& a,
                          std::int64_t step) {
    cpu::sgd_step(c(param), c(grad), c(momentum_buf), n, a, step);
}

}  // namespace mst::exec
