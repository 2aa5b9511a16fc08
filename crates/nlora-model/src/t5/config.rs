//! T5 hyperparameters, read straight from a Hugging Face config.json with the
//! defaults and the derived settings of transformers' `T5Config`.
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ModelError, Result};

/// The activation of the feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    Relu,
    /// GELU with the tanh approximation (transformers' `gelu_new`,
    /// `gelu_pytorch_tanh`); what `gated-gelu` means for T5 v1.1 / Flan-T5.
    GeluTanh,
    /// Exact GELU, `0.5 x (1 + erf(x / sqrt 2))` (transformers' `gelu`).
    GeluErf,
    Silu,
}

impl Activation {
    /// transformers' `ACT2FN` names this code implements.
    fn from_hf_name(name: &str) -> Option<Self> {
        Some(match name {
            "relu" => Self::Relu,
            "gelu_new" | "gelu_pytorch_tanh" => Self::GeluTanh,
            "gelu" => Self::GeluErf,
            "silu" | "swish" => Self::Silu,
            _ => return None,
        })
    }
}

/// `config.json` of a T5 / T5 v1.1 / Flan-T5 checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct T5Config {
    pub vocab_size: usize,
    #[serde(default = "d512")]
    pub d_model: usize,
    /// Size of each head's query/key/value (not necessarily d_model / num_heads).
    #[serde(default = "d64")]
    pub d_kv: usize,
    #[serde(default = "d2048")]
    pub d_ff: usize,
    /// Encoder blocks.
    #[serde(default = "d6")]
    pub num_layers: usize,
    /// Decoder blocks; `num_layers` when absent.
    #[serde(default)]
    pub num_decoder_layers: Option<usize>,
    #[serde(default = "d8")]
    pub num_heads: usize,
    #[serde(default = "d32")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "d128")]
    pub relative_attention_max_distance: usize,
    /// Dropout of the model's own layers while training (not LoRA's).
    #[serde(default = "dropout")]
    pub dropout_rate: f64,
    #[serde(default = "eps")]
    pub layer_norm_epsilon: f64,
    /// `relu` (T5 v1.0), `gated-gelu` (v1.1, Flan-T5), or `[gated-]ACT`.
    #[serde(default = "relu")]
    pub feed_forward_proj: String,
    /// Absent means true (T5 v1.0); v1.1 / Flan-T5 set false: own lm_head,
    /// no rescaling of the decoder output.
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    /// Written by transformers 5, which always ties the weights in its config
    /// and keeps the rescaling as its own flag.
    #[serde(default)]
    pub scale_decoder_outputs: Option<bool>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub decoder_start_token_id: Option<u32>,
}

fn d512() -> usize {
    512
}
fn d64() -> usize {
    64
}
fn d2048() -> usize {
    2048
}
fn d6() -> usize {
    6
}
fn d8() -> usize {
    8
}
fn d32() -> usize {
    32
}
fn d128() -> usize {
    128
}
fn dropout() -> f64 {
    0.1
}
fn eps() -> f64 {
    1e-6
}
fn relu() -> String {
    "relu".into()
}

impl T5Config {
    /// Reads `config.json`, checking `model_type` and the fields this code needs.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let mut v = crate::config_io::read_json_file(path)?;
        let field_err = |field: &str, message: String| ModelError::BadField {
            path: path.to_path_buf(),
            field: field.into(),
            message,
        };
        let obj = v
            .as_object_mut()
            .ok_or_else(|| field_err("(top level)", "must be a JSON object".into()))?;
        match obj.get("model_type").and_then(Value::as_str) {
            Some("t5") => {}
            Some(other) => {
                return Err(field_err(
                    "model_type",
                    format!("is `{other}`, this reader builds `t5` only"),
                ))
            }
            None => {
                return Err(field_err(
                    "model_type",
                    "missing; cannot tell the architecture".into(),
                ))
            }
        }
        if !obj.get("vocab_size").is_some_and(Value::is_u64) {
            return Err(field_err(
                "vocab_size",
                "missing or not a non-negative integer".into(),
            ));
        }
        // Newer configs may list several EOS ids; the first ends a sequence.
        if let Some(Value::Array(ids)) = obj.get("eos_token_id").cloned() {
            obj.insert(
                "eos_token_id".into(),
                ids.first().cloned().unwrap_or(Value::Null),
            );
        }
        let config: Self = serde_json::from_value(v).map_err(|e| ModelError::BadFile {
            path: path.to_path_buf(),
            message: format!("not a T5 config: {e}"),
        })?;
        config
            .validate()
            .map_err(|(field, message)| field_err(field, message))?;
        Ok(config)
    }

    /// Checks what the model needs; `(field, message)` on failure.
    pub fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_heads", self.num_heads),
            ("num_layers", self.num_layers),
            ("num_decoder_layers", self.decoder_layers()),
        ] {
            if value == 0 {
                return Err((field, "must be at least 1".into()));
            }
        }
        if self.relative_attention_num_buckets < 4 {
            return Err((
                "relative_attention_num_buckets",
                format!(
                    "{} is too few (at least 4)",
                    self.relative_attention_num_buckets
                ),
            ));
        }
        // Bidirectional buckets: half each way, half of those exact.
        let max_exact = self.relative_attention_num_buckets / 4;
        if self.relative_attention_max_distance <= max_exact {
            return Err((
                "relative_attention_max_distance",
                format!(
                    "{} must exceed num_buckets / 4 = {max_exact}",
                    self.relative_attention_max_distance
                ),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout_rate) {
            return Err((
                "dropout_rate",
                format!("{} is not in [0, 1)", self.dropout_rate),
            ));
        }
        if !(self.layer_norm_epsilon.is_finite() && self.layer_norm_epsilon > 0.0) {
            return Err((
                "layer_norm_epsilon",
                format!("{} is not positive", self.layer_norm_epsilon),
            ));
        }
        self.feed_forward().map(|_| ())
    }

    pub fn decoder_layers(&self) -> usize {
        self.num_decoder_layers.unwrap_or(self.num_layers)
    }

    /// Width of the attention's inner projection, `num_heads * d_kv`.
    pub fn inner_dim(&self) -> usize {
        self.num_heads * self.d_kv
    }

    /// `(gated, activation)` from `feed_forward_proj`, as transformers reads it:
    /// `ACT` or `gated-ACT`, with `gated-gelu` meaning the tanh approximation.
    pub fn feed_forward(&self) -> std::result::Result<(bool, Activation), (&'static str, String)> {
        let parts: Vec<&str> = self.feed_forward_proj.split('-').collect();
        let (gated, name) = match parts.as_slice() {
            [act] => (false, *act),
            ["gated", act] => (true, *act),
            _ => {
                return Err((
                    "feed_forward_proj",
                    format!(
                        "`{}` is not `ACT` or `gated-ACT` (e.g. `relu`, `gated-gelu`)",
                        self.feed_forward_proj
                    ),
                ))
            }
        };
        let name = if self.feed_forward_proj == "gated-gelu" {
            "gelu_new"
        } else {
            name
        };
        let act = Activation::from_hf_name(name).ok_or_else(|| {
            (
                "feed_forward_proj",
                format!("activation `{name}` is not supported (relu, gelu, gelu_new, silu)"),
            )
        })?;
        Ok((gated, act))
    }

    /// Whether the lm_head is the shared embedding (T5 v1.0) unless the
    /// checkpoint carries its own `lm_head.weight`.
    pub fn ties_word_embeddings(&self) -> bool {
        self.tie_word_embeddings != Some(false)
    }

    /// Whether the decoder output is multiplied by `d_model^-0.5` before the
    /// lm_head (T5 v1.0), as transformers decides it.
    pub fn scales_decoder_outputs(&self) -> bool {
        self.scale_decoder_outputs
            .unwrap_or_else(|| self.ties_word_embeddings())
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_token_id.unwrap_or(0)
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_token_id.unwrap_or(1)
    }

    /// The decoder's first input; T5 uses the pad token.
    pub fn decoder_start_id(&self) -> u32 {
        self.decoder_start_token_id.unwrap_or_else(|| self.pad_id())
    }
}
