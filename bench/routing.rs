//! Host routing micro-benchmark: the router's host work per MoE layer (Top-K/Top-P selection
//! with the slot layout, the aux losses, the token→slot incidence, the backward's per-expert
//! arguments) on the probabilities of one training step, and the CPU backend's `router_bwd`.
//! Every MoE layer's forward waits for the selection and aux losses (on a GPU, the stream
//! idles meanwhile), so at H100-ref's 32K-token step this is time a GPU loses.
//!
//! It runs as training runs it, through `Backend::host_work` on a CPU backend's threads.
//!
//! With `--device cuda` it times instead what a GPU's MoE layer waits for, both ways: routing on
//! the device (`Backend::route`: the selection kernels and the read-back of the slots, counts
//! and aux sums) and on the host (the probabilities and logits read back, then the host work
//! above, on rayon's pool: every core, `--threads` aside), on the same probabilities.
//!
//! Run: `cargo bench --bench routing [-- --tokens 32K --experts 8 --threads 0 --min-seconds 1]`
//! (`--threads 0`: one per core); `cargo bench --features cuda --bench routing -- --device cuda`.

#[path = "common/mod.rs"]
mod common;

use std::time::Instant;

use motley::backend::cpu::Cpu;
use motley::backend::Backend;
use motley::model::config::{MoeConfig, Routing as Kind};
use motley::model::router;
use motley::model::routing::Capped;
use motley::rng::Rng;
use serde_json::json;

use common::args::{show_size, Args};
use common::device::DeviceKind;

fn main() {
    let args = Args::from_env_known(&["--tokens", "--experts", "--threads", "--min-seconds", "--device"]);
    let n = args.size("--tokens", 32 << 10);
    let e: usize = args.get("--experts", 8);
    if e == 0 {
        common::args::fail("--experts 0: a router needs at least one expert");
    }
    let threads: usize = args.get("--threads", 0);
    let min_seconds: f64 = args.get("--min-seconds", 1.0);
    let (logits, probs) = router_outputs(n, e, 7);
    if DeviceKind::parse(&args.get("--device", "cpu".to_string())) == DeviceKind::Cuda {
        #[cfg(feature = "cuda")]
        return on_gpu(&args, &logits, &probs, n, e, min_seconds);
        #[cfg(not(feature = "cuda"))]
        common::device::no_cuda_feature();
    }
    let be = Cpu::new(threads);
    println!("host routing, {} tokens × {e} experts, {} threads", show_size(n), be.threads());
    println!("| routing | select (ms) | aux losses (ms) | by token (ms) | backward args (ms) | host work per layer (ms) | CPU router_bwd (ms) |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, moe) in [("top-2", moe(e, Kind::TopK)), ("top-p 0.6", moe(e, Kind::TopP))] {
        let routing = router::select(&probs, n, e, &moe);
        let dropless = Capped::dropless(routing.clone());
        let dgate: Vec<f32> = (0..routing.n_slots()).map(|s| (s % 7) as f32 * 0.1 - 0.3).collect();
        let ms = |f: &mut (dyn FnMut() + Send)| be.host_work("bench", || 1e3 * time_per_call(min_seconds, f));
        let select = ms(&mut || {
            std::hint::black_box(router::select(&probs, n, e, &moe));
        });
        let aux = ms(&mut || {
            std::hint::black_box(router::aux_losses(&probs, &logits, &routing, &moe));
        });
        let by_token = ms(&mut || {
            std::hint::black_box(routing.by_token());
        });
        let bwd_args = ms(&mut || {
            std::hint::black_box(router::BackwardArgs::new(&dropless, &moe));
        });
        let bwd = router::BackwardArgs::new(&dropless, &moe);
        let mut dlogits = vec![0f32; n * e];
        let cpu_bwd = 1e3 * time_per_call(min_seconds, &mut || be.router_bwd(&mut dlogits, &dgate, &probs, &logits, bwd.grad()));
        // The forward selects, evaluates the aux losses and forms the incidence (for the
        // combine); the backward forms the op's arguments, the incidence among them (its
        // combine shares it where nothing was dropped).
        let layer = select + aux + by_token + bwd_args;
        println!("| {name} | {select:.3} | {aux:.3} | {by_token:.3} | {bwd_args:.3} | {layer:.3} | {cpu_bwd:.3} |");
        args.append_json(&json!({"bench": "routing", "routing": name, "tokens": n, "experts": e, "threads": be.threads(), "select_ms": select, "aux_ms": aux, "by_token_ms": by_token, "backward_args_ms": bwd_args, "layer_ms": layer, "cpu_router_bwd_ms": cpu_bwd}));
    }
}

/// Routing on the GPU and on its host, from the same probabilities in device memory.
#[cfg(feature = "cuda")]
fn on_gpu(args: &Args, logits: &[f32], probs: &[f32], n: usize, e: usize, min_seconds: f64) {
    use motley::backend::cuda::CudaBackend;
    let gpu = common::device::open_cuda(false, common::device::Hopper::Off);
    let up = |host: &[f32]| {
        let mut b = gpu.alloc_f32(host.len());
        gpu.upload(CudaBackend::full_mut(&mut b), host);
        b
    };
    let (zb, pb) = (up(logits), up(probs));
    let (z, p) = (CudaBackend::full(&zb), CudaBackend::full(&pb));
    // The device router's scratch comes from a transient arena, as in a block's forward.
    let mut tx = motley::memory::arena::Arena::planned();
    println!("routing on {}, {} tokens × {e} experts (host: {} threads)", gpu.device(), show_size(n), rayon::current_num_threads());
    println!("| routing | on the device (ms) | on the host, read-back included (ms) | host / device |");
    println!("|---|---:|---:|---:|");
    for (name, moe) in [("top-2", moe(e, Kind::TopK)), ("top-p 0.6", moe(e, Kind::TopP))] {
        let device = 1e3 * time_per_call(min_seconds, &mut || {
            std::hint::black_box(router::route(&gpu, p, z, n, e, &moe, &mut tx));
        });
        let host = 1e3 * time_per_call(min_seconds, &mut || {
            std::hint::black_box(router::route_on_host(&gpu, p, z, n, e, &moe));
        });
        println!("| {name} | {device:.3} | {host:.3} | {:.2}× |", host / device);
        args.append_json(&json!({"bench": "routing", "device": "cuda", "routing": name, "tokens": n, "experts": e, "device_ms": device, "host_ms": host}));
    }
}

/// Router logits of `n` tokens, normal with a per-expert bias (so experts differ in load, as
/// after training), and their row softmax.
fn router_outputs(n: usize, e: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = Rng::new(seed);
    let logits: Vec<f32> = (0..n * e).map(|i| 1.5 * rng.normal() as f32 + 0.1 * (i % e) as f32).collect();
    let mut probs = logits.clone();
    for row in probs.chunks_mut(e) {
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        row.iter_mut().for_each(|v| *v = (*v - m).exp());
        let s: f32 = row.iter().sum();
        row.iter_mut().for_each(|v| *v /= s);
    }
    (logits, probs)
}

/// H100-ref's router: top-2 or top-p 0.6, every aux loss on (so the backward does all its work).
fn moe(e: usize, routing: Kind) -> MoeConfig {
    MoeConfig {
        expert_widths: (0..e).map(|i| 1024 + 512 * i).collect(),
        routing,
        top_k: 2,
        top_p: 0.6,
        load_balance: 0.01,
        p_penalty: 1e-3,
        entropy: 1e-3,
        z_loss: 1e-3,
    }
}

/// Seconds per call of `f`: one call to size the repetitions, then enough to last `min_seconds`.
fn time_per_call(min_seconds: f64, f: &mut (dyn FnMut() + Send)) -> f64 {
    let t = Instant::now();
    f();
    let once = t.elapsed().as_secs_f64();
    let reps = ((min_seconds / once.max(1e-9)).ceil() as usize).clamp(1, 1000);
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    t.elapsed().as_secs_f64() / reps as f64
}
