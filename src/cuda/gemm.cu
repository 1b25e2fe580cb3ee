// cuBLASLt GEMMs in PyTorch's row-major layout. cuBLASLt is column-major; a row-major [r, c]
// matrix is the column-major [c, r] matrix with leading dimension c, so each product is
// written transposed:
//   linear_forward          out[n,o] = in W^T    ->  out^T (o x n) = T(W^T (i x o)) . in^T (i x n)
//   linear_backward_input   din[n,i] = dout W    ->  din^T (i x n) = W^T (i x o) . dout^T (o x n)
//   linear_backward_weight  dW[o,i] = dout^T in  ->  dW^T (i x o) = in^T (i x n) . T(dout^T (o x n))
// Descriptors and the heuristic's first algorithm are cached per (shape, transposes, dtypes,
// beta, pointer alignments): a training step repeats a handful of shapes.
#include <cublasLt.h>

#include <map>
#include <stdexcept>
#include <string>
#include <tuple>

#include "common.cuh"
#include "gemm.cuh"

namespace mst::cuda {

namespace {

void check_lt(cublasStatus_t s, const char* what) {
    if (s != CUBLAS_STATUS_SUCCESS)
        throw std::runtime_error(std::string(what) + ": cuBLASLt: " + cublasLtGetStatusName(s) + ": " +
                                 cublasLtGetStatusString(s));
}

cudaDataType lt_type(DType t) { return t == DType::F32 ? CUDA_R_32F : CUDA_R_16BF; }

// The largest power of two (<= 256) dividing the address: the alignment cuBLASLt may assume.
std::uint32_t alignment(const void* p) {
    const auto a = reinterpret_cast<std::uintptr_t>(p);
    std::uint32_t al = 256;
    while (al > 1 && (a % al) != 0) al >>= 1;
    return al;
}

struct Plan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
    cublasLtMatmulAlgo_t algo{};
};

using Key = std::tuple<bool, bool, std::int64_t, std::int64_t, std::int64_t, int, int, bool, std::uint32_t,
                       std::uint32_t, std::uint32_t>;

}  // namespace

struct GemmContext::Impl {
    cublasLtHandle_t handle = nullptr;
    void* workspace = nullptr;
    std::size_t workspace_bytes = 0;
    std::map<Key, Plan> plans;

    ~Impl() {
        clear_plans();
        if (handle) cublasLtDestroy(handle);
    }
    void clear_plans() {
        for (auto& [key, p] : plans) {
            cublasLtMatrixLayoutDestroy(p.a);
            cublasLtMatrixLayoutDestroy(p.b);
            cublasLtMatrixLayoutDestroy(p.d);
            cublasLtMatmulDescDestroy(p.desc);
        }
        plans.clear();
    }

    // D (m x n, column-major, ld m) = op(A) op(B) + beta D; A stored ta ? k x m : m x k (ld = rows),
    // B stored tb ? n x k : k x n.
    void matmul(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, ConstTensor A, ConstTensor B,
                Tensor D, bool accumulate, cudaStream_t stream, const char* name) {
        detail::require(m >= 0 && n >= 0 && k >= 0, name, "sizes must be non-negative");
        if (m == 0 || n == 0) return;
        detail::require(A && B && D, name, "buffers are required");
        detail::require(A.dtype == B.dtype, name, "both inputs must have the same dtype (cuBLASLt has no mixed inputs)");
        detail::require(!(A.dtype == DType::F32 && D.dtype == DType::BF16), name,
                        "fp32 inputs need an fp32 output");
        if (k == 0) {  // an empty sum: D = beta D
            if (!accumulate) zero(D, m * n, stream);
            return;
        }
        const std::uint32_t al_a = alignment(A.data), al_b = alignment(B.data), al_d = alignment(D.data);
        const Key key{ta, tb, m, n, k, int(A.dtype), int(D.dtype), accumulate, al_a, al_b, al_d};
        auto it = plans.find(key);
        if (it == plans.end()) it = plans.emplace(key, make_plan(ta, tb, m, n, k, A.dtype, D.dtype, al_a, al_b, al_d, name)).first;
        const Plan& p = it->second;
        const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
        check_lt(cublasLtMatmul(handle, p.desc, &alpha, A.data, p.a, B.data, p.b, &beta, D.data, p.d, D.data, p.d, &p.algo,
                                workspace, workspace_bytes, stream),
                 name);
    }

    Plan make_plan(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, DType in, DType out,
                   std::uint32_t al_a, std::uint32_t al_b, std::uint32_t al_d, const char* name) {
        Plan p;
        check_lt(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), name);
        const cublasOperation_t op_a = ta ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
        check_lt(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)), name);
        check_lt(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)), name);
        const auto u = [](std::int64_t v) { return static_cast<std::uint64_t>(v); };
        check_lt(cublasLtMatrixLayoutCreate(&p.a, lt_type(in), ta ? u(k) : u(m), ta ? u(m) : u(k), ta ? k : m), name);
        check_lt(cublasLtMatrixLayoutCreate(&p.b, lt_type(in), tb ? u(n) : u(k), tb ? u(k) : u(n), tb ? n : k), name);
        check_lt(cublasLtMatrixLayoutCreate(&p.d, lt_type(out), u(m), u(n), m), name);
        cublasLtMatmulPreference_t pref = nullptr;
        check_lt(cublasLtMatmulPreferenceCreate(&pref), name);
        const std::uint64_t ws = workspace_bytes;
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, sizeof(al_a));
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, sizeof(al_b));
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_d, sizeof(al_d));
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_d, sizeof(al_d));
        cublasLtMatmulHeuristicResult_t result{};
        int found = 0;
        const cublasStatus_t s =
            cublasLtMatmulAlgoGetHeuristic(handle, p.desc, p.a, p.b, p.d, p.d, pref, 1, &result, &found);
        cublasLtMatmulPreferenceDestroy(pref);
        if (s != CUBLAS_STATUS_SUCCESS || found == 0) {
            cublasLtMatrixLayoutDestroy(p.a);
            cublasLtMatrixLayoutDestroy(p.b);
            cublasLtMatrixLayoutDestroy(p.d);
            cublasLtMatmulDescDestroy(p.desc);
            check_lt(s, name);
            throw std::runtime_error(std::string(name) + ": cuBLASLt found no algorithm for this shape");
        }
        p.algo = result.algo;
        return p;
    }
};

GemmContext::GemmContext(void* workspace, std::size_t workspace_bytes) : impl_(std::make_unique<Impl>()) {
    detail::require(workspace != nullptr || workspace_bytes == 0, "GemmContext", "a workspace of workspace_bytes");
    check_lt(cublasLtCreate(&impl_->handle), "GemmContext");
    impl_->workspace = workspace;
    impl_->workspace_bytes = workspace_bytes;
}

GemmContext::~GemmContext() = default;

void GemmContext::set_workspace(void* workspace, std::size_t workspace_bytes) {
    detail::require(workspace != nullptr || workspace_bytes == 0, "GemmContext::set_workspace", "a workspace of workspace_bytes");
    impl_->clear_plans();  // the heuristic chose each plan's algorithm for the old workspace size
    impl_->workspace = workspace;
    impl_->workspace_bytes = workspace_bytes;
}

// out[n,o] (+)= in[n,i] W[o,i]^T
void linear_forward(GemmContext& ctx, Tensor out, ConstTensor in, ConstTensor W, std::int64_t n, std::int64_t i,
                    std::int64_t o, bool accumulate, cudaStream_t stream) {
    ctx.impl().matmul(true, false, o, n, i, W, in, out, accumulate, stream, "linear_forward");
}

// din[n,i] (+)= dout[n,o] W[o,i]
void linear_backward_input(GemmContext& ctx, Tensor din, ConstTensor dout, ConstTensor W, std::int64_t n,
                           std::int64_t i, std::int64_t o, bool accumulate, cudaStream_t stream) {
    ctx.impl().matmul(false, false, i, n, o, W, dout, din, accumulate, stream, "linear_backward_input");
}

// dW[o,i] (+)= dout[n,o]^T in[n,i]
void linear_backward_weight(GemmContext& ctx, Tensor dW, ConstTensor dout, ConstTensor in, std::int64_t n,
                            std::int64_t i, std::int64_t o, bool accumulate, cudaStream_t stream) {
    ctx.impl().matmul(false, true, i, o, n, in, dout, dW, accumulate, stream, "linear_backward_weight");
}

}  // namespace mst::cuda
