//! `tessera serve`: one node with the demo world.

use std::time::Duration;

use tessera_runtime::install_drain_on_signals;
use tessera_runtime::node::Node;

use crate::config::{node_config, ServeArgs};

/// Runs a node until SIGINT/SIGTERM (or `--duration`).
pub fn run(args: ServeArgs) -> Result<(), String> {
    let config = node_config(&args)?;
    let world = format!(
        "{}x{} cells of {} m, {} NPCs, {} Hz",
        config.geometry.columns,
        config.geometry.rows,
        config.geometry.cell_size,
        config.npcs,
        config.tick_hz
    );
    let development = config.tokens.as_ref().is_some_and(|t| t.development);
    let node = Node::start(config).map_err(|e| e.to_string())?;
    let stop = node.stop_handle();
    install_drain_on_signals(stop.clone(), node.shared().clone(), None)
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    println!(
        "tessera node listening on udp://{} ({world})",
        node.game_addr()
    );
    for (shard, cpu) in node.placement() {
        match cpu {
            Some(c) => println!("  {shard} -> CPU {c}"),
            None => println!("  {shard} -> unpinned"),
        }
    }
    if development {
        println!(
            "  development mode: loopback clients, tokens from {} (give --key FILE to serve players)",
            crate::token::dev_key_path().display()
        );
    }
    if let Some(a) = node.metrics_addr() {
        println!("  metrics: http://{a}/metrics");
    }
    if let Some(a) = node.admin_addr() {
        println!("  admin:   tessera admin --addr {a} status");
    }
    println!(
        "Ctrl-C stops it; clients: tessera client join --addr 127.0.0.1:{}",
        node.game_addr().port()
    );
    if let Some(seconds) = args.duration {
        let stop = stop.clone();
        std::thread::spawn(move || {
            if !stop.wait_timeout(Duration::from_secs_f64(seconds)) {
                stop.stop();
            }
        });
    }
    let shared = node.shared().clone();
    let reports = node.wait().map_err(|e| e.to_string())?;
    let stats = shared.stats();
    let sessions: usize = stats.iter().flatten().map(|s| s.sessions).sum();
    let snapshots: u64 = stats
        .iter()
        .flatten()
        .map(|s| s.gateway.snapshots_sent)
        .sum();
    println!(
        "stopped: {} shards, {snapshots} snapshots sent, {sessions} sessions at exit",
        reports.len()
    );
    for r in &reports {
        println!(
            "  {}: {} ticks, tick p50 {} us, p99 {} us, {} overruns",
            r.shard,
            r.ticks,
            r.tick_us(0.5),
            r.tick_us(0.99),
            r.overruns
        );
    }
    Ok(())
}
