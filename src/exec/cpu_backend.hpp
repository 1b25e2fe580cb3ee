#pragma once
// The CPU backend: the Eigen kernels of cpu/kernels.hpp on aligned host memory. The reference
// every other backend is checked against, and the one CI runs.
#include <optional>

#include "backend.hpp"

namespace mst::exec {

// What this process may still allocate: the kernel's MemAvailable, lowered by a cgroup (v2)
// memory.max; nullopt where neither can be read.
std::optional<bytes_t> available_host_bytes();

class CpuBackend : public Backend {
public:
    static constexpr std::size_t kAlignment = 64;  // a cache line; Eigen's widest vectors need 32

    std::string name() const override { return "cpu"; }
    // Its "device" tensors live in host memory too: running out is never the GPU's.
    std::string memory_name(Device) const override { return "host"; }
    std::optional<bytes_t> memory_available() const override { return available_host_bytes(); }
    std::int64_t max_head_dim() const override;

    void* map(const Event& e) override;
    void unmap(void* p, const Event& e) override;
    void copy(void* dst, const void* src, std::size_t bytes) override;
    void to_host(float* dst, ConstTensor src, std::int64_t n) override;

    void cast(Tensor out, ConstTensor in, std::int64_t n) override;
    void scale(Tensor out, ConstTensor in, std::int64_t n, float s) override;
    void zero(Tensor out, std::int64_t n) override;
    void fill(Tensor out, std::int64_t n, float value) override;
    void fill_uniform(Tensor out, std::int64_t n, float half_width, std::uint64_t key) override;
    void linear_forward(Tensor out, ConstTensor in, ConstTensor W, std::int64_t n, std::int64_t i, std::int64_t o,
                        bool accumulate) override;
    void linear_backward_input(Tensor din, ConstTensor dout, ConstTensor W, std::int64_t n, std::int64_t i,
                               std::int64_t o, bool accumulate) override;
    void linear_backward_weight(Tensor dW, ConstTensor dout, ConstTensor in, std::int64_t n, std::int64_t i,
                                std::int64_t o, bool accumulate) override;
    void bias_forward(Tensor out, ConstTensor b, std::int64_t n, std::int64_t o) override;
    void bias_backward(Tensor db, ConstTensor dout, std::int64_t n, std::int64_t o) override;
    void embedding_forward(Tensor out, ConstTensor table, const std::int64_t* ids, std::int64_t n, std::int64_t d,
                           std::int64_t V) override;
    void embedding_backward(Tensor dtable, ConstTensor dout, const std::int64_t* ids, std::int64_t n, std::int64_t d,
                            std::int64_t V) override;
    void rmsnorm_forward(Tensor y, float* rstd, ConstTensor x, ConstTensor w, std::int64_t n, std::int64_t d,
                         float eps, NormKind kind) override;
    void rmsnorm_backward(Tensor dx, Tensor dw, ConstTensor dy, ConstTensor x, ConstTensor w, const float* rstd,
                          std::int64_t n, std::int64_t d, NormKind kind) override;
    void rope_forward(Tensor q, Tensor k, std::int64_t B, std::int64_t S, std::int64_t nh, std::int64_t nkv,
                      std::int64_t hd, std::int64_t rot, float theta) override;
    void rope_backward(Tensor dq, Tensor dk, std::int64_t B, std::int64_t S, std::int64_t nh, std::int64_t nkv,
                       std::int64_t hd, std::int64_t rot, float theta) override;
    std::int64_t flash_lse_floats(const AttentionConfig& c) const override;
    std::int64_t flash_dq_workspace_floats(const AttentionConfig& c) const override;
    std::int64_t flash_delta_workspace_floats(const AttentionConfig& c) const override;
    void flash_attention_forward(Tensor o, float* lse, ConstTensor q, ConstTensor k, ConstTensor v,
                                 const AttentionConfig& c) override;
    void flash_attention_backward(Tensor dq, Tensor dk, Tensor dv, float* dq_ws, float* delta_ws, ConstTensor dout,
                                  ConstTensor q, ConstTensor k, ConstTensor v, ConstTensor o, const float* lse,
                                  const AttentionConfig& c) override;
    void attention_sinks_backward(Tensor dsinks, const float* lse, const float* delta,
                                  const AttentionConfig& c) override;
    void repeat_kv_forward(Tensor out, ConstTensor in, std::int64_t rows, std::int64_t nh, std::int64_t nkv,
                           std::int64_t hd) override;
    void repeat_kv_backward(Tensor din, ConstTensor dout, std::int64_t rows, std::int64_t nh, std::int64_t nkv,
                            std::int64_t hd) override;
    void attention_scores(Tensor scores, ConstTensor a, ConstTensor b, std::int64_t B, std::int64_t S,
                          std::int64_t nh, std::int64_t hd) override;
    void attention_apply(Tensor out, ConstTensor p, ConstTensor x, std::int64_t B, std::int64_t S, std::int64_t nh,
                         std::int64_t hd) override;
    void attention_apply_transposed(Tensor out, ConstTensor p, ConstTensor x, std::int64_t B, std::int64_t S,
                                    std::int64_t nh, std::int64_t hd) override;
    void causal_mask_fill(Tensor mask, std::int64_t B, std::int64_t S, std::int64_t window) override;
    void softmax_forward(float* y, ConstTensor x, std::int64_t rows, std::int64_t cols) override;
    void softmax_backward(Tensor dx, const float* dy, const float* y, std::int64_t rows, std::int64_t cols) override;
    void swiglu_forward(Tensor m, ConstTensor g, ConstTensor u, std::int64_t n, GatedAct act) override;
    void swiglu_backward(Tensor dg, Tensor du, ConstTensor dm, ConstTensor g, ConstTensor u, std::int64_t n,
                         GatedAct act) override;
    void moe_route(float* w, std::int64_t* idx, std::int64_t* pos, std::int64_t* offsets, const float* probs,
                   std::int64_t n, std::int64_t E, std::int64_t k, bool normalize) override;
    void moe_route_backward(float* dprobs, const float* dw, const float* probs, const std::int64_t* idx, std::int64_t n,
                            std::int64_t E, std::int64_t k, bool normalize) override;
    void moe_gather(Tensor xs, ConstTensor x, const std::int64_t* pos, std::int64_t n, std::int64_t k,
                    std::int64_t d) override;
    void moe_combine(Tensor y, ConstTensor ys, const float* w, const std::int64_t* pos, std::int64_t n, std::int64_t k,
                     std::int64_t d, bool accumulate) override;
    void moe_combine_backward(Tensor dys, float* dw, ConstTensor dy, ConstTensor ys, const float* w,
                              const std::int64_t* pos, std::int64_t n, std::int64_t k, std::int64_t d) override;
    void residual_forward(Tensor out, ConstTensor a, ConstTensor b, std::int64_t n) override;
    void residual_accumulate(Tensor a, ConstTensor b, std::int64_t n) override;
    void softcap_forward(Tensor y, ConstTensor x, std::int64_t n, float cap) override;
    void softcap_backward(Tensor dx, ConstTensor dy, ConstTensor y, std::int64_t n, float cap) override;
    void cross_entropy_forward(float* logp, ConstTensor logits, const std::int64_t* labels, std::int64_t n,
                               std::int64_t V) override;
    void nll_loss_backward(float* dlogp, const std::int64_t* labels, std::int64_t n, std::int64_t V,
                           float scale) override;
    void log_softmax_backward(float* dx, const float* dy, const float* logp, std::int64_t n, std::int64_t V) override;
    void cross_entropy_fused(Tensor logits, const std::int64_t* labels, std::int64_t n, std::int64_t V, float scale,
                             float softcap, bool count_loss) override;
    double loss_sum() override { return loss_sum_; }
    void adamw_step(Tensor param, ConstTensor grad, Tensor m, Tensor v, std::int64_t n, const AdamWConfig& c,
                    std::int64_t step) override;
    void sgd_step(Tensor param, ConstTensor grad, Tensor momentum_buf, std::int64_t n, const SgdConfig& c,
                  std::int64_t step) override;

private:
    double loss_sum_ = 0;
};

}  // namespace mst::exec
