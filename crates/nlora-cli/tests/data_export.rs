//! `nlora data export` writes what the engine trains and evaluates on: the
//! exported first batch gives the loss that `nlora run` logs for its first
//! step, every stage's batches hold the tokens the run counts, and the
//! evaluation prompts are the run's test examples.
use std::path::Path;
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use nlora_adapter::ForwardMode;
use nlora_model::lm::{LanguageModel, LmBatch};
use nlora_model::load::load_any_model;
use nlora_train::testing::{data_dir, write_tiny_llama};
use serde_json::Value;

const CONFIG: &str = r#"
seed = 5
[model]
r = 4
alpha = 8.0
[data]
tasks = ["dbpedia", "amazon", "CB"]
max_train_per_task = 7
max_test_per_task = 3
max_source_len = 96
[method]
name = "nlora"
lambda = 0.001
[train]
batch_size = 3
lr = 0.005
epochs = [1, 2, 1]
[eval]
batch_size = 2
rank_classification = false
"#;

fn nlora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nlora"))
        .args(args)
        .env("NLORA_DATA", data_dir())
        .output()
        .expect("nlora runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn matrix<T: candle_core::WithDType>(v: &Value) -> Vec<Vec<T>> {
    serde_json::from_value::<Vec<Vec<f64>>>(v.clone())
        .unwrap()
        .into_iter()
        .map(|row| row.into_iter().map(T::from_f64).collect())
        .collect()
}

fn tensor<T: candle_core::WithDType>(rows: Vec<Vec<T>>) -> Tensor {
    let (b, s) = (rows.len(), rows[0].len());
    Tensor::from_vec(
        rows.into_iter().flatten().collect::<Vec<T>>(),
        (b, s),
        &Device::Cpu,
    )
    .unwrap()
}

/// The loss of an exported batch under the untouched base model.
fn base_loss(model: &dyn LanguageModel, batch: &Value) -> f64 {
    let lm = LmBatch::new(
        tensor(matrix::<u32>(&batch["input_ids"])),
        tensor(matrix::<u32>(&batch["attention_mask"])),
        tensor(matrix::<i64>(&batch["labels"])),
    )
    .unwrap();
    model
        .loss(&lm, ForwardMode::Inference)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// "task 1 (dbpedia) first batch: loss parts task 10.83, l1 0" in train.log.
fn logged_first_losses(log: &str) -> Vec<f64> {
    log.lines()
        .filter_map(|l| l.split("first batch: loss parts task ").nth(1))
        .map(|rest| rest.split(',').next().unwrap().trim().parse().unwrap())
        .collect()
}

#[test]
fn export_is_what_the_engine_trains_and_evaluates_on() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("model");
    write_tiny_llama(&model_dir, 3).unwrap();
    let cfg = tmp.path().join("run.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let (cfg_s, model_s) = (cfg.to_str().unwrap(), model_dir.to_str().unwrap());

    let export = tmp.path().join("export");
    let out = nlora(&[
        "data",
        "export",
        "--config",
        cfg_s,
        "--model",
        model_s,
        "--out",
        export.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "export: {}", text(&out.stderr));
    let run = tmp.path().join("run");
    let out = nlora(&[
        "run",
        "--config",
        cfg_s,
        "--model",
        model_s,
        "--out",
        run.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(out.status.success(), "run: {}", text(&out.stderr));

    let settings = read_json(&export.join("settings.json"));
    let results = read_json(&run.join("results.json"));
    let stages = settings["train"]["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 3);
    assert_eq!(settings["tasks"], results["tasks"]);
    assert_eq!(settings["lora"]["r"], 4);
    assert_eq!(settings["train"]["batch_size"], 3);

    // Every stage: the batches hold exactly the tokens the run trained on,
    // in ceil(7 / 3) batches per epoch, each example once per epoch.
    let tokens_seen = results["tokens_seen"].as_array().unwrap();
    let mut batches_of = Vec::new();
    for (s, stage) in stages.iter().enumerate() {
        let batches = read_jsonl(&export.join(stage["file"].as_str().unwrap()));
        let epochs = [1, 2, 1][s];
        assert_eq!(batches.len(), 3 * epochs, "stage {}", s + 1);
        assert_eq!(stage["batches"], batches.len());
        let tokens: u64 = batches.iter().map(|b| b["tokens"].as_u64().unwrap()).sum();
        assert_eq!(tokens, tokens_seen[s].as_u64().unwrap(), "stage {}", s + 1);
        for b in &batches {
            let mask = matrix::<u32>(&b["attention_mask"]);
            let counted: u32 = mask.iter().flatten().sum();
            assert_eq!(u64::from(counted), b["tokens"].as_u64().unwrap());
            let labels = matrix::<i64>(&b["labels"]);
            let ids = matrix::<u32>(&b["input_ids"]);
            for (row, (l, i)) in labels.iter().zip(&ids).enumerate() {
                let labelled: Vec<u32> = l
                    .iter()
                    .zip(i)
                    .filter(|(&l, _)| l != -100)
                    .map(|(&l, &id)| {
                        assert_eq!(l, i64::from(id), "labels are the input ids");
                        id
                    })
                    .collect();
                // The answer and its EOS, nothing of the prompt.
                assert_eq!(
                    labelled.last().copied(),
                    settings["tokens"]["eos"].as_u64().map(|e| e as u32),
                    "row {row}"
                );
                assert!(!labelled.is_empty());
            }
            assert_eq!(b["examples"].as_array().unwrap().len(), ids.len());
        }
        // A two-epoch stage reshuffles: the same examples, another order.
        if epochs == 2 {
            let answers = |bs: &[Value]| -> Vec<String> {
                bs.iter()
                    .flat_map(|b| b["examples"].as_array().unwrap().clone())
                    .map(|e| e["prompt"].as_str().unwrap().to_string())
                    .collect()
            };
            let (first, second) = (answers(&batches[..3]), answers(&batches[3..]));
            assert_ne!(first, second, "the second epoch repeats the first's order");
            let (mut a, mut b) = (first.clone(), second.clone());
            a.sort();
            b.sort();
            assert_eq!(a, b, "each epoch sees every example once");
        }
        batches_of.push(batches);
    }

    // Stage 1's first step meets the untouched base model (B = 0): the loss
    // the run logged is the exported first batch's loss, and not the loss
    // of another batch of the stage.
    let logged = logged_first_losses(&std::fs::read_to_string(run.join("train.log")).unwrap());
    assert_eq!(logged.len(), 3, "one first-batch line per stage");
    let model = load_any_model(&model_dir, DType::F32, &Device::Cpu).unwrap();
    let first = base_loss(&model, &batches_of[0][0]);
    let tol = 1e-5 * first.abs();
    assert!(
        (logged[0] - first).abs() <= tol,
        "run logged {} for its first batch, the exported first batch gives {first}",
        logged[0]
    );
    for other in &batches_of[0][1..] {
        let l = base_loss(&model, other);
        assert!(
            (l - first).abs() > tol,
            "another batch gives the same loss ({l}): the check cannot tell batches apart"
        );
    }

    // Evaluation: the run's test examples, each prompt ending in the answer cue.
    let tasks = settings["eval"]["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 3);
    for task in tasks {
        let examples = read_jsonl(&export.join(task["file"].as_str().unwrap()));
        assert_eq!(examples.len(), 3);
        let labels: Vec<&str> = task["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_str().unwrap())
            .collect();
        for e in &examples {
            assert!(labels.contains(&e["answer"].as_str().unwrap()));
            assert!(e["prompt"].as_str().unwrap().ends_with("\nAnswer:"));
            assert!(!e["prompt_ids"].as_array().unwrap().is_empty());
        }
        assert!(task["max_new_tokens"].as_u64().unwrap() >= 3);
    }
    assert!(export.join("tokenizer.json").is_file());
}

#[test]
fn export_refuses_replay_and_a_missing_config() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("x");
    let out = nlora(&[
        "data",
        "export",
        "--preset",
        "smoke",
        "--method",
        "replay",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("replay"),
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(!out_dir.exists(), "nothing written on a refused export");

    let out = nlora(&["data", "export", "--out", out_dir.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--config") || text(&out.stderr).contains("--preset"),
        "stderr: {}",
        text(&out.stderr)
    );
}
