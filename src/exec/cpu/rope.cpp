// Rotary position embedding (Su et al. 2021) in Hugging Face Llama's rotate_half layout:
// the pairs are (x_i, x_{i+rot/2}), not interleaved (x_{2i}, x_{2i+1}). Only the first `rot`
// dimensions of each head rotate (rot == hd but for Phi-3's partial rotary, rot < hd); the other
// hd - rot pass through untouched, as HF's cat((x_rot * cos + rotate_half(x_rot) * sin), x_pass):
//   out[:rot] = x_rot * cos(emb) + rotate_half(x_rot) * sin(emb),  x_rot = x[:rot],
//   rotate_half(x_rot) = cat(-x_rot[rot/2:], x_rot[:rot/2]),  out[rot:] = x[rot:],
//   emb = cat(freqs, freqs), freqs_i = t * inv_freq_i, inv_freq_i = 1 / theta^(2i/rot).
// The angle is computed in fp32 exactly as HF does (inv_freq and t * inv_freq in fp32); HF then
// rounds cos/sin to the activation dtype, here they stay fp32 and the result is rounded once.
// The backward of a rotation is the rotation by the opposite angle (identity on the pass-through).
// Longrope (Phi-4-mini) divides HF's frequencies by per-pair factors and scales cos/sin; these
// kernels rotate by the plain frequencies (the same memory, other values).
// Scratch: inv_freq, cos, sin float[kMaxHeadDim/2] and one head float[kMaxHeadDim], on the stack.
#include "kernels.hpp"

#include <cmath>
#include <vector>

namespace mst::exec::cpu {
namespace {

// inv_freq[0..rot/2) as HF: 1.0 / (theta ** (arange(0, rot, 2).float() / rot)), all fp32
void inverse_frequencies(std::int64_t rot, float theta, float* inv_freq) {
    for (std::int64_t i = 0; i < rot / 2; ++i)
        inv_freq[i] = 1.0f / std::pow(theta, static_cast<float>(2 * i) / static_cast<float>(rot));
}

void check_rope(const char* kernel, std::int64_t B, std::int64_t S, std::int64_t heads, std::int64_t hd,
                std::int64_t rot) {
    detail::require(B >= 0 && S >= 0 && heads >= 0, kernel, "sizes must be non-negative");
    detail::require(hd > 0 && hd % 2 == 0 && hd <= kMaxHeadDim, kernel, "head_dim must be even and <= kMaxHeadDim");
    detail::require(rot >= 2 && rot % 2 == 0 && rot <= hd, kernel, "rotary_dim must be even and in [2, head_dim]");
}

}  // namespace

// x[B*S, heads*hd]: the first rot dims of each head rotated in place (by -angle when inverse)
void rope_apply(Tensor x, std::int64_t B, std::int64_t S, std::int64_t heads, std::int64_t hd, std::int64_t rot,
                float theta, bool inverse) {
    check_rope("rope_apply", B, S, heads, hd, rot);
    const std::int64_t half = rot / 2;
    float inv_freq[kMaxHeadDim / 2], cs[kMaxHeadDim / 2], sn[kMaxHeadDim / 2], buf[kMaxHeadDim];
    inverse_frequencies(rot, theta, inv_freq);
    for (std::int64_t t = 0; t < S; ++t) {
        for (std::int64_t i = 0; i < half; ++i) {
            const float angle = static_cast<float>(t) * inv_freq[i];
            cs[i] = std::cos(angle);
            sn[i] = inverse ? -std::sin(angle) : std::sin(angle);
        }
        for (std::int64_t b = 0; b < B; ++b)
            for (std::int64_t h = 0; h < heads; ++h) {
                const std::int64_t off = ((b * S + t) * heads + h) * hd;
                load_block(x, off, rot, buf);  // dims [rot, hd) are never read nor written
                for (std::int64_t i = 0; i < half; ++i) {
                    const float x1 = buf[i], x2 = buf[i + half];
                    buf[i] = x1 * cs[i] - x2 * sn[i];
                    buf[i + half] = x2 * cs[i] + x1 * sn[i];
                }
                store_block(x, off, rot, buf);
            }
    }
}

// q[B*S, nh*hd], k[B*S, nkv*hd] in place
void rope_forward(Tensor q, Tensor k, std::int64_t B, std::int64_t S, std::int64_t nh, std::int64_t nkv,
                  std::int64_t hd, std::int64_t rot, float theta) {
    rope_apply(q, B, S, nh, hd, rot, theta, false);
    rope_apply(k, B, S, nkv, hd, rot, theta, false);
}

// dq[B*S, nh*hd], dk[B*S, nkv*hd] in place
void rope_backward(Tensor dq, Tensor dk, std::int64_t B, std::int64_t S, std::int64_t nh, std::int64_t nkv,
                   std::int64_t hd, std::int64_t rot, float theta) {
    rope_apply(dq, B, S, nh, hd, rot, theta, true);
    rope_apply(dk, B, S, nkv, hd, rot, theta, true);
}

namespace reference {

// Literal transcription of HF apply_rotary_pos_emb (Phi-3's partial form: rotate x[..., :rot],
// concatenate x[..., rot:]) with cos/sin of the fp32 angle in double.
void rope_apply(Tensor x, std::int64_t B, std::int64_t S, std::int64_t heads, std::int64_t hd, std::int64_t rot,
                float theta, bool inverse) {
    const std::int64_t half = rot / 2;
    std::vector<double> emb(static_cast<std::size_t>(rot)), v(static_cast<std::size_t>(hd)),
        rotated(static_cast<std::size_t>(rot));
    for (std::int64_t b = 0; b < B; ++b)
        for (std::int64_t t = 0; t < S; ++t)
            for (std::int64_t h = 0; h < heads; ++h) {
                const std::int64_t off = ((b * S + t) * heads + h) * hd;
                for (std::int64_t e = 0; e < hd; ++e) v[e] = load(x, off + e);
                for (std::int64_t e = 0; e < rot; ++e) {
                    const std::int64_t i = e % half;
                    const float inv_freq = 1.0f / std::pow(theta, static_cast<float>(2 * i) / static_cast<float>(rot));
                    emb[e] = static_cast<float>(t) * inv_freq;
                }
                for (std::int64_t e = 0; e < rot; ++e) rotated[e] = e < half ? -v[e + half] : v[e - half];
                const double sign = inverse ? -1.0 : 1.0;
                for (std::int64_t e = 0; e < rot; ++e)
                    store(x, off + e,
                          static_cast<float>(v[e] * std::cos(emb[e]) + sign * rotated[e] * std::sin(emb[e])));
                for (std::int64_t e = rot; e < hd; ++e) store(x, off + e, static_cast<float>(v[e]));  // x_pass
            }
}

}  // namespace reference
}  // namespace mst::exec::cpu
