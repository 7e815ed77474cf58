//! Finite-difference gradient checks of every backend op, through the `Backend` trait.
//! Each check compares directional derivatives (3 random directions) of a scalar
//! `L = Σ r ⊙ op(x)` with the op's backward; f32 forward, central differences.
//! Tolerance: relative error < 1e-2 unless stated.

mod common;

use common::*;
use motley::backend::cpu::Cpu;
use motley::backend::{AttnShape, Backend, TokenSlots};
use motley::model::config::Routing as Kind;
use motley::model::router;
use motley::rng::Rng;
use motley::parallel::dispatch::{apply_capacity, DispatchMode, DropPolicy};

const TOL: f64 = 1e-2;

fn cpu() -> Cpu {
    Cpu::new(2)
}

#[test]
fn matmul_gradients() {
    let be = cpu();
    let mut rng = Rng::new(1);
    let (m, k, n) = (7, 11, 5);
    let a = randn(&mut rng, m * k, 1.0);
    let b = randn(&mut rng, n * k, 1.0);
    let r = randn(&mut rng, m * n, 1.0);
    // y = a bᵀ: da = r b, db = rᵀ a.
    let fwd = |a: &[f32], b: &[f32]| {
        let mut y = vec![0.0; m * n];
        be.matmul(&mut y, a, b, m, k, n, false, true, false);
        dot64(&r, &y)
    };
    let mut da = vec![0.0; m * k];
    be.matmul(&mut da, &r, &b, m, n, k, false, false, false);
    let mut db = vec![0.0; n * k];
    be.matmul(&mut db, &r, &a, n, m, k, true, false, false);
    check_directions("matmul da", &mut |x| fwd(x, &b), &a, &da, 1e-2, TOL, 2);
    check_directions("matmul db", &mut |x| fwd(&a, x), &b, &db, 1e-2, TOL, 3);
}

#[test]
fn embedding_gradient() {
    let be = cpu();
    let mut rng = Rng::new(4);
    let (v, c) = (10, 6);
    let tokens = [3u32, 1, 3, 9, 0];
    let table = randn(&mut rng, v * c, 1.0);
    let r = randn(&mut rng, tokens.len() * c, 1.0);
    let mut f = |t: &[f32]| {
        let mut out = vec![0.0; tokens.len() * c];
        be.embedding_fwd(&mut out, t, &tokens, c);
        dot64(&r, &out)
    };
    let mut dt = vec![0.0; v * c];
    be.embedding_bwd(&mut dt, &r, &tokens, c);
    check_directions("embedding", &mut f, &table, &dt, 1e-2, TOL, 5);
}

#[test]
fn rmsnorm_gradients() {
    let be = cpu();
    let mut rng = Rng::new(6);
    let (n, c) = (70, 24);
    let x = randn(&mut rng, n * c, 1.0);
    let w = randn(&mut rng, c, 1.0);
    let r = randn(&mut rng, n * c, 1.0);
    let fwd = |x: &[f32], w: &[f32]| {
        let (mut y, mut rstd) = (vec![0.0; n * c], vec![0.0; n]);
        be.rmsnorm_fwd(&mut y, &mut rstd, x, w, n, c, 1e-5);
        dot64(&r, &y)
    };
    let (mut y, mut rstd) = (vec![0.0; n * c], vec![0.0; n]);
    be.rmsnorm_fwd(&mut y, &mut rstd, &x, &w, n, c, 1e-5);
    let (mut dx, mut dw) = (vec![0.0; n * c], vec![0.0; c]);
    be.rmsnorm_bwd(&mut dx, &mut dw, &r, &x, &w, &rstd, None, n, c);
    check_directions("rmsnorm dx", &mut |x| fwd(x, &w), &x, &dx, 1e-2, TOL, 7);
    // A residual branch's gradient joins dx in the same pass: residual + (0 + ∂), bit for bit.
    let residual = randn(&mut rng, n * c, 1.0);
    let mut joined = vec![f32::NAN; n * c];
    be.rmsnorm_bwd(&mut joined, &mut vec![0.0; c], &r, &x, &w, &rstd, Some(&residual), n, c);
    assert!(joined.iter().zip(residual.iter().zip(&dx)).all(|(j, (q, d))| j.to_bits() == (q + d).to_bits()), "rmsnorm dx with a residual");
    check_directions("rmsnorm dw", &mut |w| fwd(&x, w), &w, &dw, 1e-2, TOL, 8);
}

fn rope_table(seq: usize, d: usize) -> Vec<f32> {
    let mut t = vec![0.0; seq * d];
    for p in 0..seq {
        for i in 0..d / 2 {
            let a = p as f64 * 10000f64.powf(-((2 * i) as f64) / d as f64);
            t[p * d + 2 * i] = a.cos() as f32;
            t[p * d + 2 * i + 1] = a.sin() as f32;
        }
    }
    t
}

#[test]
fn rope_backward_is_the_inverse_rotation() {
    let be = cpu();
    let mut rng = Rng::new(9);
    let s = AttnShape { batch: 2, seq: 5, n_heads: 2, n_kv_heads: 1, head_dim: 8 };
    let table = rope_table(s.seq, s.head_dim);
    let x = randn(&mut rng, s.tokens() * s.qkv_width(), 1.0);
    let r = randn(&mut rng, x.len(), 1.0);
    let mut f = |x: &[f32]| {
        let mut y = x.to_vec();
        be.rope(&mut y, &table, s, 0, false);
        dot64(&r, &y)
    };
    let mut dx = r.clone();
    be.rope(&mut dx, &table, s, 0, true);
    check_directions("rope", &mut f, &x, &dx, 1e-2, TOL, 10);
    // v columns are untouched.
    let mut y = x.clone();
    be.rope(&mut y, &table, s, 0, false);
    let v0 = (s.n_heads + s.n_kv_heads) * s.head_dim;
    assert_eq!(y[v0..s.qkv_width()], x[v0..s.qkv_width()]);
}

fn attention_case(s: AttnShape, seed: u64) {
    let be = cpu();
    let mut rng = Rng::new(seed);
    let qkv = randn(&mut rng, s.tokens() * s.qkv_width(), 1.0);
    let r = randn(&mut rng, s.tokens() * s.out_width(), 1.0);
    let fwd = |qkv: &[f32]| {
        let (mut o, mut lse) = (vec![0.0; s.tokens() * s.out_width()], vec![0.0; s.batch * s.n_heads * s.seq]);
        be.attention_fwd(&mut o, &mut lse, qkv, s);
        (o, lse)
    };
    let (o, lse) = fwd(&qkv);
    // Against a direct softmax(QKᵀ/√D + causal mask) V.
    let (d, w) = (s.head_dim, s.qkv_width());
    for b in 0..s.batch {
        for h in 0..s.n_heads {
            let kvh = h / (s.n_heads / s.n_kv_heads);
            for i in 0..s.seq {
                let row = |t: usize| (b * s.seq + t) * w;
                let q = &qkv[row(i) + h * d..row(i) + (h + 1) * d];
                let scores: Vec<f64> = (0..=i)
                    .map(|j| dot64(q, &qkv[row(j) + (s.n_heads + kvh) * d..row(j) + (s.n_heads + kvh + 1) * d]) / (d as f64).sqrt())
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|x| (x - m).exp()).sum();
                for dd in 0..d {
                    let want: f64 = (0..=i).map(|j| (scores[j] - m).exp() / z * qkv[row(j) + (s.n_heads + s.n_kv_heads + kvh) * d + dd] as f64).sum();
                    let got = o[(b * s.seq + i) * s.out_width() + h * d + dd] as f64;
                    assert!((want - got).abs() < 1e-5, "attention output ({b},{h},{i},{dd}): {got} vs {want}");
                }
            }
        }
    }
    let mut dqkv = vec![0.0; qkv.len()];
    be.attention_bwd(&mut dqkv, &r, &o, &lse, &qkv, s, &mut []);
    check_directions("attention dqkv", &mut |x| dot64(&r, &fwd(x).0), &qkv, &dqkv, 1e-2, TOL, seed + 1);
}

#[test]
fn attention_multi_head_across_tiles() {
    // 70 positions span two key tiles (64) and three query tiles (32).
    attention_case(AttnShape { batch: 2, seq: 70, n_heads: 2, n_kv_heads: 2, head_dim: 8 }, 11);
}

#[test]
fn attention_grouped_query() {
    attention_case(AttnShape { batch: 1, seq: 33, n_heads: 4, n_kv_heads: 2, head_dim: 6 }, 13);
    attention_case(AttnShape { batch: 2, seq: 9, n_heads: 3, n_kv_heads: 1, head_dim: 4 }, 17);
}

#[test]
fn swiglu_gradient() {
    let be = cpu();
    let mut rng = Rng::new(19);
    let (rows, h) = (9, 7);
    let gu = randn(&mut rng, rows * 2 * h, 1.5);
    let r = randn(&mut rng, rows * h, 1.0);
    let mut f = |gu: &[f32]| {
        let mut a = vec![0.0; rows * h];
        be.swiglu_fwd(&mut a, gu, rows, h);
        dot64(&r, &a)
    };
    let mut dgu = vec![0.0; gu.len()];
    let mut out = vec![f32::NAN; rows * h];
    be.swiglu_bwd(&mut dgu, Some(&mut out), &r, &gu, rows, h);
    // The backward's copy of the output is the forward's, bit for bit.
    let mut fwd_out = vec![0.0; rows * h];
    be.swiglu_fwd(&mut fwd_out, &gu, rows, h);
    assert_eq!(out.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), fwd_out.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "swiglu_bwd's output");
    check_directions("swiglu", &mut f, &gu, &dgu, 1e-2, TOL, 20);
}

#[test]
fn permute_combine_gradients() {
    let be = cpu();
    let mut rng = Rng::new(23);
    let (n, c) = (5, 4);
    // Token → slots as an expert-major routing would lay them out.
    let token = [0u32, 2, 3, 0, 1, 2, 4, 4];
    let offsets = [0u32, 2, 3, 5, 6, 8];
    let slots = [0u32, 3, 4, 1, 5, 2, 6, 7];
    let by_token = TokenSlots { offsets: &offsets, slots: &slots };
    let x = randn(&mut rng, n * c, 1.0);
    let gates = randn(&mut rng, token.len(), 1.0);
    let r = randn(&mut rng, n * c, 1.0);
    // L = Σ r ⊙ combine(gate ⊙ gather(x)).
    let f = |x: &[f32], g: &[f32]| {
        let mut xe = vec![0.0; token.len() * c];
        be.gather_rows(&mut xe, x, &token, c);
        let mut out = vec![0.0; n * c];
        be.combine_rows(&mut out, &xe, by_token, Some(g), None, c);
        dot64(&r, &out)
    };
    let mut xe = vec![0.0; token.len() * c];
    be.gather_rows(&mut xe, &x, &token, c);
    let mut dxe = vec![0.0; token.len() * c];
    be.gather_rows_scaled(&mut dxe, &r, &token, &gates, c);
    let mut dg = vec![0.0; token.len()];
    be.gathered_dots(&mut dg, &r, &xe, &token, c);
    let mut dx = vec![0.0; n * c];
    be.combine_rows(&mut dx, &dxe, by_token, None, None, c);
    check_directions("permute dx", &mut |x| f(x, &gates), &x, &dx, 1e-2, TOL, 24);
    check_directions("combine dgate", &mut |g| f(&x, g), &gates, &dg, 1e-2, TOL, 25);
}

#[test]
fn classifier_gradients_and_loss() {
    let be = cpu();
    let mut rng = Rng::new(26);
    // 300 rows: two chunks of the fused classifier.
    let (n, c, v) = (300, 8, 13);
    let x = randn(&mut rng, n * c, 1.0);
    let w = randn(&mut rng, v * c, 1.0);
    let targets: Vec<u32> = (0..n).map(|i| (i * 7 % v) as u32).collect();
    let mean = |l: Vec<f32>| l.iter().map(|&a| a as f64).sum::<f64>() / n as f64;
    // The logits of a chunk live in this scratch.
    let scratch = std::cell::RefCell::new(vec![f32::NAN; be.classifier_scratch_len(n, v)]);
    let loss = |x: &[f32], w: &[f32]| be.classifier(x, w, &targets, n, c, v, None, &mut scratch.borrow_mut());
    // Loss against a direct log-softmax.
    let losses = loss(&x, &w);
    for i in [0, 137, 299] {
        let z: Vec<f64> = (0..v).map(|j| dot64(&x[i * c..(i + 1) * c], &w[j * c..(j + 1) * c])).collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + z.iter().map(|a| (a - m).exp()).sum::<f64>().ln();
        assert!((losses[i] as f64 - (lse - z[targets[i] as usize])).abs() < 1e-4);
    }
    let (mut dx, mut dw) = (vec![0.0; n * c], vec![0.0; v * c]);
    be.classifier(&x, &w, &targets, n, c, v, Some((&mut dx, &mut dw, 1.0)), &mut scratch.borrow_mut());
    check_directions("classifier dx", &mut |x| mean(loss(x, &w)), &x, &dx, 1e-2, TOL, 27);
    check_directions("classifier dw", &mut |w| mean(loss(&x, w)), &w, &dw, 1e-2, TOL, 28);
}

/// Router: softmax → Top-K / Top-P selection → renormalised gates → the experts' capacity (under
/// `mode`), plus weighted aux losses. `L = Σ_{s kept} r_s gate_s + aux`, differentiated with
/// respect to the logits; logits are spread wide so that no perturbation crosses a selection or
/// capacity boundary (checked). A dropped slot's gate still shares its token's normaliser, so its
/// probability gets a gradient through the kept gates.
fn router_case(kind: Kind, mode: DispatchMode, seed: u64) {
    let be = cpu();
    let (_, mut moe) = tiny_model(kind);
    moe.entropy = 0.03;
    let (n, e) = (12, moe.n_experts());
    let mut rng = Rng::new(seed);
    let logits = randn(&mut rng, n * e, 2.0);
    let probs_of = |z: &[f32]| {
        let mut p = vec![0.0; n * e];
        be.softmax_rows(&mut p, z, n, e);
        p
    };
    let route = |p: &[f32]| apply_capacity(router::select(p, n, e, &moe), p, mode).unwrap();
    let base = route(&probs_of(&logits));
    if mode != DispatchMode::Dropless {
        assert!(base.n_dropped() > 0, "{mode:?} dropped nothing");
    }
    let r = randn(&mut rng, base.kept.n_slots(), 1.0);
    let mut f = |z: &[f32]| {
        let p = probs_of(z);
        let routing = route(&p);
        for (got, want) in [(&routing.kept, &base.kept), (&routing.dropped, &base.dropped)] {
            assert_eq!((&got.token, &got.offsets), (&want.token, &want.offsets), "perturbation changed the routing");
        }
        let chosen = router::select(&p, n, e, &moe);
        dot64(&r, &routing.kept.gate) + router::aux_losses(&p, z, &chosen, &moe).weighted(&moe) as f64
    };
    let p = probs_of(&logits);
    let args = router::BackwardArgs::new(&base, &moe);
    let mut dlogits = vec![0.0; n * e];
    be.router_bwd(&mut dlogits, &r, &p, &logits, args.grad());
    check_directions(&format!("router {mode:?}"), &mut f, &logits, &dlogits, 1e-3, TOL, seed + 1);
}

#[test]
fn router_top_k_gradient() {
    router_case(Kind::TopK, DispatchMode::Dropless, 30);
}

#[test]
fn router_top_p_gradient() {
    router_case(Kind::TopP, DispatchMode::Dropless, 31);
}

/// Capacity factors low enough to drop, by either policy.
#[test]
fn router_gradient_with_dropped_slots() {
    router_case(Kind::TopK, DispatchMode::Capacity { factor: 0.75, policy: DropPolicy::Probs }, 32);
    router_case(Kind::TopP, DispatchMode::Capacity { factor: 0.6, policy: DropPolicy::Position }, 33);
}
