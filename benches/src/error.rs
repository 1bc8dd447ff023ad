//! The library's errors: each names the file or value at fault, on one line.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("model file `{}` does not exist", .0.display())]
    MissingModel(PathBuf),
    #[error("{0}")]
    Runtime(#[from] rocforge_runtime::Error),
    #[error("`{}` is not a valid rocforge-bench result: {problem}", path.display())]
    BadResults { path: PathBuf, problem: String },
    #[error("`{}` is not a valid llama-bench JSON result: {problem}", path.display())]
    BadLlamaBench { path: PathBuf, problem: String },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("`{}`: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("chart: {0}")]
    Chart(String),
}

pub type Result<T, E = BenchError> = std::result::Result<T, E>;

/// Attaches a path to an I/O error.
pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> BenchError {
    let path = path.into();
    move |source| BenchError::Io { path, source }
}
