//! `memory.policy = "auto"`: of the plans that fit the device, the one that repeats the least
//! forward work.
//!
//! MEMO moves every layer's skeletal tensors off the device (all but the last two), which is
//! what the longest contexts need; where the device holds more, keeping is faster. The
//! candidates, each planned as `plan-memory` plans it: every layer keeping; the first k layers
//! offloading by MEMO's α and the rest keeping (k = 1 … all but the last two; the earliest
//! layers' copies have the longest to come back); MEMO with the last two layers recomputing;
//! the first k layers recomputing and the rest keeping (k = 1 … all: where the link is too
//! slow for an offload to hide); each of them with the experts' gate/up product saved and then
//! recomputed by the backward. The cost of a plan is the forward FLOPs a step repeats
//! ([`repeated_flops`]); α's limits keep its copies under the forward, so they cost no time.
//! Ties go to the earlier candidate: fewer bytes over the bus.

use super::alpha::{HostLink, UNSWAPPED_TAIL};
use super::plan::Strategy;
use super::policy::{offload_first, LayerFlops};
use super::report::{report_for, PlanTarget};
use super::store::LayerPolicy;
use crate::config::GateUp;
use crate::{Error, Result};

/// The policies `auto` chose, and what they cost.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    pub policies: Vec<LayerPolicy>,
    pub gate_up: GateUp,
    /// Forward FLOPs a step repeats under them ([`repeated_flops`]).
    pub repeated_flops: f64,
    /// The device bytes of their plan.
    pub device_bytes: u64,
}

/// Share of the device memory a chosen plan leaves free: the plan has come within [−3 %, +1 %]
/// of the measured peak (`tests/cuda_memory.rs`).
pub const HEADROOM: f64 = 0.02;

/// The cheapest candidate whose plan fits `device_mem` less [`HEADROOM`] and the host of
/// `link`; an error naming the leanest plan's needs when none does.
pub fn choose(target: &PlanTarget, batch: usize, seq: usize, device_mem: u64, link: HostLink) -> Result<Choice> {
    let limit = device_mem - (device_mem as f64 * HEADROOM) as u64;
    let n = target.model.n_layers;
    let swappable = n.saturating_sub(UNSWAPPED_TAIL);
    let mut best: Option<Choice> = None;
    let mut leanest: Option<(u64, u64)> = None;
    for gate_up in [GateUp::Save, GateUp::Recompute] {
        let costs = target.profile(batch, seq, link, gate_up)?.layer_costs(target.model, target.moe, batch, seq)?;
        let offloading = |k: usize| -> Result<Option<Vec<LayerPolicy>>> { offload_first(&costs, k, link, batch * seq) };
        let mut candidates = vec![vec![LayerPolicy::Keep; n]];
        for k in 1..=swappable {
            if let Some(mut head) = offloading(k)? {
                head.resize(n, LayerPolicy::Keep);
                candidates.push(head);
            }
        }
        if swappable > 0 {
            let mut head = offloading(swappable)?.unwrap_or_else(|| vec![LayerPolicy::Recompute; swappable]);
            head.resize(n, LayerPolicy::Recompute);
            candidates.push(head);
        }
        for k in 1..=n {
            let mut head = vec![LayerPolicy::Recompute; k];
            head.resize(n, LayerPolicy::Keep);
            candidates.push(head);
        }
        for policies in candidates {
            let report = report_for(target, batch, seq, &policies, gate_up, device_mem, link.m_host, Strategy::Heuristic)?;
            if leanest.is_none_or(|(d, _)| report.device_bytes < d) {
                leanest = Some((report.device_bytes, report.host_bytes));
            }
            if report.device_bytes > limit || report.host_bytes > link.m_host {
                continue;
            }
            let cost = repeated_flops(target, batch, seq, &policies, gate_up);
            if best.as_ref().is_none_or(|b| cost < b.repeated_flops) {
                best = Some(Choice { policies, gate_up, repeated_flops: cost, device_bytes: report.device_bytes });
            }
        }
    }
    best.ok_or_else(|| {
        let (device, host) = leanest.unwrap_or_default();
        Error::Invalid(format!(
            "memory.policy = \"auto\": no plan fits {:.2} GiB of device memory (less {:.0} % headroom) and {:.2} GiB of host memory at batch {batch} × seq {seq}; the leanest needs {:.2} GiB on the device and {:.2} GiB on the host: shorten the sequence or the batch, or allow more memory (memory.device_gib, memory.host_gib)",
            device_mem as f64 / GIB,
            100.0 * HEADROOM,
            link.m_host as f64 / GIB,
            device as f64 / GIB,
            host as f64 / GIB
        ))
    })
}

const GIB: f64 = (1u64 << 30) as f64;

/// Forward FLOPs a step of `target` at `batch × seq` repeats under `policies`: each layer's
/// token-split forward (everything but attention itself, whose output is saved whole) for the
/// tokens it does not keep (all of them recomputing, 1 − α offloading), and with the gate/up
/// product recomputed one more up projection of every routed row in every layer. Expected
/// routed counts, as the plan's.
pub fn repeated_flops(target: &PlanTarget, batch: usize, seq: usize, policies: &[LayerPolicy], gate_up: GateUp) -> f64 {
    let f = LayerFlops::of(target.model, target.moe, batch, seq);
    let tokens = batch * seq;
    // Rows from the split token on are dropped and recomputed (none where nothing is split).
    let dropped: f64 = policies.iter().map(|p| (tokens - p.split_token(tokens).unwrap_or(tokens)) as f64).sum();
    let gate_up_flops = if gate_up == GateUp::Recompute { f.up_projection * policies.len() as f64 } else { 0.0 };
    dropped * f.token_split / tokens as f64 + gate_up_flops
}

/// Forward FLOPs of the blocks of a step of `target` at `batch × seq` (the cost model's:
/// expected routed counts, causal attention).
pub fn blocks_forward_flops(target: &PlanTarget, batch: usize, seq: usize) -> f64 {
    let f = LayerFlops::of(target.model, target.moe, batch, seq);
    (f.token_split + f.attention) * target.model.n_layers as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::memory::report::plan_target;

    /// The tiny config with 6 layers on CUDA (bf16 sizes, the backend's buffers), auto.
    fn config() -> Config {
        let set = ["device=cuda", "model.n_layers=6", "memory.policy=\"auto\""];
        Config::default_with(&set.map(String::from)).unwrap()
    }

    const SEQ: usize = 128;
    const BATCH: usize = 4;
    /// A link fast enough for every offload to hide (α = 1), with room for everything.
    const FAST: HostLink = HostLink { b_pcie: 1e15, m_host: 1 << 40 };

    fn choose_within(config: &Config, device_mem: u64, link: HostLink) -> Result<Choice> {
        choose(&PlanTarget::of(config), BATCH, SEQ, device_mem, link)
    }

    fn keep_bytes(config: &Config) -> u64 {
        choose_within(config, u64::MAX, FAST).unwrap().device_bytes
    }

    #[test]
    fn keeps_everything_where_it_fits() {
        let c = config();
        let choice = choose_within(&c, u64::MAX, FAST).unwrap();
        assert_eq!((choice.policies, choice.gate_up, choice.repeated_flops), (vec![LayerPolicy::Keep; 6], GateUp::Save, 0.0));
    }

    /// Just short of keeping everything, a fast link offloads the first layer whole and the
    /// others keep: nothing is recomputed.
    #[test]
    fn offloads_the_fewest_first_layers_a_fast_link_hides() {
        let c = config();
        let keep = keep_bytes(&c);
        let budget = ((keep - 1) as f64 / (1.0 - HEADROOM)) as u64;
        let choice = choose_within(&c, budget, FAST).unwrap();
        let mut want = vec![LayerPolicy::Keep; 6];
        want[0] = LayerPolicy::Offload { alpha: 1.0 };
        assert_eq!((choice.policies, choice.gate_up, choice.repeated_flops), (want, GateUp::Save, 0.0));
        assert!(choice.device_bytes < keep);
    }

    /// As the device shrinks from what keeping takes to the leanest plan, the chosen plan always
    /// fits (with the headroom), repeats no less work than at a larger device, and is the one
    /// that repeats the least of all that fit; below the leanest, an error that says what to do.
    #[test]
    fn repeats_no_more_than_needed_as_the_device_shrinks() {
        let c = config();
        let slow = HostLink { b_pcie: 1e8, m_host: 1 << 40 };
        let target = PlanTarget::of(&c);
        let keep = keep_bytes(&c);
        let recompute_all = report_for(&target, BATCH, SEQ, &[LayerPolicy::Recompute; 6], GateUp::Recompute, u64::MAX, 0, Strategy::Heuristic).unwrap().device_bytes;
        assert!(recompute_all < keep);
        let mut last = 0.0;
        let mut kinds = std::collections::BTreeSet::new();
        for step in 0..=40 {
            let device = recompute_all + (keep - recompute_all) * (40 - step) / 40;
            let budget = (device as f64 / (1.0 - HEADROOM)) as u64 + 1;
            let choice = choose_within(&c, budget, slow).unwrap_or_else(|e| panic!("{device} B: {e}"));
            assert!(choice.device_bytes as f64 <= budget as f64 * (1.0 - HEADROOM), "{choice:?} past {budget}");
            assert!(choice.repeated_flops >= last, "{device} B: {choice:?} repeats less than at a larger device ({last})");
            last = choice.repeated_flops;
            kinds.insert(format!("{:?}", (crate::memory::store::policy_label(&choice.policies), choice.gate_up)));
            // No plan that fits repeats less: every layer keeping or recomputing, each way of the gate/up product.
            for gate_up in [GateUp::Save, GateUp::Recompute] {
                for recomputing in 0..=6 {
                    let mut policies = vec![LayerPolicy::Keep; 6];
                    policies[..recomputing].fill(LayerPolicy::Recompute);
                    let bytes = report_for(&target, BATCH, SEQ, &policies, gate_up, u64::MAX, 0, Strategy::Heuristic).unwrap().device_bytes;
                    if bytes as f64 <= budget as f64 * (1.0 - HEADROOM) {
                        assert!(repeated_flops(&target, BATCH, SEQ, &policies, gate_up) >= choice.repeated_flops, "{device} B: {policies:?} {gate_up:?} fits and repeats less than {choice:?}");
                    }
                }
            }
        }
        assert!(kinds.len() >= 3, "the sweep saw only {kinds:?}");
        let e = choose_within(&c, recompute_all / 2, slow).unwrap_err().to_string();
        assert!(e.contains("memory.device_gib") && e.contains("leanest"), "{e}");
    }

    /// plan-memory reports what auto chose, and the forward work it repeats.
    #[test]
    fn plan_memory_reports_the_choice() {
        let c = config();
        let keep = keep_bytes(&c);
        let report = plan_target(&PlanTarget::of(&c), SEQ, BATCH, keep - 1, 1 << 40, 1e15).unwrap();
        assert_eq!(report.layers[0].policy, LayerPolicy::Offload { alpha: 1.0 });
        assert!(report.fits && report.repeated_flops == 0.0 && report.forward_flops > 0.0);
        let text = report.to_string();
        assert!(report.auto && text.contains("memory.policy = \"auto\"") && text.contains("offload α=1.000") && text.contains("recompute repeats 0.00 TFLOP"), "{text}");
    }
}
