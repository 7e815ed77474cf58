//! SwiGLU activation: `a = SiLU(g) ⊙ u`, each input row `[g (h) | u (h)]`.

use rayon::prelude::*;

use super::mathfn::exp;
use super::ROW_CHUNK;

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

pub fn forward(out: &mut [f32], gu: &[f32], rows: usize, h: usize) {
    debug_assert_eq!(gu.len(), rows * 2 * h);
    out.par_chunks_mut(ROW_CHUNK * h).zip(gu.par_chunks(ROW_CHUNK * 2 * h)).for_each(|(o, gu)| {
        for (o, gu) in o.chunks_mut(h).zip(gu.chunks(2 * h)) {
            let (g, u) = gu.split_at(h);
            o.iter_mut().zip(g.iter().zip(u)).for_each(|(o, (&g, &u))| *o = g * sigmoid(g) * u);
        }
    });
}

pub fn backward(dgu: &mut [f32], dout: &[f32], gu: &[f32], rows: usize, h: usize) {
    debug_assert_eq!(dout.len(), rows * h);
    dgu.par_chunks_mut(ROW_CHUNK * 2 * h).zip(gu.par_chunks(ROW_CHUNK * 2 * h)).zip(dout.par_chunks(ROW_CHUNK * h)).for_each(
        |((dgu, gu), dout)| {
            for ((dgu, gu), da) in dgu.chunks_mut(2 * h).zip(gu.chunks(2 * h)).zip(dout.chunks(h)) {
                let (g, u) = gu.split_at(h);
                let (dg, du) = dgu.split_at_mut(h);
                for ((dg, du), ((&g, &u), &da)) in dg.iter_mut().zip(du.iter_mut()).zip(g.iter().zip(u).zip(da)) {
                    let s = sigmoid(g);
                    *du = da * g * s;
                    *dg = da * u * s * (1.0 + g * (1.0 - s));
                }
            }
        },
    );
}
