//! AdamW with decoupled weight decay.

use rayon::prelude::*;

use crate::backend::AdamW;

const CHUNK: usize = 1 << 14;

pub fn adamw(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], hp: AdamW, grad_scale: f32, decay: bool) {
    let bc1 = 1.0 - hp.beta1.powi(hp.step as i32);
    let bc2 = 1.0 - hp.beta2.powi(hp.step as i32);
    let wd = if decay { hp.weight_decay } else { 0.0 };
    p.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|(((p, m), v), g)| {
            for i in 0..p.len() {
                let gi = g[i] * grad_scale;
                m[i] = hp.beta1 * m[i] + (1.0 - hp.beta1) * gi;
                v[i] = hp.beta2 * v[i] + (1.0 - hp.beta2) * gi * gi;
                let update = (m[i] / bc1) / ((v[i] / bc2).sqrt() + hp.eps);
                p[i] -= hp.lr * (update + wd * p[i]);
            }
        });
}
