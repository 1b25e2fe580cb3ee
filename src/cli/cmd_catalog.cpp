// models, gpus, show, devices: look at what the catalog and this machine hold.
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "mst/catalog.hpp"
#include "mst/devices.hpp"

namespace mst::cli {

namespace {

void print_warnings(const ModelSpec& m) {
    for (const auto& w : m.warnings) warn(fmt::format("{}: {}", m.source, w));
}

void run_models(const GlobalOptions& g) {
    nlohmann::json all = nlohmann::json::array();
    Table t({"name", "type", "params", "layers", "hidden", "inter", "heads/kv", "head_dim", "vocab", "tied", "max_pos"});
    for (const auto& name : model_names()) {
        const ModelSpec m = find_model(name);
        all.push_back(to_json(m));
        // A Mixture-of-Experts model: each expert's intermediate size, times the experts.
        const std::string inter = m.moe ? fmt::format("{}x{}", m.moe->experts, m.moe->intermediate) : std::to_string(m.intermediate_size);
        t.row({m.name, m.model_type, format_count(m.parameters().total()), std::to_string(m.num_layers),
               std::to_string(m.hidden_size), inter,
               fmt::format("{}/{}", m.num_heads, m.num_kv_heads), std::to_string(m.head_dim),
               std::to_string(m.vocab_size), m.tie_word_embeddings ? "yes" : "no",
               std::to_string(m.max_position_embeddings)});
    }
    if (g.json) return print_json(all);
    t.print();
}

void run_gpus(const GlobalOptions& g) {
    nlohmann::json all = nlohmann::json::array();
    Table t({"name", "memory", "usable", "bf16 TFLOP/s", "HBM GB/s", "host GB/s", "NVLink GB/s"});
    for (const auto& name : gpu_names()) {
        const GpuProfile p = find_gpu(name);
        all.push_back(to_json(p));
        t.row({p.name, format_bytes(p.memory_total_bytes), format_bytes(p.usable_bytes()),
               fmt::format("{:.1f}", p.bf16_dense_tflops), fmt::format("{:.0f}", p.hbm_gbps),
               fmt::format("{:.0f}", p.host_link_gbps), fmt::format("{:.0f}", p.nvlink_gbps)});
    }
    if (g.json) return print_json(all);
    t.print();
}

void run_show(const GlobalOptions& g, const std::string& model) {
    const ModelSpec m = find_model(model);
    print_warnings(m);
    if (g.json) return print_json(to_json(m));
    const ParameterCounts p = m.parameters();
    fmt::print("{} ({}, model_type {})\n", m.display_name, m.source, m.model_type.empty() ? "-" : m.model_type);
    fmt::print("  hidden {}  intermediate {}  layers {}  heads {} (kv {}, head_dim {})  vocab {}\n", m.hidden_size,
               m.moe ? fmt::format("{} per expert", m.moe->intermediate) : std::to_string(m.intermediate_size), m.num_layers,
               m.num_heads, m.num_kv_heads, m.head_dim, m.vocab_size);
    fmt::print("  activation {}  dtype {}  tied embeddings {}  max positions {}\n", m.hidden_act, m.torch_dtype,
               m.tie_word_embeddings ? "yes" : "no", m.max_position_embeddings);
    if (m.sliding_window) {
        std::int64_t n = 0;
        for (bool s : m.sliding_layers) n += s ? 1 : 0;
        fmt::print("  sliding window {} tokens on {} of {} layers\n", *m.sliding_window, n, m.num_layers);
    }
    if (m.fused_projections() || m.rotary_dim != m.head_dim || m.longrope)
        fmt::print("  fused qkv_proj and gate_up_proj; RoPE on {} of {} dimensions per head{}\n", m.rotary_dim, m.head_dim,
                   m.longrope ? " (longrope)" : "");
    if (m.moe)
        fmt::print("  Mixture-of-Experts: {} experts of intermediate {}, top-{} per token{}\n", m.moe->experts,
                   m.moe->intermediate, m.moe->top_k,
                   m.moe->gpt_oss           ? " (softmax over the top-k logits; biased experts, clamped SwiGLU)"
                   : m.moe->normalize_top_k ? " (weights renormalised)"
                                            : "");
    if (m.attention_sinks) fmt::print("  attention sinks: a learned logit per head joins each row's softmax\n");
    if (m.attn_logit_softcapping || m.final_logit_softcapping)
        fmt::print("  soft-capping: attention {}  final logits {}\n", m.attn_logit_softcapping.value_or(0.0),
                   m.final_logit_softcapping.value_or(0.0));
    fmt::print("\n");
    Table t({"parameters", "count", "share", "bf16 bytes"});
    const double total = static_cast<double>(p.total());
    auto row = [&](const char* what, std::int64_t n) {
        t.row({what, fmt::format("{}", n), fmt::format("{:.1f} %", 100.0 * static_cast<double>(n) / total),
               format_bytes(2 * n)});
    };
    row("embedding", p.embedding);
    row("attention", p.attention);
    row(m.moe ? "mlp (experts, routers)" : "mlp", p.mlp);
    row("norm", p.norm);
    row(m.tie_word_embeddings ? "lm_head (tied)" : "lm_head", p.lm_head);
    t.rule();
    t.row({"total", fmt::format("{} ({})", p.total(), format_count(p.total())), "100.0 %", format_bytes(2 * p.total())});
    if (m.moe) {
        const std::int64_t active = m.active_parameters();
        t.row({"active per token", fmt::format("{} ({})", active, format_count(active)),
               fmt::format("{:.1f} %", 100.0 * static_cast<double>(active) / total), format_bytes(2 * active)});
    }
    t.print();
    auto published = [](const char* what, double ours, std::int64_t count, const std::string& source) {
        const double err = (ours - static_cast<double>(count)) / static_cast<double>(count);
        fmt::print("published{}: {} ({}), difference {:+.3f} %\n", what, format_count(count), source, 100.0 * err);
    };
    if (m.published_parameters) published("", total, *m.published_parameters, m.published_parameters_source);
    if (m.published_active_parameters) {
        const std::int64_t ours = m.active_parameters() - (m.published_active_excludes_embedding ? p.embedding : 0);
        published(m.published_active_excludes_embedding ? " active (embedding table excluded)" : " active", static_cast<double>(ours),
                  *m.published_active_parameters, m.published_active_parameters_source);
    }
}

void run_devices(const GlobalOptions& g) {
    const DeviceQuery q = query_local_devices();
    if (g.json) {
        nlohmann::json devs = nlohmann::json::array();
        for (const auto& d : q.devices)
            devs.push_back({{"index", d.index},
                            {"name", d.name},
                            {"compute_capability", fmt::format("{}.{}", d.compute_major, d.compute_minor)},
                            {"memory_total_bytes", d.memory_total_bytes},
                            {"memory_free_bytes", d.memory_free_bytes}});
        return print_json({{"cuda_built", q.cuda_built}, {"status", q.status}, {"devices", devs}});
    }
    if (q.devices.empty()) {
        fmt::print("{}\n", q.status);
        return;
    }
    Table t({"index", "name", "sm", "memory", "free"});
    for (const auto& d : q.devices)
        t.row({std::to_string(d.index), d.name, fmt::format("{}.{}", d.compute_major, d.compute_minor),
               format_bytes(d.memory_total_bytes), format_bytes(d.memory_free_bytes)});
    t.print();
}

}  // namespace

void add_catalog_commands(CLI::App& app, const GlobalOptions& global) {
    app.add_subcommand("models", "List the bundled models (Hugging Face config.json files under models/)")
        ->callback([&global] { run_models(global); });
    app.add_subcommand("gpus", "List the bundled GPU profiles (profiles/*.json)")
        ->callback([&global] { run_gpus(global); });
    auto* show = app.add_subcommand("show", "Show a model's shape and parameter count by component\n"
                                            "  mst-plan show llama-3-8b\n  mst-plan show ./config.json --json");
    auto model = std::make_shared<std::string>();
    show->add_option("model", *model, "Catalog name or path to a config.json")->required();
    show->callback([&global, model] { run_show(global, *model); });
    app.add_subcommand("devices", "List the CUDA devices this machine has (needs a CUDA build)")
        ->callback([&global] { run_devices(global); });
}

}  // namespace mst::cli
