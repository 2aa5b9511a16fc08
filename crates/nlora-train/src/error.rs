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
    #[error("non-finite {part} at task {task} ({task_name}), step {step}: {value}; the last good checkpoint is kept. Lower the learning rate or lambda, or set train.on_nonfinite = \"skip\"")]
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
    #[error(transparent)]
    Adapter(#[from] nlora_adapter::AdapterError),
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
