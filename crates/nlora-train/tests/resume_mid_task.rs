//! Mid-task resume for every kind of stage the methods have: an adapter that
//! goes on into the next task (seqlora), one adapter per task swapped in at
//! evaluation (pertask), a single stage over all tasks (mtl), and earlier
//! adapters merged into the base weight (nlora, history = merged). Each run
//! is stopped inside a task, after a checkpoint, by an injected NaN (the run
//! stops exactly as after a crash there: state.json names the last
//! checkpoint), then resumed without the fault; results and every adapter
//! must equal an uninterrupted run's bit for bit.
//!
//! One test in its own binary: it sets the process-wide fault variable.
use std::path::Path;

use nlora_train::config::{HistoryMode, MethodName, PerTask, RunConfig};
use nlora_train::engine::{run, RunOptions};
use nlora_train::fault::NAN_ENV;
use nlora_train::testing::{data_dir, tiny_run_config, write_tiny_llama};
use nlora_train::TrainError;

fn config(model: &Path, method: MethodName, history: HistoryMode) -> RunConfig {
    // The tiny end-to-end run, with two epochs, accumulation and a
    // checkpoint after every step.
    let mut cfg = tiny_run_config(model, method);
    cfg.seed = 17;
    cfg.data.max_test_per_task = Some(2);
    cfg.method.history = history;
    cfg.train.batch_size = 2;
    cfg.train.epochs = PerTask::One(2);
    cfg.train.grad_accum = 2;
    cfg.train.checkpoint_every = 1;
    cfg.eval.rank_classification = false;
    cfg
}

fn opts(out: &Path, resume: bool) -> RunOptions {
    RunOptions {
        out: out.to_path_buf(),
        resume,
        progress: false,
    }
}

fn adapter_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("task-")
        })
        .map(|p| {
            // A LoRA method's adapter; a full fine-tuning baseline's weights
            // (and EWC's Fisher), kept in the last task's folder only.
            let files = [
                "adapter_model.safetensors",
                "model.safetensors",
                "ewc_fisher.safetensors",
            ];
            let bytes: Vec<u8> = files
                .iter()
                .filter_map(|f| std::fs::read(p.join(f)).ok())
                .flatten()
                .collect();
            (p.file_name().unwrap().to_string_lossy().into_owned(), bytes)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn stopped_inside_a_task_and_resumed_equals_uninterrupted_for_every_stage_kind() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    write_tiny_llama(&model, 4).unwrap();
    // (method, history, fault, the checkpoint state.json must name after the stop).
    // Three batches per epoch, two epochs, two batches per step: steps end
    // after batches 2, 4 and 6 of a task, and step 2 spans the two epochs.
    let cases = [
        (
            MethodName::SeqLora,
            HistoryMode::Stacked,
            "loss:2:5",
            "task-2-step-2",
        ),
        (
            MethodName::PerTask,
            HistoryMode::Stacked,
            "grad:3:4",
            "task-3-step-1",
        ),
        // One stage of 18 examples: 9 batches per epoch; step 5 spans the epochs.
        (
            MethodName::Mtl,
            HistoryMode::Stacked,
            "loss:1:12",
            "task-1-step-5",
        ),
        (
            MethodName::NLora,
            HistoryMode::Merged,
            "grad:3:3",
            "task-3-step-1",
        ),
        // Full fine-tuning: the checkpoint holds every linear weight; EWC's
        // Fisher and anchor, LwF's teacher and Replay's memory come back
        // from the task-end files and the data.
        (
            MethodName::Ewc,
            HistoryMode::Stacked,
            "loss:2:5",
            "task-2-step-2",
        ),
        (
            MethodName::Lwf,
            HistoryMode::Stacked,
            "grad:3:4",
            "task-3-step-1",
        ),
        (
            MethodName::Replay,
            HistoryMode::Stacked,
            "loss:3:5",
            "task-3-step-2",
        ),
    ];
    for (method, history, fault, checkpoint) in cases {
        let name = format!("{}-{history:?}", method.as_str());
        let cfg = config(&model, method, history);
        let reference = tmp.path().join(format!("{name}-ref"));
        run(cfg.clone(), &data_dir(), &opts(&reference, false)).unwrap();

        let stopped = tmp.path().join(format!("{name}-stopped"));
        // The only test of this binary: nothing else reads the environment.
        std::env::set_var(NAN_ENV, fault);
        let err = run(cfg.clone(), &data_dir(), &opts(&stopped, false));
        std::env::remove_var(NAN_ENV);
        match err {
            Err(TrainError::NonFinite { part, step, .. }) => {
                let want = if fault.starts_with("loss") {
                    "task loss"
                } else {
                    "gradient of"
                };
                assert!(part.starts_with(want), "{name}: {part}");
                assert!(step > 1, "{name}: step {step}");
            }
            other => panic!("{name}: expected a non-finite stop, got {other:?}"),
        }
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(stopped.join("state.json")).unwrap())
                .unwrap();
        assert_eq!(
            state["in_progress"]["dir"],
            format!("checkpoint/{checkpoint}"),
            "{name}: {state}"
        );
        assert!(
            !stopped.join(".lock").exists(),
            "{name}: an error keeps no lock"
        );

        run(cfg, &data_dir(), &opts(&stopped, true)).unwrap();
        assert_eq!(
            std::fs::read_to_string(reference.join("results.json")).unwrap(),
            std::fs::read_to_string(stopped.join("results.json")).unwrap(),
            "{name}"
        );
        let (a, b) = (adapter_bytes(&reference), adapter_bytes(&stopped));
        assert_eq!(a.len(), if method == MethodName::Mtl { 1 } else { 3 });
        assert!(
            !a.last().unwrap().1.is_empty(),
            "{name}: the last task saved nothing"
        );
        for ((ka, va), (kb, vb)) in a.iter().zip(&b) {
            assert_eq!(ka, kb);
            assert!(va == vb, "{name}: {ka} differs from the uninterrupted run");
        }
        assert!(!stopped.join("checkpoint").exists());
    }
}
