//! Evaluation of one task: greedy generation + normalised exact match (the
//! reference's metric) and, optionally, rank classification over the task's
//! labels (the label whose tokens + EOS are most likely wins).
use nlora_data::exact_match;
use nlora_model::lm::{GenerateOptions, LanguageModel};
use nlora_model::tokenizer::TextTokenizer;

use crate::arch::Batching;
use crate::error::Result;
use crate::stream::StreamTask;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TaskAccuracy {
    pub exact_match: f64,
    pub rank: Option<f64>,
}

pub struct EvalOptions {
    pub batch_size: usize,
    pub max_new_tokens: Option<usize>,
    pub rank_classification: bool,
}

impl EvalOptions {
    /// The evaluation settings of a run.
    pub fn from_config(cfg: &crate::config::RunConfig) -> Self {
        Self {
            batch_size: cfg.eval.batch_size,
            max_new_tokens: cfg.eval.max_new_tokens,
            rank_classification: cfg.eval.rank_classification,
        }
    }
}

/// The greedy decoding settings of `task`'s evaluation.
pub fn generate_options(
    task: &StreamTask,
    batching: &Batching<'_>,
    opts: &EvalOptions,
) -> GenerateOptions {
    // Enough room for the longest label and its EOS.
    let longest = task.label_ids.iter().map(Vec::len).max().unwrap_or(1);
    GenerateOptions {
        max_new_tokens: opts.max_new_tokens.unwrap_or(longest + 2),
        eos_token_ids: vec![batching.eos()],
        pad_token_id: batching.pad(),
    }
}

/// Accuracy of the model on `task.eval`.
pub fn evaluate_task(
    model: &dyn LanguageModel,
    tokenizer: &TextTokenizer,
    batching: &Batching<'_>,
    task: &StreamTask,
    opts: &EvalOptions,
    mut on_batch: impl FnMut(usize),
) -> Result<TaskAccuracy> {
    let gen = generate_options(task, batching, opts);
    let mut correct = 0usize;
    let mut rank_correct = 0usize;
    for chunk in task.eval.chunks(opts.batch_size) {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|e| batching.prompt(e)).collect();
        let outputs = model.generate(&prompts, &gen)?;
        for (e, out) in chunk.iter().zip(&outputs) {
            let text = tokenizer.decode(out, true)?;
            if exact_match(&text, &e.answer) {
                correct += 1;
            }
        }
        if opts.rank_classification {
            let candidates: Vec<Vec<u32>> = task
                .label_ids
                .iter()
                .map(|l| {
                    let mut c = l.clone();
                    c.push(batching.eos());
                    c
                })
                .collect();
            for (e, prompt) in chunk.iter().zip(&prompts) {
                let scores = model.score(prompt, &candidates)?;
                let best = scores
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(i, _)| i);
                if best.is_some_and(|i| task.labels[i] == e.answer) {
                    rank_correct += 1;
                }
            }
        }
        on_batch(chunk.len());
    }
    let n = task.eval.len().max(1) as f64;
    Ok(TaskAccuracy {
        exact_match: correct as f64 / n,
        rank: opts.rank_classification.then_some(rank_correct as f64 / n),
    })
}
