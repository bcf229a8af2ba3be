//! `tessera`: the one command line of Tessera.

use clap::{Parser, Subcommand};

mod demo;

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "Tessera: a thread-per-core, cell-partitioned real-time world server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the shards, tick, exchange messages and print per-shard stats.
    RuntimeDemo(demo::DemoArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::RuntimeDemo(args) => demo::run(args),
    };
    if let Err(e) = result {
        eprintln!("tessera: {e}");
        std::process::exit(1);
    }
}
