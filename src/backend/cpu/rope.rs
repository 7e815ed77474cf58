//! Rotary position embedding on the q and k heads of a fused `qkv` row (interleaved pairs).

use rayon::prelude::*;

use crate::backend::AttnShape;

/// `table`: (T, D/2, 2) = cos, sin of position t times frequency i.
pub fn apply(qkv: &mut [f32], table: &[f32], shape: AttnShape, inverse: bool) {
    let (t_len, d) = (shape.seq, shape.head_dim);
    let half = d / 2;
    let rotated_heads = shape.n_heads + shape.n_kv_heads;
    let sign = if inverse { -1.0 } else { 1.0 };
    qkv.par_chunks_mut(shape.qkv_width()).enumerate().for_each(|(row, r)| {
        let t = row % t_len;
        let angles = &table[t * d..(t + 1) * d];
        for h in 0..rotated_heads {
            let head = &mut r[h * d..(h + 1) * d];
            for i in 0..half {
                let (cos, sin) = (angles[2 * i], sign * angles[2 * i + 1]);
                let (x0, x1) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = x0 * cos - x1 * sin;
                head[2 * i + 1] = x0 * sin + x1 * cos;
            }
        }
    });
}
