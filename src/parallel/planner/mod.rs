//! Cluster planner: searches MoE Parallel Folding mappings for a model on a cluster and ranks them
//! by predicted throughput.
//!
//! For every mapping that satisfies the folding rules (TP·CP·DP·PP = ETP·EP·EDP·PP, with
//! Megatron's rank order so that we know which groups stay inside a node), every micro-batch size,
//! virtual pipeline size and activation policy (keep, MEMO offload-α, full recompute), the cost
//! model ([`cost`]) predicts memory per GPU and time per step; mappings that do not fit are
//! refused. The search is exhaustive over the pruned space: for 1,024 GPUs it takes seconds.
//!
//! - [`hardware`]: GPUs, links and the stated efficiency assumptions.
//! - [`model`]: the model shapes, presets and `from_config`.
//! - [`space`]: the enumeration and the node locality of each group.
//! - [`cost`]: memory and time of one mapping.
//! - [`report`]: markdown table, JSON and the winner's bottleneck.
//!
//! docs/cluster-planner.md states the assumptions and compares predictions with published runs.

pub mod cost;
pub mod hardware;
pub mod model;
pub mod report;
pub mod space;
#[cfg(test)]
mod tests;

use std::collections::HashMap;

use serde::Serialize;

pub use cost::{Memory, Policy, Time};
pub use hardware::{Assumptions, Gpu};
pub use model::{preset, ClusterModel, MoeShape, PRESETS};
pub use report::{explain, render_table, to_json};
pub use space::{Mapping, Span, Topology};

use cost::{AlphaCache, Job};
use crate::{Error, Result};

/// What to plan for.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SearchRequest {
    pub model: ClusterModel,
    /// Number of GPUs (the world size).
    pub gpus: usize,
    pub gpu: Gpu,
    pub gpus_per_node: usize,
    /// Sequence length in tokens.
    pub seq: usize,
    /// Sequences per optimizer step.
    pub global_batch: usize,
    /// Sequences per micro-batch; `None` tries 1, 2, 4 and 8.
    pub micro_batch: Option<usize>,
    /// Whether MEMO's offload-α policy may be used (only with PP = 1, the paper's setting).
    pub memo: bool,
    pub assumptions: Assumptions,
}

impl SearchRequest {
    /// A request with the defaults: 8 GPUs per node, sequence 4096, global batch 256,
    /// any micro-batch, MEMO on, default assumptions.
    pub fn new(model: ClusterModel, gpus: usize, gpu: Gpu) -> SearchRequest {
        SearchRequest {
            model,
            gpus,
            gpu,
            gpus_per_node: 8,
            seq: 4096,
            global_batch: 256,
            micro_batch: None,
            memo: true,
            assumptions: Assumptions::default(),
        }
    }

    fn validate(&self) -> Result<()> {
        self.model.validate()?;
        for (field, v) in [
            ("gpus", self.gpus),
            ("gpus_per_node", self.gpus_per_node),
            ("seq", self.seq),
            ("global_batch", self.global_batch),
            ("micro_batch", self.micro_batch.unwrap_or(1)),
        ] {
            if v == 0 {
                return Err(Error::config(field, 0, "a positive integer"));
            }
        }
        if self.gpus > self.gpus_per_node && !self.gpus.is_multiple_of(self.gpus_per_node) {
            return Err(Error::config(
                "gpus",
                self.gpus,
                format!("a multiple of gpus_per_node = {} (whole nodes)", self.gpus_per_node),
            ));
        }
        let a = &self.assumptions;
        let fractions = [
            ("gemm_eff", self.gpu.gemm_eff),
            ("attn_eff", self.gpu.attn_eff),
            ("grouped_gemm", a.grouped_gemm),
            ("hbm_eff", a.hbm_eff),
            ("nvlink_ring_eff", a.nvlink_ring_eff),
            ("nvlink_a2a_eff", a.nvlink_a2a_eff),
            ("ib_eff", a.ib_eff),
            ("usable_hbm", a.usable_hbm),
        ];
        for (field, v) in fractions {
            if !(v > 0.0 && v <= 1.0) {
                return Err(Error::config(field, v, "a fraction in (0, 1]"));
            }
        }
        let positive = [
            ("peak_flops", self.gpu.peak_flops),
            ("hbm_bytes", self.gpu.hbm_bytes),
            ("hbm_bw", self.gpu.hbm_bw),
            ("nvlink_bw", self.gpu.nvlink_bw),
            ("ib_bw", self.gpu.ib_bw),
            ("pcie_bw", self.gpu.pcie_bw),
            ("gemm_half_dim", a.gemm_half_dim),
        ];
        for (field, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return Err(Error::config(field, v, "a positive finite number"));
            }
        }
        for (field, v) in [
            ("host_bytes", self.gpu.host_bytes),
            ("elementwise_traffic", a.elementwise_traffic),
            ("latency_intra", a.latency_intra),
            ("latency_inter", a.latency_inter),
            ("transient_frac", a.transient_frac),
            ("expert_load_cv", a.expert_load_cv),
            ("logit_bytes", a.logit_bytes),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::config(field, v, "a finite number ≥ 0"));
            }
        }
        if !(a.tp_overlap >= 0.0 && a.tp_overlap <= 1.0) {
            return Err(Error::config("tp_overlap", a.tp_overlap, "a fraction in [0, 1]"));
        }
        Ok(())
    }

    fn job(&self) -> Job<'_> {
        Job {
            model: &self.model,
            gpu: &self.gpu,
            assumptions: &self.assumptions,
            seq: self.seq,
            global_batch: self.global_batch,
            memo: self.memo,
        }
    }
}

/// One fitting mapping with its prediction.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Candidate {
    pub mapping: Mapping,
    pub topology: Topology,
    pub policy: Policy,
    pub memory: Memory,
    pub time: Time,
    /// Model FLOPs utilisation: model FLOPs of the step (no recomputation) over step time ×
    /// GPUs × peak.
    pub mfu: f64,
    pub tokens_per_s_per_gpu: f64,
}

/// Every fitting mapping, best (highest tokens/s/GPU, then least memory) first.
///
/// Errors on a malformed request, and when nothing fits (the message gives the closest miss).
pub fn search(req: &SearchRequest) -> Result<Vec<Candidate>> {
    req.validate()?;
    let job = req.job();
    let micro_batches: Vec<usize> = match req.micro_batch {
        Some(mb) => vec![mb],
        None => vec![1, 2, 4, 8],
    };
    let mut cache = AlphaCache::default();
    let mut topologies = HashMap::new();
    let mut out = Vec::new();
    let mut closest: Option<(Mapping, cost::Refusal)> = None;
    for axes in space::axis_choices(&req.model, req.gpus, req.gpus_per_node, req.seq) {
        let (tp, cp, pp, ep, etp) = axes;
        let dp = req.gpus / (tp * cp * pp);
        let edp = req.gpus / (etp * ep * pp);
        let bare = Mapping { tp, cp, dp, pp, vp: 1, ep, etp, edp, micro_batch: 1 };
        if let Err(r) = cost::params_fit(&job, &bare) {
            note_refusal(&mut closest, bare, r);
            continue;
        }
        for &micro_batch in &micro_batches {
            if !req.global_batch.is_multiple_of(dp * micro_batch) {
                continue;
            }
            let n_micro = req.global_batch / (dp * micro_batch);
            for vp in space::vp_choices(req.model.n_layers, pp, n_micro) {
                let mapping = Mapping { tp, cp, dp, pp, vp, ep, etp, edp, micro_batch };
                let topo = *topologies
                    .entry(axes)
                    .or_insert_with(|| space::topology(req.gpus, req.gpus_per_node, axes));
                let Some(topo) = topo else { continue };
                match cost::evaluate(&job, mapping, topo, &mut cache) {
                    Ok(e) => out.push(candidate(mapping, topo, e)),
                    Err(r) => note_refusal(&mut closest, mapping, r),
                }
            }
        }
    }
    if out.is_empty() {
        return Err(Error::Invalid(match closest {
            Some((m, r)) => format!(
                "no mapping of {} on {} × {} fits; the closest, {}, needs {:.1} GiB {} but {:.1} GiB are usable",
                req.model.name,
                req.gpus,
                req.gpu.name,
                m.label(),
                r.needed / GIB,
                r.what,
                r.capacity / GIB
            ),
            None => format!(
                "no mapping of {} on {} GPUs satisfies the folding rules with global batch {} (it must be a \
                 multiple of DP × micro-batch)",
                req.model.name, req.gpus, req.global_batch
            ),
        }));
    }
    out.sort_by(|a, b| {
        b.tokens_per_s_per_gpu.total_cmp(&a.tokens_per_s_per_gpu).then(a.memory.total.total_cmp(&b.memory.total))
    });
    Ok(out)
}

/// Costs one given mapping (e.g. a published one); errors if it breaks the folding rules, the
/// batch does not split into micro-batches, or it does not fit.
pub fn evaluate(req: &SearchRequest, mapping: Mapping) -> Result<Candidate> {
    req.validate()?;
    let m = mapping;
    let axes = (m.tp, m.cp, m.pp, m.ep, m.etp);
    if m.world() != req.gpus || m.etp * m.ep * m.edp * m.pp != req.gpus {
        return Err(Error::Invalid(format!(
            "{}: TP·CP·DP·PP = {} and ETP·EP·EDP·PP = {} must both equal the {} GPUs",
            m.label(),
            m.world(),
            m.etp * m.ep * m.edp * m.pp,
            req.gpus
        )));
    }
    if m.micro_batch == 0 || m.vp == 0 || !req.global_batch.is_multiple_of(m.dp * m.micro_batch) {
        return Err(Error::Invalid(format!(
            "{}: global batch {} is not a multiple of DP × micro-batch",
            m.label(),
            req.global_batch
        )));
    }
    if !space::axis_choices(&req.model, req.gpus, req.gpus_per_node, req.seq).contains(&axes) {
        return Err(Error::Invalid(format!(
            "{}: TP and ETP must fit in a node and divide the heads and expert widths, CP must split \
             the sequence into 2·CP chunks, EP must divide the experts",
            m.label()
        )));
    }
    let n_micro = req.global_batch / (m.dp * m.micro_batch);
    if !space::vp_choices(req.model.n_layers, m.pp, n_micro).contains(&m.vp) {
        return Err(Error::Invalid(format!(
            "{}: VP {} needs layers divisible by PP·VP and micro-batches ({n_micro}) divisible by PP",
            m.label(),
            m.vp
        )));
    }
    let topo = space::topology(req.gpus, req.gpus_per_node, axes)
        .ok_or_else(|| Error::Invalid(format!("{}: rejected by the folding rules (order {})", m.label(), space::ORDER)))?;
    cost::evaluate(&req.job(), mapping, topo, &mut AlphaCache::default())
        .map(|e| candidate(mapping, topo, e))
        .map_err(|r| {
            Error::Invalid(format!(
                "{} does not fit: needs {:.1} GiB {} but {:.1} GiB are usable",
                m.label(),
                r.needed / GIB,
                r.what,
                r.capacity / GIB
            ))
        })
}

const GIB: f64 = (1u64 << 30) as f64;

/// Keeps the refusal that missed by the smallest factor, for the error when nothing fits.
fn note_refusal(closest: &mut Option<(Mapping, cost::Refusal)>, m: Mapping, r: cost::Refusal) {
    if closest.as_ref().is_none_or(|(_, c)| r.needed / r.capacity < c.needed / c.capacity) {
        *closest = Some((m, r));
    }
}

fn candidate(mapping: Mapping, topology: Topology, e: cost::Estimate) -> Candidate {
    Candidate {
        mapping,
        topology,
        policy: e.policy,
        memory: e.memory,
        time: e.time,
        mfu: e.mfu,
        tokens_per_s_per_gpu: e.tokens_per_s_per_gpu,
    }
}
