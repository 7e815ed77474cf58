//! The shapes shared with the PyTorch peer: `bench/cpu_configs.json` and `bench/gpu_configs.json`
//! (torch_hmoe.py's config fields: a LLaMA-style decoder, RMSNorm, RoPE, SwiGLU experts of the
//! given widths, softmax router, top-k).

use motley::model::config::{ModelConfig, MoeConfig, Routing};
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[allow(non_snake_case)]
pub struct Shape {
    pub V: usize,
    pub d: usize,
    pub L: usize,
    pub h: usize,
    pub sizes: Vec<usize>,
    pub k: usize,
    pub B: usize,
    pub T: usize,
}

const CPU: &str = include_str!("../cpu_configs.json");
const GPU: &str = include_str!("../gpu_configs.json");

/// The named shapes of one file, by name (serde_json sorts the keys; keys starting with `_` are
/// comments).
fn parse(json: &str, file: &str) -> Vec<(String, Shape)> {
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(json).unwrap_or_else(|e| panic!("bench/{file}: {e}"));
    map.into_iter()
        .filter(|(k, _)| !k.starts_with('_'))
        .map(|(k, v)| {
            let shape = serde_json::from_value(v).unwrap_or_else(|e| panic!("bench/{file} {k}: {e}"));
            (k, shape)
        })
        .collect()
}

pub fn cpu_shapes() -> Vec<(String, Shape)> {
    parse(CPU, "cpu_configs.json")
}

pub fn gpu_shapes() -> Vec<(String, Shape)> {
    parse(GPU, "gpu_configs.json")
}

/// A shape of either file by name.
pub fn find(name: &str) -> Result<Shape, String> {
    let all: Vec<(String, Shape)> = gpu_shapes().into_iter().chain(cpu_shapes()).collect();
    let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
    all.iter().find(|(n, _)| n == name).map(|(_, s)| s.clone()).ok_or_else(|| format!("--shape {name}: not in bench/gpu_configs.json or bench/cpu_configs.json (shapes: {})", names.join(", ")))
}

impl Shape {
    /// motley's configs for this shape with room for sequences of `seq_len`: the peer's model
    /// (rope θ 10⁴, RMSNorm ε 10⁻⁶, init σ 0.02, softmax top-k router, P-Penalty 0.01 as its aux).
    pub fn configs(&self, seq_len: usize) -> (ModelConfig, MoeConfig) {
        let model = ModelConfig {
            vocab_size: self.V,
            d_model: self.d,
            n_layers: self.L,
            n_heads: self.h,
            n_kv_heads: self.h,
            seq_len,
            rope_theta: 10000.0,
            norm_eps: 1e-6,
            init_std: 0.02,
        };
        let moe = MoeConfig {
            expert_widths: self.sizes.clone(),
            routing: Routing::TopK,
            top_k: self.k,
            top_p: 1.0,
            load_balance: 0.0,
            p_penalty: 0.01,
            entropy: 0.0,
            z_loss: 0.0,
        };
        (model, moe)
    }
}
