//! MTL: one adapter trained once on the union of all tasks (the upper bound).
use nlora_adapter::{AdapterSites, LoraConfig};

use super::Method;
use crate::error::Result;

pub struct Mtl;

impl Method for Mtl {
    fn name(&self) -> &'static str {
        "mtl"
    }

    fn stages(&self, n_tasks: usize) -> Vec<Vec<usize>> {
        vec![(0..n_tasks).collect()]
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

    fn end_stage(&mut self, _sites: &mut AdapterSites, _stage: usize) -> Result<()> {
        Ok(())
    }
}
