//! Launch geometry of the kernels other than attention: grid, block and shared memory per
//! launch. Public so that the kernel emulator's test (`tests/cuda_emu.rs`) launches each kernel
//! exactly as the backend does.

pub use cudarc::driver::LaunchConfig;

pub use crate::backend::cuda_scratch::ROUTE_GROUP;

/// Threads per block for row and grid-stride kernels.
pub const THREADS: u32 = 256;
/// Rows per partial sum in the deterministic column reductions (RMSNorm dw), as on the CPU.
pub const ROW_CHUNK: usize = 64;
/// Blocks of the first pass of `sum_squares`; fixed so the summation order depends only on n.
/// Enough threads (256 K) that their loads in flight cover the memory's latency on an H100.
pub const SUMSQ_BLOCKS: usize = 1024;

fn blocks_for(n: usize) -> u32 {
    n.div_ceil(THREADS as usize).clamp(1, 1 << 16) as u32
}

/// Elements a thread moves at a time in the kernels over rows that take a `vec` argument: 8
/// (16-byte accesses, `load_vec` of common.cuh) where the rows' width is a multiple of 8 and
/// every buffer (`ptrs`) is 16-byte aligned, else 1.
pub fn vec_width(width: usize, ptrs: &[u64]) -> i32 {
    if width.is_multiple_of(8) && ptrs.iter().all(|p| p.is_multiple_of(16)) {
        8
    } else {
        1
    }
}

/// Grid-stride launch over `n` elements.
pub fn grid_stride(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks_for(n), 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// One block of `THREADS` per row (`rows ≥ 1`).
pub fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// `route_scan`: a warp for each of the `e + 2` quantities it scans or sums.
pub fn route_scan(e: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (e as u32 + 2, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 }
}

/// One warp per row, `THREADS / 32` rows per block.
pub fn warp_per_row(rows: usize) -> LaunchConfig {
    let per_block = THREADS as usize / 32;
    LaunchConfig { grid_dim: (rows.div_ceil(per_block) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// `sum_squares_partial` (`SUMSQ_BLOCKS` blocks) and `sum_squares_final` (one warp).
pub fn sum_squares() -> (LaunchConfig, LaunchConfig) {
    let partial = LaunchConfig { grid_dim: (SUMSQ_BLOCKS as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let one_warp = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
    (partial, one_warp)
}

/// f32 partial sums of RMSNorm's weight gradient the backend's reduction scratch holds.
pub const RMSNORM_PARTIALS: usize = crate::backend::cuda_scratch::REDUCTION_BYTES / 4;
const _: () = assert!((SUMSQ_BLOCKS + 1) * 8 <= crate::backend::cuda_scratch::REDUCTION_BYTES);

/// One pass of RMSNorm's weight gradient over rows `first_row..first_row + rows`:
/// `rmsnorm_dw_partial` on `cfg` (a block per chunk of `ROW_CHUNK` rows and `THREADS` columns)
/// writes `chunks` partial sums, then `rmsnorm_dw_reduce` (over `grid_stride(c)`) adds them into
/// dW in order.
#[derive(Clone, Copy, Debug)]
pub struct DwPass {
    pub cfg: LaunchConfig,
    pub first_row: usize,
    pub rows: usize,
    pub chunks: usize,
}

/// The passes over `n` rows of width `c` whose partial sums fit `max_partials` f32. Each pass
/// adds its chunks into dW after the previous pass's (an f32 store and load between them is
/// exact), so any number of passes sums the same chunks in the same order as one pass, and as
/// the CPU does.
pub fn rmsnorm_dw_passes(n: usize, c: usize, max_partials: usize) -> impl Iterator<Item = DwPass> {
    assert!(c <= max_partials, "RMSNorm width {c} exceeds the reductions' scratch ({max_partials} partial sums)");
    let rows_per_pass = max_partials / c * ROW_CHUNK;
    let col_blocks = c.div_ceil(THREADS as usize) as u32;
    (0..n).step_by(rows_per_pass).map(move |first_row| {
        let rows = rows_per_pass.min(n - first_row);
        let chunks = rows.div_ceil(ROW_CHUNK);
        let cfg = LaunchConfig { grid_dim: (chunks as u32, col_blocks, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        DwPass { cfg, first_row, rows, chunks }
    })
}
