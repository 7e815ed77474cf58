//! Model shape: the `[model]` and `[moe]` config sections, and expert-width layouts.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The `[model]` section: a LLaMA-style decoder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention); equal to `n_heads` for plain multi-head attention.
    pub n_kv_heads: usize,
    /// Longest context the model is trained on.
    pub seq_len: usize,
    pub rope_theta: f32,
    pub norm_eps: f32,
    /// Standard deviation of the normal initialisation of every matrix.
    pub init_std: f32,
}

/// How a token picks its experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Routing {
    /// The `top_k` most probable experts, gates renormalised over them.
    TopK,
    /// The smallest prefix of experts (by descending probability) whose mass reaches `top_p`.
    TopP,
}

/// The `[moe]` section: expert widths, routing and auxiliary-loss coefficients.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeConfig {
    /// Hidden width of each expert's SwiGLU FFN. One entry is a dense FFN.
    pub expert_widths: Vec<usize>,
    pub routing: Routing,
    pub top_k: usize,
    pub top_p: f32,
    /// Switch load balance `N Σ T_i P̂_i` (homogeneous baseline; paper 1e-2).
    pub load_balance: f32,
    /// HMoE parameter penalty `N Σ T_i size_i P̂_i`, size_i = h_i / mean h (paper 0.1).
    pub p_penalty: f32,
    /// Mean routing entropy `−Σ P log P` per token, minimised (Top-P runs; paper 3e-2).
    pub entropy: f32,
    /// Router z-loss `mean(logsumexp(logits)²)`.
    pub z_loss: f32,
}

/// Named expert-width layouts from the HMoE paper, scaled to a total width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WidthLayout {
    /// All experts the same width.
    Homogeneous,
    /// Widths ∝ n+1, n+3, …, 3n−1 ({9, 11, …, 23} for 8 experts).
    Arithmetic,
    /// Widths ∝ 1, 2, 4, …, 2^(n−1).
    Geometric,
    /// Widths ∝ {1,1,1,1,2,2,4,4} for 8 experts: halves of equal width doubling per step.
    Hybrid,
}

impl WidthLayout {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "homogeneous" => Self::Homogeneous,
            "arithmetic" => Self::Arithmetic,
            "geometric" => Self::Geometric,
            "hybrid" => Self::Hybrid,
            other => {
                return Err(Error::config(
                    "moe.layout",
                    format!("\"{other}\""),
                    "one of \"homogeneous\", \"arithmetic\", \"geometric\", \"hybrid\"",
                ))
            }
        })
    }

    fn relative_sizes(self, n: usize) -> Vec<f64> {
        match self {
            Self::Homogeneous => vec![1.0; n],
            Self::Arithmetic => (0..n).map(|i| (n + 1 + 2 * i) as f64).collect(),
            Self::Geometric => (0..n).map(|i| (1u64 << i.min(62)) as f64).collect(),
            Self::Hybrid => {
                // Halve what is left at each size, doubling the size; the last two share the top size.
                let (mut out, mut size) = (Vec::with_capacity(n), 1.0);
                while out.len() < n {
                    let left = n - out.len();
                    let take = if left <= 2 { left } else { left / 2 };
                    out.extend(std::iter::repeat_n(size, take));
                    size *= 2.0;
                }
                out
            }
        }
    }

    /// `n` widths in this layout summing exactly to `total`, each a multiple of `granule`
    /// (rounding error goes to the largest expert).
    pub fn widths(self, n: usize, total: usize, granule: usize) -> Result<Vec<usize>> {
        if n == 0 || total < n * granule {
            return Err(Error::Invalid(format!(
                "cannot lay out {n} experts in a total width of {total} with granule {granule}"
            )));
        }
        let rel = self.relative_sizes(n);
        let sum: f64 = rel.iter().sum();
        let mut widths: Vec<usize> = rel
            .iter()
            .map(|r| (((r / sum) * total as f64 / granule as f64).round() as usize).max(1) * granule)
            .collect();
        let assigned: usize = widths.iter().sum();
        let last = widths.len() - 1;
        if assigned > total {
            let excess = assigned - total;
            if widths[last] <= excess {
                return Err(Error::Invalid(format!("total width {total} too small for layout {self:?}")));
            }
            widths[last] -= excess;
        } else {
            widths[last] += total - assigned;
        }
        Ok(widths)
    }
}

impl ModelConfig {
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("model.vocab_size", self.vocab_size),
            ("model.d_model", self.d_model),
            ("model.n_layers", self.n_layers),
            ("model.n_heads", self.n_heads),
            ("model.n_kv_heads", self.n_kv_heads),
            ("model.seq_len", self.seq_len),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(Error::config(field, v, "a positive integer"));
            }
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(Error::config(
                "model.d_model",
                self.d_model,
                format!("a multiple of model.n_heads = {}", self.n_heads),
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(Error::config(
                "model.d_model",
                self.d_model,
                format!("d_model / n_heads must be even for rotary embeddings (got {})", self.head_dim()),
            ));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(Error::config(
                "model.n_kv_heads",
                self.n_kv_heads,
                format!("a divisor of model.n_heads = {}", self.n_heads),
            ));
        }
        for (field, v) in [("model.rope_theta", self.rope_theta), ("model.norm_eps", self.norm_eps), ("model.init_std", self.init_std)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(Error::config(field, v, "a positive finite number"));
            }
        }
        Ok(())
    }
}

impl MoeConfig {
    pub fn n_experts(&self) -> usize {
        self.expert_widths.len()
    }

    /// Relative size of each expert, h_i / mean h (1 for every expert when homogeneous).
    pub fn relative_sizes(&self) -> Vec<f32> {
        let mean = self.expert_widths.iter().sum::<usize>() as f32 / self.n_experts() as f32;
        self.expert_widths.iter().map(|&h| h as f32 / mean).collect()
    }

    pub fn validate(&self) -> Result<()> {
        if self.expert_widths.is_empty() {
            return Err(Error::config("moe.expert_widths", "[]", "a non-empty list of expert widths"));
        }
        if let Some(w) = self.expert_widths.iter().find(|&&w| w == 0) {
            return Err(Error::config("moe.expert_widths", w, "every width positive"));
        }
        match self.routing {
            Routing::TopK => {
                if self.top_k == 0 || self.top_k > self.n_experts() {
                    return Err(Error::config(
                        "moe.top_k",
                        self.top_k,
                        format!("between 1 and the number of experts ({})", self.n_experts()),
                    ));
                }
            }
            Routing::TopP => {
                if !(self.top_p > 0.0 && self.top_p <= 1.0) {
                    return Err(Error::config("moe.top_p", self.top_p, "a number in (0, 1]"));
                }
            }
        }
        for (field, v) in [
            ("moe.load_balance", self.load_balance),
            ("moe.p_penalty", self.p_penalty),
            ("moe.entropy", self.entropy),
            ("moe.z_loss", self.z_loss),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::config(field, v, "a finite number ≥ 0"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_layouts_for_eight_experts() {
        assert_eq!(WidthLayout::Arithmetic.widths(8, 128, 1).unwrap(), vec![9, 11, 13, 15, 17, 19, 21, 23]);
        assert_eq!(WidthLayout::Geometric.widths(8, 255, 1).unwrap(), vec![1, 2, 4, 8, 16, 32, 64, 128]);
        assert_eq!(WidthLayout::Hybrid.widths(8, 16, 1).unwrap(), vec![1, 1, 1, 1, 2, 2, 4, 4]);
        assert_eq!(WidthLayout::Homogeneous.widths(8, 2048, 16).unwrap(), vec![256; 8]);
    }

    #[test]
    fn layouts_keep_the_total() {
        for layout in [WidthLayout::Arithmetic, WidthLayout::Geometric, WidthLayout::Hybrid, WidthLayout::Homogeneous] {
            for (n, total) in [(8, 2048), (4, 1000), (6, 1536), (2, 64)] {
                let w = layout.widths(n, total, 8).unwrap();
                assert_eq!(w.iter().sum::<usize>(), total, "{layout:?} n={n}");
                assert_eq!(w.len(), n);
            }
        }
    }
}
