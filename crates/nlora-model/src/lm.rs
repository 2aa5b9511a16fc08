//! What the training loop, the methods and the evaluation need from a model,
//! whatever its architecture (decoder-only LLaMA family, encoder-decoder T5).
//!
//! Batches follow the Hugging Face convention so that both kinds of model
//! take the same triple `(input_ids, attention_mask, labels)`:
//! - decoder-only: `labels` is aligned with `input_ids` and the model shifts
//!   it, position t predicting `labels[t + 1]`;
//! - encoder-decoder: `labels` is the target sequence, the decoder reads it
//!   shifted right.
//!
//! In both, label value [`IGNORE_INDEX`] (-100) marks positions without loss.
use candle_core::{DType, Device, Tensor, D};
use nlora_adapter::{AdapterSites, ForwardMode};

use crate::error::{ModelError, Result};

/// Label value of positions that carry no loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// A padded batch: `input_ids (batch, seq)` u32, `attention_mask (batch, seq)`
/// (1 = token, 0 = padding; any dtype), `labels (batch, seq_labels)` i64.
#[derive(Debug, Clone)]
pub struct LmBatch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub labels: Tensor,
}

impl LmBatch {
    /// The same batch on `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self {
            input_ids: self.input_ids.to_device(device)?,
            attention_mask: self.attention_mask.to_device(device)?,
            labels: self.labels.to_device(device)?,
        })
    }

    /// Checks ranks, dtypes and that `input_ids` and `attention_mask` agree.
    pub fn new(input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Result<Self> {
        let bad = |message: String| ModelError::Tensor {
            name: "batch".into(),
            message,
        };
        let (b, s) = input_ids.dims2().map_err(|_| {
            bad(format!(
                "input_ids must be (batch, seq), got {:?}",
                input_ids.shape()
            ))
        })?;
        if input_ids.dtype() != DType::U32 {
            return Err(bad(format!(
                "input_ids must be u32, got {:?}",
                input_ids.dtype()
            )));
        }
        if attention_mask.dims() != [b, s] {
            return Err(bad(format!(
                "attention_mask {:?} does not match input_ids {:?}",
                attention_mask.shape(),
                input_ids.shape()
            )));
        }
        let (bl, _) = labels.dims2().map_err(|_| {
            bad(format!(
                "labels must be (batch, seq), got {:?}",
                labels.shape()
            ))
        })?;
        if bl != b || labels.dtype() != DType::I64 {
            return Err(bad(format!(
                "labels must be i64 with {b} rows, got {:?} {:?}",
                labels.dtype(),
                labels.shape()
            )));
        }
        Ok(Self {
            input_ids,
            attention_mask,
            labels,
        })
    }

    /// A decoder-only batch from token rows and a per-token loss flag,
    /// right-padded with `pad_id`: the loss covers token t of a row where
    /// `loss_mask[t]` is true (the label tokens; t = 0 never has a loss).
    pub fn causal_right_padded(
        rows: &[Vec<u32>],
        loss_mask: &[Vec<bool>],
        pad_id: u32,
        device: &Device,
    ) -> Result<Self> {
        let bad = |message: String| ModelError::Tensor {
            name: "batch".into(),
            message,
        };
        if rows.is_empty() || rows.len() != loss_mask.len() {
            return Err(bad(format!(
                "{} token rows and {} loss masks: need the same, non-zero number",
                rows.len(),
                loss_mask.len()
            )));
        }
        let s = rows.iter().map(Vec::len).max().unwrap_or(0);
        if s == 0 {
            return Err(bad("every row is empty".into()));
        }
        let (mut ids, mut mask, mut labels) = (Vec::new(), Vec::new(), Vec::new());
        for (i, (row, lm)) in rows.iter().zip(loss_mask).enumerate() {
            if row.len() != lm.len() {
                return Err(bad(format!(
                    "row {i}: {} tokens but {} loss flags",
                    row.len(),
                    lm.len()
                )));
            }
            for t in 0..s {
                ids.push(row.get(t).copied().unwrap_or(pad_id));
                mask.push(u32::from(t < row.len()));
                labels.push(match (row.get(t), lm.get(t)) {
                    (Some(&tok), Some(true)) if t > 0 => tok as i64,
                    _ => IGNORE_INDEX,
                });
            }
        }
        let b = rows.len();
        Self::new(
            Tensor::from_vec(ids, (b, s), device)?,
            Tensor::from_vec(mask, (b, s), device)?,
            Tensor::from_vec(labels, (b, s), device)?,
        )
    }

    pub fn batch_size(&self) -> usize {
        self.input_ids.dims()[0]
    }
}

/// Logits at the positions that carry a label only (the lm_head runs nowhere else).
#[derive(Debug, Clone)]
pub struct LabelLogits {
    /// `(n, vocab)`
    pub logits: Tensor,
    /// `(n,)` u32, the label predicted at each row of `logits`.
    pub targets: Tensor,
    /// The batch row each of the n positions belongs to.
    pub rows: Vec<usize>,
}

impl LabelLogits {
    /// `log p(target)` at each position, `(n,)`.
    pub fn target_log_probs(&self) -> Result<Tensor> {
        // at least f32 for the log-sum-exp; f64 models stay f64
        let logits = match self.logits.dtype() {
            DType::F64 => self.logits.clone(),
            _ => self.logits.to_dtype(DType::F32)?,
        };
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        Ok(logp.gather(&self.targets.unsqueeze(1)?, 1)?.squeeze(1)?)
    }

    /// Mean cross-entropy over the labelled positions (differentiable).
    pub fn mean_cross_entropy(&self) -> Result<Tensor> {
        if self.rows.is_empty() {
            return Err(ModelError::Tensor {
                name: "labels".into(),
                message: "no position carries a label: nothing to compute a loss on".into(),
            });
        }
        Ok(self.target_log_probs()?.mean_all()?.neg()?)
    }
}

/// Greedy decoding settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// Generation of a sequence stops after any of these.
    pub eos_token_ids: Vec<u32>,
    /// Fills left padding and the steps after a sequence has finished.
    pub pad_token_id: u32,
}

/// A language model with LoRA adapter sites.
pub trait LanguageModel {
    fn device(&self) -> &Device;
    fn adapter_sites(&self) -> &AdapterSites;
    fn adapter_sites_mut(&mut self) -> &mut AdapterSites;

    /// Logits `(batch, seq, vocab)` at every position of the labels' sequence
    /// (decoder-only: of `input_ids`).
    fn forward_logits(&self, batch: &LmBatch, mode: ForwardMode) -> Result<Tensor>;

    /// Logits at labelled positions only, with their targets.
    fn label_logits(&self, batch: &LmBatch, mode: ForwardMode) -> Result<LabelLogits>;

    /// Mean cross-entropy over the label tokens (the task loss).
    fn loss(&self, batch: &LmBatch, mode: ForwardMode) -> Result<Tensor> {
        self.label_logits(batch, mode)?.mean_cross_entropy()
    }

    /// Greedy continuation of each prompt (batched, with a KV cache); each
    /// returned sequence holds the new tokens only, stopping before an EOS.
    fn generate(&self, prompts: &[Vec<u32>], opts: &GenerateOptions) -> Result<Vec<Vec<u32>>>;

    /// Sum of log-likelihoods of each candidate continuation given the prompt
    /// (rank classification).
    fn score(&self, prompt: &[u32], candidates: &[Vec<u32>]) -> Result<Vec<f64>>;
}
