//! End to end: the whole engine on a tiny random LLaMA (SmolLM2's tokenizer)
//! and three real tasks of the benchmark, a handful of examples each.
use std::path::Path;

use nlora_train::config::{MethodName, RunConfig};
use nlora_train::engine::{run, RunOptions};
use nlora_train::rundir::Results;
use nlora_train::testing::{data_dir, tiny_run_config, write_tiny_llama};

fn tiny_config(model: &Path, method: MethodName) -> RunConfig {
    tiny_run_config(model, method)
}

fn run_once(model: &Path, out: &Path, method: MethodName) -> Results {
    let cfg = tiny_config(model, method);
    run(
        cfg,
        &data_dir(),
        &RunOptions {
            out: out.to_path_buf(),
            resume: false,
            progress: false,
        },
    )
    .unwrap_or_else(|e| panic!("{} failed: {e}", method.as_str()))
}

#[test]
fn every_method_runs_and_writes_a_complete_run_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    write_tiny_llama(&model, 1).unwrap();
    for name in MethodName::ALL {
        let method = MethodName::parse(name).unwrap();
        let out = tmp.path().join(format!("run-{name}"));
        let r = run_once(&model, &out, method);
        let stages = if method == MethodName::Mtl { 1 } else { 3 };
        assert_eq!(r.tasks, ["dbpedia", "amazon", "CB"]);
        assert_eq!(r.accuracy_matrix.len(), stages, "{name}");
        assert!(r
            .accuracy_matrix
            .iter()
            .all(|row| row.len() == 3 && row.iter().all(|v| (0.0..=1.0).contains(v))));
        assert_eq!(r.accuracy_matrix_rank.len(), stages);
        // The files parse back to the same numbers.
        let text = std::fs::read_to_string(out.join("results.json")).unwrap();
        let back: Results = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
        assert!(out.join("results.csv").exists());
        assert!(out.join("config.toml").exists());
        RunConfig::from_toml_file(&out.join("config.toml")).unwrap();
        // PEFT adapter files: keys and shapes of q/v in both layers.
        let first = if method == MethodName::Mtl {
            "task-1-all"
        } else {
            "task-1-dbpedia"
        };
        let dir = out.join(first);
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["peft_type"], "LORA");
        assert_eq!(cfg["r"], 4);
        let tensors = candle_core::safetensors::load(
            dir.join("adapter_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert_eq!(tensors.len(), 2 * 2 * 2, "{name}: {:?}", tensors.keys());
        for l in 0..2 {
            let q = format!("base_model.model.model.layers.{l}.self_attn.q_proj");
            let v = format!("base_model.model.model.layers.{l}.self_attn.v_proj");
            assert_eq!(tensors[&format!("{q}.lora_A.weight")].dims(), [4, 32]);
            assert_eq!(tensors[&format!("{q}.lora_B.weight")].dims(), [32, 4]);
            assert_eq!(tensors[&format!("{v}.lora_A.weight")].dims(), [4, 32]);
            assert_eq!(tensors[&format!("{v}.lora_B.weight")].dims(), [16, 4]);
        }
        // Training moved the adapter away from B = 0.
        let b = &tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"];
        let norm: f32 = b.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(norm > 0.0, "{name}: lora_B stayed zero");
    }
}

#[test]
fn same_seed_gives_identical_results() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    write_tiny_llama(&model, 2).unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    run_once(&model, &a, MethodName::NLora);
    run_once(&model, &b, MethodName::NLora);
    let ra = std::fs::read(a.join("results.json")).unwrap();
    let rb = std::fs::read(b.join("results.json")).unwrap();
    assert_eq!(ra, rb);
    for k in ["task-1-dbpedia", "task-3-CB"] {
        let ta = std::fs::read(a.join(k).join("adapter_model.safetensors")).unwrap();
        let tb = std::fs::read(b.join(k).join("adapter_model.safetensors")).unwrap();
        assert_eq!(ta, tb, "{k} adapters differ");
    }
}

#[test]
fn an_existing_run_dir_is_never_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    write_tiny_llama(&model, 3).unwrap();
    let out = tmp.path().join("r");
    run_once(&model, &out, MethodName::IncLora);
    let before = std::fs::read(out.join("results.json")).unwrap();
    let err = run(
        tiny_config(&model, MethodName::IncLora),
        &data_dir(),
        &RunOptions {
            out: out.clone(),
            resume: false,
            progress: false,
        },
    )
    .expect_err("a second run into the same dir must refuse");
    assert!(err.to_string().contains("--resume"), "{err}");
    assert_eq!(std::fs::read(out.join("results.json")).unwrap(), before);
}
