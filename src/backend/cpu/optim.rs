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

#[cfg(test)]
mod tests {
    use super::*;

    /// Two steps of decoupled AdamW (Loshchilov & Hutter: `p ← p − lr·(m̂ / (√v̂ + ε) + λ·p)`)
    /// against values worked out by hand: step 1 takes g = 1 scaled by ½ (so m̂ / √v̂ = 1 and
    /// p = 1 − 0.1·(1 + 0.1·1) = 0.89), step 2 g = −0.5 scaled by ½, where the bias corrections
    /// (1 − 0.9², 1 − 0.999²) no longer cancel. Without decay: 0.9, then 0.873366….
    #[test]
    fn two_steps_match_the_decoupled_update_worked_by_hand() {
        for (decay, want) in [(true, [0.89, 0.854_466_3]), (false, [0.9, 0.873_366_3])] {
            let (mut p, mut m, mut v) = (vec![1.0f32; 3], vec![0.0f32; 3], vec![0.0f32; 3]);
            for (step, g) in [(1, 1.0f32), (2, -0.5)] {
                let hp = AdamW { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, step };
                adamw(&mut p, &mut m, &mut v, &[g; 3], hp, 0.5, decay);
                let w = want[step as usize - 1];
                assert!(p.iter().all(|&x| (x - w).abs() < 1e-6), "decay {decay}, step {step}: {p:?}, want {w}");
            }
        }
    }
}
