// Test-only kernels for the emulator itself (tests/cuda_emu.rs), compiled into the emulator
// only, never into the product: the primitives of common.cuh on global inputs, and small
// kernels with the bugs the emulator must report (a deadlock, a shared-memory overflow, a race,
// a block waiting for a turn no earlier block passes).

// d (16×8, f32) = a (16×16) · b (16×8) + c, all row-major, on one warp. The fragments are
// gathered register by register as common.cuh describes them (g = lane / 4, q = lane % 4): A
// registers (row g, cols 2q, 2q+1), (row g+8, same), (row g, cols 2q+8, 2q+9), (row g+8, same);
// B registers (rows 2q, 2q+1 of col g), (rows 2q+8, 2q+9); C (g, 2q), (g, 2q+1), (g+8, ...).
__device__ unsigned two(bf16 lo, bf16 hi) { return __bfloat16_as_ushort(lo) | (unsigned)__bfloat16_as_ushort(hi) << 16; }

extern "C" __global__ void test_mma(float* d, const bf16* a, const bf16* b, const float* c) {
    const int lane = threadIdx.x, g = lane / 4, q = lane % 4;
    const unsigned fa[4] = {two(a[g * 16 + 2 * q], a[g * 16 + 2 * q + 1]), two(a[(g + 8) * 16 + 2 * q], a[(g + 8) * 16 + 2 * q + 1]),
                            two(a[g * 16 + 2 * q + 8], a[g * 16 + 2 * q + 9]), two(a[(g + 8) * 16 + 2 * q + 8], a[(g + 8) * 16 + 2 * q + 9])};
    const unsigned fb[2] = {two(b[2 * q * 8 + g], b[(2 * q + 1) * 8 + g]), two(b[(2 * q + 8) * 8 + g], b[(2 * q + 9) * 8 + g])};
    float acc[4] = {c[g * 8 + 2 * q], c[g * 8 + 2 * q + 1], c[(g + 8) * 8 + 2 * q], c[(g + 8) * 8 + 2 * q + 1]};
    mma16816(acc, fa, fb);
    d[g * 8 + 2 * q] = acc[0];
    d[g * 8 + 2 * q + 1] = acc[1];
    d[(g + 8) * 8 + 2 * q] = acc[2];
    d[(g + 8) * 8 + 2 * q + 1] = acc[3];
}

// m: four 8×8 bf16 matrices (4 × 8 × 8, row-major). Lane l copies row l % 8 of matrix l / 8 into
// shared memory with cp_async16, to a scattered 16-byte slot (rows need not be contiguous), and
// gives that slot as its row address: out[4l + i] and out_t[4l + i] are register i of lane l
// after ldmatrix_x4 and ldmatrix_x4_trans. One warp, 1024 bytes of dynamic shared memory.
extern "C" __global__ void test_ldmatrix(unsigned* out, unsigned* out_t, const bf16* m) {
    DYNAMIC_SMEM(smem);
    const int lane = threadIdx.x;
    bf16* row = (bf16*)(smem + 32 * ((7 * lane + 3) % 32));
    cp_async16(row, m + 8 * lane, true);
    cp_async_wait_all();
    __syncwarp();
    unsigned r[4];
    ldmatrix_x4(r, row);
    for (int i = 0; i < 4; i++) out[4 * lane + i] = r[i];
    ldmatrix_x4_trans(r, row);
    for (int i = 0; i < 4; i++) out_t[4 * lane + i] = r[i];
}

// out[i] = exp2_ftz(x[i]) (ex2.approx.ftz), one warp over 64 values.
extern "C" __global__ void test_exp2_ftz(float* out, const float* x) {
    for (int i = threadIdx.x; i < 64; i += WARP) out[i] = exp2_ftz(x[i]);
}

// One thread, 64 bytes of shared memory s (16 words): group 0 copies src[0..4) to s[0..4) and
// zero-fills s[4..8) from a null source (not read), group 1 copies src[4..8) to s[8..12).
// out[0..12) is s[0..12) after cp_async_wait_pending<1> (group 0 complete), out[12..16) s[8..12)
// after cp_async_wait_all.
extern "C" __global__ void test_cp_async(unsigned* out, const unsigned* src) {
    DYNAMIC_SMEM(smem);
    unsigned* s = (unsigned*)smem;
    cp_async16(s, src, true);
    cp_async16(s + 4, nullptr, false);
    cp_async_commit();
    cp_async16(s + 8, src + 4, true);
    cp_async_commit();
    cp_async_wait_pending<1>();
    for (int i = 0; i < 12; i++) out[i] = s[i];
    cp_async_wait_all();
    for (int i = 0; i < 4; i++) out[12 + i] = s[8 + i];
}

// Lane 0 leaves before a warp shuffle the others wait at: a deadlock on the GPU.
extern "C" __global__ void bad_divergent_shuffle(float* out) {
    if (threadIdx.x == 0) return;
    out[threadIdx.x] = warp_sum(1.0f);
}

// Writes one byte past the `bytes` of dynamic shared memory it is given.
extern "C" __global__ void bad_smem_overflow(int bytes) {
    DYNAMIC_SMEM(smem);
    if (threadIdx.x == 0) smem[bytes] = 1;
}

// Each thread stores its index in shared memory and reads its neighbour's: without the
// __syncthreads (sync = 0) the result depends on the order the threads run in.
extern "C" __global__ void racy_neighbour(float* out, int sync) {
    DYNAMIC_SMEM(smem);
    float* s = (float*)smem;
    s[threadIdx.x] = threadIdx.x;
    if (sync) __syncthreads();
    out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// Each block takes its turn on one counter (counters[1]) and writes its index at its place in
// the order: its launch ticket (counters[0]) with by_ticket = 1, else blockIdx.x, which waits
// for blocks that may not have started when blocks start out of launch order (a hang on a GPU).
extern "C" __global__ void turns_in_order(unsigned* order, unsigned* counters, int by_ticket) {
    const unsigned place = by_ticket ? launch_ticket(counters) : blockIdx.x;
    wait_turn(counters + 1, place);
    if (threadIdx.x == 0) order[place] = blockIdx.x;
    pass_turn(counters + 1, place + 1);
}

#ifdef MOTLEY_WGMMA
// m: four 8×8 bf16 matrices (4 × 8 × 8, row-major). Lane t holds register i = matrix i's row
// t/4, elements 2(t%4) and 2(t%4)+1, and stores the four transposed with stmatrix_x4_trans,
// lane l giving a scattered 16-byte slot for stored row l % 8 of matrix l / 8; out[4l..4l+4)
// are the 16 bytes lane l's slot holds after. One warp, 1024 bytes of shared memory.
extern "C" __global__ void test_stmatrix_trans(unsigned* out, const bf16* m) {
    DYNAMIC_SMEM(smem);
    const int lane = threadIdx.x, a = lane / 4, b = 2 * (lane % 4);
    unsigned r[4];
    for (int i = 0; i < 4; i++) r[i] = two(m[64 * i + 8 * a + b], m[64 * i + 8 * a + b + 1]);
    unsigned char* row = smem + 32 * ((7 * lane + 3) % 32);
    stmatrix_x4_trans(r, row);
    __syncwarp();
    for (int k = 0; k < 4; k++) out[4 * lane + k] = ((const unsigned*)row)[k];
}

// Copies `rows` × 64 bf16 (row-major, global) into a 1024-byte aligned tile of the 128-byte
// swizzled layout with cp.async, all threads of the block taking chunks in turn.
__device__ void load_sw128(unsigned char* tile, const bf16* src, int rows) {
    for (int c = threadIdx.x; c < rows * 8; c += blockDim.x) cp_async16(tile + sw128_offset(c / 8, c % 8), src + 8 * c, true);
}

// Stores a 64 × 64 accumulator (wgmma's C layout, register j of warp w: row 16w + g + 8·(j/2 % 2),
// column 8·(j/4) + 2q + j % 2) to d, row-major.
__device__ void store_accumulators(float* d, const float (&acc)[32]) {
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
    for (int j = 0; j < 32; j++) d[(16 * w + g + 8 * (j / 2 % 2)) * 64 + 8 * (j / 4) + 2 * q + j % 2] = acc[j];
}

// One warpgroup: d (64 × 128, f32, row-major) = a (64 × 64) · bᵀ, b 128 × 64 (b's rows are the
// product's columns), both row-major bf16, through shared memory in the swizzled layout and four
// k16 steps of wgmma_m64n128k16_ss (the descriptors advance 32 bytes a step). `misuse`: 0 none;
// 1 no fence.proxy.async after the copies; 2 stores the accumulators before the wait; 3 a thread
// overwrites b's tile while the wgmmas are in flight; 4 warp 1 gives another B descriptor; 5 a
// thread stores to a's tile after the fence (a barrier, but no fence, before the wgmmas).
// 24 KiB + 1 KiB of shared memory.
extern "C" __global__ void test_wgmma_ss(float* d, const bf16* a, const bf16* b, int misuse) {
    DYNAMIC_SMEM(raw);
    unsigned char* smem = raw + (1024 - __cvta_generic_to_shared(raw) % 1024) % 1024;
    unsigned char *as = smem, *bs = smem + 64 * 128;
    load_sw128(as, a, 64);
    load_sw128(bs, b, 128);
    cp_async_wait_all();
    if (misuse != 1) fence_proxy_async();
    __syncthreads();
    if (misuse == 5) {
        if (threadIdx.x == 0) as[0] ^= 1;
        __syncthreads();
    }
    float acc[64];
    wgmma_fence();
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
    const int skew = misuse == 4 && w == 1 ? 1024 : 0;
    for (int k = 0; k < 4; k++) wgmma_m64n128k16_ss(acc, sw128_desc(as + 32 * k, 1024), sw128_desc(bs + skew + 32 * k, 1024), k > 0);
    wgmma_commit();
    auto store = [&] {
        for (int j = 0; j < 64; j++) d[(16 * w + g + 8 * (j / 2 % 2)) * 128 + 8 * (j / 4) + 2 * q + j % 2] = acc[j];
    };
    if (misuse == 2) store();
    if (misuse == 3 && threadIdx.x == 5) bs[100] ^= 1;
    wgmma_wait<0>();
    fence_operands(acc);
    if (misuse != 2) store();
}

// One warpgroup: d (64 × 64, f32, row-major) = a (64 × 64) · B, a row-major bf16 with A from
// registers (each warp its 16 rows, mma.m16n8k16's A fragment), four k16 steps of
// wgmma_m64n64k16_rs<TRANS_B>, all but the first accumulating. b (64 × 64, row-major bf16) goes
// through shared memory in the swizzled layout: TRANS_B = 0 reads it K-major (b's rows are the
// product's columns: B = bᵀ; the descriptor advances 32 bytes a step), TRANS_B = 1 MN-major
// (B = b; the descriptor advances 16 rows, 2048 bytes, a step). 8 KiB + 1 KiB.
template <int TRANS_B>
__device__ void wgmma_rs_product(float* d, const bf16* a, const bf16* b) {
    DYNAMIC_SMEM(raw);
    unsigned char* bs = raw + (1024 - __cvta_generic_to_shared(raw) % 1024) % 1024;
    load_sw128(bs, b, 64);
    cp_async_wait_all();
    fence_proxy_async();
    __syncthreads();
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
    unsigned fa[4][4];
    for (int k = 0; k < 4; k++) {
        const bf16* r0 = a + (16 * w + g) * 64 + 16 * k + 2 * q;
        const bf16* r8 = r0 + 8 * 64;
        fa[k][0] = two(r0[0], r0[1]);
        fa[k][1] = two(r8[0], r8[1]);
        fa[k][2] = two(r0[8], r0[9]);
        fa[k][3] = two(r8[8], r8[9]);
    }
    float acc[32];
    wgmma_fence();
    for (int k = 0; k < 4; k++) wgmma_m64n64k16_rs<TRANS_B>(acc, fa[k], sw128_desc(bs + (TRANS_B ? 2048 : 32) * k, 1024), k > 0);
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(acc);
    fence_operands(fa);
    store_accumulators(d, acc);
}
extern "C" __global__ void test_wgmma_rs_kmajor(float* d, const bf16* a, const bf16* b) { wgmma_rs_product<0>(d, a, b); }
extern "C" __global__ void test_wgmma_rs_mnmajor(float* d, const bf16* a, const bf16* b) { wgmma_rs_product<1>(d, a, b); }

// One warpgroup: d (64 × 256, f32, row-major) = A · B through shared memory in the swizzled
// layout, four k16 steps of wgmma_m64n256k16_ss<TRANS_B, TRANS_A> (the experts' kernels):
// TRANS_A = 0 reads A = a (64 × 64, row-major) K-major; TRANS_A = 1 reads A = aᵀ MN-major (a's
// rows are k: the weight-gradient kernel's dyᵀ and dguᵀ; the descriptor advances 16 rows, 2048
// bytes, a step). TRANS_B = 0 reads b (256 × 64, row-major: its rows are the product's columns)
// K-major; TRANS_B = 1 reads b (64 × 256, row-major) MN-major as four 64-column strips 8 KiB
// apart, the descriptor's leading offset. 16 KiB + 32 KiB + 1 KiB.
template <int TRANS_B, int TRANS_A>
__device__ void wgmma_n256_product(float* d, const bf16* a, const bf16* b) {
    DYNAMIC_SMEM(raw);
    unsigned char* as = raw + (1024 - __cvta_generic_to_shared(raw) % 1024) % 1024;
    unsigned char* bs = as + 64 * 128;
    load_sw128(as, a, 64);
    if (TRANS_B) {
        for (int c = threadIdx.x; c < 4 * 64 * 8; c += blockDim.x) {
            const int strip = c / 512, row = c / 8 % 64, chunk = c % 8;
            cp_async16(bs + strip * 8192 + sw128_offset(row, chunk), b + row * 256 + 64 * strip + 8 * chunk, true);
        }
    } else {
        load_sw128(bs, b, 256);
    }
    cp_async_wait_all();
    fence_proxy_async();
    __syncthreads();
    float acc[128];
    wgmma_fence();
    for (int k = 0; k < 4; k++)
        wgmma_m64n256k16_ss<TRANS_B, TRANS_A>(acc, sw128_desc(as + (TRANS_A ? 2048 : 32) * k, 1024), TRANS_B ? sw128_desc(bs + 2048 * k, 1024, 8192) : sw128_desc(bs + 32 * k, 1024), k > 0);
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(acc);
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
    for (int j = 0; j < 128; j++) d[(16 * w + g + 8 * (j / 2 % 2)) * 256 + 8 * (j / 4) + 2 * q + j % 2] = acc[j];
}
extern "C" __global__ void test_wgmma_n256_kmajor(float* d, const bf16* a, const bf16* b) { wgmma_n256_product<0, 0>(d, a, b); }
extern "C" __global__ void test_wgmma_n256_mnmajor(float* d, const bf16* a, const bf16* b) { wgmma_n256_product<1, 0>(d, a, b); }
extern "C" __global__ void test_wgmma_n256_tn(float* d, const bf16* a, const bf16* b) { wgmma_n256_product<1, 1>(d, a, b); }

// One warpgroup: d (64 × 64, f32, row-major) = a (64 × 64) · b (64 × 64), both row-major bf16
// through shared memory in the swizzled layout, a K-major and b MN-major (the transpose flag),
// four k16 steps of wgmma_m64n64k16_ss<1>: the backward's dQ = dS K. 16 KiB + 1 KiB.
extern "C" __global__ void test_wgmma_ss_mnmajor(float* d, const bf16* a, const bf16* b) {
    DYNAMIC_SMEM(raw);
    unsigned char* as = raw + (1024 - __cvta_generic_to_shared(raw) % 1024) % 1024;
    unsigned char* bs = as + 64 * 128;
    load_sw128(as, a, 64);
    load_sw128(bs, b, 64);
    cp_async_wait_all();
    fence_proxy_async();
    __syncthreads();
    float acc[32];
    wgmma_fence();
    for (int k = 0; k < 4; k++) wgmma_m64n64k16_ss<1>(acc, sw128_desc(as + 32 * k, 1024), sw128_desc(bs + 2048 * k, 1024), k > 0);
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(acc);
    store_accumulators(d, acc);
}

// ---- the Tensor Memory Accelerator (common.cuh): bulk tensor copies on an mbarrier ------------
// How a tensor map's box lands in shared memory, on the emulator and on a GPU. The maps are of
// rank 3 (one plane), as the kernels' are.

// One warpgroup; `map`: a bf16 matrix of 80 rows × 96 columns, boxes of 64 × 64 with the 128-byte
// swizzle. Thread 0 issues two copies on one mbarrier, whose phases 0 and 1 they complete: the box
// at column 16, row 8 (inside the matrix), then the box at column 48, row 40 (past the right and
// bottom edges: zeros there). out holds the two 8 KiB tiles as they lie in shared memory
// (1024-byte aligned), 2048 words each. misuse: 0 none; 1 reads the first tile before waiting for
// it; 2 announces half of the first copy's bytes; 3 never issues the second copy; 4 leaves out
// the barrier between the phases.
// 17 KiB + 1 KiB of shared memory.
extern "C" __global__ void test_tma_load(unsigned* out, const __grid_constant__ TensorMap map, int misuse) {
    DYNAMIC_SMEM(raw);
    unsigned char* tiles = raw + (1024 - __cvta_generic_to_shared(raw) % 1024) % 1024;
    unsigned long long* bar = (unsigned long long*)(tiles + 2 * 8192);
    if (threadIdx.x == 0) {
        mbar_init(bar, 1);
        fence_mbarrier_init();
    }
    __syncthreads();
    const int at[2][2] = {{16, 8}, {48, 40}};
    for (int k = 0; k < 2; k++) {
        if (threadIdx.x == 0) {
            mbar_arrive_expect_tx(bar, misuse == 2 && k == 0 ? 4096 : 8192);
            if (!(misuse == 3 && k == 1)) tma_load_3d(tiles + 8192 * k, map, at[k][0], at[k][1], 0, bar);
        }
        auto copy_out = [&] {
            for (int i = threadIdx.x; i < 2048; i += blockDim.x) out[2048 * k + i] = ((const unsigned*)(tiles + 8192 * k))[i];
        };
        if (misuse == 1 && k == 0) {
            copy_out();
            mbar_wait(bar, k);
        } else {
            mbar_wait(bar, k);
            copy_out();
        }
        // Every thread has seen phase k complete before thread 0 starts the next: a thread
        // still waiting for parity 0 after phase 1 completed would wait for phase 2.
        if (misuse != 4) __syncthreads();
    }
}

// One warpgroup: d (64 × 128, f32, row-major) = a (64 × 64) · bᵀ (b: 128 × 64), as test_wgmma_ss
// but with the tiles brought by TMA (a in one box of 64 × 64, b in two, the 128-byte swizzle)
// instead of cp.async and read by wgmma straight from there: the box's swizzle is the canonical
// layout the descriptors describe. 24 KiB + 1 KiB.
extern "C" __global__ void test_tma_wgmma(float* d, const __grid_constant__ TensorMap a_map, const __grid_constant__ TensorMap b_map) {
    DYNAMIC_SMEM(raw);
    unsigned char* as = raw + (1024 - __cvta_generic_to_shared(raw) % 1024) % 1024;
    unsigned char* bs = as + 8192;
    unsigned long long* bar = (unsigned long long*)(bs + 16384);
    if (threadIdx.x == 0) {
        mbar_init(bar, 1);
        fence_mbarrier_init();
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        mbar_arrive_expect_tx(bar, 3 * 8192);
        tma_load_3d(as, a_map, 0, 0, 0, bar);
        tma_load_3d(bs, b_map, 0, 0, 0, bar);
        tma_load_3d(bs + 8192, b_map, 0, 64, 0, bar);
    }
    mbar_wait(bar, 0);
    float acc[64];
    wgmma_fence();
    for (int k = 0; k < 4; k++) wgmma_m64n128k16_ss(acc, sw128_desc(as + 32 * k, 1024), sw128_desc(bs + 32 * k, 1024), k > 0);
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(acc);
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
    for (int j = 0; j < 64; j++) d[(16 * w + g + 8 * (j / 2 % 2)) * 128 + 8 * (j / 4) + 2 * q + j % 2] = acc[j];
}
#endif
