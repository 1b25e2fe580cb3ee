#pragma once
// Independent jobs side by side on the CPUs this process may run on (max-seq's strategies; the
// simulator's ranks use usable_cpus() for their workers).
#include <algorithm>
#include <atomic>
#include <cstddef>
#include <exception>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

namespace mst::detail {

// The CPUs this process may run on (its affinity: a container's or taskset's cores, not the
// machine's), at least 1.
inline int usable_cpus() {
    int n = static_cast<int>(std::thread::hardware_concurrency());
#if defined(__linux__)
    cpu_set_t cpus;
    CPU_ZERO(&cpus);
    if (sched_getaffinity(0, sizeof(cpus), &cpus) == 0) n = CPU_COUNT(&cpus);
#endif
    return std::max(n, 1);
}

// job(0), .., job(n - 1), each once, on up to usable_cpus() threads (this one among them), in any
// order: the jobs must not share what they write. Every job runs; then the error of the lowest
// index that raised one is raised, as a loop over them would have raised first.
template <class Job>
void parallel_for(std::size_t n, Job&& job) {
    std::vector<std::exception_ptr> errors(n);
    std::atomic<std::size_t> next{0};
    const auto work = [&] {
        for (std::size_t i = next++; i < n; i = next++) {
            try {
                job(i);
            } catch (...) {
                errors[i] = std::current_exception();
            }
        }
    };
    {
        std::vector<std::jthread> threads;
        const std::size_t helpers = std::min(n, static_cast<std::size_t>(usable_cpus())) - (n > 0 ? 1 : 0);
        for (std::size_t t = 0; t < helpers; ++t) {
            try {
                threads.emplace_back(work);
            } catch (const std::system_error&) {  // (a limit on threads or processes: fewer helpers)
                break;
            }
        }
        work();
    }  // (joined)
    for (const std::exception_ptr& e : errors)
        if (e) std::rethrow_exception(e);
}

}  // namespace mst::detail
