//! The router's backward through its softmax (`Backend::router_bwd`), one token per row.

use rayon::prelude::*;

use super::ROW_CHUNK;
use crate::backend::RouterGrad;

/// `ln Σ exp(z)` of one token's router logits from its probabilities `P = softmax(z)`:
/// `z_j − ln P_j` at the most probable expert (`P_j ≥ 1/E`, so the log is well conditioned):
/// one log where the definition takes E exponentials.
pub fn logsumexp(z: &[f32], p: &[f32]) -> f32 {
    // Branch-free arg max (the branch on random probabilities mispredicts half the time).
    let (mut j, mut best) = (0, p[0]);
    for (i, &v) in p.iter().enumerate().skip(1) {
        let more = v > best;
        j = if more { i } else { j };
        best = best.max(v);
    }
    z[j] - best.ln()
}

pub fn backward(dlogits: &mut [f32], dgate: &[f32], probs: &[f32], logits: &[f32], grad: RouterGrad<'_>) {
    let (n, e) = (grad.tokens(), grad.experts());
    let RouterGrad { by_token, slot_expert, gate, load_balance, p_penalty, entropy, z_loss } = grad;
    let nf = n as f32;
    dlogits.par_chunks_mut(ROW_CHUNK * e).enumerate().for_each(|(c, rows)| {
        for (i, dz) in rows.chunks_exact_mut(e).enumerate() {
            let t = c * ROW_CHUNK + i;
            let (p, z) = (&probs[t * e..(t + 1) * e], &logits[t * e..(t + 1) * e]);
            // dP first, in the output row. g_i = P_i / S over the token's experts:
            // dP_i = (dg_i − Σ_j dg_j g_j) / S.
            dz.fill(0.0);
            let mine = &by_token.slots[by_token.offsets[t] as usize..by_token.offsets[t + 1] as usize];
            // Slots past dgate were dropped by the experts' capacity: no gate gradient.
            let dg = |s: u32| dgate.get(s as usize).copied().unwrap_or(0.0);
            let sum: f32 = mine.iter().map(|&s| p[slot_expert[s as usize] as usize]).sum();
            let dot: f32 = mine.iter().map(|&s| dg(s) * gate[s as usize]).sum();
            for &s in mine {
                dz[slot_expert[s as usize] as usize] += (dg(s) - dot) / sum;
            }
            let lse = if entropy > 0.0 || z_loss > 0.0 { logsumexp(z, p) } else { 0.0 };
            for i in 0..e {
                dz[i] += load_balance[i];
                dz[i] += p_penalty[i];
                // ∂(−P ln P)/∂P = −(ln P + 1), ln P_i = z_i − lse.
                if entropy > 0.0 && p[i] > 0.0 {
                    dz[i] -= entropy * ((z[i] - lse) + 1.0) / nf;
                }
            }
            // Through the softmax, then the z-loss: ∂lse/∂z_i = P_i.
            let dot: f32 = dz.iter().zip(p).map(|(a, b)| a * b).sum();
            for i in 0..e {
                dz[i] = p[i] * (dz[i] - dot);
            }
            if z_loss > 0.0 {
                for i in 0..e {
                    dz[i] += z_loss * 2.0 * lse * p[i] / nf;
                }
            }
        }
    });
}
