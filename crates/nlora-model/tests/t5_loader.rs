//! Loading T5 folders: sharded checkpoints, and bad input failing with a
//! message that names the tensor, field or token at fault.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use nlora_adapter::ForwardMode;
use nlora_model::t5::{load_t5_folder, T5};
use nlora_model::{LanguageModel, LmBatch};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// A copy of a fixture model folder whose tensors and config pass through `edit`.
fn edited_copy(
    variant: &str,
    edit_tensors: impl FnOnce(&mut HashMap<String, Tensor>),
    edit_config: impl FnOnce(&mut serde_json::Value),
) -> tempfile::TempDir {
    let src = fixture(&format!("{variant}/model"));
    let dir = tempfile::tempdir().unwrap();
    let mut tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    edit_tensors(&mut tensors);
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit_config(&mut config);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    match load_t5_folder(dir, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} loaded, expected an error", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn logits(model: &T5) -> Tensor {
    let ids = Tensor::new(&[[5u32, 9, 14, 1], [7, 3, 1, 0]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1], [1, 1, 1, 0]], &Device::Cpu).unwrap();
    let labels = Tensor::new(&[[4i64, 8, 1], [6, 1, -100]], &Device::Cpu).unwrap();
    let batch = LmBatch::new(ids, mask, labels).unwrap();
    model
        .forward_logits(&batch, ForwardMode::Inference)
        .unwrap()
}

#[test]
fn missing_tensor_is_named() {
    let name = "decoder.block.1.layer.1.EncDecAttention.v.weight";
    let dir = edited_copy(
        "t5_v10",
        |t| {
            t.remove(name);
        },
        |_| {},
    );
    let e = load_err(dir.path());
    assert!(e.contains(name) && e.contains("missing"), "{e}");
}

#[test]
fn mismatched_shape_is_named() {
    let name = "encoder.block.0.layer.1.DenseReluDense.wi_1.weight";
    let dir = edited_copy(
        "t5_v11",
        |t| {
            t.insert(
                name.into(),
                Tensor::zeros((63, 32), DType::F32, &Device::Cpu).unwrap(),
            );
        },
        |_| {},
    );
    let e = load_err(dir.path());
    assert!(
        e.contains(name) && e.contains("[63, 32]") && e.contains("[64, 32]"),
        "{e}"
    );

    let name = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight";
    let dir = edited_copy(
        "t5_v10",
        |_| {},
        |c| {
            c["relative_attention_num_buckets"] = 16.into();
        },
    );
    let e = load_err(dir.path());
    assert!(e.contains(name) && e.contains("shape"), "{e}");
}

#[test]
fn unknown_tensor_is_refused_not_ignored() {
    let name = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight";
    let dir = edited_copy(
        "t5_v10",
        |t| {
            t.insert(
                name.into(),
                Tensor::zeros((8, 4), DType::F32, &Device::Cpu).unwrap(),
            );
        },
        |_| {},
    );
    let e = load_err(dir.path());
    assert!(e.contains(name) && e.contains("refusing"), "{e}");
}

#[test]
fn untied_config_needs_its_lm_head() {
    let dir = edited_copy(
        "t5_v11",
        |t| {
            t.remove("lm_head.weight");
        },
        |_| {},
    );
    let e = load_err(dir.path());
    assert!(e.contains("lm_head.weight") && e.contains("missing"), "{e}");
}

#[test]
fn embedding_copies_must_equal_the_shared_embedding() {
    let dir = edited_copy(
        "t5_v10",
        |t| {
            let e = &t["decoder.embed_tokens.weight"];
            let changed = (e + 1.0).unwrap();
            t.insert("decoder.embed_tokens.weight".into(), changed);
        },
        |_| {},
    );
    let e = load_err(dir.path());
    assert!(
        e.contains("decoder.embed_tokens.weight") && e.contains("shared.weight"),
        "{e}"
    );
}

#[test]
fn bad_config_fields_are_named() {
    let dir = edited_copy("t5_v10", |_| {}, |c| c["model_type"] = "bart".into());
    let e = load_err(dir.path());
    assert!(e.contains("model_type") && e.contains("bart"), "{e}");

    let dir = edited_copy(
        "t5_v11",
        |_| {},
        |c| c["feed_forward_proj"] = "gated-tanh".into(),
    );
    let e = load_err(dir.path());
    assert!(e.contains("feed_forward_proj") && e.contains("tanh"), "{e}");

    let dir = edited_copy(
        "t5_v11",
        |_| {},
        |c| c["feed_forward_proj"] = "very-gated-gelu".into(),
    );
    let e = load_err(dir.path());
    assert!(e.contains("feed_forward_proj"), "{e}");

    let dir = edited_copy("t5_v10", |_| {}, |c| c["num_heads"] = 0.into());
    let e = load_err(dir.path());
    assert!(e.contains("num_heads"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn sharded_checkpoint_loads_the_same_model() {
    let src = fixture("t5_v11/model");
    let dir = tempfile::tempdir().unwrap();
    let tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut weight_map = serde_json::Map::new();
    for (name, t) in tensors {
        let (shard, file) = if name.starts_with("encoder") {
            (&mut a, "model-00001-of-00002.safetensors")
        } else {
            (&mut b, "model-00002-of-00002.safetensors")
        };
        weight_map.insert(name.clone(), file.into());
        shard.insert(name, t);
    }
    candle_core::safetensors::save(&a, dir.path().join("model-00001-of-00002.safetensors"))
        .unwrap();
    candle_core::safetensors::save(&b, dir.path().join("model-00002-of-00002.safetensors"))
        .unwrap();
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();

    let sharded = load_t5_folder(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let single = load_t5_folder(&src, DType::F32, &Device::Cpu).unwrap();
    let d = (logits(&sharded) - logits(&single))
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(d, 0.0);
}

#[test]
fn bad_batches_and_prompts_are_errors_not_panics() {
    let model = load_t5_folder(fixture("t5_v10/model"), DType::F32, &Device::Cpu).unwrap();
    let dev = Device::Cpu;
    // a token id beyond the vocabulary
    let batch = LmBatch::new(
        Tensor::new(&[[5u32, 500, 1]], &dev).unwrap(),
        Tensor::new(&[[1u32, 1, 1]], &dev).unwrap(),
        Tensor::new(&[[4i64, 1]], &dev).unwrap(),
    )
    .unwrap();
    let e = model
        .forward_logits(&batch, ForwardMode::Inference)
        .unwrap_err()
        .to_string();
    assert!(e.contains("input_ids") && e.contains("500"), "{e}");
    // a label beyond the vocabulary
    let batch = LmBatch::new(
        Tensor::new(&[[5u32, 9, 1]], &dev).unwrap(),
        Tensor::new(&[[1u32, 1, 1]], &dev).unwrap(),
        Tensor::new(&[[4i64, 128]], &dev).unwrap(),
    )
    .unwrap();
    let e = model
        .loss(&batch, ForwardMode::Inference)
        .unwrap_err()
        .to_string();
    assert!(e.contains("labels") && e.contains("128"), "{e}");
    // a row that is all padding
    let batch = LmBatch::new(
        Tensor::new(&[[5u32, 9, 1], [0, 0, 0]], &dev).unwrap(),
        Tensor::new(&[[1u32, 1, 1], [0, 0, 0]], &dev).unwrap(),
        Tensor::new(&[[4i64, 1], [4, 1]], &dev).unwrap(),
    )
    .unwrap();
    let e = model
        .loss(&batch, ForwardMode::Inference)
        .unwrap_err()
        .to_string();
    assert!(e.contains("attention_mask") && e.contains("row 1"), "{e}");
    // an empty prompt
    let opts = model.generate_options(3);
    let e = model
        .generate(&[vec![5, 1], vec![]], &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("source 1"), "{e}");
}

#[test]
fn any_model_loader_routes_t5_folders_and_generates_from_text() {
    // what `nlora generate --model FOLDER --prompt TEXT` does
    use nlora_model::tokenizer::TextTokenizer;
    use nlora_model::{load_any_model, AnyModel, GenerateOptions};
    let folder = fixture("t5_v10/model");
    let model = load_any_model(&folder, DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(model, AnyModel::T5(_)) && model.is_encoder_decoder());
    let tokenizer = TextTokenizer::from_path(&folder).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("t5_v10/expected.json")).unwrap())
            .unwrap();
    let eos = model.eos_token_id().unwrap();
    assert_eq!(Some(eos), tokenizer.eos_id());
    let opts = GenerateOptions {
        max_new_tokens: 10,
        eos_token_ids: vec![eos],
        pad_token_id: tokenizer.pad_id().unwrap(),
    };
    for (i, source) in meta["sources"].as_array().unwrap().iter().enumerate() {
        let prompt = tokenizer.encode(source.as_str().unwrap()).unwrap();
        let expected_prompt: Vec<u32> = meta["prompts"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(prompt, expected_prompt);
        let new = model.generate(&[prompt], &opts).unwrap().pop().unwrap();
        let text = tokenizer.decode(&new, true).unwrap();
        assert_eq!(text, meta["decoded_without_adapter"][i].as_str().unwrap());
    }

    // a LLaMA-family folder still loads as one
    let m = load_any_model(fixture("llama_tiny/model"), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(m, AnyModel::Llama(_)) && !m.is_encoder_decoder());
}

#[test]
fn shared_embedding_falls_back_to_the_encoder_copy() {
    // v1.0 fixture: encoder/decoder.embed_tokens.weight are copies of shared.weight
    let dir = edited_copy(
        "t5_v10",
        |t| {
            t.remove("shared.weight");
        },
        |_| {},
    );
    let from_copy = load_t5_folder(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let original = load_t5_folder(fixture("t5_v10/model"), DType::F32, &Device::Cpu).unwrap();
    let d = (logits(&from_copy) - logits(&original))
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(d, 0.0);
    // without any embedding the error names shared.weight
    let dir = edited_copy(
        "t5_v11",
        |t| {
            t.remove("shared.weight");
        },
        |_| {},
    );
    let e = load_err(dir.path());
    assert!(e.contains("shared.weight") && e.contains("missing"), "{e}");
}
