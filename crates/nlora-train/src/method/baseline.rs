//! SeqFT, and the training the other baselines (Replay, EWC, LwF) share:
//! with `method.trainable = "full"` every linear weight of the model trains
//! (all attention and MLP projections of every layer, whatever
//! `model.target_modules` says; embeddings, the tied output head and the
//! norm weights stay frozen), task after task, nothing frozen between tasks;
//! with `"lora"` one LoRA adapter on the target modules trains through all
//! tasks (SeqLoRA).
//!
//! Task ends in full mode: the task's folder holds the changed weights,
//! `model.safetensors` with Hugging Face names (`model.layers.0.mlp.up_proj.weight`,
//! f32). Each is a whole copy of the linear weights (~0.43 GB for SmolLM2-135M),
//! and the weights after task k contain everything a resume needs, so once
//! task k+1's are saved and state.json records it, task k's file is removed:
//! a run keeps only the latest copy. In lora mode each task keeps its PEFT adapter.
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use nlora_adapter::{AdapterSites, LoraConfig};
use nlora_model::lm::LanguageModel;

use super::{Method, StageContext};
use crate::checkpoint::{load_safetensors, named_trainable, safetensors_bytes};
use crate::config::{MethodName, Trainable};
use crate::error::{Result, TrainError};
use crate::rundir::atomic_write;

/// The full model's linear weights at a task's end (full mode).
pub const FULL_WEIGHTS_FILE: &str = "model.safetensors";

/// The output head: tied to the token embeddings in SmolLM2 (and T5), which
/// the baselines keep frozen.
const OUTPUT_HEAD: &str = "lm_head";

pub struct Baseline {
    name: MethodName,
    trainable: Trainable,
    /// The stage whose end the model's weights hold, for the resume check.
    at_stage_end: Option<usize>,
    /// Folders holding a weights file, oldest first; all but the newest are
    /// emptied at a task end (their files are superseded).
    saved: Vec<PathBuf>,
    /// Files besides the weights that a task end writes (EWC's Fisher):
    /// removed with them.
    pub(crate) extra_files: Vec<&'static str>,
}

impl Baseline {
    pub fn new(name: MethodName, trainable: Trainable) -> Self {
        Self {
            name,
            trainable,
            at_stage_end: None,
            saved: Vec::new(),
            extra_files: Vec::new(),
        }
    }

    pub fn trainable(&self) -> Trainable {
        self.trainable
    }

    fn open_full(sites: &mut AdapterSites) -> Result<()> {
        let n = sites.open_base_weights(|path| path != OUTPUT_HEAD)?;
        if n == 0 {
            return Err(TrainError::Other(
                "full fine-tuning found no linear layer to train in this model".into(),
            ));
        }
        Ok(())
    }

    /// Full mode: the weights of the earlier task's end must be in place
    /// (a resume that lost them would otherwise train from the base model).
    fn check_resumed(&self, stage: usize) -> Result<()> {
        if self.trainable == Trainable::Full && stage > 0 && self.at_stage_end != Some(stage - 1) {
            return Err(TrainError::Other(format!(
                "{}: task {} starts from the weights at the end of task {stage}, but they were not restored \
                 (the task folder's {FULL_WEIGHTS_FILE} is missing): start the run again",
                self.name.as_str(),
                stage + 1
            )));
        }
        Ok(())
    }

    fn remove_superseded(&mut self) -> Result<()> {
        let keep = self.saved.len().saturating_sub(1);
        for dir in self.saved.drain(..keep) {
            for file in std::iter::once(FULL_WEIGHTS_FILE).chain(self.extra_files.iter().copied()) {
                remove_file(&dir.join(file))?;
            }
        }
        Ok(())
    }
}

fn remove_file(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(TrainError::File {
            path: path.to_path_buf(),
            message: format!("cannot remove this superseded file: {e}"),
        }),
    }
}

/// Writes named tensors as one safetensors file, atomically.
pub(crate) fn save_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    atomic_write(path, &safetensors_bytes(path, tensors)?)
}

/// Sets the trainable variables from a file with exactly their names and shapes.
pub(crate) fn load_into_trainable(sites: &AdapterSites, path: &Path) -> Result<()> {
    let device = sites
        .iter()
        .next()
        .map(|(_, s)| s.base().weight().device().clone())
        .unwrap_or(candle_core::Device::Cpu);
    let mut tensors: Vec<(String, Tensor)> = load_safetensors(path, &device)?.into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    crate::checkpoint::restore_params_from(sites, &tensors, path)
}

impl Method for Baseline {
    fn name(&self) -> &'static str {
        self.name.as_str()
    }

    fn begin_stage(
        &mut self,
        sites: &mut AdapterSites,
        stage: usize,
        lora: &LoraConfig,
        seed: u64,
    ) -> Result<()> {
        match self.trainable {
            Trainable::Full => Self::open_full(sites)?,
            Trainable::Lora if stage == 0 => sites.init_new_adapters(lora, seed)?,
            Trainable::Lora => {}
        }
        self.check_resumed(stage)
    }

    fn end_stage(&mut self, _sites: &mut AdapterSites, stage: usize) -> Result<()> {
        self.at_stage_end = Some(stage);
        // Called once state.json records this stage's save: the older copy
        // is no longer what any resume would read.
        self.remove_superseded()
    }

    fn save_stage(&self, model: &dyn LanguageModel, ctx: &StageContext<'_, '_>) -> Result<()> {
        match self.trainable {
            Trainable::Full => save_tensors(
                &ctx.dir.join(FULL_WEIGHTS_FILE),
                &named_trainable(model.adapter_sites())
                    .into_iter()
                    .map(|(n, v)| (n, v.as_tensor().detach()))
                    .collect::<Vec<_>>(),
            ),
            Trainable::Lora => {
                let mut adapter = model.adapter_sites().current_as_peft(ctx.model_name)?;
                adapter.config.task_type = Some(ctx.batching.peft_task_type().into());
                adapter.save(ctx.dir)?;
                Ok(())
            }
        }
    }

    fn restore_from(
        &mut self,
        model: &mut dyn LanguageModel,
        ctx: &StageContext<'_, '_>,
    ) -> Result<()> {
        match self.trainable {
            Trainable::Full => {
                let sites = model.adapter_sites_mut();
                Self::open_full(sites)?;
                let path = ctx.dir.join(FULL_WEIGHTS_FILE);
                // Absent when a later task's copy superseded it: that one is
                // restored after this.
                if path.exists() {
                    load_into_trainable(sites, &path)?;
                    self.saved.push(ctx.dir.to_path_buf());
                    self.at_stage_end = Some(ctx.stage);
                }
                Ok(())
            }
            Trainable::Lora => {
                let device = model.device().clone();
                let adapter = crate::engine::load_stage_adapter(ctx.dir, ctx.lora, &device)?;
                model.adapter_sites_mut().set_current_from_peft(&adapter)?;
                self.at_stage_end = Some(ctx.stage);
                Ok(())
            }
        }
    }

    fn after_training(
        &mut self,
        _model: &mut dyn LanguageModel,
        ctx: &StageContext<'_, '_>,
    ) -> Result<()> {
        if self.trainable == Trainable::Full {
            self.saved.push(ctx.dir.to_path_buf());
        }
        Ok(())
    }
}
