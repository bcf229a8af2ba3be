//! The admin port: a line protocol on a TCP port.
//!
//! A client connects, writes one command line, reads one JSON document and
//! the connection closes. Commands: `status`, `cells`, `handovers`,
//! `move CELL SHARD`, `split CELL`, `merge CELL`, `shutdown`. Errors come
//! back as `{"error": "..."}`.
//!
//! Loopback peers are always answered. Any other peer must start its line
//! with `token TOKEN ` ([`AdminAccess`]); without a configured token only
//! loopback is answered, and a node refuses to bind a non-loopback admin
//! address at all.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::runtime::{spawn_helper, StopHandle};
use crate::stats::StatsBoard;

use super::coordinator::{AdminCommand, CoordInput, CoordSender};
use super::shared::NodeShared;
use tessera_cells::CellId;

/// Longest command line accepted.
const LINE_MAX: u64 = 1024;

/// One shard in a status answer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ShardStatus {
    /// The shard.
    pub shard: u16,
    /// Its CPU, if pinned.
    pub cpu: Option<usize>,
    /// Last tick.
    pub tick: u64,
    /// Tick duration p99, microseconds.
    pub tick_us_p99: u64,
    /// Tick duration p50, microseconds.
    pub tick_us_p50: u64,
    /// Ticks that overran.
    pub overruns: u64,
    /// Sessions hosted.
    pub sessions: usize,
    /// Entities owned.
    pub entities: usize,
    /// Cells owned.
    pub cells: usize,
    /// Messages waiting in its mailbox.
    pub mailbox_depth: u64,
}

/// One cell in a status answer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CellStatus {
    /// The cell (`world:cx,cy[/quadrants]`).
    pub cell: String,
    /// Owning shard.
    pub owner: u16,
    /// Its node (0 outside a cluster).
    #[serde(default)]
    pub node: u16,
    /// The cell's epoch.
    pub epoch: u32,
    /// Entities owned.
    pub entities: usize,
    /// Players among them.
    pub players: usize,
    /// Ghosts held.
    pub ghosts: usize,
}

/// The answer to `status`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// Seconds since start.
    pub uptime_s: f64,
    /// Ticks per second.
    pub tick_hz: u32,
    /// Registry version.
    pub registry_version: u64,
    /// Every shard.
    pub shards: Vec<ShardStatus>,
    /// Every cell.
    pub cells: Vec<CellStatus>,
    /// Sessions, all shards.
    pub sessions: usize,
    /// Entities, all shards.
    pub entities: usize,
    /// Worst shard's tick p99, microseconds.
    pub tick_us_p99: u64,
}

/// Builds the status document.
pub fn status(shared: &NodeShared, board: &StatsBoard) -> Status {
    let runtime = board.snapshot();
    let node = shared.stats();
    let registry = shared.registry();
    let mut shards = Vec::new();
    for (i, r) in runtime.iter().enumerate() {
        let n = node.get(i).cloned().flatten();
        shards.push(ShardStatus {
            shard: i as u16,
            cpu: r.as_ref().and_then(|r| r.cpu),
            tick: n.as_ref().map_or(0, |n| n.tick),
            tick_us_p99: r.as_ref().map_or(0, |r| r.tick_us(0.99)),
            tick_us_p50: r.as_ref().map_or(0, |r| r.tick_us(0.5)),
            overruns: r.as_ref().map_or(0, |r| r.overruns),
            sessions: n.as_ref().map_or(0, |n| n.sessions),
            entities: n.as_ref().map_or(0, |n| n.world.entities),
            cells: registry
                .cells_of(tessera_coord::ShardRef {
                    node: shared.node,
                    shard: i as u16,
                })
                .len(),
            mailbox_depth: r.as_ref().map_or(0, |r| r.mailbox_depth),
        });
    }
    let mut cells = Vec::new();
    for (cell, a) in registry.iter() {
        // Counts are known for this node's cells only (a cluster's
        // coordinator has the whole picture).
        let counts = (a.owner.node == shared.node)
            .then(|| node.get(a.owner.shard as usize).cloned().flatten())
            .flatten()
            .and_then(|n| n.cells.iter().find(|c| c.cell == cell).copied());
        let (entities, ghosts, players) =
            counts.map_or((0, 0, 0), |c| (c.entities, c.ghosts, c.players));
        cells.push(CellStatus {
            cell: cell.to_string(),
            owner: a.owner.shard,
            node: a.owner.node,
            epoch: a.epoch,
            entities,
            players,
            ghosts,
        });
    }
    Status {
        uptime_s: shared.uptime_seconds(),
        tick_hz: shared.tick_hz,
        registry_version: registry.version(),
        sessions: shards.iter().map(|s| s.sessions).sum(),
        entities: shards.iter().map(|s| s.entities).sum(),
        tick_us_p99: shards.iter().map(|s| s.tick_us_p99).max().unwrap_or(0),
        shards,
        cells,
    }
}

/// Who an admin port answers besides loopback peers.
#[derive(Clone, Debug, Default)]
pub struct AdminAccess {
    /// The token a non-loopback peer presents; None: loopback only.
    pub token: Option<String>,
    /// Requests refused (a peer off loopback without the right token).
    pub refused: Arc<std::sync::atomic::AtomicU64>,
}

impl AdminAccess {
    /// Fails when `addr` is reachable off loopback and no token guards it.
    pub fn check_bind(&self, addr: std::net::SocketAddr, flag: &str) -> Result<(), String> {
        if addr.ip().is_loopback() || self.token.is_some() {
            return Ok(());
        }
        Err(format!(
            "the admin port answers loopback only unless given a token: {flag} {addr} needs --admin-token-file FILE"
        ))
    }

    /// The command of `line` if `peer` may run it: a loopback peer, or one
    /// whose line starts with the right `token TOKEN`.
    fn admit<'a>(&self, peer: std::net::SocketAddr, line: &'a str) -> Option<&'a str> {
        let (presented, command) = match line.trim_start().strip_prefix("token ") {
            Some(rest) => {
                let rest = rest.trim_start();
                let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                (Some(&rest[..end]), &rest[end..])
            }
            None => (None, line),
        };
        if peer.ip().is_loopback() {
            return Some(command);
        }
        match (&self.token, presented) {
            (Some(want), Some(got)) if constant_time_eq(want.as_bytes(), got.as_bytes()) => {
                Some(command)
            }
            _ => None,
        }
    }
}

/// Equality whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads an admin token file: its first line that is not empty or a `#`
/// comment, at least 16 characters without whitespace.
pub fn read_admin_token(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the admin token file {}: {e}", path.display()))?;
    let token = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or_else(|| format!("{}: no token in the file", path.display()))?;
    if token.len() < 16 || token.contains(char::is_whitespace) {
        return Err(format!(
            "{}: an admin token is at least 16 characters without spaces (`tessera token key` makes one)",
            path.display()
        ));
    }
    Ok(token.to_string())
}

/// Serves the admin port until `stop` is set.
pub fn serve(
    listener: TcpListener,
    shared: Arc<NodeShared>,
    board: Arc<StatsBoard>,
    node_stop: StopHandle,
    coord: CoordSender,
    access: AdminAccess,
    stop: Arc<AtomicBool>,
) -> io::Result<JoinHandle<()>> {
    serve_lines(listener, "tessera-admin", access, stop, move |line| {
        reply(line, &shared, &board, &node_stop, &coord)
    })
}

/// Serves a one-line-in, one-JSON-out protocol on `listener` until `stop`
/// is set (the node's and the coordinator's admin ports): each connection
/// sends a command line, gets `answer`'s reply and a newline, and closes.
pub(crate) fn serve_lines(
    listener: TcpListener,
    thread: &str,
    access: AdminAccess,
    stop: Arc<AtomicBool>,
    answer: impl Fn(&str) -> io::Result<String> + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    spawn_helper(thread, None, move || {
        while !stop.load(Ordering::Acquire) {
            match listener.accept() {
                Ok((stream, peer)) => {
                    let guarded = |line: &str| match access.admit(peer, line) {
                        Some(command) => answer(command),
                        None => {
                            access.refused.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(%peer, "admin request refused: not loopback, no valid token");
                            Ok(serde_json::json!({ "error": "refused: the admin port answers loopback, or a peer presenting the admin token" }).to_string())
                        }
                    };
                    if let Err(e) = answer_one(stream, &guarded) {
                        tracing::debug!(%peer, error = %e, "admin request failed");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    })
}

fn answer_one(stream: TcpStream, answer: &impl Fn(&str) -> io::Result<String>) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    BufReader::new((&stream).take(LINE_MAX)).read_line(&mut line)?;
    let reply = answer(&line)?;
    let mut stream = stream;
    stream.write_all(reply.as_bytes())?;
    stream.write_all(b"\n")?;
    stream.flush()
}

fn command(coord: &CoordSender, command: AdminCommand) -> String {
    let (tx, rx) = crossbeam_channel::bounded(1);
    if coord
        .send(CoordInput::Admin { command, reply: tx })
        .is_err()
    {
        return serde_json::json!({ "error": "the coordinator is not running" }).to_string();
    }
    match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Ok(text)) => serde_json::json!({ "ok": text }).to_string(),
        Ok(Err(e)) => serde_json::json!({ "error": e }).to_string(),
        Err(_) => serde_json::json!({ "error": "the coordinator did not answer" }).to_string(),
    }
}

fn parse_cell(word: Option<&str>) -> Result<CellId, String> {
    word.ok_or_else(|| "a cell is needed, e.g. 0:2,3".to_string())?
        .parse::<CellId>()
        .map_err(|e| e.to_string())
}

fn reply(
    line: &str,
    shared: &NodeShared,
    board: &StatsBoard,
    node_stop: &StopHandle,
    coord: &CoordSender,
) -> io::Result<String> {
    let mut words = line.split_whitespace();
    let first = words.next();
    if shared.clustered && matches!(first, Some("move" | "split" | "merge" | "pin")) {
        return Ok(serde_json::json!({ "error": "this node is part of a cluster: send move, split, merge and pin to the coordinator's admin port (tessera admin --addr COORD_ADMIN ...)" }).to_string());
    }
    let reply = match first {
        Some("status") | Some("cells") => serde_json::to_string(&status(shared, board)).map_err(io::Error::other)?,
        Some("move") => match (parse_cell(words.next()), words.next().map(str::parse::<u16>)) {
            (Ok(cell), Some(Ok(shard))) => command(coord, AdminCommand::Move { cell, shard: tessera_coord::ShardRef { node: shared.node, shard } }),
            (Err(e), _) => serde_json::json!({ "error": e }).to_string(),
            _ => serde_json::json!({ "error": "usage: move CELL SHARD" }).to_string(),
        },
        Some("split") => match parse_cell(words.next()) {
            Ok(cell) => command(coord, AdminCommand::Split { cell }),
            Err(e) => serde_json::json!({ "error": e }).to_string(),
        },
        Some("merge") => match parse_cell(words.next()) {
            Ok(cell) => command(coord, AdminCommand::Merge { cell }),
            Err(e) => serde_json::json!({ "error": e }).to_string(),
        },
        Some("pin") => match parse_cell(words.next()) {
            Ok(cell) => command(coord, AdminCommand::Pin { cell }),
            Err(e) => serde_json::json!({ "error": e }).to_string(),
        },
        Some("handovers") => {
            let c = shared.coordinator_stats();
            let recent: Vec<serde_json::Value> = c
                .recent
                .iter()
                .rev()
                .take(50)
                .map(|r| {
                    serde_json::json!({
                        "handover": r.id.0, "cell": r.cell.to_string(), "from": r.from.shard, "to": r.to.shard, "epoch": r.epoch,
                        "entities": r.entities, "committed": r.committed, "abort": r.abort.map(|a| format!("{a:?}")),
                        "decision_to_commit_ms": r.decision_to_commit.as_secs_f64() * 1e3,
                        "freeze_ms": r.freeze.map(|f| f.as_secs_f64() * 1e3), "cause": r.cause,
                    })
                })
                .collect();
            serde_json::json!({
                "handovers": c.counters.handovers, "aborts": c.counters.aborts, "splits": c.counters.splits,
                "merges": c.counters.merges, "stale_events": c.counters.stale_events,
                "freeze_ms_p50": c.freeze_us.value_at_quantile(0.5) as f64 / 1e3,
                "freeze_ms_p99": c.freeze_us.value_at_quantile(0.99) as f64 / 1e3,
                "commit_ms_p99": c.commit_us.value_at_quantile(0.99) as f64 / 1e3,
                "recent": recent,
            })
            .to_string()
        }
        Some("shutdown") => {
            tracing::warn!("shutdown requested on the admin port");
            node_stop.stop();
            "{\"ok\":true}".to_string()
        }
        Some(other) => serde_json::json!({
            "error": format!("unknown command {other:?}: try status, cells, handovers, move CELL SHARD, split CELL, merge CELL, pin CELL, shutdown")
        })
        .to_string(),
        None => serde_json::json!({ "error": "empty command" }).to_string(),
    };
    Ok(reply)
}

/// Sends one command to an admin port and returns the JSON answer (used by
/// `tessera admin`).
pub fn request(addr: std::net::SocketAddr, command: &str) -> io::Result<String> {
    request_with(addr, None, command)
}

/// As [`request`], presenting `token` (an admin port off loopback needs it).
pub fn request_with(
    addr: std::net::SocketAddr,
    token: Option<&str>,
    command: &str,
) -> io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    if let Some(t) = token {
        stream.write_all(format!("token {t} ").as_bytes())?;
    }
    stream.write_all(command.as_bytes())?;
    stream.write_all(b"\n")?;
    let mut out = String::new();
    stream.take(16 << 20).read_to_string(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_loopback_only_the_right_token_gets_a_command_through() {
        let local: std::net::SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let remote: std::net::SocketAddr = "10.1.2.3:5000".parse().unwrap();
        let open = AdminAccess::default();
        assert_eq!(open.admit(local, "status\n"), Some("status\n"));
        assert_eq!(open.admit(remote, "status\n"), None);
        assert_eq!(open.admit(remote, "token anything status\n"), None);
        let guarded = AdminAccess {
            token: Some("s3cret-admin-token".into()),
            ..AdminAccess::default()
        };
        assert_eq!(
            guarded.admit(remote, "token s3cret-admin-token split 0:1,1\n"),
            Some(" split 0:1,1\n")
        );
        assert_eq!(
            guarded.admit(remote, "token s3cret-admin-tokeX status"),
            None
        );
        assert_eq!(guarded.admit(remote, "token s3cret status"), None);
        assert_eq!(guarded.admit(remote, "status"), None);
        // Loopback may present it too (the same `tessera admin` everywhere).
        assert_eq!(
            guarded.admit(local, "token whatever status"),
            Some(" status")
        );
        assert!(open.check_bind(remote, "--admin-addr").is_err());
        assert!(guarded.check_bind(remote, "--admin-addr").is_ok());
        assert!(open.check_bind(local, "--admin-addr").is_ok());
    }

    proptest::proptest! {
        /// Whatever line a peer off loopback sends, it gets through only
        /// with the exact token in front, and parsing never panics.
        #[test]
        fn no_line_gets_through_off_loopback_without_the_token(line in ".{0,200}", prefix in proptest::bool::ANY) {
            let remote: std::net::SocketAddr = "10.1.2.3:5000".parse().unwrap();
            let token = "0123456789abcdef-admin";
            let guarded = AdminAccess { token: Some(token.into()), ..AdminAccess::default() };
            let sent = if prefix { format!("token {token} {line}") } else { line.clone() };
            let admitted = guarded.admit(remote, &sent).is_some();
            let honest = sent.trim_start().strip_prefix("token ").is_some_and(|r| {
                r.split_whitespace().next() == Some(token)
            });
            proptest::prop_assert_eq!(admitted, honest);
            proptest::prop_assert!(AdminAccess::default().admit(remote, &sent).is_none());
        }
    }
}
