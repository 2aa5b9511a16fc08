//! Continual-learning methods. The training loop knows nothing about any
//! particular method: a method decides what trains (`begin_stage`), what
//! penalty joins the task loss (`penalty`), what happens at a task's end
//! (`end_stage`), and which adapter answers for which task at evaluation
//! (`before_eval`). Each method is one small file.
use candle_core::Tensor;
use nlora_adapter::{AdapterSites, LoraConfig, PeftAdapter};
use nlora_math::penalty::Site;

use crate::config::{HistoryMode, MethodName, MethodSection};
use crate::error::{Result, TrainError};

mod inclora;
mod mtl;
mod pertask;
mod seqlora;

pub use inclora::{IncLora, Penalties};
pub use mtl::Mtl;
pub use pertask::PerTaskLora;
pub use seqlora::SeqLora;

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
