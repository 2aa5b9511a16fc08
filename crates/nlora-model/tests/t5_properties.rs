//! Properties of the T5 model that need no reference: the cached decoder
//! agrees with teacher forcing, fresh adapters change nothing, the model's
//! dropout is seeded and reproducible.
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use nlora_adapter::{ForwardMode, LoraConfig, PeftAdapter};
use nlora_model::t5::{load_t5_folder, T5};
use nlora_model::{LanguageModel, LmBatch, IGNORE_INDEX};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

fn model(variant: &str, with_adapter: bool) -> T5 {
    let dev = Device::Cpu;
    let mut m = load_t5_folder(fixture(&format!("{variant}/model")), DType::F32, &dev).unwrap();
    if with_adapter {
        let a = PeftAdapter::load(&fixture(&format!("{variant}/adapter")), &dev).unwrap();
        m.adapter_sites_mut().set_current_from_peft(&a).unwrap();
    }
    m
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Sources right-padded, targets padded with -100.
fn batch(sources: &[Vec<u32>], targets: &[Vec<u32>]) -> LmBatch {
    let s = sources.iter().map(Vec::len).max().unwrap();
    let t = targets.iter().map(Vec::len).max().unwrap();
    let b = sources.len();
    let ids: Vec<u32> = sources
        .iter()
        .flat_map(|r| (0..s).map(|j| r.get(j).copied().unwrap_or(0)))
        .collect();
    let mask: Vec<u32> = sources
        .iter()
        .flat_map(|r| (0..s).map(|j| u32::from(j < r.len())))
        .collect();
    let labels: Vec<i64> = targets
        .iter()
        .flat_map(|r| (0..t).map(|j| r.get(j).map_or(IGNORE_INDEX, |&y| y as i64)))
        .collect();
    let dev = Device::Cpu;
    LmBatch::new(
        Tensor::from_vec(ids, (b, s), &dev).unwrap(),
        Tensor::from_vec(mask, (b, s), &dev).unwrap(),
        Tensor::from_vec(labels, (b, t), &dev).unwrap(),
    )
    .unwrap()
}

const SOURCES: [&[u32]; 3] = [
    &[23, 84, 6, 10, 93, 3, 81, 99, 94, 32, 51, 49, 82, 1],
    &[4, 84, 81, 1],
    &[11, 18, 16, 43, 87, 93, 100, 13, 80, 1],
];

#[test]
fn cached_greedy_decoding_agrees_with_teacher_forcing() {
    for v in ["t5_v10", "t5_v11"] {
        let m = model(v, true);
        let sources: Vec<Vec<u32>> = SOURCES.iter().map(|s| s.to_vec()).collect();
        let mut opts = m.generate_options(8);
        opts.eos_token_ids.clear(); // eight tokens in every row
        let generated = m.generate(&sources, &opts).unwrap();
        assert!(generated.iter().all(|g| g.len() == 8));
        // reading the generated tokens back, the argmax at each position is the next token
        let logits = m
            .forward_logits(&batch(&sources, &generated), ForwardMode::Inference)
            .unwrap();
        let argmax: Vec<Vec<u32>> = logits.argmax(D::Minus1).unwrap().to_vec2().unwrap();
        assert_eq!(argmax, generated, "{v}");
    }
}

#[test]
fn padding_does_not_change_a_row() {
    let m = model("t5_v11", true);
    let alone = m
        .forward_logits(
            &batch(&[SOURCES[1].to_vec()], &[vec![5, 6, 1]]),
            ForwardMode::Inference,
        )
        .unwrap();
    let padded = m
        .forward_logits(
            &batch(
                &[SOURCES[0].to_vec(), SOURCES[1].to_vec()],
                &[vec![7, 8, 9, 10, 1], vec![5, 6, 1]],
            ),
            ForwardMode::Inference,
        )
        .unwrap();
    let row = padded.get(1).unwrap().narrow(0, 0, 3).unwrap();
    let d = max_abs_diff(&alone.squeeze(0).unwrap(), &row);
    assert!(d < 1e-5, "padding changed a row by {d}");
}

#[test]
fn fresh_adapters_leave_the_model_unchanged_and_train() {
    let mut m = model("t5_v10", false);
    let b = batch(
        &SOURCES.iter().map(|s| s.to_vec()).collect::<Vec<_>>(),
        &[vec![5, 6, 1], vec![7, 1], vec![9, 10, 11, 1]],
    );
    let before = m.forward_logits(&b, ForwardMode::Inference).unwrap();
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["q".into(), "v".into()],
    };
    m.adapter_sites_mut().init_new_adapters(&cfg, 3).unwrap();
    let after = m.forward_logits(&b, ForwardMode::Inference).unwrap();
    assert_eq!(
        max_abs_diff(&before, &after),
        0.0,
        "B = 0 at initialisation"
    );
    // B gets a gradient (A does not while B is zero)
    let loss = m
        .loss(&b, ForwardMode::Train { dropout_seed: None })
        .unwrap();
    let grads = loss.backward().unwrap();
    for (path, site) in m.adapter_sites().adapted() {
        let gb = grads.get(site.current().unwrap().b().as_tensor()).unwrap();
        let norm = gb
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "{path}: no gradient for lora_B");
    }
}

#[test]
fn model_dropout_is_seeded_and_reproducible() {
    let mut m = model("t5_v11", true);
    assert_eq!(m.dropout_rate(), 0.1, "config.json's dropout_rate");
    let b = batch(
        &SOURCES.iter().map(|s| s.to_vec()).collect::<Vec<_>>(),
        &[vec![5, 6, 1], vec![7, 1], vec![9, 10, 11, 1]],
    );
    let train = |m: &T5, seed: Option<u64>| {
        m.forward_logits(&b, ForwardMode::Train { dropout_seed: seed })
            .unwrap()
    };
    let plain = train(&m, None);
    let a = train(&m, Some(1));
    let again = train(&m, Some(1));
    let other = train(&m, Some(2));
    assert_eq!(max_abs_diff(&a, &again), 0.0, "same seed, same step");
    assert!(
        max_abs_diff(&a, &other) > 1e-3,
        "another seed, another mask"
    );
    assert!(max_abs_diff(&a, &plain) > 1e-3, "dropout is on with a seed");
    let inference = m.forward_logits(&b, ForwardMode::Inference).unwrap();
    assert!(
        max_abs_diff(&plain, &inference) < 1e-4,
        "no seed, no dropout"
    );
    // rate 0 (and the adapter's dropout 0): a seed changes nothing
    m.set_dropout_rate(0.0).unwrap();
    assert!(max_abs_diff(&train(&m, Some(1)), &plain) < 1e-6);
    assert!(m.set_dropout_rate(1.0).is_err());
}
