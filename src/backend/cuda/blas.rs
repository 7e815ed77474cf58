//! Row-major matmuls on cuBLASLt (column-major underneath).
//!
//! A row-major `m×n` matrix is the column-major `n×m` transpose, so `out = op(a)·op(b)` is
//! computed as `outᵀ = op(b)ᵀ·op(a)ᵀ`: swap the operands and their transpose flags.
//! f32 operands run on TF32 tensor cores (cudarc's `Matmul<f32>` uses
//! `CUBLAS_COMPUTE_32F_FAST_TF32`).

use cudarc::cublaslt::{CudaBlasLT, Matmul, MatmulConfig};
use cudarc::driver::{CudaView, CudaViewMut};

/// `out (m×n) [+]= op(a) (m×k) · op(b) (k×n)`, all row-major and dense.
#[allow(clippy::too_many_arguments)]
pub fn matmul(lt: &CudaBlasLT, out: &mut CudaViewMut<'_, f32>, a: &CudaView<'_, f32>, b: &CudaView<'_, f32>, m: usize, k: usize, n: usize, ta: bool, tb: bool, accumulate: bool) {
    assert_eq!(out.len(), m * n, "matmul out");
    assert_eq!(a.len(), m * k, "matmul a");
    assert_eq!(b.len(), k * n, "matmul b");
    let cfg = MatmulConfig {
        transa: tb,
        transb: ta,
        transc: false,
        m: n as u64,
        n: m as u64,
        k: k as u64,
        alpha: 1.0,
        lda: if tb { k } else { n } as i64,
        ldb: if ta { m } else { k } as i64,
        beta: if accumulate { 1.0 } else { 0.0 },
        ldc: n as i64,
        stride_a: None,
        stride_b: None,
        stride_c: None,
        stride_bias: None,
        batch_size: None,
    };
    // SAFETY: the asserts bound every element cuBLASLt addresses by the views' lengths.
    unsafe { lt.matmul(cfg, b, a, out, None, None) }.unwrap_or_else(|e| panic!("cuBLASLt matmul {m}×{k}×{n} failed: {e:?}"));
}
