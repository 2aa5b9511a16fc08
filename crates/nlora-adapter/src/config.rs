//! LoRA hyperparameters: rank, alpha, dropout and where adapters go.
use serde::{Deserialize, Serialize};

use crate::error::{AdapterError, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank r of each task's adapter.
    pub r: usize,
    /// lora_alpha; the update is scaled by `alpha / r`.
    pub alpha: f64,
    /// Dropout probability on the current adapter's input while training.
    pub dropout: f32,
    /// Module names that get an adapter, matched like PEFT: a site whose path
    /// equals a name or ends with `.` + name.
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    /// The reference code's setting: r 8, alpha 32, dropout 0.1 on q and v.
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 32.0,
            dropout: 0.1,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
        }
    }
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// Whether the site at `path` (e.g. `model.layers.0.self_attn.q_proj`) is a target.
    pub fn targets(&self, path: &str) -> bool {
        self.target_modules.iter().any(|t| {
            path == t
                || (path.len() > t.len()
                    && path.ends_with(t.as_str())
                    && path.as_bytes()[path.len() - t.len() - 1] == b'.')
        })
    }

    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(AdapterError::Config("`r` must be at least 1".into()));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(AdapterError::Config(format!(
                "`alpha` must be a positive number, got {}",
                self.alpha
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(AdapterError::Config(format!(
                "`dropout` must be in [0, 1), got {}",
                self.dropout
            )));
        }
        if self.target_modules.is_empty() {
            return Err(AdapterError::Config(
                "`target_modules` is empty: name at least one module, e.g. [\"q_proj\", \"v_proj\"]"
                    .into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_match_whole_module_names_like_peft() {
        let c = LoraConfig::default();
        assert!(c.targets("model.layers.0.self_attn.q_proj"));
        assert!(c.targets("v_proj"));
        assert!(!c.targets("model.layers.0.self_attn.k_proj"));
        // a suffix that is not a whole component does not match
        assert!(!c.targets("model.layers.0.self_attn.xq_proj"));
    }
}
