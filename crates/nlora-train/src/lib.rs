//! The continual-learning engine: configuration, methods, the task loop,
//! evaluation and the run directory.
pub mod analysis;
pub mod arch;
pub mod checkpoint;
pub mod config;
pub mod engine;
pub mod error;
pub mod eval;
pub mod fault;
pub mod method;
pub mod monitor;
pub mod optim;
pub mod presets;
pub mod rundir;
pub mod stream;
#[doc(hidden)]
pub mod testing;
pub mod trainer;

pub use config::RunConfig;
pub use error::{Result, TrainError};
