// An emulated NCCL (libnccl.so) for ranks that are threads of one process, each on its emulated
// GPU: the calls motley's CUDA backend makes to sum gradients and to exchange expert-parallel
// rows (backend/cuda/nccl.rs): all-reduce, and sends and receives in groups. Collectives
// block until every rank of the communicator has called them, as NCCL's do on the GPU's
// stream; the sums add the ranks' buffers in rank order, so every rank gets the same bits (the
// host path's LocalGroup adds in the same order: tests compare the two bitwise).
//
// Stricter than NCCL where it is cheap: buffers must lie inside one live device allocation,
// every rank must pass the same count, type and operation, and a second rank claiming the same
// place in a communicator fails. Ranks in other processes (mpirun) cannot join: the init says
// so after 20 s. Sends and receives run on the compute (null) stream only, which runs each
// operation when queued, so everything queued before them has run. An all-reduce may queue on
// a created stream (the backend sums gradients there while the backward goes on): the ranks
// read their buffers at the call, when everything the compute stream queued before has run,
// and the sum lands in the receive buffer in that stream's order, which the emulated driver
// runs as late as it may (at a wait on one of its events): a backend that reads the sums
// without waiting for them reads the unsummed gradients. Such a stream must have waited for an
// event recorded after the compute stream's latest operation, else the call fails (on a GPU
// the sum could run before the backward wrote its buffer); so does a sum of a buffer whose
// earlier sum has not landed (the compute stream may have written it meanwhile).
#include <algorithm>
#include <atomic>
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
enum { FLOAT32 = 7, BFLOAT16 = 9 };
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
    const char* misordered = nullptr;  // why the call is out of order with the compute stream
};

// A point-to-point chunk: a send's source, or a receive's destination.
struct Chunk {
    void* ptr;
    size_t count;
    int type, peer;
};

struct Group {
    int ranks;
    std::mutex mu;
    std::condition_variable cv;
    std::vector<bool> joined;
    int arrived = 0;
    uint64_t generation = 0;  // barriers passed
    std::vector<Post> posts;
    std::vector<std::vector<Chunk>> sends;  // each rank's sends of the group call in progress
    explicit Group(int n) : ranks(n), joined(n), posts(n), sends(n) {}

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

// The sends and receives queued between ncclGroupStart and ncclGroupEnd on this thread.
thread_local int group_depth = 0;
thread_local Comm* group_comm = nullptr;
thread_local std::vector<Chunk> queued_sends, queued_recvs;

std::mutex registry_mu;
std::map<std::string, std::shared_ptr<Group>> registry;  // by unique id, while ranks join
uint64_t ids = 0;
thread_local std::string last_error;

int fail(int code, const std::string& why) {
    last_error = "emulated NCCL: " + why;
    motley_emu_report(last_error.c_str());
    return code;
}

// The checks every call makes of its communicator and stream (`what` names the call).
int check_call(Comm* c, void* stream, const char* what, bool created_stream_allowed) {
    if (!c) return fail(INVALID_ARGUMENT, strprintf("%s on a null communicator", what));
    if (stream && !created_stream_allowed) return fail(INVALID_USAGE, strprintf("%s on a created stream; the emulator runs sends and receives on the null stream only", what));
    return SUCCESS;
}

// A sum waiting for its turn on a stream.
struct Landing {
    void* recv;
    std::vector<float> sum;
    std::shared_ptr<std::atomic<bool>> landed;
};

void land(void* data) {
    auto* l = static_cast<Landing*>(data);
    memcpy(l->recv, l->sum.data(), l->sum.size() * sizeof(float));
    l->landed->store(true);
    delete l;
}

// This rank's sums queued on created streams: (receive buffer, bytes, landed yet).
struct Pending {
    const char* recv;
    size_t bytes;
    std::shared_ptr<std::atomic<bool>> landed;
};
thread_local std::vector<Pending> pending;

// Whether [recv, recv + bytes) overlaps a sum of this rank that has not landed: summing it
// again before the compute stream waited for the first (which lands it) means the compute
// stream may have written the buffer while that sum was in flight.
bool overlaps_pending(const void* recv, size_t bytes) {
    const char* p = static_cast<const char*>(recv);
    pending.erase(std::remove_if(pending.begin(), pending.end(), [](const Pending& q) { return q.landed->load(); }), pending.end());
    for (const Pending& q : pending)
        if (p < q.recv + q.bytes && q.recv < p + bytes) return true;
    return false;
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
    if (int r = check_call(c, stream, "all-reduce", true)) return r;
    // Misordered against the compute stream: reported on every rank after the barrier (a rank
    // that returned before it would leave the others waiting there).
    const char* misordered = !motley_emu_after_compute(stream)           ? "all-reduce on a created stream that has not waited for the compute stream's latest operations (an event recorded after them), which may still write its buffer"
                             : overlaps_pending(recv, count * sizeof(float)) ? "all-reduce of a buffer whose earlier sum the compute stream has not waited for: it may have written the buffer while that sum ran"
                                                                             : nullptr;
    if (type != FLOAT32 || op != SUM) return fail(INVALID_USAGE, strprintf("all-reduce of type %d, operation %d: only f32 sums are emulated", type, op));
    size_t bytes = count * sizeof(float);
    if (!motley_emu_in_allocation(send, bytes) || !motley_emu_in_allocation(recv, bytes))
        return fail(INVALID_ARGUMENT, strprintf("all-reduce of %zu floats at %p → %p: not inside a device allocation", count, send, recv));
    Group& g = *c->group;
    std::unique_lock<std::mutex> lock(g.mu);
    g.posts[c->rank] = Post{send, recv, count, type, op, misordered};
    g.barrier(lock);  // every rank's buffers are known and ready
    std::vector<Post> posts = g.posts;
    lock.unlock();
    for (int r = 0; r < g.ranks; r++)
        if (posts[r].misordered) return fail(INVALID_USAGE, strprintf("rank %d: %s", r, posts[r].misordered));
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
    auto landed = std::make_shared<std::atomic<bool>>(false);
    if (stream) pending.push_back(Pending{static_cast<const char*>(recv), bytes, landed});
    motley_emu_enqueue(stream, land, new Landing{recv, std::move(sum), landed});
    return SUCCESS;
}

EXPORT int ncclGroupStart() {
    group_depth++;
    return SUCCESS;
}

size_t type_bytes(int type) { return type == FLOAT32 ? 4 : type == BFLOAT16 ? 2 : 0; }

// Queues a send or receive of the group in progress (a call outside a group is a group of one).
int queue_chunk(std::vector<Chunk>& queue, void* ptr, size_t count, int type, int peer, void* comm, void* stream, const char* what) {
    auto* c = static_cast<Comm*>(comm);
    if (int r = check_call(c, stream, what, false)) return r;
    if (!type_bytes(type)) return fail(INVALID_USAGE, strprintf("%s of type %d: only f32 and bf16 are emulated", what, type));
    if (peer < 0 || peer >= c->group->ranks) return fail(INVALID_ARGUMENT, strprintf("%s to peer %d of %d ranks", what, peer, c->group->ranks));
    if (!motley_emu_in_allocation(ptr, count * type_bytes(type)))
        return fail(INVALID_ARGUMENT, strprintf("%s of %zu elements at %p: not inside a device allocation", what, count, ptr));
    if (group_comm && group_comm != c) return fail(INVALID_USAGE, "a group of sends and receives over two communicators is not emulated");
    group_comm = c;
    queue.push_back(Chunk{ptr, count, type, peer});
    return SUCCESS;
}

int ncclGroupEnd();

EXPORT int ncclSend(const void* buf, size_t count, int type, int peer, void* comm, void* stream) {
    int r = queue_chunk(queued_sends, const_cast<void*>(buf), count, type, peer, comm, stream, "send");
    return r != SUCCESS || group_depth ? r : ncclGroupEnd();
}

EXPORT int ncclRecv(void* buf, size_t count, int type, int peer, void* comm, void* stream) {
    int r = queue_chunk(queued_recvs, buf, count, type, peer, comm, stream, "receive");
    return r != SUCCESS || group_depth ? r : ncclGroupEnd();
}

// Runs the group's sends and receives: every rank of the communicator posts its sends, then
// takes, for each receive from a peer, that peer's next send to it (same count and type).
EXPORT int ncclGroupEnd() {
    if (group_depth > 0) group_depth--;
    if (group_depth > 0 || !group_comm) return SUCCESS;
    Comm* c = group_comm;
    std::vector<Chunk> sends, recvs;
    sends.swap(queued_sends);
    recvs.swap(queued_recvs);
    group_comm = nullptr;
    Group& g = *c->group;
    std::unique_lock<std::mutex> lock(g.mu);
    g.sends[c->rank] = sends;
    g.barrier(lock);  // every rank's sends are posted
    std::vector<std::vector<Chunk>> posted = g.sends;
    lock.unlock();
    std::vector<size_t> next(g.ranks, 0);  // where each peer's next send to this rank is sought
    int result = SUCCESS;
    for (const Chunk& r : recvs) {
        const std::vector<Chunk>& from = posted[r.peer];
        size_t& i = next[r.peer];
        while (i < from.size() && from[i].peer != c->rank) i++;
        if (i == from.size()) {
            result = fail(INVALID_USAGE, strprintf("rank %d receives more chunks from rank %d than it sends", c->rank, r.peer));
            break;
        }
        const Chunk& s = from[i++];
        if (s.count != r.count || s.type != r.type) {
            result = fail(INVALID_USAGE, strprintf("rank %d receives %zu elements of type %d from rank %d, which sends %zu of type %d", c->rank, r.count, r.type, r.peer, s.count, s.type));
            break;
        }
        memcpy(r.ptr, s.ptr, r.count * type_bytes(r.type));
    }
    for (int p = 0; p < g.ranks && result == SUCCESS; p++)
        for (size_t i = next[p]; i < posted[p].size(); i++)
            if (posted[p][i].peer == c->rank) {
                result = fail(INVALID_USAGE, strprintf("rank %d sends rank %d more chunks than it receives", p, c->rank));
                break;
            }
    lock.lock();
    g.barrier(lock);  // every rank has read every send buffer
    return result;
}

}  // extern "C"
