//! How good is a compressed matrix: the relative layer-output error on calibration inputs.

use super::matrix::Matrix;
use crate::{Error, Result};
use rayon::prelude::*;

/// `‖X Wᵀ − X Ŵᵀ‖²_F / ‖X Wᵀ‖²_F` for calibration inputs `X` (`n × cols`).
///
/// Computed from `X` directly (not through the Hessian the compressors optimise) so it is an
/// independent check of their bookkeeping. Parallel over samples; per-sample sums are collected
/// in order, so the result does not depend on the thread count.
pub fn relative_output_error(w: &Matrix, w_hat: &Matrix, x: &Matrix) -> Result<f64> {
    if (w.rows, w.cols) != (w_hat.rows, w_hat.cols) {
        return Err(Error::Invalid(format!(
            "compressed matrix is {}×{} but the original is {}×{}",
            w_hat.rows, w_hat.cols, w.rows, w.cols
        )));
    }
    if x.cols != w.cols {
        return Err(Error::Invalid(format!(
            "calibration inputs have {} features but the weight matrix has {} columns",
            x.cols, w.cols
        )));
    }
    let per_sample: Vec<(f64, f64)> = (0..x.rows)
        .into_par_iter()
        .map(|s| {
            let xs = x.row(s);
            let (mut err, mut norm) = (0.0f64, 0.0f64);
            for r in 0..w.rows {
                let (mut y, mut y_hat) = (0.0f64, 0.0f64);
                for ((&xi, &a), &b) in xs.iter().zip(w.row(r)).zip(w_hat.row(r)) {
                    y += xi as f64 * a as f64;
                    y_hat += xi as f64 * b as f64;
                }
                err += (y - y_hat).powi(2);
                norm += y * y;
            }
            (err, norm)
        })
        .collect();
    let (err, norm) = per_sample.iter().fold((0.0, 0.0), |(e, n), (a, b)| (e + a, n + b));
    if norm == 0.0 {
        return Err(Error::Invalid("the layer output is zero on the calibration inputs; relative error undefined".into()));
    }
    Ok(err / norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_for_identical_and_known_value_for_a_simple_case() {
        let w = Matrix::new(1, 2, vec![1.0, 0.0]).unwrap();
        let x = Matrix::new(2, 2, vec![1.0, 0.0, 0.0, 1.0]).unwrap();
        assert_eq!(relative_output_error(&w, &w, &x).unwrap(), 0.0);
        let w_hat = Matrix::new(1, 2, vec![0.5, 0.5]).unwrap();
        // outputs (1, 0) vs (0.5, 0.5): error 0.5, norm 1.
        assert!((relative_output_error(&w, &w_hat, &x).unwrap() - 0.5).abs() < 1e-12);
        assert!(relative_output_error(&w, &Matrix::new(2, 1, vec![0.0; 2]).unwrap(), &x).is_err());
    }
}
