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

/// Fewest rows a row-stable call hands to gemm with `n` output columns.
///
/// Why: gemm 0.19 picks its kernel from the shape. Row-major outputs are transposed internally,
/// so our rows become gemm's columns, and three shape-dependent choices change how a dot product
/// over `k` is summed: `m·n ≤ 256` takes the horizontal kernels (lane-wise partial sums), `m = 1`
/// takes gemv, and `m ≤ 64 ∧ n ≤ 64` caps the depth block at 512 instead of the cache-derived
/// one. Above all three thresholds every output element is one FMA chain per depth block whose
/// blocking depends on `k` only, so a row's bits no longer depend on `m` or on where the row sits.
/// `tests::row_results_do_not_depend_on_m` holds gemm to that.
fn row_stable_min_rows(n: usize) -> usize {
    let small_block = if n <= 64 { 65 } else { 2 };
    small_block.max(256 / n.max(1) + 1)
}

/// `out (m×n) [+]= op(a) · op(b)` with row-major storage; `op(a)` is `m×k`, `op(b)` is `k×n`.
///
/// When `a` is not transposed, each output row is a function of its own row of `a` (and of `b`,
/// `k`, `n`) bit for bit, whatever `m`: a subset of rows recomputed later (MEMO's token-wise
/// recompute, expert slots of a token range) reproduces the full call exactly. Calls with fewer
/// rows than [`row_stable_min_rows`] run on a zero-padded copy so gemm takes the same kernel.
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
    let min_rows = row_stable_min_rows(n);
    if !ta && m > 0 && m < min_rows {
        let mut pa = vec![0f32; min_rows * k];
        pa[..m * k].copy_from_slice(a);
        let mut pout = vec![0f32; min_rows * n];
        if accumulate {
            pout[..m * n].copy_from_slice(out);
        }
        matmul(&mut pout, &pa, b, min_rows, k, n, false, tb, accumulate, threads);
        out.copy_from_slice(&pout[..m * n]);
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

    /// Rows of a non-transposed call must come out bitwise equal whether computed in the full
    /// call or in any contiguous subset (any offset, any length down to one row), for plain and
    /// accumulating calls, across the shapes that select different gemm kernels.
    #[test]
    fn row_results_do_not_depend_on_m() {
        let mut rng = crate::rng::Rng::new(17);
        let shapes = [(32, 64), (32, 4), (32, 2), (32, 1), (40, 16), (2, 32), (600, 8), (1100, 40), (128, 200), (368, 128)];
        for (si, &(k, n)) in shapes.iter().enumerate() {
            for tb in [false, true] {
                let m = 300;
                let a: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
                let b: Vec<f32> = (0..k * n).map(|_| rng.normal() as f32).collect();
                let init: Vec<f32> = (0..m * n).map(|_| rng.normal() as f32).collect();
                for accumulate in [false, true] {
                    let mut full = init.clone();
                    matmul(&mut full, &a, &b, m, k, n, false, tb, accumulate, 2);
                    for len in [1, 2, 3, 5, 8, 17, 33, 64, 65, 100, 129, 257, 299] {
                        for off in [0, 1, 7, m - len].into_iter().filter(|&o| o + len <= m) {
                            let mut part = init[off * n..(off + len) * n].to_vec();
                            matmul(&mut part, &a[off * k..(off + len) * k], &b, len, k, n, false, tb, accumulate, 1 + si % 2);
                            let same = part.iter().zip(&full[off * n..]).all(|(x, y)| x.to_bits() == y.to_bits());
                            assert!(same, "k {k} n {n} tb {tb} acc {accumulate}: rows {off}..{} differ from the full call", off + len);
                        }
                    }
                }
            }
        }
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
