#pragma once
// Backend: what the executor needs from a machine to run one training step -- memory and the
// op kernels. One executor (executor*.cpp) drives every backend with the same calls, in the
// same order, on buffers of the same sizes, so a backend changes *where* the step runs, never
// what it allocates: the CPU backend (cpu_backend.cpp, Eigen kernels on host memory) and the
// CUDA backend (src/cuda/cuda_backend.cpp, CUDA kernels and cuBLASLt on device memory from a
// DeviceAllocator that CUPTI watches).
//
// The kernels have the contract of src/exec/cpu/kernels.hpp (their reference documentation):
// a kernel never allocates; every buffer is the caller's, in the backend's memory (device
// memory for CUDA; index arrays are int64 in that memory too). Calls may be asynchronous;
// synchronize() waits for them. Loss sums are accumulated by the backend (loss_sum()), so that
// no kernel has to hand a device scalar back to the host in the middle of a step.
#include <cstddef>
#include <cstdint>
#include <limits>
#include <new>
#include <optional>
#include <string>
#include <utility>

#include "mst/kernel_types.hpp"
#include "mst/timeline.hpp"

namespace mst::exec {

struct AnyBf16;  // the executor never touches elements: a tensor is a pointer and a dtype
using Tensor = BasicTensor<AnyBf16>;
using ConstTensor = BasicConstTensor<AnyBf16>;

// What Backend::map throws when the backend is out of memory (and only then: any other failure is
// a std::runtime_error): a std::bad_alloc with the backend's reason.
class BackendOutOfMemory : public std::bad_alloc {
public:
    explicit BackendOutOfMemory(std::string why) : why_(std::move(why)) {}
    const char* what() const noexcept override { return why_.c_str(); }

private:
    std::string why_;
};

class Backend {
public:
    virtual ~Backend() = default;

    // The measured timeline's source ("cpu", "cuda").
    virtual std::string name() const = 0;
    // The memory a tensor on `device` takes, as an out-of-memory message names it ("gpu", "host").
    virtual std::string memory_name(Device device) const { return to_string(device); }
    // The bytes this backend can still give a step, when it knows (the executor then refuses a
    // step the simulator says needs more); nullopt: allocate and see (a GPU's out of memory is a result).
    virtual std::optional<bytes_t> memory_available() const { return std::nullopt; }
    virtual std::int64_t max_head_dim() const = 0;
    // The most experts its routing kernels sort (a Mixture-of-Experts model with more is refused).
    virtual std::int64_t max_experts() const { return std::numeric_limits<std::int64_t>::max(); }

    // ---- memory -----------------------------------------------------------------------------
    // Memory for the event `e` about to be recorded (its name, bytes, category, device and
    // context): Device::Gpu is the backend's working memory, Device::Host host memory the
    // backend can copy to and from (pinned for CUDA). Throws a std::bad_alloc (BackendOutOfMemory)
    // when out of memory, a std::runtime_error on any other failure.
    virtual void* map(const Event& e) = 0;
    virtual void unmap(void* p, const Event& e) = 0;
    // The executor's context changed (the next events and kernels belong to it).
    virtual void set_context(const std::string& op, std::int32_t layer, Phase phase, std::int32_t micro_step) {
        (void)op, (void)layer, (void)phase, (void)micro_step;
    }
    // dst[0, bytes) = src[0, bytes) between any two buffers of this backend or the host.
    virtual void copy(void* dst, const void* src, std::size_t bytes) = 0;
    // dst[n] (host) = src[n] as float
    virtual void to_host(float* dst, ConstTensor src, std::int64_t n) = 0;
    // The fixed GEMM workspace, once allocated (a backend without one ignores it).
    virtual void set_workspace(void* p, std::size_t bytes) { (void)p, (void)bytes; }
    // Waits for every call made so far (the op timer reads the clock after it).
    virtual void synchronize() {}

    // ---- kernels (src/exec/cpu/kernels.hpp documents each) --------------------------------------
    virtual void cast(Tensor out, ConstTensor in, std::int64_t n) = 0;
    virtual void scale(Tensor out, ConstTensor in, std::int64_t n, float s) = 0;
    virtual void zero(Tensor out, std::int64_t n) = 0;
    virtual void fill(Tensor out, std::int64_t n, float value) = 0;
    virtual void fill_uniform(Tensor out, std::int64_t n, float half_width, std::uint64_t key) = 0;

    virtual void linear_forward(Tensor out, ConstTensor in, ConstTensor W, std::int64_t n, std::int64_t i,
                                std::int64_t o, bool accumulate = false) = 0;
    virtual void linear_backward_input(Tensor din, ConstTensor dout, ConstTensor W, std::int64_t n, std::int64_t i,
                                       std::int64_t o, bool accumulate = false) = 0;
    virtual void linear_backward_weight(Tensor dW, ConstTensor dout, ConstTensor in, std::int64_t n, std::int64_t i,
                                        std::int64_t o, bool accumulate) = 0;
    virtual void bias_forward(Tensor out, ConstTensor b, std::int64_t n, std::int64_t o) = 0;
    virtual void bias_backward(Tensor db, ConstTensor dout, std::int64_t n, std::int64_t o) = 0;

    virtual void embedding_forward(Tensor out, ConstTensor table, const std::int64_t* ids, std::int64_t n,
                                   std::int64_t d, std::int64_t V) = 0;
    virtual void embedding_backward(Tensor dtable, ConstTensor dout, const std::int64_t* ids, std::int64_t n,
                                    std::int64_t d, std::int64_t V) = 0;

    virtual void rmsnorm_forward(Tensor y, float* rstd, ConstTensor x, ConstTensor w, std::int64_t n, std::int64_t d,
                                 float eps, NormKind kind) = 0;
    virtual void rmsnorm_backward(Tensor dx, Tensor dw, ConstTensor dy, ConstTensor x, ConstTensor w,
                                  const float* rstd, std::int64_t n, std::int64_t d, NormKind kind) = 0;

    // rot: the leading dims of each head that rotate (hd, or less for Phi-3's partial rotary)
    virtual void rope_forward(Tensor q, Tensor k, std::int64_t B, std::int64_t S, std::int64_t nh, std::int64_t nkv,
                              std::int64_t hd, std::int64_t rot, float theta) = 0;
    virtual void rope_backward(Tensor dq, Tensor dk, std::int64_t B, std::int64_t S, std::int64_t nh,
                               std::int64_t nkv, std::int64_t hd, std::int64_t rot, float theta) = 0;

    // Workspace sizes of this backend's flash attention, in floats.
    virtual std::int64_t flash_lse_floats(const AttentionConfig& c) const = 0;
    virtual std::int64_t flash_dq_workspace_floats(const AttentionConfig& c) const = 0;
    virtual std::int64_t flash_delta_workspace_floats(const AttentionConfig& c) const = 0;
    virtual void flash_attention_forward(Tensor o, float* lse, ConstTensor q, ConstTensor k, ConstTensor v,
                                         const AttentionConfig& c) = 0;
    virtual void flash_attention_backward(Tensor dq, Tensor dk, Tensor dv, float* dq_ws, float* delta_ws,
                                          ConstTensor dout, ConstTensor q, ConstTensor k, ConstTensor v,
                                          ConstTensor o, const float* lse, const AttentionConfig& c) = 0;
    virtual void attention_sinks_backward(Tensor dsinks, const float* lse, const float* delta,
                                          const AttentionConfig& c) = 0;
    virtual void repeat_kv_forward(Tensor out, ConstTensor in, std::int64_t rows, std::int64_t nh, std::int64_t nkv,
                                   std::int64_t hd) = 0;
    virtual void repeat_kv_backward(Tensor din, ConstTensor dout, std::int64_t rows, std::int64_t nh,
                                    std::int64_t nkv, std::int64_t hd) = 0;
    virtual void attention_scores(Tensor scores, ConstTensor a, ConstTensor b, std::int64_t B, std::int64_t S,
                                  std::int64_t nh, std::int64_t hd) = 0;
    virtual void attention_apply(Tensor out, ConstTensor p, ConstTensor x, std::int64_t B, std::int64_t S,
                                 std::int64_t nh, std::int64_t hd) = 0;
    virtual void attention_apply_transposed(Tensor out, ConstTensor p, ConstTensor x, std::int64_t B,
                                            std::int64_t S, std::int64_t nh, std::int64_t hd) = 0;
    virtual void causal_mask_fill(Tensor mask, std::int64_t B, std::int64_t S, std::int64_t window) = 0;
    virtual void softmax_forward(float* y, ConstTensor x, std::int64_t rows, std::int64_t cols) = 0;
    virtual void softmax_backward(Tensor dx, const float* dy, const float* y, std::int64_t rows,
                                  std::int64_t cols) = 0;

    virtual void swiglu_forward(Tensor m, ConstTensor g, ConstTensor u, std::int64_t n, GatedAct act) = 0;
    virtual void swiglu_backward(Tensor dg, Tensor du, ConstTensor dm, ConstTensor g, ConstTensor u, std::int64_t n,
                                 GatedAct act) = 0;
    // Mixture-of-Experts: index arrays (idx, pos, offsets) are int64 in this backend's memory.
    virtual void moe_route(float* w, std::int64_t* idx, std::int64_t* pos, std::int64_t* offsets, const float* probs,
                           std::int64_t n, std::int64_t E, std::int64_t k, bool normalize) = 0;
    virtual void moe_route_backward(float* dprobs, const float* dw, const float* probs, const std::int64_t* idx,
                                    std::int64_t n, std::int64_t E, std::int64_t k, bool normalize) = 0;
    virtual void moe_gather(Tensor xs, ConstTensor x, const std::int64_t* pos, std::int64_t n, std::int64_t k,
                            std::int64_t d) = 0;
    virtual void moe_combine(Tensor y, ConstTensor ys, const float* w, const std::int64_t* pos, std::int64_t n,
                             std::int64_t k, std::int64_t d, bool accumulate) = 0;
    virtual void moe_combine_backward(Tensor dys, float* dw, ConstTensor dy, ConstTensor ys, const float* w,
                                      const std::int64_t* pos, std::int64_t n, std::int64_t k, std::int64_t d) = 0;
    virtual void residual_forward(Tensor out, ConstTensor a, ConstTensor b, std::int64_t n) = 0;
    virtual void residual_accumulate(Tensor a, ConstTensor b, std::int64_t n) = 0;
    virtual void softcap_forward(Tensor y, ConstTensor x, std::int64_t n, float cap) = 0;
    virtual void softcap_backward(Tensor dx, ConstTensor dy, ConstTensor y, std::int64_t n, float cap) = 0;

    // Cross-entropy: the loss sums go to loss_sum(); the fused kernel adds its rows' losses
    // only when `count_loss` (a backward that recomputes the gradient must not count twice).
    virtual void cross_entropy_forward(float* logp, ConstTensor logits, const std::int64_t* labels, std::int64_t n,
                                       std::int64_t V) = 0;
    virtual void nll_loss_backward(float* dlogp, const std::int64_t* labels, std::int64_t n, std::int64_t V,
                                   float scale) = 0;
    virtual void log_softmax_backward(float* dx, const float* dy, const float* logp, std::int64_t n,
                                      std::int64_t V) = 0;
    virtual void cross_entropy_fused(Tensor logits, const std::int64_t* labels, std::int64_t n, std::int64_t V,
                                     float scale, float softcap, bool count_loss) = 0;
    // The summed row losses of every counted call so far (synchronises).
    virtual double loss_sum() = 0;

    virtual void adamw_step(Tensor param, ConstTensor grad, Tensor m, Tensor v, std::int64_t n,
                            const AdamWConfig& c, std::int64_t step) = 0;
    virtual void sgd_step(Tensor param, ConstTensor grad, Tensor momentum_buf, std::int64_t n, const SgdConfig& c,
                          std::int64_t step) = 0;
};

}  // namespace mst::exec
