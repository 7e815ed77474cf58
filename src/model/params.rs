//! Parameters as one contiguous block with named views (safetensors-friendly), and their
//! deterministic initialisation.

use rayon::prelude::*;

use super::config::{ModelConfig, MoeConfig};
use crate::rng::Rng;

/// How a tensor is initialised.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Ones,
    Normal(f32),
}

/// One named tensor inside the parameter block.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub init: Init,
    /// Whether AdamW's weight decay applies (matrices yes, norm gains no).
    pub decay: bool,
    /// The expert this tensor belongs to; `None` for dense tensors (replicated on every rank).
    pub expert: Option<usize>,
}

impl ParamSpec {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// Offsets of one block's tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockParams {
    pub attn_norm: usize,
    pub wqkv: usize,
    pub wo: usize,
    pub ffn_norm: usize,
    pub router: usize,
    /// Per local expert (see [`ParamLayout::local_experts`]): (gate_up `(2h, C)`, down `(C, h)`).
    pub experts: Vec<(usize, usize)>,
}

/// The layout of every parameter in one block, in a fixed order.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamLayout {
    pub specs: Vec<ParamSpec>,
    pub total: usize,
    pub embedding: usize,
    pub blocks: Vec<BlockParams>,
    pub final_norm: usize,
    pub lm_head: usize,
    /// The experts whose tensors this layout holds (all of them unless sharded for expert
    /// parallelism); `BlockParams::experts[i]` is expert `local_experts.start + i`.
    pub local_experts: std::ops::Range<usize>,
}

impl ParamLayout {
    /// Every parameter of the model.
    pub fn new(m: &ModelConfig, moe: &MoeConfig) -> Self {
        Self::sharded(m, moe, 0..moe.n_experts())
    }

    /// The dense parameters and the experts `local` only (one expert-parallel rank's share).
    /// Tensor names are those of the full layout, so checkpoints restore by name.
    pub fn sharded(m: &ModelConfig, moe: &MoeConfig, local: std::ops::Range<usize>) -> Self {
        let mut specs = Vec::new();
        let mut total = 0;
        let mut push = |name: String, shape: Vec<usize>, init: Init, expert: Option<usize>| {
            let decay = shape.len() > 1;
            let offset = total;
            total += shape.iter().product::<usize>();
            specs.push(ParamSpec { name, shape, offset, init, decay, expert });
            offset
        };
        let (c, d) = (m.d_model, m.head_dim());
        let std = m.init_std;
        // Residual-branch outputs are scaled down so the residual stream's variance stays O(1).
        let out_std = std / (2.0 * m.n_layers as f32).sqrt();
        let embedding = push("tok_embedding".into(), vec![m.vocab_size, c], Init::Normal(std), None);
        let blocks = (0..m.n_layers)
            .map(|l| {
                let p = |s: &str| format!("layers.{l}.{s}");
                let attn_norm = push(p("attn_norm"), vec![c], Init::Ones, None);
                let wqkv = push(p("wqkv"), vec![(m.n_heads + 2 * m.n_kv_heads) * d, c], Init::Normal(std), None);
                let wo = push(p("wo"), vec![c, m.n_heads * d], Init::Normal(out_std), None);
                let ffn_norm = push(p("ffn_norm"), vec![c], Init::Ones, None);
                let router = push(p("router"), vec![moe.n_experts(), c], Init::Normal(std), None);
                let experts = local
                    .clone()
                    .map(|e| {
                        let h = moe.expert_widths[e];
                        let gu = push(p(&format!("experts.{e}.w_gate_up")), vec![2 * h, c], Init::Normal(std), Some(e));
                        let down = push(p(&format!("experts.{e}.w_down")), vec![c, h], Init::Normal(out_std), Some(e));
                        (gu, down)
                    })
                    .collect();
                BlockParams { attn_norm, wqkv, wo, ffn_norm, router, experts }
            })
            .collect();
        let final_norm = push("final_norm".into(), vec![c], Init::Ones, None);
        let lm_head = push("lm_head".into(), vec![m.vocab_size, c], Init::Normal(std), None);
        ParamLayout { specs, total, embedding, blocks, final_norm, lm_head, local_experts: local }
    }

    /// Block `l`'s tensors: they lie back to back, from its attention norm to the next block's
    /// (or the final norm).
    pub fn block_range(&self, l: usize) -> std::ops::Range<usize> {
        self.blocks[l].attn_norm..self.blocks.get(l + 1).map_or(self.final_norm, |b| b.attn_norm)
    }

    pub fn get(&self, name: &str) -> Option<&ParamSpec> {
        self.specs.iter().find(|s| s.name == name)
    }

    /// The parameters as runs of consecutive tensors that `key` gives the same value: each run's
    /// range and key, in layout order (one elementwise launch per run instead of per tensor).
    pub fn runs<K: PartialEq>(&self, key: impl Fn(&ParamSpec) -> K) -> Vec<(std::ops::Range<usize>, K)> {
        let mut runs: Vec<(std::ops::Range<usize>, K)> = Vec::new();
        for spec in &self.specs {
            let k = key(spec);
            match runs.last_mut() {
                Some((r, last)) if *last == k && r.end == spec.offset => r.end = spec.range().end,
                _ => runs.push((spec.range(), k)),
            }
        }
        runs
    }

    /// Host values of every parameter; each tensor draws from its own named stream, so a
    /// tensor's values do not depend on the others, and the tensors are filled in parallel
    /// (a 1B-parameter model takes half a minute on one core).
    pub fn init_values(&self, seed: u64) -> Vec<f32> {
        let mut values = vec![0f32; self.total];
        let mut rest = values.as_mut_slice();
        let mut tensors = Vec::with_capacity(self.specs.len());
        for spec in &self.specs {
            debug_assert_eq!(spec.offset, self.total - rest.len(), "specs are laid out back to back");
            let (dst, tail) = std::mem::take(&mut rest).split_at_mut(spec.len());
            tensors.push((spec, dst));
            rest = tail;
        }
        tensors.into_par_iter().for_each(|(spec, dst)| match spec.init {
            Init::Ones => dst.fill(1.0),
            Init::Normal(std) => {
                let mut rng = Rng::for_stream(seed, &spec.name);
                dst.iter_mut().for_each(|v| *v = (rng.normal() * std as f64) as f32);
            }
        });
        values
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Routing;

    #[test]
    fn runs_cover_the_block_once_with_each_tensors_key() {
        let c = crate::config::Config::default_with(&[]).unwrap();
        let layout = ParamLayout::new(&c.model, &c.moe);
        let runs = layout.runs(|s| s.decay);
        assert!(runs.len() < layout.specs.len());
        assert!(runs.windows(2).all(|w| w[0].0.end == w[1].0.start && w[0].1 != w[1].1), "adjacent runs differ in key");
        assert_eq!((runs[0].0.start, runs.last().unwrap().0.end), (0, layout.total));
        for spec in &layout.specs {
            let run = runs.iter().find(|(r, _)| r.contains(&spec.offset)).unwrap();
            assert!(run.0.end >= spec.range().end && run.1 == spec.decay, "{}", spec.name);
        }
    }

    #[test]
    fn parallel_init_draws_each_tensor_from_its_own_stream() {
        let m = ModelConfig { vocab_size: 40, d_model: 16, n_layers: 2, n_heads: 2, n_kv_heads: 1, seq_len: 8, rope_theta: 1e4, norm_eps: 1e-5, init_std: 0.1 };
        let moe = MoeConfig { expert_widths: vec![8, 24], routing: Routing::TopK, top_k: 1, top_p: 1.0, load_balance: 0.0, p_penalty: 0.0, entropy: 0.0, z_loss: 0.0 };
        let layout = ParamLayout::new(&m, &moe);
        let values = layout.init_values(7);
        for spec in &layout.specs {
            let want: Vec<f32> = match spec.init {
                Init::Ones => vec![1.0; spec.len()],
                Init::Normal(std) => {
                    let mut rng = Rng::for_stream(7, &spec.name);
                    (0..spec.len()).map(|_| (rng.normal() * std as f64) as f32).collect()
                }
            };
            assert_eq!(values[spec.range()], want[..], "{}", spec.name);
        }
    }
}
