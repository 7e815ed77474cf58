//! Matrix multiply on the `gemm` crate. gemm splits only the output across threads and walks
//! the shared dimension in an order fixed by the shapes, so results do not depend on threads.

use gemm::{gemm, Parallelism};

/// A strided matrix operand: element (i, j) lives at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub struct Strided {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

impl Strided {
    /// Row-major with row stride `ld`, transposed when `t`.
    pub fn rows(s: &[f32], ld: usize, t: bool) -> Self {
        let (rs, cs) = if t { (1, ld as isize) } else { (ld as isize, 1) };
        Strided { ptr: s.as_ptr(), rs, cs }
    }
}

/// `dst (m×n, row stride ld_dst) [+]= scale · a (m×k) · b (k×n)` on one thread (or `threads`).
///
/// # Safety
/// Every element the strides address must lie inside live allocations, and `dst` must not
/// alias `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_strided(m: usize, n: usize, k: usize, dst: *mut f32, ld_dst: usize, accumulate: bool, a: Strided, b: Strided, scale: f32, threads: usize) {
    if m == 0 || n == 0 {
        return;
    }
    let parallelism = if threads > 1 { Parallelism::Rayon(threads) } else { Parallelism::None };
    gemm(m, n, k, dst, 1, ld_dst as isize, accumulate, a.ptr, a.cs, a.rs, b.ptr, b.cs, b.rs, 1.0, scale, false, false, false, parallelism);
}

/// `out (m×n) [+]= op(a) · op(b)` with row-major storage; `op(a)` is `m×k`, `op(b)` is `k×n`.
#[allow(clippy::too_many_arguments)]
pub fn matmul(out: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize, ta: bool, tb: bool, accumulate: bool, threads: usize) {
    assert_eq!(out.len(), m * n, "matmul out");
    assert_eq!(a.len(), m * k, "matmul a");
    assert_eq!(b.len(), k * n, "matmul b");
    if k == 0 {
        if !accumulate {
            out.fill(0.0);
        }
        return;
    }
    let a = Strided::rows(a, if ta { m } else { k }, ta);
    let b = Strided::rows(b, if tb { k } else { n }, tb);
    // SAFETY: the asserts above bound every index gemm touches by the slice lengths.
    unsafe { gemm_strided(m, n, k, out.as_mut_ptr(), n, accumulate, a, b, 1.0, threads) }
}
#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, ta: bool, tb: bool) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    let x = if ta { a[p * m + i] } else { a[i * k + p] };
                    let y = if tb { b[j * k + p] } else { b[p * n + j] };
                    s += x as f64 * y as f64;
                }
                out[i * n + j] = s as f32;
            }
        }
        out
    }

    #[test]
    fn matches_naive_for_all_transposes_and_accumulates() {
        let (m, k, n) = (37, 53, 29);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 5.0).collect();
        for ta in [false, true] {
            for tb in [false, true] {
                let want = naive(&a, &b, m, k, n, ta, tb);
                let mut out = vec![1.0; m * n];
                matmul(&mut out, &a, &b, m, k, n, ta, tb, true, 2);
                for (o, w) in out.iter().zip(&want) {
                    assert!((o - (w + 1.0)).abs() < 1e-4, "{o} vs {}", w + 1.0);
                }
            }
        }
    }
}
