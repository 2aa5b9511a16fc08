//! Tokenised batches for decoder-only and encoder-decoder models.
//!
//! Batches are plain row-major `Vec<u32>` / `Vec<u8>` of shape
//! `[batch_size, len]`: this crate does not depend on candle, and the model
//! crate turns them into tensors in one call each (`Tensor::from_vec(ids,
//! (b, len), dev)`). Keeping candle out keeps the data crate testable
//! without a device and lets any model code consume it.
//!
//! # Decoder-only (LLaMA family), as the reference builds it
//! * training row: `BOS + prompt + label + EOS`, right-padded; the label is
//!   tokenised on its own (no space inserted) and its ids appended;
//!   `loss_mask` is 1 exactly on the label tokens and the EOS. It marks
//!   *targets*: the logits at position `t - 1` predict the token at `t`, so
//!   the loss is `CE(logits[:, :-1], input_ids[:, 1:])` weighted by
//!   `loss_mask[:, 1:]`.
//! * generation row: `BOS + prompt`, left-padded so every row ends at the
//!   last column; `position_ids` count from the first real token (0 on
//!   padding), as HF does from the attention mask.
//!
//! # Encoder-decoder (T5)
//! source = `prompt + EOS`, target = `label + EOS`, both right-padded;
//! `decoder_input_ids` = `decoder_start + target[..-1]`. T5's tokenizer
//! appends `</s>` to every sequence through its post-processor; here the EOS
//! id is appended explicitly (texts are encoded without special tokens) so
//! the same rule holds for any tokenizer.
//!
//! # Truncation
//! The source may hold at most `max_source_len` tokens (BOS, resp. EOS,
//! included). [`Truncation::Sentence`] (default) shortens only the
//! sentence: the prompt is tokenised whole when it fits (identical to the
//! reference then); when it does not, the head (prefix, instruction,
//! options), the sentence and the tail (`"\nAnswer:"`) are tokenised
//! separately and sentence tokens are dropped from the end, so the question
//! and the answer cue always survive. [`Truncation::SourceTail`] is the
//! reference's behaviour: the whole source's token list is cut at the end,
//! which on long inputs removes `"\nAnswer:"` and the option list's end.
//! (The reference's decoder-only path cuts prompt+label to
//! `max_source_len + max_target_len` and can cut the label; nlora keeps the
//! two budgets separate and never cuts a label: a label longer than
//! `max_target_len - 1` tokens is an error.)
use crate::error::{DataError, Result};
use crate::prompt::PromptedExample;

/// What the batching needs from a tokenizer: ids of a text, no special
/// tokens added. Implemented for [`tokenizers::Tokenizer`] (nlora-model's
/// tokenizer hands one out through `inner()`). Named apart from
/// `Tokenizer::encode` so that importing it shadows nothing.
pub trait PlainTokenizer {
    /// Token ids of `text` without special tokens (no BOS, no EOS).
    fn encode_plain(&self, text: &str) -> Result<Vec<u32>>;
}

impl PlainTokenizer for tokenizers::Tokenizer {
    fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        self.encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| DataError::Tokenizer(format!("cannot encode text: {e}")))
    }
}

impl<T: PlainTokenizer + ?Sized> PlainTokenizer for &T {
    fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        (**self).encode_plain(text)
    }
}

/// How a too-long source is shortened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Truncation {
    /// Drop sentence tokens from the end; instruction, options and
    /// `"\nAnswer:"` always survive (default).
    #[default]
    Sentence,
    /// Cut the end of the whole source's tokens (the reference code).
    SourceTail,
}

/// Length limits and truncation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Most source tokens: BOS + prompt (decoder-only) or prompt + EOS (T5).
    pub max_source_len: usize,
    /// Most target tokens: label + EOS.
    pub max_target_len: usize,
    /// How a too-long source is shortened.
    pub truncation: Truncation,
}

impl Default for BatchConfig {
    /// The reference scripts' limits: 512 source, 50 target tokens.
    fn default() -> Self {
        BatchConfig {
            max_source_len: 512,
            max_target_len: 50,
            truncation: Truncation::Sentence,
        }
    }
}

/// Special token ids of a decoder-only model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Prepended to every row when the model uses one.
    pub bos: Option<u32>,
    /// Appended after the label.
    pub eos: u32,
    /// Fills padding (masked out everywhere).
    pub pad: u32,
}

/// Special token ids of an encoder-decoder model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seq2SeqTokens {
    /// Appended to source and target.
    pub eos: u32,
    /// Fills padding.
    pub pad: u32,
    /// First decoder input (T5: the pad id).
    pub decoder_start: u32,
}

/// A prompted example in token ids, truncated to the budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedExample {
    /// The task it comes from.
    pub task: String,
    /// Prompt ids, no special tokens.
    pub prompt: Vec<u32>,
    /// Label ids, no special tokens.
    pub label: Vec<u32>,
    /// The label text (the reference answer for exact match).
    pub answer: String,
    /// How many prompt tokens truncation removed (0 when it fitted).
    pub truncated: usize,
}

/// Which end of a row the padding is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaddingSide {
    /// Real tokens first (training).
    Right,
    /// Real tokens last (generation).
    Left,
}

/// A decoder-only batch, row-major `[batch_size, seq_len]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecoderBatch {
    /// Rows.
    pub batch_size: usize,
    /// Columns.
    pub seq_len: usize,
    /// Token ids (`pad` on padding).
    pub input_ids: Vec<u32>,
    /// 1 on real tokens, 0 on padding.
    pub attention_mask: Vec<u8>,
    /// 1 on the label and EOS tokens (targets of the loss), else 0; all 0
    /// in a generation batch.
    pub loss_mask: Vec<u8>,
    /// Position of each real token counted from the row's first real token;
    /// 0 on padding.
    pub position_ids: Vec<u32>,
    /// Where the padding is.
    pub padding: PaddingSide,
    /// Tokens of BOS + prompt per row.
    pub prompt_lens: Vec<usize>,
    /// Reference answers (label strings) per row, for exact match.
    pub answers: Vec<String>,
    /// Task per row.
    pub tasks: Vec<String>,
}

impl DecoderBatch {
    /// Hugging Face style `labels`, aligned with `input_ids`: the token id
    /// where `loss_mask` is 1, `ignore_index` (PyTorch: -100) elsewhere. The
    /// model shifts them (logits at t - 1 predict labels at t).
    pub fn loss_labels(&self, ignore_index: i64) -> Vec<i64> {
        masked_labels(&self.input_ids, &self.loss_mask, ignore_index)
    }

    /// Row `i` of `input_ids`.
    pub fn row(&self, i: usize) -> &[u32] {
        &self.input_ids[i * self.seq_len..(i + 1) * self.seq_len]
    }

    /// Row `i` of `loss_mask`.
    pub fn loss_row(&self, i: usize) -> &[u8] {
        &self.loss_mask[i * self.seq_len..(i + 1) * self.seq_len]
    }

    /// Row `i` of `attention_mask`.
    pub fn attention_row(&self, i: usize) -> &[u8] {
        &self.attention_mask[i * self.seq_len..(i + 1) * self.seq_len]
    }
}

/// An encoder-decoder batch, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seq2SeqBatch {
    /// Rows.
    pub batch_size: usize,
    /// Columns of the source arrays.
    pub source_len: usize,
    /// Columns of the target arrays.
    pub target_len: usize,
    /// `prompt + EOS`, right-padded.
    pub input_ids: Vec<u32>,
    /// 1 on real source tokens.
    pub attention_mask: Vec<u8>,
    /// `label + EOS`, right-padded with `pad`.
    pub target_ids: Vec<u32>,
    /// 1 on real target tokens (the loss positions).
    pub target_mask: Vec<u8>,
    /// `decoder_start + target_ids[..-1]`, right-padded with `pad`.
    pub decoder_input_ids: Vec<u32>,
    /// Reference answers (label strings) per row, for exact match.
    pub answers: Vec<String>,
    /// Task per row.
    pub tasks: Vec<String>,
}

impl Seq2SeqBatch {
    /// Hugging Face style `labels` `[batch_size, target_len]`: target ids,
    /// `ignore_index` (PyTorch: -100) on padding.
    pub fn loss_labels(&self, ignore_index: i64) -> Vec<i64> {
        masked_labels(&self.target_ids, &self.target_mask, ignore_index)
    }
}

fn masked_labels(ids: &[u32], mask: &[u8], ignore_index: i64) -> Vec<i64> {
    ids.iter()
        .zip(mask)
        .map(|(&id, &m)| if m == 1 { i64::from(id) } else { ignore_index })
        .collect()
}

/// Prompt ids within `budget` tokens, and how many were dropped.
fn encode_prompt<T: PlainTokenizer + ?Sized>(
    tokenizer: &T,
    example: &PromptedExample,
    budget: usize,
    truncation: Truncation,
) -> Result<(Vec<u32>, usize)> {
    let whole = tokenizer.encode_plain(&example.text)?;
    if whole.len() <= budget {
        return Ok((whole, 0));
    }
    match truncation {
        Truncation::SourceTail => Ok((whole[..budget].to_vec(), whole.len() - budget)),
        Truncation::Sentence => {
            let mut ids = tokenizer.encode_plain(example.head())?;
            let sentence = tokenizer.encode_plain(example.sentence_text())?;
            let tail = tokenizer.encode_plain(example.tail())?;
            let fixed = ids.len() + tail.len();
            if fixed >= budget {
                return Err(DataError::Tokenizer(format!(
                    "task {}: the prompt's fixed parts (prefix, instruction, options, \"\\nAnswer:\") \
                     take {fixed} tokens, leaving none of the {budget}-token prompt budget for the \
                     sentence; raise max_source_len",
                    example.task
                )));
            }
            let keep = (budget - fixed).min(sentence.len());
            ids.extend_from_slice(&sentence[..keep]);
            ids.extend_from_slice(&tail);
            Ok((ids, sentence.len() - keep))
        }
    }
}

fn encode_label<T: PlainTokenizer + ?Sized>(
    tokenizer: &T,
    example: &PromptedExample,
    max_target_len: usize,
) -> Result<Vec<u32>> {
    let label = tokenizer.encode_plain(&example.label)?;
    if label.is_empty() {
        return Err(DataError::Tokenizer(format!(
            "task {}: label {:?} encodes to no tokens",
            example.task, example.label
        )));
    }
    if label.len() + 1 > max_target_len {
        return Err(DataError::Tokenizer(format!(
            "task {}: label {:?} is {} tokens, more than max_target_len {} minus the EOS; \
             raise max_target_len",
            example.task,
            example.label,
            label.len(),
            max_target_len
        )));
    }
    Ok(label)
}

fn collect<'a>(
    items: impl IntoIterator<Item = &'a EncodedExample>,
) -> Result<Vec<&'a EncodedExample>> {
    let items: Vec<_> = items.into_iter().collect();
    if items.is_empty() {
        return Err(DataError::Tokenizer("cannot build an empty batch".into()));
    }
    Ok(items)
}

/// Builds decoder-only batches.
#[derive(Debug, Clone, Copy)]
pub struct DecoderBatcher<'t, T: ?Sized> {
    tokenizer: &'t T,
    special: SpecialTokens,
    config: BatchConfig,
}

impl<'t, T: PlainTokenizer + ?Sized> DecoderBatcher<'t, T> {
    /// A batcher with the model's special ids and the limits.
    pub fn new(tokenizer: &'t T, special: SpecialTokens, config: BatchConfig) -> Self {
        DecoderBatcher {
            tokenizer,
            special,
            config,
        }
    }

    /// The tokenizer it encodes with.
    pub fn tokenizer(&self) -> &'t T {
        self.tokenizer
    }

    /// The limits.
    pub fn config(&self) -> &BatchConfig {
        &self.config
    }

    /// Tokenise and truncate one example (BOS counts against the source budget).
    pub fn encode(&self, example: &PromptedExample) -> Result<EncodedExample> {
        let bos = usize::from(self.special.bos.is_some());
        if self.config.max_source_len <= bos {
            return Err(DataError::Tokenizer(format!(
                "max_source_len {} leaves no room for a prompt",
                self.config.max_source_len
            )));
        }
        let (prompt, truncated) = encode_prompt(
            self.tokenizer,
            example,
            self.config.max_source_len - bos,
            self.config.truncation,
        )?;
        let label = encode_label(self.tokenizer, example, self.config.max_target_len)?;
        Ok(EncodedExample {
            task: example.task.clone(),
            prompt,
            label,
            answer: example.label.clone(),
            truncated,
        })
    }

    /// Training batch: `BOS + prompt + label + EOS`, right-padded, loss on
    /// label + EOS.
    pub fn train_batch<'a>(
        &self,
        items: impl IntoIterator<Item = &'a EncodedExample>,
    ) -> Result<DecoderBatch> {
        let items = collect(items)?;
        let rows: Vec<(Vec<u32>, usize)> = items
            .iter()
            .map(|e| {
                let mut row: Vec<u32> = self.special.bos.into_iter().collect();
                row.extend_from_slice(&e.prompt);
                let prompt_len = row.len();
                row.extend_from_slice(&e.label);
                row.push(self.special.eos);
                (row, prompt_len)
            })
            .collect();
        Ok(self.assemble(&items, rows, PaddingSide::Right, true))
    }

    /// Generation batch: `BOS + prompt`, left-padded.
    pub fn generation_batch<'a>(
        &self,
        items: impl IntoIterator<Item = &'a EncodedExample>,
    ) -> Result<DecoderBatch> {
        let items = collect(items)?;
        let rows: Vec<(Vec<u32>, usize)> = items
            .iter()
            .map(|e| {
                let mut row: Vec<u32> = self.special.bos.into_iter().collect();
                row.extend_from_slice(&e.prompt);
                let n = row.len();
                (row, n)
            })
            .collect();
        Ok(self.assemble(&items, rows, PaddingSide::Left, false))
    }

    fn assemble(
        &self,
        items: &[&EncodedExample],
        rows: Vec<(Vec<u32>, usize)>,
        padding: PaddingSide,
        with_loss: bool,
    ) -> DecoderBatch {
        let batch_size = rows.len();
        let seq_len = rows.iter().map(|(r, _)| r.len()).max().unwrap_or(0);
        let cells = batch_size * seq_len;
        let mut input_ids = vec![self.special.pad; cells];
        let mut attention_mask = vec![0u8; cells];
        let mut loss_mask = vec![0u8; cells];
        let mut position_ids = vec![0u32; cells];
        let mut prompt_lens = Vec::with_capacity(batch_size);
        for (b, (row, prompt_len)) in rows.iter().enumerate() {
            let offset = match padding {
                PaddingSide::Right => 0,
                PaddingSide::Left => seq_len - row.len(),
            };
            for (t, &id) in row.iter().enumerate() {
                let cell = b * seq_len + offset + t;
                input_ids[cell] = id;
                attention_mask[cell] = 1;
                position_ids[cell] = t as u32;
                if with_loss && t >= *prompt_len {
                    loss_mask[cell] = 1;
                }
            }
            prompt_lens.push(*prompt_len);
        }
        DecoderBatch {
            batch_size,
            seq_len,
            input_ids,
            attention_mask,
            loss_mask,
            position_ids,
            padding,
            prompt_lens,
            answers: items.iter().map(|e| e.answer.clone()).collect(),
            tasks: items.iter().map(|e| e.task.clone()).collect(),
        }
    }
}

/// Builds encoder-decoder batches.
#[derive(Debug, Clone, Copy)]
pub struct Seq2SeqBatcher<'t, T: ?Sized> {
    tokenizer: &'t T,
    special: Seq2SeqTokens,
    config: BatchConfig,
}

impl<'t, T: PlainTokenizer + ?Sized> Seq2SeqBatcher<'t, T> {
    /// A batcher with the model's special ids and the limits.
    pub fn new(tokenizer: &'t T, special: Seq2SeqTokens, config: BatchConfig) -> Self {
        Seq2SeqBatcher {
            tokenizer,
            special,
            config,
        }
    }

    /// The tokenizer it encodes with.
    pub fn tokenizer(&self) -> &'t T {
        self.tokenizer
    }

    /// Tokenise and truncate one example (the source's EOS counts against
    /// the budget).
    pub fn encode(&self, example: &PromptedExample) -> Result<EncodedExample> {
        if self.config.max_source_len <= 1 {
            return Err(DataError::Tokenizer(format!(
                "max_source_len {} leaves no room for a prompt",
                self.config.max_source_len
            )));
        }
        let (prompt, truncated) = encode_prompt(
            self.tokenizer,
            example,
            self.config.max_source_len - 1,
            self.config.truncation,
        )?;
        let label = encode_label(self.tokenizer, example, self.config.max_target_len)?;
        Ok(EncodedExample {
            task: example.task.clone(),
            prompt,
            label,
            answer: example.label.clone(),
            truncated,
        })
    }

    /// Source, target and decoder inputs, all right-padded. The same batch
    /// serves generation (the model ignores the targets there).
    pub fn batch<'a>(
        &self,
        items: impl IntoIterator<Item = &'a EncodedExample>,
    ) -> Result<Seq2SeqBatch> {
        let items = collect(items)?;
        let Seq2SeqTokens {
            eos,
            pad,
            decoder_start,
        } = self.special;
        let batch_size = items.len();
        let source_len = items.iter().map(|e| e.prompt.len() + 1).max().unwrap_or(0);
        let target_len = items.iter().map(|e| e.label.len() + 1).max().unwrap_or(0);
        let mut input_ids = vec![pad; batch_size * source_len];
        let mut attention_mask = vec![0u8; batch_size * source_len];
        let mut target_ids = vec![pad; batch_size * target_len];
        let mut target_mask = vec![0u8; batch_size * target_len];
        let mut decoder_input_ids = vec![pad; batch_size * target_len];
        for (b, e) in items.iter().enumerate() {
            let source = e.prompt.iter().copied().chain([eos]);
            for (t, id) in source.enumerate() {
                input_ids[b * source_len + t] = id;
                attention_mask[b * source_len + t] = 1;
            }
            let target: Vec<u32> = e.label.iter().copied().chain([eos]).collect();
            for (t, &id) in target.iter().enumerate() {
                target_ids[b * target_len + t] = id;
                target_mask[b * target_len + t] = 1;
                decoder_input_ids[b * target_len + t] =
                    if t == 0 { decoder_start } else { target[t - 1] };
            }
        }
        Ok(Seq2SeqBatch {
            batch_size,
            source_len,
            target_len,
            input_ids,
            attention_mask,
            target_ids,
            target_mask,
            decoder_input_ids,
            answers: items.iter().map(|e| e.answer.clone()).collect(),
            tasks: items.iter().map(|e| e.task.clone()).collect(),
        })
    }
}
