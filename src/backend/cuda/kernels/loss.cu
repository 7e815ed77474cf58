// Softmax cross-entropy over one chunk of logits (rows, V) formed by a cuBLASLt GEMM, in
// activation storage (bf16 as the GEMM wrote them, as PyTorch's autocast does; the softmax
// computes in f32). One block per row: loss = lse − z[target]; when grad_scale ≠ 0 it
// overwrites the logits with their gradient grad_scale · (softmax − onehot(target)), ready for
// the dx and dW GEMMs (each thread rewrites the elements it reads, after the row's statistics).
// Two passes over the row: max and sum of exponentials together (online, each thread rescaling
// its sum when its max grows), then the gradient. `vec` (8 or 1): elements a thread moves at a
// time (load_vec, common.cuh).
template <int VEC>
__device__ void softmax_xent_row(act_t* logits, float* losses, const unsigned* targets, int v, float grad_scale) {
    __shared__ float scratch[32];
    act_t* z = logits + (size_t)blockIdx.x * v;
    float m = -INFINITY, sum = 0.0f;
    for_each_in_row<VEC>(v, [&](int j) {
        float x[VEC];
        load_vec<VEC>(z + j, x);
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
    if (threadIdx.x == 0) losses[blockIdx.x] = lse - ld(z + t);
    if (grad_scale == 0.0f) return;
    __syncthreads();  // z[t] is read above before the gradient overwrites it
    for_each_in_row<VEC>(v, [&](int j) {
        float x[VEC];
        load_vec<VEC>(z + j, x);
#pragma unroll
        for (int k = 0; k < VEC; k++) x[k] = grad_scale * (expf(x[k] - lse) - (j + k == (int)t ? 1.0f : 0.0f));
        store_vec<VEC>(z + j, x);
    });
}

extern "C" __global__ void softmax_xent(act_t* logits, float* losses, const unsigned* targets, int v, float grad_scale, int vec) {
    if (vec == 8) softmax_xent_row<8>(logits, losses, targets, v, grad_scale);
    else softmax_xent_row<1>(logits, losses, targets, v, grad_scale);
}
