#include "mst/model.hpp"

#include <algorithm>
#include <optional>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "json_read.hpp"
#include "mst/error.hpp"
#include "mst/limits.hpp"
#include "mst/units.hpp"

namespace mst {

std::string to_string(Family f) {
    switch (f) {
        case Family::Llama: return "llama";
        case Family::Mistral: return "mistral";
        case Family::Qwen2: return "qwen2";
        case Family::Qwen3: return "qwen3";
        case Family::Gemma2: return "gemma2";
        case Family::Gemma3: return "gemma3";
        case Family::Phi3: return "phi3";
        case Family::Mixtral: return "mixtral";
        case Family::Qwen3Moe: return "qwen3_moe";
        case Family::GptOss: return "gpt_oss";
    }
    return "?";
}

namespace {

// The bounds of include/mst/limits.hpp: they reject typos and absurd values without excluding
// any real model, and keep the simulator's sizes and work bounded.
constexpr std::int64_t kMaxHidden = limits::kHidden;
constexpr std::int64_t kMaxIntermediate = limits::kIntermediate;
constexpr std::int64_t kMaxLayers = limits::kLayers;
constexpr std::int64_t kMaxHeads = limits::kHeads;
constexpr std::int64_t kMaxVocab = limits::kVocab;
constexpr std::int64_t kMaxPositions = limits::kPositions;

bool assume_llama = false;  // set_assume_llama: the CLI's --assume-llama

// The families mst-plan models; any other model_type is refused unless the user accepts it
// planned as Llama-shaped (a Qwen3 read that way loses its q/k norms, a Mixtral its experts).
Family family_of(const std::string& model_type, detail::JsonReader& r, std::vector<std::string>& warnings) {
    if (model_type == "llama") return Family::Llama;
    if (model_type == "mistral") return Family::Mistral;
    if (model_type == "qwen2") return Family::Qwen2;
    if (model_type == "qwen3") return Family::Qwen3;
    if (model_type == "gemma2") return Family::Gemma2;
    if (model_type == "gemma3_text") return Family::Gemma3;
    if (model_type == "phi3") return Family::Phi3;
    if (model_type == "mixtral") return Family::Mixtral;
    if (model_type == "qwen3_moe") return Family::Qwen3Moe;
    if (model_type == "gpt_oss") return Family::GptOss;
    const std::string shown = r.has("model_type") ? "'" + model_type + "'" : "none";
    if (!assume_llama)
        r.fail("model_type", fmt::format("expected one of llama, mistral, qwen2 (Qwen2 and Qwen2.5), qwen3 (dense), gemma2, gemma3_text "
                                         "(or gemma3 with a text_config), phi3 (Phi-3, Phi-4), mixtral, qwen3_moe, gpt_oss, got {} "
                                         "(--assume-llama plans it as a Llama-shaped model, which may be wrong)",
                                         shown));
    warnings.push_back(fmt::format(
        "model_type {}: assumed Llama-shaped (--assume-llama: RMSNorm, RoPE, SwiGLU MLP, bias only where "
        "attention_bias/mlp_bias say, no sliding window unless sliding_window is set)",
        shown));
    return Family::Llama;
}

// Phi3Config's keys that change what the model allocates: the share of each head that RoPE
// rotates (partial_rotary_factor, at the top or in rope_scaling / rope_parameters, which win), the
// rotary type (default, or longrope with one short and one long factor per rotated pair), dropout
// (refused: its masks are not modelled) and the padding token the embedding is built with.
void read_phi3(const nlohmann::json& config, const detail::JsonReader& r, ModelSpec& m) {
    if (r.opt_number("resid_pdrop", 0.0, 1.0).value_or(0.0) != 0.0)
        r.fail("resid_pdrop", "expected 0.0 (dropout's masks are not modelled; Phi-3 and Phi-4 train without dropout)");
    (void)r.opt_number("embd_pdrop", 0.0, 1.0);  // Phi3Model never applies it
    // An absent pad_token_id is Phi3Config's 32000; null is no padding index.
    const auto pad = config.contains("pad_token_id") ? r.opt_integer("pad_token_id", -kMaxVocab, kMaxVocab) : std::int64_t{32000};
    if (pad && (*pad >= m.vocab_size || *pad < -m.vocab_size))
        r.fail("pad_token_id", fmt::format("expected a token id within vocab_size ({}) or null (the embedding's padding "
                                           "index; Phi3Config defaults it to 32000), got {}",
                                           m.vocab_size, *pad));
    // Phi3Config: rope_parameters = rope_scaling or rope_parameters (a non-empty rope_scaling wins).
    const auto non_empty = [&](const char* key) { return r.has(key) && !(r.raw(key).is_object() && r.raw(key).empty()); };
    const char* scaling_key = non_empty("rope_scaling") || !r.has("rope_parameters") ? "rope_scaling" : "rope_parameters";
    std::optional<detail::JsonReader> scaling;
    if (r.has(scaling_key)) {
        if (!r.raw(scaling_key).is_object()) r.fail(scaling_key, "expected an object or null");
        scaling.emplace(r.object(scaling_key));
    }
    const detail::JsonReader& factor_at = scaling && scaling->has("partial_rotary_factor") ? *scaling : r;
    const double factor = factor_at.opt_number("partial_rotary_factor", 0.0, 1.0).value_or(1.0);
    m.rotary_dim = static_cast<std::int64_t>(static_cast<double>(m.head_dim) * factor);  // int(head_dim * factor)
    if (m.rotary_dim < 2 || m.rotary_dim % 2 != 0)  // odd: transformers rotates one more than it says; not modelled
        factor_at.fail("partial_rotary_factor", fmt::format("expected a share of head_dim ({}) that rotates an even number "
                                                            "of at least 2 dimensions, got {} ({} dimensions)",
                                                            m.head_dim, factor, m.rotary_dim));
    if (!scaling) return;
    const char* type_key = scaling->has("rope_type") ? "rope_type" : "type";
    std::string type = scaling->opt_string(type_key).value_or("default");
    if (type == "su" || type == "yarn") type = "longrope";  // Phi3Config renames them
    if (type != "default" && type != "longrope")
        scaling->fail(type_key, fmt::format("expected default or longrope (what Phi3Config accepts), got '{}'", type));
    m.longrope = type == "longrope";
    // Phi3Config checks the factors' lengths whatever the type; longrope needs both.
    const auto pairs = static_cast<std::size_t>(static_cast<std::int64_t>(static_cast<double>(m.hidden_size / m.num_heads) * factor) / 2);
    for (const char* key : {"short_factor", "long_factor"}) {
        if (!scaling->has(key) && !m.longrope) continue;
        if (!scaling->has(key) || !scaling->raw(key).is_array() || scaling->raw(key).size() != pairs)
            scaling->fail(key, fmt::format("expected a list of {} numbers (one per rotated pair of dimensions)", pairs));
        for (const auto& v : scaling->raw(key))
            if (!v.is_number()) scaling->fail(key, fmt::format("expected a list of {} numbers, got {}", pairs, detail::shown(v)));
    }
}

// The Mixture-of-Experts keys of MixtralConfig and Qwen3MoeConfig. What the block allocates
// depends on the expert count, top-k and sizes only (transformers' default grouped_mm experts
// path sorts the [T x top_k] token-expert pairs: no tensor's size depends on the routing).
void read_moe(const detail::JsonReader& r, ModelSpec& m) {
    MoeSpec e;
    const bool mixtral = m.family == Family::Mixtral, gpt_oss = m.family == Family::GptOss;
    // Both configs map num_experts onto num_local_experts (attribute_map): either key sets the count,
    // and which one wins when both are given differs between them, so two different counts are refused.
    const char* experts_key = r.has("num_local_experts") ? "num_local_experts" : "num_experts";
    e.experts = r.opt_integer(experts_key, 1, limits::kExperts).value_or(mixtral ? 8 : 128);  // (gpt-oss: 128, its 120b)
    if (r.has("num_local_experts") && r.has("num_experts") &&
        r.opt_integer("num_experts", 1, limits::kExperts) != r.opt_integer("num_local_experts", 1, limits::kExperts))
        r.fail("num_experts", fmt::format("expected the same count as num_local_experts ({}): both name the experts, "
                                          "and transformers' choice between them differs by model",
                                          e.experts));
    e.top_k = r.opt_integer("num_experts_per_tok", 1, limits::kExperts).value_or(mixtral ? 2 : gpt_oss ? 4 : 8);
    // OpenAI's gpt-oss configs restate it as experts_per_token, which GptOssConfig does not read.
    if (gpt_oss && r.has("experts_per_token") && r.opt_integer("experts_per_token", 1, limits::kExperts) != e.top_k)
        r.fail("experts_per_token", fmt::format("expected the same count as num_experts_per_tok ({}): transformers reads "
                                                "num_experts_per_tok only",
                                                e.top_k));
    if (e.top_k > e.experts)
        r.fail("num_experts_per_tok", fmt::format("expected at most {} ({}), got {}", e.experts, experts_key, e.top_k));
    e.intermediate = mixtral || gpt_oss ? m.intermediate_size
                                        : r.opt_integer("moe_intermediate_size", 1, kMaxIntermediate).value_or(768);
    e.normalize_top_k = mixtral || (!gpt_oss && r.opt_boolean("norm_topk_prob").value_or(false));
    e.fp32_routing_weights = mixtral;
    e.router_first = m.family != Family::Qwen3Moe;
    e.gpt_oss = gpt_oss;
    // (what the executors clamp at; no tensor's size depends on it)
    if (gpt_oss) e.swiglu_limit = r.opt_number("swiglu_limit", 1e-3, 1e6).value_or(7.0);
    if (r.opt_boolean("output_router_logits").value_or(false))
        r.fail("output_router_logits", "expected false (the router's auxiliary load-balancing loss is not modelled; "
                                       "transformers adds it only when this is true)");
    // transformers' default experts path (grouped_mm); the others allocate differently (eager's
    // loop by how many tokens each expert gets), set from config.json's experts_implementation.
    if (const auto impl = r.opt_string("experts_implementation"); impl && *impl != "grouped_mm")
        r.fail("experts_implementation", fmt::format("expected grouped_mm or null (transformers' default experts path, the "
                                                     "one modelled), got '{}'",
                                                     *impl));
    if (mixtral && r.opt_number("router_jitter_noise", 0.0, 1.0).value_or(0.0) != 0.0)
        r.fail("router_jitter_noise", "expected 0.0 (the jitter's random tensor is not modelled; Mixtral trains without it)");
    if (m.family == Family::Qwen3Moe) {
        // Qwen3-MoE: a layer is sparse unless listed in mlp_only_layers or off the decoder_sparse_step grid.
        if (r.has("mlp_only_layers") && !r.raw("mlp_only_layers").is_null() &&
            !(r.raw("mlp_only_layers").is_array() && r.raw("mlp_only_layers").empty()))
            r.fail("mlp_only_layers", "expected [] (every layer a Mixture-of-Experts block; dense layers among them are not modelled)");
        if (r.opt_integer("decoder_sparse_step", 1, kMaxLayers).value_or(1) != 1)
            r.fail("decoder_sparse_step", "expected 1 (every layer a Mixture-of-Experts block; dense layers among them are not modelled)");
    }
    // (gpt-oss's experts run their own clamped activation whatever hidden_act says.)
    if (!gpt_oss && m.hidden_act != "silu" && m.hidden_act != "swish")
        r.fail("hidden_act", fmt::format("expected silu (the experts' SwiGLU), got '{}'", m.hidden_act));
    m.moe = e;
}

}  // namespace

namespace {

// Gemma3TextConfig's defaults for the keys a Gemma-3 config may omit (the 4B checkpoint's text_config
// names neither its heads nor its vocabulary).
nlohmann::json with_gemma3_defaults(const nlohmann::json& config) {
    nlohmann::json out = config;
    const std::pair<const char*, nlohmann::json> defaults[] = {
        {"vocab_size", 262208},       {"hidden_size", 2304},          {"intermediate_size", 9216},
        {"num_hidden_layers", 26},    {"num_attention_heads", 8},     {"num_key_value_heads", 4},
        {"head_dim", 256},            {"max_position_embeddings", 131072}, {"rms_norm_eps", 1e-6},
        {"hidden_activation", "gelu_pytorch_tanh"}, {"query_pre_attn_scalar", 256}, {"sliding_window", 4096},
        {"tie_word_embeddings", true},
    };
    for (const auto& [key, value] : defaults)
        if (!out.contains(key)) out[key] = value;
    return out;
}

// GptOssConfig's defaults for the keys a gpt-oss config may omit (gpt-oss-120b's shape; the
// yarn scaling is in rope_parameters' default, which changes values only).
nlohmann::json with_gpt_oss_defaults(const nlohmann::json& config) {
    nlohmann::json out = config;
    const std::pair<const char*, nlohmann::json> defaults[] = {
        {"vocab_size", 201088},       {"hidden_size", 2880},         {"intermediate_size", 2880},
        {"num_hidden_layers", 36},    {"num_attention_heads", 64},   {"num_key_value_heads", 8},
        {"head_dim", 64},             {"num_local_experts", 128},    {"num_experts_per_tok", 4},
        {"max_position_embeddings", 131072}, {"rms_norm_eps", 1e-5}, {"sliding_window", 128},
        {"attention_bias", true},     {"rope_theta", 150000.0},
    };
    for (const auto& [key, value] : defaults)
        if (!out.contains(key)) out[key] = value;
    // num_experts is GptOssConfig's other name for num_local_experts (attribute_map): given alone, it counts them.
    if (!config.contains("num_local_experts") && config.contains("num_experts")) out.erase("num_local_experts");
    return out;
}

}  // namespace

ModelSpec parse_model(const nlohmann::json& input, const std::string& where, const std::string& name) {
    const bool gemma3_text = input.is_object() && input.contains("model_type") && input["model_type"] == "gemma3_text";
    const bool gpt_oss = input.is_object() && input.contains("model_type") && input["model_type"] == "gpt_oss";
    const nlohmann::json config = gemma3_text ? with_gemma3_defaults(input) : gpt_oss ? with_gpt_oss_defaults(input) : input;
    detail::JsonReader r(config, where);
    // mst-plan's own block (catalog files): the name shown and the published parameter total.
    auto read_meta = [&](ModelSpec& m) {
        m.name = name;
        m.display_name = printable(name);  // (printed: on one line whatever a file's name or block says)
        m.source = where;
        if (!r.has("_mst")) return;
        auto meta = r.object("_mst");
        if (auto v = meta.opt_string("display_name")) m.display_name = printable(*v);
        if (auto v = meta.opt_string("source")) m.source_url = *v;
        if (auto v = meta.opt_integer("published_parameters", 1, std::int64_t{1} << 50)) m.published_parameters = *v;
        if (auto v = meta.opt_integer("published_active_parameters", 1, std::int64_t{1} << 50)) m.published_active_parameters = *v;
        if (auto v = meta.opt_string("published_parameters_source")) m.published_parameters_source = *v;
        if (auto v = meta.opt_string("published_active_parameters_source")) m.published_active_parameters_source = *v;
        m.published_active_excludes_embedding = meta.opt_boolean("published_active_excludes_embedding").value_or(false);
    };
    // Gemma-3 4B-27B ship as image-text models ("gemma3"): the decoder trained on text is its
    // text_config (Gemma3ForCausalLM); the vision tower is not part of the plan.
    if (r.opt_string("model_type").value_or("") == "gemma3") {
        if (!r.has("text_config") || !r.raw("text_config").is_object())
            r.fail("text_config", "expected the text decoder's config (an object) in a gemma3 config");
        nlohmann::json text = r.raw("text_config");
        if (text.contains("model_type") && text["model_type"] != "gemma3_text")
            detail::JsonReader(text, where + ": text_config").fail("model_type", "expected \"gemma3_text\" in a gemma3 config's text_config");
        text["model_type"] = "gemma3_text";
        text.erase("_mst");
        ModelSpec m = parse_model(text, where + ": text_config", name);
        read_meta(m);  // the file's own block, named as the file's
        // Catalog entries say so in their name and source; a user's file gets the reminder.
        if (!r.has("_mst")) m.warnings.push_back("gemma3: the text decoder (Gemma3ForCausalLM) is planned; the vision tower is not");
        return m;
    }
    ModelSpec m;
    read_meta(m);

    m.model_type = r.opt_string("model_type").value_or("");
    m.family = family_of(m.model_type, r, m.warnings);

    // Every family's attention applies dropout to its probabilities when training: masks not modelled.
    if (r.opt_number("attention_dropout", 0.0, 1.0).value_or(0.0) != 0.0)
        r.fail("attention_dropout", "expected 0.0 (dropout's masks are not modelled; these models train without it)");
    m.hidden_size = r.integer("hidden_size", 1, kMaxHidden);
    m.intermediate_size = r.integer("intermediate_size", 1, kMaxIntermediate);
    m.num_layers = r.integer("num_hidden_layers", 1, kMaxLayers);
    m.num_heads = r.integer("num_attention_heads", 1, kMaxHeads);
    // An absent key is the config class's default (Llama and Phi-3: every head; Mistral and Mixtral 8,
    // Qwen2 and Qwen3 32, Qwen3-MoE and Gemma-2 4); null is every head.
    std::int64_t kv_default = m.num_heads;
    if (!config.contains("num_key_value_heads")) {
        switch (m.family) {
            case Family::Mistral: case Family::Mixtral: kv_default = 8; break;
            case Family::Qwen2: case Family::Qwen3: kv_default = 32; break;
            case Family::Qwen3Moe: case Family::Gemma2: kv_default = 4; break;
            default: break;  // Gemma-3's defaults are filled in above
        }
    }
    m.num_kv_heads = r.opt_integer("num_key_value_heads", 1, kMaxHeads).value_or(kv_default);
    m.vocab_size = r.integer("vocab_size", 1, kMaxVocab);
    m.max_position_embeddings = r.opt_integer("max_position_embeddings", 1, kMaxPositions).value_or(0);

    if (m.num_heads % m.num_kv_heads != 0)
        r.fail("num_key_value_heads", fmt::format("expected a divisor of num_attention_heads ({}), got {}",
                                                  m.num_heads, m.num_kv_heads));
    // head_dim when the config omits it, as each family's config class defaults it: Qwen3 128,
    // Gemma-2/3 256, the others hidden_size / num_attention_heads.
    if (m.family == Family::Gemma3 && m.hidden_size % m.num_heads != 0)  // Gemma3TextConfig refuses it
        r.fail("num_attention_heads", fmt::format("expected a divisor of hidden_size ({}), got {}", m.hidden_size, m.num_heads));
    if (m.family == Family::Gemma3 && r.opt_boolean("use_bidirectional_attention").value_or(false))
        r.fail("use_bidirectional_attention", "expected false (causal language-model training; bidirectional Gemma-3 is "
                                              "an embedding model)");
    if (auto hd = r.opt_integer("head_dim", 1, kMaxHidden)) {
        m.head_dim = *hd;
    } else if (m.family == Family::Qwen3 || m.gemma()) {  // (Qwen3MoeConfig has no default: d / nh)
        m.head_dim = m.family == Family::Qwen3 ? 128 : 256;
    } else {
        if (m.hidden_size % m.num_heads != 0)
            r.fail("num_attention_heads", fmt::format("expected a divisor of hidden_size ({}) when head_dim is absent, got {}",
                                                      m.hidden_size, m.num_heads));
        m.head_dim = m.hidden_size / m.num_heads;
    }
    if (m.head_dim % 2 != 0)  // RoPE rotates pairs of dimensions (transformers refuses an odd one too)
        r.fail("head_dim", fmt::format("expected an even size (RoPE rotates pairs of dimensions), got {}", m.head_dim));
    m.rotary_dim = m.head_dim;
    if (m.family == Family::Phi3) read_phi3(config, r, m);

    // Gemma-2/3 tie embeddings by default (their configs omit the key), all others untie.
    m.tie_word_embeddings = r.opt_boolean("tie_word_embeddings").value_or(m.gemma());
    m.torch_dtype = r.opt_string("torch_dtype").value_or(r.opt_string("dtype").value_or("bfloat16"));
    // Gemma-2/3 read hidden_activation only (default gelu_pytorch_tanh); the others hidden_act.
    const char* act_key = m.gemma() ? "hidden_activation" : "hidden_act";
    m.hidden_act = r.opt_string(act_key).value_or(m.gemma() ? "gelu_pytorch_tanh" : "silu");
    // transformers' activations that are one PyTorch op saving its input (SiLU, GELU): what the MLP's
    // rules model. Others (gelu_new, relu, ...) allocate and save differently.
    if (m.hidden_act != "silu" && m.hidden_act != "swish" && m.hidden_act != "gelu" && m.hidden_act != "gelu_pytorch_tanh")
        r.fail(act_key, fmt::format("expected silu, swish, gelu or gelu_pytorch_tanh (the activations modelled), got '{}'",
                                    m.hidden_act));
    if (m.family == Family::Mixtral || m.family == Family::Qwen3Moe || m.family == Family::GptOss) read_moe(r, m);
    if (m.family == Family::GptOss) {
        m.attention_sinks = true;
        // OpenAI's checkpoints store the experts in MXFP4; training loads them dequantized
        // (transformers' Mxfp4Config(dequantize=True)): the plan is for bf16 weights.
        if (r.has("quantization_config"))
            m.warnings.push_back("quantization_config: planned with the weights dequantized to the model's dtype (what "
                                 "training loads: Mxfp4Config(dequantize=True)); quantized weights are not modelled");
    }
    m.rms_norm_eps = r.opt_number("rms_norm_eps", 0.0, 1.0).value_or(1e-6);
    m.rope_theta = r.opt_number("rope_theta", 1.0, 1e12).value_or(10000.0);

    // Biases as each family's modeling code builds its linears: attention_bias switches q/k/v/o
    // for Llama, Qwen3 and Gemma-2/3; Qwen2 hard-codes q/k/v with and o without, Mistral none;
    // only Llama reads mlp_bias.
    const bool attention_bias = r.opt_boolean("attention_bias").value_or(false);
    const bool reads_attention_bias = m.family == Family::Llama || m.family == Family::Qwen3 || m.family == Family::Qwen3Moe ||
                                      m.family == Family::GptOss || m.gemma();
    m.qkv_bias = m.family == Family::Qwen2 || (reads_attention_bias && attention_bias);
    m.o_bias = reads_attention_bias && attention_bias;
    const bool mlp_bias = r.opt_boolean("mlp_bias").value_or(false);
    m.mlp_bias = m.family == Family::Llama && mlp_bias;
    m.qk_norm = m.family == Family::Qwen3 || m.family == Family::Qwen3Moe || m.family == Family::Gemma3;

    // Which layers attend within a sliding window, as transformers' modeling code reads the config:
    // Mistral, Phi-3, Mixtral and Qwen3-MoE slide in every layer (they ignore layer_types), Llama in none
    // (it ignores the window).
    m.sliding_layers.assign(static_cast<std::size_t>(m.num_layers), false);
    m.sliding_window = r.opt_integer("sliding_window", 1, kMaxPositions);
    // An absent key is the config class's default: 4096 tokens for Mistral, Gemma-2 and the Qwen
    // families (Qwen's only with use_sliding_window; Gemma-3's comes with its defaults above), none
    // for Llama, Mixtral and Phi-3; null is none.
    const bool window_by_default = m.family == Family::Mistral || m.family == Family::Gemma2 || m.family == Family::Qwen2 ||
                                   m.family == Family::Qwen3 || m.family == Family::Qwen3Moe;
    if (window_by_default && !config.contains("sliding_window")) m.sliding_window = 4096;
    // layer_types, when the config lists them: which layers are "sliding_attention" (checked
    // against the layer count where a family reads them).
    std::optional<std::vector<bool>> typed;
    if (r.has("layer_types") && r.raw("layer_types").is_array()) {
        typed.emplace();
        for (const auto& t : r.raw("layer_types")) typed->push_back(t.is_string() && t.get<std::string>() == "sliding_attention");
    }
    const bool qwen = m.family == Family::Qwen2 || m.family == Family::Qwen3 || m.family == Family::Qwen3Moe;
    if (qwen && !r.opt_boolean("use_sliding_window").value_or(false)) {
        // Qwen2/Qwen3 configs drop the window unless use_sliding_window; layer_types naming sliding
        // layers then has no window, on which transformers' mask creation fails.
        m.sliding_window.reset();
        if (typed && std::find(typed->begin(), typed->end(), true) != typed->end())
            r.fail("layer_types", "expected no sliding_attention layer when use_sliding_window is false "
                                  "(the config then has no window: transformers cannot build that model)");
    }
    // Gemma-3's model builds a sliding-window mask in every forward, with or without sliding layers.
    if (m.family == Family::Gemma2 && !m.sliding_window)  // null: Gemma2Config builds no model without one
        r.fail("sliding_window", "expected a window in tokens (Gemma-2's local layers need one: transformers cannot build "
                                 "that model without it)");
    if (m.family == Family::GptOss && !m.sliding_window)
        r.fail("sliding_window", "expected a window in tokens (gpt-oss builds a sliding-window mask in every forward: "
                                 "transformers cannot run that model without one)");
    if (m.family == Family::Gemma3 && !m.sliding_window)
        r.fail("sliding_window", "expected a window in tokens (Gemma-3 builds a sliding-window mask in every forward: "
                                 "transformers cannot run that model without one)");
    if (m.sliding_window && m.family == Family::Llama) {
        m.sliding_window.reset();
        m.warnings.push_back("sliding_window: Llama attends to the whole sequence; the window is ignored");
    }
    if (m.sliding_window) {
        if (m.mistral_masking()) {  // Mistral, Phi-3, Mixtral, Qwen3-MoE: every layer slides
            m.sliding_layers.assign(m.sliding_layers.size(), true);
        } else if (r.has("layer_types")) {
            if (!typed || static_cast<std::int64_t>(typed->size()) != m.num_layers)
                r.fail("layer_types", fmt::format("expected an array of {} strings", m.num_layers));
            m.sliding_layers = *typed;
        } else if (m.family == Family::Gemma2 || m.family == Family::GptOss) {
            // Gemma-2 and gpt-oss alternate local (sliding) and global layers, starting with local.
            for (std::size_t i = 0; i < m.sliding_layers.size(); i += 2) m.sliding_layers[i] = true;
        } else if (m.family == Family::Gemma3) {
            // Gemma-3: every sliding_window_pattern-th layer (default 6) is global, the others local.
            const auto pattern = r.opt_integer("sliding_window_pattern", 1, kMaxLayers).value_or(6);
            for (std::int64_t i = 0; i < m.num_layers; ++i) m.sliding_layers[static_cast<std::size_t>(i)] = (i + 1) % pattern != 0;
        } else if (qwen) {
            // Qwen2 and Qwen3 with use_sliding_window: layers from max_window_layers (default 28) on.
            const auto first = r.opt_integer("max_window_layers", 0, kMaxLayers).value_or(28);
            for (std::int64_t i = first; i < m.num_layers; ++i) m.sliding_layers[static_cast<std::size_t>(i)] = true;
        }
    }

    m.attn_logit_softcapping = r.opt_number("attn_logit_softcapping", 0.0, 1e9);
    m.final_logit_softcapping = r.opt_number("final_logit_softcapping", 0.0, 1e9);
    if (m.family == Family::Gemma2) {  // Gemma2Config's defaults for absent keys (null: none)
        if (!config.contains("attn_logit_softcapping")) m.attn_logit_softcapping = 50.0;
        if (!config.contains("final_logit_softcapping")) m.final_logit_softcapping = 30.0;
    }
    // Rotary scalings that decide in every forward from the data (dynamic NTK) or, outside Phi-3's
    // modelled longrope, switch tables: their data-dependent work is not modelled (the referee cannot
    // run it on fake tensors either).
    // The scaling recorded is the one transformers applies: a non-empty rope_scaling, else
    // rope_parameters (newer configs, which also carry rope_theta there).
    const bool scaling_given = r.has("rope_scaling") && r.raw("rope_scaling").is_object() && !r.raw("rope_scaling").empty();
    for (const char* key : {"rope_scaling", "rope_parameters"}) {
        if (m.family == Family::Phi3 || !r.has(key) || !r.raw(key).is_object()) continue;
        const detail::JsonReader scaling = r.object(key);
        const char* type_key = scaling.has("rope_type") ? "rope_type" : "type";
        const std::string type = scaling.opt_string(type_key).value_or("default");
        if (type == "dynamic" || type == "longrope")
            scaling.fail(type_key, fmt::format("expected a static rotary scaling (default, linear, llama3, yarn), got '{}' "
                                               "(its per-forward data-dependent update is not modelled)",
                                               type));
        if (std::string(key) == "rope_parameters" && !r.has("rope_theta"))
            m.rope_theta = scaling.opt_number("rope_theta", 1.0, 1e12).value_or(m.rope_theta);
        if ((std::string(key) == "rope_scaling") != scaling_given) continue;  // not the one applied
        m.rope_scaling.type = type;
        if (type == "llama3") {
            m.rope_scaling.factor = scaling.opt_number("factor", 1e-9, 1e9).value_or(8.0);
            m.rope_scaling.low_freq_factor = scaling.opt_number("low_freq_factor", 1e-9, 1e9).value_or(1.0);
            m.rope_scaling.high_freq_factor = scaling.opt_number("high_freq_factor", 1e-9, 1e9).value_or(4.0);
            m.rope_scaling.original_max_position_embeddings =
                scaling.opt_integer("original_max_position_embeddings", 1, std::int64_t{1} << 40).value_or(8192);
        }
    }
    m.query_pre_attn_scalar = r.opt_number("query_pre_attn_scalar", 0.0, 1e9);
    if (m.gemma()) m.norms_per_layer = 4;

    // Every size the simulator multiplies must stay representable for any sequence we accept:
    // the parameters' fp32 master copy, gradients and two optimizer states (16 bytes each) too.
    try {
        (void)checked_product({m.vocab_size, m.hidden_size, 8}, "vocab_size x hidden_size");
        (void)checked_mul(m.parameters().total(), 16, "parameters x 16 bytes");
    } catch (const UserError&) {
        r.fail("num_hidden_layers", fmt::format("expected a model whose parameters fit in 63 bits at 16 bytes each, got "
                                                "hidden_size {}, intermediate_size {}{}, {} heads of {} and {} layers",
                                                m.hidden_size, m.moe ? m.moe->intermediate : m.intermediate_size,
                                                m.moe ? fmt::format(" x {} experts", m.moe->experts) : "", m.num_heads,
                                                m.head_dim, m.num_layers));
    }
    return m;
}

void set_assume_llama(bool on) { assume_llama = on; }

ModelSpec load_model_file(const std::filesystem::path& path) {
    return parse_model(detail::read_json_file(path), path.string(), path.stem().string());
}

std::int64_t ParameterCounts::total() const { return checked_sum({embedding, attention, mlp, norm, lm_head}, "parameters"); }

ParameterCounts ModelSpec::parameters() const {
    ParameterCounts p;
    const std::int64_t d = hidden_size;
    p.embedding = checked_mul(vocab_size, d);
    // gpt-oss: a logit per head (the sinks); biases on the router and on every expert's projections.
    const std::int64_t sinks = attention_sinks ? num_heads : 0;
    const std::int64_t attn = d * q_dim() + 2 * d * kv_dim() + q_dim() * d + (qkv_bias ? q_dim() + 2 * kv_dim() : 0) +
                              (o_bias ? d : 0) + (qk_norm ? 2 * head_dim : 0) + sinks;
    const std::int64_t moe_biases = moe && moe->gpt_oss ? moe->experts * (1 + 2 * moe->intermediate + d) : 0;
    const std::int64_t mlp_l = moe ? checked_product({moe->experts, 3 * d, moe->intermediate}, "experts") + moe->experts * d + moe_biases
                                   : 3 * d * intermediate_size + (mlp_bias ? 2 * intermediate_size + d : 0);
    p.attention = checked_mul(attn, num_layers);
    p.mlp = checked_mul(mlp_l, num_layers);
    p.norm = norms_per_layer * d * num_layers + d;
    p.lm_head = tie_word_embeddings ? 0 : checked_mul(vocab_size, d);
    return p;
}

namespace {
// One expert's parameters: its gate, up and down projections (gpt-oss: and their biases).
std::int64_t one_expert(const ModelSpec& m) {
    return 3 * m.hidden_size * m.moe->intermediate + (m.moe->gpt_oss ? 2 * m.moe->intermediate + m.hidden_size : 0);
}
}  // namespace

std::int64_t ModelSpec::active_parameters() const {
    const std::int64_t total = parameters().total();
    if (!moe) return total;
    return total - checked_product({moe->experts - moe->top_k, one_expert(*this), num_layers}, "experts");
}

std::int64_t ModelSpec::expert_parameters() const {
    return moe ? checked_product({moe->experts, one_expert(*this), num_layers}, "experts") : 0;
}

std::int64_t ModelSpec::layer_parameters() const {
    const auto p = parameters();
    return (p.attention + p.mlp) / num_layers + norms_per_layer * hidden_size;
}

nlohmann::json to_json(const ModelSpec& m) {
    const auto p = m.parameters();
    nlohmann::json j = {
        {"name", m.name},
        {"display_name", m.display_name},
        {"source", m.source},
        {"model_type", m.model_type},
        {"family", to_string(m.family)},
        {"hidden_size", m.hidden_size},
        {"intermediate_size", m.intermediate_size},
        {"num_hidden_layers", m.num_layers},
        {"num_attention_heads", m.num_heads},
        {"num_key_value_heads", m.num_kv_heads},
        {"head_dim", m.head_dim},
        {"rotary_dim", m.rotary_dim},
        {"longrope", m.longrope},
        {"vocab_size", m.vocab_size},
        {"tie_word_embeddings", m.tie_word_embeddings},
        {"max_position_embeddings", m.max_position_embeddings},
        {"torch_dtype", m.torch_dtype},
        {"hidden_act", m.hidden_act},
        {"qkv_bias", m.qkv_bias},
        {"qk_norm", m.qk_norm},
        {"parameters",
         {{"embedding", p.embedding},
          {"attention", p.attention},
          {"mlp", p.mlp},
          {"norm", p.norm},
          {"lm_head", p.lm_head},
          {"total", p.total()},
          {"active", m.active_parameters()}}},
        {"warnings", m.warnings},
    };
    j["sliding_window"] = m.sliding_window ? nlohmann::json(*m.sliding_window) : nlohmann::json(nullptr);
    std::int64_t n_sliding = 0;
    for (bool s : m.sliding_layers) n_sliding += s ? 1 : 0;
    j["sliding_layers"] = n_sliding;
    if (m.attn_logit_softcapping) j["attn_logit_softcapping"] = *m.attn_logit_softcapping;
    if (m.final_logit_softcapping) j["final_logit_softcapping"] = *m.final_logit_softcapping;
    if (m.published_parameters) j["published_parameters"] = *m.published_parameters;
    if (m.published_active_parameters) {
        j["published_active_parameters"] = *m.published_active_parameters;
        j["published_active_excludes_embedding"] = m.published_active_excludes_embedding;
    }
    j["attention_sinks"] = m.attention_sinks;
    if (m.moe)
        j["moe"] = {{"experts", m.moe->experts},
                    {"top_k", m.moe->top_k},
                    {"intermediate_size", m.moe->intermediate},
                    {"normalize_top_k", m.moe->normalize_top_k}};
    return j;
}

}  // namespace mst
