//! Batches built with a byte-level BPE trained here on real prompts: label
//! masks, padding, truncation, encoder-decoder layout.
mod common;

use nlora_data::tokenizers::Tokenizer;
use nlora_data::{
    BatchConfig, DataError, DecoderBatcher, EncodedExample, LoadOptions, PaddingSide,
    PlainTokenizer, PromptStyle, PromptTemplate, PromptedExample, Seq2SeqBatcher, Seq2SeqTokens,
    SpecialTokens, Truncation,
};

struct Fixture {
    tokenizer: Tokenizer,
    special: SpecialTokens,
    examples: Vec<PromptedExample>,
}

/// 12 agnews training prompts (all four labels) and a BPE trained on 300 prompts.
fn fixture() -> Fixture {
    let bench = common::benchmark();
    let task = bench.load_task("agnews", &LoadOptions::default()).unwrap();
    let template =
        PromptTemplate::for_task(&task, bench.instructions(), PromptStyle::default()).unwrap();
    let corpus: Vec<String> = task.train[..300]
        .iter()
        .map(|e| format!("{}{}", template.render(&e.sentence), e.label))
        .collect();
    let tokenizer = common::train_bpe(&corpus, 1200);
    let id = |t: &str| tokenizer.token_to_id(t).unwrap();
    let special = SpecialTokens {
        bos: Some(id(common::BOS)),
        eos: id(common::EOS),
        pad: id(common::PAD),
    };
    let examples: Vec<PromptedExample> = task.train[300..312]
        .iter()
        .map(|e| template.apply(e))
        .collect();
    let labels: std::collections::BTreeSet<&str> =
        examples.iter().map(|e| e.label.as_str()).collect();
    assert_eq!(labels.len(), 4, "fixture should cover every agnews label");
    Fixture {
        tokenizer,
        special,
        examples,
    }
}

fn decode(tok: &Tokenizer, ids: &[u32]) -> String {
    tok.decode(ids, false).unwrap()
}

#[test]
fn training_rows_are_bos_prompt_label_eos_and_the_loss_mask_covers_label_and_eos() {
    let f = fixture();
    let batcher = DecoderBatcher::new(&f.tokenizer, f.special, BatchConfig::default());
    let encoded: Vec<EncodedExample> = f
        .examples
        .iter()
        .map(|e| batcher.encode(e).unwrap())
        .collect();
    let batch = batcher.train_batch(&encoded).unwrap();
    assert_eq!(batch.batch_size, f.examples.len());
    assert_eq!(batch.padding, PaddingSide::Right);
    let labels = batch.loss_labels(-100);
    for (i, example) in f.examples.iter().enumerate() {
        let row = batch.row(i);
        let loss = batch.loss_row(i);
        let attn = batch.attention_row(i);
        let len = attn.iter().filter(|&&a| a == 1).count();
        // Right padding: real tokens first, then pad with mask 0.
        assert!(attn[..len].iter().all(|&a| a == 1));
        assert!(row[len..].iter().all(|&t| t == f.special.pad));
        assert_eq!(row[0], f.special.bos.unwrap());
        // The masked positions decode exactly to the label text, then EOS.
        let masked: Vec<u32> = row
            .iter()
            .zip(loss)
            .filter(|(_, &m)| m == 1)
            .map(|(&t, _)| t)
            .collect();
        assert_eq!(masked.last(), Some(&f.special.eos));
        assert_eq!(
            decode(&f.tokenizer, &masked[..masked.len() - 1]),
            example.label
        );
        assert_eq!(
            decode(&f.tokenizer, &masked),
            format!("{}{}", example.label, common::EOS)
        );
        // They are the last real tokens: prompt, then label + EOS.
        let first_loss = loss.iter().position(|&m| m == 1).unwrap();
        assert_eq!(first_loss, batch.prompt_lens[i]);
        assert_eq!(first_loss + masked.len(), len);
        // The prompt decodes back to the prompt text (byte-level BPE is lossless).
        assert_eq!(decode(&f.tokenizer, &row[1..first_loss]), example.text);
        // Labels are tokenised alone: no space inserted before them.
        assert_eq!(
            &row[first_loss..len - 1],
            f.tokenizer
                .encode(example.label.as_str(), false)
                .unwrap()
                .get_ids()
        );
        // HF-style labels: ids on the loss positions, -100 elsewhere.
        let hf = &labels[i * batch.seq_len..(i + 1) * batch.seq_len];
        for t in 0..batch.seq_len {
            let expect = if loss[t] == 1 { row[t] as i64 } else { -100 };
            assert_eq!(hf[t], expect);
        }
        assert_eq!(batch.answers[i], example.label);
        assert_eq!(batch.tasks[i], "agnews");
    }
}

#[test]
fn generation_rows_are_left_padded_bos_prompt_with_positions_from_the_first_token() {
    let f = fixture();
    let batcher = DecoderBatcher::new(&f.tokenizer, f.special, BatchConfig::default());
    let encoded: Vec<EncodedExample> = f
        .examples
        .iter()
        .map(|e| batcher.encode(e).unwrap())
        .collect();
    let batch = batcher.generation_batch(encoded.iter()).unwrap();
    assert_eq!(batch.padding, PaddingSide::Left);
    assert!(batch.loss_mask.iter().all(|&m| m == 0));
    let lens: Vec<usize> = encoded.iter().map(|e| e.prompt.len() + 1).collect();
    assert_eq!(batch.seq_len, *lens.iter().max().unwrap());
    assert!(
        lens.iter().any(|&l| l < batch.seq_len),
        "fixture needs padding"
    );
    for (i, example) in f.examples.iter().enumerate() {
        let row = batch.row(i);
        let pad = batch.seq_len - lens[i];
        assert!(row[..pad].iter().all(|&t| t == f.special.pad));
        assert!(batch.attention_row(i)[..pad].iter().all(|&a| a == 0));
        assert!(batch.attention_row(i)[pad..].iter().all(|&a| a == 1));
        assert_eq!(row[pad], f.special.bos.unwrap());
        assert_eq!(decode(&f.tokenizer, &row[pad + 1..]), example.text);
        let pos = &batch.position_ids[i * batch.seq_len..(i + 1) * batch.seq_len];
        assert!(pos[..pad].iter().all(|&p| p == 0));
        let expect: Vec<u32> = (0..lens[i] as u32).collect();
        assert_eq!(&pos[pad..], expect.as_slice());
        assert_eq!(batch.prompt_lens[i], lens[i]);
    }
}

#[test]
fn an_untruncated_prompt_is_the_tokenisation_of_the_whole_text() {
    let f = fixture();
    let batcher = DecoderBatcher::new(&f.tokenizer, f.special, BatchConfig::default());
    for e in &f.examples {
        let enc = batcher.encode(e).unwrap();
        assert_eq!(enc.truncated, 0);
        assert_eq!(
            enc.prompt,
            PlainTokenizer::encode_plain(&f.tokenizer, &e.text).unwrap()
        );
    }
}

/// The longest fixture prompt, with a budget `keep` sentence tokens above
/// its fixed parts.
fn long_example_and_budget(f: &Fixture, keep: usize) -> (PromptedExample, usize) {
    let e = f
        .examples
        .iter()
        .max_by_key(|e| e.sentence.len())
        .unwrap()
        .clone();
    let enc = |s: &str| PlainTokenizer::encode_plain(&f.tokenizer, s).unwrap().len();
    let fixed = enc(e.head()) + enc(e.tail());
    assert!(enc(e.sentence_text()) > keep + 5);
    (e, fixed + keep)
}

#[test]
fn sentence_truncation_keeps_instruction_options_and_answer_cue() {
    let f = fixture();
    let (e, prompt_budget) = long_example_and_budget(&f, 10);
    let config = BatchConfig {
        max_source_len: prompt_budget + 1, // + BOS
        ..BatchConfig::default()
    };
    let batcher = DecoderBatcher::new(&f.tokenizer, f.special, config);
    let enc = batcher.encode(&e).unwrap();
    assert_eq!(enc.prompt.len(), prompt_budget);
    assert!(enc.truncated > 0);
    let text = decode(&f.tokenizer, &enc.prompt);
    assert!(text.starts_with(e.head()), "{text:?}");
    assert!(text.ends_with("\nAnswer:"), "{text:?}");
    let middle = &text[e.head().len()..text.len() - e.tail().len()];
    assert!(
        !middle.is_empty() && e.sentence_text().starts_with(middle),
        "{middle:?}"
    );
    assert!(middle.len() < e.sentence_text().len());
    // The training row still ends with label + EOS under the loss mask.
    let batch = batcher.train_batch([&enc]).unwrap();
    assert_eq!(batch.seq_len, 1 + prompt_budget + enc.label.len() + 1);
    assert_eq!(
        batch.loss_mask.iter().filter(|&&m| m == 1).count(),
        enc.label.len() + 1
    );
}

#[test]
fn source_tail_truncation_cuts_the_end_like_the_reference() {
    let f = fixture();
    let (e, prompt_budget) = long_example_and_budget(&f, 10);
    let config = BatchConfig {
        max_source_len: prompt_budget + 1,
        truncation: Truncation::SourceTail,
        ..BatchConfig::default()
    };
    let enc = DecoderBatcher::new(&f.tokenizer, f.special, config)
        .encode(&e)
        .unwrap();
    let whole = PlainTokenizer::encode_plain(&f.tokenizer, &e.text).unwrap();
    assert_eq!(enc.prompt, whole[..prompt_budget]);
    assert_eq!(enc.truncated, whole.len() - prompt_budget);
    assert!(!decode(&f.tokenizer, &enc.prompt).ends_with("\nAnswer:"));
}

#[test]
fn budgets_that_cannot_hold_the_prompt_or_label_are_errors() {
    let f = fixture();
    let e = &f.examples[0];
    let fixed = PlainTokenizer::encode_plain(&f.tokenizer, e.head())
        .unwrap()
        .len()
        + PlainTokenizer::encode_plain(&f.tokenizer, e.tail())
            .unwrap()
            .len();
    let small = BatchConfig {
        max_source_len: fixed + 1, // BOS + fixed parts, no room for the sentence
        ..BatchConfig::default()
    };
    let err = DecoderBatcher::new(&f.tokenizer, f.special, small)
        .encode(e)
        .unwrap_err();
    assert!(matches!(err, DataError::Tokenizer(_)));
    assert!(err.to_string().contains("max_source_len"), "{err}");

    let label_len = PlainTokenizer::encode_plain(&f.tokenizer, &e.label)
        .unwrap()
        .len();
    let tight = BatchConfig {
        max_target_len: label_len, // no room for EOS
        ..BatchConfig::default()
    };
    let err = DecoderBatcher::new(&f.tokenizer, f.special, tight)
        .encode(e)
        .unwrap_err();
    assert!(err.to_string().contains("max_target_len"), "{err}");

    let batcher = DecoderBatcher::new(&f.tokenizer, f.special, BatchConfig::default());
    let none: [&EncodedExample; 0] = [];
    assert!(batcher.train_batch(none).is_err());
}

#[test]
fn seq2seq_batches_append_eos_to_source_and_target_and_shift_the_decoder_input() {
    let f = fixture();
    let special = Seq2SeqTokens {
        eos: f.special.eos,
        pad: f.special.pad,
        decoder_start: f.special.pad,
    };
    let batcher = Seq2SeqBatcher::new(&f.tokenizer, special, BatchConfig::default());
    let encoded: Vec<EncodedExample> = f
        .examples
        .iter()
        .map(|e| batcher.encode(e).unwrap())
        .collect();
    let batch = batcher.batch(&encoded).unwrap();
    let labels = batch.loss_labels(-100);
    for (i, (e, enc)) in f.examples.iter().zip(&encoded).enumerate() {
        let src = &batch.input_ids[i * batch.source_len..(i + 1) * batch.source_len];
        let src_mask = &batch.attention_mask[i * batch.source_len..(i + 1) * batch.source_len];
        let n = enc.prompt.len() + 1;
        assert_eq!(src[n - 1], special.eos);
        assert_eq!(decode(&f.tokenizer, &src[..n - 1]), e.text);
        assert!(src_mask[..n].iter().all(|&m| m == 1) && src_mask[n..].iter().all(|&m| m == 0));
        assert!(src[n..].iter().all(|&t| t == special.pad));

        let tgt = &batch.target_ids[i * batch.target_len..(i + 1) * batch.target_len];
        let tgt_mask = &batch.target_mask[i * batch.target_len..(i + 1) * batch.target_len];
        let dec_in = &batch.decoder_input_ids[i * batch.target_len..(i + 1) * batch.target_len];
        let m = enc.label.len() + 1;
        assert_eq!(decode(&f.tokenizer, &tgt[..m - 1]), e.label);
        assert_eq!(tgt[m - 1], special.eos);
        assert!(tgt_mask[..m].iter().all(|&x| x == 1) && tgt_mask[m..].iter().all(|&x| x == 0));
        assert_eq!(dec_in[0], special.decoder_start);
        assert_eq!(&dec_in[1..m], &tgt[..m - 1]);
        let hf = &labels[i * batch.target_len..(i + 1) * batch.target_len];
        assert!(hf[m..].iter().all(|&x| x == -100));
        assert_eq!(hf[m - 1], special.eos as i64);
    }
}

/// A T5-style tokenizer: Unigram over characters and "▁word" pieces,
/// Metaspace pre-tokenizer, and the `$A </s>` post-processor of T5.
fn t5_style(corpus: &[String]) -> Tokenizer {
    use nlora_data::tokenizers::models::unigram::Unigram;
    use nlora_data::tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
    use nlora_data::tokenizers::processors::template::TemplateProcessing;
    let mut vocab: Vec<(String, f64)> = vec![
        ("<pad>".into(), 0.0),
        ("</s>".into(), 0.0),
        ("<unk>".into(), 0.0),
        ("▁".into(), -2.0),
    ];
    let mut seen = std::collections::BTreeSet::new();
    for text in corpus {
        for c in text.chars().filter(|c| !c.is_whitespace()) {
            seen.insert(c.to_string());
        }
        for w in text.split_whitespace().take(40) {
            seen.insert(format!("▁{w}"));
        }
    }
    vocab.extend(seen.into_iter().map(|p| {
        let score = if p.starts_with('▁') { -1.0 } else { -5.0 };
        (p, score)
    }));
    let mut tok = Tokenizer::new(Unigram::from(vocab, Some(2), false).unwrap());
    tok.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::Always, true)));
    tok.with_post_processor(Some(
        TemplateProcessing::builder()
            .try_single("$A </s>")
            .unwrap()
            .special_tokens(vec![("</s>", 1)])
            .build()
            .unwrap(),
    ));
    tok
}

#[test]
fn seq2seq_source_and_target_equal_what_a_t5_tokenizer_gives_with_its_eos() {
    let f = fixture();
    let corpus: Vec<String> = f
        .examples
        .iter()
        .map(|e| format!("{} {}", e.text, e.label))
        .collect();
    let tok = t5_style(&corpus);
    let special = Seq2SeqTokens {
        eos: 1,
        pad: 0,
        decoder_start: 0,
    };
    let batcher = Seq2SeqBatcher::new(&tok, special, BatchConfig::default());
    for e in &f.examples {
        let enc = batcher.encode(e).unwrap();
        assert_eq!(enc.truncated, 0);
        let batch = batcher.batch([&enc]).unwrap();
        // With the post-processor (add_special_tokens = true), as the
        // reference's `tokenizer(source)` / `tokenizer(labels)` calls do.
        let hf_source = tok
            .encode(e.text.as_str(), true)
            .unwrap()
            .get_ids()
            .to_vec();
        let hf_target = tok
            .encode(e.label.as_str(), true)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(hf_source.last(), Some(&1));
        assert_eq!(batch.input_ids, hf_source);
        assert_eq!(batch.target_ids, hf_target);
    }
}
