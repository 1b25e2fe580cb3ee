#pragma once
// A model of PyTorch's CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp):
// sizes round up to 512 bytes; requests up to 1 MiB come from 2 MiB segments of a
// small pool, larger ones from a large pool (20 MiB segments below 10 MiB, else the
// size rounded to 2 MiB); best-fit with splitting (large blocks split only when more
// than 1 MiB remains), coalescing on free. Segments are returned only when a new one does not
// fit in the device's capacity: then, as PyTorch's malloc does when cudaMalloc fails (its
// release_cached_blocks, the default path without max_split_size_mb), every wholly free
// segment of both pools is released and the segment made; a step whose reserved bytes still
// pass the capacity is out of memory. A segment made after a release is placed after the
// others (cudaMalloc may hand back a released address range: best-fit ties between blocks of
// one size then follow creation order here, address order in PyTorch).
//
// Best fit is PyTorch's order: the smallest free block that is large enough, and among
// blocks of that size the one in the oldest segment at the lowest offset. The tuner replays
// this model for every candidate it simulates (millions of events per search), so it keeps
// no node-based containers and allocates no memory once its vectors have grown:
//  * blocks_: every block, in one vector, with two intrusive lists: the blocks of a segment
//    in address order (prev/next, so coalescing looks at two neighbours), and the free
//    blocks of one size (free_prev/free_next, below).
//  * a pool's size classes: one for every size freed in it, numbered as they appear (a free
//    block knows its class), each the head and tail of its list of free blocks in (segment,
//    offset) order, descending: its best fit is the tail. A hash table finds a size's class.
//    Merging makes sizes of every kind (hundreds of classes in a small pool), but only a few
//    hold a block at a time (about 8, at most 18, in the tuner's searches): best fit scans
//    those, kept sorted by size.
//    Blocks are mostly freed in reverse order of allocation (a backward pass), so a freed
//    block's place in its class is next to one end; the search for it walks in from both ends
//    and is never longer than the distance to the nearer one.
// tests/reference_caching_allocator.hpp keeps the std::set/std::map formulation this
// replaced; tests check that both place every block alike and agree on the totals.
#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <iterator>
#include <limits>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "mst/gpu.hpp"

namespace mst::detail {

class CachingAllocatorModel {
public:
    explicit CachingAllocatorModel(const AllocatorConstants& c) : c_(c) {}

    void allocate(std::int64_t tensor, bytes_t requested) {
        if (requested <= 0) return;  // PyTorch hands out no block for empty tensors
        const bytes_t size = round_to_block(std::max(requested, c_.round_bytes));
        const bool small = size <= c_.small_size_bytes;
        std::int32_t b = take_best_fit(small, size);
        if (b < 0) {
            const bytes_t seg = small ? c_.small_segment_bytes
                                      : (size < c_.min_large_alloc_bytes ? c_.large_min_segment_bytes
                                                                         : round_up(size, c_.large_segment_round_bytes));
            if (seg > capacity_ - reserved_) release_cached_segments();
            b = new_block(seg, 0, segments_++);
            reserved_ = checked_add(reserved_, seg, "reserved bytes");
        }
        const bytes_t remaining = blocks_[idx(b)].size - size;
        // PyTorch splits a small block when a minimum block remains, a large one only above kSmallSize.
        const bool split = small ? remaining >= c_.round_bytes : remaining > c_.small_size_bytes;
        if (split) {
            const std::int32_t r = new_block(remaining, blocks_[idx(b)].offset + size, blocks_[idx(b)].seg);
            Block& head = blocks_[idx(b)];  // after new_block, which may move blocks_
            head.size = size;
            blocks_[idx(r)].free = true;
            blocks_[idx(r)].prev = b;
            blocks_[idx(r)].next = head.next;
            if (head.next >= 0) blocks_[idx(head.next)].prev = r;
            head.next = r;
            add_free(small, r);
        }
        blocks_[idx(b)].free = false;
        where(tensor) = Where{b, small};
        allocated_ += blocks_[idx(b)].size;  // at most reserved_
    }

    void release(std::int64_t tensor) {
        Where& w = where(tensor);
        if (w.block < 0) return;
        std::int32_t b = w.block;
        const bool small = w.small;
        w.block = -1;
        allocated_ -= blocks_[idx(b)].size;
        blocks_[idx(b)].free = true;
        // Merge with the free neighbours in the same segment: the next one, then the previous.
        const std::int32_t next = blocks_[idx(b)].next;
        if (next >= 0 && blocks_[idx(next)].free) {
            remove_free(small, next);
            absorb(b, next);
        }
        const std::int32_t prev = blocks_[idx(b)].prev;
        if (prev >= 0 && blocks_[idx(prev)].free) {
            remove_free(small, prev);
            absorb(prev, b);
            b = prev;
        }
        add_free(small, b);
    }

    // Empty again, under constants `c` and a device of `capacity` bytes (where segments are
    // released and retried), keeping the memory its tables have grown to.
    void reset(const AllocatorConstants& c, bytes_t capacity = std::numeric_limits<bytes_t>::max()) {
        c_ = c;
        capacity_ = capacity;
        blocks_.clear();
        spare_blocks_.clear();
        for (Pool& p : pools_) p.clear();
        segments_ = released_ = 0;
        dense_.clear();
        sparse_.clear();
        allocated_ = reserved_ = 0;
    }

    // Tensor `to` takes over the block of `from`, which has none after (the replay's skipped
    // repeats, src/core/sim/loop_replay.cpp).
    void rename(std::int64_t from, std::int64_t to) {
        const Where w = where(from);
        where(from) = Where{};
        where(to) = w;
    }

    bytes_t allocated() const { return allocated_; }
    bytes_t reserved() const { return reserved_; }
    std::int64_t segments_made() const { return segments_; }          // never decreases
    std::int64_t segments_released() const { return released_; }
    // The device's bytes: a segment that would take reserved bytes past them releases the cached ones first.
    void set_capacity(bytes_t capacity) { capacity_ = capacity; }
    // Where a tensor's block is: {segment, offset, block bytes}; segment -1 when it has none
    // (tests compare it with the reference model's).
    std::tuple<std::int64_t, bytes_t, bytes_t> placement(std::int64_t tensor) {
        const Where w = where(tensor);
        if (w.block < 0) return {-1, 0, 0};
        const Block& b = blocks_[idx(w.block)];
        return {b.seg, b.offset, b.size};
    }

private:
    struct Block {
        bytes_t size = 0;
        bytes_t offset = 0;                   // within its segment
        std::int64_t seg = 0;                 // segments are numbered in creation order
        std::int32_t prev = -1, next = -1;    // neighbours in the segment, by address
        std::int32_t free_prev = -1, free_next = -1;  // neighbours in its size class (free blocks)
        std::int32_t cls = -1;                         // its size class while free (and the last one after)
        bool free = false;
        // The size class's order: (segment, offset) descending, so that the best fit is last.
        bool before(const Block& o) const { return seg != o.seg ? seg > o.seg : offset > o.offset; }
    };
    struct SizeClass {
        bytes_t size;
        std::int32_t first, last;  // its free blocks, in Block::before order (-1: none)
    };
    struct Pool {
        std::vector<SizeClass> classes;  // every size freed in this pool, by id (in order of appearance)
        // Open addressing, linear probing: slot -> class id + 1 (0: empty). At most half full.
        std::vector<std::int32_t> slots;
        int shift = 64;  // 64 - log2(slots.size())
        // The classes holding a free block, ascending by size: (size, id).
        std::vector<std::pair<bytes_t, std::int32_t>> nonempty;
        // The first entry of nonempty of at least `size` bytes: a linear scan, faster than a binary
        // search over the few classes (about 8) that hold a block at a time.
        std::vector<std::pair<bytes_t, std::int32_t>>::iterator lower(bytes_t size) {
            auto it = nonempty.begin();
            while (it != nonempty.end() && it->first < size) ++it;
            return it;
        }

        void clear() {
            classes.clear();
            std::fill(slots.begin(), slots.end(), 0);
            nonempty.clear();
        }
        // Fibonacci hashing: sizes are multiples of large powers of two.
        std::size_t slot_of(bytes_t size) const {
            return static_cast<std::size_t>((static_cast<std::uint64_t>(size) * 0x9E3779B97F4A7C15ull) >> shift);
        }
        // The id of the class of `size` bytes, made if there is none.
        std::int32_t class_of(bytes_t size) {
            if (2 * (classes.size() + 1) > slots.size()) grow();
            const std::size_t mask = slots.size() - 1;
            for (std::size_t i = slot_of(size);; i = (i + 1) & mask) {
                const std::int32_t id = slots[i] - 1;
                if (id < 0) {
                    classes.push_back(SizeClass{size, -1, -1});
                    slots[i] = static_cast<std::int32_t>(classes.size());
                    return slots[i] - 1;
                }
                if (classes[static_cast<std::size_t>(id)].size == size) return id;
            }
        }
        void grow() {
            const std::size_t n = std::max<std::size_t>(64, 2 * slots.size());
            slots.assign(n, 0);
            shift = 64 - std::countr_zero(n);
            for (std::size_t id = 0; id < classes.size(); ++id) {
                std::size_t i = slot_of(classes[id].size);
                while (slots[i] != 0) i = (i + 1) & (n - 1);
                slots[i] = static_cast<std::int32_t>(id + 1);
            }
        }
    };
    struct Where {
        std::int32_t block = -1;  // -1: not allocated
        bool small = false;
    };

    static std::size_t idx(std::int32_t b) { return static_cast<std::size_t>(b); }

    // round_up(bytes, round_bytes) without a 64-bit division (tens of cycles, once per request)
    // when round_bytes is a power of two, as PyTorch's 512 is.
    bytes_t round_to_block(bytes_t bytes) const {
        const bytes_t r = c_.round_bytes;
        return (r & (r - 1)) == 0 ? (bytes + r - 1) & ~(r - 1) : round_up(bytes, r);
    }

    std::int32_t new_block(bytes_t size, bytes_t offset, std::int64_t seg) {
        Block b;
        b.size = size, b.offset = offset, b.seg = seg;
        if (!spare_blocks_.empty()) {
            const std::int32_t i = spare_blocks_.back();
            spare_blocks_.pop_back();
            blocks_[idx(i)] = b;
            return i;
        }
        blocks_.push_back(b);
        return static_cast<std::int32_t>(blocks_.size() - 1);
    }

    // `into` takes over its next neighbour `gone` (both free, in one segment, out of the pools).
    void absorb(std::int32_t into, std::int32_t gone) {
        Block& a = blocks_[idx(into)];
        const Block& g = blocks_[idx(gone)];
        a.size += g.size;
        a.next = g.next;
        if (a.next >= 0) blocks_[idx(a.next)].prev = into;
        spare_blocks_.push_back(gone);
    }

    void add_free(bool small, std::int32_t b) {
        Pool& pool = pools_[small ? 0 : 1];
        Block& blk = blocks_[idx(b)];
        // A block freed at the size it had when last free keeps its class: no hash lookup.
        const std::int32_t c = blk.cls >= 0 && static_cast<std::size_t>(blk.cls) < pool.classes.size() &&
                                       pool.classes[static_cast<std::size_t>(blk.cls)].size == blk.size
                                   ? blk.cls
                                   : pool.class_of(blk.size);
        blk.cls = c;
        SizeClass& cls = pool.classes[static_cast<std::size_t>(c)];
        if (cls.first < 0) {
            // It holds a block now: into the nonempty list, in size order (sizes are unique in a pool).
            pool.nonempty.insert(pool.lower(blk.size), {blk.size, c});
            blk.free_prev = blk.free_next = -1;
            cls.first = cls.last = b;
            return;
        }
        // Walk in from both ends to the block that `b` goes after (-1: b goes first).
        std::int32_t from_front = cls.first, from_back = cls.last, after = -1;
        while (true) {
            if (blocks_[idx(from_back)].before(blk)) {
                after = from_back;
                break;
            }
            if (!blocks_[idx(from_front)].before(blk)) {
                after = blocks_[idx(from_front)].free_prev;
                break;
            }
            from_back = blocks_[idx(from_back)].free_prev;
            from_front = blocks_[idx(from_front)].free_next;
        }
        blk.free_prev = after;
        blk.free_next = after >= 0 ? blocks_[idx(after)].free_next : cls.first;
        (after >= 0 ? blocks_[idx(after)].free_next : cls.first) = b;
        (blk.free_next >= 0 ? blocks_[idx(blk.free_next)].free_prev : cls.last) = b;
    }

    // Takes free block `b` out of its class.
    void remove_free(bool small, std::int32_t b) {
        Pool& pool = pools_[small ? 0 : 1];
        const Block& blk = blocks_[idx(b)];
        SizeClass& cls = pool.classes[static_cast<std::size_t>(blk.cls)];
        (blk.free_prev >= 0 ? blocks_[idx(blk.free_prev)].free_next : cls.first) = blk.free_next;
        (blk.free_next >= 0 ? blocks_[idx(blk.free_next)].free_prev : cls.last) = blk.free_prev;
        if (cls.first < 0) pool.nonempty.erase(pool.lower(cls.size));
    }

    // Removes and returns the best-fitting free block of at least `size` bytes (-1: none).
    std::int32_t take_best_fit(bool small, bytes_t size) {
        Pool& pool = pools_[small ? 0 : 1];
        const auto it = pool.lower(size);  // the smallest class of at least `size` bytes that holds a block
        if (it == pool.nonempty.end()) return -1;
        const std::int32_t b = pool.classes[static_cast<std::size_t>(it->second)].last;
        remove_free(small, b);
        return b;
    }

    // PyTorch's release_cached_blocks: every free block that is a whole segment (no neighbour)
    // leaves its pool and the reserved bytes.
    void release_cached_segments() {
        for (const bool small : {true, false}) {
            Pool& pool = pools_[small ? 0 : 1];
            // Class by class in size order; a class leaves the list when its last block goes.
            for (std::size_t i = 0; i < pool.nonempty.size();) {
                const std::int32_t c = pool.nonempty[i].second;
                for (std::int32_t b = pool.classes[static_cast<std::size_t>(c)].first; b >= 0;) {
                    const Block& blk = blocks_[idx(b)];
                    const std::int32_t next_free = blk.free_next;
                    if (blk.prev < 0 && blk.next < 0) {
                        reserved_ -= blk.size;
                        ++released_;
                        remove_free(small, b);
                        spare_blocks_.push_back(b);
                    }
                    b = next_free;
                }
                if (i < pool.nonempty.size() && pool.nonempty[i].second == c) ++i;  // (else it left the list)
            }
        }
    }

    // Tensor ids are dense in timelines mst-plan writes; others fall back to a hash map.
    Where& where(std::int64_t tensor) {
        if (static_cast<std::uint64_t>(tensor) < dense_.size()) return dense_[static_cast<std::size_t>(tensor)];
        constexpr std::int64_t kDense = std::int64_t{1} << 24;  // ids below it are dense_'s, the rest sparse_'s
        if (static_cast<std::uint64_t>(tensor) == dense_.size() && tensor < kDense) return dense_.emplace_back();  // the next new id
        if (tensor >= 0 && tensor < kDense) {
            dense_.resize(static_cast<std::size_t>(tensor) + 1);  // capacity still grows geometrically; a snapshot copies only the size
            return dense_[static_cast<std::size_t>(tensor)];
        }
        return sparse_[tensor];
    }

    AllocatorConstants c_;
    std::vector<Block> blocks_;
    std::vector<std::int32_t> spare_blocks_;  // slots of blocks_ merged away, for reuse
    Pool pools_[2];                           // small, large
    std::int64_t segments_ = 0, released_ = 0;
    bytes_t capacity_ = std::numeric_limits<bytes_t>::max();
    std::vector<Where> dense_;
    std::unordered_map<std::int64_t, Where> sparse_;
    bytes_t allocated_ = 0, reserved_ = 0;
};

}  // namespace mst::detail
