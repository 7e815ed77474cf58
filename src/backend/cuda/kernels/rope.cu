// Rotary position embedding on the q and k heads of a fused qkv row (interleaved pairs).
// qkv: (n, (H + 2Hkv)·D) rows starting at token first_row of the (B·T) layout; table: (T, D/2, 2)
// = cos, sin (f32). One block per row: the first H + Hkv heads of a row (q then k, contiguous)
// rotate, v heads do not; a thread takes VEC elements (VEC / 2 pairs) at a time (`vec`: 8, with
// 16-byte accesses, or else one pair).
template <int VEC>
__device__ void rope_row(act_t* qkv, const float* table, int first_row, int seq, int rotated_heads, int head_dim, int row_width, float sign) {
    const size_t row = blockIdx.x;
    const float* angles = table + (size_t)((first_row + row) % seq) * head_dim;
    act_t* x = qkv + row * row_width;
    for (int e = threadIdx.x * VEC; e < rotated_heads * head_dim; e += blockDim.x * VEC) {
        float v[VEC], cs[VEC], out[VEC];
        load_vec<VEC>(x + e, v);
        load_f32<VEC>(angles + e % head_dim, cs);
#pragma unroll
        for (int k = 0; k < VEC; k += 2) {
            const float c = cs[k], s = sign * cs[k + 1];
            out[k] = v[k] * c - v[k + 1] * s;
            out[k + 1] = v[k] * s + v[k + 1] * c;
        }
        store_vec<VEC>(x + e, out);
    }
}

extern "C" __global__ void rope(act_t* qkv, const float* table, int first_row, int seq, int rotated_heads, int head_dim, int row_width,
                                float sign, int vec) {
    if (vec == 8) rope_row<8>(qkv, table, first_row, seq, rotated_heads, head_dim, row_width, sign);
    else rope_row<2>(qkv, table, first_row, seq, rotated_heads, head_dim, row_width, sign);
}
