//! Models written for training with LoRA adapter sites, their loaders and tokenizers.
pub mod error;
pub mod gguf;
pub mod llama;
pub mod tokenizer;

pub use error::{ModelError, Result};
