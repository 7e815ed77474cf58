// AdamW with decoupled weight decay on f32 master weights and f32 moments.
// `work` is the optional working copy in activation storage the ops read (null when they read
// the master itself, as in the f32 variant); g (f32) is scaled by grad_scale first.
struct AdamW { float lr, beta1, beta2, eps, weight_decay, bc1, bc2; };

extern "C" __global__ void adamw(float* master, act_t* work, float* m, float* v, const float* g, size_t n,
                                 AdamW hp, float grad_scale) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float gi = g[i] * grad_scale;
        float mi = hp.beta1 * m[i] + (1.0f - hp.beta1) * gi;
        float vi = hp.beta2 * v[i] + (1.0f - hp.beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        float update = (mi / hp.bc1) / (sqrtf(vi / hp.bc2) + hp.eps);
        float p = master[i] - hp.lr * (update + hp.weight_decay * master[i]);
        master[i] = p;
        if (work) st(work + i, p);
    }
}
