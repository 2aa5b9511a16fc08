//! The LLaMA decoder on the real SmolLM2 GGUF against transformers (fixtures from
//! scripts/gen_smollm2_fixtures.py): last-position logits and greedy continuations. This
//! also checks the GGUF un-permute end to end: wrong q/k rows change every logit.
#[path = "gguf_common/mod.rs"]
mod gguf_common;

use candle_core::{Device, Tensor, D};
use gguf_common::{fixture, ids_of, model_path, read_json};
use nlora_adapter::ForwardMode;
use nlora_model::llama::Llama;
use nlora_model::tokenizer::TextTokenizer;
use nlora_model::{load_model, GenerateOptions, LanguageModel, LmBatch};

fn model() -> Llama {
    load_model(model_path(), &Device::Cpu).expect("SmolLM2 from the GGUF")
}

fn last_logits(model: &Llama, ids: &[u32]) -> Tensor {
    let batch =
        LmBatch::causal_right_padded(&[ids.to_vec()], &[vec![false; ids.len()]], 2, &Device::Cpu)
            .unwrap();
    let logits = model
        .forward_logits(&batch, ForwardMode::Inference)
        .unwrap();
    logits.get(0).unwrap().get(ids.len() - 1).unwrap()
}

#[test]
fn last_logits_match_transformers() {
    let model = model();
    let tokenizer = TextTokenizer::from_gguf_path(model_path()).unwrap();
    let reference =
        candle_core::safetensors::load(fixture("logits.safetensors"), &Device::Cpu).unwrap();
    let fx = read_json("generation.json");
    for (n, case) in fx["logits_prompts"].as_array().unwrap().iter().enumerate() {
        let ids = ids_of(&case["ids"]);
        assert_eq!(
            tokenizer.encode(case["prompt"].as_str().unwrap()).unwrap(),
            ids
        );
        let got = last_logits(&model, &ids);
        let want = &reference[&format!("last_logits_{n}")];
        assert_eq!(got.dims(), want.dims());
        let diff = (&got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max(D::Minus1)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let argmax = |t: &Tensor| t.argmax(D::Minus1).unwrap().to_scalar::<u32>().unwrap();
        eprintln!("prompt {n}: max |logit diff| = {diff:.2e}");
        assert!(
            diff < 2e-3,
            "prompt {n}: max |logit diff| {diff} vs transformers"
        );
        assert_eq!(argmax(&got), argmax(want), "prompt {n}: top token");
    }
}

#[test]
fn greedy_continuations_match_transformers() {
    let model = model();
    let fx = read_json("generation.json");
    let max_new_tokens = fx["max_new_tokens"].as_u64().unwrap() as usize;
    let opts = GenerateOptions {
        max_new_tokens,
        eos_token_ids: vec![2],
        pad_token_id: 2,
    };
    let mut prompts = Vec::new();
    let mut wants = Vec::new();
    for case in fx["generations"].as_array().unwrap() {
        let mut want = ids_of(&case["new_ids"]);
        // transformers keeps the EOS it stopped on; `generate` returns the tokens before it.
        if case["stopped_at_eos"].as_bool().unwrap() {
            assert_eq!(want.pop(), Some(2));
        } else {
            assert_eq!(want.len(), max_new_tokens);
        }
        prompts.push(ids_of(&case["prompt_ids"]));
        wants.push(want);
    }
    // One at a time, then all together (left padding, KV cache over a batch).
    for (prompt, want) in prompts.iter().zip(&wants) {
        let got = model.generate(std::slice::from_ref(prompt), &opts).unwrap();
        assert_eq!(&got[0], want);
    }
    let got = model.generate(&prompts, &opts).unwrap();
    assert_eq!(got, wants);
}
