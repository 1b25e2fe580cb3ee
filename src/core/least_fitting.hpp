#pragma once
// The tuner's one-dimensional search (tune.cpp): the least checkpoint count, or chunk-count index,
// at which a setup fits.
#include <algorithm>
#include <cstdint>
#include <optional>

namespace mst::detail {

// The least i in [lo, hi] for which fits(i) holds, where fitting is monotone (every index above
// one that fits fits too); none when `hi` does not fit. Each probe is a simulation, so the search
// starts where the answer probably is:
//  * without a hint (or one outside [lo, hi]), at `hi`, then it bisects;
//  * with a hint (the answer of a similar search: the previous outer choice's, or the previous
//    checkpoint count's), at the hint, then it moves away from it in doubling steps until the
//    answer is bracketed, and bisects the bracket. An exact hint costs two probes (the hint and the
//    index below it), where bisection costs about log2(hi - lo).
// Under monotonicity both find the same index; the hint only changes which probes are made.
template <class Fits>
std::optional<std::int64_t> least_fitting(std::int64_t lo, std::int64_t hi, std::optional<std::int64_t> hint, Fits&& fits) {
    if (lo > hi) return std::nullopt;
    if (!hint || *hint < lo || *hint > hi) {
        if (!fits(hi)) return std::nullopt;
    } else if (fits(*hint)) {  // down from the hint: the answer is at or below it
        hi = *hint;
        for (std::int64_t step = 1; hi > lo; step *= 2) {
            const std::int64_t c = std::max(lo, hi - step);
            if (!fits(c)) {
                lo = c + 1;
                break;
            }
            hi = c;
        }
    } else {  // up from the hint: the answer is above it, if anywhere
        if (*hint == hi) return std::nullopt;
        lo = *hint + 1;
        for (std::int64_t step = 1;; step *= 2) {
            const std::int64_t c = std::min(hi, lo + step - 1);
            if (fits(c)) {
                hi = c;
                break;
            }
            if (c == hi) return std::nullopt;
            lo = c + 1;
        }
    }
    while (lo < hi) {  // fits(hi), and nothing below lo fits
        const std::int64_t mid = (lo + hi) / 2;
        if (fits(mid)) hi = mid;
        else lo = mid + 1;
    }
    return lo;
}

}  // namespace mst::detail
