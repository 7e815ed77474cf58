//! Permute tokens into expert-major slots and combine the experts' outputs back per token.

use rayon::prelude::*;

use crate::backend::TokenSlots;

/// `out[s] = (weight[s] ·) x[index[s]]`.
pub fn gather(out: &mut [f32], x: &[f32], index: &[u32], weight: Option<&[f32]>, c: usize) {
    out.par_chunks_mut(c).zip(index.par_iter()).enumerate().for_each(|(s, (row, &t))| {
        let src = &x[t as usize * c..(t as usize + 1) * c];
        match weight {
            None => row.copy_from_slice(src),
            Some(w) => row.iter_mut().zip(src).for_each(|(o, x)| *o = w[s] * x),
        }
    });
}

/// `out[t] = residual[t] + Σ_{s ∈ slots(t)} (weight[s] ·) y[s]` (residual 0 without one), slots in
/// ascending order after the residual.
pub fn combine(out: &mut [f32], y: &[f32], by_token: TokenSlots<'_>, weight: Option<&[f32]>, residual: Option<&[f32]>, c: usize) {
    out.par_chunks_mut(c).enumerate().for_each(|(t, row)| {
        match residual {
            Some(r) => row.copy_from_slice(&r[t * c..(t + 1) * c]),
            None => row.fill(0.0),
        }
        let (a, b) = (by_token.offsets[t] as usize, by_token.offsets[t + 1] as usize);
        for &s in &by_token.slots[a..b] {
            let s = s as usize;
            let w = weight.map_or(1.0, |w| w[s]);
            row.iter_mut().zip(&y[s * c..(s + 1) * c]).for_each(|(o, y)| *o += w * y);
        }
    });
}

/// `dots[s] = ⟨a[index[s]], b[s]⟩`.
pub fn gathered_dots(dots: &mut [f32], a: &[f32], b: &[f32], index: &[u32], c: usize) {
    dots.par_iter_mut().zip(index).enumerate().for_each(|(s, (d, &t))| {
        let t = t as usize;
        *d = a[t * c..(t + 1) * c].iter().zip(&b[s * c..(s + 1) * c]).map(|(x, y)| x * y).sum();
    });
}
