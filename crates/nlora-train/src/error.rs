//! Errors of the engine; the CLI prints them as one line with what to do.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("config: {0}")]
    Config(String),
    #[error("{path}: {message}")]
    File {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("non-finite {part} at task {task} ({task_name}), step {step}: {value}; the last good checkpoint is kept. Lower `train.lr` or `method.lambda` (or set `train.on_nonfinite = \"skip\"`) in the run directory's config.toml and continue with `nlora run --resume --out <run dir>`")]
    NonFinite {
        part: String,
        task: usize,
        task_name: String,
        step: usize,
        value: f64,
    },
    #[error("run directory {path}: {message}")]
    RunDir {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("{path}: cannot write: the disk is full or a file size limit was reached ({source}). The run's earlier checkpoints and results are intact: free some space (or move the run directory to a larger disk) and continue with `nlora run --resume --out <run dir>`")]
    DiskFull {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Adapter(nlora_adapter::AdapterError),
    #[error(transparent)]
    Data(#[from] nlora_data::DataError),
    #[error("{0}")]
    Math(#[from] nlora_math::MathError),
    #[error(transparent)]
    Model(#[from] nlora_model::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, TrainError>;

/// Whether a write failed for want of space: ENOSPC, EDQUOT, or EFBIG (a file
/// size limit, e.g. `ulimit -f`).
pub fn is_disk_full(e: &std::io::Error) -> bool {
    if e.kind() == std::io::ErrorKind::StorageFull || e.kind() == std::io::ErrorKind::FileTooLarge {
        return true;
    }
    // EFBIG 27, ENOSPC 28, EDQUOT 122 on Linux.
    matches!(e.raw_os_error(), Some(27 | 28 | 122))
}

impl From<nlora_adapter::AdapterError> for TrainError {
    /// Every file the engine writes goes through the adapter crate's atomic
    /// writer: a full disk becomes one message that says what to do.
    fn from(e: nlora_adapter::AdapterError) -> Self {
        match e {
            nlora_adapter::AdapterError::Io { path, source } if is_disk_full(&source) => {
                TrainError::DiskFull { path, source }
            }
            other => TrainError::Adapter(other),
        }
    }
}
