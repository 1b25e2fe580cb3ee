#pragma once
// Shared helpers for the unit tests: catalog access and error-message checks.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "mst/error.hpp"

namespace mst::test {

inline std::string data(const std::string& rel) { return std::string(MST_TEST_DATA_DIR) + "/" + rel; }

// Runs f, expects a UserError whose message contains every fragment.
template <class F>
std::string expect_user_error(F&& f) {
    try {
        f();
    } catch (const mst::UserError& e) {
        return e.what();
    }
    FAIL("expected a UserError");
    return {};
}

// max|a - b| / max|b|: norm-wise (element-wise relative errors blow up where values cancel);
// a NaN on either side is an infinite error.
inline double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
    REQUIRE(a.size() == b.size());
    double num = 0.0, den = 0.0;
    for (std::size_t i = 0; i < a.size(); ++i) {
        if (std::isnan(a[i]) || std::isnan(b[i])) return std::numeric_limits<double>::infinity();
        num = std::max(num, std::fabs(double(a[i]) - double(b[i])));
        den = std::max(den, std::fabs(double(b[i])));
    }
    return den == 0.0 ? num : num / den;
}

}  // namespace mst::test
