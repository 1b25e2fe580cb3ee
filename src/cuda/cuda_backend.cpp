// The CUDA backend of the executor, and execute_cuda: the executor of src/exec (the same code
// that runs on the CPU backend and is checked there event by event against the simulator)
// driving the CUDA kernels, cuBLASLt GEMMs and a DeviceAllocator watched by CUPTI.
//
// One measured step:
//  1. CUPTI starts before the CUDA context exists (CuptiRecorder::start), then the backend's
//     own bookkeeping is set up -- the cuBLASLt handle and an 8-byte loss accumulator -- and
//     those records are cleared: the step's timeline holds the step's tensors only.
//  2. The executor runs the step; every buffer is one DeviceAllocator allocation (exact mode:
//     one cudaMallocAsync each), host buffers (offloaded checkpoints) are pinned host memory.
//     Each executor context change opens a CUPTI op marker, so every record carries its op.
//  3. The recorder stops before the persistent state is freed, and the measured timeline is
//     built from CUPTI's records (or the allocator's log, see cupti_recorder.cuh). When its
//     device events equal the executor's own log event by event, the step's timeline is that
//     log (the same device events, plus the host events CUPTI does not attribute); otherwise
//     it is CUPTI's, and the report names the first difference.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <optional>
#include <unordered_map>
#include <vector>

#include <fmt/format.h>

#include "cuda/cupti_recorder.cuh"
#include "cuda/device_allocator.cuh"
#include "cuda/gemm.cuh"
#include "cuda/kernels.cuh"
#include "executor.hpp"
#include "mst/compare.hpp"
#include "mst/error.hpp"
#include "mst/execute.hpp"

namespace mst {

namespace {

using exec::ConstTensor;
using exec::Tensor;

cuda::Tensor g(Tensor t) { return {t.data, t.dtype}; }
cuda::ConstTensor g(ConstTensor t) { return {t.data, t.dtype}; }

void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) {
        cudaGetLastError();
        throw std::runtime_error(fmt::format("cuda backend: {}: {}: {}", what, cudaGetErrorName(e), cudaGetErrorString(e)));
    }
}

class CudaBackend final : public exec::Backend {
public:
    CudaBackend(cuda::DeviceAllocator::Mode mode, cuda::CuptiRecorder* recorder)
        : recorder_(recorder),
          allocator_(mode, cuda::cuda_segment_source(mode == cuda::DeviceAllocator::Mode::Exact, nullptr)) {
        check(cudaMalloc(&loss_, sizeof(double)), "cudaMalloc of the loss accumulator");
        check(cudaMemset(loss_, 0, sizeof(double)), "cudaMemset of the loss accumulator");
        gemm_ = std::make_unique<cuda::GemmContext>(nullptr, 0);
        if (recorder_ && recorder_->active()) allocator_.set_clock([r = recorder_] { return r->now_ns(); });
    }
    ~CudaBackend() override {
        cudaDeviceSynchronize();
        cudaFree(loss_);
    }
    CudaBackend(const CudaBackend&) = delete;
    CudaBackend& operator=(const CudaBackend&) = delete;

    cuda::DeviceAllocator& allocator() { return allocator_; }

    std::string name() const override { return "cuda"; }
    std::int64_t max_head_dim() const override { return cuda::kMaxHeadDim; }
    std::int64_t max_experts() const override { return cuda::kMaxExperts; }

    void* map(const Event& e) override {
        if (e.device == Device::Host) {
            void* p = nullptr;
            const cudaError_t err = cudaMallocHost(&p, static_cast<std::size_t>(std::max<bytes_t>(e.bytes, 1)));
            if (err == cudaErrorMemoryAllocation) {
                cudaGetLastError();
                throw exec::BackendOutOfMemory(std::string("cudaMallocHost: ") + cudaGetErrorString(err));
            }
            check(err, "cudaMallocHost");
            return p;
        }
        allocator_.set_context(e.op, e.layer, e.phase, e.micro_step);
        void* p = nullptr;
        try {
            p = allocator_.allocate(e.bytes, e.name, e.category, Device::Gpu);
        } catch (const cuda::DeviceOutOfMemory& oom) {
            throw exec::BackendOutOfMemory(oom.what());
        }
        if (!p) throw std::logic_error("cuda backend: a tensor of 0 bytes (" + e.name + ")");
        return p;
    }
    // Called from buffer destructors, so it never throws: a failure (after a device fault every
    // CUDA call fails) is kept and thrown by the next synchronize() or loss_sum().
    void unmap(void* p, const Event& e) override {
        try {
            if (e.device == Device::Host) {
                check(cudaStreamSynchronize(nullptr), "synchronising before freeing pinned memory");
                check(cudaFreeHost(p), "cudaFreeHost");
                return;
            }
            allocator_.set_context(e.op, e.layer, e.phase, e.micro_step);
            allocator_.release(p);
        } catch (const std::exception& ex) {
            if (deferred_error_.empty()) deferred_error_ = std::string("freeing '") + e.name + "': " + ex.what();
        }
    }
    void set_context(const std::string& op, std::int32_t layer, Phase phase, std::int32_t micro_step) override {
        if (recorder_ && recorder_->active()) recorder_->begin_op(op, layer, phase, micro_step);
    }
    void copy(void* dst, const void* src, std::size_t bytes) override {
        check(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault), "cudaMemcpy");
    }
    void to_host(float* dst, ConstTensor src, std::int64_t n) override {
        const auto count = static_cast<std::size_t>(n);
        if (src.dtype == DType::F32) {
            check(cudaMemcpy(dst, src.data, count * sizeof(float), cudaMemcpyDefault), "download");
            return;
        }
        std::vector<std::uint16_t> raw(count);
        check(cudaMemcpy(raw.data(), src.data, count * 2, cudaMemcpyDefault), "download");
        for (std::size_t i = 0; i < count; ++i) {
            const std::uint32_t bits = std::uint32_t(raw[i]) << 16;  // a bf16 is the top half of a float
            std::memcpy(dst + i, &bits, sizeof bits);
        }
    }
    void set_workspace(void* p, std::size_t bytes) override { gemm_->set_workspace(p, bytes); }
    void synchronize() override {
        check(cudaStreamSynchronize(nullptr), "a kernel of the previous op");
        if (!deferred_error_.empty()) throw std::runtime_error("cuda backend: " + deferred_error_);
    }

    void cast(Tensor out, ConstTensor in, std::int64_t n) override { cuda::cast(g(out), g(in), n); }
    void scale(Tensor out, ConstTensor in, std::int64_t n, float s) override { cuda::scale(g(out), g(in), n, s); }
    void zero(Tensor out, std::int64_t n) override { cuda::zero(g(out), n); }
    void fill(Tensor out, std::int64_t n, float value) override { cuda::fill(g(out), n, value); }
    void fill_uniform(Tensor out, std::int64_t n, float half_width, std::uint64_t key) override {
        cuda::fill_uniform(g(out), n, half_width, key);
    }
    void linear_forward(Tensor out, ConstTensor in, ConstTensor W, std::int64_t n, std::int64_t i, std::int64_t o,
                        bool accumulate) override {
        cuda::linear_forward(*gemm_, g(out), g(in), g(W), n, i, o, accumulate);
    }
    void linear_backward_input(Tensor din, ConstTensor dout, ConstTensor W, std::int64_t n, std::int64_t i,
                               std::int64_t o, bool accumulate) override {
        cuda::linear_backward_input(*gemm_, g(din), g(dout), g(W), n, i, o, accumulate);
    }
    void linear_backward_weight(Tensor dW, ConstTensor dout, ConstTensor in, std::int64_t n, std::int64_t i,
                                std::int64_t o, bool accumulate) override {
        cuda::linear_backward_weight(*gemm_, g(dW), g(dout), g(in), n, i, o, accumulate);
    }
    void bias_forward(Tensor out, ConstTensor b, std::int64_t n, std::int64_t o) override {
        cuda::bias_forward(g(out), g(b), n, o);
    }
    void bias_backward(Tensor db, ConstTensor dout, std::int64_t n, std::int64_t o) override {
        cuda::bias_backward(g(db), g(dout), n, o);
    }
    void embedding_forward(Tensor out, ConstTensor table, const std::int64_t* ids, std::int64_t n, std::int64_t d,
                           std::int64_t V) override {
        cuda::embedding_forward(g(out), g(table), ids, n, d, V);
    }
    void embedding_backward(Tensor dtable, ConstTensor dout, const std::int64_t* ids, std::int64_t n, std::int64_t d,
                            std::int64_t V) override {
        cuda::embedding_backward(g(dtable), g(dout), ids, n, d, V);
    }
    void rmsnorm_forward(Tensor y, float* rstd, ConstTensor x, ConstTensor w, std::int64_t n, std::int64_t d,
                         float eps, NormKind kind) override {
        cuda::rmsnorm_forward(g(y), rstd, g(x), g(w), n, d, eps, kind);
    }
    void rmsnorm_backward(Tensor dx, Tensor dw, ConstTensor dy, ConstTensor x, ConstTensor w, const float* rstd,
                          std::int64_t n, std::int64_t d, NormKind kind) override {
        cuda::rmsnorm_backward(g(dx), g(dw), g(dy), g(x), g(w), rstd, n, d, kind);
    }
    void rope_forward(Tensor q, Tensor k, std::int64_t B, std::int64_t S, std::int64_t nh, std::int64_t nkv,
                      std::int64_t hd, std::int64_t rot, float theta) override {
        cuda::rope_forward(g(q), g(k), B, S, nh, nkv, hd, rot, theta);
    }
    void rope_backward(Tensor dq, Tensor dk, std::int64_t B, std::int64_t S, std::int64_t nh, std::int64_t nkv,
                       std::int64_t hd, std::int64_t rot, float theta) override {
        cuda::rope_backward(g(dq), g(dk), B, S, nh, nkv, hd, rot, theta);
    }
    std::int64_t flash_lse_floats(const AttentionConfig& c) const override { return cuda::flash_lse_floats(c); }
    std::int64_t flash_dq_workspace_floats(const AttentionConfig& c) const override {
        return cuda::flash_dq_workspace_floats(c);
    }
    std::int64_t flash_delta_workspace_floats(const AttentionConfig& c) const override {
        return cuda::flash_delta_workspace_floats(c);
    }
    void flash_attention_forward(Tensor o, float* lse, ConstTensor q, ConstTensor k, ConstTensor v,
                                 const AttentionConfig& c) override {
        cuda::flash_attention_forward(g(o), lse, g(q), g(k), g(v), c);
    }
    void flash_attention_backward(Tensor dq, Tensor dk, Tensor dv, float* dq_ws, float* delta_ws, ConstTensor dout,
                                  ConstTensor q, ConstTensor k, ConstTensor v, ConstTensor o, const float* lse,
                                  const AttentionConfig& c) override {
        cuda::flash_attention_backward(g(dq), g(dk), g(dv), dq_ws, delta_ws, g(dout), g(q), g(k), g(v), g(o), lse, c);
    }
    void attention_sinks_backward(Tensor dsinks, const float* lse, const float* delta,
                                  const AttentionConfig& c) override {
        cuda::attention_sinks_backward(g(dsinks), lse, delta, c);
    }
    void repeat_kv_forward(Tensor out, ConstTensor in, std::int64_t rows, std::int64_t nh, std::int64_t nkv,
                           std::int64_t hd) override {
        cuda::repeat_kv_forward(g(out), g(in), rows, nh, nkv, hd);
    }
    void repeat_kv_backward(Tensor din, ConstTensor dout, std::int64_t rows, std::int64_t nh, std::int64_t nkv,
                            std::int64_t hd) override {
        cuda::repeat_kv_backward(g(din), g(dout), rows, nh, nkv, hd);
    }
    void attention_scores(Tensor scores, ConstTensor a, ConstTensor b, std::int64_t B, std::int64_t S,
                          std::int64_t nh, std::int64_t hd) override {
        cuda::attention_scores(g(scores), g(a), g(b), B, S, nh, hd);
    }
    void attention_apply(Tensor out, ConstTensor p, ConstTensor x, std::int64_t B, std::int64_t S, std::int64_t nh,
                         std::int64_t hd) override {
        cuda::attention_apply(g(out), g(p), g(x), B, S, nh, hd);
    }
    void attention_apply_transposed(Tensor out, ConstTensor p, ConstTensor x, std::int64_t B, std::int64_t S,
                                    std::int64_t nh, std::int64_t hd) override {
        cuda::attention_apply_transposed(g(out), g(p), g(x), B, S, nh, hd);
    }
    void causal_mask_fill(Tensor mask, std::int64_t B, std::int64_t S, std::int64_t window) override {
        cuda::causal_mask_fill(g(mask), B, S, window);
    }
    void softmax_forward(float* y, ConstTensor x, std::int64_t rows, std::int64_t cols) override {
        cuda::softmax_forward(y, g(x), rows, cols);
    }
    void softmax_backward(Tensor dx, const float* dy, const float* y, std::int64_t rows, std::int64_t cols) override {
        cuda::softmax_backward(g(dx), dy, y, rows, cols);
    }
    void moe_route(float* w, std::int64_t* idx, std::int64_t* pos, std::int64_t* offsets, const float* probs,
                   std::int64_t n, std::int64_t E, std::int64_t k, bool normalize) override {
        cuda::moe_route(w, idx, pos, offsets, probs, n, E, k, normalize);
    }
    void moe_route_backward(float* dprobs, const float* dw, const float* probs, const std::int64_t* idx, std::int64_t n,
                            std::int64_t E, std::int64_t k, bool normalize) override {
        cuda::moe_route_backward(dprobs, dw, probs, idx, n, E, k, normalize);
    }
    void moe_gather(Tensor xs, ConstTensor x, const std::int64_t* pos, std::int64_t n, std::int64_t k,
                    std::int64_t d) override {
        cuda::moe_gather(g(xs), g(x), pos, n, k, d);
    }
    void moe_combine(Tensor y, ConstTensor ys, const float* w, const std::int64_t* pos, std::int64_t n, std::int64_t k,
                     std::int64_t d, bool accumulate) override {
        cuda::moe_combine(g(y), g(ys), w, pos, n, k, d, accumulate);
    }
    void moe_combine_backward(Tensor dys, float* dw, ConstTensor dy, ConstTensor ys, const float* w,
                              const std::int64_t* pos, std::int64_t n, std::int64_t k, std::int64_t d) override {
        cuda::moe_combine_backward(g(dys), dw, g(dy), g(ys), w, pos, n, k, d);
    }
    void swiglu_forward(Tensor m, ConstTensor gt, ConstTensor u, std::int64_t n, GatedAct act) override {
        cuda::swiglu_forward(g(m), g(gt), g(u), n, act);
    }
    void swiglu_backward(Tensor dg, Tensor du, ConstTensor dm, ConstTensor gt, ConstTensor u, std::int64_t n,
                         GatedAct act) override {
        cuda::swiglu_backward(g(dg), g(du), g(dm), g(gt), g(u), n, act);
    }
    void residual_forward(Tensor out, ConstTensor a, ConstTensor b, std::int64_t n) override {
        cuda::residual_forward(g(out), g(a), g(b), n);
    }
    void residual_accumulate(Tensor a, ConstTensor b, std::int64_t n) override { cuda::residual_accumulate(g(a), g(b), n); }
    void softcap_forward(Tensor y, ConstTensor x, std::int64_t n, float cap) override {
        cuda::softcap_forward(g(y), g(x), n, cap);
    }
    void softcap_backward(Tensor dx, ConstTensor dy, ConstTensor y, std::int64_t n, float cap) override {
        cuda::softcap_backward(g(dx), g(dy), g(y), n, cap);
    }
    void cross_entropy_forward(float* logp, ConstTensor logits, const std::int64_t* labels, std::int64_t n,
                               std::int64_t V) override {
        cuda::cross_entropy_forward(logp, g(logits), labels, n, V, loss_);
    }
    void nll_loss_backward(float* dlogp, const std::int64_t* labels, std::int64_t n, std::int64_t V,
                           float scale) override {
        cuda::nll_loss_backward(dlogp, labels, n, V, scale);
    }
    void log_softmax_backward(float* dx, const float* dy, const float* logp, std::int64_t n, std::int64_t V) override {
        cuda::log_softmax_backward(dx, dy, logp, n, V);
    }
    void cross_entropy_fused(Tensor logits, const std::int64_t* labels, std::int64_t n, std::int64_t V, float scale,
                             float softcap, bool count_loss) override {
        cuda::cross_entropy_fused(g(logits), nullptr, count_loss ? loss_ : nullptr, labels, n, V, scale, softcap);
    }
    double loss_sum() override {
        synchronize();
        double sum = 0;
        check(cudaMemcpy(&sum, loss_, sizeof sum, cudaMemcpyDefault), "reading the loss");
        return sum;
    }
    void adamw_step(Tensor param, ConstTensor grad, Tensor m, Tensor v, std::int64_t n, const AdamWConfig& c,
                    std::int64_t step) override {
        cuda::adamw_step(g(param), g(grad), g(m), g(v), n, c, step);
    }
    void sgd_step(Tensor param, ConstTensor grad, Tensor momentum_buf, std::int64_t n, const SgdConfig& c,
                  std::int64_t step) override {
        cuda::sgd_step(g(param), g(grad), g(momentum_buf), n, c, step);
    }

private:
    cuda::CuptiRecorder* recorder_;
    cuda::DeviceAllocator allocator_;
    std::unique_ptr<cuda::GemmContext> gemm_;
    double* loss_ = nullptr;
    std::string deferred_error_;  // the first failure of unmap()
};

// The device events of `t`, tensor ids renumbered in allocation order: two timelines that
// allocate and free the same tensors in the same order then agree event by event, whatever ids
// their recorders gave (CUPTI's, the allocator's, the executor's with its host buffers).
Timeline device_events(const Timeline& t) {
    Timeline out;
    std::unordered_map<std::int64_t, std::int64_t> id;
    for (const Event& e : t.events) {
        if (e.device != Device::Gpu) continue;
        Event d = e;
        d.tensor = e.alloc ? (id[e.tensor] = static_cast<std::int64_t>(id.size())) : id.at(e.tensor);
        out.events.push_back(std::move(d));
    }
    return out;
}

// The first difference (compare's same_event) between the device events of the executor's log
// and of the measured timeline, or "" when they are equal.
std::string first_difference(const Timeline& log, const Timeline& measured) {
    const Timeline a = device_events(log), b = device_events(measured);
    const std::optional<std::int64_t> i = first_divergence(a, b);
    if (!i) return "";
    const auto k = static_cast<std::size_t>(*i);
    auto show = [](const std::vector<Event>& events, std::size_t at) {
        if (at >= events.size()) return std::string("(end)");
        const Event& e = events[at];
        return fmt::format("{} {} '{}' {} B ({}, op {}, layer {}, {})", e.alloc ? "alloc" : "free", to_string(e.category),
                           e.name, e.bytes, to_string(e.phase), e.op, e.layer, e.micro_step);
    };
    return fmt::format("device event {} of {} / {}: executor {}, measured {}", k, a.events.size(), b.events.size(),
                       show(a.events, k), show(b.events, k));
}

std::string describe_device() {
    int device = 0;
    cudaDeviceProp prop{};
    if (cudaGetDevice(&device) != cudaSuccess || cudaGetDeviceProperties(&prop, device) != cudaSuccess) return "unknown";
    return fmt::format("{}, sm_{}{}, {:.1f} GiB", prop.name, prop.major, prop.minor,
                       static_cast<double>(prop.totalGlobalMem) / double(1ull << 30));
}

}  // namespace

MeasuredStep execute_cuda(const ModelSpec& model, const TrainingSetup& setup, std::uint64_t seed,
                          const ExecuteOptions& options, const CudaOptions& cuda_options) {
    if (options.storage_fp32) fail("execute", "storage_fp32", "expected false (the CUDA backend runs the precision policy's dtypes)");
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || count == 0) {
        cudaGetLastError();
        fail("--backend", "cuda",
             fmt::format("no usable CUDA device on this machine ({}); use --backend cpu",
                         err != cudaSuccess ? std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err)
                                            : std::string("cudaGetDeviceCount found none")));
    }

    validate(setup, model);  // refused setups never start CUPTI or a context
    cuda::CuptiRecorder& recorder = cuda::CuptiRecorder::instance();
    if (cuda_options.cupti) recorder.start();  // before the context exists (false: its status says why)
    struct RecorderGuard {  // leaves the process-wide recorder stopped and empty, whatever happens
        cuda::CuptiRecorder& r;
        bool on;
        ~RecorderGuard() {
            if (on) r.stop();
            r.clear();
        }
    } guard{recorder, cuda_options.cupti};
    const auto mode = cuda_options.caching_allocator ? cuda::DeviceAllocator::Mode::Caching : cuda::DeviceAllocator::Mode::Exact;
    CudaBackend backend(mode, cuda_options.cupti ? &recorder : nullptr);
    if (recorder.active()) {
        recorder.flush();
        recorder.clear();  // the backend's own set-up is not the step's
    }

    const cuda::MemInfo before_no_cupti = cuda_options.cupti ? cuda::MemInfo{} : cuda::CuptiRecorder::read_mem_info();
    DeviceReport report;
    report.device = describe_device();
    report.allocator = backend.allocator().describe();
    report.recorder = cuda_options.cupti ? recorder.status() : "CUPTI off (--no-cupti): the allocator's own log";

    exec::Step step(model, setup, seed, options, backend);  // destroyed before the backend
    MeasuredStep result = step.run();
    if (cuda_options.cupti) recorder.stop();  // before the persistent state is freed
    guard.on = false;

    const cuda::MeasuredTimeline measured = recorder.measured_timeline(backend.allocator(), model.name);
    report.from_cupti = measured.from_cupti;
    report.timeline_note = measured.note;
    report.unmatched_records = measured.unmatched_records;
    report.size_mismatches = measured.size_mismatches;
    report.dropped_records = static_cast<std::int64_t>(recorder.dropped_records());
    report.first_difference = first_difference(result.timeline, measured.timeline);
    report.matches_executor_log = report.first_difference.empty();
    const auto& stats = backend.allocator().stats();
    report.peak_allocated = stats.peak_allocated;
    report.peak_reserved = stats.peak_reserved;
    // cudaMemGetInfo around the step: the recorder reads it at start and stop, else we do here
    const cuda::MemInfo before = cuda_options.cupti ? recorder.mem_before() : before_no_cupti;
    const cuda::MemInfo after = cuda_options.cupti ? recorder.mem_after() : cuda::CuptiRecorder::read_mem_info();
    if (before.valid) report.used_before = before.used_bytes(), report.total = before.total_bytes;
    if (after.valid) report.used_after = after.used_bytes();
    for (const cuda::KernelRecord& k : recorder.kernels()) {
        ++report.kernels;
        report.kernel_seconds += static_cast<double>(k.end_ns - k.start_ns) * 1e-9;
    }
    if (!report.matches_executor_log) {  // the measurement stands; the executor's intent does not
        Timeline t = measured.timeline;
        t.micro_steps = result.timeline.micro_steps;
        t.micro_steps_recorded = result.timeline.micro_steps_recorded;
        result.timeline = std::move(t);
    }
    result.timeline.source = "cuda";
    result.device = std::move(report);
    return result;
}

}  // namespace mst
