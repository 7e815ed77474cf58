//! MoE Parallel Folding: rank mapping, token dispatcher, communicators, cluster planner.

pub mod comm;
pub mod ranks;
