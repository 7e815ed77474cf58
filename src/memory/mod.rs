//! MEMO: the activation store, swap/recompute policies, memory planning and the arena.

pub mod alpha;
pub mod host;
pub mod plan;
pub mod store;
