//! The adapter machinery through the whole LLaMA model: gradients reach the
//! LoRA variables through RMSNorm, RoPE and softmax (finite differences, f64),
//! merged and stacked earlier adapters give the same logits, dropout is seeded.
use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use nlora_adapter::{ForwardMode, LoraConfig, PeftAdapter};
use nlora_model::llama::Llama;
use nlora_model::{load_model_as, LanguageModel, LmBatch};

const TRAIN: ForwardMode = ForwardMode::Train { dropout_seed: None };

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn base_model(dtype: DType) -> Llama {
    load_model_as(fixture("llama_tiny").join("model"), dtype, &Device::Cpu).unwrap()
}

fn fixture_adapter() -> PeftAdapter {
    PeftAdapter::load(&fixture("llama_tiny").join("adapter"), &Device::Cpu).unwrap()
}

fn batch() -> LmBatch {
    let t: HashMap<String, Tensor> = candle_core::safetensors::load(
        fixture("llama_tiny").join("train.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    LmBatch::new(
        t["input_ids"].to_dtype(DType::U32).unwrap(),
        t["attention_mask"].clone(),
        t["labels"].clone(),
    )
    .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .to_dtype(DType::F64)
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

/// Sets every current lora_B to seeded non-zero values (a fresh adapter's B is 0).
fn randomise_b(model: &Llama, seed: u64) {
    for (i, (_, site)) in model.adapter_sites().adapted().enumerate() {
        let b = site.current().unwrap().b();
        let n = b.elem_count();
        let v: Vec<f64> = (0..n)
            .map(|j| (((seed + i as u64) * 7919 + j as u64 * 104729) % 1000) as f64 / 5000.0 - 0.1)
            .collect();
        b.set(
            &Tensor::from_vec(v, b.shape(), &Device::Cpu)
                .unwrap()
                .to_dtype(b.dtype())
                .unwrap(),
        )
        .unwrap();
    }
}

fn set_entry(var: &Var, row: usize, col: usize, value: f64) {
    let mut v = var.as_tensor().to_vec2::<f64>().unwrap();
    v[row][col] = value;
    var.set(&Tensor::new(v, &Device::Cpu).unwrap()).unwrap();
}

#[test]
fn lora_gradients_match_finite_differences_through_the_whole_model() {
    let mut model = base_model(DType::F64);
    model
        .adapter_sites_mut()
        .set_current_from_peft(&fixture_adapter())
        .unwrap();
    let batch = batch();
    let loss = |m: &Llama| m.loss(&batch, TRAIN).unwrap().to_scalar::<f64>().unwrap();
    let grads = model.loss(&batch, TRAIN).unwrap().backward().unwrap();
    // layer 0 q_proj's gradient passes through RoPE, softmax and both layers'
    // RMSNorms; v_proj's through softmax's weights; layer 1 through the final norm
    let probes = [
        ("model.layers.0.self_attn.q_proj", 'A', 1, 5),
        ("model.layers.0.self_attn.q_proj", 'B', 17, 2),
        ("model.layers.0.self_attn.v_proj", 'A', 0, 10),
        ("model.layers.1.self_attn.v_proj", 'B', 7, 3),
        ("model.layers.1.self_attn.q_proj", 'A', 3, 60),
    ];
    let eps = 1e-5;
    for (module, which, r, c) in probes {
        let cur = model
            .adapter_sites()
            .get(module)
            .unwrap()
            .current()
            .unwrap();
        let var = if which == 'A' {
            cur.a().clone()
        } else {
            cur.b().clone()
        };
        let analytic = grads
            .get(var.as_tensor())
            .unwrap()
            .to_vec2::<f64>()
            .unwrap()[r][c];
        let x0 = var.as_tensor().to_vec2::<f64>().unwrap()[r][c];
        set_entry(&var, r, c, x0 + eps);
        let up = loss(&model);
        set_entry(&var, r, c, x0 - eps);
        let down = loss(&model);
        set_entry(&var, r, c, x0);
        let numeric = (up - down) / (2.0 * eps);
        let rel = (analytic - numeric).abs() / numeric.abs().max(1e-8);
        assert!(
            rel < 1e-5 && numeric.abs() > 1e-6,
            "{module} lora_{which}[{r}][{c}]: analytic {analytic:e} vs finite difference {numeric:e}"
        );
    }
}

#[test]
fn merged_and_stacked_earlier_adapters_give_the_same_logits() {
    let mut stacked = base_model(DType::F64);
    let batch = batch();
    let base_logits = stacked
        .forward_logits(&batch, ForwardMode::Inference)
        .unwrap();
    let sites = stacked.adapter_sites_mut();
    // task 1: the PEFT fixture (q, v; r 4); task 2: r 2 on q, k, o and the MLP
    sites.push_history_from_peft(&fixture_adapter()).unwrap();
    let task2 = LoraConfig {
        r: 2,
        alpha: 6.0,
        dropout: 0.0,
        target_modules: ["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"]
            .map(String::from)
            .to_vec(),
    };
    sites.init_new_adapters(&task2, 1).unwrap();
    randomise_b(&stacked, 2);
    stacked
        .adapter_sites_mut()
        .freeze_current_into_history()
        .unwrap();
    // task 3: current adapter, trainable
    stacked
        .adapter_sites_mut()
        .init_new_adapters(&LoraConfig::default(), 3)
        .unwrap();
    randomise_b(&stacked, 4);
    let q0 = stacked
        .adapter_sites()
        .get("model.layers.0.self_attn.q_proj")
        .unwrap();
    assert_eq!(q0.history().len(), 2);
    assert_eq!(q0.previous_a().unwrap().dims(), [6, 64]);

    let mut merged = stacked.clone();
    merged
        .adapter_sites_mut()
        .merge_history_into_base()
        .unwrap();
    assert!(merged
        .adapter_sites()
        .iter()
        .all(|(_, s)| s.history().is_empty()));
    for mode in [ForwardMode::Inference, TRAIN] {
        let a = stacked.forward_logits(&batch, mode).unwrap();
        let b = merged.forward_logits(&batch, mode).unwrap();
        assert!(
            max_abs_diff(&a, &b) < 1e-10,
            "{mode:?}: {}",
            max_abs_diff(&a, &b)
        );
        assert!(
            max_abs_diff(&a, &base_logits) > 1e-2,
            "the adapters must change the logits"
        );
    }
    // gradients of the current adapter are the same too
    let ga = stacked.loss(&batch, TRAIN).unwrap().backward().unwrap();
    let gb = merged.loss(&batch, TRAIN).unwrap().backward().unwrap();
    for (va, vb) in stacked
        .adapter_sites()
        .trainable_vars()
        .iter()
        .zip(merged.adapter_sites().trainable_vars())
    {
        assert!(max_abs_diff(ga.get(va).unwrap(), gb.get(&vb).unwrap()) < 1e-10);
    }
}

#[test]
fn dropout_in_training_is_seeded_per_step() {
    let mut model = base_model(DType::F32);
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.3,
        ..Default::default()
    };
    model
        .adapter_sites_mut()
        .init_new_adapters(&cfg, 0)
        .unwrap();
    randomise_b(&model, 5);
    let batch = batch();
    let loss = |mode| {
        model
            .loss(&batch, mode)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let seeded = |s| ForwardMode::Train {
        dropout_seed: Some(s),
    };
    assert_eq!(loss(seeded(7)), loss(seeded(7)));
    assert_ne!(loss(seeded(7)), loss(seeded(8)));
    assert_ne!(loss(seeded(7)), loss(TRAIN));
    // the fused inference kernels compute the same function
    assert!((loss(TRAIN) - loss(ForwardMode::Inference)).abs() < 1e-5);
}

#[test]
fn only_lora_variables_train() {
    let mut model = base_model(DType::F32);
    model
        .adapter_sites_mut()
        .init_new_adapters(&LoraConfig::default(), 0)
        .unwrap();
    // default targets q_proj, v_proj: 2 layers x 2 sites x (A, B)
    assert_eq!(model.adapter_sites().trainable_vars().len(), 8);
    let all = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    let cfg = LoraConfig {
        target_modules: all.map(String::from).to_vec(),
        ..Default::default()
    };
    model
        .adapter_sites_mut()
        .init_new_adapters(&cfg, 0)
        .unwrap();
    assert_eq!(model.adapter_sites().trainable_vars().len(), 2 * 7 * 2);
    // the tied lm_head is a site too (frozen, no adapter unless targeted)
    assert!(model
        .adapter_sites()
        .get("lm_head")
        .unwrap()
        .current()
        .is_none());
    randomise_b(&model, 1);
    let grads = model.loss(&batch(), TRAIN).unwrap().backward().unwrap();
    for v in model.adapter_sites().trainable_vars() {
        assert!(grads.get(&v).is_some());
    }
    for (path, site) in model.adapter_sites().iter() {
        assert!(
            grads.get(site.base().weight()).is_none(),
            "{path}: base weight got a gradient"
        );
    }
}
