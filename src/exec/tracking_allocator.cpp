#include "tracking_allocator.hpp"

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

TrackingAllocator::TrackingAllocator(std::string source, std::string model) {
    timeline_.source = std::move(source);
    timeline_.model = std::move(model);
}

TrackingAllocator::~TrackingAllocator() { assert(live_count_ == 0 && "a Buffer outlived its TrackingAllocator"); }

Buffer TrackingAllocator::allocate(const std::string& name, bytes_t bytes, Category category, Device device) {
    assert(bytes >= 0);
    // operator new never returns null for a size of 0, so every Buffer is non-empty.
    void* p = ::operator new(static_cast<std::size_t>(bytes), std::align_val_t{kAlignment});
    const auto id = static_cast<std::int64_t>(entries_.size());
    entries_.push_back(Entry{name, category, device});
    if (recording_)
        timeline_.events.push_back(Event{true, id, bytes, category, device, phase_, layer_, micro_, op_, name});
    const int d = device == Device::Gpu ? 0 : 1;
    live_[d] += bytes;
    peak_[d] = std::max(peak_[d], live_[d]);
    ++live_count_;
    return Buffer(this, p, bytes, id);
}

void TrackingAllocator::release(Buffer& b) {
    const Entry& e = entries_[static_cast<std::size_t>(b.id_)];
    if (recording_)
        timeline_.events.push_back(Event{false, b.id_, b.bytes_, e.category, e.device, phase_, layer_, micro_, op_, e.name});
    live_[e.device == Device::Gpu ? 0 : 1] -= b.bytes_;
    --live_count_;
    ::operator delete(b.data_, std::align_val_t{kAlignment});
}

Timeline TrackingAllocator::finish() {
    recording_ = false;
    return std::move(timeline_);
}

}  // namespace mst::exec
