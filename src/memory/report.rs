//! `plan-memory`: what one training step of a config needs on the device and the host, layer by
//! layer, under its `[memory]` policy — and whether that fits.
//!
//! Device bytes = static (parameters, gradients, two AdamW moments, f32; plus the working copy
//! with narrower activations) + the skeletal peak (the most the activation store holds at once
//! over the step, following its rules: `skeletal_peak`) + the transient arena (the largest
//! phase's plan by the arena's own heuristic, with the arena's headroom; the DSA MIP's peak and
//! lower bound are reported beside it; the classifier's chunk of logits is the head's phase,
//! and on CUDA the router's scratch is a phase too and the attention backward's scratch a
//! transient of the block's backward) + what lives beside the skeletal bytes at the larger of
//! two moments: a block's forward or backward (its incoming and outgoing gradient,
//! 2·N·d_model) or the turn between forward and backward (the final hidden state, its norm and
//! their gradients, 4·N·d_model), reported as boundary and backend bytes (the backend's are
//! cuBLASLt's workspace, the reductions' scratch and the ring the ops' uploads go through).
//! Skeletal sizes use the expected routed counts, dropless or within an expert capacity (see
//! [`Slots::expected`]). With dropless
//! routing the skeletal peak and the arena are exactly what a CPU step holds (tests/memo.rs);
//! on the emulated CUDA device the whole is within [−3 %, +1 %] of the measured device peak
//! (tests/cuda_memory.rs, which the GPU session runs on the GPU).

use std::fmt;
use std::time::Duration;

use serde::Serialize;

use super::alpha::HostLink;
use super::arena::{allocation_for, phase_plan};
use super::inventory::{block_inventory, Skeletal, Slots, TensorBytes};
use super::plan::{plan, MipLimits, Phase, Plan, Strategy};
use super::auto;
use super::policy::{build_policy, Profile};
use super::store::{Class, LayerPolicy};
use super::transients::{block_phases, head_phase, router_phase, BackendTransients, ALIGNMENT, EXPERT_CHUNK_ROWS};
use crate::backend::cuda_scratch::{self, RouteScratch};
use crate::backend::{cpu, AttnShape};
use crate::config::{Config, GateUp, MemoryConfig, MemoryPolicy};
use crate::model::config::{ModelConfig, MoeConfig};
use crate::model::block::GATE_UP;
use crate::model::params::ParamLayout;
use crate::model::router;
use crate::parallel::dispatch::DispatchMode;
use crate::{Error, Result};

/// Bytes per activation element on `device`: `cuda` trains in bf16 mixed precision.
pub fn activation_bytes(device: &str) -> u64 {
    if device == "cuda" {
        2
    } else {
        4
    }
}

/// Forward throughput the cost model assumes when no profile is measured.
pub fn assumed_flops_per_s(device: &str) -> f64 {
    if device == "cuda" {
        4e14
    } else {
        5e10
    }
}

/// One block's row of the report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerRow {
    pub layer: usize,
    pub policy: LayerPolicy,
    pub inventory: Vec<TensorBytes>,
    pub kept: u64,
    pub offloaded: u64,
    pub recomputed: u64,
}

/// The planner's answer for one phase.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PhasePlan {
    pub name: String,
    pub requests: usize,
    pub peak: u64,
    pub lower_bound: u64,
    pub solve_time: Duration,
}

impl PhasePlan {
    fn of(name: &str, requests: usize, p: &Plan) -> Self {
        PhasePlan { name: name.into(), requests, peak: p.peak, lower_bound: p.lower_bound, solve_time: p.solve_time }
    }
}

/// The whole report (`Display` for the text table, `Serialize` for `--json`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MemoryReport {
    pub batch: usize,
    pub seq: usize,
    /// Whether the experts' gate/up product is in the inventory or recomputed by the backward.
    pub gate_up: GateUp,
    pub layers: Vec<LayerRow>,
    pub phases: Vec<PhasePlan>,
    pub static_bytes: u64,
    pub skeletal_device_bytes: u64,
    /// The MIP's planned transient peak (the larger phase).
    pub transient_peak: u64,
    /// The transient arena the step allocates: its own (heuristic) plan's peak with its headroom.
    pub arena_bytes: u64,
    pub boundary_bytes: u64,
    /// Device memory of the backend itself (CUDA: cuBLASLt's workspace, the reductions' scratch
    /// and the upload ring), and what lives beside the skeletal tensors at the peak's moment
    /// other than the boundary tensors.
    pub backend_bytes: u64,
    pub device_bytes: u64,
    pub device_mem: u64,
    pub host_bytes: u64,
    pub host_mem: u64,
    pub fits: bool,
    /// Forward FLOPs the step repeats (recomputed rows, the gate/up product recomputed), and the
    /// blocks' forward FLOPs (`memory::auto`'s cost model).
    pub repeated_flops: f64,
    pub forward_flops: f64,
    /// `memory.policy = "auto"` chose the layers' policies (within `device_mem`).
    pub auto: bool,
}

/// What a step's memory plan depends on besides its size and the layers' policies.
#[derive(Clone, Copy, Debug)]
pub struct PlanTarget<'a> {
    pub model: &'a ModelConfig,
    pub moe: &'a MoeConfig,
    pub memory: &'a MemoryConfig,
    /// `"cpu"` or `"cuda"`: the activations' size, the backend's buffers and scratch.
    pub device: &'a str,
    /// The Hopper expert kernels read the routed rows in place (no gathered copies to plan).
    pub fused_gather: bool,
    /// Dropless, or an expert capacity that bounds the routed tensors ([`Slots::expected`]).
    pub dispatch: DispatchMode,
}

impl<'a> PlanTarget<'a> {
    pub fn of(config: &'a Config) -> Self {
        let (m, moe) = (&config.model, &config.moe);
        let fused_gather = config.device == "cuda" && config.cuda.hopper_experts && config.parallel.ep == 1 && cuda_scratch::expert_kernels_gather(m.d_model, &moe.expert_widths);
        PlanTarget { model: m, moe, memory: &config.memory, device: &config.device, fused_gather, dispatch: config.dispatch }
    }

    /// MEMO's cost model of this target's layers at `batch × seq`, with the gate/up product saved
    /// or not.
    pub fn profile(&self, batch: usize, seq: usize, link: HostLink, gate_up: GateUp) -> Result<Profile> {
        Ok(Profile::cost_model(self.model, self.moe, batch, seq, assumed_flops_per_s(self.device), link)?.with_activation_bytes(activation_bytes(self.device)).with_gate_up(gate_up).with_slots(Slots::expected(self.dispatch)))
    }
}

/// Plans one step of `config` at `batch × seq` tokens, whether or not it fits (`fits` says;
/// [`MemoryReport::check_fits`] turns a misfit into an error with the numbers).
pub fn plan_report(config: &Config, seq: usize, batch: usize, device_mem: u64, host_mem: u64, bandwidth: f64) -> Result<MemoryReport> {
    plan_target(&PlanTarget::of(config), seq, batch, device_mem, host_mem, bandwidth)
}

/// [`plan_report`] of a target: its policies from `[memory]` (`"auto"` chooses them within
/// `device_mem`), planned with the MIP.
pub fn plan_target(target: &PlanTarget, seq: usize, batch: usize, device_mem: u64, host_mem: u64, bandwidth: f64) -> Result<MemoryReport> {
    let m = target.model;
    if batch == 0 || seq == 0 || seq > m.seq_len {
        return Err(Error::Invalid(format!("batch {batch} × seq {seq}: need batch ≥ 1 and 1 ≤ seq ≤ model.seq_len = {}", m.seq_len)));
    }
    let link = HostLink { b_pcie: bandwidth, m_host: host_mem };
    let (policies, gate_up) = if target.memory.policy == MemoryPolicy::Auto {
        let choice = auto::choose(target, batch, seq, device_mem, link)?;
        (choice.policies, choice.gate_up)
    } else {
        let gate_up = target.memory.gate_up;
        (build_policy(target.memory, m, target.moe, batch, seq, &target.profile(batch, seq, link, gate_up)?)?, gate_up)
    };
    let strategy = Strategy::Mip(MipLimits { max_pairs: 300, time_limit: Duration::from_secs(2) });
    let report = report_for(target, batch, seq, &policies, gate_up, device_mem, host_mem, strategy)?;
    Ok(MemoryReport { auto: target.memory.policy == MemoryPolicy::Auto, ..report })
}

/// The plan of a step of `target` at `batch × seq` whose layers take `policies` (what a store
/// was built with), the transient phases by the arena's heuristic, no device limit.
pub fn plan_policies(target: &PlanTarget, batch: usize, seq: usize, policies: &[LayerPolicy], gate_up: GateUp, host_mem: u64) -> Result<MemoryReport> {
    report_for(target, batch, seq, policies, gate_up, u64::MAX, host_mem, Strategy::Heuristic)
}

/// The report of a step of `target` at `batch × seq` whose layers take `policies`, the
/// transient phases planned by `strategy`.
#[allow(clippy::too_many_arguments)]
pub(super) fn report_for(target: &PlanTarget, batch: usize, seq: usize, policies: &[LayerPolicy], gate_up: GateUp, device_mem: u64, host_mem: u64, strategy: Strategy) -> Result<MemoryReport> {
    let (m, moe) = (target.model, target.moe);
    let tokens = batch * seq;
    let act_bytes = activation_bytes(target.device);
    let slots = Slots::expected(target.dispatch).per_expert(moe, tokens);
    let inventory = block_inventory(m, moe, batch, seq, &slots, act_bytes, gate_up);
    let skeletal = Skeletal::of(&inventory);

    let layers: Vec<LayerRow> = policies
        .iter()
        .enumerate()
        .map(|(layer, &policy)| {
            let (kept, offloaded, recomputed) = match policy {
                LayerPolicy::Keep => (skeletal.total(), 0, 0),
                LayerPolicy::Recompute => (skeletal.input + skeletal.attn, 0, skeletal.others),
                LayerPolicy::Offload { .. } => {
                    let off = policy.offloaded_others(skeletal.others, tokens);
                    (0, skeletal.input + skeletal.attn + off, skeletal.others - off)
                }
            };
            LayerRow { layer, policy, inventory: inventory.clone(), kept, offloaded, recomputed }
        })
        .collect();

    let skeletal_device_bytes = skeletal_peak(&layers, skeletal.total());
    let host_bytes = layers.iter().map(|l| l.offloaded).sum();

    // The Hopper expert kernels read the routed rows through the slots' tokens (no xe, dy or
    // dact), where they take the model's shapes.
    let on_cuda = target.device == "cuda";
    let fused_gather = target.fused_gather;
    // On CUDA the attention backward's scratch is a transient of the block's backward.
    let shape = AttnShape { batch, seq, n_heads: m.n_heads, n_kv_heads: m.n_kv_heads, head_dim: m.head_dim() };
    let attention_scratch = if on_cuda { cuda_scratch::attention_bwd_bytes(shape) } else { 0 };
    let backend = BackendTransients { act_bytes, fused_gather, attention_scratch };
    let (fwd, bwd) = block_phases(m, moe, batch, seq, &slots, EXPERT_CHUNK_ROWS, gate_up, backend);
    // On CUDA the router's scratch is a phase of its own before the forward's.
    let route_words = if on_cuda { RouteScratch::new(tokens, moe.n_experts(), router::rule(moe)).map_or(0, |r| r.words()) } else { 0 };
    // The classifier's scratch (its chunk of logits) is the head's phase, at the turn.
    let head_elements = if on_cuda { cuda_scratch::classifier_scratch_len(tokens, m.vocab_size, act_bytes) } else { cpu::classifier_scratch_elements(tokens, m.vocab_size) };
    let all = [router_phase(route_words), fwd, bwd, head_phase(head_elements)];
    let planned: Vec<&Phase> = all.iter().filter(|p| !p.requests.is_empty()).collect();
    let mut phases = Vec::new();
    for phase in &planned {
        let p = plan(&phase.requests, ALIGNMENT, strategy)?;
        phases.push(PhasePlan::of(&phase.name, phase.requests.len(), &p));
    }
    let transient_peak = phases.iter().map(|p| p.peak).max().unwrap_or(0);
    // The step runs on the arena's own plan, in a buffer with the arena's headroom.
    let mut arena_bytes = 0;
    for phase in &planned {
        arena_bytes = arena_bytes.max(allocation_for(phase_plan(&phase.requests)?.peak, &phase.requests));
    }
    // f32 master weights, gradients and two AdamW moments, plus a working copy where the
    // activations are narrower.
    let working_copy = if act_bytes < 4 { act_bytes } else { 0 };
    let static_bytes = (16 + working_copy) * ParamLayout::new(m, moe).total as u64;
    // Beside the skeletal bytes of its moment: a block's backward holds its incoming and
    // outgoing gradient (its forward only its output); the turn holds the final hidden state,
    // its norm and their gradients.
    let act = (tokens * m.d_model) as u64 * act_bytes;
    let workspace = if on_cuda { cuda_scratch::FIXED_BYTES as u64 + cuda_scratch::upload_ring_bytes(tokens, slots.iter().sum()) } else { 0 };
    let (blocks, at_turn) = skeletal_moments(&layers, skeletal.total());
    let (in_blocks, at_the_turn) = (blocks + 2 * act, at_turn + 4 * act);
    // Reported as the boundary tensors of the larger moment and the rest as the backend's.
    let (moment, boundary) = if in_blocks >= at_the_turn { (in_blocks, 2 * act) } else { (at_the_turn, 4 * act) };
    let beside = moment - skeletal_device_bytes;
    let boundary_bytes = boundary.min(beside);
    let backend_bytes = workspace + beside - boundary_bytes;
    let device_bytes = static_bytes + skeletal_device_bytes + arena_bytes + boundary_bytes + backend_bytes;
    let fits = device_bytes <= device_mem && host_bytes <= host_mem;
    Ok(MemoryReport {
        batch,
        seq,
        gate_up,
        layers,
        phases,
        static_bytes,
        skeletal_device_bytes,
        transient_peak,
        arena_bytes,
        boundary_bytes,
        backend_bytes,
        device_bytes,
        device_mem,
        host_bytes,
        host_mem,
        fits,
        repeated_flops: auto::repeated_flops(target, batch, seq, policies, gate_up),
        forward_flops: auto::blocks_forward_flops(target, batch, seq),
        auto: false,
    })
}

/// The most skeletal bytes the activation store holds at once over a step, following its rules
/// (`store.rs`): a layer computing its forward holds all its skeletal tensors (`full`), while the
/// layers before it keep `kept` of theirs (a kept layer all, a recomputing one its `Whole`
/// tensors, an offloading one none) and the offloaded tensors of the one just before travel to
/// the host (until this layer's seal). A layer's backward holds the same: the layers before it,
/// itself whole again (reloaded, recomputed), the offload of the one before prefetched; at the
/// turn between the last forward and the first backward, the kept tensors and the last offload.
fn skeletal_peak(layers: &[LayerRow], full: u64) -> u64 {
    let (blocks, at_turn) = skeletal_moments(layers, full);
    blocks.max(at_turn)
}

/// The skeletal bytes of [`skeletal_peak`]'s two kinds of moment: the most while a block runs
/// (its forward or its backward), and what lives at the turn.
fn skeletal_moments(layers: &[LayerRow], full: u64) -> (u64, u64) {
    let in_flight = |i: usize| if i > 0 { layers[i - 1].offloaded } else { 0 };
    let (mut peak, mut below) = (0, 0);
    for (i, l) in layers.iter().enumerate() {
        peak = peak.max(below + in_flight(i) + full);
        below += l.kept;
    }
    (peak, below + in_flight(layers.len()))
}

fn gib(bytes: u64) -> String {
    const K: f64 = 1024.0;
    let b = bytes as f64;
    if b >= K * K * K {
        format!("{:.2} GiB", b / (K * K * K))
    } else if b >= K * K {
        format!("{:.2} MiB", b / (K * K))
    } else {
        format!("{:.1} KiB", b / K)
    }
}

impl MemoryReport {
    /// An error with the numbers where the plan does not fit.
    pub fn check_fits(&self) -> Result<()> {
        if self.fits {
            return Ok(());
        }
        Err(Error::Invalid(format!(
            "memory plan does not fit: device needs {} (static {} + skeletal {} + transient arena {} + boundary {} + backend {}) of {}, host needs {} of {}",
            gib(self.device_bytes),
            gib(self.static_bytes),
            gib(self.skeletal_device_bytes),
            gib(self.arena_bytes),
            gib(self.boundary_bytes),
            gib(self.backend_bytes),
            gib(self.device_mem),
            gib(self.host_bytes),
            gib(self.host_mem)
        )))
    }
}

impl fmt::Display for MemoryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "memory plan: batch {} × seq {} = {} tokens", self.batch, self.seq, self.batch * self.seq)?;
        if let Some(first) = self.layers.first() {
            writeln!(f, "\nskeletal inventory per block (expected routed counts):")?;
            for t in &first.inventory {
                let class = if t.class == Class::Whole { "whole" } else { "token-split" };
                writeln!(f, "  {:<16} {:>12}  {class}", t.name, gib(t.bytes))?;
            }
            if self.gate_up == GateUp::Recompute {
                writeln!(f, "  {:<16} {:>12}  recomputed by the backward, a chunk of rows at a time (memory.gate_up)", GATE_UP, "not saved")?;
            }
        }
        if self.auto {
            writeln!(f, "\nmemory.policy = \"auto\": of the plans that fit {} less {:.0} %, the one that repeats the least forward work", gib(self.device_mem), 100.0 * auto::HEADROOM)?;
        }
        writeln!(f, "\n| layer | policy | kept | offloaded | recomputed |")?;
        writeln!(f, "|---|---|---|---|---|")?;
        for l in &self.layers {
            let policy = match l.policy {
                LayerPolicy::Keep => "keep".to_string(),
                LayerPolicy::Recompute => "recompute".to_string(),
                LayerPolicy::Offload { alpha } => format!("offload α={alpha:.3}"),
            };
            writeln!(f, "| {} | {policy} | {} | {} | {} |", l.layer, gib(l.kept), gib(l.offloaded), gib(l.recomputed))?;
        }
        let repeated = if self.forward_flops > 0.0 { 100.0 * self.repeated_flops / self.forward_flops } else { 0.0 };
        writeln!(f, "\nrecompute repeats {:.2} TFLOP of the blocks' {:.2} TFLOP forward ({repeated:.1} %)", self.repeated_flops / 1e12, self.forward_flops / 1e12)?;
        writeln!(f, "\n| phase | requests | planned peak | lower bound | solve |")?;
        writeln!(f, "|---|---|---|---|---|")?;
        for p in &self.phases {
            writeln!(f, "| {} | {} | {} | {} | {:.1} ms |", p.name, p.requests, gib(p.peak), gib(p.lower_bound), p.solve_time.as_secs_f64() * 1e3)?;
        }
        writeln!(
            f,
            "\ndevice: static {} + skeletal {} + transient arena {} + boundary {} + backend {} = {} of {}",
            gib(self.static_bytes),
            gib(self.skeletal_device_bytes),
            gib(self.arena_bytes),
            gib(self.boundary_bytes),
            gib(self.backend_bytes),
            gib(self.device_bytes),
            gib(self.device_mem)
        )?;
        writeln!(f, "host: {} of {}", gib(self.host_bytes), gib(self.host_mem))?;
        write!(f, "{}", if self.fits { "fits" } else { "does NOT fit" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Alpha, MemoryPolicy};

    fn config(policy: MemoryPolicy, alpha: Alpha) -> Config {
        let mut c = Config::default_with(&[]).unwrap();
        c.memory.policy = policy;
        c.memory.alpha = alpha;
        c
    }

    #[test]
    fn policies_trade_device_for_host_and_a_tight_budget_is_an_error() {
        let seq = 64;
        let keep = plan_report(&config(MemoryPolicy::Keep, Alpha::Auto), seq, 2, u64::MAX, 1 << 30, 1e10).unwrap();
        let rec = plan_report(&config(MemoryPolicy::Recompute, Alpha::Auto), seq, 2, u64::MAX, 1 << 30, 1e10).unwrap();
        let off = plan_report(&config(MemoryPolicy::Offload, Alpha::Fixed(0.5)), seq, 2, u64::MAX, 1 << 30, 1e10).unwrap();
        assert!(rec.skeletal_device_bytes < keep.skeletal_device_bytes);
        // The layer in its backward holds its recomputed tensors too.
        let rec_kept: u64 = rec.layers.iter().map(|l| l.kept).sum();
        assert_eq!(rec.skeletal_device_bytes, rec_kept + rec.layers.iter().map(|l| l.recomputed).max().unwrap());
        assert_eq!(keep.host_bytes, 0);
        assert!(off.host_bytes > 0 && off.layers.iter().any(|l| l.recomputed > 0));
        for l in &off.layers {
            assert_eq!(l.kept + l.offloaded + l.recomputed, keep.layers[l.layer].kept);
        }
        assert!(keep.phases.iter().all(|p| p.peak >= p.lower_bound && p.lower_bound > 0));
        let text = keep.to_string();
        assert!(text.contains("expert_gate_up") && text.contains("block backward") && text.contains("fits"), "{text}");
        assert!(!text.contains("not saved"), "{text}");
        // Without the gate/up product in the inventory: fewer skeletal bytes, and the text says
        // where it went.
        let mut lean_config = config(MemoryPolicy::Keep, Alpha::Auto);
        lean_config.memory.gate_up = GateUp::Recompute;
        let lean = plan_report(&lean_config, seq, 2, u64::MAX, 1 << 30, 1e10).unwrap();
        assert!(lean.skeletal_device_bytes < keep.skeletal_device_bytes);
        let text = lean.to_string();
        assert!(text.contains("expert_gate_up") && text.contains("not saved") && text.contains("memory.gate_up"), "{text}");
        serde_json::to_string(&off).unwrap();
        let err = plan_report(&config(MemoryPolicy::Keep, Alpha::Auto), seq, 2, keep.device_bytes - 1, 1 << 30, 1e10).unwrap().check_fits().unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
        assert!(plan_report(&config(MemoryPolicy::Keep, Alpha::Auto), seq, 2, keep.device_bytes, 1 << 30, 1e10).unwrap().check_fits().is_ok());
    }

    /// An expert capacity below the even spread bounds the routed tensors: fewer skeletal and
    /// transient bytes than dropless; above it, the same plan.
    #[test]
    fn an_expert_capacity_bounds_the_routed_tensors() {
        let plan = |dispatch| {
            let mut c = config(MemoryPolicy::Keep, Alpha::Auto);
            c.dispatch = dispatch;
            plan_report(&c, 64, 2, u64::MAX, 1 << 30, 1e10).unwrap()
        };
        let policy = crate::parallel::dispatch::DropPolicy::Probs;
        let (dropless, half, loose) = (plan(DispatchMode::Dropless), plan(DispatchMode::Capacity { factor: 0.5, policy }), plan(DispatchMode::Capacity { factor: 2.0, policy }));
        assert!(half.skeletal_device_bytes < dropless.skeletal_device_bytes && half.arena_bytes < dropless.arena_bytes, "{half}");
        assert_eq!((loose.skeletal_device_bytes, loose.arena_bytes), (dropless.skeletal_device_bytes, dropless.arena_bytes));
    }

    /// On CUDA the attention backward's scratch is a transient of the block's backward: live with
    /// `datt` and `dqkv` at the attention's op (the phase's lower bound holds all three), and
    /// not counted again beside the blocks (the backend's bytes are its fixed buffers and
    /// the upload ring where a block's moment is the larger: recomputing layers at long context
    /// with a small vocabulary).
    #[test]
    fn cuda_plans_the_attention_backward_scratch_in_the_block_backward() {
        let mut c = config(MemoryPolicy::Recompute, Alpha::Auto);
        c.device = "cuda".into();
        c.model.seq_len = 4096;
        c.model.vocab_size = 64;
        // Narrow experts, one a token: the attention's moment is the backward's widest.
        c.moe.routing = crate::model::config::Routing::TopK;
        (c.moe.top_k, c.moe.expert_widths) = (1, vec![16; 4]);
        let m = &c.model;
        let shape = AttnShape { batch: 2, seq: 4096, n_heads: m.n_heads, n_kv_heads: m.n_kv_heads, head_dim: m.head_dim() };
        let attention = cuda_scratch::attention_bwd_bytes(shape);
        let act = (shape.tokens() * m.d_model * 2) as u64;
        let r = plan_report(&c, 4096, 2, u64::MAX, 1 << 30, 1e10).unwrap();
        let (recomputed, chunk) = (r.layers[0].recomputed, cuda_scratch::classifier_chunk_bytes(shape.tokens(), m.vocab_size, 2));
        assert!(recomputed + 2 * act > chunk + 4 * act, "the case must make a block's moment the larger");
        let uploads = cuda_scratch::upload_ring_bytes(shape.tokens(), shape.tokens());
        assert_eq!((r.backend_bytes, r.boundary_bytes), (cuda_scratch::FIXED_BYTES as u64 + uploads, 2 * act));
        // The report's backward phase is the one with the scratch (its lower bound, which the
        // scratch raises here: it is live with datt and dqkv, the phase's widest moment).
        let slots = Slots::Expected.per_expert(&c.moe, shape.tokens());
        let lower_bound = |attention_scratch| {
            let backend = BackendTransients { act_bytes: 2, fused_gather: false, attention_scratch };
            let (_, bwd) = block_phases(&c.model, &c.moe, 2, 4096, &slots, EXPERT_CHUNK_ROWS, c.memory.gate_up, backend);
            crate::memory::plan::lower_bound(&bwd.requests, ALIGNMENT).unwrap()
        };
        let backward = r.phases.iter().find(|p| p.name == "block backward").expect("a backward phase");
        assert_eq!(backward.lower_bound, lower_bound(attention));
        assert!(lower_bound(attention) > lower_bound(0), "the case must make the scratch count");
    }

    /// The classifier's scratch (its chunk of logits) is the head's phase of the arena, as
    /// each backend sizes it: f32 logits of 256 rows on the CPU, bf16 logits of every row here
    /// (fewer than a chunk) and the rows' losses on CUDA; nothing beside the turn for it.
    #[test]
    fn the_classifier_scratch_is_the_head_phase() {
        let mut c = config(MemoryPolicy::Keep, Alpha::Auto);
        let (seq, batch, v) = (64, 8, c.model.vocab_size);
        let head = |r: &MemoryReport| r.phases.iter().find(|p| p.name == "head").map(|p| (p.requests, p.peak));
        let cpu = plan_report(&c, seq, batch, u64::MAX, 1 << 30, 1e10).unwrap();
        assert_eq!(head(&cpu), Some((1, (4 * 256 * v as u64).next_multiple_of(ALIGNMENT))));
        c.device = "cuda".into();
        let r = plan_report(&c, seq, batch, u64::MAX, 1 << 30, 1e10).unwrap();
        let tokens = (seq * batch) as u64;
        assert_eq!(head(&r), Some((1, (2 * tokens * v as u64 + 4 * tokens).next_multiple_of(ALIGNMENT))));
        assert!(r.arena_bytes >= head(&r).unwrap().1);
    }

    /// On CUDA the device router's scratch is a phase of the arena: planned at its size, and the
    /// arena large enough where it is the largest phase (Top-P over many experts of a narrow
    /// model with a small vocabulary: 8 bytes a token and expert against the forward's routed
    /// rows and the head's logits); not on the CPU.
    #[test]
    fn cuda_plans_the_router_scratch_as_an_arena_phase() {
        let mut c = config(MemoryPolicy::Keep, Alpha::Auto);
        c.moe.routing = crate::model::config::Routing::TopP;
        c.moe.expert_widths = vec![16; 64];
        (c.model.d_model, c.model.vocab_size) = (16, 64);
        let (seq, batch) = (64, 2);
        let cpu = plan_report(&c, seq, batch, u64::MAX, 1 << 30, 1e10).unwrap();
        assert!(cpu.phases.iter().all(|p| p.name != "block router"), "the CPU routes on its host");
        c.device = "cuda".into();
        let r = plan_report(&c, seq, batch, u64::MAX, 1 << 30, 1e10).unwrap();
        let words = RouteScratch::new(seq * batch, 64, router::rule(&c.moe)).unwrap().words() as u64;
        let route = r.phases.iter().find(|p| p.name == "block router").expect("a router phase on CUDA");
        let bytes = (4 * words).next_multiple_of(ALIGNMENT);
        assert_eq!((route.requests, route.peak), (1, bytes));
        assert!(r.phases.iter().all(|p| p.peak <= route.peak), "the case must make the router's phase the largest: {:?}", r.phases);
        assert!(r.arena_bytes >= bytes, "the arena holds the router's phase");
    }

    /// With the Hopper expert kernels the routed rows are read through the slots' tokens: no
    /// gathered copy in either phase, so the arena shrinks; not where the kernels do not take
    /// the widths (the default config's are not multiples of 128, nor are these 64s), nor with
    /// expert parallelism (the rows travel, and are gathered).
    #[test]
    fn the_hopper_expert_kernels_plan_no_gathered_rows() {
        let mut c = config(MemoryPolicy::Keep, Alpha::Auto);
        c.device = "cuda".into();
        let arena = |c: &Config| plan_report(c, 64, 2, u64::MAX, 1 << 30, 1e10).unwrap().arena_bytes;
        let plain = arena(&c);
        c.cuda.hopper_experts = true;
        assert_eq!(arena(&c), plain, "widths the kernels do not take: {:?}", c.moe.expert_widths);
        c.cuda.hopper_experts = false;
        c.moe.expert_widths = vec![64, 128, 192, 256, 64, 128, 192, 256];
        assert_eq!(arena(&c), arena(&Config { cuda: Default::default(), ..c.clone() }), "widths of 64: SwiGLU's backward and dW_down would not take dy's picked rows");
        c.moe.expert_widths = vec![128, 256, 384, 512, 128, 256, 384, 512];
        let plain = arena(&c);
        c.cuda.hopper_experts = true;
        assert!(arena(&c) < plain, "{} !< {plain}", arena(&c));
        c.parallel.ep = 2;
        assert_eq!(arena(&c), plain);
    }

    /// The store's timeline (checked against real steps in tests/memo.rs, whose α-planned
    /// policies end in kept or recomputing layers): offloads in flight for one layer.
    #[test]
    fn skeletal_peak_follows_the_store() {
        let row = |policy, kept, offloaded| LayerRow { layer: 0, policy, inventory: Vec::new(), kept, offloaded, recomputed: 100 - kept - offloaded };
        let off = |a: f32, offloaded| row(LayerPolicy::Offload { alpha: a }, 0, offloaded);
        // Everything offloaded: two consecutive layers at most (tests/memo.rs measures the same).
        assert_eq!(skeletal_peak(&[off(1.0, 100), off(1.0, 100), off(1.0, 100)], 100), 200);
        // Half offloaded: a layer whole beside the one before it in flight.
        assert_eq!(skeletal_peak(&[off(0.5, 60), off(0.5, 60), off(0.5, 60)], 100), 160);
        // A kept layer beside the recomputing one's backward.
        assert_eq!(skeletal_peak(&[row(LayerPolicy::Keep, 100, 0), row(LayerPolicy::Recompute, 30, 0)], 100), 200);
    }
}
