//! The one place the LP/MIP solver of MEMO's planners is chosen: good_lp's pure-Rust `microlp`
//! by default, HiGHS with the cargo feature `highs` (a C++ build; faster on the DSA MIP).

#[cfg(feature = "highs")]
pub use good_lp::highs as solver;
#[cfg(not(feature = "highs"))]
pub use good_lp::microlp as solver;

/// Name of the solver in use, for reports and benchmark tables.
pub const NAME: &str = if cfg!(feature = "highs") { "HiGHS" } else { "microlp" };
