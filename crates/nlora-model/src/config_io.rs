//! Pieces both architectures share: reading a config.json, the attention mask fill value.
use std::path::Path;

use candle_core::DType;
use serde_json::Value;

use crate::error::{ModelError, Result};

/// A config.json parsed to JSON, with errors naming the file.
pub(crate) fn read_json_file(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::BadFile {
        path: path.to_path_buf(),
        message: format!("not valid JSON: {e}"),
    })
}

/// The additive mask value for masked attention scores in `dtype`.
pub(crate) fn mask_value(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::MIN,
        _ => f32::MIN as f64,
    }
}
