//! MEMO: the activation store with per-layer keep / offload α / recompute policies, the host
//! tier, skeletal inventories, the α LP, transient memory planning, the planned transient arena
//! and the `plan-memory` report.

pub mod alpha;
pub mod arena;
pub mod auto;
pub mod host;
pub mod inventory;
pub mod plan;
pub mod policy;
pub mod report;
pub mod solver;
pub mod store;
pub mod transients;
