//! The fused classifier: output projection, softmax cross-entropy and (optionally) its backward,
//! one chunk of rows at a time so the full `(N, V)` logits never exist.

use rayon::prelude::*;

use super::mathfn::{exp_shifted, max};
use super::matmul::matmul;

/// Rows of logits alive at once.
const ROWS: usize = 256;

/// f32 elements of the chunk of logits for `n` rows over `v` classes (`scratch` of
/// [`classifier`]).
pub fn scratch_len(n: usize, v: usize) -> usize {
    ROWS.min(n) * v
}

/// x: (N, C), w: (V, C), targets: (N). Returns per-token losses; with grads writes dx and
/// accumulates dw for `dloss · mean loss`. The logits of a chunk of rows live in `scratch`
/// (at least [`scratch_len`]).
#[allow(clippy::too_many_arguments)]
pub fn classifier(x: &[f32], w: &[f32], targets: &[u32], n: usize, c: usize, v: usize, mut grads: Option<(&mut [f32], &mut [f32], f32)>, scratch: &mut [f32], threads: usize) -> Vec<f32> {
    let mut losses = vec![0f32; n];
    assert!(scratch.len() >= scratch_len(n, v), "classifier: scratch of {} elements, {n} rows of {v} need {}", scratch.len(), scratch_len(n, v));
    let logits = scratch;
    for r0 in (0..n).step_by(ROWS) {
        let rows = ROWS.min(n - r0);
        let xs = &x[r0 * c..(r0 + rows) * c];
        let lg = &mut logits[..rows * v];
        matmul(lg, xs, w, rows, c, v, false, true, false, threads);
        let grad_scale = grads.as_ref().map(|g| g.2 / n as f32);
        lg.par_chunks_mut(v).zip(losses[r0..r0 + rows].par_iter_mut()).zip(&targets[r0..r0 + rows]).for_each(|((z, loss), &t)| {
            let max = max(z);
            let target = z[t as usize];
            match grad_scale {
                None => {
                    let sum = exp_shifted(z, max, false);
                    *loss = max + sum.ln() - target;
                }
                Some(gs) => {
                    // One exp per logit: keep e^(z − max), then scale it into the gradient.
                    let sum = exp_shifted(z, max, true);
                    *loss = max + sum.ln() - target;
                    let k = gs / sum;
                    z.iter_mut().for_each(|a| *a *= k);
                    z[t as usize] -= gs;
                }
            }
        });
        if let Some((dx, dw, _)) = grads.as_mut() {
            matmul(&mut dx[r0 * c..(r0 + rows) * c], lg, w, rows, v, c, false, false, false, threads);
            matmul(dw, lg, xs, v, rows, c, true, false, true, threads);
        }
    }
    losses
}
