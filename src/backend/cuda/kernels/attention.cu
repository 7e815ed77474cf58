// Causal flash attention (FlashAttention-2 schedule) with grouped-query heads, for sm_80+.
//
// First, correctness-oriented version: tiles are staged in shared memory as bf16, products run on
// tensor cores through warp-level `mma.sync.m16n8k16` (bf16 × bf16 → f32, inline PTX, so no
// CUDA header beyond cuda_bf16.h is needed), the online softmax and all accumulators are f32.
// A Hopper-specific version (wgmma, TMA loads, warp specialisation, register-resident
// accumulators) is a later optimisation; this one keeps O and dK/dV in shared memory so that
// the row-wise rescaling is plain indexing.
//
// Layout (see backend/mod.rs): qkv (N, (H + 2Hkv)·D) with N = B·T, q heads then k then v;
// out, dout (N, H·D); lse, delta (B·H·T) f32. D must be a multiple of 16 and at most 128.
// Each block has 4 warps; a warp owns 16 rows of every tile it computes, so only the loads of
// shared tiles need block-wide barriers.

typedef __nv_bfloat16 bf16;
#define TILE 64          // query rows and key columns per tile (BR = BC)
#define THREADS 128      // 4 warps × 16 rows

struct Heads {
    int seq, n_heads, n_kv_heads, d;
    __device__ int width() const { return (n_heads + 2 * n_kv_heads) * d; }
    __device__ int q_col(int h) const { return h * d; }
    __device__ int k_col(int kvh) const { return (n_heads + kvh) * d; }
    __device__ int v_col(int kvh) const { return (n_heads + n_kv_heads + kvh) * d; }
};

// dst[r][c] (TILE × d, bf16) = src rows t0 + r of batch row base, columns col..col+d; zero past seq.
__device__ void load_tile(bf16* dst, const act_t* src, size_t row0, int t0, int seq, int ld_src, int col, int d) {
    for (int idx = threadIdx.x; idx < TILE * d; idx += blockDim.x) {
        int r = idx / d, c = idx % d, t = t0 + r;
        dst[idx] = __float2bfloat16(t < seq ? ld(src + (row0 + t) * ld_src + col + c) : 0.0f);
    }
}

// ---- warp-level MMA on shared-memory tiles --------------------------------------------------
// m16n8k16 fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with g = lane / 4 and
// q = lane % 4: A (16×16) registers hold rows g, g+8 × column pairs 2q, 2q+8; B (16×8) holds
// k-pairs 2q, 2q+8 of column g; C (16×8, f32) holds rows g, g+8 × columns 2q, 2q+1.

// Two consecutive bf16 of a row as one register (lower column in the low half).
__device__ __forceinline__ unsigned pair(const bf16* p) { return *(const unsigned*)p; }
__device__ __forceinline__ unsigned pack(bf16 lo, bf16 hi) {
    return (unsigned)__bfloat16_as_ushort(lo) | ((unsigned)__bfloat16_as_ushort(hi) << 16);
}

// A fragment of the 16×16 block at `a` (row-major, row stride lda).
__device__ __forceinline__ void load_a(unsigned f[4], const bf16* a, int lda, int g, int q) {
    f[0] = pair(a + g * lda + 2 * q);
    f[1] = pair(a + (g + 8) * lda + 2 * q);
    f[2] = pair(a + g * lda + 2 * q + 8);
    f[3] = pair(a + (g + 8) * lda + 2 * q + 8);
}

// c (16 × n, f32, row stride ldc) = a (16 × k) · bᵀ, with b stored row-major (n × k, stride ldb):
// the score products Q Kᵀ, dO Vᵀ, K Qᵀ, V dOᵀ. n and k are multiples of 16.
__device__ void mma_abt(float* c, int ldc, const bf16* a, int lda, const bf16* b, int ldb, int n, int k) {
    const int lane = threadIdx.x % WARP, g = lane / 4, q = lane % 4;
    for (int n0 = 0; n0 < n; n0 += 8) {
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int k0 = 0; k0 < k; k0 += 16) {
            unsigned fa[4], fb[2];
            load_a(fa, a + k0, lda, g, q);
            const bf16* bn = b + (n0 + g) * ldb + k0 + 2 * q;  // Bᵀ's column g is b's row n0 + g
            fb[0] = pair(bn);
            fb[1] = pair(bn + 8);
            mma16816(acc, fa, fb);
        }
        c[g * ldc + n0 + 2 * q] = acc[0];
        c[g * ldc + n0 + 2 * q + 1] = acc[1];
        c[(g + 8) * ldc + n0 + 2 * q] = acc[2];
        c[(g + 8) * ldc + n0 + 2 * q + 1] = acc[3];
    }
}

// c (16 × n, f32, in place) += a (16 × k) · b (k × n, row-major, stride ldb): P V, dS K, Pᵀ dO, dSᵀ Q.
__device__ void mma_ab_acc(float* c, int ldc, const bf16* a, int lda, const bf16* b, int ldb, int n, int k) {
    const int lane = threadIdx.x % WARP, g = lane / 4, q = lane % 4;
    for (int n0 = 0; n0 < n; n0 += 8) {
        float acc[4] = {c[g * ldc + n0 + 2 * q], c[g * ldc + n0 + 2 * q + 1],
                        c[(g + 8) * ldc + n0 + 2 * q], c[(g + 8) * ldc + n0 + 2 * q + 1]};
        for (int k0 = 0; k0 < k; k0 += 16) {
            unsigned fa[4], fb[2];
            load_a(fa, a + k0, lda, g, q);
            const bf16* bk = b + (k0 + 2 * q) * ldb + n0 + g;
            fb[0] = pack(bk[0], bk[ldb]);
            fb[1] = pack(bk[8 * ldb], bk[9 * ldb]);
            mma16816(acc, fa, fb);
        }
        c[g * ldc + n0 + 2 * q] = acc[0];
        c[g * ldc + n0 + 2 * q + 1] = acc[1];
        c[(g + 8) * ldc + n0 + 2 * q] = acc[2];
        c[(g + 8) * ldc + n0 + 2 * q + 1] = acc[3];
    }
}

// ---- forward ----------------------------------------------------------------------------------
// Grid (ceil(T / TILE), B·H), THREADS threads, dynamic shared memory attn_fwd_smem(d) bytes:
// Q, K, V tiles (bf16), S (f32) and P (bf16) score tiles, O accumulator (f32), m and l (f32).
extern "C" __global__ void attn_fwd(act_t* out, float* lse, const act_t* qkv, Heads s, float scale) {
    DYNAMIC_SMEM(smem);
    const int d = s.d;
    bf16* Qs = (bf16*)smem;
    bf16* Ks = Qs + TILE * d;
    bf16* Vs = Ks + TILE * d;
    float* S = (float*)(Vs + TILE * d);
    bf16* P = (bf16*)(S + TILE * TILE);
    float* O = (float*)(P + TILE * TILE);
    float* row_m = O + TILE * d;
    float* row_l = row_m + TILE;

    const int b = blockIdx.y / s.n_heads, h = blockIdx.y % s.n_heads;
    const int kvh = h / (s.n_heads / s.n_kv_heads), w = s.width();
    const size_t row0 = (size_t)b * s.seq;
    const int i0 = blockIdx.x * TILE, warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, wr = warp * 16;

    load_tile(Qs, qkv, row0, i0, s.seq, w, s.q_col(h), d);
    for (int idx = threadIdx.x; idx < TILE * d; idx += blockDim.x) O[idx] = 0.0f;
    for (int r = threadIdx.x; r < TILE; r += blockDim.x) { row_m[r] = -INFINITY; row_l[r] = 0.0f; }

    const int i_end = min(s.seq, i0 + TILE);  // keys j < i_end can be seen by this tile's rows
    for (int j0 = 0; j0 < i_end; j0 += TILE) {
        __syncthreads();  // every warp is done with the previous K, V (and the Q/O init is visible)
        load_tile(Ks, qkv, row0, j0, s.seq, w, s.k_col(kvh), d);
        load_tile(Vs, qkv, row0, j0, s.seq, w, s.v_col(kvh), d);
        __syncthreads();
        mma_abt(S + wr * TILE, TILE, Qs + wr * d, d, Ks, d, TILE, d);
        __syncwarp();
        for (int r = 0; r < 16; r++) {
            const int row = wr + r, i = i0 + row;
            const float m_old = row_m[row];
            float x[TILE / WARP];
            float tile_max = -INFINITY;
            for (int k = 0; k < TILE / WARP; k++) {
                int c = lane + k * WARP, j = j0 + c;
                x[k] = (j <= i && j < s.seq) ? S[row * TILE + c] * scale : -INFINITY;
                tile_max = fmaxf(tile_max, x[k]);
            }
            const float m_new = fmaxf(m_old, warp_max(tile_max));
            // A row with no visible key yet (only padding rows) keeps m = -inf: use 0 as the base.
            const float base = m_new == -INFINITY ? 0.0f : m_new;
            float psum = 0.0f;
            for (int k = 0; k < TILE / WARP; k++) {
                float p = x[k] == -INFINITY ? 0.0f : __expf(x[k] - base);
                P[row * TILE + lane + k * WARP] = __float2bfloat16(p);
                psum += p;
            }
            const float corr = m_old == -INFINITY ? 0.0f : __expf(m_old - base);
            psum = warp_sum(psum);  // also orders every lane's read of row_m before lane 0's write
            for (int c = lane; c < d; c += WARP) O[row * d + c] *= corr;
            if (lane == 0) { row_m[row] = m_new; row_l[row] = row_l[row] * corr + psum; }
        }
        __syncwarp();
        mma_ab_acc(O + wr * d, d, P + wr * TILE, TILE, Vs, d, d, TILE);
    }
    __syncwarp();
    const int ow = s.n_heads * d;
    for (int r = 0; r < 16; r++) {
        const int row = wr + r, i = i0 + row;
        if (i >= s.seq) break;
        const float inv = 1.0f / row_l[row];
        for (int c = lane; c < d; c += WARP) st(out + (row0 + i) * ow + h * d + c, O[row * d + c] * inv);
        if (lane == 0) lse[(size_t)blockIdx.y * s.seq + i] = row_m[row] + logf(row_l[row]);
    }
}

// ---- backward ---------------------------------------------------------------------------------
// Three kernels, none with atomics, so dqkv is bitwise reproducible:
//   attn_bwd_delta: Δ_i = ⟨dO_i, O_i⟩ per (b, h, i);
//   attn_bwd_dkv:   one block per (key tile, b, kv head) walks the query tiles of every q head of
//                   its group: dV = Σ Pᵀ dO, dK = Σ dSᵀ Q (computed transposed: warps own keys);
//   attn_bwd_dq:    one block per (query tile, b, h) walks its key tiles: dQ = Σ dS K.
// P = exp(scale·QKᵀ − lse) is recomputed in both; dS = P ⊙ (dP − Δ)·scale, dP = dO Vᵀ.

// Grid covers B·T·H warps; delta (B·H·T).
extern "C" __global__ void attn_bwd_delta(float* delta, const act_t* dout, const act_t* out, Heads s, int tokens) {
    const size_t task = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / WARP;
    const int lane = threadIdx.x % WARP;
    if (task >= (size_t)tokens * s.n_heads) return;
    const int h = task % s.n_heads;
    const size_t n = task / s.n_heads;  // token row b·T + t
    const size_t base = n * s.n_heads * s.d + (size_t)h * s.d;
    float acc = 0.0f;
    for (int c = lane; c < s.d; c += WARP) acc += ld(dout + base + c) * ld(out + base + c);
    acc = warp_sum(acc);
    const size_t b = n / s.seq, t = n % s.seq;
    if (lane == 0) delta[(b * s.n_heads + h) * s.seq + t] = acc;
}

// Loads lse and Δ of query rows i0.. for head bh (0 past seq).
__device__ void load_stats(float* L, float* D, const float* lse, const float* delta, size_t bh, int i0, int seq) {
    for (int r = threadIdx.x; r < TILE; r += blockDim.x) {
        int i = i0 + r;
        L[r] = i < seq ? lse[bh * seq + i] : 0.0f;
        D[r] = i < seq ? delta[bh * seq + i] : 0.0f;
    }
}

// Grid (ceil(T / TILE), B·Hkv), THREADS threads, attn_bwd_dkv_smem(d) bytes. Writes the k and v
// columns of dqkv.
extern "C" __global__ void attn_bwd_dkv(act_t* dqkv, const act_t* dout, const float* lse, const float* delta,
                                        const act_t* qkv, Heads s, float scale) {
    DYNAMIC_SMEM(smem);
    const int d = s.d;
    bf16* Ks = (bf16*)smem;
    bf16* Vs = Ks + TILE * d;
    bf16* Qs = Vs + TILE * d;
    bf16* dOs = Qs + TILE * d;
    float* dK = (float*)(dOs + TILE * d);
    float* dV = dK + TILE * d;
    float* St = dV + TILE * d;   // (keys × queries): K Qᵀ
    float* dPt = St + TILE * TILE;  // V dOᵀ
    bf16* Pt = (bf16*)(dPt + TILE * TILE);
    bf16* dSt = Pt + TILE * TILE;
    float* L = (float*)(dSt + TILE * TILE);
    float* D = L + TILE;

    const int b = blockIdx.y / s.n_kv_heads, kvh = blockIdx.y % s.n_kv_heads;
    const int group = s.n_heads / s.n_kv_heads, w = s.width(), ow = s.n_heads * d;
    const size_t row0 = (size_t)b * s.seq;
    const int j0 = blockIdx.x * TILE, warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, wk = warp * 16;

    load_tile(Ks, qkv, row0, j0, s.seq, w, s.k_col(kvh), d);
    load_tile(Vs, qkv, row0, j0, s.seq, w, s.v_col(kvh), d);
    for (int idx = threadIdx.x; idx < TILE * d; idx += blockDim.x) { dK[idx] = 0.0f; dV[idx] = 0.0f; }

    for (int g = 0; g < group; g++) {
        const int h = kvh * group + g;
        const size_t bh = (size_t)b * s.n_heads + h;
        for (int i0 = j0; i0 < s.seq; i0 += TILE) {  // query tiles at or below the diagonal
            __syncthreads();
            load_tile(Qs, qkv, row0, i0, s.seq, w, s.q_col(h), d);
            load_tile(dOs, dout, row0, i0, s.seq, ow, h * d, d);
            load_stats(L, D, lse, delta, bh, i0, s.seq);
            __syncthreads();
            mma_abt(St + wk * TILE, TILE, Ks + wk * d, d, Qs, d, TILE, d);
            mma_abt(dPt + wk * TILE, TILE, Vs + wk * d, d, dOs, d, TILE, d);
            __syncwarp();
            for (int idx = lane; idx < 16 * TILE; idx += WARP) {
                const int r = wk + idx / TILE, c = idx % TILE, j = j0 + r, i = i0 + c;
                const bool visible = i < s.seq && j <= i;
                const float p = visible ? __expf(St[r * TILE + c] * scale - L[c]) : 0.0f;
                Pt[r * TILE + c] = __float2bfloat16(p);
                dSt[r * TILE + c] = __float2bfloat16(p * (dPt[r * TILE + c] - D[c]) * scale);
            }
            __syncwarp();
            mma_ab_acc(dV + wk * d, d, Pt + wk * TILE, TILE, dOs, d, d, TILE);
            mma_ab_acc(dK + wk * d, d, dSt + wk * TILE, TILE, Qs, d, d, TILE);
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < TILE * d; idx += blockDim.x) {
        const int r = idx / d, c = idx % d, j = j0 + r;
        if (j >= s.seq) continue;
        st(dqkv + (row0 + j) * w + s.k_col(kvh) + c, dK[idx]);
        st(dqkv + (row0 + j) * w + s.v_col(kvh) + c, dV[idx]);
    }
}

// Grid (ceil(T / TILE), B·H), THREADS threads, attn_bwd_dq_smem(d) bytes. Writes the q columns
// of dqkv.
extern "C" __global__ void attn_bwd_dq(act_t* dqkv, const act_t* dout, const float* lse, const float* delta,
                                       const act_t* qkv, Heads s, float scale) {
    DYNAMIC_SMEM(smem);
    const int d = s.d;
    bf16* Qs = (bf16*)smem;
    bf16* dOs = Qs + TILE * d;
    bf16* Ks = dOs + TILE * d;
    bf16* Vs = Ks + TILE * d;
    float* dQ = (float*)(Vs + TILE * d);
    float* S = dQ + TILE * d;
    float* dP = S + TILE * TILE;
    bf16* dS = (bf16*)(dP + TILE * TILE);
    float* L = (float*)(dS + TILE * TILE);
    float* D = L + TILE;

    const int b = blockIdx.y / s.n_heads, h = blockIdx.y % s.n_heads;
    const int kvh = h / (s.n_heads / s.n_kv_heads), w = s.width(), ow = s.n_heads * d;
    const size_t row0 = (size_t)b * s.seq;
    const int i0 = blockIdx.x * TILE, warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, wr = warp * 16;

    load_tile(Qs, qkv, row0, i0, s.seq, w, s.q_col(h), d);
    load_tile(dOs, dout, row0, i0, s.seq, ow, h * d, d);
    load_stats(L, D, lse, delta, blockIdx.y, i0, s.seq);
    for (int idx = threadIdx.x; idx < TILE * d; idx += blockDim.x) dQ[idx] = 0.0f;

    const int i_end = min(s.seq, i0 + TILE);
    for (int j0 = 0; j0 < i_end; j0 += TILE) {
        __syncthreads();
        load_tile(Ks, qkv, row0, j0, s.seq, w, s.k_col(kvh), d);
        load_tile(Vs, qkv, row0, j0, s.seq, w, s.v_col(kvh), d);
        __syncthreads();
        mma_abt(S + wr * TILE, TILE, Qs + wr * d, d, Ks, d, TILE, d);
        mma_abt(dP + wr * TILE, TILE, dOs + wr * d, d, Vs, d, TILE, d);
        __syncwarp();
        for (int idx = lane; idx < 16 * TILE; idx += WARP) {
            const int r = wr + idx / TILE, c = idx % TILE, i = i0 + r, j = j0 + c;
            const bool visible = i < s.seq && j <= i;
            const float p = visible ? __expf(S[r * TILE + c] * scale - L[r]) : 0.0f;
            dS[r * TILE + c] = __float2bfloat16(p * (dP[r * TILE + c] - D[r]) * scale);
        }
        __syncwarp();
        mma_ab_acc(dQ + wr * d, d, dS + wr * TILE, TILE, Ks, d, d, TILE);
    }
    __syncwarp();
    for (int r = 0; r < 16; r++) {
        const int row = wr + r, i = i0 + row;
        if (i >= s.seq) break;
        for (int c = lane; c < d; c += WARP) st(dqkv + (row0 + i) * w + s.q_col(h) + c, dQ[row * d + c]);
    }
}
