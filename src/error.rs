//! The library's error type: every variant carries the file, field or value it is about,
//! so the binary can print one line that tells the user what to fix.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration field or command-line flag with a bad value: names it, the value and
    /// what is allowed (`model.d_model = 130: ...`, `--gpu = "tpu": ...`).
    #[error("{}{field}` = {value}: {allowed}", if field.starts_with('-') { "option `" } else { "config field `" })]
    Config { field: String, value: String, allowed: String },
    /// A file that exists but whose content is wrong (bad magic, truncated, wrong shapes, ...).
    #[error("{}: {reason}", path.display())]
    BadFile { path: PathBuf, reason: String },
    /// An I/O failure on a named path.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, #[source] source: std::io::Error },
    /// Training produced a non-finite value; nothing is written after this.
    #[error("step {step}: {what} is not finite ({value}); stopping without writing a checkpoint")]
    NonFinite { step: u64, what: String, value: f32 },
    /// Any other invalid request, with a sentence that says what to do.
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn config(field: impl Into<String>, value: impl std::fmt::Display, allowed: impl Into<String>) -> Self {
        Error::Config { field: field.into(), value: value.to_string(), allowed: allowed.into() }
    }
    pub fn bad_file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::BadFile { path: path.into(), reason: reason.into() }
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
