//! CUDA backend vs CPU backend, op by op, forward and backward, on random inputs.
//!
//! Needs a GPU: every test is `#[ignore]`d; run them on a GPU machine with
//! `cargo test --release --features cuda --test cuda_parity -- --ignored`.
//! Asked to run without a usable GPU, each test fails and says what is missing.
//!
//! Error measure: max |gpu − cpu| / max |cpu| per output. Tolerances:
//! - f32 elementwise and row ops (norm, rope, swiglu, softmax, permute, embedding, AdamW): 1e-4;
//! - matmul and the classifier (cuBLASLt TF32 tensor cores, 10-bit mantissa): 1e-2;
//! - attention (bf16 Q, K, V, P, dS tiles, f32 accumulation): 3e-2;
//! - a whole model step (loss relative 1e-3, every gradient 5e-2: the errors above compound over
//!   two layers);
//! - MEMO policies on the GPU against keep-all on the GPU (same kernels, recomputed rows only):
//!   1e-5, and the test says whether they are bitwise equal (on the CPU they are).
#![cfg(feature = "cuda")]

mod common;

use common::randn;
use motley::backend::cpu::Cpu;
use motley::backend::cuda::{cuda_available, CudaBackend};
use motley::backend::{AdamW, AttnShape, Backend, TokenSlots};
use motley::memory::store::LayerPolicy;
use motley::model::config::{ModelConfig, MoeConfig, Routing};
use motley::model::Model;
use motley::rng::Rng;

const F32_TOL: f64 = 1e-4;
const TF32_TOL: f64 = 1e-2;
const ATTN_TOL: f64 = 3e-2;
const MODEL_LOSS_TOL: f64 = 1e-3;
const MODEL_GRAD_TOL: f64 = 5e-2;
const MEMO_TOL: f64 = 1e-5;

fn gpu() -> CudaBackend {
    if let Err(e) = cuda_available() {
        panic!("cuda_parity needs a GPU: {e}. See docs/cuda.md for the GPU session command.");
    }
    CudaBackend::new(0).unwrap_or_else(|e| panic!("CUDA backend: {e}"))
}

fn up<B: Backend>(be: &B, host: &[f32]) -> B::Buf {
    let mut b = be.alloc(host.len());
    be.upload(B::full_mut(&mut b), host);
    b
}
fn down<B: Backend>(be: &B, b: &B::Buf) -> Vec<f32> {
    be.download(B::full(b))
}

/// Runs `case` on both backends and compares every returned output.
fn compare(name: &str, tol: f64, case: impl Fn(&dyn Any2) -> Vec<Vec<f32>>) {
    let (cpu, cuda) = (Cpu::new(2), gpu());
    let want = case(&Both::Cpu(&cpu));
    let got = case(&Both::Cuda(&cuda));
    assert_eq!(want.len(), got.len());
    for (k, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(w.len(), g.len(), "{name} output {k} length");
        let err = normalised_error(w, g);
        eprintln!("{name} output {k}: normalised max error {err:.2e} (tol {tol:.0e})");
        assert!(err <= tol, "{name} output {k}: normalised max error {err:.3e} > {tol:.0e}");
    }
}

/// max |got − want| / max |want|.
fn normalised_error(want: &[f32], got: &[f32]) -> f64 {
    let scale = want.iter().fold(0f64, |m, &x| m.max(x.abs() as f64)).max(1e-6);
    want.iter().zip(got).fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs())) / scale
}

/// The two backends behind one object, so each case is written once as a generic function.
enum Both<'a> {
    Cpu(&'a Cpu),
    Cuda(&'a CudaBackend),
}
trait Any2 {
    fn run(&self, f: &dyn Case) -> Vec<Vec<f32>>;
}
impl Any2 for Both<'_> {
    fn run(&self, f: &dyn Case) -> Vec<Vec<f32>> {
        match self {
            Both::Cpu(b) => f.cpu(b),
            Both::Cuda(b) => f.cuda(b),
        }
    }
}
/// A case as two monomorphic entry points (trait objects cannot have generic methods).
trait Case {
    fn cpu(&self, be: &Cpu) -> Vec<Vec<f32>>;
    fn cuda(&self, be: &CudaBackend) -> Vec<Vec<f32>>;
}
macro_rules! case {
    ($name:ident, |$be:ident| $body:block) => {
        struct $name;
        impl $name {
            fn go<B: Backend>($be: &B) -> Vec<Vec<f32>> $body
        }
        impl Case for $name {
            fn cpu(&self, be: &Cpu) -> Vec<Vec<f32>> { Self::go(be) }
            fn cuda(&self, be: &CudaBackend) -> Vec<Vec<f32>> { Self::go(be) }
        }
    };
}

fn data(seed: u64, n: usize) -> Vec<f32> {
    randn(&mut Rng::new(seed), n, 1.0)
}

case!(Elementwise, |be| {
    let n = 70_001;
    let (a, b) = (up(be, &data(1, n)), up(be, &data(2, n)));
    let mut out = be.alloc(n);
    be.add(B::full_mut(&mut out), B::full(&a), B::full(&b));
    let mut acc = up(be, &data(3, n));
    be.add_assign(B::full_mut(&mut acc), B::full(&a));
    be.scale(B::full_mut(&mut acc), 0.37);
    let mut filled = be.alloc(n);
    be.fill(B::view_mut(&mut filled, 5..n - 5), 2.5);
    let ss = be.sum_squares(B::full(&a));
    vec![down(be, &out), down(be, &acc), down(be, &filled), vec![ss as f32]]
});

case!(Matmul, |be| {
    let (m, k, n) = (67, 129, 45);
    let (a, b) = (up(be, &data(4, m * k)), up(be, &data(5, k * n)));
    let mut outs = Vec::new();
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let mut out = up(be, &data(6, m * n));
        be.matmul(B::full_mut(&mut out), B::full(&a), B::full(&b), m, k, n, ta, tb, true);
        outs.push(down(be, &out));
    }
    outs
});

case!(Embedding, |be| {
    let (v, c, tokens) = (50, 96, [3u32, 7, 3, 49, 0, 7, 3, 11]);
    let table = up(be, &data(7, v * c));
    let mut out = be.alloc(tokens.len() * c);
    be.embedding_fwd(B::full_mut(&mut out), B::full(&table), &tokens, c);
    let dout = up(be, &data(8, tokens.len() * c));
    let mut dtable = up(be, &data(9, v * c));
    be.embedding_bwd(B::full_mut(&mut dtable), B::full(&dout), &tokens, c);
    vec![down(be, &out), down(be, &dtable)]
});

case!(RmsNorm, |be| {
    let (n, c) = (150, 320);
    let (x, w, dy) = (up(be, &data(10, n * c)), up(be, &data(11, c)), up(be, &data(12, n * c)));
    let (mut out, mut rstd) = (be.alloc(n * c), be.alloc(n));
    be.rmsnorm_fwd(B::full_mut(&mut out), B::full_mut(&mut rstd), B::full(&x), B::full(&w), n, c, 1e-5);
    let (mut dx, mut dw) = (up(be, &data(13, n * c)), up(be, &data(14, c)));
    be.rmsnorm_bwd(B::full_mut(&mut dx), B::full_mut(&mut dw), B::full(&dy), B::full(&x), B::full(&w), B::full(&rstd), n, c);
    vec![down(be, &out), down(be, &rstd), down(be, &dx), down(be, &dw)]
});

const ATTN: [AttnShape; 2] = [
    AttnShape { batch: 2, seq: 100, n_heads: 4, n_kv_heads: 2, head_dim: 64 },
    AttnShape { batch: 1, seq: 192, n_heads: 2, n_kv_heads: 2, head_dim: 128 },
];

case!(Rope, |be| {
    let s = ATTN[0];
    let mut qkv = up(be, &data(15, s.tokens() * s.qkv_width()));
    let table = up(be, &data(16, s.seq * s.head_dim));
    be.rope(B::full_mut(&mut qkv), B::full(&table), s, 0, false);
    let fwd = down(be, &qkv);
    be.rope(B::full_mut(&mut qkv), B::full(&table), s, 0, true);
    vec![fwd, down(be, &qkv)]
});

case!(Attention, |be| {
    let mut outs = Vec::new();
    for (i, s) in ATTN.into_iter().enumerate() {
        let qkv = up(be, &data(17 + i as u64, s.tokens() * s.qkv_width()));
        let (mut out, mut lse) = (be.alloc(s.tokens() * s.out_width()), be.alloc(s.batch * s.n_heads * s.seq));
        be.attention_fwd(B::full_mut(&mut out), B::full_mut(&mut lse), B::full(&qkv), s);
        let dout = up(be, &data(19 + i as u64, s.tokens() * s.out_width()));
        let mut dqkv = be.alloc(s.tokens() * s.qkv_width());
        be.attention_bwd(B::full_mut(&mut dqkv), B::full(&dout), B::full(&out), B::full(&lse), B::full(&qkv), s);
        let first = down(be, &dqkv);
        be.attention_bwd(B::full_mut(&mut dqkv), B::full(&dout), B::full(&out), B::full(&lse), B::full(&qkv), s);
        assert_eq!(first, down(be, &dqkv), "attention backward is not deterministic for {s:?}");
        outs.extend([down(be, &out), down(be, &lse), first]);
    }
    outs
});

case!(SwiGlu, |be| {
    let (rows, h) = (77, 130);
    let (gu, dout) = (up(be, &data(21, rows * 2 * h)), up(be, &data(22, rows * h)));
    let (mut out, mut dgu) = (be.alloc(rows * h), be.alloc(rows * 2 * h));
    be.swiglu_fwd(B::full_mut(&mut out), B::full(&gu), rows, h);
    be.swiglu_bwd(B::full_mut(&mut dgu), B::full(&dout), B::full(&gu), rows, h);
    vec![down(be, &out), down(be, &dgu)]
});

case!(SoftmaxRows, |be| {
    let (rows, cols) = (91, 40);
    let (z, dp) = (up(be, &data(23, rows * cols)), up(be, &data(24, rows * cols)));
    let (mut p, mut dz) = (be.alloc(rows * cols), be.alloc(rows * cols));
    be.softmax_rows(B::full_mut(&mut p), B::full(&z), rows, cols);
    be.softmax_rows_bwd(B::full_mut(&mut dz), B::full(&dp), B::full(&p), rows, cols);
    vec![down(be, &p), down(be, &dz)]
});

case!(Permute, |be| {
    // 5 tokens, 7 slots (top-k varies per token), rows of width c.
    let c = 72;
    let index = [0u32, 2, 4, 1, 2, 3, 0];
    let offsets = [0u32, 2, 3, 5, 6, 7];
    let slots = [0u32, 6, 3, 1, 4, 5, 2];
    let weight: Vec<f32> = data(25, index.len()).iter().map(|w| w.abs()).collect();
    let x = up(be, &data(26, 5 * c));
    let mut g = be.alloc(index.len() * c);
    be.gather_rows(B::full_mut(&mut g), B::full(&x), &index, c);
    let mut out = up(be, &data(27, 5 * c));
    be.combine_rows(B::full_mut(&mut out), B::full(&g), TokenSlots { offsets: &offsets, slots: &slots }, Some(&weight), c);
    let dots = be.gathered_dots(B::full(&x), B::full(&g), &index, c);
    let mut gs = be.alloc(index.len() * c);
    be.gather_rows_scaled(B::full_mut(&mut gs), B::full(&x), &index, &weight, c);
    vec![down(be, &g), down(be, &out), dots, down(be, &gs)]
});

case!(Classifier, |be| {
    let (n, c, v) = (70, 64, 1000);
    let targets: Vec<u32> = (0..n as u32).map(|i| (i * 37) % v as u32).collect();
    let (x, w) = (up(be, &data(28, n * c)), up(be, &data(29, v * c)));
    let (mut dx, mut dw) = (be.alloc(n * c), up(be, &data(30, v * c)));
    let losses = be.classifier(B::full(&x), B::full(&w), &targets, n, c, v, Some((B::full_mut(&mut dx), B::full_mut(&mut dw), 1.0)));
    vec![losses, down(be, &dx), down(be, &dw)]
});

case!(AdamWStep, |be| {
    let n = 10_007;
    let (mut p, mut m, mut v) = (up(be, &data(31, n)), up(be, &data(32, n)), up(be, &data(33, n).iter().map(|x| x.abs()).collect::<Vec<_>>()));
    let g = up(be, &data(34, n));
    let hp = AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step: 7 };
    be.adamw(B::full_mut(&mut p), B::full_mut(&mut m), B::full_mut(&mut v), B::full(&g), hp, 0.5, true);
    vec![down(be, &p), down(be, &m), down(be, &v)]
});

macro_rules! parity_test {
    ($test:ident, $case:ident, $tol:expr) => {
        #[test]
        #[ignore = "needs a GPU: cargo test --release --features cuda --test cuda_parity -- --ignored"]
        fn $test() {
            compare(stringify!($case), $tol, |be| be.run(&$case));
        }
    };
}

parity_test!(elementwise, Elementwise, F32_TOL);
parity_test!(matmul, Matmul, TF32_TOL);
parity_test!(embedding, Embedding, F32_TOL);
parity_test!(rmsnorm, RmsNorm, F32_TOL);
parity_test!(rope, Rope, F32_TOL);
parity_test!(attention, Attention, ATTN_TOL);
parity_test!(swiglu, SwiGlu, F32_TOL);
parity_test!(softmax_rows, SoftmaxRows, F32_TOL);
parity_test!(permute, Permute, F32_TOL);
parity_test!(classifier, Classifier, TF32_TOL);
parity_test!(adamw, AdamWStep, F32_TOL);

/// A 2-layer heterogeneous model the CUDA attention supports (head_dim 16, GQA 4:2), every token
/// routed to every expert, so that TF32 rounding of the router cannot flip a top-k choice between
/// the backends (gates still differ per token and expert).
fn step_model() -> (ModelConfig, MoeConfig) {
    let model = ModelConfig { vocab_size: 96, d_model: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2, seq_len: 32, rope_theta: 1e4, norm_eps: 1e-5, init_std: 0.05 };
    let moe = MoeConfig { expert_widths: vec![16, 32, 48, 64], routing: Routing::TopK, top_k: 4, top_p: 1.0, load_balance: 0.01, p_penalty: 0.1, entropy: 0.0, z_loss: 0.001 };
    (model, moe)
}

/// Loss and gradients of one step of [`step_model`] on 2 × 32 tokens under `policy`.
fn model_step<B: Backend>(be: &B, policy: LayerPolicy) -> (f64, Vec<f32>) {
    let (cfg, moe) = step_model();
    let mut model = Model::new(be, cfg.clone(), moe, 4).unwrap();
    let mut store = model.new_store_with(vec![policy; cfg.n_layers], 1 << 30).unwrap();
    let mut rng = Rng::new(8);
    let tokens: Vec<u32> = (0..2 * 32 + 1).map(|_| rng.below(cfg.vocab_size) as u32).collect();
    model.zero_grads(be);
    let stats = model.forward_backward(be, &mut store, &tokens[..64], &tokens[1..], 2, 32).unwrap();
    (stats.loss, be.download(B::full(&model.grads)))
}

#[test]
#[ignore = "needs a GPU: cargo test --release --features cuda --test cuda_parity -- --ignored"]
fn model_step_matches_the_cpu() {
    let (cpu_loss, cpu_grads) = model_step(&Cpu::new(2), LayerPolicy::Keep);
    let (gpu_loss, gpu_grads) = model_step(&gpu(), LayerPolicy::Keep);
    let loss_err = (gpu_loss - cpu_loss).abs() / cpu_loss.abs();
    let grad_err = normalised_error(&cpu_grads, &gpu_grads);
    eprintln!("model step: loss {cpu_loss:.6} (CPU) vs {gpu_loss:.6} (GPU), relative {loss_err:.2e} (tol {MODEL_LOSS_TOL:.0e}); gradients normalised max error {grad_err:.2e} (tol {MODEL_GRAD_TOL:.0e})");
    assert!(loss_err <= MODEL_LOSS_TOL && grad_err <= MODEL_GRAD_TOL, "model step differs from the CPU: loss {loss_err:.2e}, gradients {grad_err:.2e}");
}

#[test]
#[ignore = "needs a GPU: cargo test --release --features cuda --test cuda_parity -- --ignored"]
fn memo_policies_match_keep_on_the_gpu() {
    let be = gpu();
    let (loss, grads) = model_step(&be, LayerPolicy::Keep);
    for policy in [LayerPolicy::Recompute, LayerPolicy::Offload { alpha: 0.5 }, LayerPolicy::Offload { alpha: 1.0 }] {
        let (l, g) = model_step(&be, policy);
        let (loss_err, grad_err) = ((l - loss).abs() / loss.abs(), normalised_error(&grads, &g));
        let bitwise = l.to_bits() == loss.to_bits() && g.iter().zip(&grads).all(|(a, b)| a.to_bits() == b.to_bits());
        eprintln!("{policy:?} vs keep on the GPU: loss relative {loss_err:.2e}, gradients {grad_err:.2e} (tol {MEMO_TOL:.0e}), bitwise equal: {bitwise}");
        assert!(loss_err <= MEMO_TOL && grad_err <= MEMO_TOL, "{policy:?} differs from keep on the GPU: loss {loss_err:.2e}, gradients {grad_err:.2e}");
    }
}
