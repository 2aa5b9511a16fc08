//! T5 / T5 v1.1 / Flan-T5 encoder-decoder written for training with LoRA
//! sites, with its Hugging Face folder loader.
pub mod config;
pub mod generate;
pub mod model;

use std::path::Path;

use candle_core::{DType, Device};

pub use config::{Activation, T5Config};
pub use model::{relative_position_bucket, DEFAULT_TARGET_MODULES, T5};

use crate::error::Result;

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
    T5::from_tensors(config, tensors, dtype, device)
}
