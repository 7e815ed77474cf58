//! Launch code of the experts' grouped GEMMs on Hopper (`kernels/experts.cu`): which products
//! they take, the table of segments they walk and their geometry. Public so that the kernel
//! emulator's test (`tests/cuda_emu.rs`) launches them exactly as the backend does.

use cudarc::driver::{DeviceRepr, LaunchConfig};

use crate::backend::{Gemm, SwiGluBwdGemm, SwiGluGemm};

/// Entry points compiled only for Hopper (`sm_90a`), in [`Fused::ALL`] order.
pub const HOPPER_FUNCTIONS: &[&str] = &["expert_up_wgmma", "expert_dact_wgmma", "grouped_nt_wgmma", "grouped_nn_wgmma", "grouped_tn_wgmma", "grouped_tn_add_wgmma"];
/// `EXPERT_ROWS` and `EXPERT_COLS` of experts.cu: the rows of a tile and the columns of its
/// product, for every kernel (the up projection's 128 hidden columns are 256 of its product:
/// gate and up).
pub const TILE_ROWS: usize = 128;
pub const TILE_COLS: usize = 256;
/// What a product's columns must be a multiple of: a tile's last may be half used (the up
/// projection's hidden columns: half of this).
pub const COL_STEP: usize = 128;
/// The inner dimension's step (one 128-byte swizzled row of bf16).
pub const K_STEP: usize = 64;
const THREADS: u32 = 256;
/// `EXPERT_STAGES` of experts.cu, each an A tile (128 rows of 128 bytes) and a B tile (256).
const STAGES: usize = 4;
/// Dynamic shared memory of every kernel, as it carves it: 1024 bytes to align its buffers,
/// then the stages.
pub const SMEM_BYTES: usize = 1024 + STAGES * (TILE_ROWS + TILE_COLS) * 128;

/// The kernels of experts.cu.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fused {
    /// `gu = a · W_guᵀ`, `act = SwiGLU(gu)`: [`crate::backend::Backend::grouped_matmul_swiglu`].
    Up,
    /// `dact = dy · W_down`, then SwiGLU's backward: `Backend::grouped_matmul_swiglu_bwd`.
    Dact,
    /// `out = a · Wᵀ`: `Backend::grouped_matmul` with `tb` (the down projection).
    GemmNt,
    /// `out = a · W`: `Backend::grouped_matmul` without `tb` (the input gradient through gate/up).
    GemmNn,
    /// `out = aᵀ · b` into f32: `Backend::grouped_matmul` with `ta` (the weight gradients).
    GemmTn,
    /// The same, adding to `out`.
    GemmTnAdd,
}

impl Fused {
    pub const ALL: [Fused; 6] = [Fused::Up, Fused::Dact, Fused::GemmNt, Fused::GemmNn, Fused::GemmTn, Fused::GemmTnAdd];

    pub fn function(self) -> &'static str {
        HOPPER_FUNCTIONS[self as usize]
    }

    /// The weight-gradient kernels: k is the rows summed over (any number), the product's rows
    /// come in strips of 64, and `out` is f32.
    fn is_gradient(self) -> bool {
        matches!(self, Fused::GemmTn | Fused::GemmTnAdd)
    }

    /// Whether the kernel takes a product of this shape: k whole steps of 64 and n whole
    /// column steps; for the gradients rows whole strips of 64 and any k.
    fn takes(self, p: &Part) -> bool {
        let k_ok = if self.is_gradient() { p.rows.is_multiple_of(64) } else { p.k.is_multiple_of(K_STEP) };
        k_ok && p.n.is_multiple_of(COL_STEP)
    }

    /// A persistent grid of 256-thread blocks, one an SM (the shared memory holds one) up to one
    /// a tile: each block takes every grid's-worth tile and loads a tile's first steps while the
    /// one before it ends. `sms`: the device's multiprocessors.
    pub fn config(self, call: &Call, sms: usize) -> LaunchConfig {
        let blocks = call.tiles.min(sms).max(1);
        LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: SMEM_BYTES as u32 }
    }
}

/// `struct Segment` of experts.cu: one product's device addresses (`a` with the index and the
/// weights of its picked rows, the weight `w` (the gradients' b) with those of its, `out`, the
/// saved `gu` and `act`; 0 where the kernel has none), its rows, inner dimension and columns,
/// and the tiles of the segments before it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    a: u64,
    a_index: u64,
    a_weight: u64,
    w: u64,
    w_index: u64,
    w_weight: u64,
    out: u64,
    gu: u64,
    act: u64,
    rows: i32,
    k: i32,
    n: i32,
    first_tile: i32,
}

// SAFETY: plain #[repr(C)] integers, the layout of the CUDA struct (nine pointers, four ints).
unsafe impl DeviceRepr for Segment {}

impl Segment {
    /// The index and weights of `side`'s picked rows.
    fn pick_mut(&mut self, side: Side) -> (&mut u64, &mut u64) {
        match side {
            Side::A => (&mut self.a_index, &mut self.a_weight),
            Side::W => (&mut self.w_index, &mut self.w_weight),
        }
    }
}

/// The operand whose rows a call picks: the product's `a`, or `w` (the weight gradients' b).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    A,
    W,
}

/// Base device addresses of a call's views (0 for those the kernel has none of) and their
/// element size (`out`'s is 4 for the gradient kernels).
#[derive(Clone, Copy, Debug, Default)]
pub struct Operands {
    pub a: u64,
    pub w: u64,
    pub out: u64,
    pub gu: u64,
    pub act: u64,
    pub elem_bytes: usize,
}

/// One launch: the kernel, its segments' table (products without rows left out) and tiles.
pub struct Call {
    pub kernel: Fused,
    pub segments: Vec<Segment>,
    pub tiles: usize,
}

impl Call {
    /// Each segment's pick of `side` the byte offset of its product's first picked row,
    /// `first_row` of its product (the segments are the products with rows, in order), in the
    /// index and the weights alike (both 4 bytes a row), until [`Call::place_pick`] adds their
    /// addresses.
    fn with_pick_offsets<'a>(mut self, side: Side, products: impl Iterator<Item = &'a Gemm>, first_row: impl Fn(&Gemm) -> usize) -> Self {
        for (seg, g) in self.segments.iter_mut().zip(products.filter(|g| g.m > 0)) {
            let offset = 4 * first_row(g) as u64;
            let (index, weight) = seg.pick_mut(side);
            (*index, *weight) = (offset, offset);
        }
        self
    }

    /// Adds the device addresses of the row index and, where the rows are weighted, the
    /// weights of `side`'s picked rows (uploaded after the call was made, see [`up_call`],
    /// [`dact_call`], [`grad_call`]) to each segment's offsets into them.
    pub fn place_pick(&mut self, side: Side, index: u64, weights: Option<u64>) {
        for seg in &mut self.segments {
            let (i, w) = seg.pick_mut(side);
            *i = i.wrapping_add(index);
            *w = weights.map_or(0, |base| w.wrapping_add(base));
        }
    }
}

/// One product: element offsets into the operands (`a`, `w`, `out`, `gu`, `act`) and its shape.
struct Part {
    offsets: [usize; 5],
    rows: usize,
    k: usize,
    n: usize,
}

/// The up projection's launch (`out` = gu), or `None` where the kernel does not take these
/// products. `picked`: product g's rows are `a`'s rows `index[g.a / k..]` (`g.a` an offset into
/// the picked rows, as if they were one matrix); each segment's pick is then the byte offset of
/// its stretch until [`Call::place_pick`] adds the addresses, so that the index goes up only
/// once the kernel is known to take the products.
pub fn up_call(ops: Operands, gemms: &[SwiGluGemm], picked: bool) -> Option<Call> {
    let call = call(Fused::Up, ops, gemms.iter().map(|s| part(&s.gemm, [if picked { 0 } else { s.gemm.a }, s.gemm.b, s.gemm.out, 0, s.act])))?;
    Some(if picked { call.with_pick_offsets(Side::A, gemms.iter().map(|s| &s.gemm), |g| g.a / g.k) } else { call })
}

/// SwiGLU's backward through the down projection (`out` = dgu), or `None` as above; `picked`:
/// dy's rows picked as the up projection's `a`.
pub fn dact_call(ops: Operands, gemms: &[SwiGluBwdGemm], picked: bool) -> Option<Call> {
    let call = call(Fused::Dact, ops, gemms.iter().map(|s| part(&s.gemm, [if picked { 0 } else { s.gemm.a }, s.gemm.b, s.dgu, s.gu, s.act])))?;
    Some(if picked { call.with_pick_offsets(Side::A, gemms.iter().map(|s| &s.gemm), |g| g.a / g.k) } else { call })
}

/// A grouped matmul `out = a · op(W)` (`tb`: W is n × k), or `None` as above.
pub fn gemm_call(ops: Operands, gemms: &[Gemm], tb: bool) -> Option<Call> {
    let kernel = if tb { Fused::GemmNt } else { Fused::GemmNn };
    call(kernel, ops, gemms.iter().map(|g| part(g, [g.a, g.b, g.out, 0, 0])))
}

/// A grouped weight gradient `out (f32) = aᵀ · b`, or `+=` with `accumulate` (a: k × m, b: k × n,
/// the routed rows k; `b` in the operands' `w`), or `None` as above. Every product's m × n
/// output is written, even where k = 0. `picked` ([a, b], not both): product g's rows of a are
/// a's rows `index[g.a / m..]`, of b b's `index[g.b / n..]`, each segment's pick its byte
/// offsets until [`Call::place_pick`].
pub fn grad_call(ops: Operands, gemms: &[Gemm], accumulate: bool, picked: [bool; 2]) -> Option<Call> {
    if picked == [true; 2] {
        return None;
    }
    let kernel = if accumulate { Fused::GemmTnAdd } else { Fused::GemmTn };
    let call = call(kernel, ops, gemms.iter().map(|g| part(g, [if picked[0] { 0 } else { g.a }, if picked[1] { 0 } else { g.b }, g.out, 0, 0])))?;
    let call = if picked[0] { call.with_pick_offsets(Side::A, gemms.iter(), |g| g.a / g.m) } else { call };
    Some(if picked[1] { call.with_pick_offsets(Side::W, gemms.iter(), |g| g.b / g.n) } else { call })
}

fn part(g: &Gemm, offsets: [usize; 5]) -> Part {
    Part { offsets, rows: g.m, k: g.k, n: g.n }
}

/// The table of `parts` for `kernel`, if it takes them ([`Fused::takes`]), every operand 16-byte
/// aligned (cp.async copies 16 bytes; the epilogues move pairs).
fn call(kernel: Fused, ops: Operands, parts: impl Iterator<Item = Part>) -> Option<Call> {
    let bases = [ops.a, ops.w, ops.out, ops.gu, ops.act];
    let bytes = |i: usize| if i == 2 && kernel.is_gradient() { 4 } else { ops.elem_bytes };
    // The address of operand i of a part; 0 (no such operand) stays 0.
    let at = |i: usize, p: &Part| if bases[i] == 0 { 0 } else { bases[i] + (p.offsets[i] * bytes(i)) as u64 };
    let (mut segments, mut tiles) = (Vec::new(), 0);
    for p in parts {
        if !kernel.takes(&p) || !(0..5).all(|i| at(i, &p).is_multiple_of(16)) {
            return None;
        }
        if p.rows > 0 {
            segments.push(Segment { a: at(0, &p), a_index: 0, a_weight: 0, w: at(1, &p), w_index: 0, w_weight: 0, out: at(2, &p), gu: at(3, &p), act: at(4, &p), rows: p.rows as i32, k: p.k as i32, n: p.n as i32, first_tile: tiles as i32 });
            tiles += p.rows.div_ceil(TILE_ROWS) * p.n.div_ceil(TILE_COLS);
        }
    }
    Some(Call { kernel, segments, tiles })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glu(m: usize, h: usize, at: usize) -> SwiGluGemm {
        SwiGluGemm { gemm: Gemm { m, k: 128, n: 2 * h, out: at * 2 * h, a: at * 128, b: 0 }, act: at * h }
    }
    const OPS: Operands = Operands { a: 3 << 20, w: 4 << 20, out: 1 << 20, gu: 0, act: 2 << 20, elem_bytes: 2 };

    #[test]
    fn calls_count_tiles_and_skip_empty_experts() {
        let call = up_call(OPS, &[glu(300, 128, 0), glu(0, 64, 300), glu(1, 192, 300)], false).expect("taken");
        // 300 rows: 3 row tiles × 1 tile of 128 hidden columns; the empty expert none; 1 row:
        // 1 × 2 (192 hidden columns: the second tile half used).
        assert_eq!(call.tiles, 3 + 2);
        assert_eq!(call.segments.iter().map(|s| (s.rows, s.k, s.n, s.first_tile)).collect::<Vec<_>>(), [(300, 128, 256, 0), (1, 128, 384, 3)]);
        assert_eq!((call.segments[1].out, call.segments[1].gu), (OPS.out + 2 * 300 * 2 * 192, 0));
        let bwd = SwiGluBwdGemm { gemm: Gemm { m: 5, k: 128, n: 256, out: 0, a: 0, b: 0 }, gu: 0, dgu: 128, act: 0 };
        let dact = dact_call(Operands { gu: 5 << 20, ..OPS }, &[bwd], false).expect("taken");
        assert_eq!((dact.tiles, dact.segments[0].out, dact.segments[0].gu), (1, OPS.out + 256, 5 << 20));
        // The plain kernels: 256 columns a tile, the last maybe half used; k per product.
        let gemms = [Gemm { m: 129, k: 64, n: 256, out: 0, a: 0, b: 0 }, Gemm { m: 10, k: 192, n: 128, out: 129 * 256, a: 129 * 64, b: 256 * 64 }];
        for (tb, kernel) in [(true, Fused::GemmNt), (false, Fused::GemmNn)] {
            let plain = gemm_call(Operands { act: 0, ..OPS }, &gemms, tb).expect("taken");
            assert_eq!((plain.kernel, plain.tiles, plain.segments[1].k), (kernel, 2 + 1, 192));
        }
    }

    /// A block an SM, none idle: the blocks of a call with fewer tiles than SMs take one each.
    #[test]
    fn the_grid_is_a_block_an_sm_up_to_a_block_a_tile() {
        let call = up_call(OPS, &[glu(300, 128, 0), glu(1, 192, 300)], false).expect("taken");
        assert_eq!(call.tiles, 5);
        let grid = |sms| call.kernel.config(&call, sms).grid_dim;
        assert_eq!((grid(132), grid(3)), ((5, 1, 1), (3, 1, 1)));
    }

    #[test]
    fn picked_rows_start_at_each_products_place_in_the_index() {
        let (index, weights) = (9 << 20, 10 << 20);
        let mut call = up_call(OPS, &[glu(300, 128, 0), glu(0, 64, 300), glu(1, 192, 300)], true).expect("taken");
        call.place_pick(Side::A, index, None);
        // Every product reads a's base through its own stretch of the index (u32s), unweighted.
        assert_eq!(call.segments.iter().map(|s| (s.a, s.a_index, s.a_weight)).collect::<Vec<_>>(), [(OPS.a, index, 0), (OPS.a, index + 4 * 300, 0)]);
        // dy's rows weighted: the weights (f32s) from the same place as the index.
        let bwd = |m, at: usize| SwiGluBwdGemm { gemm: Gemm { m, k: 128, n: 128, out: 0, a: at * 128, b: 0 }, gu: 0, dgu: 0, act: 0 };
        let mut dact = dact_call(Operands { gu: 5 << 20, ..OPS }, &[bwd(5, 0), bwd(0, 5), bwd(3, 5)], true).expect("taken");
        dact.place_pick(Side::A, index, Some(weights));
        assert_eq!(dact.segments.iter().map(|s| (s.a, s.a_index, s.a_weight)).collect::<Vec<_>>(), [(OPS.a, index, weights), (OPS.a, index + 20, weights + 20)]);
        assert!(dact.segments.iter().all(|s| (s.w_index, s.w_weight) == (0, 0)));
    }

    /// The weight gradients: m × n outputs in tiles of 128 × 256 whatever k (the routed rows,
    /// any number, none included), `out` f32; rows must come in strips of 64.
    #[test]
    fn gradient_calls_tile_the_output_and_take_any_k() {
        let g = |m, k, n, out| Gemm { m, k, n, out, a: 0, b: 0 };
        let call = grad_call(OPS, &[g(256, 130, 384, 0), g(64, 0, 128, 256 * 384)], true, [false; 2]).expect("taken");
        assert_eq!(call.kernel, Fused::GemmTnAdd);
        assert_eq!(call.tiles, 2 * 2 + 1);
        assert_eq!(call.segments.iter().map(|s| (s.rows, s.k, s.n, s.first_tile)).collect::<Vec<_>>(), [(256, 130, 384, 0), (64, 0, 128, 4)]);
        // out is f32: the second product starts 4 bytes an element further on.
        assert_eq!(call.segments[1].out, OPS.out + 4 * 256 * 384);
        assert_eq!(grad_call(OPS, &[g(256, 130, 384, 0)], false, [false; 2]).expect("taken").kernel, Fused::GemmTn);
        assert!(grad_call(OPS, &[g(96, 8, 128, 0)], false, [false; 2]).is_none(), "rows not whole strips of 64");
        assert!(grad_call(OPS, &[g(64, 8, 192, 0)], false, [false; 2]).is_none(), "columns not whole steps of 128");
        assert!(grad_call(OPS, &[g(64, 8, 128, 2)], false, [false; 2]).is_none(), "out off a 16-byte boundary");
        // Picked: b's rows through the index, each product from its place in it (b = 130 × 128
        // elements in: row 130 of the picked rows), b itself at its base; a's likewise, its
        // rows m wide (a = 130 × 256: row 130 too), weighted.
        let picked = [Gemm { b: 0, ..g(256, 130, 128, 0) }, Gemm { a: 130 * 256, b: 130 * 128, ..g(256, 7, 128, 256 * 128) }];
        let mut call = grad_call(OPS, &picked, false, [false, true]).expect("taken");
        call.place_pick(Side::W, 9 << 20, None);
        assert_eq!(call.segments.iter().map(|s| (s.a, s.w, s.w_index, s.w_weight)).collect::<Vec<_>>(), [(OPS.a, OPS.w, 9 << 20, 0), (OPS.a + 2 * 130 * 256, OPS.w, (9 << 20) + 4 * 130, 0)]);
        let mut call = grad_call(OPS, &picked, false, [true, false]).expect("taken");
        call.place_pick(Side::A, 9 << 20, Some(10 << 20));
        assert_eq!(call.segments.iter().map(|s| (s.a, s.a_index, s.a_weight, s.w)).collect::<Vec<_>>(), [(OPS.a, 9 << 20, 10 << 20, OPS.w), (OPS.a, (9 << 20) + 4 * 130, (10 << 20) + 4 * 130, OPS.w + 2 * 130 * 128)]);
        assert!(grad_call(OPS, &picked, false, [true; 2]).is_none(), "the kernels pick one operand's rows at most");
    }

    /// `cuda_scratch::expert_kernels_gather` (what the model and `plan-memory` go by when they
    /// leave the gathered copies out) says yes exactly where every product reading picked rows
    /// is taken: a product refused would gather into a buffer of its own, outside the plan.
    #[test]
    fn the_gather_rule_is_the_picking_products_shapes() {
        for c in [64, 128, 192, 256] {
            for h in [64, 128, 192, 256, 384] {
                let up = SwiGluGemm { gemm: Gemm { m: 5, k: c, n: 2 * h, out: 0, a: 0, b: 0 }, act: 0 };
                let dact = SwiGluBwdGemm { gemm: Gemm { m: 5, k: c, n: h, out: 0, a: 0, b: 0 }, gu: 0, dgu: 0, act: 0 };
                let (dw_gu, dw_down) = (Gemm { m: 2 * h, k: 5, n: c, out: 0, a: 0, b: 0 }, Gemm { m: c, k: 5, n: h, out: 0, a: 0, b: 0 });
                let ops = Operands { gu: 5 << 20, ..OPS };
                let taken = up_call(OPS, &[up], true).is_some()
                    && dact_call(ops, &[dact], true).is_some()
                    && grad_call(OPS, &[dw_gu], false, [false, true]).is_some()
                    && grad_call(OPS, &[dw_down], false, [true, false]).is_some();
                assert_eq!(crate::backend::cuda_scratch::expert_kernels_gather(c, &[h]), taken, "d_model {c}, width {h}");
            }
        }
    }

    #[test]
    fn products_the_kernels_cannot_take_are_refused() {
        // A width that is not whole tiles, an operand off a 16-byte boundary.
        assert!(up_call(OPS, &[glu(4, 96, 0)], false).is_none() && up_call(OPS, &[glu(4, 96, 0)], true).is_none());
        let misaligned = SwiGluGemm { gemm: Gemm { a: 3, ..glu(4, 64, 0).gemm }, ..glu(4, 64, 0) };
        assert!(up_call(OPS, &[misaligned], false).is_none());
        let bwd = SwiGluBwdGemm { gemm: Gemm { m: 5, k: 128, n: 128, out: 0, a: 0, b: 0 }, gu: 0, dgu: 4, act: 0 };
        assert!(dact_call(Operands { gu: 5 << 20, ..OPS }, &[bwd], false).is_none());
        // 64 columns are not a tile; k must be whole steps of 64.
        let g = Gemm { m: 8, k: 64, n: 128, out: 0, a: 0, b: 0 };
        assert!(gemm_call(OPS, &[g], false).is_some() && gemm_call(OPS, &[Gemm { n: 64, ..g }], true).is_none());
        assert!(gemm_call(OPS, &[Gemm { k: 96, ..g }], false).is_none());
    }
}
