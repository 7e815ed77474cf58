// Softmax cross-entropy over one chunk of logits (rows, V) formed by a cuBLASLt GEMM.
// One block per row: loss = lse − z[target]; when grad_scale ≠ 0 the row is overwritten in place
// by dlogits = grad_scale · (softmax − onehot(target)), ready for the dx and dW GEMMs.
extern "C" __global__ void softmax_xent(act_t* logits, float* losses, const unsigned* targets, int v, float grad_scale) {
    __shared__ float scratch[32];
    act_t* z = logits + (size_t)blockIdx.x * v;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, ld(z + j));
    m = block_max(m, scratch);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) sum += expf(ld(z + j) - m);
    float lse = m + logf(block_sum(sum, scratch));
    unsigned t = targets[blockIdx.x];
    if (threadIdx.x == 0) losses[blockIdx.x] = lse - ld(z + t);
    if (grad_scale == 0.0f) return;
    __syncthreads();  // z[t] is read above before it is overwritten below
    for (int j = threadIdx.x; j < v; j += blockDim.x)
        st(z + j, grad_scale * (expf(ld(z + j) - lse) - (j == (int)t ? 1.0f : 0.0f)));
}
