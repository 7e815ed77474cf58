//! Experiments that test the papers' claims in motley, end to end on real text.
//!
//! [`sweep`] trains every variant of the HMoE comparison (papers.md §1) at one FLOP budget,
//! counted from the tokens actually routed to each expert; [`report`] turns the runs into a
//! table and plots; [`routes`] analyses one trained model's routing (which experts, which
//! tokens, how many parameters per token).

pub mod report;
pub mod routes;
pub mod sweep;
pub mod variants;
