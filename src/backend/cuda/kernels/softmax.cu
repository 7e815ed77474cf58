// The router: row-wise softmax of its logits (rows, cols), one warp per row (cols = experts:
// small), and its backward. Router logits, probabilities and their gradients are f32 in both
// variants.

extern "C" __global__ void softmax_rows_fwd(float* out, const float* logits, int rows, int cols) {
    int row = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP, lane = threadIdx.x % WARP;
    if (row >= rows) return;
    const float* z = logits + (size_t)row * cols;
    float m = -INFINITY;
    for (int j = lane; j < cols; j += WARP) m = fmaxf(m, z[j]);
    m = warp_max(m);
    float sum = 0.0f;
    for (int j = lane; j < cols; j += WARP) sum += expf(z[j] - m);
    float inv = 1.0f / warp_sum(sum);
    for (int j = lane; j < cols; j += WARP) out[(size_t)row * cols + j] = expf(z[j] - m) * inv;
}

// The router's backward through its softmax (Backend::router_bwd), one thread per token t (experts
// are few), in the CPU backend's order of operations (src/backend/cpu/router.rs): dP in the
// output row first, then through the softmax, then the z-loss. Token t's slots are
// slots[offsets[t]..offsets[t+1]], ascending; aux holds E load-balance then E P-Penalty
// gradients. Grid-stride over tokens.
extern "C" __global__ void router_bwd(float* dlogits, const float* dgate, const float* probs, const float* logits,
                                      const unsigned* offsets, const unsigned* slots, const unsigned* slot_expert,
                                      const float* gate, const float* aux, float entropy, float z_loss, int n, int e) {
    const float nf = (float)n;
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < (size_t)n; t += (size_t)gridDim.x * blockDim.x) {
        const float* p = probs + t * e;
        const float* z = logits + t * e;
        float* dz = dlogits + t * e;
        for (int i = 0; i < e; i++) dz[i] = 0.0f;
        // g_i = P_i / S over the token's experts: dP_i = (dg_i − Σ_j dg_j g_j) / S.
        unsigned a = offsets[t], b = offsets[t + 1];
        float sum = 0.0f, dot = 0.0f;
        for (unsigned k = a; k < b; k++) sum += p[slot_expert[slots[k]]];
        for (unsigned k = a; k < b; k++) dot += dgate[slots[k]] * gate[slots[k]];
        for (unsigned k = a; k < b; k++) dz[slot_expert[slots[k]]] += (dgate[slots[k]] - dot) / sum;
        // lse = z_j − ln P_j at the most probable expert.
        float lse = 0.0f;
        if (entropy > 0.0f || z_loss > 0.0f) {
            int j = 0;
            for (int i = 1; i < e; i++) j = p[i] > p[j] ? i : j;
            lse = z[j] - logf(p[j]);
        }
        for (int i = 0; i < e; i++) {
            float d = dz[i] + aux[i];
            d += aux[e + i];
            // ∂(−P ln P)/∂P = −(ln P + 1), ln P_i = z_i − lse.
            if (entropy > 0.0f && p[i] > 0.0f) d -= entropy * ((z[i] - lse) + 1.0f) / nf;
            dz[i] = d;
        }
        float pd = 0.0f;
        for (int i = 0; i < e; i++) pd += dz[i] * p[i];
        for (int i = 0; i < e; i++) {
            float d = p[i] * (dz[i] - pd);
            if (z_loss > 0.0f) d += z_loss * 2.0f * lse * p[i] / nf;
            dz[i] = d;
        }
    }
}
