#pragma once
// CuptiRecorder: what the GPU says happened. It enables CUPTI's activity kinds MEMORY2 (one
// record per device allocation and per release: address, bytes, timestamp, correlation id),
// MEMORY_POOL (stream-ordered pools created, trimmed, destroyed), CONCURRENT_KERNEL (name,
// start, end, without serialising kernels), RUNTIME and EXTERNAL_CORRELATION (to tie records to
// the executor's op markers), collects the records through CUPTI's buffer callbacks, reports the
// records CUPTI dropped, and reads cudaMemGetInfo before and after (the context and the driver's
// reservations, which no allocation record shows).
//
// Op markers: begin_op(name, layer, phase) pushes an external correlation id (CUPTI tags every
// CUDA API call made until end_op() with it) and notes the CUPTI timestamp; a memory record is
// attributed to the marker whose id CUPTI correlated with its API call, else to the marker whose
// time range holds its timestamp.
//
// measured_timeline() turns the records into an mst::Timeline in the simulator's format: with an
// Exact-mode DeviceAllocator each CUPTI allocation is one tensor and takes its name and category
// from the allocator's log (same address, in order), its op/layer/phase from the marker. Without
// CUPTI (a toolkit without libcupti, no driver, CUPTI refusing to enable), or with a Caching-mode
// allocator (CUPTI then sees segments, not tensors), the timeline is the allocator's own log and
// `note` says so. CUPTI's callbacks are process-global: there is one recorder per process.
// Includable from plain C++.
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "device_allocator.cuh"
#include "mst/timeline.hpp"

namespace mst::cuda {

struct MemoryRecord {
    bool allocation = true;          // false: release
    std::uint64_t address = 0;
    std::uint64_t bytes = 0;
    std::uint64_t timestamp_ns = 0;  // CUPTI clock (the API call's time)
    std::uint32_t correlation_id = 0;
    std::uint32_t stream_id = 0;
    bool is_async = false;           // cudaMallocAsync / cudaFreeAsync
    int memory_kind = 0;             // CUpti_ActivityMemoryKind (3: device)
};

struct PoolRecord {
    int operation = 0;  // 1 created, 2 destroyed, 3 trimmed (CUpti_ActivityMemoryPoolOperationType)
    std::uint64_t address = 0, size = 0, utilized_bytes = 0, timestamp_ns = 0;
};

struct KernelRecord {
    std::string name;  // mangled
    std::uint64_t start_ns = 0, end_ns = 0;
    std::uint32_t correlation_id = 0, stream_id = 0;
};

struct OpMarker {
    std::string op;
    std::int32_t layer = -1;
    Phase phase = Phase::Forward;
    std::int32_t micro_step = 0;
    std::uint64_t begin_ns = 0, end_ns = 0;  // end_ns = 0 while open
};

struct MemInfo {
    bool valid = false;
    bytes_t free_bytes = 0, total_bytes = 0;
    std::string error;  // why not valid
    bytes_t used_bytes() const { return total_bytes - free_bytes; }
};

struct MeasuredTimeline {
    Timeline timeline;
    bool from_cupti = false;           // false: the allocator's own log
    std::string note;                  // where the events came from, and any caveat
    std::int64_t unmatched_records = 0;  // CUPTI allocations with no allocator event at their address
    std::int64_t size_mismatches = 0;    // matched, but CUPTI's bytes differ from the request
};

class CuptiRecorder {
public:
    static CuptiRecorder& instance();

    // Registers the buffer callbacks and enables the activity kinds, then creates the CUDA
    // context (cudaFree(0)) and reads cudaMemGetInfo. Call before any other CUDA work so no
    // allocation is missed. Returns false, with status() saying why, when CUPTI cannot record;
    // the caller then relies on the allocator's log (measured_timeline does so by itself).
    bool start(std::size_t buffer_bytes = 8u << 20);
    bool active() const { return active_; }
    const std::string& status() const { return status_; }

    // Op markers (nest-free: begin_op closes the open one)
    void begin_op(const std::string& op, std::int32_t layer, Phase phase, std::int32_t micro_step = 0);
    void end_op();

    // cudaDeviceSynchronize, then cuptiActivityFlushAll: every completed record is delivered.
    void flush();
    // flush (forced), disable the kinds, read cudaMemGetInfo again.
    void stop();

    // The CUPTI clock when recording (records' timestamps share it), else steady_clock ns.
    std::uint64_t now_ns() const;

    std::vector<MemoryRecord> memory() const;
    std::vector<PoolRecord> pools() const;
    std::vector<KernelRecord> kernels() const;
    const std::vector<OpMarker>& markers() const { return markers_; }
    std::uint64_t dropped_records() const;
    const MemInfo& mem_before() const { return mem_before_; }
    const MemInfo& mem_after() const { return mem_after_; }
    void clear();  // forget collected records and markers (between measured steps)

    MeasuredTimeline measured_timeline(const DeviceAllocator& allocator, const std::string& model) const;

    // ---- called from CUPTI's callbacks (internal) ----
    void on_buffer(std::uint8_t* buffer, std::size_t valid_bytes);
    std::size_t buffer_bytes() const { return buffer_bytes_; }

    // cudaMemGetInfo now (valid = false, with the reason, when it fails)
    static MemInfo read_mem_info();

private:
    CuptiRecorder() = default;

    bool active_ = false;
    bool callbacks_registered_ = false;
    std::string status_ = "not started";
    std::size_t buffer_bytes_ = 8u << 20;
    mutable std::mutex mutex_;  // the callbacks may run on CUPTI's worker thread
    std::vector<MemoryRecord> memory_;
    std::vector<PoolRecord> pools_;
    std::vector<KernelRecord> kernels_;
    std::vector<std::pair<std::uint32_t, std::uint64_t>> external_;  // (correlation id, marker index + 1)
    std::uint64_t dropped_ = 0;
    std::vector<OpMarker> markers_;
    bool marker_open_ = false;
    MemInfo mem_before_, mem_after_;
};

}  // namespace mst::cuda
