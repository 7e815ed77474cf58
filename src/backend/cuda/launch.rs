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

/// `rmsnorm_dw_partial` over `n` rows of width `c`: one block per (chunk of `ROW_CHUNK` rows,
/// `THREADS` columns); also returns the number of chunks (`rmsnorm_dw_reduce` sums them over
/// `grid_stride(c)`).
pub fn rmsnorm_dw_partial(n: usize, c: usize) -> (LaunchConfig, usize) {
    let chunks = n.div_ceil(ROW_CHUNK);
    let col_blocks = c.div_ceil(THREADS as usize) as u32;
    (LaunchConfig { grid_dim: (chunks as u32, col_blocks, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }, chunks)
}
