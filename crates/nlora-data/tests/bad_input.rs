//! Broken copies of a real task (CB) in a scratch folder: each defect gives
//! a typed error whose message names the file and the problem. Never a panic.
mod common;

use std::path::{Path, PathBuf};

use nlora_data::{resolve_data_dir_with, Benchmark, DataError, LoadOptions};

fn cb_dir(root: &Path) -> PathBuf {
    root.join("NLI").join("CB")
}

/// Load CB from `root`; the error, which must name `file`.
fn load_err(root: &Path, file: &Path) -> (DataError, String) {
    let bench = Benchmark::open(root).expect("the scratch benchmark opens");
    let err = bench
        .load_task("CB", &LoadOptions::default())
        .expect_err("the broken task must not load");
    let msg = err.to_string();
    assert!(
        msg.contains(&file.display().to_string()),
        "error does not name {}: {msg}",
        file.display()
    );
    (err, msg)
}

#[test]
fn the_intact_copy_loads() {
    let (_tmp, root) = common::scratch_with_task("NLI", "CB");
    let task = Benchmark::open(&root)
        .unwrap()
        .load_task("CB", &LoadOptions::default())
        .unwrap();
    assert_eq!(task.train.len(), 250);
}

#[test]
fn missing_labels_json() {
    let (_tmp, root) = common::scratch_with_task("NLI", "CB");
    let file = cb_dir(&root).join("labels.json");
    std::fs::remove_file(&file).unwrap();
    let (err, msg) = load_err(&root, &file);
    assert!(matches!(err, DataError::MissingFile { .. }), "{err:?}");
    assert!(msg.contains("missing"), "{msg}");
}

#[test]
fn train_json_is_not_json() {
    let (_tmp, root) = common::scratch_with_task("NLI", "CB");
    let file = cb_dir(&root).join("train.json");
    std::fs::write(
        &file,
        "[{\"label\": \"neutral\", \"sentence\": \"x\"},\n oops]",
    )
    .unwrap();
    let (err, msg) = load_err(&root, &file);
    assert!(matches!(err, DataError::Json { .. }), "{err:?}");
    assert!(
        msg.contains("not valid JSON") && msg.contains("line 2"),
        "{msg}"
    );
}

#[test]
fn train_json_is_json_of_the_wrong_shape() {
    let (_tmp, root) = common::scratch_with_task("NLI", "CB");
    let file = cb_dir(&root).join("train.json");
    std::fs::write(&file, "{\"label\": \"neutral\", \"sentence\": \"x\"}").unwrap();
    let (err, msg) = load_err(&root, &file);
    assert!(matches!(err, DataError::Json { .. }), "{err:?}");
    assert!(msg.contains("JSON list"), "{msg}");
}

fn rewrite_record(file: &Path, index: usize, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
    edit(&mut v.as_array_mut().unwrap()[index]);
    std::fs::write(file, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[test]
fn record_without_label_or_sentence() {
    for field in ["label", "sentence"] {
        let (_tmp, root) = common::scratch_with_task("NLI", "CB");
        let file = cb_dir(&root).join("test.json");
        rewrite_record(&file, 17, |r| {
            r.as_object_mut().unwrap().remove(field);
        });
        let (err, msg) = load_err(&root, &file);
        assert!(matches!(err, DataError::Invalid { .. }), "{err:?}");
        assert!(
            msg.contains(&format!("record 17 has no \"{field}\"")),
            "{msg}"
        );
    }
}

#[test]
fn label_that_is_not_a_string() {
    let (_tmp, root) = common::scratch_with_task("NLI", "CB");
    let file = cb_dir(&root).join("train.json");
    rewrite_record(&file, 3, |r| r["label"] = serde_json::json!(1));
    let (_, msg) = load_err(&root, &file);
    assert!(
        msg.contains("record 3") && msg.contains("must be a string"),
        "{msg}"
    );
}

#[test]
fn label_not_in_labels_json() {
    let (_tmp, root) = common::scratch_with_task("NLI", "CB");
    let file = cb_dir(&root).join("train.json");
    rewrite_record(&file, 42, |r| r["label"] = serde_json::json!("Neutral"));
    let (err, msg) = load_err(&root, &file);
    assert!(matches!(err, DataError::Invalid { .. }), "{err:?}");
    assert!(
        msg.contains("record 42")
            && msg.contains("\"Neutral\"")
            && msg.contains("not in labels.json")
            && msg.contains("\"neutral\""),
        "{msg}"
    );
}

#[test]
fn empty_split() {
    let (_tmp, root) = common::scratch_with_task("NLI", "CB");
    let file = cb_dir(&root).join("test.json");
    std::fs::write(&file, "[]").unwrap();
    let (err, msg) = load_err(&root, &file);
    assert!(matches!(err, DataError::Invalid { .. }), "{err:?}");
    assert!(msg.contains("empty"), "{msg}");
}

#[test]
fn split_left_empty_by_dropping_no_gold_records() {
    let (_tmp, root) = common::scratch_with_task("NLI", "CB");
    let file = cb_dir(&root).join("test.json");
    std::fs::write(&file, r#"[{"label": "-", "sentence": "no gold"}]"#).unwrap();
    let (_, msg) = load_err(&root, &file);
    assert!(
        msg.contains("empty") && msg.contains("no gold label"),
        "{msg}"
    );
}

#[test]
fn duplicate_labels_in_labels_json() {
    let (_tmp, root) = common::scratch_with_task("NLI", "CB");
    let file = cb_dir(&root).join("labels.json");
    std::fs::write(
        &file,
        r#"["entailment", "contradiction", "neutral", "entailment"]"#,
    )
    .unwrap();
    let (err, msg) = load_err(&root, &file);
    assert!(matches!(err, DataError::Invalid { .. }), "{err:?}");
    assert!(msg.contains("duplicate label \"entailment\""), "{msg}");
}

#[test]
fn empty_or_non_list_labels_json() {
    for (text, needle) in [
        ("[]", "empty"),
        ("{\"a\": 1}", "JSON list of label strings"),
    ] {
        let (_tmp, root) = common::scratch_with_task("NLI", "CB");
        let file = cb_dir(&root).join("labels.json");
        std::fs::write(&file, text).unwrap();
        let (_, msg) = load_err(&root, &file);
        assert!(msg.contains(needle), "{msg}");
    }
}

#[test]
fn non_utf8_file() {
    let (_tmp, root) = common::scratch_with_task("NLI", "CB");
    let file = cb_dir(&root).join("dev.json");
    // Windows-1252 en dash (0x96) inside a sentence on line 2, byte 38
    // (22 bytes of line 1 with its newline, 16 before it on line 2).
    let mut bytes = b"[{\"label\": \"neutral\",\n \"sentence\": \"a ".to_vec();
    bytes.push(0x96);
    bytes.extend_from_slice(b" b\"}]");
    std::fs::write(&file, bytes).unwrap();
    let (err, msg) = load_err(&root, &file);
    assert!(
        matches!(
            err,
            DataError::NotUtf8 {
                offset: 38,
                line: 2,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        msg.contains("not valid UTF-8") && msg.contains("line 2"),
        "{msg}"
    );
}

#[test]
fn unknown_task_name_in_an_order() {
    let (_tmp, root) = common::scratch_with_task("NLI", "CB");
    let bench = Benchmark::open(&root).unwrap();
    let err = bench.resolve_order("CB,RTE").unwrap_err();
    assert!(
        matches!(err, DataError::UnknownTask { ref name, ref known, .. } if name == "RTE" && known == &["CB"]),
        "{err:?}"
    );
    assert!(err.to_string().contains("known tasks: CB"), "{err}");
    // A preset naming tasks this folder lacks fails the same way.
    assert!(matches!(
        bench.resolve_order("order1"),
        Err(DataError::UnknownTask { .. })
    ));
}

#[test]
fn data_dir_that_does_not_exist() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-benchmark");
    let err = resolve_data_dir_with(Some(&missing), None).unwrap_err();
    assert!(matches!(err, DataError::DataDirMissing { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&missing.display().to_string()) && msg.contains("--data-dir"),
        "{msg}"
    );
    let err = resolve_data_dir_with(None, Some(missing.clone().into_os_string())).unwrap_err();
    assert!(err.to_string().contains("NLORA_DATA"), "{err}");
    let err = Benchmark::open(&missing).unwrap_err();
    assert!(matches!(err, DataError::DataDirMissing { .. }), "{err:?}");
}

#[test]
fn data_dir_resolution_order() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    // The flag wins over the environment; the environment over the default;
    // an empty environment value counts as unset.
    assert_eq!(
        resolve_data_dir_with(Some(a.path()), Some(b.path().into())).unwrap(),
        a.path()
    );
    assert_eq!(
        resolve_data_dir_with(None, Some(b.path().into())).unwrap(),
        b.path()
    );
    let err = resolve_data_dir_with(None, Some("".into()));
    match err {
        Ok(p) => assert_eq!(p, Path::new(nlora_data::DEFAULT_DATA_DIR)),
        Err(e) => assert!(e.to_string().contains("default"), "{e}"),
    }
}

#[test]
fn missing_instruction_file_or_instruction() {
    let (_tmp, root) = common::scratch_with_task("NLI", "CB");
    let file = root.join("instruction_config.json");
    std::fs::write(
        &file,
        r#"{"TC": [{"instruction_type": "zero-shot", "instruction": "x\n"}]}"#,
    )
    .unwrap();
    let err = Benchmark::open(&root).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&file.display().to_string()) && msg.contains("NLI") && msg.contains("CB"),
        "{msg}"
    );
    std::fs::remove_file(&file).unwrap();
    let err = Benchmark::open(&root).unwrap_err();
    assert!(matches!(err, DataError::MissingFile { .. }), "{err:?}");
}

#[test]
fn folder_without_tasks() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        common::data_dir().join("instruction_config.json"),
        tmp.path().join("instruction_config.json"),
    )
    .unwrap();
    let err = Benchmark::open(tmp.path()).unwrap_err();
    assert!(err.to_string().contains("no task folders"), "{err}");
}
