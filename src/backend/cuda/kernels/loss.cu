// Softmax cross-entropy over one chunk of logits (rows, V) formed by a cuBLASLt GEMM.
// One block per row: loss = lse − z[target]; when grad_scale ≠ 0 it writes
// dlogits = grad_scale · (softmax − onehot(target)) in activation storage, ready for the dx and
// dW GEMMs. Logits are f32; in the f32 variant dlogits may be the logits buffer itself.
extern "C" __global__ void softmax_xent(const float* logits, act_t* dlogits, float* losses, const unsigned* targets,
                                        int v, float grad_scale) {
    __shared__ float scratch[32];
    const float* z = logits + (size_t)blockIdx.x * v;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, z[j]);
    m = block_max(m, scratch);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) sum += expf(z[j] - m);
    float lse = m + logf(block_sum(sum, scratch));
    unsigned t = targets[blockIdx.x];
    if (threadIdx.x == 0) losses[blockIdx.x] = lse - z[t];
    if (grad_scale == 0.0f) return;
    __syncthreads();  // z[t] is read above before an in-place dlogits overwrites it
    act_t* dz = dlogits + (size_t)blockIdx.x * v;
    for (int j = threadIdx.x; j < v; j += blockDim.x)
        st(dz + j, grad_scale * (expf(z[j] - lse) - (j == (int)t ? 1.0f : 0.0f)));
}
