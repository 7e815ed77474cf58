//! motley: train, scale and compress heterogeneous Mixture-of-Experts language models.
//!
//! One home per concern:
//! - [`backend`]: the `Backend` trait (every op as a forward/backward pair) and its CPU implementation.
//! - [`model`]: the LLaMA-style decoder with heterogeneous MoE layers (HMoE), router and aux losses.
//! - [`memory`]: the activation store (MEMO keep / offload / recompute), memory planning, arena.
//! - [`parallel`]: MoE Parallel Folding: rank mapping, token dispatcher, communicators, cluster planner.
//! - [`compress`]: JLCM codebook compression and its baselines.
//! - [`train`]: optimizer, schedule, checkpoints, metrics.
//! - [`data`]: tokenizer and token shards.
//! - [`experiment`]: the HMoE sweep (equal FLOPs, several variants and seeds) and routing analytics.
//! - [`cli`]: the `motley` command line.

pub mod backend;
pub mod cli;
pub mod compress;
pub mod config;
pub mod data;
pub mod error;
pub mod experiment;
pub mod memory;
pub mod model;
pub mod parallel;
pub mod rng;
pub mod train;

pub use error::{Error, Result};
