//! Synthetic layers for tests and benchmarks: rows from distinct distributions, correlated inputs.
//!
//! Real LLM layers have (a) output rows whose weight distributions differ in scale and shape and
//! (b) input features that are correlated and have a few high-variance channels. Both matter for
//! JLCM: (a) is what row grouping exploits, (b) is what makes the output-aware objective differ
//! from plain weight-space k-means.

use super::matrix::Matrix;
use crate::rng::Rng;
use crate::Result;

/// The row families of [`clustered_rows`].
pub const ROW_FAMILIES: usize = 3;

/// A `rows × cols` matrix whose rows come from [`ROW_FAMILIES`] distributions (Gaussian σ=0.02,
/// Laplace scale 0.05, uniform on [0.01, 0.09] with random sign), assigned round-robin and then
/// shuffled. Returns the matrix and each row's family.
pub fn clustered_rows(rows: usize, cols: usize, seed: u64) -> Result<(Matrix, Vec<usize>)> {
    let mut rng = Rng::new(seed);
    let mut family: Vec<usize> = (0..rows).map(|r| r % ROW_FAMILIES).collect();
    for i in (1..rows).rev() {
        family.swap(i, rng.below(i + 1));
    }
    let mut data = Vec::with_capacity(rows * cols);
    for &f in &family {
        for _ in 0..cols {
            let v = match f {
                0 => 0.02 * rng.normal(),
                1 => {
                    let u = rng.uniform() - 0.5;
                    -0.05 * u.signum() * (1.0 - 2.0 * u.abs()).max(1e-12).ln()
                }
                _ => {
                    let sign = if rng.uniform() < 0.5 { -1.0 } else { 1.0 };
                    sign * (0.01 + 0.08 * rng.uniform())
                }
            };
            data.push(v as f32);
        }
    }
    Ok((Matrix::new(rows, cols, data)?, family))
}

/// `n × cols` inputs with AR(1) correlation `rho` between neighbouring features and every 16th
/// feature scaled by 8 (outlier channels).
pub fn correlated_inputs(n: usize, cols: usize, rho: f64, seed: u64) -> Result<Matrix> {
    let mut rng = Rng::new(seed);
    let innovation = (1.0 - rho * rho).sqrt();
    let mut data = Vec::with_capacity(n * cols);
    for _ in 0..n {
        let mut prev = rng.normal();
        for j in 0..cols {
            let scale = if j % 16 == 0 { 8.0 } else { 1.0 };
            data.push((prev * scale) as f32);
            prev = rho * prev + innovation * rng.normal();
        }
    }
    Matrix::new(n, cols, data)
}
