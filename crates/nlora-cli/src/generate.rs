//! `nlora generate`: greedy continuation of a prompt by a base model (GGUF file or Hugging
//! Face folder), a quick check that a checkpoint loads and behaves.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use nlora_model::tokenizer::TextTokenizer;
use nlora_model::{load_any_model, GenerateOptions, LanguageModel};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A `.gguf` file or a Hugging Face model folder (config.json, model.safetensors,
    /// tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// The text to continue (no template is applied).
    #[arg(long)]
    pub prompt: String,
    /// Most tokens to generate; generation also stops at the model's EOS.
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
}

pub fn generate(args: GenerateArgs) -> Result<()> {
    if args.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    let device = Device::Cpu;
    let start = Instant::now();
    // The model first: its loader says best what is wrong with a path.
    let model = load_any_model(&args.model, candle_core::DType::F32, &device)
        .with_context(|| format!("loading the model {}", args.model.display()))?;
    let model_secs = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let tokenizer = TextTokenizer::from_path(&args.model)
        .with_context(|| format!("loading the tokenizer of {}", args.model.display()))?;
    eprintln!(
        "loaded {}: model {model_secs:.2} s, tokenizer {:.2} s",
        args.model.display(),
        start.elapsed().as_secs_f64()
    );

    let prompt = tokenizer.encode(&args.prompt)?;
    if prompt.is_empty() {
        bail!("the prompt is empty after tokenisation; give some text");
    }
    let eos = tokenizer
        .eos_id()
        .or(model.eos_token_id())
        .context("the model names no EOS token (tokenizer or config)")?;
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        eos_token_ids: vec![eos],
        pad_token_id: tokenizer.pad_id().unwrap_or(eos),
    };
    let start = Instant::now();
    let new = model
        .generate(std::slice::from_ref(&prompt), &opts)?
        .pop()
        .unwrap_or_default();
    let secs = start.elapsed().as_secs_f64();
    println!("{}", tokenizer.decode(&new, false)?);
    eprintln!(
        "{} prompt tokens, {} new tokens in {secs:.2} s ({:.1} tokens/s)",
        prompt.len(),
        new.len(),
        new.len() as f64 / secs.max(1e-9)
    );
    Ok(())
}
