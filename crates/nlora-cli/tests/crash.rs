//! Crash safety of `nlora run`, as a user meets it: the real binary on a tiny
//! random LLaMA (SmolLM2's tokenizer) and three real tasks, killed with
//! SIGKILL at chosen points (mid-step, while a checkpoint is written, during
//! evaluation), refused a second owner of its run directory, starved of disk
//! space, and fed a NaN. After each, `--resume` must finish with the same
//! results.json and bit-identical adapters as an uninterrupted run, and no
//! file in the run directory may be half-written.
//!
//! The kill points come from the fault hooks of `nlora_train::fault`
//! (NLORA_FAULT_PAUSE_AT prints a marker and sleeps; the test kills the
//! process once it sees the marker), so they are exact, not timed.
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use nlora_train::checkpoint::is_temp_name;
use nlora_train::testing::{data_dir, write_tiny_llama};

/// Six examples in batches of two over two epochs: six optimizer steps per
/// task, checkpoints after steps 2 and 4. Dropout, weight decay, warm-up,
/// a cosine schedule, clipping, both penalties and rank classification are
/// on, so every piece of state a resume must carry is exercised.
fn config(on_nonfinite: &str) -> String {
    format!(
        r#"
seed = 3
[model]
r = 4
alpha = 8.0
dropout = 0.1
[data]
tasks = ["dbpedia", "amazon", "CB"]
max_train_per_task = 6
max_test_per_task = 3
max_source_len = 96
[method]
name = "olora+nlora"
lambda = 0.001
[train]
batch_size = 2
epochs = 2
lr = 0.005
weight_decay = 0.01
schedule = "cosine"
warmup_steps = 1
clip_grad_norm = 1.0
checkpoint_every = 2
on_nonfinite = "{on_nonfinite}"
[eval]
batch_size = 4
rank_classification = true
"#
    )
}

const TASK_DIRS: [&str; 3] = ["task-1-dbpedia", "task-2-amazon", "task-3-CB"];
/// Long enough for any machine; only a guard against a hang.
const MARKER_TIMEOUT: Duration = Duration::from_secs(600);

struct Fixture {
    root: PathBuf,
    model: PathBuf,
    config: PathBuf,
    /// An uninterrupted run of `config("stop")`.
    reference: PathBuf,
}

/// The tiny model and the uninterrupted reference run, made once and shared
/// by the tests of this file.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("nlora-crash");
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let model = root.join("model");
        write_tiny_llama(&model, 5).unwrap();
        let config = root.join("run.toml");
        std::fs::write(&config, config_text("stop")).unwrap();
        let reference = root.join("reference");
        let out = nlora()
            .args(run_args(&config, &model, &reference))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_whole_files(&reference);
        Fixture {
            root,
            model,
            config,
            reference,
        }
    })
}

fn config_text(on_nonfinite: &str) -> String {
    config(on_nonfinite)
}

/// A fresh directory for one test's runs.
fn scratch(name: &str) -> PathBuf {
    let d = fixture().root.join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn nlora() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nlora"));
    c.env("NLORA_DATA", data_dir())
        .env_remove("NLORA_FAULT_PAUSE_AT")
        .env_remove("NLORA_FAULT_PAUSE_AFTER_STAGE")
        .env_remove("NLORA_FAULT_NAN_AT");
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

fn resume_args(out: &Path) -> Vec<String> {
    vec![
        "run".into(),
        "--out".into(),
        out.display().to_string(),
        "--resume".into(),
        "--quiet".into(),
    ]
}

/// A running `nlora` whose stderr is collected line by line.
struct Running {
    child: Child,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

fn spawn(mut cmd: Command) -> Running {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, lines) = mpsc::channel();
    let stderr = Arc::new(Mutex::new(String::new()));
    let pipe = child.stderr.take().unwrap();
    let all = stderr.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(|l| l.ok()) {
            all.lock().unwrap().push_str(&format!("{line}\n"));
            let _ = tx.send(line);
        }
    });
    Running {
        child,
        lines,
        stderr,
    }
}

impl Running {
    /// Waits for the fault hook's marker of `point`.
    fn wait_for_pause(&mut self, point: &str) {
        let marker = format!("nlora: fault pause at {point}");
        loop {
            match self.lines.recv_timeout(MARKER_TIMEOUT) {
                Ok(line) if line.trim() == marker => return,
                Ok(_) => {}
                Err(_) => {
                    let status = self.child.try_wait().unwrap();
                    panic!(
                        "no `{marker}` (exit status {status:?}); stderr:\n{}",
                        self.stderr.lock().unwrap()
                    );
                }
            }
        }
    }

    /// SIGKILL: no destructor, no flush, the lock stays behind.
    fn kill9(mut self) {
        self.child.kill().unwrap();
        let status = self.child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
    }
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `nlora run --resume` on `dir` to its end.
fn resume_to_end(dir: &Path) -> Output {
    let out = nlora().args(resume_args(dir)).output().unwrap();
    assert!(out.status.success(), "resume failed:\n{}", stderr_of(&out));
    assert!(!stderr_of(&out).contains("panicked"));
    out
}

/// Every file in the run directory is whole: no temporary of an interrupted
/// write, every JSON parses, every safetensors file loads, the config parses.
fn assert_whole_files(dir: &Path) {
    let mut todo = vec![dir.to_path_buf()];
    let mut seen = 0;
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                todo.push(path);
                continue;
            }
            seen += 1;
            let name = entry.file_name().to_string_lossy().into_owned();
            assert!(
                !is_temp_name(&name),
                "half-written file left: {}",
                path.display()
            );
            if name.ends_with(".json") {
                let text = std::fs::read_to_string(&path).unwrap();
                serde_json::from_str::<serde_json::Value>(&text)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            } else if name.ends_with(".safetensors") {
                candle_core::safetensors::load(&path, &candle_core::Device::Cpu)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            } else if name == "config.toml" {
                nlora_train::RunConfig::from_toml_file(&path).unwrap();
            }
        }
    }
    assert!(seen > 0, "{} is empty", dir.display());
}

fn state(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("state.json")).unwrap()).unwrap()
}

/// The checkpoint state.json names, if any.
fn named_checkpoint(dir: &Path) -> Option<String> {
    let s = state(dir);
    let p = s.get("in_progress")?;
    (p["kind"] == "checkpoint").then(|| p["dir"].as_str().unwrap().to_string())
}

/// results.json, results.csv and every task's adapter are byte-identical.
fn assert_same_as_reference(dir: &Path) {
    let reference = &fixture().reference;
    for file in ["results.json", "results.csv"] {
        let a = std::fs::read_to_string(reference.join(file)).unwrap();
        let b = std::fs::read_to_string(dir.join(file)).unwrap();
        assert_eq!(a, b, "{file} differs from the uninterrupted run");
    }
    for task in TASK_DIRS {
        for file in ["adapter_model.safetensors", "adapter_config.json"] {
            let a = std::fs::read(reference.join(task).join(file)).unwrap();
            let b = std::fs::read(dir.join(task).join(file)).unwrap();
            assert!(a == b, "{task}/{file} differs from the uninterrupted run");
        }
    }
    assert_whole_files(dir);
    assert!(
        !dir.join("checkpoint").exists(),
        "checkpoints left after the end"
    );
    assert!(!dir.join(".lock").exists(), "lock left after the end");
}

fn file_bytes(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                todo.push(path);
            } else {
                out.insert(
                    path.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&path).unwrap(),
                );
            }
        }
    }
    out
}

/// One run directory killed with SIGKILL at one point after another, each
/// time resumed; the lock refuses a second run while the first is alive.
#[test]
fn sigkill_at_each_point_and_resume_gives_the_uninterrupted_results() {
    let f = fixture();
    let dir = scratch("killed").join("run");

    // 1. Mid-step before the first checkpoint: nothing to resume from but the config.
    let mut first = nlora();
    first
        .args(run_args(&f.config, &f.model, &dir))
        .env("NLORA_FAULT_PAUSE_AT", "step:1:1");
    let mut running = spawn(first);
    running.wait_for_pause("step:1:1");

    // The lock: a second run on the same directory is refused while the first lives.
    let pid = running.child.id();
    for args in [run_args(&f.config, &f.model, &dir), resume_args(&dir)] {
        let out = nlora().args(&args).output().unwrap();
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains(&format!("in use by a running nlora process (pid {pid})")),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    running.kill9();
    assert!(dir.join(".lock").exists(), "SIGKILL leaves the lock behind");
    assert!(!dir.join("state.json").exists());
    assert_whole_files(&dir);

    // 2.-6. Resume, each time killed at a later point.
    let points = [
        // mid-step after the checkpoint of step 2: resumes inside epoch 1
        "step:1:3",
        // between the files of step 4's checkpoint: state.json still names step 2
        "ckpt-write:1:4",
        // during the evaluation after task 1: resumes from the saved adapter
        "eval:1:2",
        // mid-step in task 2, after its step-4 checkpoint: resumes inside epoch 2
        "step:2:5",
        // in task 3's first checkpoint write, with no earlier checkpoint in the task
        "ckpt-write:3:2",
    ];
    for (i, point) in points.into_iter().enumerate() {
        let mut cmd = nlora();
        cmd.args(resume_args(&dir))
            .env("NLORA_FAULT_PAUSE_AT", point);
        let mut running = spawn(cmd);
        running.wait_for_pause(point);
        running.kill9();
        assert_whole_files(&dir);
        let st = state(&dir);
        match point {
            "step:1:3" => {
                assert_eq!(
                    named_checkpoint(&dir).as_deref(),
                    Some("checkpoint/task-1-step-2")
                );
            }
            "ckpt-write:1:4" => {
                assert_eq!(
                    named_checkpoint(&dir).as_deref(),
                    Some("checkpoint/task-1-step-2")
                );
                let partial = dir.join("checkpoint/task-1-step-4");
                assert!(partial.join("adapter_params.safetensors").exists());
                assert!(!partial.join("progress.json").exists());
            }
            "eval:1:2" => {
                assert_eq!(st["in_progress"]["kind"], "trained", "{st}");
                assert_eq!(st["completed_stages"], 0);
                assert!(
                    !dir.join("checkpoint").exists(),
                    "superseded checkpoints kept"
                );
            }
            "step:2:5" => {
                assert_eq!(st["completed_stages"], 1);
                assert_eq!(
                    named_checkpoint(&dir).as_deref(),
                    Some("checkpoint/task-2-step-4")
                );
            }
            "ckpt-write:3:2" => {
                assert_eq!(st["completed_stages"], 2);
                assert!(st.get("in_progress").is_none(), "{st}");
            }
            _ => unreachable!(),
        }
        assert!(!dir.join("results.json").exists(), "kill {i} came too late");
    }

    // 7. The last resume runs to the end.
    let out = resume_to_end(&dir);
    assert!(
        stderr_of(&out).contains("taking over the lock"),
        "{}",
        stderr_of(&out)
    );
    assert_same_as_reference(&dir);
}

/// A NaN gradient (the loss finite) stops the run naming the task, step and
/// part, keeps the last good checkpoint, and a resume without the fault ends
/// as the uninterrupted run.
#[test]
fn nonfinite_gradient_stops_with_a_message_and_resume_recovers() {
    let f = fixture();
    let dir = scratch("nan-stop").join("run");
    // Task 2 ("amazon"), batch 5 = step 5, after the step-4 checkpoint.
    let out = nlora()
        .args(run_args(&f.config, &f.model, &dir))
        .env("NLORA_FAULT_NAN_AT", "grad:2:5")
        .output()
        .unwrap();
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for needle in [
        "non-finite gradient of model.layers.0.self_attn.q_proj.lora_A",
        "task 2 (amazon), step 5",
        "the last good checkpoint is kept",
    ] {
        assert!(err.contains(needle), "`{needle}` not in: {err}");
    }
    assert_eq!(
        named_checkpoint(&dir).as_deref(),
        Some("checkpoint/task-2-step-4")
    );
    assert_whole_files(&dir);
    resume_to_end(&dir);
    assert_same_as_reference(&dir);
}

/// With `on_nonfinite = "skip"` a NaN loss skips its batch: the run goes on,
/// says so, records it in results.json, and only that task's training changes.
#[test]
fn nonfinite_loss_with_skip_skips_the_batch() {
    let f = fixture();
    let root = scratch("nan-skip");
    let cfg = root.join("skip.toml");
    std::fs::write(&cfg, config_text("skip")).unwrap();
    let dir = root.join("run");
    let out = nlora()
        .args(run_args(&cfg, &f.model, &dir))
        .env("NLORA_FAULT_NAN_AT", "loss:2:3")
        .output()
        .unwrap();
    let err = stderr_of(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("task 2 (amazon) step 3 batch 3: non-finite task loss (NaN); batch skipped"),
        "{err}"
    );
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap()).unwrap();
    assert_eq!(results["skipped_batches"], serde_json::json!([0, 1, 0]));
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.reference.join("results.json")).unwrap())
            .unwrap();
    assert!(reference.get("skipped_batches").is_none());
    // Task 1 trained as in the reference; task 2 saw one batch fewer.
    let adapter =
        |d: &Path, t: &str| std::fs::read(d.join(t).join("adapter_model.safetensors")).unwrap();
    assert!(adapter(&dir, TASK_DIRS[0]) == adapter(&f.reference, TASK_DIRS[0]));
    assert!(adapter(&dir, TASK_DIRS[1]) != adapter(&f.reference, TASK_DIRS[1]));
    let tokens = |v: &serde_json::Value| v["tokens_seen"].as_array().unwrap().clone();
    assert!(tokens(&results)[1].as_u64() < tokens(&reference)[1].as_u64());
    assert_whole_files(&dir);
}

/// Unmounts the tmpfs when the test ends, passed or not.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A size-limited tmpfs, if this process may mount one (root with
/// CAP_SYS_ADMIN); CI containers often may not.
fn try_tmpfs(at: &Path) -> Option<Mount> {
    std::fs::create_dir_all(at).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(at)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| Mount(at.to_path_buf()))
}

/// Fills the file system of `dir` but for about `free` bytes.
fn fill_leaving(dir: &Path, free: u64) -> PathBuf {
    use std::io::Write;
    let filler = dir.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    let len = f.metadata().unwrap().len();
    f.set_len(len.saturating_sub(free)).unwrap();
    filler
}

/// A run that had finished task 1, resumed where writes fail for want of
/// space; it must stop with a clear message and leave what it had intact.
fn check_disk_full(dir: &Path, starve: impl FnOnce(&mut Command), unstarve: impl FnOnce()) {
    let before = file_bytes(dir);
    let mut cmd = nlora();
    cmd.args(resume_args(dir));
    starve(&mut cmd);
    let out = cmd.output().unwrap();
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("the disk is full"), "{err}");
    assert!(err.contains("nlora run --resume"), "{err}");
    assert!(
        err.contains(&dir.display().to_string()),
        "the message names no file of the run: {err}"
    );
    eprintln!("disk full as expected: {}", err.trim());
    assert_whole_files(dir);
    // What task 1 left is unchanged (the log and the lock may differ).
    let after = file_bytes(dir);
    for (path, bytes) in &before {
        let name = path.to_string_lossy();
        if name == "train.log" || name == ".lock" {
            continue;
        }
        if let Some(now) = after.get(path) {
            if name == "state.json" {
                // Rewritten only if a whole checkpoint got written.
                let s: serde_json::Value = serde_json::from_slice(now).unwrap();
                assert!(s["completed_stages"].as_u64() >= Some(1));
                continue;
            }
            assert!(now == bytes, "{name} changed");
        } else {
            panic!("{name} disappeared");
        }
    }
    unstarve();
    resume_to_end(dir);
    assert_same_as_reference(dir);
}

/// Runs the fixture's config into `dir` and kills it once task 1 is recorded.
fn finished_task_one(dir: &Path) {
    let f = fixture();
    let mut cmd = nlora();
    cmd.args(run_args(&f.config, &f.model, dir))
        .env("NLORA_FAULT_PAUSE_AT", "stage:1");
    let mut running = spawn(cmd);
    running.wait_for_pause("stage:1");
    running.kill9();
}

#[test]
fn disk_full_fails_clearly_and_keeps_earlier_results() {
    // A file size limit (RLIMIT_FSIZE, `ulimit -f`, 1-2 KB) works without
    // privileges: writes past it fail with EFBIG (SIGXFSZ ignored).
    let root = scratch("disk-full");
    let dir = root.join("run");
    finished_task_one(&dir);
    check_disk_full(
        &dir,
        |cmd| {
            let program = cmd.get_program().to_owned();
            let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
            let mut sh = Command::new("sh");
            sh.arg("-c")
                .arg("ulimit -f 2 && trap '' XFSZ && exec \"$0\" \"$@\"")
                .arg(program)
                .args(args)
                .env("NLORA_DATA", data_dir());
            *cmd = sh;
        },
        || {},
    );

    // A really full file system, where this process may mount a small tmpfs.
    let at = root.join("tmpfs");
    match try_tmpfs(&at) {
        None => eprintln!(
            "tmpfs not mountable here (needs root): the file size limit case stands alone"
        ),
        Some(_mount) => {
            let dir = at.join("run");
            finished_task_one(&dir);
            let filler = fill_leaving(&at, 12 * 1024);
            check_disk_full(&dir, |_| {}, || std::fs::remove_file(&filler).unwrap());
        }
    }
}
