//! Parity with transformers + PEFT on tiny random models (fixtures written by
//! scripts/gen_llama_fixtures.py): logits, masked loss and LoRA gradients of a
//! padded batch, greedy generation on left-padded prompts, candidate scores.
use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use nlora_adapter::{ForwardMode, PeftAdapter};
use nlora_model::llama::Llama;
use nlora_model::{load_model_as, GenerateOptions, LanguageModel, LmBatch};

const TRAIN: ForwardMode = ForwardMode::Train { dropout_seed: None };

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn model_with_adapter(name: &str, dtype: DType) -> Llama {
    let dev = Device::Cpu;
    let mut model = load_model_as(fixture(name).join("model"), dtype, &dev).unwrap();
    let peft = PeftAdapter::load(&fixture(name).join("adapter"), &dev).unwrap();
    model
        .adapter_sites_mut()
        .set_current_from_peft(&peft)
        .unwrap();
    model
}

fn tensors(name: &str, file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join(file), &Device::Cpu).unwrap()
}

fn train_batch(t: &HashMap<String, Tensor>) -> LmBatch {
    LmBatch::new(
        t["input_ids"].to_dtype(DType::U32).unwrap(),
        t["attention_mask"].clone(),
        t["labels"].clone(),
    )
    .unwrap()
}

fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
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

fn check_logits_loss_grads(name: &str) {
    let model = model_with_adapter(name, DType::F32);
    let t = tensors(name, "train.safetensors");
    let batch = train_batch(&t);
    let expected = &t["logits"];
    // compare real (non-padding) positions only
    let real = t["attention_mask"]
        .to_dtype(DType::F32)
        .unwrap()
        .unsqueeze(2)
        .unwrap();
    for mode in [TRAIN, ForwardMode::Inference] {
        let logits = model.forward_logits(&batch, mode).unwrap();
        assert_eq!(logits.dims(), expected.dims());
        let diff = max_abs(&(logits - expected).unwrap().broadcast_mul(&real).unwrap());
        assert!(diff < 1e-4, "{name} {mode:?}: logits differ by {diff}");
    }

    let loss = model.loss(&batch, TRAIN).unwrap();
    let want = t["loss"].to_vec1::<f32>().unwrap()[0];
    let got = loss.to_scalar::<f32>().unwrap();
    assert!(
        (got - want).abs() < 1e-5 * want.abs().max(1.0),
        "{name}: loss {got} vs {want}"
    );

    let grads = loss.backward().unwrap();
    let sites = model.adapter_sites();
    let mut checked = 0;
    for (key, want) in &t {
        let Some(rest) = key.strip_prefix("grad.") else {
            continue;
        };
        let (module, which) = rest.rsplit_once('.').unwrap();
        let cur = sites
            .get(module)
            .unwrap_or_else(|| panic!("no site {module}"))
            .current()
            .unwrap();
        let var = if which == "lora_A" { cur.a() } else { cur.b() };
        let got = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{key}: no gradient"));
        let rel = max_abs(&(got - want).unwrap()) / max_abs(want);
        assert!(rel < 1e-3, "{name} {key}: gradient relative error {rel}");
        checked += 1;
    }
    // 2 layers x (q, v) x (A, B), every trainable variable
    assert_eq!(checked, 8);
    assert_eq!(sites.trainable_vars().len(), 8);
}

#[test]
fn llama_logits_loss_and_lora_gradients_match_transformers() {
    check_logits_loss_grads("llama_tiny");
}

#[test]
fn qwen2_with_attention_biases_matches_transformers() {
    check_logits_loss_grads("llama_qwen2_tiny");
}

fn check_generation_and_scores(name: &str) {
    let model = model_with_adapter(name, DType::F32);
    let g = tensors(name, "generate.safetensors");
    let ids = g["prompt_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2::<u32>()
        .unwrap();
    let mask = g["prompt_mask"].to_vec2::<i64>().unwrap();
    let prompts: Vec<Vec<u32>> = ids
        .iter()
        .zip(&mask)
        .map(|(r, m)| {
            r.iter()
                .zip(m)
                .filter(|(_, &m)| m == 1)
                .map(|(&t, _)| t)
                .collect()
        })
        .collect();
    assert_ne!(
        prompts[0].len(),
        prompts[1].len(),
        "the fixture must exercise left padding"
    );
    let opts = GenerateOptions {
        max_new_tokens: 10,
        eos_token_ids: vec![2],
        pad_token_id: 0,
    };
    let got = model.generate(&prompts, &opts).unwrap();
    let want: Vec<Vec<u32>> = g["generated"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2::<u32>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().take_while(|&t| t != 2).collect())
        .collect();
    assert_eq!(
        got, want,
        "{name}: greedy continuation differs from transformers"
    );

    let prompt = g["score_prompt"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec1::<u32>()
        .unwrap();
    let cands: Vec<Vec<u32>> = g["score_candidates"]
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| {
            r.into_iter()
                .filter(|&t| t >= 0)
                .map(|t| t as u32)
                .collect()
        })
        .collect();
    let want = g["scores"].to_vec1::<f64>().unwrap();
    let got = model.score(&prompt, &cands).unwrap();
    for (g_, w) in got.iter().zip(&want) {
        assert!((g_ - w).abs() < 1e-4, "{name}: scores {got:?} vs {want:?}");
    }
}

#[test]
fn llama_greedy_generation_and_scores_match_transformers() {
    check_generation_and_scores("llama_tiny");
}

#[test]
fn qwen2_greedy_generation_and_scores_match_transformers() {
    check_generation_and_scores("llama_qwen2_tiny");
}
