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
// v as an act_t holds it (what ld reads back after st).
__device__ __forceinline__ float stored(float v) { return __bfloat162float(__float2bfloat16(v)); }
#else
typedef float act_t;
__device__ __forceinline__ float ld(const act_t* p) { return *p; }
__device__ __forceinline__ void st(act_t* p, float v) { *p = v; }
__device__ __forceinline__ float stored(float v) { return v; }
#endif
typedef __nv_bfloat16 bf16;  // tensor-core operands, in either storage

// Two floats as a bf16 pair register (lo in the low half).
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    return (unsigned)__bfloat16_as_ushort(__float2bfloat16(lo)) | ((unsigned)__bfloat16_as_ushort(__float2bfloat16(hi)) << 16);
}
// Two adjacent activations in one load or store (p 4-byte aligned in bf16, 8-byte in f32).
__device__ __forceinline__ void store_pair(act_t* p, float lo, float hi) {
#ifdef MOTLEY_ACT_BF16
    *(unsigned*)p = pack_bf16(lo, hi);
#else
    *(float2*)p = make_float2(lo, hi);
#endif
}
__device__ __forceinline__ float2 load_pair(const act_t* p) {
#ifdef MOTLEY_ACT_BF16
    const unsigned w = *(const unsigned*)p;
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
#else
    return *(const float2*)p;
#endif
}

// 8 f32 (16-byte aligned) in two 16-byte pieces, or VEC one by one.
template <int VEC>
__device__ __forceinline__ void load_f32(const float* p, float (&v)[VEC]) {
    if constexpr (VEC != 8) {
#pragma unroll
        for (int k = 0; k < VEC; k++) v[k] = p[k];
    } else {
        const float4 a = ((const float4*)p)[0], b = ((const float4*)p)[1];
        const float all[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
        for (int k = 0; k < 8; k++) v[k] = all[k];
    }
}

// The same stored: 8 f32 in two 16-byte pieces, or VEC one by one.
template <int VEC>
__device__ __forceinline__ void store_f32(float* p, const float (&v)[VEC]) {
    if constexpr (VEC != 8) {
#pragma unroll
        for (int k = 0; k < VEC; k++) p[k] = v[k];
    } else {
        ((float4*)p)[0] = make_float4(v[0], v[1], v[2], v[3]);
        ((float4*)p)[1] = make_float4(v[4], v[5], v[6], v[7]);
    }
}

// VEC consecutive activations as floats. VEC = 8 moves them in 16-byte pieces (one for 8 bf16,
// two for 8 f32), so the address must be 16-byte aligned: kernels over rows take 8 where the
// rows' width is a multiple of 8 and their buffers are aligned (`vec_width` of launch.rs), 1 (or
// the 2 of a pair) otherwise. One 16-byte access moves what eight 2-byte ones do, and the index
// arithmetic per element shrinks eightfold.
template <int VEC>
__device__ __forceinline__ void load_vec(const act_t* p, float (&v)[VEC]) {
    if constexpr (VEC != 8) {
#pragma unroll
        for (int k = 0; k < VEC; k++) v[k] = ld(p + k);
    } else {
#ifdef MOTLEY_ACT_BF16
        const uint4 raw = *(const uint4*)p;
        const unsigned w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
        for (int k = 0; k < 4; k++) {
            v[2 * k] = __uint_as_float(w[k] << 16);
            v[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
        }
#else
        load_f32<8>(p, v);
#endif
    }
}
template <int VEC>
__device__ __forceinline__ void store_vec(act_t* p, const float (&v)[VEC]) {
    if constexpr (VEC != 8) {
#pragma unroll
        for (int k = 0; k < VEC; k++) st(p + k, v[k]);
    } else {
#ifdef MOTLEY_ACT_BF16
        *(uint4*)p = make_uint4(pack_bf16(v[0], v[1]), pack_bf16(v[2], v[3]), pack_bf16(v[4], v[5]), pack_bf16(v[6], v[7]));
#else
        store_f32<8>(p, v);
#endif
    }
}

// Calls f(i) for i = 0, VEC, 2·VEC, … below n, grid-stride (n a multiple of VEC).
template <int VEC, class F>
__device__ __forceinline__ void for_each_flat(size_t n, F f) {
    for (size_t p = blockIdx.x * (size_t)blockDim.x + threadIdx.x; p < n / VEC; p += (size_t)gridDim.x * blockDim.x) f(p * VEC);
}
// Calls f(j) for j = 0, VEC, 2·VEC, … below c, the block's threads taking them in turn (a row
// per block; c a multiple of VEC).
template <int VEC, class F>
__device__ __forceinline__ void for_each_in_row(int c, F f) {
    for (int j = threadIdx.x * VEC; j < c; j += blockDim.x * VEC) f(j);
}

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
// Waits until at most N committed groups are still in flight (the N most recent).
template <int N>
__device__ __forceinline__ void cp_async_wait_pending() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
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

// 2^x on the special-function unit alone: ex2.approx.ftz (results below 2^-126 flush to 0, a
// probability the softmax may as well drop). exp2f, compiled without fast math, wraps the same
// instruction in a range check and two scalings for denormal results: four instructions instead
// of one (the attention kernels' SASS), in loops that issue one per score.
__device__ __forceinline__ float exp2_ftz(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
    return r;
}
#endif  // MOTLEY_EMU

// SwiGLU, SiLU(g) · u, and its backward: one expression each for every kernel that computes
// them (swiglu.cu, the fused expert kernels), so that they agree bit for bit.
// On the SFU alone: exp2_ftz (e^−x underflowing to 0 gives 1, as it should) and the
// approximate reciprocal (__fdividef, 2 ulp; 1 / ∞ = 0 for x < −88). An IEEE 1.0f / y is a
// range check, a branch to a slow path and three FMAs around the SFU's reciprocal, and __expf
// a range check and two scalings around its exponential: ~14 instructions per element more in
// the fused expert kernels' epilogues, where this runs once per output.
__device__ __forceinline__ float sigmoidf(float x) { return __fdividef(1.0f, 1.0f + exp2_ftz(-1.4426950408889634f * x)); }
__device__ __forceinline__ float swiglu(float g, float u) { return g * sigmoidf(g) * u; }
// The gradients of g and u from the output's gradient da.
__device__ __forceinline__ void swiglu_grad(float g, float u, float da, float& dg, float& du) {
    const float s = sigmoidf(g);
    du = da * g * s;
    dg = da * u * s * (1.0f + g * (1.0f - s));
}

// ---- staging rows in shared memory ------------------------------------------------------------
// A tile of ROWS rows into shared memory, D columns each, row r of the tile starting at
// from(r, true): the 16-byte chunk c (8 values) of row r goes to at(r, c); rows r ≥ valid are
// zero and not read (from(r, false) need only give an address, not a valid one: a strided tile
// adds the same per-thread offset whatever the row, so the offsets stay out of the loop over
// tiles). The block's NT threads (blockDim.x = NT) take chunks in
// turn, a fixed number each. UNROLL unrolls them: as a loop the copies cost tens of
// instructions each in the Hopper attention kernels' SASS (trip-count remainders, index
// arithmetic redone per chunk); the mma.sync backward, at 255 registers, spills with them
// unrolled, so it keeps the loop. bf16 storage queues cp.async copies (the caller commits and
// waits); f32 storage converts synchronously.
template <int D, int ROWS, int NT, bool UNROLL = true, class At, class From>
__device__ __forceinline__ void load_rows_from(At at, From from, int valid) {
    constexpr int CHUNKS = D / 8, TOTAL = ROWS * CHUNKS;
    auto copy = [&](int r, int c) {
        const bool ok = r < valid;
        const act_t* src = from(r, ok) + 8 * c;
        bf16* to = at(r, c);
#ifdef MOTLEY_ACT_BF16
        cp_async16(to, src, ok);
#else
        for (int k = 0; k < 8; k++) to[k] = __float2bfloat16(ok ? src[k] : 0.0f);
#endif
    };
    if constexpr (UNROLL) {
#pragma unroll
        for (int k = 0; k < (TOTAL + NT - 1) / NT; k++) {
            const int idx = threadIdx.x + k * NT;
            if (TOTAL % NT != 0 && idx >= TOTAL) break;
            // Where NT threads cover whole rows, a thread keeps its chunk column and steps rows.
            if constexpr (NT % CHUNKS == 0) copy(threadIdx.x / CHUNKS + k * (NT / CHUNKS), threadIdx.x % CHUNKS);
            else copy(idx / CHUNKS, idx % CHUNKS);
        }
    } else {
        for (int idx = threadIdx.x; idx < TOTAL; idx += NT) copy(idx / CHUNKS, idx % CHUNKS);
    }
}
// The same for rows t0.. of the sequence at row0 of src (zero past seq), ld_src apart, from
// column col. Unrolled, the tile's first row is addressed once in 64 bits and the others at
// 32-bit offsets from it (64-bit arithmetic per copy was ~15 instructions of the attention
// backward's step); the mma.sync backward's copy loop spills holding that address, so the
// loop forms each row's.
template <int D, int ROWS, int NT, bool UNROLL = true, class At>
__device__ __forceinline__ void load_rows(At at, const act_t* src, size_t row0, int t0, int seq, int ld_src, int col) {
    if constexpr (UNROLL) {
        const act_t* first = src + (row0 + t0) * ld_src + col;
        load_rows_from<D, ROWS, NT>(at, [=](int r, bool) { return first + unsigned(r * ld_src); }, seq - t0);
    } else {
        load_rows_from<D, ROWS, NT, false>(at, [=](int r, bool ok) { return src + (row0 + t0 + (ok ? r : 0)) * ld_src + col; }, seq - t0);
    }
}

// ---- wgmma (Hopper, sm_90a): warpgroup matrix multiply from shared memory -------------------
// A warpgroup (4 consecutive warps, 128 threads) computes a 64 × N product; warp w % 4 holds
// rows 16w..16w+15 of the accumulator in mma.m16n8k16's C layout, repeated over N in steps of 8
// (register j: row g + 8·(j/2 % 2), column 8·(j/4) + 2q + j % 2). Shared operands are described
// by 64-bit descriptors (sw128_desc) in the 128-byte swizzled layout: rows of 128 bytes (64
// bf16) whose 16-byte chunk c lies at c ^ (row % 8), tiles 1024-byte aligned. The product runs
// asynchronously: wgmma_fence before the first one after the registers it uses were written,
// wgmma_commit closes a group, wgmma_wait<n> waits until n groups are left in flight, and only
// then may the accumulators be read (fence_operands keeps the compiler from reading them
// earlier) or the operands be overwritten. Shared memory written by cp.async needs
// fence_proxy_async (then a barrier) before a wgmma reads it.
// A CUtensorMap (cuTensorMapEncodeTiled's 128 opaque bytes), a kernel parameter passed by value
// as a __grid_constant__: what tma_load_3d reads.
struct alignas(64) TensorMap {
    unsigned long long words[16];
};
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) && !defined(MOTLEY_EMU)
#define MOTLEY_WGMMA 1
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int PENDING>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(PENDING) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// ldmatrix's store (sm_90): four 8×8 bf16 matrices, register i of lane t holding matrix i's row
// t/4, elements 2(t%4) and 2(t%4)+1 (an mma accumulator pair), stored transposed: lanes
// 8i..8i+7 give the addresses of the stored rows of matrix i (16 bytes each), row a holding
// matrix i's column a.
__device__ __forceinline__ void stmatrix_x4_trans(const unsigned r[4], void* row) {
    const unsigned addr = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3]) : "memory");
}
template <int N>
__device__ __forceinline__ void fence_operands(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(d[i])::"memory");
}
// The same for A operands in registers: the hardware reads them until the wait, so they stay
// live (and unchanged) until then.
template <int N>
__device__ __forceinline__ void fence_operands(unsigned (&a)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; i++)
#pragma unroll
        for (int k = 0; k < 4; k++) asm volatile("" : "+r"(a[i][k])::"memory");
}
// The accumulator operands of a wgmma: its 32 (N = 64), 64 (N = 128) or 128 (N = 256) f32
// registers as inline-asm outputs "+f" and as the "{%0, …}" list they fill.
#define WGMMA_D8(d, i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define WGMMA_D32(d) WGMMA_D8(d, 0), WGMMA_D8(d, 8), WGMMA_D8(d, 16), WGMMA_D8(d, 24)
#define WGMMA_D64(d) WGMMA_D32(d), WGMMA_D8(d, 32), WGMMA_D8(d, 40), WGMMA_D8(d, 48), WGMMA_D8(d, 56)
#define WGMMA_D128(d) WGMMA_D64(d), WGMMA_D8(d, 64), WGMMA_D8(d, 72), WGMMA_D8(d, 80), WGMMA_D8(d, 88), WGMMA_D8(d, 96), WGMMA_D8(d, 104), WGMMA_D8(d, 112), WGMMA_D8(d, 120)
#define WGMMA_LIST32                                                                                                   \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
    "%24, %25, %26, %27, %28, %29, %30, %31}"
#define WGMMA_LIST64                                                                                                   \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
    "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, "  \
    "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define WGMMA_LIST128                                                                                                   \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, "  \
    "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, "   \
    "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, "   \
    "%68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, "   \
    "%90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, "   \
    "%110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}"

// D (64 × 128, f32) [+]= A (64 × 16, shared, K-major) · B (16 × 128, shared, K-major: B's
// columns are rows of 16 in memory), one warpgroup.
__device__ __forceinline__ void wgmma_m64n128k16_ss(float (&d)[64], unsigned long long a, unsigned long long b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " WGMMA_LIST64 ", %64, %65, p, 1, 1, 0, 0;\n}\n"
                 : WGMMA_D64(d)
                 : "l"(a), "l"(b), "r"(accumulate));
}
// D (64 × 256, f32) [+]= A (64 × 16, shared: K-major, or MN-major with TRANS_A = 1: A's 16
// columns are rows of 64 in memory) · B (16 × 256, shared: K-major, or MN-major with
// TRANS_B = 1: four 64-column strips, the descriptor's leading offset apart), one warpgroup.
template <int TRANS_B, int TRANS_A = 0>
__device__ __forceinline__ void wgmma_m64n256k16_ss(float (&d)[128], unsigned long long a, unsigned long long b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 " WGMMA_LIST128 ", %128, %129, p, 1, 1, %132, %131;\n}\n"
                 : WGMMA_D128(d)
                 : "l"(a), "l"(b), "r"(accumulate), "n"(TRANS_B), "n"(TRANS_A));
}
// D (64 × 64, f32) [+]= A (64 × 16, shared, K-major) · B (16 × 64, shared: K-major, or
// MN-major with TRANS_B = 1), one warpgroup.
template <int TRANS_B>
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&d)[32], unsigned long long a, unsigned long long b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " WGMMA_LIST32 ", %32, %33, p, 1, 1, 0, %35;\n}\n"
                 : WGMMA_D32(d)
                 : "l"(a), "l"(b), "r"(accumulate), "n"(TRANS_B));
}
// D (64 × 64, f32) [+]= A (64 × 16, registers: mma.m16n8k16's A fragment on each warp's 16 rows)
// · B (16 × 64, shared: K-major, or MN-major with TRANS_B = 1: B's rows are rows of 64 in
// memory, transposed by the instruction), one warpgroup.
template <int TRANS_B>
__device__ __forceinline__ void wgmma_m64n64k16_rs(float (&d)[32], const unsigned (&a)[4], unsigned long long b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " WGMMA_LIST32 ", {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
                 : WGMMA_D32(d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate), "n"(TRANS_B));
}
// The Tensor Memory Accelerator: thread `issue` of a block copies a tile described by a tensor
// map (cuTensorMapEncodeTiled, passed by value as a __grid_constant__ TensorMap) into shared
// memory, zeros outside the tensor, 128-byte swizzled as sw128_offset lays tiles out; the copy
// completes its bytes on an mbarrier in shared memory, which the threads wait on (no
// fence.proxy.async: wgmma reads the async proxy's writes). An mbarrier's phase completes once
// its `count` arrivals have arrived and the bytes announced with them (expect_tx) have landed;
// a thread waits for the phase of a parity, so a barrier reused for copy after copy needs every
// waiter to have seen one phase before the next can complete.
__device__ __forceinline__ void mbar_init(unsigned long long* bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"((unsigned)__cvta_generic_to_shared(bar)), "r"(count) : "memory");
}
// Makes initialised barriers visible to the async proxy (before the block's first barrier).
__device__ __forceinline__ void fence_mbarrier_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void mbar_arrive_expect_tx(unsigned long long* bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"((unsigned)__cvta_generic_to_shared(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned parity) {
    unsigned done = 0;
    while (!done) {
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done)
                     : "r"((unsigned)__cvta_generic_to_shared(bar)), "r"(parity)
                     : "memory");
    }
}
// The box of a rank-3 `map` at element x of row y of plane z into `smem`.
__device__ __forceinline__ void tma_load_3d(void* smem, const TensorMap& map, int x, int y, int z, unsigned long long* bar) {
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"((unsigned)__cvta_generic_to_shared(smem)),
                 "l"(reinterpret_cast<unsigned long long>(&map)), "r"(x), "r"(y), "r"(z), "r"((unsigned)__cvta_generic_to_shared(bar))
                 : "memory");
}
#elif defined(MOTLEY_EMU)
#define MOTLEY_WGMMA 1
#endif

#ifdef MOTLEY_WGMMA
// Byte offset of 16-byte chunk `chunk` (0..7) of row `row` in a 1024-byte aligned tile of the
// 128-byte swizzled layout.
__device__ __forceinline__ unsigned sw128_offset(int row, int chunk) { return row * 128 + ((chunk ^ (row & 7)) << 4); }
// Descriptor of a K-major or MN-major bf16 operand at `tile` in the 128-byte swizzled layout,
// groups of 8 rows (K-major: of the operand's rows; MN-major: of k) `sbo` bytes apart; `lbo`
// the distance between 64-column strips of an MN-major operand wider than 64 (unused K-major,
// where a row of 64 is the whole step).
__device__ __forceinline__ unsigned long long sw128_desc(const void* tile, unsigned sbo, unsigned lbo = 16) {
    const unsigned long long addr = __cvta_generic_to_shared(tile);
    return ((addr & 0x3ffff) >> 4) | ((unsigned long long)(lbo >> 4) << 16) | ((unsigned long long)(sbo >> 4) << 32) | (1ull << 62);
}
// The descriptor of the operand `bytes` (a multiple of 16) further on: the start address is the
// low field, in 16-byte units, and shared addresses stay below its 2^18 bytes, so adding there is
// exact. Forming each k-step's descriptor from its address took about four instructions a
// wgmma in the kernels' SASS.
__device__ __forceinline__ unsigned long long desc_plus(unsigned long long desc, unsigned bytes) { return desc + (bytes >> 4); }
// Where load_rows puts chunk c of row r of a swizzled tile (rows of 64 bf16).
__device__ __forceinline__ auto swizzled(unsigned char* tile) {
    return [=](int r, int c) { return (bf16*)(tile + sw128_offset(r, c)); };
}
#endif

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
