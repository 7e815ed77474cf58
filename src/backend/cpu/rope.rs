//! Rotary position embedding on the q and k heads of a fused `qkv` row (interleaved pairs).

use rayon::prelude::*;

use crate::backend::AttnShape;

/// `table`: (T, D/2, 2) = cos, sin of position t times frequency i; `qkv`'s first row is token
/// `first_row` of the `(B·T)` layout.
pub fn apply(qkv: &mut [f32], table: &[f32], shape: AttnShape, first_row: usize, inverse: bool) {
    let (t_len, d) = (shape.seq, shape.head_dim);
    let half = d / 2;
    let rotated_heads = shape.n_heads + shape.n_kv_heads;
    let sign = if inverse { -1.0 } else { 1.0 };
    qkv.par_chunks_mut(shape.qkv_width()).enumerate().for_each(|(row, r)| {
        let t = (first_row + row) % t_len;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Rotating a token range alone, told where it starts, matches rotating every token.
    #[test]
    fn a_row_range_rotates_as_in_the_full_layout() {
        let shape = AttnShape { batch: 2, seq: 5, n_heads: 2, n_kv_heads: 1, head_dim: 4 };
        let table: Vec<f32> = (0..shape.seq * 4).map(|i| (i as f32 * 0.37).sin()).collect();
        let w = shape.qkv_width();
        let x: Vec<f32> = (0..shape.tokens() * w).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut full = x.clone();
        apply(&mut full, &table, shape, 0, false);
        for from in [1, 4, 5, 7] {
            let mut part = x[from * w..].to_vec();
            apply(&mut part, &table, shape, from, false);
            assert_eq!(part, full[from * w..], "from token {from}");
        }
    }
}
