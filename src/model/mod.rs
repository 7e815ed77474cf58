//! The heterogeneous-MoE decoder (HMoE): layers, router, losses.
pub mod config;
pub mod routing;
