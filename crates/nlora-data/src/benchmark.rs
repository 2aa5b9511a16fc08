//! The CL_Benchmark folder format: discovery, loading and validation.
//!
//! Layout (as distributed with O-LoRA / N-LoRA):
//! ```text
//! <root>/instruction_config.json
//! <root>/<TYPE>/<task>/labels.json   JSON list of label strings
//! <root>/<TYPE>/<task>/train.json    JSON list of {"label": .., "sentence": ..}
//! <root>/<TYPE>/<task>/dev.json      (optional for nlora; byte-identical to test.json here)
//! <root>/<TYPE>/<task>/test.json
//! ```
//! `TYPE` is one of the task types of [`TaskType`]; the task's name is its
//! folder name (`dbpedia`, `MNLI`, `SST-2`, ...).
use std::collections::HashSet;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::instructions::Instructions;

/// Environment variable naming the benchmark folder.
pub const DATA_DIR_ENV: &str = "NLORA_DATA";
/// Benchmark folder used when neither a flag nor [`DATA_DIR_ENV`] is given,
/// relative to the current directory (the repository root in the usual
/// layout, where the data lives beside the checkout).
pub const DEFAULT_DATA_DIR: &str = "../shared/cl_benchmark";
/// The instruction file at the benchmark root.
pub const INSTRUCTION_FILE: &str = "instruction_config.json";
/// GLUE's marker for "annotators did not agree, no gold label". The MNLI
/// test.json (= dev.json) of the distributed benchmark holds 131 such records.
pub const NO_GOLD_LABEL: &str = "-";

/// The data directory: `explicit` (e.g. `--data-dir`), else the environment
/// variable `NLORA_DATA`, else [`DEFAULT_DATA_DIR`] relative to the current
/// directory. Fails if the chosen directory does not exist, saying which
/// source it came from. Every crate and the CLI resolve the folder here.
pub fn resolve_data_dir(explicit: Option<&Path>) -> Result<PathBuf> {
    resolve_data_dir_with(explicit, std::env::var_os(DATA_DIR_ENV))
}

/// [`resolve_data_dir`] with the environment value passed in (testable
/// without touching the process environment). An empty value counts as unset.
pub fn resolve_data_dir_with(explicit: Option<&Path>, env: Option<OsString>) -> Result<PathBuf> {
    let (path, origin) = match (explicit, env.filter(|v| !v.is_empty())) {
        (Some(p), _) => (p.to_path_buf(), "given with --data-dir".to_string()),
        (None, Some(v)) => (PathBuf::from(v), format!("from ${DATA_DIR_ENV}")),
        (None, None) => (
            PathBuf::from(DEFAULT_DATA_DIR),
            format!("the default, relative to the current directory; ${DATA_DIR_ENV} is not set"),
        ),
    };
    if path.is_dir() {
        Ok(path)
    } else {
        Err(DataError::DataDirMissing { path, origin })
    }
}

/// The task types of the benchmark; each is a top-level folder and selects
/// the instruction. Folder names are case-sensitive, as in the reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TaskType {
    /// Natural language inference (MNLI, CB, RTE).
    #[serde(rename = "NLI")]
    Nli,
    /// Quora question pairs.
    #[serde(rename = "QQP")]
    Qqp,
    /// Sentiment classification (amazon, yelp, IMDB, SST-2).
    #[serde(rename = "SC")]
    Sc,
    /// Topic classification (agnews, dbpedia, yahoo).
    #[serde(rename = "TC")]
    Tc,
    /// BoolQ.
    #[serde(rename = "BoolQA")]
    BoolQa,
    /// MultiRC.
    #[serde(rename = "MultiRC")]
    MultiRc,
    /// Words in context.
    #[serde(rename = "WiC")]
    WiC,
    /// Choice of plausible alternatives (no instruction: the sentence states
    /// the question and the options).
    #[serde(rename = "COPA")]
    Copa,
}

impl TaskType {
    /// All types, in the order folders are scanned.
    pub const ALL: [TaskType; 8] = [
        TaskType::Tc,
        TaskType::Sc,
        TaskType::Nli,
        TaskType::Qqp,
        TaskType::BoolQa,
        TaskType::MultiRc,
        TaskType::WiC,
        TaskType::Copa,
    ];

    /// The folder name, which is also the key in `instruction_config.json`
    /// and the `TYPE` in the prompt prefix `Task:TYPE`.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskType::Nli => "NLI",
            TaskType::Qqp => "QQP",
            TaskType::Sc => "SC",
            TaskType::Tc => "TC",
            TaskType::BoolQa => "BoolQA",
            TaskType::MultiRc => "MultiRC",
            TaskType::WiC => "WiC",
            TaskType::Copa => "COPA",
        }
    }

    /// The type whose folder is named `name` (exact).
    pub fn from_folder(name: &str) -> Option<TaskType> {
        TaskType::ALL.into_iter().find(|t| t.as_str() == name)
    }

    /// Whether prompts of this type carry an instruction and the option list.
    /// COPA's sentence already states its question and options.
    pub fn has_instruction(self) -> bool {
        self != TaskType::Copa
    }
}

impl fmt::Display for TaskType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A split file of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// train.json: the only split nlora trains or selects hyperparameters on.
    Train,
    /// dev.json: byte-identical to test.json in the distributed benchmark.
    Dev,
    /// test.json: evaluation only.
    Test,
}

impl Split {
    /// All splits in file order.
    pub const ALL: [Split; 3] = [Split::Train, Split::Dev, Split::Test];

    /// The file holding the split.
    pub fn file_name(self) -> &'static str {
        match self {
            Split::Train => "train.json",
            Split::Dev => "dev.json",
            Split::Test => "test.json",
        }
    }

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Dev => "dev",
            Split::Test => "test",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One record of a split.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    /// Position of the record in the file's JSON list (0-based), kept for
    /// provenance and error messages.
    pub index: usize,
    /// The input text (already formatted by the benchmark's authors, e.g.
    /// "sentence 1: ...\nsentence 2: ...").
    pub sentence: String,
    /// The answer string, one of the task's labels (or [`NO_GOLD_LABEL`]
    /// when kept by [`NoGoldLabel::Keep`]).
    pub label: String,
}

/// What to do with records labelled [`NO_GOLD_LABEL`] (`"-"`), which are not
/// in labels.json. Any other label outside labels.json is always an error.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NoGoldLabel {
    /// Leave them out (default): no model can be right on them, so they only
    /// lower every method's accuracy by the same amount. The count dropped is
    /// reported per split.
    #[default]
    Drop,
    /// Keep them, as the reference code does (it loads every record and
    /// scores them by exact match against "-"): reproduces the reference's
    /// test-set denominators.
    Keep,
}

/// Options for loading a task.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Policy for GLUE's no-gold-label records.
    pub no_gold_label: NoGoldLabel,
}

/// Where a task lives; found by [`Benchmark::open`] without reading its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskInfo {
    /// Folder name, e.g. `dbpedia`.
    pub name: String,
    /// Parent folder's type.
    pub task_type: TaskType,
    /// The task folder.
    pub dir: PathBuf,
}

/// A loaded and validated task.
#[derive(Debug, Clone)]
pub struct Task {
    /// Folder name, e.g. `dbpedia`.
    pub name: String,
    /// The task type (parent folder).
    pub task_type: TaskType,
    /// The task folder.
    pub dir: PathBuf,
    /// labels.json, in file order (the order of the prompt's option list).
    pub labels: Vec<String>,
    /// train.json.
    pub train: Vec<Example>,
    /// dev.json when present. Never used by nlora for selection: in the
    /// distributed benchmark it is a copy of test.json.
    pub dev: Option<Vec<Example>>,
    /// test.json.
    pub test: Vec<Example>,
    /// Whether dev.json and test.json are byte-identical.
    pub dev_is_test: bool,
    /// Records labelled [`NO_GOLD_LABEL`] left out per split (train, dev, test),
    /// under [`NoGoldLabel::Drop`]; under `Keep` these count the ones kept.
    pub no_gold: [usize; 3],
}

impl Task {
    /// Load and validate the task in `dir` (a `<TYPE>/<name>` folder).
    pub fn load(info: &TaskInfo, options: &LoadOptions) -> Result<Task> {
        let dir = &info.dir;
        let labels = read_labels(&dir.join("labels.json"))?;
        let mut no_gold = [0usize; 3];
        let (train, n) = read_split(&dir.join(Split::Train.file_name()), &labels, options)?;
        no_gold[0] = n;
        let dev_path = dir.join(Split::Dev.file_name());
        let test_path = dir.join(Split::Test.file_name());
        let (test, n) = read_split(&test_path, &labels, options)?;
        no_gold[2] = n;
        let (dev, dev_is_test) = if dev_path.exists() {
            let (dev, n) = read_split(&dev_path, &labels, options)?;
            no_gold[1] = n;
            let same = read_bytes(&dev_path)? == read_bytes(&test_path)?;
            (Some(dev), same)
        } else {
            (None, false)
        };
        Ok(Task {
            name: info.name.clone(),
            task_type: info.task_type,
            dir: dir.clone(),
            labels,
            train,
            dev,
            test,
            dev_is_test,
            no_gold,
        })
    }

    /// The examples of a split (`None` for an absent dev.json).
    pub fn split(&self, split: Split) -> Option<&[Example]> {
        match split {
            Split::Train => Some(&self.train),
            Split::Dev => self.dev.as_deref(),
            Split::Test => Some(&self.test),
        }
    }
}

/// A benchmark folder: its tasks (found, not yet loaded) and instructions.
#[derive(Debug, Clone)]
pub struct Benchmark {
    root: PathBuf,
    tasks: Vec<TaskInfo>,
    instructions: Instructions,
}

impl Benchmark {
    /// Open the benchmark at `root`: read `instruction_config.json` and find
    /// the task folders `<TYPE>/<task>/`. Folders that are not a known type
    /// are ignored. Fails if `root` is missing, holds no task, two tasks share
    /// a name, or a task type other than COPA has no instruction.
    pub fn open(root: impl AsRef<Path>) -> Result<Benchmark> {
        let root = root.as_ref().to_path_buf();
        if !root.is_dir() {
            return Err(DataError::DataDirMissing {
                path: root,
                origin: "given".into(),
            });
        }
        let instructions = Instructions::load(&root.join(INSTRUCTION_FILE))?;
        let mut tasks = Vec::new();
        for task_type in TaskType::ALL {
            let type_dir = root.join(task_type.as_str());
            if !type_dir.is_dir() {
                continue;
            }
            let entries = std::fs::read_dir(&type_dir).map_err(|source| DataError::Io {
                path: type_dir.clone(),
                source,
            })?;
            let mut found = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|source| DataError::Io {
                    path: type_dir.clone(),
                    source,
                })?;
                let dir = entry.path();
                if !dir.is_dir() {
                    continue;
                }
                let name = entry
                    .file_name()
                    .to_str()
                    .map(str::to_owned)
                    .ok_or_else(|| {
                        DataError::invalid(&dir, "task folder name is not valid UTF-8")
                    })?;
                found.push(TaskInfo {
                    name,
                    task_type,
                    dir,
                });
            }
            found.sort_by_key(|t| t.name.to_lowercase());
            tasks.extend(found);
        }
        if tasks.is_empty() {
            let types: Vec<_> = TaskType::ALL.iter().map(|t| t.as_str()).collect();
            return Err(DataError::invalid(
                &root,
                format!(
                    "no task folders found; expected <TYPE>/<task>/ with TYPE one of {}",
                    types.join(", ")
                ),
            ));
        }
        let mut seen = HashSet::new();
        for t in &tasks {
            if !seen.insert(t.name.to_lowercase()) {
                return Err(DataError::invalid(
                    &t.dir,
                    format!("task name {:?} is used by two task folders (names are compared case-insensitively)", t.name),
                ));
            }
            if t.task_type.has_instruction() && instructions.for_type(t.task_type).is_none() {
                return Err(DataError::invalid(
                    root.join(INSTRUCTION_FILE),
                    format!(
                        "no zero-shot instruction for task type {} (needed by task {})",
                        t.task_type, t.name
                    ),
                ));
            }
        }
        Ok(Benchmark {
            root,
            tasks,
            instructions,
        })
    }

    /// The benchmark folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The tasks found, grouped by type.
    pub fn tasks(&self) -> &[TaskInfo] {
        &self.tasks
    }

    /// The instructions of `instruction_config.json`.
    pub fn instructions(&self) -> &Instructions {
        &self.instructions
    }

    /// Task names, in [`Benchmark::tasks`] order.
    pub fn task_names(&self) -> Vec<String> {
        self.tasks.iter().map(|t| t.name.clone()).collect()
    }

    /// The task called `name`: the exact folder name, else the one folder name
    /// equal to it ignoring case (`mnli` finds `MNLI`). Unknown names give an
    /// error listing the known tasks.
    pub fn find(&self, name: &str) -> Result<&TaskInfo> {
        self.find_in(name, "")
    }

    pub(crate) fn find_in(&self, name: &str, context: &str) -> Result<&TaskInfo> {
        let name = name.trim();
        if let Some(t) = self.tasks.iter().find(|t| t.name == name) {
            return Ok(t);
        }
        let lower = name.to_lowercase();
        // Open rejects names equal up to case, so at most one matches.
        self.tasks
            .iter()
            .find(|t| t.name.to_lowercase() == lower)
            .ok_or_else(|| DataError::UnknownTask {
                name: name.to_string(),
                context: context.to_string(),
                known: self.task_names(),
            })
    }

    /// Find and load a task.
    pub fn load_task(&self, name: &str, options: &LoadOptions) -> Result<Task> {
        Task::load(self.find(name)?, options)
    }
}

fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Read a UTF-8 text file; a missing file is [`DataError::MissingFile`].
pub(crate) fn read_utf8(path: &Path, what: &'static str) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            DataError::MissingFile {
                path: path.to_path_buf(),
                what,
            }
        } else {
            DataError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    String::from_utf8(bytes).map_err(|e| {
        let offset = e.utf8_error().valid_up_to();
        let line = 1 + e.as_bytes()[..offset]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        DataError::NotUtf8 {
            path: path.to_path_buf(),
            offset,
            line,
        }
    })
}

fn read_labels(path: &Path) -> Result<Vec<String>> {
    let text = read_utf8(path, "the task's label list (a JSON list of label strings)")?;
    let labels: Vec<String> = serde_json::from_str(&text).map_err(|source| DataError::Json {
        path: path.to_path_buf(),
        expected: "a JSON list of label strings",
        source,
    })?;
    if labels.is_empty() {
        return Err(DataError::invalid(path, "the label list is empty"));
    }
    let mut seen = HashSet::new();
    for (i, label) in labels.iter().enumerate() {
        if label.trim().is_empty() {
            return Err(DataError::invalid(path, format!("label {i} is empty")));
        }
        if !seen.insert(label.as_str()) {
            return Err(DataError::invalid(
                path,
                format!("duplicate label {label:?} (labels must be distinct)"),
            ));
        }
    }
    Ok(labels)
}

#[derive(Deserialize)]
struct RawRecord {
    #[serde(default)]
    label: Option<serde_json::Value>,
    #[serde(default)]
    sentence: Option<serde_json::Value>,
}

const RECORDS_SHAPE: &str = "a JSON list of {\"label\": string, \"sentence\": string} records";

/// Read one split file, validate every record against `labels`, apply the
/// no-gold-label policy. Returns the examples and the number of no-gold records.
fn read_split(
    path: &Path,
    labels: &[String],
    options: &LoadOptions,
) -> Result<(Vec<Example>, usize)> {
    let text = read_utf8(path, RECORDS_SHAPE)?;
    let raw: Vec<RawRecord> = serde_json::from_str(&text).map_err(|source| DataError::Json {
        path: path.to_path_buf(),
        expected: RECORDS_SHAPE,
        source,
    })?;
    if raw.is_empty() {
        return Err(DataError::invalid(path, "the split is empty (no records)"));
    }
    let known: HashSet<&str> = labels.iter().map(String::as_str).collect();
    let mut examples = Vec::with_capacity(raw.len());
    let mut no_gold = 0;
    for (index, record) in raw.into_iter().enumerate() {
        let label = string_field(path, index, "label", record.label)?;
        let sentence = string_field(path, index, "sentence", record.sentence)?;
        if sentence.trim().is_empty() {
            return Err(DataError::invalid(
                path,
                format!("record {index} has an empty \"sentence\""),
            ));
        }
        if !known.contains(label.as_str()) {
            if label == NO_GOLD_LABEL {
                no_gold += 1;
                if options.no_gold_label == NoGoldLabel::Drop {
                    continue;
                }
            } else {
                return Err(DataError::invalid(
                    path,
                    format!(
                        "record {index} has label {label:?}, which is not in labels.json ({})",
                        labels
                            .iter()
                            .map(|l| format!("{l:?}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        examples.push(Example {
            index,
            sentence,
            label,
        });
    }
    if examples.is_empty() {
        return Err(DataError::invalid(
            path,
            format!(
                "the split is empty: all {no_gold} records have no gold label {NO_GOLD_LABEL:?}"
            ),
        ));
    }
    Ok((examples, no_gold))
}

fn string_field(
    path: &Path,
    index: usize,
    field: &str,
    value: Option<serde_json::Value>,
) -> Result<String> {
    match value {
        Some(serde_json::Value::String(s)) => Ok(s),
        None => Err(DataError::invalid(
            path,
            format!("record {index} has no \"{field}\" (or it is null)"),
        )),
        Some(other) => {
            let shown: String = other.to_string().chars().take(80).collect();
            Err(DataError::invalid(
                path,
                format!("record {index}: \"{field}\" must be a string, found {shown}"),
            ))
        }
    }
}
