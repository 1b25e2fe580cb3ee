#pragma once
// Sizes are std::int64_t bytes everywhere; every multiplication that can grow
// with user input goes through checked_mul so that a 10M-token sequence times a
// 256k vocabulary reports an error instead of wrapping.
#include <cstdint>
#include <string>

namespace mst {

using bytes_t = std::int64_t;

inline constexpr bytes_t kKiB = 1024;
inline constexpr bytes_t kMiB = 1024 * kKiB;
inline constexpr bytes_t kGiB = 1024 * kMiB;

// a*b, or a UserError naming `what` when the product does not fit in 63 bits.
std::int64_t checked_mul(std::int64_t a, std::int64_t b, const char* what = "size");
std::int64_t checked_add(std::int64_t a, std::int64_t b, const char* what = "size");
// Product of several factors, each checked.
std::int64_t checked_product(std::initializer_list<std::int64_t> factors, const char* what = "size");

constexpr std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }
constexpr std::int64_t round_up(std::int64_t a, std::int64_t b) { return ceil_div(a, b) * b; }

// Human formatting: "15.23 GiB", "512 B"; "8.03 B" for parameter counts.
std::string format_bytes(bytes_t bytes);
std::string format_count(std::int64_t count);
double to_gib(bytes_t bytes);

}  // namespace mst
