#pragma once
// Predicted vs measured: two timelines of the same step (simulator vs an executor, or
// any two) compared by their views -- peak, per-phase peaks, per-category maxima -- and
// event by event, down to the first event where they diverge.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "mst/timeline.hpp"

namespace mst {

// Two events are the same when every field is (kind, tensor id, bytes, category,
// device, phase, layer, micro-step, op and tensor name).
bool same_event(const Event& a, const Event& b);

// Index of the first event that differs, or where the shorter timeline ends; nullopt when
// both have the same events.
std::optional<std::int64_t> first_divergence(const Timeline& predicted, const Timeline& measured);

struct CompareRow {
    std::string label;  // "peak", "phase forward", "category gradients", "host peak"
    bytes_t predicted = 0, measured = 0;
    bytes_t error() const { return measured - predicted; }  // absolute, bytes
    double relative() const;                                // error / predicted (0 when both are 0)
};

struct Comparison {
    std::vector<CompareRow> rows;  // peak first, then phases, categories, host
    std::int64_t predicted_events = 0, measured_events = 0;
    std::optional<std::int64_t> divergence;  // first differing event
    std::optional<Event> predicted_event, measured_event;  // at the divergence (absent past an end)
    bool identical() const { return !divergence; }
    bytes_t peak_error() const { return rows.front().error(); }
};

Comparison compare_timelines(const Timeline& predicted, const Timeline& measured, std::int64_t num_layers);
nlohmann::json to_json(const Comparison& c);

}  // namespace mst
