// Permute tokens into expert-major slots and combine expert outputs back per token.
// Rows have width c; index, slots and offsets come from the host routing.

// out[s] = (weight[s] ·) x[index[s]]; weight may be null. Grid (slots).
extern "C" __global__ void gather_rows(act_t* out, const act_t* x, const unsigned* index, const float* weight, int c) {
    size_t s = blockIdx.x;
    const act_t* src = x + (size_t)index[s] * c;
    float w = weight ? weight[s] : 1.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) st(out + s * c + j, w * ld(src + j));
}

// out[t] += Σ_{s ∈ slots(t)} (weight[s] ·) y[s], slots in ascending order: one block per token,
// so the sum order is fixed and no atomics are needed. Grid (tokens).
extern "C" __global__ void combine_rows(act_t* out, const act_t* y, const unsigned* offsets, const unsigned* slots,
                                        const float* weight, int c) {
    size_t t = blockIdx.x;
    unsigned a = offsets[t], b = offsets[t + 1];
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float acc = ld(out + t * c + j);
        for (unsigned k = a; k < b; k++) {
            unsigned s = slots[k];
            acc += (weight ? weight[s] : 1.0f) * ld(y + (size_t)s * c + j);
        }
        st(out + t * c + j, acc);
    }
}

// dots[s] = ⟨a[index[s]], b[s]⟩, one warp per slot.
extern "C" __global__ void gathered_dots(float* dots, const act_t* a, const act_t* b, const unsigned* index, int slots, int c) {
    int s = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP, lane = threadIdx.x % WARP;
    if (s >= slots) return;
    const act_t* ar = a + (size_t)index[s] * c;
    const act_t* br = b + (size_t)s * c;
    float acc = 0.0f;
    for (int j = lane; j < c; j += WARP) acc += ld(ar + j) * ld(br + j);
    acc = warp_sum(acc);
    if (lane == 0) dots[s] = acc;
}
