#include "mst/units.hpp"

#include <fmt/format.h>

#include "mst/error.hpp"

namespace mst {

void fail(const std::string& where, const std::string& field, const std::string& expected) {
    throw UserError(fmt::format("{}: {}: {}", where, field, expected));
}

std::int64_t checked_mul(std::int64_t a, std::int64_t b, const char* what) {
    std::int64_t r = 0;
    if (__builtin_mul_overflow(a, b, &r))
        throw UserError(fmt::format("{} overflows 64 bits ({} x {}); the setup is too large to represent", what, a, b));
    return r;
}

std::int64_t checked_add(std::int64_t a, std::int64_t b, const char* what) {
    std::int64_t r = 0;
    if (__builtin_add_overflow(a, b, &r))
        throw UserError(fmt::format("{} overflows 64 bits ({} + {}); the setup is too large to represent", what, a, b));
    return r;
}

std::int64_t checked_product(std::initializer_list<std::int64_t> factors, const char* what) {
    std::int64_t r = 1;
    for (std::int64_t f : factors) r = checked_mul(r, f, what);
    return r;
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
