//! Launch code of the fused expert kernels (`kernels/experts.cu`): which products they take,
//! the table of segments they walk and their geometry. Public so that the kernel emulator's
//! test (`tests/cuda_emu.rs`) launches them exactly as the backend does.

use cudarc::driver::{DeviceRepr, LaunchConfig};

use crate::backend::{SwiGluBwdGemm, SwiGluGemm};

/// Entry points compiled only for Hopper (`sm_90a`), in [`Fused::ALL`] order.
pub const HOPPER_FUNCTIONS: &[&str] = &["expert_up_wgmma", "expert_dact_wgmma"];
/// `EXPERT_ROWS` and `EXPERT_COLS` of experts.cu: a block's tile is 128 rows × 64 hidden columns.
pub const TILE_ROWS: usize = 128;
pub const TILE_COLS: usize = 64;
/// The inner dimension's step (one 128-byte swizzled row of bf16).
pub const K_STEP: usize = 64;
const THREADS: u32 = 256;
/// `EXPERT_STAGES` of experts.cu, and the bytes of a step's A tile (128 rows of 128 bytes).
const STAGES: usize = 4;
const A_BYTES: usize = 128 * 128;

/// The two fused kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fused {
    /// `gu = a · W_guᵀ`, `act = SwiGLU(gu)`: [`crate::backend::Backend::grouped_matmul_swiglu`].
    Up,
    /// `dact = dy · W_down`, then SwiGLU's backward: `Backend::grouped_matmul_swiglu_bwd`.
    Dact,
}

impl Fused {
    pub const ALL: [Fused; 2] = [Fused::Up, Fused::Dact];

    pub fn function(self) -> &'static str {
        HOPPER_FUNCTIONS[self as usize]
    }

    /// Dynamic shared memory, as the kernel carves it: 1024 bytes to align its buffers, then
    /// each stage's A tile and B tile (up: 128 rows of W, gate and up; dact: 64 rows of k).
    pub fn smem_bytes(self) -> usize {
        let b_bytes = match self {
            Fused::Up => 128 * 128,
            Fused::Dact => 64 * 128,
        };
        1024 + STAGES * (A_BYTES + b_bytes)
    }

    /// One block of 256 threads per tile of the call.
    pub fn config(self, call: &Call) -> LaunchConfig {
        LaunchConfig { grid_dim: (call.tiles as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: self.smem_bytes() as u32 }
    }
}

/// `struct Segment` of experts.cu: one expert's device addresses (its rows of `a`, its weight,
/// its `gu`, `dgu` (0 for the up projection) and `act`), its rows, its width and the tiles of the
/// segments before it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    a: u64,
    w: u64,
    gu: u64,
    dgu: u64,
    act: u64,
    rows: i32,
    h: i32,
    first_tile: i32,
    unused: i32,
}

// SAFETY: plain #[repr(C)] integers, the layout of the CUDA struct (five pointers, four ints).
unsafe impl DeviceRepr for Segment {}

/// Base device addresses of a call's views (`dgu` 0 for the up projection) and their element
/// size.
#[derive(Clone, Copy, Debug)]
pub struct Operands {
    pub a: u64,
    pub w: u64,
    pub gu: u64,
    pub dgu: u64,
    pub act: u64,
    pub elem_bytes: usize,
}

/// One launch: its segments' table (experts without rows left out), its tiles, its inner
/// dimension.
pub struct Call {
    pub segments: Vec<Segment>,
    pub tiles: usize,
    pub k: usize,
}

/// One expert: element offsets into the operands, rows, width, inner dimension.
struct Part {
    offsets: [usize; 5],
    rows: usize,
    h: usize,
    k: usize,
}

/// The up projection's launch, or `None` where the kernel does not take these products.
pub fn up_call(ops: Operands, gemms: &[SwiGluGemm]) -> Option<Call> {
    call(ops, gemms.iter().map(|s| Part { offsets: [s.gemm.a, s.gemm.b, s.gemm.out, 0, s.act], rows: s.gemm.m, h: s.gemm.n / 2, k: s.gemm.k }).collect())
}

/// SwiGLU's backward through the down projection's launch, or `None` as above.
pub fn dact_call(ops: Operands, gemms: &[SwiGluBwdGemm]) -> Option<Call> {
    call(ops, gemms.iter().map(|s| Part { offsets: [s.gemm.a, s.gemm.b, s.gu, s.dgu, s.act], rows: s.gemm.m, h: s.gemm.n, k: s.gemm.k }).collect())
}

/// The table of `parts`, if the kernels take them: one inner dimension `k` for all (the
/// launch's), `k` and every width whole tiles (multiples of 64), every operand 16-byte aligned
/// (cp.async copies 16 bytes; the epilogue moves pairs).
fn call(ops: Operands, parts: Vec<Part>) -> Option<Call> {
    let bases = [ops.a, ops.w, ops.gu, ops.dgu, ops.act];
    let at = |i: usize, p: &Part| bases[i] + (p.offsets[i] * ops.elem_bytes) as u64;
    let k = parts.first().map_or(K_STEP, |p| p.k);
    let fits = |p: &Part| p.k == k && k.is_multiple_of(K_STEP) && p.h.is_multiple_of(TILE_COLS) && (0..5).all(|i| at(i, p).is_multiple_of(16));
    if !parts.iter().all(fits) {
        return None;
    }
    let mut tiles = 0;
    let segments = parts
        .iter()
        .filter(|p| p.rows > 0)
        .map(|p| {
            let dgu = if ops.dgu == 0 { 0 } else { at(3, p) };
            let seg = Segment { a: at(0, p), w: at(1, p), gu: at(2, p), dgu, act: at(4, p), rows: p.rows as i32, h: p.h as i32, first_tile: tiles as i32, unused: 0 };
            tiles += p.rows.div_ceil(TILE_ROWS) * (p.h / TILE_COLS);
            seg
        })
        .collect();
    Some(Call { segments, tiles, k })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Gemm;

    fn glu(m: usize, h: usize, at: usize) -> SwiGluGemm {
        SwiGluGemm { gemm: Gemm { m, k: 128, n: 2 * h, out: at * 2 * h, a: at * 128, b: 0 }, act: at * h }
    }
    const OPS: Operands = Operands { a: 3 << 20, w: 4 << 20, gu: 1 << 20, dgu: 0, act: 2 << 20, elem_bytes: 2 };

    #[test]
    fn calls_count_tiles_and_skip_empty_experts() {
        let call = up_call(OPS, &[glu(300, 128, 0), glu(0, 64, 300), glu(1, 192, 300)]).expect("taken");
        // 300 rows: 3 row tiles × 2 column tiles; the empty expert none; 1 row: 1 × 3.
        assert_eq!((call.tiles, call.k), (6 + 3, 128));
        assert_eq!(call.segments.iter().map(|s| (s.rows, s.h, s.first_tile)).collect::<Vec<_>>(), [(300, 128, 0), (1, 192, 6)]);
        assert_eq!((call.segments[1].gu, call.segments[1].dgu), (OPS.gu + 2 * 300 * 2 * 192, 0));
        let bwd = SwiGluBwdGemm { gemm: Gemm { m: 5, k: 128, n: 64, out: 0, a: 0, b: 0 }, gu: 0, dgu: 128, act: 0 };
        let dact = dact_call(Operands { dgu: 5 << 20, ..OPS }, &[bwd]).expect("taken");
        assert_eq!((dact.tiles, dact.segments[0].dgu), (1, (5 << 20) + 256));
    }

    #[test]
    fn products_the_kernels_cannot_take_are_refused() {
        // A width that is not whole tiles, an operand off a 16-byte boundary, two inner dimensions.
        assert!(up_call(OPS, &[glu(4, 96, 0)]).is_none());
        let misaligned = SwiGluGemm { gemm: Gemm { a: 3, ..glu(4, 64, 0).gemm }, ..glu(4, 64, 0) };
        assert!(up_call(OPS, &[misaligned]).is_none());
        let other_k = SwiGluGemm { gemm: Gemm { k: 64, ..glu(4, 64, 0).gemm }, ..glu(4, 64, 0) };
        assert!(up_call(OPS, &[glu(4, 64, 0), other_k]).is_none());
        let bwd = SwiGluBwdGemm { gemm: Gemm { m: 5, k: 128, n: 64, out: 0, a: 0, b: 0 }, gu: 0, dgu: 4, act: 0 };
        assert!(dact_call(Operands { dgu: 5 << 20, ..OPS }, &[bwd]).is_none());
    }
}
