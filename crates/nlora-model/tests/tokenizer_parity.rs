//! The GGUF-built tokenizer against SmolLM2's reference tokenizer (fixtures from
//! scripts/gen_smollm2_fixtures.py): benchmark prompts rebuilt from the data, tricky
//! strings, special ids, and the tokenizer.json round trip.
#[path = "gguf_common/mod.rs"]
mod gguf_common;

use gguf_common::{benchmark_prompt, ids_of, model_path, read_json};
use nlora_model::tokenizer::TextTokenizer;

fn tokenizer() -> TextTokenizer {
    TextTokenizer::from_gguf_path(model_path()).expect("tokenizer from the GGUF")
}

#[test]
fn hello_world_ids() {
    let t = tokenizer();
    assert_eq!(
        t.encode("Hello world! What is the topic?").unwrap(),
        vec![19556, 905, 17, 1812, 314, 260, 4234, 47]
    );
}

#[test]
fn special_ids_and_no_bos() {
    let t = tokenizer();
    let fx = read_json("tokenizer.json");
    assert_eq!(
        t.bos_id(),
        Some(fx["bos_token_id"].as_u64().unwrap() as u32)
    );
    assert_eq!(
        t.eos_id(),
        Some(fx["eos_token_id"].as_u64().unwrap() as u32)
    );
    assert_eq!(
        t.pad_id(),
        Some(fx["pad_token_id"].as_u64().unwrap() as u32)
    );
    assert_eq!(t.add_bos(), fx["add_bos"].as_bool().unwrap());
    assert_eq!(t.vocab_size(), 49152);
    assert_eq!(t.id_to_token(2).as_deref(), Some("<|im_end|>"));
    // BOS only when asked for.
    let mut with_bos = t.clone();
    with_bos.set_add_bos(true);
    assert_eq!(with_bos.encode("Hello").unwrap(), vec![1, 19556]);
}

#[test]
fn benchmark_prompts_match_the_reference() {
    let t = tokenizer();
    let fx = read_json("tokenizer.json");
    let cases = fx["benchmark"].as_array().unwrap();
    assert_eq!(cases.len(), 50);
    let mut tasks = std::collections::BTreeSet::new();
    for case in cases {
        let task = case["task"].as_str().unwrap();
        let index = case["index"].as_u64().unwrap() as usize;
        let prompt = benchmark_prompt(task, case["file"].as_str().unwrap(), index);
        assert_eq!(
            prompt.len() as u64,
            case["utf8_len"].as_u64().unwrap(),
            "{task}[{index}]: rebuilt prompt differs from the generator's"
        );
        let got = t.encode(&prompt).unwrap();
        let want = ids_of(&case["ids"]);
        if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
            panic!(
                "{task}[{index}]: first difference at token {i}: got {:?}, want {:?}",
                &got[i..(i + 5).min(got.len())],
                &want[i..(i + 5).min(want.len())]
            );
        }
        assert_eq!(got.len(), want.len(), "{task}[{index}]: length");
        // Decoding gives the text back (byte-level BPE is lossless).
        assert_eq!(
            t.decode(&got, false).unwrap(),
            prompt,
            "{task}[{index}]: decode"
        );
        tasks.insert(task.to_string());
    }
    assert_eq!(tasks.len(), 15, "every benchmark task is covered");
}

#[test]
fn tricky_strings_match_the_reference() {
    let t = tokenizer();
    let fx = read_json("tokenizer.json");
    let mut digit_split_checked = false;
    for case in fx["tricky"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(t.encode(text).unwrap(), ids_of(&case["ids"]), "{text:?}");
        assert_eq!(
            t.decode(&ids_of(&case["ids"]), false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "{text:?}"
        );
        digit_split_checked |= case["stock_transformers_differs"].as_bool().unwrap();
    }
    // The fixtures must hold a case where the digit split matters, or the pre-tokenizer
    // choice would go untested.
    assert!(digit_split_checked);
}

#[test]
fn special_tokens_are_whole_and_skippable() {
    let t = tokenizer();
    let ids = t.encode("<|im_start|>user\nHi<|im_end|>").unwrap();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(t.decode(&ids, true).unwrap(), "user\nHi");
}

#[test]
fn tokenizer_json_round_trip_through_the_hf_loader() {
    let t = tokenizer();
    let dir = tempfile::tempdir().unwrap();
    t.save_tokenizer_json(dir.path().join("tokenizer.json"))
        .unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "add_bos_token": false}"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("config.json"), r#"{"pad_token_id": 2}"#).unwrap();
    let hf = TextTokenizer::from_hf(dir.path()).unwrap();
    assert_eq!(
        (hf.bos_id(), hf.eos_id(), hf.pad_id()),
        (Some(1), Some(2), Some(2))
    );
    assert!(!hf.add_bos());
    let fx = read_json("tokenizer.json");
    for case in fx["tricky"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(hf.encode(text).unwrap(), ids_of(&case["ids"]), "{text:?}");
    }
}

#[test]
fn missing_tokenizer_json_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = TextTokenizer::from_hf(dir.path()).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
}
