//! Causal multi-head attention (grouped-query optional), computed in key tiles with an online
//! softmax: the `T × T` score matrix is never materialised. The backward recomputes each
//! probability from the saved log-sum-exp (FlashAttention-2 style).

use rayon::prelude::*;

use super::SharedMut;
use crate::backend::AttnShape;

/// Keys per tile of the online softmax.
const KEY_TILE: usize = 64;
/// Query rows per parallel task.
const QUERY_TILE: usize = 32;

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[inline]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
}

/// Column offsets of query head `h`, and of the key and value heads it reads.
fn head_cols(s: &AttnShape, h: usize) -> (usize, usize, usize) {
    let kvh = h / (s.n_heads / s.n_kv_heads);
    let d = s.head_dim;
    (h * d, (s.n_heads + kvh) * d, (s.n_heads + s.n_kv_heads + kvh) * d)
}

/// qkv: (N, (H+2Hkv)·D); out: (N, H·D); lse: (B, H, T).
pub fn forward(out: &mut [f32], lse: &mut [f32], qkv: &[f32], s: AttnShape) {
    let (t_len, d, w) = (s.seq, s.head_dim, s.qkv_width());
    let scale = 1.0 / (d as f32).sqrt();
    let q_tiles = t_len.div_ceil(QUERY_TILE);
    let (out_ptr, lse_ptr) = (SharedMut(out.as_mut_ptr()), SharedMut(lse.as_mut_ptr()));
    let ow = s.out_width();
    (0..s.batch * s.n_heads * q_tiles).into_par_iter().for_each(|task| {
        let (out_ptr, lse_ptr) = (out_ptr, lse_ptr);
        let (bh, tile) = (task / q_tiles, task % q_tiles);
        let (b, h) = (bh / s.n_heads, bh % s.n_heads);
        let (qc, kc, vc) = head_cols(&s, h);
        let row = |t: usize| (b * t_len + t) * w;
        let mut scores = [0f32; KEY_TILE];
        let mut acc = vec![0f32; d];
        for i in tile * QUERY_TILE..((tile + 1) * QUERY_TILE).min(t_len) {
            let q = &qkv[row(i) + qc..row(i) + qc + d];
            let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
            acc.fill(0.0);
            for j0 in (0..=i).step_by(KEY_TILE) {
                let j1 = (j0 + KEY_TILE).min(i + 1);
                let mut tile_max = f32::NEG_INFINITY;
                for j in j0..j1 {
                    let sc = dot(q, &qkv[row(j) + kc..row(j) + kc + d]) * scale;
                    scores[j - j0] = sc;
                    tile_max = tile_max.max(sc);
                }
                let m_new = m.max(tile_max);
                let correction = (m - m_new).exp();
                l *= correction;
                acc.iter_mut().for_each(|a| *a *= correction);
                for j in j0..j1 {
                    let p = (scores[j - j0] - m_new).exp();
                    l += p;
                    axpy(&mut acc, p, &qkv[row(j) + vc..row(j) + vc + d]);
                }
                m = m_new;
            }
            let inv = 1.0 / l;
            // SAFETY: this task alone writes rows of batch b, head h, query tile `tile`.
            unsafe {
                let o = std::slice::from_raw_parts_mut(out_ptr.0.add((b * t_len + i) * ow + h * d), d);
                o.iter_mut().zip(&acc).for_each(|(o, a)| *o = a * inv);
                *lse_ptr.0.add(bh * t_len + i) = m + l.ln();
            }
        }
    });
}

/// Overwrites dqkv. Parallel over (batch, kv head): each task owns its k/v columns and the q
/// columns of the heads that share them, and walks query rows in order (deterministic).
pub fn backward(dqkv: &mut [f32], dout: &[f32], out: &[f32], lse: &[f32], qkv: &[f32], s: AttnShape) {
    let (t_len, d, w, ow) = (s.seq, s.head_dim, s.qkv_width(), s.out_width());
    let scale = 1.0 / (d as f32).sqrt();
    let group = s.n_heads / s.n_kv_heads;
    let dptr = SharedMut(dqkv.as_mut_ptr());
    (0..s.batch * s.n_kv_heads).into_par_iter().for_each(|task| {
        let dptr = dptr;
        let (b, kvh) = (task / s.n_kv_heads, task % s.n_kv_heads);
        let row = |t: usize| (b * t_len + t) * w;
        // SAFETY: rows of batch b, columns of kv head kvh and of its query heads belong to this task.
        let dslice = |off: usize| unsafe { std::slice::from_raw_parts_mut(dptr.0.add(off), d) };
        for t in 0..t_len {
            let (_, kc, vc) = head_cols(&s, kvh * group);
            dslice(row(t) + kc).fill(0.0);
            dslice(row(t) + vc).fill(0.0);
        }
        for h in kvh * group..(kvh + 1) * group {
            let (qc, kc, vc) = head_cols(&s, h);
            for i in 0..t_len {
                let o_off = (b * t_len + i) * ow + h * d;
                let (o, dout_i) = (&out[o_off..o_off + d], &dout[o_off..o_off + d]);
                let delta = dot(dout_i, o);
                let l = lse[(b * s.n_heads + h) * t_len + i];
                let q = &qkv[row(i) + qc..row(i) + qc + d];
                let dq = dslice(row(i) + qc);
                dq.fill(0.0);
                for j in 0..=i {
                    let k = &qkv[row(j) + kc..row(j) + kc + d];
                    let v = &qkv[row(j) + vc..row(j) + vc + d];
                    let p = (dot(q, k) * scale - l).exp();
                    let ds = p * (dot(dout_i, v) - delta) * scale;
                    axpy(dq, ds, k);
                    axpy(dslice(row(j) + kc), ds, q);
                    axpy(dslice(row(j) + vc), p, dout_i);
                }
            }
        }
    });
}
