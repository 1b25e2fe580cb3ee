#pragma once
// Shared helpers for the unit tests: catalog access and error-message checks.
#include <cstdlib>
#include <string>

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

}  // namespace mst::test
