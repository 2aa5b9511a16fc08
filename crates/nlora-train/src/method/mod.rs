//! Continual-learning methods. The training loop knows nothing about any
//! particular method: a method decides what trains (`begin_stage`), what
//! penalty joins the task loss (`penalty`), what happens at a task's end
//! (`end_stage`), and which adapter answers for which task at evaluation
//! (`before_eval`). Each method is one small file.
//!
//! The classic baselines (SeqFT, Replay, EWC, LwF: `baseline.rs` and one
//! file each) need more than the adapter sites: the model and the stage's
//! data at a task's end (`after_training`), their own task-end files
//! (`save_stage` / `restore_from`), a loss that runs the model
//! (`batch_loss`) and memory examples in the batches (`memory_examples`).
//! Every such hook has a default that keeps the LoRA methods as they were.
use std::path::Path;

use candle_core::Tensor;
use nlora_adapter::{AdapterSites, ForwardMode, LoraConfig, PeftAdapter};
use nlora_data::EncodedExample;
use nlora_math::penalty::Site;
use nlora_model::lm::{LanguageModel, LmBatch};

use crate::arch::Batching;
use crate::config::{HistoryMode, MethodName, MethodSection};
use crate::error::{Result, TrainError};

mod baseline;
mod ewc;
mod inclora;
mod lwf;
mod mtl;
mod pertask;
mod replay;
mod seqlora;

pub use baseline::{Baseline, FULL_WEIGHTS_FILE};
pub use ewc::{diagonal_fisher, ewc_penalty, Ewc, FISHER_FILE};
pub use inclora::{IncLora, Penalties};
pub use lwf::{distillation_kl, Lwf};
pub use mtl::Mtl;
pub use pertask::PerTaskLora;
pub use replay::{Replay, ReplayMemory};
pub use seqlora::SeqLora;

/// What a method sees of a stage beyond the adapter sites.
pub struct StageContext<'a, 'b> {
    /// 0-based stage.
    pub stage: usize,
    /// The stage's training examples.
    pub examples: &'a [&'a EncodedExample],
    pub batching: &'a Batching<'b>,
    /// The stage's folder in the run directory (`task-K-NAME`).
    pub dir: &'a Path,
    pub lora: &'a LoraConfig,
    /// Recorded as the PEFT adapter's base model.
    pub model_name: &'a str,
    pub seed: u64,
}

/// A named part of the loss, so progress and NaN messages can say which.
pub struct LossPart {
    pub name: &'static str,
    pub value: Tensor,
}

pub trait Method {
    fn name(&self) -> &'static str;

    /// The training stages and the tasks whose data each sees: one stage per
    /// task by default; MTL has a single stage over all tasks.
    fn stages(&self, n_tasks: usize) -> Vec<Vec<usize>> {
        (0..n_tasks).map(|t| vec![t]).collect()
    }

    /// Before a stage's first step: install what trains.
    fn begin_stage(
        &mut self,
        sites: &mut AdapterSites,
        stage: usize,
        lora: &LoraConfig,
        seed: u64,
    ) -> Result<()>;

    /// The penalty terms added to the task loss at this stage (may be empty).
    fn penalty(&self, _sites: &AdapterSites, _stage: usize) -> Result<Vec<LossPart>> {
        Ok(Vec::new())
    }

    /// `method.auto_lambda`: the l1 term's lambda from now on, set by the
    /// density controller between steps. False when the method has no l1
    /// term (config validation refuses auto lambda for those).
    fn set_lambda(&self, _lambda: f64) -> bool {
        false
    }

    /// After a stage's last step, once its adapter has been saved.
    fn end_stage(&mut self, sites: &mut AdapterSites, stage: usize) -> Result<()>;

    /// The loss parts of one training batch, the task loss first (named
    /// "task"); LwF adds its distillation term here.
    fn batch_loss(
        &self,
        model: &dyn LanguageModel,
        batch: &LmBatch,
        mode: ForwardMode,
        _stage: usize,
    ) -> Result<Vec<LossPart>> {
        Ok(vec![LossPart {
            name: "task",
            value: model.loss(batch, mode)?,
        }])
    }

    /// How many of each batch's `batch_size` slots memory examples take
    /// (Replay, once it remembers a task); the rest are the stage's own.
    fn memory_slots(&self, _batch_size: usize) -> usize {
        0
    }

    /// `n` memory examples for one batch, drawn with `seed`.
    fn memory_examples(&self, _n: usize, _seed: u64) -> Vec<&EncodedExample> {
        Vec::new()
    }

    /// After a stage's training, before its end is saved: what the method
    /// keeps of the task (EWC's Fisher, Replay's memory).
    fn after_training(
        &mut self,
        _model: &mut dyn LanguageModel,
        _ctx: &StageContext<'_, '_>,
    ) -> Result<()> {
        Ok(())
    }

    /// Saves the end of a stage into `ctx.dir`: by default the current
    /// adapter in PEFT form.
    fn save_stage(&self, model: &dyn LanguageModel, ctx: &StageContext<'_, '_>) -> Result<()> {
        let mut adapter = model.adapter_sites().current_as_peft(ctx.model_name)?;
        adapter.config.task_type = Some(ctx.batching.peft_task_type().into());
        adapter.save(ctx.dir)?;
        Ok(())
    }

    /// Resume: brings the model to the state right after `end_stage` of
    /// `ctx.stage` from what [`Method::save_stage`] wrote.
    fn restore_from(
        &mut self,
        model: &mut dyn LanguageModel,
        ctx: &StageContext<'_, '_>,
    ) -> Result<()> {
        let device = model.device().clone();
        let adapter = crate::engine::load_stage_adapter(ctx.dir, ctx.lora, &device)?;
        self.restore_stage(model.adapter_sites_mut(), ctx.stage, &adapter)
    }

    /// Resume: bring the sites to the state right after `end_stage(stage)`,
    /// from the adapter saved at the end of that stage.
    fn restore_stage(
        &mut self,
        sites: &mut AdapterSites,
        stage: usize,
        adapter: &PeftAdapter,
    ) -> Result<()> {
        sites.set_current_from_peft(adapter)?;
        self.end_stage(sites, stage)
    }

    /// Before evaluating `task` after `stage` (PerTaskFT swaps adapters here).
    fn before_eval(
        &mut self,
        _sites: &mut AdapterSites,
        _stage: usize,
        _task: usize,
    ) -> Result<()> {
        Ok(())
    }
}

/// The method a config names.
pub fn build(cfg: &MethodSection, lora: &LoraConfig) -> Result<Box<dyn Method>> {
    if cfg.history == HistoryMode::Merged && cfg.name.uses_orthogonality() {
        return Err(TrainError::Config(format!(
            "method `{}` needs the earlier tasks' lora_A for its orthogonality term: use `method.history = \"stacked\"`",
            cfg.name.as_str()
        )));
    }
    let scale = lora.scale();
    Ok(match cfg.name {
        MethodName::SeqLora => Box::new(SeqLora),
        MethodName::IncLora | MethodName::NoSparsity => {
            Box::new(IncLora::new(cfg.name, cfg.history, Penalties::none()))
        }
        MethodName::OLora
        | MethodName::NLora
        | MethodName::OLoraNLora
        | MethodName::SparseA
        | MethodName::SparseB
        | MethodName::SparseAB => Box::new(IncLora::new(
            cfg.name,
            cfg.history,
            Penalties::from_config(cfg, scale),
        )),
        MethodName::PerTask => Box::new(PerTaskLora::default()),
        MethodName::Mtl => Box::new(Mtl),
        MethodName::SeqFt => Box::new(Baseline::new(cfg.name, cfg.trainable)),
        MethodName::Replay => Box::new(Replay::new(cfg)),
        MethodName::Ewc => Box::new(Ewc::new(cfg)),
        MethodName::Lwf => Box::new(Lwf::new(cfg)),
    })
}

/// The penalties' view of the adapted sites: current A/B and the stacked
/// earlier A (for O-LoRA's orthogonality term).
pub(crate) fn penalty_sites(sites: &AdapterSites) -> Vec<Site<'_>> {
    sites
        .adapted()
        .filter_map(|(path, site)| {
            let cur = site.current()?;
            let mut s = Site::new(cur.a().as_tensor(), cur.b().as_tensor()).named(path);
            s.previous_a = site.previous_a();
            Some(s)
        })
        .collect()
}
