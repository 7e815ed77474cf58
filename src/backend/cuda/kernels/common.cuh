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
