//! SeqLoRA: one adapter trained through all tasks, nothing frozen.
use nlora_adapter::{AdapterSites, LoraConfig};

use super::Method;
use crate::error::Result;

pub struct SeqLora;

impl Method for SeqLora {
    fn name(&self) -> &'static str {
        "seqlora"
    }

    fn begin_stage(
        &mut self,
        sites: &mut AdapterSites,
        stage: usize,
        lora: &LoraConfig,
        seed: u64,
    ) -> Result<()> {
        if stage == 0 {
            sites.init_new_adapters(lora, seed)?;
        }
        Ok(())
    }

    /// The adapter goes on training into the next task.
    fn end_stage(&mut self, _sites: &mut AdapterSites, _stage: usize) -> Result<()> {
        Ok(())
    }
}
