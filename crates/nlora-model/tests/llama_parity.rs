//! Parity with transformers + PEFT on tiny random models (fixtures written by
//! scripts/gen_llama_fixtures.py): logits, masked loss and LoRA gradients of a
//! padded batch, greedy generation on left-padded prompts, candidate scores.
//! Each check also runs on the composed ops (the CUDA path) on the CPU, and
//! on a GPU when there is one.
use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use nlora_adapter::device::cuda_device;
use nlora_adapter::{with_composed_ops, ForwardMode, PeftAdapter};
use nlora_model::llama::Llama;
use nlora_model::{load_model_as, GenerateOptions, LanguageModel, LmBatch};

const TRAIN: ForwardMode = ForwardMode::Train { dropout_seed: None };

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn model_with_adapter(name: &str, dtype: DType, dev: &Device) -> Llama {
    let mut model = load_model_as(fixture(name).join("model"), dtype, dev).unwrap();
    let peft = PeftAdapter::load(&fixture(name).join("adapter"), dev).unwrap();
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

fn check_logits_loss_grads(name: &str, dev: &Device) {
    let model = model_with_adapter(name, DType::F32, dev);
    let t = tensors(name, "train.safetensors");
    let batch = train_batch(&t).to_device(dev).unwrap();
    let expected = &t["logits"];
    // compare real (non-padding) positions only
    let real = t["attention_mask"]
        .to_dtype(DType::F32)
        .unwrap()
        .unsqueeze(2)
        .unwrap();
    for mode in [TRAIN, ForwardMode::Inference] {
        let logits = model
            .forward_logits(&batch, mode)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap();
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
        let got = &grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{key}: no gradient"))
            .to_device(&Device::Cpu)
            .unwrap();
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
    check_logits_loss_grads("llama_tiny", &Device::Cpu);
}

#[test]
fn qwen2_with_attention_biases_matches_transformers() {
    check_logits_loss_grads("llama_qwen2_tiny", &Device::Cpu);
}

fn check_generation_and_scores(name: &str, dev: &Device) {
    let model = model_with_adapter(name, DType::F32, dev);
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
    check_generation_and_scores("llama_tiny", &Device::Cpu);
}

#[test]
fn qwen2_greedy_generation_and_scores_match_transformers() {
    check_generation_and_scores("llama_qwen2_tiny", &Device::Cpu);
}

#[test]
fn composed_ops_match_transformers_too() {
    with_composed_ops(|| {
        for name in ["llama_tiny", "llama_qwen2_tiny"] {
            check_logits_loss_grads(name, &Device::Cpu);
            check_generation_and_scores(name, &Device::Cpu);
        }
    });
}

#[test]
fn cuda_matches_transformers() {
    let Some(gpu) = cuda_device() else {
        eprintln!("skipped: no CUDA device (build with --features cuda on a machine with a GPU)");
        return;
    };
    for name in ["llama_tiny", "llama_qwen2_tiny"] {
        check_logits_loss_grads(name, &gpu);
        check_generation_and_scores(name, &gpu);
    }
}

/// Loss and every LoRA gradient of the fixture batch (dropout on, seeded).
fn loss_and_grads(model: &Llama, batch: &LmBatch) -> Vec<Tensor> {
    let mode = ForwardMode::Train {
        dropout_seed: Some(7),
    };
    let loss = model.loss(batch, mode).unwrap();
    let grads = loss.backward().unwrap();
    let mut out = vec![loss.to_dtype(DType::F32).unwrap()];
    for var in model.adapter_sites().trainable_vars() {
        out.push(grads.get(var.as_tensor()).unwrap().clone());
    }
    out.into_iter()
        .map(|t| t.to_device(&Device::Cpu).unwrap())
        .collect()
}

fn worst_relative(got: &[Tensor], want: &[Tensor]) -> (f64, f64) {
    let loss = (max_abs(&(&got[0] - &want[0]).unwrap()) / max_abs(&want[0])).abs();
    let grad = got[1..]
        .iter()
        .zip(&want[1..])
        .map(|(g, w)| max_abs(&(g - w).unwrap()) / max_abs(w))
        .fold(0.0, f64::max);
    (loss, grad)
}

#[test]
fn composed_model_matches_fused_model_with_dropout() {
    for name in ["llama_tiny", "llama_qwen2_tiny"] {
        let mut model = model_with_adapter(name, DType::F32, &Device::Cpu);
        // dropout on the adapters' input: both paths must drop the same entries
        let mut peft = PeftAdapter::load(&fixture(name).join("adapter"), &Device::Cpu).unwrap();
        peft.config.lora_dropout = 0.3;
        model
            .adapter_sites_mut()
            .set_current_from_peft(&peft)
            .unwrap();
        let batch = train_batch(&tensors(name, "train.safetensors"));
        let fused = loss_and_grads(&model, &batch);
        let composed = with_composed_ops(|| loss_and_grads(&model, &batch));
        let (dl, dg) = worst_relative(&composed, &fused);
        eprintln!("{name}: composed vs fused: loss rel diff {dl:.1e}, worst LoRA gradient rel diff {dg:.1e}");
        assert!(dl < 1e-6, "{name}: loss differs by {dl:e}");
        assert!(dg < 1e-4, "{name}: a gradient differs by {dg:e}");
    }
}

#[test]
fn bf16_model_trains_f32_adapters_close_to_f32() {
    let name = "llama_tiny";
    let batch = train_batch(&tensors(name, "train.safetensors"));
    let f32_model = model_with_adapter(name, DType::F32, &Device::Cpu);
    let bf16_model = model_with_adapter(name, DType::BF16, &Device::Cpu);
    for var in bf16_model.adapter_sites().trainable_vars() {
        assert_eq!(var.dtype(), DType::F32, "adapters stay f32 on a bf16 base");
    }
    let want = loss_and_grads(&f32_model, &batch);
    let got = loss_and_grads(&bf16_model, &batch);
    let (dl, _) = worst_relative(&got, &want);
    // a gradient as a whole: |g - g_f32| / |g_f32| (bf16 keeps 8 mantissa bits)
    let norm = |t: &Tensor| {
        t.to_dtype(DType::F64)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            .sqrt()
    };
    let dot = |a: &Tensor, b: &Tensor| {
        (a.to_dtype(DType::F64).unwrap() * b.to_dtype(DType::F64).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let (mut dg, mut cos) = (0.0f64, 1.0f64);
    for (g, w) in got[1..].iter().zip(&want[1..]) {
        dg = dg.max(norm(&(g - w).unwrap()) / norm(w));
        cos = cos.min(dot(g, w) / (norm(g) * norm(w)));
    }
    eprintln!(
        "bf16 vs f32 base: loss rel diff {dl:.1e}, worst LoRA gradient rel L2 diff {dg:.1e}, \
         worst cosine {cos:.5}"
    );
    assert!(dl < 1e-3, "bf16 loss differs by {dl:e}");
    // bf16 rounds each product to 8 mantissa bits through two layers of
    // backward: gradients keep their direction (what the optimiser follows)
    assert!(cos > 0.99, "a bf16 gradient points elsewhere: cosine {cos}");
}

/// Prompts that share a prefix (an evaluation batch: the same instruction
/// before every input) have it computed once for the batch; each row must
/// still continue exactly as when generated on its own. Several suffix
/// lengths (left padding after the prefix), one prompt that is the prefix
/// plus a single token, and one that diverges earlier (shorter sharing).
#[test]
fn shared_prompt_prefix_generates_as_each_prompt_alone() {
    let model = model_with_adapter("llama_tiny", DType::F32, &Device::Cpu);
    let prefix: Vec<u32> = (0..20).map(|i| 3 + (i * 7) % 50).collect();
    let with_suffix = |s: &[u32]| prefix.iter().chain(s).copied().collect::<Vec<u32>>();
    let opts = GenerateOptions {
        max_new_tokens: 6,
        eos_token_ids: vec![2],
        pad_token_id: 0,
    };
    for prompts in [
        vec![
            with_suffix(&[11, 12, 13, 14, 15]),
            with_suffix(&[21]),
            with_suffix(&[31, 32, 33]),
        ],
        vec![
            with_suffix(&[11, 12]),
            prefix[..12].iter().chain(&[40, 41, 42]).copied().collect(),
        ],
    ] {
        let batch = model.generate(&prompts, &opts).unwrap();
        for (p, got) in prompts.iter().zip(&batch) {
            let alone = model.generate(std::slice::from_ref(p), &opts).unwrap();
            assert_eq!(got, &alone[0], "prompt {p:?}");
            assert!(!got.is_empty());
        }
    }
}
