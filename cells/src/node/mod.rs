//! The node core: everything one shard of a node does, without its IO.
//!
//! A [`NodeCore`] holds one shard's world (the cells it owns), the client
//! sessions whose handshake reached it (the gateway role), its view of the
//! registry (routing), its side of every handover, and the glue between
//! them. It is generic over the game ([`GameLogic`]) and deterministic: it
//! never reads a clock, opens a socket or starts a thread. Time is the
//! [`TickId`] the driver passes to [`NodeCore::tick`]; measured durations
//! (the tick's p99 for load reports) are arguments too.
//!
//! Inputs, in the `handle_*` style: a session opened, a client frame, a
//! session closed, a message from another shard or an order from the
//! coordinator ([`ShardMsg`]), a newer registry, a tick. Outputs come out of
//! [`NodeCore::poll_output`], each addressed to a client connection, a shard
//! (this node's or another's: the core does not know which, and a message to
//! itself goes out and comes back like any other) or the coordinator.
//!
//! The runtime drives one core per shard over glommio, its sockets and
//! mailboxes; the deterministic simulator drives the same cores over a
//! seeded network.

mod players;
mod route;
mod session;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use tessera_schema::protocol::Channel;

pub use players::{ParkedAvatar, PlayerDirectory};
pub use route::{client_id, gateway_of, Router, RouterCounters, CLIENT_SERIAL_BITS};
pub use session::{InputLimit, SessionCounters, Sessions};

use crate::cell::Envelope;
use crate::control::{CellLoad, LoadReport, Order, PeerMsg, Report};
use crate::game::GameLogic;
use crate::geometry::CellId;
use crate::handover::{AgentOutput, HandoverAgent};
use crate::ids::{ClientId, TickId};
use crate::messages::{CellEnvelope, CellMessage, ClientOutput, Output};
use crate::registry::{Registry, ShardRef};
use crate::replica::{ReplicaCounters, ReplicaMsg, ReplicaStore, Replicator};
use crate::world::ShardWorld;
use session::SessionSink;

/// Most hops a message for a split cell may spend looking for its entity
/// among the split cell's parts (the router gives up past it too).
const MAX_REDIRECT_HOPS: u8 = 8;

/// A client connection as the driver names it (the RUDP endpoint's handle,
/// as a number): the core only keys sessions by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionKey(pub u64);

/// What reaches a shard from outside its own sessions.
pub enum ShardMsg<G: GameLogic> {
    /// For one of its cells (inputs, ghosts, transfers, intents...).
    Cell(Envelope<G>),
    /// A frame for a client whose session this shard hosts.
    Client(ClientOutput),
    /// A handover step from the other side.
    Peer(PeerMsg<G>),
    /// An order from the coordinator.
    Order(Order),
    /// Replication between an owner shard and its backup.
    Replica(ReplicaMsg<G>),
}

impl<G: GameLogic> std::fmt::Debug for ShardMsg<G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShardMsg::Cell(env) => write!(f, "Cell({} for {})", env.msg.kind(), env.to),
            ShardMsg::Client(out) => write!(f, "Client({:?} for {})", out.kind, out.client),
            ShardMsg::Peer(m) => write!(f, "{m:?}"),
            ShardMsg::Order(o) => write!(f, "Order({o:?})"),
            ShardMsg::Replica(r) => write!(f, "{r:?}"),
        }
    }
}

/// What a core asks its driver to do.
pub enum NodeOutput<G: GameLogic> {
    /// Send an encoded server frame on a session's connection.
    Client {
        /// The session's connection.
        connection: ConnectionKey,
        /// The channel it goes on.
        channel: Channel,
        /// The frame.
        bytes: Vec<u8>,
    },
    /// Close a session's connection with this code
    /// (`tessera_schema::protocol::disconnect`).
    Disconnect {
        /// The session's connection.
        connection: ConnectionKey,
        /// Why.
        code: u16,
    },
    /// Deliver to a shard (maybe this one) with [`NodeCore::handle_message`].
    Shard {
        /// The destination.
        to: ShardRef,
        /// The message.
        msg: ShardMsg<G>,
    },
    /// Tell the coordinator.
    Coordinator(Report),
}

/// One cell as the core sums it up for operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CellSummary {
    /// The cell.
    pub cell: CellId,
    /// Entities owned.
    pub entities: usize,
    /// Ghosts held.
    pub ghosts: usize,
    /// Players among the entities.
    pub players: usize,
}

/// One shard's world, sessions, routing and handovers.
pub struct NodeCore<G: GameLogic> {
    me: ShardRef,
    world: ShardWorld<G>,
    agent: HandoverAgent<G>,
    sessions: Sessions,
    router: Router,
    outputs: VecDeque<NodeOutput<G>>,
    to_route: Vec<Envelope<G>>,
    inputs_seen: BTreeMap<CellId, u64>,
    replicator: Replicator<G>,
    replicas: ReplicaStore<G>,
    /// Transfers to other shards waiting for the replication round that
    /// covers their departure: (round, message).
    held: VecDeque<(u64, Option<ShardRef>, Envelope<G>)>,
    /// Transfers this shard passed on for cells it no longer runs (a
    /// released handover's buffered messages): kept like a cell keeps its
    /// own departures, and sent again if their destination is restored.
    passing: VecDeque<crate::cell::Retained<G>>,
    /// Handovers activated here waiting for the round that carries their
    /// cell to the backup: (round, handover, cell).
    durable_after: VecDeque<(u64, crate::control::HandoverId, CellId)>,
    /// Handovers reported (or queued to be) durable, with the cluster epoch
    /// of the coordinator told: a new coordinator is told again while the
    /// registry still records their frozen copy.
    durable_told: BTreeMap<crate::control::HandoverId, u32>,
    /// Cells of a promotion this shard had no replica of and left to their
    /// frozen copy, with the cluster epoch of the coordinator told.
    missing_told: BTreeMap<CellId, u32>,
    /// Cells another shard said it restored (lost shard, new owner), used
    /// for routing until this shard's registry says so too.
    restored_routes: BTreeMap<CellId, (ShardRef, ShardRef)>,
    /// True while this shard's lease on its cells is not valid.
    fenced: bool,
    /// Times the lease ran out after having been held (cells frozen).
    fences: u64,
    /// A lease was held once (before the first, a shard has nothing to
    /// protect: being fenced then is the normal start).
    leased: bool,
    /// Cells frozen by the fence (not by a handover).
    fence_frozen: BTreeSet<CellId>,
}

/// Marks a transfer as a copy sent again (taken only if new to its
/// receiver); other messages are left as they are.
fn mark_resent<C, I>(msg: &mut CellMessage<C, I>) {
    if let CellMessage::Transfer(t) = msg {
        t.resent = true;
    }
}

/// Ticks a transfer sent again after a restore may take to reach its
/// receiver (holding for replication, links, queues): older copies are not
/// sent again (see `resend_kept`).
const RESEND_TRANSIT_TICKS: u64 = 20;

/// How many ticks apart replication rounds are by default (the state a
/// node's loss can cost, plus the link's delay).
pub const REPLICATE_EVERY: u64 = 2;

impl<G: GameLogic> NodeCore<G> {
    /// The core of shard `me`, first process of its node (incarnation 0):
    /// see [`NodeCore::with_incarnation`].
    pub fn new(me: ShardRef, world: ShardWorld<G>, registry: Arc<Registry>) -> Self {
        Self::with_incarnation(me, world, registry, 0)
    }

    /// The core of shard `me` in process `incarnation` (as its node
    /// registered with the coordinator): it takes the cells `registry`
    /// gives it (empty, at their epochs) into `world`, unless the registry
    /// records another process for this node: those cells were that
    /// process's, their state lives in replicas, and they fail over.
    pub fn with_incarnation(
        me: ShardRef,
        mut world: ShardWorld<G>,
        registry: Arc<Registry>,
        incarnation: u64,
    ) -> Self {
        let backup = registry.backup_of(me);
        let ours = registry
            .incarnation_of(me.node)
            .is_none_or(|i| i == incarnation);
        if ours {
            for (cell, a) in registry.cells_of(me) {
                world.add_cell(cell);
                world.set_epoch(cell, a.epoch);
            }
        } else if !registry.cells_of(me).is_empty() {
            tracing::warn!(shard = %me, incarnation, previous = ?registry.incarnation_of(me.node), cells = registry.cells_of(me).len(),
                "the registry gives this shard an earlier process's cells: not run here (they fail over to their backup)");
        }
        Self {
            me,
            world,
            agent: HandoverAgent::new(me),
            sessions: Sessions::new(me),
            router: Router::new(registry),
            outputs: VecDeque::new(),
            to_route: Vec::new(),
            inputs_seen: BTreeMap::new(),
            // The first registry may already name the backup (a node that
            // joined late): later ones only replace it when newer.
            replicator: {
                let mut r = Replicator::new(me, REPLICATE_EVERY);
                r.set_backup(backup);
                r.set_incarnation(incarnation);
                r
            },
            replicas: ReplicaStore::new(me),
            held: VecDeque::new(),
            passing: VecDeque::new(),
            durable_after: VecDeque::new(),
            durable_told: BTreeMap::new(),
            missing_told: BTreeMap::new(),
            restored_routes: BTreeMap::new(),
            fenced: false,
            fences: 0,
            leased: false,
            fence_frozen: BTreeSet::new(),
        }
    }

    // ----- getters -----

    /// This shard.
    pub fn me(&self) -> ShardRef {
        self.me
    }

    /// The cells this shard owns.
    pub fn world(&self) -> &ShardWorld<G> {
        &self.world
    }

    /// The world, mutably (populating it at start, tests).
    pub fn world_mut(&mut self) -> &mut ShardWorld<G> {
        &mut self.world
    }

    /// This shard's side of handovers.
    pub fn agent(&self) -> &HandoverAgent<G> {
        &self.agent
    }

    /// The sessions hosted here.
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// The routing view.
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Replication and recovery counters.
    pub fn replica_counters(&self) -> ReplicaCounters {
        self.replicator.counters()
    }

    /// The replicas this shard holds as a backup.
    pub fn replicas(&self) -> &ReplicaStore<G> {
        &self.replicas
    }

    /// Transfers waiting for their departure to be replicated.
    pub fn held_transfers(&self) -> impl Iterator<Item = &Envelope<G>> + '_ {
        self.held.iter().map(|(_, _, e)| e)
    }

    /// True while the lease is not valid (cells frozen, nothing written).
    pub fn is_fenced(&self) -> bool {
        self.fenced
    }

    /// Times the lease ran out after this shard had held one (a cut from
    /// the coordinator longer than the lease, or a coordinator failover that
    /// did not fit in it).
    pub fn fences(&self) -> u64 {
        self.fences
    }

    /// The driver's verdict on this shard's lease (renewed by the
    /// coordinator's heartbeat acks): without a valid lease the coordinator
    /// may give the cells to their backup, so the shard stops writing them
    /// (frozen: no simulation, no snapshots, inputs buffered) until the
    /// lease is renewed or the registry says they moved.
    pub fn set_fenced(&mut self, fenced: bool) {
        if fenced == self.fenced {
            return;
        }
        self.fenced = fenced;
        let tick = self.world.tick_id().0;
        if fenced {
            if self.leased {
                self.fences += 1;
                tracing::warn!(shard = %self.me, tick, cells = self.world.cells().count(), "lease expired: fenced, cells frozen");
            } else {
                tracing::info!(shard = %self.me, tick, "no lease yet: cells frozen until the coordinator's first heartbeat ack");
            }
            self.freeze_for_fence();
        } else {
            self.leased = true;
            tracing::info!(shard = %self.me, tick, "lease renewed: cells resume");
            for c in std::mem::take(&mut self.fence_frozen) {
                self.world.unfreeze(c);
            }
        }
    }

    fn freeze_if_fenced(&mut self, cell: CellId) {
        if self.fenced && self.world.freeze(cell) {
            self.fence_frozen.insert(cell);
        }
    }

    fn freeze_for_fence(&mut self) {
        for c in self.world.cell_ids() {
            if self.world.freeze(c) {
                self.fence_frozen.insert(c);
            }
        }
    }

    /// Every owned cell, summed up.
    pub fn cell_summaries(&self) -> Vec<CellSummary> {
        self.world
            .cells()
            .map(|c| CellSummary {
                cell: c.id(),
                entities: c.entities().len(),
                ghosts: c.ghosts().len(),
                players: c.entities().iter().filter(|e| e.client.is_some()).count(),
            })
            .collect()
    }

    /// Forgets every handover in progress on this shard (a restart of its
    /// agent: shadows and pending steps are lost; cells and sessions stay).
    pub fn restart_agent(&mut self) {
        self.agent = HandoverAgent::new(self.me);
    }

    // ----- inputs -----

    /// A client's handshake completed on this shard: a session opens.
    pub fn handle_connected(&mut self, connection: ConnectionKey) -> ClientId {
        self.sessions.open(connection, None)
    }

    /// As [`NodeCore::handle_connected`], for the player a connect token
    /// names: if the player's earlier session was lost, its join takes the
    /// parked avatar back (see [`NodeCore::set_player_directory`]). One
    /// session per player is the transport's rule (`TokenInUse`).
    pub fn handle_connected_as(&mut self, connection: ConnectionKey, player: u64) -> ClientId {
        self.sessions.open(connection, Some(player))
    }

    /// Parks lost players' avatars in `directory` (one per node, shared by
    /// its shards) instead of removing them.
    pub fn set_player_directory(&mut self, directory: Arc<PlayerDirectory>) {
        self.sessions.set_player_directory(directory);
    }

    /// A frame from a session's client.
    pub fn handle_client_frame(&mut self, connection: ConnectionKey, bytes: &[u8]) {
        let mut sink = SessionSink {
            cells: &mut self.to_route,
            outputs: &mut self.outputs,
        };
        let tick = self.world.tick_id();
        let (game, layout) = (self.world.game(), self.world.layout());
        self.sessions
            .handle_frame(&mut sink, connection, bytes, tick, game, layout);
        self.route_pending();
    }

    /// The key of the resume credentials this shard's sessions mint (the
    /// driver passes fresh randomness once, at start).
    pub fn set_session_secret(&mut self, k0: u64, k1: u64) {
        self.sessions.set_secret(k0, k1);
    }

    /// Limits each session's inputs, acks and pings (None: unlimited); the
    /// world ticks `tick_hz` times a second.
    pub fn set_input_limit(&mut self, limit: Option<session::InputLimit>, tick_hz: u32) {
        self.sessions.set_input_limit(limit, tick_hz);
    }

    /// The cluster's other gateways ("host:port"), where this shard's
    /// clients resume if it is lost: sent to each client at its welcome,
    /// and to every joined client when the list changes.
    pub fn set_gateways(&mut self, gateways: Vec<String>) {
        let mut sink = SessionSink {
            cells: &mut self.to_route,
            outputs: &mut self.outputs,
        };
        self.sessions.set_gateways::<G>(&mut sink, gateways);
    }

    /// This shard's gateway drains: each session is told to resume at
    /// another gateway, and its close (the client's, or the driver's after
    /// a grace) leaves the avatar in the world for that resume. Returns the
    /// sessions told (0 when no other gateway is known: then closing makes
    /// the avatars leave, as before).
    pub fn hand_off_sessions(&mut self) -> usize {
        let mut sink = SessionSink {
            cells: &mut self.to_route,
            outputs: &mut self.outputs,
        };
        self.sessions.hand_off::<G>(&mut sink)
    }

    /// A session's connection closed (either side): its avatar leaves the
    /// world. A timeout is [`NodeCore::handle_connection_lost`].
    pub fn handle_disconnected(&mut self, connection: ConnectionKey) {
        self.sessions
            .close::<G>(connection, false, &mut self.to_route);
        self.route_pending();
    }

    /// A session's client went without leaving (a timeout, a client that
    /// closed without a leave): a player's avatar (a session opened with
    /// [`NodeCore::handle_connected_as`]) is parked for the player's next
    /// session; any other avatar leaves.
    pub fn handle_connection_lost(&mut self, connection: ConnectionKey) {
        self.sessions
            .close::<G>(connection, true, &mut self.to_route);
        self.route_pending();
    }

    /// A message from another shard (or this one) or the coordinator.
    pub fn handle_message(&mut self, msg: ShardMsg<G>) {
        match msg {
            ShardMsg::Cell(env) => self.deliver_cell(env),
            ShardMsg::Client(out) => self.for_session(out),
            ShardMsg::Peer(m) => {
                let tick = self.world.tick_id();
                let outputs = self.agent.handle_peer(&mut self.world, m, tick);
                self.agent_outputs(outputs);
            }
            ShardMsg::Order(order) => self.handle_order(order),
            ShardMsg::Replica(m) => self.handle_replica(m),
        }
    }

    fn handle_replica(&mut self, msg: ReplicaMsg<G>) {
        match msg {
            round @ ReplicaMsg::Round { from, .. } => {
                if self.router.registry().backup_of(from) != Some(self.me) {
                    // Not (or no longer) its backup: ignored (the owner's
                    // next backup gets a full round).
                    self.replicator.counters_mut().rounds_ignored += 1;
                    return;
                }
                let (registry, world, me) = (self.router.registry(), &self.world, self.me);
                let answer = self.replicas.on_round(
                    round,
                    // An earlier process's cells are needed until promoted:
                    // still its, or given here and not run yet.
                    |c| {
                        registry
                            .get(c)
                            .is_some_and(|a| a.owner == from || (a.owner == me && !world.owns(c)))
                    },
                    self.replicator.counters_mut(),
                );
                if let Some(answer) = answer {
                    self.outputs.push_back(NodeOutput::Shard {
                        to: from,
                        msg: ShardMsg::Replica(answer),
                    });
                }
            }
            ReplicaMsg::Ack { from, seq } => {
                self.replicator.on_ack(from, seq);
                self.release_held();
            }
            ReplicaMsg::Resync { from } => self.replicator.on_resync(from),
            ReplicaMsg::Restored {
                from,
                lost,
                cells,
                tick,
            } => {
                for c in &cells {
                    if self
                        .router
                        .registry()
                        .get(*c)
                        .is_some_and(|a| a.owner == lost)
                    {
                        self.restored_routes.insert(*c, (lost, from));
                    }
                }
                let resent = self.resend_kept(lost, &cells, &[], Some(from));
                tracing::info!(shard = %self.me, %from, %lost, cells = cells.len(), replica_tick = tick.0, resent,
                    "a lost shard's cells restored: transfers kept for them, or sent by it, sent again");
            }
        }
    }

    /// Replaces this shard's frozen copy of a cell it was handing over with
    /// the (newer) replica of it: what arrived after the diff and waits in
    /// the frozen copy goes to the replica (transfers as copies, in case
    /// the lost target had them).
    fn replace_frozen_source(&mut self, cell: CellId, state: crate::cell::CellState<G>) {
        self.agent.forget_source(cell);
        let waiting = self
            .world
            .take_cell(cell)
            .map(|mut c| c.take_inputs())
            .unwrap_or_default();
        let mut c = crate::cell::Cell::from_state(state, self.world.layout());
        c.restore_inputs(
            waiting
                .into_iter()
                .map(|mut m| {
                    mark_resent(&mut m);
                    m
                })
                .collect(),
        );
        self.world.insert_cell(c);
        self.replicator.counters_mut().promoted += 1;
    }

    /// Tells every other shard that `cells` of the lost shard `lost` run
    /// here again, from replicas of `tick`.
    fn tell_restored(&mut self, lost: ShardRef, cells: Vec<CellId>, tick: TickId) {
        let others: BTreeSet<ShardRef> = self
            .router
            .registry()
            .iter()
            .map(|(_, a)| a.owner)
            .filter(|o| *o != self.me)
            .collect();
        for shard in others {
            self.outputs.push_back(NodeOutput::Shard {
                to: shard,
                msg: ShardMsg::Replica(ReplicaMsg::Restored {
                    from: self.me,
                    lost,
                    cells: cells.clone(),
                    tick,
                }),
            });
        }
    }

    /// Sends a transfer that left one of this shard's cells for another
    /// shard: once the round covering its departure is acknowledged (at
    /// once without a backup).
    fn send_transfer(&mut self, env: Envelope<G>) {
        self.send_transfer_via(None, env);
    }

    /// As [`Self::send_transfer`]; with `via`, to that shard whatever this
    /// shard's registry says (a copy for a cell just restored there: the
    /// registry naming it may not have arrived yet).
    fn send_transfer_via(&mut self, via: Option<ShardRef>, env: Envelope<G>) {
        if self.replicator.backup().is_none() {
            self.send_or_route(via, env);
            return;
        }
        self.replicator.counters_mut().transfers_held += 1;
        let seq = self.replicator.covering_seq();
        self.held.push_back((seq, via, env));
    }

    fn send_or_route(&mut self, via: Option<ShardRef>, env: Envelope<G>) {
        match via {
            Some(shard) if shard != self.me => {
                self.router.sent_cell();
                self.outputs.push_back(NodeOutput::Shard {
                    to: shard,
                    msg: ShardMsg::Cell(env),
                });
            }
            _ => self.route_cell(env),
        }
    }

    fn keep_passing(&mut self, to: CellId, msg: &crate::cell::Msg<G>) {
        if self.replicator.backup().is_none() {
            return;
        }
        if let CellMessage::Transfer(t) = msg {
            self.passing.push_back(crate::cell::Retained {
                departed: self.world.tick_id(),
                to,
                sent_by: self.me,
                transfer: (**t).clone(),
            });
        }
    }

    /// Sends again (as copies the receiver takes only if new) every
    /// transfer this shard keeps that shard `lost` transmitted or that went
    /// to one of `cells` (restored from replicas, or lost buffers), except
    /// those kept by the cells in `skip`. Returns how many.
    fn resend_kept(
        &mut self,
        lost: ShardRef,
        cells: &[CellId],
        skip: &[CellId],
        restorer: Option<ShardRef>,
    ) -> usize {
        let restored = |to: CellId| {
            cells
                .iter()
                .any(|c| *c == to || c.contains_cell(to) || to.contains_cell(*c))
        };
        let hit = |sent_by: ShardRef, to: CellId| sent_by == lost || restored(to);
        let mut resend = Vec::new();
        for cell in self.world.cells() {
            if skip.contains(&cell.id()) {
                continue;
            }
            resend.extend(
                cell.resend_for(hit)
                    .into_iter()
                    .map(|(to, t)| (cell.id(), to, t)),
            );
        }
        for r in self.passing.iter().filter(|r| hit(r.sent_by, r.to)) {
            let mut t = r.transfer.clone();
            t.resent = true;
            resend.push((r.to, r.to, t));
        }
        self.leave_out_too_old(&mut resend);
        let n = resend.len();
        for (from_cell, to, t) in resend {
            self.replicator.counters_mut().transfers_resent += 1;
            let via = restorer.filter(|_| cells.contains(&to));
            self.send_transfer_via(
                via,
                CellEnvelope {
                    to,
                    from: from_cell,
                    msg: CellMessage::Transfer(Box::new(t)),
                },
            );
        }
        n
    }

    /// A receiver recognises a copy it already had by its forward pointer
    /// for the entity, which lives `forward_ticks` from the entity's
    /// departure from it (later than the copy's). A copy too old to arrive
    /// while that pointer surely lives could bring back an entity that left
    /// since: it stays home. (A replica's kept copies are not pruned until
    /// the restored cell ticks.)
    fn leave_out_too_old(&mut self, resend: &mut Vec<(CellId, CellId, crate::cell::Transfer<G>)>) {
        let now = self.world.tick_id().0;
        let horizon = self
            .world
            .config()
            .forward_ticks
            .saturating_sub(RESEND_TRANSIT_TICKS);
        let before = resend.len();
        resend.retain(|(_, _, t)| t.departed.0.saturating_add(horizon) >= now);
        let dropped = before - resend.len();
        if dropped > 0 {
            self.replicator.counters_mut().transfers_too_old_to_resend += dropped as u64;
            tracing::info!(shard = %self.me, tick = now, dropped, "kept transfers too old to send again: left out");
        }
    }

    fn release_held(&mut self) {
        let acked = if self.replicator.backup().is_some() {
            self.replicator.acked()
        } else {
            u64::MAX
        };
        while self.held.front().is_some_and(|(seq, ..)| *seq <= acked) {
            let (_, via, env) = self.held.pop_front().expect("checked");
            self.send_or_route(via, env);
        }
        while self
            .durable_after
            .front()
            .is_some_and(|(seq, ..)| *seq <= acked)
        {
            let (_, id, cell) = self.durable_after.pop_front().expect("checked");
            self.report(Report::Durable { id, cell });
        }
    }

    /// A backup takes over the cells of a lost shard.
    fn promote(&mut self, from: ShardRef, cells: Vec<(CellId, u32)>, fallback: &[CellId]) {
        let tick = self.world.tick_id();
        let replica_tick = self.replicas.tick_of(from).unwrap_or(TickId(0));
        // A shard is promoted once the registry gives all its cells away:
        // one it still names as an owner runs (restarted, given cells
        // again), and this is a replayed order that must not retire what
        // this shard holds of it.
        if let Some((cell, _)) = self.router.registry().iter().find(|(_, a)| a.owner == from) {
            self.replicator.counters_mut().promotions_stale += 1;
            tracing::info!(shard = %self.me, lost = %from, %cell, "promotion of a shard the registry still gives cells: a stale order, ignored");
            return;
        }
        let (mut restored, mut missing, mut entities) = (Vec::new(), Vec::new(), 0usize);
        for (cell, epoch) in cells {
            // The registry comes before the orders relying on it: one that
            // gives the cell elsewhere, or at a newer epoch, makes this a
            // replayed or outdated order.
            if self
                .router
                .registry()
                .get(cell)
                .is_none_or(|a| a.owner != self.me || a.epoch > epoch)
            {
                self.replicator.counters_mut().promotions_stale += 1;
                tracing::info!(shard = %self.me, %cell, epoch, lost = %from, "promotion the registry does not back: a stale order, ignored");
                continue;
            }
            if self.world.owns(cell) {
                // This shard was handing the cell to the lost shard: the
                // replica, if the lost shard's backup (here) had one, is newer
                // than the frozen copy. Otherwise (no handover) a repeated
                // order.
                if let Some(id) = self.agent.source_id(cell) {
                    match self.replicas.take(from, cell) {
                        Some(p) => {
                            entities += p.state.entities.len();
                            self.replace_frozen_source(cell, p.state);
                        }
                        None => {
                            self.agent.reclaim(&mut self.world, id, cell);
                        }
                    }
                }
                self.world.set_epoch(cell, epoch);
                restored.push(cell);
                continue;
            }
            match self.replicas.take(from, cell) {
                Some(p) => {
                    entities += p.state.entities.len();
                    let c = crate::cell::Cell::from_state(p.state, self.world.layout());
                    self.world.insert_cell(c);
                    self.replicator.counters_mut().promoted += 1;
                    restored.push(cell);
                }
                None if fallback.contains(&cell) => {
                    // Its handover's source takes it back.
                    let epoch = self.router.registry().cluster_epoch();
                    self.missing_told.insert(cell, epoch);
                    missing.push(cell);
                    continue;
                }
                None => {
                    self.world.add_cell(cell);
                    self.replicator.counters_mut().promoted_empty += 1;
                    missing.push(cell);
                }
            }
            self.world.set_epoch(cell, epoch);
            self.freeze_if_fenced(cell);
        }
        tracing::warn!(shard = %self.me, lost = %from, cells = restored.len(), missing = missing.len(), entities,
            replica_tick = replica_tick.0, tick = tick.0, "promoted the replicas of a lost shard");
        // What the lost shard had sent (or held) for other shards goes again;
        // receivers take only what they do not know.
        let mut resend = Vec::new();
        for cell in &restored {
            if let Some(c) = self.world.cell(*cell) {
                resend.extend(
                    c.resend_for(|_, _| true)
                        .into_iter()
                        .map(|(to, t)| (*cell, to, t)),
                );
            }
        }
        // What the lost shard had passed on for cells it no longer ran.
        for mut r in self.replicas.passing_of(from) {
            r.transfer.resent = true;
            resend.push((r.to, r.to, r.transfer));
        }
        // Transfers waiting in the lost shard's other cells (a handover
        // source's buffer, forwarded after its commit) go again too, and
        // their senders send what they kept for those cells.
        let mut leftover = Vec::new();
        for (cell, msgs) in self.replicas.retire(from, tick) {
            leftover.push(cell);
            for msg in msgs {
                if let CellMessage::Transfer(mut t) = msg {
                    t.resent = true;
                    resend.push((cell, cell, *t));
                }
            }
        }
        self.leave_out_too_old(&mut resend);
        for (from_cell, to, t) in resend {
            self.replicator.counters_mut().transfers_resent += 1;
            self.send_transfer(CellEnvelope {
                to,
                from: from_cell,
                msg: CellMessage::Transfer(Box::new(t)),
            });
        }
        // And what this shard's own cells sent the lost shard, or sent
        // through it.
        let mut all: Vec<CellId> = restored.iter().chain(&missing).copied().collect();
        all.extend(leftover);
        self.resend_kept(from, &all, &restored, None);
        self.tell_restored(from, all, replica_tick);
        self.report(Report::Promoted {
            from,
            cells: restored,
            missing,
            replica_tick,
            tick,
            entities,
        });
    }

    /// A registry version from the coordinator. Its layout is adopted unless
    /// it is behind this shard's own reshapes (a split or merge done here and
    /// not yet in the registry): every owned cell must be one of its leaves.
    ///
    /// A cell the registry gives another owner at a newer epoch, with no
    /// handover of it in progress here, was restored from its replica
    /// elsewhere while this shard was cut off: it is dropped (what waited
    /// in it goes to the new owner).
    pub fn handle_registry(&mut self, registry: Arc<Registry>) {
        if !self.router.replace(registry) {
            return;
        }
        let registry = self.router.registry().clone();
        let layout = registry.layout().clone();
        if self.world.cells().all(|c| layout.is_leaf(c.id())) {
            self.world.set_layout(layout);
        }
        for c in self.world.cell_ids() {
            let Some(a) = registry.get(c) else { continue };
            let mine = self.world.epoch(c).unwrap_or(0);
            // A handover this shard had only begun (not frozen) cannot have
            // moved the cell: it was restored elsewhere while this shard was
            // cut off, and the handover is moot. A frozen one waits for the
            // coordinator (its commit, or a reclaim).
            let moot = self.agent.source_unfrozen(c);
            let admin = crate::registry::ADMIN_EPOCH;
            if a.owner == self.me && a.epoch == admin && mine != admin {
                // An operator pinned it here (seed 002's admin epoch): a
                // handover of it was aborted; it now runs at the epoch
                // above every other.
                tracing::error!(shard = %self.me, cell = %c, was = mine, "ADMIN EPOCH: cell pinned to this shard by an operator");
                self.world.set_epoch(c, admin);
                continue;
            }
            // Ownership at the admin epoch follows the registry alone (the
            // epoch cannot go higher: a pinned cell fails over at it).
            let newer = a.epoch > mine || (a.epoch == admin && mine == admin);
            if a.owner != self.me && newer && (!self.agent.busy(c) || moot) {
                if moot {
                    self.agent.forget_source(c);
                }
                self.drop_superseded(c, a.owner, a.epoch, mine);
            }
        }
        self.restored_routes
            .retain(|c, (lost, _)| registry.get(*c).is_some_and(|a| a.owner == *lost));
        self.replicator.set_backup(registry.backup_of(self.me));
        self.retell_to_new_coordinator(&registry);
        // Replicas of shards now backed up elsewhere are dropped; those of
        // shards without a backup entry (lost, promotion pending) stay, and
        // so do those holding a cell the registry gives here that this
        // shard does not run yet (its promotion order is on the way: a
        // coordinator that took over meanwhile may have placed a backup
        // for a lost shard it has not found dead yet).
        let (me, world) = (self.me, &self.world);
        self.replicas.retain_sources(|s, cells| {
            registry.backup_of(s).is_none_or(|b| b == me)
                || cells.iter().any(|c| {
                    registry
                        .get(*c)
                        .is_some_and(|a| a.owner == me && !world.owns(*c))
                })
        });
        let owners: BTreeSet<ShardRef> = registry.iter().map(|(_, a)| a.owner).collect();
        self.replicas.forget_retired(|s| owners.contains(&s));
        self.release_held();
    }

    /// What a coordinator that crashed may never have read, told again to
    /// its successor (a registry of a newer cluster epoch) while the
    /// registry still records a frozen copy: a commit into this shard that
    /// its backup holds (reported durable after the next acknowledged
    /// round), and a promoted cell this shard had no replica of.
    fn retell_to_new_coordinator(&mut self, registry: &crate::registry::Registry) {
        let epoch = registry.cluster_epoch();
        self.durable_told.retain(|id, _| {
            registry
                .frozen_copies()
                .values()
                .any(|f| f.handover == id.0)
        });
        for (cell, f) in registry.frozen_copies() {
            let id = crate::control::HandoverId(f.handover);
            let mine = f.target == self.me
                && self.world.owns(*cell)
                && registry.get(*cell).is_some_and(|a| a.owner == self.me);
            let told = self.durable_told.get(&id).is_some_and(|e| *e >= epoch);
            let queued = self.durable_after.iter().any(|(_, i, _)| *i == id);
            if mine && !told && !queued {
                self.replicator.counters_mut().durable_retold += 1;
                let seq = self.replicator.covering_seq();
                self.durable_after.push_back((seq, id, *cell));
                self.durable_told.insert(id, epoch);
            }
        }
        // A cell of a lost handover target that this shard was promoted to
        // without a replica of it: the report saying so went to a
        // coordinator that crashed since; the cell waits for its frozen
        // copy until the new one hears it.
        let me = self.me;
        self.missing_told.retain(|c, _| {
            registry.get(*c).is_some_and(|a| a.owner == me)
                && registry.frozen_copy(*c).is_some_and(|f| f.target != me)
        });
        let again: Vec<(CellId, ShardRef)> = self
            .missing_told
            .iter()
            .filter(|(c, e)| **e < epoch && !self.world.owns(**c))
            .filter_map(|(c, _)| registry.frozen_copy(*c).map(|f| (*c, f.target)))
            .collect();
        for (cell, lost) in again {
            self.missing_told.insert(cell, epoch);
            self.replicator.counters_mut().missing_retold += 1;
            self.report(Report::Promoted {
                from: lost,
                cells: Vec::new(),
                missing: vec![cell],
                replica_tick: TickId(0),
                tick: self.world.tick_id(),
                entities: 0,
            });
        }
    }

    fn drop_superseded(&mut self, cell: CellId, owner: ShardRef, epoch: u32, mine: u32) {
        let Some(mut c) = self.world.take_cell(cell) else {
            return;
        };

        self.fence_frozen.remove(&cell);
        self.replicator.counters_mut().cells_superseded += 1;
        // Its departures still held are redundant: either the replica it was
        // restored from covers them (its new owner sent the copy it kept),
        // or it predates them (the entity is still in the restored cell).
        // Sending them would make an entity twice.
        let before = self.held.len();
        self.held.retain(|(_, _, env)| {
            !(env.from == cell && matches!(env.msg, CellMessage::Transfer(_)))
        });
        let dropped = before - self.held.len();
        if dropped > 0 {
            tracing::info!(shard = %self.me, %cell, dropped, "held departures of a superseded cell dropped");
        }
        tracing::warn!(shard = %self.me, %cell, %owner, epoch, held_epoch = mine, entities = c.entities().len(),
            "cell restored elsewhere while this shard was cut off: dropped");
        for mut msg in c.take_inputs() {
            // The restored copy may have moved the entity on since: this
            // one goes as a copy sent again, taken only if new.
            mark_resent(&mut msg);
            self.keep_passing(cell, &msg);
            self.route_cell(CellEnvelope {
                to: cell,
                from: cell,
                msg,
            });
        }
    }

    /// Runs one tick of the world and this shard's handover steps that follow
    /// it (freezes happen right after a tick: the target can run the cell
    /// from the next one).
    ///
    /// Then, if a round is due, the cells go to the backup; transfers that
    /// left for other shards during the tick wait for that round's ack.
    pub fn tick(&mut self, id: TickId) {
        if self.fenced {
            // Cells that arrived while fenced (a handover's commit) wait too.
            self.freeze_for_fence();
        }
        let keep = self.world.config().retain_ticks;
        self.replicas.prune(id, keep);
        while self
            .passing
            .front()
            .is_some_and(|r| r.departed.0.saturating_add(keep) < id.0)
        {
            self.passing.pop_front();
        }
        self.world.tick(id);
        let produced: Vec<_> = self.world.drain_outbox().collect();
        let replicating = self.replicator.backup().is_some();
        for out in produced {
            match out {
                Output::Cell(env) => {
                    let departed_here =
                        matches!(env.msg, CellMessage::Transfer(_)) && self.world.owns(env.from);
                    if replicating && departed_here {
                        if let (CellMessage::Transfer(t), Some(cell)) =
                            (&env.msg, self.world.cell_mut(env.from))
                        {
                            cell.retain_transfer(id, env.to, self.me, (**t).clone());
                        }
                        self.send_transfer(env);
                    } else {
                        self.route_cell(env);
                    }
                }
                Output::Client(o) => self.send_client(o),
            }
        }
        let handover = self.agent.after_tick(&mut self.world, id);
        self.agent_outputs(handover);
        // Something waits for the round covering this tick (a transfer to
        // another shard, an activation to report durable): take it now
        // rather than at the next scheduled round.
        let acked = self.replicator.acked();
        let waiting = self.held.back().is_some_and(|(seq, ..)| *seq > acked)
            || self
                .durable_after
                .back()
                .is_some_and(|(seq, ..)| *seq > acked);
        if let Some((backup, round)) =
            self.replicator
                .round(&self.world, &self.passing, id, waiting)
        {
            self.outputs.push_back(NodeOutput::Shard {
                to: backup,
                msg: ShardMsg::Replica(round),
            });
        }
    }

    /// The load of every cell since the last call, for the coordinator (the
    /// driver calls it once a second with the tick duration it measured).
    pub fn report_load(&mut self, tick_us_p99: u64, budget_us: u64) {
        let mut cells = Vec::new();
        for c in self.world.cells() {
            let inputs = c.counters().inputs;
            let before = self.inputs_seen.insert(c.id(), inputs).unwrap_or(inputs);
            cells.push(CellLoad {
                cell: c.id(),
                actors: c.entities().len() as u32,
                players: c.entities().iter().filter(|e| e.client.is_some()).count() as u32,
                pps: inputs.saturating_sub(before) as f64,
            });
        }
        let live: BTreeSet<CellId> = cells.iter().map(|c| c.cell).collect();
        self.inputs_seen.retain(|c, _| live.contains(c));
        self.outputs
            .push_back(NodeOutput::Coordinator(Report::Load(LoadReport {
                tick_us_p99,
                budget_us,
                cells,
            })));
    }

    // ----- outputs -----

    /// The next thing to do, in the order the core decided it.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<NodeOutput<G>> {
        self.outputs.pop_front()
    }

    // ----- glue -----

    fn handle_order(&mut self, order: Order) {
        let tick = self.world.tick_id();
        match order {
            Order::Split { op, cell } => {
                let report = match self.world.split(cell) {
                    Ok(_) => {
                        tracing::info!(shard = %self.me, %cell, op, tick = tick.0, "split");
                        Report::Split { op, parent: cell }
                    }
                    Err(e) => Report::Refused {
                        op,
                        reason: e.to_string(),
                    },
                };
                self.report(report);
            }
            Order::Merge { op, parent } => {
                let report = match self.world.merge(parent) {
                    Ok(()) => {
                        tracing::info!(shard = %self.me, cell = %parent, op, tick = tick.0, "merge");
                        Report::Merged { op, parent }
                    }
                    Err(e) => Report::Refused {
                        op,
                        reason: e.to_string(),
                    },
                };
                self.report(report);
            }
            Order::Promote {
                from,
                cells,
                fallback,
            } => self.promote(from, cells, &fallback),
            Order::Reclaim {
                id,
                cell,
                epoch,
                lost,
            } => {
                let current = self.router.registry().get(cell);
                if current.is_none_or(|a| a.owner != self.me || a.epoch > epoch) {
                    tracing::info!(shard = %self.me, %cell, epoch, "reclaim the registry does not back: a stale order, ignored");
                } else if self.agent.reclaim(&mut self.world, id, cell) {
                    self.world.set_epoch(cell, epoch);
                    self.freeze_if_fenced(cell);
                    // What was sent into the cell while the lost target ran
                    // it comes again.
                    self.resend_kept(lost, &[cell], &[cell], None);
                    self.tell_restored(lost, vec![cell], self.world.tick_id());
                }
            }
            handover => {
                let outputs = self.agent.handle_order(&mut self.world, handover, tick);
                self.agent_outputs(outputs);
            }
        }
    }

    fn report(&mut self, report: Report) {
        self.outputs.push_back(NodeOutput::Coordinator(report));
    }

    fn agent_outputs(&mut self, outputs: Vec<AgentOutput<G>>) {
        for o in outputs {
            match o {
                AgentOutput::ToShard(to, m) => self.outputs.push_back(NodeOutput::Shard {
                    to,
                    msg: ShardMsg::Peer(m),
                }),
                AgentOutput::Report(r) => {
                    if let Report::Frozen {
                        id,
                        cell,
                        epoch,
                        tick,
                        entities,
                        repeat: false,
                    } = &r
                    {
                        tracing::info!(shard = %self.me, %cell, epoch, tick = tick.0, entities, handover = id.0, "handover: frozen");
                    }
                    let activated = match &r {
                        Report::Activated { id, cell } => Some((*id, *cell)),
                        _ => None,
                    };
                    self.report(r);
                    if let Some((id, cell)) = activated {
                        let seq = self.replicator.covering_seq();
                        self.durable_after.push_back((seq, id, cell));
                        let epoch = self.router.registry().cluster_epoch();
                        self.durable_told.insert(id, epoch);
                        self.release_held();
                    }
                }
                AgentOutput::Forward(cell, msgs) => {
                    for mut msg in msgs {
                        // Arrived after the diff: the new owner never saw it,
                        // unless the cell was restored from a replica that
                        // had it (a source cut off while it waited): taken
                        // only if new.
                        mark_resent(&mut msg);
                        self.keep_passing(cell, &msg);
                        let env = CellEnvelope {
                            to: cell,
                            from: cell,
                            msg,
                        };
                        // A transfer waits for the round that carries the
                        // copy kept of it, like a departure.
                        if matches!(env.msg, CellMessage::Transfer(_)) {
                            self.send_transfer(env);
                        } else {
                            self.route_cell(env);
                        }
                    }
                }
            }
        }
    }

    fn route_pending(&mut self) {
        let pending = std::mem::take(&mut self.to_route);
        for env in pending {
            self.route_cell(env);
        }
    }

    /// A cell message from elsewhere: the world takes it, or a handover
    /// shadow (the registry may route to this shard before its commit
    /// arrives), or it is routed on (the cell moved meanwhile).
    fn deliver_cell(&mut self, env: Envelope<G>) {
        let Err(env) = self.world.deliver(env) else {
            return;
        };
        let CellEnvelope { to, from, msg } = env;
        let Err(msg) = self.agent.deliver_to_shadow(to, msg) else {
            return;
        };
        let msg = match self.router.owner_of(to) {
            // Named for a cell whose promotion order is on its way.
            Some(owner) if owner == self.me => match self.replicas.deliver(to, msg) {
                Ok(()) => return,
                Err(msg) => msg,
            },
            _ => msg,
        };
        self.route_cell(CellEnvelope { to, from, msg });
    }

    /// Sends a cell message to the owner(s) the registry names; when that is
    /// this shard, the world or a shadow must take it.
    fn route_cell(&mut self, mut env: Envelope<G>) {
        if let Some(owner) = self.router.owner_of(env.to) {
            self.send_cell_to(owner, env);
            return;
        }
        let owners = self.router.owners_of::<G>(&mut env);
        let Some((&last, rest)) = owners.split_last() else {
            tracing::warn!(shard = %self.me, cell = %env.to, kind = env.msg.kind(), "message for a cell no shard owns dropped");
            return;
        };
        // Several owners only for ghost updates to a split cell.
        for owner in rest {
            let copy = CellEnvelope {
                to: env.to,
                from: env.from,
                msg: env.msg.clone(),
            };
            self.send_cell_to(*owner, copy);
        }
        self.send_cell_to(last, env);
    }

    fn send_cell_to(&mut self, owner: ShardRef, env: Envelope<G>) {
        let owner = match self.restored_routes.get(&env.to) {
            Some(&(lost, new)) if lost == owner => new,
            _ => owner,
        };
        if owner != self.me {
            self.router.sent_cell();
            self.outputs.push_back(NodeOutput::Shard {
                to: owner,
                msg: ShardMsg::Cell(env),
            });
            return;
        }
        let Err(env) = self.world.deliver(env) else {
            return;
        };
        let CellEnvelope { to, from, mut msg } = env;
        if self.router.owner_of(to).is_none() {
            match msg.hops_mut() {
                Some(hops) if *hops < MAX_REDIRECT_HOPS => {
                    // The router tried this shard's part of a split cell for
                    // an entity none of our cells knows: on to the next part
                    // (each try costs a hop, so this ends).
                    *hops += 1;
                    self.route_cell(CellEnvelope { to, from, msg });
                }
                Some(_) => {
                    // No part of the split cell knows the entity: it left the
                    // world (its client left) or is lost; counted, like a
                    // cell's unknown entities.
                    self.router.counters_mut().entity_not_found += 1;
                    tracing::debug!(shard = %self.me, cell = %to, kind = msg.kind(), "no part of a split cell knows the entity: dropped");
                }
                None => {
                    if let CellMessage::Ghost(update) = &msg {
                        // The cells this shard is named for that cover the
                        // destination (its parts if it was split, the cell
                        // it was merged into) may still be handover
                        // shadows: they take it.
                        let me = self.me;
                        let parts: Vec<CellId> = self
                            .router
                            .registry()
                            .iter()
                            .filter(|(c, a)| {
                                a.owner == me && (to.contains_cell(*c) || c.contains_cell(to))
                            })
                            .map(|(c, _)| c)
                            .collect();
                        let mut taken = false;
                        for part in parts {
                            let copy = CellMessage::Ghost(update.clone());
                            taken |= self.agent.deliver_to_shadow(part, copy).is_ok();
                        }
                        if taken {
                            return;
                        }
                    }
                    self.router.counters_mut().cell_undeliverable += 1;
                    tracing::error!(shard = %self.me, cell = %to, kind = msg.kind(), "no part of a split cell takes the message: dropped");
                }
            }
            return;
        }
        let Err(msg) = self.agent.deliver_to_shadow(to, msg) else {
            return;
        };
        if let Err(msg) = self.replicas.deliver(to, msg) {
            self.router.counters_mut().cell_undeliverable += 1;
            tracing::error!(shard = %self.me, cell = %to, from = %from, kind = msg.kind(),
                "the registry names this shard but neither a cell nor a shadow takes the message: dropped");
        }
    }

    fn send_client(&mut self, out: ClientOutput) {
        let gateway = gateway_of(out.client);
        if gateway == self.me {
            self.for_session(out);
        } else {
            self.router.counters_mut().client_sent += 1;
            self.outputs.push_back(NodeOutput::Shard {
                to: gateway,
                msg: ShardMsg::Client(out),
            });
        }
    }

    fn for_session(&mut self, out: ClientOutput) {
        let mut sink = SessionSink {
            cells: &mut self.to_route,
            outputs: &mut self.outputs,
        };
        self.sessions.deliver_frame(&mut sink, out);
        // A refused reclaim turns into a join.
        if !self.to_route.is_empty() {
            self.route_pending();
        }
    }
}
