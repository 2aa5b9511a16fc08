//! One entry point from a path to a model: a Hugging Face folder
//! (`config.json` + `model.safetensors` or a sharded
//! `model.safetensors.index.json`) or a llama.cpp `.gguf` file.
//!
//! Weights are converted to the model dtype (F32 by default) whatever their
//! stored dtype (F32, F16, BF16, F64 safetensors; any GGUF encoding candle
//! dequantises).
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::llama::{Llama, LlamaConfig};
use crate::lm::{GenerateOptions, LabelLogits, LanguageModel, LmBatch};
use crate::t5::T5;
use nlora_adapter::{AdapterSites, ForwardMode};

/// `model_type` values of config.json this loader builds.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["llama", "qwen2"];

/// Loads the model at `path` (HF folder or `.gguf` file) in F32 on `device`.
pub fn load_model(path: impl AsRef<Path>, device: &Device) -> Result<Llama> {
    load_model_as(path, DType::F32, device)
}

/// As [`load_model`], with the model dtype (F32, or F64 for numerical checks).
pub fn load_model_as(path: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Llama> {
    let path = path.as_ref();
    if path.is_dir() {
        return load_hf_folder(path, dtype, device);
    }
    let is_gguf = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if is_gguf {
        let (config, tensors) = crate::gguf::load_llama_gguf(path, device)?;
        return Llama::from_tensors(config, tensors, dtype, device)
            .map_err(|e| in_checkpoint(e, path));
    }
    if !path.exists() {
        return Err(ModelError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
        });
    }
    Err(ModelError::BadFile {
        path: path.to_path_buf(),
        message: "expected a `.gguf` file or a Hugging Face folder holding config.json and \
                  model.safetensors"
            .into(),
    })
}

/// Loads a Hugging Face model folder.
pub fn load_hf_folder(dir: &Path, dtype: DType, device: &Device) -> Result<Llama> {
    let config = read_hf_config(&dir.join("config.json"))?;
    let tensors = read_safetensors_weights(dir, device)?;
    Llama::from_tensors(config, tensors, dtype, device).map_err(|e| in_checkpoint(e, dir))
}

/// Says which checkpoint a tensor or config problem found while building the model comes from.
fn in_checkpoint(e: ModelError, path: &Path) -> ModelError {
    match e {
        ModelError::Tensor { name, message } => ModelError::Tensor {
            name,
            message: format!("{message} (in {})", path.display()),
        },
        ModelError::Unsupported(m) => ModelError::Unsupported(format!("{}: {m}", path.display())),
        e => e,
    }
}

/// Reads a LLaMA-family `config.json`, checking `model_type` and refusing
/// the options this code does not implement rather than ignoring them.
pub fn read_hf_config(path: &Path) -> Result<LlamaConfig> {
    let mut v = crate::config_io::read_json_file(path)?;
    let field_err = |field: &str, message: String| ModelError::BadField {
        path: path.to_path_buf(),
        field: field.into(),
        message,
    };
    let obj = v
        .as_object_mut()
        .ok_or_else(|| field_err("(top level)", "must be a JSON object".into()))?;
    let model_type = obj
        .get("model_type")
        .and_then(Value::as_str)
        .ok_or_else(|| field_err("model_type", "missing; cannot tell the architecture".into()))?
        .to_string();
    if !SUPPORTED_MODEL_TYPES.contains(&model_type.as_str()) {
        return Err(ModelError::Unsupported(format!(
            "{}: field `model_type` is `{model_type}`; supported: {}",
            path.display(),
            SUPPORTED_MODEL_TYPES.join(", ")
        )));
    }
    for field in [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    ] {
        if !obj.get(field).is_some_and(Value::is_u64) {
            return Err(field_err(
                field,
                "missing or not a non-negative integer".into(),
            ));
        }
    }
    let unsupported = |field: &str, message: String| {
        ModelError::Unsupported(format!("{}: field `{field}`: {message}", path.display()))
    };
    let is_set = |v: Option<&Value>| v.is_some_and(|v| !v.is_null() && v != &Value::Bool(false));
    // transformers 5 nests RoPE settings in `rope_parameters`; older files use
    // `rope_theta` and `rope_scaling`.
    for key in ["rope_parameters", "rope_scaling"] {
        if let Some(Value::Object(rp)) = obj.get(key).cloned() {
            let rope_type = rp
                .get("rope_type")
                .or_else(|| rp.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            if rope_type != "default" {
                return Err(unsupported(
                    key,
                    format!("RoPE type `{rope_type}` is not supported, only the default"),
                ));
            }
            if let Some(theta) = rp.get("rope_theta") {
                obj.insert("rope_theta".into(), theta.clone());
            }
        }
    }
    if is_set(obj.get("mlp_bias")) {
        return Err(unsupported(
            "mlp_bias",
            "MLP biases are not supported".into(),
        ));
    }
    if model_type == "qwen2" {
        if is_set(obj.get("use_sliding_window")) {
            return Err(unsupported(
                "use_sliding_window",
                "sliding-window attention is not supported".into(),
            ));
        }
        // Qwen2 always has q/k/v biases; its config does not say so.
        obj.insert("attention_bias".into(), Value::Bool(true));
    }
    if let Some(hd) = obj.get("head_dim").and_then(Value::as_u64) {
        let implied = obj["hidden_size"].as_u64().unwrap_or(0)
            / obj["num_attention_heads"].as_u64().unwrap_or(1).max(1);
        if hd != implied {
            return Err(unsupported(
                "head_dim",
                format!("{hd} differs from hidden_size / num_attention_heads = {implied}"),
            ));
        }
    }
    // Newer configs list several EOS ids; the config keeps the first.
    for key in ["eos_token_id", "bos_token_id"] {
        if let Some(Value::Array(ids)) = obj.get(key).cloned() {
            obj.insert(key.into(), ids.first().cloned().unwrap_or(Value::Null));
        }
    }
    serde_json::from_value(v).map_err(|e| ModelError::BadFile {
        path: path.to_path_buf(),
        message: format!("not a LLaMA config: {e}"),
    })
}

/// All tensors of `model.safetensors` or of the shards named by
/// `model.safetensors.index.json`.
pub fn read_safetensors_weights(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if single.is_file() {
        vec![single]
    } else if index.is_file() {
        shard_files(&index)?
    } else {
        let hint = if dir.join("pytorch_model.bin").exists() {
            " (pytorch_model.bin is not read: convert it to safetensors)"
        } else {
            ""
        };
        return Err(ModelError::BadFile {
            path: dir.to_path_buf(),
            message: format!(
                "holds neither model.safetensors nor model.safetensors.index.json{hint}"
            ),
        });
    };
    let mut tensors = HashMap::new();
    for file in files {
        let bytes = std::fs::read(&file).map_err(|source| ModelError::Io {
            path: file.clone(),
            source,
        })?;
        let part = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| {
            ModelError::BadFile {
                path: file.clone(),
                message: format!("not a readable safetensors file: {e}"),
            }
        })?;
        for (name, t) in part {
            if !t.dtype().is_float() {
                return Err(ModelError::Tensor {
                    name,
                    message: format!(
                        "in {}: dtype {:?} is not a float type",
                        file.display(),
                        t.dtype()
                    ),
                });
            }
            tensors.insert(name, t);
        }
    }
    Ok(tensors)
}

fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|source| ModelError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let v: Value = serde_json::from_str(&text).map_err(|e| ModelError::BadFile {
        path: index.to_path_buf(),
        message: format!("not valid JSON: {e}"),
    })?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| ModelError::BadField {
            path: index.to_path_buf(),
            field: "weight_map".into(),
            message: "missing or not an object".into(),
        })?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files = BTreeSet::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| ModelError::BadField {
            path: index.to_path_buf(),
            field: format!("weight_map.{name}"),
            message: "must be a file name".into(),
        })?;
        files.insert(dir.join(file));
    }
    Ok(files.into_iter().collect())
}

/// A model of any architecture this crate builds: what
/// [`load_any_model`] returns, chosen by config.json's `model_type`.
#[derive(Debug, Clone)]
pub enum AnyModel {
    /// LLaMA family (`llama`, `qwen2`; `.gguf` files).
    Llama(Llama),
    /// T5 / T5 v1.1 / Flan-T5 (`t5`), encoder-decoder.
    T5(T5),
}

/// Loads a `.gguf` file or a Hugging Face folder of any supported
/// `model_type` (`llama`, `qwen2`, `t5`).
pub fn load_any_model(path: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<AnyModel> {
    let path = path.as_ref();
    if path.is_dir() && crate::t5::is_t5_folder(path) {
        return Ok(AnyModel::T5(crate::t5::load_t5_folder(
            path, dtype, device,
        )?));
    }
    Ok(AnyModel::Llama(load_model_as(path, dtype, device)?))
}

impl AnyModel {
    /// The token that ends a generated sequence, from the model's config.
    pub fn eos_token_id(&self) -> Option<u32> {
        match self {
            AnyModel::Llama(m) => m.config().eos_token_id,
            AnyModel::T5(m) => Some(m.config().eos_id()),
        }
    }

    /// Encoder-decoder (the prompt is the source, the label the target) or decoder-only.
    pub fn is_encoder_decoder(&self) -> bool {
        matches!(self, AnyModel::T5(_))
    }

    fn inner(&self) -> &dyn LanguageModel {
        match self {
            AnyModel::Llama(m) => m,
            AnyModel::T5(m) => m,
        }
    }

    fn inner_mut(&mut self) -> &mut dyn LanguageModel {
        match self {
            AnyModel::Llama(m) => m,
            AnyModel::T5(m) => m,
        }
    }
}

impl LanguageModel for AnyModel {
    fn device(&self) -> &Device {
        self.inner().device()
    }
    fn adapter_sites(&self) -> &AdapterSites {
        self.inner().adapter_sites()
    }
    fn adapter_sites_mut(&mut self) -> &mut AdapterSites {
        self.inner_mut().adapter_sites_mut()
    }
    fn forward_logits(&self, batch: &LmBatch, mode: ForwardMode) -> Result<Tensor> {
        self.inner().forward_logits(batch, mode)
    }
    fn label_logits(&self, batch: &LmBatch, mode: ForwardMode) -> Result<LabelLogits> {
        self.inner().label_logits(batch, mode)
    }
    fn loss(&self, batch: &LmBatch, mode: ForwardMode) -> Result<Tensor> {
        self.inner().loss(batch, mode)
    }
    fn generate(&self, prompts: &[Vec<u32>], opts: &GenerateOptions) -> Result<Vec<Vec<u32>>> {
        self.inner().generate(prompts, opts)
    }
    fn score(&self, prompt: &[u32], candidates: &[Vec<u32>]) -> Result<Vec<f64>> {
        self.inner().score(prompt, candidates)
    }
}
