//! One training stage: AdamW on the trainable variables only (the current
//! adapters, or every linear weight for full fine-tuning), over the stage's
//! examples (plus Replay's memory) for the configured epochs, with gradient accumulation, optional
//! clipping and schedule, checkpoints every N steps, and a stop (or skip) on
//! a non-finite loss or gradient.
use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use indicatif::ProgressBar;
use nlora_adapter::ForwardMode;
use nlora_data::EncodedExample;
use nlora_model::lm::LanguageModel;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::arch::Batching;
use crate::checkpoint::{named_trainable, restore_params, StageCheckpoint, StageProgress};
use crate::config::{OnNonFinite, RunConfig, Schedule};
use crate::error::{Result, TrainError};
use crate::fault::{self, NanPart};
use crate::method::Method;
use crate::monitor::{describe, StageMonitor};
use crate::optim::{AdamW, AdamWParams};

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
}

/// A mid-stage checkpoint to continue from, and where it was read from (for
/// error messages).
pub struct StageResume<'a> {
    pub checkpoint: &'a StageCheckpoint,
    pub dir: &'a Path,
}

/// Receives a checkpoint every `train.checkpoint_every` optimizer steps.
pub type CheckpointSink<'a> = dyn FnMut(&StageCheckpoint) -> Result<()> + 'a;

/// Trains the current adapters through one stage, from its start or from a
/// mid-stage checkpoint. Each checkpoint is taken right after an optimizer
/// step (no gradients pending), so the adapters, AdamW's moments and the
/// position in the stage are all it needs.
#[allow(clippy::too_many_arguments)]
pub fn train_stage(
    model: &mut dyn LanguageModel,
    method: &dyn Method,
    cfg: &RunConfig,
    batching: &Batching<'_>,
    input: &StageInput<'_>,
    bar: &ProgressBar,
    resume: Option<StageResume<'_>>,
    on_checkpoint: &mut CheckpointSink<'_>,
    mut monitor: Option<&mut StageMonitor>,
) -> Result<StageStats> {
    let stage = input.stage;
    let named = named_trainable(model.adapter_sites());
    if named.is_empty() {
        return Err(TrainError::Other(format!(
            "stage {}: the method left nothing trainable",
            stage + 1
        )));
    }
    let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
    let names: Vec<String> = named.iter().map(|(n, _)| n.clone()).collect();
    let base_lr = cfg.train.lr.get(stage);
    let epochs = cfg.train.epochs.get(stage);
    let bs = cfg.train.batch_size;
    let accum = cfg.train.grad_accum;
    // Replay's memory takes some of each batch's slots.
    let slots = method.memory_slots(bs);
    let batches_per_epoch = input.examples.len().div_ceil(bs - slots);
    let total_batches = batches_per_epoch * epochs;
    let total_steps = total_batches.div_ceil(accum);
    let mut opt = AdamW::new(
        named,
        AdamWParams {
            lr: base_lr,
            weight_decay: cfg.train.weight_decay,
            ..Default::default()
        },
    )?;
    let mut stats = StageStats::default();
    let mut micro = 0usize;
    let mut start_batch = 0usize;
    let mut seconds_before = 0f64;
    if let Some(r) = resume {
        let p = &r.checkpoint.progress;
        if p.stage != stage || p.batches_done > total_batches {
            return Err(TrainError::File {
                path: r.dir.to_path_buf(),
                message: format!(
                    "checkpoint of task {} after {} batches does not fit task {} with {total_batches} batches: the run's config changed",
                    p.stage + 1,
                    p.batches_done,
                    stage + 1
                ),
            });
        }
        restore_params(model.adapter_sites(), &r.checkpoint.params, r.dir)?;
        let moments: HashMap<String, Tensor> = r.checkpoint.optimizer.iter().cloned().collect();
        opt.restore(&moments, p.steps)
            .map_err(|e| TrainError::File {
                path: r.dir.join(crate::checkpoint::OPTIMIZER_FILE),
                message: e.to_string(),
            })?;
        stats = StageStats {
            steps: p.steps,
            tokens: p.tokens,
            skipped_batches: p.skipped_batches,
            last_loss: p.last_loss,
        };
        micro = p.micro;
        start_batch = p.batches_done;
        seconds_before = p.train_seconds;
        if let (Some(m), Some(snapshot)) = (monitor.as_deref_mut(), &p.monitor) {
            m.restore(snapshot);
        }
    }
    if let Some(c) = monitor.as_deref().and_then(|m| m.controller.as_ref()) {
        if !method.set_lambda(c.lambda()) {
            return Err(TrainError::Config(format!(
                "`method.auto_lambda` needs an l1 term, and method `{}` has none",
                method.name()
            )));
        }
    }
    let mut reading = monitor
        .as_deref()
        .and_then(|m| m.records.last())
        .map(describe);
    bar.set_length(total_batches as u64);
    bar.set_position(start_batch as u64);
    let device = model.device().clone();
    let mut acc_grads: Option<GradStore> = None;
    let started = std::time::Instant::now();
    let tokens_before = stats.tokens;
    let optimizer_step = |opt: &mut AdamW, mut grads: GradStore, stats: &mut StageStats| {
        if let Some(max) = cfg.train.clip_grad_norm {
            clip_grads(&mut grads, &vars, max)?;
        }
        fault::pause_at(&format!("step:{}:{}", stage + 1, stats.steps + 1));
        opt.set_learning_rate(lr_at(
            cfg.train.schedule,
            base_lr,
            cfg.train.warmup_steps,
            stats.steps,
            total_steps,
        ));
        opt.step(&grads)?;
        stats.steps += 1;
        Ok::<(), TrainError>(())
    };
    // What to do with a non-finite part: Ok(()) to skip the batch, or the error.
    let nonfinite = |part: String, value: f64, steps: usize, batch: usize| -> Result<()> {
        match cfg.train.on_nonfinite {
            OnNonFinite::Stop => Err(TrainError::NonFinite {
                part,
                task: stage + 1,
                task_name: input.task_name.to_string(),
                step: steps + 1,
                value,
            }),
            OnNonFinite::Skip => {
                tracing::warn!(
                    "task {} ({}) step {} batch {}: non-finite {part} ({value}); batch skipped",
                    stage + 1,
                    input.task_name,
                    steps + 1,
                    batch + 1
                );
                Ok(())
            }
        }
    };
    for epoch in start_batch / batches_per_epoch.max(1)..epochs {
        let order = epoch_order(input.examples.len(), cfg.seed, stage, epoch);
        for (bi, chunk) in order.chunks(bs - slots).enumerate() {
            let counter = epoch * batches_per_epoch + bi;
            if counter < start_batch {
                continue;
            }
            let injected = fault::nan_at(stage, counter);
            let items = batch_items(
                method,
                &input.examples,
                chunk,
                slots,
                cfg.seed,
                stage,
                counter,
            );
            let (batch, tokens) = batching.lm_batch(&items, &device)?;
            let dropout_seed = derive_seed(cfg.seed, stage, 2, counter as u64);
            let mut batch_parts = method.batch_loss(
                &*model,
                &batch,
                ForwardMode::Train {
                    dropout_seed: Some(dropout_seed),
                },
                stage,
            )?;
            let mut task_loss = batch_parts.remove(0).value;
            if injected == Some(NanPart::Loss) {
                task_loss = task_loss.affine(1.0, f64::NAN)?;
            }
            let mut parts = batch_parts;
            parts.extend(method.penalty(model.adapter_sites(), stage)?);
            let mut total = task_loss.clone();
            let mut shown = vec![("task", scalar(&task_loss)?)];
            for p in &parts {
                total = (total + &p.value)?;
                shown.push((p.name, scalar(&p.value)?));
            }
            if counter == 0 {
                // Full precision: the first batch's loss is the base model's
                // (B starts at zero), which other frameworks check against.
                let text: Vec<String> = shown.iter().map(|(n, v)| format!("{n} {v}")).collect();
                tracing::info!(
                    "task {} ({}) first batch: loss parts {}",
                    stage + 1,
                    input.task_name,
                    text.join(", ")
                );
            }
            if let Some(&(part, value)) = shown.iter().find(|(_, v)| !v.is_finite()) {
                nonfinite(format!("{part} loss"), value, stats.steps, counter)?;
                stats.skipped_batches += 1;
                bar.inc(1);
                continue;
            }
            let scaled = if accum > 1 {
                total.affine(1.0 / accum as f64, 0.0)?
            } else {
                total
            };
            let mut grads = scaled.backward()?;
            if injected == Some(NanPart::Grad) {
                if let Some(g) = grads.get(vars[0].as_tensor()) {
                    let poisoned = g.affine(0.0, f64::NAN)?;
                    grads.insert(vars[0].as_tensor(), poisoned);
                }
            }
            // A finite loss can still have a non-finite gradient (an overflow
            // in the backward pass): checked before it reaches AdamW's moments.
            if let Some((name, value)) = first_nonfinite_grad(&grads, &vars, &names)? {
                let loss_text: Vec<String> =
                    shown.iter().map(|(n, v)| format!("{n} {v:.4}")).collect();
                nonfinite(
                    format!("gradient of {name} (loss parts: {})", loss_text.join(", ")),
                    value,
                    stats.steps,
                    counter,
                )?;
                stats.skipped_batches += 1;
                bar.inc(1);
                continue;
            }
            match acc_grads.as_mut() {
                None => acc_grads = Some(grads),
                Some(acc) => add_grads(acc, &grads, &vars)?,
            }
            micro += 1;
            stats.tokens += tokens;
            stats.last_loss = shown.iter().map(|p| p.1).sum();
            let last_of_epoch = bi + 1 == batches_per_epoch;
            if micro % accum == 0 || (last_of_epoch && epoch + 1 == epochs) {
                let grads = acc_grads.take().expect("accumulated above");
                optimizer_step(&mut opt, grads, &mut stats)?;
                if let Some(m) = monitor.as_deref_mut() {
                    if m.due(stats.steps, total_steps) {
                        let r = m.read(model.adapter_sites(), stats.steps)?;
                        if let Some(l) = r.lambda {
                            method.set_lambda(l);
                        }
                        tracing::info!(
                            "task {} ({}) step {}/{total_steps}: {}",
                            stage + 1,
                            input.task_name,
                            stats.steps,
                            describe(&r)
                        );
                        reading = Some(describe(&r));
                    }
                }
                let every = cfg.train.checkpoint_every;
                // The stage's last step needs none: the task end saves the adapter.
                if every > 0 && stats.steps % every == 0 && counter + 1 < total_batches {
                    let checkpoint = StageCheckpoint {
                        progress: StageProgress {
                            stage,
                            batches_done: counter + 1,
                            micro,
                            steps: stats.steps,
                            tokens: stats.tokens,
                            skipped_batches: stats.skipped_batches,
                            last_loss: stats.last_loss,
                            train_seconds: seconds_before + started.elapsed().as_secs_f64(),
                            monitor: monitor.as_deref().map(StageMonitor::snapshot),
                        },
                        params: names
                            .iter()
                            .zip(&vars)
                            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
                            .collect(),
                        optimizer: opt.state_tensors(),
                    };
                    on_checkpoint(&checkpoint)?;
                }
            }
            let secs = started.elapsed().as_secs_f64().max(1e-9);
            let parts_text: Vec<String> =
                shown.iter().map(|(n, v)| format!("{n} {v:.4}")).collect();
            bar.set_message(format!(
                "epoch {}/{epochs} loss {:.4} ({}) {:.0} tok/s{}",
                epoch + 1,
                stats.last_loss,
                parts_text.join(", "),
                (stats.tokens - tokens_before) as f64 / secs,
                reading
                    .as_deref()
                    .map(|r| format!(" | {r}"))
                    .unwrap_or_default()
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
    // Only when skipped batches ended the stage mid-accumulation: what was
    // accumulated still counts.
    if let Some(grads) = acc_grads.take() {
        optimizer_step(&mut opt, grads, &mut stats)?;
    }
    Ok(stats)
}

/// The shuffled order of a stage's examples in one epoch.
fn epoch_order(n: usize, seed: u64, stage: usize, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(derive_seed(seed, stage, 1, epoch as u64));
    order.shuffle(&mut rng);
    order
}

/// One batch: the chunk's examples of the stage, then `slots` memory
/// examples drawn for this batch (Replay).
fn batch_items<'a>(
    method: &'a dyn Method,
    examples: &[&'a EncodedExample],
    chunk: &[usize],
    slots: usize,
    seed: u64,
    stage: usize,
    counter: usize,
) -> Vec<&'a EncodedExample> {
    let mut items: Vec<&EncodedExample> = chunk.iter().map(|&i| examples[i]).collect();
    if slots > 0 {
        items.extend(method.memory_examples(slots, derive_seed(seed, stage, 6, counter as u64)));
    }
    items
}

/// Every batch of a stage in training order, as [`train_stage`] builds them
/// (`nlora data export` writes these for other frameworks to replay).
pub fn stage_batches<'a>(
    method: &'a dyn Method,
    examples: &[&'a EncodedExample],
    batch_size: usize,
    epochs: usize,
    seed: u64,
    stage: usize,
) -> Vec<Vec<&'a EncodedExample>> {
    let slots = method.memory_slots(batch_size);
    let per_epoch = examples.len().div_ceil(batch_size - slots);
    let mut out = Vec::new();
    for epoch in 0..epochs {
        let order = epoch_order(examples.len(), seed, stage, epoch);
        for (bi, chunk) in order.chunks(batch_size - slots).enumerate() {
            let counter = epoch * per_epoch + bi;
            out.push(batch_items(
                method, examples, chunk, slots, seed, stage, counter,
            ));
        }
    }
    out
}

/// The first variable whose gradient has a NaN or an infinity, with the
/// gradient's sum of squares (non-finite then), if any.
fn first_nonfinite_grad(
    grads: &GradStore,
    vars: &[Var],
    names: &[String],
) -> Result<Option<(String, f64)>> {
    for (v, name) in vars.iter().zip(names) {
        if let Some(g) = grads.get(v.as_tensor()) {
            // In f64 a finite f32 gradient cannot overflow the sum.
            let sq = g
                .to_dtype(candle_core::DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
            if !sq.is_finite() {
                return Ok(Some((name.clone(), sq)));
            }
        }
    }
    Ok(None)
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
