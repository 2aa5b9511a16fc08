//! `nlora bench`: the hot paths of a continual-learning run, timed after a
//! warm-up on random token ids, with the keys bench/pytorch_reference.py
//! prints for the same workloads in PyTorch + PEFT (bench/compare.sh runs
//! both side by side):
//! (a) a LoRA training step (q_proj, v_proj, r 8, AdamW) with the causal-LM
//!     loss over all B x L positions; (b) the same step plus N-LoRA's l1
//!     penalty, computed as the engine does; (c) an inference forward with
//!     logits at every position; (d) greedy generation of a few tokens for a
//!     batch of prompts; (e) peak RSS; (f) the GEMM throughput at the
//!     MLP's shape, the ceiling for all of the above.
//!
//! `--device cuda --dtype bf16` measures on a GPU (each timing ends with a
//! device synchronisation); `--random-shape llama-7b` measures a randomly
//! initialised model of LLaMA-7B's shapes (`--layers N` keeps the first N
//! layers when the whole model does not fit or takes too long).
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use clap::Args;
use nlora_adapter::{profile, ForwardMode, LoraConfig};
use nlora_math::penalty::{nlora_l1, NLoraForm, Site};
use nlora_model::llama::{Llama, LlamaConfig};
use nlora_model::{load_model_as, GenerateOptions, LanguageModel, LmBatch};
use nlora_train::optim::{AdamW, AdamWParams};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The model (`.gguf` file or Hugging Face folder); default: the engine's
    /// (NLORA_MODEL, else ~/.cache/nlora/models/SmolLM2-135M-Instruct.Q4_1.gguf).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Rows per batch (training, forward, and generation prompts).
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per row for training and the forward.
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Worker threads (sets RAYON_NUM_THREADS); default: candle's choice, one per core.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Timed repetitions of each measurement (after the warm-up).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Untimed repetitions before each measurement.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Prompt length for the generation measurement.
    #[arg(long, default_value_t = 128)]
    pub gen_prompt: usize,
    /// New tokens per prompt for the generation measurement.
    #[arg(long, default_value_t = 8)]
    pub gen_tokens: usize,
    /// N-LoRA's lambda in (b) (its value does not change the cost).
    #[arg(long, default_value_t = 1e-4)]
    pub lambda: f64,
    /// One JSON object on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub device: crate::device::DeviceArgs,
    /// A randomly initialised model of a paper's shapes instead of --model:
    /// llama-7b (LLaMA-2-7B: hidden 4096, MLP 11008, 32 heads, vocab 32000)
    /// or smollm2-135m (SmolLM2-135M's shapes, no model file needed).
    #[arg(long, conflicts_with = "model")]
    pub random_shape: Option<String>,
    /// With --random-shape: keep this many decoder layers (default: all).
    #[arg(long, requires = "random_shape")]
    pub layers: Option<usize>,
    /// Also print where the wall time of (a), (b) and (c) goes, op by op
    /// (self time per step; "rest" rows are candle's own ops and graph work).
    #[arg(long)]
    pub profile: bool,
}

/// The config of a named paper shape.
fn random_shape_config(name: &str, layers: Option<usize>) -> Result<LlamaConfig> {
    let json = match name {
        "llama-7b" => serde_json::json!({
            "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
        }),
        "smollm2-135m" => serde_json::json!({
            "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
            "tie_word_embeddings": true,
        }),
        other => bail!(
            "--random-shape {other}: known shapes are llama-7b and smollm2-135m (T5-large's \
             is measured on the PyTorch side only: bench/pytorch_shapes.py)"
        ),
    };
    let mut cfg: LlamaConfig = serde_json::from_value(json)?;
    if let Some(n) = layers {
        if n == 0 || n > cfg.num_hidden_layers {
            bail!("--layers {n}: give 1..={}", cfg.num_hidden_layers);
        }
        cfg.num_hidden_layers = n;
    }
    Ok(cfg)
}

/// Peak resident set size of this process so far (VmHWM), MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// Random ids in `10..vocab` from a fixed seed (splitmix64; the values do not matter).
fn random_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (10 + z % (vocab as u64 - 10)) as u32
        })
        .collect()
}

/// Mean seconds per call of `f` after `warmup` untimed calls.
fn timed(warmup: usize, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let t0 = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    Ok(t0.elapsed().as_secs_f64() / reps as f64)
}

/// Floating-point operations of one forward token at context length `ctx`
/// (every linear layer, attention scores and mixing over `ctx` keys), and of
/// the matching training token (the backward costs the same again: inputs'
/// gradients only, the frozen weights get none; LoRA's r = 8 terms are
/// negligible and left out).
fn flops_per_token(m: &dyn LanguageModel, hidden: usize, layers: usize, ctx: usize) -> (f64, f64) {
    let linear: usize = m
        .adapter_sites()
        .iter()
        .map(|(_, s)| s.in_features() * s.out_features())
        .sum();
    let attention = 4 * layers * ctx * hidden;
    let fwd = 2.0 * linear as f64 + attention as f64;
    (fwd, 2.0 * fwd)
}

pub fn bench(args: BenchArgs) -> Result<()> {
    for (name, v) in [
        ("--batch", args.batch),
        ("--seq", args.seq),
        ("--steps", args.steps),
        ("--gen-prompt", args.gen_prompt),
        ("--gen-tokens", args.gen_tokens),
    ] {
        if v == 0 {
            bail!("{name} must be at least 1");
        }
    }
    if args.seq < 2 {
        bail!("--seq must be at least 2: the causal-LM loss needs a next token");
    }
    if let Some(n) = args.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        // Read by candle's matmul and thread pools on first use: set before any tensor work.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let threads = candle_core::utils::get_num_threads();
    let (device, dtype) = args.device.open()?;
    let load_start = Instant::now();
    let (mut model, model_name) = match &args.random_shape {
        Some(shape) => {
            let cfg = random_shape_config(shape, args.layers)?;
            let name = format!("random {shape} ({} layers)", cfg.num_hidden_layers);
            (Llama::random(cfg, dtype, &device)?, name)
        }
        None => {
            let path = args
                .model
                .clone()
                .unwrap_or_else(nlora_train::engine::default_model_path);
            if !path.exists() {
                bail!(
                    "model {} is missing: run scripts/fetch-model.sh (or pass --model / set NLORA_MODEL)",
                    path.display()
                );
            }
            let model = load_model_as(&path, dtype, &device)
                .with_context(|| format!("loading {}", path.display()))?;
            (model, path.display().to_string())
        }
    };
    let lora = LoraConfig::default(); // r 8, alpha 32, dropout 0.1 on q_proj, v_proj
    model.adapter_sites_mut().init_new_adapters(&lora, 0)?;
    let load_secs = load_start.elapsed().as_secs_f64();
    let cfg = model.config().clone();
    let (b, s) = (args.batch, args.seq);

    // (a), (b): labels = inputs, so every position but each row's first carries a loss.
    let ids = random_ids(b * s, cfg.vocab_size, 1);
    let rows: Vec<Vec<u32>> = ids.chunks(s).map(<[u32]>::to_vec).collect();
    let all = vec![vec![true; s]; b];
    let batch = LmBatch::causal_right_padded(&rows, &all, 0, &device)?;
    // GPU work is queued: a timing ends when the device has finished it
    let sync = || -> Result<()> { Ok(device.synchronize()?) };
    let named_vars: Vec<(String, candle_core::Var)> = model
        .adapter_sites()
        .adapted()
        .flat_map(|(p, site)| {
            let cur = site
                .current()
                .expect("adapted sites hold a current adapter");
            [
                (format!("{p}.lora_A"), cur.a().clone()),
                (format!("{p}.lora_B"), cur.b().clone()),
            ]
        })
        .collect();
    let mut opt = AdamW::new(
        named_vars,
        AdamWParams {
            lr: 5e-4,
            ..AdamWParams::default()
        },
    )?;
    let mut step = 0u64;
    let mut train_step = |penalty: bool| -> Result<()> {
        step += 1;
        let mode = ForwardMode::Train {
            dropout_seed: Some(step),
        };
        let mut loss = {
            let _p = profile::scope("forward: rest (candle ops)");
            model.loss(&batch, mode)?
        };
        if penalty {
            let _p = profile::scope("N-LoRA l1 (fwd)");
            // As the engine's N-LoRA (nlora-train method/inclora.rs): l1 of each site's dW.
            let sites = model.adapter_sites();
            let view: Vec<Site<'_>> = sites
                .adapted()
                .filter_map(|(p, site)| {
                    let cur = site.current()?;
                    Some(Site::new(cur.a().as_tensor(), cur.b().as_tensor()).named(p))
                })
                .collect();
            loss = (loss + nlora_l1(&view, args.lambda, NLoraForm::Update { scale: 1.0 })?)?;
        }
        let grads = {
            let _p = profile::scope("backward: rest (graph, candle ops)");
            loss.backward()?
        };
        let _p = profile::scope("AdamW");
        opt.step(&grads)?;
        sync()
    };
    let tokens = (b * s) as f64;
    // warm-up, then the timed steps, recorded op by op with --profile
    let mut measure = |penalty: bool| -> Result<(f64, Vec<profile::OpTime>)> {
        timed(args.warmup, 0, || train_step(penalty))?;
        profile::enable(args.profile);
        let t = timed(0, args.steps, || train_step(penalty));
        profile::enable(false);
        Ok((t?, profile::take()))
    };
    let (t_train, lora_profile) = measure(false)?;
    let (t_nlora, train_profile) = measure(true)?;
    let train_rss = peak_rss_mib();

    // (c) inference forward, logits at every position
    let mut forward = || {
        let _p = profile::scope("forward: rest (candle ops)");
        let logits = model.forward_logits(&batch, ForwardMode::Inference)?;
        std::hint::black_box(logits);
        sync()
    };
    timed(args.warmup, 0, &mut forward)?;
    profile::enable(args.profile);
    let t_fwd = timed(0, args.steps, &mut forward)?;
    profile::enable(false);
    let forward_profile = profile::take();

    // (d) greedy generation, no EOS: every row gets gen_tokens new tokens
    let prompt_ids = random_ids(b * args.gen_prompt, cfg.vocab_size, 2);
    let prompts: Vec<Vec<u32>> = prompt_ids
        .chunks(args.gen_prompt)
        .map(<[u32]>::to_vec)
        .collect();
    let gen_opts = GenerateOptions {
        max_new_tokens: args.gen_tokens,
        eos_token_ids: Vec::new(),
        pad_token_id: 0,
    };
    let t_gen = timed(args.warmup, args.steps.saturating_sub(1).max(1), || {
        let out = model.generate(&prompts, &gen_opts)?;
        if out.iter().any(|o| o.len() != args.gen_tokens) {
            bail!("generation stopped early");
        }
        Ok(())
    })?;

    // (f) GEMM throughput at the MLP's shape: the ceiling for everything above
    let (mm, mk, mn) = (b * s, cfg.hidden_size, cfg.intermediate_size);
    let x = Tensor::randn(0f32, 1.0, (mm, mk), &device)?.to_dtype(dtype)?;
    let w = Tensor::randn(0f32, 0.02, (mn, mk), &device)?.to_dtype(dtype)?;
    let t_mm = timed(2, 20, || {
        std::hint::black_box(nlora_adapter::frozen_matmul_t(&x, &w)?);
        sync()
    })?;

    let (fwd_flops, train_flops) =
        flops_per_token(&model, cfg.hidden_size, cfg.num_hidden_layers, s);
    let row = |k: &str, v: f64| (k.to_string(), serde_json::json!(v));
    let mut out = serde_json::Map::from_iter([
        ("framework".to_string(), serde_json::json!("nlora")),
        ("model".to_string(), serde_json::json!(model_name)),
        (
            "device".to_string(),
            serde_json::json!(format!("{device:?}")),
        ),
        ("threads".to_string(), serde_json::json!(threads)),
        ("batch".to_string(), serde_json::json!(b)),
        ("seq".to_string(), serde_json::json!(s)),
        (
            "dtype".to_string(),
            serde_json::json!(format!("{dtype:?}").to_lowercase()),
        ),
        row("load_s", load_secs),
        row("train_tokens_per_s", tokens / t_train),
        row("train_nlora_tokens_per_s", tokens / t_nlora),
        row(
            "nlora_penalty_overhead_pct",
            (t_nlora / t_train - 1.0) * 100.0,
        ),
        row("forward_tokens_per_s", tokens / t_fwd),
        row(
            "generate_new_tokens_per_s",
            (b * args.gen_tokens) as f64 / t_gen,
        ),
        row("train_gflops", tokens * train_flops / t_train / 1e9),
        row("forward_gflops", tokens * fwd_flops / t_fwd / 1e9),
        row("matmul_gflops", (2 * mm * mk * mn) as f64 / t_mm / 1e9),
    ]);
    if let Some(r) = train_rss {
        out.insert("train_peak_rss_mib".into(), serde_json::json!(r));
    }
    if let Some(r) = peak_rss_mib() {
        out.insert("peak_rss_mib".into(), serde_json::json!(r));
    }
    if args.profile {
        out.insert(
            "profile".into(),
            serde_json::json!({
                "train_step": profile_json(&lora_profile, args.steps, t_train),
                "train_nlora_step": profile_json(&train_profile, args.steps, t_nlora),
                "forward": profile_json(&forward_profile, args.steps, t_fwd),
            }),
        );
    }
    if args.json {
        println!("{}", serde_json::Value::Object(out));
        return Ok(());
    }
    println!(
        "nlora bench: {model_name} ({dtype:?} on {device:?}, {threads} threads, batch {b} x {s}, load {load_secs:.1} s)"
    );
    let get = |k: &str| {
        out.get(k)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(f64::NAN)
    };
    for (label, key, unit) in [
        ("(a) LoRA training step", "train_tokens_per_s", "tokens/s"),
        (
            "(b) same + N-LoRA l1",
            "train_nlora_tokens_per_s",
            "tokens/s",
        ),
        (
            "    N-LoRA penalty overhead",
            "nlora_penalty_overhead_pct",
            "%",
        ),
        ("(c) inference forward", "forward_tokens_per_s", "tokens/s"),
        (
            "(d) greedy generation",
            "generate_new_tokens_per_s",
            "new tokens/s",
        ),
        ("(e) peak RSS after training", "train_peak_rss_mib", "MiB"),
        ("    peak RSS", "peak_rss_mib", "MiB"),
        ("    training step", "train_gflops", "GFLOP/s"),
        ("    forward", "forward_gflops", "GFLOP/s"),
        ("(f) GEMM at the MLP's shape", "matmul_gflops", "GFLOP/s"),
    ] {
        println!("  {label:30} {:>10.1} {unit}", get(key));
    }
    if args.profile {
        for (title, rows, t) in [
            ("(a) LoRA training step", &lora_profile, t_train),
            ("(b) training step + N-LoRA l1", &train_profile, t_nlora),
            ("(c) inference forward", &forward_profile, t_fwd),
        ] {
            println!(
                "\nwhere the wall time of {title} goes ({:.0} ms per step):",
                t * 1e3
            );
            println!("  {:42} {:>9} {:>7} {:>6}", "op", "ms/step", "calls", "%");
            for r in rows {
                let per = r.seconds / args.steps as f64;
                println!(
                    "  {:42} {:>9.1} {:>7} {:>6.1}",
                    r.name,
                    per * 1e3,
                    r.calls / args.steps as u64,
                    per / t * 100.0
                );
            }
        }
    }
    Ok(())
}

/// Per-step rows of a profile table, with each op's share of the step.
fn profile_json(rows: &[profile::OpTime], steps: usize, step_s: f64) -> serde_json::Value {
    let steps = steps.max(1) as f64;
    serde_json::Value::Array(
        rows.iter()
            .map(|r| {
                serde_json::json!({
                    "op": r.name,
                    "ms_per_step": r.seconds / steps * 1e3,
                    "calls_per_step": r.calls as f64 / steps,
                    "pct_of_step": r.seconds / steps / step_s * 100.0,
                })
            })
            .collect(),
    )
}
