#pragma once
// DeviceAllocator: every buffer the CUDA backend uses comes from here, and every allocation and
// free is logged, tagged with the op, layer, phase, micro-step, tensor name and category, into an
// mst::Timeline (source "cuda") in the simulator's format, so `compare` can diff the two.
//
// Two modes:
//  * Exact: one cudaMallocAsync (stream-ordered pool) or cudaMalloc per buffer and one free per
//    release, so CUPTI's MEMORY2 records see every tensor (cupti_recorder.cuh).
//  * Caching: PyTorch's CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp), the real
//    thing next to its model in src/core/caching_allocator.hpp and with the same constants
//    (GpuProfile calibration.allocator): sizes round up to 512 B; requests up to 1 MiB come
//    from 2 MiB segments of a small pool, larger ones from a large pool (20 MiB segments below
//    10 MiB, else the size rounded up to 2 MiB); best fit with splitting (a small block splits
//    when >= 512 B remain, a large one when > 1 MiB remains), neighbours coalesce on free,
//    segments are kept (empty_cache() returns the wholly free ones). CUPTI then sees segments
//    only; the per-tensor timeline is this log, and allocated/reserved are what
//    torch.cuda.max_memory_allocated/reserved would report.
//
// Segments come from a SegmentSource: CUDA's allocation calls on a device, or host memory in
// the tests that check the caching bookkeeping on machines without a GPU.
// Includable from plain C++. Not thread-safe: one executor thread drives it.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include <cuda_runtime_api.h>

#include "mst/gpu.hpp"
#include "mst/timeline.hpp"

namespace mst::cuda {

// A SegmentSource that is out of memory (any other failure is a plain std::runtime_error).
class DeviceOutOfMemory : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

// Where memory comes from. map() throws DeviceOutOfMemory when it cannot (out of memory).
class SegmentSource {
public:
    virtual ~SegmentSource() = default;
    virtual void* map(std::size_t bytes) = 0;
    virtual void unmap(void* p, std::size_t bytes) = 0;
    virtual std::string describe() const = 0;  // "cudaMallocAsync on stream 0x..", "host memory"
};

// cudaMallocAsync/cudaFreeAsync on `stream` (stream-ordered; falls back to cudaMalloc/cudaFree
// where the device has no memory pools), or cudaMalloc/cudaFree when !async.
std::unique_ptr<SegmentSource> cuda_segment_source(bool async, cudaStream_t stream = nullptr);
// Host memory (std::aligned_alloc, 512-byte aligned): for the bookkeeping tests only.
std::unique_ptr<SegmentSource> host_segment_source();

// The allocator's own record of one event, beside the Timeline event of the same index.
struct AllocRecord {
    std::uint64_t address = 0;       // the buffer (caching: inside a segment)
    std::int64_t block_bytes = 0;    // bytes the buffer occupies (caching: rounded block; exact: requested)
    std::uint64_t timestamp_ns = 0;  // the allocator's clock (CUPTI's when a recorder installed it)
    bool new_segment = false;        // caching: this allocation mapped a segment
};

struct AllocatorStats {
    bytes_t requested = 0, allocated = 0, reserved = 0;                 // live now
    bytes_t peak_requested = 0, peak_allocated = 0, peak_reserved = 0;  // highest seen
    std::int64_t segments = 0;        // live segments (exact: live buffers)
    std::int64_t segment_maps = 0;    // SegmentSource::map calls
    std::int64_t segment_unmaps = 0;  // SegmentSource::unmap calls
};

class DeviceAllocator {
public:
    enum class Mode { Exact, Caching };

    DeviceAllocator(Mode mode, std::unique_ptr<SegmentSource> source, const AllocatorConstants& constants = {});
    ~DeviceAllocator();  // unmaps everything still mapped (without logging: the step is over)
    DeviceAllocator(const DeviceAllocator&) = delete;
    DeviceAllocator& operator=(const DeviceAllocator&) = delete;

    // Where the executor is: tags every following event (allocations and frees alike, as the
    // simulator does: a free carries the op in which it happens).
    void set_context(std::string op, std::int32_t layer, Phase phase, std::int32_t micro_step = 0);
    // The clock of AllocRecord::timestamp_ns (default: steady_clock ns).
    void set_clock(std::function<std::uint64_t()> clock);

    // A buffer of `bytes` (> 0) for tensor `name` of `category`; nullptr for bytes == 0 (no event,
    // like PyTorch's empty tensors). Throws DeviceOutOfMemory when the source is out of memory.
    void* allocate(bytes_t bytes, const std::string& name, Category category, Device device = Device::Gpu);
    // Frees a buffer from allocate() (nullptr: no-op). A pointer it did not hand out is a bug:
    // std::logic_error.
    void release(void* p);
    // Caching: unmaps wholly free segments (torch.cuda.empty_cache). Exact: nothing to do.
    void empty_cache();

    Mode mode() const { return mode_; }
    const AllocatorStats& stats() const { return stats_; }
    const AllocatorConstants& constants() const { return c_; }
    const Timeline& timeline() const { return timeline_; }
    const std::vector<AllocRecord>& records() const { return records_; }  // one per timeline event
    std::string describe() const;  // "exact (cudaMallocAsync ...)" / "caching (...)"

private:
    struct Block {
        bytes_t size = 0;
        bool free = true;
    };
    struct Segment {
        char* base = nullptr;
        bytes_t size = 0;
        bool small = false;
        std::map<bytes_t, Block> blocks;  // offset -> block
    };
    struct Live {
        std::int64_t tensor = 0;
        bytes_t requested = 0;
        bytes_t block = 0;
        std::int64_t segment = -1;  // caching
        bytes_t offset = 0;
        std::string name;
        Category category = Category::Transient;
        Device device = Device::Gpu;
    };
    using FreeKey = std::tuple<bytes_t, std::int64_t, bytes_t>;  // (size, segment, offset): best fit first

    void* allocate_caching(bytes_t size, Live& live, bool* new_segment);
    void release_caching(const Live& live);
    std::int64_t map_segment(bytes_t size, bool small);
    void log(bool alloc, const Live& live, std::uint64_t address, bool new_segment);
    void update_peaks();

    Mode mode_;
    std::unique_ptr<SegmentSource> source_;
    AllocatorConstants c_;
    std::function<std::uint64_t()> clock_;
    std::string op_ = "init";
    std::int32_t layer_ = -1, micro_step_ = 0;
    Phase phase_ = Phase::Init;

    std::vector<Segment> segments_;        // caching; an unmapped segment keeps its slot with size 0
    std::set<FreeKey> free_[2];            // caching: [0] small pool, [1] large pool
    std::unordered_map<std::uintptr_t, Live> live_;
    std::int64_t next_tensor_ = 0;
    AllocatorStats stats_;
    Timeline timeline_;
    std::vector<AllocRecord> records_;
};

}  // namespace mst::cuda
