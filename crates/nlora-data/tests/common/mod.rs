//! Shared by the integration tests: the real benchmark's location, scratch
//! copies of a task, and a small byte-level BPE tokenizer trained here.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};

use nlora_data::tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use nlora_data::tokenizers::models::TrainerWrapper;
use nlora_data::tokenizers::pre_tokenizers::byte_level::ByteLevel;
use nlora_data::tokenizers::{AddedToken, Tokenizer};
use nlora_data::Benchmark;

/// The real CL benchmark: $NLORA_DATA, else ../shared/cl_benchmark beside
/// the repository root. Fails (never skips) when absent.
pub fn data_dir() -> PathBuf {
    let dir = match std::env::var_os("NLORA_DATA").filter(|v| !v.is_empty()) {
        Some(v) => PathBuf::from(v),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/cl_benchmark"),
    };
    assert!(
        dir.join("instruction_config.json").is_file(),
        "CL benchmark not found at {}: set NLORA_DATA to the CL_Benchmark folder \
         (these tests need the real data)",
        dir.display()
    );
    dir
}

pub fn benchmark() -> Benchmark {
    Benchmark::open(data_dir()).expect("the real benchmark opens")
}

/// A scratch benchmark holding the instruction file and a copy of the
/// real task `<type>/<name>`; returns (tempdir guard, root).
pub fn scratch_with_task(task_type: &str, name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("bench");
    let src = data_dir();
    std::fs::create_dir_all(root.join(task_type).join(name)).unwrap();
    std::fs::copy(
        src.join("instruction_config.json"),
        root.join("instruction_config.json"),
    )
    .unwrap();
    for f in ["labels.json", "train.json", "dev.json", "test.json"] {
        std::fs::copy(
            src.join(task_type).join(name).join(f),
            root.join(task_type).join(name).join(f),
        )
        .unwrap();
    }
    (tmp, root)
}

pub const EOS: &str = "<|endoftext|>";
pub const BOS: &str = "<|im_start|>";
pub const PAD: &str = "<pad>";

/// A byte-level BPE (GPT-2 / SmolLM2 style: byte alphabet, no prefix
/// space) trained on `texts`, with BOS/EOS/PAD special tokens.
pub fn train_bpe(texts: &[String], vocab_size: usize) -> Tokenizer {
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(vec![
            AddedToken::from(EOS, true),
            AddedToken::from(BOS, true),
            AddedToken::from(PAD, true),
        ])
        .build();
    let mut trainer: TrainerWrapper = trainer.into();
    tokenizer
        .train(&mut trainer, texts.iter())
        .expect("BPE training");
    tokenizer
}
