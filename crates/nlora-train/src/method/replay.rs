//! Replay: SeqFT plus a memory of `method.replay_per_task` training examples
//! of every finished task (seeded, stratified by label), mixed into each
//! batch: `round(replay_ratio * batch_size)` of a batch's `batch_size`
//! examples come from the memory, the rest from the current task. Each
//! epoch still sees every current example once, so a stage has
//! `1 / (1 - ratio)` times the batches of SeqFT (the memory examples are
//! extra compute, not a smaller share of the task). The memory is rebuilt
//! from the data on resume: it is a function of the seed and the tasks.
use std::collections::BTreeMap;

use nlora_adapter::{AdapterSites, LoraConfig};
use nlora_data::EncodedExample;
use nlora_model::lm::LanguageModel;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::SeedableRng;

use super::{Baseline, Method, StageContext};
use crate::config::{MethodName, MethodSection};
use crate::error::Result;
use crate::trainer::derive_seed;

/// The examples kept of the finished tasks.
#[derive(Debug, Clone, Default)]
pub struct ReplayMemory {
    examples: Vec<EncodedExample>,
}

impl ReplayMemory {
    /// Keeps `k` of a task's examples, as evenly over its labels as they
    /// allow: labels take turns, each giving its next example in a seeded
    /// order, until `k` are kept (or the task runs out).
    pub fn add_task(&mut self, examples: &[&EncodedExample], k: usize, seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut by_label: BTreeMap<&str, Vec<&EncodedExample>> = BTreeMap::new();
        for e in examples {
            by_label.entry(e.answer.as_str()).or_default().push(e);
        }
        let mut queues: Vec<Vec<&EncodedExample>> = by_label.into_values().collect();
        for q in &mut queues {
            q.shuffle(&mut rng);
            q.reverse(); // pop() takes from the shuffled front
        }
        // Which label goes first is random too, so small k favours none.
        queues.shuffle(&mut rng);
        let mut kept = 0;
        while kept < k && queues.iter().any(|q| !q.is_empty()) {
            for q in &mut queues {
                if kept == k {
                    break;
                }
                if let Some(e) = q.pop() {
                    self.examples.push(e.clone());
                    kept += 1;
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.examples.len()
    }
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }
    pub fn examples(&self) -> &[EncodedExample] {
        &self.examples
    }

    /// `n` examples drawn without replacement (with, if the memory is smaller).
    pub fn draw(&self, n: usize, seed: u64) -> Vec<&EncodedExample> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        if n <= self.examples.len() {
            self.examples.choose_multiple(&mut rng, n).collect()
        } else {
            (0..n)
                .filter_map(|_| self.examples.choose(&mut rng))
                .collect()
        }
    }
}

pub struct Replay {
    inner: Baseline,
    memory: ReplayMemory,
    per_task: usize,
    ratio: f64,
}

impl Replay {
    pub fn new(cfg: &MethodSection) -> Self {
        Self {
            inner: Baseline::new(MethodName::Replay, cfg.trainable),
            memory: ReplayMemory::default(),
            per_task: cfg.replay_per_task,
            ratio: cfg.replay_ratio,
        }
    }

    pub fn memory(&self) -> &ReplayMemory {
        &self.memory
    }

    fn remember(&mut self, ctx: &StageContext<'_, '_>) {
        let seed = derive_seed(ctx.seed, ctx.stage, 5, 0);
        self.memory.add_task(ctx.examples, self.per_task, seed);
    }
}

impl Method for Replay {
    fn name(&self) -> &'static str {
        "replay"
    }

    fn begin_stage(
        &mut self,
        sites: &mut AdapterSites,
        stage: usize,
        lora: &LoraConfig,
        seed: u64,
    ) -> Result<()> {
        self.inner.begin_stage(sites, stage, lora, seed)
    }

    fn end_stage(&mut self, sites: &mut AdapterSites, stage: usize) -> Result<()> {
        self.inner.end_stage(sites, stage)
    }

    fn memory_slots(&self, batch_size: usize) -> usize {
        if self.memory.is_empty() || batch_size < 2 {
            return 0;
        }
        // At least one of each: config validation refuses a ratio that rounds to 0.
        ((self.ratio * batch_size as f64).round() as usize).clamp(1, batch_size - 1)
    }

    fn memory_examples(&self, n: usize, seed: u64) -> Vec<&EncodedExample> {
        self.memory.draw(n, seed)
    }

    fn after_training(
        &mut self,
        model: &mut dyn LanguageModel,
        ctx: &StageContext<'_, '_>,
    ) -> Result<()> {
        self.inner.after_training(model, ctx)?;
        self.remember(ctx);
        Ok(())
    }

    fn save_stage(&self, model: &dyn LanguageModel, ctx: &StageContext<'_, '_>) -> Result<()> {
        self.inner.save_stage(model, ctx)
    }

    fn restore_from(
        &mut self,
        model: &mut dyn LanguageModel,
        ctx: &StageContext<'_, '_>,
    ) -> Result<()> {
        self.inner.restore_from(model, ctx)?;
        self.remember(ctx);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trainer::stage_batches;

    fn example(task: &str, label: &str, i: usize) -> EncodedExample {
        EncodedExample {
            task: task.into(),
            prompt: vec![i as u32],
            label: vec![1],
            answer: label.into(),
            truncated: 0,
        }
    }

    #[test]
    fn the_memory_is_stratified_by_label_and_seeded() {
        // 30 "a", 6 "b", 2 "c": 9 kept take 3, 3 and 2 (all of "c"), then 1 more.
        let exs: Vec<EncodedExample> = (0..38)
            .map(|i| {
                let l = if i < 30 {
                    "a"
                } else if i < 36 {
                    "b"
                } else {
                    "c"
                };
                example("t1", l, i)
            })
            .collect();
        let refs: Vec<&EncodedExample> = exs.iter().collect();
        let mut m = ReplayMemory::default();
        m.add_task(&refs, 9, 1);
        assert_eq!(m.len(), 9);
        let count = |l: &str| m.examples().iter().filter(|e| e.answer == l).count();
        assert_eq!(count("c"), 2);
        assert!((3..=4).contains(&count("a")) && (3..=4).contains(&count("b")));
        assert_eq!(count("a") + count("b"), 7);
        let mut again = ReplayMemory::default();
        again.add_task(&refs, 9, 1);
        assert_eq!(m.examples(), again.examples());
        let mut other = ReplayMemory::default();
        other.add_task(&refs, 9, 2);
        assert_ne!(m.examples(), other.examples());
        // More than the task has: all of it.
        let mut all = ReplayMemory::default();
        all.add_task(&refs, 100, 1);
        assert_eq!(all.len(), 38);
    }

    #[test]
    fn batches_hold_the_configured_share_of_old_task_examples() {
        let mut cfg = MethodSection::new(MethodName::Replay);
        cfg.replay_per_task = 5;
        cfg.replay_ratio = 0.25;
        let mut replay = Replay::new(&cfg);
        let old: Vec<EncodedExample> = (0..20)
            .map(|i| example("old", ["x", "y"][i % 2], i))
            .collect();
        replay
            .memory
            .add_task(&old.iter().collect::<Vec<_>>(), 5, 3);
        let current: Vec<EncodedExample> = (0..30).map(|i| example("new", "z", 100 + i)).collect();
        let current: Vec<&EncodedExample> = current.iter().collect();
        let bs = 8;
        assert_eq!(replay.memory_slots(bs), 2);
        let batches = stage_batches(&replay, &current, bs, 2, 11, 0);
        // 6 current examples a batch: 30 / 6 = 5 batches an epoch, 2 epochs.
        assert_eq!(batches.len(), 10);
        let mut seen_new = std::collections::HashMap::new();
        for b in &batches {
            assert_eq!(b.len(), bs);
            let old_n = b.iter().filter(|e| e.task == "old").count();
            assert_eq!(old_n, 2, "a quarter of each batch from memory");
            for e in b.iter().filter(|e| e.task == "new") {
                *seen_new.entry(e.prompt[0]).or_insert(0) += 1;
            }
            // Memory examples in a batch are distinct.
            let mut mem: Vec<u32> = b
                .iter()
                .filter(|e| e.task == "old")
                .map(|e| e.prompt[0])
                .collect();
            mem.dedup();
            assert_eq!(mem.len(), 2);
        }
        // Every current example once per epoch.
        assert_eq!(seen_new.len(), 30);
        assert!(seen_new.values().all(|&n| n == 2));
        // Before any task is remembered, batches are the task's alone.
        let fresh = Replay::new(&cfg);
        let batches = stage_batches(&fresh, &current, bs, 1, 11, 0);
        assert_eq!(batches.len(), 4);
        assert!(batches.iter().flatten().all(|e| e.task == "new"));
    }
}
