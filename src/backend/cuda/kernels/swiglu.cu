// SwiGLU: a = SiLU(g) ⊙ u with each input row [g (h) | u (h)]. A thread takes VEC consecutive
// outputs of a row per step (the entry points' `vec`: 8 or 1, see load_vec), grid-stride.

// Calls f(r, i) for every piece of VEC outputs, row r, columns i..i + VEC.
template <int VEC, class F>
__device__ __forceinline__ void for_each_piece(size_t rows, int h, F f) {
    const int per_row = h / VEC;
    const size_t pieces = rows * per_row;
    for (size_t p = blockIdx.x * (size_t)blockDim.x + threadIdx.x; p < pieces; p += (size_t)gridDim.x * blockDim.x)
        f(p / per_row, int(p % per_row) * VEC);
}

template <int VEC>
__device__ void swiglu_fwd_pieces(act_t* out, const act_t* gu, size_t rows, int h) {
    for_each_piece<VEC>(rows, h, [&](size_t r, int i) {
        float g[VEC], u[VEC], a[VEC];
        load_vec<VEC>(gu + r * 2 * h + i, g);
        load_vec<VEC>(gu + r * 2 * h + h + i, u);
#pragma unroll
        for (int k = 0; k < VEC; k++) a[k] = swiglu(g[k], u[k]);
        store_vec<VEC>(out + r * h + i, a);
    });
}

// With out non-null, also the forward's output again (its bits: the same operations).
template <int VEC>
__device__ void swiglu_bwd_pieces(act_t* dgu, act_t* out, const act_t* dout, const act_t* gu, size_t rows, int h) {
    for_each_piece<VEC>(rows, h, [&](size_t r, int i) {
        float g[VEC], u[VEC], da[VEC], dg[VEC], du[VEC], a[VEC];
        load_vec<VEC>(gu + r * 2 * h + i, g);
        load_vec<VEC>(gu + r * 2 * h + h + i, u);
        load_vec<VEC>(dout + r * h + i, da);
#pragma unroll
        for (int k = 0; k < VEC; k++) {
            swiglu_grad(g[k], u[k], da[k], dg[k], du[k]);
            a[k] = swiglu(g[k], u[k]);
        }
        store_vec<VEC>(dgu + r * 2 * h + i, dg);
        store_vec<VEC>(dgu + r * 2 * h + h + i, du);
        if (out) store_vec<VEC>(out + r * h + i, a);
    });
}

// out: (rows, h); gu: (rows, 2h).
extern "C" __global__ void swiglu_fwd(act_t* out, const act_t* gu, size_t rows, int h, int vec) {
    if (vec == 8) swiglu_fwd_pieces<8>(out, gu, rows, h);
    else swiglu_fwd_pieces<1>(out, gu, rows, h);
}

// dgu: (rows, 2h) overwritten; out: (rows, h) or null; dout: (rows, h).
extern "C" __global__ void swiglu_bwd(act_t* dgu, act_t* out, const act_t* dout, const act_t* gu, size_t rows, int h, int vec) {
    if (vec == 8) swiglu_bwd_pieces<8>(dgu, out, dout, gu, rows, h);
    else swiglu_bwd_pieces<1>(dgu, out, dout, gu, rows, h);
}
