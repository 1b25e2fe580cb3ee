#pragma once
// TrackingAllocator: the executor's only source of tensor memory. Every buffer is
// the backend's memory (Backend::map: aligned host memory on the CPU, device memory on CUDA),
// tagged with what it is (name, category, device) and where the
// step is (phase, layer, micro-step, op: the allocator's current context), and every
// allocation and free is written to an mst::Timeline in the simulator's format, with
// the exact requested bytes. That timeline is what `compare` diffs against a prediction.
//
// A Buffer is a move-only RAII handle: it frees itself through its allocator, so a free
// is recorded exactly where the last owner lets go, and nothing can leak unrecorded.
#include <cstdint>
#include <string>
#include <vector>

#include "backend.hpp"
#include "mst/timeline.hpp"

namespace mst::exec {

class TrackingAllocator;

class Buffer {
public:
    Buffer() = default;
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;
    Buffer(Buffer&& other) noexcept;
    Buffer& operator=(Buffer&& other) noexcept;
    ~Buffer() { reset(); }

    void* data() const { return data_; }
    bytes_t bytes() const { return bytes_; }
    std::int64_t id() const { return id_; }  // the timeline's tensor id
    explicit operator bool() const { return data_ != nullptr; }
    void reset();  // frees now (recorded with the allocator's current context)

private:
    friend class TrackingAllocator;
    Buffer(TrackingAllocator* owner, void* data, bytes_t bytes, std::int64_t id)
        : owner_(owner), data_(data), bytes_(bytes), id_(id) {}
    TrackingAllocator* owner_ = nullptr;
    void* data_ = nullptr;
    bytes_t bytes_ = 0;
    std::int64_t id_ = -1;
};

class TrackingAllocator {
public:
    // Buffers come from `memory` (which must outlive the allocator); the timeline's source is
    // its name.
    TrackingAllocator(Backend& memory, std::string model);
    // Buffers must not outlive their allocator: a live one at destruction is a bug.
    ~TrackingAllocator();
    TrackingAllocator(const TrackingAllocator&) = delete;
    TrackingAllocator& operator=(const TrackingAllocator&) = delete;

    // The context stamped on every following event.
    // (the backend hears of each change: its own logs and markers carry the same context)
    void set_phase(Phase p) { phase_ = p, context_changed(); }
    void set_layer(std::int32_t layer) { layer_ = layer, context_changed(); }
    void set_micro_step(std::int32_t micro) { micro_ = micro, context_changed(); }
    void set_op(std::string op) { op_ = std::move(op), context_changed(); }
    Phase phase() const { return phase_; }
    std::int32_t layer() const { return layer_; }
    const std::string& op() const { return op_; }

    // `bytes` of uninitialised backend memory.
    Buffer allocate(const std::string& name, bytes_t bytes, Category category, Device device = Device::Gpu);

    bytes_t live_bytes(Device device = Device::Gpu) const { return live_[device == Device::Gpu ? 0 : 1]; }
    bytes_t peak_bytes(Device device = Device::Gpu) const { return peak_[device == Device::Gpu ? 0 : 1]; }
    std::int64_t live_count() const { return live_count_; }

    const Timeline& timeline() const { return timeline_; }
    // Ends the recording: returns the timeline; later frees release memory unrecorded
    // (the persistent state outlives the step, as it does in the simulator's timeline).
    Timeline finish();

private:
    friend class Buffer;
    void release(Buffer& b);
    void context_changed() { memory_.set_context(op_, layer_, phase_, micro_); }

    struct Entry {  // what a free event repeats from its allocation
        std::string name;
        Category category;
        Device device;
    };
    Backend& memory_;
    std::vector<Entry> entries_;  // by tensor id
    Timeline timeline_;
    bool recording_ = true;
    Phase phase_ = Phase::Init;
    std::int32_t layer_ = -1, micro_ = 0;
    std::string op_;
    bytes_t live_[2] = {0, 0}, peak_[2] = {0, 0};
    std::int64_t live_count_ = 0;
};

}  // namespace mst::exec
