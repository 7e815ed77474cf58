//! CUDA backend vs CPU backend, op by op, forward and backward, on random inputs, and whole
//! training steps of a small model, in both activation storages of the CUDA backend.
//!
//! Where it runs (`MOTLEY_PARITY_DEVICE`): `gpu` needs a GPU and fails without one (the GPU
//! session's `bench/gpu/run.sh check`); `emulator` runs the CUDA backend, unchanged, on the
//! emulated device of `tests/cuda_emu/device/` (driver, NVRTC, cuBLASLt and cuBLAS on the CPU,
//! every kernel launched on the kernel emulator), which needs only g++; the default, `auto`,
//! takes the GPU when a CUDA driver is installed and the emulator otherwise (CI). On the emulator
//! the tolerances below hold with room to spare (its kernels and GEMMs do not contract FMAs and
//! sum in f32), so what it checks is the backend's own code: launch geometry and argument order,
//! buffer sizes and element types, the cuBLAS(Lt) descriptions, stream order of MEMO's copies.
//!
//! Error measure: max |gpu − cpu| / max |cpu| per output. Tolerances, f32 storage:
//! - elementwise and row ops (norm, rope, swiglu, softmax, router backward, permute, embedding,
//!   AdamW): 1e-4;
//! - matmul and the classifier (cuBLASLt TF32 tensor cores, 10-bit mantissa): 1e-2;
//! - attention (bf16 Q, K, V, P, dS tiles, f32 accumulation): 3e-2.
//!
//! bf16 storage rounds every activation to 8 significant bits (relative error up to 2⁻⁹ per
//! stored value, inputs included, against the CPU's f32): 2e-2 for row ops, 3e-2 for GEMMs,
//! 5e-2 for attention. The router softmax and backward, all f32 by role, keep 1e-4; AdamW gets
//! 4e-3 for its bf16 working copy (one element may round the other way). The CPU reference for bf16
//! storage reads bf16-rounded weights (`Cpu::with_bf16_weights`), as the CUDA backend's working
//! copy does. Whole training steps: loss 1e-3 (f32) or 1e-2 (bf16) relative, gradients 3e-2 or
//! 5e-2, weights 1e-2 or 2e-2; MEMO on the GPU against keep-all on the GPU: 1e-2.
#![cfg(feature = "cuda")]

mod common;
#[path = "../bench/common/compare.rs"]
mod compare;
#[path = "cuda_emu/build.rs"]
mod emu_build;
#[path = "cuda_emu/primitive_cases.rs"]
mod primitive_cases;

use common::{expert_chain, randn, tiny_model, ExpertChain};
use compare::normalised_error as error;
use motley::backend::cpu::Cpu;
use cudarc::driver::{CudaContext, CudaModule, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use motley::backend::cuda::nvrtc;
use motley::backend::cuda::tma::TensorMap;
use motley::backend::cuda::{CudaBackend, Storage};
use motley::backend::{AdamW, AttnShape, Backend, Gemm, Pick, SwiGluBwdGemm, SwiGluGemm, TokenSlots};
use motley::memory::store::LayerPolicy;
use motley::config::GateUp;
use motley::model::config::Routing;
use motley::model::Model;
use motley::parallel::dispatch::{DispatchMode, DropPolicy};
use motley::rng::Rng;
use primitive_cases::Arg as PrimArg;
use motley::train::optim::{AdamWConfig, Optimizer};

const F32_TOL: f64 = 1e-4;
const TF32_TOL: f64 = 1e-2;
const ATTN_TOL: f64 = 3e-2;
const BF16_TOL: f64 = 2e-2;
const BF16_GEMM_TOL: f64 = 3e-2;
const BF16_ATTN_TOL: f64 = 5e-2;
const BF16_ROUNDING_TOL: f64 = 4e-3;

/// The CUDA backend on the device `MOTLEY_PARITY_DEVICE` asks for; `None` (the test is skipped)
/// only when the emulator is wanted and g++ is missing outside CI.
fn gpu(storage: Storage) -> Option<CudaBackend> {
    emu_build::device("cuda_parity")?;
    Some(CudaBackend::new(0, storage).unwrap_or_else(|e| panic!("CUDA backend: {e}")))
}

/// Whether `be` runs on a GPU, not on the emulated device, which the GPU session's rehearsal
/// loads as the driver (so `MOTLEY_PARITY_DEVICE` cannot tell): for shapes only a GPU runs fast.
fn real_gpu(be: &CudaBackend) -> bool {
    !be.device().contains("emulator")
}

/// The CPU reference for `storage`: with bf16 storage, ops read bf16-rounded weights too.
fn cpu_for(storage: Storage) -> Cpu {
    match storage {
        Storage::F32 => Cpu::new(2),
        Storage::Bf16 => Cpu::new(2).with_bf16_weights(),
    }
}


/// `host` in a new buffer of activation storage.
fn up<B: Backend>(be: &B, host: &[f32]) -> B::Buf {
    let mut b = be.alloc(host.len());
    be.upload(B::full_mut(&mut b), host);
    b
}
/// `host` in a new f32 buffer (gradients, statistics, optimizer state).
fn up_f32<B: Backend>(be: &B, host: &[f32]) -> B::Buf {
    let mut b = be.alloc_f32(host.len());
    be.upload(B::full_mut(&mut b), host);
    b
}
fn down<B: Backend>(be: &B, b: &B::Buf) -> Vec<f32> {
    be.download(B::full(b))
}

/// Runs `case` on both backends and compares every returned output.
fn compare(name: &str, storage: Storage, tol: f64, case: impl Fn(&dyn Any2) -> Vec<Vec<f32>>) {
    let Some(cuda) = gpu(storage) else { return };
    let cpu = cpu_for(storage);
    let want = case(&Both::Cpu(&cpu));
    let got = case(&Both::Cuda(&cuda));
    assert_eq!(want.len(), got.len());
    let mut failures = Vec::new();
    for (k, (w, g)) in want.iter().zip(&got).enumerate() {
        let err = error(w, g);
        eprintln!("{name} ({storage:?}) output {k}: normalised max error {err:.2e} (tol {tol:.0e})");
        if err > tol {
            failures.push(format!("output {k}: {err:.3e} > {tol:.0e}"));
        }
    }
    // Every output is reported before failing: a GPU session is short.
    assert!(failures.is_empty(), "{name} ({storage:?}): {}", failures.join("; "));
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

// The attention output projection joined to its residual: out = x + a · op(b), the residual
// read by the GEMM (cuBLASLt's C) instead of copied into out; out starts as garbage.
case!(MatmulResidual, |be| {
    let (m, k, n) = (67, 128, 40);
    let (a, b, x) = (up(be, &data(7, m * k)), up(be, &data(8, k * n)), up(be, &data(9, m * n)));
    let mut outs = Vec::new();
    for tb in [false, true] {
        let mut out = up(be, &data(10, m * n));
        be.matmul_residual(B::full_mut(&mut out), B::full(&x), B::full(&a), B::full(&b), m, k, n, tb);
        outs.push(down(be, &out));
    }
    outs
});

// Three experts' worth of products of different shapes (one empty), as the model issues them:
// forward style into activations (one grouped cuBLAS call with bf16 storage) and weight-
// gradient style accumulated into f32 (one cuBLASLt matmul per product).
case!(GroupedMatmul, |be| {
    let shapes = [(19, 64, 48), (0, 64, 32), (37, 64, 80)];
    let gemms = |ta: bool| -> Vec<Gemm> {
        let (mut out, mut a, mut b) = (0, 0, 0);
        shapes
            .iter()
            .map(|&(m, k, n)| {
                let (m, n) = if ta { (n, m) } else { (m, n) };
                let g = Gemm { m, k, n, out, a, b };
                (out, a, b) = (out + m * n, a + m * k, b + k * n);
                g
            })
            .collect()
    };
    let total = |gs: &[Gemm], f: fn(&Gemm) -> usize| gs.iter().map(f).sum::<usize>();
    let fwd = gemms(false);
    let (a, b) = (up(be, &data(40, total(&fwd, |g| g.m * g.k))), up(be, &data(41, total(&fwd, |g| g.k * g.n))));
    let mut out = be.alloc(total(&fwd, |g| g.m * g.n));
    be.grouped_matmul(B::full_mut(&mut out), B::full(&a), B::full(&b), &fwd, false, true, false);
    let wgrad = gemms(true);
    let (a2, b2) = (up(be, &data(42, total(&wgrad, |g| g.m * g.k))), up(be, &data(43, total(&wgrad, |g| g.k * g.n))));
    let mut grad = up_f32(be, &data(44, total(&wgrad, |g| g.m * g.n)));
    be.grouped_matmul(B::full_mut(&mut grad), B::full(&a2), B::full(&b2), &wgrad, true, false, true);
    vec![down(be, &out), down(be, &grad)]
});

case!(Embedding, |be| {
    let (v, c, tokens) = (50, 96, [3u32, 7, 3, 49, 0, 7, 3, 11]);
    let table = up(be, &data(7, v * c));
    let mut out = be.alloc(tokens.len() * c);
    be.embedding_fwd(B::full_mut(&mut out), B::full(&table), &tokens, c);
    let dout = up(be, &data(8, tokens.len() * c));
    let mut dtable = up_f32(be, &data(9, v * c));
    be.embedding_bwd(B::full_mut(&mut dtable), B::full(&dout), &tokens, c);
    vec![down(be, &out), down(be, &dtable)]
});

case!(RmsNorm, |be| {
    let (n, c) = (150, 320);
    let (x, w, dy) = (up(be, &data(10, n * c)), up(be, &data(11, c)), up(be, &data(12, n * c)));
    let (mut out, mut rstd) = (be.alloc(n * c), be.alloc_f32(n));
    be.rmsnorm_fwd(B::full_mut(&mut out), B::full_mut(&mut rstd), B::full(&x), B::full(&w), n, c, 1e-5);
    let (residual, mut dw) = (up(be, &data(13, n * c)), up_f32(be, &data(14, c)));
    let (mut dx, mut dx_alone) = (be.alloc(n * c), be.alloc(n * c));
    be.rmsnorm_bwd(B::full_mut(&mut dx), B::full_mut(&mut dw), B::full(&dy), B::full(&x), B::full(&w), B::full(&rstd), Some(B::full(&residual)), n, c);
    be.rmsnorm_bwd(B::full_mut(&mut dx_alone), B::full_mut(&mut dw), B::full(&dy), B::full(&x), B::full(&w), B::full(&rstd), None, n, c);
    vec![down(be, &out), down(be, &rstd), down(be, &dx), down(be, &dw), down(be, &dx_alone)]
});

const ATTN: [AttnShape; 2] = [
    AttnShape { batch: 2, seq: 100, n_heads: 4, n_kv_heads: 2, head_dim: 64 },
    AttnShape { batch: 1, seq: 192, n_heads: 2, n_kv_heads: 2, head_dim: 128 },
];

case!(Rope, |be| {
    let s = ATTN[0];
    let mut qkv = up(be, &data(15, s.tokens() * s.qkv_width()));
    let table = up_f32(be, &data(16, s.seq * s.head_dim));
    be.rope(B::full_mut(&mut qkv), B::full(&table), s, 0, false);
    let fwd = down(be, &qkv);
    be.rope(B::full_mut(&mut qkv), B::full(&table), s, 0, true);
    vec![fwd, down(be, &qkv)]
});

case!(Attention, |be| {
    let mut outs = Vec::new();
    for (i, s) in ATTN.into_iter().enumerate() {
        let qkv = up(be, &data(17 + i as u64, s.tokens() * s.qkv_width()));
        let (mut out, mut lse) = (be.alloc(s.tokens() * s.out_width()), be.alloc_f32(s.batch * s.n_heads * s.seq));
        be.attention_fwd(B::full_mut(&mut out), B::full_mut(&mut lse), B::full(&qkv), s);
        let dout = up(be, &data(19 + i as u64, s.tokens() * s.out_width()));
        let (mut dqkv, mut scratch) = (be.alloc(s.tokens() * s.qkv_width()), be.alloc_f32(be.attention_bwd_scratch_len(s)));
        be.attention_bwd(B::full_mut(&mut dqkv), B::full(&dout), B::full(&out), B::full(&lse), B::full(&qkv), s, B::full_mut(&mut scratch));
        let first = down(be, &dqkv);
        // Again on the same scratch, which the first call left as it left it.
        be.attention_bwd(B::full_mut(&mut dqkv), B::full(&dout), B::full(&out), B::full(&lse), B::full(&qkv), s, B::full_mut(&mut scratch));
        assert_eq!(first, down(be, &dqkv), "attention backward is not deterministic for {s:?}");
        outs.extend([down(be, &out), down(be, &lse), first]);
    }
    outs
});

case!(SwiGlu, |be| {
    let (rows, h) = (77, 130);
    let (gu, dout) = (up(be, &data(21, rows * 2 * h)), up(be, &data(22, rows * h)));
    let (mut out, mut dgu, mut again) = (be.alloc(rows * h), be.alloc(rows * 2 * h), be.alloc(rows * h));
    be.swiglu_fwd(B::full_mut(&mut out), B::full(&gu), rows, h);
    be.swiglu_bwd(B::full_mut(&mut dgu), Some(B::full_mut(&mut again)), B::full(&dout), B::full(&gu), rows, h);
    vec![down(be, &out), down(be, &dgu), down(be, &again)]
});

case!(SoftmaxRows, |be| {
    let (rows, cols) = (91, 40);
    let z = up_f32(be, &data(23, rows * cols));
    let mut p = be.alloc_f32(rows * cols);
    be.softmax_rows(B::full_mut(&mut p), B::full(&z), rows, cols);
    vec![down(be, &p)]
});

case!(RouterBackward, |be| {
    // A Top-P routing of 600 tokens over 6 experts with every aux loss on, on the CPU's
    // probabilities (the selection is host code): dropless, and with an expert capacity that
    // drops slots (gate gradients for the kept ones only).
    use motley::model::config::MoeConfig;
    use motley::model::router;
    use motley::parallel::dispatch::apply_capacity;
    let (n, e) = (600, 6);
    let z: Vec<f32> = data(31, n * e).iter().map(|v| 2.0 * v).collect();
    let mut p = vec![0.0; n * e];
    Cpu::new(1).softmax_rows(&mut p, &z, n, e);
    let moe = MoeConfig { expert_widths: vec![16, 32, 48, 64, 80, 96], routing: Routing::TopP, top_k: 2, top_p: 0.7, load_balance: 0.01, p_penalty: 0.1, entropy: 0.03, z_loss: 1e-3 };
    let (pb, zb) = (up_f32(be, &p), up_f32(be, &z));
    [DispatchMode::Dropless, DispatchMode::Capacity { factor: 0.7, policy: DropPolicy::Position }]
        .map(|mode| {
            let routing = apply_capacity(router::select(&p, n, e, &moe), &p, mode).unwrap();
            assert_eq!(routing.n_dropped() > 0, mode != DispatchMode::Dropless, "{mode:?}");
            let args = router::BackwardArgs::new(&routing, &moe);
            let dgate = up_f32(be, &data(32, routing.kept.n_slots()));
            let mut dz = be.alloc(n * e);
            be.router_bwd(B::full_mut(&mut dz), B::full(&dgate), B::full(&pb), B::full(&zb), args.grad());
            down(be, &dz)
        })
        .to_vec()
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
    let (residual, mut out, mut sum) = (up(be, &data(27, 5 * c)), be.alloc(5 * c), be.alloc(5 * c));
    be.combine_rows(B::full_mut(&mut out), B::full(&g), TokenSlots { offsets: &offsets, slots: &slots }, Some(&weight), Some(B::full(&residual)), c);
    be.combine_rows(B::full_mut(&mut sum), B::full(&g), TokenSlots { offsets: &offsets, slots: &slots }, None, None, c);
    let mut dots = be.alloc_f32(index.len());
    be.gathered_dots(B::full_mut(&mut dots), B::full(&x), B::full(&g), &index, c);
    let mut gs = be.alloc(index.len() * c);
    be.gather_rows_scaled(B::full_mut(&mut gs), B::full(&x), &index, &weight, c);
    vec![down(be, &g), down(be, &out), down(be, &dots), down(be, &gs), down(be, &sum)]
});

/// The fused classifier on `n` rows of width `c` over `v` classes. dW starts from a base of the
/// gradient's own size, so both a missing and an overwriting dW show. The logits have a standard
/// deviation of 2, a trained head's order: in bf16 storage they are stored as bf16, and the
/// softmax turns their absolute rounding error (|z| · 2⁻⁹) into a relative error of the
/// probabilities, so the tolerance holds for logits of that size, not for arbitrary ones.
fn classifier_case<B: Backend>(be: &B, n: usize, c: usize, v: usize) -> Vec<Vec<f32>> {
    let targets: Vec<u32> = (0..n as u32).map(|i| (i * 37) % v as u32).collect();
    let w_scale = 2.0 / (c as f32).sqrt();
    let w: Vec<f32> = data(29, v * c).iter().map(|x| x * w_scale).collect();
    let (x, w) = (up(be, &data(28, n * c)), up(be, &w));
    let base: Vec<f32> = data(30, v * c).iter().map(|x| x * 0.01).collect();
    let (mut dx, mut dw) = (be.alloc(n * c), up_f32(be, &base));
    let mut scratch = be.alloc_f32(be.classifier_scratch_len(n, v));
    let losses = be.classifier(B::full(&x), B::full(&w), &targets, n, c, v, Some((B::full_mut(&mut dx), B::full_mut(&mut dw), 1.0)), B::full_mut(&mut scratch));
    vec![losses, down(be, &dx), down(be, &dw)]
}

case!(Classifier, |be| { classifier_case(be, 70, 64, 1000) });

// 2800 × 50,000 logits exceed the 2²⁷ budget of one chunk: two chunks, dx rows at an offset and
// dW accumulated across them.
case!(ClassifierChunks, |be| { classifier_case(be, 2800, 32, 50_000) });

case!(AdamWStep, |be| {
    let n = 10_007;
    let (mut p, mut m, mut v) = (up_f32(be, &data(31, n)), up_f32(be, &data(32, n)), up_f32(be, &data(33, n).iter().map(|x| x.abs()).collect::<Vec<_>>()));
    let g = up_f32(be, &data(34, n));
    let mut work = be.alloc(n);
    let hp = AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step: 7 };
    be.adamw(B::full_mut(&mut p), Some(B::full_mut(&mut work)), B::full_mut(&mut m), B::full_mut(&mut v), B::full(&g), hp, 0.5, true);
    let mut refreshed = be.alloc(n);
    be.refresh_working_copy(B::full_mut(&mut refreshed), B::full(&p));
    vec![down(be, &p), down(be, &m), down(be, &v), down(be, &work), down(be, &refreshed)]
});

/// One op-parity test per storage: `<name>::f32` and `<name>::bf16`.
macro_rules! parity_test {
    ($test:ident, $case:ident, $f32_tol:expr, $bf16_tol:expr) => {
        mod $test {
            use super::*;
            #[test]
            fn f32() {
                compare(stringify!($case), Storage::F32, $f32_tol, |be| be.run(&$case));
            }
            #[test]
            fn bf16() {
                compare(stringify!($case), Storage::Bf16, $bf16_tol, |be| be.run(&$case));
            }
        }
    };
}

parity_test!(elementwise, Elementwise, F32_TOL, BF16_TOL);
parity_test!(matmul, Matmul, TF32_TOL, BF16_GEMM_TOL);
parity_test!(matmul_residual, MatmulResidual, TF32_TOL, BF16_GEMM_TOL);
parity_test!(grouped_matmul, GroupedMatmul, TF32_TOL, BF16_GEMM_TOL);
parity_test!(embedding, Embedding, F32_TOL, BF16_TOL);
parity_test!(rmsnorm, RmsNorm, F32_TOL, BF16_TOL);
parity_test!(rope, Rope, F32_TOL, BF16_TOL);
parity_test!(attention, Attention, ATTN_TOL, BF16_ATTN_TOL);
parity_test!(swiglu, SwiGlu, F32_TOL, BF16_TOL);
parity_test!(softmax_rows, SoftmaxRows, F32_TOL, F32_TOL);
parity_test!(router_backward, RouterBackward, F32_TOL, BF16_TOL);
parity_test!(permute, Permute, F32_TOL, BF16_TOL);
parity_test!(classifier, Classifier, TF32_TOL, BF16_GEMM_TOL);
parity_test!(classifier_chunks, ClassifierChunks, TF32_TOL, BF16_GEMM_TOL);
// bf16: the GPU's f32 update may differ from the CPU's by an ulp (FMA contraction), which can
// round one element of the bf16 working copy the other way: 2⁻⁸ of the scale.
parity_test!(adamw, AdamWStep, F32_TOL, BF16_ROUNDING_TOL);

// ---- whole training steps ------------------------------------------------------------------

const HOST_BYTES: u64 = 1 << 30;

/// The 2-layer model `train` builds: 4 heads of 16 (2 kv heads) or 2 heads of 64 (1 kv head,
/// the Hopper attention's shape); experts of `tiny_model`'s widths (8 to 40), or of whole
/// 128-column tiles (the Hopper expert kernels' shapes) run in chunks of 100 rows; tokens
/// dispatched dropless or under an expert capacity.
#[derive(Clone, Copy, Debug)]
struct Net {
    head_dim: usize,
    tile_widths: bool,
    dispatch: DispatchMode,
}
const SMALL: Net = Net { head_dim: 16, tile_widths: false, dispatch: DispatchMode::Dropless };
const HEADS_OF_64: Net = Net { head_dim: 64, tile_widths: false, dispatch: DispatchMode::Dropless };
const TILE_EXPERTS: Net = Net { head_dim: 64, tile_widths: true, dispatch: DispatchMode::Dropless };
/// Each expert keeps the earlier half of its tokens: with every token routed to every expert,
/// which ones is fixed by position, whatever the rounding.
const HALF_CAPACITY: Net = Net { head_dim: 16, tile_widths: false, dispatch: DispatchMode::Capacity { factor: 0.5, policy: DropPolicy::Position } };

/// Per-step losses and the final gradients and master weights of `steps` AdamW steps of `net`
/// under `policy`. Every token goes to every expert (top-k = all), so rounding differences
/// cannot flip a routing decision (or, under `HALF_CAPACITY`, a drop) and move a token's
/// gradient between experts.
fn train<B: Backend>(be: &B, policy: LayerPolicy, steps: usize, net: Net) -> (Vec<f64>, Vec<f32>, Vec<f32>) {
    train_with(be, policy, GateUp::Save, steps, net)
}

/// [`train`] with the experts' gate/up product saved or recomputed by the backward.
fn train_with<B: Backend>(be: &B, policy: LayerPolicy, gate_up: GateUp, steps: usize, net: Net) -> (Vec<f64>, Vec<f32>, Vec<f32>) {
    let (mut cfg, mut moe) = tiny_model(Routing::TopK);
    if net.head_dim == 64 {
        (cfg.n_heads, cfg.n_kv_heads) = (2, 1);
    }
    if net.tile_widths {
        moe.expert_widths = vec![128, 256, 128, 384];
    }
    cfg.d_model = cfg.n_heads * net.head_dim;
    moe.top_k = moe.n_experts();
    let (b, t) = (3, cfg.seq_len);
    // Whole-tile experts run in chunks of 100 rows, so a chunk starts inside an expert's rows
    // and partway through the slots (as long sequences run them).
    let mut model = Model::new(be, cfg.clone(), moe, 4).unwrap().with_dispatch(net.dispatch).unwrap();
    if net.tile_widths {
        model = model.with_expert_chunk_rows(100);
    }
    let mut store = model.new_store_with(vec![policy; cfg.n_layers], HOST_BYTES, gate_up).unwrap();
    let opt_cfg = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, grad_clip: 1.0 };
    let mut opt = Optimizer::new(be, opt_cfg, model.n_params());
    let mut rng = Rng::new(21);
    let mut losses = Vec::new();
    for _ in 0..steps {
        let stream: Vec<u32> = (0..b * t + 1).map(|_| rng.below(cfg.vocab_size) as u32).collect();
        model.zero_grads(be);
        let stats = model.forward_backward(be, &mut store, &stream[..b * t], &stream[1..], b, t).unwrap();
        assert_eq!(stats.dropped > 0, net.dispatch != DispatchMode::Dropless, "{net:?}: {} slots dropped", stats.dropped);
        losses.push(stats.loss);
        opt.update(be, &model.layout, &mut model.params, &model.grads, 3e-3);
    }
    (losses, be.download(B::full(&model.grads)), be.download(B::full(model.params.master())))
}

/// Whole steps of `cuda` against the CPU (`net` as `train` takes it): per-step loss
/// (relative), last gradients and weights (normalised); every error is reported before failing.
fn model_parity(cuda: &CudaBackend, net: Net, loss_tol: f64, grad_tol: f64, weight_tol: f64) {
    let what_model = format!("model ({}, head_dim {})", cuda.device(), net.head_dim);
    let cpu = cpu_for(cuda.storage());
    let (want_l, want_g, want_w) = train(&cpu, LayerPolicy::Keep, 3, net);
    let (got_l, got_g, got_w) = train(cuda, LayerPolicy::Keep, 3, net);
    let mut failures = Vec::new();
    for (s, (w, g)) in want_l.iter().zip(&got_l).enumerate() {
        let err = (w - g).abs() / w.abs();
        eprintln!("{what_model} step {s}: loss {w:.6} vs {g:.6}, relative error {err:.2e}");
        if err > loss_tol {
            failures.push(format!("step {s} loss {err:.3e} > {loss_tol:.0e}"));
        }
    }
    for (what, want, got, tol) in [("gradients", &want_g, &got_g, grad_tol), ("weights", &want_w, &got_w, weight_tol)] {
        let err = error(want, got);
        eprintln!("{what_model} {what}: normalised max error {err:.2e} (tol {tol:.0e})");
        if err > tol {
            failures.push(format!("{what} {err:.3e} > {tol:.0e}"));
        }
    }
    assert!(failures.is_empty(), "{what_model}: {}", failures.join("; "));
}

#[test]
fn model_step_f32() {
    let Some(cuda) = gpu(Storage::F32) else { return };
    // Gradients as loose as attention alone (its tiles are bf16 in both storages).
    model_parity(&cuda, SMALL, 1e-3, ATTN_TOL, 1e-2);
}

#[test]
fn model_step_bf16() {
    let Some(cuda) = gpu(Storage::Bf16) else { return };
    model_parity(&cuda, SMALL, 1e-2, 5e-2, 2e-2);
}

/// Whole steps under an expert capacity (half of every expert's tokens dropped), as
/// `model_step_bf16`; and MEMO's recompute gives keep-all's loss.
#[test]
fn model_step_with_expert_capacity() {
    let Some(cuda) = gpu(Storage::Bf16) else { return };
    model_parity(&cuda, HALF_CAPACITY, 1e-2, 5e-2, 2e-2);
    let (keep_l, keep_g, _) = train(&cuda, LayerPolicy::Keep, 1, HALF_CAPACITY);
    let (l, g, _) = train(&cuda, LayerPolicy::Offload { alpha: 0.5 }, 1, HALF_CAPACITY);
    assert_eq!(l[0].to_bits(), keep_l[0].to_bits(), "capacity, offload α = 0.5: forward loss differs from keep-all");
    let err = error(&keep_g, &g);
    assert!(err <= 1e-2, "capacity, offload α = 0.5: gradients normalised max error {err:.3e} > 1e-2");
}

/// Whole steps with attention on the Hopper kernels (2 heads of 64), as `model_step_bf16` (the
/// experts' widths are not whole tiles: their GEMMs stay on cuBLAS); and MEMO's recompute
/// through them gives keep-all's loss.
#[test]
fn model_step_hopper() {
    if gpu(Storage::Bf16).is_none() {
        return;
    }
    let hopper = match hopper() {
        Ok(be) => be,
        Err(e) => return eprintln!("model_step_hopper skipped: {e}"),
    };
    model_parity(&hopper, HEADS_OF_64, 1e-2, 5e-2, 2e-2);
    let (keep_l, keep_g, _) = train(&hopper, LayerPolicy::Keep, 1, HEADS_OF_64);
    let (l, g, _) = train(&hopper, LayerPolicy::Recompute, 1, HEADS_OF_64);
    assert_eq!(l[0].to_bits(), keep_l[0].to_bits(), "Hopper kernels, recompute: forward loss differs from keep-all");
    let err = error(&keep_g, &g);
    assert!(err <= 1e-2, "Hopper kernels, recompute: gradients normalised max error {err:.3e} > 1e-2");
}

/// A training step with the experts' GEMMs on the Hopper kernels (a model whose experts have
/// widths that are multiples of 128) against the same step on the grouped cuBLAS call and the SwiGLU
/// kernels: the same bf16 operations summed in another order, so within 1e-2 on a GPU, and
/// bitwise on the emulator, which sums both in one order. Every one of the kernels ran, and
/// MEMO's recompute through them gives keep-all's step (bitwise: they are row-stable, and a
/// layer is recomputed whole), offloading half of it within the same tolerance. Against the
/// CPU, `hopper_experts` holds the kernels op by op.
#[test]
fn model_step_hopper_experts() {
    let Some(plain) = gpu(Storage::Bf16) else { return };
    let experts = match CudaBackend::new(0, Storage::Bf16).and_then(CudaBackend::with_hopper_experts) {
        Ok(be) => be.with_profile(),
        Err(e) => return eprintln!("model_step_hopper_experts skipped: {e}"),
    };
    let (want_l, want_g, _) = train(&plain, LayerPolicy::Keep, 1, TILE_EXPERTS);
    let (got_l, got_g, _) = train(&experts, LayerPolicy::Keep, 1, TILE_EXPERTS);
    let ran: Vec<&str> = experts.take_profile().iter().map(|row| row.op).collect();
    for op in ["grouped_matmul_swiglu", "grouped_matmul_wgmma", "grouped_matmul_swiglu_bwd"] {
        assert!(ran.contains(&op), "model_step_hopper_experts: {op} never ran on the Hopper kernels");
    }
    let tol = if real_gpu(&plain) { 1e-2 } else { 0.0 };
    let (loss_err, grad_err) = ((want_l[0] - got_l[0]).abs() / want_l[0].abs(), error(&want_g, &got_g));
    eprintln!("Hopper expert kernels vs cuBLAS, one step: loss relative error {loss_err:.2e}, gradients normalised max error {grad_err:.2e} (tol {tol:.0e})");
    assert!(loss_err <= tol && grad_err <= tol, "Hopper expert kernels vs cuBLAS: loss {loss_err:.3e}, gradients {grad_err:.3e} > {tol:.0e}");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    // MEMO's recompute, and the backward recomputing gu from the gathered rows where the forward
    // gathered them in the kernel: the same rows, bit for bit.
    for (policy, gate_up) in [(LayerPolicy::Recompute, GateUp::Save), (LayerPolicy::Keep, GateUp::Recompute)] {
        let (l, g, _) = train_with(&experts, policy, gate_up, 1, TILE_EXPERTS);
        assert!(l[0].to_bits() == got_l[0].to_bits() && bits(&g) == bits(&got_g), "Hopper expert kernels, {policy:?}, gate/up {gate_up:?}: the step differs from keep-all");
    }
    // Offloading half the tokens recomputes the other half, the experts' rows gathered by the
    // kernel from a subset of slots: the expert kernels are row-stable, the dense matmuls on
    // cuBLASLt not promised to be (so 1e-2 on a GPU, as memo_policies_match_keep_all).
    let (l, g, _) = train(&experts, LayerPolicy::Offload { alpha: 0.5 }, 1, TILE_EXPERTS);
    let err = error(&got_g, &g);
    assert!(l[0].to_bits() == got_l[0].to_bits() && err <= tol, "Hopper expert kernels, offload α = 0.5: gradients {err:.3e} from keep-all > {tol:.0e}");
}

/// The profile charges each op its least work: a matmul its 2mnk FLOPs and operand bytes, a
/// grouped matmul the sum over its products, a residual add three tensors.
#[test]
fn profile_counts_each_ops_work() {
    let Some(be) = gpu(Storage::Bf16).map(CudaBackend::with_profile) else { return };
    type B = CudaBackend;
    let (m, k, n) = (48, 32, 16);
    let (a, b) = (up(&be, &data(1, m * k)), up(&be, &data(2, k * n)));
    let mut out = be.alloc_f32(m * n);
    be.matmul(B::full_mut(&mut out), B::full(&a), B::full(&b), m, k, n, false, false, true);
    let gemms = [Gemm { m: 16, k, n, out: 0, a: 0, b: 0 }, Gemm { m: 32, k, n, out: 16 * n, a: 16 * k, b: 0 }];
    let mut grouped = be.alloc(m * n);
    be.grouped_matmul(B::full_mut(&mut grouped), B::full(&a), B::full(&b), &gemms, false, false, false);
    let mut sum = be.alloc(m * n);
    be.add(B::full_mut(&mut sum), B::full(&grouped), B::full(&grouped));
    let rows = be.take_profile();
    let row = |op: &str| rows.iter().find(|r| r.op == op).unwrap_or_else(|| panic!("no `{op}` row in {rows:?}"));
    let flops = 2.0 * (m * k * n) as f64;
    // bf16 operands; the f32 output is read and written (accumulate).
    assert_eq!((row("matmul").flops, row("matmul").bytes), (flops, (2 * (m * k + k * n) + 2 * 4 * m * n) as f64));
    assert_eq!((row("grouped_matmul").flops, row("grouped_matmul").bytes), (flops, (2 * (m * k + 2 * k * n) + 2 * m * n) as f64));
    assert_eq!((row("add").flops, row("add").bytes), (0.0, (3 * 2 * m * n) as f64));
    assert!(rows.iter().all(|r| r.calls > 0 && r.seconds >= 0.0));
}

/// MEMO on the GPU: the forward is the same whatever the policy (loss bitwise equal); the
/// backward recomputes dropped rows with GEMMs of other shapes, which cuBLASLt does not promise
/// to round identically, so gradients are held to 1e-2 of keep-all. The gate/up product
/// recomputed by the backward (alone, and with offloading) likewise.
#[test]
fn memo_policies_match_keep_all() {
    let Some(cuda) = gpu(Storage::Bf16) else { return };
    let (keep_l, keep_g, _) = train(&cuda, LayerPolicy::Keep, 1, SMALL);
    let cases = [
        (LayerPolicy::Recompute, GateUp::Save),
        (LayerPolicy::Offload { alpha: 0.5 }, GateUp::Save),
        (LayerPolicy::Offload { alpha: 1.0 }, GateUp::Save),
        (LayerPolicy::Keep, GateUp::Recompute),
        (LayerPolicy::Offload { alpha: 0.5 }, GateUp::Recompute),
    ];
    for (policy, gate_up) in cases {
        let (l, g, _) = train_with(&cuda, policy, gate_up, 1, SMALL);
        assert_eq!(l[0].to_bits(), keep_l[0].to_bits(), "{policy:?}, gate/up {gate_up:?}: forward loss differs from keep-all");
        let err = error(&keep_g, &g);
        eprintln!("MEMO {policy:?}, gate/up {gate_up:?}: gradients normalised max error {err:.2e} against keep-all");
        assert!(err <= 1e-2, "{policy:?}, gate/up {gate_up:?}: gradients normalised max error {err:.3e} > 1e-2");
    }
}

/// Bitwise reproducible on the GPU, as the CPU is: two runs of the same steps give the same
/// losses, gradients and weights (every reduction in a fixed order: the attention backward's dQ
/// sums behind their turns, norms, the loss; cuBLAS(Lt) promises the same bits on the same GPU).
#[test]
fn training_is_bitwise_reproducible() {
    let Some(cuda) = gpu(Storage::Bf16) else { return };
    let bits = |(l, g, w): (Vec<f64>, Vec<f32>, Vec<f32>)| [l.iter().map(|x| x.to_bits()).collect::<Vec<u64>>(), g.iter().chain(&w).map(|x| x.to_bits() as u64).collect()];
    let (first, second) = (bits(train(&cuda, LayerPolicy::Keep, 2, SMALL)), bits(train(&cuda, LayerPolicy::Keep, 2, SMALL)));
    for (what, a, b) in [("losses", &first[0], &second[0]), ("gradients and weights", &first[1], &second[1])] {
        let differ = a.iter().zip(b).filter(|(x, y)| x != y).count();
        assert_eq!(differ, 0, "{differ} of {} {what} differ between two identical runs", a.len());
    }
}

/// The attention backward's ordered dQ sums under load: on a GPU, a shape whose key blocks fill
/// the SMs many times over, so that blocks wait for their turns while others run (the small
/// shapes of the `attention` case barely overlap); on the emulator, which runs blocks one after
/// another, a small one. Five backward passes, bitwise the same, on the mma.sync kernels and (on
/// Hopper) the wgmma ones.
#[test]
fn attention_backward_is_reproducible_under_load() {
    type B = CudaBackend;
    let Some(be) = gpu(Storage::Bf16) else { return };
    let s = if real_gpu(&be) { AttnShape { batch: 4, seq: 8192, n_heads: 16, n_kv_heads: 4, head_dim: 64 } } else { AttnShape { batch: 1, seq: 300, n_heads: 2, n_kv_heads: 1, head_dim: 64 } };
    let mut backends = vec![("mma.sync", be)];
    match hopper() {
        Ok(be) => backends.push(("wgmma", be)),
        Err(e) => eprintln!("attention_backward_is_reproducible_under_load: wgmma kernels skipped: {e}"),
    }
    for (kernels, be) in backends {
        let qkv = up(&be, &data(41, s.tokens() * s.qkv_width()));
        let (mut out, mut lse) = (be.alloc(s.tokens() * s.out_width()), be.alloc_f32(s.batch * s.n_heads * s.seq));
        be.attention_fwd(B::full_mut(&mut out), B::full_mut(&mut lse), B::full(&qkv), s);
        let dout = up(&be, &data(42, s.tokens() * s.out_width()));
        let (mut dqkv, mut scratch) = (be.alloc(s.tokens() * s.qkv_width()), be.alloc_f32(be.attention_bwd_scratch_len(s)));
        let mut first = None;
        for pass in 0..5 {
            be.attention_bwd(B::full_mut(&mut dqkv), B::full(&dout), B::full(&out), B::full(&lse), B::full(&qkv), s, B::full_mut(&mut scratch));
            let bits: Vec<u32> = down(&be, &dqkv).iter().map(|x| x.to_bits()).collect();
            match &first {
                None => first = Some(bits),
                Some(f) => assert!(*f == bits, "{kernels} pass {pass}: {} of {} dqkv values differ from the first pass ({s:?})", f.iter().zip(&bits).filter(|(a, b)| a != b).count(), bits.len()),
            }
        }
    }
}

/// Launches a primitive case on the device with cudarc directly; the words of its outputs.
fn run_primitive(ctx: &std::sync::Arc<CudaContext>, module: &std::sync::Arc<CudaModule>, case: &primitive_cases::Case) -> Result<Vec<Vec<u32>>, String> {
    enum Dev {
        Bf16(CudaSlice<u16>),
        F32(CudaSlice<f32>),
        U32(CudaSlice<u32>),
        I32(i32),
        /// A tensor map, and the matrix it describes (kept alive for the launch).
        Map { _matrix: CudaSlice<u16>, map: TensorMap },
    }
    let stream = ctx.default_stream();
    let f = module.load_function(case.kernel).map_err(|e| format!("{e:?}"))?;
    let devs = case
        .args
        .iter()
        .map(|a| {
            Ok(match a {
                PrimArg::Out(n) => Dev::U32(stream.alloc_zeros::<u32>(*n)?),
                PrimArg::Bf16(v) => Dev::Bf16(stream.clone_htod(v)?),
                PrimArg::F32(v) => Dev::F32(stream.clone_htod(v)?),
                PrimArg::U32(v) => Dev::U32(stream.clone_htod(v)?),
                PrimArg::I32(v) => Dev::I32(*v),
                PrimArg::TensorMap { bits, rows, cols } => {
                    let m = stream.clone_htod(bits)?;
                    let (dims, strides) = primitive_cases::tma_layout(*rows, *cols);
                    let map = TensorMap::bf16_3d(m.device_ptr(&stream).0, dims, strides, primitive_cases::TMA_BOX).unwrap_or_else(|e| panic!("{e}"));
                    Dev::Map { _matrix: m, map }
                }
            })
        })
        .collect::<Result<Vec<Dev>, cudarc::driver::DriverError>>()
        .map_err(|e| format!("{e:?}"))?;
    let mut launch = stream.launch_builder(&f);
    for d in &devs {
        match d {
            Dev::Bf16(s) => launch.arg(s),
            Dev::F32(s) => launch.arg(s),
            Dev::U32(s) => launch.arg(s),
            Dev::I32(v) => launch.arg(v),
            Dev::Map { map, .. } => launch.arg(map),
        };
    }
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (case.threads, 1, 1), shared_mem_bytes: case.smem };
    // SAFETY: the arguments are the kernel's, in its order, and the buffers are its sizes.
    unsafe { launch.launch(cfg) }.map_err(|e| format!("{e:?}"))?;
    let outputs = case.args.iter().zip(&devs).filter(|(a, _)| matches!(a, PrimArg::Out(_)));
    outputs
        .map(|(_, d)| match d {
            Dev::U32(s) => stream.clone_dtoh(s).map_err(|e| format!("{e:?}")),
            _ => unreachable!("outputs are u32 buffers"),
        })
        .collect()
}

/// The primitives the kernels are built on (mma.sync, ldmatrix, cp.async and, on sm_90,
/// wgmma in each form the Hopper attention kernels use) against the PTX ISA's definitions: the
/// cases the emulator passes (`tests/cuda_emu/primitive_cases.rs`). On a GPU this says whether
/// the hardware reads the fragment, row and swizzled shared-memory layouts as the emulator does;
/// where it does not, which instruction form differs and how, before the attention kernels built
/// on them are judged. Every case is reported before failing.
#[test]
fn primitives_follow_the_ptx_isa() {
    if emu_build::device("cuda_parity").is_none() {
        return;
    }
    let ctx = CudaContext::new(0).unwrap_or_else(|e| panic!("CUDA context: {e:?}"));
    let (major, minor) = ctx.compute_capability().expect("compute capability");
    let arch = nvrtc::arch_for(major, minor);
    let ptx = nvrtc::cached_ptx(&emu_build::PRIMITIVES, &arch, &nvrtc::include_dirs_from_env(), Storage::Bf16).unwrap_or_else(|e| panic!("{e}"));
    let module = ctx.load_module(ptx).unwrap_or_else(|e| panic!("loading primitives.cu for {arch}: {e:?}"));
    let mut failures = Vec::new();
    for case in primitive_cases::cases(arch == nvrtc::HOPPER_ARCH) {
        let result = run_primitive(&ctx, &module, &case).and_then(|out| case.check(&out));
        eprintln!("primitive {}: {}", case.name, result.as_ref().map_or_else(|e| format!("FAILED: {e}"), |_| "as the PTX ISA defines".into()));
        failures.extend(result.err());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A bf16 backend running the Hopper kernels (attention, the experts' fused up projection), or
/// why not (not sm_90).
fn hopper() -> motley::Result<CudaBackend> {
    CudaBackend::new(0, Storage::Bf16).and_then(CudaBackend::with_hopper_kernels)
}

/// The Hopper attention kernels (wgmma, opt-in), forward and backward, against the CPU and
/// against the mma.sync kernels on the same device. On an H100 this is the first check of the
/// kernels, and of the emulator's model of wgmma (layouts, descriptors, swizzle), against the
/// hardware. Skipped, saying so, on GPUs without them (not sm_90).
#[test]
fn hopper_attention() {
    type B = CudaBackend;
    let Some(mma) = gpu(Storage::Bf16) else { return };
    let hopper = match hopper() {
        Ok(be) => be,
        Err(e) => return eprintln!("hopper_attention skipped: {e}"),
    };
    let mut shapes = vec![AttnShape { batch: 2, seq: 200, n_heads: 4, n_kv_heads: 2, head_dim: 64 }, AttnShape { batch: 1, seq: 390, n_heads: 2, n_kv_heads: 1, head_dim: 64 }];
    if real_gpu(&mma) {
        shapes.push(AttnShape { batch: 1, seq: 4096, n_heads: 16, n_kv_heads: 16, head_dim: 64 });
    }
    let cpu = cpu_for(Storage::Bf16);
    for (k, s) in shapes.into_iter().enumerate() {
        // bf16 values, so that the CPU reads what the GPU does.
        let bf16 = |v: Vec<f32>| v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect::<Vec<f32>>();
        let qkv = bf16(data(50 + k as u64, s.tokens() * s.qkv_width()));
        let dout = bf16(data(60 + k as u64, s.tokens() * s.out_width()));
        // Forward, then backward from that forward's O and lse: [out, lse, dqkv].
        let run = |be: &CudaBackend| {
            let (q, d) = (up(be, &qkv), up(be, &dout));
            let (mut out, mut lse, mut dqkv) = (be.alloc(s.tokens() * s.out_width()), be.alloc_f32(s.batch * s.n_heads * s.seq), be.alloc(qkv.len()));
            let mut scratch = be.alloc_f32(be.attention_bwd_scratch_len(s));
            be.attention_fwd(B::full_mut(&mut out), B::full_mut(&mut lse), B::full(&q), s);
            be.attention_bwd(B::full_mut(&mut dqkv), B::full(&d), B::full(&out), B::full(&lse), B::full(&q), s, B::full_mut(&mut scratch));
            [down(be, &out), down(be, &lse), down(be, &dqkv)]
        };
        let (got, mma) = (run(&hopper), run(&mma));
        let (q, d) = (up(&cpu, &qkv), up(&cpu, &dout));
        let (mut out, mut lse, mut dqkv) = (cpu.alloc(s.tokens() * s.out_width()), cpu.alloc_f32(s.batch * s.n_heads * s.seq), cpu.alloc(qkv.len()));
        cpu.attention_fwd(Cpu::full_mut(&mut out), Cpu::full_mut(&mut lse), Cpu::full(&q), s);
        cpu.attention_bwd(Cpu::full_mut(&mut dqkv), Cpu::full(&d), Cpu::full(&out), Cpu::full(&lse), Cpu::full(&q), s, &mut []);
        let want = [down(&cpu, &out), down(&cpu, &lse), down(&cpu, &dqkv)];
        for (i, what) in ["out", "lse", "dqkv"].into_iter().enumerate() {
            for (against, reference) in [("CPU", &want[i]), ("mma.sync", &mma[i])] {
                let err = error(reference, &got[i]);
                eprintln!("hopper attention {s:?}: {what} vs {against} normalised max error {err:.2e}");
                assert!(err <= BF16_ATTN_TOL, "hopper attention {s:?}: {what} vs {against} normalised max error {err:.3e} > {BF16_ATTN_TOL:.0e}");
            }
        }
    }
}

/// The experts' Hopper kernels (opt-in), chained as the model chains them: the up projection
/// with SwiGLU (picking its rows), the down projection, SwiGLU's backward through it (picking
/// dy's rows, weighted by the gates) and the input gradient, the weight gradients (picking dy's
/// and xe's rows), against the CPU and against the grouped cuBLAS call and the SwiGLU kernels on
/// the same device. The forward's `act` must be bitwise what `swiglu_fwd` computes from its
/// `gu`, the backward's `act` bitwise the forward's, and SwiGLU's backward on picked rows
/// bitwise what it gives on `gather_rows_scaled`'s copy of them. Widths 128, 128, 256 with 130, 0, 70 rows (d = 512: eight steps
/// through six buffers); on a GPU also H100-ref's experts (d = 1024, widths 1024 to 4608) at 8192 rows
/// each, against cuBLAS only. Skipped, saying so, without sm_90.
#[test]
fn hopper_experts() {
    let Some(plain) = gpu(Storage::Bf16) else { return };
    let hopper = match hopper() {
        Ok(be) => be.with_profile(),
        Err(e) => return eprintln!("hopper_experts skipped: {e}"),
    };
    let mut shapes: Vec<(usize, Vec<(usize, usize)>)> = vec![(512, vec![(130, 128), (0, 128), (70, 256)])];
    if real_gpu(&plain) {
        shapes.push((1024, (0..8).map(|e| (8192, 1024 + 512 * e)).collect()));
    }
    let cpu = cpu_for(Storage::Bf16);
    for (c, experts) in shapes {
        let ExpertChain { up: up_of, down: down_of, dact: dact_of, dx: dx_of, dw_down, dw_gu, rows, w_len, act_len } = expert_chain(c, &experts);
        let bf16 = |v: Vec<f32>| v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect::<Vec<f32>>();
        // The up projection gathers its rows from half as many tokens' (each about twice, out of
        // order), as the model hands it the routed slots.
        let tokens = rows.div_ceil(2);
        let index: Vec<u32> = (0..rows).map(|i| ((i * 7919 + 13) % tokens) as u32).collect();
        let (x, w, dy) = (bf16(data(70, tokens * c)), bf16(data(71, w_len)), bf16(data(72, tokens * c)));
        let gates: Vec<f32> = data(73, rows).iter().map(|g| g.abs() + 0.05).collect();
        // [gu, act, swiglu_fwd of that gu, y, dgu, the backward's act, dx, the weight gradients
        // (dW_down written, dW_gu written, dW_down added to: twice the product), dgu from dy's
        // rows gathered beforehand]
        #[allow(clippy::type_complexity)]
        fn chain<B: Backend>(be: &B, (x, index, gates): (&[f32], &[u32], &[f32]), w: &[f32], dy: &[f32], sizes: (usize, usize), of: (&[SwiGluGemm], &[Gemm], &[SwiGluBwdGemm], &[Gemm], &[Gemm], &[Gemm])) -> [Vec<f32>; 9] {
            let ((act_len, rows_c), (up_of, down_of, dact_of, dx_of, dw_down, dw_gu)) = (sizes, of);
            let (xb, wb, dyb) = (up(be, x), up(be, w), up(be, dy));
            let (xe, dy_slots) = ((B::full(&xb), Some(Pick::rows(index))), (B::full(&dyb), Some(Pick::scaled(index, gates))));
            let (mut gu, mut act, mut again, mut y) = (be.alloc(2 * act_len), be.alloc(act_len), be.alloc(act_len), be.alloc(rows_c));
            be.grouped_matmul_swiglu(B::full_mut(&mut gu), B::full_mut(&mut act), xe, B::full(&wb), up_of);
            for g in up_of {
                let (m, h) = (g.gemm.m, g.gemm.n / 2);
                be.swiglu_fwd(B::subview_mut(&mut B::full_mut(&mut again), g.act..g.act + m * h), B::subview(B::full(&gu), g.gemm.out..g.gemm.out + 2 * m * h), m, h);
            }
            be.grouped_matmul(B::full_mut(&mut y), B::full(&act), B::full(&wb), down_of, false, true, false);
            let (mut dgu, mut act_bwd, mut dact, mut dx) = (be.alloc(2 * act_len), be.alloc(act_len), be.alloc(act_len), be.alloc(rows_c));
            be.grouped_matmul_swiglu_bwd(B::full_mut(&mut dgu), B::full_mut(&mut act_bwd), B::full_mut(&mut dact), dy_slots, B::full(&wb), B::full(&gu), dact_of);
            let (mut dy_gathered, mut dgu_gathered, mut act_gathered) = (be.alloc(rows_c), be.alloc(2 * act_len), be.alloc(act_len));
            be.gather_rows_scaled(B::full_mut(&mut dy_gathered), B::full(&dyb), index, gates, rows_c / index.len().max(1));
            be.grouped_matmul_swiglu_bwd(B::full_mut(&mut dgu_gathered), B::full_mut(&mut act_gathered), B::full_mut(&mut dact), (B::full(&dy_gathered), None), B::full(&wb), B::full(&gu), dact_of);
            be.grouped_matmul(B::full_mut(&mut dx), B::full(&dgu), B::full(&wb), dx_of, false, false, false);
            // dy's and xe's rows picked, as the model's backward hands them.
            let mut dw = be.alloc_f32(w.len());
            be.grouped_weight_grad(B::full_mut(&mut dw), dy_slots, (B::full(&act_bwd), None), dw_down, false);
            be.grouped_weight_grad(B::full_mut(&mut dw), (B::full(&dgu), None), xe, dw_gu, false);
            be.grouped_weight_grad(B::full_mut(&mut dw), dy_slots, (B::full(&act_bwd), None), dw_down, true);
            [&gu, &act, &again, &y, &dgu, &act_bwd, &dx, &dw, &dgu_gathered].map(|b| down(be, b))
        }
        let (sizes, of) = ((act_len, rows * c), (up_of.as_slice(), down_of.as_slice(), dact_of.as_slice(), dx_of.as_slice(), dw_down.as_slice(), dw_gu.as_slice()));
        let (got, cublas) = (chain(&hopper, (&x, &index, &gates), &w, &dy, sizes, of), chain(&plain, (&x, &index, &gates), &w, &dy, sizes, of));
        // Every Hopper kernel ran (no fallback), charged its products' FLOPs.
        let profile = hopper.take_profile();
        let flops = |gemms: &mut dyn Iterator<Item = Gemm>| gemms.map(|g| 2.0 * (g.m * g.k * g.n) as f64).sum::<f64>();
        let wanted = [
            ("grouped_matmul_swiglu", flops(&mut up_of.iter().map(|g| g.gemm))),
            ("grouped_matmul_wgmma", flops(&mut down_of.iter().chain(&dx_of).chain(&dw_down).chain(&dw_gu).chain(&dw_down).copied())),
            ("grouped_matmul_swiglu_bwd", 2.0 * flops(&mut dact_of.iter().map(|g| g.gemm))),
        ];
        for (op, want) in wanted {
            let row = profile.iter().find(|row| row.op == op).unwrap_or_else(|| panic!("hopper_experts: {op} did not run on the Hopper kernels (fallback taken)"));
            assert_eq!(row.flops, want, "hopper_experts: {op}'s FLOPs in the profile");
        }
        let what = format!("hopper experts d={c} {experts:?}");
        let bitwise = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(bitwise(&got[1], &got[2]), "{what}: the forward's act is not bitwise swiglu_fwd of its gu");
        assert!(bitwise(&got[1], &got[5]), "{what}: the backward's act is not bitwise the forward's");
        assert!(bitwise(&got[4], &got[8]), "{what}: SwiGLU's backward on dy's picked rows is not bitwise the one on their gathered copy");
        let mut against = vec![("cuBLAS + SwiGLU kernels", cublas)];
        if rows * c <= 1 << 20 {
            against.push(("CPU", chain(&cpu, (&x, &index, &gates), &w, &dy, sizes, of)));
        }
        for (name, reference) in &against {
            for (i, out) in [(0, "gu"), (1, "act"), (3, "y"), (4, "dgu"), (6, "dx"), (7, "dW")] {
                let err = error(&reference[i], &got[i]);
                eprintln!("{what}: {out} vs {name} normalised max error {err:.2e}");
                assert!(err <= BF16_GEMM_TOL, "{what}: {out} vs {name} normalised max error {err:.3e} > {BF16_GEMM_TOL:.0e}");
            }
        }
    }
}

/// The grouped cuBLAS call against one cuBLASLt matmul per product, both bf16 on the GPU.
#[test]
fn grouped_call_matches_per_product_matmuls() {
    let (Some(grouped), Some(looped)) = (gpu(Storage::Bf16), gpu(Storage::Bf16).map(CudaBackend::without_grouped_gemm)) else { return };
    let want = Both::Cuda(&looped).run(&GroupedMatmul);
    let got = Both::Cuda(&grouped).run(&GroupedMatmul);
    for (k, (w, g)) in want.iter().zip(&got).enumerate() {
        let err = error(w, g);
        eprintln!("grouped vs per-product output {k}: normalised max error {err:.2e}");
        assert!(err <= 1e-2, "grouped vs per-product output {k}: {err:.3e} > 1e-2");
    }
}

/// `Backend::route` (the selection and the aux losses' sums on the device) against the host's
/// `router::select` and `router::aux_losses` on the same probabilities, downloaded: slots and
/// gates bitwise, the aux losses to f32 rounding. Probabilities from the device's softmax of
/// logits with exact ties on every seventh token; Top-K and Top-P over 8 and 40 experts; a GPU
/// also takes 65,536 tokens (twice H100-ref's 32,768 a layer at B = 8, T = 4096).
#[test]
fn route_matches_host_selection() {
    use motley::model::config::MoeConfig;
    use motley::model::router;
    type B = CudaBackend;
    let Some(be) = gpu(Storage::Bf16) else { return };
    let sizes: &[usize] = if real_gpu(&be) { &[1000, 65_536] } else { &[1000] };
    for &n in sizes {
        // 7 experts: an odd count, so the scratch pads its read-back part to keep the f64 sums
        // after it aligned (UBSan checks the emulated kernels' alignment).
        for e in [7, 8, 40] {
            let mut z: Vec<f32> = data(41, n * e).iter().map(|v| 2.0 * v).collect();
            for t in (0..n).step_by(7) {
                z[t * e + 3] = z[t * e + 1];
            }
            let zb = up_f32(&be, &z);
            let mut pb = be.alloc_f32(n * e);
            be.softmax_rows(B::full_mut(&mut pb), B::full(&zb), n, e);
            let p = down(&be, &pb);
            for (routing, top_k, top_p) in [(Routing::TopK, 2, 1.0), (Routing::TopP, 1, 0.6)] {
                let moe = MoeConfig { expert_widths: (1..=e).map(|i| 64 * i).collect(), routing, top_k, top_p, load_balance: 0.01, p_penalty: 0.1, entropy: 0.03, z_loss: 1e-3 };
                let case = format!("{n} tokens, {e} experts, {routing:?}");
                let rule = router::rule(&moe);
                let mut scratch = be.alloc_scratch(be.route_scratch_len(n, e, rule), motley::backend::Precision::F32);
                let slots = be.route(B::full(&pb), B::full(&zb), n, e, rule, B::full_mut(&mut scratch)).unwrap_or_else(|| panic!("{case}: the backend left routing to the host"));
                let (got, aux) = router::from_slots(slots, n, &moe);
                let want = router::select(&p, n, e, &moe);
                assert_eq!(got.counts(), want.counts(), "{case}: tokens per expert");
                assert!(got == want, "{case}: slots or gates differ from router::select's");
                let want_aux = router::aux_losses(&p, &z, &want, &moe);
                for (name, w, g) in [("load balance", want_aux.load_balance, aux.load_balance), ("P-Penalty", want_aux.p_penalty, aux.p_penalty), ("entropy", want_aux.entropy, aux.entropy), ("z-loss", want_aux.z_loss, aux.z_loss)] {
                    assert!((w - g).abs() <= 1e-5 * w.abs().max(1.0), "{case}: {name} {g} against the host's {w}");
                }
                eprintln!("{case}: {} slots bitwise, aux losses within 1e-5", got.n_slots());
            }
        }
    }
    // Past 64 experts (the kernels' chosen mask) routing stays on the host.
    let (n, e) = (10, 65);
    let (pb, zb) = (up_f32(&be, &vec![1.0 / e as f32; n * e]), up_f32(&be, &vec![0.0; n * e]));
    let rule = motley::backend::RouteRule::TopK(2);
    assert_eq!(be.route_scratch_len(n, e, rule), 0, "65 experts: scratch for the device");
    let mut scratch = be.alloc_scratch(64 * n, motley::backend::Precision::F32);
    assert!(be.route(B::full(&pb), B::full(&zb), n, e, rule, B::full_mut(&mut scratch)).is_none(), "65 experts: routed on the device");
}

/// RMSNorm's weight gradient where its partial sums outgrow the reductions' scratch, so the
/// backend takes it in passes (at RMSNORM_PARTIALS = 2¹⁹ floats: 70 rows of 2¹⁹ on the emulator,
/// passes of 64 and 6 rows; 40,000 rows of 1024 on a GPU, 32,768 and 7,232), against the CPU,
/// which sums the same chunks in one go. A pass reading another pass's rows fails it.
#[test]
fn rmsnorm_weight_gradient_in_passes() {
    type B = CudaBackend;
    let Some(be) = gpu(Storage::F32) else { return };
    let (n, c) = if real_gpu(&be) { (40_000, 1024) } else { (70, 1 << 19) };
    assert!(n * c > motley::backend::cuda::launch::RMSNORM_PARTIALS * motley::backend::cuda::launch::ROW_CHUNK, "one pass would do");
    let (x, w, dy) = (data(50, n * c), data(51, c), data(52, n * c));
    let cpu = Cpu::new(2);
    let (mut out, mut rstd) = (vec![0.0; n * c], vec![0.0; n]);
    cpu.rmsnorm_fwd(&mut out, &mut rstd, &x, &w, n, c, 1e-5);
    let (mut dx, mut want) = (vec![0.0; n * c], data(53, c));
    let dw0 = want.clone();
    cpu.rmsnorm_bwd(&mut dx, &mut want, &dy, &x, &w, &rstd, None, n, c);
    let (xb, wb, dyb, rb) = (up(&be, &x), up(&be, &w), up(&be, &dy), up_f32(&be, &rstd));
    let (mut dxb, mut dwb) = (be.alloc(n * c), up_f32(&be, &dw0));
    be.rmsnorm_bwd(B::full_mut(&mut dxb), B::full_mut(&mut dwb), B::full(&dyb), B::full(&xb), B::full(&wb), B::full(&rb), None, n, c);
    let err = error(&want, &down(&be, &dwb));
    eprintln!("rmsnorm dW over {n} rows of {c}: normalised max error {err:.2e} (tol {F32_TOL:.0e})");
    assert!(err <= F32_TOL, "rmsnorm dW in passes: {err:.3e}");
}

/// `memory_budget` (what `memory.policy = "auto"` plans within) is the device's free memory plus
/// what the backend's pool holds, so allocating from the pool does not change it; on the emulated
/// device it is the emulated capacity (80 GiB unless MOTLEY_EMU_DEVICE_BYTES says otherwise).
#[test]
fn memory_budget_counts_what_the_backend_holds() {
    let Some(be) = gpu(Storage::Bf16) else { return };
    let budget = || be.memory_budget().unwrap().expect("a GPU has a budget");
    let before = budget();
    let held = be.alloc(64 << 20);
    let during = budget();
    drop(held);
    be.synchronize().unwrap();
    eprintln!("memory budget: {before} B before, {during} B holding 128 MiB");
    if real_gpu(&be) {
        // The pool grows in its own granules; another process could allocate meanwhile.
        assert!(before.abs_diff(during) <= 64 << 20, "{before} → {during}");
    } else {
        let capacity = std::env::var("MOTLEY_EMU_DEVICE_BYTES").ok().and_then(|v| v.parse().ok()).unwrap_or(80u64 << 30);
        assert_eq!((before, during), (capacity, capacity));
    }
}
