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

/// Rows of [`backward`]: `gu`, `dout` and `out` hold the same rows as `dgu`.
fn backward_rows(dgu: &mut [f32], mut out: Option<&mut [f32]>, dout: &[f32], gu: &[f32], h: usize) {
    for (r, ((dgu, gu), da)) in dgu.chunks_mut(2 * h).zip(gu.chunks(2 * h)).zip(dout.chunks(h)).enumerate() {
        let (g, u) = gu.split_at(h);
        let (dg, du) = dgu.split_at_mut(h);
        for (i, ((dg, du), ((&g, &u), &da))) in dg.iter_mut().zip(du.iter_mut()).zip(g.iter().zip(u).zip(da)).enumerate() {
            let s = sigmoid(g);
            *du = da * g * s;
            *dg = da * u * s * (1.0 + g * (1.0 - s));
            if let Some(o) = out.as_deref_mut() {
                o[r * h + i] = g * s * u;
            }
        }
    }
}

/// `dgu` from `dout`; with `out`, the forward's output again (bitwise [`forward`]'s).
pub fn backward(dgu: &mut [f32], out: Option<&mut [f32]>, dout: &[f32], gu: &[f32], rows: usize, h: usize) {
    debug_assert_eq!(dout.len(), rows * h);
    let mut outs: Vec<Option<&mut [f32]>> = match out {
        Some(out) => out.chunks_mut(ROW_CHUNK * h).map(Some).collect(),
        None => (0..rows.div_ceil(ROW_CHUNK)).map(|_| None).collect(),
    };
    dgu.par_chunks_mut(ROW_CHUNK * 2 * h)
        .zip(gu.par_chunks(ROW_CHUNK * 2 * h))
        .zip(dout.par_chunks(ROW_CHUNK * h))
        .zip(outs.par_iter_mut())
        .for_each(|(((dgu, gu), dout), out)| backward_rows(dgu, out.as_deref_mut(), dout, gu, h));
}
