//! `nlora run` as a user runs it: a run killed with SIGKILL after its first
//! task and resumed ends with the same results.json as an uninterrupted run;
//! `nlora metrics` reads the finished run.
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nlora_train::testing::{data_dir, write_tiny_llama};

const CONFIG: &str = r#"
seed = 11
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

fn run_args(cfg: &Path, model: &Path, out: &Path) -> Vec<String> {
    vec![
        "run".into(),
        "--config".into(),
        cfg.display().to_string(),
        "--model".into(),
        model.display().to_string(),
        "--out".into(),
        out.display().to_string(),
        "--quiet".into(),
    ]
}

#[test]
fn killed_after_task_one_and_resumed_gives_identical_results() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    write_tiny_llama(&model, 5).unwrap();
    let cfg = tmp.path().join("run.toml");
    std::fs::write(&cfg, CONFIG).unwrap();

    let full = tmp.path().join("full");
    let st = nlora()
        .args(run_args(&cfg, &model, &full))
        .status()
        .unwrap();
    assert!(st.success());

    let crashed = tmp.path().join("crashed");
    let mut child = nlora()
        .args(run_args(&cfg, &model, &crashed))
        .env("NLORA_FAULT_PAUSE_AFTER_STAGE", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let state = crashed.join("state.json");
    let t0 = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(&state) {
            if text.contains("\"completed_stages\": 1") {
                break;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "stage 1 never finished"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "run exited before the kill"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!crashed.join("results.json").exists());
    // The lock of the killed process is stale and must be taken over.
    assert!(crashed.join(".lock").exists());

    let out = nlora()
        .args(run_args(&cfg, &model, &crashed))
        .arg("--resume")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "resume failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = std::fs::read_to_string(full.join("results.json")).unwrap();
    let b = std::fs::read_to_string(crashed.join("results.json")).unwrap();
    assert_eq!(a, b, "resumed run differs from the uninterrupted one");

    let m = nlora()
        .args(["metrics", &full.display().to_string(), "--tau-rel", "0.05"])
        .output()
        .unwrap();
    assert!(m.status.success(), "{}", String::from_utf8_lossy(&m.stderr));
    let text = String::from_utf8_lossy(&m.stdout);
    assert!(text.contains("AWOM"), "{text}");
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(full.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["sites"].as_array().unwrap().len(), 4);
    let acr = metrics["acr"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acr));
}

#[test]
fn bad_config_is_a_clear_error_with_exit_code_1() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("[method]\nname = \"nlora\"\nbogus = 1\n", "bogus"),
        ("[method]\nname = \"magic\"\n", "magic"),
        ("[method]\nname = \"nlora\"\n[train]\nlr = -1.0\n", "lr"),
        ("[method]\nname = \"nlora\"\n[model]\nr = 0\n", "model.r"),
        ("[method]\nname = \"nlora\"\nlambda = -0.5\n", "lambda"),
        (
            "[method]\nname = \"nlora\"\n[data]\ntasks = []\n",
            "no task",
        ),
        (
            "[method]\nname = \"nlora\"\n[model]\ntarget_modules = [\"qq_proj\"]\n",
            "qq_proj",
        ),
        (
            "[method]\nname = \"nlora\"\n[data]\ntasks = [\"dbpedia\", \"nosuchtask\"]\n",
            "nosuchtask",
        ),
    ];
    for (i, (toml, needle)) in cases.iter().enumerate() {
        let cfg = tmp.path().join(format!("c{i}.toml"));
        std::fs::write(&cfg, toml).unwrap();
        let out = nlora()
            .args([
                "run",
                "--config",
                &cfg.display().to_string(),
                "--out",
                &tmp.path().join(format!("o{i}")).display().to_string(),
                "--quiet",
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "case {i}: {err}");
        assert!(err.contains(needle), "case {i}: `{needle}` not in: {err}");
        assert!(!err.contains("panicked"), "case {i}: {err}");
    }
}
