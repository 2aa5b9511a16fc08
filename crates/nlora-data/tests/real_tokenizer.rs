//! Batches with the real SmolLM2 tokenizer (from the GGUF, via nlora-model):
//! label masks decode to label + EOS for a task of every type. Needs the
//! model: fails, never skips, without it.
mod common;

use std::path::PathBuf;

use nlora_data::{
    BatchConfig, DecoderBatcher, LoadOptions, PlainTokenizer, PromptStyle, PromptTemplate,
    SpecialTokens,
};
use nlora_model::tokenizer::TextTokenizer;

fn model_path() -> PathBuf {
    let path = std::env::var_os("NLORA_MODEL")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/nlora/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-model.sh (or set NLORA_MODEL)",
        path.display()
    );
    path
}

#[test]
fn smollm2_label_masks_decode_to_label_and_eos_for_every_task_type() {
    let tok = TextTokenizer::from_path(model_path()).unwrap();
    let special = SpecialTokens {
        bos: tok.bos_id(),
        eos: tok.eos_id().expect("SmolLM2 has an EOS"),
        pad: tok.pad_id().or(tok.eos_id()).unwrap(),
    };
    let eos_text = tok.decode(&[special.eos], false).unwrap();
    let bench = common::benchmark();
    let batcher = DecoderBatcher::new(tok.inner(), special, BatchConfig::default());
    for name in [
        "agnews", "yelp", "CB", "QQP", "BoolQA", "MultiRC", "WiC", "COPA",
    ] {
        let task = bench.load_task(name, &LoadOptions::default()).unwrap();
        let template =
            PromptTemplate::for_task(&task, bench.instructions(), PromptStyle::default()).unwrap();
        let encoded: Vec<_> = task.train[..6]
            .iter()
            .map(|e| batcher.encode(&template.apply(e)).unwrap())
            .collect();
        let batch = batcher.train_batch(&encoded).unwrap();
        for i in 0..batch.batch_size {
            let masked: Vec<u32> = batch
                .row(i)
                .iter()
                .zip(batch.loss_row(i))
                .filter(|(_, &m)| m == 1)
                .map(|(&t, _)| t)
                .collect();
            assert_eq!(
                tok.decode(&masked, false).unwrap(),
                format!("{}{eos_text}", batch.answers[i]),
                "{name} row {i}"
            );
            // Labels are tokenised alone and exactly.
            assert_eq!(
                &masked[..masked.len() - 1],
                tok.inner()
                    .encode_plain(&batch.answers[i])
                    .unwrap()
                    .as_slice()
            );
            assert_eq!(
                &masked[..masked.len() - 1],
                tok.encode_plain(&batch.answers[i]).unwrap().as_slice()
            );
        }
        // Long MultiRC/BoolQA passages fit the reference's 512-token budget
        // only after truncation, which keeps the answer cue.
        for e in &encoded {
            assert!(e.prompt.len() < 512);
            let text = tok.decode(&e.prompt, false).unwrap();
            assert!(text.ends_with("\nAnswer:"), "{name}: {text:?}");
        }
    }
}

/// The reference re-tokenises prompt + label as one string; nlora appends
/// the label's own ids. For SmolLM2 these are the same ids on every task.
#[test]
fn smollm2_joined_and_separate_label_tokenisation_agree_on_every_task() {
    let tok = TextTokenizer::from_path(model_path()).unwrap();
    let bench = common::benchmark();
    for info in bench.tasks() {
        let task = nlora_data::Task::load(info, &LoadOptions::default()).unwrap();
        let template =
            PromptTemplate::for_task(&task, bench.instructions(), PromptStyle::default()).unwrap();
        for label in &task.labels {
            let e = task.train.iter().find(|e| &e.label == label).unwrap();
            let prompt = template.render(&e.sentence);
            let mut separate = tok.encode_plain(&prompt).unwrap();
            separate.extend(tok.encode_plain(label).unwrap());
            let joined = tok.encode_plain(&format!("{prompt}{label}")).unwrap();
            assert_eq!(joined, separate, "{} label {label:?}", task.name);
        }
    }
}
