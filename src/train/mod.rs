//! Training: optimizer, schedule, checkpoints, metrics.
