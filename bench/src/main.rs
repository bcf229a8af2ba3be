//! Tessera's benchmarks. Every suite prints a table and writes
//! `target/bench/<suite>.json` (see shared/BENCH.md):
//!
//! ```text
//! cargo run --release -p tessera-bench -- mailbox [--quick]
//! cargo run --release -p tessera-bench -- rudp [--quick]
//! cargo run --release -p tessera-bench -- world [--quick]
//! cargo run --release -p tessera-bench -- cluster [--quick]
//! cargo run --release -p tessera-bench -- failover [--quick]
//! ```

use clap::{Parser, Subcommand};

mod cluster;
mod failover;
mod handover;
mod mailbox;
mod report;
mod rudp;
mod world;

#[derive(Parser)]
#[command(
    name = "tessera-bench",
    about = "Tessera benchmarks (tables + target/bench/<suite>.json)"
)]
struct Cli {
    #[command(subcommand)]
    suite: Suite,
}

#[derive(Subcommand)]
enum Suite {
    /// Unified bulk-drained mailbox vs tokio-mpsc per stage vs a queue per stage.
    Mailbox(mailbox::Args),
    /// Tessera's RUDP vs ENet, KCP, renet, quinn and a raw-UDP ceiling.
    Rudp(rudp::Args),
    /// World engine tick cost, snapshot sizes, AOI vs brute force.
    World(world::Args),
    /// Live cell handover: freeze and commit times, entities and inputs lost.
    Handover(handover::Args),
    /// A cluster in one process: cross-node handovers, latency added by a
    /// gateway, bytes between nodes per ghost and per remote client.
    Cluster(cluster::Args),
    /// Node kills, coordinator kills (etcd), drains: detection, recovery,
    /// state lost, client gaps; replication's bytes and CPU per cell.
    Failover(failover::Args),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.suite {
        Suite::Mailbox(args) => mailbox::run(args),
        Suite::Rudp(args) => rudp::run(args),
        Suite::World(args) => world::run(args),
        Suite::Handover(args) => handover::run(args),
        Suite::Cluster(args) => cluster::run(args),
        Suite::Failover(args) => failover::run(args),
    };
    if let Err(e) = result {
        eprintln!("tessera-bench: {e}");
        std::process::exit(1);
    }
}
