//! A model of a bench shape and its training step. This is the only bench code that calls the
//! Model and Optimizer API (which changes with bf16 working weights: adapt it here).

use std::time::Instant;

use motley::backend::Backend;
use motley::config::{Alpha, GateUp, MemoryConfig, MemoryPolicy, Tail};
use motley::memory::store::{policy_label, ActivationStore};
use motley::model::block::GATE_UP;
use motley::model::{Model, StepStats};
use motley::parallel::planner::Gpu;
use motley::rng::Rng;
use motley::train::optim::{AdamWConfig, Optimizer};
use motley::train::trainer::activation_store;

use super::device::BenchBackend;
use super::shapes::Shape;

/// A model, its activation store and optimizer, and one fixed batch of random tokens.
pub struct Run<B: Backend> {
    pub model: Model<B>,
    pub store: ActivationStore<B>,
    pub opt: Optimizer<B>,
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub batch: usize,
    pub seq: usize,
}

impl<B: Backend> Run<B> {
    /// `shape`'s model (seed 0) for steps of `batch × seq` under `memory`; `device` is motley's
    /// name for `be` (the α LP's assumed speed).
    pub fn new(be: &B, shape: &Shape, batch: usize, seq: usize, memory: &MemoryConfig, device: &str) -> motley::Result<Self> {
        let (model_cfg, moe) = shape.configs(seq);
        let model = Model::new(be, model_cfg, moe, 0)?;
        let store = activation_store(be, &model, memory, device, batch, seq)?;
        let opt_cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, grad_clip: 0.0 };
        let opt = Optimizer::new(be, opt_cfg, model.n_params());
        let mut rng = Rng::new(0);
        let n = batch * seq;
        let inputs = (0..n).map(|_| rng.below(shape.V) as u32).collect();
        let targets = (0..n).map(|_| rng.below(shape.V) as u32).collect();
        Ok(Run { model, store, opt, inputs, targets, batch, seq })
    }

    /// One training step: gradients of the fixed batch, then an AdamW update.
    pub fn step(&mut self, be: &B) -> motley::Result<StepStats> {
        self.model.zero_grads(be);
        let stats = self.model.forward_backward(be, &mut self.store, &self.inputs, &self.targets, self.batch, self.seq)?;
        self.opt.update(be, &self.model.layout, &mut self.model.params, &self.model.grads, 1e-4);
        Ok(stats)
    }

    pub fn n_params(&self) -> usize {
        self.model.n_params()
    }

    /// The store's per-layer policies in short: `keep ×12`, `offload α=0.62 ×10, keep ×2`, then
    /// `, gate/up recomputed` where the store does not save the experts' gate/up product.
    pub fn policy_label(&self) -> String {
        let gate_up = if self.store.declares(GATE_UP) { "" } else { ", gate/up recomputed" };
        format!("{}{gate_up}", policy_label(self.store.policies()))
    }
}



/// `keep`, `recompute`, `alpha` (offload with MEMO's α from the LP, as `alpha = "auto"`),
/// `alpha=0.25` (a fixed α) or `auto` (`memory.policy = "auto"`: the least recompute that fits
/// the device), with the host tier and link the α LP plans for, then options after
/// commas: `tail=recompute` (an offload policy's last two layers recompute instead of keeping,
/// `memory.tail`) and `gate_up=recompute` (the experts' gate/up product is recomputed in the
/// backward instead of saved, `memory.gate_up`).
pub fn parse_policy(text: &str, host_gib: f64, bandwidth_gbs: f64) -> Result<MemoryConfig, String> {
    let expected = || {
        format!("--policy {text}: expected keep, recompute, alpha (α from the LP), alpha=A with A in [0, 1] or auto, then optionally ,tail=recompute (alpha only) and ,gate_up=recompute")
    };
    let mut parts = text.split(',');
    let head = parts.next().unwrap_or_default();
    let (policy, alpha) = match head {
        "keep" => (MemoryPolicy::Keep, Alpha::Auto),
        "recompute" => (MemoryPolicy::Recompute, Alpha::Auto),
        "alpha" | "offload" => (MemoryPolicy::Offload, Alpha::Auto),
        "auto" => (MemoryPolicy::Auto, Alpha::Auto),
        t => match t.strip_prefix("alpha=").map(str::parse::<f32>) {
            Some(Ok(a)) if (0.0..=1.0).contains(&a) => (MemoryPolicy::Offload, Alpha::Fixed(a)),
            _ => return Err(expected()),
        },
    };
    let (mut tail, mut gate_up) = (Tail::Keep, GateUp::Save);
    for option in parts {
        match option {
            "tail=recompute" if policy == MemoryPolicy::Offload => tail = Tail::Recompute,
            "gate_up=recompute" => gate_up = GateUp::Recompute,
            _ => return Err(expected()),
        }
    }
    Ok(MemoryConfig { policy, alpha, host_gib, bandwidth_gbs, tail, gate_up, device_gib: 0.0 })
}

/// Dense bf16 peak of the GPUs the benches run on (H100 and H200 SXM: 989 TFLOP/s), the
/// denominator of MFU.
pub fn peak_flops() -> f64 {
    Gpu::h100().peak_flops
}

/// Host↔device bandwidth of issue #6 (pinned copies on the lent H100, measured by the issue's
/// author, not yet by motley), what the α LP plans with on the GPU by default.
pub fn gpu_link_gbs() -> f64 {
    Gpu::h100().pcie_bw / 1e9
}

/// One step as measured: seconds (after waiting for the device), counted FLOPs, tokens, and the
/// peak memory since the run began.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepTime {
    pub warmup: bool,
    pub seconds: f64,
    pub flops: f64,
    pub tokens: usize,
    pub peak_bytes: u64,
}

/// Runs `warmup` then `steps` steps, reporting each to `each` as it finishes (a child of the
/// long-context sweep prints it at once, so a step that ends before a kill is not lost). Stops
/// early, after at least one timed step, once the steps have taken `max_seconds`.
pub fn measure<B: BenchBackend>(be: &B, run: &mut Run<B>, warmup: usize, steps: usize, max_seconds: f64, mut each: impl FnMut(&StepTime)) -> motley::Result<Vec<StepTime>> {
    be.sync();
    be.reset_peak();
    let started = Instant::now();
    let mut times = Vec::with_capacity(warmup + steps);
    for i in 0..warmup + steps {
        if i > warmup && started.elapsed().as_secs_f64() >= max_seconds {
            break;
        }
        let t = Instant::now();
        let stats = run.step(be)?;
        be.sync();
        let st = StepTime { warmup: i < warmup, seconds: t.elapsed().as_secs_f64(), flops: stats.train_flops, tokens: stats.tokens, peak_bytes: be.peak_bytes() };
        each(&st);
        times.push(st);
    }
    Ok(times)
}

/// Totals of the timed (non-warm-up) steps; `None` when there are none.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub steps: usize,
    pub seconds: f64,
    pub flops: f64,
    pub tokens: usize,
    pub peak_bytes: u64,
}

impl Summary {
    pub fn of(times: &[StepTime]) -> Option<Summary> {
        let timed: Vec<&StepTime> = times.iter().filter(|t| !t.warmup).collect();
        (!timed.is_empty()).then(|| Summary {
            steps: timed.len(),
            seconds: timed.iter().map(|t| t.seconds).sum(),
            flops: timed.iter().map(|t| t.flops).sum(),
            tokens: timed.iter().map(|t| t.tokens).sum(),
            peak_bytes: times.iter().map(|t| t.peak_bytes).max().unwrap_or(0),
        })
    }
    pub fn step_s(&self) -> f64 {
        self.seconds / self.steps as f64
    }
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.seconds
    }
    pub fn flops_per_s(&self) -> f64 {
        self.flops / self.seconds
    }
    /// Model FLOPs utilisation against [`peak_flops`], in percent.
    pub fn mfu_pct(&self) -> f64 {
        100.0 * self.flops_per_s() / peak_flops()
    }
}

pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}
