//! Weighted k-means (k-means++ init, Lloyd iterations) and the k-means codebook baseline.
//!
//! The same routine clusters scalars (weights into codewords) and short vectors (per-row
//! statistics into row groups). Determinism: the seed fixes the init; the assignment step is
//! parallel but per point; the update step sums fixed-size chunks in parallel and combines the
//! chunk sums in chunk order, so results are identical for any thread count.

use super::bits;
use super::format::{CodebookDtype, CompressedMatrix, Method, RowGroup, RowOrder};
use super::matrix::Matrix;
use crate::rng::Rng;
use crate::{Error, Result};
use rayon::prelude::*;

/// Points per chunk of the parallel update step.
const CHUNK: usize = 4096;
/// k-means++ seeding looks at most this many points (drawn with the seeded PRNG): seeding is
/// O(points · k) and a sample of this size already places 256 seeds well.
const INIT_SAMPLE: usize = 16_384;

#[derive(Clone, Debug)]
pub struct KMeansConfig {
    /// Number of clusters (≥ 1).
    pub k: usize,
    /// Maximum Lloyd iterations; stops earlier when no assignment changes.
    pub iters: usize,
    pub seed: u64,
}

#[derive(Clone, Debug)]
pub struct KMeans {
    pub dim: usize,
    /// `k × dim`, row-major. For `dim == 1` sorted ascending.
    pub centroids: Vec<f32>,
    pub assignments: Vec<u32>,
    /// Weighted sum of squared distances to the assigned centroid.
    pub inertia: f64,
}

/// Clusters `points` (`n × dim`, row-major) into `cfg.k` clusters, each point weighted by
/// `weights[i]` (all 1 when `None`). Empty clusters keep their previous centroid.
pub fn kmeans(points: &[f32], dim: usize, weights: Option<&[f32]>, cfg: &KMeansConfig) -> Result<KMeans> {
    if dim == 0 || points.is_empty() || !points.len().is_multiple_of(dim) {
        return Err(Error::Invalid(format!("k-means needs a non-empty n × {dim} point array, got {} values", points.len())));
    }
    let n = points.len() / dim;
    if cfg.k == 0 || cfg.k > u32::MAX as usize {
        return Err(Error::config("k", cfg.k, "at least 1 cluster"));
    }
    if let Some(w) = weights {
        if w.len() != n || w.iter().any(|v| !(v.is_finite() && *v >= 0.0)) {
            return Err(Error::Invalid(format!("k-means weights: need {n} finite non-negative values")));
        }
    }
    let weight = |i: usize| weights.map_or(1.0, |w| w[i] as f64);
    let mut centroids = seed_plus_plus(points, dim, &weight, cfg.k, cfg.seed);
    if dim == 1 {
        centroids.sort_by(f32::total_cmp);
    }
    let mut assignments = assign(points, dim, &centroids);
    for _ in 0..cfg.iters {
        update(points, dim, &weight, &assignments, &mut centroids);
        if dim == 1 {
            // Keeps the 1-D fast assignment valid; the relabeling is undone by reassigning.
            centroids.sort_by(f32::total_cmp);
        }
        let next = assign(points, dim, &centroids);
        let changed = next != assignments;
        assignments = next;
        if !changed {
            break;
        }
    }
    let inertia = (0..n).map(|i| weight(i) * dist2(&points[i * dim..(i + 1) * dim], centroid(&centroids, dim, assignments[i]))).sum();
    Ok(KMeans { dim, centroids, assignments, inertia })
}

fn centroid(c: &[f32], dim: usize, k: u32) -> &[f32] {
    &c[k as usize * dim..(k as usize + 1) * dim]
}

fn dist2(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum()
}

/// k-means++ on a seeded sample: first seed ∝ weight, then ∝ weight · D².
fn seed_plus_plus(points: &[f32], dim: usize, weight: &dyn Fn(usize) -> f64, k: usize, seed: u64) -> Vec<f32> {
    let n = points.len() / dim;
    let mut rng = Rng::new(seed);
    let sample: Vec<usize> = if n <= INIT_SAMPLE { (0..n).collect() } else { (0..INIT_SAMPLE).map(|_| rng.below(n)).collect() };
    let point = |i: usize| &points[i * dim..(i + 1) * dim];
    let pick = |scores: &[f64], rng: &mut Rng| -> usize {
        let total: f64 = scores.iter().sum();
        if total.is_nan() || total <= 0.0 {
            return rng.below(scores.len());
        }
        let mut target = rng.uniform() * total;
        for (i, s) in scores.iter().enumerate() {
            if target < *s {
                return i;
            }
            target -= s;
        }
        scores.iter().rposition(|s| *s > 0.0).unwrap_or(0)
    };
    let w: Vec<f64> = sample.iter().map(|&i| weight(i)).collect();
    let first = sample[pick(&w, &mut rng)];
    let mut centroids = point(first).to_vec();
    let mut d2: Vec<f64> = sample.iter().map(|&i| dist2(point(i), point(first))).collect();
    while centroids.len() < k * dim {
        let scores: Vec<f64> = d2.iter().zip(&w).map(|(d, w)| d * w).collect();
        let next = sample[pick(&scores, &mut rng)];
        centroids.extend_from_slice(point(next));
        for (d, &i) in d2.iter_mut().zip(&sample) {
            *d = d.min(dist2(point(i), point(next)));
        }
    }
    centroids
}

/// Nearest centroid per point (ties to the lower index). 1-D uses binary search on sorted
/// centroids, so assigning a large matrix to 256 codewords is O(n log k), not O(n k).
fn assign(points: &[f32], dim: usize, centroids: &[f32]) -> Vec<u32> {
    let k = centroids.len() / dim;
    if dim == 1 {
        return points.par_iter().map(|&v| nearest_sorted(centroids, v) as u32).collect();
    }
    points
        .par_chunks(dim)
        .map(|p| {
            (0..k as u32)
                .map(|c| (c, dist2(p, centroid(centroids, dim, c))))
                .fold((0u32, f64::INFINITY), |best, cur| if cur.1 < best.1 { cur } else { best })
                .0
        })
        .collect()
}

/// Index of the entry of the ascending `sorted` closest to `v` (ties to the lower index).
pub(crate) fn nearest_sorted(sorted: &[f32], v: f32) -> usize {
    let hi = sorted.partition_point(|&c| c < v);
    if hi == 0 {
        return 0;
    }
    if hi == sorted.len() {
        return hi - 1;
    }
    if v - sorted[hi - 1] <= sorted[hi] - v { hi - 1 } else { hi }
}

fn update(points: &[f32], dim: usize, weight: &(dyn Fn(usize) -> f64 + Sync), assignments: &[u32], centroids: &mut [f32]) {
    let k = centroids.len() / dim;
    let partial: Vec<(Vec<f64>, Vec<f64>)> = points
        .par_chunks(CHUNK * dim)
        .enumerate()
        .map(|(chunk, ps)| {
            let (mut sum, mut mass) = (vec![0.0f64; k * dim], vec![0.0f64; k]);
            for (j, p) in ps.chunks(dim).enumerate() {
                let i = chunk * CHUNK + j;
                let (c, w) = (assignments[i] as usize, weight(i));
                mass[c] += w;
                for (s, &x) in sum[c * dim..(c + 1) * dim].iter_mut().zip(p) {
                    *s += w * x as f64;
                }
            }
            (sum, mass)
        })
        .collect();
    let (mut sum, mut mass) = (vec![0.0f64; k * dim], vec![0.0f64; k]);
    for (s, m) in &partial {
        sum.iter_mut().zip(s).for_each(|(a, b)| *a += b);
        mass.iter_mut().zip(m).for_each(|(a, b)| *a += b);
    }
    for c in 0..k {
        if mass[c] > 0.0 {
            for d in 0..dim {
                centroids[c * dim + d] = (sum[c * dim + d] / mass[c]) as f32;
            }
        }
    }
}

/// Configuration of the k-means codebook baseline.
#[derive(Clone, Debug)]
pub struct KMeansQuantConfig {
    /// Average index bits per weight (fractional values mix two widths, see [`bits`]).
    pub bits: f32,
    /// Contiguous row blocks, each with its own codebook (1 = one codebook for the matrix).
    pub row_groups: usize,
    pub iters: usize,
    pub seed: u64,
    pub codebook_dtype: CodebookDtype,
}

/// The baseline: plain (unweighted, data-free) k-means codebooks over contiguous row blocks.
/// With a fractional width, blocks whose squared weight error drops most from the extra bit get it.
pub fn quantize_kmeans(w: &Matrix, cfg: &KMeansQuantConfig) -> Result<CompressedMatrix> {
    let (lo, hi) = bits::bit_range(cfg.bits)?;
    if cfg.row_groups == 0 || cfg.row_groups > w.rows {
        return Err(Error::config("row_groups", cfg.row_groups, format!("between 1 and the row count {}", w.rows)));
    }
    let block_rows: Vec<usize> = (0..cfg.row_groups)
        .map(|g| (g + 1) * w.rows / cfg.row_groups - g * w.rows / cfg.row_groups)
        .collect();
    let mut start = 0;
    let mut fits = Vec::with_capacity(cfg.row_groups);
    for (g, &rows) in block_rows.iter().enumerate() {
        let values = &w.data[start * w.cols..(start + rows) * w.cols];
        let fit = |b: u8| kmeans(values, 1, None, &KMeansConfig { k: 1 << b, iters: cfg.iters, seed: cfg.seed ^ g as u64 });
        let low = fit(lo)?;
        let high = if hi > lo { Some(fit(hi)?) } else { None };
        fits.push((low, high));
        start += rows;
    }
    let sizes: Vec<usize> = block_rows.iter().map(|r| r * w.cols).collect();
    let gains: Vec<f64> = fits.iter().map(|(l, h)| h.as_ref().map_or(0.0, |h| l.inertia - h.inertia)).collect();
    let widths = bits::allocate(&sizes, &gains, cfg.bits)?;
    let (mut groups, mut codebooks, mut indices) = (Vec::new(), Vec::new(), Vec::with_capacity(w.data.len()));
    for (g, ((low, high), &b)) in fits.into_iter().zip(&widths).enumerate() {
        let fit = if b == lo { low } else { high.unwrap_or(low) };
        codebooks.push(fit.centroids.iter().map(|&c| cfg.codebook_dtype.round(c)).collect());
        indices.extend(fit.assignments.iter().map(|&a| a as u8));
        groups.push(RowGroup { rows: block_rows[g], bits: b, codebook: g, scale: 1.0, zero: 0.0 });
    }
    CompressedMatrix::new(w.rows, w.cols, Method::Kmeans, groups, codebooks, cfg.codebook_dtype, indices, RowOrder::Original)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_well_separated_clusters_and_is_deterministic() {
        let mut rng = Rng::new(5);
        let centers = [-3.0f32, 0.0, 4.0];
        let pts: Vec<f32> = (0..3000).map(|i| centers[i % 3] + 0.1 * rng.normal() as f32).collect();
        let cfg = KMeansConfig { k: 3, iters: 50, seed: 1 };
        let a = kmeans(&pts, 1, None, &cfg).unwrap();
        for (c, want) in a.centroids.iter().zip(centers) {
            assert!((c - want).abs() < 0.02, "centroid {c} vs {want}");
        }
        let b = kmeans(&pts, 1, None, &cfg).unwrap();
        assert_eq!((a.centroids, a.assignments), (b.centroids, b.assignments));
    }

    #[test]
    fn weights_pull_centroids_and_vectors_work() {
        // One cluster over {0, 1}: weights 3:1 put the centroid at 0.25.
        let a = kmeans(&[0.0, 1.0], 1, Some(&[3.0, 1.0]), &KMeansConfig { k: 1, iters: 5, seed: 0 }).unwrap();
        assert!((a.centroids[0] - 0.25).abs() < 1e-6);
        let pts = [0.0, 0.0, 0.1, 0.0, 5.0, 5.0, 5.1, 5.0];
        let v = kmeans(&pts, 2, None, &KMeansConfig { k: 2, iters: 10, seed: 2 }).unwrap();
        assert_eq!(v.assignments[0], v.assignments[1]);
        assert_eq!(v.assignments[2], v.assignments[3]);
        assert_ne!(v.assignments[0], v.assignments[2]);
        assert!(kmeans(&pts, 3, None, &KMeansConfig { k: 2, iters: 1, seed: 0 }).is_err());
    }

    #[test]
    fn nearest_sorted_matches_brute_force() {
        let c = [-1.0f32, -0.2, 0.3, 2.0];
        for v in [-5.0f32, -0.6, -0.2, 0.05, 0.06, 1.15, 1.2, 9.0] {
            let brute = (0..4).min_by(|&a, &b| (c[a] - v).abs().total_cmp(&(c[b] - v).abs())).unwrap();
            assert_eq!(nearest_sorted(&c, v), brute, "v = {v}");
        }
    }
}
