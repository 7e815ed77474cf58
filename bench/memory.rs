//! MEMO policies on the CPU engine: step time and activation memory for keep-all, full recompute
//! (everything but attention) and the planned α, on the tiny config and a long-context one.
//!
//! Memory is counted, not sampled: "device" is the most bytes the activation store held at once
//! (skeletal tensors, including restored/recomputed ones), "host" the host tier's peak. Transients
//! are reported as planned by the DSA planner (plan peak vs its lower bound) because the CPU
//! engine still allocates them one by one.
//!
//! Run: `cargo bench --bench memory [-- --steps 3]`

use std::time::Instant;

use motley::backend::cpu::Cpu;
use motley::config::{Alpha, Config, MemoryConfig, MemoryPolicy};
use motley::memory::alpha::HostLink;
use motley::memory::policy::{build_policy, Profile};
use motley::memory::report::plan_report;
use motley::memory::store::LayerPolicy;
use motley::model::config::{ModelConfig, MoeConfig};
use motley::model::Model;
use motley::rng::Rng;

struct Case {
    name: &'static str,
    model: ModelConfig,
    moe: MoeConfig,
    batch: usize,
    seq: usize,
}

fn arg(args: &[String], flag: &str, default: usize) -> usize {
    args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Median step seconds and the store's (device, host) peaks over `steps` steps after one warm-up.
fn run(be: &Cpu, case: &Case, policies: Vec<LayerPolicy>, steps: usize) -> (f64, u64, u64) {
    let mut model = Model::new(be, case.model.clone(), case.moe.clone(), 1).unwrap();
    let mut store = model.new_store_with(policies, u64::MAX).unwrap();
    let n = case.batch * case.seq;
    let mut rng = Rng::new(3);
    let tokens: Vec<u32> = (0..n + 1).map(|_| rng.below(case.model.vocab_size) as u32).collect();
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
    let (dev, host) = store.peaks();
    (times[times.len() / 2], dev, host)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let steps = arg(&args, "--steps", 3);
    let threads = arg(&args, "--threads", 2);
    let be = Cpu::new(threads);
    let base = Config::default_with(&[]).unwrap();
    let long = ModelConfig { vocab_size: 256, d_model: 64, n_layers: 4, n_heads: 4, n_kv_heads: 2, seq_len: 8192, rope_theta: 1e4, norm_eps: 1e-5, init_std: 0.02 };
    let long_moe = MoeConfig { expert_widths: vec![64, 96, 128, 160], ..base.moe.clone() };
    let cases = [
        Case { name: "tiny (configs/tiny.toml)", model: base.model.clone(), moe: base.moe.clone(), batch: 4, seq: 128 },
        Case { name: "long context", model: long, moe: long_moe, batch: 1, seq: 8192 },
    ];
    println!("MEMO policies, CPU, {threads} threads, median of {steps} steps after a warm-up; memory counted in the store");
    println!("| config | tokens | policy | step ms | store device peak MiB | host tier peak MiB |");
    println!("|---|---|---|---|---|---|");
    let mut plans = Vec::new();
    for case in &cases {
        let n = case.batch * case.seq;
        // Planned α: the LP with a cost-model profile, a host budget of half what α = 1 needs
        // and 10 GB/s, so that α lands strictly between 0 and 1.
        let probe = Profile::cost_model(&case.model, &case.moe, case.batch, case.seq, 5e10, HostLink { b_pcie: 1e10, m_host: 0 }).unwrap();
        let lc = probe.layer_costs(&case.model, &case.moe, case.batch, case.seq).unwrap()[0];
        let swapped = case.model.n_layers as u64 - 2;
        let host = swapped * (lc.s_input + lc.s_attn + lc.s_others / 2);
        let profile = Profile { link: HostLink { b_pcie: 1e10, m_host: host }, ..probe };
        let auto = MemoryConfig { policy: MemoryPolicy::Offload, alpha: Alpha::Auto, host_gib: 8.0, bandwidth_gbs: 10.0 };
        let planned = build_policy(&auto, &case.model, &case.moe, case.batch, case.seq, &profile).unwrap();
        let label = format!("planned {:?}", planned.iter().map(|p| match p { LayerPolicy::Offload { alpha } => format!("α={alpha:.2}"), other => format!("{other:?}") }).collect::<Vec<_>>());
        for (name, policies) in [
            ("keep".to_string(), vec![LayerPolicy::Keep; case.model.n_layers]),
            ("recompute".to_string(), vec![LayerPolicy::Recompute; case.model.n_layers]),
            (label, planned),
        ] {
            let (t, dev, hostp) = run(&be, case, policies, steps);
            println!("| {} | {n} | {name} | {:.1} | {:.2} | {:.2} |", case.name, t * 1e3, mib(dev), mib(hostp));
        }
        let mut cfg = base.clone();
        cfg.model = case.model.clone();
        cfg.moe = case.moe.clone();
        cfg.memory = auto;
        plans.push((case.name, plan_report(&cfg, case.seq, case.batch, u64::MAX, host, 1e10).unwrap()));
    }
    println!("\n| config | phase | requests | plan peak MiB | lower bound MiB | peak / bound | solve ms |");
    println!("|---|---|---|---|---|---|---|");
    for (name, r) in &plans {
        for p in &r.phases {
            println!("| {name} | {} | {} | {:.2} | {:.2} | {:.3} | {:.1} |", p.name, p.requests, mib(p.peak), mib(p.lower_bound), p.peak as f64 / p.lower_bound as f64, p.solve_time.as_secs_f64() * 1e3);
        }
    }
}
