//! The continual-learning engine: configuration, methods, the task loop,
//! evaluation and the run directory.
pub mod config;
pub mod error;
pub mod presets;
pub mod rundir;

pub use config::RunConfig;
pub use error::{Result, TrainError};
