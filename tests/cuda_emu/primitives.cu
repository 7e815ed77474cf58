// Test-only kernels for the emulator itself (tests/cuda_emu.rs), compiled into the emulator
// only, never into the product: the primitives of common.cuh on global inputs, and small
// kernels with the bugs the emulator must report (a deadlock, a shared-memory overflow, a race,
// a block waiting for a turn no earlier block passes).

typedef __nv_bfloat16 bf16;

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

// One thread, 64 bytes of shared memory s (16 words): group 0 copies src[0..4) to s[0..4) and
// zero-fills s[4..8) from a null source (not read), group 1 copies src[4..8) to s[8..12).
// out[0..12) is s[0..12) after cp_async_wait_prior (group 0 complete), out[12..16) s[8..12)
// after cp_async_wait_all.
extern "C" __global__ void test_cp_async(unsigned* out, const unsigned* src) {
    DYNAMIC_SMEM(smem);
    unsigned* s = (unsigned*)smem;
    cp_async16(s, src, true);
    cp_async16(s + 4, nullptr, false);
    cp_async_commit();
    cp_async16(s + 8, src + 4, true);
    cp_async_commit();
    cp_async_wait_prior();
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
