//! Training: the loop, optimizer, LR schedule, checkpoints, metrics, plots and progress reporting.

pub mod checkpoint;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod progress;
pub mod schedule;
pub mod trainer;
