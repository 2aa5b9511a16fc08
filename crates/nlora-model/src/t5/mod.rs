//! T5 / T5 v1.1 / Flan-T5 encoder-decoder written for training with LoRA
//! sites, with its Hugging Face folder loader.
pub mod config;
pub mod generate;
pub mod model;

use std::path::Path;

use candle_core::{DType, Device};

pub use config::{Activation, T5Config};
pub use model::{relative_position_bucket, DEFAULT_TARGET_MODULES, T5};

use crate::error::{ModelError, Result};

/// Loads a T5 Hugging Face folder: `config.json` (`model_type` "t5") and
/// `model.safetensors` or a sharded `model.safetensors.index.json`, weights
/// converted to `dtype` (F32, or F64 for checks). A missing tensor or one of
/// the wrong shape is an error naming it. The tokenizer is separate:
/// [`TextTokenizer::from_hf`](crate::tokenizer::TextTokenizer::from_hf) on the
/// same folder.
pub fn load_t5_folder(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<T5> {
    let dir = dir.as_ref();
    let config = T5Config::from_json_file(&dir.join("config.json"))?;
    let tensors = crate::load::read_safetensors_weights(dir, device)?;
    // say which checkpoint a tensor or config problem comes from
    T5::from_tensors(config, tensors, dtype, device).map_err(|e| match e {
        ModelError::Tensor { name, message } => ModelError::Tensor {
            name,
            message: format!("{message} (in {})", dir.display()),
        },
        ModelError::Unsupported(m) => ModelError::Unsupported(format!("{}: {m}", dir.display())),
        e => e,
    })
}

/// Whether `dir` holds a config.json with `model_type` "t5" (nothing else is
/// checked here; [`load_t5_folder`] says what is wrong with the folder).
pub fn is_t5_folder(dir: impl AsRef<Path>) -> bool {
    std::fs::read_to_string(dir.as_ref().join("config.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .is_some_and(|v| v.get("model_type").and_then(|t| t.as_str()) == Some("t5"))
}
