// Row-wise softmax of the router logits (rows, cols), one warp per row (cols = experts: small).
// Router logits, probabilities and their gradients are f32 in both variants.

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

// dlogits = P ⊙ (dP − ⟨dP, P⟩) per row.
extern "C" __global__ void softmax_rows_bwd(float* dlogits, const float* dprobs, const float* probs, int rows, int cols) {
    int row = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP, lane = threadIdx.x % WARP;
    if (row >= rows) return;
    size_t base = (size_t)row * cols;
    float dot = 0.0f;
    for (int j = lane; j < cols; j += WARP) dot += dprobs[base + j] * probs[base + j];
    dot = warp_sum(dot);
    for (int j = lane; j < cols; j += WARP) dlogits[base + j] = probs[base + j] * (dprobs[base + j] - dot);
}
