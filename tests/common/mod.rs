//! Shared helpers for the integration tests: random data and finite-difference checks.
#![allow(dead_code)]

use motley::backend::{Gemm, SwiGluBwdGemm, SwiGluGemm};
use motley::model::config::{ModelConfig, MoeConfig, Routing};
use motley::rng::Rng;

pub fn randn(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() as f32) * std).collect()
}

pub fn dot64(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// Relative error of a directional derivative: `|fd − an| / max(|an|, floor)`.
pub fn rel_err(fd: f64, an: f64, floor: f64) -> f64 {
    (fd - an).abs() / an.abs().max(floor)
}

/// Central-difference directional derivative of `f` at `x` along `dir`.
pub fn directional_fd(f: &mut dyn FnMut(&[f32]) -> f64, x: &[f32], dir: &[f32], h: f32) -> f64 {
    let plus: Vec<f32> = x.iter().zip(dir).map(|(a, d)| a + h * d).collect();
    let minus: Vec<f32> = x.iter().zip(dir).map(|(a, d)| a - h * d).collect();
    (f(&plus) - f(&minus)) / (2.0 * h as f64)
}

/// Checks ⟨grad, dir⟩ against finite differences along several random directions.
/// Returns the worst relative error.
pub fn check_directions(name: &str, f: &mut dyn FnMut(&[f32]) -> f64, x: &[f32], grad: &[f32], h: f32, tol: f64, seed: u64) -> f64 {
    let mut rng = Rng::new(seed);
    let mut worst = 0f64;
    for _ in 0..3 {
        let dir = randn(&mut rng, x.len(), 1.0);
        let fd = directional_fd(f, x, &dir, h);
        let an = dot64(grad, &dir);
        let err = rel_err(fd, an, 1e-3);
        assert!(err < tol, "{name}: finite difference {fd:.6e} vs analytic {an:.6e} (relative error {err:.2e} ≥ {tol:.0e})");
        worst = worst.max(err);
    }
    worst
}

/// A 2-layer heterogeneous model small enough for finite differences.
pub fn tiny_model(routing: Routing) -> (ModelConfig, MoeConfig) {
    let model = ModelConfig {
        vocab_size: 64,
        d_model: 32,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        seq_len: 24,
        rope_theta: 10000.0,
        norm_eps: 1e-5,
        init_std: 0.1,
    };
    let moe = MoeConfig {
        expert_widths: vec![8, 16, 24, 40],
        routing,
        top_k: 2,
        top_p: 0.6,
        load_balance: 0.01,
        p_penalty: 0.1,
        entropy: if routing == Routing::TopP { 0.03 } else { 0.0 },
        z_loss: 0.001,
    };
    (model, moe)
}

/// One MoE layer's expert products as the model chains them, for experts `(rows, width)` over
/// rows of `c`: the up projection with SwiGLU, the down projection, SwiGLU's backward through
/// it, the input gradient. Each expert's W_gu (2h × c) then W_down (c × h) lie one after another
/// in the weights (`w_len` in all); act and dact share a layout (`act_len` in all), gu and dgu
/// theirs with rows twice as wide, y and dx that of the rows (`rows` × c).
pub struct ExpertChain {
    pub up: Vec<SwiGluGemm>,
    pub down: Vec<Gemm>,
    pub dact: Vec<SwiGluBwdGemm>,
    pub dx: Vec<Gemm>,
    /// The weight gradients (into an f32 buffer laid out like the weights): dW_down = dyᵀ act
    /// and dW_gu = dguᵀ xe, k the expert's rows.
    pub dw_down: Vec<Gemm>,
    pub dw_gu: Vec<Gemm>,
    pub rows: usize,
    pub w_len: usize,
    pub act_len: usize,
}

pub fn expert_chain(c: usize, experts: &[(usize, usize)]) -> ExpertChain {
    let mut ch = ExpertChain { up: Vec::new(), down: Vec::new(), dact: Vec::new(), dx: Vec::new(), dw_down: Vec::new(), dw_gu: Vec::new(), rows: 0, w_len: 0, act_len: 0 };
    for &(m, h) in experts {
        let (rows, act, w_gu, w_down) = (ch.rows * c, ch.act_len, ch.w_len, ch.w_len + 2 * h * c);
        ch.up.push(SwiGluGemm { gemm: Gemm { m, k: c, n: 2 * h, out: 2 * act, a: rows, b: w_gu }, act });
        ch.down.push(Gemm { m, k: h, n: c, out: rows, a: act, b: w_down });
        ch.dact.push(SwiGluBwdGemm { gemm: Gemm { m, k: c, n: h, out: act, a: rows, b: w_down }, gu: 2 * act, dgu: 2 * act, act });
        ch.dx.push(Gemm { m, k: 2 * h, n: c, out: rows, a: 2 * act, b: w_gu });
        ch.dw_down.push(Gemm { m: c, k: m, n: h, out: w_down, a: rows, b: act });
        ch.dw_gu.push(Gemm { m: 2 * h, k: m, n: c, out: w_gu, a: 2 * act, b: rows });
        (ch.rows, ch.w_len, ch.act_len) = (ch.rows + m, ch.w_len + 3 * h * c, ch.act_len + m * h);
    }
    ch
}
