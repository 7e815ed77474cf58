//! Causal multi-head attention (grouped-query optional), FlashAttention-style on the CPU:
//! query tiles × key tiles, tile products on gemm, an online softmax, so the `T × T` score
//! matrix never exists. The backward recomputes each probability tile from the saved
//! log-sum-exp (FlashAttention-2).

use rayon::prelude::*;

use super::mathfn::{exp, exp_shifted, max};
use super::matmul::{gemm_strided, Strided};
use super::SharedMut;
use crate::backend::AttnShape;

/// Query rows and key columns of one tile.
const TILE: usize = 64;

/// Column offsets of query head `h`, and of the key and value heads it reads.
fn head_cols(s: &AttnShape, h: usize) -> (usize, usize, usize) {
    let kvh = h / (s.n_heads / s.n_kv_heads);
    let d = s.head_dim;
    (h * d, (s.n_heads + kvh) * d, (s.n_heads + s.n_kv_heads + kvh) * d)
}

/// A `rows × d` block of a row-major matrix with row stride `ld`, starting at `ptr`.
fn block(ptr: *const f32, ld: usize, transposed: bool) -> Strided {
    let (rs, cs) = if transposed { (1, ld as isize) } else { (ld as isize, 1) };
    Strided { ptr, rs, cs }
}

fn dense(buf: &[f32], cols: usize) -> Strided {
    Strided::rows(buf, cols, false)
}

/// qkv: (N, (H+2Hkv)·D); out: (N, H·D); lse: (B, H, T).
pub fn forward(out: &mut [f32], lse: &mut [f32], qkv: &[f32], s: AttnShape) {
    let (t_len, d, w, ow) = (s.seq, s.head_dim, s.qkv_width(), s.out_width());
    let scale = 1.0 / (d as f32).sqrt();
    let q_tiles = t_len.div_ceil(TILE);
    let (out_ptr, lse_ptr) = (SharedMut(out.as_mut_ptr()), SharedMut(lse.as_mut_ptr()));
    (0..s.batch * s.n_heads * q_tiles).into_par_iter().for_each(|task| {
        let (bh, qt) = (task / q_tiles, task % q_tiles);
        let (b, h) = (bh / s.n_heads, bh % s.n_heads);
        let (qc, kc, vc) = head_cols(&s, h);
        let at = |t: usize, col: usize| qkv[(b * s.seq + t) * w + col..].as_ptr();
        let (i0, i1) = (qt * TILE, ((qt + 1) * TILE).min(t_len));
        let rows = i1 - i0;
        let mut scores = vec![0f32; rows * TILE];
        let mut acc = vec![0f32; rows * d];
        let mut m = vec![f32::NEG_INFINITY; rows];
        let mut l = vec![0f32; rows];
        for j0 in (0..i1).step_by(TILE) {
            let cols = TILE.min(i1 - j0);
            // S = scale · Q Kᵀ for this tile.
            // SAFETY: the blocks lie inside qkv; `scores` is a private buffer.
            unsafe { gemm_strided(rows, cols, d, scores.as_mut_ptr(), TILE, false, block(at(i0, qc), w, false), block(at(j0, kc), w, true), scale, 1) };
            for r in 0..rows {
                let i = i0 + r;
                let row = &mut scores[r * TILE..r * TILE + cols];
                let valid = (i + 1).saturating_sub(j0).min(cols);
                let (live, masked) = row.split_at_mut(valid);
                let m_new = m[r].max(max(live));
                let correction = exp(m[r] - m_new);
                let sum = exp_shifted(live, m_new, true);
                masked.fill(0.0);
                l[r] = l[r] * correction + sum;
                m[r] = m_new;
                acc[r * d..(r + 1) * d].iter_mut().for_each(|a| *a *= correction);
            }
            // acc += P V.
            // SAFETY: as above; `acc` is private.
            unsafe { gemm_strided(rows, d, cols, acc.as_mut_ptr(), d, true, dense(&scores, TILE), block(at(j0, vc), w, false), 1.0, 1) };
        }
        for r in 0..rows {
            let i = i0 + r;
            let inv = 1.0 / l[r];
            // SAFETY: this task alone writes rows i0..i1 of batch b, head h.
            unsafe {
                let o = std::slice::from_raw_parts_mut(out_ptr.add((b * t_len + i) * ow + h * d), d);
                o.iter_mut().zip(&acc[r * d..(r + 1) * d]).for_each(|(o, a)| *o = a * inv);
                *lse_ptr.add(bh * t_len + i) = m[r] + l[r].ln();
            }
        }
    });
}

/// Overwrites dqkv. Parallel over (batch, kv head): each task owns its k/v columns and the q
/// columns of the heads that share them, and walks the tiles in a fixed order (deterministic).
pub fn backward(dqkv: &mut [f32], dout: &[f32], out: &[f32], lse: &[f32], qkv: &[f32], s: AttnShape) {
    let (t_len, d, w, ow) = (s.seq, s.head_dim, s.qkv_width(), s.out_width());
    let scale = 1.0 / (d as f32).sqrt();
    let group = s.n_heads / s.n_kv_heads;
    let dptr = SharedMut(dqkv.as_mut_ptr());
    (0..s.batch * s.n_kv_heads).into_par_iter().for_each(|task| {
        let (b, kvh) = (task / s.n_kv_heads, task % s.n_kv_heads);
        let row = |t: usize| (b * t_len + t) * w;
        let at = |t: usize, col: usize| qkv[row(t) + col..].as_ptr();
        // SAFETY (all raw accesses below): rows of batch b in the columns of kv head kvh and of
        // its query heads belong to this task alone.
        let dat = |t: usize, col: usize| dptr.add(row(t) + col);
        let (_, kc0, vc0) = head_cols(&s, kvh * group);
        for t in 0..t_len {
            unsafe {
                std::slice::from_raw_parts_mut(dat(t, kc0), d).fill(0.0);
                std::slice::from_raw_parts_mut(dat(t, vc0), d).fill(0.0);
            }
        }
        let mut p = vec![0f32; TILE * TILE];
        let mut dp = vec![0f32; TILE * TILE];
        let mut delta = vec![0f32; TILE];
        for h in kvh * group..(kvh + 1) * group {
            let (qc, kc, vc) = head_cols(&s, h);
            for i0 in (0..t_len).step_by(TILE) {
                let rows = TILE.min(t_len - i0);
                let o_at = |i: usize| (b * t_len + i) * ow + h * d;
                for r in 0..rows {
                    let (o, g) = (&out[o_at(i0 + r)..o_at(i0 + r) + d], &dout[o_at(i0 + r)..o_at(i0 + r) + d]);
                    delta[r] = o.iter().zip(g).map(|(a, b)| a * b).sum();
                    unsafe { std::slice::from_raw_parts_mut(dat(i0 + r, qc), d).fill(0.0) };
                }
                let do_blk = block(dout[o_at(i0)..].as_ptr(), ow, false);
                let lse_row = &lse[(b * s.n_heads + h) * t_len + i0..];
                for j0 in (0..i0 + rows).step_by(TILE) {
                    let cols = TILE.min(i0 + rows - j0);
                    unsafe {
                        // P = exp(scale · Q Kᵀ − lse), zero above the diagonal.
                        gemm_strided(rows, cols, d, p.as_mut_ptr(), TILE, false, block(at(i0, qc), w, false), block(at(j0, kc), w, true), scale, 1);
                        // dP = dO Vᵀ.
                        gemm_strided(rows, cols, d, dp.as_mut_ptr(), TILE, false, do_blk, block(at(j0, vc), w, true), 1.0, 1);
                    }
                    for r in 0..rows {
                        let valid = (i0 + r + 1).saturating_sub(j0).min(cols);
                        let (pr, dpr) = (&mut p[r * TILE..r * TILE + valid], &mut dp[r * TILE..r * TILE + valid]);
                        let (l_r, delta_r) = (lse_row[r], delta[r]);
                        for (pv, dv) in pr.iter_mut().zip(dpr.iter_mut()) {
                            *pv = exp(*pv - l_r);
                            // dS = P ⊙ (dP − Δ) · scale, kept in `dp`.
                            *dv = *pv * (*dv - delta_r) * scale;
                        }
                        p[r * TILE + valid..r * TILE + cols].fill(0.0);
                        dp[r * TILE + valid..r * TILE + cols].fill(0.0);
                    }
                    unsafe {
                        // dV += Pᵀ dO; dK += dSᵀ Q; dQ += dS K.
                        gemm_strided(cols, d, rows, dat(j0, vc), w, true, block(p.as_ptr(), TILE, true), do_blk, 1.0, 1);
                        gemm_strided(cols, d, rows, dat(j0, kc), w, true, block(dp.as_ptr(), TILE, true), block(at(i0, qc), w, false), 1.0, 1);
                        gemm_strided(rows, d, cols, dat(i0, qc), w, true, dense(&dp, TILE), block(at(j0, kc), w, false), 1.0, 1);
                    }
                }
            }
        }
    });
}
