//! One training stage: AdamW on the trainable adapters only, over the stage's
//! examples for the configured epochs, with gradient accumulation, optional
//! clipping and schedule, and a stop (or skip) on a non-finite loss.
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use indicatif::ProgressBar;
use nlora_adapter::ForwardMode;
use nlora_data::{DecoderBatcher, EncodedExample, SpecialTokens};
use nlora_model::lm::{LanguageModel, LmBatch, IGNORE_INDEX};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::config::{OnNonFinite, RunConfig, Schedule};
use crate::error::{Result, TrainError};
use crate::method::Method;

/// What a stage did, for results and logs.
#[derive(Debug, Clone, Default)]
pub struct StageStats {
    pub steps: usize,
    pub tokens: u64,
    pub skipped_batches: usize,
    pub last_loss: f64,
}

/// A stable seed for (run seed, stage, purpose, counter): every random stream
/// of a run is a function of these, so a resumed run repeats them exactly.
pub fn derive_seed(seed: u64, stage: usize, purpose: u64, counter: u64) -> u64 {
    let mut z = seed
        ^ (stage as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ purpose.wrapping_mul(0xD1B5_4A32_D192_ED03)
        ^ counter.wrapping_mul(0xA24B_AED4_963E_E407);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Turns a tokenised decoder batch into the model's batch (labels only where
/// the loss mask is set).
pub fn to_lm_batch(
    batcher: &DecoderBatcher<'_, dyn nlora_data::PlainTokenizer + '_>,
    items: &[&EncodedExample],
    device: &candle_core::Device,
) -> Result<(LmBatch, u64)> {
    let b = batcher.train_batch(items.iter().copied())?;
    let labels: Vec<i64> = b
        .input_ids
        .iter()
        .zip(&b.loss_mask)
        .map(|(&id, &m)| if m == 1 { id as i64 } else { IGNORE_INDEX })
        .collect();
    let mask: Vec<u32> = b.attention_mask.iter().map(|&m| m as u32).collect();
    let tokens = mask.iter().map(|&m| m as u64).sum();
    let shape = (b.batch_size, b.seq_len);
    let batch = LmBatch::new(
        Tensor::from_vec(b.input_ids, shape, device)?,
        Tensor::from_vec(mask, shape, device)?,
        Tensor::from_vec(labels, shape, device)?,
    )?;
    Ok((batch, tokens))
}

fn lr_at(schedule: Schedule, base: f64, warmup: usize, step: usize, total: usize) -> f64 {
    if warmup > 0 && step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let t = (step.saturating_sub(warmup)) as f64 / span;
    match schedule {
        Schedule::Constant => base,
        Schedule::Linear => base * (1.0 - t).max(0.0),
        Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos()),
    }
}

fn add_grads(acc: &mut GradStore, new: &GradStore, vars: &[Var]) -> Result<()> {
    for v in vars {
        if let Some(g) = new.get(v.as_tensor()) {
            let sum = match acc.get(v.as_tensor()) {
                Some(a) => (a + g)?,
                None => g.clone(),
            };
            acc.insert(v.as_tensor(), sum);
        }
    }
    Ok(())
}

fn clip_grads(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    let norm = sq.sqrt();
    if norm > max_norm {
        let f = max_norm / (norm + 1e-6);
        for v in vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let scaled = g.affine(f, 0.0)?;
                grads.insert(v.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

pub struct StageInput<'a> {
    pub stage: usize,
    pub task_name: &'a str,
    pub examples: Vec<&'a EncodedExample>,
    pub special: SpecialTokens,
}

/// Trains the current adapters through one stage.
#[allow(clippy::too_many_arguments)]
pub fn train_stage(
    model: &mut dyn LanguageModel,
    method: &dyn Method,
    cfg: &RunConfig,
    batcher: &DecoderBatcher<'_, dyn nlora_data::PlainTokenizer + '_>,
    input: &StageInput<'_>,
    bar: &ProgressBar,
) -> Result<StageStats> {
    let stage = input.stage;
    let vars = model.adapter_sites().trainable_vars();
    if vars.is_empty() {
        return Err(TrainError::Other(format!(
            "stage {}: the method left nothing trainable",
            stage + 1
        )));
    }
    let base_lr = cfg.train.lr.get(stage);
    let epochs = cfg.train.epochs.get(stage);
    let bs = cfg.train.batch_size;
    let accum = cfg.train.grad_accum;
    let batches_per_epoch = input.examples.len().div_ceil(bs);
    let total_steps = (batches_per_epoch * epochs).div_ceil(accum);
    let mut opt = AdamW::new(
        vars.clone(),
        ParamsAdamW {
            lr: base_lr,
            weight_decay: cfg.train.weight_decay,
            ..Default::default()
        },
    )?;
    bar.set_length((batches_per_epoch * epochs) as u64);
    bar.set_position(0);
    let device = model.device().clone();
    let mut stats = StageStats::default();
    let mut micro = 0usize;
    let mut acc_grads: Option<GradStore> = None;
    let started = std::time::Instant::now();
    for epoch in 0..epochs {
        let mut order: Vec<usize> = (0..input.examples.len()).collect();
        let mut rng =
            rand::rngs::StdRng::seed_from_u64(derive_seed(cfg.seed, stage, 1, epoch as u64));
        order.shuffle(&mut rng);
        for (bi, chunk) in order.chunks(bs).enumerate() {
            let items: Vec<&EncodedExample> = chunk.iter().map(|&i| input.examples[i]).collect();
            let (batch, tokens) = to_lm_batch(batcher, &items, &device)?;
            let step_counter = (epoch * batches_per_epoch + bi) as u64;
            let dropout_seed = derive_seed(cfg.seed, stage, 2, step_counter);
            let task_loss = model.loss(
                &batch,
                ForwardMode::Train {
                    dropout_seed: Some(dropout_seed),
                },
            )?;
            let parts = method.penalty(model.adapter_sites(), stage)?;
            let mut total = task_loss.clone();
            let mut shown = vec![("task", scalar(&task_loss)?)];
            for p in &parts {
                total = (total + &p.value)?;
                shown.push((p.name, scalar(&p.value)?));
            }
            let bad = shown.iter().find(|(_, v)| !v.is_finite()).copied();
            if let Some((part, value)) = bad {
                match cfg.train.on_nonfinite {
                    OnNonFinite::Stop => {
                        return Err(TrainError::NonFinite {
                            part: format!("{part} loss"),
                            task: stage + 1,
                            task_name: input.task_name.to_string(),
                            step: stats.steps + 1,
                            value,
                        })
                    }
                    OnNonFinite::Skip => {
                        tracing::warn!(
                            "stage {} step {}: non-finite {part} loss {value}; batch skipped",
                            stage + 1,
                            stats.steps + 1
                        );
                        stats.skipped_batches += 1;
                        bar.inc(1);
                        continue;
                    }
                }
            }
            let scaled = if accum > 1 {
                total.affine(1.0 / accum as f64, 0.0)?
            } else {
                total
            };
            let grads = scaled.backward()?;
            match acc_grads.as_mut() {
                None => acc_grads = Some(grads),
                Some(acc) => add_grads(acc, &grads, &vars)?,
            }
            micro += 1;
            stats.tokens += tokens;
            let last_of_epoch = bi + 1 == batches_per_epoch;
            if micro % accum == 0 || (last_of_epoch && epoch + 1 == epochs) {
                let mut grads = acc_grads.take().expect("accumulated above");
                if let Some(max) = cfg.train.clip_grad_norm {
                    clip_grads(&mut grads, &vars, max)?;
                }
                opt.set_learning_rate(lr_at(
                    cfg.train.schedule,
                    base_lr,
                    cfg.train.warmup_steps,
                    stats.steps,
                    total_steps,
                ));
                opt.step(&grads)?;
                stats.steps += 1;
            }
            stats.last_loss = shown.iter().map(|p| p.1).sum();
            let secs = started.elapsed().as_secs_f64().max(1e-9);
            let parts_text: Vec<String> =
                shown.iter().map(|(n, v)| format!("{n} {v:.4}")).collect();
            bar.set_message(format!(
                "epoch {}/{epochs} loss {:.4} ({}) {:.0} tok/s",
                epoch + 1,
                stats.last_loss,
                parts_text.join(", "),
                stats.tokens as f64 / secs
            ));
            bar.inc(1);
            if stats.steps > 0 && micro % (accum * 10) == 0 {
                tracing::debug!(
                    "stage {} epoch {} step {}: {}",
                    stage + 1,
                    epoch + 1,
                    stats.steps,
                    parts_text.join(", ")
                );
            }
        }
    }
    Ok(stats)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        assert_eq!(lr_at(Schedule::Constant, 1e-3, 0, 5, 10), 1e-3);
        assert!((lr_at(Schedule::Linear, 1.0, 0, 5, 10) - 0.5).abs() < 1e-12);
        assert!((lr_at(Schedule::Cosine, 1.0, 0, 5, 10) - 0.5).abs() < 1e-12);
        assert!((lr_at(Schedule::Constant, 1.0, 4, 1, 10) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn derived_seeds_differ_by_every_component() {
        let s = derive_seed(1, 0, 1, 0);
        assert_ne!(s, derive_seed(2, 0, 1, 0));
        assert_ne!(s, derive_seed(1, 1, 1, 0));
        assert_ne!(s, derive_seed(1, 0, 2, 0));
        assert_ne!(s, derive_seed(1, 0, 1, 1));
        assert_eq!(s, derive_seed(1, 0, 1, 0));
    }
}
