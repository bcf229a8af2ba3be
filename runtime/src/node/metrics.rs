//! Prometheus text metrics over a tiny HTTP server on a helper thread.
//!
//! `GET /metrics`: per-shard tick duration histogram, overruns, mailbox
//! depth, sessions, packets and bytes in/out, drops by reason, entities per
//! cell. `GET /healthz`: `ok`. Anything else: 404. One request at a time,
//! bounded reads: this is for a scraper on the same host, not the internet.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::runtime::spawn_helper;
use crate::stats::StatsBoard;

use super::shared::NodeShared;

/// Bucket bounds of the tick duration histogram, seconds.
const TICK_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.25, 1.0,
];

/// Serves metrics until `stop` is set.
pub fn serve(
    listener: TcpListener,
    shared: Arc<NodeShared>,
    board: Arc<StatsBoard>,
    stop: Arc<AtomicBool>,
) -> io::Result<JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    spawn_helper("tessera-metrics", None, move || {
        while !stop.load(Ordering::Acquire) {
            match listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = answer(stream, &shared, &board) {
                        tracing::debug!(error = %e, "metrics request failed");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    })
}

/// Reads an HTTP request head (bounded) and returns its path.
pub(crate) fn read_request_path(stream: &mut TcpStream) -> io::Result<String> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 4096];
    let mut len = 0;
    while len < buf.len() {
        let n = stream.read(&mut buf[len..])?;
        if n == 0 {
            break;
        }
        len += n;
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") || buf[..len].contains(&b'\n') {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split_whitespace();
    let _method = parts.next();
    Ok(parts.next().unwrap_or("/").to_string())
}

fn answer(mut stream: TcpStream, shared: &NodeShared, board: &StatsBoard) -> io::Result<()> {
    let path = read_request_path(&mut stream)?;
    let (status, content_type, body) = match path.as_str() {
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", render(shared, board)),
        "/healthz" => ("200 OK", "text/plain", "ok\n".to_string()),
        _ => (
            "404 Not Found",
            "text/plain",
            "not found: try /metrics\n".to_string(),
        ),
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

/// A counter family: name, help text, and how to read it from a shard's stats.
type Counter<S> = (&'static str, &'static str, fn(&S) -> u64);

fn help(out: &mut String, name: &str, kind: &str, text: &str) {
    let _ = writeln!(out, "# HELP {name} {text}\n# TYPE {name} {kind}");
}

use crate::cluster::shard::ClusterCounters;

/// Cluster link counters, per shard (only on a clustered node).
fn render_cluster(o: &mut String, node_id: u16, node: &[Option<super::NodeShardStats>]) {
    let shards: Vec<(usize, crate::cluster::shard::ClusterCounters)> = node
        .iter()
        .enumerate()
        .filter_map(|(i, s)| Some((i, s.as_ref()?.cluster?)))
        .collect();
    if shards.is_empty() {
        return;
    }
    // Bundles, their messages and bytes, both ways.
    for (name, text, sent, received) in [
        (
            "tessera_cluster_bundles_total",
            "Shard bundles exchanged with other nodes' shards.",
            (|c: &ClusterCounters| c.bundles_sent) as fn(&ClusterCounters) -> u64,
            (|c: &ClusterCounters| c.bundles_received) as fn(&ClusterCounters) -> u64,
        ),
        (
            "tessera_cluster_frames_total",
            "Messages in those bundles.",
            |c| c.frames_sent,
            |c| c.frames_received,
        ),
        (
            "tessera_cluster_bytes_total",
            "Bytes of those bundles.",
            |c| c.bytes_sent,
            |c| c.bytes_received,
        ),
    ] {
        help(o, name, "counter", text);
        for (i, c) in &shards {
            for (direction, v) in [("sent", sent(c)), ("received", received(c))] {
                let _ = writeln!(
                    o,
                    "{name}{{node=\"{node_id}\",shard=\"{i}\",direction=\"{direction}\"}} {v}"
                );
            }
        }
    }
    help(
        o,
        "tessera_cluster_backlog_bytes",
        "gauge",
        "Bytes of bundles waiting for their link.",
    );
    for (i, c) in &shards {
        let _ = writeln!(
            o,
            "tessera_cluster_backlog_bytes{{node=\"{node_id}\",shard=\"{i}\"}} {}",
            c.backlog_bytes
        );
    }
    help(
        o,
        "tessera_cluster_refused_total",
        "counter",
        "Bundles and control frames refused on arrival, by reason.",
    );
    for (i, c) in &shards {
        for (reason, n) in c.refused.by_reason() {
            let _ = writeln!(o, "tessera_cluster_refused_total{{node=\"{node_id}\",shard=\"{i}\",reason=\"{reason}\"}} {n}");
        }
    }
    for (name, text, get) in [
        (
            "tessera_cluster_stale_epoch_total",
            "Handover steps from a stale epoch ignored on arrival.",
            (|c: &ClusterCounters| c.stale_epoch) as fn(&ClusterCounters) -> u64,
        ),
        (
            "tessera_cluster_send_refused_total",
            "Bundles dropped (too large for a link message, or the backlog full): their messages were lost.",
            |c| c.send_refused,
        ),
        (
            "tessera_cluster_no_route_total",
            "Bundles that waited for their destination's node to appear in the directory.",
            |c| c.no_route,
        ),
        (
            "tessera_cluster_backlogged_total",
            "Bundles that waited for their link (no route yet, queue full, reconnecting).",
            |c| c.backlogged,
        ),
        (
            "tessera_cluster_control_received_total",
            "Control frames received from the coordinator.",
            |c| c.control_received,
        ),
        (
            "tessera_cluster_links_opened_total",
            "Links opened to other nodes' shards.",
            |c| c.links_opened,
        ),
        (
            "tessera_cluster_links_closed_total",
            "Links to other nodes' shards that closed.",
            |c| c.links_closed,
        ),
        (
            "tessera_cluster_control_frames_total",
            "Control frames sent to the coordinator.",
            |c| c.control_sent,
        ),
        (
            "tessera_cluster_coordinator_redials_total",
            "Times the coordinator link was dialled again.",
            |c| c.coord_redials,
        ),
        (
            "tessera_cluster_stale_leader_frames_total",
            "Control frames from a coordinator below the newest cluster epoch (a deposed leader): ignored.",
            |c| c.stale_leader,
        ),
    ] {
        help(o, name, "counter", text);
        for (i, c) in &shards {
            let _ = writeln!(o, "{name}{{node=\"{node_id}\",shard=\"{i}\"}} {}", get(c));
        }
    }
    render_replica(o, node_id, node);
}

/// Replication, fencing and recovery, per shard (only on a clustered node).
fn render_replica(o: &mut String, node_id: u16, node: &[Option<super::NodeShardStats>]) {
    use tessera_cells::replica::ReplicaCounters as R;
    let shards: Vec<(usize, &super::NodeShardStats)> = node
        .iter()
        .enumerate()
        .filter_map(|(i, s)| Some((i, s.as_ref()?)))
        .collect();
    help(
        o,
        "tessera_shard_fenced",
        "gauge",
        "1 while the shard's lease is not valid: its cells are frozen until the coordinator renews it or gives them away.",
    );
    for (i, s) in &shards {
        let _ = writeln!(
            o,
            "tessera_shard_fenced{{node=\"{node_id}\",shard=\"{i}\"}} {}",
            u8::from(s.fenced)
        );
    }
    help(
        o,
        "tessera_shard_fences_total",
        "counter",
        "Times the shard's lease ran out after it had held one (cut from the coordinator, or a coordinator failover longer than the lease): its cells stopped.",
    );
    for (i, s) in &shards {
        let _ = writeln!(
            o,
            "tessera_shard_fences_total{{node=\"{node_id}\",shard=\"{i}\"}} {}",
            s.fences
        );
    }
    for (name, text, get) in [
        (
            "tessera_replica_rounds_sent_total",
            "Replication rounds sent to the shard's backup.",
            (|c: &R| c.rounds_sent) as fn(&R) -> u64,
        ),
        (
            "tessera_replica_full_rounds_total",
            "Full rounds among them (a new backup, or a resync).",
            |c| c.full_rounds,
        ),
        (
            "tessera_replica_entities_sent_total",
            "Entities carried, whole or changed, by those rounds.",
            |c| c.entities_sent,
        ),
        (
            "tessera_replica_rounds_applied_total",
            "Rounds applied as another shard's backup.",
            |c| c.rounds_applied,
        ),
        (
            "tessera_replica_resyncs_total",
            "Rounds a backup could not apply (it asked for a full one).",
            |c| c.resyncs,
        ),
        (
            "tessera_replica_rounds_ignored_total",
            "Rounds ignored as backup: older or repeated, or from a shard the registry says this one does not back up.",
            |c| c.rounds_ignored,
        ),
        (
            "tessera_replica_rounds_of_other_process_total",
            "Rounds turned away as backup because they come from another process of the owner than the one whose cells are held here and not yet promoted (a node restarted under its id before its cells failed over).",
            |c| c.rounds_of_other_process,
        ),
        (
            "tessera_replica_durable_retold_total",
            "Handovers into this shard reported durable again to a coordinator that took over while the registry still recorded the source's frozen copy.",
            |c| c.durable_retold,
        ),
        (
            "tessera_replica_missing_retold_total",
            "Cells of a lost handover target this shard had no replica of, reported again to a coordinator that took over before it gave them back to their frozen copy.",
            |c| c.missing_retold,
        ),
        (
            "tessera_replica_promoted_cells_total",
            "Cells of a lost shard run again from a replica here.",
            |c| c.promoted,
        ),
        (
            "tessera_replica_promoted_empty_total",
            "Cells of a lost shard restarted empty (no replica here).",
            |c| c.promoted_empty,
        ),
        (
            "tessera_replica_transfers_held_total",
            "Transfers to other shards held until their departure was replicated.",
            |c| c.transfers_held,
        ),
        (
            "tessera_replica_transfers_resent_total",
            "Kept transfers sent again after a shard was lost.",
            |c| c.transfers_resent,
        ),
        (
            "tessera_replica_transfers_too_old_to_resend_total",
            "Kept transfers left out of a resend after a loss: older than their receiver's memory of them.",
            |c| c.transfers_too_old_to_resend,
        ),
        (
            "tessera_replica_cells_superseded_total",
            "Cells dropped because they were restored elsewhere while this shard was cut off.",
            |c| c.cells_superseded,
        ),
    ] {
        help(o, name, "counter", text);
        for (i, s) in &shards {
            let _ = writeln!(
                o,
                "{name}{{node=\"{node_id}\",shard=\"{i}\"}} {}",
                get(&s.replica)
            );
        }
    }
}

/// The metrics page.
pub fn render(shared: &NodeShared, board: &StatsBoard) -> String {
    let mut o = String::with_capacity(16 << 10);
    let runtime = board.snapshot();
    let node = shared.stats();

    help(
        &mut o,
        "tessera_uptime_seconds",
        "gauge",
        "Seconds since the node started.",
    );
    let _ = writeln!(o, "tessera_uptime_seconds {:.3}", shared.uptime_seconds());

    help(
        &mut o,
        "tessera_tick_duration_seconds",
        "histogram",
        "Time spent in each tick, per shard.",
    );
    for s in runtime.iter().flatten() {
        let shard = s.shard.0;
        let h = &s.tick_duration_us;
        for le in TICK_BUCKETS {
            let count = h.count_between(0, (le * 1e6) as u64);
            let _ = writeln!(
                o,
                "tessera_tick_duration_seconds_bucket{{shard=\"{shard}\",le=\"{le}\"}} {count}"
            );
        }
        let _ = writeln!(
            o,
            "tessera_tick_duration_seconds_bucket{{shard=\"{shard}\",le=\"+Inf\"}} {}",
            h.len()
        );
        let _ = writeln!(
            o,
            "tessera_tick_duration_seconds_sum{{shard=\"{shard}\"}} {:.6}",
            h.mean() * h.len() as f64 / 1e6
        );
        let _ = writeln!(
            o,
            "tessera_tick_duration_seconds_count{{shard=\"{shard}\"}} {}",
            h.len()
        );
    }
    let gauges: [(&str, &str, &str); 3] = [
        (
            "tessera_tick_duration_p99_seconds",
            "gauge",
            "99th percentile tick duration since start, per shard.",
        ),
        (
            "tessera_tick_duration_recent_p99_seconds",
            "gauge",
            "99th percentile tick duration over the last publication interval (1 s), per shard.",
        ),
        (
            "tessera_tick_lateness_p99_seconds",
            "gauge",
            "99th percentile lateness of tick starts, per shard.",
        ),
    ];
    for (i, (name, kind, text)) in gauges.iter().enumerate() {
        help(&mut o, name, kind, text);
        for s in runtime.iter().flatten() {
            let v = match i {
                0 => s.tick_us(0.99),
                1 => s.tick_duration_us_recent.value_at_quantile(0.99),
                _ => s.lateness_us(0.99),
            };
            let _ = writeln!(o, "{name}{{shard=\"{}\"}} {:.6}", s.shard.0, v as f64 / 1e6);
        }
    }
    let counters: [Counter<crate::stats::ShardStats>; 7] = [
        ("tessera_ticks_total", "Ticks run.", |s| s.ticks),
        (
            "tessera_tick_overruns_total",
            "Ticks that ended after the next deadline.",
            |s| s.overruns,
        ),
        (
            "tessera_ticks_skipped_total",
            "Deadlines skipped after overruns.",
            |s| s.skipped_ticks,
        ),
        (
            "tessera_mailbox_messages_total",
            "Messages handed to stages.",
            |s| s.messages_handled,
        ),
        (
            "tessera_mailbox_rejected_full_total",
            "Messages refused by this shard's full mailbox.",
            |s| s.mailbox_rejected_full,
        ),
        (
            "tessera_undeliverable_total",
            "Messages for a stage that no longer exists (re-routed).",
            |s| s.undeliverable,
        ),
        (
            "tessera_park_kicks_total",
            "Parks the watchdog interrupted after a lost wake-up.",
            |s| s.park_kicks,
        ),
    ];
    for (name, text, get) in counters {
        help(&mut o, name, "counter", text);
        for s in runtime.iter().flatten() {
            let _ = writeln!(o, "{name}{{shard=\"{}\"}} {}", s.shard.0, get(s));
        }
    }
    help(
        &mut o,
        "tessera_mailbox_depth",
        "gauge",
        "Messages waiting in the shard's mailbox.",
    );
    for s in runtime.iter().flatten() {
        let _ = writeln!(
            o,
            "tessera_mailbox_depth{{shard=\"{}\"}} {}",
            s.shard.0, s.mailbox_depth
        );
    }

    help(
        &mut o,
        "tessera_admin_refused_total",
        "counter",
        "Admin requests refused: a peer off loopback without the admin token.",
    );
    let _ = writeln!(
        o,
        "tessera_admin_refused_total {}",
        shared
            .admin_refused
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    help(
        &mut o,
        "tessera_sessions",
        "gauge",
        "Client sessions hosted, per shard.",
    );
    for (i, s) in node.iter().enumerate() {
        if let Some(s) = s {
            let _ = writeln!(o, "tessera_sessions{{shard=\"{i}\"}} {}", s.sessions);
        }
    }
    let net: [Counter<NodeShardStats>; 14] = [
        (
            "tessera_avatars_parked_total",
            "Players' avatars parked when their session timed out (a token names the player), for the player's next session.",
            |s| s.gateway.avatars_parked,
        ),
        (
            "tessera_avatars_reclaimed_total",
            "Joins that took back the player's parked avatar.",
            |s| s.gateway.avatars_reclaimed,
        ),
        (
            "tessera_avatar_reclaims_refused_total",
            "Parked avatars gone when their player came back (a fresh join followed).",
            |s| s.gateway.reclaims_refused,
        ),
        (
            "tessera_resumes_requested_total",
            "Clients taking back their avatar at this gateway after losing theirs.",
            |s| s.gateway.resumes,
        ),
        (
            "tessera_resumes_total",
            "Avatars of this shard's cells taken back by a new session.",
            |s| s.world.counters.resumes,
        ),
        (
            "tessera_resumes_refused_total",
            "Resumes refused by the avatar's cell (wrong credential, avatar gone).",
            |s| s.world.counters.resumes_refused,
        ),
        (
            "tessera_sessions_handed_off_total",
            "Sessions told to resume at another gateway (this one drained).",
            |s| s.gateway.handed_off,
        ),
        (
            "tessera_players_lingered_out_total",
            "Avatars removed after their client stayed silent for the linger time (session lost, never resumed).",
            |s| s.world.counters.players_lingered_out,
        ),
        (
            "tessera_packets_received_total",
            "UDP datagrams received.",
            |s| s.endpoint.datagrams_received,
        ),
        ("tessera_packets_sent_total", "UDP datagrams sent.", |s| {
            s.endpoint.datagrams_sent
        }),
        ("tessera_bytes_received_total", "UDP bytes received.", |s| {
            s.endpoint.bytes_received
        }),
        ("tessera_bytes_sent_total", "UDP bytes sent.", |s| {
            s.endpoint.bytes_sent
        }),
        (
            "tessera_snapshots_sent_total",
            "Snapshots sent to clients.",
            |s| s.gateway.snapshots_sent,
        ),
        (
            "tessera_snapshot_bytes_total",
            "Bytes of snapshots sent.",
            |s| s.gateway.snapshot_bytes,
        ),
    ];
    for (name, text, get) in net {
        help(&mut o, name, "counter", text);
        for (i, s) in node.iter().enumerate() {
            if let Some(s) = s {
                let _ = writeln!(o, "{name}{{shard=\"{i}\"}} {}", get(s));
            }
        }
    }
    help(
        &mut o,
        "tessera_drops_total",
        "counter",
        "Things dropped or refused, by reason, per shard.",
    );
    for (i, s) in node.iter().enumerate() {
        let Some(s) = s else { continue };
        let e = &s.endpoint;
        let reasons: Vec<(&str, u64)> = vec![
            ("bad_header", e.dropped_bad_header),
            ("bad_version", e.dropped_bad_version),
            ("bad_body", e.dropped_bad_body),
            ("bad_frame", e.dropped_bad_frame),
            ("unknown_channel", e.dropped_unknown_channel),
            ("oversized", e.dropped_oversized),
            ("unknown_connection", e.dropped_unknown_connection),
            ("address_mismatch", e.dropped_address_mismatch),
            ("unexpected", e.dropped_unexpected),
            ("duplicate_packet", e.dropped_duplicate),
            ("too_old", e.dropped_too_old),
            ("receive_window", e.dropped_receive_window),
            ("event_queue_full", e.dropped_event_queue_full),
            ("short_handshake", e.dropped_short_handshake),
            ("bad_cookie", e.dropped_bad_cookie),
            ("expired_cookie", e.dropped_expired_cookie),
            ("connection_cap", e.rejected_full),
            ("bad_token", e.dropped_bad_token),
            ("token_expired", e.rejected_token_expired),
            ("token_wrong_address", e.rejected_token_wrong_address),
            ("token_in_use", e.rejected_token_in_use),
            ("token_required", e.rejected_token_required),
            ("bad_seal", e.dropped_bad_seal),
            ("unsealed", e.dropped_unsealed),
            ("peer_rate_limited", e.dropped_rate_limited),
            ("peer_closed_for_abuse", e.closed_for_abuse),
            ("address_handshake_rate", e.dropped_handshake_rate_limited),
            ("address_sessions", e.rejected_address_sessions),
            ("socket_truncated", s.socket.recv_truncated),
            ("socket_send_would_block", s.socket.send_would_block),
            ("send_queue_full", s.driver.send_refused),
            ("not_joined", s.gateway.not_joined),
            ("input_rate_limited", s.gateway.inputs_rate_limited),
            ("session_closed_for_flooding", s.gateway.closed_for_flooding),
            ("router_unknown_cell", s.router.cell_unknown),
            ("router_mailbox_full", s.driver.mailbox_refused),
            ("router_undeliverable", s.router.cell_undeliverable),
            ("router_entity_not_found", s.router.entity_not_found),
            ("remote_unreachable", s.driver.remote_unreachable),
            ("input_duplicate", s.world.counters.inputs_duplicate),
            ("input_unknown_entity", s.world.counters.unknown_entity),
            ("input_rejected", s.world.game.inputs_rejected),
            ("input_clamped", s.world.game.inputs_clamped),
            ("intent_dropped", s.world.counters.intents_dropped),
        ];
        for (reason, n) in reasons {
            let _ = writeln!(
                o,
                "tessera_drops_total{{shard=\"{i}\",reason=\"{reason}\"}} {n}"
            );
        }
        for (reason, n) in s.frames_refused.by_reason() {
            let _ = writeln!(
                o,
                "tessera_drops_total{{shard=\"{i}\",reason=\"frame_{reason}\"}} {n}"
            );
        }
    }
    help(
        &mut o,
        "tessera_transfers_total",
        "counter",
        "Entities handed between cells, per shard.",
    );
    for (i, s) in node.iter().enumerate() {
        if let Some(s) = s {
            let _ = writeln!(
                o,
                "tessera_transfers_total{{shard=\"{i}\",direction=\"in\"}} {}",
                s.world.counters.transfers_in
            );
            let _ = writeln!(
                o,
                "tessera_transfers_total{{shard=\"{i}\",direction=\"out\"}} {}",
                s.world.counters.transfers_out
            );
        }
    }
    render_cluster(&mut o, shared.node, &node);
    let c = shared.coordinator_stats();
    for (name, text, v) in [
        (
            "tessera_handovers_total",
            "Cell handovers committed.",
            c.counters.handovers,
        ),
        (
            "tessera_handover_aborts_total",
            "Cell handovers aborted.",
            c.counters.aborts,
        ),
        ("tessera_splits_total", "Cells split.", c.counters.splits),
        ("tessera_merges_total", "Cells merged.", c.counters.merges),
        (
            "tessera_coordinator_stale_events_total",
            "Reports about unknown or finished operations (ignored).",
            c.counters.stale_events,
        ),
    ] {
        help(&mut o, name, "counter", text);
        let _ = writeln!(o, "{name} {v}");
    }
    for (name, text, h) in [
        (
            "tessera_handover_freeze_seconds",
            "Freeze on the source to simulation on the target.",
            &c.freeze_us,
        ),
        (
            "tessera_handover_commit_seconds",
            "Decision to commit.",
            &c.commit_us,
        ),
    ] {
        help(&mut o, name, "summary", text);
        for q in [0.5, 0.99, 1.0] {
            let _ = writeln!(
                o,
                "{name}{{quantile=\"{q}\"}} {:.6}",
                h.value_at_quantile(q) as f64 / 1e6
            );
        }
        let _ = writeln!(o, "{name}_count {}", h.len());
    }
    help(
        &mut o,
        "tessera_stale_messages_total",
        "counter",
        "Handover messages with a stale epoch or for an unknown handover, ignored, per shard.",
    );
    for (i, s) in node.iter().enumerate() {
        if let Some(s) = s {
            let _ = writeln!(
                o,
                "tessera_stale_messages_total{{shard=\"{i}\"}} {}",
                s.handover.stale_ignored
            );
        }
    }
    help(
        &mut o,
        "tessera_cell_load_score",
        "gauge",
        "The coordinator's load score per cell.",
    );
    for (cell, score) in &c.scores {
        let _ = writeln!(o, "tessera_cell_load_score{{cell=\"{cell}\"}} {score:.3}");
    }
    for (name, text, idx) in [
        ("tessera_cell_entities", "Entities owned, per cell.", 0),
        ("tessera_cell_ghosts", "Ghosts held, per cell.", 1),
        ("tessera_cell_players", "Players, per cell.", 2),
    ] {
        help(&mut o, name, "gauge", text);
        for (i, s) in node.iter().enumerate() {
            let Some(s) = s else { continue };
            for c in &s.cells {
                let v = [c.entities, c.ghosts, c.players][idx];
                let cell = c.cell;
                let _ = writeln!(o, "{name}{{shard=\"{i}\",cell=\"{cell}\"}} {v}");
            }
        }
    }
    o
}

use super::shared::NodeShardStats;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use tessera_cells::{Geometry, Layout};
    use tessera_coord::{contiguous_blocks, Registry};

    #[test]
    fn renders_without_stats_and_with() {
        let layout = Arc::new(Layout::new(Geometry::new(0, 128.0, 2, 2)));
        let owners: BTreeMap<_, _> = contiguous_blocks(&layout, 2);
        let shared = NodeShared::new(Registry::new(layout, &owners).unwrap(), 2, 20);
        let board = StatsBoard::new(2);
        let empty = render(&shared, &board);
        assert!(empty.contains("tessera_uptime_seconds"));
        shared.publish(1, NodeShardStats::default());
        let text = render(&shared, &board);
        assert!(text.contains("tessera_sessions{shard=\"1\"} 0"));
        assert!(text.contains("# TYPE tessera_tick_duration_recent_p99_seconds gauge"));
        assert!(text.contains("tessera_drops_total{shard=\"1\",reason=\"frame_invalid\"} 0"));
        // Every sample line is "name{labels} value" or "name value".
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert_eq!(line.split_whitespace().count(), 2, "{line}");
        }
    }
}
