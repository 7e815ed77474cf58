//! Learning-rate schedule: linear warmup from lr/warmup to lr, then cosine decay to
//! `min_lr` at the last step (or constant `lr`). Warmup avoids large early Adam steps
//! while the second-moment estimates are still noisy.

use std::f64::consts::PI;

use crate::config::{Schedule, TrainConfig};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    pub lr: f32,
    pub min_lr: f32,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub kind: Schedule,
}

impl LrSchedule {
    pub fn from_config(train: &TrainConfig) -> Self {
        Self { lr: train.lr, min_lr: train.min_lr, warmup_steps: train.warmup_steps, total_steps: train.steps, kind: train.schedule }
    }

    /// The learning rate for 0-based `step`.
    pub fn lr_at(&self, step: u64) -> f32 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f32 / self.warmup_steps as f32;
        }
        match self.kind {
            Schedule::Constant => self.lr,
            Schedule::Cosine => {
                let span = self.total_steps.saturating_sub(1).saturating_sub(self.warmup_steps).max(1);
                let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
                let cos = 0.5 * (1.0 + (PI * progress).cos());
                self.min_lr + (cos as f32) * (self.lr - self.min_lr)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: Schedule) -> LrSchedule {
        LrSchedule { lr: 1.0, min_lr: 0.1, warmup_steps: 10, total_steps: 110, kind }
    }

    #[test]
    fn warmup_is_linear_and_reaches_lr() {
        let s = sched(Schedule::Cosine);
        assert!((s.lr_at(0) - 0.1).abs() < 1e-6);
        assert!((s.lr_at(4) - 0.5).abs() < 1e-6);
        assert!((s.lr_at(9) - 1.0).abs() < 1e-6);
        assert!((s.lr_at(10) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn cosine_decays_monotonically_to_min_lr() {
        let s = sched(Schedule::Cosine);
        let lrs: Vec<f32> = (10..110).map(|t| s.lr_at(t)).collect();
        assert!(lrs.windows(2).all(|w| w[1] <= w[0]));
        assert!((s.lr_at(109) - 0.1).abs() < 1e-6, "last step at min_lr: {}", s.lr_at(109));
        assert!((s.lr_at(59) - 0.55).abs() < 0.01, "halfway at the mean: {}", s.lr_at(59));
        assert!((s.lr_at(500) - 0.1).abs() < 1e-6, "clamped past the end");
    }

    #[test]
    fn constant_after_warmup_and_no_warmup() {
        let s = sched(Schedule::Constant);
        assert_eq!(s.lr_at(50), 1.0);
        assert_eq!(s.lr_at(109), 1.0);
        let s = LrSchedule { warmup_steps: 0, ..sched(Schedule::Cosine) };
        assert_eq!(s.lr_at(0), 1.0);
        let one = LrSchedule { warmup_steps: 0, total_steps: 1, ..sched(Schedule::Cosine) };
        assert_eq!(one.lr_at(0), 1.0);
    }
}
