//! The continual-learning benchmark of the N-LoRA paper (the CL_Benchmark
//! folder of O-LoRA / N-LoRA): tasks, instructions, task orders, seeded
//! sampling, prompts, tokenised batches and the exact-match metric.
//!
//! ```text
//! resolve_data_dir ─► Benchmark::open ─► resolve_order("order4") ─► Order (TaskInfo…)
//!                                    └─► Task::load ─► sample_task ─► SampledTask
//! PromptTemplate::for_task ─► apply(example) ─► PromptedExample
//! DecoderBatcher / Seq2SeqBatcher ─► encode ─► train_batch / generation_batch / batch
//! scoring::exact_match
//! ```
//!
//! * [`benchmark`]: the folder format, data-directory resolution
//!   (`--data-dir`, `$NLORA_DATA`, `../shared/cl_benchmark`), validation
//!   with errors naming file, record and problem.
//! * [`instructions`]: `instruction_config.json` (first zero-shot entry per type).
//! * [`prompt`]: the reference's prompt text, with the `Task:`/`Dataset:` prefix.
//! * [`orders`]: the paper's orders 1-6 (Table 7) and user lists.
//! * [`sampling`]: seeded, label-stratified subsets and the validation split.
//! * [`batch`]: decoder-only and encoder-decoder batches with label masks.
//! * [`scoring`]: normalised exact match.
//! * [`summary`]: statistics for `nlora data check`.
//!
//! # Never select on dev or test
//! In the distributed benchmark `dev.json` is byte-identical to
//! `test.json`. Hyperparameters (lambda, learning rate, epochs) are chosen
//! on a validation split carved out of `train.json` (seeded, stratified,
//! disjoint from the training examples: [`sampling::sample_task`]); nlora
//! reads dev.json only to validate and report it.
//!
//! # Differences from the reference code, each a named option
//! * Records labelled `"-"` (GLUE's "no gold label"; 131 in MNLI's test
//!   set) are left out by default; [`NoGoldLabel::Keep`] keeps them as the
//!   reference does.
//! * Too-long sources lose sentence tokens, never the instruction, options or
//!   `"\nAnswer:"`; [`Truncation::SourceTail`] cuts the source's end as the
//!   reference does.
//! * Subsets are seeded stratified samples; the reference takes the first
//!   `max_num_instances` records of each file.
//! * Decoder-only training rows are `BOS + prompt ids + label ids + EOS`,
//!   right-padded, the label tokenised on its own (REFERENCE.md). The
//!   reference collator left-pads and re-tokenises the joined string
//!   prompt + label, which can merge tokens across the boundary; its loss
//!   mask is then counted from the separate tokenisation. With SmolLM2's
//!   byte-level BPE both give the same ids (the label starts a new
//!   pre-token after `':'`; tested on every task); a SentencePiece
//!   tokenizer gives the separate label a leading `'▁'`.
pub mod batch;
pub mod benchmark;
pub mod error;
pub mod instructions;
pub mod orders;
pub mod prompt;
pub mod sampling;
pub mod scoring;
pub mod summary;

pub use batch::{
    BatchConfig, DecoderBatch, DecoderBatcher, EncodedExample, PaddingSide, PlainTokenizer,
    Seq2SeqBatch, Seq2SeqBatcher, Seq2SeqTokens, SpecialTokens, Truncation,
};
pub use benchmark::{
    resolve_data_dir, resolve_data_dir_with, Benchmark, Example, LoadOptions, NoGoldLabel, Split,
    Task, TaskInfo, TaskType, DATA_DIR_ENV, DEFAULT_DATA_DIR,
};
pub use error::{DataError, Result};
pub use instructions::Instructions;
pub use orders::{preset, Order, OrderPreset, PRESETS};
pub use prompt::{PromptStyle, PromptTemplate, PromptedExample, ANSWER_PREFIX};
pub use sampling::{sample_task, SampledTask, SamplingConfig};
pub use scoring::{exact_match, normalize_answer};
pub use summary::{summarize, SplitSummary, TaskSummary};
/// The tokenizers crate, re-exported so users build a [`PlainTokenizer`]
/// without a second dependency on it.
pub use tokenizers;
