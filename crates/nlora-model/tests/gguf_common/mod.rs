//! Shared by the GGUF/tokenizer tests: where the real model, the benchmark data and the
//! SmolLM2 fixtures (scripts/gen_smollm2_fixtures.py) live.
#![allow(dead_code)]
use std::path::PathBuf;

/// The SmolLM2 GGUF: `NLORA_MODEL`, else the fetch script's cache path. Panics (fails the
/// test) when absent: these tests must never pass without the model.
pub fn model_path() -> PathBuf {
    let path = match std::env::var_os("NLORA_MODEL") {
        Some(p) => PathBuf::from(p),
        None => {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            home.join(".cache/nlora/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        }
    };
    assert!(
        path.is_file(),
        "model not found at {}: run scripts/fetch-model.sh (or set NLORA_MODEL)",
        path.display()
    );
    path
}

/// The CL benchmark folder: `NLORA_DATA`, else ../shared/cl_benchmark beside the repo.
pub fn data_path() -> PathBuf {
    let path = match std::env::var_os("NLORA_DATA") {
        Some(p) => PathBuf::from(p),
        None => repo_root().join("../shared/cl_benchmark"),
    };
    assert!(
        path.join("instruction_config.json").is_file(),
        "benchmark data not found at {}: set NLORA_DATA to the cl_benchmark folder",
        path.display()
    );
    path
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/smollm2")
        .join(name)
}

pub fn read_json(name: &str) -> serde_json::Value {
    let path = fixture(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("ids array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// The benchmark prompt of REFERENCE.md "Prompts" with the default "Task:/Dataset:" prefix,
/// as the fixture generator builds it. `task` is "TYPE/NAME".
pub fn benchmark_prompt(task: &str, file: &str, index: usize) -> String {
    let data = data_path();
    let (ttype, name) = task.split_once('/').expect("TYPE/NAME");
    let dir = data.join(ttype).join(name);
    let load = |p: PathBuf| -> serde_json::Value {
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    let records = load(dir.join(file));
    let sentence = records[index]["sentence"].as_str().expect("sentence");
    let prefix = format!("Task:{ttype}\nDataset:{name}\n");
    if ttype == "COPA" {
        return format!("{prefix}{sentence}\nAnswer:");
    }
    let labels: Vec<String> = load(dir.join("labels.json"))
        .as_array()
        .expect("labels")
        .iter()
        .map(|l| l.as_str().expect("label").to_string())
        .collect();
    let instructions = load(data.join("instruction_config.json"));
    let instruction = instructions[ttype][0]["instruction"]
        .as_str()
        .expect("instruction");
    format!(
        "{prefix}{instruction}Option: {} \n{sentence}\nAnswer:",
        labels.join(", ")
    )
}
