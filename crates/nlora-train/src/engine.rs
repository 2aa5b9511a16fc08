//! The task loop: for each stage, train, save the adapter (PEFT format),
//! apply the method's end of task, evaluate every task of the stream, and
//! record a resume point; at the end, the paper's metrics.
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use nlora_adapter::{LoraConfig, PeftAdapter};
use nlora_math::capacity::DensityController;
use nlora_math::metrics::accuracy::AccuracyMatrix;
use nlora_model::lm::LanguageModel;
use nlora_model::load::load_any_model;
use nlora_model::tokenizer::TextTokenizer;
use serde::{Deserialize, Serialize};

use crate::arch::Batching;
use crate::checkpoint::{remove_stale_temps, StageCheckpoint};
use crate::config::RunConfig;
use crate::error::{Result, TrainError};
use crate::eval::{evaluate_task, EvalOptions};
use crate::fault;
use crate::method;
use crate::monitor::{MonitorRecord, StageMonitor};
use crate::rundir::{atomic_write, read_json, write_json, Results, RunDir};
use crate::stream::{batch_config, load_stream};
use crate::trainer::{train_stage, StageInput, StageResume, StageStats};

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

/// What survives a crash (state.json): written atomically after every
/// stage, at every checkpoint, and when a stage's training ends. It names a
/// checkpoint only once the checkpoint's files are all in place.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    pub completed_stages: usize,
    pub rows_exact: Vec<Vec<f64>>,
    pub rows_rank: Vec<Vec<f64>>,
    pub tokens_seen: Vec<u64>,
    pub train_seconds: Vec<f64>,
    pub eval_seconds: Vec<f64>,
    /// Batches skipped per completed stage (`train.on_nonfinite = "skip"`).
    #[serde(default)]
    pub skipped_batches: Vec<usize>,
    /// How far the stage after the completed ones got, if anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_progress: Option<InProgress>,
    /// The live monitor's readings of each trained stage.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub monitor: Vec<Vec<MonitorRecord>>,
    /// The auto-lambda controller as the last trained stage left it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<DensityController>,
}

/// monitor.json: the live monitor's readings per task and, with auto
/// lambda, lambda's trajectory (for `nlora report`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MonitorLog {
    /// Relative threshold of the readings' densities and CRs.
    pub tau_rel: f64,
    /// Sampled positions per site.
    pub positions: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_density: Option<f64>,
    pub stages: Vec<MonitorStage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MonitorStage {
    pub task: String,
    pub readings: Vec<MonitorRecord>,
}

/// The file name of [`MonitorLog`] in a run directory.
pub const MONITOR_FILE: &str = "monitor.json";

/// A resume point inside the stage after the completed ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum InProgress {
    /// Training reached the checkpoint in `dir` (relative to the run dir).
    Checkpoint { stage: usize, dir: String },
    /// Training ended and the adapter is saved in the task's folder; the
    /// evaluation after the stage is still to do.
    Trained {
        stage: usize,
        tokens: u64,
        train_seconds: f64,
        skipped_batches: usize,
    },
}

impl InProgress {
    fn stage(&self) -> usize {
        match self {
            InProgress::Checkpoint { stage, .. } | InProgress::Trained { stage, .. } => *stage,
        }
    }
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
        let mut saved = RunConfig::from_toml_file(&rd.config())?;
        // a run may resume on another device (the caller's); the rest is the saved config
        saved.model.device.clone_from(&cfg.model.device);
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
    if model_path.is_dir() && nlora_model::t5::is_t5_folder(&model_path) {
        if let Some(t5_names) = t5_target_modules(&cfg.model.target_modules) {
            tracing::info!(
                "T5 model: target modules {:?} read as T5's {:?}",
                cfg.model.target_modules,
                t5_names
            );
            resolved.model.target_modules = t5_names;
        }
    }
    let cfg = if opts.resume { cfg } else { resolved.clone() };
    if !opts.resume {
        atomic_write(&rd.config(), resolved.to_toml().as_bytes())?;
    }
    tracing::info!(
        "run dir {}: method {}, tasks {:?}",
        rd.root.display(),
        cfg.method.name.as_str(),
        names
    );

    // validated above; the device and dtype are the config's (config.toml records them)
    let device = cfg
        .model
        .device_spec()
        .and_then(|d| d.open())
        .map_err(TrainError::Config)?;
    let dtype = cfg.model.base_dtype().map_err(TrainError::Config)?;
    tracing::info!("device {}, base weights {dtype:?}", cfg.model.device);
    let mut model = load_any_model(&model_path, dtype, &device)?;
    let tokenizer = TextTokenizer::from_path(&model_path)?;
    let batching = Batching::for_model(&model, &tokenizer, batch_config(&cfg))?;
    let stream = load_stream(&cfg, data_dir, &batching)?;
    let lora = lora_config(&cfg);
    let mut method = method::build(&cfg.method, &lora)?;
    let stages = method.stages(stream.tasks.len());

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

    if opts.resume {
        // Interrupted writes left temporaries; checkpoints that state.json
        // does not name are incomplete (or superseded): neither is ever read.
        for t in remove_stale_temps(&rd.root)? {
            tracing::info!("removed an interrupted write: {}", t.display());
        }
        let keep = match &state.in_progress {
            Some(InProgress::Checkpoint { dir, .. }) => Some(rd.root.join(dir)),
            _ => None,
        };
        remove_checkpoints_except(&rd, keep.as_deref())?;
    }

    let model_name = model_path.display().to_string();
    let stage_examples = |stage_tasks: &[usize]| -> Vec<&nlora_data::EncodedExample> {
        stage_tasks
            .iter()
            .flat_map(|&t| stream.tasks[t].train.iter())
            .collect()
    };
    for (s, stage_tasks) in stages.iter().enumerate().take(state.completed_stages) {
        let dir = rd.task_adapter(s, &stage_name(&stream.tasks, stage_tasks));
        let examples = stage_examples(stage_tasks);
        let ctx = method::StageContext {
            stage: s,
            examples: &examples,
            batching: &batching,
            dir: &dir,
            lora: &lora,
            model_name: &model_name,
            seed: cfg.seed,
        };
        method.restore_from(&mut model, &ctx)?;
        tracing::info!("resumed: stage {} restored from {}", s + 1, dir.display());
    }
    overall.set_position(state.completed_stages as u64);
    // The controller carries lambda from task to task (a warm start).
    let mut controller = match (&cfg.method.auto_lambda, &state.controller) {
        (None, _) => None,
        (Some(_), Some(saved)) => Some(saved.clone()),
        (Some(auto), None) => Some(DensityController::new(
            auto.target_density,
            cfg.method.lambda_for(0),
            auto.rate,
        )?),
    };

    for (s, stage_tasks) in stages.iter().enumerate().skip(state.completed_stages) {
        let name = stage_name(&stream.tasks, stage_tasks);
        overall.set_message(format!("training {name}"));
        let t0 = Instant::now();
        let adapter_dir = rd.task_adapter(s, &name);
        let examples = stage_examples(stage_tasks);
        let ctx = method::StageContext {
            stage: s,
            examples: &examples,
            batching: &batching,
            dir: &adapter_dir,
            lora: &lora,
            model_name: &model_name,
            seed: cfg.seed,
        };
        let pending = state.in_progress.clone().filter(|p| p.stage() == s);
        let (stats, train_secs) = if let Some(InProgress::Trained {
            tokens,
            train_seconds,
            skipped_batches,
            ..
        }) = pending
        {
            // Trained before the crash: the saved adapter is the stage's end.
            method.restore_from(&mut model, &ctx)?;
            tracing::info!(
                "resumed: task {} trained, restored from {}; evaluating",
                s + 1,
                adapter_dir.display()
            );
            let stats = StageStats {
                tokens,
                skipped_batches,
                ..Default::default()
            };
            (stats, train_seconds)
        } else {
            method.begin_stage(model.adapter_sites_mut(), s, &lora, cfg.seed)?;
            let input = StageInput {
                stage: s,
                task_name: &name,
                examples: examples.clone(),
            };
            let resume_from = match &pending {
                Some(InProgress::Checkpoint { dir, .. }) => {
                    let dir = rd.root.join(dir);
                    let ck = StageCheckpoint::read(&dir, &device)?;
                    tracing::info!(
                        "resumed: task {} from the checkpoint after step {} ({})",
                        s + 1,
                        ck.progress.steps,
                        dir.display()
                    );
                    Some((ck, dir))
                }
                _ => None,
            };
            let mut monitor = StageMonitor::new(&cfg, model.adapter_sites(), controller.take())?;
            let mut sink = |ck: &StageCheckpoint| save_checkpoint(&rd, &state_path, &mut state, ck);
            let stats = train_stage(
                &mut model,
                method.as_ref(),
                &cfg,
                &batching,
                &input,
                &bar,
                resume_from.as_ref().map(|(ck, dir)| StageResume {
                    checkpoint: ck,
                    dir,
                }),
                &mut sink,
                monitor.as_mut(),
            )?;
            if let Some(m) = monitor {
                controller = m.controller;
                state.monitor.resize(s, Vec::new());
                state.monitor.push(m.records);
                state.controller = controller.clone();
                write_monitor_log(&rd, &cfg, &stream.tasks, &stages, &state)?;
            }
            let before = resume_from.map_or(0.0, |(ck, _)| ck.progress.train_seconds);
            let secs = before + t0.elapsed().as_secs_f64();
            method.after_training(&mut model, &ctx)?;
            // Save before end_stage: it may freeze or clear the current adapter.
            method.save_stage(&model, &ctx)?;
            // The task-end checkpoint: the adapter file is its whole content.
            state.in_progress = Some(InProgress::Trained {
                stage: s,
                tokens: stats.tokens,
                train_seconds: secs,
                skipped_batches: stats.skipped_batches,
            });
            write_json(&state_path, &state)?;
            // No checkpoint of the stage is needed any more.
            remove_checkpoints_except(&rd, None)?;
            fault::pause_at(&format!("trained:{}", s + 1));
            method.end_stage(model.adapter_sites_mut(), s)?;
            (stats, secs)
        };

        overall.set_message(format!("evaluating after {name}"));
        let t1 = Instant::now();
        let eval_opts = EvalOptions::from_config(&cfg);
        let total_eval: usize = stream.tasks.iter().map(|t| t.eval.len()).sum();
        bar.set_length(total_eval as u64);
        bar.set_position(0);
        bar.set_message("evaluating");
        let mut row = Vec::new();
        let mut row_rank = Vec::new();
        for (j, task) in stream.tasks.iter().enumerate() {
            fault::pause_at(&format!("eval:{}:{}", s + 1, j + 1));
            method.before_eval(model.adapter_sites_mut(), s, j)?;
            let acc = evaluate_task(&model, &tokenizer, &batching, task, &eval_opts, |n| {
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
        state.skipped_batches.push(stats.skipped_batches);
        state.in_progress = None;
        write_json(&state_path, &state)?;
        remove_checkpoints_except(&rd, None)?;
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
            // Of this process (a resumed run: since the resume); null off Linux.
            "peak_rss_bytes": peak_rss_bytes(),
        }),
    )?;
    Ok(results)
}

fn write_monitor_log(
    rd: &RunDir,
    cfg: &RunConfig,
    tasks: &[crate::stream::StreamTask],
    stages: &[Vec<usize>],
    state: &RunState,
) -> Result<()> {
    let log = MonitorLog {
        tau_rel: cfg.monitor.tau_rel,
        positions: cfg.monitor.positions,
        target_density: cfg.method.auto_lambda.as_ref().map(|a| a.target_density),
        stages: state
            .monitor
            .iter()
            .enumerate()
            .map(|(s, readings)| MonitorStage {
                task: stage_name(tasks, &stages[s]),
                readings: readings.clone(),
            })
            .collect(),
    };
    write_json(&rd.root.join(MONITOR_FILE), &log)
}

/// The process's peak resident set size (VmHWM), on Linux.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A saved task adapter, refused when it was not trained with the run's
/// LoRA shape (e.g. `model.r` edited in the run's config.toml).
pub(crate) fn load_stage_adapter(
    dir: &Path,
    lora: &LoraConfig,
    device: &Device,
) -> Result<PeftAdapter> {
    let adapter = PeftAdapter::load(dir, device)?;
    let c = &adapter.config;
    if c.r != lora.r || (c.lora_alpha - lora.alpha).abs() > 1e-9 * lora.alpha.abs().max(1.0) {
        return Err(TrainError::RunDir {
            path: dir.to_path_buf(),
            message: format!(
                "this adapter has r = {}, lora_alpha = {} but the run's config says r = {}, alpha = {}: \
                 resume with the config the run was started with",
                c.r, c.lora_alpha, lora.r, lora.alpha
            ),
        });
    }
    Ok(adapter)
}

/// The presets name LLaMA's attention projections; on T5 the same
/// projections are `q`, `k`, `v`, `o` (the paper adapts T5's q and v). Only a
/// list made entirely of those four LLaMA names is translated.
fn t5_target_modules(names: &[String]) -> Option<Vec<String>> {
    names
        .iter()
        .map(|n| match n.as_str() {
            "q_proj" => Some("q".to_string()),
            "k_proj" => Some("k".to_string()),
            "v_proj" => Some("v".to_string()),
            "o_proj" => Some("o".to_string()),
            _ => None,
        })
        .collect()
}

/// Fault injection for the crash tests: with NLORA_FAULT_PAUSE_AFTER_STAGE=k
/// (or NLORA_FAULT_PAUSE_AT=stage:k) the run stops for a while once stage
/// k's resume point is on disk, so a test can kill it there deterministically.
fn fault_pause(done: usize) {
    let want = std::env::var("NLORA_FAULT_PAUSE_AFTER_STAGE")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    if want == Some(done) {
        eprintln!("nlora: paused after stage {done} (NLORA_FAULT_PAUSE_AFTER_STAGE)");
        std::thread::sleep(std::time::Duration::from_secs(600));
    }
    fault::pause_at(&format!("stage:{done}"));
}

/// Writes a mid-stage checkpoint into its own folder, then points state.json
/// at it, then drops the one it replaces: at every moment state.json names a
/// complete checkpoint.
fn save_checkpoint(
    rd: &RunDir,
    state_path: &Path,
    state: &mut RunState,
    ck: &StageCheckpoint,
) -> Result<()> {
    let rel = format!(
        "checkpoint/task-{}-step-{}",
        ck.progress.stage + 1,
        ck.progress.steps
    );
    let dir = rd.root.join(&rel);
    if dir.exists() {
        // Left by a crash before state.json named it: never read, rewritten.
        remove_dir(&dir)?;
    }
    ck.write(&dir)?;
    let previous = state.in_progress.replace(InProgress::Checkpoint {
        stage: ck.progress.stage,
        dir: rel,
    });
    write_json(state_path, state)?;
    tracing::debug!("checkpoint {}", dir.display());
    remove_superseded(rd, previous.as_ref())
}

fn remove_superseded(rd: &RunDir, previous: Option<&InProgress>) -> Result<()> {
    if let Some(InProgress::Checkpoint { dir, .. }) = previous {
        remove_dir(&rd.root.join(dir))?;
    }
    Ok(())
}

/// Removes every checkpoint folder but `keep`.
fn remove_checkpoints_except(rd: &RunDir, keep: Option<&Path>) -> Result<()> {
    let root = rd.checkpoint();
    let Ok(entries) = std::fs::read_dir(&root) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if Some(path.as_path()) != keep {
            remove_dir(&path)?;
        }
    }
    if keep.is_none() {
        remove_dir(&root)?;
    }
    Ok(())
}

fn remove_dir(path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(TrainError::File {
            path: path.to_path_buf(),
            message: format!("cannot remove this old checkpoint: {e}"),
        }),
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
        skipped_batches: if state.skipped_batches.iter().any(|&n| n > 0) {
            state.skipped_batches.clone()
        } else {
            Vec::new()
        },
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
