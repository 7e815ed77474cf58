// RMSNorm: y = x · rstd · w, rstd = 1/sqrt(mean(x²) + eps). x, out, dout, dx: (N, C); w, dw: (C).
// rstd (N) is a statistic and dw a weight gradient: both f32 whatever the activation storage.

// Grid (N), one block per row; rstd (N) saved for the backward. `vec` (8 or 1): elements a
// thread moves at a time (load_vec, common.cuh).
template <int VEC>
__device__ void rmsnorm_row(act_t* out, float* rstd, const act_t* x, const act_t* w, int c, float eps) {
    __shared__ float scratch[32];
    const act_t* xr = x + (size_t)blockIdx.x * c;
    float ss = 0.0f;
    for_each_in_row<VEC>(c, [&](int j) {
        float v[VEC];
        load_vec<VEC>(xr + j, v);
#pragma unroll
        for (int k = 0; k < VEC; k++) ss += v[k] * v[k];
    });
    const float s = rsqrtf(block_sum(ss, scratch) / c + eps);
    if (threadIdx.x == 0) rstd[blockIdx.x] = s;
    act_t* o = out + (size_t)blockIdx.x * c;
    for_each_in_row<VEC>(c, [&](int j) {
        float v[VEC], g[VEC];
        load_vec<VEC>(xr + j, v);
        load_vec<VEC>(w + j, g);
#pragma unroll
        for (int k = 0; k < VEC; k++) v[k] = v[k] * s * g[k];
        store_vec<VEC>(o + j, v);
    });
}

extern "C" __global__ void rmsnorm_fwd(act_t* out, float* rstd, const act_t* x, const act_t* w, int c, float eps, int vec) {
    if (vec == 8) rmsnorm_row<8>(out, rstd, x, w, c, eps);
    else rmsnorm_row<1>(out, rstd, x, w, c, eps);
}

// dx = residual + s·w·dy − s³·⟨dy·w, x⟩/C · x (residual 0 when null): the residual branch's
// gradient joins here instead of in a copy before. Grid (N).
template <int VEC>
__device__ void rmsnorm_dx_row(act_t* dx, const act_t* residual, const act_t* dout, const act_t* x, const act_t* w, const float* rstd, int c) {
    __shared__ float scratch[32];
    const size_t base = (size_t)blockIdx.x * c;
    float dot = 0.0f;
    for_each_in_row<VEC>(c, [&](int j) {
        float dy[VEC], g[VEC], v[VEC];
        load_vec<VEC>(dout + base + j, dy);
        load_vec<VEC>(w + j, g);
        load_vec<VEC>(x + base + j, v);
#pragma unroll
        for (int k = 0; k < VEC; k++) dot += dy[k] * g[k] * v[k];
    });
    const float s = rstd[blockIdx.x];
    const float k3 = s * s * s * block_sum(dot, scratch) / c;
    for_each_in_row<VEC>(c, [&](int j) {
        float d[VEC] = {}, dy[VEC], g[VEC], v[VEC];
        if (residual) load_vec<VEC>(residual + base + j, d);
        load_vec<VEC>(dout + base + j, dy);
        load_vec<VEC>(w + j, g);
        load_vec<VEC>(x + base + j, v);
#pragma unroll
        for (int k = 0; k < VEC; k++) d[k] = d[k] + s * g[k] * dy[k] - k3 * v[k];
        store_vec<VEC>(dx + base + j, d);
    });
}

extern "C" __global__ void rmsnorm_bwd_dx(act_t* dx, const act_t* residual, const act_t* dout, const act_t* x, const act_t* w, const float* rstd, int c,
                                          int vec) {
    if (vec == 8) rmsnorm_dx_row<8>(dx, residual, dout, x, w, rstd, c);
    else rmsnorm_dx_row<1>(dx, residual, dout, x, w, rstd, c);
}

// dw partials per chunk of `rows_per_chunk` rows: part[chunk, j] = Σ_rows dy·x·rstd, rows in order.
// Grid (chunks, ceil(C / blockDim)); one thread per column.
extern "C" __global__ void rmsnorm_dw_partial(float* part, const act_t* dout, const act_t* x, const float* rstd,
                                              int n, int c, int rows_per_chunk) {
    int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= c) return;
    int r0 = blockIdx.x * rows_per_chunk, r1 = min(n, r0 + rows_per_chunk);
    float acc = 0.0f;
    for (int r = r0; r < r1; r++) acc += ld(dout + (size_t)r * c + j) * ld(x + (size_t)r * c + j) * rstd[r];
    part[(size_t)blockIdx.x * c + j] = acc;
}

// dw[j] += Σ_chunks part[chunk, j], chunks in order (deterministic, no atomics). dw is a weight
// gradient: f32. A grid-stride loop over the columns.
extern "C" __global__ void rmsnorm_dw_reduce(float* dw, const float* part, int chunks, int c) {
    for (size_t j = blockIdx.x * (size_t)blockDim.x + threadIdx.x; j < (size_t)c; j += (size_t)gridDim.x * blockDim.x) {
        float acc = dw[j];
        for (int k = 0; k < chunks; k++) acc += part[(size_t)k * c + j];
        dw[j] = acc;
    }
}
