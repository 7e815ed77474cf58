// An emulated CUDA driver (libcuda.so) on the CPU: the subset of the driver API that cudarc and
// motley's CUDA backend call, with device memory in host memory and every kernel launch run by
// the kernel emulator (emu.cpp). With the emulated NVRTC and cuBLAS(Lt) beside it, the backend's
// Rust code runs unchanged without a GPU (tests/cuda_parity.rs), so the launch code, argument
// order, buffer sizes, streams and events are checked before a GPU session.
//
// Stricter than a GPU where it is cheap to be:
// - fresh device memory is 0xff bytes (NaN in f32 and bf16, an absurd index), so reading memory
//   nothing wrote shows; a freed allocation is poisoned the same way and kept until no queued
//   copy can still read it;
// - every allocation sits between guards, checked at its free and at stream synchronisation:
//   a kernel writing past a buffer stops the device (a sticky error, as a GPU fault);
// - copies and cuBLAS operands must lie inside one live allocation;
// - the compute stream (the null stream) runs each operation when it is queued, while a created
//   stream (MEMO's copy stream, NCCL's sums) runs its operations as late as the API allows: at a
//   wait on one of its events, a synchronisation or the stream's destruction, by the rank
//   (thread) that created it. A copy the backend forgot to
//   order therefore reads freed (poisoned) memory or lands after its reader: a wrong result.
// What it does not check: the hardware's timing, memory limits, or cross-stream races on
// anything but the copy stream and NCCL's sums (nccl.cpp).
#include <dlfcn.h>

#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "../tensor_map.h"
#include "device.h"

namespace {

// ---- results ------------------------------------------------------------------------------------

enum : int {
    SUCCESS = 0,
    INVALID_VALUE = 1,
    NOT_INITIALIZED = 3,
    INVALID_DEVICE = 101,
    INVALID_IMAGE = 200,
    INVALID_HANDLE = 400,
    NOT_FOUND = 500,
    NOT_READY = 600,
    ILLEGAL_ADDRESS = 700,
    LAUNCH_FAILED = 719,
};

std::recursive_mutex mu;  // every piece of state below
int sticky = SUCCESS;     // a device fault: every later call fails with it, as on a GPU

std::string format(const char* fmt, va_list ap) {
    char buf[1024];
    vsnprintf(buf, sizeof buf, fmt, ap);
    return buf;
}

// Reports why a call fails (CUresult alone says little) and returns `code`.
int fail(int code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
int fail(int code, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "emulated CUDA driver: %s\n", format(fmt, ap).c_str());
    va_end(ap);
    return code;
}

// A device fault: reported, and sticky.
int fault(const std::string& what) {
    fail(ILLEGAL_ADDRESS, "%s (the device is now unusable, as after a fault on a GPU)", what.c_str());
    sticky = ILLEGAL_ADDRESS;
    return ILLEGAL_ADDRESS;
}

// ---- memory -------------------------------------------------------------------------------------

constexpr size_t GUARD = 256;  // also the alignment of an allocation, as cudaMalloc's
constexpr unsigned char POISON = 0xff;
constexpr unsigned char CANARY = 0xa5;

struct Allocation {
    unsigned char* mem;  // GUARD bytes, the allocation, GUARD bytes and padding
    size_t bytes;
    bool device;  // device memory, or page-locked host memory
};
std::map<uintptr_t, Allocation> live;  // by start address
std::vector<Allocation> quarantine;    // freed device memory a queued copy may still read
size_t used = 0, high = 0;              // device bytes in use, and the most so far

unsigned char* start(const Allocation& a) { return a.mem + GUARD; }

Allocation allocate(size_t bytes, bool device) {
    size_t total = (bytes + 2 * GUARD + GUARD - 1) / GUARD * GUARD;
    auto* mem = static_cast<unsigned char*>(aligned_alloc(GUARD, total));
    if (!mem) abort();
    memset(mem, CANARY, GUARD);
    memset(mem + GUARD, device ? POISON : 0, bytes);
    memset(mem + GUARD + bytes, CANARY, total - GUARD - bytes);
    return Allocation{mem, bytes, device};
}

// Empty when the guards around `a` are intact.
std::string check_guards(const Allocation& a) {
    size_t total = (a.bytes + 2 * GUARD + GUARD - 1) / GUARD * GUARD;
    for (size_t i = 0; i < GUARD; i++)
        if (a.mem[i] != CANARY) return strprintf("a write %zu bytes before", GUARD - i);
    for (size_t i = GUARD + a.bytes; i < total; i++)
        if (a.mem[i] != CANARY) return strprintf("a write %zu bytes past the end of", i - GUARD - a.bytes);
    return "";
}

int check_all_guards() {
    for (auto& [at, a] : live) {
        std::string e = check_guards(a);
        if (!e.empty()) return fault(e + strprintf(" the %zu-byte allocation at %#lx", a.bytes, (unsigned long)at));
    }
    return SUCCESS;
}

// The live allocation holding [p, p + bytes), or null.
const Allocation* find(uintptr_t p, size_t bytes) {
    auto it = live.upper_bound(p);
    if (it == live.begin()) return nullptr;
    --it;
    return p + bytes <= it->first + it->second.bytes ? &it->second : nullptr;
}

// ---- streams and events -------------------------------------------------------------------------

struct Event;

struct Stream {
    bool deferred;  // a created stream: runs its work as late as allowed
    std::deque<std::function<void()>> queue;
    uint64_t queued = 0, done = 0;
    uint64_t compute_waited = 0;  // how many of the null-stream operations it has waited for
    std::thread::id owner = std::this_thread::get_id();  // the rank (thread) that created it
};
Stream null_stream{false};
// The null-stream operations this thread queued: each emulated GPU's ranks are threads sharing
// the null stream, whose own work is queued from its thread.
thread_local uint64_t compute_ops = 0;
std::set<Stream*> streams;

struct Event {
    Stream* stream = nullptr;  // where it was recorded; null: never recorded
    uint64_t seq = 0;          // complete once stream->done reaches it
    uint64_t compute_ops = 0;  // recorded on the null stream: this thread's operations before
    double ms = 0;             // host time when it completed
};
std::set<Event*> events;

double now_ms() {
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

Stream* stream_of(void* s) {
    if (!s) return &null_stream;
    auto* st = static_cast<Stream*>(s);
    return streams.count(st) ? st : nullptr;
}

// Runs `s`'s queued work up to (and including) operation number `upto`.
void run_until(Stream* s, uint64_t upto) {
    while (s->done < upto && !s->queue.empty()) {
        auto op = std::move(s->queue.front());
        s->queue.pop_front();
        op();
        s->done++;
    }
}

void release_quarantine() {
    for (Stream* s : streams)
        if (!s->queue.empty()) return;
    for (Allocation& a : quarantine) free(a.mem);
    quarantine.clear();
}

// Runs the calling thread's streams (a rank's own: another rank's work runs when that rank
// asks, so one rank's synchronisation cannot hide another's missing wait).
void run_all() {
    for (Stream* s : streams)
        if (s->owner == std::this_thread::get_id()) run_until(s, s->queued);
    release_quarantine();
}

// Queues `op` on `s`: now on the null stream, later on a created one.
void enqueue(Stream* s, std::function<void()> op) {
    if (!s->deferred) {
        op();
        compute_ops++;
        return;
    }
    s->queue.push_back(std::move(op));
    s->queued++;
}

// ---- modules: the emulated NVRTC's "PTX" names a kernel file and a storage ----------------------

struct KernelLib {
    void* handle = nullptr;
    int (*launch)(const char*, const unsigned*, const unsigned*, size_t, size_t, void* const*, const size_t*, int) = nullptr;
    const char* (*last_error)() = nullptr;
    long (*params)(const char*, size_t*, size_t) = nullptr;
};
KernelLib libs[2];  // f32, bf16 storage

struct Module {
    KernelLib* lib;
    std::string file;
};
struct Function {
    KernelLib* lib;
    std::string name;
    std::vector<size_t> sizes;
    int max_dynamic_smem = 48 << 10;  // CUDA's default before cuFuncSetAttribute
};
std::set<Module*> modules;
std::set<Function*> functions;

constexpr int MAX_SMEM_OPTIN = 232448;  // H100's per-block opt-in limit

int load_lib(KernelLib& lib, const char* env) {
    if (lib.handle) return SUCCESS;
    const char* path = getenv(env);
    if (!path) return fail(INVALID_IMAGE, "%s is not set: the test harness names the kernel emulator library there", env);
    lib.handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!lib.handle) return fail(INVALID_IMAGE, "%s", dlerror());
    lib.launch = reinterpret_cast<decltype(lib.launch)>(dlsym(lib.handle, "emu_launch"));
    lib.last_error = reinterpret_cast<decltype(lib.last_error)>(dlsym(lib.handle, "emu_last_error"));
    lib.params = reinterpret_cast<decltype(lib.params)>(dlsym(lib.handle, "emu_kernel_params"));
    if (!lib.launch || !lib.last_error || !lib.params) return fail(INVALID_IMAGE, "%s lacks the emulator's C ABI", path);
    return SUCCESS;
}

}  // namespace

// ---- helpers for the emulated cuBLAS (device.h) --------------------------------------------------

std::string strprintf(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::string s = format(fmt, ap);
    va_end(ap);
    return s;
}

EXPORT bool motley_emu_in_allocation(const void* p, size_t bytes) {
    std::lock_guard<std::recursive_mutex> g(mu);
    const Allocation* a = find(reinterpret_cast<uintptr_t>(p), bytes);
    return a && a->device;
}

EXPORT bool motley_emu_after_compute(void* stream) {
    std::lock_guard<std::recursive_mutex> g(mu);
    Stream* s = stream_of(stream);
    return s && (!s->deferred || s->compute_waited == compute_ops);
}

EXPORT void motley_emu_enqueue(void* stream, void (*op)(void*), void* data) {
    std::lock_guard<std::recursive_mutex> g(mu);
    Stream* s = stream_of(stream);
    if (!s) abort();
    enqueue(s, [op, data] { op(data); });
}

EXPORT void motley_emu_report(const char* what) { fail(0, "%s", what); }

// ---- the driver API ------------------------------------------------------------------------------

#define GUARDED                                  \
    std::lock_guard<std::recursive_mutex> g(mu); \
    if (sticky) return sticky

extern "C" {

EXPORT int cuInit(unsigned) { return SUCCESS; }
EXPORT int cuGetErrorString(int code, const char** s) {
    static const std::map<int, const char*> text = {
        {SUCCESS, "no error"}, {INVALID_VALUE, "invalid argument"}, {NOT_INITIALIZED, "initialization error"},
        {INVALID_DEVICE, "invalid device ordinal"}, {INVALID_IMAGE, "device kernel image is invalid"},
        {INVALID_HANDLE, "invalid resource handle"}, {NOT_FOUND, "named symbol not found"}, {NOT_READY, "device not ready"},
        {ILLEGAL_ADDRESS, "an illegal memory access was encountered"}, {LAUNCH_FAILED, "unspecified launch failure"}};
    auto it = text.find(code);
    *s = it == text.end() ? "unknown error" : it->second;
    return it == text.end() ? INVALID_VALUE : SUCCESS;
}
EXPORT int cuGetErrorName(int code, const char** s) { return cuGetErrorString(code, s); }

// MOTLEY_EMU_DEVICE_COUNT devices (default 1), all one CPU's memory: ranks on threads each open
// their own, as MPI ranks open their node's GPUs.
int device_count() {
    const char* v = getenv("MOTLEY_EMU_DEVICE_COUNT");
    return v ? atoi(v) : 1;
}
EXPORT int cuDeviceGetCount(int* n) {
    *n = device_count();
    return SUCCESS;
}
EXPORT int cuDeviceGet(int* dev, int ordinal) {
    if (ordinal < 0 || ordinal >= device_count()) return fail(INVALID_DEVICE, "device %d: the emulator has %d (MOTLEY_EMU_DEVICE_COUNT)", ordinal, device_count());
    *dev = ordinal;
    return SUCCESS;
}
// Unique per device: what NCCL's users tell GPUs apart by.
EXPORT int cuDeviceGetUuid_v2(unsigned char* uuid, int dev) {
    memset(uuid, 0, 16);
    snprintf(reinterpret_cast<char*>(uuid), 16, "motley-emu-%d", dev);
    return SUCCESS;
}
EXPORT int cuDeviceGetName(char* name, int len, int) {
    snprintf(name, len, "motley CPU emulator of an sm_90a GPU");
    return SUCCESS;
}
EXPORT int cuDeviceGetAttribute(int* v, int attr, int) {
    switch (attr) {
        case 16: *v = 4; return SUCCESS;                // multiprocessors: a persistent grid loops
        case 75: *v = 9; return SUCCESS;                // compute capability major
        case 76: *v = 0; return SUCCESS;                // minor
        case 97: *v = MAX_SMEM_OPTIN; return SUCCESS;   // shared memory per block, opt-in
        case 115: *v = 1; return SUCCESS;               // memory pools supported
        default: return fail(INVALID_VALUE, "device attribute %d is not emulated", attr);
    }
}

// One primary context; its handle is any non-null pointer.
int primary;
EXPORT int cuDevicePrimaryCtxRetain(void** ctx, int) {
    *ctx = &primary;
    return SUCCESS;
}
EXPORT int cuDevicePrimaryCtxRelease_v2(int) { return SUCCESS; }
thread_local void* current;
EXPORT int cuCtxSetCurrent(void* ctx) {
    current = ctx;
    return SUCCESS;
}
EXPORT int cuCtxGetCurrent(void** ctx) {
    *ctx = current;
    return SUCCESS;
}

// ---- memory ----

EXPORT int cuDeviceGetDefaultMemPool(void** pool, int) {
    *pool = &primary;
    return SUCCESS;
}
EXPORT int cuDeviceGetMemPool(void** pool, int d) { return cuDeviceGetDefaultMemPool(pool, d); }
EXPORT int cuMemPoolSetAttribute(void*, int attr, void* v) {
    GUARDED;
    switch (attr) {
        case 4: return SUCCESS;  // release threshold: nothing is returned to a system here
        case 8:                  // reset the high-water mark (only to 0 is allowed)
            if (*static_cast<uint64_t*>(v) != 0) return fail(INVALID_VALUE, "USED_MEM_HIGH can only be reset to 0");
            high = used;
            return SUCCESS;
        default: return fail(INVALID_VALUE, "memory pool attribute %d is not emulated", attr);
    }
}
EXPORT int cuMemPoolGetAttribute(void*, int attr, void* v) {
    GUARDED;
    switch (attr) {
        case 5: *static_cast<uint64_t*>(v) = used; return SUCCESS;  // held: nothing is kept past a free
        case 8: *static_cast<uint64_t*>(v) = high; return SUCCESS;  // the most used since a reset
        default: return fail(INVALID_VALUE, "memory pool attribute %d is not emulated", attr);
    }
}

// ---- tensor maps (tensor_map.h) ----

// cuTensorMapEncodeTiled for what the kernels use: rank 2 or 3, bf16 (9) or f32 (7) elements,
// element strides 1, no interleave, no swizzle or the 128-byte one, zeros out of bounds.
EXPORT int cuTensorMapEncodeTiled(void* map, int type, uint32_t rank, void* global, const uint64_t* dims, const uint64_t* strides, const uint32_t* box,
                                  const uint32_t* element_strides, int interleave, int swizzle, int, int oob_fill) {
    GUARDED;
    const uint32_t elem = type == 9 ? 2 : type == 7 ? 4 : 0;
    if (elem == 0) return fail(INVALID_VALUE, "cuTensorMapEncodeTiled: data type %d is not emulated (bf16 or f32)", type);
    for (uint32_t d = 0; d < rank && d < 3; d++)
        if (element_strides[d] != 1) return fail(INVALID_VALUE, "cuTensorMapEncodeTiled: only element strides of 1 are emulated");
    if (interleave != 0 || oob_fill != 0) return fail(INVALID_VALUE, "cuTensorMapEncodeTiled: only no interleave and zero fill are emulated");
    const char* why = emu_tma::encode(map, rank, elem, global, dims, strides, box, (uint32_t)swizzle);
    if (*why) return fail(INVALID_VALUE, "cuTensorMapEncodeTiled: %s", why);
    return SUCCESS;
}

// The emulated device's memory: MOTLEY_EMU_DEVICE_BYTES, or an H100's 80 GiB. Allocations are
// not refused past it (the host backs them); cuMemGetInfo reports what is left of it.
size_t capacity() {
    static const size_t bytes = [] {
        const char* v = getenv("MOTLEY_EMU_DEVICE_BYTES");
        return v ? strtoull(v, nullptr, 10) : size_t(80) << 30;
    }();
    return bytes;
}
EXPORT int cuMemGetInfo_v2(size_t* free, size_t* total) {
    GUARDED;
    *total = capacity();
    *free = used < *total ? *total - used : 0;
    return SUCCESS;
}

int alloc_device(uint64_t* dptr, size_t bytes) {
    Allocation a = allocate(bytes, true);
    *dptr = reinterpret_cast<uintptr_t>(start(a));
    live[*dptr] = a;
    used += bytes;
    high = high > used ? high : used;
    return SUCCESS;
}
int free_device(uint64_t dptr) {
    auto it = live.find(dptr);
    if (it == live.end() || !it->second.device) return fail(INVALID_VALUE, "free of %#lx, which is not a live device allocation", (unsigned long)dptr);
    Allocation a = it->second;
    live.erase(it);
    used -= a.bytes;
    std::string e = check_guards(a);
    if (!e.empty()) return fault(e + strprintf(" the %zu-byte allocation at %#lx, found at its free", a.bytes, (unsigned long)dptr));
    memset(start(a), POISON, a.bytes);
    quarantine.push_back(a);
    release_quarantine();
    return SUCCESS;
}
// Stream-ordered: the allocation exists from now on (the null stream has run everything queued
// before), and a free on a created stream happens in its order.
EXPORT int cuMemAllocAsync(uint64_t* dptr, size_t bytes, void* stream) {
    GUARDED;
    if (!stream_of(stream)) return fail(INVALID_HANDLE, "cuMemAllocAsync on an unknown stream");
    return alloc_device(dptr, bytes);
}
EXPORT int cuMemFreeAsync(uint64_t dptr, void* stream) {
    GUARDED;
    Stream* s = stream_of(stream);
    if (!s) return fail(INVALID_HANDLE, "cuMemFreeAsync on an unknown stream");
    if (!s->deferred) return free_device(dptr);
    enqueue(s, [dptr] { free_device(dptr); });
    return SUCCESS;
}
EXPORT int cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    GUARDED;
    Allocation a = allocate(bytes, false);
    *p = start(a);
    live[reinterpret_cast<uintptr_t>(*p)] = a;
    return SUCCESS;
}
EXPORT int cuMemFreeHost(void* p) {
    GUARDED;
    run_all();  // a queued copy may still touch it
    auto it = live.find(reinterpret_cast<uintptr_t>(p));
    if (it == live.end() || it->second.device) return fail(INVALID_VALUE, "cuMemFreeHost of %p, which is not page-locked memory", p);
    free(it->second.mem);
    live.erase(it);
    return SUCCESS;
}

// Checks that [p, p + bytes) lies in one live device allocation.
int device_range(uint64_t p, size_t bytes, const char* what) {
    const Allocation* a = find(p, bytes);
    if (!a || !a->device) return fault(strprintf("%s: %zu bytes at %#lx are not inside one live device allocation", what, bytes, (unsigned long)p));
    return SUCCESS;
}
bool pinned(const void* p, size_t bytes) {
    const Allocation* a = find(reinterpret_cast<uintptr_t>(p), bytes);
    return a && !a->device;
}

// A copy on `s` between device memory and the host range [host, host + bytes). A created stream
// reads or writes page-locked memory when it runs the copy; pageable memory is staged as the
// driver does: read at the call, or, for a device-to-host copy, the call waits for the stream.
EXPORT int cuMemcpyHtoDAsync_v2(uint64_t dst, const void* src, size_t bytes, void* stream) {
    GUARDED;
    Stream* s = stream_of(stream);
    if (!s) return fail(INVALID_HANDLE, "host-to-device copy on an unknown stream");
    if (int e = device_range(dst, bytes, "host-to-device copy")) return e;
    if (pinned(src, bytes)) {
        enqueue(s, [=] {
            if (device_range(dst, bytes, "host-to-device copy (when it ran)") == SUCCESS) memcpy(reinterpret_cast<void*>(dst), src, bytes);
        });
    } else {
        auto staged = std::make_shared<std::vector<unsigned char>>(static_cast<const unsigned char*>(src), static_cast<const unsigned char*>(src) + bytes);
        enqueue(s, [=] {
            if (device_range(dst, bytes, "host-to-device copy (when it ran)") == SUCCESS) memcpy(reinterpret_cast<void*>(dst), staged->data(), bytes);
        });
    }
    return sticky;
}
EXPORT int cuMemcpyDtoHAsync_v2(void* dst, uint64_t src, size_t bytes, void* stream) {
    GUARDED;
    Stream* s = stream_of(stream);
    if (!s) return fail(INVALID_HANDLE, "device-to-host copy on an unknown stream");
    if (int e = device_range(src, bytes, "device-to-host copy")) return e;
    auto copy = [=] {
        if (device_range(src, bytes, "device-to-host copy (when it ran)") == SUCCESS) memcpy(dst, reinterpret_cast<const void*>(src), bytes);
    };
    if (pinned(dst, bytes)) {
        enqueue(s, copy);
    } else {
        run_until(s, s->queued);
        copy();
    }
    return sticky;
}
EXPORT int cuMemcpyDtoDAsync_v2(uint64_t dst, uint64_t src, size_t bytes, void* stream) {
    GUARDED;
    Stream* s = stream_of(stream);
    if (!s) return fail(INVALID_HANDLE, "device-to-device copy on an unknown stream");
    if (int e = device_range(dst, bytes, "device-to-device copy destination")) return e;
    if (int e = device_range(src, bytes, "device-to-device copy source")) return e;
    enqueue(s, [=] {
        if (device_range(src, bytes, "device-to-device copy (when it ran)") == SUCCESS)
            memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes);
    });
    return sticky;
}
EXPORT int cuMemsetD8Async(uint64_t dst, unsigned char value, size_t n, void* stream) {
    GUARDED;
    Stream* s = stream_of(stream);
    if (!s) return fail(INVALID_HANDLE, "memset on an unknown stream");
    if (int e = device_range(dst, n, "memset")) return e;
    enqueue(s, [=] { memset(reinterpret_cast<void*>(dst), value, n); });
    return sticky;
}

// ---- streams and events ----

EXPORT int cuStreamCreate(void** stream, unsigned flags) {
    GUARDED;
    if (flags != 1) return fail(INVALID_VALUE, "stream flags %u: the backend's streams must be non-blocking (1), or they serialise with the null stream", flags);
    auto* s = new Stream{true};
    streams.insert(s);
    *stream = s;
    return SUCCESS;
}
EXPORT int cuStreamDestroy_v2(void* stream) {
    GUARDED;
    Stream* s = stream_of(stream);
    if (!s || s == &null_stream) return fail(INVALID_HANDLE, "cuStreamDestroy of an unknown stream");
    run_until(s, s->queued);  // the work still completes
    for (Event* e : events)
        if (e->stream == s) e->stream = nullptr, e->seq = 0;
    streams.erase(s);
    delete s;
    release_quarantine();
    return SUCCESS;
}
EXPORT int cuStreamSynchronize(void* stream) {
    GUARDED;
    Stream* s = stream_of(stream);
    if (!s) return fail(INVALID_HANDLE, "cuStreamSynchronize of an unknown stream");
    run_until(s, s->queued);
    release_quarantine();
    return check_all_guards();
}
EXPORT int cuEventCreate(void** event, unsigned) {
    GUARDED;
    auto* e = new Event;
    events.insert(e);
    *event = e;
    return SUCCESS;
}
EXPORT int cuEventDestroy_v2(void* event) {
    GUARDED;
    auto* e = static_cast<Event*>(event);
    if (!events.erase(e)) return fail(INVALID_HANDLE, "cuEventDestroy of an unknown event");
    delete e;
    return SUCCESS;
}
EXPORT int cuEventRecord(void* event, void* stream) {
    GUARDED;
    auto* e = static_cast<Event*>(event);
    Stream* s = stream_of(stream);
    if (!events.count(e) || !s) return fail(INVALID_HANDLE, "cuEventRecord of an unknown event or on an unknown stream");
    e->stream = s;
    if (!s->deferred) {
        e->compute_ops = compute_ops;
        e->seq = 0;
        e->ms = now_ms();
        return SUCCESS;
    }
    e->seq = s->queued + 1;
    enqueue(s, [e] {
        if (events.count(e)) e->ms = now_ms();
    });
    return SUCCESS;
}
// Whether `e`'s work is done (an event never recorded counts as done, as in CUDA).
bool complete(Event* e) { return !e->stream || e->stream->done >= e->seq; }
EXPORT int cuEventSynchronize(void* event) {
    GUARDED;
    auto* e = static_cast<Event*>(event);
    if (!events.count(e)) return fail(INVALID_HANDLE, "cuEventSynchronize of an unknown event");
    if (e->stream) run_until(e->stream, e->seq);
    return SUCCESS;
}
EXPORT int cuStreamWaitEvent(void* stream, void* event, unsigned) {
    GUARDED;
    Stream* s = stream_of(stream);
    auto* e = static_cast<Event*>(event);
    if (!s || !events.count(e)) return fail(INVALID_HANDLE, "cuStreamWaitEvent with an unknown stream or event");
    if (e->stream == &null_stream) s->compute_waited = std::max(s->compute_waited, e->compute_ops);
    if (complete(e)) return SUCCESS;
    Stream* other = e->stream;
    uint64_t seq = e->seq;
    if (!s->deferred) run_until(other, seq);
    else enqueue(s, [other, seq] {
        if (streams.count(other)) run_until(other, seq);
    });
    return SUCCESS;
}
EXPORT int cuEventElapsedTime(float* ms, void* start_event, void* end_event) {
    GUARDED;
    auto *a = static_cast<Event*>(start_event), *b = static_cast<Event*>(end_event);
    if (!events.count(a) || !events.count(b)) return fail(INVALID_HANDLE, "cuEventElapsedTime of an unknown event");
    if (!complete(a) || !complete(b)) return NOT_READY;
    *ms = float(b->ms - a->ms);
    return SUCCESS;
}
EXPORT int cuEventElapsedTime_v2(float* ms, void* a, void* b) { return cuEventElapsedTime(ms, a, b); }

// ---- modules and launches ----

EXPORT int cuModuleLoadData(void** module, const void* image) {
    GUARDED;
    const char* text = static_cast<const char*>(image);
    char file[64], storage[8];
    if (sscanf(text, MOTLEY_EMU_PTX_FORMAT, file, storage) != 2)
        return fail(INVALID_IMAGE, "the module is not the emulated NVRTC's output (real PTX from a cache? the test sets MOTLEY_PTX_CACHE to a folder of its own)");
    bool bf16 = !strcmp(storage, "bf16");
    if (!bf16 && strcmp(storage, "f32")) return fail(INVALID_IMAGE, "module storage `%s`", storage);
    KernelLib& lib = libs[bf16];
    if (int e = load_lib(lib, bf16 ? "MOTLEY_EMU_KERNELS_BF16" : "MOTLEY_EMU_KERNELS_F32")) return e;
    auto* m = new Module{&lib, file};
    modules.insert(m);
    *module = m;
    return SUCCESS;
}
EXPORT int cuModuleUnload(void* module) {
    GUARDED;
    auto* m = static_cast<Module*>(module);
    if (!modules.erase(m)) return fail(INVALID_HANDLE, "cuModuleUnload of an unknown module");
    delete m;
    return SUCCESS;
}
EXPORT int cuModuleGetFunction(void** function, void* module, const char* name) {
    GUARDED;
    auto* m = static_cast<Module*>(module);
    if (!modules.count(m)) return fail(INVALID_HANDLE, "cuModuleGetFunction on an unknown module");
    size_t sizes[64];
    long n = m->lib->params(name, sizes, 64);
    if (n < 0) return fail(NOT_FOUND, "no kernel `%s` in %s.cu", name, m->file.c_str());
    if (n > 64) return fail(INVALID_VALUE, "kernel `%s` has %ld parameters", name, n);
    auto* f = new Function{m->lib, name, std::vector<size_t>(sizes, sizes + n)};
    functions.insert(f);
    *function = f;
    return SUCCESS;
}
EXPORT int cuFuncSetAttribute(void* function, int attr, int value) {
    GUARDED;
    auto* f = static_cast<Function*>(function);
    if (!functions.count(f)) return fail(INVALID_HANDLE, "cuFuncSetAttribute of an unknown function");
    if (attr != 8) return fail(INVALID_VALUE, "function attribute %d is not emulated", attr);
    if (value < 0 || value > MAX_SMEM_OPTIN) return fail(INVALID_VALUE, "`%s`: %d bytes of dynamic shared memory exceed the device's %d", f->name.c_str(), value, MAX_SMEM_OPTIN);
    f->max_dynamic_smem = value;
    return SUCCESS;
}

EXPORT int cuLaunchKernel(void* function, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned smem,
                          void* stream, void** params, void** extra) {
    Stream* s;
    Function* f;
    {
        GUARDED;
        f = static_cast<Function*>(function);
        s = stream_of(stream);
        if (!functions.count(f) || !s) return fail(INVALID_HANDLE, "cuLaunchKernel of an unknown function or on an unknown stream");
        if (extra) return fail(INVALID_VALUE, "`%s`: arguments through `extra` are not emulated", f->name.c_str());
        if ((int)smem > f->max_dynamic_smem)
            return fail(INVALID_VALUE, "`%s` asks for %u bytes of dynamic shared memory; cuFuncSetAttribute allowed %d", f->name.c_str(), smem, f->max_dynamic_smem);
    }
    // The argument values, copied now: the caller's may be gone when a created stream runs it.
    auto values = std::make_shared<std::vector<std::vector<unsigned char>>>();
    for (size_t i = 0; i < f->sizes.size(); i++) {
        auto* p = static_cast<unsigned char*>(params[i]);
        values->emplace_back(p, p + f->sizes[i]);
    }
    auto run = [=] {
        std::vector<void*> args;
        for (auto& v : *values) args.push_back(v.data());
        unsigned grid[3] = {gx, gy, gz}, block[3] = {bx, by, bz};
        if (f->lib->launch(f->name.c_str(), grid, block, smem, args.size(), args.data(), f->sizes.data(), 0) != 0) {
            std::lock_guard<std::recursive_mutex> g(mu);
            fail(LAUNCH_FAILED, "%s", f->lib->last_error());
            sticky = LAUNCH_FAILED;
        }
    };
    if (!s->deferred) {
        run();  // outside the lock: tests on other threads launch at the same time
    } else {
        std::lock_guard<std::recursive_mutex> g(mu);
        enqueue(s, run);
    }
    return sticky;
}

}  // extern "C"
