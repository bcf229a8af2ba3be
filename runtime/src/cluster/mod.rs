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

pub mod auth;
pub mod etcd;
pub mod link;
pub mod service;
pub mod shard;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tessera_cells::wire::{ControlMsg, NodeInfo, NodeRole, Registration};
use tessera_cells::Registry;

pub use auth::ClusterKey;
pub use link::ControlLink;

/// The shard number a node's join link registers with (a shard's own link
/// uses its index).
pub const NODE_LINK: u16 = u16::MAX;

/// How a node joins a cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The coordinators' addresses (`tessera coord --listen`): the leader
    /// and its standbys, in any order.
    pub coords: Vec<SocketAddr>,
    /// This node's id (unique in the cluster).
    pub node: u16,
    /// Where shard 0's cluster link listens (shard s: port + s).
    pub cluster_addr: SocketAddr,
    /// What the node does.
    pub role: NodeRole,
    /// How long to wait for the coordinator at start.
    pub join_timeout: Duration,
    /// Cluster links are sealed under this key (every node and coordinator
    /// of the cluster shares it); None: links in clear text, open to
    /// anyone who reaches the ports (tests, a trusted private network).
    pub key: Option<ClusterKey>,
}

impl ClusterConfig {
    /// The coordinators, as `a,b` for messages.
    pub fn coords_text(&self) -> String {
        self.coords
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
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
    #[error("no coordinator answered at {addr} within {timeout:?}: start `tessera coord --listen ADDR` first, or check --coord")]
    Unreachable {
        /// The addresses tried.
        addr: String,
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
    #[error("the coordinators at {addr} accepted us but none sent a registry within {timeout:?} (the leader assigns cells once its --compute-nodes have registered; a standby waits for etcd to elect it)")]
    NoRegistry {
        /// The coordinators.
        addr: String,
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

/// Registers the node with every coordinator and waits for the leader's
/// registry (a standby says nothing until etcd elects it).
pub fn join(
    config: &ClusterConfig,
    shards: u16,
    game_addr: Option<SocketAddr>,
    incarnation: u64,
    tick_hz: u32,
) -> Result<Joined, JoinError> {
    let started = Instant::now();
    let register = ControlMsg::Register(Registration {
        node: config.node,
        shard: NODE_LINK,
        shards,
        role: config.role,
        incarnation,
        cluster_addr: config.cluster_addr,
        game_addr,
    });
    let mut links: Vec<Option<ControlLink>> = config.coords.iter().map(|_| None).collect();
    let mut heard = false;
    let mut directory = Vec::new();
    let mut welcome: Option<(u32, u32, u64)> = None;
    let mut waiting_logged = false;
    let result = loop {
        let elapsed = started.elapsed();
        if elapsed >= config.join_timeout {
            break Err(if heard {
                JoinError::NoRegistry {
                    addr: config.coords_text(),
                    timeout: config.join_timeout,
                }
            } else {
                JoinError::Unreachable {
                    addr: config.coords_text(),
                    timeout: config.join_timeout,
                }
            });
        }
        if !waiting_logged && elapsed > Duration::from_secs(2) && heard {
            waiting_logged = true;
            tracing::info!(coord = %config.coords_text(), node = config.node, "registered; waiting for the leading coordinator's registry (it assigns cells once enough compute nodes joined)");
        }
        for (i, slot) in links.iter_mut().enumerate() {
            if slot.is_none() {
                // Short tries: one coordinator down must not hold the others up.
                if let Ok(mut l) = ControlLink::connect(
                    config.coords[i],
                    Duration::from_millis(200),
                    config.key.as_ref(),
                ) {
                    l.send(&register);
                    heard = true;
                    *slot = Some(l);
                }
            }
        }
        let mut done = None;
        for slot in links.iter_mut() {
            let Some(link) = slot else { continue };
            let msgs = match link.pump(Duration::from_millis(20)) {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(error = %e, "coordinator link closed while joining");
                    *slot = None;
                    continue;
                }
            };
            for msg in msgs {
                match msg {
                    ControlMsg::Welcome {
                        cluster_epoch,
                        tick_hz: hz,
                        tick_origin_ms,
                    } => {
                        if welcome.is_none_or(|w| cluster_epoch >= w.0) {
                            welcome = Some((cluster_epoch, hz, tick_origin_ms));
                        }
                    }
                    ControlMsg::Directory(d) => directory = d,
                    ControlMsg::Registry(r) => done = Some(r),
                    other => tracing::debug!(kind = other.kind(), "ignored while joining"),
                }
            }
            if done.is_some() {
                break;
            }
        }
        if let Some(r) = done {
            let (_, hz, origin) = welcome.unwrap_or((0, tick_hz, 0));
            if hz != tick_hz {
                break Err(JoinError::TickRate {
                    cluster: hz,
                    ours: tick_hz,
                });
            }
            break Ok(Joined {
                registry: (*r).clone(),
                directory: std::mem::take(&mut directory),
                tick_hz: hz,
                tick_origin_ms: origin,
            });
        }
    };
    // The join links close (the coordinators forget them at once): the
    // shards open their own.
    for l in links.iter_mut().flatten() {
        l.close();
    }
    result
}
