//! Many nodes, one world: the IO side of a Tessera cluster.
//!
//! - [`link::ControlLink`]: a blocking RUDP link to the coordinator (a
//!   node's join at start, `tessera admin`-style tools).
//! - [`shard::ClusterSide`]: what one shard of a clustered node adds to its
//!   loop: a cluster endpoint on its own UDP port (shard 0 on the node's
//!   `--cluster-addr`, shard s on port + s), links to other nodes' shards
//!   opened on demand, one bundle per destination per loop turn, and its
//!   own link to the coordinator (registration, heartbeats, reports in;
//!   registry, directory, orders out).
//! - [`service::CoordService`]: the standalone coordinator (`tessera coord`).
//!
//! Frames are those of `tessera_cells::wire`; this module only moves bytes.

pub mod link;
pub mod service;
pub mod shard;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tessera_cells::wire::{ControlMsg, NodeInfo, NodeRole, Registration};
use tessera_cells::Registry;

pub use link::ControlLink;

/// The shard number a node's join link registers with (a shard's own link
/// uses its index).
pub const NODE_LINK: u16 = u16::MAX;

/// How a node joins a cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The coordinator's address (`tessera coord --listen`).
    pub coord: SocketAddr,
    /// This node's id (unique in the cluster).
    pub node: u16,
    /// Where shard 0's cluster link listens (shard s: port + s).
    pub cluster_addr: SocketAddr,
    /// What the node does.
    pub role: NodeRole,
    /// How long to wait for the coordinator at start.
    pub join_timeout: Duration,
}

/// What a node learns when it joins.
#[derive(Clone, Debug)]
pub struct Joined {
    /// The registry (cells may already be owned by this node's shards).
    pub registry: Registry,
    /// Every node known so far.
    pub directory: Vec<NodeInfo>,
    /// The cluster's tick rate.
    pub tick_hz: u32,
    /// Unix time (ms) of the cluster's tick 0.
    pub tick_origin_ms: u64,
}

/// Where a joining node's tick clock starts: the next cluster tick
/// boundary after now (an `Instant`) and that tick's number, so that every
/// node runs tick k at about the same wall time (as well as the machines'
/// clocks agree) and numbers it alike.
pub fn tick_alignment(tick_origin_ms: u64, tick_hz: u32) -> (Instant, u64) {
    let period_ns = 1_000_000_000u128 / u128::from(tick_hz.max(1));
    let now = Instant::now();
    let unix_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let origin_ns = u128::from(tick_origin_ms) * 1_000_000;
    let elapsed = unix_ns.saturating_sub(origin_ns);
    let next = elapsed / period_ns + 1;
    let wait = (next * period_ns).saturating_sub(elapsed);
    (now + Duration::from_nanos(wait as u64), next as u64)
}

/// Why a node could not join.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// Nobody answered.
    #[error("no coordinator answered at {addr} within {timeout:?}: start `tessera coord --listen {addr}` first, or check --coord")]
    Unreachable {
        /// The address tried.
        addr: SocketAddr,
        /// How long we waited.
        timeout: Duration,
    },
    /// The link broke.
    #[error("the coordinator at {addr} closed the link: {reason}")]
    Closed {
        /// The coordinator.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The registry did not come in time (the coordinator waits for more
    /// compute nodes, usually).
    #[error("the coordinator at {addr} accepted us but sent no registry within {timeout:?} (it assigns cells once its --compute-nodes have registered)")]
    NoRegistry {
        /// The coordinator.
        addr: SocketAddr,
        /// How long we waited.
        timeout: Duration,
    },
    /// Our tick rate differs from the cluster's.
    #[error("the cluster ticks at {cluster} Hz, this node at {ours} Hz: pass --tick-hz {cluster}")]
    TickRate {
        /// The cluster's.
        cluster: u32,
        /// Ours.
        ours: u32,
    },
    /// The socket could not be opened.
    #[error("cannot open a socket to reach the coordinator: {0}")]
    Io(#[from] std::io::Error),
}

/// Registers the node with the coordinator and waits for the registry.
pub fn join(
    config: &ClusterConfig,
    shards: u16,
    game_addr: Option<SocketAddr>,
    incarnation: u64,
    tick_hz: u32,
) -> Result<Joined, JoinError> {
    let started = Instant::now();
    let mut link = ControlLink::connect(config.coord, config.join_timeout)?;
    link.send(&ControlMsg::Register(Registration {
        node: config.node,
        shard: NODE_LINK,
        shards,
        role: config.role,
        incarnation,
        cluster_addr: config.cluster_addr,
        game_addr,
    }));
    // A failed join closes its link (the coordinator forgets it at once).
    let result = wait_for_registry(&mut link, config, started, tick_hz);
    if result.is_err() {
        link.close();
    }
    result
}

fn wait_for_registry(
    link: &mut ControlLink,
    config: &ClusterConfig,
    started: Instant,
    tick_hz: u32,
) -> Result<Joined, JoinError> {
    let mut directory = Vec::new();
    let mut cluster_hz = None;
    let mut origin = 0;
    let mut waiting_logged = false;
    loop {
        let elapsed = started.elapsed();
        if elapsed >= config.join_timeout {
            return Err(JoinError::NoRegistry {
                addr: config.coord,
                timeout: config.join_timeout,
            });
        }
        if !waiting_logged && elapsed > Duration::from_secs(2) {
            waiting_logged = true;
            tracing::info!(coord = %config.coord, node = config.node, "registered; waiting for the coordinator's registry (it assigns cells once enough compute nodes joined)");
        }
        for msg in link.pump(Duration::from_millis(50))? {
            match msg {
                ControlMsg::Welcome {
                    tick_hz: hz,
                    tick_origin_ms,
                    ..
                } => {
                    origin = tick_origin_ms;
                    if hz != tick_hz {
                        return Err(JoinError::TickRate {
                            cluster: hz,
                            ours: tick_hz,
                        });
                    }
                    cluster_hz = Some(hz);
                }
                ControlMsg::Directory(d) => directory = d,
                ControlMsg::Registry(r) => {
                    link.close();
                    return Ok(Joined {
                        registry: (*r).clone(),
                        directory,
                        tick_hz: cluster_hz.unwrap_or(tick_hz),
                        tick_origin_ms: origin,
                    });
                }
                other => tracing::debug!(kind = other.kind(), "ignored while joining"),
            }
        }
    }
}
