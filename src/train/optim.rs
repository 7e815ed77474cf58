//! AdamW over the parameter block, with global-norm gradient clipping. Moments live in two
//! buffers laid out like the parameters (so checkpoints save them as named tensors too).

use crate::backend::{AdamW, Backend};
use crate::model::params::ParamLayout;
use crate::model::weights::Weights;

/// AdamW hyper-parameters that stay fixed during a run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Clip the global gradient norm to this value (0 = no clipping).
    pub grad_clip: f32,
}

pub struct Optimizer<B: Backend> {
    pub config: AdamWConfig,
    pub m: B::Buf,
    pub v: B::Buf,
    /// Updates applied so far.
    pub step: u64,
}

impl<B: Backend> Optimizer<B> {
    pub fn new(be: &B, config: AdamWConfig, n_params: usize) -> Self {
        Optimizer { config, m: be.alloc_f32(n_params), v: be.alloc_f32(n_params), step: 0 }
    }

    /// Clips the gradients to the global norm and applies one update at `lr`.
    /// Returns the gradient norm before clipping.
    pub fn update(&mut self, be: &B, layout: &ParamLayout, params: &mut Weights<B>, grads: &B::Buf, lr: f32) -> f32 {
        let norm = be.sum_squares(B::full(grads)).sqrt() as f32;
        self.update_with_norm(be, layout, params, grads, lr, norm);
        norm
    }

    /// One update with the global gradient norm given (when `grads` is a shard of the model's
    /// gradient, the norm covers all shards).
    pub fn update_with_norm(&mut self, be: &B, layout: &ParamLayout, params: &mut Weights<B>, grads: &B::Buf, lr: f32, norm: f32) {
        let clip = self.config.grad_clip;
        let grad_scale = if clip > 0.0 && norm > clip { clip / norm } else { 1.0 };
        self.step += 1;
        let hp = AdamW { lr, beta1: self.config.beta1, beta2: self.config.beta2, eps: self.config.eps, weight_decay: self.config.weight_decay, step: self.step };
        for (r, decay) in decay_runs(layout) {
            let (master, work) = params.range_mut(r.clone());
            be.adamw(master, work, B::view_mut(&mut self.m, r.clone()), B::view_mut(&mut self.v, r.clone()), B::view(grads, r), hp, grad_scale, decay);
        }
    }
}

/// The parameter block as runs of consecutive tensors that share their weight decay: one AdamW
/// launch per run instead of per tensor (H100-ref: 51 instead of 255; the update is elementwise,
/// so the results are the same).
fn decay_runs(layout: &ParamLayout) -> Vec<(std::ops::Range<usize>, bool)> {
    let mut runs: Vec<(std::ops::Range<usize>, bool)> = Vec::new();
    for spec in &layout.specs {
        match runs.last_mut() {
            Some((r, decay)) if *decay == spec.decay && r.end == spec.offset => r.end = spec.range().end,
            _ => runs.push((spec.range(), spec.decay)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn decay_runs_cover_the_block_once_with_each_tensors_decay() {
        let c = Config::default_with(&[]).unwrap();
        let layout = ParamLayout::new(&c.model, &c.moe);
        let runs = decay_runs(&layout);
        assert!(runs.len() < layout.specs.len());
        assert!(runs.windows(2).all(|w| w[0].0.end == w[1].0.start && w[0].1 != w[1].1), "adjacent runs differ in decay");
        assert_eq!((runs[0].0.start, runs.last().unwrap().0.end), (0, layout.total));
        for spec in &layout.specs {
            let run = runs.iter().find(|(r, _)| r.contains(&spec.offset)).unwrap();
            assert!(run.0.end >= spec.range().end && run.1 == spec.decay, "{}", spec.name);
        }
    }
}
