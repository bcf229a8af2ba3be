//! One shard's side of the cluster: its links to other nodes' shards and
//! to the coordinator, on its own RUDP endpoint and UDP port.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_cells::node::{NodeCore, ShardMsg};
use tessera_cells::wire::{
    decode_bundle, decode_control, encode_control, BundleWriter, ControlMsg, NodeInfo, NodeRole,
    Registration, ShardHeader,
};
use tessera_cells::{GameLogic, Registry, ShardRef, TickId};
use tessera_net::driver::BatchSocket;
use tessera_net::{ConnectionHandle, Endpoint, Event, TransmitBatch};
use tessera_schema::FrameErrorCounts;

use super::link::CLUSTER_CHANNEL;

/// A bundle is sent early once it holds this many bytes (bounds the
/// memory one destination can take within a turn; a single message may
/// still be larger, up to the link's 16 MiB).
pub const BUNDLE_FLUSH_BYTES: usize = 1 << 20;

/// Bytes of bundles a shard keeps while their link cannot take them (no
/// directory entry yet, the link's queue full, the link reconnecting):
/// past it a bundle is dropped, counted and logged (its messages are lost).
pub const BACKLOG_BYTES_MAX: usize = 64 << 20;

/// Control messages kept while the coordinator link is down (heartbeats and
/// load reports are not kept: the next ones replace them).
pub const CONTROL_BACKLOG_MAX: usize = 4096;

/// Wait before dialling the coordinator again after its link broke.
const COORD_RETRY: Duration = Duration::from_millis(500);

/// What a shard's cluster side counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClusterCounters {
    /// Bundles sent to other nodes' shards.
    pub bundles_sent: u64,
    /// Their bytes.
    pub bytes_sent: u64,
    /// Messages in them.
    pub frames_sent: u64,
    /// Bundles received and decoded.
    pub bundles_received: u64,
    /// Their bytes.
    pub bytes_received: u64,
    /// Messages in them.
    pub frames_received: u64,
    /// Bundles and control frames refused on arrival, by reason.
    pub refused: FrameErrorCounts,
    /// Handover steps ignored on arrival for a stale epoch.
    pub stale_epoch: u64,
    /// Bundles dropped (larger than a link message may be, or the backlog
    /// at [`BACKLOG_BYTES_MAX`]): their messages are lost, logged.
    pub send_refused: u64,
    /// Bundles that had to wait for their link (no directory entry yet,
    /// queue full, reconnecting); they go out in order once it takes them.
    pub backlogged: u64,
    /// Bytes waiting in the backlog now.
    pub backlog_bytes: u64,
    /// Bundles for a node the directory does not list (they wait).
    pub no_route: u64,
    /// Links opened to other shards.
    pub links_opened: u64,
    /// Links that closed (the peer stopped, or timed out).
    pub links_closed: u64,
    /// Control frames sent to the coordinator.
    pub control_sent: u64,
    /// Control frames received from it.
    pub control_received: u64,
    /// Times the coordinator link was dialled again.
    pub coord_redials: u64,
    /// Control frames from a coordinator older than the cluster epoch this
    /// shard has seen (a deposed leader): ignored.
    pub stale_leader: u64,
}

/// A link to one of the cluster's coordinators (the leader, or a standby
/// that says nothing until etcd elects it).
struct CoordLink {
    addr: SocketAddr,
    conn: Option<ConnectionHandle>,
    retry_at: Option<Instant>,
    /// What waited while the link was down (reports of handover steps).
    backlog: VecDeque<ControlMsg>,
    /// The cluster epoch it last welcomed us with (0: it has not).
    epoch: u32,
    /// When it last said anything (it answers every heartbeat).
    heard: Instant,
}

/// A coordinator link silent this long (ten heartbeats unanswered) is
/// dialled again: the process behind it is gone, or restarted at the same
/// address and does not know the old link.
const COORD_SILENT: Duration = Duration::from_millis(1000);

/// A shard's cluster endpoint, links and coordinator link.
pub struct ClusterSide {
    me: ShardRef,
    endpoint: Endpoint,
    socket: BatchSocket,
    batch: TransmitBatch,
    coords: Vec<CoordLink>,
    /// The newest cluster epoch seen: a coordinator below it was deposed.
    leader_epoch: u32,
    registration: Registration,
    directory: BTreeMap<u16, NodeInfo>,
    links: BTreeMap<ShardRef, ConnectionHandle>,
    writers: BTreeMap<ShardRef, BundleWriter>,
    backlog: BTreeMap<ShardRef, VecDeque<(Vec<u8>, u64)>>,
    control_seq: u64,
    counters: ClusterCounters,
    lease: tessera_cells::lease::LeaseKeeper,
    /// The leader said it drains this node.
    drain_asked: bool,
    /// Other gateways in service, as the last directory listed them (the
    /// coordinator leaves out dead and draining ones).
    gateways: Vec<String>,
    /// Links are sealed under it (None: clear text).
    key: Option<super::ClusterKey>,
}

fn gateways_in(me: u16, nodes: &[NodeInfo]) -> Vec<String> {
    nodes
        .iter()
        .filter(|n| n.node != me && n.role != NodeRole::Compute)
        .filter_map(|n| n.game_addr)
        .filter(|a| !a.ip().is_unspecified())
        .map(|a| a.to_string())
        .collect()
}

impl ClusterSide {
    /// The cluster side of shard `me`, on its bound `socket`, linked to
    /// every coordinator in `coords` (the leader's word counts; a deposed
    /// one's is ignored by the cluster epoch rule).
    pub fn new(
        me: ShardRef,
        endpoint: Endpoint,
        socket: BatchSocket,
        coords: &[SocketAddr],
        registration: Registration,
        directory: Vec<NodeInfo>,
        key: Option<super::ClusterKey>,
    ) -> Self {
        let batch = TransmitBatch::new(socket.batch_size());
        Self {
            me,
            endpoint,
            socket,
            batch,
            coords: coords
                .iter()
                .map(|&addr| CoordLink {
                    addr,
                    conn: None,
                    retry_at: Some(Instant::now()),
                    backlog: VecDeque::new(),
                    epoch: 0,
                    heard: Instant::now(),
                })
                .collect(),
            leader_epoch: 0,
            registration,
            gateways: gateways_in(me.node, &directory),
            directory: directory.into_iter().map(|n| (n.node, n)).collect(),
            links: BTreeMap::new(),
            lease: tessera_cells::lease::LeaseKeeper::new(),
            drain_asked: false,
            writers: BTreeMap::new(),
            backlog: BTreeMap::new(),
            control_seq: 0,
            counters: ClusterCounters::default(),
            key,
        }
    }

    /// The counters.
    pub fn counters(&self) -> ClusterCounters {
        self.counters
    }

    /// The cluster socket (its readiness wakes the shard).
    pub fn socket(&self) -> &BatchSocket {
        &self.socket
    }

    /// The endpoint's statistics.
    pub fn endpoint_stats(&self) -> &tessera_net::EndpointStats {
        self.endpoint.stats()
    }

    /// When the endpoint next needs a call (timers, retransmissions).
    pub fn next_deadline(&mut self) -> Option<Instant> {
        let t = self.endpoint.poll_timeout();
        self.coords.iter().filter_map(|c| c.retry_at).chain(t).min()
    }

    /// Adds a message for a shard of another node to this turn's bundle.
    pub fn queue<G: GameLogic>(
        &mut self,
        to: ShardRef,
        msg: &ShardMsg<G>,
        tick: TickId,
        registry: &Registry,
        now: Instant,
    ) {
        let header = ShardHeader::for_msg(msg, self.me, tick, registry);
        let writer = self
            .writers
            .entry(to)
            .or_insert_with(|| BundleWriter::new(to));
        if let Err(e) = writer.push(header, msg) {
            tracing::error!(shard = %self.me, %to, error = %e, "message not encodable: dropped");
            return;
        }
        if writer.bytes() >= BUNDLE_FLUSH_BYTES {
            self.flush_one(to, now);
        }
    }

    /// Sends every bundle of this turn, and what waited.
    pub fn flush(&mut self, now: Instant) {
        let dests: Vec<ShardRef> = self
            .writers
            .iter()
            .filter(|(_, w)| !w.is_empty())
            .map(|(to, _)| *to)
            .chain(
                self.backlog
                    .iter()
                    .filter(|(_, q)| !q.is_empty())
                    .map(|(to, _)| *to),
            )
            .collect();
        for to in dests {
            self.flush_one(to, now);
        }
    }

    fn link_to(&mut self, to: ShardRef, now: Instant) -> Option<ConnectionHandle> {
        if let Some(c) = self.links.get(&to) {
            return Some(*c);
        }
        let addr = self.directory.get(&to.node)?.shard_addr(to.shard);
        match super::auth::dial(&mut self.endpoint, now, addr, self.key.as_ref()) {
            Ok(c) => {
                self.counters.links_opened += 1;
                tracing::info!(shard = %self.me, %to, %addr, "cluster link opened");
                self.links.insert(to, c);
                Some(c)
            }
            Err(e) => {
                tracing::error!(shard = %self.me, %to, %addr, error = ?e, "cannot open a cluster link");
                None
            }
        }
    }

    /// Sends `to`'s bundle, after whatever waited for that link (order is
    /// kept); what the link cannot take now waits in the backlog.
    fn flush_one(&mut self, to: ShardRef, now: Instant) {
        let link = self.link_to(to, now);
        let waiting = self.backlog.get(&to).is_some_and(|q| !q.is_empty());
        if let Some(writer) = self.writers.get_mut(&to).filter(|w| !w.is_empty()) {
            let frames = writer.len() as u64;
            let endpoint = &mut self.endpoint;
            // The common case, straight from the builder's buffer.
            let direct = match link {
                Some(link) if !waiting => {
                    writer.finish(|b| match endpoint.send(link, CLUSTER_CHANNEL, b) {
                        Ok(_) => Ok(b.len()),
                        Err(e) => Err((e, b.to_vec())),
                    })
                }
                _ => Err((
                    tessera_net::SendError::QueueFull(0),
                    writer.finish(|b| b.to_vec()),
                )),
            };
            match direct {
                Ok(len) => self.sent(frames, len),
                Err((tessera_net::SendError::MessageTooLarge { len, max }, _)) => {
                    self.counters.send_refused += 1;
                    tracing::error!(shard = %self.me, %to, frames, len, max, "bundle larger than a cluster message may be: messages lost");
                }
                Err((e, bytes)) => {
                    if matches!(
                        e,
                        tessera_net::SendError::UnknownConnection | tessera_net::SendError::Closing
                    ) {
                        self.links.remove(&to);
                    }
                    self.keep(to, bytes, frames);
                }
            }
        }
        self.drain_backlog(to, now);
    }

    fn sent(&mut self, frames: u64, len: usize) {
        self.counters.bundles_sent += 1;
        self.counters.frames_sent += frames;
        self.counters.bytes_sent += len as u64;
    }

    /// Keeps a bundle for later, within [`BACKLOG_BYTES_MAX`].
    fn keep(&mut self, to: ShardRef, bytes: Vec<u8>, frames: u64) {
        if self.counters.backlog_bytes as usize + bytes.len() > BACKLOG_BYTES_MAX {
            self.counters.send_refused += 1;
            tracing::error!(shard = %self.me, %to, frames, backlog = self.counters.backlog_bytes, "cluster backlog full: bundle dropped, messages lost");
            return;
        }
        if !self.directory.contains_key(&to.node) {
            self.counters.no_route += 1;
        }
        self.counters.backlogged += 1;
        self.counters.backlog_bytes += bytes.len() as u64;
        self.backlog
            .entry(to)
            .or_default()
            .push_back((bytes, frames));
    }

    /// Sends what waited for `to`'s link, in order, while it takes it.
    fn drain_backlog(&mut self, to: ShardRef, now: Instant) {
        if self.backlog.get(&to).is_none_or(|q| q.is_empty()) {
            return;
        }
        let Some(link) = self.link_to(to, now) else {
            return;
        };
        while let Some((bytes, frames)) = self.backlog.get_mut(&to).and_then(|q| q.pop_front()) {
            match self.endpoint.send(link, CLUSTER_CHANNEL, &bytes) {
                Ok(_) => {
                    self.counters.backlog_bytes -= bytes.len() as u64;
                    self.sent(frames, bytes.len());
                }
                Err(tessera_net::SendError::MessageTooLarge { len, max }) => {
                    self.counters.backlog_bytes -= bytes.len() as u64;
                    self.counters.send_refused += 1;
                    tracing::error!(shard = %self.me, %to, frames, len, max, "bundle larger than a cluster message may be: messages lost");
                }
                Err(e) => {
                    if matches!(
                        e,
                        tessera_net::SendError::UnknownConnection | tessera_net::SendError::Closing
                    ) {
                        self.links.remove(&to);
                    }
                    self.backlog
                        .entry(to)
                        .or_default()
                        .push_front((bytes, frames));
                    return;
                }
            }
        }
    }

    /// Sends a heartbeat (numbered: its ack renews this shard's lease);
    /// The game addresses of the cluster's other gateways in service (for
    /// clients to resume at if this node is lost), from the last directory.
    pub fn other_gateways(&self) -> Vec<String> {
        self.gateways.clone()
    }

    /// `draining` asks the coordinator to move the node's cells away.
    pub fn heartbeat<G: GameLogic>(&mut self, core: &NodeCore<G>, now: Instant, draining: bool) {
        let seq = self.lease.sent(now);
        let msg = ControlMsg::Heartbeat {
            tick: core.world().tick_id(),
            sessions: core.sessions().len() as u32,
            entities: core.world().totals().entities as u32,
            seq,
            draining,
        };
        self.send_control(&msg, core.world().tick_id());
    }

    /// True once the leading coordinator said it drains this node
    /// (`tessera admin drain`): the node exits when it holds nothing.
    pub fn coordinator_drains(&self) -> bool {
        self.drain_asked
    }

    /// True while this shard's lease on its cells runs (renewed by the
    /// coordinator's heartbeat acks; none before the first).
    pub fn lease_valid(&self, now: Instant) -> bool {
        self.lease.valid(now)
    }

    /// Sends a control message to every coordinator (a standby ignores it;
    /// the node need not know which one leads). While a link is down the
    /// message waits (reports of a handover's steps must reach the leader);
    /// heartbeats and load reports do not (the next ones replace them).
    pub fn send_control(&mut self, msg: &ControlMsg, tick: TickId) {
        let periodic = matches!(
            msg,
            ControlMsg::Heartbeat { .. }
                | ControlMsg::Report(tessera_cells::control::Report::Load(_))
        );
        for i in 0..self.coords.len() {
            let linked = self.coords[i]
                .conn
                .is_some_and(|h| self.endpoint.is_connected(h));
            if linked {
                self.send_control_now(i, msg, tick);
            } else if !periodic && self.coords[i].backlog.len() < CONTROL_BACKLOG_MAX {
                self.coords[i].backlog.push_back(msg.clone());
            } else if !periodic {
                tracing::error!(shard = %self.me, coord = %self.coords[i].addr, kind = msg.kind(), "coordinator backlog full: control message dropped");
            }
        }
    }

    fn send_control_now(&mut self, i: usize, msg: &ControlMsg, tick: TickId) {
        let Some(coord) = self.coords[i].conn else {
            return;
        };
        self.control_seq += 1;
        let header = ShardHeader::control(self.me, self.control_seq, tick);
        let bytes = encode_control(&header, msg);
        match self.endpoint.send(coord, CLUSTER_CHANNEL, &bytes) {
            Ok(_) => self.counters.control_sent += 1,
            Err(e) => {
                tracing::warn!(shard = %self.me, kind = msg.kind(), error = ?e, "control message not sent")
            }
        }
    }

    /// Reads the socket, runs the endpoint's timers, hands what arrived to
    /// the core (bundles from other shards, orders and registries from the
    /// coordinator) and sends what is queued. Returns the work done and
    /// whether the registry changed.
    pub fn pump<G: GameLogic>(
        &mut self,
        core: &mut NodeCore<G>,
        now: Instant,
    ) -> (usize, Option<Arc<Registry>>) {
        let mut work = match self.socket.receive_into(&mut self.endpoint, now, 64) {
            Ok((n, _)) => n,
            Err(e) => {
                tracing::warn!(shard = %self.me, error = %e, "cluster socket receive failed");
                0
            }
        };
        self.endpoint.handle_timeout(now);
        for i in 0..self.coords.len() {
            self.drop_if_silent(i, now);
            self.redial(i, now);
        }
        let mut changed = None;
        let mut inbound: Vec<(ShardHeader, ShardMsg<G>)> = Vec::new();
        while let Some(event) = self.endpoint.poll_event() {
            work += 1;
            match event {
                Event::Connected { connection, addr } => {
                    if let Some(i) = self.coord_index(connection) {
                        self.coords[i].heard = now;
                        tracing::info!(shard = %self.me, coord = %addr, waiting = self.coords[i].backlog.len(), "coordinator link up: registering");
                        let tick = core.world().tick_id();
                        let msg = ControlMsg::Register(self.registration.clone());
                        self.send_control_now(i, &msg, tick);
                        for msg in std::mem::take(&mut self.coords[i].backlog) {
                            self.send_control_now(i, &msg, tick);
                        }
                    }
                }
                Event::Message {
                    connection, bytes, ..
                } => {
                    if let Some(i) = self.coord_index(connection) {
                        self.counters.control_received += 1;
                        self.coords[i].heard = now;
                        match decode_control(&bytes) {
                            Ok((header, msg)) => {
                                if let Some(c) =
                                    self.take_from_coordinator(i, header.epoch, core, msg, now)
                                {
                                    changed = Some(c);
                                }
                            }
                            Err(e) => {
                                self.counters.refused.record(&e);
                                tracing::warn!(shard = %self.me, error = %e, "control frame refused");
                            }
                        }
                    } else {
                        match decode_bundle::<G>(&bytes, &mut inbound) {
                            Ok(to) if to == self.me => {
                                self.counters.bundles_received += 1;
                                self.counters.bytes_received += bytes.len() as u64;
                            }
                            Ok(to) => {
                                // Not ours (a directory that moved under us).
                                tracing::warn!(shard = %self.me, %to, "bundle for another shard dropped");
                                inbound.clear();
                            }
                            Err(e) => {
                                self.counters.refused.record(&e);
                                tracing::warn!(shard = %self.me, error = %e, "shard bundle refused");
                            }
                        }
                        for (header, msg) in inbound.drain(..) {
                            self.counters.frames_received += 1;
                            if header.is_stale(&msg, core.router().registry()) {
                                self.counters.stale_epoch += 1;
                                tracing::info!(shard = %self.me, cell = %header.cell, epoch = header.epoch, from = %header.sender, "handover step from a stale epoch ignored");
                                continue;
                            }
                            core.handle_message(msg);
                        }
                    }
                    self.endpoint.recycle(bytes);
                }
                Event::Disconnected { connection, reason } => {
                    if let Some(i) = self.coord_index(connection) {
                        let c = &mut self.coords[i];
                        if c.epoch == self.leader_epoch && c.epoch > 0 {
                            tracing::warn!(shard = %self.me, coord = %c.addr, reason = ?reason, "link to the leading coordinator lost: gameplay goes on while the lease lasts, balancing pauses; redialling");
                        } else {
                            tracing::info!(shard = %self.me, coord = %c.addr, reason = ?reason, "link to a standby coordinator lost; redialling");
                        }
                        c.conn = None;
                        c.retry_at = Some(now + COORD_RETRY);
                    } else if let Some((&to, _)) =
                        self.links.iter().find(|(_, c)| **c == connection)
                    {
                        self.links.remove(&to);
                        self.counters.links_closed += 1;
                        tracing::warn!(shard = %self.me, %to, reason = ?reason, "cluster link closed");
                    }
                }
                Event::Acked { .. } => {}
            }
        }
        (work, changed)
    }

    fn drop_if_silent(&mut self, i: usize, now: Instant) {
        let c = &self.coords[i];
        let Some(conn) = c.conn else { return };
        if !self.endpoint.is_connected(conn)
            || now.saturating_duration_since(c.heard) < COORD_SILENT
        {
            return;
        }
        tracing::warn!(shard = %self.me, coord = %c.addr, silent_ms = now.saturating_duration_since(c.heard).as_millis() as u64, "coordinator silent: dialling it again");
        let _ = self.endpoint.disconnect(now, conn, 0);
        let c = &mut self.coords[i];
        c.conn = None;
        c.epoch = 0;
        c.retry_at = Some(now);
    }

    fn coord_index(&self, connection: ConnectionHandle) -> Option<usize> {
        self.coords.iter().position(|c| c.conn == Some(connection))
    }

    fn redial(&mut self, i: usize, now: Instant) {
        let c = &self.coords[i];
        if c.conn.is_some() || c.retry_at.is_none_or(|t| now < t) {
            return;
        }
        let addr = c.addr;
        self.coords[i].retry_at = None;
        match super::auth::dial(&mut self.endpoint, now, addr, self.key.as_ref()) {
            Ok(h) => {
                if self.counters.control_sent > 0 {
                    self.counters.coord_redials += 1;
                }
                self.coords[i].conn = Some(h);
                self.coords[i].heard = now;
            }
            Err(e) => {
                tracing::warn!(shard = %self.me, coord = %addr, error = ?e, "cannot dial the coordinator");
                self.coords[i].retry_at = Some(now + COORD_RETRY);
            }
        }
    }

    /// The cluster epoch rule (seed 002 section 12): a frame from a
    /// coordinator below the newest epoch seen comes from a deposed leader
    /// and is ignored, counted.
    fn take_from_coordinator<G: GameLogic>(
        &mut self,
        i: usize,
        epoch: u32,
        core: &mut NodeCore<G>,
        msg: ControlMsg,
        now: Instant,
    ) -> Option<Arc<Registry>> {
        if let ControlMsg::HeartbeatAck { lease_ms: 0, .. } = &msg {
            // A coordinator that grants nothing (a standby): it is there.
            return None;
        }
        if let ControlMsg::Welcome { cluster_epoch, .. } = &msg {
            self.coords[i].epoch = *cluster_epoch;
            if *cluster_epoch > self.leader_epoch {
                if self.leader_epoch > 0 {
                    tracing::warn!(shard = %self.me, coord = %self.coords[i].addr, old = self.leader_epoch, new = cluster_epoch, "a new coordinator leads");
                }
                self.leader_epoch = *cluster_epoch;
            }
        }
        if epoch < self.leader_epoch {
            self.counters.stale_leader += 1;
            tracing::warn!(shard = %self.me, coord = %self.coords[i].addr, epoch, cluster_epoch = self.leader_epoch, kind = msg.kind(), "control frame of a deposed coordinator ignored");
            return None;
        }
        self.leader_epoch = self.leader_epoch.max(epoch);
        self.take_control(core, msg, now)
    }

    fn take_control<G: GameLogic>(
        &mut self,
        core: &mut NodeCore<G>,
        msg: ControlMsg,
        now: Instant,
    ) -> Option<Arc<Registry>> {
        match msg {
            ControlMsg::Registry(r) => {
                if !r.is_newer_than(core.router().registry()) {
                    return None;
                }
                core.handle_registry(r.clone());
                Some(r)
            }
            ControlMsg::Directory(nodes) => {
                self.gateways = gateways_in(self.me.node, &nodes);
                for n in nodes {
                    if self.directory.get(&n.node).is_some_and(|old| {
                        old.cluster_addr != n.cluster_addr || old.incarnation != n.incarnation
                    }) {
                        // The node restarted (here or elsewhere): its links
                        // speak to a process that is gone.
                        let stale: Vec<ShardRef> = self
                            .links
                            .keys()
                            .filter(|to| to.node == n.node)
                            .copied()
                            .collect();
                        for to in stale {
                            if let Some(c) = self.links.remove(&to) {
                                let _ = self.endpoint.disconnect(now, c, 0);
                                self.counters.links_closed += 1;
                            }
                        }
                    }
                    self.directory.insert(n.node, n);
                }
                core.set_gateways(self.other_gateways());
                None
            }
            ControlMsg::Order(order) => {
                core.handle_message(ShardMsg::Order(order));
                None
            }
            ControlMsg::HeartbeatAck {
                seq,
                lease_ms,
                draining,
            } => {
                if draining && !self.drain_asked {
                    tracing::warn!(shard = %self.me, "the coordinator drains this node: its cells move away, then it exits");
                }
                self.drain_asked |= draining;
                self.lease
                    .acked(seq, Duration::from_millis(u64::from(lease_ms)));
                None
            }
            ControlMsg::Welcome { cluster_epoch, .. } => {
                tracing::info!(shard = %self.me, cluster_epoch, "registered with the coordinator");
                None
            }
            other => {
                tracing::warn!(shard = %self.me, kind = other.kind(), "unexpected control message ignored");
                None
            }
        }
    }

    /// Sends what the endpoint has.
    pub fn transmit(&mut self, now: Instant) -> usize {
        self.socket
            .transmit_from(&mut self.endpoint, &mut self.batch, now)
            .unwrap_or_else(|e| {
                tracing::warn!(shard = %self.me, error = %e, "cluster socket send failed");
                0
            })
    }

    /// Closes every link gracefully (the node stops).
    pub fn close(&mut self, now: Instant) {
        self.endpoint.disconnect_all(now, 0);
        self.transmit(now);
    }
}
