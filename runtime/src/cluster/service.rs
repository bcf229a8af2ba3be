//! The standalone coordinator (`tessera coord --listen ADDR`).
//!
//! One thread owns the decision logic ([`tessera_coord::Coordinator`]) and
//! a RUDP endpoint. Nodes join (a node link registers the node and waits
//! for the registry; then each shard opens its own link, registers and
//! heartbeats); once `compute_nodes` compute nodes have joined, the world's
//! cells are spread over their shards in contiguous blocks. From then on:
//! reports in, balancing, registry and directory pushed to every shard on
//! change (the registry before any order that relies on it: one ordered
//! channel per link), orders out. An admin port answers `status`,
//! `handovers`, `move CELL NODE/SHARD`, `split CELL`, `merge CELL`.

use std::collections::BTreeMap;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use serde::{Deserialize, Serialize};
use tessera_cells::wire::{
    decode_control, encode_control, ControlMsg, NodeInfo, NodeRole, Registration, ShardHeader,
    COORDINATOR,
};
use tessera_cells::{CellId, Geometry, Layout, Registry, ShardRef, TickId};
use tessera_coord::{contiguous_blocks, Coordinator, HandoverRecord, Policy};
use tessera_net::driver::{BatchSocket, SocketConfig};
use tessera_net::{ConnectionHandle, Endpoint, Event, TransmitBatch};
use tessera_schema::FrameErrorCounts;

use super::link::CLUSTER_CHANNEL;
use super::NODE_LINK;
use crate::node::coordinator::AdminCommand;
use crate::runtime::spawn_helper;

/// How the coordinator runs.
#[derive(Clone, Debug)]
pub struct CoordServiceConfig {
    /// Where nodes reach it (UDP).
    pub listen: SocketAddr,
    /// Its admin port (TCP), None to disable.
    pub admin: Option<SocketAddr>,
    /// The token a peer off loopback presents to the admin port; None:
    /// loopback only (and the admin port may not bind elsewhere).
    pub admin_token: Option<String>,
    /// The world's shape.
    pub geometry: Geometry,
    /// The cluster's tick rate (nodes must match).
    pub tick_hz: u32,
    /// Compute nodes to wait for before the cells are assigned.
    pub compute_nodes: usize,
    /// Balancing tunables (its shard count is replaced by the members).
    pub policy: Policy,
    /// Lead through etcd (a standby until elected); None: lead alone.
    pub etcd: Option<super::etcd::EtcdConfig>,
    /// With etcd: the node lease becomes the leader TTL etcd granted + 1 s
    /// at each election (the operator did not set `--lease`).
    pub lease_follows_ttl: bool,
    /// Links from nodes must present a token under this key, and are
    /// sealed; None: clear text, open to anyone who reaches the port.
    pub cluster_key: Option<super::ClusterKey>,
}

/// One shard in the cluster status.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ClusterShard {
    /// `node-N/shard-S`.
    pub shard: String,
    /// The node's role.
    pub role: String,
    /// Linked to the coordinator now.
    pub linked: bool,
    /// Last heartbeat's tick.
    pub tick: u64,
    /// Sessions it hosts.
    pub sessions: u32,
    /// Entities it owns.
    pub entities: u32,
    /// Cells it owns.
    pub cells: usize,
    /// Milliseconds since its last heartbeat.
    pub heard_ms_ago: u64,
}

/// One node in the cluster status.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClusterNode {
    /// The node.
    pub node: u16,
    /// Its role.
    pub role: String,
    /// Its shards.
    pub shards: u16,
    /// Shard 0's cluster address.
    pub cluster_addr: String,
    /// Its game address, if it hosts sessions.
    pub game_addr: Option<String>,
    /// Declared dead (silent for longer than `dead_after`).
    pub dead: bool,
    /// Draining: cells it still owns (None: not draining).
    #[serde(default)]
    pub draining_cells_left: Option<usize>,
}

/// A lost shard whose cells were given to its backup.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ClusterFailover {
    /// The lost shard.
    pub shard: String,
    /// Where its cells went.
    pub to: String,
    /// How many cells it had.
    pub cells: usize,
    /// Last heartbeat to declared dead, ms.
    pub detection_ms: f64,
    /// When it was declared dead, Unix ms (this machine's clock).
    #[serde(default)]
    pub declared_unix_ms: f64,
    /// Declared dead to the backup running the cells, ms.
    pub served_ms: Option<f64>,
    /// Ticks of state lost.
    pub ticks_lost: Option<u64>,
    /// Cells without a replica (restarted empty).
    pub missing: usize,
    /// Entities restored.
    pub entities: usize,
}

/// One cell in the cluster status.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClusterCell {
    /// The cell.
    pub cell: String,
    /// Its owner, `node-N/shard-S`.
    pub owner: String,
    /// Its epoch.
    pub epoch: u32,
    /// Its last load score.
    pub score: f64,
}

/// The answer to `status` on the coordinator's admin port.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ClusterStatus {
    /// Seconds since the coordinator started.
    pub uptime_s: f64,
    /// The cluster epoch.
    pub cluster_epoch: u32,
    /// Registry version (0: cells not assigned yet).
    pub registry_version: u64,
    /// Compute nodes still awaited before the cells are assigned.
    pub awaiting_compute_nodes: usize,
    /// Nodes.
    pub nodes: Vec<ClusterNode>,
    /// Shards.
    pub shards: Vec<ClusterShard>,
    /// Cells.
    pub cells: Vec<ClusterCell>,
    /// Operations in flight.
    pub in_flight: usize,
    /// Handovers committed.
    pub handovers: u64,
    /// Handovers aborted.
    pub aborts: u64,
    /// Splits done.
    pub splits: u64,
    /// Merges done.
    pub merges: u64,
    /// Control frames refused, all reasons.
    pub frames_refused: u64,
    /// Owner shard -> the shard replicating its cells (`a->b`).
    #[serde(default)]
    pub backups: Vec<String>,
    /// Failovers, oldest first (the last 200).
    #[serde(default)]
    pub failovers: Vec<ClusterFailover>,
    /// `leader`, `standby` (waiting for etcd to elect it) or `alone` (no
    /// etcd).
    #[serde(default)]
    pub role: String,
    /// Times this coordinator was elected.
    #[serde(default)]
    pub elections: u64,
    /// Heartbeats and reports left alone (received as a standby), and
    /// heartbeats of a restarted node whose old cells still fail over.
    #[serde(default)]
    pub ignored_as_standby: u64,
    /// Registry versions written to etcd before being published.
    #[serde(default)]
    pub registry_writes: u64,
}

#[derive(Default)]
struct Board {
    status: ClusterStatus,
    recent: std::collections::VecDeque<HandoverRecord>,
    failovers: std::collections::VecDeque<ClusterFailover>,
}

struct Peer {
    node: u16,
    shard: u16,
}

struct ShardEntry {
    connection: Option<ConnectionHandle>,
    last_heard: Instant,
    tick: u64,
    sessions: u32,
    entities: u32,
}

struct NodeEntry {
    info: NodeInfo,
    incarnation: u64,
    /// Its heartbeats say it drains.
    draining: bool,
}

enum AdminInput {
    Command(AdminCommand, Sender<Result<String, String>>),
}

/// A running coordinator.
pub struct CoordService {
    thread: Option<JoinHandle<()>>,
    admin_thread: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    listen: SocketAddr,
    admin: Option<SocketAddr>,
}

/// Why the coordinator could not start.
#[derive(Debug, thiserror::Error)]
pub enum CoordServiceError {
    /// A port is taken or the address is wrong.
    #[error("cannot bind {what} {addr}: {source}")]
    Bind {
        /// "listen" or "admin".
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// A setting is out of range.
    #[error("invalid setting: {0}")]
    Invalid(String),
    /// etcd did not answer at start.
    #[error("{0}")]
    Etcd(#[from] super::etcd::EtcdError),
}

impl CoordService {
    /// Binds, starts the loop and the admin port.
    pub fn start(config: CoordServiceConfig) -> Result<Self, CoordServiceError> {
        if !(10..=60).contains(&config.tick_hz) {
            return Err(CoordServiceError::Invalid(format!(
                "tick rate {} Hz is outside 10..=60",
                config.tick_hz
            )));
        }
        if config.compute_nodes == 0 {
            return Err(CoordServiceError::Invalid(
                "--compute-nodes must be at least 1".into(),
            ));
        }
        let socket = BatchSocket::bind(
            config.listen,
            &SocketConfig {
                reuse_port: false,
                ..SocketConfig::default()
            },
        )
        .map_err(|source| CoordServiceError::Bind {
            what: "listen address",
            addr: config.listen,
            source,
        })?;
        let listen = socket.local_addr();
        let access = crate::node::admin::AdminAccess {
            token: config.admin_token.clone(),
            ..Default::default()
        };
        if let Some(a) = config.admin {
            access
                .check_bind(a, "--admin-addr")
                .map_err(CoordServiceError::Invalid)?;
        }
        let admin_listener = config
            .admin
            .map(|a| {
                TcpListener::bind(a).map_err(|source| CoordServiceError::Bind {
                    what: "admin address",
                    addr: a,
                    source,
                })
            })
            .transpose()?;
        let admin = admin_listener.as_ref().and_then(|l| l.local_addr().ok());
        let leadership = config
            .etcd
            .clone()
            .map(super::etcd::Leadership::start)
            .transpose()?;
        let stop = Arc::new(AtomicBool::new(false));
        let board = Arc::new(Mutex::new(Board::default()));
        let (admin_tx, admin_rx) = crossbeam_channel::bounded(16);
        let mut state = Loop::new(config, socket, board.clone(), admin_rx);
        state.leadership = leadership;
        let s = stop.clone();
        let thread = spawn_helper("tessera-coord", None, move || state.run(&s))
            .map_err(|e| CoordServiceError::Invalid(e.to_string()))?;
        let admin_thread = match admin_listener {
            Some(l) => Some(
                serve_admin(l, board, admin_tx, access, stop.clone())
                    .map_err(|e| CoordServiceError::Invalid(e.to_string()))?,
            ),
            None => None,
        };
        tracing::info!(%listen, admin = ?admin, "coordinator started");
        Ok(Self {
            thread: Some(thread),
            admin_thread,
            stop,
            listen,
            admin,
        })
    }

    /// Where nodes reach it.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// Its admin address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// A flag that stops it when set.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Waits until stopped.
    pub fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.admin_thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for CoordService {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

struct Loop {
    config: CoordServiceConfig,
    endpoint: Endpoint,
    socket: BatchSocket,
    batch: TransmitBatch,
    peers: BTreeMap<ConnectionHandle, Peer>,
    nodes: BTreeMap<u16, NodeEntry>,
    shards: BTreeMap<ShardRef, ShardEntry>,
    coord: Option<Coordinator>,
    published: u64,
    directory_version: u64,
    directory_sent: u64,
    seq: u64,
    refused: FrameErrorCounts,
    board: Arc<Mutex<Board>>,
    admin: Receiver<AdminInput>,
    started: Instant,
    cluster_epoch: u32,
    tick_origin_ms: u64,
    /// Through etcd: None until elected (and after losing it).
    leadership: Option<super::etcd::Leadership>,
    leading: bool,
    /// The newest registry version etcd holds, and the one being written.
    durable: u64,
    writing: Option<u64>,
    elections: u64,
    ignored_as_standby: u64,
    registry_writes: u64,
    /// Nodes whose drain request was refused (logged once).
    drain_refused: std::collections::BTreeSet<u16>,
    /// Gateways dead or draining, left out of the directory.
    gateways_out: std::collections::BTreeSet<u16>,
}

impl Loop {
    fn new(
        config: CoordServiceConfig,
        socket: BatchSocket,
        board: Arc<Mutex<Board>>,
        admin: Receiver<AdminInput>,
    ) -> Self {
        let seed = tessera_net::driver::os_seed().unwrap_or(0xC00D);
        let mut endpoint =
            Endpoint::new(tessera_net::Config::cluster(4096), seed).expect("valid cluster config");
        if let Some(key) = &config.cluster_key {
            key.guard(&mut endpoint, vec![config.listen, socket.local_addr()]);
        }
        let batch = TransmitBatch::new(socket.batch_size());
        Self {
            config,
            endpoint,
            socket,
            batch,
            peers: BTreeMap::new(),
            nodes: BTreeMap::new(),
            shards: BTreeMap::new(),
            coord: None,
            published: 0,
            directory_version: 0,
            directory_sent: 0,
            seq: 0,
            refused: FrameErrorCounts::default(),
            board,
            admin,
            started: Instant::now(),
            cluster_epoch: 1,
            tick_origin_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            leadership: None,
            leading: false,
            durable: 0,
            writing: None,
            elections: 0,
            ignored_as_standby: 0,
            registry_writes: 0,
            drain_refused: std::collections::BTreeSet::new(),
            gateways_out: std::collections::BTreeSet::new(),
        }
    }

    /// True while this coordinator may speak for the cluster: always when
    /// it runs alone; through etcd, while it surely holds the leader lease.
    fn leads(&self, now: Instant) -> bool {
        match &self.leadership {
            None => true,
            Some(l) => self.leading && l.valid_until().is_some_and(|t| now < t),
        }
    }

    fn leadership_events(&mut self, now: Instant) {
        while let Some(ev) = self.leadership.as_ref().and_then(|l| l.poll()) {
            match ev {
                super::etcd::LeaderEvent::Elected {
                    epoch,
                    registry,
                    meta,
                } => self.elected(epoch, registry, meta, now),
                super::etcd::LeaderEvent::Written { epoch, version } => {
                    // A write of an earlier term says nothing of this one.
                    if epoch == self.cluster_epoch && self.leading {
                        self.durable = version;
                        self.writing = None;
                        self.registry_writes += 1;
                    }
                }
                super::etcd::LeaderEvent::Lost { why } => {
                    tracing::error!(cluster_epoch = self.cluster_epoch, %why, "no longer the leader: standing by");
                    self.leading = false;
                    self.coord = None;
                    self.durable = 0;
                    self.writing = None;
                }
            }
        }
    }

    fn elected(
        &mut self,
        epoch: u32,
        registry: Option<Vec<u8>>,
        meta: Option<super::etcd::ClusterMeta>,
        now: Instant,
    ) {
        self.elections += 1;
        self.leading = true;
        let ttl_ms = self.leadership.as_ref().map_or(0, |l| l.ttl_s() * 1000);
        if self.config.lease_follows_ttl {
            // etcd may have granted more than asked: the failover must
            // still fit inside the node lease.
            self.config.policy.lease = Duration::from_millis(ttl_ms + 1000);
        }
        if (self.config.policy.lease.as_millis() as u64) < ttl_ms + 1000 {
            tracing::warn!(
                lease_ms = self.config.policy.lease.as_millis() as u64,
                leader_ttl_ms = ttl_ms,
                "node leases are shorter than a coordinator failover (etcd's leader TTL + 1 s): nodes will stop their cells while a standby takes over"
            );
        }
        self.durable = 0;
        self.writing = None;
        self.cluster_epoch = epoch;
        match meta {
            Some(m) => {
                if m.tick_hz != self.config.tick_hz {
                    tracing::error!(
                        cluster = m.tick_hz,
                        ours = self.config.tick_hz,
                        "the cluster ticks at another rate than --tick-hz: keeping the cluster's"
                    );
                    self.config.tick_hz = m.tick_hz;
                }
                self.tick_origin_ms = m.tick_origin_ms;
            }
            None => {
                if let Some(l) = &self.leadership {
                    l.write_meta(super::etcd::ClusterMeta {
                        tick_origin_ms: self.tick_origin_ms,
                        tick_hz: self.config.tick_hz,
                    });
                }
            }
        }
        let stored = registry.and_then(|b| match decode_control(&b) {
            Ok((_, ControlMsg::Registry(r))) => Some((*r).clone()),
            Ok((_, other)) => {
                tracing::error!(
                    kind = other.kind(),
                    "etcd's registry key holds another message: ignored"
                );
                None
            }
            Err(e) => {
                tracing::error!(error = %e, "etcd's registry copy does not decode: ignored");
                None
            }
        });
        match stored {
            Some(registry) => {
                let mut policy = self.config.policy.clone();
                let members = self.compute_members();
                policy.shards = members.len() as u16;
                let mut coord = Coordinator::taking_over(registry, policy, epoch);
                coord.set_members(members);
                self.cluster_epoch = coord.registry().cluster_epoch();
                tracing::warn!(
                    cluster_epoch = self.cluster_epoch,
                    cells = coord.registry().len(),
                    nodes = self.nodes.len(),
                    "took over the registry etcd held"
                );
                self.coord = Some(coord);
            }
            None => {
                self.coord = None;
                self.members_changed();
            }
        }
        // The registry names the process each node's cells belong to: a
        // node that restarted meanwhile lost them.
        self.register_known(now);
        // Every node learns the new epoch first: older orders are void.
        let conns: Vec<ConnectionHandle> = self.peers.keys().copied().collect();
        let welcome = ControlMsg::Welcome {
            cluster_epoch: self.cluster_epoch,
            tick_hz: self.config.tick_hz,
            tick_origin_ms: self.tick_origin_ms,
        };
        for c in &conns {
            self.send(*c, &welcome);
        }
        self.directory_sent = self.directory_version.wrapping_sub(1);
        self.published = 0;
        let _ = now;
    }

    fn run(mut self, stop: &AtomicBool) {
        let mut next_tick = Instant::now();
        let mut next_board = Instant::now();
        while !stop.load(Ordering::Acquire) {
            let now = Instant::now();
            let wait = self
                .endpoint
                .poll_timeout()
                .map_or(Duration::from_millis(10), |t| {
                    t.saturating_duration_since(now)
                })
                .min(next_tick.saturating_duration_since(now))
                .min(Duration::from_millis(10));
            self.socket.wait_readable(wait);
            let now = Instant::now();
            self.leadership_events(now);
            let _ = self.socket.receive_into(&mut self.endpoint, now, 64);
            self.endpoint.handle_timeout(now);
            while let Some(ev) = self.endpoint.poll_event() {
                self.event(ev, now);
            }
            while let Ok(AdminInput::Command(cmd, reply)) = self.admin.try_recv() {
                let _ = reply.send(self.admin_command(cmd, now));
            }
            if now >= next_tick {
                if self.leads(now) {
                    if let Some(c) = &mut self.coord {
                        c.tick(now);
                    }
                }
                self.watch_gateways();
                // Often enough that a node's death is seen within a tick
                // of `dead_after`.
                next_tick = now + Duration::from_millis(25);
                if now >= next_board {
                    next_board = now + Duration::from_millis(100);
                    self.publish_board(now);
                }
            }
            self.push_changes();
            let _ = self
                .socket
                .transmit_from(&mut self.endpoint, &mut self.batch, now);
        }
        self.endpoint.disconnect_all(Instant::now(), 0);
        let _ = self
            .socket
            .transmit_from(&mut self.endpoint, &mut self.batch, Instant::now());
        tracing::info!("coordinator stopped");
    }

    fn send(&mut self, to: ConnectionHandle, msg: &ControlMsg) {
        self.seq += 1;
        let header = ShardHeader {
            epoch: self.cluster_epoch,
            ..ShardHeader::control(COORDINATOR, self.seq, TickId(0))
        };
        let bytes = encode_control(&header, msg);
        if let Err(e) = self.endpoint.send(to, CLUSTER_CHANNEL, &bytes) {
            tracing::warn!(kind = msg.kind(), error = ?e, "control message not sent");
        }
    }

    /// Every node, but gateways that are dead or draining: clients learn
    /// from the directory where to resume, and must not be sent there.
    /// (Nodes only add what a directory lists, so links are unaffected.)
    fn directory(&self) -> Vec<NodeInfo> {
        self.nodes
            .values()
            .filter(|n| !self.gateways_out.contains(&n.info.node))
            .map(|n| n.info.clone())
            .collect()
    }

    /// Gateways newly dead or draining (or back) change the directory.
    fn watch_gateways(&mut self) {
        let out: std::collections::BTreeSet<u16> = self
            .nodes
            .values()
            .filter(|n| n.info.role == NodeRole::Gateway)
            .filter(|n| n.draining || self.coord.as_ref().is_some_and(|c| c.is_dead(n.info.node)))
            .map(|n| n.info.node)
            .collect();
        if out != self.gateways_out {
            tracing::info!(out = ?out, "gateways out of service changed: directory updated");
            self.gateways_out = out;
            self.directory_version += 1;
        }
    }

    fn event(&mut self, ev: Event, now: Instant) {
        match ev {
            Event::Connected { .. } | Event::Acked { .. } => {}
            Event::Message {
                connection, bytes, ..
            } => {
                match decode_control(&bytes) {
                    Ok((_, msg)) => self.message(connection, msg, now),
                    Err(e) => {
                        self.refused.record(&e);
                        tracing::warn!(error = %e, "control frame refused");
                    }
                }
                self.endpoint.recycle(bytes);
            }
            Event::Disconnected { connection, reason } => {
                if let Some(p) = self.peers.remove(&connection) {
                    let shard = ShardRef {
                        node: p.node,
                        shard: p.shard,
                    };
                    if let Some(s) = self.shards.get_mut(&shard) {
                        if s.connection == Some(connection) {
                            s.connection = None;
                        }
                    }
                    if p.shard != NODE_LINK {
                        tracing::warn!(%shard, reason = ?reason, "shard link lost");
                    }
                }
            }
        }
    }

    fn message(&mut self, connection: ConnectionHandle, msg: ControlMsg, now: Instant) {
        match msg {
            ControlMsg::Register(r) => self.register(connection, r, now),
            ControlMsg::Report(_) if self.coord.is_none() => {
                self.ignored_as_standby += 1;
            }
            ControlMsg::Report(report) => {
                let Some(p) = self.peers.get(&connection).filter(|p| p.shard != NODE_LINK) else {
                    tracing::warn!("report on a link that speaks for no shard ignored");
                    return;
                };
                let shard = ShardRef {
                    node: p.node,
                    shard: p.shard,
                };
                if let Some(c) = &mut self.coord {
                    c.handle_report(now, shard, report);
                }
            }
            ControlMsg::Heartbeat {
                tick,
                sessions,
                entities,
                seq,
                draining,
            } => {
                let Some(p) = self.peers.get(&connection) else {
                    return;
                };
                let shard = ShardRef {
                    node: p.node,
                    shard: p.shard,
                };
                let leads = self.leads(now);
                let node = p.node;
                if let Some(n) = self.nodes.get_mut(&node) {
                    n.draining |= draining;
                }
                // Every heartbeat is answered, so that a node notices a
                // coordinator process that is gone (or restarted at the
                // same address) within a second; only the leader's answer
                // grants a lease (0 ms: none).
                let no_lease = ControlMsg::HeartbeatAck {
                    seq,
                    lease_ms: 0,
                    draining: false,
                };
                let Some(c) = &mut self.coord else {
                    self.ignored_as_standby += 1;
                    self.send(connection, &no_lease);
                    return;
                };
                // False for a restarted node whose old cells still wait
                // for their failover: no lease for it.
                let granted = c.heartbeat(now, node, tick);
                if !leads || !granted {
                    // Not sure to lead this instant (etcd slow to renew):
                    // the node is alive all the same, but gets no lease.
                    self.send(connection, &no_lease);
                    return;
                }
                if let Some(c) = &mut self.coord {
                    if draining && !c.is_draining(node) && self.drain_refused.insert(node) {
                        match c.drain(now, node) {
                            Ok(cells) => {
                                self.drain_refused.remove(&node);
                                tracing::warn!(
                                    node,
                                    cells,
                                    "node asked to drain (SIGTERM): its cells move away"
                                )
                            }
                            // Said once: the node asks on every heartbeat.
                            Err(e) => tracing::error!(node, error = %e, "node asked to drain"),
                        }
                    }
                    // Only a coordinator sure to lead now grants a lease
                    // (`leads`): its successor waits a full lease after
                    // taking over before it gives a silent node's cells away.
                    let lease_ms = c.lease().as_millis().clamp(1, u128::from(u32::MAX)) as u32;
                    let draining = c.is_draining(node);
                    self.send(
                        connection,
                        &ControlMsg::HeartbeatAck {
                            seq,
                            lease_ms,
                            draining,
                        },
                    );
                }
                if let Some(s) = self.shards.get_mut(&shard) {
                    s.last_heard = now;
                    s.tick = tick.0;
                    s.sessions = sessions;
                    s.entities = entities;
                }
            }
            other => tracing::warn!(
                kind = other.kind(),
                "unexpected control message from a node ignored"
            ),
        }
    }

    fn register(&mut self, connection: ConnectionHandle, r: Registration, now: Instant) {
        let info = NodeInfo {
            node: r.node,
            shards: r.shards,
            role: r.role,
            cluster_addr: r.cluster_addr,
            game_addr: r.game_addr,
            incarnation: r.incarnation,
        };
        let known = self.nodes.get(&r.node);
        if known.is_none_or(|old| old.info != info || old.incarnation != r.incarnation) {
            match known {
                Some(old) => {
                    tracing::warn!(node = r.node, old = %old.info.cluster_addr, new = %r.cluster_addr, incarnation = r.incarnation, "node registered again (restarted or moved)");
                    if old.incarnation != r.incarnation {
                        self.drain_refused.remove(&r.node);
                        if let Some(c) = &mut self.coord {
                            c.forget_drain(r.node);
                        }
                    }
                }
                None => {
                    tracing::info!(node = r.node, role = %r.role, shards = r.shards, cluster = %r.cluster_addr, game = ?r.game_addr, "node joined")
                }
            }
            self.nodes.insert(
                r.node,
                NodeEntry {
                    info,
                    incarnation: r.incarnation,
                    draining: false,
                },
            );
            self.directory_version += 1;
            // Every shard links (gateways too: they route by the registry);
            // only compute shards become members.
            for s in 0..r.shards {
                self.shards
                    .entry(ShardRef {
                        node: r.node,
                        shard: s,
                    })
                    .or_insert(ShardEntry {
                        connection: None,
                        last_heard: now,
                        tick: 0,
                        sessions: 0,
                        entities: 0,
                    });
            }
            self.members_changed();
        }
        // Every link registers: the coordinator acts once per process.
        // (A standby tells its coordinator when it takes over.)
        if let Some(c) = &mut self.coord {
            if c.registered(now, r.node, r.incarnation) {
                tracing::warn!(node = r.node, incarnation = r.incarnation, "restarted while it still owned cells: they fail over to their backups once its old lease ends; the new process starts empty");
            }
        }
        self.peers.insert(
            connection,
            Peer {
                node: r.node,
                shard: r.shard,
            },
        );
        if r.shard != NODE_LINK {
            let shard = ShardRef {
                node: r.node,
                shard: r.shard,
            };
            if let Some(s) = self.shards.get_mut(&shard) {
                s.connection = Some(connection);
                s.last_heard = now;
            }
            tracing::info!(%shard, "shard linked");
        }
        if !self.leads(now) {
            // A standby knows the nodes and their links, and says nothing.
            return;
        }
        self.send(
            connection,
            &ControlMsg::Welcome {
                cluster_epoch: self.cluster_epoch,
                tick_hz: self.config.tick_hz,
                tick_origin_ms: self.tick_origin_ms,
            },
        );
        let dir = ControlMsg::Directory(self.directory());
        self.send(connection, &dir);
        if let Some(c) = &self.coord {
            let reg = ControlMsg::Registry(Arc::new(c.registry().clone()));
            self.send(connection, &reg);
        }
    }

    fn compute_members(&self) -> Vec<ShardRef> {
        let mut v = Vec::new();
        for n in self.nodes.values() {
            if n.info.role.computes() {
                v.extend((0..n.info.shards).map(|s| ShardRef {
                    node: n.info.node,
                    shard: s,
                }));
            }
        }
        v
    }

    fn members_changed(&mut self) {
        let members = self.compute_members();
        if let Some(c) = &mut self.coord {
            c.set_members(members);
            return;
        }
        if self.leadership.is_some() && !self.leading {
            return;
        }
        let computes = self
            .nodes
            .values()
            .filter(|n| n.info.role.computes())
            .count();
        if computes < self.config.compute_nodes || members.is_empty() {
            tracing::info!(
                computes,
                wanted = self.config.compute_nodes,
                "waiting for compute nodes before assigning cells"
            );
            return;
        }
        let layout = Arc::new(Layout::new(self.config.geometry.clone()));
        let blocks = contiguous_blocks(&layout, members.len());
        let owners = blocks
            .into_iter()
            .map(|(cell, s)| (cell, members[usize::from(s.shard)]))
            .collect();
        let registry = Registry::new(layout, &owners).expect("every leaf assigned");
        let mut policy = self.config.policy.clone();
        policy.shards = members.len() as u16;
        let mut coord = match self.leadership {
            Some(_) => Coordinator::taking_over(registry, policy, self.cluster_epoch),
            None => Coordinator::new(registry, policy),
        };
        coord.set_members(members.clone());
        self.cluster_epoch = coord.registry().cluster_epoch();
        tracing::info!(
            shards = members.len(),
            cells = coord.registry().len(),
            cluster_epoch = self.cluster_epoch,
            "cells assigned over the compute shards"
        );
        self.coord = Some(coord);
        self.register_known(Instant::now());
    }

    /// Tells a coordinator just created (or taking over) the process each
    /// registered node runs as.
    fn register_known(&mut self, now: Instant) {
        let Some(c) = &mut self.coord else {
            return;
        };
        for (node, n) in &self.nodes {
            if c.registered(now, *node, n.incarnation) {
                tracing::warn!(node, incarnation = n.incarnation, "restarted while it still owned cells: they fail over to their backups once its old lease ends; the new process starts empty");
            }
        }
    }

    /// Registry, directory and orders, in that order (one ordered channel
    /// per link: a commit finds its route in place).
    fn push_changes(&mut self) {
        if !self.leads(Instant::now()) {
            return;
        }
        // Through etcd, a registry version goes out (with the orders that
        // rely on it) only once etcd holds it: a successor starts from it.
        if let (Some(l), Some(c)) = (&self.leadership, &self.coord) {
            let version = c.registry().version();
            if version != self.durable {
                if self.writing.is_none() {
                    self.writing = Some(version);
                    let header = ShardHeader {
                        epoch: self.cluster_epoch,
                        ..ShardHeader::control(COORDINATOR, 0, TickId(0))
                    };
                    let reg = ControlMsg::Registry(Arc::new(c.registry().clone()));
                    l.write(self.cluster_epoch, version, encode_control(&header, &reg));
                }
                return;
            }
        }
        let conns: Vec<ConnectionHandle> = self.peers.keys().copied().collect();
        // The directory first: a registry may name a node that just joined.
        if self.directory_sent != self.directory_version {
            self.directory_sent = self.directory_version;
            let dir = ControlMsg::Directory(self.directory());
            for conn in &conns {
                self.send(*conn, &dir);
            }
        }
        if let Some(c) = &self.coord {
            if c.registry().version() != self.published {
                self.published = c.registry().version();
                let reg = ControlMsg::Registry(Arc::new(c.registry().clone()));
                for conn in &conns {
                    self.send(*conn, &reg);
                }
            }
        }
        let mut orders = Vec::new();
        if let Some(c) = &mut self.coord {
            while let Some(o) = c.poll_order() {
                orders.push(o);
            }
            for line in c.take_log() {
                tracing::info!(target: "tessera::coord", "{line}");
            }
        }
        for (shard, order) in orders {
            match self.shards.get(&shard).and_then(|s| s.connection) {
                Some(conn) => self.send(conn, &ControlMsg::Order(order)),
                None => {
                    tracing::error!(%shard, order = ?order, "order for a shard without a link dropped (the step times out and aborts)")
                }
            }
        }
    }

    fn admin_command(&mut self, command: AdminCommand, now: Instant) -> Result<String, String> {
        if !self.leads(now) {
            return Err(
                "this coordinator is a standby: ask the leader (see `status` on each coordinator)"
                    .into(),
            );
        }
        let Some(coord) = &mut self.coord else {
            return Err(format!(
                "no cells assigned yet: waiting for {} compute node(s)",
                self.config.compute_nodes
            ));
        };
        let result = crate::node::coordinator::run_command(coord, &command, now);
        tracing::warn!(command = ?command, result = ?result, "operator command");
        result
    }

    fn publish_board(&mut self, now: Instant) {
        let mut board = self.board.lock().unwrap_or_else(|e| e.into_inner());
        let mut st = ClusterStatus {
            uptime_s: self.started.elapsed().as_secs_f64(),
            cluster_epoch: self.cluster_epoch,
            frames_refused: self.refused.total(),
            role: match (&self.leadership, self.leads(now)) {
                (None, _) => "alone",
                (Some(_), true) => "leader",
                (Some(_), false) => "standby",
            }
            .to_string(),
            elections: self.elections,
            ignored_as_standby: self.ignored_as_standby,
            registry_writes: self.registry_writes,
            ..ClusterStatus::default()
        };
        let computes = self
            .nodes
            .values()
            .filter(|n| n.info.role.computes())
            .count();
        st.awaiting_compute_nodes = self.config.compute_nodes.saturating_sub(computes);
        for n in self.nodes.values() {
            st.nodes.push(ClusterNode {
                node: n.info.node,
                role: n.info.role.to_string(),
                shards: n.info.shards,
                cluster_addr: n.info.cluster_addr.to_string(),
                game_addr: n.info.game_addr.map(|a| a.to_string()),
                dead: self.coord.as_ref().is_some_and(|c| c.is_dead(n.info.node)),
                draining_cells_left: self
                    .coord
                    .as_ref()
                    .and_then(|c| c.drain_state(n.info.node))
                    .map(|d| d.cells_left),
            });
        }
        let registry = self.coord.as_ref().map(|c| c.registry());
        for (shard, s) in &self.shards {
            let role = self
                .nodes
                .get(&shard.node)
                .map_or(NodeRole::Both, |n| n.info.role);
            st.shards.push(ClusterShard {
                shard: shard.to_string(),
                role: role.to_string(),
                linked: s.connection.is_some(),
                tick: s.tick,
                sessions: s.sessions,
                entities: s.entities,
                cells: registry.map_or(0, |r| r.cells_of(*shard).len()),
                heard_ms_ago: now.saturating_duration_since(s.last_heard).as_millis() as u64,
            });
        }
        if let Some(c) = &mut self.coord {
            let scores: BTreeMap<CellId, f64> = c.scores().into_iter().collect();
            for (cell, a) in c.registry().iter() {
                st.cells.push(ClusterCell {
                    cell: cell.to_string(),
                    owner: a.owner.to_string(),
                    epoch: a.epoch,
                    score: scores.get(&cell).copied().unwrap_or(0.0),
                });
            }
            st.registry_version = c.registry().version();
            st.in_flight = c.in_flight();
            let k = c.counters();
            st.handovers = k.handovers;
            st.aborts = k.aborts;
            st.splits = k.splits;
            st.merges = k.merges;
            for r in c.take_records() {
                if board.recent.len() >= 200 {
                    board.recent.pop_front();
                }
                board.recent.push_back(r);
            }
            st.backups = c
                .registry()
                .backups()
                .iter()
                .map(|(o, b)| format!("{o}->{b}"))
                .collect();
            for f in c.take_failovers() {
                tracing::warn!(shard = %f.shard, to = %f.to, cells = f.cells, entities = f.entities,
                    detection_ms = f.detection.as_millis() as u64, served_ms = ?f.served.map(|d| d.as_millis() as u64),
                    ticks_lost = ?f.ticks_lost, missing = f.missing, "failover done");
                if board.failovers.len() >= 200 {
                    board.failovers.pop_front();
                }
                board.failovers.push_back(ClusterFailover {
                    shard: f.shard.to_string(),
                    to: f.to.to_string(),
                    cells: f.cells,
                    detection_ms: f.detection.as_secs_f64() * 1e3,
                    declared_unix_ms: unix_ms_of(f.declared_at),
                    served_ms: f.served.map(|d| d.as_secs_f64() * 1e3),
                    ticks_lost: f.ticks_lost,
                    missing: f.missing,
                    entities: f.entities,
                });
            }
        }
        st.failovers = board.failovers.iter().cloned().collect();
        board.status = st;
    }
}

/// An `Instant` of the past as Unix milliseconds.
fn unix_ms_of(at: Instant) -> f64 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (unix.saturating_sub(at.elapsed())).as_secs_f64() * 1e3
}

fn serve_admin(
    listener: TcpListener,
    board: Arc<Mutex<Board>>,
    tx: Sender<AdminInput>,
    access: crate::node::admin::AdminAccess,
    stop: Arc<AtomicBool>,
) -> io::Result<JoinHandle<()>> {
    let flag = stop.clone();
    crate::node::admin::serve_lines(listener, "tessera-coord-admin", access, stop, move |line| {
        reply(line, &board, &tx, &flag)
    })
}

fn reply(
    line: &str,
    board: &Mutex<Board>,
    tx: &Sender<AdminInput>,
    stop: &AtomicBool,
) -> io::Result<String> {
    let mut words = line.split_whitespace();
    let err = |e: String| serde_json::json!({ "error": e }).to_string();
    let command = |c: AdminCommand| {
        let (rtx, rrx) = crossbeam_channel::bounded(1);
        if tx.send(AdminInput::Command(c, rtx)).is_err() {
            return err("the coordinator is not running".into());
        }
        match rrx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(text)) => serde_json::json!({ "ok": text }).to_string(),
            Ok(Err(e)) => err(e),
            Err(_) => err("the coordinator did not answer".into()),
        }
    };
    let cell = |w: Option<&str>| -> Result<CellId, String> {
        w.ok_or_else(|| "a cell is needed, e.g. 0:2,3".to_string())?
            .parse::<CellId>()
            .map_err(|e| e.to_string())
    };
    let reply = match words.next() {
        Some("status") | Some("cells") => {
            let b = board.lock().unwrap_or_else(|e| e.into_inner());
            serde_json::to_string(&b.status).map_err(io::Error::other)?
        }
        Some("handovers") => {
            let b = board.lock().unwrap_or_else(|e| e.into_inner());
            let recent: Vec<serde_json::Value> = b
                .recent
                .iter()
                .rev()
                .take(50)
                .map(|r| {
                    serde_json::json!({
                        "handover": r.id.0, "cell": r.cell.to_string(), "from": r.from.to_string(), "to": r.to.to_string(),
                        "epoch": r.epoch, "entities": r.entities, "committed": r.committed,
                        "abort": r.abort.map(|a| format!("{a:?}")),
                        "decision_to_commit_ms": r.decision_to_commit.as_secs_f64() * 1e3,
                        "freeze_ms": r.freeze.map(|f| f.as_secs_f64() * 1e3), "cause": r.cause,
                    })
                })
                .collect();
            serde_json::json!({
                "handovers": b.status.handovers, "aborts": b.status.aborts, "splits": b.status.splits,
                "merges": b.status.merges, "recent": recent,
            })
            .to_string()
        }
        Some("move") => match (cell(words.next()), words.next().map(str::parse::<ShardRef>)) {
            (Ok(cell), Some(Ok(shard))) => command(AdminCommand::Move { cell, shard }),
            (Err(e), _) => err(e),
            (_, Some(Err(e))) => err(e.to_string()),
            _ => err("usage: move CELL NODE/SHARD".into()),
        },
        Some("split") => match cell(words.next()) {
            Ok(c) => command(AdminCommand::Split { cell: c }),
            Err(e) => err(e),
        },
        Some("merge") => match cell(words.next()) {
            Ok(c) => command(AdminCommand::Merge { cell: c }),
            Err(e) => err(e),
        },
        Some("drain") => match words.next().map(str::parse::<u16>) {
            Some(Ok(node)) => command(AdminCommand::Drain { node }),
            _ => err("usage: drain NODE (a node id)".into()),
        },
        Some("pin") => match cell(words.next()) {
            Ok(c) => command(AdminCommand::Pin { cell: c }),
            Err(e) => err(e),
        },
        Some("shutdown") => {
            tracing::warn!("coordinator shutdown requested on the admin port");
            stop.store(true, Ordering::Release);
            "{\"ok\":true}".to_string()
        }
        Some(other) => err(format!(
            "unknown command {other:?}: try status, handovers, move CELL NODE/SHARD, split CELL, merge CELL, drain NODE, pin CELL, shutdown"
        )),
        None => err("empty command".into()),
    };
    Ok(reply)
}
