// Rotary position embedding on the q and k heads of a fused qkv row (interleaved pairs).
// qkv: (n, (H + 2Hkv)·D) rows starting at token first_row of the (B·T) layout; table: (T, D/2, 2)
// = cos, sin (f32). One thread per (row, head, pair);
// the first H + Hkv heads of a row (q then k) rotate, v heads do not.
extern "C" __global__ void rope(act_t* qkv, const float* table, int n, int first_row, int seq, int rotated_heads,
                                int head_dim, int row_width, float sign) {
    int half = head_dim / 2;
    size_t total = (size_t)n * rotated_heads * half;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total; idx += (size_t)gridDim.x * blockDim.x) {
        int i = idx % half;
        size_t rh = idx / half;
        int h = rh % rotated_heads;
        size_t row = rh / rotated_heads;
        int t = (int)((first_row + row) % seq);
        float cs = table[(size_t)t * head_dim + 2 * i], sn = sign * table[(size_t)t * head_dim + 2 * i + 1];
        act_t* p = qkv + row * row_width + (size_t)h * head_dim + 2 * i;
        float x0 = ld(p), x1 = ld(p + 1);
        st(p, x0 * cs - x1 * sn);
        st(p + 1, x0 * sn + x1 * cs);
    }
}
