//! MoE Parallel Folding: rank mapping, token dispatcher, communicators, cluster planner.
//!
//! - [`ranks`]: Megatron `RankGenerator` semantics; the attention and MoE layouts of one world.
//! - [`comm`]: the `Communicator` trait, a single-process one and simulated ranks on threads;
//!   `mpi` (feature `mpi`) implements it over MPI.
//! - [`dispatch`]: the MoE token dispatcher (permute → all-to-all over EP → experts → back).
//! - [`sharding`]: experts sharded over EP in training: gradient buckets, global norm, gathering.
//! - [`planner`]: costs and ranks parallel mappings at cluster scale from the same rank mapping.

pub mod comm;
pub mod dispatch;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod planner;
pub mod ranks;
pub mod sharding;
