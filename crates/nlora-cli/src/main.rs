//! `nlora`: continual learning of language models with LoRA adapters (N-LoRA and baselines).
use clap::{Parser, Subcommand};

mod data;
mod generate;

#[derive(Parser)]
#[command(name = "nlora", version, about = "Continual learning of LLMs with non-collision LoRA (N-LoRA) and baselines")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The CL benchmark: validate it and show per-task statistics (`data check`), list the orders.
    Data(data::DataArgs),
    /// Greedy continuation of a prompt by a base model (GGUF file or Hugging Face folder).
    Generate(generate::GenerateArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Data(args) => data::data(args)?,
        Command::Generate(args) => generate::generate(args)?,
    }
    Ok(())
}
