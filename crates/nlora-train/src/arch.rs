//! What differs between a decoder-only and an encoder-decoder model in a run:
//! how a prompted example becomes tokens, a training batch and a generation
//! prompt. Everything else in the engine (methods, penalties, evaluation,
//! the run directory) sees only [`LanguageModel`] and this type.
use candle_core::{Device, Tensor};
use nlora_data::{
    BatchConfig, DecoderBatcher, EncodedExample, PlainTokenizer, PromptedExample, Seq2SeqBatcher,
    Seq2SeqTokens, SpecialTokens,
};
use nlora_model::lm::{LmBatch, IGNORE_INDEX};
use nlora_model::load::AnyModel;
use nlora_model::tokenizer::TextTokenizer;

use crate::error::{Result, TrainError};

/// The batching of one model architecture.
pub enum Batching<'t> {
    /// LLaMA family: prompt and label in one row, loss on the label.
    Decoder {
        batcher: DecoderBatcher<'t, dyn PlainTokenizer + 't>,
        special: SpecialTokens,
    },
    /// T5: the prompt is the encoder's source, the label the decoder's target.
    Seq2Seq {
        batcher: Seq2SeqBatcher<'t, dyn PlainTokenizer + 't>,
        special: Seq2SeqTokens,
    },
}

impl<'t> Batching<'t> {
    /// The batching `model` needs, with special ids from the model's config
    /// where it has them (T5), else from the tokenizer.
    pub fn for_model(
        model: &AnyModel,
        tokenizer: &'t TextTokenizer,
        config: BatchConfig,
    ) -> Result<Self> {
        let view: &'t (dyn PlainTokenizer + 't) = tokenizer.inner();
        match model {
            AnyModel::T5(t5) => {
                let c = t5.config();
                let special = Seq2SeqTokens {
                    eos: c.eos_id(),
                    pad: c.pad_id(),
                    decoder_start: c.decoder_start_id(),
                };
                Ok(Batching::Seq2Seq {
                    batcher: Seq2SeqBatcher::new(view, special, config),
                    special,
                })
            }
            AnyModel::Llama(_) => {
                let eos = tokenizer.eos_id().or(model.eos_token_id()).ok_or_else(|| {
                    TrainError::Other(format!(
                        "tokenizer {} has no EOS token: the label's end cannot be learned",
                        tokenizer.source().display()
                    ))
                })?;
                let special = SpecialTokens {
                    bos: if tokenizer.add_bos() {
                        tokenizer.bos_id()
                    } else {
                        None
                    },
                    eos,
                    pad: tokenizer.pad_id().unwrap_or(eos),
                };
                Ok(Batching::Decoder {
                    batcher: DecoderBatcher::new(view, special, config),
                    special,
                })
            }
        }
    }

    /// Tokenises and truncates one example.
    pub fn encode(&self, example: &PromptedExample) -> Result<EncodedExample> {
        Ok(match self {
            Batching::Decoder { batcher, .. } => batcher.encode(example)?,
            Batching::Seq2Seq { batcher, .. } => batcher.encode(example)?,
        })
    }

    /// A label's token ids, no special tokens (rank classification).
    pub fn encode_label(&self, label: &str) -> Result<Vec<u32>> {
        let view = match self {
            Batching::Decoder { batcher, .. } => batcher.tokenizer(),
            Batching::Seq2Seq { batcher, .. } => batcher.tokenizer(),
        };
        Ok(view.encode_plain(label)?)
    }

    /// The model's training batch (labels only on the label tokens and EOS)
    /// and the number of real tokens in it.
    pub fn lm_batch(&self, items: &[&EncodedExample], device: &Device) -> Result<(LmBatch, u64)> {
        let tensor_u32 = |v: Vec<u32>, shape: (usize, usize)| Tensor::from_vec(v, shape, device);
        match self {
            Batching::Decoder { batcher, .. } => {
                let b = batcher.train_batch(items.iter().copied())?;
                let labels = b.loss_labels(IGNORE_INDEX);
                let mask: Vec<u32> = b.attention_mask.iter().map(|&m| u32::from(m)).collect();
                let tokens = mask.iter().map(|&m| u64::from(m)).sum();
                let shape = (b.batch_size, b.seq_len);
                let batch = LmBatch::new(
                    tensor_u32(b.input_ids, shape)?,
                    tensor_u32(mask, shape)?,
                    Tensor::from_vec(labels, shape, device)?,
                )?;
                Ok((batch, tokens))
            }
            Batching::Seq2Seq { batcher, .. } => {
                let b = batcher.batch(items.iter().copied())?;
                let labels = b.loss_labels(IGNORE_INDEX);
                let mask: Vec<u32> = b.attention_mask.iter().map(|&m| u32::from(m)).collect();
                let tokens = mask.iter().map(|&m| u64::from(m)).sum::<u64>()
                    + b.target_mask.iter().map(|&m| u64::from(m)).sum::<u64>();
                let source = (b.batch_size, b.source_len);
                let batch = LmBatch::new(
                    tensor_u32(b.input_ids, source)?,
                    tensor_u32(mask, source)?,
                    Tensor::from_vec(labels, (b.batch_size, b.target_len), device)?,
                )?;
                Ok((batch, tokens))
            }
        }
    }

    /// What generation and scoring start from: BOS + prompt for a decoder,
    /// prompt + EOS (as in training) for an encoder's source.
    pub fn prompt(&self, e: &EncodedExample) -> Vec<u32> {
        match self {
            Batching::Decoder { special, .. } => {
                let mut row: Vec<u32> = special.bos.into_iter().collect();
                row.extend_from_slice(&e.prompt);
                row
            }
            Batching::Seq2Seq { special, .. } => {
                let mut row = e.prompt.clone();
                row.push(special.eos);
                row
            }
        }
    }

    /// The token that ends a label.
    pub fn eos(&self) -> u32 {
        match self {
            Batching::Decoder { special, .. } => special.eos,
            Batching::Seq2Seq { special, .. } => special.eos,
        }
    }

    /// The padding token.
    pub fn pad(&self) -> u32 {
        match self {
            Batching::Decoder { special, .. } => special.pad,
            Batching::Seq2Seq { special, .. } => special.pad,
        }
    }

    /// PEFT's `task_type` for adapters of this model.
    pub fn peft_task_type(&self) -> &'static str {
        match self {
            Batching::Decoder { .. } => "CAUSAL_LM",
            Batching::Seq2Seq { .. } => "SEQ_2_SEQ_LM",
        }
    }
}
