//! The task stream of a run: each task of the order loaded, sampled (seeded),
//! rendered as prompts and tokenised once, before training starts.
use std::path::Path;

use nlora_data::{
    BatchConfig, Benchmark, EncodedExample, LoadOptions, PromptStyle, PromptTemplate,
    SamplingConfig,
};

use crate::arch::Batching;
use crate::config::{RunConfig, Truncation};
use crate::error::{Result, TrainError};

/// One task, tokenised.
#[derive(Debug, Clone)]
pub struct StreamTask {
    pub name: String,
    pub labels: Vec<String>,
    /// Token ids of each label (no special tokens), for rank classification.
    pub label_ids: Vec<Vec<u32>>,
    pub train: Vec<EncodedExample>,
    /// What the task is evaluated on: test, or validation when tuning.
    pub eval: Vec<EncodedExample>,
}

pub struct TaskStream {
    pub tasks: Vec<StreamTask>,
}

/// The task names of the run, in order, without loading any data.
pub fn task_names(cfg: &RunConfig, data_dir: &Path) -> Result<Vec<String>> {
    let bench = Benchmark::open(data_dir)?;
    let spec = match (&cfg.data.tasks, &cfg.data.order) {
        (Some(tasks), _) => tasks.join(","),
        (None, Some(order)) => order.clone(),
        (None, None) => {
            return Err(TrainError::Config(
                "no tasks: give `data.order` (e.g. \"order1\") or `data.tasks`".into(),
            ))
        }
    };
    let order = bench.resolve_order(&spec)?;
    Ok(order.tasks.iter().map(|t| t.name.clone()).collect())
}

pub fn load_stream(
    cfg: &RunConfig,
    data_dir: &Path,
    batching: &Batching<'_>,
) -> Result<TaskStream> {
    let bench = Benchmark::open(data_dir)?;
    let names = task_names(cfg, data_dir)?;
    let style = if cfg.data.prefix {
        PromptStyle::REFERENCE
    } else {
        PromptStyle::BARE
    };
    let mut tasks = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let task = bench.load_task(name, &LoadOptions::default())?;
        let sampled = nlora_data::sample_task(
            &task,
            &SamplingConfig {
                // Each task its own stream, stable when the order changes.
                seed: cfg.seed,
                max_train: cfg.data.max_train_per_task,
                validation: cfg.data.validation_per_task,
                max_test: cfg.data.max_test_per_task,
            },
        )?;
        let template = PromptTemplate::for_task(&task, bench.instructions(), style)?;
        let encode = |exs: &[nlora_data::Example]| -> Result<Vec<EncodedExample>> {
            exs.iter()
                .map(|e| batching.encode(&template.apply(e)))
                .collect()
        };
        let eval_split = if cfg.data.eval_on_validation {
            if sampled.validation.is_empty() {
                return Err(TrainError::Config(
                    "`data.eval_on_validation` needs `data.validation_per_task` > 0".into(),
                ));
            }
            &sampled.validation
        } else {
            &sampled.test
        };
        let label_ids = sampled
            .labels
            .iter()
            .map(|l| batching.encode_label(l))
            .collect::<Result<Vec<_>>>()?;
        tracing::info!(
            "task {}/{} {name}: {} train, {} eval examples",
            i + 1,
            names.len(),
            sampled.train.len(),
            eval_split.len()
        );
        tasks.push(StreamTask {
            name: name.clone(),
            labels: sampled.labels.clone(),
            label_ids,
            train: encode(&sampled.train)?,
            eval: encode(eval_split)?,
        });
    }
    Ok(TaskStream { tasks })
}

/// The batching limits of a run's config.
pub fn batch_config(cfg: &RunConfig) -> BatchConfig {
    BatchConfig {
        max_source_len: cfg.data.max_source_len,
        max_target_len: cfg.data.max_target_len,
        truncation: match cfg.data.truncation {
            Truncation::Sentence => nlora_data::Truncation::Sentence,
            Truncation::Tail => nlora_data::Truncation::SourceTail,
        },
    }
}
