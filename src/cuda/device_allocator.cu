// DeviceAllocator: exact (one CUDA allocation per buffer) and caching (PyTorch's algorithm,
// as modelled in src/core/caching_allocator.hpp) modes, both logging a Timeline.
#include "device_allocator.cuh"

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <sstream>
#include <stdexcept>
#include <string>

namespace mst::cuda {

namespace {

std::string cuda_error(cudaError_t e) { return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e); }

class CudaSource final : public SegmentSource {
public:
    CudaSource(bool async, cudaStream_t stream) : async_(async), stream_(stream) {
        if (async_) {
            int device = 0, pools = 0;
            if (cudaGetDevice(&device) != cudaSuccess ||
                cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, device) != cudaSuccess || pools == 0) {
                cudaGetLastError();  // clear: fall back to cudaMalloc
                async_ = false;
            }
        }
        if (async_) {
            // Keep freed memory in the pool between synchronisations (the default threshold of 0
            // returns it to the driver at every sync, and the executor synchronises after every
            // op): each allocation stays one cudaMallocAsync, as CUPTI should see it, without a
            // physical re-map each time.
            cudaMemPool_t pool = nullptr;
            std::uint64_t keep = ~std::uint64_t{0};
            int device = 0;
            if (cudaGetDevice(&device) != cudaSuccess || cudaDeviceGetDefaultMemPool(&pool, device) != cudaSuccess ||
                cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep) != cudaSuccess)
                cudaGetLastError();  // timing only: the threshold does not change what is allocated
        }
    }
    void* map(std::size_t bytes) override {
        void* p = nullptr;
        const cudaError_t e = async_ ? cudaMallocAsync(&p, bytes, stream_) : cudaMalloc(&p, bytes);
        if (e != cudaSuccess) {
            const std::string what = std::string(async_ ? "cudaMallocAsync" : "cudaMalloc") + " of " +
                                     std::to_string(bytes) + " bytes: " + cuda_error(e);
            if (e == cudaErrorMemoryAllocation) {
                cudaGetLastError();  // an allocation failure is not sticky; clear it
                throw DeviceOutOfMemory(what);
            }
            throw std::runtime_error(what);  // a sticky error from an earlier fault, a bad device, ...
        }
        return p;
    }
    void unmap(void* p, std::size_t) override {
        const cudaError_t e = async_ ? cudaFreeAsync(p, stream_) : cudaFree(p);
        if (e != cudaSuccess) throw std::runtime_error(std::string(async_ ? "cudaFreeAsync: " : "cudaFree: ") + cuda_error(e));
    }
    std::string describe() const override {
        std::ostringstream s;
        s << (async_ ? "cudaMallocAsync/cudaFreeAsync on stream " : "cudaMalloc/cudaFree");
        if (async_) s << static_cast<const void*>(stream_);
        return s.str();
    }

private:
    bool async_;
    cudaStream_t stream_;
};

class HostSource final : public SegmentSource {
public:
    void* map(std::size_t bytes) override {
        void* p = std::aligned_alloc(512, (bytes + 511) / 512 * 512);
        if (!p) throw DeviceOutOfMemory("host memory: out of memory");
        return p;
    }
    void unmap(void* p, std::size_t) override { std::free(p); }
    std::string describe() const override { return "host memory (test)"; }
};

std::uint64_t steady_ns() {
    return static_cast<std::uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count());
}

}  // namespace

std::unique_ptr<SegmentSource> cuda_segment_source(bool async, cudaStream_t stream) {
    return std::make_unique<CudaSource>(async, stream);
}
std::unique_ptr<SegmentSource> host_segment_source() { return std::make_unique<HostSource>(); }

DeviceAllocator::DeviceAllocator(Mode mode, std::unique_ptr<SegmentSource> source, const AllocatorConstants& constants)
    : mode_(mode), source_(std::move(source)), c_(constants), clock_(steady_ns) {
    if (!source_) throw std::logic_error("DeviceAllocator: a segment source is required");
    if (c_.round_bytes <= 0 || c_.small_segment_bytes < c_.small_size_bytes || c_.large_segment_round_bytes <= 0)
        throw std::logic_error("DeviceAllocator: inconsistent allocator constants");
    timeline_.source = "cuda";
}

DeviceAllocator::~DeviceAllocator() {
    try {
        if (mode_ == Mode::Exact) {
            for (auto& [address, live] : live_) source_->unmap(reinterpret_cast<void*>(address), std::size_t(live.block));
        } else {
            for (auto& seg : segments_)
                if (seg.size > 0) source_->unmap(seg.base, std::size_t(seg.size));
        }
    } catch (...) {  // a destructor must not throw; a failing free at teardown has nowhere to go
    }
}

void DeviceAllocator::set_context(std::string op, std::int32_t layer, Phase phase, std::int32_t micro_step) {
    op_ = std::move(op);
    layer_ = layer;
    phase_ = phase;
    micro_step_ = micro_step;
}

void DeviceAllocator::set_clock(std::function<std::uint64_t()> clock) { clock_ = clock ? std::move(clock) : steady_ns; }

std::string DeviceAllocator::describe() const {
    return std::string(mode_ == Mode::Exact ? "exact" : "caching") + " (" + source_->describe() + ")";
}

void* DeviceAllocator::allocate(bytes_t bytes, const std::string& name, Category category, Device device) {
    if (bytes < 0) throw std::logic_error("DeviceAllocator::allocate: negative size for " + name);
    if (bytes == 0) return nullptr;
    Live live;
    live.tensor = next_tensor_;
    live.requested = bytes;
    live.name = name;
    live.category = category;
    live.device = device;
    void* p = nullptr;
    bool new_segment = false;
    if (mode_ == Mode::Exact) {
        p = source_->map(std::size_t(bytes));
        live.block = bytes;
        ++stats_.segments;
        ++stats_.segment_maps;
        stats_.reserved += bytes;
        new_segment = true;
    } else {
        const bytes_t size = round_up(std::max(bytes, c_.round_bytes), c_.round_bytes);
        p = allocate_caching(size, live, &new_segment);
    }
    ++next_tensor_;
    stats_.requested += bytes;
    stats_.allocated += live.block;
    update_peaks();
    const auto address = reinterpret_cast<std::uintptr_t>(p);
    log(true, live, address, new_segment);
    live_.emplace(address, std::move(live));
    return p;
}

void DeviceAllocator::release(void* p) {
    if (!p) return;
    const auto it = live_.find(reinterpret_cast<std::uintptr_t>(p));
    if (it == live_.end()) throw std::logic_error("DeviceAllocator::release: a pointer this allocator did not hand out");
    const Live live = std::move(it->second);
    live_.erase(it);
    if (mode_ == Mode::Exact) {
        source_->unmap(p, std::size_t(live.block));
        --stats_.segments;
        ++stats_.segment_unmaps;
        stats_.reserved -= live.block;
    } else {
        release_caching(live);
    }
    stats_.requested -= live.requested;
    stats_.allocated -= live.block;
    log(false, live, reinterpret_cast<std::uintptr_t>(p), false);
}

void DeviceAllocator::log(bool alloc, const Live& live, std::uint64_t address, bool new_segment) {
    Event e;
    e.alloc = alloc;
    e.tensor = live.tensor;
    e.bytes = live.requested;
    e.category = live.category;
    e.device = live.device;
    e.phase = phase_;
    e.layer = layer_;
    e.micro_step = micro_step_;
    e.op = op_;
    e.name = live.name;
    timeline_.events.push_back(std::move(e));
    records_.push_back({address, live.block, clock_(), new_segment});
}

void DeviceAllocator::update_peaks() {
    stats_.peak_requested = std::max(stats_.peak_requested, stats_.requested);
    stats_.peak_allocated = std::max(stats_.peak_allocated, stats_.allocated);
    stats_.peak_reserved = std::max(stats_.peak_reserved, stats_.reserved);
}

// ---- caching mode: PyTorch's block and segment rules (see the model's comments) ----------

std::int64_t DeviceAllocator::map_segment(bytes_t size, bool small) {
    const bytes_t seg = small ? c_.small_segment_bytes
                              : (size < c_.min_large_alloc_bytes ? c_.large_min_segment_bytes
                                                                 : round_up(size, c_.large_segment_round_bytes));
    void* base = nullptr;
    try {
        base = source_->map(std::size_t(seg));
    } catch (const DeviceOutOfMemory&) {
        // PyTorch frees the cached, wholly free segments and tries once more before failing
        empty_cache();
        base = source_->map(std::size_t(seg));
    }
    Segment s;
    s.base = static_cast<char*>(base);
    s.size = seg;
    s.small = small;
    s.blocks[0] = Block{seg, true};
    segments_.push_back(std::move(s));
    const auto id = static_cast<std::int64_t>(segments_.size()) - 1;
    free_[small ? 0 : 1].insert({seg, id, 0});
    stats_.reserved += seg;
    ++stats_.segments;
    ++stats_.segment_maps;
    update_peaks();
    return id;
}

void* DeviceAllocator::allocate_caching(bytes_t size, Live& live, bool* new_segment) {
    const bool small = size <= c_.small_size_bytes;
    auto& pool = free_[small ? 0 : 1];
    auto it = pool.lower_bound({size, -1, -1});
    if (it == pool.end()) {
        map_segment(size, small);
        *new_segment = true;
        it = pool.lower_bound({size, -1, -1});
    }
    const auto [block_size, seg_id, offset] = *it;
    pool.erase(it);
    Segment& seg = segments_[std::size_t(seg_id)];
    const bytes_t remaining = block_size - size;
    const bool split = small ? remaining >= c_.round_bytes : remaining > c_.small_size_bytes;
    bytes_t used = block_size;
    if (split) {
        used = size;
        seg.blocks[offset + size] = Block{remaining, true};
        pool.insert({remaining, seg_id, offset + size});
    }
    seg.blocks[offset] = Block{used, false};
    live.block = used;
    live.segment = seg_id;
    live.offset = offset;
    return seg.base + offset;
}

void DeviceAllocator::release_caching(const Live& live) {
    Segment& seg = segments_[std::size_t(live.segment)];
    auto& pool = free_[seg.small ? 0 : 1];
    auto it = seg.blocks.find(live.offset);
    it->second.free = true;
    auto next = std::next(it);
    if (next != seg.blocks.end() && next->second.free) {
        pool.erase({next->second.size, live.segment, next->first});
        it->second.size += next->second.size;
        seg.blocks.erase(next);
    }
    if (it != seg.blocks.begin()) {
        auto prev = std::prev(it);
        if (prev->second.free) {
            pool.erase({prev->second.size, live.segment, prev->first});
            prev->second.size += it->second.size;
            seg.blocks.erase(it);
            it = prev;
        }
    }
    pool.insert({it->second.size, live.segment, it->first});
}

void DeviceAllocator::empty_cache() {
    if (mode_ != Mode::Caching) return;
    for (std::size_t id = 0; id < segments_.size(); ++id) {
        Segment& seg = segments_[id];
        if (seg.size == 0 || seg.blocks.size() != 1 || !seg.blocks.begin()->second.free) continue;
        free_[seg.small ? 0 : 1].erase({seg.size, static_cast<std::int64_t>(id), 0});
        source_->unmap(seg.base, std::size_t(seg.size));
        stats_.reserved -= seg.size;
        --stats_.segments;
        ++stats_.segment_unmaps;
        seg.size = 0;
        seg.blocks.clear();
    }
}

}  // namespace mst::cuda
