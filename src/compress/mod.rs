//! JLCM weight compression and its baselines (RTN, k-means).
//!
//! Matrix-level API: a weight matrix is a row-major f32 [`Matrix`] (`rows × cols`, `y = W x`),
//! calibration inputs are `n × cols`, summarised by their [`Hessian`]. Each compressor returns a
//! [`CompressedMatrix`] (or an [`RtnMatrix`]) that decodes to a dense matrix; [`CompressedFile`]
//! stores many of them in one safetensors file; [`relative_output_error`] scores any of them.

pub mod bitpack;
pub mod bits;
pub mod eval;
pub mod format;
pub mod jlcm;
pub mod kmeans;
pub mod matrix;
pub mod rtn;
pub mod synth;

pub use eval::relative_output_error;
pub use format::{bits_per_weight, CodebookDtype, CompressedFile, CompressedMatrix, DenseTensor, Method, RowGroup, RowOrder};
pub use jlcm::{compress_jlcm, group_rows, CodebookKind, JlcmConfig, JlcmOutput, RowGrouping};
pub use kmeans::{kmeans, quantize_kmeans, KMeans, KMeansConfig, KMeansQuantConfig};
pub use matrix::{Hessian, Matrix};
pub use rtn::{quantize_rtn, RtnConfig, RtnMatrix};
