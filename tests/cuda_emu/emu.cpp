// The kernel emulator's runtime (see emu.h): launches, the fiber scheduler, warp collectives,
// asynchronous copies and dynamic shared memory, behind a C ABI for the Rust test.
#include <sys/mman.h>

#include <algorithm>
#include <array>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "emu.h"
#include "tensor_map.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace emu {

thread_local const uint3* thread_idx;
thread_local uint3 block_idx, block_dim, grid_dim;

namespace {

// ---- fibers ------------------------------------------------------------------------------------

#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack, stores its pointer in *save and
// continues on the stack `load` with the registers saved there (a few ns; swapcontext also
// makes a signal-mask system call per switch, and a launch switches millions of times).
extern "C" void emu_switch(void** save, void* load);
asm(R"(
    .text
    .globl emu_switch
    .hidden emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");

struct Context {
    void* sp = nullptr;
    // A fresh context entering `entry` on the stack [base, base + size).
    void start(char* base, size_t size, void (*entry)()) {
        void** top = reinterpret_cast<void**>((reinterpret_cast<uintptr_t>(base + size)) & ~uintptr_t(15));
        *--top = nullptr;                         // entry's return address: it never returns
        *--top = reinterpret_cast<void*>(entry);  // where the first switch's `ret` goes
        for (int i = 0; i < 6; i++) *--top = nullptr;  // rbp, rbx, r12..r15
        sp = top;
    }
};
void swap(Context& from, Context& to) { emu_switch(&from.sp, to.sp); }
#else
struct Context {
    ucontext_t uc;
    void start(char* base, size_t size, void (*entry)()) {
        getcontext(&uc);
        uc.uc_stack.ss_sp = base;
        uc.uc_stack.ss_size = size;
        uc.uc_link = nullptr;
        makecontext(&uc, entry, 0);
    }
};
void swap(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

constexpr size_t STACK = 256 << 10;
constexpr size_t PAGE = 4096;

// One fiber stack, with a PROT_NONE page below it so that an overflow faults instead of
// corrupting the next stack. Reserved lazily by the kernel (MAP_NORESERVE).
struct Stack {
    char* map = nullptr;
    Stack() {
        void* p = mmap(nullptr, STACK + PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) {
            perror("emu: fiber stack");
            abort();
        }
        map = static_cast<char*>(p);
        mprotect(map, PAGE, PROT_NONE);
    }
    Stack(Stack&& o) noexcept : map(o.map) { o.map = nullptr; }
    ~Stack() {
        if (map) munmap(map, STACK + PAGE);
    }
    char* base() const { return map + PAGE; }
};

// ---- threads and the launch ------------------------------------------------------------------

enum class State { Ready, AtSyncthreads, AtWarpOp, AtMbarrier, Exited, Faulted };
enum class Op { Syncwarp, Shuffle, VoteAny, Mma, Ldmatrix, LdmatrixTrans, StmatrixTrans, Wgmma, WgmmaCommit, WgmmaWait };

const char* op_name(Op op) {
    switch (op) {
        case Op::Syncwarp: return "__syncwarp";
        case Op::Shuffle: return "a shuffle";
        case Op::VoteAny: return "__any_sync";
        case Op::Mma: return "mma16816";
        case Op::Ldmatrix: return "ldmatrix_x4";
        case Op::LdmatrixTrans: return "ldmatrix_x4_trans";
        case Op::StmatrixTrans: return "stmatrix_x4_trans";
        case Op::Wgmma: return "wgmma.mma_async";
        case Op::WgmmaCommit: return "wgmma.commit_group";
        case Op::WgmmaWait: return "wgmma.wait_group";
    }
    return "?";
}

// A cp.async copy issued but not complete: its 16 bytes (read at issue, zeros when !valid)
// land in shared memory at the wait that covers its group.
struct Copy {
    unsigned char* dst;
    unsigned char data[16];
    unsigned group;
};

struct Thread {
    uint3 idx;
    unsigned lane, warp;
    Context ctx;
    State state;
    // The warp collective it waits at: its operands stay on its stack meanwhile.
    Op op;
    const void* in[2];
    void* out;
    unsigned bytes;
    Shfl kind;
    int arg, width;
    // wgmma.mma_async: its descriptors (A's unused when A is in registers), N and flags;
    // wgmma.wait_group: the groups it leaves pending.
    unsigned long long desc[2];
    unsigned n, pending;
    bool accumulate, trans_a, trans_b;
    // cp.async: copies not complete yet, and the number of groups committed so far (the
    // group of a new copy); the shared-memory chunks its copies wrote since its last
    // fence.proxy.async.
    std::vector<Copy> copies;
    unsigned committed;
    std::vector<unsigned> unfenced;
    // mbarrier.try_wait.parity: the barrier's shared-memory offset and the phase parity.
    size_t mbar;
    unsigned parity;
};

// A bulk tensor copy issued and not landed: its 16-byte chunks at their (swizzled) places, read
// from global memory at issue; they land, and count against the barrier's transaction bytes,
// once every thread waits (ascending schedule: as late as a GPU may) or at once (descending).
struct Bulk {
    std::vector<std::pair<unsigned char*, std::array<unsigned char, 16>>> chunks;
    long long bytes;
};

// An mbarrier: the arrivals its phases expect and those still pending, the transaction bytes
// announced (expect_tx) and not yet received, the current phase, and the copies in flight to it.
struct Mbarrier {
    unsigned expected = 0, pending = 0;
    long long tx = 0;
    unsigned phase = 0;
    std::vector<Bulk> inflight;
};

// What makes two wgmma.mma_async the same instruction: shape, flags and descriptors (A's only
// where A is in shared memory). The PTX ISA requires it of a warp's lanes and, for the n-th
// wgmma of each, of a warpgroup's warps.
struct WgmmaForm {
    unsigned n;
    bool accumulate, trans_a, trans_b, a_in_registers;
    unsigned long long desc_a, desc_b;
    bool operator==(const WgmmaForm& o) const {
        return n == o.n && accumulate == o.accumulate && trans_a == o.trans_a && trans_b == o.trans_b && a_in_registers == o.a_in_registers && desc_a == o.desc_a &&
               desc_b == o.desc_b;
    }
    bool operator!=(const WgmmaForm& o) const { return !(*this == o); }
};

// A wgmma.mma_async of one warp (its 16 rows of the warpgroup's 64), issued and not complete:
// it runs at the wgmma.wait_group that covers its group, from the operands read at issue, which
// must not have changed by then. The lanes' accumulators hold NaN meanwhile (reading them before
// the wait shows), unless an earlier wgmma in flight already targets them (a chain, as the
// hardware orders wgmmas on one accumulator).
struct Wgmma {
    unsigned group;
    WgmmaForm form;
    float* d[32];
    const unsigned* a[32];  // the lanes' A registers, or null: A in shared memory
    std::vector<float> A, B;  // 16 × 16 (this warp's rows) and 16 × n, as read at issue
    std::vector<float> d_in;  // the lanes' accumulators at issue (32 × n/2); empty in a chain
};

struct WarpWgmma {
    unsigned committed = 0, issued = 0;
    std::vector<Wgmma> ops;
    // Results of chains whose last wgmma is still in flight, by the first lane's accumulator.
    std::vector<std::pair<float*, std::vector<float>>> chains;
};

struct Kernel {
    std::string name;
    void* fn;
    Invoke invoke;
    std::vector<size_t> sizes;
};

std::vector<Kernel>& registry() {
    static std::vector<Kernel> kernels;
    return kernels;
}

constexpr size_t GUARD = 256;
constexpr unsigned char SMEM_POISON = 0xff;  // NaN as f32 and bf16: reading unwritten shared memory shows
constexpr unsigned char CANARY = 0xa5;
// Hopper's opt-in limit of dynamic shared memory per block (227 KiB).
constexpr size_t MAX_SMEM = 232448;

struct Launch {
    const Kernel* kernel;
    void* const* args;
    std::vector<Thread> threads;
    Thread* current = nullptr;
    Context scheduler;
    unsigned char* smem;
    size_t smem_bytes;
    std::string error;
    // Per warp, its wgmmas in flight.
    std::vector<WarpWgmma> wgmma;
    // Per warpgroup, the wgmmas some of its warps have issued and others not yet: the n-th of
    // each warp must be the same instruction (descriptors included), as the PTX ISA requires.
    struct Issue {
        unsigned index, seen;
        WgmmaForm form;
    };
    std::vector<std::vector<Issue>> issues;
    // Per 16-byte chunk of dynamic shared memory: the thread whose cp.async wrote it and has not
    // executed fence.proxy.async since (the generic proxy's writes are not visible to wgmma's
    // async proxy before that), or -1.
    std::vector<int> unfenced;
    // Dynamic shared memory as wgmma's async proxy sees it: taken at each __syncthreads that some
    // thread reached through a fence.proxy.async since the previous one. A wgmma reading bytes
    // that differ from it reads a generic-proxy store not fenced (and barriered) since. Lenient
    // where one thread's fence publishes another's stores; catches a store with no fence at all.
    std::vector<unsigned char> async_view;
    bool fenced = false;
    // cp.async data lands at the wait (ascending schedule) or at once (descending): a copy may
    // land any time in between on a GPU, so a copy into memory still being read shows.
    bool eager_copies = false;
    // The block's mbarriers by shared-memory offset.
    std::map<size_t, Mbarrier> mbarriers;
};

thread_local Launch* L;
thread_local std::vector<Stack> stacks;
thread_local std::vector<unsigned char> smem_storage;
thread_local std::string last_error;

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

std::string where(const Launch& l) {
    return format("kernel `%s` block (%u,%u,%u)", l.kernel->name.c_str(), block_idx.x, block_idx.y, block_idx.z);
}
std::string who(const Thread& t) { return format("thread (%u,%u,%u) (warp %u lane %u)", t.idx.x, t.idx.y, t.idx.z, t.warp, t.lane); }

Thread& self() { return *L->current; }

void yield(State s) {
    Thread& t = self();
    t.state = s;
    swap(t.ctx, L->scheduler);
}

// Stops the launch with an error raised by the running thread; never returns.
[[noreturn]] void fault(const std::string& what) {
    Thread& t = self();
    if (L->error.empty()) L->error = where(*L) + " " + who(t) + ": " + what;
    yield(State::Faulted);
    __builtin_unreachable();
}

void fiber_main() {
    Launch& l = *L;
    l.kernel->invoke(l.kernel->fn, l.args);
    yield(State::Exited);
    __builtin_unreachable();
}

unsigned lanes_in_warp(const Launch& l, unsigned warp) {
    unsigned n = l.threads.size() - warp * 32;
    return n < 32 ? n : 32;
}

// Waits at warp collective `op` over the lanes of `mask`; mma and ldmatrix pass all 32, so on a
// warp with fewer lanes they fault.
void warp_op(Op op, unsigned mask) {
    Thread& t = self();
    unsigned n = lanes_in_warp(*L, t.warp);
    unsigned full = n == 32 ? 0xffffffffu : (1u << n) - 1;
    if (mask != full) fault(format("%s with mask %#x: only the mask of the whole warp (%#x) is emulated", op_name(op), mask, full));
    t.op = op;
    yield(State::AtWarpOp);
}

bool in_smem(const void* p, size_t bytes) {
    auto a = reinterpret_cast<uintptr_t>(p), s = reinterpret_cast<uintptr_t>(L->smem);
    return a >= s && a + bytes <= s + L->smem_bytes;
}

// ---- warp collectives, run by the scheduler once every lane of the warp waits at one ---------

float bf16_lo(unsigned r) { return __bfloat162float(__ushort_as_bfloat16(r & 0xffff)); }
float bf16_hi(unsigned r) { return __bfloat162float(__ushort_as_bfloat16(r >> 16)); }

// D = A·B + C for mma.m16n8k16.row.col.f32.bf16.bf16.f32, fragments as in the PTX ISA
// ("Matrix Fragments for mma.m16n8k16 with floating point type"): element a_i of a lane is
// half i % 2 of register i / 2 (the lower index in the low half), likewise b_i; c_i is c[i].
// bf16 products are exact in f32; they are accumulated in f32 in order of k after C.
void run_mma(Thread* lanes[32]) {
    float A[16][16], B[16][8], C[16][8];
    for (unsigned lane = 0; lane < 32; lane++) {
        const unsigned* a = static_cast<const unsigned*>(lanes[lane]->in[0]);
        const unsigned* b = static_cast<const unsigned*>(lanes[lane]->in[1]);
        const float* c = static_cast<const float*>(lanes[lane]->out);
        unsigned group = lane >> 2, tig = lane % 4;
        for (unsigned i = 0; i < 8; i++) {
            unsigned row = (i < 2 || (i >= 4 && i < 6)) ? group : group + 8;
            unsigned col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
            A[row][col] = i % 2 ? bf16_hi(a[i / 2]) : bf16_lo(a[i / 2]);
        }
        for (unsigned i = 0; i < 4; i++) {
            unsigned row = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
            B[row][group] = i % 2 ? bf16_hi(b[i / 2]) : bf16_lo(b[i / 2]);
        }
        for (unsigned i = 0; i < 4; i++) C[i < 2 ? group : group + 8][tig * 2 + (i & 1)] = c[i];
    }
    for (unsigned lane = 0; lane < 32; lane++) {
        float* d = static_cast<float*>(lanes[lane]->out);
        unsigned group = lane >> 2, tig = lane % 4;
        for (unsigned i = 0; i < 4; i++) {
            unsigned row = i < 2 ? group : group + 8, col = tig * 2 + (i & 1);
            float acc = C[row][col];
            for (unsigned k = 0; k < 16; k++) acc += A[row][k] * B[k][col];
            d[i] = acc;
        }
    }
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i..8i+7 give the row addresses of
// matrix i (16 bytes each, 16-byte aligned, in shared memory); register i of lane t receives
// matrix i's row t/4, elements 2(t%4) and 2(t%4)+1 ("fragments of a row, thread 0 the first"),
// or with .trans the same of the transposed matrix: rows 2(t%4), 2(t%4)+1 of column t/4.
std::string run_ldmatrix(Thread* lanes[32], bool trans) {
    unsigned short m[4][8][8];
    for (unsigned lane = 0; lane < 32; lane++) {
        const void* row = lanes[lane]->in[0];
        if (reinterpret_cast<uintptr_t>(row) % 16) return format("lane %u's row address %p is not 16-byte aligned", lane, row);
        if (!in_smem(row, 16)) return format("lane %u's row address %p is outside dynamic shared memory", lane, row);
        std::memcpy(m[lane / 8][lane % 8], row, 16);
    }
    for (unsigned lane = 0; lane < 32; lane++) {
        unsigned* r = static_cast<unsigned*>(lanes[lane]->out);
        unsigned a = lane / 4, b = 2 * (lane % 4);
        for (unsigned i = 0; i < 4; i++)
            r[i] = trans ? m[i][b][a] | (unsigned)m[i][b + 1][a] << 16 : m[i][a][b] | (unsigned)m[i][a][b + 1] << 16;
    }
    return "";
}

// ---- wgmma -------------------------------------------------------------------------------------

// A shared-memory matrix descriptor ("Matrix Descriptor Format" of the PTX ISA): start address,
// leading and stride byte offsets (each in 16-byte units in the descriptor), base offset, and
// the layout (swizzle) in the top two bits.
struct Desc {
    size_t start, lbo, sbo;
    unsigned base_offset, layout;
};
Desc decode(unsigned long long d) {
    return Desc{(d & 0x3fff) << 4, ((d >> 16) & 0x3fff) << 4, ((d >> 32) & 0x3fff) << 4, unsigned(d >> 49) & 7, unsigned(d >> 62)};
}

// Shared-memory offset of element (mn, k) of a bf16 operand (mn: the row of A or the column of
// B) in the 128-byte swizzled canonical layouts of the PTX ISA ("Shared Memory Matrix Layout"),
// in CuTe's notation with T = 8 elements of 16 bytes:
//   K-major  ((8,m),(T,2k)) : ((8T,SBO),(1,T))    16 k contiguous; 8 mn rows 128 bytes apart,
//                                                 then groups of 8 rows SBO apart;
//   MN-major ((T,8,m),(8,k)) : ((1,T,LBO),(8T,SBO)) 64 mn contiguous, then blocks LBO apart;
//                                                 8 k rows 128 bytes apart, then groups SBO apart;
// then the 128-byte swizzle of the address: bits 4–6 XOR bits 7–9.
size_t element_at(const Desc& d, bool mn_major, unsigned mn, unsigned k) {
    size_t off = mn_major ? (mn % 64) * 2 + (mn / 64) * d.lbo + (k % 8) * 128 + (k / 8) * d.sbo : (mn % 8) * 128 + (mn / 8) * d.sbo + k * 2;
    size_t a = d.start + off;
    return a ^ (((a >> 7) & 7) << 4);
}

// Reads `rows` × 16 bf16 elements of an operand through its descriptor: out[r * 16 + k] (A:
// rows `first`.., k-major), or out[k * rows + r] for B (r its column). "" or the error. At issue
// the bytes must be visible to the async proxy (fenced); at the wait only equal to the issue's.
std::string read_operand(unsigned long long raw, bool mn_major, unsigned first, unsigned rows, bool is_b, bool at_issue, std::vector<float>& out) {
    Desc d = decode(raw);
    if (d.layout != 1) return format("descriptor %#llx: layout %u; only the 128-byte swizzle (1) is emulated", raw, d.layout);
    if (d.base_offset != 0) return format("descriptor %#llx: base offset %u; only 0 is emulated", raw, d.base_offset);
    out.assign(rows * 16, 0.0f);
    for (unsigned r = 0; r < rows; r++)
        for (unsigned k = 0; k < 16; k++) {
            size_t at = element_at(d, mn_major, first + r, k);
            if (at + 2 > L->smem_bytes) return format("descriptor %#llx: element (%u, %u) at shared offset %zu, past the %zu bytes of dynamic shared memory", raw, first + r, k, at, L->smem_bytes);
            if (int w = L->unfenced[at / 16]; at_issue && w >= 0)
                return format("reads shared offset %zu, which thread %d wrote with cp.async and has not fenced (fence.proxy.async) since: the async proxy may not see it", at, w);
            if (at_issue && std::memcmp(L->smem + at, L->async_view.data() + at, 2))
                return format("reads shared offset %zu, stored to since the last fence.proxy.async and __syncthreads: the async proxy may not see the store", at);
            unsigned short bits;
            std::memcpy(&bits, L->smem + at, 2);
            out[is_b ? k * rows + r : r * 16 + k] = __bfloat162float(__ushort_as_bfloat16(bits));
        }
    return "";
}

// This warp's A (its 16 rows, 16 × 16) from the lanes' registers, laid out as mma.m16n8k16's A.
void read_a_registers(const unsigned* const a[32], std::vector<float>& out) {
    out.assign(256, 0.0f);
    for (unsigned lane = 0; lane < 32; lane++) {
        unsigned group = lane >> 2, tig = lane % 4;
        for (unsigned i = 0; i < 8; i++) {
            unsigned row = (i < 2 || (i >= 4 && i < 6)) ? group : group + 8;
            unsigned col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
            out[row * 16 + col] = i % 2 ? bf16_hi(a[lane][i / 2]) : bf16_lo(a[lane][i / 2]);
        }
    }
}

// Reads op's operands as they are now (at its issue or its wait): A (this warp's rows) and B.
std::string read_wgmma_operands(const Wgmma& op, unsigned warp, bool at_issue, std::vector<float>& A, std::vector<float>& B) {
    std::string e;
    if (op.a[0]) read_a_registers(op.a, A);
    else e = read_operand(op.form.desc_a, op.form.trans_a, 16 * (warp % 4), 16, false, at_issue, A);
    if (e.empty()) e = read_operand(op.form.desc_b, op.form.trans_b, 0, op.form.n, true, at_issue, B);
    return e;
}

// Lane `lane`'s accumulator j holds (row 16w + g + 8·(j/2 % 2), col 8·(j/4) + 2q + j % 2) of the
// warpgroup's 64 × N result, g = lane / 4, q = lane % 4 ("Matrix Fragments for
// wgmma.mma_async.m64nNk16": mma.m16n8k16's C layout, repeated over N in steps of 8); rows
// below are this warp's, 0..15.
unsigned d_row(unsigned lane, unsigned j) { return (lane >> 2) + 8 * (j / 2 % 2); }
unsigned d_col(unsigned lane, unsigned j) { return 8 * (j / 4) + 2 * (lane % 4) + j % 2; }

// The accumulators of a wgmma while it is in flight.
constexpr unsigned D_POISON = 0x7fc0dead;

// wgmma.mma_async on one warp's lanes: checks, reads and records it (see Wgmma).
std::string run_wgmma(Thread* lanes[32]) {
    const Thread& t0 = *lanes[0];
    if (L->threads.size() % 128) return format("wgmma in a block of %zu threads: a warpgroup is 4 whole warps", L->threads.size());
    auto form_of = [](const Thread& t) {
        const bool in_registers = t.in[0] != nullptr;
        return WgmmaForm{t.n, t.accumulate, t.trans_a, t.trans_b, in_registers, in_registers ? 0 : t.desc[0], t.desc[1]};
    };
    const WgmmaForm form = form_of(t0);
    for (unsigned lane = 1; lane < 32; lane++)
        if (form_of(*lanes[lane]) != form) return format("lanes 0 and %u issue different wgmmas (shape, descriptors or flags)", lane);
    WarpWgmma& q = L->wgmma[t0.warp];
    const Launch::Issue mine{q.issued++, 1u << (t0.warp % 4), form};
    auto& issued = L->issues[t0.warp / 4];
    auto same = std::find_if(issued.begin(), issued.end(), [&](const Launch::Issue& i) { return i.index == mine.index; });
    if (same == issued.end()) {
        issued.push_back(mine);
    } else {
        if (same->form != mine.form)
            return format("wgmma number %u differs between the warps of warpgroup %u (shape, flags or descriptors; the PTX ISA requires the same across the warpgroup)", mine.index,
                          t0.warp / 4);
        if ((same->seen |= mine.seen) == 0xf) issued.erase(same);
    }
    Wgmma op{q.committed, form, {}, {}, {}, {}, {}};
    for (unsigned lane = 0; lane < 32; lane++) {
        op.d[lane] = static_cast<float*>(lanes[lane]->out);
        op.a[lane] = static_cast<const unsigned*>(lanes[lane]->in[0]);
    }
    if (std::string e = read_wgmma_operands(op, t0.warp, true, op.A, op.B); !e.empty()) return e;
    bool chained = false;
    for (const Wgmma& o : q.ops) chained |= o.d[0] == op.d[0];
    if (!chained) {
        const unsigned per = op.form.n / 2;
        op.d_in.resize(32 * per);
        for (unsigned lane = 0; lane < 32; lane++)
            for (unsigned j = 0; j < per; j++) {
                op.d_in[lane * per + j] = op.d[lane][j];
                std::memcpy(&op.d[lane][j], &D_POISON, 4);
            }
    }
    q.ops.push_back(std::move(op));
    return "";
}

// wgmma.wait_group: completes, in issue order, every wgmma of this warp except those of the
// `pending` most recently committed groups (and any not committed).
std::string run_wgmma_wait(unsigned warp, unsigned pending) {
    WarpWgmma& q = L->wgmma[warp];
    size_t done = 0;
    while (done < q.ops.size() && q.ops[done].group + pending < q.committed) done++;
    for (size_t i = 0; i < done; i++) {
        const Wgmma& op = q.ops[i];
        std::vector<float> A, B;
        if (std::string e = read_wgmma_operands(op, warp, false, A, B); !e.empty()) return e;
        if (A != op.A) return format("the A operand of a wgmma (%s) changed before its wgmma.wait_group", op.a[0] ? "registers" : "shared memory");
        if (B != op.B) return "the B operand of a wgmma (shared memory) changed before its wgmma.wait_group";
        const unsigned per = op.form.n / 2;
        auto chain = std::find_if(q.chains.begin(), q.chains.end(), [&](const auto& c) { return c.first == op.d[0]; });
        std::vector<float> d = op.d_in;
        if (d.empty()) {
            if (chain == q.chains.end()) return "a chained wgmma lost its predecessor's result";
            d = chain->second;
        }
        for (unsigned lane = 0; lane < 32; lane++)
            for (unsigned j = 0; j < per; j++) {
                unsigned row = d_row(lane, j), col = d_col(lane, j);
                float acc = op.form.accumulate ? d[lane * per + j] : 0.0f;
                for (unsigned k = 0; k < 16; k++) acc += op.A[row * 16 + k] * op.B[k * op.form.n + col];
                d[lane * per + j] = acc;
            }
        bool last = true;
        for (size_t later = i + 1; later < q.ops.size(); later++) last &= q.ops[later].d[0] != op.d[0];
        if (!last) {
            if (chain == q.chains.end()) q.chains.emplace_back(op.d[0], std::move(d));
            else chain->second = std::move(d);
            continue;
        }
        if (chain != q.chains.end()) q.chains.erase(chain);
        for (unsigned lane = 0; lane < 32; lane++)
            for (unsigned j = 0; j < per; j++) {
                unsigned bits;
                std::memcpy(&bits, &op.d[lane][j], 4);
                if (bits != D_POISON) return format("lane %u wrote accumulator %u while a wgmma on it was in flight", lane, j);
                op.d[lane][j] = d[lane * per + j];
            }
    }
    q.ops.erase(q.ops.begin(), q.ops.begin() + done);
    return "";
}

std::string run_shuffle(Thread* lanes[], unsigned n) {
    for (unsigned lane = 0; lane < n; lane++) {
        const Thread& t = *lanes[lane];
        if (t.bytes != lanes[0]->bytes || t.kind != lanes[0]->kind || t.width != lanes[0]->width)
            return format("lanes 0 and %u shuffle different types or kinds", lane);
        if (t.width <= 0 || t.width > 32 || (t.width & (t.width - 1)))
            return format("shuffle width %d is not a power of two up to 32", t.width);
    }
    for (unsigned lane = 0; lane < n; lane++) {
        Thread& t = *lanes[lane];
        unsigned segment = lane & ~unsigned(t.width - 1), src;
        if (t.kind == Shfl::Idx) {
            src = segment + (unsigned(t.arg) & unsigned(t.width - 1));
        } else {
            src = lane ^ unsigned(t.arg);
            if ((src & ~unsigned(t.width - 1)) != segment) src = lane;  // outside its segment: its own value
        }
        if (src >= n) return format("lane %u reads lane %u, which the block does not have", lane, src);
        std::memcpy(t.out, lanes[src]->in[0], t.bytes);
    }
    return "";
}
// stmatrix.sync.aligned.m8n8.x4.trans.shared.b16, ldmatrix's store: register i of lane t holds
// matrix i's row t/4, elements 2(t%4) and 2(t%4)+1, and the matrix is stored transposed, lanes
// 8i..8i+7 giving the addresses of the stored rows of matrix i (16 bytes each, 16-byte aligned,
// in shared memory): row a of the store is column a of the matrix.
std::string run_stmatrix_trans(Thread* lanes[32]) {
    unsigned short m[4][8][8];
    for (unsigned lane = 0; lane < 32; lane++) {
        const unsigned* r = static_cast<const unsigned*>(lanes[lane]->in[1]);
        unsigned a = lane / 4, b = 2 * (lane % 4);
        for (unsigned i = 0; i < 4; i++) {
            m[i][b][a] = r[i] & 0xffff;
            m[i][b + 1][a] = r[i] >> 16;
        }
    }
    for (unsigned lane = 0; lane < 32; lane++) {
        void* row = const_cast<void*>(lanes[lane]->in[0]);
        if (reinterpret_cast<uintptr_t>(row) % 16) return format("lane %u's row address %p is not 16-byte aligned", lane, row);
        if (!in_smem(row, 16)) return format("lane %u's row address %p is outside dynamic shared memory", lane, row);
        std::memcpy(row, m[lane / 8][lane % 8], 16);
    }
    return "";
}

// Runs the collective every lane of a warp waits at; "" or the error.
std::string run_warp_op(Thread* lanes[], unsigned n) {
    Op op = lanes[0]->op;
    for (unsigned lane = 1; lane < n; lane++)
        if (lanes[lane]->op != op) return format("lane 0 waits at %s, lane %u at %s", op_name(op), lane, op_name(lanes[lane]->op));
    switch (op) {
        case Op::Syncwarp: return "";
        case Op::Shuffle: return run_shuffle(lanes, n);
        case Op::VoteAny: {
            int any = 0;
            for (unsigned lane = 0; lane < n; lane++) any |= lanes[lane]->arg != 0;
            for (unsigned lane = 0; lane < n; lane++) *static_cast<int*>(lanes[lane]->out) = any;
            return "";
        }
        case Op::Mma: run_mma(lanes); return "";
        case Op::Ldmatrix: return run_ldmatrix(lanes, false);
        case Op::LdmatrixTrans: return run_ldmatrix(lanes, true);
        case Op::StmatrixTrans: return run_stmatrix_trans(lanes);
        case Op::Wgmma: return run_wgmma(lanes);
        case Op::WgmmaCommit: L->wgmma[lanes[0]->warp].committed++; return "";
        case Op::WgmmaWait:
            for (unsigned lane = 1; lane < n; lane++)
                if (lanes[lane]->pending != lanes[0]->pending) return format("lanes 0 and %u wait for different wgmma groups", lane);
            return run_wgmma_wait(lanes[0]->warp, lanes[0]->pending);
    }
    return "unknown warp collective";
}

const char* state_name(State s) {
    switch (s) {
        case State::Ready: return "runs";
        case State::AtSyncthreads: return "waits at __syncthreads";
        case State::AtWarpOp: return "waits at a warp collective";
        case State::AtMbarrier: return "waits on an mbarrier";
        case State::Exited: return "has exited";
        case State::Faulted: return "faulted";
    }
    return "?";
}

// Completes `b`'s phase where no arrival and no transaction byte is outstanding.
void settle(Mbarrier& b) {
    if (b.pending == 0 && b.tx == 0) {
        b.phase++;
        b.pending = b.expected;
    }
}

// Lands the copies in flight to `b` (their bytes as the async proxy writes them, which wgmma
// reads without a fence) and completes its phase where nothing is outstanding; false with the
// launch's error where more bytes arrived than expect_tx announced.
bool land(Launch& l, Mbarrier& b) {
    for (const Bulk& bulk : b.inflight) {
        for (const auto& [dst, data] : bulk.chunks) {
            std::memcpy(dst, data.data(), 16);
            const size_t at = dst - l.smem;
            std::memcpy(l.async_view.data() + at, data.data(), 16);
            l.unfenced[at / 16] = -1;
        }
        b.tx -= bulk.bytes;
    }
    b.inflight.clear();
    if (b.tx < 0) {
        l.error = where(l) + format(": an mbarrier received %lld transaction bytes more than expect_tx announced", -b.tx);
        return false;
    }
    settle(b);
    return true;
}

// Runs warp `w` until it cannot go on alone: its lanes, in ascending or descending order, each
// until it reaches a barrier; whenever all of them wait at a warp collective, that runs and
// they go on. Returns once every lane waits at __syncthreads or has exited.
bool run_warp(Launch& l, unsigned w, bool descending) {
    Thread* lanes[32];
    const unsigned count = lanes_in_warp(l, w);
    for (unsigned i = 0; i < count; i++) lanes[i] = &l.threads[w * 32 + i];
    for (;;) {
        for (unsigned k = 0; k < count; k++) {
            Thread& t = *lanes[descending ? count - 1 - k : k];
            if (t.state != State::Ready) continue;
            l.current = &t;
            thread_idx = &t.idx;
            swap(l.scheduler, t.ctx);
            if (t.state == State::Faulted) return false;
        }
        unsigned waiting = 0;
        for (unsigned i = 0; i < count; i++) waiting += lanes[i]->state == State::AtWarpOp;
        if (waiting == 0) return true;
        if (waiting < count) {
            unsigned at = 0, other = 0;
            while (lanes[at]->state != State::AtWarpOp) at++;
            while (lanes[other]->state == State::AtWarpOp) other++;
            l.error = where(l) + format(" warp %u: deadlock: lane %u waits at %s while lane %u %s", w, at, op_name(lanes[at]->op), other,
                                        state_name(lanes[other]->state));
            return false;
        }
        std::string e = run_warp_op(lanes, count);
        if (!e.empty()) {
            l.error = where(l) + format(" warp %u: ", w) + e;
            return false;
        }
        for (unsigned i = 0; i < count; i++) lanes[i]->state = State::Ready;
    }
}

// Runs the current block to the end. Between two __syncthreads each warp runs as far as it can
// before the next one starts (warps in ascending or descending order, as their lanes), so a
// warp reading what another writes without a barrier in between sees a different value under
// the other schedule; likewise a lane reading another lane's write without __syncwarp.
bool run_block(Launch& l, bool descending) {
    const size_t n = l.threads.size();
    const unsigned warps = (n + 31) / 32;
    std::memset(l.smem - GUARD, CANARY, GUARD);
    std::memset(l.smem, SMEM_POISON, l.smem_bytes);
    std::memset(l.smem + l.smem_bytes, CANARY, GUARD);
    l.wgmma.assign(warps, WarpWgmma{});
    l.issues.assign((warps + 3) / 4, {});
    l.unfenced.assign(l.smem_bytes / 16 + 1, -1);
    l.async_view.assign(l.smem, l.smem + l.smem_bytes);
    l.fenced = false;
    l.mbarriers.clear();
    for (size_t i = 0; i < n; i++) {
        Thread& t = l.threads[i];
        t.state = State::Ready;
        t.copies.clear();
        t.committed = 0;
        t.unfenced.clear();
        t.ctx.start(stacks[i].base(), STACK, fiber_main);
    }
    for (;;) {
        for (unsigned k = 0; k < warps; k++)
            if (!run_warp(l, descending ? warps - 1 - k : k, descending)) return false;
        // Threads waiting on an mbarrier whose phase has moved on go again (a wait lands the
        // copies in flight to it).
        bool woke = false;
        const Thread* stuck = nullptr;
        for (Thread& t : l.threads) {
            if (t.state != State::AtMbarrier) continue;
            Mbarrier& b = l.mbarriers[t.mbar];
            if (!land(l, b)) return false;
            if (b.phase % 2 != t.parity) {
                t.state = State::Ready;
                woke = true;
            } else {
                stuck = &t;
            }
        }
        if (woke) continue;
        if (stuck) {
            const Mbarrier& b = l.mbarriers[stuck->mbar];
            l.error = where(l) + " " + who(*stuck) +
                      format(": deadlock: waits on the mbarrier at shared offset %zu for phase parity %u, which never completes (%u phases completed, the current one with %u arrivals and %lld "
                             "transaction bytes outstanding; a wait that missed a whole phase waits for the next of its parity) while every other thread waits or has exited",
                             stuck->mbar, stuck->parity, b.phase, b.pending, b.tx);
            return false;
        }
        // Every live thread waits at __syncthreads now, or none is live.
        bool live = false;
        for (Thread& t : l.threads)
            if (t.state == State::AtSyncthreads) {
                t.state = State::Ready;
                live = true;
            }
        if (!live) break;
        if (l.fenced) {
            std::memcpy(l.async_view.data(), l.smem, l.smem_bytes);
            l.fenced = false;
        }
    }
    for (const auto& [at, b] : l.mbarriers)
        if (!b.inflight.empty()) {
            l.error = where(l) + format(": ended with a bulk tensor copy to the mbarrier at shared offset %zu that no thread waited for", at);
            return false;
        }
    for (unsigned w = 0; w < warps; w++)
        if (!l.wgmma[w].ops.empty()) {
            l.error = where(l) + format(" warp %u: ended with %zu wgmma(s) not completed by a wgmma.wait_group", w, l.wgmma[w].ops.size());
            return false;
        }
    for (size_t i = 0; i < GUARD; i++)
        if (l.smem[-1 - (ptrdiff_t)i] != CANARY || l.smem[l.smem_bytes + i] != CANARY) {
            l.error = where(l) + format(": wrote outside its %zu bytes of dynamic shared memory (%s it)", l.smem_bytes,
                                        l.smem[-1 - (ptrdiff_t)i] != CANARY ? "before" : "past");
            return false;
        }
    return true;
}

bool launch(Launch& l, const unsigned grid[3], const unsigned block[3], bool descending) {
    size_t n = (size_t)block[0] * block[1] * block[2];
    while (stacks.size() < n) stacks.emplace_back();
    l.threads.assign(n, Thread{});
    for (size_t i = 0; i < n; i++) {
        Thread& t = l.threads[i];
        t.idx = {unsigned(i % block[0]), unsigned(i / block[0] % block[1]), unsigned(i / block[0] / block[1])};
        t.lane = i % 32;
        t.warp = i / 32;
    }
    // 128-byte aligned, as CUDA's dynamic shared memory, with a guard on each side.
    smem_storage.resize(l.smem_bytes + 2 * GUARD + 128);
    uintptr_t at = reinterpret_cast<uintptr_t>(smem_storage.data()) + GUARD;
    l.smem = reinterpret_cast<unsigned char*>((at + 127) & ~uintptr_t(127));
    grid_dim = {grid[0], grid[1], grid[2]};
    block_dim = {block[0], block[1], block[2]};
    // Blocks start in launch order (x fastest), or in reverse in the descending schedule: CUDA
    // promises no order, so a kernel that depends on one gives different results or hangs.
    size_t blocks = (size_t)grid[0] * grid[1] * grid[2];
    for (size_t i = 0; i < blocks; i++) {
        size_t b = descending ? blocks - 1 - i : i;
        block_idx = {unsigned(b % grid[0]), unsigned(b / grid[0] % grid[1]), unsigned(b / grid[0] / grid[1])};
        if (!run_block(l, descending)) return false;
    }
    return true;
}

std::string check_launch(const Kernel& k, const unsigned grid[3], const unsigned block[3], size_t smem, size_t nargs, const size_t* sizes) {
    if (nargs != k.sizes.size()) return format("takes %zu arguments, got %zu", k.sizes.size(), nargs);
    for (size_t i = 0; i < nargs; i++)
        if (sizes[i] != k.sizes[i]) return format("argument %zu is %zu bytes, the kernel's parameter %zu", i, sizes[i], k.sizes[i]);
    for (int d = 0; d < 3; d++)
        if (grid[d] == 0 || block[d] == 0) return "a grid or block dimension is 0";
    if (grid[1] > 65535 || grid[2] > 65535) return format("grid (%u,%u,%u) exceeds 65535 in y or z", grid[0], grid[1], grid[2]);
    if (grid[0] > 0x7fffffffu) return format("grid x %u exceeds 2^31 - 1", grid[0]);
    if ((size_t)block[0] * block[1] * block[2] > 1024 || block[2] > 64)
        return format("block (%u,%u,%u) exceeds 1024 threads or 64 in z", block[0], block[1], block[2]);
    if (smem > MAX_SMEM) return format("%zu bytes of dynamic shared memory exceed the %zu a block can have", smem, MAX_SMEM);
    return "";
}

}  // namespace

// ---- what the kernels call -----------------------------------------------------------------

void syncthreads() { yield(State::AtSyncthreads); }

void syncwarp(unsigned mask) { warp_op(Op::Syncwarp, mask); }

void shuffle(unsigned mask, const void* in, void* out, unsigned bytes, Shfl kind, int arg, int width) {
    Thread& t = self();
    t.in[0] = in;
    t.out = out;
    t.bytes = bytes;
    t.kind = kind;
    t.arg = arg;
    t.width = width;
    warp_op(Op::Shuffle, mask);
}

int vote_any(unsigned mask, int predicate) {
    Thread& t = self();
    int any;
    t.arg = predicate;
    t.out = &any;
    warp_op(Op::VoteAny, mask);
    return any;
}

void mma16816(float c[4], const unsigned a[4], const unsigned b[2]) {
    Thread& t = self();
    t.in[0] = a;
    t.in[1] = b;
    t.out = c;
    warp_op(Op::Mma, 0xffffffffu);
}

void wgmma(float* d, unsigned n, const unsigned* a, unsigned long long desc_a, unsigned long long desc_b, bool accumulate, bool trans_a, bool trans_b) {
    Thread& t = self();
    t.out = d;
    t.in[0] = a;
    t.n = n;
    t.desc[0] = desc_a;
    t.desc[1] = desc_b;
    t.accumulate = accumulate;
    t.trans_a = trans_a;
    t.trans_b = trans_b;
    warp_op(Op::Wgmma, 0xffffffffu);
}

void wgmma_commit() { warp_op(Op::WgmmaCommit, 0xffffffffu); }

void wgmma_wait(unsigned pending) {
    self().pending = pending;
    warp_op(Op::WgmmaWait, 0xffffffffu);
}

// fence.proxy.async.shared::cta: this thread's earlier shared-memory writes become visible to
// the async proxy (wgmma's operand reads).
void fence_proxy_async() {
    Thread& t = self();
    const int me = int(&t - L->threads.data());
    for (unsigned chunk : t.unfenced)
        if (L->unfenced[chunk] == me) L->unfenced[chunk] = -1;
    t.unfenced.clear();
    L->fenced = true;
}

// The mbarrier at `bar`: 8 aligned bytes of dynamic shared memory, initialised.
Mbarrier& mbarrier_at(const unsigned long long* bar) {
    if (reinterpret_cast<uintptr_t>(bar) % 8 || !in_smem(bar, 8)) fault(format("mbarrier at %p: not 8 aligned bytes of dynamic shared memory", static_cast<const void*>(bar)));
    auto it = L->mbarriers.find(shared_offset(bar));
    if (it == L->mbarriers.end()) fault(format("mbarrier at shared offset %zu used before mbarrier.init", shared_offset(bar)));
    return it->second;
}

// mbarrier.init: `count` arrivals complete a phase.
void mbarrier_init(unsigned long long* bar, unsigned count) {
    if (reinterpret_cast<uintptr_t>(bar) % 8 || !in_smem(bar, 8)) fault(format("mbarrier.init at %p: not 8 aligned bytes of dynamic shared memory", static_cast<void*>(bar)));
    if (count == 0) fault("mbarrier.init with a count of 0");
    Mbarrier& b = L->mbarriers[shared_offset(bar)];
    if (!b.inflight.empty()) fault("mbarrier.init on an mbarrier with copies in flight");
    b = Mbarrier{count, count, 0, 0, {}};
}

// mbarrier.arrive, after expect_tx of `expect_tx_bytes` (mbarrier.arrive.expect_tx) where not 0.
void mbarrier_arrive(unsigned long long* bar, unsigned expect_tx_bytes) {
    Mbarrier& b = mbarrier_at(bar);
    if (b.pending == 0) fault("mbarrier.arrive on a phase that has all its arrivals");
    b.tx += expect_tx_bytes;
    b.pending--;
    if (!L->eager_copies) settle(b);
    else if (!land(*L, b)) yield(State::Faulted);
}

// mbarrier.try_wait.parity in a loop: returns once the phase of parity `parity` has completed.
// Copies in flight land only once every thread that can go on without them has (the scheduler
// lands them when all wait), so a thread reading a tile before its wait sees the poison.
void mbarrier_wait(unsigned long long* bar, unsigned parity) {
    Mbarrier& b = mbarrier_at(bar);
    if (b.phase % 2 != parity % 2) return;
    Thread& t = self();
    t.mbar = shared_offset(bar);
    t.parity = parity % 2;
    yield(State::AtMbarrier);
}

// cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes: the
// box of `map` at element x of row y of plane z into `smem` (128-byte aligned), zeros where the
// box leaves the tensor, row r of the box at r times its row bytes (planes after each other),
// the 128-byte swizzle applied to the shared address (its 16-byte chunk bits 4–6 XOR bits 7–9,
// as wgmma's canonical layouts read them); completes the box's bytes on `bar`.
void tma_load(void* smem, const void* map, int x, int y, int z, unsigned long long* bar) {
    emu_tma::Map m;
    if (!emu_tma::decode(map, m)) fault("cp.async.bulk.tensor with a tensor map that cuTensorMapEncodeTiled did not encode");
    if (m.rank != 3) fault(format("cp.async.bulk.tensor.3d with a tensor map of rank %u", m.rank));
    const size_t row_bytes = size_t(m.box[0]) * m.elem_bytes, rows = size_t(m.box[1]) * m.box[2], bytes = row_bytes * rows;
    if (reinterpret_cast<uintptr_t>(smem) % 128 || !in_smem(smem, bytes)) fault(format("cp.async.bulk.tensor to %p: not %zu bytes of dynamic shared memory, 128-byte aligned", smem, bytes));
    Mbarrier& b = mbarrier_at(bar);
    Bulk bulk{{}, (long long)bytes};
    const size_t base = shared_offset(smem);
    for (size_t r = 0; r < rows; r++) {
        const long long gy = (long long)y + (long long)(r % m.box[1]), gz = (long long)z + (long long)(r / m.box[1]);
        for (size_t c = 0; c < row_bytes; c += 16) {
            size_t at = base + r * row_bytes + c;
            if (m.swizzle == emu_tma::B128) at ^= ((at >> 7) & 7) << 4;
            std::array<unsigned char, 16> data{};
            for (size_t e = 0; e < 16 / m.elem_bytes; e++) {
                const long long gx = (long long)x + (long long)((c / m.elem_bytes) + e);
                if (gx < 0 || gy < 0 || gz < 0 || gx >= (long long)m.dims[0] || gy >= (long long)m.dims[1] || gz >= (long long)m.dims[2]) continue;
                std::memcpy(data.data() + e * m.elem_bytes, reinterpret_cast<const unsigned char*>(m.global) + gz * m.strides[1] + gy * m.strides[0] + gx * m.elem_bytes, m.elem_bytes);
            }
            bulk.chunks.emplace_back(L->smem + at, data);
        }
    }
    b.inflight.push_back(std::move(bulk));
    if (L->eager_copies && !land(*L, b)) yield(State::Faulted);
}

void ldmatrix_x4(unsigned r[4], const void* row, bool trans) {
    Thread& t = self();
    t.in[0] = row;
    t.out = r;
    warp_op(trans ? Op::LdmatrixTrans : Op::Ldmatrix, 0xffffffffu);
}

void stmatrix_x4_trans(const unsigned r[4], void* row) {
    Thread& t = self();
    t.in[0] = row;
    t.in[1] = r;
    warp_op(Op::StmatrixTrans, 0xffffffffu);
}

void cp_async16(void* smem, const void* gmem, bool valid) {
    if (reinterpret_cast<uintptr_t>(smem) % 16 || !in_smem(smem, 16)) fault(format("cp_async16 to %p: not 16 aligned bytes of dynamic shared memory", smem));
    if (valid && reinterpret_cast<uintptr_t>(gmem) % 16) fault(format("cp_async16 from %p: not 16-byte aligned", gmem));
    Thread& t = self();
    Copy c{static_cast<unsigned char*>(smem), {}, t.committed};
    if (valid) std::memcpy(c.data, gmem, 16);
    if (L->eager_copies) std::memcpy(c.dst, c.data, 16);
    t.copies.push_back(c);
}

void cp_async_commit() { self().committed++; }

// cp.async.wait_group `pending`: completes every copy except those of the `pending` most
// recently committed groups (and any not committed yet).
void cp_async_wait(unsigned pending) {
    Thread& t = self();
    const int me = int(&t - L->threads.data());
    std::vector<Copy> rest;
    for (const Copy& c : t.copies) {
        if (c.group + pending < t.committed) {
            std::memcpy(c.dst, c.data, 16);
            // Whole 16-byte chunks (cp_async16 checks the alignment).
            unsigned chunk = unsigned((c.dst - L->smem) / 16);
            L->unfenced[chunk] = me;
            t.unfenced.push_back(chunk);
        } else {
            rest.push_back(c);
        }
    }
    t.copies.swap(rest);
}

unsigned char* dynamic_smem() { return L->smem; }

void spin_forever() { fault("polls a flag that no block started before it set: on a GPU it could wait forever"); }

size_t shared_offset(const void* p) {
    if (!in_smem(p, 1)) fault(format("address %p is not in dynamic shared memory", p));
    return static_cast<const unsigned char*>(p) - L->smem;
}

void register_kernel(const char* name, void* fn, Invoke invoke, const size_t* sizes, size_t count) {
    registry().push_back(Kernel{name, fn, invoke, std::vector<size_t>(sizes, sizes + count)});
}

}  // namespace emu

// ---- C ABI ---------------------------------------------------------------------------------------

// Runs `kernel` over the grid, as cuLaunchKernel would: args[i] points at the i-th argument's
// value, sizes[i] is its size (checked against the kernel's parameter). schedule 0 starts the
// blocks in launch order and resumes each block's threads in ascending order, 1 does both in
// descending order. Returns 0, or -1 with emu_last_error() saying why.
extern "C" __attribute__((visibility("default"))) int emu_launch(const char* kernel, const unsigned grid[3], const unsigned block[3], size_t smem_bytes,
                                                                 size_t nargs, void* const* args, const size_t* sizes, int schedule) {
    using namespace emu;
    last_error.clear();
    const Kernel* k = nullptr;
    for (const Kernel& r : registry())
        if (r.name == kernel) k = &r;
    if (!k) {
        last_error = format("no kernel named `%s`", kernel);
        return -1;
    }
    std::string e = check_launch(*k, grid, block, smem_bytes, nargs, sizes);
    if (e.empty() && schedule != 0 && schedule != 1) e = format("schedule %d is neither 0 (ascending) nor 1 (descending)", schedule);
    if (!e.empty()) {
        last_error = "kernel `" + k->name + "`: " + e;
        return -1;
    }
    Launch l;
    l.kernel = k;
    l.args = args;
    l.smem_bytes = smem_bytes;
    l.eager_copies = schedule == 1;
    L = &l;
    bool ok = launch(l, grid, block, schedule == 1);
    L = nullptr;
    if (!ok) last_error = l.error;
    return ok ? 0 : -1;
}

extern "C" __attribute__((visibility("default"))) const char* emu_last_error() { return emu::last_error.c_str(); }

// cuTensorMapEncodeTiled's emulation (tensor_map.h) for callers without the emulated driver:
// writes the 128-byte map to `out` and returns "" or why the arguments are refused.
extern "C" __attribute__((visibility("default"))) const char* emu_encode_tensor_map(void* out, uint32_t rank, uint32_t elem_bytes, const void* global, const uint64_t* dims,
                                                                                   const uint64_t* strides, const uint32_t* box, uint32_t swizzle) {
    return emu_tma::encode(out, rank, elem_bytes, global, dims, strides, box, swizzle);
}

// The byte sizes of `kernel`'s parameters, for a caller that only has cuLaunchKernel's argument
// array (the emulated driver, tests/cuda_emu/device): writes up to `max` of them to `sizes` and
// returns how many parameters the kernel has, or -1 when no kernel has that name.
extern "C" __attribute__((visibility("default"))) long emu_kernel_params(const char* kernel, size_t* sizes, size_t max) {
    for (const emu::Kernel& r : emu::registry())
        if (r.name == kernel) {
            for (size_t i = 0; i < r.sizes.size() && i < max; i++) sizes[i] = r.sizes[i];
            return (long)r.sizes.size();
        }
    return -1;
}
