// An emulated NCCL (libnccl.so) for ranks that are threads of one process, each on its emulated
// GPU: the calls motley's CUDA backend makes to sum gradients (backend/cuda/nccl.rs). Collectives
// block until every rank of the communicator has called them, as NCCL's do on the GPU's
// stream; the sums add the ranks' buffers in rank order, so every rank gets the same bits (the
// host path's LocalGroup adds in the same order: tests compare the two bitwise).
//
// Stricter than NCCL where it is cheap: buffers must lie inside one live device allocation,
// every rank must pass the same count, type and operation, and a second rank claiming the same
// place in a communicator fails. Ranks in other processes (mpirun) cannot join: the init says
// so after 20 s. Only the compute (null) stream is emulated: it runs each
// operation when queued, so everything queued before the collective has run.
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "device.h"

namespace {

enum { SUCCESS = 0, INTERNAL = 3, INVALID_ARGUMENT = 4, INVALID_USAGE = 5 };
enum { FLOAT32 = 7 };
enum { SUM = 0 };

// ncclUniqueId, passed by value to ncclCommInitRank.
struct UniqueId {
    char internal[128];
};

// What each rank posted for the collective in progress.
struct Post {
    const void* send = nullptr;
    void* recv = nullptr;
    size_t count = 0;
    int type = -1, op = -1;
};

struct Group {
    int ranks;
    std::mutex mu;
    std::condition_variable cv;
    std::vector<bool> joined;
    int arrived = 0;
    uint64_t generation = 0;  // barriers passed
    std::vector<Post> posts;
    explicit Group(int n) : ranks(n), joined(n), posts(n) {}

    // Every rank waits here until all have arrived; false if they did not within `limit`.
    bool barrier(std::unique_lock<std::mutex>& lock, std::chrono::seconds limit = std::chrono::seconds::max()) {
        uint64_t gen = generation;
        if (++arrived == ranks) {
            arrived = 0;
            generation++;
            cv.notify_all();
            return true;
        }
        if (limit == std::chrono::seconds::max()) {
            cv.wait(lock, [&] { return generation != gen; });
            return true;
        }
        return cv.wait_for(lock, limit, [&] { return generation != gen; });
    }
};

struct Comm {
    std::shared_ptr<Group> group;
    int rank;
};

std::mutex registry_mu;
std::map<std::string, std::shared_ptr<Group>> registry;  // by unique id, while ranks join
uint64_t ids = 0;
thread_local std::string last_error;

int fail(int code, const std::string& why) {
    last_error = "emulated NCCL: " + why;
    motley_emu_report(last_error.c_str());
    return code;
}

}  // namespace

extern "C" {

EXPORT int ncclGetVersion(int* version) {
    *version = 0;  // not a NCCL release
    return SUCCESS;
}

EXPORT const char* ncclGetLastError(void*) { return last_error.c_str(); }

EXPORT int ncclGetUniqueId(UniqueId* id) {
    std::lock_guard<std::mutex> g(registry_mu);
    memset(id->internal, 0, sizeof id->internal);
    snprintf(id->internal, sizeof id->internal, "motley-emu-nccl-%llu", static_cast<unsigned long long>(++ids));
    return SUCCESS;
}

// Joins the communicator named by `id` as `rank` of `n`; returns once all n have joined.
EXPORT int ncclCommInitRank(void** comm, int n, UniqueId id, int rank) {
    if (n < 1 || rank < 0 || rank >= n) return fail(INVALID_ARGUMENT, strprintf("rank %d of %d", rank, n));
    std::string key(id.internal, strnlen(id.internal, sizeof id.internal));
    std::shared_ptr<Group> group;
    {
        std::lock_guard<std::mutex> g(registry_mu);
        auto& slot = registry[key];
        if (!slot) slot = std::make_shared<Group>(n);
        group = slot;
    }
    std::unique_lock<std::mutex> lock(group->mu);
    if (group->ranks != n) return fail(INVALID_USAGE, strprintf("rank %d says %d ranks, another %d", rank, n, group->ranks));
    if (group->joined[rank]) return fail(INVALID_USAGE, strprintf("rank %d joined twice", rank));
    group->joined[rank] = true;
    // The other ranks join from threads of this process, or never (MPI ranks in other
    // processes have registries of their own).
    if (!group->barrier(lock, std::chrono::seconds(20)))
        return fail(INTERNAL, strprintf("rank %d of %d: the other ranks did not join within 20 s; the emulator's ranks must be threads of one process", rank, n));
    lock.unlock();
    {
        std::lock_guard<std::mutex> g(registry_mu);
        registry.erase(key);  // complete: a later init with this id starts a new communicator
    }
    *comm = new Comm{group, rank};
    return SUCCESS;
}

EXPORT int ncclCommDestroy(void* comm) {
    delete static_cast<Comm*>(comm);
    return SUCCESS;
}

EXPORT int ncclAllReduce(const void* send, void* recv, size_t count, int type, int op, void* comm, void* stream) {
    auto* c = static_cast<Comm*>(comm);
    if (!c) return fail(INVALID_ARGUMENT, "all-reduce on a null communicator");
    if (stream) return fail(INVALID_USAGE, "all-reduce on a created stream; the emulator runs collectives on the null stream only");
    if (type != FLOAT32 || op != SUM) return fail(INVALID_USAGE, strprintf("all-reduce of type %d, operation %d: only f32 sums are emulated", type, op));
    size_t bytes = count * sizeof(float);
    if (!motley_emu_in_allocation(send, bytes) || !motley_emu_in_allocation(recv, bytes))
        return fail(INVALID_ARGUMENT, strprintf("all-reduce of %zu floats at %p → %p: not inside a device allocation", count, send, recv));
    Group& g = *c->group;
    std::unique_lock<std::mutex> lock(g.mu);
    g.posts[c->rank] = Post{send, recv, count, type, op};
    g.barrier(lock);  // every rank's buffers are known and ready
    std::vector<Post> posts = g.posts;
    lock.unlock();
    for (int r = 0; r < g.ranks; r++)
        if (posts[r].count != count || posts[r].type != type || posts[r].op != op)
            return fail(INVALID_USAGE, strprintf("rank %d sums %zu floats, rank %d %zu (every rank must pass the same)", c->rank, count, r, posts[r].count));
    const float* first = static_cast<const float*>(posts[0].send);
    std::vector<float> sum(first, first + count);
    for (int r = 1; r < g.ranks; r++) {
        const float* x = static_cast<const float*>(posts[r].send);
        for (size_t i = 0; i < count; i++) sum[i] += x[i];
    }
    lock.lock();
    g.barrier(lock);  // every rank has read every send buffer (which may be its recv buffer)
    lock.unlock();
    memcpy(recv, sum.data(), bytes);
    return SUCCESS;
}

}  // extern "C"
