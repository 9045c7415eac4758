use clap::Parser;

/// tokenfab: a token-factory cluster scheduler for batch LLM inference.
#[derive(Parser)]
#[command(version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    Ok(())
}
