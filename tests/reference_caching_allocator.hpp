#pragma once
// The reference for src/core/caching_allocator.hpp: the model as first written, on a std::set of
// free blocks and a std::map of blocks per segment, kept as the plain statement of the rules
// the flat model must follow block for block (test_caching_allocator.cpp, test_invariants.cpp).
//
// A model of PyTorch's CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp):
// sizes round up to 512 bytes; requests up to 1 MiB come from 2 MiB segments of a
// small pool, larger ones from a large pool (20 MiB segments below 10 MiB, else the
// size rounded to 2 MiB); best-fit with splitting (large blocks split only when more
// than 1 MiB remains), coalescing on free; segments are kept until a new one would pass the
// device's capacity: then every free block that is a whole segment is released first.
#include <cstdint>
#include <limits>
#include <map>
#include <set>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "mst/gpu.hpp"

namespace mst::test {

class ReferenceCachingAllocator {
public:
    explicit ReferenceCachingAllocator(const AllocatorConstants& c, bytes_t capacity = std::numeric_limits<bytes_t>::max())
        : c_(c), capacity_(capacity) {}

    void allocate(std::int64_t tensor, bytes_t requested) {
        if (requested <= 0) return;  // PyTorch hands out no block for empty tensors
        const bytes_t size = round_up(std::max(requested, c_.round_bytes), c_.round_bytes);
        const bool small = size <= c_.small_size_bytes;
        auto& pool = free_[small ? 0 : 1];
        auto it = pool.lower_bound({size, -1, -1});
        if (it == pool.end()) {
            const bytes_t seg = small ? c_.small_segment_bytes
                                      : (size < c_.min_large_alloc_bytes ? c_.large_min_segment_bytes
                                                                         : round_up(size, c_.large_segment_round_bytes));
            if (reserved_ + seg > capacity_) release_free_segments();
            const std::int64_t id = next_segment_++;
            segments_[id] = {{0, Block{seg, true}}};
            reserved_ += seg;
            it = pool.insert({seg, id, 0}).first;
        }
        const auto [block_size, seg, offset] = *it;
        pool.erase(it);
        auto& blocks = segments_.at(seg);
        const bytes_t remaining = block_size - size;
        // PyTorch splits a small block when a minimum block remains, a large one only above kSmallSize.
        const bool split = small ? remaining >= c_.round_bytes : remaining > c_.small_size_bytes;
        bytes_t used = block_size;
        if (split) {
            used = size;
            blocks[offset + size] = Block{remaining, true};
            pool.insert({remaining, seg, offset + size});
        }
        blocks[offset] = Block{used, false};
        where(tensor) = {seg, offset, small};
        allocated_ += used;
    }

    void release(std::int64_t tensor) {
        Where& w = where(tensor);
        if (w.seg < 0) return;
        const auto [seg, offset, small] = w;
        w.seg = -1;
        auto& pool = free_[small ? 0 : 1];
        auto& blocks = segments_.at(seg);
        auto it = blocks.find(offset);
        allocated_ -= it->second.size;
        it->second.free = true;
        // Merge with the free neighbours in the same segment.
        auto next = std::next(it);
        if (next != blocks.end() && next->second.free) {
            pool.erase({next->second.size, seg, next->first});
            it->second.size += next->second.size;
            blocks.erase(next);
        }
        if (it != blocks.begin()) {
            auto prev = std::prev(it);
            if (prev->second.free) {
                pool.erase({prev->second.size, seg, prev->first});
                prev->second.size += it->second.size;
                blocks.erase(it);
                it = prev;
            }
        }
        pool.insert({it->second.size, seg, it->first});
    }

    // Where a tensor's block is: {segment, offset, block bytes}; segment -1 when it has none.
    std::tuple<std::int64_t, bytes_t, bytes_t> placement(std::int64_t tensor) {
        const Where w = where(tensor);
        if (w.seg < 0) return {-1, 0, 0};
        return {w.seg, w.offset, segments_.at(w.seg).at(w.offset).size};
    }

    bytes_t allocated() const { return allocated_; }
    bytes_t reserved() const { return reserved_; }
    std::int64_t segments_released() const { return released_; }

private:
    // PyTorch's release_cached_blocks: a free block alone in its segment leaves with the segment.
    void release_free_segments() {
        for (auto& pool : free_)
            for (auto it = pool.begin(); it != pool.end();) {
                const auto [size, seg, offset] = *it;
                if (segments_.at(seg).size() != 1) {
                    ++it;
                    continue;
                }
                segments_.erase(seg);
                reserved_ -= size;
                ++released_;
                it = pool.erase(it);
            }
    }
    struct Block {
        bytes_t size;
        bool free;
    };
    struct Where {
        std::int64_t seg = -1;  // -1: not allocated
        bytes_t offset = 0;
        bool small = false;
    };
    // Tensor ids are dense in timelines mst-plan writes; others fall back to a hash map.
    Where& where(std::int64_t tensor) {
        if (tensor >= 0 && tensor < (std::int64_t{1} << 24)) {
            if (static_cast<std::size_t>(tensor) >= dense_.size()) dense_.resize(static_cast<std::size_t>(tensor) * 2 + 16);
            return dense_[static_cast<std::size_t>(tensor)];
        }
        return sparse_[tensor];
    }
    AllocatorConstants c_;
    bytes_t capacity_;
    std::map<std::int64_t, std::map<bytes_t, Block>> segments_;  // by id, in creation order
    std::int64_t next_segment_ = 0, released_ = 0;
    std::set<std::tuple<bytes_t, std::int64_t, bytes_t>> free_[2];  // (size, segment, offset): best fit first
    std::vector<Where> dense_;
    std::unordered_map<std::int64_t, Where> sparse_;
    bytes_t allocated_ = 0, reserved_ = 0;
};

}  // namespace mst::test
