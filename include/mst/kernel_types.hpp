#pragma once
// The kernel API's value types, shared by the CPU kernels (src/exec/cpu/kernels.hpp), their
// CUDA twins (src/cuda/kernels.cuh) and the executor's backend interface
// (src/exec/backend.hpp), so that one executor drives either backend with the same arguments.
// Plain C++17: nvcc compiles it too.
#include <cstdint>
#include <cstring>

#include "mst/tensor_view.hpp"

namespace mst {

inline constexpr std::int64_t kIgnoreIndex = -100;  // labels to skip (PyTorch's ignore_index)

enum class NormKind : std::uint8_t {
    Llama,  // y = x * rstd * w
    Gemma,  // y = x * rstd * (1 + w)
};

inline constexpr float kGptOssAlpha = 1.702f;  // GptOssExperts.alpha
inline constexpr float kGptOssLimit = 7.0f;    // GptOssConfig.swiglu_limit's default

// The MLP's gated activation m = act(g) * b(u): its kind, and gpt-oss's clamp.
struct GatedAct {
    enum Kind : std::uint8_t {
        Silu,      // Llama SwiGLU: silu(g) * u
        GeluTanh,  // Gemma GeGLU: gelu_tanh(g) * u
        // gpt-oss's clamped SwiGLU (GptOssExperts): with g' = min(g, L) and u' = clamp(u, -L, L),
        // m = g' * sigmoid(1.702 g') * (u' + 1); a clamped input passes no gradient.
        GptOss,
    };
    Kind kind = Silu;
    float limit = kGptOssLimit;  // L: the config's swiglu_limit (GptOss)
    constexpr GatedAct(Kind k = Silu, float l = kGptOssLimit) : kind(k), limit(l) {}  // (implicit: GatedAct::Silu)
};

// Attention: causal, GQA, optional sliding window and logit soft-capping.
// q, o [B*S, nh*hd]; k, v [B*S, nkv*hd]; query head h reads kv head h / (nh/nkv) (HF repeat_kv).
// Score s(t,u) = q_t.k_u * scale, then (softcap > 0) s = softcap * tanh(s / softcap), masked
// unless u <= t and (window == 0 or t - u < window).
// Sinks (gpt-oss): each row's softmax also takes its head's logit sinks[h], whose value row is
// zero (it only takes probability away): p_u = exp(s_u - lse), lse = log(exp(sinks[h]) + sum_u
// exp(s_u)). Its gradient: d sinks[h] = -sum over (b, t) of exp(sinks[h] - lse) * delta, with
// delta = rowsum(dout * o) (the flash backward's workspace).
struct AttentionConfig {
    std::int64_t B = 1, S = 1, nh = 1, nkv = 1, hd = 1;
    float scale = 1.0f;       // 1/sqrt(hd) for Llama, query_pre_attn_scalar^-0.5 for Gemma-2
    std::int64_t window = 0;  // 0: full causal; else attend to u in [t-window+1, t]
    float softcap = 0.0f;     // 0: none
    const void* sinks = nullptr;        // [nh] in the backend's memory, stored as sinks_dtype; null: none
    DType sinks_dtype = DType::F32;
};

// Why `c` is not an attention configuration kernels taking head_dim <= max_head_dim can run, or
// nullptr: the contract check both backends' attention kernels share.
inline const char* attention_config_error(const AttentionConfig& c, std::int64_t max_head_dim) {
    if (!(c.B >= 0 && c.S >= 0)) return "B and S must be non-negative";
    if (!(c.nh > 0 && c.nkv > 0 && c.nh % c.nkv == 0)) return "nkv must divide nh";
    if (!(c.hd > 0 && c.hd <= max_head_dim)) return "head_dim must be in (0, kMaxHeadDim]";
    if (!(c.window >= 0)) return "window must be >= 0 (0: none)";
    if (!(c.softcap >= 0.0f)) return "softcap must be >= 0 (0: none)";
    return nullptr;
}

struct AdamWConfig {
    float lr = 1e-3f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, weight_decay = 0.01f;
};

struct SgdConfig {
    float lr = 1e-2f, momentum = 0.0f, dampening = 0.0f, weight_decay = 0.0f;
    bool nesterov = false;
};

// x rounded to the nearest bf16 (ties to even), as a float: what a bf16 store keeps.
inline float round_to_bf16(float x) {
    std::uint32_t bits = 0;
    std::memcpy(&bits, &x, sizeof bits);
    if ((bits & 0x7f800000u) == 0x7f800000u) {  // inf or NaN: keep (a NaN stays a NaN)
        if (bits & 0x007fffffu) bits |= 0x00400000u;
    } else {
        bits += 0x7fffu + ((bits >> 16) & 1u);
    }
    bits &= 0xffff0000u;
    float out = 0;
    std::memcpy(&out, &bits, sizeof out);
    return out;
}

}  // namespace mst
