#pragma once
// ModelSpec: the memory- and time-relevant part of a Hugging Face config.json.
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace mst {

// The architectures mst-plan models by their real differences. Anything else that
// looks like a Llama (SwiGLU MLP, RMSNorm, RoPE) is accepted as Llama with a warning.
enum class Family { Llama, Mistral, Qwen2, Qwen3, Gemma2, Gemma3, Phi3, Mixtral, Qwen3Moe, GptOss };
std::string to_string(Family f);

struct ParameterCounts {
    std::int64_t embedding = 0;  // token embedding table, V x d
    std::int64_t attention = 0;  // q, k, v, o projections (+ biases), all layers
    std::int64_t mlp = 0;        // gate, up, down projections, all layers (MoE: every expert's and the routers)
    std::int64_t norm = 0;       // every RMSNorm weight, final norm included
    std::int64_t lm_head = 0;    // 0 when tied to the embedding
    std::int64_t total() const;  // checked: a UserError past 2^63
};

// A Mixture-of-Experts MLP (Mixtral, Qwen3-MoE, gpt-oss): a router (a linear d -> experts) picks
// top_k experts per token; each expert is a SwiGLU MLP of `intermediate` (its gate and up
// projections one [experts, 2 intermediate, d] parameter, its down one [experts, d, intermediate]).
struct MoeSpec {
    std::int64_t experts = 0;       // E
    std::int64_t top_k = 0;         // k: experts per token
    std::int64_t intermediate = 0;  // each expert's intermediate size
    bool normalize_top_k = true;    // the top-k probabilities divided by their sum (Mixtral always; Qwen3-MoE: norm_topk_prob)
    // Mixtral keeps the routing weights fp32 (the weighted expert outputs and their sum are fp32,
    // cast back at the end); Qwen3-MoE casts them to the model's dtype first.
    bool fp32_routing_weights = true;
    // The block registers the router before the experts (Mixtral, gpt-oss) or after them (Qwen3-MoE).
    bool router_first = true;
    // gpt-oss (GptOssMLP): the router and every expert projection have biases; the router takes
    // the top-k of its bf16 logits and a softmax over those k (no probabilities over all experts);
    // the experts' gate and up columns interleave, and their activation is clamped:
    // (clamp(up, -l, l) + 1) * g * sigmoid(alpha g) with g = clamp(gate, max=l).
    bool gpt_oss = false;
    double swiglu_limit = 7.0;  // gpt-oss: l above (GptOssConfig.swiglu_limit); the activation's numerics only
};
struct ModelSpec {
    std::string name;          // catalog name, or the file stem for a path
    std::string display_name;  // "_mst.display_name" or the name
    std::string source;        // file it was read from
    std::string source_url;    // "_mst.source": where the config.json came from (a huggingface.co URL for the catalog)
    std::string model_type;    // as written in config.json
    Family family = Family::Llama;

    std::int64_t hidden_size = 0;        // d
    std::int64_t intermediate_size = 0;  // I
    std::int64_t num_layers = 0;         // L
    std::int64_t num_heads = 0;          // nh
    std::int64_t num_kv_heads = 0;       // nkv (GQA); = nh when absent
    std::int64_t head_dim = 0;           // hd; d / nh when absent
    std::int64_t rotary_dim = 0;         // dimensions of each head RoPE rotates: hd, or Phi-3's partial share
    std::int64_t vocab_size = 0;         // V
    std::int64_t max_position_embeddings = 0;
    bool tie_word_embeddings = false;
    std::string torch_dtype = "bfloat16";
    std::string hidden_act = "silu";
    double rms_norm_eps = 1e-6;
    double rope_theta = 10000.0;  // RoPE base (changes values, not memory or time)
    // A static rotary scaling (rope_scaling / rope_parameters; values, not memory or time): its
    // type ("default" when none) and, for Llama-3's "llama3", the parameters a trainer config restates.
    struct RopeScaling {
        std::string type = "default";
        double factor = 1.0, low_freq_factor = 1.0, high_freq_factor = 4.0;
        std::int64_t original_max_position_embeddings = 0;
    } rope_scaling;
    bool longrope = false;        // Phi-3's longrope: short or long frequency factors, chosen in every forward

    bool qkv_bias = false;  // Qwen2 always; Llama with attention_bias
    bool o_bias = false;    // Llama attention_bias
    bool mlp_bias = false;  // Llama mlp_bias
    bool qk_norm = false;   // Qwen3, Gemma-3: an RMSNorm over head_dim on every query and key head
    // gpt-oss: a learned logit per query head ("sinks") joins every row of the attention scores
    // before the softmax and is dropped after it.
    bool attention_sinks = false;

    // Sliding-window attention: window in tokens and which layers use it.
    std::optional<std::int64_t> sliding_window;
    std::vector<bool> sliding_layers;  // size L; true where the layer attends locally

    // Gemma-2 specifics (recorded; soft-capping changes the attention kernel,
    // final soft-capping adds a tanh over the logits).
    std::optional<double> attn_logit_softcapping;
    std::optional<double> final_logit_softcapping;
    std::optional<double> query_pre_attn_scalar;
    int norms_per_layer = 2;  // Gemma-2/3 have pre- and post- norms around attention and MLP: 4
    std::optional<MoeSpec> moe;  // every layer's MLP is a Mixture-of-Experts block

    std::optional<std::int64_t> published_parameters;  // "_mst.published_parameters"
    std::optional<std::int64_t> published_active_parameters;  // MoE: "_mst.published_active_parameters"
    std::string published_active_parameters_source;
    // The published active figure leaves out the token embedding table (a lookup, not a matmul:
    // OpenAI's count for gpt-oss); `show` compares it with ours less that table.
    bool published_active_excludes_embedding = false;
    std::string published_parameters_source;
    std::vector<std::string> warnings;  // what was assumed while parsing

    // Gemma-2 and Gemma-3: RMSNorms scaling by (1 + weight) in fp32 before and after attention and
    // the MLP, an embedding scaled by sqrt(hidden_size), GeGLU, embeddings tied by default.
    bool gemma() const { return family == Family::Gemma2 || family == Family::Gemma3; }
    // Gemma-3's rotary embeddings differ between its local (sliding) and global layers: the model
    // computes one cos/sin pair per layer type.
    bool rotary_per_layer_type() const { return family == Family::Gemma3; }
    // Gemma-3 normalises q and k after all three projections (Qwen3 right after each).
    bool qk_norms_after_projections() const { return family == Family::Gemma3; }
    // Phi-3 and Phi-4: one qkv_proj [q + 2 kv, d] and one gate_up_proj [2 I, d] per layer (the
    // hf runtime's parameters and tensors; the kernels runtime runs them as the separate GEMMs
    // over row blocks of the fused weight that they are).
    bool fused_projections() const { return family == Family::Phi3; }
    // Phi-3 rotates the first rotary_dim dimensions of each head and concatenates the rest after
    // them (a new tensor even when nothing passes through).
    bool rotary_concatenates() const { return family == Family::Phi3; }
    // gpt-oss's rotary tables are [S, D/2] (each frequency once) and rotate the two halves of a
    // head as x1 cos - x2 sin and x2 cos + x1 sin, concatenated.
    bool rotary_half_tables() const { return family == Family::GptOss; }
    // gpt-oss's RMSNorm multiplies its weight into the fp32 normalised tensor and casts the product
    // (Llama's casts first, then multiplies in bf16).
    bool norm_scales_fp32() const { return family == Family::GptOss; }
    // Mistral and Phi-3 build one attention mask (sliding when the config has a window, which every
    // layer then uses) and pass the decoder layer its position ids before the rotary tables.
    // Mixtral and Qwen3-MoE build theirs the same way.
    bool mistral_masking() const {
        return family == Family::Mistral || family == Family::Phi3 || family == Family::Mixtral || family == Family::Qwen3Moe;
    }
    std::int64_t q_dim() const { return num_heads * head_dim; }
    std::int64_t kv_dim() const { return num_kv_heads * head_dim; }
    ParameterCounts parameters() const;
    // The parameters one token goes through: all but the experts it is not routed to (= total
    // for a dense model).
    std::int64_t active_parameters() const;
    // The routed experts' parameters over all layers (gpt-oss: with their biases), the part of
    // `mlp` that expert parallelism divides; 0 for a dense model.
    std::int64_t expert_parameters() const;
    // Parameters of one decoder layer (attention + MLP + its norms).
    std::int64_t layer_parameters() const;
};

// Parses a config.json document; `where` names the file in error messages.
ModelSpec parse_model(const nlohmann::json& config, const std::string& where, const std::string& name);
ModelSpec load_model_file(const std::filesystem::path& path);
// A model_type mst-plan does not model (qwen3, phi3, mixtral, ...) is an error naming the ones it
// does, unless this is on (the CLI's --assume-llama): then it is read as Llama-shaped, with a
// warning. One setting for the process: every file read after it (configs, plans, measurements).
void set_assume_llama(bool on);

nlohmann::json to_json(const ModelSpec& m);

}  // namespace mst
