//! From the `[memory]` config section to one [`LayerPolicy`] per block.
//!
//! `alpha = "auto"` solves MEMO's α LP ([`super::alpha`]) on per-layer costs: skeletal sizes from
//! the inventory (with the routed counts of a [`Profile`] when it has them) and forward times from
//! a measured profile or a FLOP cost model. The last [`UNSWAPPED_TAIL`] layers keep everything:
//! their backward starts before an offload could come back.

use serde::Serialize;

use super::alpha::{plan_alpha, AlphaOutcome, HostLink, LayerCost, UNSWAPPED_TAIL};
use super::inventory::{block_inventory, Skeletal, Slots};
use super::store::LayerPolicy;
use crate::config::{Alpha, MemoryConfig, MemoryPolicy};
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
}

impl Profile {
    /// Forward times from FLOPs at `flops_per_s` (matmuls with the expected routed counts and
    /// causal attention, the same accounting as `Model::forward_flops`), dropless expected slots.
    pub fn cost_model(model: &ModelConfig, moe: &MoeConfig, batch: usize, seq: usize, flops_per_s: f64, link: HostLink) -> Result<Self> {
        if !(flops_per_s.is_finite() && flops_per_s > 0.0) {
            return Err(Error::config("flops_per_s", flops_per_s, "a finite rate > 0"));
        }
        let n = (batch * seq) as f64;
        let (c, d) = (model.d_model as f64, model.head_dim() as f64);
        let (w, a) = ((model.n_heads + 2 * model.n_kv_heads) as f64 * d, model.n_heads as f64 * d);
        let slots = Slots::Expected.per_expert(moe, batch * seq);
        let experts: f64 = slots.iter().zip(&moe.expert_widths).map(|(&s, &h)| 6.0 * c * h as f64 * s as f64).sum();
        let flops = 2.0 * n * c * (w + a) + 2.0 * seq as f64 * a * n + 2.0 * n * c * moe.n_experts() as f64 + experts;
        Ok(Profile { t_fwd: vec![flops / flops_per_s; model.n_layers], slots: vec![Slots::Expected; model.n_layers], link, activation_bytes: 4 })
    }

    /// A measured step: per-block forward seconds and routed counts per expert.
    pub fn measured(t_fwd: Vec<f64>, counts: Vec<Vec<usize>>, link: HostLink) -> Self {
        Profile { t_fwd, slots: counts.into_iter().map(Slots::Measured).collect(), link, activation_bytes: 4 }
    }

    /// The same profile for activations of `bytes` bytes per element (f32 by default).
    pub fn with_activation_bytes(self, bytes: u64) -> Self {
        Profile { activation_bytes: bytes, ..self }
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
                let s = Skeletal::of(&block_inventory(model, moe, batch, seq, &slots.per_expert(moe, batch * seq), self.activation_bytes));
                LayerCost { s_input: s.input, s_attn: s.attn, s_others: s.others, t_fwd }
            })
            .collect())
    }
}

/// One policy per block for `cfg`. `Keep` and `Recompute` apply to every block; `Offload` to all
/// but the last [`UNSWAPPED_TAIL`] (which keep), with the fixed α or the LP's. When the LP finds
/// that even α = 0 breaks a limit, the swapped blocks recompute instead (nothing to copy).
pub fn build_policy(cfg: &MemoryConfig, model: &ModelConfig, moe: &MoeConfig, batch: usize, seq: usize, profile: &Profile) -> Result<Vec<LayerPolicy>> {
    let n = model.n_layers;
    let swapped = n.saturating_sub(UNSWAPPED_TAIL);
    let tail = |mut head: Vec<LayerPolicy>| {
        head.resize(n, LayerPolicy::Keep);
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
        (MemoryPolicy::Offload, Alpha::Auto) => match plan_alpha(&profile.layer_costs(model, moe, batch, seq)?, profile.link)? {
            AlphaOutcome::Swap(plan) => tail(plan.alpha.iter().map(|&a| LayerPolicy::Offload { alpha: a.clamp(0.0, 1.0) as f32 }).collect()),
            AlphaOutcome::Infeasible(_) => tail(vec![LayerPolicy::Recompute; swapped]),
        },
    })
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
        let cfg = MemoryConfig { policy: MemoryPolicy::Offload, alpha: Alpha::Auto, host_gib: 8.0, bandwidth_gbs: 10.0 };
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

    #[test]
    fn fixed_policies_and_bad_input() {
        let (m, moe) = shape();
        let p = Profile::cost_model(&m, &moe, 1, 256, 1e9, HostLink { b_pcie: 1e9, m_host: 0 }).unwrap();
        let fixed = MemoryConfig { policy: MemoryPolicy::Offload, alpha: Alpha::Fixed(0.25), host_gib: 8.0, bandwidth_gbs: 10.0 };
        assert_eq!(build_policy(&fixed, &m, &moe, 1, 256, &p).unwrap()[0], LayerPolicy::Offload { alpha: 0.25 });
        let rec = MemoryConfig { policy: MemoryPolicy::Recompute, alpha: Alpha::Auto, host_gib: 8.0, bandwidth_gbs: 10.0 };
        assert_eq!(build_policy(&rec, &m, &moe, 1, 256, &p).unwrap(), vec![LayerPolicy::Recompute; 4]);
        let bad = MemoryConfig { policy: MemoryPolicy::Offload, alpha: Alpha::Fixed(2.0), host_gib: 8.0, bandwidth_gbs: 10.0 };
        assert!(build_policy(&bad, &m, &moe, 1, 256, &p).is_err());
        let short = Profile::measured(vec![1.0], vec![vec![1; 4]], p.link);
        let auto = MemoryConfig { policy: MemoryPolicy::Offload, alpha: Alpha::Auto, host_gib: 8.0, bandwidth_gbs: 10.0 };
        assert!(build_policy(&auto, &m, &moe, 1, 256, &short).is_err());
    }
}
