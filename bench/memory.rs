//! MEMO policies on the CPU engine: step time and memory for keep-all, full recompute
//! (everything but attention) and the planned α, on the tiny config and a long-context one, each
//! with the blocks' transients in the planned arena and with one buffer per transient.
//!
//! Memory two ways. Counted: "store" is the most bytes the activation store held at once
//! (skeletal tensors, including restored/recomputed ones), "host" the host tier's peak.
//! Measured: the process's peak resident set (`VmHWM`). Peak RSS is per process and never goes
//! down, so every (config, policy) runs in a child process of its own: the bench re-executes
//! itself with `--child CASE POLICY ARENA`, the child prints one `result` line, the parent
//! parses it.
//! "RSS before" is the child's resident set after building the model and the store, before the
//! first step (binary, parameters, gradients, tokens); the difference is what the steps added.
//!
//! Run: `cargo bench --bench memory [-- --steps 3 --threads 2]`

#[path = "common/mod.rs"]
mod common;

use std::process::Command;
use std::time::Instant;

use motley::backend::cpu::Cpu;
use motley::config::{Alpha, Config, GateUp, MemoryConfig, MemoryPolicy, Tail};
use motley::memory::alpha::HostLink;
use motley::memory::arena::Arena;
use motley::memory::policy::{build_policy, Profile};
use motley::memory::report::plan_report;
use motley::memory::solver;
use motley::memory::store::LayerPolicy;
use motley::model::config::{ModelConfig, MoeConfig};
use motley::model::Model;
use motley::rng::Rng;

use common::device::proc_status_kib;

struct Case {
    name: &'static str,
    model: ModelConfig,
    moe: MoeConfig,
    batch: usize,
    seq: usize,
}

/// What one child measured.
struct Measured {
    step_s: f64,
    store_peak: u64,
    host_peak: u64,
    rss_before_kib: u64,
    rss_peak_kib: u64,
    /// Transient buffers allocated over all steps (the arena's growths, or one per transient).
    allocations: usize,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn cases() -> Vec<Case> {
    let base = Config::default_with(&[]).unwrap();
    let long = ModelConfig { vocab_size: 256, d_model: 64, n_layers: 4, n_heads: 4, n_kv_heads: 2, seq_len: 8192, rope_theta: 1e4, norm_eps: 1e-5, init_std: 0.02 };
    let long_moe = MoeConfig { expert_widths: vec![64, 96, 128, 160], ..base.moe.clone() };
    vec![
        Case { name: "tiny (configs/tiny.toml)", model: base.model.clone(), moe: base.moe.clone(), batch: 4, seq: 128 },
        Case { name: "long context", model: long, moe: long_moe, batch: 1, seq: 8192 },
    ]
}

/// The offload config and host budget of the planned-α row: the LP with a cost-model profile, a
/// host budget of half what α = 1 needs and 10 GB/s, so that α lands strictly between 0 and 1.
fn planned(case: &Case) -> (MemoryConfig, u64, Vec<LayerPolicy>) {
    let probe = Profile::cost_model(&case.model, &case.moe, case.batch, case.seq, 5e10, HostLink { b_pcie: 1e10, m_host: 0 }).unwrap();
    let lc = probe.layer_costs(&case.model, &case.moe, case.batch, case.seq).unwrap()[0];
    let swapped = case.model.n_layers as u64 - 2;
    let host = swapped * (lc.s_input + lc.s_attn + lc.s_others / 2);
    let profile = Profile { link: HostLink { b_pcie: 1e10, m_host: host }, ..probe };
    let auto = MemoryConfig { policy: MemoryPolicy::Offload, alpha: Alpha::Auto, host_gib: 8.0, bandwidth_gbs: 10.0, tail: Tail::Keep, gate_up: GateUp::Save, device_gib: 0.0 };
    let policies = build_policy(&auto, &case.model, &case.moe, case.batch, case.seq, &profile).unwrap();
    (auto, host, policies)
}

/// The policy rows of a case: (label, one policy per layer).
fn policies(case: &Case) -> Vec<(String, Vec<LayerPolicy>)> {
    let planned = planned(case).2;
    let label = planned
        .iter()
        .map(|p| match p {
            LayerPolicy::Offload { alpha } => format!("α={alpha:.2}"),
            LayerPolicy::Keep => "keep".into(),
            LayerPolicy::Recompute => "recompute".into(),
        })
        .collect::<Vec<_>>()
        .join(", ");
    vec![
        ("keep".into(), vec![LayerPolicy::Keep; case.model.n_layers]),
        ("recompute".into(), vec![LayerPolicy::Recompute; case.model.n_layers]),
        (format!("planned ({label})"), planned),
    ]
}

/// Median step seconds and peaks over `steps` steps after one warm-up.
fn measure(be: &Cpu, case: &Case, policies: Vec<LayerPolicy>, arena: Arena<Cpu>, steps: usize) -> Measured {
    let mut model = Model::new(be, case.model.clone(), case.moe.clone(), 1).unwrap();
    let mut store = model.new_store_with(policies, u64::MAX, GateUp::Save).unwrap();
    store.set_arena(arena);
    let n = case.batch * case.seq;
    let mut rng = Rng::new(3);
    let tokens: Vec<u32> = (0..n + 1).map(|_| rng.below(case.model.vocab_size) as u32).collect();
    let rss_before_kib = proc_status_kib("VmRSS:");
    let mut times = Vec::new();
    for s in 0..=steps {
        model.zero_grads(be);
        store.reset_peaks();
        let t = Instant::now();
        model.forward_backward(be, &mut store, &tokens[..n], &tokens[1..], case.batch, case.seq).unwrap();
        if s > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let (store_peak, host_peak) = store.peaks();
    let allocations = store.arena().allocations();
    Measured { step_s: times[times.len() / 2], store_peak, host_peak, rss_before_kib, rss_peak_kib: proc_status_kib("VmHWM:"), allocations }
}

/// Child side: measure one (case, policy, arena) and print it on one line for the parent.
fn child(case: usize, policy: usize, planned: bool, steps: usize, threads: usize) {
    let case = &cases()[case];
    let (_, policies) = policies(case).swap_remove(policy);
    let arena = if planned { Arena::planned() } else { Arena::per_tensor() };
    let m = measure(&Cpu::new(threads), case, policies, arena, steps);
    println!("result {} {} {} {} {} {}", m.step_s, m.store_peak, m.host_peak, m.rss_before_kib, m.rss_peak_kib, m.allocations);
}

/// Parent side: run one (case, policy, arena) in a fresh process and parse its line.
fn in_child(case: usize, policy: usize, planned: bool, steps: usize, threads: usize) -> Measured {
    let exe = std::env::current_exe().expect("current_exe");
    let args = ["--child", &case.to_string(), &policy.to_string(), &(planned as u8).to_string(), "--steps", &steps.to_string(), "--threads", &threads.to_string()];
    let out = Command::new(&exe).args(args).output().unwrap_or_else(|e| panic!("run {}: {e}", exe.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find_map(|l| l.strip_prefix("result ")).unwrap_or_else(|| {
        panic!("child {case}/{policy} ({}) printed no result: {}", out.status, String::from_utf8_lossy(&out.stderr))
    });
    let f: Vec<f64> = line.split(' ').map(|v| v.parse().unwrap_or_else(|_| panic!("child result {line:?}"))).collect();
    Measured { step_s: f[0], store_peak: f[1] as u64, host_peak: f[2] as u64, rss_before_kib: f[3] as u64, rss_peak_kib: f[4] as u64, allocations: f[5] as usize }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flags = common::args::Args::from_env();
    let steps = flags.get("--steps", 3);
    let threads = flags.get("--threads", 2);
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let at = |k: usize| args.get(i + k).and_then(|v| v.parse().ok()).expect("--child CASE POLICY ARENA");
        return child(at(1), at(2), at(3) == 1, steps, threads);
    }
    let cases = cases();
    println!("MEMO policies, CPU, {threads} threads, median of {steps} steps after a warm-up; each row in its own process");
    println!("| config | tokens | policy | transients | step ms | transient allocations, {} steps | store peak MiB | host tier peak MiB | RSS before MiB | peak RSS MiB |", steps + 1);
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut plans = Vec::new();
    for (c, case) in cases.iter().enumerate() {
        for ((p, (name, _)), planned) in policies(case).iter().enumerate().flat_map(|row| [(row, true), (row, false)]) {
            let m = in_child(c, p, planned, steps, threads);
            println!(
                "| {} | {} | {name} | {} | {:.1} | {} | {:.2} | {:.2} | {:.1} | {:.1} |",
                case.name,
                case.batch * case.seq,
                if planned { "arena" } else { "per tensor" },
                m.step_s * 1e3,
                m.allocations,
                mib(m.store_peak),
                mib(m.host_peak),
                m.rss_before_kib as f64 / 1024.0,
                m.rss_peak_kib as f64 / 1024.0
            );
        }
        let (auto, host, _) = planned(case);
        let mut cfg = Config::default_with(&[]).unwrap();
        cfg.model = case.model.clone();
        cfg.moe = case.moe.clone();
        cfg.memory = auto;
        plans.push((case.name, plan_report(&cfg, case.seq, case.batch, u64::MAX, host, 1e10).unwrap()));
    }
    println!("\nBlock transient plans (solver: {})", solver::NAME);
    println!("| config | phase | requests | plan peak MiB | lower bound MiB | peak / bound | solve ms |");
    println!("|---|---|---|---|---|---|---|");
    for (name, r) in &plans {
        for p in &r.phases {
            println!("| {name} | {} | {} | {:.2} | {:.2} | {:.3} | {:.1} |", p.name, p.requests, mib(p.peak), mib(p.lower_bound), p.peak as f64 / p.lower_bound as f64, p.solve_time.as_secs_f64() * 1e3);
        }
    }
}
