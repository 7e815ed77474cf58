//! Helpers shared by the bench targets. Each bench includes this folder as `mod common;`, and
//! not every bench uses every helper.
#![allow(dead_code)]

pub mod args;
pub mod child;
pub mod compare;
pub mod device;
pub mod shapes;
pub mod step;
