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
    // The LoRA methods here; the full fine-tuning baselines save weights,
    // not adapters: checked below.
    for name in MethodName::ALL {
        let method = MethodName::parse(name).unwrap();
        if method.is_baseline() {
            continue;
        }
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

/// Every tensor of a safetensors file, by name.
fn tensors(path: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn the_full_fine_tuning_baselines_train_every_linear_weight_and_keep_the_latest_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    write_tiny_llama(&model, 5).unwrap();
    let base = tensors(&model.join("model.safetensors"));
    let projections = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ];
    let mut finals = Vec::new();
    for method in [
        MethodName::SeqFt,
        MethodName::Replay,
        MethodName::Ewc,
        MethodName::Lwf,
    ] {
        let name = method.as_str();
        let out = tmp.path().join(format!("run-{name}"));
        let r = run_once(&model, &out, method);
        assert_eq!(r.method, name);
        assert_eq!(r.accuracy_matrix.len(), 3, "{name}");
        assert!(r
            .accuracy_matrix
            .iter()
            .all(|row| row.len() == 3 && row.iter().all(|v| (0.0..=1.0).contains(v))));
        // Only the last task keeps its weights (they hold the earlier tasks' too).
        for t in ["task-1-dbpedia", "task-2-amazon"] {
            let dir = out.join(t);
            assert!(dir.is_dir(), "{name}: {t}");
            assert!(
                !dir.join("model.safetensors").exists(),
                "{name}: {t} kept its weights"
            );
            assert!(!dir.join("ewc_fisher.safetensors").exists());
        }
        let last = out.join("task-3-CB");
        let w = tensors(&last.join("model.safetensors"));
        // Every projection of both layers, by its Hugging Face name; nothing
        // else (embeddings, head and norms are frozen).
        assert_eq!(w.len(), 2 * projections.len(), "{name}: {:?}", w.keys());
        for l in 0..2 {
            for p in projections {
                let key = format!("model.layers.{l}.{p}.weight");
                let (got, orig) = (&w[&key], &base[&key]);
                assert_eq!(got.dims(), orig.dims(), "{name}: {key}");
                assert!(max_abs_diff(got, orig) > 0.0, "{name}: {key} did not train");
            }
        }
        assert_eq!(
            last.join("ewc_fisher.safetensors").exists(),
            method == MethodName::Ewc,
            "{name}"
        );
        if method == MethodName::Ewc {
            let f = tensors(&last.join("ewc_fisher.safetensors"));
            assert_eq!(f.len(), w.len());
            let total: f32 = f
                .values()
                .map(|t| t.sum_all().unwrap().to_scalar::<f32>().unwrap())
                .sum();
            assert!(total > 0.0 && total.is_finite(), "Fisher sum {total}");
            assert!(f
                .values()
                .all(|t| t.min_all().unwrap().to_scalar::<f32>().unwrap() >= 0.0));
        }
        let timings: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("timings.json")).unwrap())
                .unwrap();
        if cfg!(target_os = "linux") {
            assert!(timings["peak_rss_bytes"].as_u64().unwrap() > 1 << 20);
        }
        // `nlora metrics` measures LoRA updates: a clear refusal here.
        let err = nlora_train::analysis::run_metrics(
            &out,
            nlora_math::metrics::CollisionThreshold::RelativeToSiteMax(0.01),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("fine-tuned the full weights"), "{name}: {err}");
        finals.push((name, w));
    }
    // The methods differ from SeqFT in what they train: replay's batches,
    // EWC's penalty and LwF's distillation all change the final weights.
    let key = "model.layers.1.mlp.down_proj.weight";
    for (name, w) in &finals[1..] {
        assert!(
            max_abs_diff(&w[key], &finals[0].1[key]) > 0.0,
            "{name} equals seqft"
        );
    }
}

#[test]
fn a_baseline_over_a_lora_adapter_saves_one_per_task() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    write_tiny_llama(&model, 6).unwrap();
    let mut cfg = tiny_config(&model, MethodName::Ewc);
    cfg.method.trainable = nlora_train::config::Trainable::Lora;
    let out = tmp.path().join("ewc-lora");
    let r = run(
        cfg,
        &data_dir(),
        &RunOptions {
            out: out.clone(),
            resume: false,
            progress: false,
        },
    )
    .unwrap();
    assert_eq!(r.accuracy_matrix.len(), 3);
    for t in ["task-1-dbpedia", "task-2-amazon", "task-3-CB"] {
        let a = tensors(&out.join(t).join("adapter_model.safetensors"));
        // q and v of two layers, A and B each: the base weights stay frozen.
        assert_eq!(a.len(), 8, "{t}");
        assert!(!out.join(t).join("model.safetensors").exists());
    }
    let f = tensors(&out.join("task-3-CB/ewc_fisher.safetensors"));
    assert_eq!(f.len(), 8);
    assert!(f
        .keys()
        .all(|k| k.ends_with(".lora_A") || k.ends_with(".lora_B")));
}

/// Task 1's trained adapter tensors of a run directory, by PEFT key.
fn task1_adapter(out: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    let file = out.join("task-1-dbpedia/adapter_model.safetensors");
    candle_core::safetensors::load(&file, &candle_core::Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

/// Largest relative L2 difference between two runs' task-1 adapters.
fn adapter_difference(a: &Path, b: &Path) -> f64 {
    let (a, b) = (task1_adapter(a), task1_adapter(b));
    assert_eq!(a.len(), b.len());
    let norm = |t: &candle_core::Tensor| {
        t.to_dtype(candle_core::DType::F64)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            .sqrt()
    };
    a.iter()
        .map(|(k, x)| norm(&(x - &b[k]).unwrap()) / norm(x).max(1e-30))
        .fold(0.0, f64::max)
}

/// The composed ops (the CUDA path) train the same adapters as the fused CPU ops.
#[test]
fn composed_ops_train_the_same_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    write_tiny_llama(&model, 1).unwrap();
    let fused = tmp.path().join("fused");
    let composed = tmp.path().join("composed");
    let r1 = run_once(&model, &fused, MethodName::NLora);
    let r2 = nlora_adapter::with_composed_ops(|| run_once(&model, &composed, MethodName::NLora));
    assert_eq!(r1.tasks, r2.tasks);
    let d = adapter_difference(&fused, &composed);
    eprintln!("composed vs fused run: task-1 adapters differ by {d:.1e} (relative L2)");
    assert!(d < 1e-3, "task-1 adapters differ by {d:e}");
}

#[test]
fn cuda_run_trains_the_same_adapters_as_the_cpu_run() {
    if nlora_adapter::device::cuda_device().is_none() {
        eprintln!("skipped: no CUDA device (build with --features cuda on a machine with a GPU)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    write_tiny_llama(&model, 1).unwrap();
    let cpu = tmp.path().join("cpu");
    let gpu = tmp.path().join("gpu");
    run_once(&model, &cpu, MethodName::NLora);
    let mut cfg = tiny_config(&model, MethodName::NLora);
    cfg.model.device = "cuda".into();
    let opts = RunOptions {
        out: gpu.clone(),
        resume: false,
        progress: false,
    };
    run(cfg, &data_dir(), &opts).unwrap();
    let saved = RunConfig::from_toml_file(&gpu.join("config.toml")).unwrap();
    assert_eq!(saved.model.device, "cuda", "the run dir records the device");
    let d = adapter_difference(&cpu, &gpu);
    eprintln!("cuda vs cpu run: task-1 adapters differ by {d:.1e} (relative L2)");
    assert!(d < 1e-2, "task-1 adapters differ by {d:e}");
}
