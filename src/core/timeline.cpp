#include "mst/timeline.hpp"

#include <array>
#include <cassert>
#include <unordered_map>

#include <fmt/format.h>
#include <fmt/ranges.h>  // fmt::join
#include <nlohmann/json.hpp>

#include "caching_allocator.hpp"
#include "json_read.hpp"
#include "mst/error.hpp"
#include "mst/limits.hpp"

namespace mst {

namespace {
constexpr const char* kPhaseNames[kPhaseCount] = {"init", "forward", "recompute", "backward", "optimizer"};
constexpr const char* kCategoryNames[kCategoryCount] = {"weights", "master_weights", "gradients",
                                                        "optimizer_state", "saved_activation", "transient",
                                                        "checkpoint", "offloaded", "workspace"};
constexpr const char* kTimelineFormat = "mst-timeline/1";
// Each event's columns, in the order a timeline file writes them; and as its messages name them.
constexpr std::array<const char*, 10> kEventColumns = {"kind",  "tensor", "bytes",      "category", "device",
                                                       "phase", "layer",  "micro_step", "op",       "name"};
const nlohmann::json& event_columns() {
    static const nlohmann::json columns = kEventColumns;
    return columns;
}
// Live bytes are a sum over events: checked, so a timeline whose tensors add up past 2^63 (a
// tampered file, an absurd setup) is a user error, never a negative peak.
constexpr const char* kLiveBytes = "live bytes";
}  // namespace

std::string to_string(Phase p) { return kPhaseNames[static_cast<int>(p)]; }
std::string to_string(Category c) { return kCategoryNames[static_cast<int>(c)]; }
std::string to_string(Device d) { return d == Device::Gpu ? "gpu" : "host"; }

Phase parse_phase(const std::string& s, const std::string& where) {
    for (int i = 0; i < kPhaseCount; ++i)
        if (s == kPhaseNames[i]) return static_cast<Phase>(i);
    fail(where, "phase", fmt::format("expected init, forward, recompute, backward or optimizer, got {}", in_quotes(s)));
}

Category parse_category(const std::string& s, const std::string& where) {
    for (int i = 0; i < kCategoryCount; ++i)
        if (s == kCategoryNames[i]) return static_cast<Category>(i);
    fail(where, "category", fmt::format("expected a memory category (weights, gradients, ...), got {}", in_quotes(s)));
}

// ---- views ---------------------------------------------------------------------

std::vector<bytes_t> live_curve(const Timeline& t) {
    std::vector<bytes_t> out;
    out.reserve(t.events.size());
    bytes_t live = 0;
    for (const Event& e : t.events) {
        if (e.device == Device::Gpu) live = checked_add(live, e.alloc ? e.bytes : -e.bytes, kLiveBytes);
        out.push_back(live);
    }
    return out;
}

Summary summarize(const Timeline& t, std::int64_t num_layers) {
    Summary s;
    s.layer_saved.assign(static_cast<std::size_t>(std::max<std::int64_t>(num_layers, 0)), 0);
    CategoryBytes live_cat{};
    bytes_t live = 0, host = 0;
    // Tensors allocated in the forward of the current micro-step, for the per-layer view.
    std::unordered_map<std::int64_t, const Event*> forward_live;
    int snapshot_micro = -1;

    for (std::size_t i = 0; i < t.events.size(); ++i) {
        const Event& e = t.events[i];
        if (e.phase != Phase::Forward && e.micro_step > snapshot_micro && e.phase != Phase::Init &&
            !forward_live.empty()) {
            // First event after this micro-step's forward: what each layer left behind.
            std::fill(s.layer_saved.begin(), s.layer_saved.end(), 0);
            for (const auto& [id, a] : forward_live)
                if (a->layer >= 0 && a->layer < num_layers &&
                    (a->category == Category::SavedActivation || a->category == Category::Checkpoint))
                    s.layer_saved[static_cast<std::size_t>(a->layer)] += a->bytes;  // at most live
            forward_live.clear();
            snapshot_micro = e.micro_step;
        }
        if (e.device == Device::Host) {
            host = checked_add(host, e.alloc ? e.bytes : -e.bytes, kLiveBytes);
            s.host_peak = std::max(s.host_peak, host);
            continue;
        }
        const auto c = static_cast<std::size_t>(e.category);
        const bytes_t delta = e.alloc ? e.bytes : -e.bytes;
        live = checked_add(live, delta, kLiveBytes);
        live_cat[c] += delta;  // at most live
        s.category_max[c] = std::max(s.category_max[c], live_cat[c]);
        s.largest_transient = std::max(s.largest_transient, live_cat[static_cast<std::size_t>(Category::Transient)]);
        s.phase_seen[static_cast<std::size_t>(e.phase)] = true;
        auto& ph = s.phase_peak[static_cast<std::size_t>(e.phase)];
        ph = std::max(ph, live);
        if (live > s.peak.bytes) {
            s.peak.bytes = live;
            s.peak.event = static_cast<std::int64_t>(i);
            s.peak.by_category = live_cat;
        }
        if (e.phase == Phase::Forward) {
            if (e.alloc) forward_live[e.tensor] = &e;
            else forward_live.erase(e.tensor);
        }
    }
    s.end_bytes = live;
    return s;
}

// ---- caching allocator model ---------------------------------------------------

AllocatorReplay replay_caching_allocator(const Timeline& t, const AllocatorConstants& constants, bytes_t capacity) {
    detail::CachingAllocatorModel model(constants);
    model.set_capacity(capacity);
    AllocatorReplay r;
    r.reserved_after.reserve(t.events.size());
    r.allocated_after.reserve(t.events.size());
    for (const Event& e : t.events) {
        if (e.device == Device::Gpu) {
            if (e.alloc) model.allocate(e.tensor, e.bytes);
            else model.release(e.tensor);
        }
        r.peak_allocated = std::max(r.peak_allocated, model.allocated());
        r.peak_reserved = std::max(r.peak_reserved, model.reserved());
        r.segments_released = model.segments_released();
        r.reserved_after.push_back(model.reserved());
        r.allocated_after.push_back(model.allocated());
    }
    return r;
}

// ---- consistency and JSON --------------------------------------------------------

void check_consistent(const Timeline& t) {
    std::unordered_map<std::int64_t, bytes_t> live;
    for (std::size_t i = 0; i < t.events.size(); ++i) {
        const Event& e = t.events[i];
        if (e.alloc) {
            if (e.bytes < 0 || !live.emplace(e.tensor, e.bytes).second)
                throw std::logic_error(fmt::format("timeline event {}: tensor {} allocated twice or with negative size", i, e.tensor));
        } else {
            auto it = live.find(e.tensor);
            if (it == live.end() || it->second != e.bytes)
                throw std::logic_error(fmt::format("timeline event {}: free of tensor {} ({}) that is not live with that size", i, e.tensor, e.name));
            live.erase(it);
        }
    }
}

nlohmann::json to_json(const Timeline& t) {
    nlohmann::json events = nlohmann::json::array();
    for (const Event& e : t.events)
        events.push_back({e.alloc ? "alloc" : "free", e.tensor, e.bytes, to_string(e.category), to_string(e.device),
                          to_string(e.phase), e.layer, e.micro_step, e.op, e.name});
    nlohmann::json j = {{"format", kTimelineFormat},
                        {"source", t.source},
                        {"model", t.model},
                        {"micro_steps", t.micro_steps},
                        {"micro_steps_recorded", t.micro_steps_recorded},
                        {"columns", event_columns()},
                        {"events", events}};
    if (t.rank >= 0) j["rank"] = t.rank;
    return j;
}

Timeline timeline_from_json(const nlohmann::json& j, const std::string& where) {
    detail::JsonReader r(j, where);
    if (r.string("format") != kTimelineFormat) r.fail("format", fmt::format("expected \"{}\"", kTimelineFormat));
    Timeline t;
    t.source = r.string("source");
    t.model = r.string("model");
    t.micro_steps = static_cast<std::int32_t>(r.integer("micro_steps", 1, limits::kGradAccum));
    t.micro_steps_recorded = static_cast<std::int32_t>(r.integer("micro_steps_recorded", 1, t.micro_steps));
    t.rank = r.opt_integer("rank", 0, limits::kGpus - 1).value_or(-1);
    const std::string named_columns = fmt::format("[{}]", fmt::join(kEventColumns, ", "));
    // (the names of the event columns, for a person reading the file: the order every reader assumes)
    if (r.has("columns") && r.raw("columns") != event_columns())
        r.fail("columns", fmt::format("expected {} (the order of each event's columns), got {}", named_columns,
                                      detail::shown(r.raw("columns"))));
    const auto& events = r.raw("events");
    if (!events.is_array()) r.fail("events", "expected an array");
    if (events.empty()) r.fail("events", "expected the step's allocations and frees, got none");
    r.reject_unknown();
    t.events.reserve(events.size());
    for (std::size_t i = 0; i < events.size(); ++i) {
        const auto& a = events[i];
        const std::string field = fmt::format("events[{}]", i);
        auto bad = [&](const char* column, const std::string& expected) {
            fail(where, fmt::format("{}.{}", field, column), expected);
        };
        if (!a.is_array() || a.size() != kEventColumns.size())
            fail(where, field, fmt::format("expected an array of {} columns {}", kEventColumns.size(), named_columns));
        auto text = [&](std::size_t c, const char* column) {
            if (!a[c].is_string()) bad(column, fmt::format("expected a string, got {}", detail::shown(a[c])));
            return a[c].get<std::string>();
        };
        auto integer = [&](std::size_t c, const char* column, std::int64_t lo, std::int64_t hi) {
            const auto v = detail::as_integer(a[c], lo, hi);
            if (!v) bad(column, fmt::format("expected an integer in [{}, {}], got {}", lo, hi, detail::shown(a[c])));
            return *v;
        };
        Event e;
        const std::string kind = text(0, "kind");
        if (kind != "alloc" && kind != "free") bad("kind", fmt::format("expected alloc or free, got {}", detail::shown(a[0])));
        e.alloc = kind == "alloc";
        e.tensor = integer(1, "tensor", 0, INT64_MAX);
        e.bytes = integer(2, "bytes", 0, limits::kBytes);  // (as every byte count a file records)
        e.category = parse_category(text(3, "category"), where + ": " + field);
        const std::string device = text(4, "device");
        if (device != "gpu" && device != "host") bad("device", fmt::format("expected gpu or host, got {}", detail::shown(a[4])));
        e.device = device == "host" ? Device::Host : Device::Gpu;
        e.phase = parse_phase(text(5, "phase"), where + ": " + field);
        e.layer = static_cast<std::int32_t>(integer(6, "layer", -1, limits::kLayers - 1));
        e.micro_step = static_cast<std::int32_t>(integer(7, "micro_step", 0, t.micro_steps_recorded - 1));
        e.op = text(8, "op");
        e.name = text(9, "name");
        t.events.push_back(std::move(e));
    }
    try {
        check_consistent(t);
    } catch (const std::logic_error& e) {
        fail(where, "events", e.what());
    }
    // Live bytes, summed wherever the timeline is read, fit 64 bits: said here, naming the file.
    std::int64_t live = 0;
    for (std::size_t i = 0; i < t.events.size(); ++i) {
        const Event& e = t.events[i];
        if (__builtin_add_overflow(live, e.alloc ? e.bytes : -e.bytes, &live))
            fail(where, fmt::format("events[{}].bytes", i), "expected live bytes below 2^63 after it (they overflow 64 bits)");
    }
    return t;
}

}  // namespace mst
