//! Per-task statistics for `nlora data check`.
use serde::Serialize;

use crate::batch::PlainTokenizer;
use crate::benchmark::{Split, Task, TaskType, NO_GOLD_LABEL};
use crate::error::Result;
use crate::prompt::PromptTemplate;

/// Statistics of one split file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SplitSummary {
    /// Which split.
    pub split: Split,
    /// Examples loaded (after the no-gold-label policy).
    pub examples: usize,
    /// Records labelled "-" (dropped under the default policy).
    pub no_gold: usize,
    /// Examples per label, in labels.json order (then "-" if kept).
    pub label_counts: Vec<(String, usize)>,
    /// Mean rendered prompt length in characters (Unicode scalar values).
    pub mean_prompt_chars: f64,
    /// Longest rendered prompt in characters.
    pub max_prompt_chars: usize,
    /// Mean prompt length in tokens (no special tokens), when a tokenizer is given.
    pub mean_prompt_tokens: Option<f64>,
    /// Longest prompt in tokens, when a tokenizer is given.
    pub max_prompt_tokens: Option<usize>,
}

/// Statistics of one task.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskSummary {
    /// Task name.
    pub name: String,
    /// Task type.
    pub task_type: TaskType,
    /// labels.json.
    pub labels: Vec<String>,
    /// train, dev (if present), test.
    pub splits: Vec<SplitSummary>,
    /// Whether dev.json is byte-identical to test.json.
    pub dev_is_test: bool,
    /// Things worth knowing that do not make the data invalid.
    pub notes: Vec<String>,
}

/// Summarise a loaded task; prompts are rendered with `template`, token
/// counts taken with `tokenizer` when given.
pub fn summarize(
    task: &Task,
    template: &PromptTemplate,
    tokenizer: Option<&dyn PlainTokenizer>,
) -> Result<TaskSummary> {
    let mut splits = Vec::new();
    let mut notes = Vec::new();
    for (i, split) in Split::ALL.into_iter().enumerate() {
        let Some(examples) = task.split(split) else {
            continue;
        };
        let mut label_counts: Vec<(String, usize)> =
            task.labels.iter().map(|l| (l.clone(), 0)).collect();
        let mut chars_total = 0usize;
        let mut chars_max = 0usize;
        let mut tokens_total = 0usize;
        let mut tokens_max = 0usize;
        for e in examples {
            match label_counts.iter_mut().find(|(l, _)| *l == e.label) {
                Some((_, n)) => *n += 1,
                None => label_counts.push((e.label.clone(), 1)),
            }
            let prompt = template.render(&e.sentence);
            let chars = prompt.chars().count();
            chars_total += chars;
            chars_max = chars_max.max(chars);
            if let Some(tok) = tokenizer {
                let n = tok.encode_plain(&prompt)?.len();
                tokens_total += n;
                tokens_max = tokens_max.max(n);
            }
        }
        for (label, n) in &label_counts {
            if *n == 0 {
                notes.push(format!("{split}: no example of label {label:?}"));
            }
        }
        let no_gold = task.no_gold[i];
        if no_gold > 0 {
            let kept = label_counts.iter().any(|(l, _)| l == NO_GOLD_LABEL);
            notes.push(format!(
                "{split}: {no_gold} records have no gold label {NO_GOLD_LABEL:?} ({})",
                if kept {
                    "kept, as the reference does"
                } else {
                    "left out"
                }
            ));
        }
        let count = examples.len() as f64;
        splits.push(SplitSummary {
            split,
            examples: examples.len(),
            no_gold,
            label_counts,
            mean_prompt_chars: chars_total as f64 / count,
            max_prompt_chars: chars_max,
            mean_prompt_tokens: tokenizer.map(|_| tokens_total as f64 / count),
            max_prompt_tokens: tokenizer.map(|_| tokens_max),
        });
    }
    if task.dev.is_none() {
        notes.push("no dev.json (nlora does not need it)".into());
    }
    if task.dev_is_test {
        notes.push(
            "dev.json is byte-identical to test.json: never select hyperparameters on it".into(),
        );
    }
    Ok(TaskSummary {
        name: task.name.clone(),
        task_type: task.task_type,
        labels: task.labels.clone(),
        splits,
        dev_is_test: task.dev_is_test,
        notes,
    })
}
