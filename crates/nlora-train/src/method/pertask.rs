//! PerTaskFT with LoRA: an independent adapter per task; each task is
//! evaluated with its own adapter (tasks not trained yet: the base model).
use std::collections::BTreeMap;

use nlora_adapter::{AdapterSites, LoraConfig, PeftAdapter};

use super::Method;
use crate::error::Result;

#[derive(Default)]
pub struct PerTaskLora {
    adapters: BTreeMap<usize, PeftAdapter>,
}

impl Method for PerTaskLora {
    fn name(&self) -> &'static str {
        "pertask"
    }

    fn begin_stage(
        &mut self,
        sites: &mut AdapterSites,
        _stage: usize,
        lora: &LoraConfig,
        seed: u64,
    ) -> Result<()> {
        sites.init_new_adapters(lora, seed)?;
        Ok(())
    }

    fn end_stage(&mut self, sites: &mut AdapterSites, stage: usize) -> Result<()> {
        self.adapters.insert(stage, sites.current_as_peft("")?);
        sites.clear_current();
        Ok(())
    }

    fn before_eval(&mut self, sites: &mut AdapterSites, _stage: usize, task: usize) -> Result<()> {
        match self.adapters.get(&task) {
            Some(adapter) => sites.set_current_from_peft(adapter)?,
            None => sites.clear_current(),
        }
        Ok(())
    }
}
