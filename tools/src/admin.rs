//! `tessera admin`: talks to a node's admin port.

use std::net::SocketAddr;

use tessera_runtime::cluster::service::ClusterStatus;
use tessera_runtime::node::admin::{read_admin_token, request_with, Status};

/// Prints a coordinator's view of the cluster.
fn print_cluster(st: &ClusterStatus, with_shards: bool) {
    if with_shards {
        println!(
            "coordinator ({}): uptime {:.0} s, cluster epoch {}, registry v{}, {} operation(s) in flight, {} handovers, {} aborts, {} splits, {} merges{}",
            if st.role.is_empty() { "alone" } else { &st.role },
            st.uptime_s,
            st.cluster_epoch,
            st.registry_version,
            st.in_flight,
            st.handovers,
            st.aborts,
            st.splits,
            st.merges,
            if st.awaiting_compute_nodes > 0 {
                format!(" (waiting for {} more compute node(s))", st.awaiting_compute_nodes)
            } else {
                String::new()
            }
        );
        println!(
            "{:>6} {:>8} {:>7} {:>22} {:>22}",
            "node", "role", "shards", "cluster", "game"
        );
        for n in &st.nodes {
            println!(
                "{:>6} {:>8} {:>7} {:>22} {:>22}{}",
                n.node,
                n.role,
                n.shards,
                n.cluster_addr,
                n.game_addr.as_deref().unwrap_or("-"),
                match (n.dead, n.draining_cells_left) {
                    (true, _) => "  DEAD".to_string(),
                    (false, Some(0)) => "  DRAINED".to_string(),
                    (false, Some(left)) => format!("  DRAINING ({left} cells left)"),
                    (false, None) => String::new(),
                }
            );
        }
        if !st.backups.is_empty() {
            println!("backups: {}", st.backups.join("  "));
        }
        for f in &st.failovers {
            println!(
                "failover: {} -> {}: {} cells, {} entities, {} without replica; detected {:.0} ms after its last heartbeat, served {} after, {} ticks of state lost",
                f.shard,
                f.to,
                f.cells,
                f.entities,
                f.missing,
                f.detection_ms,
                f.served_ms.map_or("(pending)".to_string(), |s| format!("{s:.0} ms")),
                f.ticks_lost.map_or("?".to_string(), |t| t.to_string())
            );
        }
        println!(
            "{:>20} {:>8} {:>7} {:>8} {:>9} {:>9} {:>6} {:>9}",
            "shard", "role", "linked", "tick", "sessions", "entities", "cells", "heard_ms"
        );
        for s in &st.shards {
            println!(
                "{:>20} {:>8} {:>7} {:>8} {:>9} {:>9} {:>6} {:>9}",
                s.shard, s.role, s.linked, s.tick, s.sessions, s.entities, s.cells, s.heard_ms_ago
            );
        }
    }
    println!(
        "{:>14} {:>20} {:>6} {:>6}",
        "cell", "owner", "epoch", "score"
    );
    for c in &st.cells {
        println!(
            "{:>14} {:>20} {:>6} {:>6.2}",
            c.cell, c.owner, c.epoch, c.score
        );
    }
}

/// Options of `tessera admin`.
#[derive(clap::Args, Debug)]
pub struct AdminArgs {
    /// The node's admin address.
    #[arg(long, default_value = "127.0.0.1:9101", env = "TESSERA_ADMIN_ADDR")]
    pub addr: SocketAddr,
    /// Print the raw JSON.
    #[arg(long)]
    pub json: bool,
    /// The admin token file (`--admin-token-file` of the node or
    /// coordinator), for an admin port off loopback.
    #[arg(long, env = "TESSERA_ADMIN_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// Admin commands.
#[derive(clap::Subcommand, Debug)]
pub enum AdminCommand {
    /// Shards, cells and owners, entities, sessions, tick p99.
    Status,
    /// Every cell with its owner and epoch.
    Cells,
    /// Recent handovers, splits and merges, with freeze and commit times.
    Handovers,
    /// Hand a cell to a shard (live handover).
    Move {
        /// The cell, e.g. 0:2,3 (or 0:2,3/12 below a split).
        cell: String,
        /// The shard: SHARD on a node's admin port, NODE/SHARD on a
        /// coordinator's (e.g. 2/0).
        shard: String,
    },
    /// Split a cell into its four children.
    Split {
        /// The cell.
        cell: String,
    },
    /// Merge four sibling cells back into their parent.
    Merge {
        /// The parent cell.
        cell: String,
    },
    /// On a coordinator: hand every cell of node NODE to the other nodes
    /// by live handover; the node exits by itself once it holds nothing
    /// (as on SIGTERM).
    Drain {
        /// The node id.
        node: u16,
    },
    /// Operator override (the admin epoch, u32::MAX): pin a cell to its
    /// current owner above every epoch. A handover of it in flight is
    /// aborted, any other shard's claim is dropped, and nothing moves,
    /// splits or merges it afterwards (it still fails over if its node
    /// dies). Logged loudly; for a cell that flaps or is claimed twice.
    Pin {
        /// The cell.
        cell: String,
    },
    /// Stop the node gracefully.
    Shutdown,
}

fn fetch(addr: SocketAddr, token: Option<&str>, command: &str) -> Result<String, String> {
    let answer = request_with(addr, token, command).map_err(|e| {
        format!("cannot reach the admin port {addr}: {e} (is the node running? pass --addr)")
    })?;
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&answer) {
        if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
            return Err(format!("the node refused {command:?}: {e}"));
        }
    }
    Ok(answer)
}

/// Runs an admin command.
pub fn run(args: AdminArgs) -> Result<(), String> {
    let check = |c: &str| -> Result<String, String> {
        c.parse::<tessera_cells::CellId>()
            .map(|_| c.to_string())
            .map_err(|e| e.to_string())
    };
    let command = match &args.command {
        AdminCommand::Status => "status".to_string(),
        AdminCommand::Cells => "cells".to_string(),
        AdminCommand::Handovers => "handovers".to_string(),
        AdminCommand::Move { cell, shard } => {
            shard
                .parse::<tessera_cells::ShardRef>()
                .map_err(|e| e.to_string())?;
            format!("move {} {shard}", check(cell)?)
        }
        AdminCommand::Split { cell } => format!("split {}", check(cell)?),
        AdminCommand::Merge { cell } => format!("merge {}", check(cell)?),
        AdminCommand::Drain { node } => format!("drain {node}"),
        AdminCommand::Pin { cell } => format!("pin {}", check(cell)?),
        AdminCommand::Shutdown => "shutdown".to_string(),
    };
    let token = args
        .token_file
        .as_deref()
        .map(read_admin_token)
        .transpose()?;
    let answer = fetch(args.addr, token.as_deref(), &command)?;
    if args.json || !matches!(args.command, AdminCommand::Status | AdminCommand::Cells) {
        match serde_json::from_str::<serde_json::Value>(&answer) {
            Ok(v) if !args.json => match v.get("ok").and_then(|o| o.as_str()) {
                Some(text) => println!("{text}"),
                None => println!(
                    "{}",
                    serde_json::to_string_pretty(&v).unwrap_or_else(|_| answer.trim().to_string())
                ),
            },
            _ => println!("{}", answer.trim()),
        }
        return Ok(());
    }
    if let Ok(cluster) = serde_json::from_str::<ClusterStatus>(&answer) {
        if !cluster.nodes.is_empty() || answer.contains("\"awaiting_compute_nodes\"") {
            print_cluster(&cluster, matches!(args.command, AdminCommand::Status));
            return Ok(());
        }
    }
    let status: Status = serde_json::from_str(&answer)
        .map_err(|e| format!("unexpected answer from the node: {e}"))?;
    if matches!(args.command, AdminCommand::Status) {
        println!(
            "uptime {:.0} s, {} Hz, {} sessions, {} entities, worst tick p99 {} us, registry v{}",
            status.uptime_s,
            status.tick_hz,
            status.sessions,
            status.entities,
            status.tick_us_p99,
            status.registry_version
        );
        println!(
            "{:>6} {:>4} {:>8} {:>9} {:>9} {:>8} {:>9} {:>9} {:>6} {:>7}",
            "shard",
            "cpu",
            "tick",
            "p50_us",
            "p99_us",
            "overrun",
            "sessions",
            "entities",
            "cells",
            "mailbox"
        );
        for s in &status.shards {
            println!(
                "{:>6} {:>4} {:>8} {:>9} {:>9} {:>8} {:>9} {:>9} {:>6} {:>7}",
                s.shard,
                s.cpu.map_or("-".into(), |c| c.to_string()),
                s.tick,
                s.tick_us_p50,
                s.tick_us_p99,
                s.overruns,
                s.sessions,
                s.entities,
                s.cells,
                s.mailbox_depth
            );
        }
    }
    println!(
        "{:>14} {:>6} {:>6} {:>9} {:>8} {:>7}",
        "cell", "owner", "epoch", "entities", "players", "ghosts"
    );
    for c in &status.cells {
        println!(
            "{:>14} {:>6} {:>6} {:>9} {:>8} {:>7}",
            c.cell, c.owner, c.epoch, c.entities, c.players, c.ghosts
        );
    }
    Ok(())
}
