//! `nlora generate`: greedy continuation of a prompt by a base model (GGUF file or Hugging
//! Face folder), a quick check that a checkpoint loads and behaves.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
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
    /// A PEFT adapter folder (e.g. a run's task-K-NAME) applied on the base
    /// model; repeat it to stack several, in order (an IncLoRA-style history).
    #[arg(long)]
    pub adapter: Vec<PathBuf>,
    /// Also write the logits at the prompt's last position to this JSON file
    /// (for parity checks against Python PEFT: scripts/peft_interop.py).
    #[arg(long)]
    pub logits_out: Option<PathBuf>,
    #[command(flatten)]
    pub device: crate::device::DeviceArgs,
}

pub fn generate(args: GenerateArgs) -> Result<()> {
    if args.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    let (device, dtype) = args.device.open()?;
    let start = Instant::now();
    // The model first: its loader says best what is wrong with a path.
    let mut model = load_any_model(&args.model, dtype, &device)
        .with_context(|| format!("loading the model {}", args.model.display()))?;
    for dir in &args.adapter {
        let adapter = nlora_adapter::PeftAdapter::load(dir, &device)
            .with_context(|| format!("loading the adapter {}", dir.display()))?;
        model
            .adapter_sites_mut()
            .push_history_from_peft(&adapter)
            .with_context(|| format!("applying the adapter {}", dir.display()))?;
    }
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
    if let Some(path) = &args.logits_out {
        let n = prompt.len();
        let batch = nlora_model::LmBatch::new(
            candle_core::Tensor::from_vec(prompt.clone(), (1, n), &device)?,
            candle_core::Tensor::ones((1, n), candle_core::DType::U32, &device)?,
            candle_core::Tensor::full(nlora_model::IGNORE_INDEX, (1, n), &device)?,
        )?;
        let logits = model.forward_logits(&batch, nlora_adapter::ForwardMode::Inference)?;
        let last: Vec<f32> = logits.get(0)?.get(n - 1)?.to_vec1()?;
        let json = serde_json::json!({ "prompt_ids": prompt, "last_logits": last });
        std::fs::write(path, json.to_string())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
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
