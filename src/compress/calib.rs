//! Calibration: the input Hessian of every weight matrix of a model, from a few batches of text.
//!
//! A forward with [`Model::forward_saving`] leaves each block's inputs in the activation store;
//! the input of each matrix is (block.rs INVENTORY):
//! - `wqkv`: `attn_norm_out`; `wo`: `attn_out`;
//! - expert `e`'s `w_gate_up`: the rows of `ffn_norm_out` of the tokens routed to `e`;
//! - expert `e`'s `w_down`: `SwiGLU(expert_gate_up)` on `e`'s slots;
//! - `lm_head`: the final-norm output, rebuilt on the host from the last block's saved
//!   `resid_mid`, `expert_out` and routing (the store does not hold the last block's output).
//!
//! Only `Σ xxᵀ` and the sample count are kept per matrix (accumulated with the backend's GEMM),
//! so memory does not grow with the number of calibration tokens.
//!
//! Experts see only their routed tokens, and a rarely chosen expert's `XᵀX / n` is a noisy,
//! often singular estimate. It is shrunk toward a prior worth [`PRIOR_TOKENS`] pseudo-tokens:
//! `H = (n·H_e + κ·H_prior) / (n + κ)`. For `w_gate_up` the prior is the layer's Hessian over all
//! tokens (the expert's inputs are a subset of the same `ffn_norm_out` rows); for `w_down`, whose
//! inputs exist only inside the expert, it is `mean(diag H_e)·I` (plain weight MSE when the expert
//! saw no token at all). An expert with `n ≫ κ` keeps its own statistics.

use std::collections::BTreeMap;

use super::matrix::Hessian;
use crate::backend::cpu::Cpu;
use crate::backend::Backend;
use crate::model::Model;
use crate::{Error, Result};

/// Weight of the shrinkage prior of expert Hessians, in tokens.
pub const PRIOR_TOKENS: f64 = 64.0;
/// Relative diagonal damping (as in [`Hessian::from_inputs`]) so every Hessian is positive definite.
const DAMPING: f64 = 1e-6;

/// Running `Σ xxᵀ` over calibration rows of width `d`.
#[derive(Clone, Debug)]
struct Accumulator {
    d: usize,
    sum: Vec<f32>,
    n: usize,
}

impl Accumulator {
    fn new(d: usize) -> Self {
        Accumulator { d, sum: vec![0.0; d * d], n: 0 }
    }

    /// Adds the rows of `x` (`rows × d`).
    fn add(&mut self, be: &Cpu, x: &[f32], rows: usize) {
        if rows == 0 {
            return;
        }
        be.matmul(&mut self.sum, &x[..rows * self.d], &x[..rows * self.d], self.d, rows, self.d, true, false, true);
        self.n += rows;
    }

    /// `Σ xxᵀ / n` in f64 (zeros when no rows were seen).
    fn mean(&self) -> Vec<f64> {
        let n = self.n.max(1) as f64;
        self.sum.iter().map(|&v| v as f64 / n).collect()
    }
}

fn mean_diag(h: &[f64], d: usize) -> f64 {
    (0..d).map(|i| h[i * d + i]).sum::<f64>() / d as f64
}

/// A damped Hessian; identity when the data carries no signal at all.
fn finish(mut data: Vec<f64>, d: usize) -> Hessian {
    let m = mean_diag(&data, d);
    let (add, scale) = if m > 0.0 && m.is_finite() { (DAMPING * m, 1.0) } else { (1.0, 0.0) };
    data.iter_mut().for_each(|v| *v *= scale);
    (0..d).for_each(|i| data[i * d + i] += add);
    Hessian { cols: d, data }
}

/// `(n·H_e + κ·prior) / (n + κ)` with `κ =` [`PRIOR_TOKENS`].
fn shrink(own: &Accumulator, prior: &[f64]) -> Hessian {
    let (n, k) = (own.n as f64, PRIOR_TOKENS);
    let data = own.mean().iter().zip(prior).map(|(h, p)| (n * h + k * p) / (n + k)).collect();
    finish(data, own.d)
}

/// The accumulators of one block.
struct LayerAcc {
    wqkv: Accumulator,
    wo: Accumulator,
    ffn: Accumulator,
    gate_up: Vec<Accumulator>,
    down: Vec<Accumulator>,
}

/// Calibration Hessians by parameter name, plus routed-token counts per layer and expert.
pub struct Calibration {
    pub hessians: BTreeMap<String, Hessian>,
    pub expert_tokens: Vec<Vec<usize>>,
    pub tokens: usize,
}

/// Runs `calib` batches `(inputs, batch, seq)` through `model` and builds the Hessian of every
/// block matrix and of `lm_head`.
pub fn calibrate(be: &Cpu, model: &Model<Cpu>, calib: &[(Vec<u32>, usize, usize)]) -> Result<Calibration> {
    if calib.is_empty() {
        return Err(Error::Invalid("calibration needs at least one batch of tokens".into()));
    }
    let (c, widths) = (model.config.d_model, &model.moe.expert_widths);
    let a = model.config.n_heads * model.config.head_dim();
    let mut layers: Vec<LayerAcc> = (0..model.config.n_layers)
        .map(|_| LayerAcc {
            wqkv: Accumulator::new(c),
            wo: Accumulator::new(a),
            ffn: Accumulator::new(c),
            gate_up: widths.iter().map(|_| Accumulator::new(c)).collect(),
            down: widths.iter().map(|&h| Accumulator::new(h)).collect(),
        })
        .collect();
    let mut head = Accumulator::new(c);
    let mut tokens = 0;
    for (inputs, batch, seq) in calib {
        let n = batch * seq;
        if inputs.len() != n {
            return Err(Error::Invalid(format!("calibration batch has {} tokens, expected {batch} × {seq}", inputs.len())));
        }
        let mut store = model.new_store();
        model.forward_saving(be, &mut store, inputs, *batch, *seq)?;
        tokens += n;
        for (l, acc) in layers.iter_mut().enumerate() {
            acc.wqkv.add(be, store.load(l, "attn_norm_out"), n);
            acc.wo.add(be, store.load(l, "attn_out"), n);
            let xn = store.load(l, "ffn_norm_out");
            acc.ffn.add(be, xn, n);
            let routing = store.routing(l);
            let gu = store.load(l, "expert_gate_up");
            let mut gu_at = 0;
            for (e, &h) in widths.iter().enumerate() {
                let slots = routing.slots_of(e);
                let rows = slots.len();
                if rows == 0 {
                    continue;
                }
                let mut xe = vec![0f32; rows * c];
                be.gather_rows(&mut xe, xn, &routing.token[slots], c);
                acc.gate_up[e].add(be, &xe, rows);
                let mut act = vec![0f32; rows * h];
                be.swiglu_fwd(&mut act, &gu[gu_at..gu_at + rows * 2 * h], rows, h);
                acc.down[e].add(be, &act, rows);
                gu_at += rows * 2 * h;
            }
        }
        let xf = final_hidden(model, &store);
        head.add(be, &xf, n);
    }
    let mut hessians = BTreeMap::new();
    let mut expert_tokens = Vec::new();
    for (l, acc) in layers.iter().enumerate() {
        let p = |s: &str| format!("layers.{l}.{s}");
        hessians.insert(p("wqkv"), finish(acc.wqkv.mean(), c));
        hessians.insert(p("wo"), finish(acc.wo.mean(), a));
        let layer_prior = acc.ffn.mean();
        for (e, (gu, down)) in acc.gate_up.iter().zip(&acc.down).enumerate() {
            hessians.insert(p(&format!("experts.{e}.w_gate_up")), shrink(gu, &layer_prior));
            let own = down.mean();
            let m = mean_diag(&own, down.d);
            let iso: Vec<f64> = (0..down.d * down.d).map(|i| if i % (down.d + 1) == 0 { if m > 0.0 { m } else { 1.0 } } else { 0.0 }).collect();
            hessians.insert(p(&format!("experts.{e}.w_down")), shrink(down, &iso));
        }
        expert_tokens.push(acc.gate_up.iter().map(|a| a.n).collect());
    }
    hessians.insert("lm_head".into(), finish(head.mean(), c));
    Ok(Calibration { hessians, expert_tokens, tokens })
}

/// The final-norm output `(N, C)`: last block output `resid_mid + Σ gate · expert_out`, then
/// RMSNorm with `final_norm` — the same sums the block's combine and the model's norm compute.
fn final_hidden(model: &Model<Cpu>, store: &crate::memory::store::ActivationStore<Cpu>) -> Vec<f32> {
    let (c, last) = (model.config.d_model, model.config.n_layers - 1);
    let mut x = store.load(last, "resid_mid").clone();
    let y = store.load(last, "expert_out");
    let routing = store.routing(last);
    for (s, (&t, &g)) in routing.token.iter().zip(&routing.gate).enumerate() {
        let (row, ys) = (&mut x[t as usize * c..(t as usize + 1) * c], &y[s * c..(s + 1) * c]);
        row.iter_mut().zip(ys).for_each(|(r, v)| *r += g * v);
    }
    let gain = &model.params.master()[model.layout.final_norm..model.layout.final_norm + c];
    for row in x.chunks_mut(c) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / c as f32;
        let rstd = 1.0 / (ms + model.config.norm_eps).sqrt();
        row.iter_mut().zip(gain).for_each(|(v, g)| *v *= rstd * g);
    }
    x
}

/// `blockdiag(H, H)`: the Hessian of a paired gate/up row `[g | u]` (both halves see the same
/// input, and their output errors add).
pub fn paired(h: &Hessian) -> Hessian {
    let (d, d2) = (h.cols, 2 * h.cols);
    let mut data = vec![0.0; d2 * d2];
    for i in 0..d {
        for j in 0..d {
            data[i * d2 + j] = h.data[i * d + j];
            data[(d + i) * d2 + d + j] = h.data[i * d + j];
        }
    }
    Hessian { cols: d2, data }
}

/// `H` with rows and columns reordered: entry `(i, j)` of the result is `(order[i], order[j])`.
pub fn permuted(h: &Hessian, order: &[usize]) -> Hessian {
    let d = h.cols;
    let data = order.iter().flat_map(|&i| order.iter().map(move |&j| h.data[i * d + j])).collect();
    Hessian { cols: d, data }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::matrix::Matrix;

    #[test]
    fn accumulator_matches_hessian_from_inputs_and_shrinks_toward_the_prior() {
        let be = Cpu::new(1);
        let x: Vec<f32> = (0..40).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
        let mut acc = Accumulator::new(4);
        acc.add(&be, &x[..16], 4);
        acc.add(&be, &x[16..], 6);
        let direct = Hessian::from_inputs(&Matrix::new(10, 4, x).unwrap()).unwrap();
        let mine = finish(acc.mean(), 4);
        for (a, b) in mine.data.iter().zip(&direct.data) {
            assert!((a - b).abs() < 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        }
        // No tokens: the prior alone; many tokens: nearly the expert's own statistics.
        let prior = vec![2.0, 0.0, 0.0, 2.0];
        let empty = Accumulator::new(2);
        assert!((shrink(&empty, &prior).data[0] - 2.0).abs() < 1e-5);
        let mut busy = Accumulator::new(2);
        busy.add(&be, &vec![1.0f32; 2 * 100_000], 100_000);
        let h = shrink(&busy, &prior);
        assert!((h.data[1] - 1.0).abs() < 1e-3 && (h.data[0] - 1.0).abs() < 2e-3, "{:?}", h.data);
    }

    #[test]
    fn paired_and_permuted_hessians_give_the_same_quadratic_forms() {
        let h = Hessian { cols: 2, data: vec![2.0, 0.5, 0.5, 1.0] };
        let p = paired(&h);
        let e = [0.3, -0.2, 0.7, 0.1];
        assert!((p.quad(&e) - h.quad(&e[..2]) - h.quad(&e[2..])).abs() < 1e-12);
        let order = [2, 0, 3, 1];
        let q = permuted(&p, &order);
        let e_perm: Vec<f64> = order.iter().map(|&i| e[i]).collect();
        assert!((q.quad(&e_perm) - p.quad(&e)).abs() < 1e-12);
    }
}
