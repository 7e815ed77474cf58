//! Row-wise softmax (router probabilities); its backward is part of the router's (`router.rs`).

use rayon::prelude::*;

pub fn forward(out: &mut [f32], logits: &[f32], rows: usize, cols: usize) {
    debug_assert_eq!(logits.len(), rows * cols);
    out.par_chunks_mut(cols).zip(logits.par_chunks(cols)).for_each(|(p, z)| {
        let max = z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut sum = 0.0;
        for (p, &z) in p.iter_mut().zip(z) {
            *p = (z - max).exp();
            sum += *p;
        }
        let inv = 1.0 / sum;
        p.iter_mut().for_each(|p| *p *= inv);
    });
}
