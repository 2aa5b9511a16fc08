//! The task loop: for each stage, train, save the adapter (PEFT format),
//! apply the method's end of task, evaluate every task of the stream, and
//! record a resume point; at the end, the paper's metrics.
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use nlora_adapter::{LoraConfig, PeftAdapter};
use nlora_data::{BatchConfig, DecoderBatcher};
use nlora_math::metrics::accuracy::AccuracyMatrix;
use nlora_model::lm::LanguageModel;
use nlora_model::tokenizer::TextTokenizer;
use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::error::{Result, TrainError};
use crate::eval::{evaluate_task, EvalOptions};
use crate::method;
use crate::rundir::{atomic_write, read_json, write_json, Results, RunDir};
use crate::stream::load_stream;
use crate::trainer::{train_stage, StageInput};

/// Where the model comes from when the config names none.
pub const MODEL_ENV: &str = "NLORA_MODEL";

pub fn default_model_path() -> PathBuf {
    if let Some(p) = std::env::var_os(MODEL_ENV) {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("NLORA_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|c| PathBuf::from(c).join("nlora")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/nlora")))
        .unwrap_or_else(|| PathBuf::from(".cache/nlora"));
    cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// What survives a crash: written atomically after every stage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    pub completed_stages: usize,
    pub rows_exact: Vec<Vec<f64>>,
    pub rows_rank: Vec<Vec<f64>>,
    pub tokens_seen: Vec<u64>,
    pub train_seconds: Vec<f64>,
    pub eval_seconds: Vec<f64>,
}

pub struct RunOptions {
    pub out: PathBuf,
    pub resume: bool,
    /// Show progress bars (off in tests and when stderr is not a terminal).
    pub progress: bool,
}

fn lora_config(cfg: &RunConfig) -> LoraConfig {
    LoraConfig {
        r: cfg.model.r,
        alpha: cfg.model.alpha,
        dropout: cfg.model.dropout as f32,
        target_modules: cfg.model.target_modules.clone(),
    }
}

/// Runs (or resumes) a whole continual-learning run into `opts.out`.
pub fn run(cfg: RunConfig, data_dir: &Path, opts: &RunOptions) -> Result<Results> {
    let rd = RunDir::new(&opts.out);
    let _lock = rd.acquire_lock()?;
    let state_path = rd.root.join("state.json");
    let (cfg, mut state) = if opts.resume {
        if !rd.config().exists() {
            return Err(TrainError::RunDir {
                path: rd.root.clone(),
                message: "nothing to resume: no config.toml here; start the run without --resume"
                    .into(),
            });
        }
        let saved = RunConfig::from_toml_file(&rd.config())?;
        let state: RunState = if state_path.exists() {
            read_json(&state_path)?
        } else {
            RunState::default()
        };
        (saved, state)
    } else {
        if rd.config().exists() || state_path.exists() {
            return Err(TrainError::RunDir {
                path: rd.root.clone(),
                message: "already holds a run: pass --resume to continue it, or choose another --out (nothing was overwritten)".into(),
            });
        }
        (cfg, RunState::default())
    };

    let names = crate::stream::task_names(&cfg, data_dir)?;
    cfg.validate(names.len())?;
    let model_path = cfg.model.path.clone().unwrap_or_else(default_model_path);
    if !model_path.exists() {
        return Err(TrainError::File {
            path: model_path,
            message:
                "model not found: run scripts/fetch-model.sh, set NLORA_MODEL, or give --model"
                    .into(),
        });
    }
    // The resolved config records the model and data actually used.
    let mut resolved = cfg.clone();
    resolved.model.path = Some(model_path.clone());
    resolved.data.dir = Some(data_dir.to_path_buf());
    if !opts.resume {
        atomic_write(&rd.config(), resolved.to_toml().as_bytes())?;
    }
    tracing::info!(
        "run dir {}: method {}, tasks {:?}",
        rd.root.display(),
        cfg.method.name.as_str(),
        names
    );

    let device = Device::Cpu;
    let mut model = nlora_model::load::load_model(&model_path, &device)?;
    let tokenizer = TextTokenizer::from_path(&model_path)?;
    let stream = load_stream(&cfg, data_dir, &tokenizer)?;
    let lora = lora_config(&cfg);
    let mut method = method::build(&cfg.method, &lora)?;
    let stages = method.stages(stream.tasks.len());
    let view_dyn: &dyn nlora_data::PlainTokenizer = tokenizer.inner();
    let batcher = DecoderBatcher::new(
        view_dyn,
        stream.special,
        BatchConfig {
            max_source_len: cfg.data.max_source_len,
            max_target_len: cfg.data.max_target_len,
            truncation: nlora_data::Truncation::Sentence,
        },
    );

    let multi = MultiProgress::with_draw_target(if opts.progress {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let overall = multi.add(ProgressBar::new(stages.len() as u64));
    overall.set_style(
        ProgressStyle::with_template("{prefix} [{bar:20}] task {pos}/{len} {msg}")
            .expect("static template"),
    );
    overall.set_prefix(cfg.method.name.as_str());
    let bar = multi.add(ProgressBar::new(0));
    bar.set_style(
        ProgressStyle::with_template("  {spinner} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
            .expect("static template"),
    );

    let sites = model.adapter_sites_mut();
    for (s, _) in stages.iter().enumerate().take(state.completed_stages) {
        let dir = rd.task_adapter(s, &stage_name(&stream.tasks, &stages[s]));
        let adapter = PeftAdapter::load(&dir, &device)?;
        method.restore_stage(sites, s, &adapter)?;
        tracing::info!("resumed: stage {} restored from {}", s + 1, dir.display());
    }
    overall.set_position(state.completed_stages as u64);

    let model_name = model_path.display().to_string();
    for (s, stage_tasks) in stages.iter().enumerate().skip(state.completed_stages) {
        let name = stage_name(&stream.tasks, stage_tasks);
        overall.set_message(format!("training {name}"));
        let t0 = Instant::now();
        method.begin_stage(model.adapter_sites_mut(), s, &lora, cfg.seed)?;
        let examples = stage_tasks
            .iter()
            .flat_map(|&t| stream.tasks[t].train.iter())
            .collect();
        let input = StageInput {
            stage: s,
            task_name: &name,
            examples,
            special: stream.special,
        };
        let stats = train_stage(&mut model, method.as_ref(), &cfg, &batcher, &input, &bar)?;
        let train_secs = t0.elapsed().as_secs_f64();
        // Save before end_stage: it may freeze or clear the current adapter.
        let adapter_dir = rd.task_adapter(s, &name);
        model.adapter_sites().save_peft(&adapter_dir, &model_name)?;
        method.end_stage(model.adapter_sites_mut(), s)?;

        overall.set_message(format!("evaluating after {name}"));
        let t1 = Instant::now();
        let eval_opts = EvalOptions {
            batch_size: cfg.eval.batch_size,
            max_new_tokens: cfg.eval.max_new_tokens,
            rank_classification: cfg.eval.rank_classification,
        };
        let total_eval: usize = stream.tasks.iter().map(|t| t.eval.len()).sum();
        bar.set_length(total_eval as u64);
        bar.set_position(0);
        bar.set_message("evaluating");
        let mut row = Vec::new();
        let mut row_rank = Vec::new();
        for (j, task) in stream.tasks.iter().enumerate() {
            method.before_eval(model.adapter_sites_mut(), s, j)?;
            let acc = evaluate_task(&model, &tokenizer, &stream.special, task, &eval_opts, |n| {
                bar.inc(n as u64)
            })?;
            tracing::info!(
                "after {name}: {} exact match {:.4}{}",
                task.name,
                acc.exact_match,
                acc.rank
                    .map(|r| format!(", rank {r:.4}"))
                    .unwrap_or_default()
            );
            row.push(acc.exact_match);
            if let Some(r) = acc.rank {
                row_rank.push(r);
            }
        }
        state.completed_stages = s + 1;
        state.rows_exact.push(row);
        if !row_rank.is_empty() {
            state.rows_rank.push(row_rank);
        }
        state.tokens_seen.push(stats.tokens);
        state.train_seconds.push(train_secs);
        state.eval_seconds.push(t1.elapsed().as_secs_f64());
        write_json(&state_path, &state)?;
        overall.inc(1);
        fault_pause(s + 1);
    }
    overall.finish_with_message("done");
    bar.finish_and_clear();

    let results = summarize(
        &cfg,
        &stream
            .tasks
            .iter()
            .map(|t| t.name.clone())
            .collect::<Vec<_>>(),
        &state,
    )?;
    write_json(&rd.results_json(), &results)?;
    atomic_write(&rd.results_csv(), results.to_csv().as_bytes())?;
    write_json(
        &rd.root.join("timings.json"),
        &serde_json::json!({
            "train_seconds": state.train_seconds,
            "eval_seconds": state.eval_seconds,
        }),
    )?;
    Ok(results)
}

/// Fault injection for the crash tests: with NLORA_FAULT_PAUSE_AFTER_STAGE=k
/// the run stops for a while once stage k's resume point is on disk, so a
/// test can kill it there deterministically.
fn fault_pause(done: usize) {
    let want = std::env::var("NLORA_FAULT_PAUSE_AFTER_STAGE")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    if want == Some(done) {
        eprintln!("nlora: paused after stage {done} (NLORA_FAULT_PAUSE_AFTER_STAGE)");
        std::thread::sleep(std::time::Duration::from_secs(600));
    }
}

/// The name of a stage: its task, or `mtl` for the union.
fn stage_name(tasks: &[crate::stream::StreamTask], stage: &[usize]) -> String {
    match stage {
        [t] => tasks[*t].name.clone(),
        _ => "all".into(),
    }
}

/// AA, forgetting and BWT (and their rank-classification twins) from the rows.
fn summarize(cfg: &RunConfig, tasks: &[String], state: &RunState) -> Result<Results> {
    let (aa, f, bwt) = matrix_summary(&state.rows_exact)?;
    let rank = if state.rows_rank.is_empty() {
        None
    } else {
        Some(matrix_summary(&state.rows_rank)?)
    };
    Ok(Results {
        method: cfg.method.name.as_str().to_string(),
        seed: cfg.seed,
        tasks: tasks.to_vec(),
        accuracy_matrix: state.rows_exact.clone(),
        accuracy_matrix_rank: state.rows_rank.clone(),
        zero_shot: None,
        average_accuracy: aa,
        forgetting: f,
        bwt,
        fwt: None,
        average_accuracy_rank: rank.map(|r| r.0),
        forgetting_rank: rank.map(|r| r.1),
        bwt_rank: rank.map(|r| r.2),
        tokens_seen: state.tokens_seen.clone(),
    })
}

/// (AA, forgetting, BWT); a single-stage run (MTL) has no forgetting: 0.
fn matrix_summary(rows: &[Vec<f64>]) -> Result<(f64, f64, f64)> {
    if rows.len() == 1 {
        let r = &rows[0];
        return Ok((r.iter().sum::<f64>() / r.len().max(1) as f64, 0.0, 0.0));
    }
    let m = AccuracyMatrix::from_rows(rows)?;
    Ok((
        m.average_accuracy()?,
        m.forgetting()?,
        m.backward_transfer()?,
    ))
}
