//! PEFT format: the files PEFT writes, round trips, and clear errors on bad files.
use candle_core::{Device, Tensor};
use nlora_adapter::{AdapterSite, AdapterSites, LoraConfig, PeftAdapter};

fn sites() -> AdapterSites {
    let mut s = AdapterSites::new();
    for l in 0..2 {
        for (m, out_f) in [("q_proj", 8), ("k_proj", 4), ("v_proj", 4)] {
            let w = Tensor::randn(0f32, 1.0, (out_f, 8), &Device::Cpu).unwrap();
            s.insert(
                format!("model.layers.{l}.self_attn.{m}"),
                AdapterSite::new(w, None).unwrap(),
            )
            .unwrap();
        }
    }
    s
}

fn cfg() -> LoraConfig {
    LoraConfig {
        r: 2,
        alpha: 8.0,
        dropout: 0.1,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
    }
}

#[test]
fn save_writes_peft_files_and_load_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = sites();
    s.init_new_adapters(&cfg(), 7).unwrap();
    // make B non-zero so the round trip checks real values
    for v in s.trainable_vars() {
        v.set(&Tensor::randn(0f32, 1.0, v.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    s.save_peft(dir.path(), "SmolLM2-135M").unwrap();

    let cfg_json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg_json["peft_type"], "LORA");
    assert_eq!(cfg_json["r"], 2);
    assert_eq!(cfg_json["lora_alpha"], 8); // an int, as PEFT writes it
    assert_eq!(cfg_json["bias"], "none");
    assert_eq!(cfg_json["task_type"], "CAUSAL_LM");
    assert_eq!(cfg_json["fan_in_fan_out"], false);
    assert_eq!(cfg_json["inference_mode"], true);
    assert_eq!(cfg_json["base_model_name_or_path"], "SmolLM2-135M");
    assert!((cfg_json["lora_dropout"].as_f64().unwrap() - 0.1).abs() < 1e-6);

    let raw =
        candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let mut keys: Vec<_> = raw.keys().cloned().collect();
    keys.sort();
    assert_eq!(keys.len(), 8);
    assert!(keys
        .contains(&"base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight".to_string()));
    // no temporary files left behind
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);

    let loaded = PeftAdapter::load(dir.path(), &Device::Cpu).unwrap();
    let mut fresh = sites();
    fresh.set_current_from_peft(&loaded).unwrap();
    for ((p1, s1), (p2, s2)) in s.adapted().zip(fresh.adapted()) {
        assert_eq!(p1, p2);
        let (c1, c2) = (s1.current().unwrap(), s2.current().unwrap());
        let d = (c1.b().as_tensor() - c2.b().as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
        assert_eq!(c1.scale(), c2.scale());
    }
    assert_eq!(fresh.lora_config().unwrap().r, 2);

    // as history of a later task
    fresh.push_history_from_peft(&loaded).unwrap();
    assert_eq!(
        fresh
            .get("model.layers.0.self_attn.q_proj")
            .unwrap()
            .history()
            .len(),
        1
    );
    assert!(fresh
        .get("model.layers.0.self_attn.k_proj")
        .unwrap()
        .history()
        .is_empty());
}

#[test]
fn bad_adapter_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = PeftAdapter::load(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("adapter_config.json"), "{err}");

    let mut s = sites();
    s.init_new_adapters(&cfg(), 7).unwrap();
    s.save_peft(dir.path(), "m").unwrap();
    let cfg_path = dir.path().join("adapter_config.json");
    let original = std::fs::read_to_string(&cfg_path).unwrap();

    std::fs::write(&cfg_path, original.replace("\"r\": 2", "\"r\": 3")).unwrap();
    let err = PeftAdapter::load(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("adapter_model.safetensors") && err.contains("rank"),
        "{err}"
    );

    std::fs::write(
        &cfg_path,
        original.replace("\"use_rslora\": false", "\"use_rslora\": true"),
    )
    .unwrap();
    let err = PeftAdapter::load(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("use_rslora"), "{err}");

    std::fs::write(&cfg_path, &original).unwrap();
    let loaded = PeftAdapter::load(dir.path(), &Device::Cpu).unwrap();
    // an adapter for a different model: no such layer / wrong width
    let mut other = AdapterSites::new();
    other
        .insert(
            "model.layers.0.self_attn.q_proj",
            AdapterSite::new(
                Tensor::zeros((8, 6), candle_core::DType::F32, &Device::Cpu).unwrap(),
                None,
            )
            .unwrap(),
        )
        .unwrap();
    let err = other
        .set_current_from_peft(&loaded)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.layers.0.self_attn.q_proj") || err.contains("not a linear layer"),
        "{err}"
    );
    assert!(
        other
            .get("model.layers.0.self_attn.q_proj")
            .unwrap()
            .current()
            .is_none(),
        "nothing changes on error"
    );

    std::fs::write(
        dir.path().join("adapter_model.safetensors"),
        b"not safetensors",
    )
    .unwrap();
    let err = PeftAdapter::load(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("adapter_model.safetensors"), "{err}");
}
