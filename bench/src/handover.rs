//! `handover` suite: live cell handover on a real node.
//!
//! A 2-shard node whose world is one cell of `entities` NPCs; the cell is
//! handed from shard to shard `--moves` times by operator commands through
//! the embedded coordinator, and each handover's freeze time (the source
//! stops simulating the cell -> the target simulates it) and
//! decision-to-commit time come from the coordinator's records. With
//! `load`, 100 RUDP clients play in that cell during the handovers (an
//! input and an ack each tick); afterwards every client checks that the
//! server applied its last input, and the node's entity count is checked:
//! entities and inputs lost must be 0.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tessera_cells::{CellId, Geometry};
use tessera_net::driver::{BatchSocket, SocketConfig};
use tessera_net::{ChannelId, ConnectionHandle, Endpoint, Event, TransmitBatch};
use tessera_runtime::node::coordinator::AdminCommand;
use tessera_runtime::node::{Node, NodeConfig};
use tessera_schema::client::{self, ClientMessage, InputCmd};
use tessera_schema::flatbuffers::FlatBufferBuilder;
use tessera_schema::protocol::Channel;

use crate::report::Report;

/// Options of the `handover` suite.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A short run, for CI.
    #[arg(long)]
    pub quick: bool,
    /// Handovers per case.
    #[arg(long)]
    pub moves: Option<usize>,
}

struct Bot {
    connection: Option<ConnectionHandle>,
    joined: bool,
    seq: u32,
    applied: u32,
    ack: u64,
    sent: std::collections::VecDeque<(u32, Instant)>,
}

/// Result of a client load run.
pub(crate) struct Load {
    pub(crate) clients: usize,
    pub(crate) joined: usize,
    pub(crate) inputs_sent: u64,
    pub(crate) inputs_lost: u64,
    /// Input sent -> first snapshot whose `last_input_seq` covers it, us.
    pub(crate) visible_us: Histogram<u64>,
}

/// `n` clients on one socket: join, then an input and an ack every 50 ms
/// until `stop`; then a second of silence so that the last inputs land, and
/// the count of inputs the server never applied.
pub(crate) fn drive_clients(
    server: SocketAddr,
    n: usize,
    stop: Arc<AtomicBool>,
    ready: Arc<AtomicBool>,
    first_input: Instant,
) -> Load {
    let mut socket = BatchSocket::bind(
        "127.0.0.1:0".parse().expect("literal"),
        &SocketConfig {
            reuse_port: false,
            ..SocketConfig::default()
        },
    )
    .expect("client socket");
    let mut endpoint =
        Endpoint::new(tessera_net::Config::game_client(n + 1), 5).expect("client config");
    let mut fbb = FlatBufferBuilder::with_capacity(256);
    let mut batch = TransmitBatch::new(64);
    let now = Instant::now();
    let mut bots: Vec<Bot> = (0..n)
        .map(|_| Bot {
            connection: endpoint.connect(now, server).ok(),
            joined: false,
            seq: 0,
            applied: 0,
            ack: 0,
            sent: std::collections::VecDeque::new(),
        })
        .collect();
    let mut visible_us = Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let index_of =
        |bots: &[Bot], h: ConnectionHandle| bots.iter().position(|b| b.connection == Some(h));
    // Inputs go out on a fixed schedule from `first_input`: two drivers
    // given the same one send in the same phase of the server's ticks.
    let mut next_input = first_input;
    let mut quiet_until: Option<Instant> = None;
    let give_up = Instant::now() + Duration::from_secs(120);
    loop {
        let now = Instant::now();
        let _ = socket.receive_into(&mut endpoint, now, usize::MAX);
        while let Some(ev) = endpoint.poll_event() {
            match ev {
                Event::Connected { connection, .. } => {
                    let bytes = client::encode(
                        &mut fbb,
                        &ClientMessage::Join {
                            name: "bench".into(),
                            token: Vec::new(),
                        },
                    );
                    let _ = endpoint.send(connection, ChannelId(Channel::Reliable.id()), bytes);
                }
                Event::Message {
                    connection, bytes, ..
                } => {
                    if let (Some(i), Ok(frame)) = (
                        index_of(&bots, connection),
                        tessera_schema::verify::server_frame(&bytes),
                    ) {
                        if frame.msg_as_welcome().is_some() {
                            bots[i].joined = true;
                        }
                        if let Some(s) = frame.msg_as_snapshot() {
                            let b = &mut bots[i];
                            b.applied = b.applied.max(s.last_input_seq());
                            b.ack = b.ack.max(s.tick());
                            while b.sent.front().is_some_and(|(q, _)| *q <= b.applied) {
                                let (_, at) = b.sent.pop_front().expect("front");
                                let _ = visible_us
                                    .record((now.duration_since(at).as_micros() as u64).max(1));
                            }
                        }
                    }
                    endpoint.recycle(bytes);
                }
                _ => {}
            }
        }
        if bots.iter().all(|b| b.joined) {
            ready.store(true, Ordering::Release);
        }
        let stopping = stop.load(Ordering::Acquire);
        if stopping && quiet_until.is_none() {
            quiet_until = Some(now + Duration::from_secs(2));
        }
        if now >= next_input && !stopping {
            next_input += Duration::from_millis(50);
            for b in bots.iter_mut().filter(|b| b.joined) {
                let Some(h) = b.connection else { continue };
                b.seq += 1;
                if b.sent.len() < 1024 {
                    b.sent.push_back((b.seq, now));
                }
                let input = ClientMessage::Input(InputCmd {
                    input_seq: b.seq,
                    movement: [0.3, -0.2],
                    ..InputCmd::default()
                });
                let _ = endpoint.send(
                    h,
                    ChannelId(Channel::Reliable.id()),
                    client::encode(&mut fbb, &input),
                );
                if b.ack > 0 {
                    let _ = endpoint.send(
                        h,
                        ChannelId(Channel::Snapshots.id()),
                        client::encode(
                            &mut fbb,
                            &ClientMessage::Ack {
                                snapshot_tick: b.ack,
                            },
                        ),
                    );
                }
            }
        }
        let _ = socket.transmit_from(&mut endpoint, &mut batch, now);
        if quiet_until.is_some_and(|q| now >= q) || now > give_up {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let joined = bots.iter().filter(|b| b.joined).count();
    Load {
        clients: n,
        joined,
        inputs_sent: bots.iter().map(|b| u64::from(b.seq)).sum(),
        inputs_lost: bots
            .iter()
            .map(|b| u64::from(b.seq - b.applied.min(b.seq)))
            .sum(),
        visible_us,
    }
}

struct CaseResult {
    freeze_us: Histogram<u64>,
    commit_us: Histogram<u64>,
    committed: usize,
    aborted: usize,
    entities_lost: i64,
    load: Option<Load>,
}

fn run_case(entities: usize, clients: usize, moves: usize) -> Result<CaseResult, String> {
    let config = NodeConfig {
        bind: "127.0.0.1".parse().expect("literal"),
        port: 0,
        metrics_addr: None,
        admin_addr: None,
        shards: Some(2),
        pinned: false,
        npcs: entities,
        geometry: Geometry::new(0, 128.0, 1, 1),
        auto_balance: false,
        ..NodeConfig::default()
    };
    let node = Node::start(config).map_err(|e| e.to_string())?;
    let game = node.game_addr();
    let shared = node.shared().clone();
    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(AtomicBool::new(clients == 0));
    let driver = (clients > 0).then(|| {
        let (stop, ready) = (stop.clone(), ready.clone());
        std::thread::spawn(move || drive_clients(game, clients, stop, ready, Instant::now()))
    });
    let wait_until = |what: &str, f: &dyn Fn() -> bool, secs: u64| -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !f() {
            if Instant::now() > deadline {
                return Err(format!("timed out waiting for {what}"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    };
    wait_until("clients to join", &|| ready.load(Ordering::Acquire), 30)?;
    let cell = CellId::root(0, 0, 0);
    let count = |shared: &tessera_runtime::node::NodeShared| -> usize {
        shared
            .stats()
            .iter()
            .flatten()
            .map(|s| s.world.entities)
            .sum()
    };
    // Wait for a first publication of the world.
    std::thread::sleep(Duration::from_millis(1200));
    let before = count(&shared);
    for k in 0..moves {
        let owner = shared
            .registry()
            .get(cell)
            .ok_or("the cell has no owner")?
            .owner
            .shard;
        let target = 1 - owner;
        let finished = || {
            let c = shared.coordinator_counters();
            c.handovers + c.aborts
        };
        let finished_before = finished();
        node.command(AdminCommand::Move {
            cell,
            shard: tessera_coord::ShardRef::local(target),
        })
        .map_err(|e| format!("move {k}: {e}"))?;
        wait_until(
            "the handover to finish",
            &|| finished() > finished_before,
            10,
        )?;
        // Let the released source and the published registry settle.
        std::thread::sleep(Duration::from_millis(150));
    }
    stop.store(true, Ordering::Release);
    let load = driver.map(|d| d.join().expect("client driver"));
    std::thread::sleep(Duration::from_millis(1200));
    let after = count(&shared);
    let stats = shared.coordinator_stats();
    let mut freeze_us = Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let mut commit_us = Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let mut committed = 0;
    let mut aborted = 0;
    for r in &stats.recent {
        if r.committed {
            committed += 1;
            if let Some(f) = r.freeze {
                let _ = freeze_us.record((f.as_micros() as u64).max(1));
            }
            let _ = commit_us.record((r.decision_to_commit.as_micros() as u64).max(1));
        } else {
            aborted += 1;
        }
    }
    node.stop_handle().stop();
    node.wait().map_err(|e| e.to_string())?;
    Ok(CaseResult {
        freeze_us,
        commit_us,
        committed,
        aborted,
        entities_lost: before as i64 - after as i64,
        load,
    })
}

/// Runs the suite.
pub fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let moves = args.moves.unwrap_or(if args.quick { 6 } else { 40 });
    let sizes: &[usize] = if args.quick {
        &[100, 500]
    } else {
        &[100, 500, 2000]
    };
    let mut report = Report::new("handover", false);
    report.note(format!(
        "a 2-shard node (unpinned), world = one 128 m cell of N NPCs (plus 100 playing clients with load), handed between the shards {moves} times by operator commands; 20 Hz; freeze = source stops simulating -> target simulates, decision = command received by the coordinator; in-process, loopback; the client driver shares the 2 cores"
    ));
    for &n in sizes {
        for clients in [0usize, 100] {
            let case = if clients == 0 {
                format!("entities={n}")
            } else {
                format!("entities={n},clients={clients}")
            };
            eprintln!("handover: {case}");
            let r = run_case(n, clients, moves)?;
            let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
            report.push(
                &case,
                "tessera",
                "freeze_ms_p50",
                ms(&r.freeze_us, 0.5),
                "ms",
            );
            report.push(
                &case,
                "tessera",
                "freeze_ms_p99",
                ms(&r.freeze_us, 0.99),
                "ms",
            );
            report.push(
                &case,
                "tessera",
                "freeze_ms_max",
                r.freeze_us.max() as f64 / 1000.0,
                "ms",
            );
            report.push(
                &case,
                "tessera",
                "commit_ms_p50",
                ms(&r.commit_us, 0.5),
                "ms",
            );
            report.push(
                &case,
                "tessera",
                "commit_ms_p99",
                ms(&r.commit_us, 0.99),
                "ms",
            );
            report.push(
                &case,
                "tessera",
                "commit_ms_max",
                r.commit_us.max() as f64 / 1000.0,
                "ms",
            );
            report.push(
                &case,
                "tessera",
                "handovers_committed",
                r.committed as f64,
                "handovers",
            );
            report.push(
                &case,
                "tessera",
                "handovers_aborted",
                r.aborted as f64,
                "handovers",
            );
            report.push(
                &case,
                "tessera",
                "entities_lost",
                r.entities_lost as f64,
                "entities",
            );
            if let Some(l) = &r.load {
                report.push(
                    &case,
                    "tessera",
                    "clients_joined",
                    l.joined as f64,
                    "clients",
                );
                report.push(&case, "tessera", "clients", l.clients as f64, "clients");
                report.push(
                    &case,
                    "tessera",
                    "inputs_sent",
                    l.inputs_sent as f64,
                    "inputs",
                );
                report.push(
                    &case,
                    "tessera",
                    "inputs_lost",
                    l.inputs_lost as f64,
                    "inputs",
                );
            } else {
                report.push(&case, "tessera", "inputs_lost", 0.0, "inputs");
            }
        }
    }
    report.note("targets: freeze_ms_p99 <= 50 (one tick at 20 Hz); commit_ms_p99 <= 150 (3 ticks) for 500 entities; entities_lost = inputs_lost = 0".to_string());
    report.finish()?;
    Ok(())
}
