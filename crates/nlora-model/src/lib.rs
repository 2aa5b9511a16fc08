//! Models written for training with LoRA adapter sites, their loaders and tokenizers.
pub mod error;
pub mod llama;

pub use error::{ModelError, Result};
