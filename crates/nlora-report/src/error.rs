use std::path::PathBuf;

use nlora_math::MathError;
use nlora_train::TrainError;

pub type Result<T, E = ReportError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("no run directories given: pass one or more folders written by `nlora run`")]
    NoRuns,
    #[error("{}: not a run directory ({reason}); give folders written by `nlora run`", path.display())]
    NotARunDir { path: PathBuf, reason: String },
    #[error("--tasks {given}: {reason}")]
    BadTasks { given: String, reason: String },
    #[error(
        "--site `{site}`: none of the runs has this adapter site; sites look like `{example}`"
    )]
    UnknownSite { site: String, example: String },
    #[error("drawing {figure}: {message}")]
    Plot { figure: String, message: String },
    #[error("cannot write {}: {message}", path.display())]
    Write { path: PathBuf, message: String },
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Math(#[from] MathError),
}
