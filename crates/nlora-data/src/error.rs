//! Errors of the data crate. Each names the file (or task, or order) and the
//! problem, and where it helps, what to do about it.
use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = DataError> = std::result::Result<T, E>;

/// Everything that can go wrong reading, validating, sampling or batching the
/// CL benchmark.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The benchmark folder does not exist.
    #[error(
        "CL benchmark data directory {path} ({origin}) does not exist or is not a directory; \
         pass --data-dir DIR or set NLORA_DATA to the CL_Benchmark folder"
    )]
    DataDirMissing {
        /// The path that was tried.
        path: PathBuf,
        /// Where the path came from (flag, environment variable, default).
        origin: String,
    },

    /// A file the format requires is absent.
    #[error("{path} is missing: {what}")]
    MissingFile {
        /// The absent file.
        path: PathBuf,
        /// What the file should hold.
        what: &'static str,
    },

    /// The file exists but could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// The file is not UTF-8.
    #[error(
        "{path} is not valid UTF-8 (first invalid byte at offset {offset}, line {line}); \
         the CL benchmark files are UTF-8 JSON: re-encode the file as UTF-8"
    )]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// Byte offset of the first invalid byte.
        offset: usize,
        /// 1-based line of that byte.
        line: usize,
    },

    /// The file is not JSON, or not JSON of the expected shape.
    #[error("{path} is not valid JSON of the expected shape ({expected}): {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The shape the format requires.
        expected: &'static str,
        /// The parser's message, with line and column.
        #[source]
        source: serde_json::Error,
    },

    /// The file parsed but its content breaks the format.
    #[error("{path}: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the record, field and value.
        problem: String,
    },

    /// A task name (in an order or on the command line) is not in the benchmark.
    #[error("unknown task {name:?}{context}; known tasks: {}", known.join(", "))]
    UnknownTask {
        /// The name given.
        name: String,
        /// Where it was given, e.g. " in order \"a,b\"".
        context: String,
        /// Task names found in the data directory.
        known: Vec<String>,
    },

    /// A task type has no zero-shot instruction in instruction_config.json.
    #[error(
        "instruction_config.json has no zero-shot instruction for task type {task_type} \
         (needed by task {task}); add one under the key {task_type:?}"
    )]
    NoInstruction {
        /// The type.
        task_type: String,
        /// The task that needs it.
        task: String,
    },

    /// An order specification is malformed (empty, repeated task).
    #[error("invalid task order {spec:?}: {problem}")]
    InvalidOrder {
        /// The specification given.
        spec: String,
        /// What is wrong.
        problem: String,
    },

    /// Sampling was asked for something the data cannot give.
    #[error("task {task}: {problem}")]
    Sampling {
        /// The task.
        task: String,
        /// What is wrong.
        problem: String,
    },

    /// Tokenising failed, or the token budget cannot hold the prompt.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

impl DataError {
    pub(crate) fn invalid(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        DataError::Invalid {
            path: path.into(),
            problem: problem.into(),
        }
    }
}
