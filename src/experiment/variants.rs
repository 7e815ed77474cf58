//! The variants of the HMoE experiment (papers.md §1): what each changes in `[moe]`.
//!
//! Every variant keeps the base model's depth, width, attention, number of experts and total
//! expert width per layer, so they differ only in how that width is split and routed. The
//! z-loss is off everywhere (the paper does not use one), so "no aux loss" means none at all.

use crate::{Error, Result};

/// Expert widths as a named layout of the base model's experts, or one dense FFN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Widths {
    /// One expert of the whole width (top-1 of 1: every token uses it).
    Dense,
    /// A `moe.layout` name: `homogeneous`, `arithmetic`, `geometric`, `hybrid`.
    Layout(&'static str),
}

/// Top-K with `k`, or Top-P with threshold `p`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Route {
    TopK(usize),
    TopP(f32),
}

/// One row of the experiment.
#[derive(Clone, Debug, PartialEq)]
pub struct Variant {
    pub name: &'static str,
    pub about: &'static str,
    pub widths: Widths,
    pub route: Route,
    pub load_balance: f32,
    pub p_penalty: f32,
    pub entropy: f32,
}

/// Switch load-balance, P-Penalty and entropy coefficients from the paper.
const LB: f32 = 1e-2;
const PP: f32 = 0.1;
const ENT: f32 = 3e-2;

/// Every variant, in table order: the six the issue asks for, then the two extra layouts.
pub fn all() -> Vec<Variant> {
    let v = |name, about, widths, route, load_balance, p_penalty, entropy| Variant { name, about, widths, route, load_balance, p_penalty, entropy };
    let arith = Widths::Layout("arithmetic");
    let homo = Widths::Layout("homogeneous");
    vec![
        v("dense", "one FFN of the total width", Widths::Dense, Route::TopK(1), 0.0, 0.0, 0.0),
        v("moe-top2", "homogeneous, Top-2, Switch balance", homo, Route::TopK(2), LB, 0.0, 0.0),
        v("moe-topp", "homogeneous, Top-P 0.6, Switch balance + entropy", homo, Route::TopP(0.6), LB, 0.0, ENT),
        v("hmoe-top2", "arithmetic, Top-2, P-Penalty", arith, Route::TopK(2), 0.0, PP, 0.0),
        v("hmoe-topp", "arithmetic, Top-P 0.6, P-Penalty + entropy", arith, Route::TopP(0.6), 0.0, PP, ENT),
        v("hmoe-noaux", "arithmetic, Top-2, no aux loss", arith, Route::TopK(2), 0.0, 0.0, 0.0),
        v("hmoe-topp-geo", "geometric, Top-P 0.6, P-Penalty + entropy", Widths::Layout("geometric"), Route::TopP(0.6), 0.0, PP, ENT),
        v("hmoe-topp-hybrid", "hybrid, Top-P 0.6, P-Penalty + entropy", Widths::Layout("hybrid"), Route::TopP(0.6), 0.0, PP, ENT),
    ]
}

/// The variants named in `names` (in the order given), or an error listing the known names.
pub fn select(names: &[String]) -> Result<Vec<Variant>> {
    let known = all();
    names
        .iter()
        .map(|n| {
            known.iter().find(|v| v.name == n).cloned().ok_or_else(|| {
                Error::config("--variants", format!("\"{n}\""), format!("names from {}", known.iter().map(|v| v.name).collect::<Vec<_>>().join(", ")))
            })
        })
        .collect()
}

impl Variant {
    /// `--set` overrides that turn the base model into this variant: `n_experts` experts sharing
    /// `total_width` in multiples of `granule` (dense: one expert of `total_width`).
    pub fn overrides(&self, n_experts: usize, total_width: usize, granule: usize) -> Vec<String> {
        let (layout, n) = match self.widths {
            Widths::Dense => ("homogeneous", 1),
            Widths::Layout(name) => (name, n_experts),
        };
        let (routing, k, p) = match self.route {
            Route::TopK(k) => ("top_k", k, 0.6),
            Route::TopP(p) => ("top_p", 2, p),
        };
        vec![
            format!("moe.layout=\"{layout}\""),
            format!("moe.n_experts={n}"),
            format!("moe.total_width={total_width}"),
            format!("moe.width_granule={granule}"),
            format!("moe.routing=\"{routing}\""),
            format!("moe.top_k={k}"),
            format!("moe.top_p={p}"),
            format!("moe.load_balance={}", self.load_balance),
            format!("moe.p_penalty={}", self.p_penalty),
            format!("moe.entropy={}", self.entropy),
            "moe.z_loss=0.0".into(),
        ]
    }

    /// Experts a token is expected to use, for planning evaluation points (Top-P: a guess of 2).
    pub fn expected_k(&self) -> f64 {
        match (self.widths, self.route) {
            (Widths::Dense, _) => 1.0,
            (_, Route::TopK(k)) => k as f64,
            (_, Route::TopP(_)) => 2.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn every_variant_keeps_the_total_width() {
        for v in all() {
            let c = Config::default_with(&v.overrides(8, 512, 4)).unwrap_or_else(|e| panic!("{}: {e}", v.name));
            assert_eq!(c.moe.expert_widths.iter().sum::<usize>(), 512, "{}", v.name);
            assert_eq!(c.moe.z_loss, 0.0);
        }
        let dense = Config::default_with(&all()[0].overrides(8, 512, 4)).unwrap();
        assert_eq!(dense.moe.expert_widths, vec![512]);
        let hmoe = Config::default_with(&select(&["hmoe-top2".into()]).unwrap()[0].overrides(8, 512, 4)).unwrap();
        assert_eq!(hmoe.moe.expert_widths, vec![36, 44, 52, 60, 68, 76, 84, 92]);
    }

    #[test]
    fn unknown_variant_names_the_known_ones() {
        let e = select(&["hmoe-top3".into()]).unwrap_err().to_string();
        assert!(e.contains("hmoe-top3") && e.contains("moe-top2"), "{e}");
    }
}
