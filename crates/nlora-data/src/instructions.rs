//! `instruction_config.json`: one instruction per task type.
//!
//! The file maps a type (`"TC"`, `"NLI"`, ...) to a list of
//! `{"instruction_type": "zero-shot" | "few-shot", "instruction": ...}`.
//! The reference (`instruction_strategy = "single"`, no few-shot examples)
//! uses the first zero-shot entry of the type; so does nlora. The
//! instructions end in `"\n"`, which the prompt keeps.
use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::benchmark::{read_utf8, TaskType};
use crate::error::{DataError, Result};

/// The first zero-shot instruction of each task type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instructions {
    zero_shot: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Entry {
    instruction_type: String,
    instruction: String,
}

const SHAPE: &str =
    "an object mapping task types to lists of {\"instruction_type\", \"instruction\"} entries";

impl Instructions {
    /// Read and validate `path`.
    pub fn load(path: &Path) -> Result<Instructions> {
        let text = read_utf8(path, "the instructions per task type")?;
        Instructions::parse(&text, path)
    }

    /// Parse the file's text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Instructions> {
        let raw: BTreeMap<String, Vec<Entry>> =
            serde_json::from_str(text).map_err(|source| DataError::Json {
                path: path.to_path_buf(),
                expected: SHAPE,
                source,
            })?;
        let mut zero_shot = BTreeMap::new();
        for (task_type, entries) in raw {
            for (i, entry) in entries.into_iter().enumerate() {
                match entry.instruction_type.as_str() {
                    "zero-shot" => {
                        zero_shot
                            .entry(task_type.clone())
                            .or_insert(entry.instruction);
                    }
                    "few-shot" => {}
                    other => {
                        return Err(DataError::invalid(
                            path,
                            format!(
                                "{task_type}[{i}]: instruction_type {other:?} is neither \"zero-shot\" nor \"few-shot\""
                            ),
                        ))
                    }
                }
            }
        }
        Ok(Instructions { zero_shot })
    }

    /// The instruction for `task_type`, `None` if the file has no zero-shot
    /// entry for it (always the case for COPA).
    pub fn for_type(&self, task_type: TaskType) -> Option<&str> {
        self.zero_shot.get(task_type.as_str()).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_zero_shot_entry_wins_and_few_shot_is_skipped() {
        let text = r#"{"TC": [
            {"instruction_type": "few-shot", "instruction": "few\n"},
            {"instruction_type": "zero-shot", "instruction": "first\n"},
            {"instruction_type": "zero-shot", "instruction": "second\n"}]}"#;
        let ins = Instructions::parse(text, Path::new("x.json")).unwrap();
        assert_eq!(ins.for_type(TaskType::Tc), Some("first\n"));
        assert_eq!(ins.for_type(TaskType::Sc), None);
    }

    #[test]
    fn unknown_instruction_type_is_an_error_naming_the_entry() {
        let text = r#"{"TC": [{"instruction_type": "one-shot", "instruction": "x"}]}"#;
        let err = Instructions::parse(text, Path::new("ic.json")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("ic.json") && msg.contains("TC[0]") && msg.contains("one-shot"),
            "{msg}"
        );
    }
}
