//! `nlora data export`: the data of a run exactly as the engine uses it, for
//! another framework to replay (bench/pytorch_run.py). Every value comes from
//! the engine's own functions (stream loading, the trainer's batch order, the
//! model's batch builder, the evaluation's decoding settings), so the export
//! cannot drift from a run.
//!
//! Files written into `--out` (each atomically):
//! * `settings.json`: what the other side must mirror (LoRA, penalty,
//!   optimizer, batches, evaluation), the resolved config and the file list;
//! * `train-stage-K.jsonl` (K from 1): one line per training batch in
//!   training order (epoch by epoch, after the seeded shuffle), with the
//!   batch's `input_ids`, `attention_mask` and `labels` (-100 off the
//!   answer) as the model receives them;
//! * `eval-task-J.jsonl` (J from 1): one line per evaluation example in
//!   evaluation order, with the generation prompt's ids (BOS + prompt, after
//!   truncation) and the reference answer;
//! * `tokenizer.json`: the model's tokenizer as nlora reads it (to decode
//!   generations identically).
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use nlora_model::load::load_any_model;
use nlora_model::tokenizer::TextTokenizer;
use nlora_train::arch::Batching;
use nlora_train::config::{L1Form, MethodName};
use nlora_train::engine::default_model_path;
use nlora_train::eval::{generate_options, EvalOptions};
use nlora_train::optim::AdamWParams;
use nlora_train::presets::preset;
use nlora_train::rundir::{atomic_write, write_json};
use nlora_train::stream::{batch_config, load_stream, task_names};
use nlora_train::trainer::stage_batches;
use nlora_train::{method, RunConfig};
use serde_json::{json, Value};

/// Version of the files' layout; bumped when a field changes meaning.
pub const EXPORT_FORMAT: u32 = 1;

#[derive(Args)]
pub struct ExportArgs {
    /// A TOML run configuration (as for `nlora run --config`).
    #[arg(long, conflicts_with = "preset", required_unless_present = "preset")]
    config: Option<PathBuf>,
    /// A named preset instead of a config (see `nlora presets`).
    #[arg(long)]
    preset: Option<String>,
    /// The method (overrides the config's; default with --preset: nlora).
    #[arg(long)]
    method: Option<String>,
    /// The model whose tokenizer and special tokens the run uses
    /// (default: the config's, then $NLORA_MODEL, then the fetch-model cache).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The benchmark folder (default: the config's, then $NLORA_DATA, then ../shared/cl_benchmark).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Seed of every random stream (overrides the config's).
    #[arg(long)]
    seed: Option<u64>,
    /// Where to write the files.
    #[arg(long)]
    out: PathBuf,
}

pub fn export(args: ExportArgs) -> Result<()> {
    let cfg = config(&args)?;
    let data_dir =
        nlora_data::resolve_data_dir(args.data_dir.as_deref().or(cfg.data.dir.as_deref()))?;
    let names = task_names(&cfg, &data_dir)?;
    cfg.validate(names.len())?;
    if cfg.method.name == MethodName::Replay {
        bail!(
            "method `replay` mixes memory examples into its batches once it has trained a task: \
             its batches depend on the training and cannot be exported beforehand"
        );
    }
    let model_path = cfg.model.path.clone().unwrap_or_else(default_model_path);
    if !model_path.exists() {
        bail!(
            "model {} not found: run scripts/fetch-model.sh, set NLORA_MODEL, or give --model",
            model_path.display()
        );
    }
    let dtype = cfg.model.base_dtype().map_err(anyhow::Error::msg)?;
    // The model decides the batching (decoder-only or not) and supplies
    // special tokens the tokenizer may lack, as in `nlora run`.
    let device = Device::Cpu;
    let model = load_any_model(&model_path, dtype, &device)
        .with_context(|| format!("cannot load {}", model_path.display()))?;
    let tokenizer = TextTokenizer::from_path(&model_path)?;
    let batching = Batching::for_model(&model, &tokenizer, batch_config(&cfg))?;
    let special = match &batching {
        Batching::Decoder { special, .. } => *special,
        Batching::Seq2Seq { .. } => bail!(
            "{} is an encoder-decoder model: the export covers decoder-only models (LLaMA family)",
            model_path.display()
        ),
    };
    let stream = load_stream(&cfg, &data_dir, &batching)?;
    let lora = nlora_adapter::LoraConfig {
        r: cfg.model.r,
        alpha: cfg.model.alpha,
        dropout: cfg.model.dropout as f32,
        target_modules: cfg.model.target_modules.clone(),
    };
    let method = method::build(&cfg.method, &lora)?;
    let stages = method.stages(stream.tasks.len());
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;

    let mut train_files = Vec::new();
    for (s, stage_tasks) in stages.iter().enumerate() {
        let examples: Vec<&nlora_data::EncodedExample> = stage_tasks
            .iter()
            .flat_map(|&t| stream.tasks[t].train.iter())
            .collect();
        let epochs = cfg.train.epochs.get(s);
        let batches = stage_batches(
            method.as_ref(),
            &examples,
            cfg.train.batch_size,
            epochs,
            cfg.seed,
            s,
        );
        let per_epoch = batches.len() / epochs.max(1);
        let mut text = String::new();
        for (i, items) in batches.iter().enumerate() {
            let (batch, tokens) = batching.lm_batch(items, &device)?;
            let line = json!({
                "stage": s,
                "epoch": i / per_epoch.max(1),
                "batch": i,
                "tokens": tokens,
                "input_ids": batch.input_ids.to_vec2::<u32>()?,
                "attention_mask": batch.attention_mask.to_vec2::<u32>()?,
                "labels": batch.labels.to_vec2::<i64>()?,
                "examples": items
                    .iter()
                    .map(|e| example_json(e, &tokenizer))
                    .collect::<Result<Vec<_>>>()?,
            });
            text.push_str(&serde_json::to_string(&line)?);
            text.push('\n');
        }
        let file = format!("train-stage-{}.jsonl", s + 1);
        atomic_write(&args.out.join(&file), text.as_bytes())?;
        train_files.push(json!({
            "stage": s,
            "tasks": stage_tasks.iter().map(|&t| stream.tasks[t].name.clone()).collect::<Vec<_>>(),
            "file": file,
            "batches": batches.len(),
            "epochs": epochs,
            "lr": cfg.train.lr.get(s),
            "lambda": if cfg.method.name.uses_l1() { Some(cfg.method.lambda_for(s)) } else { None },
        }));
    }

    let eval_opts = EvalOptions::from_config(&cfg);
    let mut eval_files = Vec::new();
    for (j, task) in stream.tasks.iter().enumerate() {
        let gen = generate_options(task, &batching, &eval_opts);
        let mut text = String::new();
        for (i, e) in task.eval.iter().enumerate() {
            let mut line = example_json(e, &tokenizer)?;
            line["index"] = json!(i);
            line["prompt_ids"] = json!(batching.prompt(e));
            text.push_str(&serde_json::to_string(&line)?);
            text.push('\n');
        }
        let file = format!("eval-task-{}.jsonl", j + 1);
        atomic_write(&args.out.join(&file), text.as_bytes())?;
        eval_files.push(json!({
            "task": task.name,
            "file": file,
            "examples": task.eval.len(),
            "labels": task.labels,
            "max_new_tokens": gen.max_new_tokens,
            "eos_token_ids": gen.eos_token_ids,
            "pad_token_id": gen.pad_token_id,
        }));
    }

    // The tokenizer itself, so the other side decodes generations exactly as nlora does.
    tokenizer.save_tokenizer_json(args.out.join("tokenizer.json"))?;
    let data_dir = data_dir.canonicalize().unwrap_or(data_dir);
    let settings = settings_json(
        &cfg,
        &model_path,
        &data_dir,
        special,
        train_files,
        eval_files,
    );
    write_json(&args.out.join("settings.json"), &settings)?;
    println!(
        "exported {} stage(s), {} task(s) into {}",
        stages.len(),
        stream.tasks.len(),
        args.out.display()
    );
    Ok(())
}

/// The run's config: a file or a preset, with the command line's overrides
/// (as `nlora run` reads them).
fn config(args: &ExportArgs) -> Result<RunConfig> {
    let method = args.method.as_deref().map(MethodName::parse).transpose()?;
    let mut cfg = match (&args.config, &args.preset) {
        (Some(path), _) => RunConfig::from_toml_file(path)?,
        (None, Some(name)) => preset(name, method.unwrap_or(MethodName::NLora), L1Form::Dw)?,
        (None, None) => bail!("give --config FILE or --preset NAME (see `nlora presets`)"),
    };
    if let Some(m) = method {
        cfg.method.name = m;
    }
    if let Some(m) = &args.model {
        cfg.model.path = Some(m.clone());
    }
    if let Some(s) = args.seed {
        cfg.seed = s;
    }
    Ok(cfg)
}

fn example_json(e: &nlora_data::EncodedExample, tokenizer: &TextTokenizer) -> Result<Value> {
    Ok(json!({
        "task": e.task,
        // The prompt as the model sees it (after truncation); the ids are authoritative.
        "prompt": tokenizer.decode(&e.prompt, false)?,
        "answer": e.answer,
        "truncated_tokens": e.truncated,
    }))
}

fn settings_json(
    cfg: &RunConfig,
    model_path: &Path,
    data_dir: &Path,
    special: nlora_data::SpecialTokens,
    train_files: Vec<Value>,
    eval_files: Vec<Value>,
) -> Value {
    let adam = AdamWParams::default();
    let m = &cfg.method;
    json!({
        "format": EXPORT_FORMAT,
        "nlora_version": env!("CARGO_PKG_VERSION"),
        "model": model_path,
        "data_dir": data_dir,
        "seed": cfg.seed,
        "method": m.name.as_str(),
        "history": m.history,
        "tasks": eval_files.iter().map(|f| f["task"].clone()).collect::<Vec<_>>(),
        "lora": {
            "r": cfg.model.r,
            "alpha": cfg.model.alpha,
            "scale": cfg.model.alpha / cfg.model.r as f64,
            "dropout": cfg.model.dropout,
            "target_modules": cfg.model.target_modules,
            "init": "A ~ U(-1/sqrt(in_features), 1/sqrt(in_features)) (PEFT's kaiming-uniform, a = sqrt(5)), B = 0; a fresh adapter per stage, earlier ones frozen and applied",
        },
        "penalty": {
            "l1": m.name.uses_l1(),
            "l1_form": m.l1_form,
            "l1_scaled": m.l1_scaled,
            "auto_lambda": m.auto_lambda.is_some(),
            "definition": "dw: lambda * SUM over adapted sites of SUM |B A| (times alpha / r when l1_scaled), added to the batch loss",
            "orthogonality": m.name.uses_orthogonality(),
        },
        "optimizer": {
            "name": "adamw",
            "beta1": adam.beta1,
            "beta2": adam.beta2,
            "eps": adam.eps,
            "weight_decay": cfg.train.weight_decay,
            "schedule": cfg.train.schedule,
            "warmup_steps": cfg.train.warmup_steps,
            "grad_accum": cfg.train.grad_accum,
            "clip_grad_norm": cfg.train.clip_grad_norm,
            "fresh_per_stage": true,
        },
        "train": {
            "batch_size": cfg.train.batch_size,
            "loss": "mean cross-entropy over the positions whose label is not -100 (logits at t - 1 predict the token at t); labels cover the answer and its EOS",
            "padding": "right",
            "stages": train_files,
        },
        "tokens": {
            "bos": special.bos,
            "eos": special.eos,
            "pad": special.pad,
        },
        "eval": {
            "batch_size": cfg.eval.batch_size,
            "rank_classification": cfg.eval.rank_classification,
            "when": "after every stage, every task of the stream in order (the T x T accuracy matrix)",
            "generation": "greedy from prompt_ids, left-padded, KV cache; a row stops at EOS (not part of the output), all stop at max_new_tokens",
            "scoring": "exact match of the decoded new tokens (special tokens skipped) and the answer after normalize_answer: lower-case, ASCII punctuation removed, whitespace collapsed (articles kept)",
            "tasks": eval_files,
        },
        "config": cfg,
    })
}
