//! `nlora run`, `nlora metrics` and `nlora presets`.
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use nlora_math::metrics::CollisionThreshold;
use nlora_train::config::{AutoLambda, L1Form, MethodName, PerTask};
use nlora_train::engine::{self, RunOptions};
use nlora_train::presets::{preset, PRESETS};
use nlora_train::RunConfig;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

#[derive(Args)]
pub struct RunArgs {
    /// A TOML run configuration.
    #[arg(long, conflicts_with = "preset")]
    config: Option<PathBuf>,
    /// A named preset instead of a config (see `nlora presets`).
    #[arg(long)]
    preset: Option<String>,
    /// The method (seqlora, inclora, olora, nlora, olora+nlora, sa, sb, sab, ns, pertask, mtl;
    /// full fine-tuning baselines: seqft, replay, ewc, lwf).
    #[arg(long)]
    method: Option<String>,
    /// N-LoRA's l1 form: dw (the paper) or reference-code (||A B||_1, r x r).
    #[arg(long)]
    l1_form: Option<String>,
    /// N-LoRA's lambda (one value for every task), or `auto`: adjusted
    /// during training so each task's update reaches --target-density.
    #[arg(long)]
    lambda: Option<String>,
    /// With --lambda auto: the fraction of positions each task's update may
    /// use (|dW| > monitor.tau_rel x the site's largest |dW|), in (0, 1).
    #[arg(long)]
    target_density: Option<f64>,
    /// A .gguf file or a Hugging Face model folder (default: $NLORA_MODEL, then the fetch-model cache).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The benchmark folder (default: $NLORA_DATA, then ../shared/cl_benchmark).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The run directory.
    #[arg(long)]
    out: PathBuf,
    /// Continue the run in --out from its last resume point.
    #[arg(long)]
    resume: bool,
    /// Seed of every random stream.
    #[arg(long)]
    seed: Option<u64>,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
    /// Where to compute: cpu, cuda or cuda:N (config key `model.device`;
    /// a resumed run may move to another device).
    #[arg(long)]
    device: Option<String>,
    /// Base weights' precision: f32 or bf16 (config key `model.dtype`; adapters stay f32).
    #[arg(long)]
    dtype: Option<String>,
}

#[derive(Args)]
pub struct MetricsArgs {
    /// A finished run directory.
    run_dir: PathBuf,
    /// Absolute threshold: an entry of dW counts as non-zero when |dW| > TAU.
    #[arg(long, conflicts_with = "tau_rel")]
    tau: Option<f64>,
    /// Relative threshold: |dW| > TAU_REL * (largest |dW| at the site over all tasks). Default 0.01.
    #[arg(long)]
    tau_rel: Option<f64>,
}

fn init_logging(verbose: u8, log_file: Option<PathBuf>) -> Result<()> {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let stderr = fmt::layer().with_writer(std::io::stderr).with_filter(
        EnvFilter::try_from_env("NLORA_LOG").unwrap_or_else(|_| EnvFilter::new(level)),
    );
    let file_layer = match log_file {
        Some(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("cannot open log {}", path.display()))?;
            Some(
                fmt::layer()
                    .with_ansi(false)
                    .with_writer(std::sync::Mutex::new(file))
                    .with_filter(EnvFilter::new("info")),
            )
        }
        None => None,
    };
    let _ = tracing_subscriber::registry()
        .with(stderr)
        .with(file_layer)
        .try_init();
    Ok(())
}

fn build_config(args: &RunArgs) -> Result<RunConfig> {
    let method = args.method.as_deref().map(MethodName::parse).transpose()?;
    let cfg = match (&args.config, &args.preset) {
        (Some(path), _) => RunConfig::from_toml_file(path)?,
        (None, Some(name)) => preset(
            name,
            method.unwrap_or(MethodName::NLora),
            l1_form(args)?.unwrap_or_default(),
        )?,
        (None, None) => anyhow::bail!("give --config FILE or --preset NAME (see `nlora presets`)"),
    };
    apply_flags(cfg, args)
}

fn l1_form(args: &RunArgs) -> Result<Option<L1Form>> {
    Ok(match args.l1_form.as_deref() {
        None => None,
        Some("dw") => Some(L1Form::Dw),
        Some("reference-code") => Some(L1Form::ReferenceCode),
        Some(other) => anyhow::bail!("unknown --l1-form `{other}`: use dw or reference-code"),
    })
}

/// The command-line flags that override a config's values.
fn apply_flags(mut cfg: RunConfig, args: &RunArgs) -> Result<RunConfig> {
    if let Some(m) = args.method.as_deref() {
        cfg.method.name = MethodName::parse(m)?;
    }
    if let Some(f) = l1_form(args)? {
        cfg.method.l1_form = f;
    }
    match args.lambda.as_deref() {
        None => {}
        Some("auto") => {
            let Some(rho) = args.target_density else {
                anyhow::bail!(
                    "--lambda auto needs --target-density RHO (the fraction of positions each task's update may use, e.g. 0.8)"
                );
            };
            cfg.method.auto_lambda = Some(AutoLambda::new(rho));
        }
        Some(text) => {
            let l: f64 = text.parse().map_err(|_| {
                anyhow::anyhow!("--lambda must be a number or `auto`, got `{text}`")
            })?;
            cfg.method.lambda = Some(PerTask::One(l));
        }
    }
    if args.target_density.is_some() && args.lambda.as_deref() != Some("auto") {
        match cfg.method.auto_lambda.as_mut() {
            Some(auto) => auto.target_density = args.target_density.unwrap_or_default(),
            None => anyhow::bail!("--target-density is for --lambda auto; give both"),
        }
    }
    if let Some(m) = &args.model {
        cfg.model.path = Some(m.clone());
    }
    if let Some(s) = args.seed {
        cfg.seed = s;
    }
    if let Some(d) = &args.device {
        cfg.model.device = d
            .parse::<nlora_adapter::DeviceSpec>()
            .map_err(anyhow::Error::msg)?
            .to_string();
    }
    if let Some(d) = &args.dtype {
        nlora_adapter::device::parse_base_dtype(d).map_err(anyhow::Error::msg)?;
        cfg.model.dtype = d.to_ascii_lowercase();
    }
    Ok(cfg)
}

/// `--resume` continues a run with the config it was started with (its config.toml):
/// its adapters and accuracy rows depend on it. A config or flags that say otherwise
/// are refused, naming each difference, rather than silently ignored.
fn check_resume_config(args: &RunArgs, saved: &RunConfig) -> Result<()> {
    let mut given = if args.config.is_some() || args.preset.is_some() {
        build_config(args)?
    } else {
        apply_flags(saved.clone(), args)?
    };
    // The data may have moved (--data-dir is honoured), and the device; the model must be the same file.
    given.data.dir.clone_from(&saved.data.dir);
    given.model.device.clone_from(&saved.model.device);
    let same_file = |a: &PathBuf, b: &PathBuf| {
        a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
    };
    match (&given.model.path, &saved.model.path) {
        (None, _) => given.model.path.clone_from(&saved.model.path),
        (Some(a), Some(b)) if same_file(a, b) => given.model.path.clone_from(&saved.model.path),
        _ => {}
    }
    let differences = saved.differences(&given);
    if !differences.is_empty() {
        anyhow::bail!(
            "cannot resume {}: the run was made with another config ({}). --resume continues \
             a run with its own config.toml: drop --config/--preset and the flags that change \
             it, or start a new run with another --out",
            args.out.display(),
            differences.join("; ")
        );
    }
    Ok(())
}

pub fn run(args: RunArgs, verbose: u8) -> Result<()> {
    init_logging(verbose, Some(args.out.join("train.log")))?;
    let cfg = if args.resume {
        let saved = RunConfig::from_toml_file(&args.out.join("config.toml"))
            .with_context(|| format!("cannot resume {}", args.out.display()))?;
        check_resume_config(&args, &saved)?;
        let mut cfg = saved;
        if let Some(d) = &args.device {
            cfg.model.device = d
                .parse::<nlora_adapter::DeviceSpec>()
                .map_err(anyhow::Error::msg)?
                .to_string();
        }
        cfg
    } else {
        build_config(&args)?
    };
    let data_dir = match (&args.data_dir, &cfg.data.dir) {
        (Some(d), _) => d.clone(),
        (None, Some(d)) if args.resume => d.clone(),
        _ => nlora_data::resolve_data_dir(cfg.data.dir.as_deref())?,
    };
    let progress = !args.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let results = engine::run(
        cfg,
        &data_dir,
        &RunOptions {
            out: args.out.clone(),
            resume: args.resume,
            progress,
        },
    )?;
    println!("{}", results_table(&results));
    println!("run directory: {}", args.out.display());
    Ok(())
}

fn results_table(r: &nlora_train::rundir::Results) -> String {
    let mut s = format!(
        "method {}  seed {}\naccuracy matrix (exact match; row = after task i, column = task j):\n",
        r.method, r.seed
    );
    s.push_str(&format!("{:<14}", ""));
    for t in &r.tasks {
        s.push_str(&format!("{:>10}", truncate(t, 9)));
    }
    s.push('\n');
    for (i, row) in r.accuracy_matrix.iter().enumerate() {
        let label = if r.accuracy_matrix.len() == r.tasks.len() {
            format!("after {}", truncate(&r.tasks[i], 7))
        } else {
            "after all".into()
        };
        s.push_str(&format!("{label:<14}"));
        for v in row {
            s.push_str(&format!("{:>10.3}", v));
        }
        s.push('\n');
    }
    s.push_str(&format!(
        "AA {:.4}  forgetting {:.4}  BWT {:.4}",
        r.average_accuracy, r.forgetting, r.bwt
    ));
    if let (Some(a), Some(f)) = (r.average_accuracy_rank, r.forgetting_rank) {
        s.push_str(&format!(
            "   (rank classification: AA {a:.4}, forgetting {f:.4})"
        ));
    }
    s
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

pub fn metrics(args: MetricsArgs, verbose: u8) -> Result<()> {
    init_logging(verbose, None)?;
    let threshold = match (args.tau, args.tau_rel) {
        (Some(t), _) => CollisionThreshold::Absolute(t),
        (None, Some(f)) => CollisionThreshold::RelativeToSiteMax(f),
        (None, None) => CollisionThreshold::RelativeToSiteMax(0.01),
    };
    threshold.validate()?;
    let m = nlora_train::analysis::run_metrics(&args.run_dir, threshold)?;
    println!("{}", nlora_train::analysis::format_table(&m));
    println!("written: {}", args.run_dir.join("metrics.json").display());
    Ok(())
}

pub fn presets() {
    for (name, what) in PRESETS {
        println!("{name:<14} {what}");
    }
}
