//! `nlora data check` and `nlora data orders` as a user runs them.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The real benchmark: $NLORA_DATA, else ../shared/cl_benchmark beside the
/// repository root. Fails (never skips) when absent.
fn data_dir() -> PathBuf {
    let dir = match std::env::var_os("NLORA_DATA").filter(|v| !v.is_empty()) {
        Some(v) => PathBuf::from(v),
        None => repo_root().join("../shared/cl_benchmark"),
    };
    assert!(
        dir.join("instruction_config.json").is_file(),
        "CL benchmark not found at {}: set NLORA_DATA",
        dir.display()
    );
    dir
}

fn nlora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nlora"))
        .args(args)
        .current_dir(repo_root())
        .env_remove("NLORA_DATA")
        .output()
        .expect("nlora runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// label -> count of a split file, counted with untyped JSON.
fn independent_counts(path: &Path) -> BTreeMap<String, u64> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let mut counts = BTreeMap::new();
    for r in v.as_array().unwrap() {
        *counts
            .entry(r["label"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    counts
}

#[test]
fn json_counts_equal_the_files_for_all_fifteen_tasks() {
    let dir = data_dir();
    let out = nlora(&[
        "data",
        "check",
        "--json",
        "--data-dir",
        dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tasks = report["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 15);
    assert!(report["errors"].as_array().unwrap().is_empty());
    for t in tasks {
        let name = t["name"].as_str().unwrap();
        let task_type = t["task_type"].as_str().unwrap();
        for s in t["splits"].as_array().unwrap() {
            let split = s["split"].as_str().unwrap();
            let file = dir.join(task_type).join(name).join(format!("{split}.json"));
            let mut expected = independent_counts(&file);
            let no_gold = expected.remove("-").unwrap_or(0);
            assert_eq!(s["no_gold"].as_u64().unwrap(), no_gold, "{name} {split}");
            let got: BTreeMap<String, u64> = s["label_counts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_u64().unwrap()))
                .filter(|(_, n)| *n > 0)
                .collect();
            assert_eq!(got, expected, "{name} {split}");
            assert_eq!(
                s["examples"].as_u64().unwrap(),
                expected.values().sum::<u64>(),
                "{name} {split}"
            );
        }
    }
}

#[test]
fn tables_print_the_counts_and_the_default_data_dir_is_found() {
    // No --data-dir, no $NLORA_DATA: ../shared/cl_benchmark from the repo root.
    data_dir();
    let out = nlora(&["data", "check", "--order", "CB,COPA"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let cb = &stdout[stdout.find("\nCB (NLI, 3 labels)").expect(&stdout)..];
    let cb = &cb[..cb.find("\nCOPA (COPA, 2 labels)").expect(&stdout)];
    let row = |prefix: &str| -> Vec<String> {
        cb.lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} row in {cb}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    assert_eq!(row("train")[1..3], ["250", "0"]);
    assert_eq!(row("test")[1..3], ["56", "0"]);
    // label rows: label, train, dev, test
    assert_eq!(row("contradiction")[1..], ["119", "28", "28"]);
    assert_eq!(row("entailment")[1..], ["115", "23", "23"]);
    assert_eq!(row("neutral")[1..], ["16", "5", "5"]);
    assert!(cb.contains("byte-identical to test.json"), "{cb}");
    assert!(stdout.contains("all 2 tasks valid"), "{stdout}");
}

#[test]
fn mnli_reports_its_no_gold_records() {
    let dir = data_dir();
    let out = nlora(&[
        "data",
        "check",
        "--order",
        "mnli",
        "--data-dir",
        dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let test_row: Vec<&str> = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("test "))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(test_row[1..3], ["7469", "131"]);
    assert!(
        stdout.contains("131 records have no gold label \"-\" (left out)"),
        "{stdout}"
    );
}

fn scratch_cb() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("bench");
    let src = data_dir();
    std::fs::create_dir_all(root.join("NLI/CB")).unwrap();
    std::fs::copy(
        src.join("instruction_config.json"),
        root.join("instruction_config.json"),
    )
    .unwrap();
    for f in ["labels.json", "train.json", "dev.json", "test.json"] {
        std::fs::copy(src.join("NLI/CB").join(f), root.join("NLI/CB").join(f)).unwrap();
    }
    (tmp, root)
}

/// Runs `data check` on `root`; asserts exit status 1 and that stderr names
/// `file` and contains `problem`.
fn assert_fails(root: &Path, file: &Path, problem: &str) {
    let out = nlora(&["data", "check", "--data-dir", root.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains(&file.display().to_string()),
        "stderr does not name {}: {stderr}",
        file.display()
    );
    assert!(
        stderr.contains(problem),
        "stderr lacks {problem:?}: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn the_intact_scratch_copy_passes() {
    let (_tmp, root) = scratch_cb();
    let out = nlora(&["data", "check", "--data-dir", root.to_str().unwrap()]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
}

#[test]
fn missing_labels_json_exits_1() {
    let (_tmp, root) = scratch_cb();
    let file = root.join("NLI/CB/labels.json");
    std::fs::remove_file(&file).unwrap();
    assert_fails(&root, &file, "is missing");
}

#[test]
fn train_json_not_json_exits_1() {
    let (_tmp, root) = scratch_cb();
    let file = root.join("NLI/CB/train.json");
    std::fs::write(&file, "[{\"label\": \"neutral\"").unwrap();
    assert_fails(&root, &file, "not valid JSON");
}

#[test]
fn record_without_sentence_exits_1() {
    let (_tmp, root) = scratch_cb();
    let file = root.join("NLI/CB/train.json");
    std::fs::write(
        &file,
        r#"[{"label": "neutral", "sentence": "x"}, {"label": "neutral"}]"#,
    )
    .unwrap();
    assert_fails(&root, &file, "record 1 has no \"sentence\"");
}

#[test]
fn label_not_in_labels_json_exits_1() {
    let (_tmp, root) = scratch_cb();
    let file = root.join("NLI/CB/test.json");
    std::fs::write(&file, r#"[{"label": "maybe", "sentence": "x"}]"#).unwrap();
    assert_fails(&root, &file, "label \"maybe\", which is not in labels.json");
}

#[test]
fn empty_split_exits_1() {
    let (_tmp, root) = scratch_cb();
    let file = root.join("NLI/CB/dev.json");
    std::fs::write(&file, "[]").unwrap();
    assert_fails(&root, &file, "empty");
}

#[test]
fn duplicate_labels_exit_1() {
    let (_tmp, root) = scratch_cb();
    let file = root.join("NLI/CB/labels.json");
    std::fs::write(
        &file,
        r#"["neutral", "neutral", "entailment", "contradiction"]"#,
    )
    .unwrap();
    assert_fails(&root, &file, "duplicate label \"neutral\"");
}

#[test]
fn non_utf8_file_exits_1() {
    let (_tmp, root) = scratch_cb();
    let file = root.join("NLI/CB/train.json");
    std::fs::write(&file, b"[{\"label\": \"neutral\", \"sentence\": \"\xff\"}]").unwrap();
    assert_fails(&root, &file, "not valid UTF-8");
}

#[test]
fn unknown_task_in_order_exits_1() {
    let (_tmp, root) = scratch_cb();
    let out = nlora(&[
        "data",
        "check",
        "--data-dir",
        root.to_str().unwrap(),
        "--order",
        "CB,RTE",
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("unknown task \"RTE\"") && stderr.contains("known tasks: CB"),
        "{stderr}"
    );
}

#[test]
fn missing_data_dir_exits_1() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nowhere");
    let out = nlora(&["data", "check", "--data-dir", missing.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&missing.display().to_string()) && stderr.contains("does not exist"),
        "{stderr}"
    );
}

#[test]
fn other_tasks_are_still_reported_when_one_is_invalid() {
    let (_tmp, root) = scratch_cb();
    // A second, intact task beside the broken one.
    let src = data_dir();
    std::fs::create_dir_all(root.join("COPA/COPA")).unwrap();
    for f in ["labels.json", "train.json", "dev.json", "test.json"] {
        std::fs::copy(
            src.join("COPA/COPA").join(f),
            root.join("COPA/COPA").join(f),
        )
        .unwrap();
    }
    std::fs::write(root.join("NLI/CB/test.json"), "[]").unwrap();
    let out = nlora(&["data", "check", "--data-dir", root.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("COPA (COPA, 2 labels)"), "{stdout}");
    assert!(stdout.contains("CB (NLI)  INVALID"), "{stdout}");
    assert!(text(&out.stderr).contains("1 of 2 tasks are invalid: CB"));
}

#[test]
fn orders_lists_table_7() {
    let out = nlora(&["data", "orders"]);
    assert!(out.status.success());
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("  dbpedia -> amazon -> yahoo -> agnews\n"),
        "{stdout}"
    );
    assert!(stdout.contains(
        "  yelp -> amazon -> MNLI -> CB -> COPA -> QQP -> RTE -> IMDB -> SST-2 -> dbpedia -> agnews -> yahoo -> MultiRC -> BoolQA -> WiC\n"
    ));
    assert_eq!(stdout.matches("order").count(), 6);
}
