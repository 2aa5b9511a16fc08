//! Test support: a tiny random LLaMA in a Hugging Face folder, with the real
//! SmolLM2 tokenizer, so end-to-end tests run the whole engine on real
//! benchmark text in seconds.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

use crate::config::{MethodName, MethodSection, PerTask, RunConfig};
use crate::error::{Result, TrainError};

/// The SmolLM2 GGUF the tests read their tokenizer from; a clear failure
/// (never a silent pass) when it is missing.
pub fn smollm2_path() -> PathBuf {
    let p = crate::engine::default_model_path();
    assert!(
        p.exists(),
        "{} not found: run scripts/fetch-model.sh (or set NLORA_MODEL)",
        p.display()
    );
    p
}

/// The benchmark folder for tests: $NLORA_DATA, else ../shared/cl_benchmark
/// from the workspace root.
pub fn data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("NLORA_DATA") {
        return PathBuf::from(d);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let d = root.join("../shared/cl_benchmark");
    assert!(
        d.exists(),
        "benchmark data not found at {}: set NLORA_DATA",
        d.display()
    );
    d
}

/// The end-to-end tests' run: a tiny model at `model`, three real tasks
/// (dbpedia, amazon, CB), 6 training and 3 test examples each, r 4.
pub fn tiny_run_config(model: &Path, method: MethodName) -> RunConfig {
    let mut cfg = RunConfig {
        seed: 7,
        model: Default::default(),
        data: Default::default(),
        method: MethodSection::new(method),
        train: Default::default(),
        eval: Default::default(),
        monitor: Default::default(),
    };
    cfg.model.path = Some(model.to_path_buf());
    cfg.model.r = 4;
    cfg.model.alpha = 8.0;
    cfg.data.order = None;
    cfg.data.tasks = Some(vec!["dbpedia".into(), "amazon".into(), "CB".into()]);
    cfg.data.max_train_per_task = Some(6);
    cfg.data.max_test_per_task = Some(3);
    cfg.data.max_source_len = 96;
    cfg.train.batch_size = 3;
    cfg.train.lr = PerTask::One(5e-3);
    cfg.eval.batch_size = 4;
    cfg.method.lambda = Some(PerTask::One(1e-3));
    cfg
}

/// Writes a random LLaMA (hidden 32, 2 layers, GQA 4/2 heads, SmolLM2's
/// vocabulary and tokenizer) into `dir` as a Hugging Face folder.
pub fn write_tiny_llama(dir: &Path, seed: u64) -> Result<()> {
    let io = |e: std::io::Error| TrainError::File {
        path: dir.to_path_buf(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let tok = nlora_model::tokenizer::TextTokenizer::from_path(smollm2_path())?;
    tok.save_tokenizer_json(dir.join("tokenizer.json"))?;
    let (vocab, hidden, inter, layers, heads, kv) =
        (tok.vocab_size(), 32usize, 64usize, 2usize, 4usize, 2usize);
    let head_dim = hidden / heads;
    let config = serde_json::json!({
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": true,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "hidden_act": "silu"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).map_err(io)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dev = Device::Cpu;
    let mut rand_t = |shape: (usize, usize), std: f64| -> Result<Tensor> {
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| (rng.random_range(-1.0..1.0) * std * 1.732) as f32)
            .collect();
        Ok(Tensor::from_vec(v, shape, &dev)?)
    };
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert(
        "model.embed_tokens.weight".into(),
        rand_t((vocab, hidden), 0.5)?,
    );
    t.insert(
        "model.norm.weight".into(),
        Tensor::ones(hidden, DType::F32, &dev)?,
    );
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        t.insert(
            format!("{p}.input_layernorm.weight"),
            Tensor::ones(hidden, DType::F32, &dev)?,
        );
        t.insert(
            format!("{p}.post_attention_layernorm.weight"),
            Tensor::ones(hidden, DType::F32, &dev)?,
        );
        let s = 0.2;
        t.insert(
            format!("{p}.self_attn.q_proj.weight"),
            rand_t((heads * head_dim, hidden), s)?,
        );
        t.insert(
            format!("{p}.self_attn.k_proj.weight"),
            rand_t((kv * head_dim, hidden), s)?,
        );
        t.insert(
            format!("{p}.self_attn.v_proj.weight"),
            rand_t((kv * head_dim, hidden), s)?,
        );
        t.insert(
            format!("{p}.self_attn.o_proj.weight"),
            rand_t((hidden, heads * head_dim), s)?,
        );
        t.insert(
            format!("{p}.mlp.gate_proj.weight"),
            rand_t((inter, hidden), s)?,
        );
        t.insert(
            format!("{p}.mlp.up_proj.weight"),
            rand_t((inter, hidden), s)?,
        );
        t.insert(
            format!("{p}.mlp.down_proj.weight"),
            rand_t((hidden, inter), s)?,
        );
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors"))?;
    Ok(())
}
