//! JLCM weight compression and its baselines (RTN, k-means).
//!
//! Matrix-level API: a weight matrix is a row-major f32 [`Matrix`] (`rows × cols`, `y = W x`),
//! calibration inputs are `n × cols`, summarised by their [`Hessian`]. Each compressor returns a
//! [`CompressedMatrix`] (or an [`RtnMatrix`]) that decodes to a dense matrix; [`CompressedFile`]
//! stores many of them in one safetensors file; [`relative_output_error`] scores any of them.
//!
//! Model-level API: [`compress_model`] compresses every weight matrix of a [`Model`](crate::model::Model)
//! (calibrated by [`calib`]), [`decompress_to_values`] turns the file back into a parameter
//! vector, and [`checkpoint`] reads a training checkpoint and writes / loads a compressed
//! checkpoint directory (the body of `motley compress`).

pub mod bitpack;
pub mod bits;
pub mod calib;
pub mod checkpoint;
pub mod eval;
pub mod format;
pub mod jlcm;
pub mod kmeans;
pub mod matrix;
pub mod model;
pub mod rtn;
pub mod share;
pub mod synth;

pub use eval::relative_output_error;
pub use format::{bits_per_weight, CodebookDtype, CompressedFile, CompressedMatrix, DenseTensor, Method, RowGroup, RowOrder};
pub use jlcm::{compress_jlcm, group_rows, CodebookKind, JlcmConfig, JlcmOutput, RowGrouping};
pub use kmeans::{kmeans, quantize_kmeans, KMeans, KMeansConfig, KMeansQuantConfig};
pub use matrix::{Hessian, Matrix};
pub use model::{compress_model, decompress_to_values, Embeddings, ExpertBits, ModelCompressConfig};
pub use checkpoint::{load_compressed_model, run_compress, CompressArgs, CompressReport};
pub use rtn::{quantize_rtn, RtnConfig, RtnMatrix};
