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

TEST_CASE("ceil_div and round_up never wrap: the rounding of a size near 2^63 is an error, not a negative size") {
    CHECK(ceil_div(10, 4) == 3);
    CHECK(ceil_div(12, 4) == 3);
    CHECK(ceil_div(0, 7) == 0);
    // (a + b - 1) / b would overflow here; the quotient and remainder form cannot.
    CHECK(ceil_div(INT64_MAX, 2) == std::int64_t{1} << 62);
    CHECK(round_up(1000, 512) == 1024);
    CHECK(test::expect_user_error([] { (void)round_up(INT64_MAX - 10, 512); }).find("overflows 64 bits") !=
          std::string::npos);
}

TEST_CASE("a number as a person types it: decimal digits, no leading zero, within 64 bits") {
    CHECK(parse_decimal("4096") == 4096);
    CHECK(parse_decimal("-5") == -5);
    CHECK(parse_decimal("0") == 0);
    CHECK(parse_decimal("9223372036854775807") == INT64_MAX);
    for (const char* bad : {"0100", "0x100", "+5", " 5", "5 ", "", "-", "1e3", "4096.0", "9223372036854775808", "--1"})
        CHECK_MESSAGE(!parse_decimal(bad), bad);
    CHECK(parse_finite("0.03") == 0.03);
    CHECK(parse_finite("1e300") == 1e300);
    for (const char* bad : {"nan", "inf", "-inf", "1e309", "", "0.5x", " 1"}) CHECK_MESSAGE(!parse_finite(bad), bad);
}

TEST_CASE("messages: the closest known word, and control characters that cannot break a line") {
    CHECK(closest("sequence_length", {"micro_batch", "seq_len", "grad_accum"}) == "seq_len");
    CHECK(closest("mlp_chunk", {"mlp_chunks", "lm_chunks", "mlp_impl"}) == "mlp_chunks");
    CHECK(closest("estmate", {"models", "estimate", "recommend"}) == "estimate");
    CHECK(closest("x", {}).empty());
    CHECK(printable("a\nb\rc\td\x1b") == "a\\nb\\rc\\td\\x1b");
    CHECK(printable("llama-3-8b ünïcode") == "llama-3-8b ünïcode");
    // Unicode's line breaks, which YAML honours (a comment would end there): NEL, U+2028, U+2029.
    CHECK(printable("a\xc2\x85" "b\xe2\x80\xa8" "c\xe2\x80\xa9" "d") == "a\\u0085b\\u2028c\\u2029d");
    CHECK(printable("\xe2\x80\xa6 \xc2\xa0") == "\xe2\x80\xa6 \xc2\xa0");  // an ellipsis, a no-break space: text
    CHECK(printable("cut \xe2\x80") == "cut \xe2\x80");
    CHECK(in_quotes(std::string(100, 'x')) == "'" + std::string(60, 'x') + "...'");
}
