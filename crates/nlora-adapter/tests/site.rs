//! The adapter site's forward is the LoRA formula, merging is exact, and the
//! whole-model operations behave as the reference code's freeze/stack cycle.
use candle_core::{DType, Device, Tensor, Var};
use nlora_adapter::{
    AdapterSite, AdapterSites, ForwardMode, FrozenAdapter, LoraAdapter, LoraConfig,
};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // deterministic pseudo-random values without a global RNG
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f64> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

const TRAIN: ForwardMode = ForwardMode::Train { dropout_seed: None };

/// A site with bias, two earlier tasks (ranks 2 and 3, different scales) and a current adapter.
fn site_with_history() -> AdapterSite {
    let (out_f, in_f) = (6, 5);
    let mut site = AdapterSite::new(randn(&[out_f, in_f], 1), Some(randn(&[out_f], 2))).unwrap();
    site.push_history(FrozenAdapter {
        a: randn(&[2, in_f], 3),
        b: randn(&[out_f, 2], 4),
        scale: 2.0,
    })
    .unwrap();
    site.push_history(FrozenAdapter {
        a: randn(&[3, in_f], 5),
        b: randn(&[out_f, 3], 6),
        scale: 0.5,
    })
    .unwrap();
    site.set_current(
        LoraAdapter::from_tensors(randn(&[4, in_f], 7), randn(&[out_f, 4], 8), 8.0, 0.0).unwrap(),
    )
    .unwrap();
    site
}

#[test]
fn forward_is_base_plus_history_plus_current() {
    let site = site_with_history();
    let x = randn(&[2, 3, 5], 9);
    let mut w = site.base().weight().clone();
    for h in site.history() {
        w = (w + h.b.matmul(&h.a).unwrap().affine(h.scale, 0.0).unwrap()).unwrap();
    }
    let cur = site.current().unwrap();
    assert_eq!(cur.scale(), 2.0); // alpha 8 / r 4
    let dw = cur
        .b()
        .as_tensor()
        .matmul(cur.a().as_tensor())
        .unwrap()
        .affine(2.0, 0.0)
        .unwrap();
    w = (w + dw).unwrap();
    let expected = x
        .broadcast_matmul(&w.t().unwrap())
        .unwrap()
        .broadcast_add(site.base().bias().unwrap())
        .unwrap();
    for mode in [ForwardMode::Inference, TRAIN] {
        let y = site.forward(&x, mode).unwrap();
        assert!(max_abs_diff(&y, &expected) < 1e-12, "{mode:?}");
    }
}

#[test]
fn merging_history_into_base_keeps_outputs() {
    let stacked = site_with_history();
    let mut merged = stacked.clone();
    merged.merge_history_into_base().unwrap();
    assert!(merged.history().is_empty());
    assert!(merged.previous_a().is_none());
    let x = randn(&[4, 5], 10);
    let (ys, ym) = (
        stacked.forward(&x, TRAIN).unwrap(),
        merged.forward(&x, TRAIN).unwrap(),
    );
    assert!(max_abs_diff(&ys, &ym) < 1e-12);
    // the stacked lora_A of the previous tasks, ranks 2 + 3
    assert_eq!(stacked.previous_a().unwrap().dims(), [5, 5]);
}

#[test]
fn fresh_adapter_starts_at_zero_update_and_is_seeded() {
    let w = randn(&[6, 16], 11);
    let mut sites = AdapterSites::new();
    sites
        .insert(
            "layers.0.q_proj",
            AdapterSite::new(w.clone(), None).unwrap(),
        )
        .unwrap();
    sites
        .insert(
            "layers.0.k_proj",
            AdapterSite::new(w.clone(), None).unwrap(),
        )
        .unwrap();
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["q_proj".into()],
    };
    sites.init_new_adapters(&cfg, 42).unwrap();
    assert!(sites.get("layers.0.k_proj").unwrap().current().is_none());
    let cur = sites.get("layers.0.q_proj").unwrap().current().unwrap();
    // PEFT: kaiming-uniform(a = sqrt 5) = U(-1/sqrt(in), 1/sqrt(in)); B = 0
    let a = cur
        .a()
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let bound = 1.0 / 16f64.sqrt();
    assert!(a.iter().all(|v| v.abs() <= bound));
    assert!(
        a.iter().any(|v| v.abs() > 0.5 * bound),
        "A should span its range"
    );
    let b = cur
        .b()
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert!(b.iter().all(|&v| v == 0.0));
    let x = randn(&[3, 16], 12);
    let id = sites.id("layers.0.q_proj").unwrap();
    let y = sites.forward(id, &x, TRAIN).unwrap();
    assert!(max_abs_diff(&y, &x.matmul(&w.t().unwrap()).unwrap()) < 1e-12);

    let mut again = AdapterSites::new();
    again
        .insert(
            "layers.0.q_proj",
            AdapterSite::new(w.clone(), None).unwrap(),
        )
        .unwrap();
    again
        .insert("layers.0.k_proj", AdapterSite::new(w, None).unwrap())
        .unwrap();
    again.init_new_adapters(&cfg, 42).unwrap();
    let a2 = again
        .get("layers.0.q_proj")
        .unwrap()
        .current()
        .unwrap()
        .a()
        .as_tensor()
        .clone();
    assert_eq!(max_abs_diff(cur.a().as_tensor(), &a2), 0.0);
}

#[test]
fn freeze_moves_current_into_history_and_keeps_outputs() {
    let mut site = site_with_history();
    let x = randn(&[4, 5], 13);
    let before = site.forward(&x, TRAIN).unwrap();
    site.freeze_current().unwrap();
    assert!(site.current().is_none());
    assert_eq!(site.history().len(), 3);
    assert_eq!(site.history()[2].scale, 2.0);
    assert!(max_abs_diff(&before, &site.forward(&x, TRAIN).unwrap()) < 1e-12);
}

#[test]
fn only_the_current_adapter_trains() {
    let site = site_with_history();
    let x = randn(&[4, 5], 14);
    let y = site.forward(&x, TRAIN).unwrap();
    let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let cur = site.current().unwrap();
    assert!(grads.get(cur.a().as_tensor()).is_some());
    assert!(grads.get(cur.b().as_tensor()).is_some());
    // inference mode builds no graph at all
    let y = site.forward(&x, ForwardMode::Inference).unwrap();
    assert!(!y.track_op());
}

#[test]
fn dropout_is_seeded_and_only_in_training() {
    let mut site = site_with_history();
    let cur = site.clear_current().unwrap();
    let (a, b) = (cur.a().as_tensor().clone(), cur.b().as_tensor().clone());
    site.set_current(LoraAdapter::from_tensors(a, b, 8.0, 0.5).unwrap())
        .unwrap();
    let x = randn(&[64, 5], 15);
    let train = |seed| {
        site.forward(
            &x,
            ForwardMode::Train {
                dropout_seed: Some(seed),
            },
        )
        .unwrap()
    };
    let no_drop = site.forward(&x, TRAIN).unwrap();
    assert!(max_abs_diff(&no_drop, &site.forward(&x, ForwardMode::Inference).unwrap()) < 1e-12);
    assert_eq!(max_abs_diff(&train(1), &train(1)), 0.0);
    assert!(max_abs_diff(&train(1), &train(2)) > 1e-3);
    assert!(max_abs_diff(&train(1), &no_drop) > 1e-3);
}

#[test]
fn bad_shapes_are_errors() {
    let mut site = AdapterSite::new(randn(&[6, 5], 1), None).unwrap();
    let wrong = LoraAdapter::from_tensors(randn(&[4, 7], 2), randn(&[6, 4], 3), 8.0, 0.0).unwrap();
    assert!(site.set_current(wrong).is_err());
    assert!(LoraAdapter::from_tensors(randn(&[4, 5], 2), randn(&[6, 3], 3), 8.0, 0.0).is_err());
    assert!(site
        .push_history(FrozenAdapter {
            a: randn(&[2, 5], 1),
            b: randn(&[6, 3], 1),
            scale: 1.0
        })
        .is_err());
    let mut sites = AdapterSites::new();
    sites.insert("a.q_proj", site.clone()).unwrap();
    assert!(sites.insert("a.q_proj", site).is_err());
    let err = sites
        .init_new_adapters(
            &LoraConfig {
                target_modules: vec!["c_attn".into()],
                ..Default::default()
            },
            0,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("c_attn") && err.contains("q_proj"), "{err}");
}

#[test]
fn f32_sites_work_and_trainable_vars_are_listed() {
    let w = randn(&[6, 5], 1).to_dtype(DType::F32).unwrap();
    let mut sites = AdapterSites::new();
    sites
        .insert("m.q_proj", AdapterSite::new(w.clone(), None).unwrap())
        .unwrap();
    sites
        .insert("m.v_proj", AdapterSite::new(w, None).unwrap())
        .unwrap();
    sites.init_new_adapters(&LoraConfig::default(), 3).unwrap();
    let vars: Vec<Var> = sites.trainable_vars();
    assert_eq!(vars.len(), 4);
    assert!(vars.iter().all(|v| v.dtype() == DType::F32));
    sites.freeze_current_into_history().unwrap();
    assert!(sites.trainable_vars().is_empty());
}
