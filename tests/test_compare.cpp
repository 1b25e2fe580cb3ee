// compare_timelines: the views and the first divergence, on timelines altered by hand.
#include <doctest/doctest.h>

#include "mst/catalog.hpp"
#include "mst/compare.hpp"
#include "mst/simulate.hpp"
#include "sim_test_support.hpp"

using namespace mst;
using namespace mst::test;

TEST_CASE("compare: a timeline against itself is identical with zero errors") {
    const ModelSpec m = find_model("tiny-llama");
    const Timeline t = simulate(m, tiny_setup(32), test_gpu());
    const Comparison c = compare_timelines(t, t, m.num_layers);
    CHECK(c.identical());
    CHECK(c.rows.front().label == "peak");
    for (const CompareRow& r : c.rows) CHECK(r.error() == 0);
}

TEST_CASE("compare: one event 512 bytes larger is found, and so is the peak it raises") {
    const ModelSpec m = find_model("tiny-llama");
    const Timeline predicted = simulate(m, tiny_setup(32), test_gpu());
    const Summary s = summarize(predicted, m.num_layers);
    Timeline measured = predicted;
    // Grow the allocation that sets the peak, and its free, by 512 bytes.
    const auto peak = static_cast<std::size_t>(s.peak.event);
    const std::int64_t id = measured.events[peak].tensor;
    for (Event& e : measured.events)
        if (e.tensor == id) e.bytes += 512;
    const Comparison c = compare_timelines(predicted, measured, m.num_layers);
    REQUIRE(c.divergence);
    CHECK(*c.divergence <= static_cast<std::int64_t>(peak));
    CHECK(c.predicted_event->tensor == id);
    CHECK(c.measured_event->bytes == c.predicted_event->bytes + 512);
    CHECK(c.peak_error() == 512);
    CHECK(c.rows.front().relative() == doctest::Approx(512.0 / double(s.peak.bytes)));
}

TEST_CASE("compare: a missing last event diverges where the shorter timeline ends") {
    const ModelSpec m = find_model("tiny-llama");
    const Timeline predicted = simulate(m, tiny_setup(32), test_gpu());
    Timeline measured = predicted;
    measured.events.pop_back();
    const Comparison c = compare_timelines(predicted, measured, m.num_layers);
    REQUIRE(c.divergence);
    CHECK(*c.divergence == static_cast<std::int64_t>(measured.events.size()));
    CHECK(c.predicted_event);
    CHECK(!c.measured_event);
}
