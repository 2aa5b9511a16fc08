//! The PEFT on-disk format: `adapter_config.json` + `adapter_model.safetensors`
//! with keys `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`,
//! so Python PEFT can load what nlora saves and the other way round.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{AdapterError, Result};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const KEY_PREFIX: &str = "base_model.model.";

/// `adapter_config.json`, with the fields PEFT writes for a plain LoRA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeftConfig {
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default, deserialize_with = "list_or_string")]
    pub target_modules: Vec<String>,
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, serde_json::Value>,
}

fn default_bias() -> String {
    "none".into()
}

fn list_or_string<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Targets {
        List(Vec<String>),
        One(String),
        Null(()),
    }
    Ok(match Targets::deserialize(d)? {
        Targets::List(v) => v,
        Targets::One(s) => vec![s],
        Targets::Null(()) => vec![],
    })
}

impl PeftConfig {
    /// The config PEFT writes for a causal-LM LoRA with these hyperparameters.
    pub fn causal_lm(
        r: usize,
        lora_alpha: f64,
        lora_dropout: f64,
        target_modules: Vec<String>,
        base_model_name_or_path: &str,
    ) -> Self {
        Self {
            peft_type: "LORA".into(),
            r,
            lora_alpha,
            lora_dropout,
            target_modules,
            bias: "none".into(),
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: Some(base_model_name_or_path.into()),
            fan_in_fan_out: false,
            inference_mode: true,
            use_rslora: false,
            use_dora: false,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
        }
    }

    pub fn scale(&self) -> f64 {
        self.lora_alpha / self.r as f64
    }

    /// Refuses the PEFT variants whose forward differs from plain LoRA.
    fn check_supported(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, message: String| {
            Err(AdapterError::BadFile {
                path: path.to_path_buf(),
                message: format!("field `{field}`: {message}"),
            })
        };
        if self.peft_type != "LORA" {
            return bad(
                "peft_type",
                format!("`{}` is not supported, only LORA", self.peft_type),
            );
        }
        if self.r == 0 {
            return bad("r", "must be at least 1".into());
        }
        if self.bias != "none" {
            return bad(
                "bias",
                format!("`{}` is not supported, only \"none\"", self.bias),
            );
        }
        if self.fan_in_fan_out {
            return bad(
                "fan_in_fan_out",
                "true (Conv1D layout) is not supported".into(),
            );
        }
        if self.use_rslora {
            return bad(
                "use_rslora",
                "rank-stabilised scaling is not supported".into(),
            );
        }
        if self.use_dora {
            return bad("use_dora", "DoRA is not supported".into());
        }
        if !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty() {
            return bad(
                "rank_pattern/alpha_pattern",
                "per-module ranks or alphas are not supported".into(),
            );
        }
        Ok(())
    }

    fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("plain data serialises");
        // PEFT writes lora_alpha as an int; keep it so when it is one.
        if self.lora_alpha.fract() == 0.0 && self.lora_alpha.abs() < 1e15 {
            v["lora_alpha"] = serde_json::json!(self.lora_alpha as i64);
        }
        v
    }
}

/// One task's adapter in PEFT form: module path -> (lora_A `(r, in)`, lora_B `(out, r)`).
#[derive(Debug, Clone)]
pub struct PeftAdapter {
    pub config: PeftConfig,
    pub weights: BTreeMap<String, (Tensor, Tensor)>,
}

impl PeftAdapter {
    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir`
    /// (created if missing), each atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| AdapterError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (module, (a, b)) in &self.weights {
            tensors.push((
                format!("{KEY_PREFIX}{module}.lora_A.weight"),
                a.contiguous()?,
            ));
            tensors.push((
                format!("{KEY_PREFIX}{module}.lora_B.weight"),
                b.contiguous()?,
            ));
        }
        let metadata = Some(std::collections::HashMap::from([(
            "format".to_string(),
            "pt".to_string(),
        )]));
        let weights_path = dir.join(WEIGHTS_FILE);
        let bytes =
            safetensors::tensor::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), metadata)
                .map_err(|e| AdapterError::BadFile {
                    path: weights_path.clone(),
                    message: format!("cannot serialise: {e}"),
                })?;
        write_atomic(&weights_path, &bytes)?;
        let json = serde_json::to_string_pretty(&self.config.to_json()).expect("json value");
        write_atomic(&dir.join(CONFIG_FILE), json.as_bytes())
    }

    /// Reads a PEFT LoRA adapter directory.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path).map_err(|source| AdapterError::Io {
            path: config_path.clone(),
            source,
        })?;
        let config: PeftConfig =
            serde_json::from_str(&text).map_err(|e| AdapterError::BadFile {
                path: config_path.clone(),
                message: format!("not a PEFT adapter config: {e}"),
            })?;
        config.check_supported(&config_path)?;

        let weights_path = dir.join(WEIGHTS_FILE);
        let bytes = std::fs::read(&weights_path).map_err(|source| AdapterError::Io {
            path: weights_path.clone(),
            source,
        })?;
        let bad = |message: String| AdapterError::BadFile {
            path: weights_path.clone(),
            message,
        };
        let tensors = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let mut a_of: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut b_of: BTreeMap<String, Tensor> = BTreeMap::new();
        for (key, t) in tensors {
            let module = key
                .strip_prefix(KEY_PREFIX)
                .ok_or_else(|| bad(format!("tensor `{key}` does not start with `{KEY_PREFIX}`")))?;
            if let Some(m) = module.strip_suffix(".lora_A.weight") {
                a_of.insert(m.to_string(), t);
            } else if let Some(m) = module.strip_suffix(".lora_B.weight") {
                b_of.insert(m.to_string(), t);
            } else {
                return Err(bad(format!(
                    "tensor `{key}` is neither a lora_A nor a lora_B weight (biases, \
                     embeddings and modules_to_save are not supported)"
                )));
            }
        }
        let mut weights = BTreeMap::new();
        for (module, a) in a_of {
            let b = b_of
                .remove(&module)
                .ok_or_else(|| bad(format!("`{module}` has lora_A but no lora_B")))?;
            let shapes_ok = matches!((a.dims(), b.dims()), ([ra, _], [_, rb]) if *ra == config.r && *rb == config.r);
            if !shapes_ok {
                return Err(bad(format!(
                    "`{module}`: lora_A {:?} / lora_B {:?} do not have rank r = {}",
                    a.shape(),
                    b.shape(),
                    config.r
                )));
            }
            weights.insert(module, (a, b));
        }
        if let Some(module) = b_of.keys().next() {
            return Err(bad(format!("`{module}` has lora_B but no lora_A")));
        }
        if weights.is_empty() {
            return Err(bad("holds no LoRA weights".into()));
        }
        Ok(Self { config, weights })
    }
}

/// Writes `bytes` to a temporary file next to `path`, then renames it over
/// `path`: a reader never sees a half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let io = |p: PathBuf| move |source| AdapterError::Io { path: p, source };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        // A failed write (a full disk) leaves no half-written temporary behind.
        let _ = std::fs::remove_file(&tmp);
        return Err(io(path.to_path_buf())(e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(path.to_path_buf())(e)
    })?;
    // The rename must reach the disk too before the file counts as written.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}
