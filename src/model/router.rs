//! HMoE routing: Top-K / Top-P selection with renormalised gates, the auxiliary losses
//! (Switch load balance, P-Penalty, router entropy, z-loss) and the router's backward.
//! Runs on the host over the `(N, E)` router probabilities.

use super::config::{MoeConfig, Routing as RoutingKind};
use super::routing::{Choice, Routing};

/// Picks each token's experts from its probabilities and renormalises their gates.
/// Top-K breaks ties toward the lower expert index; Top-P takes the smallest prefix of the
/// descending order whose mass reaches `top_p` (at least one expert).
pub fn select(probs: &[f32], n: usize, e: usize, moe: &MoeConfig) -> Routing {
    let mut choices = Vec::with_capacity(n * moe.top_k.max(2));
    let mut order: Vec<usize> = (0..e).collect();
    for t in 0..n {
        let p = &probs[t * e..(t + 1) * e];
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
        let take = match moe.routing {
            RoutingKind::TopK => moe.top_k.min(e),
            RoutingKind::TopP => {
                let mut mass = 0.0f32;
                let mut k = 0;
                while k < e {
                    mass += p[order[k]];
                    k += 1;
                    if mass >= moe.top_p {
                        break;
                    }
                }
                k
            }
        };
        let mut chosen = order[..take].to_vec();
        chosen.sort_unstable();
        let sum: f32 = chosen.iter().map(|&i| p[i]).sum();
        for i in chosen {
            choices.push(Choice { token: t as u32, expert: i as u32, gate: p[i] / sum });
        }
    }
    Routing::from_choices(n, e, &choices)
}

/// The auxiliary losses of one MoE layer, unweighted.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AuxLosses {
    pub load_balance: f32,
    pub p_penalty: f32,
    pub entropy: f32,
    pub z_loss: f32,
}

impl AuxLosses {
    /// The weighted sum that enters the training loss.
    pub fn weighted(&self, moe: &MoeConfig) -> f32 {
        moe.load_balance * self.load_balance + moe.p_penalty * self.p_penalty + moe.entropy * self.entropy + moe.z_loss * self.z_loss
    }

    pub fn add(&mut self, o: &AuxLosses) {
        self.load_balance += o.load_balance;
        self.p_penalty += o.p_penalty;
        self.entropy += o.entropy;
        self.z_loss += o.z_loss;
    }
}

/// Share of tokens that activate each expert, `T_i = count_i / N` (Σ T_i = mean experts/token).
fn token_shares(routing: &Routing) -> Vec<f32> {
    routing.counts().iter().map(|&c| c as f32 / routing.n_tokens as f32).collect()
}

fn logsumexp(z: &[f32]) -> f32 {
    let m = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    m + z.iter().map(|&v| (v - m).exp()).sum::<f32>().ln()
}

/// Evaluates the aux losses (papers.md §1 definitions; T_i from counts, P̂_i the mean probability).
pub fn aux_losses(probs: &[f32], logits: &[f32], routing: &Routing, moe: &MoeConfig) -> AuxLosses {
    let (n, e) = (routing.n_tokens, routing.n_experts);
    let shares = token_shares(routing);
    let sizes = moe.relative_sizes();
    let mut mean_p = vec![0f64; e];
    let (mut entropy, mut z) = (0f64, 0f64);
    for t in 0..n {
        let p = &probs[t * e..(t + 1) * e];
        for i in 0..e {
            mean_p[i] += p[i] as f64;
            if p[i] > 0.0 {
                entropy -= (p[i] * p[i].ln()) as f64;
            }
        }
        let lse = logsumexp(&logits[t * e..(t + 1) * e]) as f64;
        z += lse * lse;
    }
    let nf = n as f64;
    let lb: f64 = (0..e).map(|i| shares[i] as f64 * mean_p[i] / nf).sum::<f64>() * e as f64;
    let pp: f64 = (0..e).map(|i| shares[i] as f64 * sizes[i] as f64 * mean_p[i] / nf).sum::<f64>() * e as f64;
    AuxLosses { load_balance: lb as f32, p_penalty: pp as f32, entropy: (entropy / nf) as f32, z_loss: (z / nf) as f32 }
}

/// Gradient with respect to the router probabilities `(N, E)` of the gate path
/// (`dgate` per slot, through the renormalisation) plus the weighted aux losses, and the
/// z-loss gradient with respect to the logits (which bypasses the softmax).
pub fn backward(probs: &[f32], logits: &[f32], routing: &Routing, dgate: &[f32], moe: &MoeConfig) -> (Vec<f32>, Vec<f32>) {
    let (n, e) = (routing.n_tokens, routing.n_experts);
    let mut dprobs = vec![0f32; n * e];
    let mut dlogits_z = vec![0f32; n * e];
    let experts = routing.expert_of_slots();
    let (offsets, slots) = routing.by_token();
    let shares = token_shares(routing);
    let sizes = moe.relative_sizes();
    let nf = n as f32;
    for t in 0..n {
        let p = &probs[t * e..(t + 1) * e];
        let dp = &mut dprobs[t * e..(t + 1) * e];
        // g_i = P_i / S over the selected set: dP_i = (dg_i − Σ_j dg_j g_j) / S.
        let mine = &slots[offsets[t] as usize..offsets[t + 1] as usize];
        let sum: f32 = mine.iter().map(|&s| p[experts[s as usize] as usize]).sum();
        let dot: f32 = mine.iter().map(|&s| dgate[s as usize] * routing.gate[s as usize]).sum();
        for &s in mine {
            dp[experts[s as usize] as usize] += (dgate[s as usize] - dot) / sum;
        }
        for i in 0..e {
            dp[i] += moe.load_balance * e as f32 * shares[i] / nf;
            dp[i] += moe.p_penalty * e as f32 * shares[i] * sizes[i] / nf;
            if moe.entropy > 0.0 && p[i] > 0.0 {
                dp[i] -= moe.entropy * (p[i].ln() + 1.0) / nf;
            }
        }
        if moe.z_loss > 0.0 {
            let z = &logits[t * e..(t + 1) * e];
            let lse = logsumexp(z);
            for i in 0..e {
                dlogits_z[t * e + i] = moe.z_loss * 2.0 * lse * (z[i] - lse).exp() / nf;
            }
        }
    }
    (dprobs, dlogits_z)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Routing as Kind;

    fn moe(kind: Kind) -> MoeConfig {
        MoeConfig {
            expert_widths: vec![8, 16, 24, 32],
            routing: kind,
            top_k: 2,
            top_p: 0.6,
            load_balance: 0.0,
            p_penalty: 0.0,
            entropy: 0.0,
            z_loss: 0.0,
        }
    }

    #[test]
    fn top_k_renormalises_and_breaks_ties_low() {
        let probs = [0.1, 0.4, 0.4, 0.1];
        let r = select(&probs, 1, 4, &moe(Kind::TopK));
        assert_eq!(r.counts(), vec![0, 1, 1, 0]);
        assert_eq!(r.gate, vec![0.5, 0.5]);
        let probs = [0.3, 0.3, 0.3, 0.1];
        assert_eq!(select(&probs, 1, 4, &moe(Kind::TopK)).counts(), vec![1, 1, 0, 0]);
    }

    #[test]
    fn top_p_takes_smallest_prefix_reaching_p() {
        // 0.5 < 0.6, 0.5 + 0.2 ≥ 0.6: two experts.
        let r = select(&[0.2, 0.5, 0.15, 0.15], 1, 4, &moe(Kind::TopP));
        assert_eq!(r.counts(), vec![1, 1, 0, 0]);
        assert!((r.gate[0] - 0.2 / 0.7).abs() < 1e-6);
        // A confident token uses one expert.
        let r = select(&[0.05, 0.05, 0.8, 0.1], 1, 4, &moe(Kind::TopP));
        assert_eq!(r.counts(), vec![0, 0, 1, 0]);
        assert_eq!(r.gate, vec![1.0]);
    }

    #[test]
    fn p_penalty_reduces_to_load_balance_for_equal_sizes() {
        let mut m = moe(Kind::TopK);
        m.expert_widths = vec![16; 4];
        let probs = [0.1, 0.2, 0.3, 0.4, 0.4, 0.3, 0.2, 0.1];
        let logits: Vec<f32> = probs.iter().map(|p: &f32| p.ln()).collect();
        let r = select(&probs, 2, 4, &m);
        let a = aux_losses(&probs, &logits, &r, &m);
        assert!((a.load_balance - a.p_penalty).abs() < 1e-6);
        // Uniform routing gives the minimum of the Switch loss: N · Σ (k/N)(1/N) = k.
        let uniform = [0.25f32; 8];
        let r = select(&uniform, 2, 4, &m);
        let lz: Vec<f32> = uniform.iter().map(|p| p.ln()).collect();
        let a = aux_losses(&uniform, &lz, &r, &m);
        assert!((a.load_balance - 2.0).abs() < 1e-6, "{}", a.load_balance);
        assert!((a.entropy - 4f32.ln()).abs() < 1e-6);
    }
}
