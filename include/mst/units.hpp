#pragma once
// Sizes are std::int64_t bytes everywhere. Every product or sum that can grow with user input
// goes through the checked helpers below: a 10M-token sequence times a 256k vocabulary, or the
// live bytes of a step summed event by event, report a user error instead of wrapping to a
// negative number. (Kept C++17: the CUDA sources include this header.)
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>

namespace mst {

using bytes_t = std::int64_t;

inline constexpr bytes_t kKiB = 1024;
inline constexpr bytes_t kMiB = 1024 * kKiB;
inline constexpr bytes_t kGiB = 1024 * kMiB;

// The UserError of a product or sum past 2^63 - 1: "setup: <what>: expected ... (overflows 64 bits)".
[[noreturn]] void overflow_error(const char* what, std::int64_t a, std::int64_t b, char op);

// a*b and a+b, or a UserError naming `what` when the result does not fit in 63 bits.
inline std::int64_t checked_mul(std::int64_t a, std::int64_t b, const char* what = "size") {
    std::int64_t r = 0;
    if (__builtin_mul_overflow(a, b, &r)) overflow_error(what, a, b, 'x');
    return r;
}
inline std::int64_t checked_add(std::int64_t a, std::int64_t b, const char* what = "size") {
    std::int64_t r = 0;
    if (__builtin_add_overflow(a, b, &r)) overflow_error(what, a, b, '+');
    return r;
}
// Product of several factors and sum of several terms, each step checked.
std::int64_t checked_product(std::initializer_list<std::int64_t> factors, const char* what = "size");
std::int64_t checked_sum(std::initializer_list<std::int64_t> terms, const char* what = "size");

// ceil(a / b) for a >= 0, b > 0; never overflows (no a + b - 1).
constexpr std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return a / b + (a % b != 0 ? 1 : 0); }
// a rounded up to a multiple of b (a >= 0, b > 0), checked.
inline std::int64_t round_up(std::int64_t a, std::int64_t b) { return checked_mul(ceil_div(a, b), b, "rounded size"); }

// Numbers as a person types them on a command line or in a spec: decimal digits with an optional
// '-', no leading zeros ("0100" is not octal 64, nor 100), no "0x", nothing after; within int64.
// parse_finite: a decimal number, not nan or inf. nullopt for anything else.
std::optional<std::int64_t> parse_decimal(const std::string& text);
std::optional<double> parse_finite(const std::string& text);

// Human formatting: "15.23 GiB", "512 B"; "8.03 B" for parameter counts.
std::string format_bytes(bytes_t bytes);
std::string format_count(std::int64_t count);
double to_gib(bytes_t bytes);

}  // namespace mst
