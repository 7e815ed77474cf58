// The experts' grouped GEMMs on Hopper (sm_90a), SwiGLU fused into the ones around it. One
// launch covers every expert (a segment of rows), nothing padded to the widest: tiles of 128 rows
// × 256 columns of one product, found in a table of segments, a persistent grid's blocks each
// taking every gridDim.x-th tile (tile_loop).
// - expert_up_wgmma: gu = a · Wᵀ (rows × 2h: gate | up, saved for the backward) and
//   act = SwiGLU(gu) (rows × h), a's rows picked where the segment picks them (below: the
//   routed tokens' rows, the gather into xe fused into the operand load). A tile is 128 hidden
//   columns: its B operand is W's 128 gate rows and the 128 up rows of those columns, so each
//   thread's accumulators hold the gate and the up value of the same outputs and SwiGLU needs
//   no exchange. Saves swiglu_fwd's read of gu.
// - expert_dact_wgmma: dact = dy · W (W: k × h, W_down read as it lies) for the tile's columns,
//   then SwiGLU's backward in the epilogue: reads the saved gu, writes dgu and act again (the
//   down projection's weight gradient needs it). Saves writing dact and swiglu_bwd reading it.
//   dy's rows picked where the segment picks them (the combined output's gradient of each
//   slot's token times the slot's gate: the backward's gather_rows_scaled fused).
// - grouped_nt_wgmma, grouped_nn_wgmma: out = a · Wᵀ (W: n × k, the down projection) and
//   out = a · W (W: k × n, the input gradient through gate/up): the grouped matmul itself.
// - grouped_tn_wgmma, grouped_tn_add_wgmma: the weight gradients, out (f32) = or += aᵀ · b over
//   an expert's routed rows (dW_down = dyᵀ act, dW_gu = dguᵀ xe): both operands have the rows
//   summed over as their rows, so both are read MN-major; k is the expert's row count, any.
//   Either operand's rows (not both) picked where the segment picks them (dW_down's dy, dW_gu's
//   xe: the backward's gathers fused into the operand loads).
// Picked rows: row r of an operand is row index[r] of its base where the segment has an index,
// times weight[r] where it has weights. A weighted tile is scaled in shared memory once it has
// landed (scale_lines: one more barrier a step), rounded to bf16 as gather_rows_scaled rounds
// (bitwise its copy in bf16 storage; the f32 storage's staging rounds first). Each way of
// reading the rows is a K loop of its own (Rows).
// The fused epilogues compute from the product as stored (rounded to the storage), with
// common.cuh's swiglu / swiglu_grad: bitwise what swiglu_fwd and swiglu_bwd compute from it.
//
// Two warpgroups of 64 rows (256 threads), each one wgmma m64n256k16 a k16 step; K in steps of
// 64 through EXPERT_STAGES shared buffers with cp.async, EXPERT_STAGES − 2 steps ahead of the
// products; operands in the 128-byte swizzled layout (as in attention.cu), both from shared
// memory (W read K-major, or MN-major by the instruction's transpose: then as four 64-column
// strips, EXPERT_STRIP_BYTES apart, the descriptor's leading offset), each step's products
// committed as one group that stays in flight while the next step's are issued; the steps of a
// block's next tile load while this one's last run and its epilogue stores. A tile of
// 128 × 256 reads 85 FLOPs' worth of operands per byte it stages (128 × 128: 64), and a
// wgmma reads 51 FLOPs' worth of shared memory per byte (N = 64: 32, the shared memory's rate
// at full tensor rate). A product whose columns are not whole tiles ends in a tile half used
// (B's rows or strips past n zero-filled, its columns past n not stored). No split over K and
// a fixed order of steps: every output row is the same whatever tile it lies in (row
// stability, which MEMO's recompute of a subset of rows relies on).
// Launches: `experts.rs`. Opt-in (`CudaBackend::with_hopper_experts`) until they have run on
// a GPU.

// `experts::Segment` of experts.rs: one product's operands, its shape and the tiles of the
// segments before it. Every kernel takes (segs, count, tiles): `count` segments (rows > 0,
// tiles in order, `tiles` in all), every k a multiple of 64 and every n of 128 (the up
// projection's: 64 hidden columns), every operand 16-byte aligned; shared memory
// `experts::SMEM_BYTES`.
struct Segment {
    const act_t* a;  // rows × k: xe (up), dy (dact), the product's A; k × rows for the gradients
    const unsigned* a_index;  // null, or row r of a (of the product; of k for the gradients) is
    const float* a_weight;    // a's row a_index[r]; null, or that row times a_weight[r]
    const act_t* w;  // W_gu (2h × k: h gate rows, then h up rows), W_down (k × h), the product's W;
                     // the gradients' b (k × n)
    const unsigned* w_index;  // the same for the gradients' b
    const float* w_weight;
    act_t* out;      // gu (up, rows × 2h), dgu (dact, rows × 2h), the product (rows × n; f32 for the gradients)
    const act_t* gu; // the saved gu (dact)
    act_t* act;      // SwiGLU's output (up, dact; rows × h)
    int rows, k, n, first_tile;  // n: the product's columns (up: 2h; dact: h)
};

#ifdef MOTLEY_WGMMA
#define EXPERT_ROWS 128   // rows of a tile (two warpgroups of 64)
#define EXPERT_COLS 256   // columns of a tile's product (up: 128 hidden columns, gate and up)
#define EXPERT_STAGES 4   // shared buffers: steps t + 1, t + 2 load while t − 1 may still be read
#define EXPERT_AHEAD (EXPERT_STAGES - 2)
#define EXPERT_A_BYTES (EXPERT_ROWS * 128)  // 128 rows of 64 bf16, swizzled: a step's A tile
#define EXPERT_B_BYTES (EXPERT_COLS * 128)  // B's: 256 rows of 64 (K-major) or 4 strips
#define EXPERT_STRIP_BYTES (64 * 128)       // one MN-major strip: 64 rows of k, 64 columns

// A tile: rows m0.. and columns j0.. of a segment's product (up: hidden columns), COLS of them
// a tile. Tiles are numbered segment by segment, row tiles fastest (consecutive tiles share W's
// columns and walk the expert's rows).
struct Tile {
    Segment seg;
    int m0, j0;
};
template <int COLS>
__device__ __forceinline__ Tile find_tile(const Segment* segs, int count, int tile) {
    int s = 0;
    while (s + 1 < count && tile >= segs[s + 1].first_tile) s++;
    const Segment seg = segs[s];
    const int at = tile - seg.first_tile, m_tiles = (seg.rows + EXPERT_ROWS - 1) / EXPERT_ROWS;
    return {seg, at % m_tiles * EXPERT_ROWS, at / m_tiles * COLS};
}

// A tile's steps of 64 along k (the gradients' k, the expert's routed rows, is any number, 0
// included; the products' a multiple of 64).
__device__ __forceinline__ int k_steps(const Segment& s) { return (s.k + 63) / 64; }

// The first 1024-byte aligned byte of the dynamic shared memory (the swizzle repeats every 1024
// bytes of shared address: tiles start on such a boundary).
__device__ __forceinline__ unsigned char* aligned_smem(unsigned char* raw) { return raw + (1024 - __cvta_generic_to_shared(raw) % 1024) % 1024; }

// Every kernel's loop. The grid is persistent (experts.rs: at most a block an SM): the block
// takes tiles blockIdx.x, then gridDim.x further on, up to `tiles`. Its loads are one stream of
// steps over those tiles: load(tile, step, buffer) stages a step's A and B tiles into shared
// buffer g % EXPERT_STAGES, g counting the block's steps, EXPERT_AHEAD steps ahead of the
// products, so a tile's first steps arrive while the tile before it ends and its epilogue runs:
// only the block's first tile waits for its operands. For each tile: begin(tile), then a step at
// a time product(tile, step, buffer) queues its wgmmas into acc (overwriting it on step 0), and
// once the products are done finish(tile, acc) stores acc (which a tile without steps, k = 0,
// leaves as it was: only the gradients have such tiles, and store zeros for them). With
// PREPARED, prepare(tile, step, buffer) rewrites a step's tiles in shared memory once every
// thread's copies have landed, before the products read them (a template parameter: the loops
// without it have no branch around it).
template <int COLS, bool PREPARED, class Load, class Begin, class Product, class Prepare, class Finish>
__device__ __forceinline__ void tile_loop(unsigned char* base, const Segment* segs, int count, int tiles, float (&acc)[128], Load load, Begin begin, Product product, Prepare prepare, Finish finish) {
    auto buffer = [&](int g) { return base + (g % EXPERT_STAGES) * (EXPERT_A_BYTES + EXPERT_B_BYTES); };
    // A tile's first EXPERT_AHEAD steps (all, if it has fewer) are loaded before it starts, by
    // this cursor: `step` of tile `next` (lt), of which it loads `first`; none left once
    // next ≥ tiles. Its later steps are loaded from the tile's own loop, whose addressing then
    // stays the same from step to step.
    int next = blockIdx.x, step = 0, first = 0;
    Tile lt;
    auto seek = [&] {  // the first tile with steps from `next` on
        for (; next < tiles; next += gridDim.x) {
            lt = find_tile<COLS>(segs, count, next);
            if ((first = min(k_steps(lt.seg), EXPERT_AHEAD)) > 0) return;
        }
    };
    auto load_ahead = [&](int g) {
        if (next < tiles) {
            load(lt, step, buffer(g));
            if (++step == first) {
                step = 0;
                next += gridDim.x;
                seek();
            }
        }
        cp_async_commit();  // a group a step, empty past the last: the waits count groups
    };
    seek();
    for (int g = 0; g < EXPERT_AHEAD; g++) load_ahead(g);
    int g = 0;
    for (int at = blockIdx.x; at < tiles; at += gridDim.x) {
        const Tile t = find_tile<COLS>(segs, count, at);
        const int n = k_steps(t.seg);
        begin(t);
        // Step g has arrived (for every thread, and fenced for wgmma), and both warpgroups have
        // finished step g − 2 (waited at the end of step g − 1, or of the tile before), whose
        // buffer step g + AHEAD refills: after step g's products are queued, so that the tensor
        // cores hold two steps' work while the copies are issued.
        auto products = [&](int s) {
            cp_async_wait_pending<EXPERT_AHEAD - 1>();
            if constexpr (PREPARED) {
                __syncthreads();
                prepare(t, s, buffer(g));
            }
            fence_proxy_async();
            __syncthreads();
            wgmma_fence();
            product(t, s, buffer(g));
            wgmma_commit();
        };
        int s = 0;
        for (; s < n - EXPERT_AHEAD; s++, g++) {
            products(s);
            load(t, s + EXPERT_AHEAD, buffer(g + EXPERT_AHEAD));
            cp_async_commit();
            wgmma_wait<1>();
        }
        for (; s < n; s++, g++) {  // the last steps load the next tiles' first
            products(s);
            load_ahead(g + EXPERT_AHEAD);
            wgmma_wait<1>();
        }
        wgmma_wait<0>();
        fence_operands(acc);
        finish(t, acc);
    }
}

// Multiplies each 128-byte line of a staged tile (a row of 64 bf16; the swizzle moves chunks
// only within their line) by its row's weight, in place, rounded to bf16 as gather_rows_scaled
// rounds: the thread's lines are threadIdx.x / 8 + 32 j (j < J: the tile's 32·J lines, a warp
// four whole lines at a time), its chunk of each threadIdx.x % 8, line j's weight weight(j).
template <int J, class Weight>
__device__ __forceinline__ void scale_lines(unsigned char* tile, Weight weight) {
#pragma unroll
    for (int j = 0; j < J; j++) {
        uint4* chunk = (uint4*)(tile + (threadIdx.x / 8 + 32 * j) * 128 + threadIdx.x % 8 * 16);
        const float w = weight(j);
        const uint4 v = *chunk;
        auto scaled = [w](unsigned pair) { return pack_bf16(__uint_as_float(pair << 16) * w, __uint_as_float(pair & 0xffff0000u) * w); };
        *chunk = make_uint4(scaled(v.x), scaled(v.y), scaled(v.z), scaled(v.w));
    }
}

// How a product reads an operand's rows: as they lie, picked through the segment's index, or
// picked and weighted. A template parameter of the loops, so that each loop is one path: the
// kernels choose theirs from the first segment, since every segment of a call picks alike
// (experts.rs, Call::place_pick).
enum Rows { PLAIN, PICKED, WEIGHTED };

// Step `step`'s A tile of a product with a K-major A (rows × k): the tile's 128 rows, 64
// columns (picked: rows past the segment stand in its first, their index past its stretch).
template <Rows R>
__device__ __forceinline__ void load_a_tile(unsigned char* at, const Tile& t, int step) {
    const Segment& s = t.seg;
    if constexpr (R == PLAIN) {
        load_rows<64, EXPERT_ROWS, 256>(swizzled(at), s.a, 0, t.m0, s.rows, s.k, 64 * step);
    } else {
        auto row = [&](int r, bool ok) { return s.a + (size_t)s.a_index[t.m0 + (ok ? r : 0)] * s.k + 64 * step; };
        load_rows_from<64, EXPERT_ROWS, 256>(swizzled(at), row, s.rows - t.m0);
    }
}

// The loop of a product with a K-major A read as R says: load_b(tile, step, b_tile) stages B,
// product(step, buffer) queues the wgmmas, finish(tile, acc) stores. Weighted rows are the same every
// step of a tile: the thread's four weights are read as it begins.
template <int COLS, Rows R, class LoadB, class Product, class Finish>
__device__ __forceinline__ void a_loop(unsigned char* base, const Segment* segs, int count, int tiles, float (&acc)[128], LoadB load_b, Product product, Finish finish) {
    float w[4];
    tile_loop<COLS, R == WEIGHTED>(
        base, segs, count, tiles, acc,
        [&](const Tile& t, int step, unsigned char* at) {
            load_a_tile<R>(at, t, step);
            load_b(t, step, at + EXPERT_A_BYTES);
        },
        [&](const Tile& t) {
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int r = t.m0 + threadIdx.x / 8 + 32 * j;
                w[j] = R == WEIGHTED && r < t.seg.rows ? t.seg.a_weight[r] : 1.0f;
            }
        },
        [&](const Tile&, int step, unsigned char* at) { product(step, at); },
        [&](const Tile&, int, unsigned char* at) { scale_lines<EXPERT_ROWS / 32>(at, [&](int j) { return w[j]; }); }, finish);
}

// Calls f(r, c0, dc, j) for each pair of accumulator registers j, j + 1 of a warpgroup's
// 64 × N product whose row lies in the segment and whose column lies below `cols`: row r of the
// segment, columns c0 + dc and the next of the product (hidden columns, for the up projection)
// (register j holds row g + 8·(j/2 % 2) of the warp's 16, column 8·(j/4) + 2q + j % 2; cols is
// even). c0 is the thread's first column and dc = 8·(j/4) a constant once unrolled, and a
// thread's pairs lie in two rows, visited row by row: an address formed as row base + c0 is
// computed once per row and dc becomes the load's or store's immediate offset (formed pair by
// pair, the addresses were most of the epilogues' instructions).
template <int REGS, class F>
__device__ __forceinline__ void for_each_pair(const Tile& t, int cols, F f) {
    const int wg = threadIdx.x / 128, lane = threadIdx.x % WARP, g = lane / 4, q = lane % 4;
    const int warp_row = t.m0 + 64 * wg + 16 * (threadIdx.x % 128 / WARP), c0 = t.j0 + 2 * q;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int r = warp_row + g + 8 * half;
        if (r >= t.seg.rows) continue;
#pragma unroll
        for (int j = 2 * half; j < REGS; j += 4)
            if (c0 + 8 * (j / 4) < cols) f(r, c0, 8 * (j / 4), j);
    }
}

// The tiles of out = a · Wᵀ with the tile's 256 rows of W K-major like a, staged by
// load_b(tile, step, b_tile) (up, grouped_nt_wgmma), a's rows read as R says; finish(tile, acc) stores.
template <int COLS, Rows R, class LoadB, class Finish>
__device__ __forceinline__ void nt_tiles(unsigned char* base, const Segment* segs, int count, int tiles, float (&acc)[128], LoadB load_b, Finish finish) {
    const int wg = threadIdx.x / 128;
    a_loop<COLS, R>(
        base, segs, count, tiles, acc, load_b,
        [&](int step, unsigned char* at) {
            const auto a = sw128_desc(at + 64 * 128 * wg, 1024), b = sw128_desc(at + EXPERT_A_BYTES, 1024);
#pragma unroll
            for (int kk = 0; kk < 4; kk++) wgmma_m64n256k16_ss<0>(acc, desc_plus(a, 32 * kk), desc_plus(b, 32 * kk), step > 0 || kk > 0);
        },
        finish);
}

extern "C" __global__ void __launch_bounds__(256, 1) expert_up_wgmma(const Segment* segs, int count, int tiles) {
    DYNAMIC_SMEM(raw);
    float acc[128];  // columns 0..127 the gate, 128..255 the up projection of hidden j0..j0 + 127
    auto load_b = [&](const Tile& t, int step, unsigned char* bt) {
        const Segment& s = t.seg;
        const int h = s.n / 2;
        load_rows<64, 128, 256>(swizzled(bt), s.w, 0, t.j0, h, s.k, 64 * step);
        load_rows<64, 128, 256>(swizzled(bt + EXPERT_B_BYTES / 2), s.w, h, t.j0, h, s.k, 64 * step);
    };
    // j < 64 a gate column, j + 64 the up column of the same hidden unit.
    auto finish = [&](const Tile& t, const float (&acc)[128]) {
        const Segment& s = t.seg;
        const int h = s.n / 2;
        for_each_pair<64>(t, h, [&](int r, int c0, int dc, int j) {
            const float g0 = stored(acc[j]), g1 = stored(acc[j + 1]), u0 = stored(acc[j + 64]), u1 = stored(acc[j + 65]);
            act_t* gate = s.out + (size_t)r * 2 * h + c0;
            store_pair(gate + dc, g0, g1);
            store_pair(gate + h + dc, u0, u1);
            store_pair(s.act + (size_t)r * h + c0 + dc, swiglu(g0, u0), swiglu(g1, u1));
        });
    };
    unsigned char* base = aligned_smem(raw);
    if (segs[0].a_weight) nt_tiles<EXPERT_COLS / 2, WEIGHTED>(base, segs, count, tiles, acc, load_b, finish);
    else if (segs[0].a_index) nt_tiles<EXPERT_COLS / 2, PICKED>(base, segs, count, tiles, acc, load_b, finish);
    else nt_tiles<EXPERT_COLS / 2, PLAIN>(base, segs, count, tiles, acc, load_b, finish);
}

// The tiles of out = a · W with W (k × n) read MN-major (dact, grouped_nn_wgmma): B's 64 rows of
// k a step as four swizzled 64-column strips (those past n zero-filled: their products are not
// stored, but stale bytes there could be NaN), one wgmma m64n256k16 a k16 step with the
// instruction's transpose, the strips EXPERT_STRIP_BYTES apart (the descriptor's leading offset).
template <Rows R, class Finish>
__device__ __forceinline__ void nn_tiles(unsigned char* base, const Segment* segs, int count, int tiles, float (&acc)[128], Finish finish) {
    const int wg = threadIdx.x / 128;
    a_loop<EXPERT_COLS, R>(
        base, segs, count, tiles, acc,
        [&](const Tile& t, int step, unsigned char* bt) {
            const Segment& s = t.seg;
#pragma unroll
            for (int strip = 0; strip < EXPERT_COLS / 64; strip++) {
                const int col = t.j0 + 64 * strip, rows = col < s.n ? s.k : 0;  // rows 0: a zero fill
                load_rows<64, 64, 256>(swizzled(bt + strip * EXPERT_STRIP_BYTES), s.w, 0, 64 * step, rows, s.n, col);
            }
        },
        [&](int step, unsigned char* at) {
            // B's rows are k: 16 rows a k-step.
            const auto a = sw128_desc(at + 64 * 128 * wg, 1024), b = sw128_desc(at + EXPERT_A_BYTES, 1024, EXPERT_STRIP_BYTES);
#pragma unroll
            for (int kk = 0; kk < 4; kk++) wgmma_m64n256k16_ss<1>(acc, desc_plus(a, 32 * kk), desc_plus(b, 16 * 128 * kk), step > 0 || kk > 0);
        },
        finish);
}

// Step `step`'s 64 rows of k of a gradient's operand (k × ld at p, its rows read as R says) as
// STRIPS MN-major strips of 64 columns from col0, those past `cols` zero-filled, as are the
// rows past k (picked: they stand in the step's first, their index past the stretch).
template <Rows R, int STRIPS>
__device__ __forceinline__ void load_k_strips(unsigned char* at, const act_t* p, const unsigned* index, int ld, int cols, int col0, int k, int step) {
    const int k0 = 64 * step;
#pragma unroll
    for (int strip = 0; strip < STRIPS; strip++) {
        const int col = col0 + 64 * strip, rows = col < cols ? k : 0;  // rows 0: a zero fill
        unsigned char* to = at + strip * EXPERT_STRIP_BYTES;
        if constexpr (R == PLAIN) {
            load_rows<64, 64, 256>(swizzled(to), p, 0, k0, rows, ld, col);
        } else {
            auto row = [&](int r, bool ok) { return p + (size_t)index[k0 + (ok ? r : 0)] * ld + col; };
            load_rows_from<64, 64, 256>(swizzled(to), row, rows - k0);
        }
    }
}

// The weights of the thread's two rows of k in step `step` (rows threadIdx.x / 8 and 32 more of
// the step: the lines scale_lines gives it in every strip), 1 past k.
__device__ __forceinline__ float2 k_weights(const float* weight, int k, int step) {
    const int r = 64 * step + threadIdx.x / 8;
    return make_float2(r < k ? weight[r] : 1.0f, r + 32 < k ? weight[r + 32] : 1.0f);
}

// The tiles of out = aᵀ · b (the weight gradients): a (k × rows) and b (k × n, in the segment's
// `w`) both have the k rows summed over as their rows, so a step's 64 rows of k stage as
// MN-major strips of 64 columns, two of a (one a warpgroup: its 64 rows of the product) and four
// of b, those past rows or n zero-filled, as are the rows past k (k need not be a multiple of
// 64; with no rows of k at all a tile has no steps); a's rows read as RA says, b's as RB (not
// both picked). One wgmma m64n256k16 a k16 step, both operands transposed by the instruction.
// Weighted rows change every step: the thread's two weights are read a step ahead of the scaling.
template <Rows RA, Rows RB, class Finish>
__device__ __forceinline__ void tn_tiles(unsigned char* base, const Segment* segs, int count, int tiles, float (&acc)[128], Finish finish) {
    const int wg = threadIdx.x / 128;
    float2 wa, wb;
    tile_loop<EXPERT_COLS, RA == WEIGHTED || RB == WEIGHTED>(
        base, segs, count, tiles, acc,
        [&](const Tile& t, int step, unsigned char* at) {
            const Segment& s = t.seg;
            load_k_strips<RA, EXPERT_ROWS / 64>(at, s.a, s.a_index, s.rows, s.rows, t.m0, s.k, step);
            load_k_strips<RB, EXPERT_COLS / 64>(at + EXPERT_A_BYTES, s.w, s.w_index, s.n, s.n, t.j0, s.k, step);
        },
        [&](const Tile& t) {
            if constexpr (RA == WEIGHTED) wa = k_weights(t.seg.a_weight, t.seg.k, 0);
            if constexpr (RB == WEIGHTED) wb = k_weights(t.seg.w_weight, t.seg.k, 0);
        },
        [&](const Tile&, int step, unsigned char* at) {
            const auto a = sw128_desc(at + wg * EXPERT_STRIP_BYTES, 1024), b = sw128_desc(at + EXPERT_A_BYTES, 1024, EXPERT_STRIP_BYTES);
#pragma unroll
            for (int kk = 0; kk < 4; kk++) wgmma_m64n256k16_ss<1, 1>(acc, desc_plus(a, 16 * 128 * kk), desc_plus(b, 16 * 128 * kk), step > 0 || kk > 0);
        },
        [&](const Tile& t, int step, unsigned char* at) {
            // Line j of the thread holds row threadIdx.x / 8 + 32 j of k modulo the strip's 64.
            if constexpr (RA == WEIGHTED) {
                scale_lines<EXPERT_ROWS / 32>(at, [&](int j) { return j % 2 ? wa.y : wa.x; });
                wa = k_weights(t.seg.a_weight, t.seg.k, step + 1);
            }
            if constexpr (RB == WEIGHTED) {
                scale_lines<EXPERT_COLS / 32>(at + EXPERT_A_BYTES, [&](int j) { return j % 2 ? wb.y : wb.x; });
                wb = k_weights(t.seg.w_weight, t.seg.k, step + 1);
            }
        },
        finish);
}

// a = dy, w = W_down (k × h), gu read; dgu (out) and act written.
extern "C" __global__ void __launch_bounds__(256, 1) expert_dact_wgmma(const Segment* segs, int count, int tiles) {
    DYNAMIC_SMEM(raw);
    float acc[128];  // dact of hidden j0..j0 + 255
    auto finish = [&](const Tile& t, const float (&acc)[128]) {
        const Segment& s = t.seg;
        const int h = s.n;
        for_each_pair<128>(t, h, [&](int r, int c0, int dc, int j) {
            const size_t at = (size_t)r * 2 * h + c0;
            const act_t *gate = s.gu + at, *up = gate + h;
            act_t *dgate = s.out + at, *dup = dgate + h;
            const float2 g = load_pair(gate + dc), u = load_pair(up + dc);
            float dg0, du0, dg1, du1;
            swiglu_grad(g.x, u.x, stored(acc[j]), dg0, du0);
            swiglu_grad(g.y, u.y, stored(acc[j + 1]), dg1, du1);
            store_pair(dgate + dc, dg0, dg1);
            store_pair(dup + dc, du0, du1);
            store_pair(s.act + (size_t)r * h + c0 + dc, swiglu(g.x, u.x), swiglu(g.y, u.y));
        });
    };
    unsigned char* base = aligned_smem(raw);
    if (segs[0].a_weight) nn_tiles<WEIGHTED>(base, segs, count, tiles, acc, finish);
    else if (segs[0].a_index) nn_tiles<PICKED>(base, segs, count, tiles, acc, finish);
    else nn_tiles<PLAIN>(base, segs, count, tiles, acc, finish);
}

// Stores a plain product's tile as it lies (rows × n).
__device__ __forceinline__ void store_tile(const Tile& t, const float (&acc)[128]) {
    const Segment& s = t.seg;
    for_each_pair<128>(t, s.n, [&](int r, int c0, int dc, int j) { store_pair(s.out + (size_t)r * s.n + c0 + dc, acc[j], acc[j + 1]); });
}

// out = a · W with W (k × n) as it lies (MN-major).
extern "C" __global__ void __launch_bounds__(256, 1) grouped_nn_wgmma(const Segment* segs, int count, int tiles) {
    DYNAMIC_SMEM(raw);
    float acc[128];
    nn_tiles<PLAIN>(aligned_smem(raw), segs, count, tiles, acc, [](const Tile& t, const float (&acc)[128]) { store_tile(t, acc); });
}

// out = a · Wᵀ with W (n × k), K-major like a.
extern "C" __global__ void __launch_bounds__(256, 1) grouped_nt_wgmma(const Segment* segs, int count, int tiles) {
    DYNAMIC_SMEM(raw);
    float acc[128];
    auto load_b = [&](const Tile& t, int step, unsigned char* bt) { load_rows<64, EXPERT_COLS, 256>(swizzled(bt), t.seg.w, 0, t.j0, t.seg.n, t.seg.k, 64 * step); };
    nt_tiles<EXPERT_COLS, PLAIN>(aligned_smem(raw), segs, count, tiles, acc, load_b, [](const Tile& t, const float (&acc)[128]) { store_tile(t, acc); });
}

// out (f32, rows × n) = aᵀ · b, or += with ADD (the gradient's earlier part).
template <bool ADD>
__device__ __forceinline__ void grouped_tn(const Segment* segs, int count, int tiles) {
    DYNAMIC_SMEM(raw);
    float acc[128];
    auto finish = [&](const Tile& t, const float (&acc)[128]) {
        const Segment& s = t.seg;
        float* out = (float*)s.out;
        const bool empty = s.k == 0;  // no rows of k: the product is zero
        for_each_pair<128>(t, s.n, [&](int r, int c0, int dc, int j) {
            float2* o = (float2*)(out + (size_t)r * s.n + c0 + dc);
            float2 v = empty ? make_float2(0.0f, 0.0f) : make_float2(acc[j], acc[j + 1]);
            if (ADD) {
                const float2 old = *o;
                v = make_float2(old.x + v.x, old.y + v.y);
            }
            *o = v;
        });
    };
    unsigned char* base = aligned_smem(raw);
    const Segment& s = segs[0];
    if (s.w_weight) tn_tiles<PLAIN, WEIGHTED>(base, segs, count, tiles, acc, finish);
    else if (s.w_index) tn_tiles<PLAIN, PICKED>(base, segs, count, tiles, acc, finish);
    else if (s.a_weight) tn_tiles<WEIGHTED, PLAIN>(base, segs, count, tiles, acc, finish);
    else if (s.a_index) tn_tiles<PICKED, PLAIN>(base, segs, count, tiles, acc, finish);
    else tn_tiles<PLAIN, PLAIN>(base, segs, count, tiles, acc, finish);
}
extern "C" __global__ void __launch_bounds__(256, 1) grouped_tn_wgmma(const Segment* segs, int count, int tiles) { grouped_tn<false>(segs, count, tiles); }
extern "C" __global__ void __launch_bounds__(256, 1) grouped_tn_add_wgmma(const Segment* segs, int count, int tiles) { grouped_tn<true>(segs, count, tiles); }
#endif
