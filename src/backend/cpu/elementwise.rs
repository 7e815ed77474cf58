//! Elementwise ops and the deterministic sum of squares.

use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

pub fn add_assign(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len());
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| {
        d.iter_mut().zip(s).for_each(|(d, s)| *d += s);
    });
}

pub fn add(out: &mut [f32], a: &[f32], b: &[f32]) {
    assert!(out.len() == a.len() && a.len() == b.len());
    out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK))).for_each(|(o, (a, b))| {
        o.iter_mut().zip(a.iter().zip(b)).for_each(|(o, (a, b))| *o = a + b);
    });
}

pub fn scale(dst: &mut [f32], s: f32) {
    dst.par_chunks_mut(CHUNK).for_each(|d| d.iter_mut().for_each(|x| *x *= s));
}

/// Partial sums over fixed chunks, added in chunk order.
pub fn sum_squares(x: &[f32]) -> f64 {
    let partials: Vec<f64> = x.par_chunks(CHUNK).map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum()).collect();
    partials.iter().sum()
}
