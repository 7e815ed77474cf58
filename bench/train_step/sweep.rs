//! The long-context sweep: one sequence length per child process (this bench run again with
//! `--child`), so that an out-of-memory at one length is a row saying "OOM" and the sweep goes
//! on, each length has a time limit, and each child's peak memory is its own. The child prints a
//! line per step as it finishes; a length killed at its limit still reports the steps it did.
//!
//! `--sweep 16K,…,1M [--policy recompute --time-limit S --budget S --warmup 1 --steps 1]`
//! plus the one-shape flags (default B=1 and policy recompute).

use std::time::{Duration, Instant};

use motley::backend::cpu::Cpu;
use motley::config::{Config, GateUp, MemoryPolicy};
use motley::memory::report::{plan_policies, plan_report, PlanTarget};
use motley::parallel::dispatch::DispatchMode;
use motley::model::block::GATE_UP;

use super::one_shape::{json_line, Case};
use crate::common::args::{fail, show_size, Args};
use crate::common::child::{run_self, Outcome};
use crate::common::device::{BenchBackend, DeviceKind, Hopper};
use crate::common::step::{gib, measure, Run, StepTime, Summary};

pub const DEFAULT_LENGTHS: &str = "16K,32K,64K,128K,256K,512K,1M";

pub fn parent(args: &Args) {
    let policy = args.value("--policy").unwrap_or("recompute");
    let base = Case::from_args(args, Some(1), policy, 1, 1);
    let lengths = args.sizes("--sweep", DEFAULT_LENGTHS);
    let limit: f64 = args.get("--time-limit", 240.0);
    let budget: f64 = args.get("--budget", f64::INFINITY);
    let started = Instant::now();
    println!(
        "motley long-context sweep: {} on {}, B={}, policy {policy}, {} warm-up + {} timed steps per length, each length in its own process (limit {limit:.0} s{})",
        base.shape_name,
        base.device.name(),
        base.batch,
        base.warmup,
        base.steps,
        if budget.is_finite() { format!(", sweep budget {budget:.0} s") } else { String::new() }
    );
    println!("| T | policy | status | step s | tokens/s | model TFLOP/s | MFU | peak memory GiB | planned GiB | wall s |\n|---|---|---|---|---|---|---|---|---|---|");
    let mut measured = 0;
    for seq in lengths {
        let case = Case { seq, ..Case::from_args(args, Some(1), policy, 1, 1) };
        let planned = |bytes: Option<u64>| bytes.map_or("—".into(), |b| format!("{:.1}", gib(b)));
        let left = budget - started.elapsed().as_secs_f64();
        if left < 5.0 {
            let planned = planned(planned_bytes(&case));
            println!("| {} | {policy} | skipped (sweep budget) | | | | | | {planned} | |", show_size(seq));
            args.append_json(&json_line(&case, policy, 0, "skipped", None));
            continue;
        }
        let mut child_args = vec!["--child".to_string()];
        child_args.extend(case.to_args(policy));
        let run = run_self(&child_args, Duration::from_secs_f64(limit.min(left)));
        let report = ChildReport::parse(&run.stdout);
        let status = report.status(&run.outcome);
        let policy_label = report.policy.clone().unwrap_or_else(|| policy.to_string());
        let planned = planned(report.planned.or_else(|| planned_bytes(&case)));
        let cells = match report.summary() {
            Some(s) => {
                measured += 1;
                let mfu = if case.device == DeviceKind::Cuda { format!("{:.1}%", s.mfu_pct()) } else { "—".into() };
                format!("{:.2} | {:.0} | {:.1} | {mfu} | {:.2}", s.step_s(), s.tokens_per_s(), s.flops_per_s() / 1e12, gib(s.peak_bytes))
            }
            None => " | | | | ".into(),
        };
        println!("| {} | {policy_label} | {status} | {cells} | {planned} | {:.0} |", show_size(seq), run.seconds);
        args.append_json(&json_line(&case, &policy_label, report.params, &status, report.summary().as_ref()));
    }
    if measured == 0 {
        fail("no sequence length finished a step");
    }
}

/// The device bytes `plan-memory` predicts for `case` (static + skeletal + transient + boundary)
/// before a child has run it; none for `auto`, which chooses within the device's memory.
fn planned_bytes(case: &Case) -> Option<u64> {
    if case.memory.policy == MemoryPolicy::Auto {
        return None;
    }
    let mut cfg = Config::default_with(&[]).ok()?;
    (cfg.model, cfg.moe) = case.shape.configs(case.seq);
    cfg.memory = case.memory.clone();
    cfg.device = case.device.name().to_string();
    // The Hopper expert kernels read the routed rows in place: no gathered copy planned.
    cfg.cuda.hopper_experts = case.hopper != Hopper::Off;
    let host = (case.memory.host_gib * (1u64 << 30) as f64) as u64;
    plan_report(&cfg, case.seq, case.batch, u64::MAX, host, case.memory.bandwidth_gbs * 1e9).ok().map(|r| r.device_bytes)
}

/// What a child printed: `policy …`, `params N`, and one `step …` line per finished step.
#[derive(Debug, Default, PartialEq)]
pub struct ChildReport {
    pub policy: Option<String>,
    /// The device bytes planned for the policies the child's store took.
    pub planned: Option<u64>,
    pub params: usize,
    pub steps: Vec<StepTime>,
}

impl ChildReport {
    pub fn parse(lines: &[String]) -> ChildReport {
        let mut r = ChildReport::default();
        for line in lines {
            if let Some(p) = line.strip_prefix("policy ") {
                r.policy = Some(p.to_string());
            } else if let Some(b) = line.strip_prefix("planned ") {
                r.planned = b.parse().ok();
            } else if let Some(n) = line.strip_prefix("params ") {
                r.params = n.parse().unwrap_or(0);
            } else if let Some(step) = line.strip_prefix("step ").and_then(parse_step) {
                r.steps.push(step);
            }
        }
        r
    }

    /// The timed steps; when a kill came after the warm-up only, the warm-up steps (marked so
    /// by [`Self::status`]).
    pub fn summary(&self) -> Option<Summary> {
        Summary::of(&self.steps).or_else(|| {
            let as_timed: Vec<StepTime> = self.steps.iter().map(|s| StepTime { warmup: false, ..*s }).collect();
            Summary::of(&as_timed)
        })
    }

    pub fn status(&self, outcome: &Outcome) -> String {
        let timed = self.steps.iter().filter(|s| !s.warmup).count();
        match outcome {
            Outcome::TimedOut if timed > 0 => format!("timeout after {timed} timed step{}", if timed == 1 { "" } else { "s" }),
            Outcome::TimedOut if !self.steps.is_empty() => "timeout; first step only (includes warm-up costs)".into(),
            other => other.label().replace('|', "/"),
        }
    }
}

fn parse_step(text: &str) -> Option<StepTime> {
    let f: Vec<&str> = text.split(' ').collect();
    let [warmup, seconds, flops, tokens, peak] = f[..] else { return None };
    Some(StepTime { warmup: warmup == "1", seconds: seconds.parse().ok()?, flops: flops.parse().ok()?, tokens: tokens.parse().ok()?, peak_bytes: peak.parse().ok()? })
}

/// Child side: one length, a line per step on stdout.
pub fn child(args: &Args) {
    let case = Case::from_args(args, None, "keep", 1, 1);
    match case.device {
        DeviceKind::Cpu => child_on(&Cpu::new(case.threads), &case),
        DeviceKind::Cuda => {
            #[cfg(feature = "cuda")]
            return child_on(&crate::common::device::open_cuda(false, case.hopper), &case);
            #[cfg(not(feature = "cuda"))]
            crate::common::device::no_cuda_feature();
        }
    }
}

fn child_on<B: BenchBackend>(be: &B, case: &Case) {
    let mut run = Run::new(be, &case.shape, case.batch, case.seq, &case.memory, case.device.name()).unwrap_or_else(|e| fail(&format!("{e}")));
    println!("policy {}", run.policy_label());
    let (model, moe) = (&run.model.config, &run.model.moe);
    let target = PlanTarget { model, moe, memory: &case.memory, device: case.device.name(), fused_gather: be.fuses_expert_gather(model.d_model, &moe.expert_widths), dispatch: DispatchMode::Dropless };
    let gate_up = if run.store.declares(GATE_UP) { GateUp::Save } else { GateUp::Recompute };
    let host = (case.memory.host_gib * (1u64 << 30) as f64) as u64;
    if let Ok(plan) = plan_policies(&target, case.batch, case.seq, run.store.policies(), gate_up, host) {
        println!("planned {}", plan.device_bytes);
    }
    println!("params {}", run.n_params());
    measure(be, &mut run, case.warmup, case.steps, f64::INFINITY, |t| println!("step {} {} {} {} {}", t.warmup as u8, t.seconds, t.flops, t.tokens, t.peak_bytes)).unwrap_or_else(|e| fail(&format!("{e}")));
}
