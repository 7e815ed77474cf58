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
        // One launch per run of tensors sharing their weight decay (H100-ref: 51 instead of 255;
        // the update is elementwise, so the results are the same).
        for (r, decay) in layout.runs(|spec| spec.decay) {
            let (master, work) = params.range_mut(r.clone());
            be.adamw(master, work, B::view_mut(&mut self.m, r.clone()), B::view_mut(&mut self.v, r.clone()), B::view(grads, r), hp, grad_scale, decay);
        }
    }
}
