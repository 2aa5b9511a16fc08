//! A real divergence, no fault hook: an absurd learning rate (1e20) blows
//! the adapters up within a few steps, and the run stops naming the task,
//! the step and the loss part, or, with `on_nonfinite = "skip"`, skips the
//! bad batches and says how many in results.json. (Measured on this tiny
//! model: lr 1e20 gives a NaN task loss at step 3; lr 1e30 does not diverge
//! at all, the RMS norms absorb lora_B ~ 2e30 and every value stays finite.)
use std::path::Path;

use nlora_train::config::{MethodName, OnNonFinite, PerTask, RunConfig};
use nlora_train::engine::{run, RunOptions};
use nlora_train::testing::{data_dir, tiny_run_config, write_tiny_llama};
use nlora_train::TrainError;

fn config(model: &Path, on_nonfinite: OnNonFinite) -> RunConfig {
    // The tiny end-to-end run on two tasks, at an absurd learning rate.
    let mut cfg = tiny_run_config(model, MethodName::NLora);
    cfg.seed = 5;
    cfg.data.tasks = Some(vec!["dbpedia".into(), "CB".into()]);
    cfg.data.max_test_per_task = Some(2);
    cfg.train.batch_size = 2;
    cfg.train.lr = PerTask::One(1e20);
    cfg.train.on_nonfinite = on_nonfinite;
    cfg.eval.rank_classification = false;
    cfg
}

#[test]
fn an_absurd_learning_rate_stops_the_run_or_skips_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    write_tiny_llama(&model, 6).unwrap();
    let opts = |out: &Path| RunOptions {
        out: out.to_path_buf(),
        resume: false,
        progress: false,
    };

    let stopped = tmp.path().join("stop");
    let err = run(
        config(&model, OnNonFinite::Stop),
        &data_dir(),
        &opts(&stopped),
    )
    .expect_err("a learning rate of 1e20 must diverge");
    let text = err.to_string();
    match err {
        TrainError::NonFinite {
            part,
            task,
            task_name,
            step,
            value,
        } => {
            assert_eq!((task, task_name.as_str()), (1, "dbpedia"), "{text}");
            // The first step starts from the finite initial adapters.
            assert!(step > 1, "{text}");
            assert!(!value.is_finite(), "{text}");
            assert!(
                part.ends_with("loss") || part.starts_with("gradient of"),
                "{text}"
            );
        }
        other => panic!("expected a non-finite stop, got: {other}"),
    }
    assert!(text.contains("task 1 (dbpedia), step "), "{text}");
    assert!(text.contains("the last good checkpoint is kept"), "{text}");
    assert!(!stopped.join("results.json").exists());
    // Fixed as the message says: a sane rate in the run's config.toml, then --resume.
    let saved = stopped.join("config.toml");
    let mut fixed = RunConfig::from_toml_file(&saved).unwrap();
    fixed.train.lr = PerTask::One(5e-3);
    std::fs::write(&saved, fixed.to_toml()).unwrap();
    let resumed = run(
        fixed,
        &data_dir(),
        &RunOptions {
            resume: true,
            ..opts(&stopped)
        },
    )
    .unwrap();
    assert_eq!(resumed.accuracy_matrix.len(), 2);

    let skipped = tmp.path().join("skip");
    let results = run(
        config(&model, OnNonFinite::Skip),
        &data_dir(),
        &opts(&skipped),
    )
    .unwrap();
    assert_eq!(results.skipped_batches.len(), 2, "{results:?}");
    assert!(results.skipped_batches[0] >= 1, "{results:?}");
    let text = std::fs::read_to_string(skipped.join("results.json")).unwrap();
    assert!(text.contains("\"skipped_batches\""), "{text}");
}
