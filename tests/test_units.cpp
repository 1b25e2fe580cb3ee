#include <doctest/doctest.h>

#include "mst/error.hpp"
#include "mst/units.hpp"
#include "test_support.hpp"

using namespace mst;

TEST_CASE("checked_mul multiplies exactly and refuses to wrap") {
    CHECK(checked_mul(3, 7) == 21);
    // 10M tokens x 256k vocab x 4 bytes (fp32 logits) = 1.048576e13: fits in 63 bits.
    CHECK(checked_product({10'000'000, 262'144, 4}) == 10'485'760'000'000);
    // (2^32)^2 = 2^64 does not fit.
    const auto msg = test::expect_user_error([] { (void)checked_mul(std::int64_t{1} << 32, std::int64_t{1} << 32, "logits"); });
    CHECK(msg.find("logits") != std::string::npos);
    CHECK_THROWS_AS((void)checked_add(INT64_MAX, 1), UserError);
}

TEST_CASE("bytes print in binary units") {
    CHECK(format_bytes(512) == "512 B");
    CHECK(format_bytes(3 * kMiB / 2) == "1.50 MiB");
    CHECK(format_bytes(80 * kGiB) == "80.00 GiB");
    CHECK(format_count(8'030'261'248) == "8.03 B");
}
