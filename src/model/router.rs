//! HMoE routing: Top-K / Top-P selection with renormalised gates, the auxiliary losses
//! (Switch load balance, P-Penalty, router entropy, z-loss) and their per-expert gradients;
//! the per-token backward is a backend op (`Backend::router_bwd`, fed by [`BackwardArgs`]), so
//! it runs on the device.
//! Selection and aux losses run where the backend routes ([`route`]): on a GPU its kernels
//! select as [`select`] does, bitwise, and only the slots, E counts and E + 2 sums come back;
//! elsewhere they run on the host over the `(N, E)` router probabilities, between the backend's
//! ops. Every MoE layer's forward waits for them, so the host path is data-parallel over chunks
//! of tokens (on the calling rayon pool, see `Backend::host_work`) and allocation-free per
//! token. Chunks have a fixed size, so every result is bitwise the same whatever the thread
//! count.

use rayon::prelude::*;

use crate::backend::cpu::router::logsumexp;
use crate::backend::{Backend, RouteRule, RoutedSlots, RouterGrad, TokenSlots};
use crate::memory::arena::Arena;
use crate::memory::transients::router_phase;

use super::config::{MoeConfig, Routing as RoutingKind};
use super::routing::{Capped, ExpertLists, RouterSlots, Routing};

/// Tokens per parallel task; fixed so that sums do not depend on the thread count.
const TOKEN_CHUNK: usize = 1024;

/// Picks each token's experts from its probabilities and renormalises their gates.
/// Top-K breaks ties toward the lower expert index; Top-P takes the smallest prefix of the
/// descending order (ties: lower index first) whose mass reaches `top_p` (at least one expert).
pub fn select(probs: &[f32], n: usize, e: usize, moe: &MoeConfig) -> Routing {
    assert_eq!(probs.len(), n * e, "router probabilities");
    // Per chunk of tokens, each expert's (tokens, gates) in ascending token order.
    let chunks: Vec<ExpertLists> = probs
        .par_chunks(TOKEN_CHUNK * e)
        .enumerate()
        .map(|(c, block)| {
            let (mut keys, mut chosen) = (vec![0i32; e], Vec::with_capacity(e));
            let tokens = block.len() / e;
            let mut by_expert = vec![(Vec::with_capacity(tokens), Vec::with_capacity(tokens)); e];
            for (i, p) in block.chunks_exact(e).enumerate() {
                choose(p, moe, &mut keys, &mut chosen);
                // Gates over the chosen experts in ascending index order.
                chosen.sort_unstable();
                let sum = chosen.iter().fold(0.0f32, |s, &x| s + p[x]);
                for &x in &chosen {
                    by_expert[x].0.push((c * TOKEN_CHUNK + i) as u32);
                    by_expert[x].1.push(p[x] / sum);
                }
            }
            by_expert
        })
        .collect();
    Routing::from_expert_lists(n, e, &chunks)
}

/// Fills `chosen` with the experts token probabilities `p` route to, in descending order: the
/// largest first, each next the largest not yet chosen (ties to the lower index), until Top-K
/// has `top_k` or Top-P's mass reaches `top_p`. O(chosen × E) and branch-free per scan: the
/// probabilities become integers ordered as `f32::total_cmp` orders them, a chosen one `MIN`.
fn choose(p: &[f32], moe: &MoeConfig, keys: &mut [i32], chosen: &mut Vec<usize>) {
    let e = p.len();
    for (k, &v) in keys.iter_mut().zip(p) {
        let bits = v.to_bits() as i32;
        // MIN + 1 at least: MIN marks a chosen expert (only one negative NaN maps below).
        *k = (bits ^ (((bits >> 31) as u32) >> 1) as i32).max(i32::MIN + 1);
    }
    chosen.clear();
    let mut mass = 0.0f32;
    loop {
        let (mut best, mut key) = (0, keys[0]);
        for (x, &k) in keys.iter().enumerate().skip(1) {
            let more = k > key;
            best = if more { x } else { best };
            key = key.max(k);
        }
        keys[best] = i32::MIN;
        chosen.push(best);
        mass += p[best];
        let done = match moe.routing {
            RoutingKind::TopK => chosen.len() >= moe.top_k.min(e),
            RoutingKind::TopP => mass >= moe.top_p || chosen.len() == e,
        };
        if done {
            return;
        }
    }
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

    pub fn scale(&mut self, f: f32) {
        for v in [&mut self.load_balance, &mut self.p_penalty, &mut self.entropy, &mut self.z_loss] {
            *v *= f;
        }
    }
}

/// Share of tokens that activate each expert, `T_i = count_i / N` (Σ T_i = mean experts/token).
fn token_shares(routing: &Routing) -> Vec<f32> {
    routing.counts().iter().map(|&c| c as f32 / routing.n_tokens as f32).collect()
}

/// Evaluates the aux losses (papers.md §1 definitions; T_i from counts, P̂_i the mean probability).
pub fn aux_losses(probs: &[f32], logits: &[f32], routing: &Routing, moe: &MoeConfig) -> AuxLosses {
    let e = routing.n_experts;
    // Per chunk: Σ_t P_ti per expert, Σ_t entropy_t, Σ_t lse_t²; summed in chunk order.
    let partials: Vec<(Vec<f64>, f64, f64)> = probs
        .par_chunks(TOKEN_CHUNK * e)
        .zip(logits.par_chunks(TOKEN_CHUNK * e))
        .map(|(probs, logits)| {
            let (mut sum_p, mut entropy, mut z) = (vec![0f64; e], 0f64, 0f64);
            for (p, l) in probs.chunks_exact(e).zip(logits.chunks_exact(e)) {
                // −Σ P ln P with ln P_i = z_i − lse and Σ P = 1: lse − Σ P_i z_i, no log per expert.
                let lse = logsumexp(l, p);
                let mut dot = 0.0f32;
                for i in 0..e {
                    sum_p[i] += p[i] as f64;
                    dot += p[i] * l[i];
                }
                entropy += (lse - dot) as f64;
                z += lse as f64 * lse as f64;
            }
            (sum_p, entropy, z)
        })
        .collect();
    let (mut sum_p, mut entropy, mut z) = (vec![0f64; e], 0f64, 0f64);
    for (part, h, zz) in partials {
        sum_p.iter_mut().zip(&part).for_each(|(m, s)| *m += s);
        (entropy, z) = (entropy + h, z + zz);
    }
    aux_from_sums(routing, moe, &sum_p, entropy, z)
}

/// The aux losses from their sums over tokens: `Σ_t P_ti` per expert, `Σ_t (lse_t − ⟨P_t, z_t⟩)`
/// and `Σ_t lse_t²`, with `T_i` from the routing's counts.
fn aux_from_sums(routing: &Routing, moe: &MoeConfig, sum_p: &[f64], entropy: f64, z: f64) -> AuxLosses {
    let (nf, e) = (routing.n_tokens as f64, routing.n_experts);
    let shares = token_shares(routing);
    let sizes = moe.relative_sizes();
    let lb: f64 = (0..e).map(|i| shares[i] as f64 * sum_p[i] / nf).sum::<f64>() * e as f64;
    let pp: f64 = (0..e).map(|i| shares[i] as f64 * sizes[i] as f64 * sum_p[i] / nf).sum::<f64>() * e as f64;
    AuxLosses { load_balance: lb as f32, p_penalty: pp as f32, entropy: (entropy / nf) as f32, z_loss: (z / nf) as f32 }
}

/// The routing and aux losses of what [`Backend::route`] read back for `n` tokens.
pub fn from_slots(slots: RoutedSlots, n: usize, moe: &MoeConfig) -> (Routing, AuxLosses) {
    let e = slots.counts.len();
    let mut offsets = vec![0usize; e + 1];
    for (x, c) in slots.counts.iter().enumerate() {
        offsets[x + 1] = offsets[x] + c;
    }
    let routing = Routing { n_tokens: n, n_experts: e, token: slots.token, gate: slots.gate, offsets };
    let aux = aux_from_sums(&routing, moe, &slots.sum_probs, slots.entropy, slots.z);
    (routing, aux)
}

/// The backend's selection rule for `moe`.
pub fn rule(moe: &MoeConfig) -> RouteRule {
    match moe.routing {
        RoutingKind::TopK => RouteRule::TopK(moe.top_k),
        RoutingKind::TopP => RouteRule::TopP(moe.top_p),
    }
}

/// Routes one layer's `n` tokens over `e` experts: on the backend where it routes where the
/// probabilities lie ([`Backend::route`]: one small read-back instead of the `(n, e)`
/// probabilities and logits; its scratch a phase of the transient arena `tx`), else on the
/// host ([`select`], [`aux_losses`]).
pub fn route<B: Backend>(be: &B, probs: B::View<'_>, logits: B::View<'_>, n: usize, e: usize, moe: &MoeConfig, tx: &mut Arena<B>) -> (Routing, AuxLosses) {
    let rule = rule(moe);
    let words = be.route_scratch_len(n, e, rule);
    if words > 0 {
        tx.begin(be, router_phase(words).requests);
        let [scratch] = tx.views(be, [(0, words)]);
        if let Some(slots) = be.route(probs, logits, n, e, rule, scratch) {
            return from_slots(slots, n, moe);
        }
    }
    route_on_host(be, probs, logits, n, e, moe)
}

/// [`route`] on the host whatever the backend: the probabilities and logits read back, then
/// [`select`] and [`aux_losses`] on the backend's host threads.
pub fn route_on_host<B: Backend>(be: &B, probs: B::View<'_>, logits: B::View<'_>, n: usize, e: usize, moe: &MoeConfig) -> (Routing, AuxLosses) {
    let (probs_h, logits_h) = (be.download(probs), be.download(logits));
    be.host_work("route", || {
        let routing = select(&probs_h, n, e, moe);
        let aux = aux_losses(&probs_h, &logits_h, &routing, moe);
        (routing, aux)
    })
}

/// The host data of one layer's `Backend::router_bwd`: every chosen slot (the experts' capacity
/// may have dropped some, see [`Capped::router_slots`]) and the per-expert gradients of the
/// load-balance and P-Penalty losses. With the counts (`T_i`, before dropping) held fixed both
/// losses are linear in the mean probabilities, so their gradient is the same for every token.
pub struct BackwardArgs {
    slots: RouterSlots,
    load_balance: Vec<f32>,
    p_penalty: Vec<f32>,
    entropy: f32,
    z_loss: f32,
}

impl BackwardArgs {
    pub fn new(routing: &Capped, moe: &MoeConfig) -> Self {
        let (n, e) = (routing.kept.n_tokens as f32, routing.kept.n_experts);
        let shares: Vec<f32> = routing.chosen_counts().iter().map(|&c| c as f32 / n).collect();
        let sizes = moe.relative_sizes();
        BackwardArgs {
            slots: routing.router_slots(),
            load_balance: (0..e).map(|i| moe.load_balance * e as f32 * shares[i] / n).collect(),
            p_penalty: (0..e).map(|i| moe.p_penalty * e as f32 * shares[i] * sizes[i] / n).collect(),
            entropy: moe.entropy,
            z_loss: moe.z_loss,
        }
    }

    /// The op's argument.
    pub fn grad(&self) -> RouterGrad<'_> {
        RouterGrad {
            by_token: TokenSlots { offsets: &self.slots.offsets, slots: &self.slots.slots },
            slot_expert: &self.slots.expert,
            gate: &self.slots.gate,
            load_balance: &self.load_balance,
            p_penalty: &self.p_penalty,
            entropy: self.entropy,
            z_loss: self.z_loss,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Routing as Kind;
    use crate::model::routing::Choice;

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

    /// The selection as the definition states it: sort each token's experts, take the prefix,
    /// lay the choices out with `Routing::from_choices`. `select` must match it bit for bit.
    fn reference_select(probs: &[f32], n: usize, e: usize, moe: &MoeConfig) -> Routing {
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

    /// Router probabilities over `e` experts for `n` tokens, with exact ties and zeros mixed in.
    fn random_probs(n: usize, e: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::Rng::new(seed);
        let mut probs = Vec::with_capacity(n * e);
        for t in 0..n {
            let mut row: Vec<f32> = (0..e).map(|_| (2.0 * rng.normal() as f32).exp()).collect();
            if t % 5 == 0 {
                row[e - 1] = row[0]; // a tie
            }
            if t % 7 == 0 {
                row[1] = 0.0;
            }
            let s: f32 = row.iter().sum();
            probs.extend(row.iter().map(|v| v / s));
        }
        probs
    }

    /// The parallel, sort-free selection equals the definition bitwise, for Top-K and Top-P,
    /// over several token chunks and a ragged last one.
    #[test]
    fn select_matches_the_sorting_definition_bitwise() {
        let (n, e) = (3 * TOKEN_CHUNK + 77, 8);
        let probs = random_probs(n, e, 5);
        for (kind, k, p) in [(Kind::TopK, 1, 0.0), (Kind::TopK, 2, 0.0), (Kind::TopK, 8, 0.0), (Kind::TopP, 2, 0.5), (Kind::TopP, 2, 0.9), (Kind::TopP, 2, 1.0)] {
            let mut m = moe(kind);
            m.expert_widths = vec![16; e];
            (m.top_k, m.top_p) = (k, p);
            let (got, want) = (select(&probs, n, e, &m), reference_select(&probs, n, e, &m));
            assert_eq!(got.offsets, want.offsets, "{kind:?} k={k} p={p}");
            assert_eq!(got.token, want.token, "{kind:?} k={k} p={p}");
            let bits = |g: &[f32]| g.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got.gate), bits(&want.gate), "{kind:?} k={k} p={p}");
        }
    }

    /// Selection and aux losses give the same bits on 1 and 3 threads.
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let (n, e) = (2 * TOKEN_CHUNK + 300, 6);
        let probs = random_probs(n, e, 9);
        let logits: Vec<f32> = probs.iter().map(|p| p.max(1e-30).ln() + 0.5).collect();
        let mut m = moe(Kind::TopP);
        m.expert_widths = vec![8, 16, 24, 32, 40, 48];
        (m.load_balance, m.p_penalty, m.entropy, m.z_loss) = (0.01, 0.1, 0.03, 1e-3);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let r = select(&probs, n, e, &m);
                let aux = aux_losses(&probs, &logits, &r, &m);
                let gates: Vec<u32> = r.gate.iter().map(|x| x.to_bits()).collect();
                (r.token, gates, [aux.load_balance, aux.p_penalty, aux.entropy, aux.z_loss].map(f32::to_bits))
            })
        };
        assert_eq!(run(1), run(3));
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
