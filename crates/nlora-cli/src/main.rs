//! `nlora`: continual learning of language models with LoRA adapters (N-LoRA and baselines).
use clap::{Parser, Subcommand};

mod generate;

#[derive(Parser)]
#[command(name = "nlora", version, about = "Continual learning of LLMs with non-collision LoRA (N-LoRA) and baselines")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the paper's task orders.
    Orders,
    /// Greedy continuation of a prompt by a base model (GGUF file or Hugging Face folder).
    Generate(generate::GenerateArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Orders => println!("coming with the data issue"),
        Command::Generate(args) => generate::generate(args)?,
    }
    Ok(())
}
