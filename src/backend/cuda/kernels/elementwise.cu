// Elementwise ops and the deterministic sum of squares (global gradient norm).
// Grid-stride loops; every launch covers `n` elements.

// `vec` (8 or 1): elements a thread moves at a time (load_vec, common.cuh).
template <int VEC>
__device__ void add_pieces(act_t* out, const act_t* a, const act_t* b, size_t n) {
    for_each_flat<VEC>(n, [&](size_t i) {
        float x[VEC], y[VEC];
        load_vec<VEC>(a + i, x);
        load_vec<VEC>(b + i, y);
#pragma unroll
        for (int k = 0; k < VEC; k++) x[k] += y[k];
        store_vec<VEC>(out + i, x);
    });
}

extern "C" __global__ void add_assign(act_t* dst, const act_t* src, size_t n, int vec) {
    if (vec == 8) add_pieces<8>(dst, dst, src, n);
    else add_pieces<1>(dst, dst, src, n);
}

extern "C" __global__ void add(act_t* out, const act_t* a, const act_t* b, size_t n, int vec) {
    if (vec == 8) add_pieces<8>(out, a, b, n);
    else add_pieces<1>(out, a, b, n);
}

extern "C" __global__ void scale(act_t* dst, float s, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        st(dst + i, ld(dst + i) * s);
}

extern "C" __global__ void fill(act_t* dst, float value, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        st(dst + i, value);
}

// Conversions between f32 buffers and activation storage (round to nearest even into bf16):
// the working copy of the weights, and copies between the two kinds of buffer.
extern "C" __global__ void f32_to_act(act_t* dst, const float* src, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        st(dst + i, src[i]);
}

extern "C" __global__ void act_to_f32(float* dst, const act_t* src, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = ld(src + i);
}

// Pass 1 of Σ x²: the grid's threads take the pieces of VEC elements in turn (then, with
// VEC = 8, the last n % 8 elements one each) and block b sums its threads' parts (f64) into
// partial[b]. The grid size is fixed by the caller, so the summation order depends only on n
// and `vec` (8 where x is 16-byte aligned: more bytes in flight per thread for one pass over
// the whole f32 gradient).
template <int VEC>
__device__ double sum_squares_thread(const act_t* x, size_t n) {
    double acc = 0.0;
    for_each_flat<VEC>(n, [&](size_t i) {
        float v[VEC];
        load_vec<VEC>(x + i, v);
#pragma unroll
        for (int k = 0; k < VEC; k++) acc += (double)v[k] * v[k];
    });
    const size_t threads = (size_t)gridDim.x * blockDim.x, me = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    for (size_t i = n / VEC * VEC + me; i < n; i += threads) {
        const double v = ld(x + i);
        acc += v * v;
    }
    return acc;
}

extern "C" __global__ void sum_squares_partial(double* partial, const act_t* x, size_t n, int vec) {
    __shared__ double scratch[32];
    double acc = vec == 8 ? sum_squares_thread<8>(x, n) : sum_squares_thread<1>(x, n);
    acc = warp_sum_f64(acc);
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    if (lane == 0) scratch[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        acc = lane < blockDim.x / WARP ? scratch[lane] : 0.0;
        acc = warp_sum_f64(acc);
        if (lane == 0) partial[blockIdx.x] = acc;
    }
}

// Pass 2: one warp adds the partials in a fixed order into out[0].
extern "C" __global__ void sum_squares_final(double* out, const double* partial, int count) {
    double acc = 0.0;
    for (int i = threadIdx.x; i < count; i += WARP) acc += partial[i];
    acc = warp_sum_f64(acc);
    if (threadIdx.x == 0) out[0] = acc;
}
