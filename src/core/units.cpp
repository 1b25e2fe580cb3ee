#include "mst/units.hpp"

#include <charconv>
#include <cmath>

#include <fmt/format.h>

#include "mst/error.hpp"

namespace mst {

void overflow_error(const char* what, std::int64_t a, std::int64_t b, char op) {
    fail("setup", what,
         fmt::format("expected a value below 2^63, got {} {} {} (overflows 64 bits: the setup is too large to represent)",
                     a, op, b));
}

std::int64_t checked_product(std::initializer_list<std::int64_t> factors, const char* what) {
    std::int64_t r = 1;
    for (std::int64_t f : factors) r = checked_mul(r, f, what);
    return r;
}

std::int64_t checked_sum(std::initializer_list<std::int64_t> terms, const char* what) {
    std::int64_t r = 0;
    for (std::int64_t t : terms) r = checked_add(r, t, what);
    return r;
}

std::optional<std::int64_t> parse_decimal(const std::string& text) {
    const std::string digits = text.starts_with('-') ? text.substr(1) : text;
    if (digits.empty() || (digits.size() > 1 && digits.front() == '0')) return std::nullopt;
    std::int64_t v = 0;
    const auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), v);  // base 10, overflow checked
    if (ec != std::errc() || ptr != text.data() + text.size()) return std::nullopt;
    return v;
}

std::optional<double> parse_finite(const std::string& text) {
    double v = 0;
    const auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
    if (text.empty() || ec != std::errc() || ptr != text.data() + text.size() || !std::isfinite(v)) return std::nullopt;
    return v;
}

double to_gib(bytes_t bytes) { return static_cast<double>(bytes) / static_cast<double>(kGiB); }

std::string format_bytes(bytes_t bytes) {
    const double b = static_cast<double>(bytes);
    const double a = b < 0 ? -b : b;
    if (a >= static_cast<double>(kGiB)) return fmt::format("{:.2f} GiB", b / static_cast<double>(kGiB));
    if (a >= static_cast<double>(kMiB)) return fmt::format("{:.2f} MiB", b / static_cast<double>(kMiB));
    if (a >= static_cast<double>(kKiB)) return fmt::format("{:.2f} KiB", b / static_cast<double>(kKiB));
    return fmt::format("{} B", bytes);
}

std::string format_count(std::int64_t count) {
    const double c = static_cast<double>(count);
    if (count >= 1'000'000'000) return fmt::format("{:.2f} B", c / 1e9);
    if (count >= 1'000'000) return fmt::format("{:.2f} M", c / 1e6);
    if (count >= 1'000) return fmt::format("{:.2f} K", c / 1e3);
    return fmt::format("{}", count);
}

}  // namespace mst
