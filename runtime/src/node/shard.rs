//! The driver of one shard of a node: it owns the shard's RUDP endpoint and
//! socket, the clock and the mailbox plumbing, and feeds a
//! [`NodeCore`] (the shard's world, sessions, routing and handovers, all
//! in `tessera-cells`). It decides nothing about the game or about routes:
//! it turns socket events, mailbox messages and tick deadlines into the
//! core's `handle_*` calls, and the core's outputs into sends.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tessera_cells::node::{ConnectionKey, NodeCore, NodeOutput, ShardMsg};
use tessera_cells::wire::ControlMsg;
use tessera_cells::{GameLogic, ShardRef, TickId};
use tessera_net::driver::BatchSocket;
use tessera_net::{ChannelId, ConnectionHandle, Endpoint, Event, TransmitBatch};
use tessera_schema::protocol::disconnect;

use crate::cluster::shard::ClusterSide;

/// How often a clustered shard heartbeats (each ack renews its lease; the
/// coordinator declares a node dead after `dead_after` of silence).
pub const HEARTBEAT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
use crate::ids::{ShardId, StageAddr, StageId};
use crate::mailbox::{Envelope, SendError};
use crate::shard::{ShardContext, ShardHandler};
use crate::stage::{Handled, Stage, StageContext, StageTable};
use crate::tick::Tick;

use super::coordinator::{CoordInput, CoordSender};
use super::shared::{DriverCounters, NodeShardStats, NodeShared};

/// How long a stopping shard keeps pumping its sessions' disconnects (the
/// endpoint repeats them a few times, milliseconds apart, so that a client
/// hears one even if a copy is lost).
const DISCONNECT_LINGER: Duration = Duration::from_millis(100);

/// How long a draining gateway waits for the clients it told to resume
/// elsewhere to leave by themselves before it closes the rest.
const HAND_OFF_GRACE: Duration = Duration::from_secs(2);

/// Lets the socket watcher wait for the loop to drain the socket before it
/// watches again (a readable socket stays readable until drained).
#[derive(Default)]
struct Rearm {
    armed: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Rearm {
    fn arm(&self) {
        if !self.armed.replace(true) {
            if let Some(w) = self.waker.borrow_mut().take() {
                w.wake();
            }
        }
    }

    fn wait(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.armed.replace(false) {
                Poll::Ready(())
            } else {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
    }
}

/// Hands the core the published registry if it is another version (one
/// atomic load when nothing changed: this runs every tick). A clustered
/// node's shards take theirs from their coordinator link instead.
fn refresh_registry<G: GameLogic>(core: &mut NodeCore<G>, shared: &NodeShared) {
    if !shared.clustered && shared.registry_version() != core.router().registry().version() {
        core.handle_registry(shared.registry());
    }
}

/// The one stage of a node's shard: every message goes to the core, which
/// sorts it by cell itself.
pub struct CoreStage<G: GameLogic> {
    core: Rc<RefCell<NodeCore<G>>>,
    shared: Arc<NodeShared>,
}

impl<G: GameLogic> Stage<ShardMsg<G>> for CoreStage<G> {
    fn handle(
        &mut self,
        _cx: &mut StageContext<'_, ShardMsg<G>>,
        envelope: Envelope<ShardMsg<G>>,
    ) -> Handled {
        let mut core = self.core.borrow_mut();
        if matches!(envelope.msg, ShardMsg::Order(_)) {
            // The coordinator publishes the registry before it sends an
            // order: a commit must find the new route in place.
            refresh_registry(&mut core, &self.shared);
        }
        core.handle_message(envelope.msg);
        Handled::Done
    }
}

/// One shard of a node.
pub struct NodeShard<G: GameLogic> {
    shard: ShardId,
    me: ShardRef,
    shared: Arc<NodeShared>,
    core: Rc<RefCell<NodeCore<G>>>,
    endpoint: Endpoint,
    socket: BatchSocket,
    batch: TransmitBatch,
    coord: CoordSender,
    rearm: Rc<Rearm>,
    ticks: u64,
    tick_us: Histogram<u64>,
    budget_us: u64,
    counters: DriverCounters,
    linger_until: Option<Instant>,
    /// When a drain told the sessions to resume at another gateway, and
    /// whether any was told.
    handed_off: Option<(Instant, bool)>,
    cluster: Option<ClusterSide>,
    cluster_rearm: Rc<Rearm>,
    next_heartbeat: Instant,
    tick_base: u64,
}

fn handle(connection: ConnectionKey) -> ConnectionHandle {
    ConnectionHandle::from_bits(connection.0)
}

fn key(connection: ConnectionHandle) -> ConnectionKey {
    ConnectionKey(connection.to_bits())
}

impl<G: GameLogic> NodeShard<G> {
    /// The driver of `core` over a server endpoint and its bound socket.
    pub fn new(
        shard: ShardId,
        shared: Arc<NodeShared>,
        core: NodeCore<G>,
        endpoint: Endpoint,
        socket: BatchSocket,
        coord: CoordSender,
    ) -> Self {
        let budget_us = 1_000_000 / u64::from(shared.tick_hz.max(1));
        let batch = TransmitBatch::new(socket.batch_size());
        Self {
            shard,
            me: core.me(),
            shared,
            core: Rc::new(RefCell::new(core)),
            endpoint,
            socket,
            batch,
            coord,
            rearm: Rc::new(Rearm::default()),
            ticks: 0,
            tick_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
            budget_us,
            counters: DriverCounters::default(),
            linger_until: None,
            handed_off: None,
            cluster: None,
            cluster_rearm: Rc::new(Rearm::default()),
            next_heartbeat: Instant::now(),
            tick_base: 0,
        }
    }

    /// Numbers ticks from `base` (a cluster's tick of this node's start:
    /// tick ids then agree across nodes).
    pub fn with_tick_base(mut self, base: u64) -> Self {
        self.tick_base = base;
        self
    }

    /// Joins the shard to a cluster: messages for other nodes' shards go
    /// over `side`'s links, reports to the coordinator over its link.
    pub fn with_cluster(mut self, side: ClusterSide) -> Self {
        self.core.borrow_mut().set_gateways(side.other_gateways());
        self.cluster = Some(side);
        self
    }

    fn publish(&self) {
        let core = self.core.borrow();
        self.shared.publish(
            self.shard.index(),
            NodeShardStats {
                tick: core.world().tick_id().0,
                sessions: core.sessions().len(),
                gateway: core.sessions().counters(),
                frames_refused: core.sessions().refused(),
                endpoint: self.endpoint.stats().clone(),
                socket: self.socket.stats(),
                router: core.router().counters(),
                driver: self.counters,
                world: core.world().totals(),
                cells: core.cell_summaries(),
                handover: core.agent().counters(),
                cluster: self.cluster.as_ref().map(|c| c.counters()),
                replica: core.replica_counters(),
                fenced: core.is_fenced(),
                fences: core.fences(),
            },
        );
    }

    /// Carries out what the core asked for.
    fn drain_outputs(&mut self, cx: &mut ShardContext<ShardMsg<G>>, now: Instant) {
        let core = self.core.clone();
        let mut core = core.borrow_mut();
        while let Some(out) = core.poll_output() {
            match out {
                NodeOutput::Client {
                    connection,
                    channel,
                    bytes,
                } => {
                    let channel = ChannelId(channel.id());
                    if self
                        .endpoint
                        .send(handle(connection), channel, &bytes)
                        .is_err()
                    {
                        self.counters.send_refused += 1;
                    }
                }
                NodeOutput::Disconnect { connection, code } => {
                    let _ = self.endpoint.disconnect(now, handle(connection), code);
                }
                NodeOutput::Shard { to, msg } => {
                    if to.node != self.me.node {
                        if let Some(cluster) = &mut self.cluster {
                            let tick = core.world().tick_id();
                            cluster.queue(to, &msg, tick, core.router().registry(), now);
                            continue;
                        }
                    }
                    self.send_shard(cx, to, msg)
                }
                NodeOutput::Coordinator(report) => match &mut self.cluster {
                    Some(cluster) => {
                        let tick = core.world().tick_id();
                        cluster.send_control(&ControlMsg::Report(report), tick);
                    }
                    None => {
                        let shard = self.me;
                        let _ = self.coord.send(CoordInput::Report { shard, report });
                    }
                },
            }
        }
        if let Some(cluster) = &mut self.cluster {
            cluster.flush(now);
        }
    }

    /// The cluster side's turn: what other nodes and the coordinator sent
    /// goes to the core; the core's answers go out.
    fn pump_cluster(&mut self, cx: &mut ShardContext<ShardMsg<G>>, now: Instant) -> usize {
        let Some(cluster) = &mut self.cluster else {
            return 0;
        };
        let (work, changed) = {
            let mut core = self.core.borrow_mut();
            cluster.pump(&mut core, now)
        };
        if let Some(r) = changed {
            self.shared.offer_registry(r);
        }
        self.drain_outputs(cx, now);
        let cluster = self.cluster.as_mut().expect("checked above");
        let sent = cluster.transmit(now);
        self.cluster_rearm.arm();
        work + sent
    }

    fn send_shard(&mut self, cx: &mut ShardContext<ShardMsg<G>>, to: ShardRef, msg: ShardMsg<G>) {
        if to.node != self.me.node {
            self.counters.remote_unreachable += 1;
            tracing::error!(shard = %self.shard, %to, msg = ?msg, "no link to another node: message dropped");
            return;
        }
        let address = StageAddr::new(ShardId(to.shard), StageId(0));
        if let Err(e) = cx.send(address, msg) {
            self.counters.mailbox_refused += 1;
            let full = matches!(e, SendError::Full(_));
            let msg = e.into_inner();
            if !matches!(msg, ShardMsg::Client(_)) {
                // Snapshots are unreliable; anything else lost is worth a line.
                tracing::error!(shard = %self.shard, %to, msg = ?msg, full, "message refused by the destination mailbox: dropped");
            }
        }
    }

    /// Reads the socket (bounded: a flood cannot keep the shard from
    /// ticking), hands every endpoint event to the core, carries out its
    /// outputs and sends what the endpoint has. Returns the work done.
    fn pump(&mut self, cx: &mut ShardContext<ShardMsg<G>>, now: Instant) -> usize {
        let (mut work, drained) = match self.socket.receive_into(&mut self.endpoint, now, 64) {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!(shard = %self.shard, error = %e, "socket receive failed");
                (0, true)
            }
        };
        {
            let mut core = self.core.borrow_mut();
            while let Some(event) = self.endpoint.poll_event() {
                work += 1;
                match event {
                    Event::Connected { connection, addr } => {
                        // A token's player id is the player's identity.
                        let client = match self.endpoint.token_claims(connection) {
                            Some(claims) => {
                                core.handle_connected_as(key(connection), claims.client_id)
                            }
                            None => core.handle_connected(key(connection)),
                        };
                        tracing::debug!(shard = %self.shard, %client, %addr, "session opened");
                    }
                    Event::Message {
                        connection, bytes, ..
                    } => {
                        core.handle_client_frame(key(connection), &bytes);
                        self.endpoint.recycle(bytes);
                    }
                    Event::Disconnected { connection, reason } => {
                        tracing::debug!(shard = %self.shard, reason = ?reason, "connection closed");
                        if reason == tessera_net::DisconnectReason::TimedOut {
                            // Gone without a word: a player may come back.
                            core.handle_connection_lost(key(connection));
                        } else {
                            core.handle_disconnected(key(connection));
                        }
                    }
                    Event::Acked { .. } => {}
                }
            }
        }
        self.drain_outputs(cx, now);
        work += self.pump_cluster(cx, now);
        let sent = self
            .socket
            .transmit_from(&mut self.endpoint, &mut self.batch, now)
            .unwrap_or_else(|e| {
                tracing::warn!(shard = %self.shard, error = %e, "socket send failed");
                0
            });
        let _ = self.socket.flush_conditioner(now);
        if drained {
            self.rearm.arm();
        }
        work + sent
    }

    fn watch_socket(&self, cx: &mut ShardContext<ShardMsg<G>>) {
        watch(&self.socket, self.rearm.clone(), cx, self.shard);
    }
}

/// Wakes the shard when `socket` turns readable, then waits for the loop to
/// drain it (`rearm`) before watching again.
fn watch<M: Send + 'static>(
    socket: &BatchSocket,
    rearm: Rc<Rearm>,
    cx: &mut ShardContext<M>,
    shard: ShardId,
) {
    match socket.readiness() {
        Ok(readiness) => {
            let handle = cx.local_handle();
            rearm.arm();
            glommio::spawn_local(async move {
                loop {
                    rearm.wait().await;
                    if readiness.readable().await.is_err() {
                        glommio::timer::sleep(Duration::from_millis(5)).await;
                    }
                    handle.wake();
                }
            })
            .detach();
        }
        Err(e) => {
            tracing::warn!(%shard, error = %e, "no socket watcher: traffic is read at every tick only")
        }
    }
}

impl<G: GameLogic> ShardHandler for NodeShard<G> {
    type Message = ShardMsg<G>;
    type Stage = CoreStage<G>;

    fn on_start(
        &mut self,
        cx: &mut ShardContext<ShardMsg<G>>,
        stages: &mut StageTable<CoreStage<G>, ShardMsg<G>>,
    ) {
        let stage = stages.insert(CoreStage {
            core: self.core.clone(),
            shared: self.shared.clone(),
        });
        assert_eq!(stage, StageId(0), "the core is the shard's only stage");
        {
            let core = self.core.borrow();
            let world = core.world();
            tracing::info!(shard = %self.shard, cells = world.cell_ids().len(), entities = world.totals().entities, "world ready");
        }
        // Watch the sockets so that a parked shard wakes on traffic.
        self.watch_socket(cx);
        if let Some(cluster) = &self.cluster {
            watch(cluster.socket(), self.cluster_rearm.clone(), cx, self.shard);
        }
        self.publish();
    }

    fn on_tick(
        &mut self,
        cx: &mut ShardContext<ShardMsg<G>>,
        _stages: &mut StageTable<CoreStage<G>, ShardMsg<G>>,
        tick: Tick,
    ) {
        // Tick 0 would read as "no baseline" in snapshots: start at 1.
        let id = TickId(self.tick_base + tick.id + 1);
        let started = Instant::now();
        {
            let mut core = self.core.borrow_mut();
            refresh_registry(&mut core, &self.shared);
            if let Some(cluster) = &self.cluster {
                // Without a valid lease the coordinator may give the cells
                // away: stop writing them (DESIGN.md section 8).
                core.set_fenced(!cluster.lease_valid(started));
            }
            core.tick(id);
        }
        let _ = self
            .tick_us
            .record((started.elapsed().as_micros() as u64).max(1));
        self.ticks += 1;
        if let Some(cluster) = &mut self.cluster {
            if cluster.coordinator_drains() && self.shared.start_draining() {
                tracing::warn!(shard = %self.shard, "draining on the coordinator's word");
            }
            if started >= self.next_heartbeat {
                self.next_heartbeat = started + HEARTBEAT_EVERY;
                cluster.heartbeat(&self.core.borrow(), started, self.shared.is_draining());
            }
            if self.shared.is_draining() {
                let mut core = self.core.borrow_mut();
                let (since, told) = *self.handed_off.get_or_insert_with(|| {
                    let told = core.hand_off_sessions();
                    if told > 0 {
                        tracing::warn!(shard = %self.shard, sessions = told, "draining: sessions told to resume at another gateway");
                    }
                    (started, told > 0)
                });
                // Clients leave by themselves once told; the rest are
                // closed at stop (their avatars stay for the resume).
                let sessions_gone = !told
                    || core.sessions().is_empty()
                    || started.duration_since(since) >= HAND_OFF_GRACE;
                let me = core.me();
                let drained = sessions_gone
                    && core.world().cell_ids().is_empty()
                    && core.agent().in_progress() == 0
                    && core.held_transfers().next().is_none()
                    && !core
                        .router()
                        .registry()
                        .backups()
                        .values()
                        .any(|b| *b == me);
                self.shared.set_drained(self.shard.index(), drained);
            }
        }
        if self.ticks % u64::from(self.shared.tick_hz.max(1)) == 0 {
            self.publish();
            let p99 = self.tick_us.value_at_quantile(0.99);
            self.tick_us.reset();
            self.core.borrow_mut().report_load(p99, self.budget_us);
        }
        self.drain_outputs(cx, started);
    }

    fn on_turn(
        &mut self,
        cx: &mut ShardContext<ShardMsg<G>>,
        _stages: &mut StageTable<CoreStage<G>, ShardMsg<G>>,
    ) -> usize {
        self.pump(cx, Instant::now())
    }

    fn next_deadline(&mut self) -> Option<Instant> {
        let game = self.endpoint.poll_timeout();
        match self.cluster.as_mut().and_then(|c| c.next_deadline()) {
            Some(c) => Some(game.map_or(c, |g| g.min(c))),
            None => game,
        }
    }

    fn on_stop(
        &mut self,
        _cx: &mut ShardContext<ShardMsg<G>>,
        _stages: &mut StageTable<CoreStage<G>, ShardMsg<G>>,
    ) {
        let now = Instant::now();
        let sessions = self.core.borrow().sessions().len();
        let code = match self.handed_off {
            Some((_, true)) => disconnect::MOVED,
            _ => disconnect::SHUTTING_DOWN,
        };
        self.endpoint.disconnect_all(now, code);
        if let Some(cluster) = &mut self.cluster {
            cluster.close(now);
        }
        self.linger_until = Some(now + DISCONNECT_LINGER);
        tracing::info!(shard = %self.shard, sessions, "sessions told the server is stopping");
    }

    fn on_stopping(
        &mut self,
        cx: &mut ShardContext<ShardMsg<G>>,
        _stages: &mut StageTable<CoreStage<G>, ShardMsg<G>>,
    ) -> bool {
        let now = Instant::now();
        self.pump(cx, now);
        self.endpoint.connection_count() > 0 && self.linger_until.is_some_and(|t| now < t)
    }

    fn on_shutdown(
        &mut self,
        _cx: &mut ShardContext<ShardMsg<G>>,
        _stages: &mut StageTable<CoreStage<G>, ShardMsg<G>>,
    ) {
        self.publish();
    }
}
