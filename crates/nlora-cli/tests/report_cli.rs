//! `nlora report` as a user runs it: `nlora run`, `nlora metrics`, then the
//! report; and the errors a user meets with wrong arguments.
use std::process::Command;

use nlora_train::testing::{data_dir, write_tiny_llama};

const CONFIG: &str = r#"
seed = 3
[model]
r = 4
alpha = 8.0
[data]
tasks = ["dbpedia", "amazon", "CB"]
max_train_per_task = 6
max_test_per_task = 3
max_source_len = 96
[method]
name = "nlora"
lambda = 0.001
[train]
batch_size = 3
lr = 0.005
[eval]
batch_size = 4
rank_classification = false
"#;

fn nlora() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nlora"));
    c.env("NLORA_DATA", data_dir());
    c
}

fn ok(c: &mut Command) -> String {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Exit status 1 and the stderr text.
fn fails(c: &mut Command) -> String {
    let out = c.output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{:?}", out);
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn run_metrics_report() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    write_tiny_llama(&model, 4).unwrap();
    let cfg = tmp.path().join("run.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let run = tmp.path().join("r");
    let run_s = run.display().to_string();
    ok(nlora().args([
        "run",
        "--config",
        &cfg.display().to_string(),
        "--model",
        &model.display().to_string(),
        "--out",
        &run_s,
        "--quiet",
    ]));
    ok(nlora().args(["metrics", &run_s]));

    let out = tmp.path().join("report");
    let out_s = out.display().to_string();
    let text = ok(nlora().args([
        "report",
        &run_s,
        "--out",
        &out_s,
        "--site",
        "model.layers.1.self_attn.q_proj",
        "--tasks",
        "2,3",
    ]));
    assert!(text.contains("report.html"), "{text}");
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains(
            "site model.layers.1.self_attn.q_proj, task 2 (amazon, green) vs task 3 (CB, blue)"
        ),
        "{md}"
    );
    for f in [
        "report.html",
        "gsr-acr.png",
        "accuracy-r.png",
        "curves-r.png",
        "collision-r.png",
        "nuclear-r.png",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }

    // Wrong arguments: each error names what is wrong.
    let not_run = tmp.path().join("model");
    let err = fails(nlora().args(["report", &not_run.display().to_string(), "--out", &out_s]));
    assert!(
        err.contains(&not_run.display().to_string()) && err.contains("not a run directory"),
        "{err}"
    );
    let err = fails(nlora().args(["report", &run_s, "--out", &out_s, "--tasks", "2,2"]));
    assert!(
        err.contains("--tasks 2,2") && err.contains("differ"),
        "{err}"
    );
    let err = fails(nlora().args(["report", &run_s, "--out", &out_s, "--tasks", "0,1"]));
    assert!(err.contains("--tasks 0,1"), "{err}");
    let err = fails(nlora().args(["report", &run_s, "--out", &out_s, "--site", "lm_head"]));
    assert!(
        err.contains("`lm_head`") && err.contains("model.layers.0.self_attn.q_proj"),
        "{err}"
    );
    let err = fails(nlora().args(["report", &run_s, "--out", &out_s, "--tau-rel", "2"]));
    assert!(err.contains("relative collision threshold"), "{err}");
}
