#pragma once
// What every libFuzzer target shares (tests/fuzz/README.md). The input is a JSON document read
// through the same bounded reader as every file mst-plan opens; a UserError is the expected answer
// to bad input. Anything else is a finding: another exception escapes (std::terminate), a
// sanitizer reports, a property below fails (abort), or the input runs past libFuzzer's time or
// memory limit.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include <nlohmann/json.hpp>

#include "json_read.hpp"
#include "mst/error.hpp"

namespace mst::fuzz {

// A property every input must keep; its failure is a bug, reported like a crash.
inline void require(bool holds, const char* what) {
    if (holds) return;
    std::fprintf(stderr, "fuzz property violated: %s\n", what);
    std::abort();
}

template <class Body>
int run(const std::uint8_t* data, std::size_t size, Body body) {
    try {
        const nlohmann::json j = detail::parse_json_text(std::string(reinterpret_cast<const char*>(data), size), "fuzz.json");
        body(j);
    } catch (const UserError&) {  // the answer to bad input
    }
    return 0;
}

}  // namespace mst::fuzz
