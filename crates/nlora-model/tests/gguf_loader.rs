//! The GGUF loader on the real SmolLM2 file (config, names, un-permuted q/k against
//! transformers' dequantised weights) and on bad input.
#[path = "gguf_common/mod.rs"]
mod gguf_common;

use std::io::Write;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use gguf_common::{fixture, model_path, read_json};
use nlora_model::gguf::{load_llama_gguf, GgufFile};
use nlora_model::llama::LlamaConfig;

#[test]
fn config_matches_transformers() {
    let file = GgufFile::open(model_path()).unwrap();
    let c = file.llama_config().unwrap();
    let fx = read_json("config.json");
    let u = |k: &str| fx[k].as_u64().unwrap_or_else(|| panic!("{k}")) as usize;
    assert_eq!(c.vocab_size, u("vocab_size"));
    assert_eq!(c.hidden_size, u("hidden_size"));
    assert_eq!(c.intermediate_size, u("intermediate_size"));
    assert_eq!(c.num_hidden_layers, u("num_hidden_layers"));
    assert_eq!(c.num_attention_heads, u("num_attention_heads"));
    assert_eq!(c.num_key_value_heads, Some(u("num_key_value_heads")));
    assert_eq!(c.max_position_embeddings, u("max_position_embeddings"));
    assert_eq!(
        c.tie_word_embeddings,
        fx["tie_word_embeddings"].as_bool().unwrap()
    );
    assert_eq!(c.bos_token_id, Some(u("bos_token_id") as u32));
    assert_eq!(c.eos_token_id, Some(u("eos_token_id") as u32));
    // transformers keeps the f32 widening (9.9999997e-6); we round to the decimal.
    assert!((c.rms_norm_eps - fx["rms_norm_eps"].as_f64().unwrap()).abs() < 1e-12);
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert_eq!(c.rope_theta, fx["rope_theta"].as_f64().unwrap());
    assert!(!c.attention_bias);
    assert_eq!(c.hidden_act, "silu");
    assert_eq!(c.head_dim(), 64);
}

#[test]
fn info_summarises_the_file() {
    let file = GgufFile::open(model_path()).unwrap();
    let info = file.info().unwrap();
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.tensor_count, 272);
    assert_eq!(info.dtype_counts.get("Q4_1"), Some(&210));
    assert_eq!(info.dtype_counts.get("Q8_0"), Some(&1));
    assert_eq!(info.dtype_counts.get("F32"), Some(&61));
    // 134.5M parameters, embeddings tied.
    assert_eq!(info.parameter_count, 134_515_008);
    assert!(info.to_string().contains("272 tensors"));
}

#[test]
fn tensors_have_hf_names_and_match_transformers() {
    let t0 = std::time::Instant::now();
    let (config, tensors) = load_llama_gguf(model_path(), &Device::Cpu).unwrap();
    eprintln!("load_llama_gguf: {:.2} s", t0.elapsed().as_secs_f64());
    assert_eq!(tensors.len(), 2 + 9 * config.num_hidden_layers);
    assert!(
        !tensors.contains_key("lm_head.weight"),
        "tied: no lm_head in the file"
    );
    let shape = |n: &str| tensors[n].dims().to_vec();
    assert_eq!(shape("model.embed_tokens.weight"), [49152, 576]);
    assert_eq!(shape("model.layers.29.self_attn.k_proj.weight"), [192, 576]);
    assert_eq!(shape("model.layers.3.mlp.down_proj.weight"), [576, 1536]);
    assert_eq!(shape("model.norm.weight"), [576]);
    for t in tensors.values() {
        assert_eq!(t.dtype(), candle_core::DType::F32);
    }

    // Row blocks transformers dumped after its own un-permute: equal up to dequantisation
    // rounding. A wrong or missing un-permute moves rows and fails by whole weights.
    let reference =
        candle_core::safetensors::load(fixture("logits.safetensors"), &Device::Cpu).unwrap();
    let blocks: [(&str, &str, (usize, usize)); 5] = [
        (
            "model.layers.0.self_attn.q_proj.weight[:128,:16]",
            "model.layers.0.self_attn.q_proj.weight",
            (0, 128),
        ),
        (
            "model.layers.0.self_attn.k_proj.weight[:128,:16]",
            "model.layers.0.self_attn.k_proj.weight",
            (0, 128),
        ),
        (
            "model.layers.29.self_attn.k_proj.weight[64:192,:16]",
            "model.layers.29.self_attn.k_proj.weight",
            (64, 128),
        ),
        (
            "model.layers.0.self_attn.v_proj.weight[:64,:16]",
            "model.layers.0.self_attn.v_proj.weight",
            (0, 64),
        ),
        (
            "model.embed_tokens.weight[:4,:16]",
            "model.embed_tokens.weight",
            (0, 4),
        ),
    ];
    for (key, name, (start, len)) in blocks {
        let want = &reference[key];
        let got = tensors[name]
            .narrow(0, start, len)
            .unwrap()
            .narrow(1, 0, 16)
            .unwrap();
        let diff = max_abs_diff(&got, want);
        assert!(
            diff < 1e-6,
            "{name} rows {start}..{}: max |diff| {diff}",
            start + len
        );
    }
    // The raw (permuted) q rows differ from transformers' rows: the un-permute is not a no-op.
    let mut file = GgufFile::open(model_path()).unwrap();
    let raw = file
        .raw_tensor("blk.0.attn_q.weight", &Device::Cpu)
        .unwrap();
    let raw_block = raw.narrow(0, 0, 128).unwrap().narrow(1, 0, 16).unwrap();
    let want = &reference["model.layers.0.self_attn.q_proj.weight[:128,:16]"];
    assert!(max_abs_diff(&raw_block, want) > 1e-2);
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
        .to_scalar::<f32>()
        .unwrap()
}

// ---- bad input -------------------------------------------------------------------------

#[test]
fn missing_file_is_named() {
    let err = GgufFile::open("/nonexistent/dir/model.gguf")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("/nonexistent/dir/model.gguf"), "{err}");
}

#[test]
fn non_gguf_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, b"{\"not\": \"a model\"}").unwrap();
    let err = GgufFile::open(&path).err().unwrap().to_string();
    assert!(
        err.contains(path.to_str().unwrap()) && err.contains("not a GGUF file"),
        "{err}"
    );
    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    let err = GgufFile::open(&empty).err().unwrap().to_string();
    assert!(
        err.contains("empty.gguf") && err.contains("not a GGUF file"),
        "{err}"
    );
}

fn write_gguf(path: &std::path::Path, metadata: &[(&str, Value)]) {
    let t = Tensor::ones(32, candle_core::DType::F32, &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, GgmlDType::F32).unwrap();
    let mut f = std::fs::File::create(path).unwrap();
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    gguf_file::write(&mut f, &md, &[("output_norm.weight", &q)]).unwrap();
}

#[test]
fn unsupported_architecture_names_it_and_the_supported_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpt2.gguf");
    write_gguf(
        &path,
        &[("general.architecture", Value::String("gpt2".into()))],
    );
    let file = GgufFile::open(&path).unwrap();
    let err = file.llama_config().unwrap_err().to_string();
    assert!(
        err.contains("gpt2.gguf") && err.contains("`gpt2`") && err.contains("supported: llama"),
        "{err}"
    );
    let err = load_llama_gguf(&path, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`gpt2` is not supported"), "{err}");
}

#[test]
fn missing_metadata_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("partial.gguf");
    write_gguf(
        &path,
        &[
            ("general.architecture", Value::String("llama".into())),
            ("llama.embedding_length", Value::U32(32)),
            ("llama.attention.head_count", Value::U32(4)),
        ],
    );
    let err = GgufFile::open(&path)
        .unwrap()
        .llama_config()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("partial.gguf") && err.contains("llama.attention.layer_norm_rms_epsilon"),
        "{err}"
    );
}

#[test]
fn wrong_tensor_shape_is_refused() {
    // A complete LLaMA header with one layer whose tensors are all missing but for a
    // wrongly sized final norm: the loader must say which tensor and why.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(
        &path,
        &[
            ("general.architecture", Value::String("llama".into())),
            ("llama.embedding_length", Value::U32(16)),
            ("llama.attention.head_count", Value::U32(2)),
            ("llama.block_count", Value::U32(1)),
            ("llama.feed_forward_length", Value::U32(32)),
            ("llama.vocab_size", Value::U32(8)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ],
    );
    let mut file = GgufFile::open(&path).unwrap();
    let config: LlamaConfig = file.llama_config().unwrap();
    assert_eq!(
        (config.hidden_size, config.num_kv_heads(), config.vocab_size),
        (16, 2, 8)
    );
    let err = file
        .llama_tensors(&config, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tiny.gguf") && err.contains("output_norm.weight") && err.contains("[32]"),
        "{err}"
    );
}

/// A GGUF v3 file, by hand, holding one tensor of ggml type `dtype`.
fn handmade_gguf(dtype: u32) -> Vec<u8> {
    let mut b = Vec::new();
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // metadata entries
    string(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes()); // string
    string(&mut b, "llama");
    string(&mut b, "output_norm.weight");
    b.extend(1u32.to_le_bytes());
    b.extend(256u64.to_le_bytes());
    b.extend(dtype.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b.extend(vec![0u8; 1024]);
    b
}

#[test]
fn unreadable_tensor_type_is_named() {
    let dir = tempfile::tempdir().unwrap();
    // Sanity: the same bytes with F32 (type 0) are a readable file.
    let ok = dir.path().join("f32.gguf");
    std::fs::File::create(&ok)
        .unwrap()
        .write_all(&handmade_gguf(0))
        .unwrap();
    let mut file = GgufFile::open(&ok).unwrap();
    assert_eq!(
        file.raw_tensor("output_norm.weight", &Device::Cpu)
            .unwrap()
            .dims(),
        [256]
    );
    // 20 is IQ4_NL, which candle cannot read.
    let bad = dir.path().join("iq4nl.gguf");
    std::fs::File::create(&bad)
        .unwrap()
        .write_all(&handmade_gguf(20))
        .unwrap();
    let err = GgufFile::open(&bad).err().unwrap().to_string();
    assert!(
        err.contains("iq4nl.gguf") && err.contains("20") && err.contains("Q4_1"),
        "{err}"
    );
}

#[test]
fn truncated_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.gguf");
    let bytes = handmade_gguf(0);
    std::fs::write(&path, &bytes[..bytes.len() - 600]).unwrap();
    // Refused when the header is read, before any tensor is allocated.
    let err = GgufFile::open(&path).err().unwrap().to_string();
    assert!(
        err.contains("cut.gguf") && err.contains("output_norm.weight") && err.contains("truncated"),
        "{err}"
    );
}
