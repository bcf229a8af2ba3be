//! `cluster` suite: a Tessera cluster in one process, on loopback, each node
//! on its own address (127.0.0.2, .3, .4).
//!
//! - Cross-node handover: a cell of N NPCs handed between two compute nodes
//!   `--moves` times by operator commands on the standalone coordinator;
//!   freeze and decision-to-commit times from its records; entities lost.
//! - Input -> visible latency, same node vs through a gateway: 50 clients
//!   on the node that owns the world's only cell, then 50 clients through a
//!   gateway node (their avatars live on the compute node), same run.
//! - Inter-node bytes: per ghost (two compute nodes sharing a border, NPCs
//!   only: ghost updates and the transfers of NPCs crossing it), and per
//!   remote client (the gateway case: inputs and acks one way, snapshots the
//!   other).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tessera_cells::wire::NodeRole;
use tessera_cells::Geometry;
use tessera_runtime::cluster::service::{CoordService, CoordServiceConfig};
use tessera_runtime::cluster::ClusterConfig;
use tessera_runtime::node::admin::request;
use tessera_runtime::node::{Node, NodeConfig};

use crate::handover::drive_clients;
use crate::report::Report;

/// Options of the `cluster` suite.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A short run, for CI.
    #[arg(long)]
    pub quick: bool,
    /// Handovers per entity count.
    #[arg(long)]
    pub moves: Option<usize>,
}

/// A free UDP port on `ip` (for a process started right after).
pub(crate) fn free_port(ip: &str) -> u16 {
    std::net::UdpSocket::bind((ip, 0))
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A coordinator and nodes in this process.
struct Cluster {
    coord: CoordService,
    admin: SocketAddr,
    nodes: Vec<Node>,
}

impl Cluster {
    /// `nodes`: (id, ip, role, npcs); the coordinator waits for the
    /// compute ones.
    fn start(
        world: (i32, i32),
        nodes: &[(u16, &str, NodeRole, usize)],
        still_npcs: bool,
    ) -> Result<Cluster, String> {
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
            .parse()
            .expect("addr");
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
            .parse()
            .expect("addr");
        let mut policy = tessera_coord::Policy::new(1);
        policy.automatic = false;
        let computes = nodes.iter().filter(|n| n.2.computes()).count();
        let coord = CoordService::start(CoordServiceConfig {
            listen,
            admin: Some(admin),
            admin_token: None,
            geometry: Geometry::new(0, 128.0, world.0, world.1),
            tick_hz: 20,
            compute_nodes: computes,
            policy,
            etcd: None,
            lease_follows_ttl: false,
            // Sealed links, as a deployment runs them.
            cluster_key: Some(bench_cluster_key()),
        })
        .map_err(|e| e.to_string())?;
        let configs: Vec<NodeConfig> = nodes
            .iter()
            .map(|&(id, ip, role, npcs)| NodeConfig {
                bind: ip.parse().expect("ip"),
                port: 0,
                metrics_addr: None,
                admin_addr: None,
                shards: Some(1),
                pinned: false,
                npcs,
                geometry: Geometry::new(0, 128.0, world.0, world.1),
                auto_balance: false,
                demo: tessera_cells::demo::DemoConfig {
                    npc_speed: if still_npcs { 0.0 } else { 2.0 },
                    ..Default::default()
                },
                cluster: Some(ClusterConfig {
                    coords: vec![listen],
                    node: id,
                    cluster_addr: format!("{ip}:{}", free_port(ip)).parse().expect("addr"),
                    role,
                    join_timeout: Duration::from_secs(30),
                    key: Some(bench_cluster_key()),
                }),
                ..NodeConfig::default()
            })
            .collect();
        // Compute nodes wait for each other: start them together.
        let started: Vec<Result<Node, String>> = std::thread::scope(|s| {
            let handles: Vec<_> = configs
                .into_iter()
                .map(|c| s.spawn(move || Node::start(c).map_err(|e| e.to_string())))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("start"))
                .collect()
        });
        let nodes = started.into_iter().collect::<Result<Vec<_>, _>>()?;
        let c = Cluster {
            coord,
            admin,
            nodes,
        };
        c.wait("every shard linked", 20, |st| {
            st["shards"]
                .as_array()
                .is_some_and(|s| !s.is_empty() && s.iter().all(|x| x["linked"] == true))
        })?;
        Ok(c)
    }

    fn status(&self) -> serde_json::Value {
        request(self.admin, "status")
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }

    fn wait(
        &self,
        what: &str,
        secs: u64,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if f(&self.status()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("timed out waiting for {what}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn entities(&self) -> u64 {
        self.status()["shards"]
            .as_array()
            .map_or(0, |s| s.iter().filter_map(|x| x["entities"].as_u64()).sum())
    }

    /// Bytes sent between nodes so far (all shards of all nodes).
    fn bytes_sent(&self) -> u64 {
        self.nodes
            .iter()
            .flat_map(|n| n.shared().stats())
            .flatten()
            .filter_map(|s| s.cluster.map(|c| c.bytes_sent))
            .sum()
    }

    fn ghosts(&self) -> u64 {
        self.nodes
            .iter()
            .flat_map(|n| n.shared().stats())
            .flatten()
            .flat_map(|s| s.cells.into_iter().map(|c| c.ghosts as u64))
            .sum()
    }

    fn stop(self) {
        for n in self.nodes {
            n.stop_handle().stop();
            let _ = n.wait();
        }
        self.coord.stop_flag().store(true, Ordering::Release);
        self.coord.wait();
    }
}

struct HandoverCase {
    freeze_us: Histogram<u64>,
    commit_us: Histogram<u64>,
    committed: usize,
    aborted: usize,
    entities_lost: i64,
}

/// A one-cell world of N wandering NPCs over two compute nodes: the cell
/// goes back and forth between them (no NPC can leave it, so the entity
/// count before and after is exact).
fn handover_case(entities: usize, moves: usize) -> Result<HandoverCase, String> {
    let c = Cluster::start(
        (1, 1),
        &[
            (1, "127.0.0.2", NodeRole::Compute, entities),
            (2, "127.0.0.3", NodeRole::Compute, entities),
        ],
        false,
    )?;
    std::thread::sleep(Duration::from_millis(1500));
    let before = c.entities();
    let cell = "0:0,0";
    for k in 0..moves {
        let st = c.status();
        let owner = st["cells"]
            .as_array()
            .and_then(|cs| cs.iter().find(|x| x["cell"] == cell))
            .and_then(|x| x["owner"].as_str())
            .unwrap_or("")
            .to_string();
        let to = if owner == "node-1/shard-0" {
            "2/0"
        } else {
            "1/0"
        };
        let done_before =
            st["handovers"].as_u64().unwrap_or(0) + st["aborts"].as_u64().unwrap_or(0);
        let answer = request(c.admin, &format!("move {cell} {to}")).map_err(|e| e.to_string())?;
        if answer.contains("\"error\"") {
            return Err(format!("move {k}: {answer}"));
        }
        c.wait("the handover", 15, |st| {
            st["handovers"].as_u64().unwrap_or(0) + st["aborts"].as_u64().unwrap_or(0) > done_before
        })?;
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let after = c.entities();
    let text = request(c.admin, "handovers").map_err(|e| e.to_string())?;
    let h: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let mut r = HandoverCase {
        freeze_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
        commit_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
        committed: 0,
        aborted: 0,
        entities_lost: before as i64 - after as i64,
    };
    for rec in h["recent"].as_array().cloned().unwrap_or_default() {
        if rec["committed"] == true {
            r.committed += 1;
            if let Some(f) = rec["freeze_ms"].as_f64() {
                let _ = r.freeze_us.record(((f * 1000.0) as u64).max(1));
            }
            if let Some(d) = rec["decision_to_commit_ms"].as_f64() {
                let _ = r.commit_us.record(((d * 1000.0) as u64).max(1));
            }
        } else {
            r.aborted += 1;
        }
    }
    c.stop();
    Ok(r)
}

struct LatencyCase {
    same_node: crate::handover::Load,
    via_gateway: crate::handover::Load,
    bytes_per_remote_client_s: f64,
}

/// One cell on a compute node that also hosts sessions, plus a gateway:
/// `clients` play on the owner itself, then as many through the gateway.
fn latency_case(clients: usize, secs: u64) -> Result<LatencyCase, String> {
    let c = Cluster::start(
        (1, 1),
        &[
            (1, "127.0.0.2", NodeRole::Both, 200),
            (2, "127.0.0.4", NodeRole::Gateway, 0),
        ],
        false,
    )?;
    // Both groups at once, inputs on one schedule: they wait for the same
    // ticks, so the difference is the gateway's hop.
    let stop = Arc::new(AtomicBool::new(false));
    let first_input = Instant::now() + Duration::from_millis(500);
    let spawn = |addr: SocketAddr| {
        let ready = Arc::new(AtomicBool::new(false));
        let (s, r) = (stop.clone(), ready.clone());
        (
            ready,
            std::thread::spawn(move || drive_clients(addr, clients, s, r, first_input)),
        )
    };
    let (ready_a, same) = spawn(c.nodes[0].game_addr());
    let (ready_b, gateway) = spawn(c.nodes[1].game_addr());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(ready_a.load(Ordering::Acquire) && ready_b.load(Ordering::Acquire))
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let bytes_before = c.bytes_sent();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let bytes = c.bytes_sent() - bytes_before;
    let elapsed = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Release);
    let same_node = same.join().expect("client driver");
    let via_gateway = gateway.join().expect("client driver");
    c.stop();
    Ok(LatencyCase {
        same_node,
        via_gateway,
        bytes_per_remote_client_s: bytes as f64 / elapsed / clients.max(1) as f64,
    })
}

/// Two compute nodes sharing a border, NPCs only: bytes between them per
/// ghost per second.
fn ghost_case(npcs: usize, secs: u64) -> Result<(f64, f64), String> {
    let c = Cluster::start(
        (2, 1),
        &[
            (1, "127.0.0.2", NodeRole::Compute, npcs),
            (2, "127.0.0.3", NodeRole::Compute, npcs),
        ],
        false,
    )?;
    std::thread::sleep(Duration::from_millis(2500));
    let b0 = c.bytes_sent();
    let t0 = Instant::now();
    let mut ghost_samples = Vec::new();
    while t0.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(1000));
        ghost_samples.push(c.ghosts() as f64);
    }
    let bytes = (c.bytes_sent() - b0) as f64 / t0.elapsed().as_secs_f64();
    let ghosts = ghost_samples.iter().sum::<f64>() / ghost_samples.len().max(1) as f64;
    c.stop();
    Ok((bytes / ghosts.max(1.0), ghosts))
}

/// Runs the suite.
pub fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let moves = args.moves.unwrap_or(if args.quick { 6 } else { 30 });
    let sizes: &[usize] = if args.quick {
        &[100, 500]
    } else {
        &[100, 500, 2000]
    };
    let secs = if args.quick { 4 } else { 10 };
    let mut report = Report::new("cluster", false);
    report.note(format!(
        "one process: a standalone coordinator and single-shard nodes (unpinned) on their own loopback addresses, 20 Hz, talking over the cluster links (RUDP, FlatBuffers bundles); the clients share the machine's 2 cores with them; handovers: {moves} moves of cell 0:0,0 between two compute nodes by operator commands"
    ));
    for &n in sizes {
        let case = format!("handover,entities={n}");
        eprintln!("cluster: {case}");
        let r = handover_case(n, moves)?;
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
    }
    eprintln!("cluster: latency");
    let l = latency_case(50, secs)?;
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    for (case, load) in [
        ("visible,same-node", &l.same_node),
        ("visible,via-gateway", &l.via_gateway),
    ] {
        report.push(
            case,
            "tessera",
            "input_to_visible_ms_p50",
            ms(&load.visible_us, 0.5),
            "ms",
        );
        report.push(
            case,
            "tessera",
            "input_to_visible_ms_p99",
            ms(&load.visible_us, 0.99),
            "ms",
        );
        report.push(
            case,
            "tessera",
            "clients_joined",
            load.joined as f64,
            "clients",
        );
        report.push(
            case,
            "tessera",
            "inputs_lost",
            load.inputs_lost as f64,
            "inputs",
        );
    }
    report.push(
        "visible,via-gateway",
        "tessera",
        "added_ms_p50",
        ms(&l.via_gateway.visible_us, 0.5) - ms(&l.same_node.visible_us, 0.5),
        "ms",
    );
    report.push(
        "bytes,remote-client",
        "tessera",
        "internode_bytes_per_client_s",
        l.bytes_per_remote_client_s,
        "B/s",
    );
    eprintln!("cluster: ghosts");
    let (per_ghost, ghosts) = ghost_case(if args.quick { 1000 } else { 4000 }, secs)?;
    report.push(
        "bytes,ghosts",
        "tessera",
        "internode_bytes_per_ghost_s",
        per_ghost,
        "B/s",
    );
    report.push("bytes,ghosts", "tessera", "ghosts", ghosts, "ghosts");
    report.note("targets: freeze_ms_p99 <= 50 (one tick at 20 Hz), commit_ms_p99 <= 150 (3 ticks); entities_lost = inputs_lost = 0; bytes per ghost include the transfers of NPCs crossing the border".to_string());
    report.finish()?;
    Ok(())
}

/// The key the bench's cluster links are sealed under.
fn bench_cluster_key() -> tessera_runtime::cluster::ClusterKey {
    tessera_runtime::cluster::ClusterKey {
        keys: vec![tessera_net::token::TokenKey([0xB7; 32])],
    }
}
