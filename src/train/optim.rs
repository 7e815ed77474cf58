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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;
    use crate::config::Config;
    use crate::model::Model;

    /// Global-norm clipping scales the gradient by clip / norm before the moments see it: one
    /// step from zero moments leaves m = (1 − β1)·g·scale and v = (1 − β2)·(g·scale)², whatever
    /// AdamW's own scale invariance makes of the parameters (a wrong scale moves them little).
    #[test]
    fn clipping_scales_the_gradient_the_moments_see() {
        let be = Cpu::new(1);
        let c = Config::default_with(&[]).unwrap();
        let mut model = Model::new(&be, c.model.clone(), c.moe.clone(), 1).unwrap();
        let n = model.n_params();
        let mut grads = be.alloc_f32(n);
        be.upload(Cpu::full_mut(&mut grads), &vec![0.5; n]);
        let norm = 0.5 * (n as f32).sqrt();
        for (clip, scale) in [(1.0, 1.0 / norm), (0.0, 1.0), (2.0 * norm, 1.0)] {
            let config = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, grad_clip: clip };
            let mut opt = Optimizer::new(&be, config, n);
            let got = opt.update(&be, &model.layout, &mut model.params, &grads, 1e-3);
            assert!((got - norm).abs() <= 1e-4 * norm, "norm {got}, want {norm}");
            let g = 0.5 * scale;
            let (m, v) = (be.download(Cpu::full(&opt.m)), be.download(Cpu::full(&opt.v)));
            assert!(m.iter().all(|&x| (x - 0.1 * g).abs() <= 1e-6 * g), "clip {clip}: m {} want {}", m[0], 0.1 * g);
            assert!(v.iter().all(|&x| (x - 0.001 * g * g).abs() <= 1e-5 * g * g), "clip {clip}: v {} want {}", v[0], 0.001 * g * g);
        }
    }
}
