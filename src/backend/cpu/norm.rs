//! RMSNorm: `y = x · rstd · w`, `rstd = 1/sqrt(mean(x²) + eps)`.

use rayon::prelude::*;

use super::ROW_CHUNK;

/// x, out: (N, C); w: (C); rstd: (N) saved for the backward.
pub fn forward(out: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], n: usize, c: usize, eps: f32) {
    debug_assert_eq!(x.len(), n * c);
    out.par_chunks_mut(c).zip(rstd.par_iter_mut()).zip(x.par_chunks(c)).for_each(|((o, r), x)| {
        let ms = x.iter().map(|v| v * v).sum::<f32>() / c as f32;
        let s = 1.0 / (ms + eps).sqrt();
        *r = s;
        o.iter_mut().zip(x.iter().zip(w)).for_each(|(o, (x, w))| *o = x * s * w);
    });
}

/// dx = residual + ∂/∂x (0 + ∂/∂x without one); dw += Σ_rows dout · x · rstd (per fixed row
/// chunk, chunks summed in order).
#[allow(clippy::too_many_arguments)]
pub fn backward(dx: &mut [f32], dw: &mut [f32], dout: &[f32], x: &[f32], w: &[f32], rstd: &[f32], residual: Option<&[f32]>, n: usize, c: usize) {
    debug_assert_eq!(dout.len(), n * c);
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(ROW_CHUNK * c)
        .enumerate()
        .map(|(chunk, dx)| {
            let mut dw_part = vec![0.0f32; c];
            for (r, dx) in dx.chunks_mut(c).enumerate() {
                let row = chunk * ROW_CHUNK + r;
                let (dy, x, s) = (&dout[row * c..(row + 1) * c], &x[row * c..(row + 1) * c], rstd[row]);
                let r = residual.map(|r| &r[row * c..(row + 1) * c]);
                // ∂y_j/∂x_i = s·w_j·δ_ij − s³·x_i·x_j·w_j / C
                let dot: f32 = dy.iter().zip(w).zip(x).map(|((dy, w), x)| dy * w * x).sum();
                let k = s * s * s * dot / c as f32;
                for i in 0..c {
                    dx[i] = r.map_or(0.0, |r| r[i]) + (s * w[i] * dy[i] - k * x[i]);
                    dw_part[i] += dy[i] * x[i] * s;
                }
            }
            dw_part
        })
        .collect();
    for p in partials {
        dw.iter_mut().zip(&p).for_each(|(d, p)| *d += p);
    }
}
