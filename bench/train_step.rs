//! CPU training-step benchmark on the PyTorch peer's shapes (bench/cpu_configs.json).
//! Prints tokens/s and model GFLOP/s (the peer's FLOP accounting: 3× forward matmuls with the
//! experts' routed counts, plus causal attention) next to the machine's single-GEMM GFLOP/s.
//!
//! Run: `cargo bench --bench train_step [-- --threads 2 --steps 10 --profile]`

use std::time::Instant;

use motley::backend::cpu::Cpu;
use motley::backend::Backend;
use motley::model::config::{ModelConfig, MoeConfig, Routing};
use motley::model::Model;
use motley::rng::Rng;
use motley::train::optim::{AdamWConfig, Optimizer};
use serde::Deserialize;

#[derive(Deserialize)]
#[allow(non_snake_case)]
struct Shape {
    V: usize,
    d: usize,
    L: usize,
    h: usize,
    sizes: Vec<usize>,
    k: usize,
    B: usize,
    T: usize,
}

/// PyTorch eager tokens/s on the same shapes, 2 threads (DEVELOPERS.md, 2026-11-23).
fn peer_tokens_per_s(name: &str) -> Option<f64> {
    match name {
        "tiny" => Some(4845.0),
        "small" => Some(1861.0),
        _ => None,
    }
}

fn arg(args: &[String], flag: &str, default: usize) -> usize {
    args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads = arg(&args, "--threads", 2);
    let steps = arg(&args, "--steps", 10);
    let profile = args.iter().any(|a| a == "--profile");
    let be = if profile { Cpu::new(threads).with_profile() } else { Cpu::new(threads) };
    let shapes: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(include_str!("cpu_configs.json")).expect("bench/cpu_configs.json");
    println!("motley CPU training step, {threads} threads, f32, {steps} timed steps after 2 warm-up steps");
    println!("| config | params | tokens/step | step ms | tokens/s | GFLOP/s | GEMM GFLOP/s (N×d·d×4d) | step / GEMM | PyTorch eager tok/s | ratio |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (name, value) in shapes.iter().filter(|(k, _)| !k.starts_with('_')) {
        let s: Shape = serde_json::from_value(value.clone()).expect("shape");
        let model_cfg = ModelConfig {
            vocab_size: s.V,
            d_model: s.d,
            n_layers: s.L,
            n_heads: s.h,
            n_kv_heads: s.h,
            seq_len: s.T,
            rope_theta: 10000.0,
            norm_eps: 1e-6,
            init_std: 0.02,
        };
        let moe = MoeConfig {
            expert_widths: s.sizes.clone(),
            routing: Routing::TopK,
            top_k: s.k,
            top_p: 1.0,
            load_balance: 0.0,
            p_penalty: 0.01,
            entropy: 0.0,
            z_loss: 0.0,
        };
        let mut model = Model::new(&be, model_cfg, moe, 0).expect("model");
        let mut store = model.new_store();
        let opt_cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, grad_clip: 0.0 };
        let mut opt = Optimizer::new(&be, opt_cfg, model.n_params());
        let mut rng = Rng::new(0);
        let n = s.B * s.T;
        let inputs: Vec<u32> = (0..n).map(|_| rng.below(s.V) as u32).collect();
        let targets: Vec<u32> = (0..n).map(|_| rng.below(s.V) as u32).collect();
        let mut step = |model: &mut Model<Cpu>| {
            model.zero_grads(&be);
            let st = model.forward_backward(&be, &mut store, &inputs, &targets, s.B, s.T).expect("step");
            opt.update(&be, &model.layout, &mut model.params, &model.grads, 1e-4);
            st.train_flops
        };
        for _ in 0..2 {
            step(&mut model);
        }
        be.take_profile();
        let t = Instant::now();
        let flops: f64 = (0..steps).map(|_| step(&mut model)).sum();
        let secs = t.elapsed().as_secs_f64();
        let tok_s = (n * steps) as f64 / secs;
        let gflops = flops / secs / 1e9;
        let gemm = gemm_gflops(&be, n, s.d, 4 * s.d);
        let (peer, ratio) = match peer_tokens_per_s(name) {
            Some(p) => (format!("{p:.0}"), format!("{:.2}×", tok_s / p)),
            None => ("—".into(), "—".into()),
        };
        println!(
            "| {name} | {:.2} M | {n} | {:.1} | {tok_s:.0} | {gflops:.1} | {gemm:.1} | {:.0}% | {peer} | {ratio} |",
            model.n_params() as f64 / 1e6,
            secs / steps as f64 * 1e3,
            100.0 * gflops / gemm
        );
        let ops = be.take_profile();
        if !ops.is_empty() {
            println!("\n{name}: time per op over {steps} steps (wall, inside the backend)\n| op | calls/step | ms/step | share |\n|---|---|---|---|");
            let total: f64 = ops.iter().map(|o| o.2).sum();
            for (op, calls, secs) in ops {
                println!("| {op} | {} | {:.1} | {:.0}% |", calls / steps as u64, secs / steps as f64 * 1e3, 100.0 * secs / total);
            }
            println!("| (step total) | | {:.1} | |\n", secs / steps as f64 * 1e3);
        }
    }
}
