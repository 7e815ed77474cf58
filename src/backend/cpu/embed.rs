//! Token embedding: a row lookup and its scatter-add backward.

use rayon::prelude::*;

/// `out (N, C) = table[tokens]`.
pub fn forward(out: &mut [f32], table: &[f32], tokens: &[u32], c: usize) {
    out.par_chunks_mut(c).zip(tokens.par_iter()).for_each(|(row, &t)| {
        let t = t as usize;
        row.copy_from_slice(&table[t * c..(t + 1) * c]);
    });
}

/// `dtable[tokens[i]] += dout[i]`, tokens in order; column blocks run in parallel (disjoint).
pub fn backward(dtable: &mut [f32], dout: &[f32], tokens: &[u32], c: usize) {
    const COLS: usize = 16;
    let blocks = c.div_ceil(COLS);
    let ptr = super::SharedMut(dtable.as_mut_ptr());
    (0..blocks).into_par_iter().for_each(|blk| {
        let (c0, c1) = (blk * COLS, ((blk + 1) * COLS).min(c));
        for (i, &t) in tokens.iter().enumerate() {
            let src = &dout[i * c + c0..i * c + c1];
            // SAFETY: each task owns columns c0..c1 of every row; rows are within dtable.
            let dst = unsafe { std::slice::from_raw_parts_mut(ptr.add(t as usize * c + c0), c1 - c0) };
            dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
        }
    });
}
