//! Loading: HF folders (single file, sharded, bf16), GGUF dispatch, and bad
//! input giving errors that name the file, field or tensor at fault.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use nlora_model::llama::Llama;
use nlora_model::{load_model, LanguageModel, LmBatch};

fn fixture_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_tiny/model")
}

/// A copy of the fixture model folder to break.
fn copy_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture_model().join(f), dir.path().join(f)).unwrap();
    }
    dir
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
}

fn weights(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap()
}

fn save_weights(dir: &Path, file: &str, w: &HashMap<String, Tensor>) {
    candle_core::safetensors::save(w, dir.join(file)).unwrap();
}

fn load_err(path: &Path) -> String {
    let err = load_model(path, &Device::Cpu)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    eprintln!("{err}");
    err
}

fn logits(model: &Llama) -> Tensor {
    let ids = Tensor::new(&[[1u32, 17, 99, 200, 5, 64]], &Device::Cpu).unwrap();
    let batch = LmBatch::new(
        ids,
        Tensor::ones((1, 6), DType::U32, &Device::Cpu).unwrap(),
        Tensor::full(-100i64, (1, 6), &Device::Cpu).unwrap(),
    )
    .unwrap();
    model
        .forward_logits(&batch, nlora_adapter::ForwardMode::Inference)
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
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
fn sharded_folder_loads_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture_model().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let w = weights(&fixture_model());
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut map = serde_json::Map::new();
    for (i, (k, t)) in w.iter().enumerate() {
        let (part, file) = if i % 2 == 0 {
            (&mut a, "model-00001-of-00002.safetensors")
        } else {
            (&mut b, "model-00002-of-00002.safetensors")
        };
        part.insert(k.clone(), t.clone());
        map.insert(k.clone(), file.into());
    }
    save_weights(dir.path(), "model-00001-of-00002.safetensors", &a);
    save_weights(dir.path(), "model-00002-of-00002.safetensors", &b);
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let sharded = load_model(dir.path(), &Device::Cpu).unwrap();
    let single = load_model(fixture_model(), &Device::Cpu).unwrap();
    assert_eq!(max_abs_diff(&logits(&sharded), &logits(&single)), 0.0);
}

#[test]
fn bf16_weights_are_converted_to_f32() {
    let dir = copy_model();
    let w: HashMap<String, Tensor> = weights(dir.path())
        .into_iter()
        .map(|(k, t)| (k, t.to_dtype(DType::BF16).unwrap()))
        .collect();
    save_weights(dir.path(), "model.safetensors", &w);
    let model = load_model(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(model.dtype(), DType::F32);
    // the same as rounding the f32 weights through bf16 ourselves
    let cfg = nlora_model::load::read_hf_config(&fixture_model().join("config.json")).unwrap();
    let rounded = weights(&fixture_model())
        .into_iter()
        .map(|(k, t)| {
            (
                k,
                t.to_dtype(DType::BF16)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap(),
            )
        })
        .collect();
    let reference = Llama::from_tensors(cfg, rounded, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(max_abs_diff(&logits(&model), &logits(&reference)), 0.0);
}

#[test]
fn missing_files_are_named() {
    let err = load_err(Path::new("/nonexistent/model-dir"));
    assert!(err.contains("/nonexistent/model-dir"), "{err}");

    let dir = copy_model();
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("config.json"), "{err}");

    let dir = copy_model();
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("model.safetensors"), "{err}");

    let dir = copy_model();
    std::fs::write(dir.path().join("model.safetensors"), b"garbage").unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("safetensors"),
        "{err}"
    );

    let file = dir.path().join("weights.bin");
    std::fs::write(&file, b"x").unwrap();
    let err = load_err(&file);
    assert!(
        err.contains("weights.bin") && err.contains(".gguf"),
        "{err}"
    );
}

#[test]
fn bad_config_fields_are_named() {
    let dir = copy_model();
    edit_config(dir.path(), |c| {
        c.remove("hidden_size");
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("config.json") && err.contains("hidden_size"),
        "{err}"
    );

    let dir = copy_model();
    edit_config(dir.path(), |c| {
        c.insert("model_type".into(), "gpt2".into());
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("model_type") && err.contains("gpt2") && err.contains("llama"),
        "{err}"
    );

    let dir = copy_model();
    edit_config(dir.path(), |c| {
        c.insert(
            "rope_scaling".into(),
            serde_json::json!({"rope_type": "llama3", "factor": 8.0}),
        );
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("rope_scaling") && err.contains("llama3"),
        "{err}"
    );

    let dir = copy_model();
    edit_config(dir.path(), |c| {
        c.insert("num_key_value_heads".into(), 3.into());
    });
    let err = load_err(dir.path());
    assert!(err.contains("num_key_value_heads"), "{err}");
}

#[test]
fn bad_tensors_are_named() {
    let dir = copy_model();
    let mut w = weights(dir.path());
    w.remove("model.norm.weight");
    save_weights(dir.path(), "model.safetensors", &w);
    let err = load_err(dir.path());
    assert!(
        err.contains("model.norm.weight") && err.contains("missing"),
        "{err}"
    );

    let dir = copy_model();
    let mut w = weights(dir.path());
    let k = "model.layers.1.self_attn.k_proj.weight";
    let t = w[k].t().unwrap().contiguous().unwrap();
    w.insert(k.into(), t);
    save_weights(dir.path(), "model.safetensors", &w);
    let err = load_err(dir.path());
    assert!(
        err.contains(k) && err.contains("[64, 32]") && err.contains("[32, 64]"),
        "{err}"
    );

    let dir = copy_model();
    let mut w = weights(dir.path());
    w.insert(
        "model.layers.0.mlp.gate_proj.bias".into(),
        Tensor::zeros(128, DType::F32, &Device::Cpu).unwrap(),
    );
    save_weights(dir.path(), "model.safetensors", &w);
    let err = load_err(dir.path());
    assert!(err.contains("model.layers.0.mlp.gate_proj.bias"), "{err}");
}

/// The GGUF path of `load_model` (needs the real model; fails, never skips, without it).
#[test]
fn gguf_files_load_through_the_same_entry_point() {
    let path = std::env::var("NLORA_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/nlora/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-model.sh (or set NLORA_MODEL)",
        path.display()
    );
    let model = load_model(&path, &Device::Cpu).unwrap();
    let c = model.config();
    assert_eq!(
        (c.num_hidden_layers, c.hidden_size, c.vocab_size),
        (30, 576, 49152)
    );
    assert!(model
        .adapter_sites()
        .get("model.layers.29.mlp.down_proj")
        .is_some());
    assert!(logits(&model).dims() == [1, 6, 49152]);
}
