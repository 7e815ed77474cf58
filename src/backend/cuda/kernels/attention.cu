// Causal flash attention (FlashAttention-2 schedule) with grouped-query heads, for sm_80+.
//
// Every tile product runs on tensor cores (mma.m16n8k16, bf16 × bf16 → f32) with operands
// fetched by ldmatrix from shared memory; scores and the O, dK, dV accumulators stay in
// registers. A warp owns whole rows of its block's tile (16 per row atom), so the online softmax
// needs only shuffles within a quad, and P goes from accumulator registers straight into the
// next product's A operand. The forward keeps its Q fragments in registers for the whole walk
// and, at head_dim ≤ 64, gives each warp two row atoms (32 rows; FlashAttention-2's 128-row
// forward tile), so every K or V fragment it reads from shared memory feeds two products. The
// backward likewise gives each warp 32 keys at head_dim ≤ 64 (over query tiles of 32). The tiles
// a block walks (K, V in the forward; Q, dO in the backward) stream through two shared-memory
// buffers with cp.async, the next tile's copy overlapping this tile's math (f32 storage converts
// to bf16 on load instead). Shared rows are padded by 16 bytes: a row is then an odd number of
// 16-byte chunks, so ldmatrix's eight row addresses hit distinct banks.
//
// Layout (see backend/mod.rs): qkv (N, (H + 2Hkv)·D), N = B·T, q heads then k then v;
// out, dout (N, H·D); lse, delta (B·H·T) f32. Entry points per head_dim D ∈ {16, 32, …, 128}
// (attn_fwd_dD, attn_bwd_dD, see the end of the file) and attn_bwd_delta. Blocks have 4 warps;
// their shared memory is `attention.rs`'s `Pass::smem_bytes`. On Hopper (sm_90a) also
// attn_fwd_wgmma_d64, the forward on wgmma (its own section below).

#define BLOCK 64     // rows of the forward's key tiles (the backward's query tiles: BLOCK / DKV_ATOMS)
#define THREADS 128  // 4 warps of 16 rows per row atom
// Row atoms per warp of the forward: two while the accumulators fit the registers (head_dim ≤ 64).
#define FWD_ATOMS(D) ((D) <= 64 ? 2 : 1)
// Key-row atoms per warp of the backward, the same; its query tiles then have 64 / DKV_ATOMS
// rows, so that the scores take the registers of one 16 × 64 atom pair.
#define DKV_ATOMS(D) ((D) <= 64 ? 2 : 1)
#define PAD 8        // bf16 of padding per shared row
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

struct Heads {
    int seq, n_heads, n_kv_heads, d;
    __device__ int width() const { return (n_heads + 2 * n_kv_heads) * d; }
    __device__ int q_col(int h) const { return h * d; }
    __device__ int k_col(int kvh) const { return (n_heads + kvh) * d; }
    __device__ int v_col(int kvh) const { return (n_heads + n_kv_heads + kvh) * d; }
};

// dst (ROWS × D, row stride D + PAD), by the 4 warps of the mma.sync kernels.
template <int D, int ROWS = BLOCK>
__device__ void load_tile(bf16* dst, const act_t* src, size_t row0, int t0, int seq, int ld_src, int col) {
    load_rows<D, ROWS, THREADS, false>([=](int r, int c) { return dst + r * (D + PAD) + 8 * c; }, src, row0, t0, seq, ld_src, col);
}

// Tiles stream through two shared buffers: step t's copies were queued one step earlier.
// Queues step t + 1's (when there is one) and waits until step t's are complete and visible to
// the whole block.
template <class Queue>
__device__ __forceinline__ void advance(int t, int steps, Queue queue) {
    if (t + 1 < steps) {
        queue(t + 1);
        cp_async_commit();
        cp_async_wait_pending<1>();
    } else {
        cp_async_wait_all();
    }
    __syncthreads();
}

// The K and V tiles of key tile t of kv head kvh into buffer t % 2 of KV (K, then V).
template <int D>
__device__ void load_kv(bf16* KV, int t, const act_t* qkv, size_t row0, Heads s, int kvh) {
    constexpr int TE = BLOCK * (D + PAD);
    bf16* buf = KV + 2 * (t % 2) * TE;
    load_tile<D>(buf, qkv, row0, t * BLOCK, s.seq, s.width(), s.k_col(kvh));
    load_tile<D>(buf + TE, qkv, row0, t * BLOCK, s.seq, s.width(), s.v_col(kvh));
}

// ---- operand fragments (layouts in common.cuh) ------------------------------------------------
// Tiles are row-major with row stride ld; m = lane / 8 picks the 8×8 matrix a lane addresses.

// A fragment of the 16×16 block at rows r0.., cols c0...
__device__ __forceinline__ void frag_a(unsigned f[4], const bf16* t, int ld, int r0, int c0) {
    const int lane = threadIdx.x % WARP, m = lane / 8;
    ldmatrix_x4(f, t + (r0 + (m % 2) * 8 + lane % 8) * ld + c0 + (m / 2) * 8);
}
// A-operand sources of the tile products: `a(f, at, kk)` gives the fragment of row atom `at` at
// k-step kk. From a shared tile of row stride ld (read when needed: fewest live registers),
// from fragments held in registers, or from an accumulator (P, dS: rounded to bf16).
__device__ __forceinline__ auto shared_a(const bf16* t, int ld, int r0) {
    return [=](unsigned f[4], int at, int kk) { frag_a(f, t, ld, r0 + 16 * at, kk * 16); };
}
template <int D, int ATOMS>
__device__ __forceinline__ auto held_a(const unsigned (&frags)[ATOMS][D / 16][4]) {
    return [&](unsigned f[4], int at, int kk) {
        for (int i = 0; i < 4; i++) f[i] = frags[at][kk][i];
    };
}
// Fills `frags` with the A fragments of ATOMS row atoms from row r0 of tile t, all D columns.
template <int D, int ATOMS>
__device__ __forceinline__ void hold_a(unsigned (&frags)[ATOMS][D / 16][4], const bf16* t, int r0) {
#pragma unroll
    for (int at = 0; at < ATOMS; at++)
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) frag_a(frags[at][kk], t, D + PAD, r0 + 16 * at, kk * 16);
}
// B fragments of the n-tiles n0 and n0 + 8 (f[0..1], f[2..3]) at k-step k0.. from a tile that
// stores B transposed, one row per n (K in Q·Kᵀ).
__device__ __forceinline__ void frag_bt(unsigned f[4], const bf16* t, int ld, int n0, int k0) {
    const int lane = threadIdx.x % WARP, m = lane / 8;
    ldmatrix_x4(f, t + (n0 + (m / 2) * 8 + lane % 8) * ld + k0 + (m % 2) * 8);
}
// The same from a tile that stores B as is, one row per k (V in P·V).
__device__ __forceinline__ void frag_b(unsigned f[4], const bf16* t, int ld, int k0, int n0) {
    const int lane = threadIdx.x % WARP, m = lane / 8;
    ldmatrix_x4_trans(f, t + (k0 + (m % 2) * 8 + lane % 8) * ld + n0 + (m / 2) * 8);
}

// The A fragment of k-step kk (columns 16kk..) of a 16 × N accumulator held as C fragments.
template <int N>
__device__ __forceinline__ void acc_to_a(unsigned f[4], const float c[N / 8][4], int kk) {
    f[0] = pack_bf16(c[2 * kk][0], c[2 * kk][1]);
    f[1] = pack_bf16(c[2 * kk][2], c[2 * kk][3]);
    f[2] = pack_bf16(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    f[3] = pack_bf16(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

template <int N, int ATOMS>
__device__ __forceinline__ auto acc_a(const float (&p)[ATOMS][N / 8][4]) {
    return [&](unsigned f[4], int at, int kk) { acc_to_a<N>(f, p[at], kk); };
}

// B-operand sources: `b(f, kk, np)` gives the fragments of n-tiles 16np and 16np + 8 at k-step
// kk, from a shared tile of row stride D + PAD that stores B transposed (K in Q·Kᵀ), or as is
// (V in P·V).
template <int D>
__device__ __forceinline__ auto tile_bt(const bf16* t) {
    return [=](unsigned f[4], int kk, int np) { frag_bt(f, t, D + PAD, np * 16, kk * 16); };
}
template <int D>
__device__ __forceinline__ auto tile_b(const bf16* t) {
    return [=](unsigned f[4], int kk, int np) { frag_b(f, t, D + PAD, kk * 16, np * 16); };
}

// c (16·ATOMS × N) += a (16·ATOMS × K) · b (K × N), from the sources above. Each B fragment
// read feeds every atom.
template <int K, int N, int ATOMS, class A, class B>
__device__ __forceinline__ void product(float c[ATOMS][N / 8][4], A a, B b) {
#pragma unroll
    for (int kk = 0; kk < K / 16; kk++) {
        unsigned af[ATOMS][4];
#pragma unroll
        for (int at = 0; at < ATOMS; at++) a(af[at], at, kk);
#pragma unroll
        for (int np = 0; np < N / 16; np++) {
            unsigned bf[4];
            b(bf, kk, np);
#pragma unroll
            for (int at = 0; at < ATOMS; at++) {
                mma16816(c[at][2 * np], af[at], bf);
                mma16816(c[at][2 * np + 1], af[at], bf + 2);
            }
        }
    }
}

// Writes a 16 × D accumulator's row r (0: g, 1: g + 8) of this lane to dst + columns 2q, 2q+1
// of each n-tile, times k.
template <int D>
__device__ __forceinline__ void store_row(act_t* dst, const float c[D / 8][4], int r, float k) {
    const int q = threadIdx.x % 4;
    for (int nt = 0; nt < D / 8; nt++) {
        act_t* p = dst + nt * 8 + 2 * q;
#ifdef MOTLEY_ACT_BF16
        *(unsigned*)p = pack_bf16(c[nt][2 * r] * k, c[nt][2 * r + 1] * k);
#else
        *(float2*)p = make_float2(c[nt][2 * r] * k, c[nt][2 * r + 1] * k);
#endif
    }
}

// Max and sum over the quad of lanes that share an accumulator row.
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// ---- forward ----------------------------------------------------------------------------------
// Grid (ceil(T / (64·ATOMS)), B·H): a block's 4 warps own 16·ATOMS query rows each. Shared: Q,
// then two buffers of K, V. Query blocks run longest first (the causal walk of the last one is
// the longest).
template <int D>
__device__ void attn_fwd(act_t* out, float* lse, const act_t* qkv, Heads s, float scale) {
    constexpr int ATOMS = FWD_ATOMS(D), ROWS = 4 * 16 * ATOMS, TE = BLOCK * (D + PAD);
    DYNAMIC_SMEM(smem);
    bf16* Qs = (bf16*)smem;
    bf16* KV = Qs + ROWS * (D + PAD);  // buffer k: K at KV + 2k·TE, V after it

    const int b = blockIdx.y / s.n_heads, h = blockIdx.y % s.n_heads;
    const int kvh = h / (s.n_heads / s.n_kv_heads), w = s.width();
    const size_t row0 = (size_t)b * s.seq;
    const int i0 = (gridDim.x - 1 - blockIdx.x) * ROWS, tiles = (i0 + ROWS - 1) / BLOCK + 1;
    const int lane = threadIdx.x % WARP, wr = (threadIdx.x / WARP) * 16 * ATOMS, g = lane / 4, q = lane % 4;
    const float scale2 = scale * LOG2E;  // scores in log2 units: 2^x on the SFU (exp2_ftz)

    load_tile<D, ROWS>(Qs, qkv, row0, i0, s.seq, w, s.q_col(h));
    load_kv<D>(KV, 0, qkv, row0, s, kvh);
    cp_async_commit();

    unsigned qf[ATOMS][D / 16][4];  // read once, when the first tiles have arrived
    float o[ATOMS][D / 8][4] = {};
    // Rows g and g + 8 of each atom; l per lane.
    float m[ATOMS][2], l[ATOMS][2] = {};
#pragma unroll
    for (int at = 0; at < ATOMS; at++) m[at][0] = m[at][1] = -INFINITY;
    for (int t = 0; t < tiles; t++) {
        const int j0 = t * BLOCK;
        const bf16* Ks = KV + 2 * (t % 2) * TE;
        const bf16* Vs = Ks + TE;
        advance(t, tiles, [&](int next) { load_kv<D>(KV, next, qkv, row0, s, kvh); });
        if (t == 0) hold_a<D, ATOMS>(qf, Qs, wr);

        // A warp whose rows all come before this tile's keys has nothing to add (the block's
        // last tile, for its first warps).
        if (j0 <= i0 + wr + 16 * ATOMS - 1) {
            float sc[ATOMS][BLOCK / 8][4] = {};
            product<D, BLOCK, ATOMS>(sc, held_a<D, ATOMS>(qf), tile_bt<D>(Ks));
            // Only tiles reaching past the warp's first row have keys after some of its rows.
            // Key 0 is visible to every row, so after the first tile each row's max is finite.
            // Scores stay unscaled until the exponent, which then takes one FMA (scale2 > 0: the
            // scaled max is the max scaled).
            if (j0 + BLOCK - 1 > i0 + wr) {
#pragma unroll
                for (int at = 0; at < ATOMS; at++)
                    for (int nt = 0; nt < BLOCK / 8; nt++)
                        for (int e = 0; e < 4; e++) {
                            const int i = i0 + wr + 16 * at + g + 8 * (e / 2), j = j0 + nt * 8 + 2 * q + e % 2;
                            if (j > i) sc[at][nt][e] = -INFINITY;
                        }
            }
#pragma unroll
            for (int at = 0; at < ATOMS; at++) {
                float mx[2] = {-INFINITY, -INFINITY};
                for (int nt = 0; nt < BLOCK / 8; nt++)
                    for (int e = 0; e < 4; e++) mx[e / 2] = fmaxf(mx[e / 2], sc[at][nt][e]);
                float corr[2];
                for (int r = 0; r < 2; r++) {
                    mx[r] = fmaxf(m[at][r], quad_max(mx[r]) * scale2);
                    corr[r] = exp2_ftz(m[at][r] - mx[r]);  // 0 on the first tile (m = −inf)
                    m[at][r] = mx[r];
                    l[at][r] *= corr[r];
                }
                for (int nt = 0; nt < BLOCK / 8; nt++)
                    for (int e = 0; e < 4; e++) {
                        const float p = exp2_ftz(fmaf(sc[at][nt][e], scale2, -m[at][e / 2]));
                        sc[at][nt][e] = p;
                        l[at][e / 2] += p;
                    }
                for (int nt = 0; nt < D / 8; nt++)
                    for (int e = 0; e < 4; e++) o[at][nt][e] *= corr[e / 2];
            }
            product<BLOCK, D, ATOMS>(o, acc_a<BLOCK, ATOMS>(sc), tile_b<D>(Vs));
        }
        __syncthreads();  // every warp is done with this buffer before the next tile refills it
    }

    const int ow = s.n_heads * D;
#pragma unroll
    for (int at = 0; at < ATOMS; at++)
        for (int r = 0; r < 2; r++) {
            const float sum = quad_sum(l[at][r]);
            const int i = i0 + wr + 16 * at + g + 8 * r;
            if (i >= s.seq) continue;
            store_row<D>(out + (row0 + i) * ow + h * D, o[at], r, 1.0f / sum);
            if (q == 0) lse[(size_t)blockIdx.y * s.seq + i] = m[at][r] * LN2 + logf(sum);
        }
}

// ---- forward on Hopper (sm_90a): wgmma, head_dim 64 -------------------------------------------
// Two warpgroups of 64 query rows (128 a block, 256 threads); key tiles of 128 stream through
// three shared buffers. Q, K and V lie in shared memory in the 128-byte swizzled layout
// (common.cuh). Per tile each warpgroup computes S = Q Kᵀ with four wgmma m64n128k16 (both
// operands from shared memory), runs the online softmax on S's registers (a warp holds 16 whole
// rows, laid out as mma.sync's accumulators: quad shuffles, as in attn_fwd), and adds P V with
// eight wgmma m64n64k16 (P from registers, V read transposed). Pipelined within each warpgroup
// (FlashAttention-3's intra-warpgroup overlap): tile t's S products and tile t − 1's P V run
// together, and tile t's softmax runs while P V does; tile t − 1's V is still read while tile
// t + 1 arrives, hence three buffers. Writes what attn_fwd_d64 writes. Grid (ceil(T / 128),
// B·H); shared memory `Pass::hopper_smem_bytes` of attention.rs. Opt-in
// (`CudaBackend::with_hopper_attention`) until it has run on a GPU.
#ifdef MOTLEY_WGMMA
template <int R, int C>
__device__ __forceinline__ float (&flat(float (&x)[R][C]))[R * C] {
    return reinterpret_cast<float(&)[R * C]>(x);
}
// frag_a from a swizzled tile: the A fragment of rows r0..r0 + 15, k-step kk.
__device__ __forceinline__ void frag_a_sw128(unsigned f[4], const unsigned char* tile, int r0, int kk) {
    const int lane = threadIdx.x % WARP, m = lane / 8;
    ldmatrix_x4(f, tile + sw128_offset(r0 + (m % 2) * 8 + lane % 8, 2 * kk + m / 2));
}

extern "C" __global__ void __launch_bounds__(256, 1) attn_fwd_wgmma_d64(act_t* out, float* lse, const act_t* qkv, Heads s, float scale, const __grid_constant__ TensorMap qkv_map) {
    constexpr int D = 64, ROWS = 128, KEYS = 128, TILE = 128 * 128;  // a tile: 128 rows of 128 bytes
    // bf16 storage: thread 0 brings each tile with one TMA copy (qkv_map: qkv as (column, row,
    // sequence), boxes of 64 × 128 × 1) onto an mbarrier per buffer; f32 storage converts as it
    // stages, so every thread copies its share with cp.async.
    constexpr bool TMA = sizeof(act_t) == 2;
    DYNAMIC_SMEM(raw);
    // The swizzle repeats every 1024 bytes of shared address: tiles start on such a boundary.
    unsigned char* Qs = raw + (1024 - __cvta_generic_to_shared(raw) % 1024) % 1024;
    unsigned char* KV = Qs + TILE;  // buffer k: K at KV + 2k·TILE, V after it
    // The buffers' mbarriers (each completes once per tile it receives), then Q's.
    unsigned long long* full = (unsigned long long*)(KV + 6 * TILE);
    unsigned long long* q_full = full + 3;

    const int b = blockIdx.y / s.n_heads, h = blockIdx.y % s.n_heads;
    const int kvh = h / (s.n_heads / s.n_kv_heads), w = s.width();
    const size_t row0 = (size_t)b * s.seq;
    const int i0 = (gridDim.x - 1 - blockIdx.x) * ROWS, tiles = i0 / KEYS + 1;
    const int wg = threadIdx.x / 128, lane = threadIdx.x % WARP, g = lane / 4, q = lane % 4;
    const int r0 = i0 + 64 * wg + 16 * (threadIdx.x % 128 / WARP);  // the warp's first query row
    const float scale2 = scale * LOG2E;

    // 128 rows × 64 columns of qkv from sequence row t0 into a swizzled tile: cp.async by every
    // thread, or (TMA) thread 0's copy onto `bar`, whose expect_tx it has announced.
    auto load = [&](unsigned char* tile, int t0, int col, unsigned long long* bar) {
        if constexpr (TMA) {
            tma_load_3d(tile, qkv_map, col, t0, b, bar);
        } else {
            load_rows<D, 128, 256>(swizzled(tile), qkv, row0, t0, s.seq, w, col);
        }
    };
    auto buffer = [&](int t) { return KV + 2 * (t % 3) * TILE; };
    auto load_kv = [&](int t) {
        unsigned long long* bar = full + t % 3;
        if (TMA && threadIdx.x != 0) return;
        if (TMA) mbar_arrive_expect_tx(bar, 2 * TILE);
        load(buffer(t), t * KEYS, s.k_col(kvh), bar);
        load(buffer(t) + TILE, t * KEYS, s.v_col(kvh), bar);
    };
    // P V of tile t (P in pa) onto o, queued as one group.
    auto add_pv = [&](float (&o)[D / 8][4], const unsigned (&pa)[KEYS / 16][4], int t) {
        const auto v = sw128_desc(buffer(t) + TILE, 1024);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < KEYS / 16; kk++) wgmma_m64n64k16_rs<1>(flat(o), pa[kk], desc_plus(v, 16 * 128 * kk), 1);
        wgmma_commit();
    };
    if (TMA && threadIdx.x == 0) {
        for (int k = 0; k < 4; k++) mbar_init(full + k, 1);
        fence_mbarrier_init();
        mbar_arrive_expect_tx(q_full, TILE);
    }
    if (TMA) __syncthreads();  // the barriers are initialised before anyone waits on them
    if (!TMA || threadIdx.x == 0) load(Qs, i0, s.q_col(h), q_full);
    load_kv(0);
    if (!TMA) cp_async_commit();

    float o[D / 8][4] = {};
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {};  // rows g and g + 8; l per lane
    unsigned pa[KEYS / 16][4];                       // the previous tile's P, as A operands
    float sc[KEYS / 8][4];
    // Tile t has arrived (for every thread, and visible to wgmma), and every warpgroup has
    // finished tile t − 2's P V (waited in step t − 1), so tile t + 1 may refill its buffer
    // (TMA: and every thread has seen tile t − 2's phase of the barrier the refill completes).
    auto arrive = [&](int t) {
        if constexpr (TMA) {
            if (t == 0) mbar_wait(q_full, 0);
            mbar_wait(full + t % 3, t / 3 % 2);
        } else {
            cp_async_wait_all();
            fence_proxy_async();
        }
        __syncthreads();
    };
    auto prefetch = [&](int t) {
        if (t + 1 < tiles) load_kv(t + 1);
        if (!TMA) cp_async_commit();
    };
    // S = Q Kᵀ of tile t into sc, queued as one group.
    auto add_scores = [&](int t) {
        wgmma_fence();
        const auto qd = sw128_desc(Qs + 64 * 128 * wg, 1024), kd = sw128_desc(buffer(t), 1024);
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) wgmma_m64n128k16_ss(flat(sc), desc_plus(qd, 32 * kk), desc_plus(kd, 32 * kk), kk > 0);
        wgmma_commit();
    };
    // The online softmax of tile t's scores: P over sc, the row maxima and sums updated; returns
    // (in corr) what o's rows must be multiplied by.
    auto softmax = [&](int t, float (&corr)[2]) {
        const int j0 = t * KEYS;
        // Only the last tile has keys after some of the warp's rows; key 0 is visible to every
        // row, so after the first tile each row's max is finite. Scores stay unscaled until the
        // exponent, as in attn_fwd.
        if (j0 + KEYS - 1 > r0) {
#pragma unroll
            for (int nt = 0; nt < KEYS / 8; nt++)
                for (int e = 0; e < 4; e++) {
                    const int i = r0 + g + 8 * (e / 2), j = j0 + nt * 8 + 2 * q + e % 2;
                    if (j > i) sc[nt][e] = -INFINITY;
                }
        }
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < KEYS / 8; nt++)
            for (int e = 0; e < 4; e++) mx[e / 2] = fmaxf(mx[e / 2], sc[nt][e]);
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(m[r], quad_max(mx[r]) * scale2);
            corr[r] = exp2_ftz(m[r] - mx[r]);  // 0 on the first tile (m = −inf)
            m[r] = mx[r];
            l[r] *= corr[r];
        }
#pragma unroll
        for (int nt = 0; nt < KEYS / 8; nt++)
            for (int e = 0; e < 4; e++) {
                const float p = exp2_ftz(fmaf(sc[nt][e], scale2, -m[e / 2]));
                sc[nt][e] = p;
                l[e / 2] += p;
            }
    };
    auto to_pa = [&] {
#pragma unroll
        for (int kk = 0; kk < KEYS / 16; kk++) acc_to_a<KEYS>(pa[kk], sc, kk);
    };
    // Tile 0 on its own (no P V before it, o still 0): the loop then has one shape.
    float corr[2];
    arrive(0);
    add_scores(0);
    prefetch(0);
    wgmma_wait<0>();
    fence_operands(flat(sc));
    softmax(0, corr);
    to_pa();
    for (int t = 1; t < tiles; t++) {
        arrive(t);
        // The products first, then the next tile's copies: the tensor cores start a tile's
        // work before the copies are issued (thread 0's TMA copies, or every thread's share).
        add_scores(t);
        add_pv(o, pa, t - 1);
        prefetch(t);
        wgmma_wait<1>();
        fence_operands(flat(sc));
        softmax(t, corr);
        // Only now wait for the previous tile's P V, which ran beside the softmax: o then holds
        // every earlier tile, at the previous max. The wait sits in both arms of a warp-uniform
        // branch on the softmax's result because in straight-line code ptxas hoists it above
        // the softmax, serializing the two (tests/cuda_nvrtc.rs checks the SASS). Rescaled
        // only where a row of the warp moved its max (else corr is exactly 1 and o · 1 is o):
        // once the maxima settle, most tiles skip it.
        if (__any_sync(~0u, corr[0] != 1.0f || corr[1] != 1.0f)) {
            wgmma_wait<0>();
            fence_operands(flat(o));
#pragma unroll
            for (int nt = 0; nt < D / 8; nt++)
                for (int e = 0; e < 4; e++) o[nt][e] *= corr[e / 2];
        } else {
            wgmma_wait<0>();
        }
        fence_operands(flat(o));
        fence_operands(pa);
        to_pa();
    }
    add_pv(o, pa, tiles - 1);
    wgmma_wait<0>();
    fence_operands(flat(o));

    const int ow = s.n_heads * D;
    for (int r = 0; r < 2; r++) {
        const float sum = quad_sum(l[r]);
        const int i = r0 + g + 8 * r;
        if (i >= s.seq) continue;
        store_row<D>(out + (row0 + i) * ow + h * D, o, r, 1.0f / sum);
        if (q == 0) lse[(size_t)blockIdx.y * s.seq + i] = m[r] * LN2 + logf(sum);
    }
}
#endif

// ---- backward ---------------------------------------------------------------------------------
// Two kernels, no atomics, dqkv bitwise reproducible:
//   attn_bwd_delta: Δ_i = ⟨dO_i, O_i⟩ per (b, h, i);
//   attn_bwd:       one block per (key block, b, kv head) walks the query tiles of every q head
//                   of its group, with P = exp(scale·QKᵀ − lse), dP = dO Vᵀ and
//                   dS = P ⊙ (dP − Δ)·scale: dV = Σ Pᵀ dO and dK = Σ dSᵀ Q stay in registers
//                   (computed transposed: warps own keys); each tile's dQ part, dS K, is added
//                   to an f32 accumulator in a fixed order of key blocks (turns, common.cuh).
// FlashAttention-2's five tile products, where a separate dQ kernel would recompute QKᵀ and dO Vᵀ.

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

// Key block kb's part of N pairs of adjacent dQ values 8 columns apart (v[n] at column 8n), in
// the turn order from key block `last` down to 0: `last` starts the f32 sums at `sum`, the next
// ones add to them, and key block 0 writes the totals to dqkv (at `dst_q`) instead. Which of
// these a block does is decided once for the N pairs, not per pair.
template <int N>
__device__ __forceinline__ void add_dq(float2 (&v)[N], float* sum, act_t* dst_q, int kb, int last) {
    if (kb != last) {
#pragma unroll
        for (int n = 0; n < N; n++) {
            const float2 before = __ldcg((const float2*)(sum + 8 * n));
            v[n] = make_float2(before.x + v[n].x, before.y + v[n].y);
        }
    }
    if (kb > 0) {
#pragma unroll
        for (int n = 0; n < N; n++) __stcg((float2*)(sum + 8 * n), v[n]);
    } else {
#pragma unroll
        for (int n = 0; n < N; n++) store_pair(dst_q + 8 * n, v[n].x, v[n].y);
    }
}

// The backward kernels' per-step query statistics of (b, h), query rows i0..i0 + QT, into st:
// lse in log2 units, then Δ (0 past the sequence). Threads 0..2·QT − 1 take one each.
template <int QT>
__device__ __forceinline__ void stage_stats(float* st, const float* lse, const float* delta, Heads s, int b, int h, int i0) {
    const size_t bh = (size_t)b * s.n_heads + h;
    const int r = threadIdx.x, i = i0 + r % QT;
    if (r < QT) st[r] = i < s.seq ? lse[bh * s.seq + i] * LOG2E : 0.0f;
    else if (r < 2 * QT) st[r] = i < s.seq ? delta[bh * s.seq + i] : 0.0f;
}
// Index of the turn counter of query tile i0 (QT rows) of (b, h) among the backward's
// counters: after the gridDim.y launch tickets (`turns_len` of attention.rs).
template <int QT>
__device__ __forceinline__ int tile_turn(Heads s, int b, int h, int i0) {
    return gridDim.y + (b * s.n_heads + h) * ((s.seq + QT - 1) / QT) + i0 / QT;
}

// A fragment (rows m0.., k-step k0..) of a matrix stored transposed, one row per k (dSᵀ).
__device__ __forceinline__ void frag_at(unsigned f[4], const bf16* t, int ld, int m0, int k0) {
    const int lane = threadIdx.x % WARP, m = lane / 8;
    ldmatrix_x4_trans(f, t + (k0 + (m / 2) * 8 + lane % 8) * ld + m0 + (m % 2) * 8);
}

// Grid (ceil(T / KEYS), B·Hkv), KEYS = 64·ATOMS: a block's 4 warps own 16·ATOMS key rows each.
// Shared: K, V (KEYS rows), two buffers of Q, dO (QT rows), two of the query rows' lse (in log2
// units) and Δ, then dSᵀ (KEYS × QT). Writes dqkv; dq_acc (N, H·D) f32 holds the dQ sums in
// between; turns (zero at launch) hold B·Hkv launch tickets, then per query tile (B·H·⌈T / QT⌉)
// the count of key blocks that have added to it.
//
// Query tile i0 gets its dQ parts from key blocks last = ⌊i0 / KEYS⌋ down to 0, in that order:
// `last` writes dq_acc, the next ones add to it, block 0 adds and writes dqkv. A block's key
// block comes from its (batch, kv head)'s launch ticket, not its grid column: last key block
// first, so every block waited for started earlier (turns, common.cuh), and it reaches the tile
// steps earlier on its own walk, so in the steady state no block should wait (not yet measured).
template <int D>
__device__ void attn_bwd(act_t* dqkv, float* dq_acc, unsigned* turns, const act_t* dout, const float* lse, const float* delta,
                         const act_t* qkv, Heads s, float scale) {
    constexpr int ATOMS = DKV_ATOMS(D), KEYS = 4 * 16 * ATOMS, QT = BLOCK / ATOMS;
    constexpr int KE = KEYS * (D + PAD), QE = QT * (D + PAD), SE = QT + PAD;
    DYNAMIC_SMEM(smem);
    bf16* Ks = (bf16*)smem;
    bf16* Vs = Ks + KE;
    bf16* QO = Vs + KE;                   // buffer k: Q at QO + 2k·QE, dO after it
    float* stats = (float*)(QO + 4 * QE);  // buffer k: lse·log2e at stats + 2k·QT, Δ after it
    bf16* dSs = (bf16*)(stats + 4 * QT);   // dSᵀ: KEYS rows of SE

    // Each (batch, kv head) runs its key blocks in the order of its own launch tickets, last key
    // block first. The ticket stays in shared memory and is read where used: a value held across
    // the tile products would spill (they take every register).
    const int b = blockIdx.y / s.n_kv_heads, kvh = blockIdx.y % s.n_kv_heads;
    const unsigned& ticket = launch_ticket(turns + blockIdx.y);
    auto kb = [&] { return int(gridDim.x - 1 - ticket); };
    auto j0 = [&] { return kb() * KEYS; };
    const size_t row0 = (size_t)b * s.seq;
    const int group = s.n_heads / s.n_kv_heads, w = s.width(), ow = s.n_heads * D;
    const int lane = threadIdx.x % WARP, wk = (threadIdx.x / WARP) * 16 * ATOMS, g = lane / 4, q = lane % 4;
    const float scale2 = scale * LOG2E;
    // Steps: every q head of the group × the query tiles from the block's first key on.
    auto qtiles = [&] { return (s.seq - j0() + QT - 1) / QT; };
    auto steps = [&] { return group * qtiles(); };

    // Queues the Q, dO tiles of step t into buffer t % 2 and writes its lse and Δ there.
    auto load_step = [&](int t) {
        const int h = kvh * group + t / qtiles(), i0 = j0() + (t % qtiles()) * QT;
        bf16* buf = QO + 2 * (t % 2) * QE;
        load_tile<D, QT>(buf, qkv, row0, i0, s.seq, w, s.q_col(h));
        load_tile<D, QT>(buf + QE, dout, row0, i0, s.seq, ow, h * D);
        static_assert(2 * QT <= THREADS, "one statistic per thread");
        stage_stats<QT>(stats + 2 * (t % 2) * QT, lse, delta, s, b, h, i0);
    };

    load_tile<D, KEYS>(Ks, qkv, row0, j0(), s.seq, w, s.k_col(kvh));
    load_tile<D, KEYS>(Vs, qkv, row0, j0(), s.seq, w, s.v_col(kvh));
    load_step(0);
    cp_async_commit();

    float dk[ATOMS][D / 8][4] = {}, dv[ATOMS][D / 8][4] = {};
    for (int t = 0; t < steps(); t++) {
        const int i0 = j0() + (t % qtiles()) * QT;
        const bf16* Qs = QO + 2 * (t % 2) * QE;
        const bf16* dOs = Qs + QE;
        const float* L2 = stats + 2 * (t % 2) * QT;
        const float* Dl = L2 + QT;
        advance(t, steps(), load_step);

        // Keys up to the tile's last query: the rows of the warps with something to add (the
        // block's first tiles end before its last warps' keys).
        const int keys = min(KEYS, i0 + QT - j0());
        if (wk < keys) {
            // Pᵀ from Sᵀ = K Qᵀ, then dSᵀ from dPᵀ = V dOᵀ (one after the other: fewer live
            // registers), for this warp's 16·ATOMS keys × QT queries.
            float pt[ATOMS][QT / 8][4] = {};
            product<D, QT, ATOMS>(pt, shared_a(Ks, D + PAD, wk), tile_bt<D>(Qs));
            // Tiles before the block's last key have queries before some of its keys. Query rows
            // past the sequence see zero Q and dO (and lse, Δ): their P is 1 but their dS and dO
            // are 0, so they add nothing and need no mask.
            const bool diagonal = i0 < j0() + KEYS;
#pragma unroll
            for (int at = 0; at < ATOMS; at++)
                for (int nt = 0; nt < QT / 8; nt++)
                    for (int e = 0; e < 4; e++) {
                        const int c = nt * 8 + 2 * q + e % 2, i = i0 + c, j = j0() + wk + 16 * at + g + 8 * (e / 2);
                        // exp2f, not exp2_ftz: at 255 registers, ptxas's schedule around the
                        // single instruction spills at D = 112 (and this kernel is less bound by
                        // exponentials than the forwards: five products to one exponential).
                        pt[at][nt][e] = diagonal && j > i ? 0.0f : exp2f(pt[at][nt][e] * scale2 - L2[c]);
                    }
            float dst[ATOMS][QT / 8][4] = {};
            product<D, QT, ATOMS>(dst, shared_a(Vs, D + PAD, wk), tile_bt<D>(dOs));
#pragma unroll
            for (int at = 0; at < ATOMS; at++)
                for (int nt = 0; nt < QT / 8; nt++)
                    for (int r = 0; r < 2; r++) {
                        float* d2 = &dst[at][nt][2 * r];
                        const int c = nt * 8 + 2 * q;
                        const float2 d = *(const float2*)(Dl + c);
                        d2[0] = pt[at][nt][2 * r] * (d2[0] - d.x) * scale;
                        d2[1] = pt[at][nt][2 * r + 1] * (d2[1] - d.y) * scale;
                        // dSᵀ for the block's dQ product, rounded as the dK product's operand.
                        *(unsigned*)(dSs + (wk + 16 * at + g + 8 * r) * SE + c) = pack_bf16(d2[0], d2[1]);
                    }
            product<QT, D, ATOMS>(dv, acc_a<QT, ATOMS>(pt), tile_b<D>(dOs));
            // dK reads dSᵀ back from shared memory (the warp's own rows), so dSᵀ's registers
            // are free for it.
            __syncwarp();
            product<QT, D, ATOMS>(dk, shared_a(dSs, SE, wk), tile_b<D>(Qs));
        }

        // dQ of the tile's rows, dS K over the block's keys, in units of 32 rows × 16 columns
        // per warp, added in the key blocks' order. wait_turn's barrier also publishes dSᵀ.
        // (Recomputed here rather than kept live across the products: the registers are full.)
        const int h = kvh * group + t / qtiles(), last = i0 / KEYS, tile = tile_turn<QT>(s, b, h, i0);
        wait_turn(turns + tile, last - kb());
#pragma unroll 1
        for (int unit = threadIdx.x / WARP; unit < D / 16 * (QT / 32); unit += 4) {
            const int piece = unit % (D / 16), a0 = 32 * (unit / (D / 16));  // 16 columns × 32 rows
            float acc[2][2][4] = {};
#pragma unroll 2
            for (int kk = 0; kk < keys / 16; kk++) {
                unsigned bf[4];
                frag_b(bf, Ks, D + PAD, kk * 16, piece * 16);
#pragma unroll
                for (int at = 0; at < 2; at++) {
                    unsigned af[4];
                    frag_at(af, dSs, SE, a0 + 16 * at, kk * 16);
                    mma16816(acc[at][0], af, bf);
                    mma16816(acc[at][1], af, bf + 2);
                }
            }
#pragma unroll
            for (int at = 0; at < 2; at++)
                for (int r = 0; r < 2; r++) {
                    const int i = i0 + a0 + 16 * at + g + 8 * r;
                    if (i >= s.seq) continue;
                    const int col = piece * 16 + 2 * q;
                    float2 v[2] = {make_float2(acc[at][0][2 * r], acc[at][0][2 * r + 1]), make_float2(acc[at][1][2 * r], acc[at][1][2 * r + 1])};
                    add_dq(v, dq_acc + (row0 + i) * ow + h * D + col, dqkv + (row0 + i) * w + s.q_col(h) + col, kb(), last);
                }
        }
        // Every warp is done with this step's buffers (and has stored its dQ part) before the
        // next step refills them.
        if (kb() > 0) pass_turn(turns + tile, last - kb() + 1);
        else __syncthreads();
    }

#pragma unroll
    for (int at = 0; at < ATOMS; at++)
        for (int r = 0; r < 2; r++) {
            const int j = j0() + wk + 16 * at + g + 8 * r;
            if (j >= s.seq) continue;
            store_row<D>(dqkv + (row0 + j) * w + s.k_col(kvh), dk[at], r, 1.0f);
            store_row<D>(dqkv + (row0 + j) * w + s.v_col(kvh), dv[at], r, 1.0f);
        }
}

// ---- backward on Hopper (sm_90a): wgmma, head_dim 64 ------------------------------------------
// attn_bwd's schedule (a block per key block, walking the query tiles of its group's q heads,
// dQ parts added in turns) on two warpgroups of 64 keys (128 keys a block, 256 threads); query
// tiles of 64 rows stream through two shared buffers. K, V, Q, dO lie in shared memory in the
// 128-byte swizzled layout, K already times the softmax scale (once, exact: 1/√64 is a power
// of two). Per tile a warpgroup computes Sᵀ = K Qᵀ and dPᵀ = V dOᵀ (wgmma
// m64n64k16; its K and V rows held in registers for the whole walk, Q and dO read from shared
// memory), Pᵀ and dSᵀ on their registers, then dV += Pᵀ dO and dK += dSᵀ Q with Pᵀ, dSᵀ from
// registers (dO, Q read transposed). dQ = dS K: each warpgroup multiplies its own keys' part
// (its dSᵀ stored to shared memory as query rows, K read transposed); the two 64 × 64 parts meet
// in shared memory, and each warpgroup adds 32 of the 64 columns to the f32 accumulator in the
// key blocks' turn, one step later (behind the next step's first products). Writes what
// attn_bwd_d64 writes. Grid (ceil(T / 128), B·Hkv); shared memory `Pass::hopper_smem_bytes`;
// the turn counters per 64-row query tile (`turns_len` of attention.rs). Opt-in like the
// forward.
#ifdef MOTLEY_WGMMA
extern "C" __global__ void __launch_bounds__(256, 1) attn_bwd_wgmma_d64(act_t* dqkv, float* dq_acc, unsigned* turns, const act_t* dout, const float* lse,
                                                                         const float* delta, const act_t* qkv, Heads s, float scale,
                                                                         const __grid_constant__ TensorMap qkv_map, const __grid_constant__ TensorMap dout_map) {
    constexpr int D = 64, KEYS = 128, QT = 64, HALF = 64 * 128;  // HALF: 64 rows of 128 bytes
    // bf16 storage: thread 0 brings K, V and each step's Q and dO tiles with TMA copies (the maps:
    // qkv and dout as (column, row, sequence), boxes of 64 × 64 × 1) onto mbarriers; f32 storage
    // converts as it stages, so every thread copies its share with cp.async.
    constexpr bool TMA = sizeof(act_t) == 2;
    DYNAMIC_SMEM(raw);
    unsigned char* Ks = raw + (1024 - __cvta_generic_to_shared(raw) % 1024) % 1024;
    unsigned char* Vs = Ks + 2 * HALF;
    unsigned char* QO = Vs + 2 * HALF;         // buffer k: Q at QO + 2k·HALF, dO after it
    unsigned char* dS = QO + 4 * HALF;         // warpgroup w's dS (query rows × its 64 keys) at dS + w·HALF
    float* halves = (float*)(dS + 2 * HALF);   // the dQ columns a warpgroup hands the other: 2 × 16 × 128
    float* stats = halves + 2 * 16 * 128;      // buffer k: lse·log2e at stats + 2k·QT, Δ after it
    // The Q/dO buffers' mbarriers (each completes once per step it receives), then K and V's.
    unsigned long long* full = (unsigned long long*)(stats + 4 * QT);
    unsigned long long* kv_full = full + 2;

    const int b = blockIdx.y / s.n_kv_heads, kvh = blockIdx.y % s.n_kv_heads;
    const int kb = gridDim.x - 1 - launch_ticket(turns + blockIdx.y), j0 = kb * KEYS;  // as in attn_bwd
    const size_t row0 = (size_t)b * s.seq;
    const int group = s.n_heads / s.n_kv_heads, w = s.width(), ow = s.n_heads * D;
    const int wg = threadIdx.x / 128, tid = threadIdx.x % 128, lane = threadIdx.x % WARP, g = lane / 4, q = lane % 4;
    // The warpgroup's first key; this thread's accumulator rows are rr and rr + 8 of its 64.
    const int k0 = j0 + 64 * wg, rr = 16 * (tid / WARP) + g;
    const int steps = group * ((s.seq - j0 + QT - 1) / QT);
    // A step of the walk: q head h of the group, query tile i0. The walk takes the query tiles
    // from the block's first key on, then the next head's; each step's successor is found by an
    // add and a compare (dividing the step count cost ~25 instructions, three times a step).
    struct Step {
        int h, i0;
    };
    auto after = [&](Step at) {
        at.i0 += QT;
        if (at.i0 >= s.seq) at = Step{at.h + 1, j0};
        return at;
    };
    const unsigned char* Kw = Ks + wg * HALF;
    const unsigned char* Vw = Vs + wg * HALF;
    unsigned char* dSw = dS + wg * HALF;
    const auto dsd = sw128_desc(dSw, 1024), kwd = sw128_desc(Kw, 1024);  // fixed for the block

    // Queues the Q, dO tiles of step `at` into buffer k and writes its lse and Δ there.
    auto load_step = [&](Step at, int k) {
        unsigned char* buf = QO + 2 * k * HALF;
        if constexpr (TMA) {
            if (threadIdx.x == 0) {
                mbar_arrive_expect_tx(full + k, 2 * HALF);
                tma_load_3d(buf, qkv_map, s.q_col(at.h), at.i0, b, full + k);
                tma_load_3d(buf + HALF, dout_map, at.h * D, at.i0, b, full + k);
            }
        } else {
            load_rows<D, QT, 256>(swizzled(buf), qkv, row0, at.i0, s.seq, w, s.q_col(at.h));
            load_rows<D, QT, 256>(swizzled(buf + HALF), dout, row0, at.i0, s.seq, ow, at.h * D);
        }
        stage_stats<QT>(stats + 2 * k * QT, lse, delta, s, b, at.h, at.i0);
    };
    if constexpr (TMA) {
        if (threadIdx.x == 0) {
            for (int k = 0; k < 3; k++) mbar_init(full + k, 1);
            fence_mbarrier_init();
            mbar_arrive_expect_tx(kv_full, 4 * HALF);
            for (int r = 0; r < KEYS; r += QT) {
                tma_load_3d(Ks + r * 128, qkv_map, s.k_col(kvh), j0 + r, b, kv_full);
                tma_load_3d(Vs + r * 128, qkv_map, s.v_col(kvh), j0 + r, b, kv_full);
            }
        }
        __syncthreads();  // the barriers are initialised before load_step's copies complete on them
    } else {
        load_rows<D, KEYS, 256>(swizzled(Ks), qkv, row0, j0, s.seq, w, s.k_col(kvh));
        load_rows<D, KEYS, 256>(swizzled(Vs), qkv, row0, j0, s.seq, w, s.v_col(kvh));
    }
    Step step{kvh * group, j0}, before{};  // the step in hand and the one before it
    load_step(step, 0);
    if (!TMA) cp_async_commit();

    // This warpgroup's 32 columns of a step's dQ part (n-tiles 4·wg..), added to the accumulator
    // in the key blocks' turn one step later: the L2 round trips of the turn and of the sum then
    // overlap the next step's tensor-core work instead of stalling the block (one an SM).
    float pending[4][4];
    auto add_pending = [&](Step at) {
        const int h = at.h, i0 = at.i0;
        const int last = i0 / KEYS, tile = tile_turn<QT>(s, b, h, i0);
        wait_turn(turns + tile, last - kb);
        // Row by row: row rr's first column of the sum and of dqkv in 64 bits once, row rr + 8
        // after it, the columns 8n apart as constant offsets.
        const int c0 = 32 * wg + 2 * q;
        float* sum = dq_acc + (row0 + i0 + rr) * ow + h * D + c0;
        act_t* dst = dqkv + (row0 + i0 + rr) * w + s.q_col(h) + c0;
#pragma unroll
        for (int r = 0; r < 2; r++) {
            if (i0 + rr + 8 * r >= s.seq) continue;
            float2 v[4];
#pragma unroll
            for (int n = 0; n < 4; n++) v[n] = make_float2(pending[n][2 * r], pending[n][2 * r + 1]);
            add_dq(v, sum + 8 * r * ow, dst + 8 * r * w, kb, last);
        }
        if (kb > 0) pass_turn(turns + tile, last - kb + 1);
    };

    // The other warpgroup's part of this thread's dQ columns, handed over at the end of the
    // step before (see there), added to its own.
    float4* handed = (float4*)halves + wg * 4 * 128;
    const float4* received = (const float4*)halves + (1 - wg) * 4 * 128;
    auto receive = [&] {
#pragma unroll
        for (int n = 0; n < 4; n++) {
            const float4 r = received[n * 128 + tid];
            pending[n][0] += r.x;
            pending[n][1] += r.y;
            pending[n][2] += r.z;
            pending[n][3] += r.w;
        }
    };

    // acc += A · B, queued as one group: A the 64 keys × 64 queries of `from` (Pᵀ or dSᵀ) rounded
    // into `frags` (which the hardware reads until the wait), B the tile (dO or Q) read transposed.
    auto queue_product = [&](float (&acc)[D / 8][4], unsigned (&frags)[QT / 16][4], const float (&from)[QT / 8][4], const unsigned char* tile) {
#pragma unroll
        for (int kk = 0; kk < QT / 16; kk++) acc_to_a<QT>(frags[kk], from, kk);
        const auto b = sw128_desc(tile, 1024);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < QT / 16; kk++) wgmma_m64n64k16_rs<1>(flat(acc), frags[kk], desc_plus(b, 16 * 128 * kk), 1);
        wgmma_commit();
    };

    // K and V have arrived (with step 0's tiles). K times `scale` once, so that Sᵀ = K Qᵀ and
    // dQ = dS K carry the factor where dS took a multiply an element every step: exact, as
    // scale = 1/√64 is a power of two (the products, their f32 sums and the bf16 roundings
    // commute with it). Then the warpgroup's K and V rows as A operands for the whole walk.
    if constexpr (TMA) mbar_wait(kv_full, 0);
    else cp_async_wait_all();
    __syncthreads();
    bf16* k = (bf16*)Ks;
    for (int i = threadIdx.x; i < KEYS * D; i += blockDim.x) k[i] = __float2bfloat16(__bfloat162float(k[i]) * scale);
    fence_proxy_async();  // the dQ products read K with wgmma
    __syncthreads();
    unsigned kf[D / 16][4], vf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        frag_a_sw128(kf[kk], Kw, 16 * (tid / WARP), kk);
        frag_a_sw128(vf[kk], Vw, 16 * (tid / WARP), kk);
    }

    float dk[D / 8][4] = {}, dv[D / 8][4] = {};
    for (int t = 0; t < steps; t++) {
        const int i0 = step.i0;
        const unsigned char* Qs = QO + 2 * (t % 2) * HALF;
        const unsigned char* dOs = Qs + HALF;
        // This thread's two columns' lse and Δ, 8n apart: a float2 each at constant offsets.
        const float* L2 = stats + 2 * (t % 2) * QT + 2 * q;
        const float* Dl = L2 + QT;
        const Step next = after(step);
        if constexpr (TMA) {
            mbar_wait(full + t % 2, t / 2 % 2);
        } else {
            cp_async_wait_all();
            fence_proxy_async();  // the copies (and the f32 path's stores) become visible to wgmma
        }
        // Every thread has seen this step's tiles arrive (TMA: before the next refill of this
        // buffer, two steps on, can complete its barrier), and the stats' stores.
        __syncthreads();

        // Every warpgroup multiplies on every step, even the second one on the block's first
        // tile, whose keys all come after the tile's queries (masked: it adds zeros): wgmma on a
        // path ptxas cannot prove warp-uniform gets serialized. Four groups in flight by turns:
        // Pᵀ is computed while dPᵀ's products run, dSᵀ while dV's do.
        float st[QT / 8][4], dpt[QT / 8][4];
        unsigned pa[QT / 16][4], da[QT / 16][4];  // Pᵀ, dSᵀ as A operands (k: the tile's queries)
        const auto qd = sw128_desc(Qs, 1024), dod = sw128_desc(dOs, 1024);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) wgmma_m64n64k16_rs<0>(flat(st), kf[kk], desc_plus(qd, 32 * kk), kk > 0);
        wgmma_commit();
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) wgmma_m64n64k16_rs<0>(flat(dpt), vf[kk], desc_plus(dod, 32 * kk), kk > 0);
        wgmma_commit();
        // The next step's tiles into the other buffer, read by the step before this one (every
        // warp is past it: the barrier above), once the products are queued.
        if (t + 1 < steps) load_step(next, (t + 1) % 2);
        if (!TMA) cp_async_commit();
        if (t > 0) {
            receive();
            add_pending(before);
        }
        wgmma_wait<1>();
        fence_operands(flat(st));
        // Query rows past the sequence see zero Q and dO (and lse, Δ): P is 1 there but dS and dO
        // are 0, as in attn_bwd. Keys past the sequence come after every query: masked.
        // The mask only where a tile reaches the diagonal: elsewhere an exponential is all an
        // element costs.
#pragma unroll
        for (int nt = 0; nt < QT / 8; nt++) {
            const float2 l = *(const float2*)(L2 + 8 * nt);
#pragma unroll
            for (int e = 0; e < 4; e++) st[nt][e] = exp2_ftz(fmaf(st[nt][e], LOG2E, -(e % 2 ? l.y : l.x)));
        }
        if (k0 + 63 > i0) {
#pragma unroll
            for (int nt = 0; nt < QT / 8; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++)
                    if (k0 + rr + 8 * (e / 2) > i0 + nt * 8 + 2 * q + e % 2) st[nt][e] = 0.0f;
        }
        queue_product(dv, pa, st, dOs);
        wgmma_wait<1>();
        fence_operands(flat(dpt));
        // dS without its factor `scale`: dQ has it from the scaled K, dK takes it when written.
#pragma unroll
        for (int nt = 0; nt < QT / 8; nt++) {
            const float2 d = *(const float2*)(Dl + 8 * nt);
#pragma unroll
            for (int e = 0; e < 4; e++) dpt[nt][e] = st[nt][e] * (dpt[nt][e] - (e % 2 ? d.y : d.x));
        }
        // dS for the dQ product as query rows, rounded as dK's operand: the warp's 16 keys ×
        // 64 queries are 8 × 8 blocks (keys 8h.. of the warp, queries 8·nt..), stored
        // transposed four at a time (stmatrix; element by element it was 64 two-byte stores a
        // thread). Matrix i of a store is (h = i % 2, nt + i / 2); lane l gives the address of
        // row l % 8 of matrix l / 8: query row 8(nt + i / 2) + l % 8, the warp's chunk 2w + h.
        const int mi = lane / 8;
#pragma unroll
        for (int nt = 0; nt < QT / 8; nt += 2) {
            const unsigned pairs[4] = {pack_bf16(dpt[nt][0], dpt[nt][1]), pack_bf16(dpt[nt][2], dpt[nt][3]), pack_bf16(dpt[nt + 1][0], dpt[nt + 1][1]),
                                       pack_bf16(dpt[nt + 1][2], dpt[nt + 1][3])};
            stmatrix_x4_trans(pairs, dSw + sw128_offset(8 * (nt + mi / 2) + lane % 8, 2 * (tid / WARP) + mi % 2));
        }
        queue_product(dk, da, dpt, Qs);
        fence_proxy_async();  // dS's stores become visible to wgmma
        __syncthreads();

        // This warpgroup's part of the tile's dQ: its dS (64 queries × 64 keys) times its K rows.
        float dq[D / 8][4];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 64 / 16; kk++) wgmma_m64n64k16_ss<1>(flat(dq), desc_plus(dsd, 32 * kk), desc_plus(kwd, 16 * 128 * kk), kk > 0);
        wgmma_commit();
        wgmma_wait<0>();
        fence_operands(flat(dq));
        fence_operands(flat(dv));
        fence_operands(flat(dk));
        fence_operands(pa);
        fence_operands(da);
        // The parts meet: warpgroup w hands over the columns of the other (n-tiles 4(1 − w)..)
        // and keeps its own (n-tiles 4w..), to which it adds what it receives next step, after
        // the barrier that step starts with (a barrier of its own here was a fifth a step; the
        // next step's middle barrier comes before the slots are written again). The partner
        // thread of the other warpgroup holds the same positions, so one 16-byte slot per
        // (n-tile, thread): an n-tile's four values in one store and one load, consecutive
        // threads' slots adjacent. The halves are selected by value: the warpgroup is not known
        // at compile time, and predicated copies of either half took twice the moves.
#pragma unroll
        for (int n = 0; n < 4; n++) {
            float other[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                pending[n][e] = wg ? dq[4 + n][e] : dq[n][e];
                other[e] = wg ? dq[n][e] : dq[4 + n][e];
            }
            handed[n * 128 + tid] = make_float4(other[0], other[1], other[2], other[3]);
        }
        before = step;
        step = next;
    }
    __syncthreads();  // the last step's halves handed over
    receive();
    add_pending(before);

    for (int r = 0; r < 2; r++) {
        const int j = k0 + rr + 8 * r;
        if (j >= s.seq) continue;
        store_row<D>(dqkv + (row0 + j) * w + s.k_col(kvh), dk, r, scale);
        store_row<D>(dqkv + (row0 + j) * w + s.v_col(kvh), dv, r, 1.0f);
    }
}
#endif

// ---- entry points -----------------------------------------------------------------------------
// Register arrays need the head_dim at compile time: one set of kernels per multiple of 16.
#define ATTENTION_ENTRIES(D)                                                                                     \
    extern "C" __global__ void attn_fwd_d##D(act_t* out, float* lse, const act_t* qkv, Heads s, float scale) {     \
        attn_fwd<D>(out, lse, qkv, s, scale);                                                                    \
    }                                                                                                            \
    extern "C" __global__ void attn_bwd_d##D(act_t* dqkv, float* dq_acc, unsigned* turns, const act_t* dout,       \
                                             const float* lse, const float* delta, const act_t* qkv, Heads s,     \
                                             float scale) {                                                      \
        attn_bwd<D>(dqkv, dq_acc, turns, dout, lse, delta, qkv, s, scale);                                       \
    }

ATTENTION_ENTRIES(16)
ATTENTION_ENTRIES(32)
ATTENTION_ENTRIES(48)
ATTENTION_ENTRIES(64)
ATTENTION_ENTRIES(80)
ATTENTION_ENTRIES(96)
ATTENTION_ENTRIES(112)
ATTENTION_ENTRIES(128)
