//! Causal attention micro-benchmark: motley's `attention_fwd` and forward + backward at
//! T = 4K, 32K, 128K, 16 heads of 64, beside PyTorch SDPA timed the same way by
//! `bench/peer/sdpa_attention.py`.
//!
//! FLOPs (FlashAttention's convention, also the peer's): forward `2·2·B·H·T²·D / 2` (QKᵀ and PV
//! over the causal half), backward 2.5× the forward (five matmuls against two), so forward +
//! backward is 3.5× the forward. B = max(1, tokens / T) with `--tokens` 32K, the H100-ref step's
//! tokens. Storage is bf16 (the kernels stage bf16 tiles); the peer's tensors are bf16.
//!
//! Run: `cargo bench --features cuda --bench attention [-- --device cuda --lengths 4K,32K,128K
//! --heads 16 --head-dim 64 --tokens 32K --min-seconds 1 --hopper --json FILE]` (`--device cpu`
//! runs the CPU backend, for short lengths; `--hopper` both passes on the Hopper kernels,
//! `CudaBackend::with_hopper_kernels`, its rows named "motley (wgmma)", each length's output
//! and gradient also held to the mma.sync kernels': the normalised max error, a check at the
//! lengths the parity tests do not reach).

#[path = "common/mod.rs"]
mod common;

use std::time::Instant;

use motley::backend::cpu::Cpu;
use motley::backend::{AttnShape, Backend};
use motley::rng::Rng;
use serde_json::json;

use common::args::{show_size, Args};
use common::compare::normalised_error as error;
use common::device::{BenchBackend, DeviceKind};

/// Backward FLOPs per forward FLOP (FlashAttention's convention; bench/peer/sdpa_attention.py
/// uses the same).
const BWD_PER_FWD: f64 = 2.5;

fn main() {
    let args = Args::from_env_known(&["--device", "--threads", "--lengths", "--tokens", "--heads", "--head-dim", "--min-seconds", "--hopper"]);
    match DeviceKind::parse(args.value("--device").unwrap_or("cuda")) {
        DeviceKind::Cpu if args.has("--hopper") => common::args::fail("--hopper runs the Hopper (wgmma) kernels: it needs --device cuda"),
        DeviceKind::Cpu => run(&Cpu::new(args.get("--threads", 0)), &args, None::<&Cpu>),
        DeviceKind::Cuda => {
            #[cfg(feature = "cuda")]
            {
                use common::device::{open_cuda, Hopper};
                let hopper = Hopper::from_args(&args);
                let reference = (hopper != Hopper::Off).then(|| open_cuda(false, Hopper::Off));
                run(&open_cuda(false, hopper), &args, reference.as_ref());
            }
            #[cfg(not(feature = "cuda"))]
            common::device::no_cuda_feature();
        }
    }
}

/// A buffer of `n` values uniform in [−1, 1).
fn random<B: Backend>(be: &B, n: usize, seed: u64) -> B::Buf {
    let mut rng = Rng::new(seed);
    let host: Vec<f32> = (0..n).map(|_| rng.sym()).collect();
    let mut buf = be.alloc(n);
    be.upload(B::full_mut(&mut buf), &host);
    buf
}

/// Seconds per call of `f`: one call to size the repetitions, then enough calls to last
/// `min_seconds` (at most 100), timed together.
fn time_per_call<B: BenchBackend>(be: &B, min_seconds: f64, mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    f();
    be.sync();
    let once = t.elapsed().as_secs_f64();
    let reps = ((min_seconds / once.max(1e-9)).ceil() as usize).clamp(1, 100);
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    be.sync();
    t.elapsed().as_secs_f64() / reps as f64
}

/// O and dqkv of one forward + backward on `be` from the benchmark's inputs (seeds 1, 2).
fn outputs<B: Backend>(be: &B, shape: AttnShape) -> (Vec<f32>, Vec<f32>) {
    let n = shape.tokens();
    let (qkv, dout) = (random(be, n * shape.qkv_width(), 1), random(be, n * shape.out_width(), 2));
    let (mut out, mut lse, mut dqkv) = (be.alloc(n * shape.out_width()), be.alloc_f32(shape.batch * shape.n_heads * shape.seq), be.alloc(n * shape.qkv_width()));
    let mut scratch = be.alloc_f32(be.attention_bwd_scratch_len(shape));
    be.attention_fwd(B::full_mut(&mut out), B::full_mut(&mut lse), B::full(&qkv), shape);
    be.attention_bwd(B::full_mut(&mut dqkv), B::full(&dout), B::full(&out), B::full(&lse), B::full(&qkv), shape, B::full_mut(&mut scratch));
    (be.download(B::full(&out)), be.download(B::full(&dqkv)))
}

/// Times `be` at each length; with `reference`, also holds each length's O and dqkv to it.
fn run<B: BenchBackend, R: Backend>(be: &B, args: &Args, reference: Option<&R>) {
    let lengths = args.sizes("--lengths", "4K,32K,128K");
    let (heads, head_dim) = (args.get("--heads", 16), args.get("--head-dim", 64));
    let tokens = args.size("--tokens", 32 << 10);
    let min_seconds = args.get("--min-seconds", 1.0);
    let kernels = if args.has("--hopper") { "the Hopper (wgmma) kernels" } else { "the mma.sync kernels" };
    println!("motley causal attention on {}, {kernels}, bf16 q/k/v and output with f32 lse, {heads} heads of {head_dim}; FLOPs: forward 2·2·B·H·T²·D/2, backward 2.5× forward", be.label());
    let (check_head, check_rule) = if reference.is_some() { (" error vs mma.sync: O / dqkv |", "---|") } else { ("", "") };
    println!("| T | B | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |{check_head}\n|---|---|---|---|---|---|{check_rule}");
    for seq in lengths {
        let shape = AttnShape { batch: (tokens / seq).max(1), seq, n_heads: heads, n_kv_heads: heads, head_dim };
        let n = shape.tokens();
        let qkv = random(be, n * shape.qkv_width(), 1);
        let dout = random(be, n * shape.out_width(), 2);
        let (mut out, mut lse, mut dqkv) = (be.alloc(n * shape.out_width()), be.alloc_f32(shape.batch * heads * seq), be.alloc(n * shape.qkv_width()));
        let mut scratch = be.alloc_f32(be.attention_bwd_scratch_len(shape));
        let forward = |out: &mut B::Buf, lse: &mut B::Buf| be.attention_fwd(B::full_mut(out), B::full_mut(lse), B::full(&qkv), shape);
        let fwd = time_per_call(be, min_seconds, || forward(&mut out, &mut lse));
        let fwd_bwd = time_per_call(be, min_seconds, || {
            forward(&mut out, &mut lse);
            be.attention_bwd(B::full_mut(&mut dqkv), B::full(&dout), B::full(&out), B::full(&lse), B::full(&qkv), shape, B::full_mut(&mut scratch));
        });
        let flops = shape.causal_attention_flops();
        let (fwd_rate, fb_rate) = (flops / fwd / 1e12, (1.0 + BWD_PER_FWD) * flops / fwd_bwd / 1e12);
        // The last timed call's O and dqkv against the reference kernels' on the same inputs.
        let errors = reference.map(|r| {
            let (want_out, want_dqkv) = outputs(r, shape);
            (error(&want_out, &be.download(B::full(&out))), error(&want_dqkv, &be.download(B::full(&dqkv))))
        });
        let check = errors.map_or(String::new(), |(o, d)| format!(" {o:.1e} / {d:.1e} |"));
        println!("| {} | {} | {:.2} | {fwd_rate:.1} | {:.2} | {fb_rate:.1} |{check}", show_size(seq), shape.batch, fwd * 1e3, fwd_bwd * 1e3);
        let mut row = json!({"impl": if args.has("--hopper") { "motley (wgmma)" } else { "motley" }, "device": be.label(), "T": seq, "B": shape.batch, "H": heads, "D": head_dim,
                             "fwd_ms": fwd * 1e3, "fwd_TFLOPs": fwd_rate, "fwdbwd_ms": fwd_bwd * 1e3, "fwdbwd_TFLOPs": fb_rate});
        if let Some((o, d)) = errors {
            row["err_vs_mma_out"] = json!(o);
            row["err_vs_mma_dqkv"] = json!(d);
        }
        args.append_json(&row);
    }
}
