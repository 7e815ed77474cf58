//! The search space: parallel mappings that satisfy the folding rules, and where their groups sit.
//!
//! A mapping's validity and its process groups come from [`ParallelLayout`] (Megatron's
//! `RankGenerator` semantics, order `tp-cp-ep-dp-pp`), so the planner costs exactly the groups a
//! run would build. For each group kind we record how many nodes one group spans: a group inside
//! one node talks over NVLink, one that spans nodes is limited by InfiniBand.

use serde::Serialize;

use super::model::ClusterModel;
use crate::parallel::ranks::{AttnGroup, MoeGroup, ParallelConfig, ParallelLayout};

/// Megatron's default order, fastest-varying axis first: TP and CP (and the EP they fold into)
/// are packed inside nodes, PP outermost.
pub const ORDER: &str = "tp-cp-ep-dp-pp";

/// Sizes of every axis of one candidate, plus the micro-batch and virtual pipeline size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Mapping {
    pub tp: usize,
    pub cp: usize,
    pub dp: usize,
    pub pp: usize,
    /// Virtual pipeline stages (model chunks) per pipeline rank; 1 = plain 1F1B.
    pub vp: usize,
    pub ep: usize,
    pub etp: usize,
    pub edp: usize,
    /// Sequences per micro-batch.
    pub micro_batch: usize,
}

impl Mapping {
    pub fn world(&self) -> usize {
        self.tp * self.cp * self.dp * self.pp
    }

    /// Short label, e.g. `TP1 CP1 PP4 VP8 EP8 ETP1 DP16 EDP2 mb1`.
    pub fn label(&self) -> String {
        format!(
            "TP{} CP{} PP{} VP{} EP{} ETP{} DP{} EDP{} mb{}",
            self.tp, self.cp, self.pp, self.vp, self.ep, self.etp, self.dp, self.edp, self.micro_batch
        )
    }
}

/// How far one group of a kind reaches: its size and the number of nodes it spans.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Span {
    pub size: usize,
    pub nodes: usize,
}

impl Span {
    pub fn intra_node(&self) -> bool {
        self.nodes <= 1
    }
}

/// The spans of the groups each communication uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Topology {
    pub tp: Span,
    pub cp: Span,
    /// Dense gradients are reduced over DP×CP (Megatron's `dp-cp` group).
    pub dp_cp: Span,
    pub pp: Span,
    pub ep: Span,
    pub etp: Span,
    pub edp: Span,
}

/// The widest span over all groups of a token (all groups of a token are translates, but a
/// group may straddle a node boundary when sizes do not divide the node).
fn span(groups: &[Vec<usize>], gpus_per_node: usize) -> Span {
    let mut worst = Span { size: 0, nodes: 0 };
    for g in groups {
        let mut nodes: Vec<usize> = g.iter().map(|r| r / gpus_per_node).collect();
        nodes.sort_unstable();
        nodes.dedup();
        if nodes.len() > worst.nodes {
            worst = Span { size: g.len(), nodes: nodes.len() };
        }
    }
    worst
}

/// Builds the layout of `(tp, cp, pp, ep, etp)` over `world` ranks; `Ok(None)` when the folding
/// rules reject it (then it is simply not a candidate).
pub fn topology(
    world: usize,
    gpus_per_node: usize,
    (tp, cp, pp, ep, etp): (usize, usize, usize, usize, usize),
) -> Option<Topology> {
    let cfg = ParallelConfig { world, tp, cp, pp, ep, etp, order: ORDER.to_string() };
    let layout = ParallelLayout::new(&cfg).ok()?;
    let a = |g| span(layout.attention_groups(g), gpus_per_node);
    let m = |g| span(layout.moe_groups(g), gpus_per_node);
    Some(Topology {
        tp: a(AttnGroup::Tp),
        cp: a(AttnGroup::Cp),
        dp_cp: a(AttnGroup::DpCp),
        pp: a(AttnGroup::Pp),
        ep: m(MoeGroup::Ep),
        etp: m(MoeGroup::Tp),
        edp: m(MoeGroup::Dp),
    })
}

pub fn divisors(n: usize) -> Vec<usize> {
    (1..=n).filter(|d| n.is_multiple_of(*d)).collect()
}

/// Shortest sequence chunk CP may leave (load-balanced CP cuts the sequence into 2·CP chunks):
/// shorter chunks starve the attention kernel and the KV ring's latency dominates.
pub const MIN_CP_CHUNK: usize = 512;

/// The axis sizes `(tp, cp, pp, ep, etp)` worth building a layout for: TP and ETP inside a node
/// and dividing the heads and widths they split, CP cutting the sequence into 2·CP chunks of at
/// least [`MIN_CP_CHUNK`] tokens, PP no larger than the layer count, EP dividing the experts.
pub fn axis_choices(model: &ClusterModel, world: usize, gpus_per_node: usize, seq: usize) -> Vec<(usize, usize, usize, usize, usize)> {
    let a = &model.attention;
    let (experts, widths): (usize, Vec<usize>) = match &model.moe {
        Some(m) => (m.n_experts(), m.widths.clone()),
        None => (1, vec![]),
    };
    let mut out = Vec::new();
    for tp in divisors(world) {
        if tp > gpus_per_node || !a.n_heads.is_multiple_of(tp) || !a.n_kv_heads.is_multiple_of(tp) {
            continue;
        }
        for cp in divisors(world / tp) {
            if cp > 1 && (!seq.is_multiple_of(2 * cp) || seq / (2 * cp) < MIN_CP_CHUNK) {
                continue;
            }
            for pp in divisors(world / (tp * cp)) {
                if pp > model.n_layers {
                    continue;
                }
                for ep in divisors(experts) {
                    if !(world / pp).is_multiple_of(ep) {
                        continue;
                    }
                    for etp in divisors(world / (pp * ep)) {
                        let splits_widths = widths.iter().all(|w| w.is_multiple_of(etp));
                        let expert_tp_ok = if model.moe.is_some() { splits_widths } else { etp == 1 };
                        if etp <= gpus_per_node && expert_tp_ok {
                            out.push((tp, cp, pp, ep, etp));
                        }
                    }
                }
            }
        }
    }
    out
}

/// Layers per pipeline stage: contiguous, the first `n_layers % pp` stages one layer longer.
pub fn stage_layers(n_layers: usize, pp: usize) -> Vec<std::ops::Range<usize>> {
    let (base, extra) = (n_layers / pp, n_layers % pp);
    let mut start = 0;
    (0..pp)
        .map(|s| {
            let len = base + usize::from(s < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect()
}

/// Virtual pipeline sizes for `pp` stages and `micro_batches` micro-batches: divisors of the
/// layers per stage when the layers split evenly, and only when Megatron's interleaved schedule
/// accepts the micro-batch count (a multiple of `pp`).
pub fn vp_choices(n_layers: usize, pp: usize, micro_batches: usize) -> Vec<usize> {
    if pp == 1 || !n_layers.is_multiple_of(pp) || !micro_batches.is_multiple_of(pp) {
        return vec![1];
    }
    divisors(n_layers / pp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::planner::model::preset;

    /// Mixtral 8x7B's reference mapping on 8 nodes: TP (size 1) and EP 8 inside a node, the DP
    /// groups (stride 8) across nodes, PP across nodes.
    #[test]
    fn reference_mapping_links() {
        let t = topology(64, 8, (1, 1, 4, 8, 1)).unwrap();
        assert!(t.tp.intra_node() && t.ep.intra_node());
        assert_eq!(t.ep, Span { size: 8, nodes: 1 });
        assert_eq!(t.dp_cp, Span { size: 16, nodes: 2 });
        assert_eq!(t.edp, Span { size: 2, nodes: 2 });
        assert_eq!(t.pp, Span { size: 4, nodes: 4 });
        // EP 16 must leave the node.
        let t = topology(64, 8, (1, 1, 4, 16, 1)).unwrap();
        assert_eq!(t.ep, Span { size: 16, nodes: 2 });
    }

    #[test]
    fn folding_rules_are_enforced() {
        // EP·ETP·PP must divide the world.
        assert!(topology(64, 8, (1, 1, 4, 32, 1)).is_none());
        assert!(topology(64, 8, (2, 2, 2, 8, 2)).is_some());
    }

    #[test]
    fn choices_respect_heads_and_widths() {
        let m = preset("qwen2-57b-a14b").unwrap();
        let c = axis_choices(&m, 64, 8, 4096);
        assert!(c.iter().all(|&(tp, _, _, ep, _)| tp <= 4 && 64 % ep == 0));
        assert!(c.contains(&(2, 1, 4, 8, 1)));
        assert!(!c.iter().any(|&(tp, ..)| tp == 8), "4 kv heads forbid TP 8");
    }

    #[test]
    fn stages_cover_the_layers() {
        let s = stage_layers(61, 16);
        assert_eq!(s.len(), 16);
        assert_eq!(s.last().unwrap().end, 61);
        assert!(s.iter().all(|r| r.len() == 3 || r.len() == 4));
        assert_eq!(vp_choices(56, 8, 64), vec![1, 7]);
        assert_eq!(vp_choices(56, 8, 60), vec![1]);
    }
}
