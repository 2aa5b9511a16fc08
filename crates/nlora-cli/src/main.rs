//! `nlora`: continual learning of language models with LoRA adapters (N-LoRA and baselines).
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod data;
mod data_export;
mod device;
mod generate;
mod report;
mod run;
mod tune;

#[derive(Parser)]
#[command(
    name = "nlora",
    version,
    about = "Continual learning of LLMs with non-collision LoRA (N-LoRA) and baselines"
)]
struct Cli {
    /// More log output on stderr (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train on a stream of tasks with a continual-learning method, evaluating after each task.
    Run(run::RunArgs),
    /// Adapter geometry of a finished run: OO, AWOM, GSR, collision rates, nuclear norms.
    Metrics(run::MetricsArgs),
    /// List the run presets (the paper's orders and CPU-sized ones).
    Presets,
    /// The CL benchmark: validate it and show per-task statistics (`data check`), list the orders.
    Data(data::DataArgs),
    /// Greedy continuation of a prompt by a base model (GGUF file or Hugging Face folder).
    Generate(generate::GenerateArgs),
    /// The paper's tables and figures from run directories: report.html, report.md and PNGs.
    Report(report::ReportArgs),
    /// Speed of the hot paths (LoRA/N-LoRA training step, forward, generation) and peak RSS.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    tune::process();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(args, cli.verbose),
        Command::Metrics(args) => run::metrics(args, cli.verbose),
        Command::Generate(args) => generate::generate(args),
        Command::Data(args) => data::data(args),
        Command::Report(args) => report::report(args),
        Command::Bench(args) => bench::bench(args),
        Command::Presets => {
            run::presets();
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, leaving out a cause whose text the
/// message already shows (typed errors often print their source themselves).
fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !msg.contains(&text) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&text);
        }
    }
    msg
}
