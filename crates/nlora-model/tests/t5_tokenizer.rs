//! The T5 tokenizer (a Unigram tokenizer.json whose post-processor appends
//! `</s>`) against the ids and texts transformers produced for it
//! (fixtures from scripts/gen_t5_fixtures.py).
use std::path::{Path, PathBuf};

use nlora_model::tokenizer::TextTokenizer;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

fn cases() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture("t5_tokenizer/cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn special_ids_and_vocabulary() {
    let fx = cases();
    let t = TextTokenizer::from_hf(fixture("t5_tokenizer")).unwrap();
    assert_eq!(t.vocab_size() as u64, fx["vocab_size"].as_u64().unwrap());
    assert_eq!(
        t.eos_id(),
        Some(fx["eos_token_id"].as_u64().unwrap() as u32)
    );
    assert_eq!(
        t.pad_id(),
        Some(fx["pad_token_id"].as_u64().unwrap() as u32)
    );
    assert_eq!(
        t.token_to_id("<unk>"),
        Some(fx["unk_token_id"].as_u64().unwrap() as u32)
    );
    assert_eq!(
        t.token_to_id("<extra_id_0>"),
        Some(fx["extra_id_0"].as_u64().unwrap() as u32)
    );
    // T5 has no BOS: nothing is put in front
    assert!(!t.add_bos());
}

#[test]
fn ids_match_transformers_and_eos_is_appended() {
    let fx = cases();
    let t = TextTokenizer::from_hf(fixture("t5_tokenizer")).unwrap();
    let eos = t.eos_id().unwrap();
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let got = t.encode(text).unwrap();
        assert_eq!(got, ids(&c["ids"]), "ids of {text:?}");
        assert_eq!(got.last(), Some(&eos), "{text:?} must end with </s>");
        assert_eq!(
            t.encode_plain(text).unwrap(),
            ids(&c["plain_ids"]),
            "plain ids of {text:?}"
        );
        assert_eq!(
            t.decode(&got, true).unwrap(),
            c["decoded"].as_str().unwrap(),
            "decoded {text:?}"
        );
        assert_eq!(
            t.decode(&got, false).unwrap(),
            c["decoded_with_special"].as_str().unwrap(),
            "decoded with special tokens {text:?}"
        );
    }
}

#[test]
fn text_in_the_vocabulary_round_trips() {
    let t = TextTokenizer::from_hf(fixture("t5_tokenizer")).unwrap();
    for text in [
        "The cat sat on the mat.",
        "What is the topic of this news article?",
        "The answer is positive.",
    ] {
        let ids = t.encode(text).unwrap();
        assert_eq!(t.decode(&ids, true).unwrap(), text);
        // the sentinel survives as one token
        let with_sentinel = format!("{text} <extra_id_0>");
        let ids = t.encode(&with_sentinel).unwrap();
        assert!(ids.contains(&t.token_to_id("<extra_id_0>").unwrap()));
    }
}

#[test]
fn model_folders_carry_the_same_tokenizer() {
    let reference = TextTokenizer::from_hf(fixture("t5_tokenizer")).unwrap();
    for v in ["t5_v10/model", "t5_v11/model"] {
        let t = TextTokenizer::from_hf(fixture(v)).unwrap();
        let text = "What is the topic of this news article?";
        assert_eq!(t.encode(text).unwrap(), reference.encode(text).unwrap());
        assert_eq!(t.eos_id(), reference.eos_id());
        assert_eq!(t.pad_id(), Some(0));
    }
}
