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
            for ((p, m), (v, &g)) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut().zip(g)) {
                let g = g * grad_scale;
                *m = hp.beta1 * *m + (1.0 - hp.beta1) * g;
                *v = hp.beta2 * *v + (1.0 - hp.beta2) * g * g;
                let update = (*m / bc1) / ((*v / bc2).sqrt() + hp.eps);
                *p -= hp.lr * (update + wd * *p);
            }
        });
}

/// `dst = bf16(src)` (round to nearest even), kept in f32: the CPU's bf16 working copy.
pub fn round_to_bf16(dst: &mut [f32], src: &[f32]) {
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| {
        for (d, &s) in d.iter_mut().zip(s) {
            *d = half::bf16::from_f32(s).to_f32();
        }
    });
}
