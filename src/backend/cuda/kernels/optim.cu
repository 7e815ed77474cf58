// AdamW with decoupled weight decay on f32 master weights and f32 moments.
// `work` is the optional working copy in activation storage the ops read (null when they read
// the master itself, as in the f32 variant); g (f32) is scaled by grad_scale first.
struct AdamW { float lr, beta1, beta2, eps, weight_decay, bc1, bc2; };

// VEC (8 or 1) elements a thread moves at a time: 8 where n is a multiple of 8 and every
// buffer 16-byte aligned (`vec_width`), so each array moves in 16-byte pieces.
template <int VEC>
__device__ void adamw_pieces(float* master, act_t* work, float* m, float* v, const float* g, size_t n, AdamW hp, float grad_scale) {
    for_each_flat<VEC>(n, [&](size_t i) {
        float p[VEC], mi[VEC], vi[VEC], gi[VEC];
        load_f32<VEC>(master + i, p);
        load_f32<VEC>(m + i, mi);
        load_f32<VEC>(v + i, vi);
        load_f32<VEC>(g + i, gi);
#pragma unroll
        for (int k = 0; k < VEC; k++) {
            const float gk = gi[k] * grad_scale;
            mi[k] = hp.beta1 * mi[k] + (1.0f - hp.beta1) * gk;
            vi[k] = hp.beta2 * vi[k] + (1.0f - hp.beta2) * gk * gk;
            const float update = (mi[k] / hp.bc1) / (sqrtf(vi[k] / hp.bc2) + hp.eps);
            p[k] = p[k] - hp.lr * (update + hp.weight_decay * p[k]);
        }
        store_f32<VEC>(m + i, mi);
        store_f32<VEC>(v + i, vi);
        store_f32<VEC>(master + i, p);
        if (work) store_vec<VEC>(work + i, p);
    });
}

extern "C" __global__ void adamw(float* master, act_t* work, float* m, float* v, const float* g, size_t n, AdamW hp, float grad_scale, int vec) {
    if (vec == 8) adamw_pieces<8>(master, work, m, v, g, n, hp, grad_scale);
    else adamw_pieces<1>(master, work, m, v, g, n, hp, grad_scale);
}
