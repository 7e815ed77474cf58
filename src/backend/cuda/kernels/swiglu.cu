// SwiGLU: a = SiLU(g) ⊙ u with each input row [g (h) | u (h)]. One thread per output element.

__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + __expf(-x)); }

// out: (rows, h); gu: (rows, 2h).
extern "C" __global__ void swiglu_fwd(act_t* out, const act_t* gu, size_t rows, int h) {
    size_t total = rows * h;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total; idx += (size_t)gridDim.x * blockDim.x) {
        size_t r = idx / h, i = idx % h;
        float g = ld(gu + r * 2 * h + i), u = ld(gu + r * 2 * h + h + i);
        st(out + idx, g * sigmoidf(g) * u);
    }
}

// dgu: (rows, 2h) overwritten; dout: (rows, h).
extern "C" __global__ void swiglu_bwd(act_t* dgu, const act_t* dout, const act_t* gu, size_t rows, int h) {
    size_t total = rows * h;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total; idx += (size_t)gridDim.x * blockDim.x) {
        size_t r = idx / h, i = idx % h;
        float g = ld(gu + r * 2 * h + i), u = ld(gu + r * 2 * h + h + i), da = ld(dout + idx);
        float s = sigmoidf(g);
        st(dgu + r * 2 * h + h + i, da * g * s);
        st(dgu + r * 2 * h + i, da * u * s * (1.0f + g * (1.0f - s)));
    }
}
