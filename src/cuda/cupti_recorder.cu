// CuptiRecorder: CUPTI activity records (memory, pools, kernels) matched to op markers, with a
// fallback to the allocator's own log. Built with MST_HAVE_CUPTI=1 when the toolkit has
// libcupti (CMake: TARGET CUDA::cupti); otherwise every start() reports that and returns false.
// API notes: shared/reference/cupti-cuda13.md (records are 8-byte aligned in caller buffers;
// flush only after a device synchronisation; kernel records may carry zero timestamps).
#include "cupti_recorder.cuh"

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <deque>
#include <map>
#include <unordered_map>

#if MST_HAVE_CUPTI
#include <cupti.h>
#endif

namespace mst::cuda {

namespace {

std::uint64_t steady_ns() {
    return static_cast<std::uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count());
}

#if MST_HAVE_CUPTI
std::string cupti_error(CUptiResult r) {
    const char* s = nullptr;
    if (cuptiGetResultString(r, &s) != CUPTI_SUCCESS || s == nullptr) return "CUPTI error " + std::to_string(int(r));
    return s;
}

struct Kind {
    CUpti_ActivityKind kind;
    const char* name;
};
// EXTERNAL_CORRELATION records precede the API records they tag, so RUNTIME is on too.
constexpr Kind kKinds[] = {{CUPTI_ACTIVITY_KIND_MEMORY2, "MEMORY2"},
                           {CUPTI_ACTIVITY_KIND_MEMORY_POOL, "MEMORY_POOL"},
                           {CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL, "CONCURRENT_KERNEL"},
                           {CUPTI_ACTIVITY_KIND_RUNTIME, "RUNTIME"},
                           {CUPTI_ACTIVITY_KIND_EXTERNAL_CORRELATION, "EXTERNAL_CORRELATION"}};
constexpr CUpti_ExternalCorrelationKind kMarkerKind = CUPTI_EXTERNAL_CORRELATION_KIND_CUSTOM0;

void CUPTIAPI buffer_requested(std::uint8_t** buffer, std::size_t* size, std::size_t* max_records) {
    const std::size_t bytes = CuptiRecorder::instance().buffer_bytes();
    *buffer = static_cast<std::uint8_t*>(std::aligned_alloc(8, bytes));  // records are 8-byte aligned
    *size = *buffer ? bytes : 0;
    *max_records = 0;  // as many as fit
}

void CUPTIAPI buffer_completed(CUcontext, std::uint32_t, std::uint8_t* buffer, std::size_t, std::size_t valid_bytes) {
    if (!buffer) return;
    CuptiRecorder::instance().on_buffer(buffer, valid_bytes);
    std::free(buffer);
}
#endif

}  // namespace

CuptiRecorder& CuptiRecorder::instance() {
    // Never destroyed: CUPTI may hand back its last buffers while the process exits, after
    // static destructors have run.
    static CuptiRecorder* recorder = new CuptiRecorder();
    return *recorder;
}

MemInfo CuptiRecorder::read_mem_info() {
    MemInfo m;
    std::size_t free_bytes = 0, total_bytes = 0;
    const cudaError_t e = cudaMemGetInfo(&free_bytes, &total_bytes);
    if (e != cudaSuccess) {
        cudaGetLastError();
        m.error = std::string("cudaMemGetInfo: ") + cudaGetErrorName(e) + ": " + cudaGetErrorString(e);
        return m;
    }
    m.valid = true;
    m.free_bytes = static_cast<bytes_t>(free_bytes);
    m.total_bytes = static_cast<bytes_t>(total_bytes);
    return m;
}

bool CuptiRecorder::start(std::size_t buffer_bytes) {
    buffer_bytes_ = std::max<std::size_t>(64u << 10, (buffer_bytes + 7) / 8 * 8);
    if (active_) return true;
#if !MST_HAVE_CUPTI
    status_ = "CUPTI unavailable: this mst-plan was built without CUPTI; the timeline comes from the allocator's own log";
    mem_before_ = read_mem_info();
    return false;
#else
    auto unavailable = [this](const std::string& why) {
        status_ = "CUPTI unavailable: " + why + "; the timeline comes from the allocator's own log";
        mem_before_ = read_mem_info();
        return false;
    };
    CUptiResult r = CUPTI_SUCCESS;
    if (!callbacks_registered_) {  // once per process; start() after stop() only re-enables the kinds
        r = cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed);
        if (r != CUPTI_SUCCESS) return unavailable("cuptiActivityRegisterCallbacks: " + cupti_error(r));
        callbacks_registered_ = true;
    }
    std::size_t enabled = 0;
    for (const Kind& k : kKinds) {
        r = cuptiActivityEnable(k.kind);
        if (r != CUPTI_SUCCESS) {
            for (std::size_t i = 0; i < enabled; ++i) cuptiActivityDisable(kKinds[i].kind);
            return unavailable(std::string("cuptiActivityEnable(") + k.name + "): " + cupti_error(r));
        }
        ++enabled;
    }
    const cudaError_t e = cudaFree(nullptr);  // creates the context, with its records
    if (e != cudaSuccess) {
        cudaGetLastError();
        for (const Kind& k : kKinds) cuptiActivityDisable(k.kind);
        return unavailable(std::string("no CUDA context: ") + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
    }
    mem_before_ = read_mem_info();
    active_ = true;
    status_ = "CUPTI recording MEMORY2, MEMORY_POOL, CONCURRENT_KERNEL, RUNTIME, EXTERNAL_CORRELATION";
    return true;
#endif
}

std::uint64_t CuptiRecorder::now_ns() const {
#if MST_HAVE_CUPTI
    std::uint64_t t = 0;
    if (active_ && cuptiGetTimestamp(&t) == CUPTI_SUCCESS) return t;
#endif
    return steady_ns();
}

void CuptiRecorder::begin_op(const std::string& op, std::int32_t layer, Phase phase, std::int32_t micro_step) {
    if (marker_open_) end_op();
    markers_.push_back({op, layer, phase, micro_step, now_ns(), 0});
    marker_open_ = true;
#if MST_HAVE_CUPTI
    if (active_) cuptiActivityPushExternalCorrelationId(kMarkerKind, static_cast<std::uint64_t>(markers_.size()));
#endif
}

void CuptiRecorder::end_op() {
    if (!marker_open_) return;
    markers_.back().end_ns = now_ns();
    marker_open_ = false;
#if MST_HAVE_CUPTI
    if (active_) cuptiActivityPopExternalCorrelationId(kMarkerKind, nullptr);
#endif
}

void CuptiRecorder::flush() {
#if MST_HAVE_CUPTI
    if (!active_) return;
    cudaDeviceSynchronize();  // FlushAll hands back only completed records; it does not wait for the GPU
    cuptiActivityFlushAll(0);
#endif
}

void CuptiRecorder::stop() {
    end_op();
#if MST_HAVE_CUPTI
    if (active_) {
        cudaDeviceSynchronize();
        cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
        for (const Kind& k : kKinds) cuptiActivityDisable(k.kind);
        active_ = false;
    }
#endif
    mem_after_ = read_mem_info();
}

void CuptiRecorder::clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    memory_.clear();
    pools_.clear();
    kernels_.clear();
    external_.clear();
    dropped_ = 0;
    markers_.clear();
    marker_open_ = false;
}

std::vector<MemoryRecord> CuptiRecorder::memory() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return memory_;
}
std::vector<PoolRecord> CuptiRecorder::pools() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return pools_;
}
std::vector<KernelRecord> CuptiRecorder::kernels() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return kernels_;
}
std::uint64_t CuptiRecorder::dropped_records() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return dropped_;
}

void CuptiRecorder::on_buffer(std::uint8_t* buffer, std::size_t valid_bytes) {
#if MST_HAVE_CUPTI
    std::lock_guard<std::mutex> lock(mutex_);
    CUpti_Activity* rec = nullptr;
    // CUPTI_ERROR_MAX_LIMIT_REACHED ends the buffer; CUPTI_ERROR_INVALID_KIND an incomplete record
    while (cuptiActivityGetNextRecord(buffer, valid_bytes, &rec) == CUPTI_SUCCESS) {
        switch (rec->kind) {
        case CUPTI_ACTIVITY_KIND_MEMORY2: {
            const auto* m = reinterpret_cast<const CUpti_ActivityMemory4*>(rec);
            if (m->memoryOperationType != CUPTI_ACTIVITY_MEMORY_OPERATION_TYPE_ALLOCATION &&
                m->memoryOperationType != CUPTI_ACTIVITY_MEMORY_OPERATION_TYPE_RELEASE)
                break;
            MemoryRecord r;
            r.allocation = m->memoryOperationType == CUPTI_ACTIVITY_MEMORY_OPERATION_TYPE_ALLOCATION;
            r.address = m->address;
            r.bytes = m->bytes;
            r.timestamp_ns = m->timestamp;
            r.correlation_id = m->correlationId;
            r.stream_id = m->streamId;
            r.is_async = m->isAsync != 0;
            r.memory_kind = static_cast<int>(m->memoryKind);
            memory_.push_back(r);
            break;
        }
        case CUPTI_ACTIVITY_KIND_MEMORY_POOL: {
            const auto* p = reinterpret_cast<const CUpti_ActivityMemoryPool3*>(rec);
            pools_.push_back({static_cast<int>(p->memoryPoolOperationType), p->address, p->size, p->utilizedSize,
                              p->timestamp});
            break;
        }
        case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: {
            const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(rec);
            if (k->start == 0 || k->end == 0) break;  // CUPTI lacked device memory for the timestamps
            kernels_.push_back({k->name ? k->name : "?", k->start, k->end, k->correlationId, k->streamId});
            break;
        }
        case CUPTI_ACTIVITY_KIND_EXTERNAL_CORRELATION: {
            const auto* x = reinterpret_cast<const CUpti_ActivityExternalCorrelation*>(rec);
            if (x->externalKind == kMarkerKind) external_.emplace_back(x->correlationId, x->externalId);
            break;
        }
        default:
            break;  // RUNTIME records only carry the correlation above
        }
    }
    std::size_t dropped = 0;
    if (cuptiActivityGetNumDroppedRecords(nullptr, 0, &dropped) == CUPTI_SUCCESS) dropped_ += dropped;
#else
    (void)buffer;
    (void)valid_bytes;
#endif
}

MeasuredTimeline CuptiRecorder::measured_timeline(const DeviceAllocator& allocator, const std::string& model) const {
    MeasuredTimeline out;
    const Timeline& log = allocator.timeline();
    std::vector<MemoryRecord> records;
    std::vector<std::pair<std::uint32_t, std::uint64_t>> external;
    std::uint64_t dropped = 0;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        for (const MemoryRecord& r : memory_)
            if (r.memory_kind == 3) records.push_back(r);  // CUPTI_ACTIVITY_MEMORY_KIND_DEVICE
        external = external_;
        dropped = dropped_;
    }
    auto own_log = [&](const std::string& why) {
        out.timeline = log;
        out.timeline.model = model;
        out.from_cupti = false;
        out.note = why;
        return out;
    };
    if (allocator.mode() == DeviceAllocator::Mode::Caching) {
        std::int64_t allocs = 0;
        for (const MemoryRecord& r : records) allocs += r.allocation ? 1 : 0;
        return own_log("caching allocator: CUPTI saw " + std::to_string(allocs) + " segment allocations (the allocator "
                       "mapped " + std::to_string(allocator.stats().segment_maps) +
                       "), not tensors: timeline from the allocator's own log");
    }
    if (records.empty())
        return own_log((status_.rfind("CUPTI recording", 0) == 0 ? std::string("CUPTI delivered no memory records")
                                                                 : status_) +
                       ": timeline from the allocator's own log");

    // API-call order: the correlation ids of one thread's calls increase with the calls, whereas
    // a stream-ordered release may carry the stream's time rather than the call's (which would
    // put a free after the allocation that reuses its address). Timestamps order records only
    // when some record has no correlation id.
    const bool correlated = std::all_of(records.begin(), records.end(),
                                        [](const MemoryRecord& r) { return r.correlation_id != 0; });
    std::stable_sort(records.begin(), records.end(), [correlated](const MemoryRecord& a, const MemoryRecord& b) {
        return correlated ? a.correlation_id < b.correlation_id : a.timestamp_ns < b.timestamp_ns;
    });
    std::unordered_map<std::uint32_t, std::uint64_t> marker_of;  // correlation id -> marker index + 1
    for (const auto& [corr, ext] : external) marker_of[corr] = ext;
    // The marker of a record: CUPTI's correlation first, else the time range that holds it.
    auto marker_for = [&](const MemoryRecord& r) -> const OpMarker* {
        const auto it = marker_of.find(r.correlation_id);
        if (it != marker_of.end() && it->second >= 1 && it->second <= markers_.size()) return &markers_[it->second - 1];
        for (auto m = markers_.rbegin(); m != markers_.rend(); ++m)
            if (m->begin_ns <= r.timestamp_ns && (m->end_ns == 0 || r.timestamp_ns < m->end_ns)) return &*m;
        return nullptr;
    };
    // The allocator's allocations at each address, in order: CUPTI's i-th allocation at an address
    // is the allocator's i-th there (exact mode: one device allocation per tensor).
    // Frees likewise (their op context is the fallback when no marker holds a release).
    std::map<std::uint64_t, std::deque<std::size_t>> log_allocs, log_frees;
    for (std::size_t i = 0; i < log.events.size(); ++i)
        (log.events[i].alloc ? log_allocs : log_frees)[allocator.records()[i].address].push_back(i);

    struct LiveTensor {
        std::int64_t id;
        bytes_t bytes;
        std::string name;
        Category category;
    };
    std::unordered_map<std::uint64_t, LiveTensor> live;
    Timeline& t = out.timeline;
    t.source = "cuda";
    t.model = model;
    std::int64_t next_id = 0, unknown_releases = 0;
    for (const MemoryRecord& r : records) {
        const OpMarker* marker = marker_for(r);
        Event e;
        e.alloc = r.allocation;
        e.device = Device::Gpu;
        const Event* tagged = nullptr;
        if (r.allocation) {
            auto q = log_allocs.find(r.address);
            if (q != log_allocs.end() && !q->second.empty()) {
                tagged = &log.events[q->second.front()];
                q->second.pop_front();
            }
            LiveTensor lt{next_id++, static_cast<bytes_t>(r.bytes), tagged ? tagged->name : "cuda-internal",
                          tagged ? tagged->category : Category::Workspace};
            if (!tagged) ++out.unmatched_records;
            else if (tagged->bytes != lt.bytes) ++out.size_mismatches;
            e.tensor = lt.id;
            e.bytes = lt.bytes;
            e.name = lt.name;
            e.category = lt.category;
            live[r.address] = lt;
        } else {
            const auto it = live.find(r.address);
            if (it == live.end()) {  // allocated before recording started
                ++unknown_releases;
                continue;
            }
            auto q = log_frees.find(r.address);
            if (q != log_frees.end() && !q->second.empty()) {
                tagged = &log.events[q->second.front()];
                q->second.pop_front();
            }
            e.tensor = it->second.id;
            e.bytes = it->second.bytes;
            e.name = it->second.name;
            e.category = it->second.category;
            live.erase(it);
        }
        if (marker) {
            e.op = marker->op, e.layer = marker->layer, e.phase = marker->phase, e.micro_step = marker->micro_step;
        } else if (tagged) {
            e.op = tagged->op, e.layer = tagged->layer, e.phase = tagged->phase, e.micro_step = tagged->micro_step;
        } else {
            e.op = "unattributed", e.layer = -1, e.phase = Phase::Init;
        }
        t.events.push_back(std::move(e));
    }
    out.from_cupti = true;
    out.note = "CUPTI MEMORY2: " + std::to_string(t.events.size()) + " events, " +
               std::to_string(out.unmatched_records) + " allocations the allocator did not make, " +
               std::to_string(out.size_mismatches) + " size mismatches, " + std::to_string(unknown_releases) +
               " releases of earlier allocations, " + std::to_string(dropped) + " dropped records";
    return out;
}

}  // namespace mst::cuda
