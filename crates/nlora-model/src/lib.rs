//! Models written for training with LoRA adapter sites, their loaders and tokenizers.
mod config_io;
pub mod error;
pub mod gguf;
pub mod llama;
pub mod lm;
pub mod load;
pub mod t5;
pub mod tokenizer;

pub use error::{ModelError, Result};
pub use lm::{GenerateOptions, LabelLogits, LanguageModel, LmBatch, IGNORE_INDEX};
pub use load::{load_any_model, load_model, load_model_as, AnyModel};
