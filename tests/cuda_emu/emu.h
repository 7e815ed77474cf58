// CPU emulator of the CUDA subset motley's kernels use: the prelude force-included
// (g++ -include emu.h -DMOTLEY_EMU) before each kernel file, which is compiled unchanged inside a
// namespace of its own. emu.cpp runs launches: each CUDA thread is a fiber on the calling OS
// thread, the blocks of a launch run one after another, and a fiber runs until it reaches a
// barrier (__syncthreads, or a warp collective: __syncwarp, shuffles, votes, mma, ldmatrix).
//
// Stands in for exactly what common.cuh leaves out under MOTLEY_EMU (DYNAMIC_SMEM and the
// inline-PTX primitives), plus the CUDA built-ins and keywords the kernels use.
#pragma once

#include <math.h>

#include <cstddef>
#include <cstring>
#include <type_traits>
#include <utility>

#include <cuda_bf16.h>

#define __global__
#define __device__
#define __forceinline__ inline
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __grid_constant__
// Blocks run one after another on the launching OS thread, so a static is the block's shared
// memory; thread_local keeps launches on different OS threads (parallel tests) apart.
#define __shared__ static thread_local

namespace emu {

struct uint3 {
    unsigned x, y, z;
};

// The running fiber's threadIdx, and the launch's block and grid.
extern thread_local const uint3* thread_idx;
extern thread_local uint3 block_idx, block_dim, grid_dim;

enum class Shfl { Idx, Xor };

void syncthreads();
void syncwarp(unsigned mask);
void shuffle(unsigned mask, const void* in, void* out, unsigned bytes, Shfl kind, int arg, int width);
int vote_any(unsigned mask, int predicate);
void mma16816(float c[4], const unsigned a[4], const unsigned b[2]);
void ldmatrix_x4(unsigned r[4], const void* row, bool trans);
void stmatrix_x4_trans(const unsigned r[4], void* row);
void cp_async16(void* smem, const void* gmem, bool valid);
void cp_async_commit();
void cp_async_wait(unsigned pending);
void wgmma(float* d, unsigned n, const unsigned* a, unsigned long long desc_a, unsigned long long desc_b, bool accumulate, bool trans_a, bool trans_b);
void wgmma_commit();
void wgmma_wait(unsigned pending);
void fence_proxy_async();
// mbarrier (the shared-memory barriers the Tensor Memory Accelerator's copies complete on) and
// the bulk tensor copy (TMA: cp.async.bulk.tensor, 2 or 3 dimensions) of a tile described by a
// tensor map.
void mbarrier_init(unsigned long long* bar, unsigned count);
void mbarrier_arrive(unsigned long long* bar, unsigned expect_tx_bytes);
void mbarrier_wait(unsigned long long* bar, unsigned parity);
void tma_load(void* smem, const void* map, int x, int y, int z, unsigned long long* bar);
unsigned char* dynamic_smem();
[[noreturn]] void spin_forever();
size_t shared_offset(const void* p);

// Kernel registration: a kernel's parameter types, deduced from its pointer, unmarshal the
// cuLaunchKernel-style argument array (args[i] points at the i-th value).
using Invoke = void (*)(void* fn, void* const* args);
void register_kernel(const char* name, void* fn, Invoke invoke, const size_t* sizes, size_t count);

template <class T>
T arg(const void* p) {
    T v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

template <class... A>
struct Registration {
    Registration(const char* name, void (*f)(A...)) {
        static const size_t sizes[] = {sizeof(A)..., 0};
        register_kernel(name, reinterpret_cast<void*>(f), &invoke, sizes, sizeof...(A));
    }
    static void invoke(void* fn, void* const* args) { call(reinterpret_cast<void (*)(A...)>(fn), args, std::index_sequence_for<A...>{}); }
    template <size_t... I>
    static void call(void (*f)(A...), void* const* args, std::index_sequence<I...>) {
        f(arg<A>(args[I])...);
    }
};

}  // namespace emu

#define threadIdx (*emu::thread_idx)
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define gridDim emu::grid_dim

#define DYNAMIC_SMEM(name) unsigned char* name = emu::dynamic_smem()

inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::syncwarp(mask); }

template <class T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffled value");
    T out;
    emu::shuffle(mask, &v, &out, sizeof(T), emu::Shfl::Idx, src_lane, width);
    return out;
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffled value");
    T out;
    emu::shuffle(mask, &v, &out, sizeof(T), emu::Shfl::Xor, lane_mask, width);
    return out;
}
inline int __any_sync(unsigned mask, int predicate) { return emu::vote_any(mask, predicate); }

// The fast intrinsics go through exp2/log2 as the hardware's ex2.approx / lg2.approx do.
inline float __expf(float x) { return exp2f(x * 1.4426950408889634f); }
inline float __logf(float x) { return log2f(x) * 0.6931471805599453f; }
// div.approx.f32: x · rcp.approx(y), within 2 ulp of x / y (exact here).
inline float __fdividef(float x, float y) { return x / y; }
// ex2.approx.ftz: results below the smallest normal float flush to 0.
inline float exp2_ftz(float x) {
    const float r = exp2f(x);
    return r < 1.17549435e-38f ? 0.0f : r;
}
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __int_as_float(int i) { return emu::arg<float>(&i); }
inline int __float_as_int(float f) { return emu::arg<int>(&f); }
inline float __uint_as_float(unsigned u) { return emu::arg<float>(&u); }
inline size_t __cvta_generic_to_shared(const void* p) { return emu::shared_offset(p); }

// CUDA's vector type for paired f32 stores (8-byte aligned, as the hardware requires).
struct alignas(8) float2 {
    float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
// And the 16-byte ones (16-byte aligned).
struct alignas(16) float4 {
    float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

// CUDA's overloads of min and max: the usual arithmetic conversions, fminf/fmaxf for floats.
template <class A, class B>
typename std::common_type<A, B>::type min(A a, B b) {
    using C = typename std::common_type<A, B>::type;
    if constexpr (std::is_floating_point<C>::value) return fmin((C)a, (C)b);
    else return (C)b < (C)a ? (C)b : (C)a;
}
template <class A, class B>
typename std::common_type<A, B>::type max(A a, B b) {
    using C = typename std::common_type<A, B>::type;
    if constexpr (std::is_floating_point<C>::value) return fmax((C)a, (C)b);
    else return (C)a < (C)b ? (C)b : (C)a;
}

// ---- the primitives common.cuh implements in inline PTX (see its comments) -------------------
inline void mma16816(float c[4], const unsigned a[4], const unsigned b[2]) { emu::mma16816(c, a, b); }
inline void ldmatrix_x4(unsigned r[4], const void* row) { emu::ldmatrix_x4(r, row, false); }
inline void ldmatrix_x4_trans(unsigned r[4], const void* row) { emu::ldmatrix_x4(r, row, true); }
inline void stmatrix_x4_trans(const unsigned r[4], void* row) { emu::stmatrix_x4_trans(r, row); }
inline void cp_async16(void* smem, const void* gmem, bool valid) { emu::cp_async16(smem, gmem, valid); }
inline void cp_async_commit() { emu::cp_async_commit(); }
template <int N>
inline void cp_async_wait_pending() { emu::cp_async_wait(N); }
// cp.async.wait_all is commit_group followed by wait_group 0 (PTX ISA).
inline void cp_async_wait_all() {
    emu::cp_async_commit();
    emu::cp_async_wait(0);
}
// wgmma: a warp collective on each warp's 16 rows of the warpgroup's 64, run at its
// wgmma.wait_group (emu.cpp); wgmma.fence and the compiler fences only order registers.
inline void wgmma_fence() {}
inline void wgmma_commit() { emu::wgmma_commit(); }
template <int PENDING>
inline void wgmma_wait() { emu::wgmma_wait(PENDING); }
inline void fence_proxy_async() { emu::fence_proxy_async(); }
// mbarriers and TMA (emu.cpp models both; tensor maps: tensor_map.h).
inline void mbar_init(unsigned long long* bar, unsigned count) { emu::mbarrier_init(bar, count); }
inline void fence_mbarrier_init() {}
inline void mbar_arrive_expect_tx(unsigned long long* bar, unsigned bytes) { emu::mbarrier_arrive(bar, bytes); }
inline void mbar_wait(unsigned long long* bar, unsigned parity) { emu::mbarrier_wait(bar, parity); }
// A template: common.cuh declares TensorMap after this prelude.
template <class Map>
inline void tma_load_3d(void* smem, const Map& map, int x, int y, int z, unsigned long long* bar) { emu::tma_load(smem, &map, x, y, z, bar); }
template <int N>
inline void fence_operands(float (&)[N]) {}
template <int N>
inline void fence_operands(unsigned (&)[N][4]) {}
inline void wgmma_m64n128k16_ss(float (&d)[64], unsigned long long a, unsigned long long b, int accumulate) { emu::wgmma(d, 128, nullptr, a, b, accumulate, false, false); }
template <int TRANS_B, int TRANS_A = 0>
inline void wgmma_m64n256k16_ss(float (&d)[128], unsigned long long a, unsigned long long b, int accumulate) { emu::wgmma(d, 256, nullptr, a, b, accumulate, TRANS_A, TRANS_B); }
template <int TRANS_B>
inline void wgmma_m64n64k16_ss(float (&d)[32], unsigned long long a, unsigned long long b, int accumulate) { emu::wgmma(d, 64, nullptr, a, b, accumulate, false, TRANS_B); }
template <int TRANS_B>
inline void wgmma_m64n64k16_rs(float (&d)[32], const unsigned (&a)[4], unsigned long long b, int accumulate) { emu::wgmma(d, 64, a, 0, b, accumulate, false, TRANS_B); }
// Fibers switch only at barriers and collectives, so a plain add is atomic.
inline unsigned atomicAdd(unsigned* p, unsigned v) {
    unsigned old = *p;
    *p = old + v;
    return old;
}
// Blocks run one after another, so a flag that is not set yet when a block polls it would never
// be set by the blocks that started before it: on a GPU that block could hang.
inline unsigned load_acquire(const unsigned* p) { return *p; }
inline void store_release(unsigned* p, unsigned v) { *p = v; }
[[noreturn]] inline void spin_pause() { emu::spin_forever(); }
inline void __threadfence() {}
// L2-only loads and stores: on the emulator, plain ones.
inline float2 __ldcg(const float2* p) { return *p; }
inline void __stcg(float2* p, float2 v) { *p = v; }
