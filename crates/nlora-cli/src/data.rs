//! `nlora data ...`: validate and describe the CL benchmark, list the orders.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use nlora_data::{
    resolve_data_dir, summarize, Benchmark, LoadOptions, NoGoldLabel, PlainTokenizer, PromptStyle,
    PromptTemplate, Task, TaskInfo, TaskSummary, PRESETS,
};
use serde::Serialize;

#[derive(Args)]
pub struct DataArgs {
    #[command(subcommand)]
    command: DataCommand,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Validate every task (or an order's tasks) and print per-task statistics.
    /// Exits with status 1 if any task is invalid.
    Check(CheckArgs),
    /// Print the paper's task orders (Table 7).
    Orders,
    /// Write a run's training batches (in training order) and evaluation
    /// prompts as the engine builds them, with the settings another
    /// framework needs to replay the run (bench/pytorch_run.py).
    Export(crate::data_export::ExportArgs),
}

#[derive(Args)]
struct CheckArgs {
    /// The CL_Benchmark folder [default: $NLORA_DATA, else ../shared/cl_benchmark].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Check only these tasks: a preset (order1 .. order6) or a comma-separated list.
    #[arg(long, value_name = "NAME")]
    order: Option<String>,
    /// Also count prompt tokens with this model's tokenizer (a .gguf file, a
    /// Hugging Face folder or a tokenizer.json).
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// Keep records labelled "-" (no gold label) as the reference code does.
    #[arg(long)]
    keep_no_gold: bool,
    /// Render prompts without the "Task:"/"Dataset:" prefix lines.
    #[arg(long)]
    no_prefix: bool,
    /// Print the statistics as JSON on stdout instead of tables.
    #[arg(long)]
    json: bool,
}

pub fn data(args: DataArgs) -> Result<()> {
    match args.command {
        DataCommand::Check(args) => check(args),
        DataCommand::Orders => {
            print_orders();
            Ok(())
        }
        DataCommand::Export(args) => crate::data_export::export(args),
    }
}

fn print_orders() {
    for p in &PRESETS {
        println!("{} ({}; {}):", p.name, p.benchmark, p.models);
        println!("  {}", p.tasks.join(" -> "));
    }
}

#[derive(Serialize)]
struct Report {
    data_dir: PathBuf,
    tasks: Vec<TaskSummary>,
    errors: Vec<TaskError>,
}

#[derive(Serialize)]
struct TaskError {
    task: String,
    error: String,
}

fn check(args: CheckArgs) -> Result<()> {
    let dir = resolve_data_dir(args.data_dir.as_deref())?;
    let bench = Benchmark::open(&dir)?;
    let infos: Vec<TaskInfo> = match &args.order {
        Some(spec) => bench.resolve_order(spec)?.tasks,
        None => bench.tasks().to_vec(),
    };
    let tokenizer = match &args.model {
        Some(path) => Some(
            nlora_model::tokenizer::TextTokenizer::from_path(path)
                .with_context(|| format!("cannot load a tokenizer from {}", path.display()))?,
        ),
        None => None,
    };
    let plain: Option<&dyn PlainTokenizer> = tokenizer.as_ref().map(|t| t.inner() as _);
    let options = LoadOptions {
        no_gold_label: if args.keep_no_gold {
            NoGoldLabel::Keep
        } else {
            NoGoldLabel::Drop
        },
    };
    let style = if args.no_prefix {
        PromptStyle::BARE
    } else {
        PromptStyle::REFERENCE
    };

    let mut report = Report {
        data_dir: dir.clone(),
        tasks: Vec::new(),
        errors: Vec::new(),
    };
    if !args.json {
        println!(
            "CL benchmark at {} ({} task{}; prompts {} the Task:/Dataset: prefix{})",
            dir.display(),
            infos.len(),
            if infos.len() == 1 { "" } else { "s" },
            if args.no_prefix { "without" } else { "with" },
            match &tokenizer {
                Some(t) => format!("; tokens by {}", t.source().display()),
                None => String::new(),
            }
        );
    }
    for info in &infos {
        let summary = Task::load(info, &options).and_then(|task| {
            let template = PromptTemplate::for_task(&task, bench.instructions(), style)?;
            summarize(&task, &template, plain)
        });
        match summary {
            Ok(s) => {
                if !args.json {
                    print_summary(&s, info);
                }
                report.tasks.push(s);
            }
            Err(e) => {
                if !args.json {
                    println!("\n{} ({})  INVALID", info.name, info.task_type);
                }
                eprintln!("error: task {}: {e}", info.name);
                report.errors.push(TaskError {
                    task: info.name.clone(),
                    error: e.to_string(),
                });
            }
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!();
    }
    if !report.errors.is_empty() {
        bail!(
            "{} of {} tasks are invalid: {}",
            report.errors.len(),
            infos.len(),
            report
                .errors
                .iter()
                .map(|e| e.task.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if !args.json {
        println!("all {} tasks valid", infos.len());
    }
    Ok(())
}

fn print_summary(s: &TaskSummary, info: &TaskInfo) {
    println!(
        "\n{} ({}, {} labels)  {}",
        s.name,
        s.task_type,
        s.labels.len(),
        info.dir.display()
    );
    let tokens = s.splits.iter().any(|x| x.max_prompt_tokens.is_some());
    print!(
        "  {:<6} {:>8} {:>8} {:>24}",
        "split", "examples", "no-gold", "prompt chars mean / max"
    );
    if tokens {
        print!(" {:>25}", "prompt tokens mean / max");
    }
    println!();
    for x in &s.splits {
        print!(
            "  {:<6} {:>8} {:>8} {:>15.1} / {:>6}",
            x.split.as_str(),
            x.examples,
            x.no_gold,
            x.mean_prompt_chars,
            x.max_prompt_chars
        );
        if let (Some(mean), Some(max)) = (x.mean_prompt_tokens, x.max_prompt_tokens) {
            print!(" {:>16.1} / {:>6}", mean, max);
        }
        println!();
    }
    // Per-label counts: one row per label, one column per split.
    let width = s
        .splits
        .iter()
        .flat_map(|x| x.label_counts.iter().map(|(l, _)| l.chars().count()))
        .max()
        .unwrap_or(5)
        .max(5);
    print!("  {:<width$}", "label");
    for x in &s.splits {
        print!(" {:>7}", x.split.as_str());
    }
    println!();
    let mut labels: Vec<&str> = s.labels.iter().map(String::as_str).collect();
    for x in &s.splits {
        for (l, _) in &x.label_counts {
            if !labels.contains(&l.as_str()) {
                labels.push(l);
            }
        }
    }
    for label in labels {
        print!("  {label:<width$}");
        for x in &s.splits {
            let n = x
                .label_counts
                .iter()
                .find(|(l, _)| l == label)
                .map_or(0, |(_, n)| *n);
            print!(" {n:>7}");
        }
        println!();
    }
    for note in &s.notes {
        println!("  note: {note}");
    }
}
