// Shared by every kernel file: the activation storage type and block/warp reductions.
// Prepended to each .cu source by the Rust loader (NVRTC sees one translation unit per file).
//
// `act_t` is the activation storage: bf16 when built with -DMOTLEY_ACT_BF16 (mixed precision),
// else float. Every kernel argument has a fixed role (see src/backend/mod.rs): activations and
// working weights are act_t; master weights, gradients, moments and statistics are float in
// both variants.
#include <cuda_bf16.h>

#ifdef MOTLEY_ACT_BF16
typedef __nv_bfloat16 act_t;
__device__ __forceinline__ float ld(const act_t* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void st(act_t* p, float v) { *p = __float2bfloat16(v); }
#else
typedef float act_t;
__device__ __forceinline__ float ld(const act_t* p) { return *p; }
__device__ __forceinline__ void st(act_t* p, float v) { *p = v; }
#endif

// A kernel's dynamic shared memory (the size is the launch's `shared_mem_bytes`). The CPU
// emulator of the kernel tests (MOTLEY_EMU) defines it, and the primitives below, itself.
#ifndef MOTLEY_EMU
#define DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

#define WARP 32
// NVRTC has no <math.h>; the float infinity by its bit pattern.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ double warp_sum_f64(double v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block in a fixed tree (deterministic); every thread gets the result.
// `scratch` holds one float per warp; blockDim.x must be a multiple of 32.
__device__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}
__device__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : -INFINITY;
    return warp_max(v);
}

// ---- tensor-core and async-copy primitives (inline PTX, sm_80+) -------------------------------
// The only inline assembly of the kernels lives here, behind these functions, so that the CPU
// emulator of the kernel tests (tests/cuda_emu) can stand in for exactly this set.
//
// Fragments of mma.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"), g = lane / 4,
// q = lane % 4: A (16×16, bf16 pairs) registers 0..3 hold (row g, cols 2q..2q+1), (row g+8,
// cols 2q..), (row g, cols 2q+8..), (row g+8, cols 2q+8..); B (16×8) registers 0, 1 hold (rows
// 2q..2q+1, col g), (rows 2q+8.., col g); C (16×8, f32) holds (g, 2q), (g, 2q+1), (g+8, 2q),
// (g+8, 2q+1). A pair's lower index is the low half of its register.

#ifndef MOTLEY_EMU
// c += a · b, bf16 × bf16 → f32.
__device__ __forceinline__ void mma16816(float c[4], const unsigned a[4], const unsigned b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Four 8×8 bf16 matrices from shared memory: lanes 8i..8i+7 give the row addresses (16 bytes
// each) of matrix i; register i of lane t gets matrix i's (row t/4, cols 2(t%4), 2(t%4)+1).
__device__ __forceinline__ void ldmatrix_x4(unsigned r[4], const void* row) {
    unsigned addr = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
// The same, transposed: register i of lane t gets matrix i's (rows 2(t%4), 2(t%4)+1, col t/4).
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned r[4], const void* row) {
    unsigned addr = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// 16 bytes global → shared without going through registers; zero-fills when !valid (the source
// is then not read). Completes at the next cp_async_wait_* after its cp_async_commit.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    unsigned addr = (unsigned)__cvta_generic_to_shared(smem);
    int src_bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(addr), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits for all but the most recently committed group.
__device__ __forceinline__ void cp_async_wait_prior() { asm volatile("cp.async.wait_group 1;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::); }

// A flag another block sets: loaded with acquire semantics at GPU scope (what that block wrote
// before its release store is visible after), and stored with release semantics.
__device__ __forceinline__ unsigned load_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ void store_release(unsigned* p, unsigned v) {
    asm volatile("st.release.gpu.global.u32 [%0], %1;\n" :: "l"(p), "r"(v) : "memory");
}
// One round of polling such a flag.
__device__ __forceinline__ void spin_pause() { __nanosleep(64); }
#endif  // MOTLEY_EMU

// ---- turns: blocks adding to one buffer in a fixed order -------------------------------------
// A turn counter counts the blocks that have added their part. A block waits until the count
// is its place in the order, adds with plain loads and stores (L2 only: __ldcg / __stcg, since L1
// is not coherent between SMs), then passes the turn on. A block only waits on blocks that
// started before it (launch_ticket), which are resident and so make progress: nothing waits on a
// block that cannot start, whatever order the GPU starts blocks in.
//
// launch_ticket: the block's place in start order among the blocks taking from one counter (0
// for the first). Work chosen by ticket instead of blockIdx is work in start order (CUDA does not
// promise that blocks start in launch order; FlashAttention-3's deterministic backward assumes
// it). Returns the ticket in shared memory, for a kernel short of registers to read it where used.
__device__ __forceinline__ const unsigned& launch_ticket(unsigned* counter) {
    __shared__ unsigned ticket;
    if (threadIdx.x == 0) ticket = atomicAdd(counter, 1u);
    __syncthreads();
    return ticket;
}
__device__ __forceinline__ void wait_turn(const unsigned* turn, unsigned place) {
    if (threadIdx.x == 0)
        while (load_acquire(turn) != place) spin_pause();
    __syncthreads();
}
// Starts with a barrier: every thread's stores are done before the count moves.
__device__ __forceinline__ void pass_turn(unsigned* turn, unsigned count) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        store_release(turn, count);
    }
}
