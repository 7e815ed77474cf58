//! The α planner of MEMO's token-wise swapping.
//!
//! Per swapped layer, the layer input and the attention output go to host memory whole (recomputing
//! attention at long context costs too much), and a fraction α of every other skeletal tensor's
//! tokens follows them; the remaining (1−α) is dropped and recomputed before that layer's backward.
//! Offloading more means recomputing less, so α is pushed as high as two limits allow:
//!
//! - **PCIe**: a layer's device-to-host copy must hide under its own forward,
//!   `(S_input + S_attn + α S_others) / B_pcie ≤ T_layer_fwd`;
//! - **host memory**: everything offloaded must fit,
//!   `Σ_swapped (S_input + S_attn + α S_others) ≤ M_host`.
//!
//! The last two layers are never swapped: their backward starts right after the forward ends, so
//! an offload could not finish before its prefetch would have to begin.
//!
//! With identical layers this is the paper's single α (closed form, see the tests). With
//! heterogeneous layers (MoE layers of unequal expert widths or routed counts), each swapped layer
//! gets its own α_l and the LP maximises `Σ_l α_l S_others_l`, the bytes offloaded rather than
//! recomputed — recompute work is roughly proportional to those bytes. That objective usually has
//! many optima when host memory binds (any split of the remaining host bytes is as good), so a second
//! LP picks, among them, the plan whose smallest α is largest: no layer recomputes everything while
//! another recomputes nothing, and identical layers get identical α again.

use good_lp::{variable, variables, Expression, Solution, SolverModel, Variable};

use super::solver::solver;
use crate::{Error, Result};

/// Number of final layers that always keep their skeletal activations on the device.
pub const UNSWAPPED_TAIL: usize = 2;

/// What one layer's forward stores for its backward, and how long the forward takes.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayerCost {
    /// Bytes of the layer input (offloaded whole).
    pub s_input: u64,
    /// Bytes of the attention output (offloaded whole).
    pub s_attn: u64,
    /// Bytes of every other skeletal tensor; split along tokens by α.
    pub s_others: u64,
    /// Forward time of the layer in seconds: the window its offload must hide in.
    pub t_fwd: f64,
}

/// The machine limits the offload must respect.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HostLink {
    /// Device-to-host bandwidth in bytes per second.
    pub b_pcie: f64,
    /// Host memory available for offloaded activations, in bytes.
    pub m_host: u64,
}

/// A feasible offload plan.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AlphaPlan {
    /// α of each swapped layer (layers `0..alpha.len()`); the remaining
    /// [`UNSWAPPED_TAIL`] layers keep everything on the device.
    pub alpha: Vec<f64>,
    /// Host bytes the plan uses, summed over the swapped layers.
    pub host_bytes: f64,
    /// Per swapped layer, the device-to-host copy time in seconds (≤ that layer's `t_fwd`).
    pub copy_s: Vec<f64>,
}

/// Why no α works: even α = 0 (only input and attention output offloaded) breaks a limit.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Infeasible {
    /// Copying a layer's input and attention output takes longer than its forward.
    Pcie { layer: usize, bytes: u64, copy_s: f64, t_fwd: f64 },
    /// The swapped layers' inputs and attention outputs alone exceed the host memory.
    Host { bytes: u64, m_host: u64, swapped_layers: usize },
}

impl std::fmt::Display for Infeasible {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Infeasible::Pcie { layer, bytes, copy_s, t_fwd } => write!(
                f,
                "layer {layer}: offloading input + attention output ({bytes} B) takes {copy_s:.3e} s \
                 over PCIe but the forward lasts only {t_fwd:.3e} s"
            ),
            Infeasible::Host { bytes, m_host, swapped_layers } => write!(
                f,
                "inputs + attention outputs of {swapped_layers} swapped layers need {bytes} B of host \
                 memory but only {m_host} B are available"
            ),
        }
    }
}

/// The planner's answer: a plan, or every limit that rules swapping out (the caller then
/// recomputes instead of offloading).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum AlphaOutcome {
    Swap(AlphaPlan),
    Infeasible(Vec<Infeasible>),
}

/// Relative slack allowed when checking the LP's answer against the limits.
const TOL: f64 = 1e-9;

/// Plans α for `layers` (in execution order) under `link`.
///
/// Errors only on malformed input (non-finite or negative time, non-positive bandwidth, a
/// byte total that does not fit in u64); an unattainable limit is an [`AlphaOutcome::Infeasible`].
pub fn plan_alpha(layers: &[LayerCost], link: HostLink) -> Result<AlphaOutcome> {
    check_inputs(layers, link)?;
    let swapped = &layers[..layers.len().saturating_sub(UNSWAPPED_TAIL)];
    if let Some(reasons) = infeasibility(swapped, link)? {
        return Ok(AlphaOutcome::Infeasible(reasons));
    }
    if swapped.is_empty() {
        return Ok(AlphaOutcome::Swap(AlphaPlan { alpha: vec![], host_bytes: 0.0, copy_s: vec![] }));
    }
    let alpha = solve(swapped, link)?;
    let whole: Vec<f64> = swapped.iter().map(|l| (l.s_input + l.s_attn) as f64).collect();
    let host_bytes = swapped.iter().zip(&alpha).zip(&whole).map(|((l, a), w)| w + a * l.s_others as f64).sum();
    let copy_s = swapped.iter().zip(&alpha).zip(&whole).map(|((l, a), w)| (w + a * l.s_others as f64) / link.b_pcie).collect();
    Ok(AlphaOutcome::Swap(AlphaPlan { alpha, host_bytes, copy_s }))
}

fn check_inputs(layers: &[LayerCost], link: HostLink) -> Result<()> {
    if !(link.b_pcie.is_finite() && link.b_pcie > 0.0) {
        return Err(Error::config("b_pcie", link.b_pcie, "a finite bandwidth > 0 in bytes/s"));
    }
    for (i, l) in layers.iter().enumerate() {
        if !(l.t_fwd.is_finite() && l.t_fwd >= 0.0) {
            return Err(Error::config(format!("layers[{i}].t_fwd"), l.t_fwd, "a finite time ≥ 0 in seconds"));
        }
        l.s_input
            .checked_add(l.s_attn)
            .and_then(|w| w.checked_add(l.s_others))
            .ok_or_else(|| Error::Invalid(format!("layer {i}: skeletal byte counts overflow u64")))?;
    }
    Ok(())
}

/// The limits that α = 0 already violates, or `None` when α = 0 fits everywhere.
fn infeasibility(swapped: &[LayerCost], link: HostLink) -> Result<Option<Vec<Infeasible>>> {
    let mut reasons = Vec::new();
    let mut total: u64 = 0;
    for (layer, l) in swapped.iter().enumerate() {
        let bytes = l.s_input + l.s_attn; // checked in check_inputs
        let copy_s = bytes as f64 / link.b_pcie;
        if copy_s > l.t_fwd * (1.0 + TOL) {
            reasons.push(Infeasible::Pcie { layer, bytes, copy_s, t_fwd: l.t_fwd });
        }
        total = total
            .checked_add(bytes)
            .ok_or_else(|| Error::Invalid("total offloaded bytes overflow u64".into()))?;
    }
    if total > link.m_host {
        reasons.push(Infeasible::Host { bytes: total, m_host: link.m_host, swapped_layers: swapped.len() });
    }
    Ok((!reasons.is_empty()).then_some(reasons))
}

/// Two LPs over α_l ∈ [0, pcie_cap_l]: maximise offloaded bytes, then, holding that, the smallest α.
/// Every row is scaled by the host budget left after the whole-tensor offloads so the solver sees
/// numbers near 1 instead of terabytes.
fn solve(swapped: &[LayerCost], link: HostLink) -> Result<Vec<f64>> {
    let whole: u64 = swapped.iter().map(|l| l.s_input + l.s_attn).sum();
    let budget = (link.m_host - whole) as f64; // ≥ 0: infeasibility was ruled out
    let scale = budget.max(1.0);
    let caps: Vec<f64> = swapped.iter().map(|l| pcie_cap(l, link)).collect();
    let weights: Vec<f64> = swapped.iter().map(|l| l.s_others as f64 / scale).collect();

    let build = |vars: &mut good_lp::ProblemVariables| -> Vec<Variable> {
        caps.iter().map(|&cap| vars.add(variable().min(0.0).max(cap))).collect()
    };
    let offloaded = |alpha: &[Variable]| -> Expression { alpha.iter().zip(&weights).map(|(&a, &w)| w * a).sum() };
    let host_row = budget / scale;

    let mut vars = variables!();
    let alpha = build(&mut vars);
    let first = vars
        .maximise(offloaded(&alpha))
        .using(solver)
        .with(offloaded(&alpha).leq(host_row))
        .solve()
        .map_err(|e| Error::Invalid(format!("α LP (offloaded bytes) failed: {e}")))?;
    let best: f64 = alpha.iter().zip(&weights).map(|(&a, &w)| w * first.value(a)).sum();

    let mut vars = variables!();
    let alpha = build(&mut vars);
    let floor = vars.add(variable().min(0.0).max(1.0));
    let mut lp = vars.maximise(floor).using(solver).with(offloaded(&alpha).leq(host_row));
    lp = lp.with(offloaded(&alpha).geq(best - TOL * best.abs().max(1.0)));
    for &a in &alpha {
        lp = lp.with((a - floor).geq(0.0));
    }
    let second = lp.solve().map_err(|e| Error::Invalid(format!("α LP (smallest α) failed: {e}")))?;
    Ok(alpha.iter().zip(&caps).map(|(&a, &cap)| second.value(a).clamp(0.0, cap)).collect())
}

/// The largest α the layer's forward can hide the copy under, clamped to [0, 1]; a layer with no
/// per-token rest has nothing to recompute, so its α is 1 by convention.
fn pcie_cap(l: &LayerCost, link: HostLink) -> f64 {
    if l.s_others == 0 {
        return 1.0;
    }
    let spare = l.t_fwd * link.b_pcie - (l.s_input + l.s_attn) as f64;
    (spare / l.s_others as f64).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    /// The paper's single α for identical layers, written independently of the LP.
    fn closed_form(l: LayerCost, n: usize, link: HostLink) -> Option<f64> {
        let whole = (l.s_input + l.s_attn) as f64;
        let by_pcie = (link.b_pcie * l.t_fwd - whole) / l.s_others as f64;
        let by_host = (link.m_host as f64 / (n - 2) as f64 - whole) / l.s_others as f64;
        let a = by_pcie.min(by_host);
        (a >= 0.0).then(|| a.min(1.0))
    }

    fn swap(outcome: AlphaOutcome) -> AlphaPlan {
        match outcome {
            AlphaOutcome::Swap(p) => p,
            AlphaOutcome::Infeasible(r) => panic!("expected a plan, got {r:?}"),
        }
    }

    fn layer(t_fwd: f64) -> LayerCost {
        LayerCost { s_input: 2 * GIB, s_attn: 2 * GIB, s_others: 12 * GIB, t_fwd }
    }

    #[test]
    fn uniform_layers_match_closed_form() {
        let n = 10;
        // Each case binds a different limit: PCIe, host, both loose (α = 1).
        let cases = [
            (layer(0.5), HostLink { b_pcie: 20e9, m_host: 1 << 50 }),
            (layer(10.0), HostLink { b_pcie: 20e9, m_host: 100 * GIB }),
            (layer(10.0), HostLink { b_pcie: 20e9, m_host: 1 << 50 }),
            (layer(0.45), HostLink { b_pcie: 25e9, m_host: 70 * GIB }),
        ];
        for (l, link) in cases {
            let want = closed_form(l, n, link).unwrap();
            let plan = swap(plan_alpha(&vec![l; n], link).unwrap());
            assert_eq!(plan.alpha.len(), n - 2);
            for a in &plan.alpha {
                assert!((a - want).abs() < 1e-6, "α = {a}, closed form {want} ({l:?}, {link:?})");
            }
            assert!(plan.host_bytes <= link.m_host as f64 * (1.0 + 1e-9));
            assert!(plan.copy_s.iter().all(|&c| c <= l.t_fwd * (1.0 + 1e-9)));
        }
    }

    #[test]
    fn alpha_clamps_at_one_and_zero() {
        let link = HostLink { b_pcie: 10e9, m_host: 1 << 50 };
        let plan = swap(plan_alpha(&[layer(100.0); 6], link).unwrap());
        assert!(plan.alpha.iter().all(|&a| a == 1.0), "{:?}", plan.alpha);
        // The forward lasts exactly as long as the whole-tensor copy: nothing per-token fits.
        let exact = (4 * GIB) as f64 / link.b_pcie;
        let plan = swap(plan_alpha(&[layer(exact); 6], link).unwrap());
        assert!(plan.alpha.iter().all(|&a| a.abs() < 1e-9), "{:?}", plan.alpha);
    }

    #[test]
    fn infeasible_reports_every_violated_limit_with_numbers() {
        let link = HostLink { b_pcie: 10e9, m_host: 10 * GIB };
        let out = plan_alpha(&[layer(0.1); 5], link).unwrap();
        let AlphaOutcome::Infeasible(reasons) = out else { panic!("expected infeasible") };
        // Three swapped layers each too slow, and 3 × 4 GiB > 10 GiB.
        assert_eq!(reasons.len(), 4, "{reasons:?}");
        assert!(matches!(reasons[0], Infeasible::Pcie { layer: 0, bytes, .. } if bytes == 4 * GIB));
        assert_eq!(reasons[3], Infeasible::Host { bytes: 12 * GIB, m_host: 10 * GIB, swapped_layers: 3 });
        assert!(reasons[3].to_string().contains("12884901888 B"));
    }

    #[test]
    fn two_layers_or_fewer_swap_nothing() {
        let link = HostLink { b_pcie: 1.0, m_host: 0 };
        let plan = swap(plan_alpha(&[layer(0.0); 2], link).unwrap());
        assert!(plan.alpha.is_empty() && plan.host_bytes == 0.0);
    }

    #[test]
    fn heterogeneous_layers_fill_host_and_balance_alpha() {
        // Dense and MoE layers alternate; MoE layers carry twice the per-token rest.
        let dense = LayerCost { s_input: GIB, s_attn: GIB, s_others: 4 * GIB, t_fwd: 1.0 };
        let moe = LayerCost { s_others: 8 * GIB, t_fwd: 2.0, ..dense };
        let layers: Vec<_> = (0..8).map(|i| if i % 2 == 0 { dense } else { moe }).collect();
        let link = HostLink { b_pcie: 100e9, m_host: 40 * GIB };
        let plan = swap(plan_alpha(&layers, link).unwrap());
        // PCIe allows α = 1 everywhere; host binds: 12 GiB whole + Σ α S_others ≤ 40 GiB,
        // with Σ S_others = 36 GiB; equal α = 28/36 is the max-min split.
        assert!((plan.host_bytes - (40 * GIB) as f64).abs() < 1.0, "{}", plan.host_bytes);
        for a in &plan.alpha {
            assert!((a - 28.0 / 36.0).abs() < 1e-6, "{:?}", plan.alpha);
        }
    }

    #[test]
    fn heterogeneous_pcie_caps_shift_host_bytes_to_other_layers() {
        // Layer 0's forward is too short for more than α = 0.25; the others take up the host slack.
        let fast = LayerCost { s_input: GIB, s_attn: GIB, s_others: 4 * GIB, t_fwd: 3.0 / 100.0 * 1.073_741_824 };
        let slow = LayerCost { t_fwd: 1.0, ..fast };
        let layers = [fast, slow, slow, slow, slow];
        let link = HostLink { b_pcie: 100e9, m_host: 15 * GIB };
        let plan = swap(plan_alpha(&layers, link).unwrap());
        assert!((plan.alpha[0] - 0.25).abs() < 1e-6, "{:?}", plan.alpha);
        // 6 GiB whole + 1 GiB from layer 0 leaves 8 GiB for layers 1-2: α = 1 each.
        assert!((plan.alpha[1] - 1.0).abs() < 1e-6 && (plan.alpha[2] - 1.0).abs() < 1e-6, "{:?}", plan.alpha);
    }

    #[test]
    fn malformed_inputs_are_errors_not_panics() {
        let link = HostLink { b_pcie: 0.0, m_host: 1 };
        assert!(matches!(plan_alpha(&[layer(1.0)], link), Err(Error::Config { .. })));
        let link = HostLink { b_pcie: 1e9, m_host: 1 };
        assert!(plan_alpha(&[layer(f64::NAN); 3], link).is_err());
        let huge = LayerCost { s_input: u64::MAX, s_attn: 1, s_others: 0, t_fwd: 1.0 };
        assert!(plan_alpha(&[huge; 3], link).is_err());
    }
}
