//! The two inputs every compressor shares: a dense row-major weight matrix and the input Hessian.

use crate::{Error, Result};
use rayon::prelude::*;

/// A dense row-major f32 matrix. For a linear layer `y = W x`, `rows` = outputs, `cols` = inputs;
/// calibration inputs are stored the same way, one sample per row (`n × cols`).
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    /// Checks that `data` holds exactly `rows * cols` finite values, so later code never has to.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Result<Self> {
        if rows == 0 || cols == 0 {
            return Err(Error::Invalid(format!("matrix shape {rows}×{cols} has no elements")));
        }
        if rows.checked_mul(cols) != Some(data.len()) {
            return Err(Error::Invalid(format!(
                "matrix shape {rows}×{cols} needs {} values, got {}",
                rows.saturating_mul(cols),
                data.len()
            )));
        }
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(Error::Invalid(format!(
                "matrix value at row {}, col {} is not finite ({})",
                i / cols,
                i % cols,
                data[i]
            )));
        }
        Ok(Matrix { rows, cols, data })
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    /// The matrix with its rows reordered: row `i` of the result is row `order[i]` of `self`.
    pub(crate) fn permute_rows(&self, order: &[usize]) -> Matrix {
        let data = order.iter().flat_map(|&r| self.row(r).iter().copied()).collect();
        Matrix { rows: self.rows, cols: self.cols, data }
    }
}

/// `H = XᵀX / n + λ·mean(diag)·I` for calibration inputs `X` (`n × cols`), in f64.
///
/// Why: for a row `w` of `W`, `‖X(w − ŵ)‖² / n = (w − ŵ)ᵀ H (w − ŵ)`, so the layer-output error of
/// any candidate `Ŵ` is computed in `O(cols²)` per row without touching `X` again. The tiny
/// damping (`λ = 1e-6`) keeps `H` positive definite when some input channel is always zero or
/// `n < cols`; it changes the objective by a negligible amount and is ignored by
/// [`relative_output_error`](super::eval::relative_output_error), which uses `X` directly.
#[derive(Clone, Debug)]
pub struct Hessian {
    pub cols: usize,
    /// Row-major `cols × cols`, symmetric.
    pub data: Vec<f64>,
}

impl Hessian {
    const DAMPING: f64 = 1e-6;

    pub fn from_inputs(x: &Matrix) -> Result<Hessian> {
        let (n, d) = (x.rows, x.cols);
        let mut data = vec![0.0f64; d * d];
        // Row i of H only needs column i of X against all columns: independent, so parallel and
        // deterministic (each row's sum runs over samples in order).
        data.par_chunks_mut(d).enumerate().for_each(|(i, out)| {
            for s in 0..n {
                let xs = x.row(s);
                let xi = xs[i] as f64;
                if xi != 0.0 {
                    for (o, &xj) in out.iter_mut().zip(xs) {
                        *o += xi * xj as f64;
                    }
                }
            }
            out.iter_mut().for_each(|o| *o /= n as f64);
        });
        let mean_diag = (0..d).map(|i| data[i * d + i]).sum::<f64>() / d as f64;
        if mean_diag.is_nan() || mean_diag <= 0.0 {
            return Err(Error::Invalid("calibration inputs are all zero: cannot weigh the output error".into()));
        }
        for i in 0..d {
            data[i * d + i] += Self::DAMPING * mean_diag;
        }
        Ok(Hessian { cols: d, data })
    }

    pub fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    pub fn diag(&self, i: usize) -> f64 {
        self.data[i * self.cols + i]
    }

    /// `H e`.
    pub(crate) fn mul(&self, e: &[f64]) -> Vec<f64> {
        (0..self.cols).map(|i| self.row(i).iter().zip(e).map(|(h, v)| h * v).sum()).collect()
    }

    /// `eᵀ H e`: the output error contributed by one row's weight error `e`.
    pub(crate) fn quad(&self, e: &[f64]) -> f64 {
        self.mul(e).iter().zip(e).map(|(a, b)| a * b).sum()
    }

    pub(crate) fn check_cols(&self, w: &Matrix) -> Result<()> {
        if self.cols != w.cols {
            return Err(Error::Invalid(format!(
                "calibration inputs have {} features but the weight matrix has {} columns",
                self.cols, w.cols
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_shapes_and_non_finite_values() {
        assert!(Matrix::new(2, 2, vec![0.0; 3]).is_err());
        assert!(Matrix::new(0, 2, vec![]).is_err());
        let e = Matrix::new(1, 2, vec![0.0, f32::NAN]).unwrap_err().to_string();
        assert!(e.contains("col 1"), "{e}");
    }

    #[test]
    fn hessian_quadratic_form_equals_output_error() {
        let x = Matrix::new(3, 2, vec![1.0, 2.0, -1.0, 0.5, 3.0, 1.0]).unwrap();
        let h = Hessian::from_inputs(&x).unwrap();
        let e = [0.3f64, -0.7];
        let direct: f64 = (0..3).map(|s| (x.row(s)[0] as f64 * e[0] + x.row(s)[1] as f64 * e[1]).powi(2)).sum::<f64>() / 3.0;
        assert!((h.quad(&e) - direct).abs() < 1e-5 * direct, "{} vs {direct}", h.quad(&e));
    }
}
