// Permute tokens into expert-major slots and combine expert outputs back per token.
// Rows have width c; index, slots and offsets come from the host routing. `vec` (8 or 1):
// elements a thread moves at a time (load_vec, common.cuh).

// out[s] = (weight[s] ·) x[index[s]]; weight may be null. Grid (slots).
template <int VEC>
__device__ void gather_row(act_t* out, const act_t* x, const unsigned* index, const float* weight, int c) {
    const size_t s = blockIdx.x;
    const act_t* src = x + (size_t)index[s] * c;
    const float w = weight ? weight[s] : 1.0f;
    for_each_in_row<VEC>(c, [&](int j) {
        float v[VEC];
        load_vec<VEC>(src + j, v);
#pragma unroll
        for (int k = 0; k < VEC; k++) v[k] *= w;
        store_vec<VEC>(out + s * c + j, v);
    });
}

extern "C" __global__ void gather_rows(act_t* out, const act_t* x, const unsigned* index, const float* weight, int c, int vec) {
    if (vec == 8) gather_row<8>(out, x, index, weight, c);
    else gather_row<1>(out, x, index, weight, c);
}

// out[t] = residual[t] + Σ_{s ∈ slots(t)} (weight[s] ·) y[s] (residual 0 when null), slots in
// ascending order after the residual: one block per token, so the sum order is fixed and no
// atomics are needed. Grid (tokens).
template <int VEC>
__device__ void combine_row(act_t* out, const act_t* y, const unsigned* offsets, const unsigned* slots, const float* weight, const act_t* residual,
                            int c) {
    const size_t t = blockIdx.x;
    const unsigned a = offsets[t], b = offsets[t + 1];
    for_each_in_row<VEC>(c, [&](int j) {
        float acc[VEC] = {}, v[VEC];
        if (residual) load_vec<VEC>(residual + t * c + j, acc);
        for (unsigned k = a; k < b; k++) {
            const unsigned s = slots[k];
            const float w = weight ? weight[s] : 1.0f;
            load_vec<VEC>(y + (size_t)s * c + j, v);
#pragma unroll
            for (int e = 0; e < VEC; e++) acc[e] += w * v[e];
        }
        store_vec<VEC>(out + t * c + j, acc);
    });
}

extern "C" __global__ void combine_rows(act_t* out, const act_t* y, const unsigned* offsets, const unsigned* slots, const float* weight,
                                        const act_t* residual, int c, int vec) {
    if (vec == 8) combine_row<8>(out, y, offsets, slots, weight, residual, c);
    else combine_row<1>(out, y, offsets, slots, weight, residual, c);
}

// dots[s] = ⟨a[index[s]], b[s]⟩, one warp per slot.
template <int VEC>
__device__ void gathered_dot(float* dots, const act_t* a, const act_t* b, const unsigned* index, int slots, int c) {
    const int s = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP, lane = threadIdx.x % WARP;
    if (s >= slots) return;
    const act_t* ar = a + (size_t)index[s] * c;
    const act_t* br = b + (size_t)s * c;
    float acc = 0.0f;
    for (int j = lane * VEC; j < c; j += WARP * VEC) {
        float x[VEC], y[VEC];
        load_vec<VEC>(ar + j, x);
        load_vec<VEC>(br + j, y);
#pragma unroll
        for (int k = 0; k < VEC; k++) acc += x[k] * y[k];
    }
    acc = warp_sum(acc);
    if (lane == 0) dots[s] = acc;
}

extern "C" __global__ void gathered_dots(float* dots, const act_t* a, const act_t* b, const unsigned* index, int slots, int c, int vec) {
    if (vec == 8) gathered_dot<8>(dots, a, b, index, slots, c);
    else gathered_dot<1>(dots, a, b, index, slots, c);
}
