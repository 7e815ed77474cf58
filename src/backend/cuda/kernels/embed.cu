// Token embedding: row lookup, and its scatter-add backward made deterministic by grouping.

// out (N, C) = table[tokens]; grid (N), block threads stride over C.
extern "C" __global__ void embedding_fwd(act_t* out, const act_t* table, const unsigned* tokens, int c) {
    size_t row = blockIdx.x;
    const act_t* src = table + (size_t)tokens[row] * c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) out[row * c + j] = src[j];
}

// dtable[v] += Σ dout[i] over the positions i of token v, in ascending i (the CPU order).
// The host groups positions by token: group g is token ids[g], positions
// pos[offsets[g] .. offsets[g+1]]. Grid (groups); no two blocks touch the same row: no atomics.
// dtable is a weight gradient: f32.
extern "C" __global__ void embedding_bwd(float* dtable, const act_t* dout, const unsigned* ids,
                                         const unsigned* offsets, const unsigned* pos, int c) {
    unsigned g = blockIdx.x, a = offsets[g], b = offsets[g + 1];
    float* dst = dtable + (size_t)ids[g] * c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float acc = dst[j];
        for (unsigned k = a; k < b; k++) acc += ld(dout + (size_t)pos[k] * c + j);
        dst[j] = acc;
    }
}
