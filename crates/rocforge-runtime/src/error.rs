//! The runtime's error type. Every variant names what it is about (file, tensor, key,
//! backend) so a user sees one clear line.

use std::path::PathBuf;

pub use crate::gguf::GgufError;
pub use crate::tokenizer::TokenizerError;

/// Errors from loading a model, building a backend or generating.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: unsupported architecture `{arch}` (ROCforge runs: {supported})")]
    UnsupportedArchitecture {
        path: PathBuf,
        arch: String,
        supported: &'static str,
    },
    #[error("{path}: metadata `{key}`: {problem}")]
    Metadata {
        path: PathBuf,
        key: String,
        problem: String,
    },
    #[error("{path}: tensor `{name}`: {problem}")]
    Tensor {
        path: PathBuf,
        name: String,
        problem: String,
    },
    #[error("{path}: tokenizer: {source}")]
    Tokenizer {
        path: PathBuf,
        #[source]
        source: TokenizerError,
    },
    #[error("tokenizer: {0}")]
    Tokenize(#[from] TokenizerError),
    #[error("backend `{backend}`: {problem}")]
    Backend { backend: String, problem: String },
    #[error("context full: {needed} positions needed, the session holds {capacity} (raise --ctx)")]
    ContextFull { needed: usize, capacity: usize },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A setting outside its allowed range; `name` is the setting (`temperature`, `ctx`...).
    #[error("{name} = {value} is out of range (allowed: {allowed})")]
    OutOfRange {
        name: String,
        value: String,
        allowed: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
