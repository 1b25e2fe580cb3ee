#pragma once
// Independent jobs side by side on the CPUs this process may run on (max-seq's strategies, the
// simulator's ranks).
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

// job(i, worker) for i = 0, .., n - 1, each once, on up to `threads` threads (this one among them),
// in any order; `worker` (< threads) is the thread's own index, for tables a job may reuse from the
// jobs before it on that thread. The jobs must not share what else they write. Every job runs; then
// the error of the lowest index that raised one is raised, as a loop over them would have raised
// first.
template <class Job>
void parallel_for(std::size_t n, std::size_t threads, Job&& job) {
    std::vector<std::exception_ptr> errors(n);
    std::atomic<std::size_t> next{0};
    const auto work = [&](std::size_t worker) {
        for (std::size_t i = next++; i < n; i = next++) {
            try {
                job(i, worker);
            } catch (...) {
                errors[i] = std::current_exception();
            }
        }
    };
    {
        std::vector<std::jthread> helpers;
        for (std::size_t w = 1; w < std::min(n, threads); ++w) {
            try {
                helpers.emplace_back(work, w);
            } catch (const std::system_error&) {  // (a limit on threads or processes: fewer helpers)
                break;
            }
        }
        work(0);
    }  // (joined)
    for (const std::exception_ptr& e : errors)
        if (e) std::rethrow_exception(e);
}

// job(0), .., job(n - 1) as above, on up to usable_cpus() threads.
template <class Job>
void parallel_for(std::size_t n, Job&& job) {
    parallel_for(n, static_cast<std::size_t>(usable_cpus()), [&](std::size_t i, std::size_t) { job(i); });
}

}  // namespace mst::detail
