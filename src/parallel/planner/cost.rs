//! The cost model: memory per GPU and time per step of one mapping.
//!
//! Everything is computed for one micro-batch on one GPU of each pipeline stage, then composed
//! into a step with the pipeline schedule. Conventions (Megatron-Core with sequence parallelism):
//! - a rank holds `t_loc = b·S / (TP·CP)` tokens between layers; attention GEMMs all-gather them
//!   over TP (`T_cp = b·S / CP` rows) and split heads over TP;
//! - the MoE layer takes its `t_loc` tokens to the experts by all-to-all over EP (folded onto the
//!   attention ranks), all-gathers them over ETP, and splits expert widths over ETP;
//! - weights bf16, gradients fp32, AdamW state (fp32 master + two moments) sharded by the
//!   distributed optimizer over DP×CP (dense) and EDP (experts); gradients are reduce-scattered in
//!   fp32 and parameters all-gathered in bf16;
//! - backward = 2 × forward FLOPs; causal attention counts half the square.
//!
//! What overlaps: CP's KV ring under the attention core, DP's gradient reduce-scatter under the
//! last micro-batch's backward and its parameter all-gather under the first forward, PP's
//! point-to-point sends in the steady state. What does not: TP collectives (unless
//! `tp_overlap`), EP all-to-all, ETP all-gather/reduce-scatter, the pipeline bubble.

use std::collections::HashMap;

use serde::Serialize;

use super::hardware::{Assumptions, Gpu};
use super::model::{ClusterModel, MoeShape};
use super::space::{stage_layers, Mapping, Span, Topology};
use crate::memory::alpha::{plan_alpha, AlphaOutcome, HostLink, LayerCost};

const BF16: f64 = 2.0;
const FP32: f64 = 4.0;
/// Bytes per parameter that every replica holds: bf16 weight + fp32 gradient.
const WEIGHT_GRAD: f64 = BF16 + FP32;
/// Bytes per parameter of AdamW state before sharding: fp32 master, first and second moment.
const OPTIMIZER: f64 = 3.0 * FP32;

/// How a candidate stores what the backward needs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Policy {
    /// Every skeletal activation stays on the device.
    Keep,
    /// MEMO: layer input and attention output offloaded whole, a fraction α of the rest
    /// offloaded, the remainder recomputed before the layer's backward (mean α over layers).
    Memo { alpha: f64 },
    /// Full recomputation: only each layer's input is kept.
    Recompute,
}

impl Policy {
    pub fn label(&self) -> String {
        match self {
            Policy::Keep => "keep".into(),
            Policy::Memo { alpha } => format!("memo α={alpha:.2}"),
            Policy::Recompute => "recompute".into(),
        }
    }
}

/// Bytes on the fullest GPU (the pipeline stage with the largest total).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Memory {
    pub params: f64,
    pub grads: f64,
    pub optimizer: f64,
    /// Skeletal activations of the in-flight micro-batches (or MEMO's two layer buffers).
    pub activations: f64,
    /// Op transients and the logits on the last stage.
    pub working: f64,
    pub total: f64,
    /// What the planner may fill: `usable_hbm × hbm_bytes`.
    pub capacity: f64,
    /// Host bytes of MEMO's offloads, 0 otherwise.
    pub host: f64,
}

/// Seconds per step on the critical path, by cause; they add up to `step`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Time {
    /// GEMMs, attention core and memory-bound ops of the busiest stage, all micro-batches.
    pub compute: f64,
    /// Forward recomputation (full or MEMO's 1−α).
    pub recompute: f64,
    /// Exposed communication per kind.
    pub tp: f64,
    pub cp: f64,
    /// EP all-to-all and ETP all-gather/reduce-scatter.
    pub ep: f64,
    pub dp: f64,
    pub pp: f64,
    /// Pipeline fill and drain.
    pub bubble: f64,
    pub optimizer: f64,
    pub step: f64,
}

/// Why a mapping was refused: the bytes its least hungry option needs, and what that was.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    pub needed: f64,
    pub capacity: f64,
    /// e.g. "with recompute", "for weights, gradients and optimizer state alone".
    pub what: String,
}

/// What one layer of one kind costs on one GPU for one micro-batch.
#[derive(Clone, Copy, Debug, Default)]
struct LayerTime {
    /// Forward compute (GEMMs + attention core + memory-bound ops).
    compute: f64,
    /// Attention core forward, part of `compute` (never recomputed by MEMO).
    core: f64,
    /// Exposed communication of the forward; the backward has the same, CP's twice.
    tp: f64,
    ep: f64,
    cp_fwd: f64,
    cp_bwd: f64,
    /// Backward compute.
    bwd: f64,
    /// Skeletal bytes, and the parts MEMO offloads whole.
    act: f64,
    input: f64,
    attn_out: f64,
}

impl LayerTime {
    fn fwd(&self) -> f64 {
        self.compute + self.tp + self.ep + self.cp_fwd
    }
    fn bwd_total(&self) -> f64 {
        self.bwd + self.tp + self.ep + self.cp_bwd
    }
}

/// Per-step context shared by all layers.
struct Ctx<'a> {
    model: &'a ClusterModel,
    gpu: &'a Gpu,
    a: &'a Assumptions,
    m: Mapping,
    topo: Topology,
    seq: f64,
}

impl Ctx<'_> {
    fn t_loc(&self) -> f64 {
        (self.m.micro_batch * self.seq as usize) as f64 / (self.m.tp * self.m.cp) as f64
    }
    fn t_cp(&self) -> f64 {
        self.m.micro_batch as f64 * self.seq / self.m.cp as f64
    }

    fn gemm(&self, flops: f64, m: f64, n: f64, k: f64) -> f64 {
        flops / (self.gpu.peak_flops * self.gpu.gemm_eff * self.a.gemm_shape(m, n, k))
    }

    fn hbm(&self, bytes: f64) -> f64 {
        bytes / (self.gpu.hbm_bw * self.a.hbm_eff)
    }

    /// Ring all-gather or reduce-scatter of `bytes` (the gathered size) over a group.
    fn ring(&self, bytes: f64, span: Span) -> f64 {
        if span.size <= 1 {
            return 0.0;
        }
        let (bw, lat) = if span.intra_node() {
            (self.gpu.nvlink_bw * self.a.nvlink_ring_eff, self.a.latency_intra)
        } else {
            (self.gpu.ib_bw * self.a.ib_eff, self.a.latency_inter)
        };
        lat + bytes * (span.size - 1) as f64 / span.size as f64 / bw
    }

    /// All-to-all where each rank scatters `bytes` evenly over the group: the intra-node part goes
    /// over NVLink, the inter-node part over InfiniBand, concurrently.
    fn all_to_all(&self, bytes: f64, span: Span) -> f64 {
        if span.size <= 1 {
            return 0.0;
        }
        let n = span.size as f64;
        let per_node = (span.size / span.nodes.max(1)) as f64;
        let intra = bytes * (per_node - 1.0) / n / (self.gpu.nvlink_bw * self.a.nvlink_a2a_eff);
        let inter = bytes * (n - per_node) / n / (self.gpu.ib_bw * self.a.ib_eff);
        let lat = if span.intra_node() { self.a.latency_intra } else { self.a.latency_inter };
        lat + intra.max(inter)
    }

    /// One point-to-point transfer of `bytes` between neighbours of a group.
    fn p2p(&self, bytes: f64, span: Span) -> f64 {
        if span.size <= 1 {
            return 0.0;
        }
        if span.intra_node() {
            self.a.latency_intra + bytes / (self.gpu.nvlink_bw * self.a.nvlink_ring_eff)
        } else {
            self.a.latency_inter + bytes / (self.gpu.ib_bw * self.a.ib_eff)
        }
    }

    /// Attention half of a layer: projections, core, TP collectives, CP ring.
    fn attention(&self) -> LayerTime {
        let (m, d, at) = (self.m, self.model.d_model as f64, &self.model.attention);
        let (tp, cp) = (m.tp as f64, m.cp as f64);
        let (t_loc, t_cp) = (self.t_loc(), self.t_cp());
        let proj_n = at.proj_params as f64 / (d * tp);
        let proj = self.gemm(2.0 * t_cp * at.proj_params as f64 / tp, t_cp, proj_n, d);
        let core_flops = m.micro_batch as f64 * self.seq * self.seq * (at.q_dim() + at.o_dim()) as f64 / (tp * cp);
        // Load-balanced causal CP cuts the sequence into 2·CP chunks.
        let chunk = if m.cp > 1 { self.seq / (2.0 * cp) } else { self.seq };
        let core_fb = 3.0 * core_flops / (self.gpu.peak_flops * self.gpu.attn_eff * self.a.dim_shape(chunk));
        let act_el = 4.0 * d + (at.q_dim() + at.k_dim() + at.v_dim() + at.o_dim()) as f64;
        let act = t_loc * act_el * BF16;
        let elementwise = self.hbm(self.a.elementwise_traffic * act);
        let tp_comm = 2.0 * self.ring(t_cp * d * BF16, self.topo.tp) * (1.0 - self.a.tp_overlap);
        // The KV ring: CP−1 steps, each passing one rank's keys and values on.
        let kv_bytes = t_cp * (at.k_dim() + at.v_dim()) as f64 / tp * BF16;
        let cp_ring = (cp - 1.0) * self.p2p(kv_bytes, self.topo.cp);
        LayerTime {
            compute: proj + core_fb / 3.0 + elementwise,
            core: core_fb / 3.0,
            tp: tp_comm,
            ep: 0.0,
            cp_fwd: (cp_ring - core_fb / 3.0).max(0.0),
            cp_bwd: (2.0 * cp_ring - 2.0 * core_fb / 3.0).max(0.0),
            bwd: 2.0 * (proj + elementwise) + 2.0 * core_fb / 3.0,
            act,
            input: t_loc * d * BF16,
            attn_out: t_loc * at.o_dim() as f64 * BF16,
        }
    }

    /// A SwiGLU FFN of `width` under TP (dense FFN or shared expert).
    fn tp_ffn(&self, width: f64) -> (f64, f64, f64) {
        let (d, tp, t_cp) = (self.model.d_model as f64, self.m.tp as f64, self.t_cp());
        let gemm = self.gemm(2.0 * t_cp * 3.0 * d * width / tp, t_cp, width / tp, d);
        let act = self.t_loc() * 3.0 * width * BF16;
        let tp_comm = 2.0 * self.ring(t_cp * d * BF16, self.topo.tp) * (1.0 - self.a.tp_overlap);
        (gemm, act, tp_comm)
    }

    /// The routed experts on the busiest EP rank: compute, all-to-all and activation bytes.
    fn routed(&self, moe: &MoeShape) -> (f64, f64, f64) {
        let (m, d) = (self.m, self.model.d_model as f64);
        let (ep, etp) = (m.ep as f64, m.etp as f64);
        let slots = self.t_loc() * moe.top_k;
        // The busiest EP rank's load over its expected share: the router's drift (summed over the
        // rank's local experts) plus binomial sampling noise of its slot count, both as Gaussian
        // tails over EP ranks.
        let noise = if m.ep > 1 {
            let per_rank = (moe.n_experts() / m.ep) as f64;
            let tail = (2.0 * ep.ln()).sqrt();
            1.0 + tail * (self.a.expert_load_cv / per_rank.sqrt() + 1.0 / slots.max(1.0).sqrt())
        } else {
            1.0
        };
        let (mut time, mut tokens, mut width) = (0.0f64, 0.0f64, 0.0f64);
        for j in 0..m.ep {
            let (mut t, mut tok, mut wid) = (0.0, 0.0, 0.0);
            for i in moe.local_experts(m.ep, j) {
                let (share, w) = (moe.shares[i], moe.widths[i] as f64);
                let rows = ep * slots * share * etp;
                let shape = self.a.gemm_shape(rows.max(1.0), w / etp, d) * self.a.grouped_gemm;
                t += 2.0 * rows * 3.0 * d * w / etp / (self.gpu.peak_flops * self.gpu.gemm_eff * shape);
                tok += ep * share;
                wid += ep * share * w;
            }
            time = time.max(t);
            tokens = tokens.max(tok);
            width = width.max(wid);
        }
        let gathered = slots * tokens * noise * d * BF16;
        let a2a = 2.0 * self.all_to_all(gathered, self.topo.ep);
        let etp_comm = 2.0 * self.ring(gathered * etp, self.topo.etp);
        let act = slots * noise * (tokens * 2.0 * d * etp + 3.0 * width) * BF16;
        (time * noise, a2a + etp_comm, act)
    }

    /// One full layer: attention plus dense FFN or MoE.
    fn layer(&self, moe_layer: bool) -> LayerTime {
        let mut l = self.attention();
        let d = self.model.d_model as f64;
        let (gemm, act, tp) = match (&self.model.moe, moe_layer) {
            (Some(moe), true) => {
                let e = moe.n_experts() as f64;
                let router = self.gemm(2.0 * self.t_loc() * d * e, self.t_loc(), e, d);
                let (shared, shared_act, shared_tp) =
                    if moe.shared_width > 0 { self.tp_ffn(moe.shared_width as f64) } else { (0.0, 0.0, 0.0) };
                let (routed, comm, routed_act) = self.routed(moe);
                l.ep = comm;
                (router + shared + routed, shared_act + routed_act + self.t_loc() * e * FP32, shared_tp)
            }
            _ => self.tp_ffn(self.model.dense_width as f64),
        };
        let elementwise = self.hbm(self.a.elementwise_traffic * act);
        l.compute += gemm + elementwise;
        l.bwd += 2.0 * (gemm + elementwise);
        l.tp += tp;
        l.act += act;
        l
    }

    /// Output head and loss on the last stage: (forward, backward) seconds and logits bytes.
    fn head(&self) -> (f64, f64, f64) {
        let (d, v, tp, t_cp) = (self.model.d_model as f64, self.model.vocab as f64, self.m.tp as f64, self.t_cp());
        let logits = t_cp * v / tp * self.a.logit_bytes;
        let fwd = self.gemm(2.0 * t_cp * d * v / tp, t_cp, v / tp, d) + self.hbm(logits);
        (fwd, 2.0 * fwd, logits)
    }
}

/// Memoises MEMO's α plans: many mappings share a layer shape.
#[derive(Default)]
pub struct AlphaCache(HashMap<Vec<u64>, Option<(Vec<f64>, f64)>>);

impl AlphaCache {
    /// Per-layer α and host bytes, or `None` when MEMO cannot swap at all.
    fn plan(&mut self, layers: &[LayerCost], link: HostLink) -> Option<(Vec<f64>, f64)> {
        let key: Vec<u64> = layers
            .iter()
            .flat_map(|l| [l.s_input, l.s_attn, l.s_others, l.t_fwd.to_bits()])
            .chain([link.b_pcie.to_bits(), link.m_host])
            .collect();
        self.0
            .entry(key)
            .or_insert_with(|| match plan_alpha(layers, link) {
                Ok(AlphaOutcome::Swap(p)) => {
                    let mut alpha = p.alpha;
                    alpha.resize(layers.len(), 1.0); // the unswapped tail keeps everything
                    Some((alpha, p.host_bytes))
                }
                _ => None,
            })
            .clone()
    }
}

/// A costed, fitting mapping.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Estimate {
    pub policy: Policy,
    pub memory: Memory,
    pub time: Time,
    pub mfu: f64,
    pub tokens_per_s_per_gpu: f64,
}

/// What the evaluation needs besides the mapping.
pub struct Job<'a> {
    pub model: &'a ClusterModel,
    pub gpu: &'a Gpu,
    pub assumptions: &'a Assumptions,
    pub seq: usize,
    pub global_batch: usize,
    pub memo: bool,
}

/// Parameters on one GPU of a stage: (dense, expert) counts. Dense ones are split over TP; the
/// busiest EP rank's experts over ETP; the embedding sits on the first stage, the head on the last.
fn stage_params(model: &ClusterModel, m: &Mapping, stage: usize, layers: std::ops::Range<usize>) -> (f64, f64) {
    let moe_layers = layers.clone().filter(|&l| l >= model.dense_layers && model.moe.is_some()).count() as f64;
    let dense_layers = layers.len() as f64 - moe_layers;
    let mut dense = dense_layers * model.layer_dense_params(false) as f64 + moe_layers * model.layer_dense_params(true) as f64;
    if stage == 0 {
        dense += model.embedding_params() as f64;
    }
    if stage + 1 == m.pp {
        dense += model.embedding_params() as f64;
    }
    let expert = model.moe.as_ref().map_or(0.0, |moe| {
        let per_rank = (0..m.ep)
            .map(|j| moe.local_experts(m.ep, j).map(|i| 3.0 * (model.d_model * moe.widths[i]) as f64).sum::<f64>())
            .fold(0.0, f64::max);
        moe_layers * per_rank / m.etp as f64
    });
    (dense / m.tp as f64, expert)
}

/// Optimizer bytes: AdamW state sharded over DP×CP (dense) and EDP (experts).
fn optimizer_bytes(m: &Mapping, (dense, expert): (f64, f64)) -> f64 {
    OPTIMIZER * (dense / (m.dp * m.cp) as f64 + expert / m.edp as f64)
}

/// Whether the weights, gradients and optimizer state alone fit on every stage: a cheap test
/// that prunes the search before a layout is built (micro-batch and VP do not change it).
pub fn params_fit(job: &Job, m: &Mapping) -> Result<(), Refusal> {
    let capacity = job.assumptions.usable_hbm * job.gpu.hbm_bytes;
    let needed = stage_layers(job.model.n_layers, m.pp)
        .into_iter()
        .enumerate()
        .map(|(s, layers)| {
            let p = stage_params(job.model, m, s, layers);
            (p.0 + p.1) * WEIGHT_GRAD + optimizer_bytes(m, p)
        })
        .fold(0.0, f64::max);
    if needed > capacity {
        return Err(Refusal { needed, capacity, what: "for weights, gradients and optimizer state alone".into() });
    }
    Ok(())
}

/// Micro-batches whose activations a stage holds at its peak (1F1B or interleaved warm-up).
fn in_flight(m: &Mapping, stage: usize, micro_batches: usize) -> f64 {
    if m.vp == 1 {
        return (m.pp - stage).min(micro_batches) as f64;
    }
    let chunks = 2 * (m.pp - stage - 1) + (m.vp - 1) * m.pp + 1;
    chunks.min(micro_batches * m.vp) as f64 / m.vp as f64
}

/// Costs `m`; `Err` with the shortfall when no activation policy fits.
pub fn evaluate(job: &Job, m: Mapping, topo: Topology, cache: &mut AlphaCache) -> Result<Estimate, Refusal> {
    let ctx = Ctx {
        model: job.model,
        gpu: job.gpu,
        a: job.assumptions,
        m,
        topo,
        seq: job.seq as f64,
    };
    let micro_batches = job.global_batch / (m.dp * m.micro_batch);
    let dense = ctx.layer(false);
    let moe = if job.model.moe.is_some() { ctx.layer(true) } else { dense };
    let kind = |l: usize| if l >= job.model.dense_layers { moe } else { dense };
    let (head_fwd, head_bwd, logits) = ctx.head();
    let stages = stage_layers(job.model.n_layers, m.pp);
    let capacity = job.assumptions.usable_hbm * job.gpu.hbm_bytes;

    let mut policies = vec![Policy::Keep];
    if job.memo && m.pp == 1 {
        policies.push(Policy::Memo { alpha: 0.0 }); // α is planned below
    }
    policies.push(Policy::Recompute);
    let mut refusal = None;
    for policy in policies {
        // MEMO's per-layer α (PP = 1: one stage holds every layer).
        let alpha = match policy {
            Policy::Memo { .. } => {
                let costs: Vec<LayerCost> = (0..job.model.n_layers)
                    .map(|l| {
                        let t = kind(l);
                        LayerCost {
                            s_input: t.input as u64,
                            s_attn: t.attn_out as u64,
                            s_others: (t.act - t.input - t.attn_out).max(0.0) as u64,
                            t_fwd: t.fwd(),
                        }
                    })
                    .collect();
                let link = HostLink { b_pcie: job.gpu.pcie_bw, m_host: job.gpu.host_bytes as u64 };
                match cache.plan(&costs, link) {
                    Some(plan) => Some(plan),
                    None => continue,
                }
            }
            _ => None,
        };
        let policy = match (policy, &alpha) {
            (Policy::Memo { .. }, Some((a, _))) => Policy::Memo { alpha: a.iter().sum::<f64>() / a.len().max(1) as f64 },
            (p, _) => p,
        };
        let mut worst = Memory { capacity, ..Memory::default() };
        let mut t_mb: f64 = 0.0;
        let mut parts = Time::default();
        for (s, layers) in stages.iter().enumerate() {
            let params = stage_params(job.model, &m, s, layers.clone());
            let n_params = params.0 + params.1;
            let last = s + 1 == m.pp;
            let flight = in_flight(&m, s, micro_batches);
            let lt: Vec<LayerTime> = layers.clone().map(kind).collect();
            let max_act = lt.iter().map(|l| l.act).fold(0.0, f64::max);
            let activations = match &policy {
                Policy::Keep => flight * lt.iter().map(|l| l.act).sum::<f64>(),
                Policy::Memo { .. } => 2.0 * max_act,
                Policy::Recompute => flight * lt.iter().map(|l| l.input).sum::<f64>() + max_act,
            };
            let working = job.assumptions.transient_frac * max_act + if last { logits } else { 0.0 };
            let optimizer = optimizer_bytes(&m, params);
            let total = n_params * WEIGHT_GRAD + optimizer + activations + working;
            if total > worst.total {
                worst = Memory {
                    params: n_params * BF16,
                    grads: n_params * FP32,
                    optimizer,
                    activations,
                    working,
                    total,
                    capacity,
                    host: alpha.as_ref().map_or(0.0, |a| a.1),
                };
            }
            // Time of one micro-batch through this stage.
            let recompute: f64 = match (&policy, &alpha) {
                (Policy::Recompute, _) => lt.iter().map(LayerTime::fwd).sum(),
                (Policy::Memo { .. }, Some((a, _))) => {
                    layers.clone().zip(&lt).map(|(l, t)| (1.0 - a[l]) * (t.fwd() - t.core - t.cp_fwd)).sum()
                }
                _ => 0.0,
            };
            let head = if last { head_fwd + head_bwd } else { 0.0 };
            let stage_t = lt.iter().map(|l| l.fwd() + l.bwd_total()).sum::<f64>() + recompute + head;
            if stage_t > t_mb {
                t_mb = stage_t;
                parts = Time {
                    compute: lt.iter().map(|l| l.compute + l.bwd).sum::<f64>() + head,
                    recompute,
                    tp: lt.iter().map(|l| 2.0 * l.tp).sum(),
                    cp: lt.iter().map(|l| l.cp_fwd + l.cp_bwd).sum(),
                    ep: lt.iter().map(|l| 2.0 * l.ep).sum(),
                    ..Time::default()
                };
            }
        }
        if worst.total > capacity {
            if refusal.as_ref().is_none_or(|r: &Refusal| worst.total < r.needed) {
                refusal = Some(Refusal { needed: worst.total, capacity, what: format!("with {}", policy.label()) });
            }
            continue;
        }
        let time = step_time(&ctx, parts, t_mb, micro_batches, &stages);
        let tokens = (job.global_batch * job.seq) as f64;
        let world = m.world() as f64;
        let mfu = 3.0 * job.model.forward_flops(tokens, job.seq as f64) / (time.step * world * job.gpu.peak_flops);
        return Ok(Estimate { policy, memory: worst, tokens_per_s_per_gpu: tokens / time.step / world, mfu, time });
    }
    Err(refusal.unwrap_or(Refusal {
        needed: f64::INFINITY,
        capacity,
        what: "with any policy (MEMO found no feasible offload)".into(),
    }))
}

/// Composes a step from one micro-batch's stage time: `M` micro-batches, the bubble
/// `(PP−1)/VP` micro-batch times, the exposed PP sends of fill and drain, the exposed DP
/// reductions and the optimizer.
fn step_time(ctx: &Ctx, per_mb: Time, t_mb: f64, micro_batches: usize, stages: &[std::ops::Range<usize>]) -> Time {
    let m = ctx.m;
    let mb = micro_batches as f64;
    let bubble = (m.pp - 1) as f64 / m.vp as f64 * t_mb;
    let boundary = ctx.p2p(ctx.t_loc() * ctx.model.d_model as f64 * BF16, ctx.topo.pp);
    let pp = if m.pp > 1 { 2.0 * (m.pp * m.vp - 1) as f64 * boundary } else { 0.0 };
    // DP: the fullest stage's local parameters, reduce-scatter of fp32 grads under the last
    // backward, all-gather of bf16 weights under the first forward.
    let (mut dp, mut optimizer) = (0.0f64, 0.0f64);
    for (s, layers) in stages.iter().enumerate() {
        let (dense, expert) = stage_params(ctx.model, &m, s, layers.clone());
        let rs = ctx.ring(dense * FP32, ctx.topo.dp_cp) + ctx.ring(expert * FP32, ctx.topo.edp);
        let ag = ctx.ring(dense * BF16, ctx.topo.dp_cp) + ctx.ring(expert * BF16, ctx.topo.edp);
        let window = t_mb / 3.0;
        dp = dp.max((rs - 2.0 * window).max(0.0) + (ag - window).max(0.0));
        let shard = dense / (m.dp * m.cp) as f64 + expert / m.edp as f64;
        // Adam reads grad, master, m, v and writes master, m, v, weight.
        optimizer = optimizer.max(ctx.hbm(shard * (FP32 + 2.0 * OPTIMIZER + BF16)));
    }
    let scale = |x: f64| x * mb;
    let mut t = Time {
        compute: scale(per_mb.compute),
        recompute: scale(per_mb.recompute),
        tp: scale(per_mb.tp),
        cp: scale(per_mb.cp),
        ep: scale(per_mb.ep),
        dp,
        pp,
        bubble,
        optimizer,
        step: 0.0,
    };
    t.step = t.compute + t.recompute + t.tp + t.cp + t.ep + t.dp + t.pp + t.bubble + t.optimizer;
    t
}
