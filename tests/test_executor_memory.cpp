// The simulator against the CPU executor's measured memory: for each setup, the
// predicted and the measured timelines must be the same, event by event (same
// allocations and frees, in the same order, with the same bytes, categories, phases,
// layers and ops), hence the same peak to the byte. The executor sizes every buffer
// from the kernel it feeds, never from the simulator's rules (src/exec/executor.cpp).
#include <doctest/doctest.h>

#include <fmt/format.h>

#include "mst/catalog.hpp"
#include "mst/compare.hpp"
#include "mst/execute.hpp"
#include "mst/simulate.hpp"
#include "sim_test_support.hpp"

using namespace mst;
using namespace mst::test;

namespace {

std::string describe(const Event& e) {
    return fmt::format("{} {} #{} {} B {} {} layer {} micro {} op {}", e.alloc ? "alloc" : "free", e.name, e.tensor, e.bytes,
                       to_string(e.category), to_string(e.phase), e.layer, e.micro_step, e.op);
}

// Simulates and executes `s`; checks peak and every event.
void check_exact(const ModelSpec& m, const TrainingSetup& s) {
    const Timeline predicted = simulate(m, s, test_gpu());
    const MeasuredStep measured = execute_cpu(m, s, 7);
    const Comparison c = compare_timelines(predicted, measured.timeline, m.num_layers);
    if (c.divergence) {
        const auto i = static_cast<std::size_t>(*c.divergence);
        MESSAGE("first divergence at event ", i, "\n  predicted: ",
                c.predicted_event ? describe(*c.predicted_event) : std::string("(end)"),
                "\n  measured:  ", c.measured_event ? describe(*c.measured_event) : std::string("(end)"));
    }
    CHECK(c.rows.front().measured == c.rows.front().predicted);
    CHECK(c.identical());
    CHECK(measured.timeline.micro_steps == predicted.micro_steps);
    CHECK(measured.timeline.micro_steps_recorded == predicted.micro_steps_recorded);
    CHECK(std::isfinite(measured.loss));
}

}  // namespace

TEST_CASE("CPU executor: the default setup (pure bf16, AdamW, flash, unchunked) measures what the simulator predicts") {
    check_exact(find_model("tiny-llama"), tiny_setup(32));
}
