//! T5 as a [`LanguageModel`]: teacher-forced training forward, greedy
//! generation with a KV cache and rank-classification scoring, with the
//! conventions of transformers' `T5ForConditionalGeneration`:
//! the decoder reads the labels shifted right behind `decoder_start_token_id`
//! (the pad id), label -100 marks positions without loss and is read as pad.
use candle_core::{DType, Device, Tensor, D};
use nlora_adapter::{AdapterSites, ForwardMode};

use super::model::{Dropout, EncoderState, T5};
use crate::error::{ModelError, Result};
use crate::lm::{GenerateOptions, LabelLogits, LanguageModel, LmBatch, IGNORE_INDEX};

/// `mask (b, s)` of any dtype to rows of booleans (true = real token).
fn mask_rows(attention_mask: &Tensor) -> Result<Vec<Vec<bool>>> {
    Ok(attention_mask
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?
        .into_iter()
        .map(|r| r.into_iter().map(|v| v > 0.5).collect())
        .collect())
}

/// Right-pads token rows with `pad`: ids `(b, max_len)` and the key mask.
fn right_pad(rows: &[&[u32]], pad: u32, device: &Device) -> Result<(Tensor, Vec<Vec<bool>>)> {
    let s = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let ids: Vec<u32> = rows
        .iter()
        .flat_map(|r| {
            r.iter()
                .copied()
                .chain(std::iter::repeat_n(pad, s - r.len()))
        })
        .collect();
    let mask = rows
        .iter()
        .map(|r| (0..s).map(|j| j < r.len()).collect())
        .collect();
    Ok((Tensor::from_vec(ids, (rows.len(), s), device)?, mask))
}

impl T5 {
    /// The greedy-decoding settings of the checkpoint's config (EOS ends a
    /// sequence, pad fills), for `max_new_tokens` new tokens.
    pub fn generate_options(&self, max_new_tokens: usize) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens,
            eos_token_ids: vec![self.config().eos_id()],
            pad_token_id: self.config().pad_id(),
        }
    }

    /// transformers' `_shift_right`: `[start, labels[..-1]]` with -100 read as pad.
    fn decoder_inputs(&self, labels: &[Vec<i64>]) -> Result<Tensor> {
        let (start, pad) = (self.config().decoder_start_id(), self.config().pad_id());
        let t = labels.first().map_or(0, Vec::len);
        let ids: Vec<u32> = labels
            .iter()
            .flat_map(|row| {
                std::iter::once(start).chain(row[..t.saturating_sub(1)].iter().map(move |&y| {
                    if y == IGNORE_INDEX {
                        pad
                    } else {
                        y as u32
                    }
                }))
            })
            .collect();
        Ok(Tensor::from_vec(ids, (labels.len(), t), self.device_ref())?)
    }

    /// Labels as rows, checked: -100 or a vocabulary id.
    fn label_rows(&self, batch: &LmBatch) -> Result<Vec<Vec<i64>>> {
        let labels = batch.labels.to_vec2::<i64>()?;
        if labels.first().is_some_and(Vec::is_empty) {
            return Err(ModelError::Tensor {
                name: "labels".into(),
                message: "is empty: an encoder-decoder batch needs target tokens".into(),
            });
        }
        let vocab = self.config().vocab_size;
        for (r, row) in labels.iter().enumerate() {
            for (t, &y) in row.iter().enumerate() {
                if y != IGNORE_INDEX && (y < 0 || y as usize >= vocab) {
                    return Err(ModelError::Tensor {
                        name: "labels".into(),
                        message: format!(
                            "row {r}, position {t}: label {y} is outside the vocabulary (0..{vocab})"
                        ),
                    });
                }
            }
        }
        Ok(labels)
    }

    /// Decoder hidden states `(b, t, d_model)` of a batch, teacher-forced.
    fn batch_decoder_states(
        &self,
        batch: &LmBatch,
        labels: &[Vec<i64>],
        mode: ForwardMode,
    ) -> Result<Tensor> {
        let dropout = self.new_dropout(mode);
        let key_mask = mask_rows(&batch.attention_mask)?;
        let enc = self.encode(&batch.input_ids, &key_mask, mode, &dropout)?;
        let dec_ids = self.decoder_inputs(labels)?;
        self.decode(&dec_ids, &enc, None, mode, &dropout)
    }

    /// Label logits of `targets` read by the decoder against `enc` (one row each).
    fn target_label_logits(&self, enc: &EncoderState, targets: &[&[u32]]) -> Result<LabelLogits> {
        let t = targets.iter().map(|c| c.len()).max().unwrap_or(0);
        let labels: Vec<Vec<i64>> = targets
            .iter()
            .map(|c| {
                (0..t)
                    .map(|j| c.get(j).map_or(IGNORE_INDEX, |&y| y as i64))
                    .collect()
            })
            .collect();
        let dec_ids = self.decoder_inputs(&labels)?;
        let mode = ForwardMode::Inference;
        let h = self.decode(&dec_ids, enc, None, mode, &Dropout::inactive())?;
        self.gather_label_logits(&h, &labels, mode)
    }

    /// Runs the lm_head on the labelled positions of `h (b, t, d)` only.
    fn gather_label_logits(
        &self,
        h: &Tensor,
        labels: &[Vec<i64>],
        mode: ForwardMode,
    ) -> Result<LabelLogits> {
        let (b, t, d) = h.dims3()?;
        let (mut idx, mut targets, mut rows) = (Vec::new(), Vec::new(), Vec::new());
        for (r, row) in labels.iter().enumerate() {
            for (j, &y) in row.iter().enumerate() {
                if y != IGNORE_INDEX {
                    idx.push((r * t + j) as u32);
                    targets.push(y as u32);
                    rows.push(r);
                }
            }
        }
        let n = idx.len();
        let device = self.device_ref();
        let h = h
            .reshape((b * t, d))?
            .index_select(&Tensor::from_vec(idx, n, device)?, 0)?;
        Ok(LabelLogits {
            logits: self.lm_logits(&h, mode)?,
            targets: Tensor::from_vec(targets, n, device)?,
            rows,
        })
    }

    /// Sum of log-likelihoods of each target given its source, batched;
    /// each target as the decoder should produce it (usually ending in EOS).
    pub fn score_pairs(&self, pairs: &[(&[u32], &[u32])]) -> Result<Vec<f64>> {
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        let sources: Vec<&[u32]> = pairs.iter().map(|(s, _)| *s).collect();
        let enc = self.encode_sources(&sources)?;
        let targets: Vec<&[u32]> = pairs.iter().map(|(_, t)| *t).collect();
        self.sum_log_likelihoods(&enc, &targets)
    }

    fn encode_sources(&self, sources: &[&[u32]]) -> Result<EncoderState> {
        if let Some(i) = sources.iter().position(|s| s.is_empty()) {
            return Err(ModelError::Tokenizer(format!(
                "source {i} is empty: the encoder needs at least one token (T5's tokenizer appends </s>)"
            )));
        }
        let (ids, key_mask) = right_pad(sources, self.config().pad_id(), self.device_ref())?;
        self.encode(
            &ids,
            &key_mask,
            ForwardMode::Inference,
            &Dropout::inactive(),
        )
    }

    fn sum_log_likelihoods(&self, enc: &EncoderState, targets: &[&[u32]]) -> Result<Vec<f64>> {
        let mut out = vec![0.0; targets.len()];
        if targets.iter().all(|t| t.is_empty()) {
            return Ok(out);
        }
        let ll = self.target_label_logits(enc, targets)?;
        let logp = ll
            .target_log_probs()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        for (row, lp) in ll.rows.iter().zip(logp) {
            out[*row] += lp;
        }
        Ok(out)
    }
}

impl LanguageModel for T5 {
    fn device(&self) -> &Device {
        self.device_ref()
    }
    fn adapter_sites(&self) -> &AdapterSites {
        self.sites()
    }
    fn adapter_sites_mut(&mut self) -> &mut AdapterSites {
        self.sites_mut()
    }

    /// Logits `(batch, label_len, vocab)` of the teacher-forced decoder.
    fn forward_logits(&self, batch: &LmBatch, mode: ForwardMode) -> Result<Tensor> {
        let labels = self.label_rows(batch)?;
        let h = self.batch_decoder_states(batch, &labels, mode)?;
        self.lm_logits(&h, mode)
    }

    fn label_logits(&self, batch: &LmBatch, mode: ForwardMode) -> Result<LabelLogits> {
        let labels = self.label_rows(batch)?;
        let h = self.batch_decoder_states(batch, &labels, mode)?;
        self.gather_label_logits(&h, &labels, mode)
    }

    /// Greedy decoding of each source (batched; the encoder runs once, the
    /// cross-attention keys/values are computed once, the decoder's
    /// self-attention is cached). Each result holds the new tokens, stopping
    /// before an EOS, as transformers' `generate(do_sample=False, num_beams=1)`.
    fn generate(&self, prompts: &[Vec<u32>], opts: &GenerateOptions) -> Result<Vec<Vec<u32>>> {
        let b = prompts.len();
        let mut out = vec![Vec::new(); b];
        if b == 0 || opts.max_new_tokens == 0 {
            return Ok(out);
        }
        let sources: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let enc = self.encode_sources(&sources)?;
        let mode = ForwardMode::Inference;
        let dropout = Dropout::inactive();
        let mut cache = self.new_cache(&enc)?;
        let mut step = vec![self.config().decoder_start_id(); b];
        let mut finished = vec![false; b];
        for _ in 0..opts.max_new_tokens {
            let input = Tensor::from_vec(step.clone(), (b, 1), self.device_ref())?;
            let h = self.decode(&input, &enc, Some(&mut cache), mode, &dropout)?;
            let next = self
                .lm_logits(&h.squeeze(1)?, mode)?
                .argmax(D::Minus1)?
                .to_vec1::<u32>()?;
            for (r, &tok) in next.iter().enumerate() {
                if finished[r] {
                    step[r] = opts.pad_token_id;
                    continue;
                }
                if opts.eos_token_ids.contains(&tok) {
                    finished[r] = true;
                } else {
                    out[r].push(tok);
                }
                step[r] = tok;
            }
            if finished.iter().all(|&f| f) {
                break;
            }
        }
        Ok(out)
    }

    /// Sum log-likelihood of each candidate target given the source `prompt`;
    /// the encoder runs once for all candidates.
    fn score(&self, prompt: &[u32], candidates: &[Vec<u32>]) -> Result<Vec<f64>> {
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let enc = self
            .encode_sources(&[prompt])?
            .repeat_first(candidates.len())?;
        let targets: Vec<&[u32]> = candidates.iter().map(Vec::as_slice).collect();
        self.sum_log_likelihoods(&enc, &targets)
    }
}
