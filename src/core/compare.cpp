#include "mst/compare.hpp"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

namespace mst {

bool same_event(const Event& a, const Event& b) {
    return a.alloc == b.alloc && a.tensor == b.tensor && a.bytes == b.bytes && a.category == b.category &&
           a.device == b.device && a.phase == b.phase && a.layer == b.layer && a.micro_step == b.micro_step &&
           a.op == b.op && a.name == b.name;
}

std::optional<std::int64_t> first_divergence(const Timeline& predicted, const Timeline& measured) {
    const std::size_t n = std::min(predicted.events.size(), measured.events.size());
    for (std::size_t i = 0; i < n; ++i)
        if (!same_event(predicted.events[i], measured.events[i])) return static_cast<std::int64_t>(i);
    if (predicted.events.size() != measured.events.size()) return static_cast<std::int64_t>(n);
    return std::nullopt;
}

double CompareRow::relative() const {
    if (predicted == 0) return measured == 0 ? 0.0 : 1.0;
    return static_cast<double>(error()) / static_cast<double>(predicted);
}

Comparison compare_timelines(const Timeline& predicted, const Timeline& measured, std::int64_t num_layers) {
    const Summary p = summarize(predicted, num_layers), m = summarize(measured, num_layers);
    Comparison c;
    c.rows.push_back({"peak", p.peak.bytes, m.peak.bytes});
    for (int i = 0; i < kPhaseCount; ++i) {
        const auto k = static_cast<std::size_t>(i);
        if (p.phase_seen[k] || m.phase_seen[k])
            c.rows.push_back({"phase " + to_string(static_cast<Phase>(i)), p.phase_peak[k], m.phase_peak[k]});
    }
    for (int i = 0; i < kCategoryCount; ++i) {
        const auto k = static_cast<std::size_t>(i);
        if (p.category_max[k] || m.category_max[k])
            c.rows.push_back({"category " + to_string(static_cast<Category>(i)), p.category_max[k], m.category_max[k]});
    }
    if (p.host_peak || m.host_peak) c.rows.push_back({"host peak", p.host_peak, m.host_peak});
    c.rows.push_back({"end (persistent)", p.end_bytes, m.end_bytes});
    c.predicted_events = static_cast<std::int64_t>(predicted.events.size());
    c.measured_events = static_cast<std::int64_t>(measured.events.size());
    c.divergence = first_divergence(predicted, measured);
    if (c.divergence) {
        const auto i = static_cast<std::size_t>(*c.divergence);
        if (i < predicted.events.size()) c.predicted_event = predicted.events[i];
        if (i < measured.events.size()) c.measured_event = measured.events[i];
    }
    return c;
}

namespace {
nlohmann::json event_json(const std::optional<Event>& e) {
    if (!e) return nullptr;
    return {{"kind", e->alloc ? "alloc" : "free"}, {"tensor", e->tensor},     {"bytes", e->bytes},
            {"category", to_string(e->category)},  {"device", to_string(e->device)}, {"phase", to_string(e->phase)},
            {"layer", e->layer},                   {"micro_step", e->micro_step}, {"op", e->op},
            {"name", e->name}};
}
}  // namespace

nlohmann::json to_json(const Comparison& c) {
    nlohmann::json rows = nlohmann::json::array();
    for (const CompareRow& r : c.rows)
        rows.push_back({{"label", r.label},
                        {"predicted_bytes", r.predicted},
                        {"measured_bytes", r.measured},
                        {"error_bytes", r.error()},
                        {"relative_error", r.relative()}});
    nlohmann::json j = {{"rows", rows},
                        {"predicted_events", c.predicted_events},
                        {"measured_events", c.measured_events},
                        {"identical", c.identical()}};
    if (c.divergence)
        j["first_divergence"] = {{"index", *c.divergence},
                                 {"predicted", event_json(c.predicted_event)},
                                 {"measured", event_json(c.measured_event)}};
    else
        j["first_divergence"] = nullptr;
    return j;
}

}  // namespace mst
