//! The model as the cost model sees it: shapes that set FLOPs, parameter bytes and activation
//! bytes, and nothing else (no initialisation, no norms' epsilons).
//!
//! Heterogeneous experts are described by their real widths and the share of routed slots each is
//! expected to receive, so that the busiest expert-parallel rank can be costed rather than the mean.

use serde::Serialize;

use crate::model::config::{ModelConfig, MoeConfig, Routing};
use crate::{Error, Result};

/// Attention projections and core, generalised enough to approximate MLA.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Attention {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// Query/key head dimension.
    pub qk_head_dim: usize,
    pub v_head_dim: usize,
    /// All projection weights of one layer (Q, K, V, output, and any low-rank factors).
    pub proj_params: u64,
}

impl Attention {
    /// Grouped-query attention with the usual four projections.
    pub fn gqa(d_model: usize, n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Attention {
        let (q, kv) = ((n_heads * head_dim) as u64, (n_kv_heads * head_dim) as u64);
        let proj_params = d_model as u64 * (q + 2 * kv + q);
        Attention { n_heads, n_kv_heads, qk_head_dim: head_dim, v_head_dim: head_dim, proj_params }
    }

    pub fn q_dim(&self) -> usize {
        self.n_heads * self.qk_head_dim
    }
    pub fn k_dim(&self) -> usize {
        self.n_kv_heads * self.qk_head_dim
    }
    pub fn v_dim(&self) -> usize {
        self.n_kv_heads * self.v_head_dim
    }
    /// Width of the attention output (input of the output projection).
    pub fn o_dim(&self) -> usize {
        self.n_heads * self.v_head_dim
    }
}

/// The routed experts of one MoE layer (every MoE layer of a model is alike).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MoeShape {
    /// SwiGLU hidden width of each routed expert.
    pub widths: Vec<usize>,
    /// Expected share of routed slots per expert; sums to 1.
    pub shares: Vec<f64>,
    /// Experts per token (top-k; for top-p, the expected count).
    pub top_k: f64,
    /// Hidden width of the always-active shared expert(s), 0 if none.
    pub shared_width: usize,
}

impl MoeShape {
    /// Experts with the shares a Switch load-balancing loss aims at: all equal.
    pub fn balanced(widths: Vec<usize>, top_k: f64, shared_width: usize) -> MoeShape {
        let n = widths.len().max(1);
        MoeShape { shares: vec![1.0 / n as f64; widths.len()], widths, top_k, shared_width }
    }

    /// Experts with the shares HMoE's P-Penalty aims at: it penalises `T_i · size_i`, so at
    /// balance every expert does the same work and a token share is ∝ 1 / width.
    pub fn work_balanced(widths: Vec<usize>, top_k: f64, shared_width: usize) -> MoeShape {
        let inv: Vec<f64> = widths.iter().map(|&w| 1.0 / w.max(1) as f64).collect();
        let sum: f64 = inv.iter().sum();
        MoeShape { shares: inv.iter().map(|x| x / sum).collect(), widths, top_k, shared_width }
    }

    pub fn n_experts(&self) -> usize {
        self.widths.len()
    }

    /// Mean width per routed slot, `Σ share_i · width_i`.
    pub fn mean_routed_width(&self) -> f64 {
        self.widths.iter().zip(&self.shares).map(|(&w, &s)| w as f64 * s).sum()
    }

    /// Parameters of all routed experts of one layer.
    pub fn expert_params(&self, d_model: usize) -> u64 {
        self.widths.iter().map(|&w| 3 * (d_model * w) as u64).sum()
    }

    /// Experts `[j·E/ep, (j+1)·E/ep)` of EP rank `j`, as Megatron places local experts.
    pub fn local_experts(&self, ep: usize, j: usize) -> std::ops::Range<usize> {
        let per = self.n_experts() / ep.max(1);
        j * per..(j + 1) * per
    }
}

/// The model: a stack of attention + FFN layers, the first `dense_layers` with a dense FFN of
/// `dense_width`, the rest MoE (or all dense when `moe` is `None`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClusterModel {
    pub name: String,
    pub vocab: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub attention: Attention,
    pub dense_layers: usize,
    pub dense_width: usize,
    pub moe: Option<MoeShape>,
}

/// The preset names [`preset`] knows.
pub const PRESETS: [&str; 11] = [
    "mixtral-8x7b",
    "mixtral-8x22b",
    "qwen2-57b-a14b",
    "deepseek-v3",
    "hmoe-0.4b",
    "hmoe-3b",
    "memo-7b",
    "memo-13b",
    "memo-30b",
    "memo-65b",
    "motley-h100-ref",
];

/// A published model by name (case-insensitive), see [`PRESETS`].
pub fn preset(name: &str) -> Option<ClusterModel> {
    let m = |name: &str, vocab, d, layers, attention, dense_layers, dense_width, moe| ClusterModel {
        name: name.to_string(),
        vocab,
        d_model: d,
        n_layers: layers,
        attention,
        dense_layers,
        dense_width,
        moe,
    };
    // HMoE's arithmetic layout: widths ∝ 9, 11, …, 23 summing to `total`.
    let arithmetic = |total: usize| -> Vec<usize> { (0..8).map(|i| total * (9 + 2 * i) / 128).collect() };
    let dense = |name: &str, d: usize, layers: usize, heads: usize, ffn: usize| {
        m(name, 32000, d, layers, Attention::gqa(d, heads, heads, d / heads), layers, ffn, None)
    };
    Some(match name.to_ascii_lowercase().as_str() {
        "mixtral-8x7b" => m(
            "mixtral-8x7b",
            32000,
            4096,
            32,
            Attention::gqa(4096, 32, 8, 128),
            0,
            0,
            Some(MoeShape::balanced(vec![14336; 8], 2.0, 0)),
        ),
        "mixtral-8x22b" => m(
            "mixtral-8x22b",
            32768,
            6144,
            56,
            Attention::gqa(6144, 48, 8, 128),
            0,
            0,
            Some(MoeShape::balanced(vec![16384; 8], 2.0, 0)),
        ),
        "qwen2-57b-a14b" => m(
            "qwen2-57b-a14b",
            151936,
            3584,
            28,
            Attention::gqa(3584, 28, 4, 128),
            0,
            0,
            Some(MoeShape::balanced(vec![2560; 64], 8.0, 20480)),
        ),
        "deepseek-v3" => m("deepseek-v3", 129280, 7168, 61, mla_as_mha(), 3, 18432, Some(MoeShape::balanced(vec![2048; 256], 8.0, 2048))),
        "hmoe-0.4b" => m(
            "hmoe-0.4b",
            32000,
            768,
            12,
            Attention::gqa(768, 12, 12, 64),
            0,
            0,
            Some(MoeShape::work_balanced(arithmetic(12288), 2.0, 0)),
        ),
        "hmoe-3b" => m(
            "hmoe-3b",
            32000,
            1024,
            12,
            Attention::gqa(1024, 16, 16, 64),
            0,
            0,
            Some(MoeShape::work_balanced((0..8).map(|i| 2304 + 512 * i).collect(), 2.0, 0)),
        ),
        "memo-7b" => dense("memo-7b", 4096, 32, 32, 11008),
        "memo-13b" => dense("memo-13b", 5120, 40, 40, 13824),
        "memo-30b" => dense("memo-30b", 6656, 60, 52, 17920),
        "memo-65b" => dense("memo-65b", 8192, 80, 64, 22016),
        "motley-h100-ref" => m(
            "motley-h100-ref",
            32768,
            1024,
            12,
            Attention::gqa(1024, 16, 16, 64),
            0,
            0,
            Some(MoeShape::work_balanced((0..8).map(|i| 1024 + 512 * i).collect(), 2.0, 0)),
        ),
        _ => return None,
    })
}

/// DeepSeek-V3's multi-head latent attention costed as MHA over 128 heads with query/key head
/// dimension 192 (128 + 64 RoPE) and value head dimension 128; the projection parameters are MLA's
/// real low-rank factors (q: 7168→1536→128·192, kv: 7168→512+64, 512→128·(128+128), out 128·128→7168).
/// The activations of the compressed latents are not modelled separately.
fn mla_as_mha() -> Attention {
    let (d, heads) = (7168u64, 128u64);
    let proj_params =
        d * 1536 + 1536 * heads * 192 + d * (512 + 64) + 512 * heads * (128 + 128) + heads * 128 * d;
    Attention { n_heads: 128, n_kv_heads: 128, qk_head_dim: 192, v_head_dim: 128, proj_params }
}

impl ClusterModel {
    /// The model a motley config trains. One expert width is a dense FFN. The expected shares
    /// follow the auxiliary loss: with a P-Penalty (`p_penalty > 0`) work-balanced
    /// ([`MoeShape::work_balanced`]), otherwise equal. Top-P routing activates a data-dependent
    /// number of experts; it is costed as `top_k` experts, so set `top_k` to the expected count.
    pub fn from_config(model: &ModelConfig, moe: &MoeConfig) -> Result<ClusterModel> {
        model.validate()?;
        moe.validate()?;
        let attention = Attention::gqa(model.d_model, model.n_heads, model.n_kv_heads, model.head_dim());
        let base = ClusterModel {
            name: "config".into(),
            vocab: model.vocab_size,
            d_model: model.d_model,
            n_layers: model.n_layers,
            attention,
            dense_layers: 0,
            dense_width: 0,
            moe: None,
        };
        if moe.n_experts() == 1 {
            return Ok(ClusterModel { dense_layers: model.n_layers, dense_width: moe.expert_widths[0], ..base });
        }
        if moe.routing == Routing::TopP && (moe.top_k == 0 || moe.top_k > moe.n_experts()) {
            return Err(Error::config(
                "moe.top_k",
                moe.top_k,
                "with top_p routing, the expected number of experts per token (1..=n_experts), which the planner costs",
            ));
        }
        let widths = moe.expert_widths.clone();
        let k = moe.top_k as f64;
        let shape =
            if moe.p_penalty > 0.0 { MoeShape::work_balanced(widths, k, 0) } else { MoeShape::balanced(widths, k, 0) };
        Ok(ClusterModel { moe: Some(shape), ..base })
    }

    /// Checks what the cost model divides by or indexes with.
    pub fn validate(&self) -> Result<()> {
        let a = &self.attention;
        for (field, v) in [
            ("vocab", self.vocab),
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("n_heads", a.n_heads),
            ("n_kv_heads", a.n_kv_heads),
            ("qk_head_dim", a.qk_head_dim),
            ("v_head_dim", a.v_head_dim),
        ] {
            if v == 0 {
                return Err(Error::config(format!("model.{field}"), 0, "a positive integer"));
            }
        }
        if self.dense_layers > self.n_layers || (self.dense_layers > 0 && self.dense_width == 0) {
            return Err(Error::Invalid(format!(
                "model {}: {} dense layers of width {} in {} layers",
                self.name, self.dense_layers, self.dense_width, self.n_layers
            )));
        }
        match &self.moe {
            None if self.dense_layers != self.n_layers => Err(Error::Invalid(format!(
                "model {}: without experts every layer must be dense ({} of {})",
                self.name, self.dense_layers, self.n_layers
            ))),
            Some(m) => {
                let sum: f64 = m.shares.iter().sum();
                if m.widths.is_empty() || m.widths.contains(&0) || m.shares.len() != m.widths.len() {
                    return Err(Error::config("moe.widths", format!("{:?}", m.widths), "positive widths, one share each"));
                }
                if m.shares.iter().any(|s| !(s.is_finite() && *s >= 0.0)) || (sum - 1.0).abs() > 1e-6 {
                    return Err(Error::config("moe.shares", format!("{:?}", m.shares), "non-negative shares summing to 1"));
                }
                if !(m.top_k >= 1.0 && m.top_k <= m.n_experts() as f64) {
                    return Err(Error::config("moe.top_k", m.top_k, "between 1 and the number of experts"));
                }
                Ok(())
            }
            None => Ok(()),
        }
    }

    pub fn n_moe_layers(&self) -> usize {
        if self.moe.is_some() {
            self.n_layers - self.dense_layers
        } else {
            0
        }
    }

    /// Dense (non-expert) parameters of one layer: attention, norms, dense FFN or shared expert
    /// and router.
    pub fn layer_dense_params(&self, moe_layer: bool) -> u64 {
        let d = self.d_model as u64;
        let ffn = match (&self.moe, moe_layer) {
            (Some(m), true) => 3 * d * m.shared_width as u64 + d * m.n_experts() as u64,
            _ => 3 * d * self.dense_width as u64,
        };
        self.attention.proj_params + 2 * d + ffn
    }

    /// Input embedding or output head parameters (untied).
    pub fn embedding_params(&self) -> u64 {
        (self.vocab * self.d_model) as u64
    }

    /// All parameters.
    pub fn total_params(&self) -> u64 {
        let experts = self.moe.as_ref().map_or(0, |m| m.expert_params(self.d_model));
        let moe_layers = self.n_moe_layers() as u64;
        let dense_layers = (self.n_layers - self.n_moe_layers()) as u64;
        2 * self.embedding_params()
            + dense_layers * self.layer_dense_params(false)
            + moe_layers * (self.layer_dense_params(true) + experts)
    }

    /// Model FLOPs of a forward over `tokens` tokens in sequences of `seq` (causal attention
    /// counted at half the square), the numerator of MFU (×3 for forward + backward).
    pub fn forward_flops(&self, tokens: f64, seq: f64) -> f64 {
        let d = self.d_model as f64;
        let a = &self.attention;
        let attn = 2.0 * a.proj_params as f64 + 2.0 * seq / 2.0 * (a.q_dim() + a.o_dim()) as f64;
        let dense_ffn = 6.0 * d * self.dense_width as f64;
        let moe_ffn = self.moe.as_ref().map_or(0.0, |m| {
            6.0 * d * (m.top_k * m.mean_routed_width() + m.shared_width as f64) + 2.0 * d * m.n_experts() as f64
        });
        let n_moe = self.n_moe_layers() as f64;
        let n_dense = self.n_layers as f64 - n_moe;
        tokens * (self.n_layers as f64 * attn + n_dense * dense_ffn + n_moe * moe_ffn + 2.0 * d * self.vocab as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn billions(x: u64) -> f64 {
        x as f64 / 1e9
    }

    /// Total parameter counts against the published ones (embeddings included), within 3 %.
    #[test]
    fn preset_sizes_match_published_totals() {
        for (name, published) in [
            ("mixtral-8x7b", 46.7),
            ("mixtral-8x22b", 141.0),
            ("qwen2-57b-a14b", 57.4),
            ("deepseek-v3", 671.0),
            ("memo-7b", 6.7),
            ("memo-65b", 65.2),
        ] {
            let m = preset(name).unwrap();
            m.validate().unwrap();
            let got = billions(m.total_params());
            assert!((got / published - 1.0).abs() < 0.03, "{name}: {got:.1} B vs {published} B");
        }
    }

    #[test]
    fn every_preset_is_valid_and_known_names_only() {
        for name in PRESETS {
            preset(name).unwrap().validate().unwrap();
        }
        assert!(preset("gpt-5").is_none());
        assert_eq!(preset("Mixtral-8x7B").unwrap().name, "mixtral-8x7b");
    }

    #[test]
    fn hmoe_widths_are_the_papers() {
        let m = preset("hmoe-3b").unwrap().moe.unwrap();
        assert_eq!(m.widths.iter().sum::<usize>(), 32768);
        let m = preset("hmoe-0.4b").unwrap().moe.unwrap();
        assert_eq!(m.widths.iter().sum::<usize>(), 12288);
        assert_eq!(m.widths[0] * 23, m.widths[7] * 9);
        // Work-balanced shares: every expert gets the same share × width.
        let work: Vec<f64> = m.widths.iter().zip(&m.shares).map(|(&w, s)| w as f64 * s).collect();
        assert!(work.iter().all(|w| (w / work[0] - 1.0).abs() < 1e-9));
    }

    #[test]
    fn from_config_reads_widths_and_routing() {
        let model = ModelConfig {
            vocab_size: 32768,
            d_model: 1024,
            n_layers: 12,
            n_heads: 16,
            n_kv_heads: 16,
            seq_len: 4096,
            rope_theta: 1e4,
            norm_eps: 1e-5,
            init_std: 0.02,
        };
        let moe = MoeConfig {
            expert_widths: (0..8).map(|i| 1024 + 512 * i).collect(),
            routing: Routing::TopK,
            top_k: 2,
            top_p: 0.6,
            load_balance: 0.0,
            p_penalty: 0.1,
            entropy: 0.0,
            z_loss: 0.0,
        };
        let c = ClusterModel::from_config(&model, &moe).unwrap();
        let reference = preset("motley-h100-ref").unwrap();
        assert_eq!(c.moe, reference.moe);
        assert_eq!(c.total_params(), reference.total_params());
        let dense = MoeConfig { expert_widths: vec![4096], top_k: 1, ..moe };
        let c = ClusterModel::from_config(&model, &dense).unwrap();
        assert!(c.moe.is_none() && c.dense_layers == 12 && c.dense_width == 4096);
    }
}
