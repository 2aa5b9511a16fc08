//! Prompt rendering, exactly as the O-LoRA / N-LoRA reference builds it.
//!
//! ```text
//! [Task:TYPE\n][Dataset:NAME\n] INSTRUCTION "Option: " LABELS(", ") " \n" SENTENCE "\nAnswer:"
//! COPA:  [Task:COPA\n][Dataset:COPA\n] SENTENCE "\nAnswer:"
//! ```
//! `INSTRUCTION` is the type's first zero-shot instruction from
//! `instruction_config.json`, which ends in `"\n"`; labels are in
//! labels.json order. The reference's default flags (`add_task_name`,
//! `add_dataset_name`) turn both prefix lines on; so does
//! [`PromptStyle::default`]. Nothing is stripped: a sentence ending in
//! `"\n"` gives `"\n\nAnswer:"`, as in the reference.
//!
//! A prompt is kept as its text plus the byte span of the sentence, so that
//! batching can shorten the sentence alone (see [`crate::batch`]).
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::benchmark::{Example, Task, TaskType};
use crate::error::{DataError, Result};
use crate::instructions::Instructions;

/// The text that ends every prompt; the model's answer follows it.
pub const ANSWER_PREFIX: &str = "\nAnswer:";

/// Which prefix lines precede the instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptStyle {
    /// `"Task:" + TYPE + "\n"` (reference flag `add_task_name`).
    pub task_name: bool,
    /// `"Dataset:" + NAME + "\n"` (reference flag `add_dataset_name`).
    pub dataset_name: bool,
}

impl PromptStyle {
    /// Both prefix lines, as in the reference scripts.
    pub const REFERENCE: PromptStyle = PromptStyle {
        task_name: true,
        dataset_name: true,
    };
    /// No prefix.
    pub const BARE: PromptStyle = PromptStyle {
        task_name: false,
        dataset_name: false,
    };
}

impl Default for PromptStyle {
    fn default() -> Self {
        PromptStyle::REFERENCE
    }
}

/// The fixed parts of one task's prompts: everything before the sentence
/// (`head`) and after it (`tail`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptTemplate {
    task: String,
    task_type: TaskType,
    head: String,
}

impl PromptTemplate {
    /// The template of a task of type `task_type` named `dataset_name` with
    /// option list `labels`. Fails if the type needs an instruction and
    /// `instructions` has none for it.
    pub fn new(
        task_type: TaskType,
        dataset_name: &str,
        labels: &[String],
        instructions: &Instructions,
        style: PromptStyle,
    ) -> Result<PromptTemplate> {
        let mut head = String::new();
        if style.task_name {
            head.push_str("Task:");
            head.push_str(task_type.as_str());
            head.push('\n');
        }
        if style.dataset_name {
            head.push_str("Dataset:");
            head.push_str(dataset_name);
            head.push('\n');
        }
        if task_type.has_instruction() {
            let instruction =
                instructions
                    .for_type(task_type)
                    .ok_or_else(|| DataError::NoInstruction {
                        task_type: task_type.as_str().to_string(),
                        task: dataset_name.to_string(),
                    })?;
            head.push_str(instruction);
            head.push_str("Option: ");
            head.push_str(&labels.join(", "));
            head.push_str(" \n");
        }
        Ok(PromptTemplate {
            task: dataset_name.to_string(),
            task_type,
            head,
        })
    }

    /// The template of a loaded task.
    pub fn for_task(
        task: &Task,
        instructions: &Instructions,
        style: PromptStyle,
    ) -> Result<PromptTemplate> {
        PromptTemplate::new(
            task.task_type,
            &task.name,
            &task.labels,
            instructions,
            style,
        )
    }

    /// Text before the sentence.
    pub fn head(&self) -> &str {
        &self.head
    }

    /// Text after the sentence: [`ANSWER_PREFIX`].
    pub fn tail(&self) -> &str {
        ANSWER_PREFIX
    }

    /// The task's name.
    pub fn task(&self) -> &str {
        &self.task
    }

    /// The task's type.
    pub fn task_type(&self) -> TaskType {
        self.task_type
    }

    /// The full prompt for `sentence`.
    pub fn render(&self, sentence: &str) -> String {
        let mut s = String::with_capacity(self.head.len() + sentence.len() + ANSWER_PREFIX.len());
        s.push_str(&self.head);
        s.push_str(sentence);
        s.push_str(ANSWER_PREFIX);
        s
    }

    /// `example` as a prompt with its answer.
    pub fn apply(&self, example: &Example) -> PromptedExample {
        let text = self.render(&example.sentence);
        let start = self.head.len();
        PromptedExample {
            task: self.task.clone(),
            sentence: start..start + example.sentence.len(),
            text,
            label: example.label.clone(),
        }
    }
}

/// A rendered prompt and its answer, ready to tokenise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptedExample {
    /// The task it comes from (multi-task batches mix tasks).
    pub task: String,
    /// The whole prompt.
    pub text: String,
    /// Byte range of the sentence within `text`.
    pub sentence: Range<usize>,
    /// The answer (the label string).
    pub label: String,
}

impl PromptedExample {
    /// Text before the sentence.
    pub fn head(&self) -> &str {
        &self.text[..self.sentence.start]
    }

    /// The sentence.
    pub fn sentence_text(&self) -> &str {
        &self.text[self.sentence.clone()]
    }

    /// Text after the sentence.
    pub fn tail(&self) -> &str {
        &self.text[self.sentence.end..]
    }
}
