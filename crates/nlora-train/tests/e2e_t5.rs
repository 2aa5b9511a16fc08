//! End to end on an encoder-decoder: the engine with a tiny random T5 v1.1
//! (the committed nlora-model fixture, written by scripts/gen_t5_fixtures.py)
//! and three real tasks. The LLaMA e2e covers every method; this checks that
//! the engine's batching, evaluation and adapter files follow the model.
use std::path::{Path, PathBuf};

use nlora_train::config::{MethodName, RunConfig};
use nlora_train::engine::{run, RunOptions};
use nlora_train::rundir::Results;
use nlora_train::testing::{data_dir, tiny_run_config};

fn tiny_t5() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../nlora-model/tests/fixtures/t5_v11/model")
}

fn config(method: MethodName, targets: &[&str]) -> RunConfig {
    let mut cfg = tiny_run_config(&tiny_t5(), method);
    cfg.seed = 3;
    cfg.model.target_modules = targets.iter().map(|s| s.to_string()).collect();
    // The fixture tokenizer is nearly character-level: long prompts.
    cfg.data.max_source_len = 400;
    cfg.eval.rank_classification = true;
    cfg
}

fn run_in(cfg: RunConfig, out: &Path) -> nlora_train::error::Result<Results> {
    run(
        cfg,
        &data_dir(),
        &RunOptions {
            out: out.to_path_buf(),
            resume: false,
            progress: false,
        },
    )
}

#[test]
fn nlora_runs_on_t5_and_saves_seq2seq_peft_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let results = run_in(config(MethodName::NLora, &["q", "v"]), &out).unwrap();
    assert_eq!(results.tasks, ["dbpedia", "amazon", "CB"]);
    assert_eq!(results.accuracy_matrix.len(), 3);
    assert_eq!(results.accuracy_matrix_rank.len(), 3);
    for row in results
        .accuracy_matrix
        .iter()
        .chain(&results.accuracy_matrix_rank)
    {
        assert_eq!(row.len(), 3);
        assert!(row.iter().all(|a| (0.0..=1.0).contains(a)));
    }
    // Seq2seq batches count source and target tokens.
    assert!(results.tokens_seen.iter().all(|&t| t > 0));

    let adapter = out.join("task-1-dbpedia");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(adapter.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["task_type"], "SEQ_2_SEQ_LM");
    let st = candle_core::safetensors::load(
        adapter.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    // 2 encoder layers (self-attention) + 2 decoder layers (self- and
    // cross-attention), q and v, A and B each.
    assert_eq!(st.len(), (2 + 2 * 2) * 2 * 2, "{:?}", st.keys());
    let a = &st["base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight"];
    assert_eq!(a.dims(), [4, 32]);
    let b = &st["base_model.model.decoder.block.1.layer.1.EncDecAttention.v.lora_B.weight"];
    assert_eq!(b.dims(), [32, 4]);

    // The geometry, with the capacity forecast, reads the seq2seq adapters.
    let m = nlora_train::analysis::run_metrics(
        &out,
        nlora_math::metrics::CollisionThreshold::RelativeToSiteMax(0.01),
    )
    .unwrap();
    assert_eq!(m.sites.len(), 12);
    for site in &m.sites {
        let c = site.capacity.as_ref().unwrap();
        let max_d = site.density.iter().cloned().fold(0.0, f64::max);
        let sum_d: f64 = site.density.iter().sum();
        // the union of supports covers the largest and at most all of them
        assert!(c.used_fraction >= max_d - 1e-12 && c.used_fraction <= sum_d + 1e-12);
        let used: Vec<f64> = c
            .forecast
            .iter()
            .map(|p| p.expected_used_fraction)
            .collect();
        assert!(used.windows(2).all(|w| w[0] <= w[1] + 1e-12), "{used:?}");
    }
    assert!(m.capacity.is_some());
}

#[test]
fn same_seed_twice_on_t5_gives_identical_results() {
    let tmp = tempfile::tempdir().unwrap();
    let read = |p: &Path| std::fs::read(p.join("results.json")).unwrap();
    run_in(
        config(MethodName::OLora, &["q", "v"]),
        &tmp.path().join("a"),
    )
    .unwrap();
    run_in(
        config(MethodName::OLora, &["q", "v"]),
        &tmp.path().join("b"),
    )
    .unwrap();
    assert_eq!(read(&tmp.path().join("a")), read(&tmp.path().join("b")));
}

#[test]
fn llama_attention_names_are_read_as_t5_names_and_others_are_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    // The presets name q_proj/v_proj: on T5 they are q/v, recorded as such.
    let mut cfg = config(MethodName::SeqLora, &["q_proj", "v_proj"]);
    cfg.data.tasks = Some(vec!["CB".into()]);
    run_in(cfg, &tmp.path().join("mapped")).unwrap();
    let saved = RunConfig::from_toml_file(&tmp.path().join("mapped").join("config.toml")).unwrap();
    assert_eq!(saved.model.target_modules, ["q", "v"]);

    let err = run_in(
        config(MethodName::NLora, &["q_proj", "gate_proj"]),
        &tmp.path().join("bad"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("gate_proj"), "{err}");
    assert!(err.contains("\"q\""), "{err}");
}

#[test]
fn resume_refuses_saved_adapters_of_another_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let mut cfg = config(MethodName::IncLora, &["q", "v"]);
    cfg.data.tasks = Some(vec!["CB".into()]);
    run_in(cfg, &out).unwrap();
    // the user edits the run's own config.toml, then resumes
    let path = out.join("config.toml");
    let mut saved = RunConfig::from_toml_file(&path).unwrap();
    saved.model.r = 8;
    std::fs::write(&path, saved.to_toml()).unwrap();
    let err = run(
        saved,
        &data_dir(),
        &RunOptions {
            out: out.clone(),
            resume: true,
            progress: false,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("task-1-CB"), "{err}");
    assert!(err.contains("r = 4") && err.contains("r = 8"), "{err}");
}
