// Softmax cross-entropy over one chunk of logits (rows, V) formed by a cuBLASLt GEMM.
// One block per row: loss = lse − z[target]; when grad_scale ≠ 0 it writes
// dlogits = grad_scale · (softmax − onehot(target)) in activation storage, ready for the dx and
// dW GEMMs. Logits are f32; in the f32 variant dlogits may be the logits buffer itself.
// Two passes over the row: max and sum of exponentials together (online, each thread rescaling
// its sum when its max grows), then the gradient. `vec` (8 or 1): elements a thread moves at a
// time (load_vec, common.cuh).
template <int VEC>
__device__ void softmax_xent_row(const float* logits, act_t* dlogits, float* losses, const unsigned* targets, int v, float grad_scale) {
    __shared__ float scratch[32];
    const float* z = logits + (size_t)blockIdx.x * v;
    float m = -INFINITY, sum = 0.0f;
    for_each_in_row<VEC>(v, [&](int j) {
        float x[VEC];
        load_f32<VEC>(z + j, x);
        float mx = m;
#pragma unroll
        for (int k = 0; k < VEC; k++) mx = fmaxf(mx, x[k]);
        sum = m == -INFINITY ? 0.0f : sum * expf(m - mx);  // the thread's first piece: nothing to rescale
#pragma unroll
        for (int k = 0; k < VEC; k++) sum += expf(x[k] - mx);
        m = mx;
    });
    const float row_max = block_max(m, scratch);
    // A thread without elements has m = −inf and sum 0: it adds 0.
    const float lse = row_max + logf(block_sum(m == -INFINITY ? 0.0f : sum * expf(m - row_max), scratch));
    const unsigned t = targets[blockIdx.x];
    if (threadIdx.x == 0) losses[blockIdx.x] = lse - z[t];
    if (grad_scale == 0.0f) return;
    __syncthreads();  // z[t] is read above before an in-place dlogits overwrites it
    act_t* dz = dlogits + (size_t)blockIdx.x * v;
    for_each_in_row<VEC>(v, [&](int j) {
        float x[VEC];
        load_f32<VEC>(z + j, x);
#pragma unroll
        for (int k = 0; k < VEC; k++) x[k] = grad_scale * (expf(x[k] - lse) - (j + k == (int)t ? 1.0f : 0.0f));
        store_vec<VEC>(dz + j, x);
    });
}

extern "C" __global__ void softmax_xent(const float* logits, act_t* dlogits, float* losses, const unsigned* targets, int v, float grad_scale,
                                        int vec) {
    if (vec == 8) softmax_xent_row<8>(logits, dlogits, losses, targets, v, grad_scale);
    else softmax_xent_row<1>(logits, dlogits, losses, targets, v, grad_scale);
}
