//! The `Backend` trait and its implementations.
