//! T5 v1.0 and v1.1 (Flan-T5) against transformers + PEFT on tiny random
//! models (fixtures from scripts/gen_t5_fixtures.py): logits and LoRA
//! gradients of the masked loss on a padded batch, greedy generation,
//! rank-classification scores, relative-position buckets.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use nlora_adapter::{ForwardMode, LoraConfig, PeftAdapter};
use nlora_model::t5::{load_t5_folder, relative_position_bucket, DEFAULT_TARGET_MODULES, T5};
use nlora_model::{LanguageModel, LmBatch};

const VARIANTS: [&str; 2] = ["t5_v10", "t5_v11"];

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn rows(v: &serde_json::Value) -> Vec<Vec<u32>> {
    v.as_array().unwrap().iter().map(ids).collect()
}

struct Case {
    model: T5,
    expected: HashMap<String, Tensor>,
    meta: serde_json::Value,
}

/// The variant's model in `dtype` with the PEFT adapter as its current adapter.
fn case(variant: &str, dtype: DType) -> Case {
    let dev = Device::Cpu;
    let mut model = load_t5_folder(fixture(&format!("{variant}/model")), dtype, &dev).unwrap();
    let adapter = PeftAdapter::load(&fixture(&format!("{variant}/adapter")), &dev).unwrap();
    assert_eq!(
        adapter.weights.len(),
        12,
        "q and v of 2 encoder self, 2 decoder self and 2 cross attentions"
    );
    model
        .adapter_sites_mut()
        .set_current_from_peft(&adapter)
        .unwrap();
    let expected =
        candle_core::safetensors::load(fixture(&format!("{variant}/expected.safetensors")), &dev)
            .unwrap();
    let meta = read_json(&fixture(&format!("{variant}/expected.json")));
    Case {
        model,
        expected,
        meta,
    }
}

fn batch(expected: &HashMap<String, Tensor>) -> LmBatch {
    LmBatch::new(
        expected["input_ids"].to_dtype(DType::U32).unwrap(),
        expected["attention_mask"].to_dtype(DType::U32).unwrap(),
        expected["labels"].clone(),
    )
    .unwrap()
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    max_abs(&(a - b).unwrap())
}

/// Logits at every label position, padded ones included (the decoder reads
/// -100 as pad and, like transformers, masks nothing but the future).
fn logits_diff(variant: &str, dtype: DType) -> f64 {
    let c = case(variant, dtype);
    let b = batch(&c.expected);
    let logits = c.model.forward_logits(&b, ForwardMode::Inference).unwrap();
    let reference = &c.expected["logits"];
    assert_eq!(logits.dims(), reference.dims());
    max_abs_diff(&logits, reference)
}

#[test]
fn logits_match_transformers_f32() {
    for v in VARIANTS {
        let d = logits_diff(v, DType::F32);
        println!("{v}: f32 logits max abs diff {d:e}");
        assert!(d < 1e-4, "{v}: f32 logits differ by {d}");
    }
}

#[test]
fn logits_match_transformers_f64() {
    for v in VARIANTS {
        let d = logits_diff(v, DType::F64);
        println!("{v}: f64 logits max abs diff {d:e}");
        assert!(d < 1e-9, "{v}: f64 logits differ by {d}");
    }
}

#[test]
fn training_path_logits_equal_inference_path() {
    // the differentiable compositions (norm, softmax, GELU) against the fused kernels
    for v in VARIANTS {
        let c = case(v, DType::F64);
        let b = batch(&c.expected);
        let train = c
            .model
            .forward_logits(&b, ForwardMode::Train { dropout_seed: None })
            .unwrap();
        let infer = c.model.forward_logits(&b, ForwardMode::Inference).unwrap();
        let d = max_abs_diff(&train, &infer);
        assert!(d < 1e-9, "{v}: train/inference paths differ by {d}");
    }
}

/// Worst relative error `max|g - g_ref| / max|g_ref|` over every lora_A/lora_B.
fn gradient_error(variant: &str, dtype: DType) -> (f64, f64) {
    let c = case(variant, dtype);
    let b = batch(&c.expected);
    let loss = c
        .model
        .loss(&b, ForwardMode::Train { dropout_seed: None })
        .unwrap();
    let loss_val = loss
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let loss_ref = c.expected["loss"].to_vec1::<f64>().unwrap()[0];
    let grads = loss.backward().unwrap();
    let mut worst = 0.0f64;
    let mut n = 0;
    for (path, site) in c.model.adapter_sites().adapted() {
        let cur = site.current().unwrap();
        for (kind, var) in [("lora_A", cur.a()), ("lora_B", cur.b())] {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{variant}: no gradient for {path}.{kind}"));
            let g_ref = &c.expected[&format!("{path}.{kind}")];
            let rel = max_abs_diff(g, g_ref) / max_abs(g_ref);
            worst = worst.max(rel);
            n += 1;
        }
    }
    assert_eq!(n, 24, "{variant}: 12 sites, A and B each");
    ((loss_val - loss_ref).abs(), worst)
}

#[test]
fn lora_gradients_of_the_masked_loss_match_peft() {
    for v in VARIANTS {
        for dtype in [DType::F64, DType::F32] {
            let (loss_diff, rel) = gradient_error(v, dtype);
            println!(
                "{v} {dtype:?}: loss diff {loss_diff:e}, worst relative gradient error {rel:e}"
            );
            assert!(rel < 1e-3, "{v} {dtype:?}: gradient relative error {rel}");
            assert!(
                loss_diff < 1e-4,
                "{v} {dtype:?}: loss differs by {loss_diff}"
            );
            if dtype == DType::F64 {
                assert!(
                    rel < 1e-8,
                    "{v}: f64 gradients should agree to rounding, got {rel}"
                );
            }
        }
    }
}

#[test]
fn greedy_generation_matches_transformers() {
    for v in VARIANTS {
        let mut c = case(v, DType::F32);
        let prompts = rows(&c.meta["prompts"]);
        let max_new = c.meta["max_new_tokens"].as_u64().unwrap() as usize;
        let eos = c.meta["eos_token_id"].as_u64().unwrap() as u32;
        let opts = c.model.generate_options(max_new);
        assert_eq!(opts.eos_token_ids, vec![eos]);
        // transformers' output: 10 tokens per row, EOS then pad after a row ends
        let expect = |key: &str, stop: u32| -> Vec<Vec<u32>> {
            rows(&c.meta[key])
                .into_iter()
                .map(|r| r.into_iter().take_while(|&t| t != stop).collect())
                .collect()
        };
        let got = c.model.generate(&prompts, &opts).unwrap();
        assert_eq!(
            got,
            expect("generated_with_adapter", eos),
            "{v}: with adapter"
        );

        // stopping on a token the rows produce at different steps
        let stop = c.meta["stop_token_id"].as_u64().unwrap() as u32;
        let mut stop_opts = opts.clone();
        stop_opts.eos_token_ids = vec![stop];
        let got = c.model.generate(&prompts, &stop_opts).unwrap();
        assert_eq!(
            got,
            expect("generated_with_adapter_stopping", stop),
            "{v}: stopping on {stop}"
        );

        c.model.adapter_sites_mut().clear_current();
        let got = c.model.generate(&prompts, &opts).unwrap();
        assert_eq!(
            got,
            expect("generated_without_adapter", eos),
            "{v}: without adapter"
        );

        // one prompt alone gives what it gives in the batch
        let alone = c.model.generate(&prompts[1..2], &opts).unwrap();
        assert_eq!(
            alone[0],
            expect("generated_without_adapter", eos)[1],
            "{v}: batch of one"
        );
    }
}

#[test]
fn rank_classification_scores_match_transformers() {
    for v in VARIANTS {
        let c = case(v, DType::F64);
        let prompt = ids(&c.meta["score_prompt"]);
        let candidates = rows(&c.meta["score_candidates"]);
        let reference: Vec<f64> = c.meta["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let got = c.model.score(&prompt, &candidates).unwrap();
        for (g, r) in got.iter().zip(&reference) {
            assert!((g - r).abs() < 1e-9, "{v}: score {g} vs transformers {r}");
        }
        // the pairwise form, sources batched, agrees
        let pairs: Vec<(&[u32], &[u32])> = candidates
            .iter()
            .map(|t| (prompt.as_slice(), t.as_slice()))
            .collect();
        let pairwise = c.model.score_pairs(&pairs).unwrap();
        for (g, r) in pairwise.iter().zip(&reference) {
            assert!(
                (g - r).abs() < 1e-9,
                "{v}: pairwise score {g} vs transformers {r}"
            );
        }
    }
}

#[test]
fn relative_position_buckets_match_transformers() {
    let tables = read_json(&fixture("t5_buckets.json"));
    let mut checked = 0;
    for t in tables.as_array().unwrap() {
        let nb = t["num_buckets"].as_u64().unwrap() as usize;
        let md = t["max_distance"].as_u64().unwrap() as usize;
        let bidirectional = t["bidirectional"].as_bool().unwrap();
        let rel = t["relative_positions"].as_array().unwrap();
        let buckets = t["buckets"].as_array().unwrap();
        for (r, b) in rel.iter().zip(buckets) {
            let r = r.as_i64().unwrap();
            assert_eq!(
                relative_position_bucket(r, bidirectional, nb, md) as u64,
                b.as_u64().unwrap(),
                "buckets {nb}, max distance {md}, bidirectional {bidirectional}, relative position {r}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 4 * 601);
}

#[test]
fn default_targets_are_q_and_v_of_every_attention() {
    let mut model = load_t5_folder(fixture("t5_v11/model"), DType::F32, &Device::Cpu).unwrap();
    let cfg = LoraConfig {
        r: 2,
        alpha: 4.0,
        dropout: 0.0,
        target_modules: DEFAULT_TARGET_MODULES
            .iter()
            .map(|s| s.to_string())
            .collect(),
    };
    model
        .adapter_sites_mut()
        .init_new_adapters(&cfg, 7)
        .unwrap();
    let adapted: Vec<&str> = model.adapter_sites().adapted().map(|(p, _)| p).collect();
    let mut expected = Vec::new();
    for i in 0..2 {
        for m in ["q", "v"] {
            expected.push(format!("encoder.block.{i}.layer.0.SelfAttention.{m}"));
        }
    }
    for i in 0..2 {
        for m in ["q", "v"] {
            expected.push(format!("decoder.block.{i}.layer.0.SelfAttention.{m}"));
        }
        for m in ["q", "v"] {
            expected.push(format!("decoder.block.{i}.layer.1.EncDecAttention.{m}"));
        }
    }
    let mut adapted_sorted: Vec<String> = adapted.iter().map(|s| s.to_string()).collect();
    adapted_sorted.sort();
    expected.sort();
    assert_eq!(adapted_sorted, expected);
    // every linear layer is a site, addressable by its PEFT path
    let sites = model.adapter_sites();
    assert_eq!(sites.len(), 2 * (4 + 3) + 2 * (4 + 4 + 3) + 1);
    for p in [
        "encoder.block.1.layer.1.DenseReluDense.wi_0",
        "decoder.block.0.layer.2.DenseReluDense.wo",
        "decoder.block.1.layer.1.EncDecAttention.o",
        "lm_head",
    ] {
        assert!(sites.get(p).is_some(), "no site {p}");
    }
}
