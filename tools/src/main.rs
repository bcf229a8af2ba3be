//! `tessera`: the one command line of Tessera.

use clap::{Parser, Subcommand};

mod admin;
mod client;
mod config;
mod coord;
mod demo;
mod dev;
mod serve;
mod sim;
mod token;

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
    /// Run a node with the demo world (UDP 7777, metrics 127.0.0.1:9100).
    Serve(config::ServeArgs),
    /// Test client: ping, join, move, repl, script.
    Client(client::ClientArgs),
    /// Load simulator: bots that join, move, attack, ack and measure.
    Sim(sim::SimArgs),
    /// Talk to a running node's (or coordinator's) admin port.
    Admin(admin::AdminArgs),
    /// Run the standalone coordinator of a cluster (nodes join with
    /// `serve --coord`).
    Coord(coord::CoordArgs),
    /// A local cluster on this machine: up, down, logs, status.
    Dev(dev::DevArgs),
    /// Start the runtime alone (shards, ticks, messages) and print stats.
    RuntimeDemo(demo::DemoArgs),
    /// Keys and connect tokens: `token key`, `token mint`.
    Token(token::TokenArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: logs in files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                std::process::exit(
                    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                        2
                    } else {
                        0
                    },
                );
            }
            // One clear line, not a page of usage.
            let text = e.render().to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            eprintln!("tessera: {first} (see tessera --help)");
            std::process::exit(2);
        }
    };
    if matches!(
        cli.command,
        Command::Admin(_) | Command::Client(_) | Command::Dev(_)
    ) {
        // Output commands behave like other Unix tools when piped into
        // `head`: end quietly on a closed pipe instead of panicking.
        // SAFETY: restoring a default signal disposition at start-up.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Client(args) => client::run(args),
        Command::Sim(args) => sim::run(args),
        Command::Admin(args) => admin::run(args),
        Command::Coord(args) => coord::run(args),
        Command::Dev(args) => dev::run(args),
        Command::Token(args) => token::run(args),
        Command::RuntimeDemo(args) => demo::run(args),
    };
    if let Err(e) = result {
        eprintln!("tessera: {e}");
        std::process::exit(1);
    }
}
