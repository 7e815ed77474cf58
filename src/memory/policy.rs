//! From the `[memory]` config section to one [`LayerPolicy`] per block.
//!
//! `alpha = "auto"` solves MEMO's α LP ([`super::alpha`]) on per-layer costs: skeletal sizes from
//! the inventory (with the routed counts of a [`Profile`] when it has them) and forward times from
//! a measured profile or a FLOP cost model. The last [`UNSWAPPED_TAIL`] layers are not swapped:
//! their backward starts before an offload could come back; they keep everything, or recompute
//! (`memory.tail`).

use serde::Serialize;

use super::alpha::{plan_alpha, AlphaOutcome, HostLink, LayerCost, UNSWAPPED_TAIL};
use super::inventory::{block_inventory, Skeletal, Slots};
use super::store::LayerPolicy;
use crate::config::{Alpha, GateUp, MemoryConfig, MemoryPolicy, Tail};
use crate::model::config::{ModelConfig, MoeConfig};
use crate::{Error, Result};

/// What the α LP needs to know about the machine and the model's behaviour.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Profile {
    /// Forward time of each block in seconds.
    pub t_fwd: Vec<f64>,
    /// Slots per expert of each block (measured), or one rule for all blocks.
    #[serde(skip)]
    pub slots: Vec<Slots>,
    pub link: HostLink,
    /// Bytes per activation element on the device (4 for f32, 2 for bf16).
    pub activation_bytes: u64,
    /// Whether the blocks save the experts' gate/up product (`memory.gate_up`).
    pub gate_up: GateUp,
}

impl Profile {
    /// Forward times from FLOPs at `flops_per_s` (matmuls with the expected routed counts and
    /// causal attention, the same accounting as `Model::forward_flops`), dropless expected slots.
    pub fn cost_model(model: &ModelConfig, moe: &MoeConfig, batch: usize, seq: usize, flops_per_s: f64, link: HostLink) -> Result<Self> {
        if !(flops_per_s.is_finite() && flops_per_s > 0.0) {
            return Err(Error::config("flops_per_s", flops_per_s, "a finite rate > 0"));
        }
        let f = LayerFlops::of(model, moe, batch, seq);
        let flops = f.attention + f.token_split;
        Ok(Profile { t_fwd: vec![flops / flops_per_s; model.n_layers], slots: vec![Slots::Expected; model.n_layers], link, activation_bytes: 4, gate_up: GateUp::Save })
    }

    /// A measured step: per-block forward seconds and routed counts per expert.
    pub fn measured(t_fwd: Vec<f64>, counts: Vec<Vec<usize>>, link: HostLink) -> Self {
        Profile { t_fwd, slots: counts.into_iter().map(Slots::Measured).collect(), link, activation_bytes: 4, gate_up: GateUp::Save }
    }

    /// The same profile for activations of `bytes` bytes per element (f32 by default).
    pub fn with_activation_bytes(self, bytes: u64) -> Self {
        Profile { activation_bytes: bytes, ..self }
    }

    /// The same profile with every block's routed slots by `slots` (e.g. under an expert
    /// capacity, [`Slots::expected`]).
    pub fn with_slots(self, slots: Slots) -> Self {
        Profile { slots: vec![slots; self.t_fwd.len()], ..self }
    }

    /// The same profile for blocks that save the gate/up product or not (`memory.gate_up`).
    pub fn with_gate_up(self, gate_up: GateUp) -> Self {
        Profile { gate_up, ..self }
    }

    /// Per-block costs for the α LP.
    pub fn layer_costs(&self, model: &ModelConfig, moe: &MoeConfig, batch: usize, seq: usize) -> Result<Vec<LayerCost>> {
        if self.t_fwd.len() != model.n_layers || self.slots.len() != model.n_layers {
            return Err(Error::Invalid(format!(
                "profile covers {} forward times and {} slot counts for {} layers",
                self.t_fwd.len(),
                self.slots.len(),
                model.n_layers
            )));
        }
        Ok(self
            .slots
            .iter()
            .zip(&self.t_fwd)
            .map(|(slots, &t_fwd)| {
                let s = Skeletal::of(&block_inventory(model, moe, batch, seq, &slots.per_expert(moe, batch * seq), self.activation_bytes, self.gate_up));
                LayerCost { s_input: s.input, s_attn: s.attn, s_others: s.others, t_fwd }
            })
            .collect())
    }
}

/// One block's forward FLOPs over all `batch × seq` tokens with the expected routed counts
/// (the cost model of MEMO's α and of `memory::auto`): attention itself (causal), the rest
/// (token by token: the projections, the router and the experts; norms aside), and of that the
/// experts' up projection (gate and up).
pub struct LayerFlops {
    pub attention: f64,
    pub token_split: f64,
    pub up_projection: f64,
}

impl LayerFlops {
    pub fn of(model: &ModelConfig, moe: &MoeConfig, batch: usize, seq: usize) -> Self {
        let n = (batch * seq) as f64;
        let (c, d) = (model.d_model as f64, model.head_dim() as f64);
        let (w, a) = ((model.n_heads + 2 * model.n_kv_heads) as f64 * d, model.n_heads as f64 * d);
        // Σ over experts of width × routed rows: the up projection is 4·c of it, the down 2·c.
        let routed_width: f64 = Slots::Expected.per_expert(moe, batch * seq).iter().zip(&moe.expert_widths).map(|(&s, &h)| h as f64 * s as f64).sum();
        LayerFlops {
            attention: 2.0 * seq as f64 * a * n,
            token_split: 2.0 * n * c * (w + a) + 2.0 * n * c * moe.n_experts() as f64 + 6.0 * c * routed_width,
            up_projection: 4.0 * c * routed_width,
        }
    }
}

/// One policy per block for `cfg`. `Keep` and `Recompute` apply to every block; `Offload` to all
/// but the last [`UNSWAPPED_TAIL`] (which keep, or recompute with `tail = "recompute"`), with the
/// fixed α or the LP's. When the LP finds that even α = 0 breaks a limit, the swapped blocks
/// recompute instead (nothing to copy).
pub fn build_policy(cfg: &MemoryConfig, model: &ModelConfig, moe: &MoeConfig, batch: usize, seq: usize, profile: &Profile) -> Result<Vec<LayerPolicy>> {
    let n = model.n_layers;
    let swapped = n.saturating_sub(UNSWAPPED_TAIL);
    let tail = |mut head: Vec<LayerPolicy>| {
        head.resize(
            n,
            match cfg.tail {
                Tail::Keep => LayerPolicy::Keep,
                Tail::Recompute => LayerPolicy::Recompute,
            },
        );
        head
    };
    Ok(match (cfg.policy, cfg.alpha) {
        (MemoryPolicy::Keep, _) => vec![LayerPolicy::Keep; n],
        (MemoryPolicy::Recompute, _) => vec![LayerPolicy::Recompute; n],
        (MemoryPolicy::Offload, Alpha::Fixed(alpha)) => {
            if !(0.0..=1.0).contains(&alpha) {
                return Err(Error::config("memory.alpha", alpha, "a number in [0, 1] or \"auto\""));
            }
            tail(vec![LayerPolicy::Offload { alpha }; swapped])
        }
        (MemoryPolicy::Offload, Alpha::Auto) => {
            let costs = profile.layer_costs(model, moe, batch, seq)?;
            tail(offload_first(&costs, swapped, profile.link, batch * seq)?.unwrap_or_else(|| vec![LayerPolicy::Recompute; swapped]))
        }
        (MemoryPolicy::Auto, _) => return Err(Error::Invalid("memory.policy = \"auto\" is chosen by memory::auto, which plans the device's memory".into())),
    })
}

/// The first `swapped` layers offloading by MEMO's α from the LP on `costs` (each layer's copy
/// hidden under its forward, all of them within the host), in whole tokens of `tokens`; `None`
/// where even α = 0 breaks a limit. Needs the [`UNSWAPPED_TAIL`] layers after them in `costs`:
/// the LP swaps all but the last two of what it is given.
pub fn offload_first(costs: &[LayerCost], swapped: usize, link: HostLink, tokens: usize) -> Result<Option<Vec<LayerPolicy>>> {
    let given = &costs[..(swapped + UNSWAPPED_TAIL).min(costs.len())];
    Ok(match plan_alpha(given, link)? {
        AlphaOutcome::Swap(plan) => Some(in_whole_tokens(&plan.alpha, given, link.m_host, tokens)),
        AlphaOutcome::Infeasible(_) => None,
    })
}

/// The LP's α as the store applies it: the store offloads ⌈α·tokens⌉ rows, so each α is rounded
/// down to whole rows, and rows come off the layer with the most until the host holds them all
/// (the LP meets its limits within a relative tolerance, and an α on the host limit rounded up
/// would pass it).
fn in_whole_tokens(alpha: &[f64], costs: &[LayerCost], m_host: u64, tokens: usize) -> Vec<LayerPolicy> {
    let offload = |rows: usize| LayerPolicy::Offload { alpha: alpha_for_rows(rows, tokens) };
    let host = |rows: &[usize]| -> u128 { costs.iter().zip(rows).map(|(c, &r)| (c.s_input + c.s_attn + offload(r).offloaded_others(c.s_others, tokens)) as u128).sum() };
    // A row within a millionth of a whole one counts whole (the LP's answer is a float); the
    // host check below takes it back if that passes the limit.
    let mut rows: Vec<usize> = alpha.iter().map(|&a| ((a.clamp(0.0, 1.0) * tokens as f64 + 1e-6).floor() as usize).min(tokens)).collect();
    while host(&rows) > m_host as u128 {
        let Some(most) = (0..rows.len()).filter(|&i| rows[i] > 0).max_by_key(|&i| rows[i]) else { break };
        rows[most] -= 1;
    }
    rows.into_iter().map(offload).collect()
}

/// The α (an f32) whose ⌈α·tokens⌉ is exactly `rows`.
fn alpha_for_rows(rows: usize, tokens: usize) -> f32 {
    let split = |alpha: f32| LayerPolicy::Offload { alpha }.split_token(tokens).unwrap_or(0);
    let mut alpha = (rows as f64 / tokens.max(1) as f64) as f32;
    while alpha > 0.0 && split(alpha) > rows {
        alpha = alpha.next_down();
    }
    while split(alpha) < rows {
        alpha = alpha.next_up();
    }
    alpha
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Routing;

    fn shape() -> (ModelConfig, MoeConfig) {
        let m = ModelConfig { vocab_size: 64, d_model: 64, n_layers: 4, n_heads: 4, n_kv_heads: 4, seq_len: 256, rope_theta: 1e4, norm_eps: 1e-5, init_std: 0.1 };
        let moe = MoeConfig { expert_widths: vec![32, 64, 96, 128], routing: Routing::TopK, top_k: 2, top_p: 0.6, load_balance: 0.0, p_penalty: 0.0, entropy: 0.0, z_loss: 0.0 };
        (m, moe)
    }

    #[test]
    fn auto_alpha_follows_the_host_budget_and_keeps_the_tail() {
        let (m, moe) = shape();
        let cfg = MemoryConfig { policy: MemoryPolicy::Offload, alpha: Alpha::Auto, host_gib: 8.0, bandwidth_gbs: 10.0, tail: Tail::Keep, gate_up: GateUp::Save, device_gib: 0.0 };
        let costs = |host| Profile::cost_model(&m, &moe, 1, 256, 1e9, HostLink { b_pcie: 1e12, m_host: host }).unwrap();
        let big = build_policy(&cfg, &m, &moe, 1, 256, &costs(1 << 40)).unwrap();
        assert_eq!(big[..2], [LayerPolicy::Offload { alpha: 1.0 }; 2]);
        assert_eq!(big[2..], [LayerPolicy::Keep; 2]);
        let lc = costs(0).layer_costs(&m, &moe, 1, 256).unwrap()[0];
        // Room for the whole tensors of both swapped layers and half the rest of each.
        let host = 2 * (lc.s_input + lc.s_attn) + lc.s_others;
        let half = build_policy(&cfg, &m, &moe, 1, 256, &costs(host)).unwrap();
        for p in &half[..2] {
            let LayerPolicy::Offload { alpha } = p else { panic!("{p:?}") };
            assert!((alpha - 0.5).abs() < 1e-4, "{alpha}");
        }
        // No room even for the inputs: recompute instead.
        let none = build_policy(&cfg, &m, &moe, 1, 256, &costs(10)).unwrap();
        assert_eq!(none[..2], [LayerPolicy::Recompute; 2]);
    }

    /// An α on the host limit that falls between whole tokens: rounded up, as the store rounds
    /// a split, it would pass the limit; rounded down it does not.
    #[test]
    fn auto_alpha_on_the_host_limit_stays_inside_it_in_whole_tokens() {
        let (m, moe) = shape();
        let cfg = MemoryConfig { policy: MemoryPolicy::Offload, alpha: Alpha::Auto, host_gib: 8.0, bandwidth_gbs: 10.0, tail: Tail::Keep, gate_up: GateUp::Save, device_gib: 0.0 };
        let costs = |host| Profile::cost_model(&m, &moe, 1, 256, 1e9, HostLink { b_pcie: 1e12, m_host: host }).unwrap();
        let lc = costs(0).layer_costs(&m, &moe, 1, 256).unwrap()[0];
        let per_token = lc.s_others / 256;
        assert_eq!(lc.s_others, 256 * per_token, "token-split tensors");
        // Both swapped layers' whole tensors and 100.5 tokens of the rest of each.
        let host = 2 * (lc.s_input + lc.s_attn) + 201 * per_token;
        let policies = build_policy(&cfg, &m, &moe, 1, 256, &costs(host)).unwrap();
        let used: u64 = policies[..2].iter().map(|p| lc.s_input + lc.s_attn + p.offloaded_others(lc.s_others, 256)).sum();
        assert!(used <= host, "{policies:?} use {used} bytes of host memory, more than {host}");
        assert!(policies[..2].iter().all(|p| p.split_token(256) == Some(100)), "{policies:?}");
        // Whole tokens exactly: the LP's α (tolerance aside) is kept.
        let exact = build_policy(&cfg, &m, &moe, 1, 256, &costs(host + per_token)).unwrap();
        assert!(exact[..2].iter().all(|p| p.split_token(256) == Some(101)), "{exact:?}");
    }

    #[test]
    fn alpha_for_rows_gives_exactly_those_rows() {
        for tokens in [1, 7, 256, 524_288, 1 << 20] {
            for rows in [0, 1, tokens / 3, tokens / 2 + 1, tokens - 1, tokens] {
                assert_eq!(LayerPolicy::Offload { alpha: alpha_for_rows(rows, tokens) }.split_token(tokens), Some(rows), "{rows} of {tokens}");
            }
        }
    }

    #[test]
    fn fixed_policies_and_bad_input() {
        let (m, moe) = shape();
        let p = Profile::cost_model(&m, &moe, 1, 256, 1e9, HostLink { b_pcie: 1e9, m_host: 0 }).unwrap();
        let fixed = MemoryConfig { policy: MemoryPolicy::Offload, alpha: Alpha::Fixed(0.25), host_gib: 8.0, bandwidth_gbs: 10.0, tail: Tail::Keep, gate_up: GateUp::Save, device_gib: 0.0 };
        let policies = build_policy(&fixed, &m, &moe, 1, 256, &p).unwrap();
        assert_eq!(policies, [[LayerPolicy::Offload { alpha: 0.25 }; 2], [LayerPolicy::Keep; 2]].concat());
        let lean = MemoryConfig { tail: Tail::Recompute, ..fixed.clone() };
        assert_eq!(build_policy(&lean, &m, &moe, 1, 256, &p).unwrap(), [[LayerPolicy::Offload { alpha: 0.25 }; 2], [LayerPolicy::Recompute; 2]].concat());
        let rec = MemoryConfig { policy: MemoryPolicy::Recompute, alpha: Alpha::Auto, host_gib: 8.0, bandwidth_gbs: 10.0, tail: Tail::Keep, gate_up: GateUp::Save, device_gib: 0.0 };
        assert_eq!(build_policy(&rec, &m, &moe, 1, 256, &p).unwrap(), vec![LayerPolicy::Recompute; 4]);
        let bad = MemoryConfig { policy: MemoryPolicy::Offload, alpha: Alpha::Fixed(2.0), host_gib: 8.0, bandwidth_gbs: 10.0, tail: Tail::Keep, gate_up: GateUp::Save, device_gib: 0.0 };
        assert!(build_policy(&bad, &m, &moe, 1, 256, &p).is_err());
        let short = Profile::measured(vec![1.0], vec![vec![1; 4]], p.link);
        let auto = MemoryConfig { policy: MemoryPolicy::Offload, alpha: Alpha::Auto, host_gib: 8.0, bandwidth_gbs: 10.0, tail: Tail::Keep, gate_up: GateUp::Save, device_gib: 0.0 };
        assert!(build_policy(&auto, &m, &moe, 1, 256, &short).is_err());
    }
}
