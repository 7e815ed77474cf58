//! Training: optimizer, schedule, checkpoints, metrics.
pub mod optim;
