#include "tracking_allocator.hpp"

#include "mst/execute.hpp"

#include <algorithm>
#include <cassert>
#include <new>
#include <utility>

namespace mst::exec {

Buffer::Buffer(Buffer&& other) noexcept
    : owner_(std::exchange(other.owner_, nullptr)),
      data_(std::exchange(other.data_, nullptr)),
      bytes_(std::exchange(other.bytes_, 0)),
      id_(std::exchange(other.id_, -1)) {}

Buffer& Buffer::operator=(Buffer&& other) noexcept {
    if (this != &other) {
        reset();
        owner_ = std::exchange(other.owner_, nullptr);
        data_ = std::exchange(other.data_, nullptr);
        bytes_ = std::exchange(other.bytes_, 0);
        id_ = std::exchange(other.id_, -1);
    }
    return *this;
}

void Buffer::reset() {
    if (!owner_) return;
    owner_->release(*this);
    owner_ = nullptr;
    data_ = nullptr;
    bytes_ = 0;
    id_ = -1;
}

TrackingAllocator::TrackingAllocator(Backend& memory, std::string model) : memory_(memory) {
    timeline_.source = memory.name();
    timeline_.model = std::move(model);
}

TrackingAllocator::~TrackingAllocator() { assert(live_count_ == 0 && "a Buffer outlived its TrackingAllocator"); }

Buffer TrackingAllocator::allocate(const std::string& name, bytes_t bytes, Category category, Device device) {
    assert(bytes >= 0);
    const auto id = static_cast<std::int64_t>(entries_.size());
    Event e{true, id, bytes, category, device, phase_, layer_, micro_, op_, name};
    void* p = nullptr;
    try {
        p = memory_.map(e);
    } catch (const std::bad_alloc& error) {  // out of memory (BackendOutOfMemory, or operator new's)
        throw OutOfMemoryError(e, live_bytes(device),
                               memory_.memory_name(device) + " memory on the " + memory_.name() + " backend", error.what());
    }
    entries_.push_back(Entry{name, category, device});
    if (recording_) timeline_.events.push_back(std::move(e));
    const int d = device == Device::Gpu ? 0 : 1;
    live_[d] += bytes;
    peak_[d] = std::max(peak_[d], live_[d]);
    ++live_count_;
    return Buffer(this, p, bytes, id);
}

void TrackingAllocator::release(Buffer& b) {
    const Entry& entry = entries_[static_cast<std::size_t>(b.id_)];
    Event e{false, b.id_, b.bytes_, entry.category, entry.device, phase_, layer_, micro_, op_, entry.name};
    memory_.unmap(b.data_, e);
    live_[entry.device == Device::Gpu ? 0 : 1] -= b.bytes_;
    --live_count_;
    if (recording_) timeline_.events.push_back(std::move(e));
}

Timeline TrackingAllocator::finish() {
    recording_ = false;
    return std::move(timeline_);
}

}  // namespace mst::exec

namespace mst {

OutOfMemoryError::OutOfMemoryError(const Event& e, bytes_t live, const std::string& memory, const std::string& cause)
    : UserError("out of " + memory + ": allocating '" + e.name + "' (" + format_bytes(e.bytes) +
                ") in " + e.op + " (layer " + std::to_string(e.layer) + ", " + to_string(e.phase) + ", micro-step " +
                std::to_string(e.micro_step) + ") with " + format_bytes(live) + " live: " + cause),
      request(e), live_bytes(live) {}

}  // namespace mst
