//! The default table: a CPU step on every shape of bench/cpu_configs.json beside the PyTorch
//! peer's tokens/s and the machine's single-GEMM rate, with `--profile` the time per op.

use std::time::Instant;

use motley::backend::cpu::Cpu;
use motley::backend::Backend;
use motley::config::{Alpha, GateUp, MemoryConfig, MemoryPolicy, Tail};

use crate::common::args::Args;
use crate::common::device::print_profile;
use crate::common::shapes::cpu_shapes;
use crate::common::step::Run;

/// PyTorch eager tokens/s on the same shapes, 2 threads (the developers' guide's measured peers, 2026-11-23; not re-run here).
fn peer_tokens_per_s(name: &str) -> Option<f64> {
    match name {
        "tiny" => Some(4845.0),
        "small" => Some(1861.0),
        _ => None,
    }
}

/// Best GFLOP/s of an `m×k · k×n` GEMM over a few repetitions.
fn gemm_gflops(be: &Cpu, m: usize, k: usize, n: usize) -> f64 {
    let a = vec![0.5f32; m * k];
    let b = vec![0.25f32; k * n];
    let mut c = vec![0f32; m * n];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        be.matmul(&mut c, &a, &b, m, k, n, false, true, false);
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (m * k * n) as f64 / best / 1e9
}

pub fn run(args: &Args) {
    let threads = args.get("--threads", 2);
    let steps = args.get("--steps", 10);
    let profile = args.has("--profile");
    let be = if profile { Cpu::new(threads).with_profile() } else { Cpu::new(threads) };
    let keep = MemoryConfig { policy: MemoryPolicy::Keep, alpha: Alpha::Auto, host_gib: 0.0, bandwidth_gbs: 1.0, tail: Tail::Keep, gate_up: GateUp::Save, device_gib: 0.0 };
    println!("motley CPU training step, {threads} threads, f32, {steps} timed steps after 2 warm-up steps");
    println!("| config | params | tokens/step | step ms | tokens/s | GFLOP/s | GEMM GFLOP/s (N×d·d×4d) | step / GEMM | PyTorch eager tok/s | ratio |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (name, s) in cpu_shapes() {
        let mut run = Run::new(&be, &s, s.B, s.T, &keep, "cpu").expect("model");
        let n = s.B * s.T;
        for _ in 0..2 {
            run.step(&be).expect("step");
        }
        be.take_profile();
        let t = Instant::now();
        let flops: f64 = (0..steps).map(|_| run.step(&be).expect("step").train_flops).sum();
        let secs = t.elapsed().as_secs_f64();
        let tok_s = (n * steps) as f64 / secs;
        let gflops = flops / secs / 1e9;
        let gemm = gemm_gflops(&be, n, s.d, 4 * s.d);
        let (peer, ratio) = match peer_tokens_per_s(&name) {
            Some(p) => (format!("{p:.0}"), format!("{:.2}×", tok_s / p)),
            None => ("—".into(), "—".into()),
        };
        println!(
            "| {name} | {:.2} M | {n} | {:.1} | {tok_s:.0} | {gflops:.1} | {gemm:.1} | {:.0}% | {peer} | {ratio} |",
            run.n_params() as f64 / 1e6,
            secs / steps as f64 * 1e3,
            100.0 * gflops / gemm
        );
        print_profile(&format!("{name}: time per op over {steps} steps (wall, inside the backend)"), &be.take_profile(), steps, secs / steps as f64);
    }
}
