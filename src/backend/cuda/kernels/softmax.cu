// Row-wise softmax of the router logits (rows, cols), one warp per row (cols = experts: small).

extern "C" __global__ void softmax_rows_fwd(act_t* out, const act_t* logits, int rows, int cols) {
    int row = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP, lane = threadIdx.x % WARP;
    if (row >= rows) return;
    const act_t* z = logits + (size_t)row * cols;
    float m = -INFINITY;
    for (int j = lane; j < cols; j += WARP) m = fmaxf(m, ld(z + j));
    m = warp_max(m);
    float sum = 0.0f;
    for (int j = lane; j < cols; j += WARP) sum += expf(ld(z + j) - m);
    float inv = 1.0f / warp_sum(sum);
    for (int j = lane; j < cols; j += WARP) st(out + (size_t)row * cols + j, expf(ld(z + j) - m) * inv);
}

// dlogits = P ⊙ (dP − ⟨dP, P⟩) per row.
extern "C" __global__ void softmax_rows_bwd(act_t* dlogits, const act_t* dprobs, const act_t* probs, int rows, int cols) {
    int row = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP, lane = threadIdx.x % WARP;
    if (row >= rows) return;
    size_t base = (size_t)row * cols;
    float dot = 0.0f;
    for (int j = lane; j < cols; j += WARP) dot += ld(dprobs + base + j) * ld(probs + base + j);
    dot = warp_sum(dot);
    for (int j = lane; j < cols; j += WARP) st(dlogits + base + j, ld(probs + base + j) * (ld(dprobs + base + j) - dot));
}
