//! The deterministic multi-shard harness.
//!
//! N [`ShardWorld`]s of the demo game run in one process on virtual ticks.
//! Messages between shards cross a seeded network ([`SimNet`]) that drops,
//! duplicates, delays and reorders transmissions; a reliable-ordered
//! sublayer (sequence numbers, retransmission, deduplication, reordering
//! buffer) turns that into what the real transport gives: every message
//! once, in order per link, after a random delay. Simulated clients join,
//! walk, ack and rebuild their views from the snapshots they receive (some
//! dropped). After every tick, checkers assert the invariants; a violation
//! is recorded with the seed and tick, so a failure reproduces from its seed.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::sync::Arc;

use tessera_schema::client::InputCmd;
use tessera_schema::quant::{dequantize, quantize};
use tessera_schema::server::{self, ServerMessage};

use crate::cell::{Envelope, Msg};
use crate::demo::{DemoConfig, DemoGame};
use crate::entity::QState;
use crate::game::GameLogic;
use crate::geometry::{CellId, Geometry, Layout, Vec2};
use crate::handover::{AgentOutput, HandoverAgent, HandoverMsg, HandoverReport};
use crate::ids::{ClientId, EntityId, TickId};
use crate::messages::{CellEnvelope, CellMessage, ClientOutput, ClientOutputKind, Output};
use crate::rng::Rng;
use crate::view::{ClientMirror, SentView};
use crate::world::{ShardWorld, WorldConfig};

/// What the network between shards does to each transmission.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Faults {
    /// Probability a transmission is lost (it is sent again later).
    pub drop: f64,
    /// Probability a transmission arrives twice.
    pub duplicate: f64,
    /// Shortest delay, ticks (at least 1).
    pub delay_min: u64,
    /// Longest delay, ticks.
    pub delay_max: u64,
    /// Ticks before a lost transmission is sent again.
    pub retransmit_after: u64,
}

impl Faults {
    /// Next-tick delivery, nothing lost.
    pub fn none() -> Self {
        Self {
            drop: 0.0,
            duplicate: 0.0,
            delay_min: 1,
            delay_max: 1,
            retransmit_after: 1,
        }
    }

    /// 20% loss, 5% duplication, 1-4 ticks of jitter (so reordering).
    pub fn harsh() -> Self {
        Self {
            drop: 0.2,
            duplicate: 0.05,
            delay_min: 1,
            delay_max: 4,
            retransmit_after: 3,
        }
    }
}

/// Counters of the simulated network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Logical messages sent.
    pub sent: u64,
    /// Transmissions lost (and repeated).
    pub dropped: u64,
    /// Extra copies created.
    pub duplicated: u64,
    /// Copies discarded by the receiver as duplicates.
    pub deduplicated: u64,
    /// Messages delivered to the application.
    pub delivered: u64,
}

/// One copy of a message on the wire: (arrival tick, serial, link, seq).
type Transmission = (u64, u64, (usize, usize), u64);

/// A seeded network of reliable-ordered links between nodes `0..n`.
#[derive(Debug)]
pub struct SimNet<T> {
    faults: Faults,
    rng: Rng,
    next_seq: BTreeMap<(usize, usize), u64>,
    expected: BTreeMap<(usize, usize), u64>,
    /// Sent but not yet delivered to the application, by link and sequence.
    pending: BTreeMap<(usize, usize), BTreeMap<u64, T>>,
    /// Transmissions on the wire, earliest arrival first.
    wire: BinaryHeap<Reverse<Transmission>>,
    /// Arrived out of order, waiting for a gap to fill.
    arrived: BTreeMap<(usize, usize), BTreeSet<u64>>,
    serial: u64,
    counters: NetCounters,
}

impl<T> SimNet<T> {
    /// A network with these faults, seeded.
    pub fn new(faults: Faults, seed: u64) -> Self {
        Self {
            faults,
            rng: Rng::new(seed),
            next_seq: BTreeMap::new(),
            expected: BTreeMap::new(),
            pending: BTreeMap::new(),
            wire: BinaryHeap::new(),
            arrived: BTreeMap::new(),
            serial: 0,
            counters: NetCounters::default(),
        }
    }

    fn delay(&mut self) -> u64 {
        let span = self.faults.delay_max.saturating_sub(self.faults.delay_min);
        self.faults.delay_min.max(1)
            + if span > 0 {
                self.rng.below(span + 1)
            } else {
                0
            }
    }

    fn transmit(&mut self, at: u64, link: (usize, usize), seq: u64) {
        let mut t = at;
        while self.rng.chance(self.faults.drop) {
            self.counters.dropped += 1;
            t += self.faults.retransmit_after.max(1);
        }
        let arrival = t + self.delay();
        self.serial += 1;
        self.wire.push(Reverse((arrival, self.serial, link, seq)));
        if self.rng.chance(self.faults.duplicate) {
            self.counters.duplicated += 1;
            let again = t + self.delay();
            self.serial += 1;
            self.wire.push(Reverse((again, self.serial, link, seq)));
        }
    }

    /// Sends `msg` from `from` to `to` at tick `now`.
    pub fn send(&mut self, from: usize, to: usize, msg: T, now: u64) {
        let link = (from, to);
        let seq = self.next_seq.entry(link).or_insert(0);
        let s = *seq;
        *seq += 1;
        self.pending.entry(link).or_default().insert(s, msg);
        self.counters.sent += 1;
        self.transmit(now, link, s);
    }

    /// Everything deliverable at tick `now`, in order per link, links in
    /// order: (destination, message).
    pub fn deliver(&mut self, now: u64) -> Vec<(usize, T)> {
        while let Some(Reverse((arrival, _, link, seq))) = self.wire.peek().copied() {
            if arrival > now {
                break;
            }
            self.wire.pop();
            let expected = *self.expected.get(&link).unwrap_or(&0);
            let buffered = self.arrived.entry(link).or_default();
            if seq < expected || !buffered.insert(seq) {
                self.counters.deduplicated += 1;
            }
        }
        let mut out = Vec::new();
        for (link, buffered) in self.arrived.iter_mut() {
            let expected = self.expected.entry(*link).or_insert(0);
            while buffered.remove(expected) {
                if let Some(msg) = self.pending.get_mut(link).and_then(|p| p.remove(expected)) {
                    out.push((link.1, msg));
                    self.counters.delivered += 1;
                }
                *expected += 1;
            }
        }
        out
    }

    /// Messages sent and not yet delivered.
    pub fn in_flight(&self) -> impl Iterator<Item = &T> {
        self.pending.values().flat_map(|p| p.values())
    }

    /// True when nothing is in flight.
    pub fn is_idle(&self) -> bool {
        self.pending.values().all(|p| p.is_empty())
    }

    /// The network's counters.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }
}

/// How a simulated client moves.
#[derive(Clone, Debug, PartialEq)]
pub enum Behavior {
    /// Changes direction now and then; attacks nearby entities sometimes.
    RandomWalk,
    /// Sends nothing.
    Idle,
    /// Sends one input to stand still, then nothing.
    Stop,
    /// Moves in direction `dir` until tick `until`, then the next step.
    Script(Vec<(u64, Vec2)>),
}

/// What a simulated client saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Snapshots that reached the client.
    pub received: u64,
    /// Snapshots the client network lost.
    pub dropped: u64,
    /// Snapshots applied.
    pub applied: u64,
    /// Snapshots refused (stale or missing baseline).
    pub refused: u64,
    /// Inputs sent.
    pub inputs_sent: u64,
}

/// A simulated client.
#[derive(Clone, Debug)]
pub struct SimClient {
    /// Its session id.
    pub id: ClientId,
    /// The shard hosting its session.
    pub gateway: usize,
    /// Its avatar, once welcomed.
    pub entity: Option<EntityId>,
    /// Where its inputs go.
    pub route: Option<CellId>,
    route_tick: u64,
    /// Its rebuilt views.
    pub mirror: ClientMirror,
    /// How it moves.
    pub behavior: Behavior,
    /// Where it spawns (None: the game chooses).
    pub spawn: Option<Vec2>,
    input_seq: u32,
    direction: Vec2,
    /// The server's sent views by tick, to compare with the mirror.
    truth: BTreeMap<u64, SentView>,
    /// What it saw.
    pub stats: ClientStats,
}

/// Harness settings.
#[derive(Clone, Debug)]
pub struct HarnessConfig {
    /// The seed of everything.
    pub seed: u64,
    /// Number of shards.
    pub shards: usize,
    /// The world's shape.
    pub geometry: Geometry,
    /// Engine settings (its seed is replaced by `seed`).
    pub world: WorldConfig,
    /// Demo game tunables.
    pub demo: DemoConfig,
    /// NPCs spawned at start, spread over the shards' cells.
    pub npcs: usize,
    /// Random-walking clients joining at start.
    pub clients: usize,
    /// The network between shards.
    pub faults: Faults,
    /// Probability a snapshot to a client is lost.
    pub snapshot_drop: f64,
    /// Probability an ack from a client is lost.
    pub ack_drop: f64,
    /// Check every view against a brute-force visibility computation
    /// (exact only when ghosts are fresh: one shard).
    pub check_views: bool,
    /// Check entity ownership every tick (O(entities)).
    pub check_ownership: bool,
}

impl HarnessConfig {
    /// A small default world: 4x4 cells of 128 m, one shard, no faults.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            shards: 1,
            geometry: Geometry::new(0, 128.0, 4, 4),
            world: WorldConfig::default(),
            demo: DemoConfig::default(),
            npcs: 0,
            clients: 0,
            faults: Faults::none(),
            snapshot_drop: 0.0,
            ack_drop: 0.0,
            check_views: false,
            check_ownership: true,
        }
    }
}

/// What travels between simulated shards (and the coordinator, whose node
/// index is the number of shards).
pub enum Wire {
    /// A message for a cell.
    Cell(Envelope<DemoGame>),
    /// A frame for a client whose session another shard hosts.
    Client(ClientOutput),
    /// A handover message for a shard's agent.
    Handover(HandoverMsg<DemoGame>),
    /// A shard's report to the coordinator.
    Report(u16, HandoverReport),
}

/// The harness.
pub struct Harness {
    config: HarnessConfig,
    layout: Arc<Layout>,
    shards: Vec<ShardWorld<DemoGame>>,
    owner: BTreeMap<CellId, usize>,
    net: SimNet<Wire>,
    to_clients: BinaryHeap<Reverse<(u64, u64, usize)>>,
    client_frames: BTreeMap<u64, ClientOutput>,
    frame_serial: u64,
    clients: Vec<SimClient>,
    brute: BTreeMap<ClientId, BTreeSet<EntityId>>,
    known: BTreeSet<EntityId>,
    rng: Rng,
    tick: u64,
    violations: Vec<String>,
    agents: Vec<HandoverAgent<DemoGame>>,
    epochs: BTreeMap<CellId, u32>,
    reports: Vec<(u16, HandoverReport)>,
}

impl Harness {
    /// Builds the world: cells in contiguous column blocks per shard, NPCs
    /// spread over them, `clients` random walkers.
    pub fn new(mut config: HarnessConfig) -> Self {
        config.world.seed = config.seed;
        let layout = Arc::new(Layout::new(config.geometry.clone()));
        let n = config.shards.max(1);
        let columns = config.geometry.columns;
        let mut owner = BTreeMap::new();
        for cell in layout.leaves() {
            let shard = ((cell.cx as i64 * n as i64) / i64::from(columns)) as usize;
            owner.insert(cell, shard.min(n - 1));
        }
        let mut rng = Rng::derive(config.seed, 0xA11);
        let mut shards: Vec<ShardWorld<DemoGame>> = (0..n)
            .map(|s| {
                ShardWorld::new(
                    DemoGame::new(config.demo.clone()),
                    layout.clone(),
                    config.world.clone(),
                    s as u16 + 1,
                )
            })
            .collect();
        for (cell, s) in &owner {
            shards[*s].add_cell(*cell);
        }
        let mut known = BTreeSet::new();
        for (s, world) in shards.iter_mut().enumerate() {
            let count = config.npcs / n + usize::from(s < config.npcs % n);
            DemoGame::spawn_npcs(world, count, &mut rng);
            for c in world.cells() {
                known.extend(c.entities().iter().map(|e| e.id));
            }
        }
        let mut h = Self {
            net: SimNet::new(config.faults, config.seed ^ 0x5EED),
            layout,
            shards,
            owner,
            to_clients: BinaryHeap::new(),
            client_frames: BTreeMap::new(),
            frame_serial: 0,
            clients: Vec::new(),
            brute: BTreeMap::new(),
            known,
            rng,
            tick: 0,
            violations: Vec::new(),
            agents: (0..n).map(|s| HandoverAgent::new(s as u16)).collect(),
            epochs: BTreeMap::new(),
            reports: Vec::new(),
            config,
        };
        for _ in 0..h.config.clients {
            h.add_client(Behavior::RandomWalk, None);
        }
        h
    }

    /// Adds a client; it joins at the next step. Returns its index.
    pub fn add_client(&mut self, behavior: Behavior, spawn: Option<Vec2>) -> usize {
        let i = self.clients.len();
        let gateway = i % self.shards.len();
        let id = ClientId(i as u64 + 1);
        let world = self.layout.geometry().world_rect();
        let pos = spawn.unwrap_or_else(|| {
            self.shards[gateway]
                .game()
                .spawn_point("bot", i as u64, world)
        });
        let cell = self
            .layout
            .leaf_at(pos)
            .expect("spawn point inside the world");
        let env = CellEnvelope {
            to: cell,
            from: cell,
            msg: CellMessage::Join {
                client: id,
                name: format!("bot{i}"),
                pos,
            },
        };
        self.send_from_gateway(gateway, env);
        self.clients.push(SimClient {
            id,
            gateway,
            entity: None,
            route: None,
            route_tick: 0,
            mirror: ClientMirror::new(64),
            behavior,
            spawn,
            input_seq: 0,
            direction: Vec2::default(),
            truth: BTreeMap::new(),
            stats: ClientStats::default(),
        });
        i
    }

    fn send_from_gateway(&mut self, gateway: usize, env: Envelope<DemoGame>) {
        let Some(&to) = self.owner.get(&env.to) else {
            self.violations.push(format!(
                "tick {}: message for unknown cell {}",
                self.tick, env.to
            ));
            return;
        };
        if to == gateway {
            self.deliver_cell(to, env);
        } else {
            self.net.send(gateway, to, Wire::Cell(env), self.tick);
        }
    }

    /// The clients.
    pub fn clients(&self) -> &[SimClient] {
        &self.clients
    }

    /// The shards.
    pub fn shards(&self) -> &[ShardWorld<DemoGame>] {
        &self.shards
    }

    /// The current tick.
    pub fn tick(&self) -> u64 {
        self.tick
    }

    /// The network's counters.
    pub fn net_counters(&self) -> NetCounters {
        self.net.counters()
    }

    /// Invariant violations so far (each names seed and tick).
    pub fn violations(&self) -> &[String] {
        &self.violations
    }

    fn violation(&mut self, what: String) {
        if self.violations.len() < 50 {
            self.violations.push(format!(
                "seed {} tick {}: {what}",
                self.config.seed, self.tick
            ));
        }
    }

    /// Runs `n` ticks.
    pub fn run(&mut self, n: u64) {
        for _ in 0..n {
            self.step();
        }
    }

    /// Clients stop their avatars and send nothing more; runs until no
    /// client input is in flight and every avatar is owned by a cell (at
    /// most `max` ticks), so that the books on inputs can be closed.
    pub fn settle(&mut self, max: u64) {
        for c in self.clients.iter_mut() {
            c.behavior = Behavior::Stop;
        }
        for _ in 0..max {
            self.step();
            let inputs_in_flight = self.net.in_flight().any(|m| {
                matches!(
                    m,
                    Wire::Cell(CellEnvelope {
                        msg: CellMessage::Input { .. } | CellMessage::Transfer(_),
                        ..
                    })
                )
            });
            let held = self
                .shards
                .iter()
                .flat_map(|s| s.cells())
                .any(|c| c.entities().iter().any(|e| !e.pending_inputs.is_empty()));
            let avatars_owned = self
                .clients
                .iter()
                .all(|c| c.entity.is_none_or(|id| self.find(id).is_some()));
            if !inputs_in_flight
                && !held
                && avatars_owned
                && self.shards.iter().all(|s| s.pending_local() == 0)
            {
                break;
            }
        }
    }

    /// One tick: deliver the network, let clients act, tick every shard,
    /// route their outputs, check the invariants.
    pub fn step(&mut self) {
        self.tick += 1;
        let now = self.tick;
        for (to, msg) in self.net.deliver(now) {
            match msg {
                Wire::Cell(env) => self.deliver_cell(to, env),
                Wire::Client(out) => self.queue_for_client(out, now),
                Wire::Handover(m) => {
                    let outputs = self.agents[to].handle(&mut self.shards[to], m, TickId(now));
                    self.agent_outputs(to, outputs);
                }
                Wire::Report(from, report) => self.reports.push((from, report)),
            }
        }
        while let Some(Reverse((at, serial, i))) = self.to_clients.peek().copied() {
            if at > now {
                break;
            }
            self.to_clients.pop();
            if let Some(out) = self.client_frames.remove(&serial) {
                self.client_receive(i, out);
            }
        }
        for i in 0..self.clients.len() {
            self.client_act(i);
        }
        for s in 0..self.shards.len() {
            self.shards[s].tick(TickId(now));
            let handover = self.agents[s].after_tick(&mut self.shards[s], TickId(now));
            self.agent_outputs(s, handover);
            let outputs: Vec<_> = self.shards[s].drain_outbox().collect();
            for o in outputs {
                match o {
                    Output::Cell(env) => match self.owner.get(&env.to).copied() {
                        Some(to) if to != s => self.net.send(s, to, Wire::Cell(env), now),
                        // Ours by the registry, not yet active here: the
                        // prepared shadow takes it.
                        Some(_) => self.deliver_cell(s, env),
                        None => self.violation(format!("message for unknown cell {}", env.to)),
                    },
                    Output::Client(out) => {
                        let gateway = self
                            .client_index(out.client)
                            .map(|i| self.clients[i].gateway);
                        match gateway {
                            Some(g) if g == s => self.queue_for_client(out, now),
                            Some(g) => self.net.send(s, g, Wire::Client(out), now),
                            None => {
                                self.violation(format!("frame for unknown client {}", out.client))
                            }
                        }
                    }
                }
            }
            self.record_truth(s);
        }
        if self.config.check_ownership {
            self.check_ownership();
        }
        if self.config.check_views {
            self.check_views();
        }
    }

    fn client_index(&self, c: ClientId) -> Option<usize> {
        let i = c.0.checked_sub(1)? as usize;
        (i < self.clients.len()).then_some(i)
    }

    fn agent_outputs(&mut self, s: usize, outputs: Vec<AgentOutput<DemoGame>>) {
        let now = self.tick;
        for o in outputs {
            match o {
                AgentOutput::ToShard(to, m) => {
                    self.net.send(s, to as usize, Wire::Handover(m), now)
                }
                AgentOutput::ToCoordinator(r) => {
                    self.net
                        .send(s, self.shards.len(), Wire::Report(s as u16, r), now)
                }
                AgentOutput::Forward(cell, msgs) => {
                    for msg in msgs {
                        let env = CellEnvelope {
                            to: cell,
                            from: cell,
                            msg,
                        };
                        match self.owner.get(&cell).copied() {
                            Some(o) if o != s => self.net.send(s, o, Wire::Cell(env), now),
                            _ => self.deliver_cell(s, env),
                        }
                    }
                }
            }
        }
    }

    /// Sends a handover message from the coordinator to a shard.
    pub fn send_from_coordinator(&mut self, to: u16, msg: HandoverMsg<DemoGame>) {
        let now = self.tick;
        self.net
            .send(self.shards.len(), to as usize, Wire::Handover(msg), now);
    }

    /// Reports that reached the coordinator since the last call.
    pub fn take_reports(&mut self) -> Vec<(u16, HandoverReport)> {
        std::mem::take(&mut self.reports)
    }

    /// The registry moved a cell: route to its new owner from now on.
    pub fn set_owner(&mut self, cell: CellId, shard: u16, epoch: u32) {
        self.owner.insert(cell, shard as usize);
        self.epochs.insert(cell, epoch);
    }

    /// The owner of every cell.
    pub fn owners(&self) -> &BTreeMap<CellId, usize> {
        &self.owner
    }

    /// A shard's handover agent restarts: shadows and pending steps are lost
    /// (its cells and sessions are not).
    pub fn restart_agent(&mut self, shard: usize) {
        self.agents[shard] = HandoverAgent::new(shard as u16);
    }

    /// A shard's handover agent.
    pub fn agent(&self, shard: usize) -> &HandoverAgent<DemoGame> {
        &self.agents[shard]
    }

    fn deliver_cell(&mut self, to: usize, env: Envelope<DemoGame>) {
        let Err(env) = self.shards[to].deliver(env) else {
            return;
        };
        // A cell this shard holds as a prepared shadow keeps what comes in.
        let CellEnvelope {
            to: cell,
            from,
            msg,
        } = env;
        let Err(msg) = self.agents[to].deliver_to_shadow(cell, msg) else {
            return;
        };
        let env = CellEnvelope {
            to: cell,
            from,
            msg,
        };
        // The cell moved to another shard meanwhile: pass it on.
        match self.owner.get(&env.to).copied() {
            Some(owner) if owner != to => self.net.send(to, owner, Wire::Cell(env), self.tick),
            owner => {
                let holders: Vec<String> = (0..self.shards.len())
                    .map(|s| {
                        format!(
                            "s{s}:owns={} frozen={} busy={}",
                            self.shards[s].owns(env.to),
                            self.shards[s].is_frozen(env.to),
                            self.agents[s].busy(env.to)
                        )
                    })
                    .collect();
                let what = format!(
                    "undeliverable {} for {} at shard {to}: registry owner {owner:?} epoch {:?}; {}",
                    env.msg.kind(),
                    env.to,
                    self.epochs.get(&env.to),
                    holders.join(" ")
                );
                self.violation(what)
            }
        }
    }

    fn queue_for_client(&mut self, out: ClientOutput, now: u64) {
        let Some(i) = self.client_index(out.client) else {
            return;
        };
        // Welcome frames are reliable; snapshots may be lost.
        if out.kind == ClientOutputKind::Snapshot && self.rng.chance(self.config.snapshot_drop) {
            self.clients[i].stats.dropped += 1;
            return;
        }
        self.frame_serial += 1;
        self.client_frames.insert(self.frame_serial, out);
        self.to_clients
            .push(Reverse((now + 1, self.frame_serial, i)));
    }

    fn record_truth(&mut self, s: usize) {
        for cell in self.shards[s].cells() {
            for e in cell.entities().iter() {
                let (Some(v), Some(client)) = (e.view.as_ref(), e.client) else {
                    continue;
                };
                let Some(sent) = v.latest_sent() else {
                    continue;
                };
                let i = client.0 as usize - 1;
                if let Some(c) = self.clients.get_mut(i) {
                    c.truth.insert(sent.tick.0, sent.clone());
                    while c.truth.len() > 64 {
                        c.truth.pop_first();
                    }
                }
            }
        }
    }

    fn client_receive(&mut self, i: usize, out: ClientOutput) {
        let msg = match server::decode(&out.bytes) {
            Ok(m) => m,
            Err(e) => {
                self.violation(format!(
                    "client {} got an undecodable frame: {e}",
                    out.client
                ));
                return;
            }
        };
        let c = &mut self.clients[i];
        if out.tick.0 >= c.route_tick {
            c.route = Some(out.cell);
            c.route_tick = out.tick.0;
        }
        match msg {
            ServerMessage::Welcome(w) => {
                c.entity = Some(EntityId(w.entity));
                self.known.insert(EntityId(w.entity));
            }
            ServerMessage::Snapshot(snap) => {
                c.stats.received += 1;
                let tick = snap.tick;
                match c.mirror.apply(&snap) {
                    Ok(view) => {
                        c.stats.applied += 1;
                        let view = view.clone();
                        let mut dup = false;
                        for w in view.entries.windows(2) {
                            dup |= w[0].0 == w[1].0;
                        }
                        let truth = c.truth.get(&tick).cloned();
                        let (client, entity, route) = (c.id, c.entity, c.route);
                        if dup {
                            self.violation(format!(
                                "client {client} view {tick} holds an entity twice"
                            ));
                        }
                        match truth {
                            Some(t) if t != view => self.violation(format!(
                                "client {client} rebuilt view {tick} differs from the server's ({} vs {} entities)",
                                view.entries.len(),
                                t.entries.len()
                            )),
                            _ => {}
                        }
                        if !self.rng.chance(self.config.ack_drop) {
                            if let (Some(entity), Some(route)) = (entity, route) {
                                let gateway = self.clients[i].gateway;
                                self.send_from_gateway(
                                    gateway,
                                    CellEnvelope {
                                        to: route,
                                        from: route,
                                        msg: CellMessage::Ack {
                                            client,
                                            entity,
                                            tick: TickId(tick),
                                            hops: 0,
                                            after: TickId(0),
                                        },
                                    },
                                );
                            }
                        }
                    }
                    Err(e) => {
                        c.stats.refused += 1;
                        if !matches!(e, crate::view::MirrorError::Stale(_)) {
                            let client = c.id;
                            self.violation(format!("client {client}: {e}"));
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn client_act(&mut self, i: usize) {
        let now = self.tick;
        let c = &mut self.clients[i];
        let (Some(entity), Some(route)) = (c.entity, c.route) else {
            return;
        };
        let movement = match &c.behavior {
            Behavior::Idle => return,
            Behavior::Stop => {
                c.behavior = Behavior::Idle;
                Vec2::default()
            }
            Behavior::Script(steps) => steps
                .iter()
                .find(|(until, _)| now <= *until)
                .map(|s| s.1)
                .unwrap_or_default(),
            Behavior::RandomWalk => {
                if c.direction == Vec2::default() || self.rng.chance(0.05) {
                    let a = self.rng.range(0.0, std::f32::consts::TAU);
                    c.direction = Vec2::new(a.cos(), a.sin());
                }
                c.direction
            }
        };
        c.input_seq += 1;
        c.stats.inputs_sent += 1;
        let input = InputCmd {
            input_seq: c.input_seq,
            client_tick: now,
            movement: [movement.x, movement.y],
            heading: movement.y.atan2(movement.x),
            actions: Vec::new(),
        };
        let (client, gateway) = (c.id, c.gateway);
        self.send_from_gateway(
            gateway,
            CellEnvelope {
                to: route,
                from: route,
                msg: CellMessage::Input {
                    client,
                    entity,
                    input,
                    hops: 0,
                    after: TickId(0),
                },
            },
        );
    }

    /// Every known entity is owned by exactly one cell, counting transfers
    /// in flight as owned by their destination; no cell holds an entity both
    /// as owned and as a ghost.
    fn check_ownership(&mut self) {
        let mut count: BTreeMap<EntityId, u32> = BTreeMap::new();
        let mut problems = Vec::new();
        for (si, s) in self.shards.iter().enumerate() {
            for cell in s.cells() {
                // Authoritative: the registry names this shard, at this epoch.
                let current = self.epochs.get(&cell.id()).copied().unwrap_or(1);
                let owner = self.owner.get(&cell.id()).copied();
                if owner != Some(si) || s.epoch(cell.id()) != Some(current) {
                    continue;
                }
                for id in cell.queued_transfers() {
                    *count.entry(id).or_default() += 1;
                }
                for e in cell.entities().iter() {
                    *count.entry(e.id).or_default() += 1;
                    if cell.ghosts().get(e.id).is_some() {
                        problems.push(format!(
                            "{} holds {} both owned and as a ghost",
                            cell.id(),
                            e.id
                        ));
                    }
                    if !cell.bounds().contains(e.pos) {
                        problems.push(format!("{} owns {} outside its bounds", cell.id(), e.id));
                    }
                }
            }
        }
        // Committed but not yet activated: the target's shadow holds them.
        for (si, agent) in self.agents.iter().enumerate() {
            for (cell, state) in agent.prepared() {
                if self.owner.get(&cell) == Some(&si) && !self.shards[si].owns(cell) {
                    for e in state.entities.iter() {
                        *count.entry(e.id).or_default() += 1;
                    }
                    for id in crate::cell::queued_transfer_ids(&state.input_queue) {
                        *count.entry(id).or_default() += 1;
                    }
                }
            }
        }
        // A frozen source that lost authority keeps what arrived after its
        // diff until it releases the cell.
        for (si, s) in self.shards.iter().enumerate() {
            for cell in s.cells() {
                let current = self.epochs.get(&cell.id()).copied().unwrap_or(1);
                let authoritative =
                    self.owner.get(&cell.id()) == Some(&si) && s.epoch(cell.id()) == Some(current);
                if !authoritative && s.is_frozen(cell.id()) {
                    for id in cell.queued_transfers() {
                        *count.entry(id).or_default() += 1;
                    }
                }
            }
        }
        for msg in self.net.in_flight() {
            if let Wire::Cell(CellEnvelope {
                msg: CellMessage::Transfer(t),
                ..
            }) = msg
            {
                *count.entry(t.entity.id).or_default() += 1;
            }
        }
        for id in &self.known {
            match count.get(id).copied().unwrap_or(0) {
                1 => {}
                n => problems.push(format!("{id} is owned {n} times")),
            }
        }
        for p in problems {
            self.violation(p);
        }
    }

    /// Every client's membership equals the brute-force hysteresis rule
    /// over every entity of the world, seen as its cell sees them.
    fn check_views(&mut self) {
        let view = self.config.world.view;
        let r2 = view.radius * view.radius;
        let l2 = view.leave_radius() * view.leave_radius();
        // Every entity: (id, exact position, owning cell).
        let mut all: Vec<(EntityId, Vec2, CellId)> = Vec::new();
        for s in &self.shards {
            for cell in s.cells() {
                all.extend(cell.entities().iter().map(|e| (e.id, e.pos, cell.id())));
            }
        }
        let mut problems = Vec::new();
        for s in &self.shards {
            for cell in s.cells() {
                for e in cell.entities().iter() {
                    let (Some(v), Some(client)) = (e.view.as_ref(), e.client) else {
                        continue;
                    };
                    let prev = self.brute.entry(client).or_default();
                    let mut cands: Vec<(f32, EntityId)> = Vec::new();
                    for (id, pos, owner) in &all {
                        // Other cells' entities are seen through quantised ghosts.
                        let p = if *owner == cell.id() {
                            *pos
                        } else {
                            Vec2::new(dequantize(quantize(pos.x)), dequantize(quantize(pos.y)))
                        };
                        let d2 = p.distance_squared(e.pos);
                        if d2 <= r2 || (d2 <= l2 && prev.contains(id)) {
                            cands.push((d2, *id));
                        }
                    }
                    if cands.len() > view.max_entities {
                        cands.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                        cands.truncate(view.max_entities);
                    }
                    let want: BTreeSet<EntityId> = cands.into_iter().map(|c| c.1).collect();
                    let got: BTreeSet<EntityId> = v.members().iter().copied().collect();
                    if want != got {
                        let missing: Vec<_> = want.difference(&got).take(3).collect();
                        let extra: Vec<_> = got.difference(&want).take(3).collect();
                        problems.push(format!("client {client} view differs from brute force: missing {missing:?}, extra {extra:?}"));
                    }
                    *prev = want;
                }
            }
        }
        for p in problems {
            self.violation(p);
        }
    }

    /// A digest of the whole world state: equal digests, equal worlds.
    pub fn digest(&self) -> u64 {
        // (id, x, y, vx, vy, heading as bits; health, dead)
        type Item = (u64, [u32; 5], u16, bool);
        let mut items: Vec<Item> = Vec::new();
        for s in &self.shards {
            for cell in s.cells() {
                for e in cell.entities().iter() {
                    let bits = [e.pos.x, e.pos.y, e.vel.x, e.vel.y, e.heading].map(f32::to_bits);
                    items.push((e.id.0, bits, e.game.health, e.game.dead));
                }
            }
        }
        items.sort_unstable();
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        let mut mix = |v: u64| {
            for b in v.to_le_bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(0x1000_0000_01b3);
            }
        };
        mix(self.tick);
        for (id, bits, health, dead) in items {
            mix(id);
            for b in bits {
                mix(u64::from(b));
            }
            mix(u64::from(health) << 1 | u64::from(dead));
        }
        h
    }

    /// The owned entity with this id, wherever it is.
    pub fn find(
        &self,
        id: EntityId,
    ) -> Option<(
        usize,
        CellId,
        &crate::entity::Entity<crate::demo::DemoComponents>,
    )> {
        for (s, w) in self.shards.iter().enumerate() {
            for c in w.cells() {
                if let Some(e) = c.entities().get(id) {
                    return Some((s, c.id(), e));
                }
            }
        }
        None
    }

    /// Sends a message as a client's gateway would (tests).
    pub fn send_as_gateway(&mut self, client: usize, msg: Msg<DemoGame>) {
        let Some(route) = self.clients[client].route else {
            return;
        };
        let gateway = self.clients[client].gateway;
        self.send_from_gateway(
            gateway,
            CellEnvelope {
                to: route,
                from: route,
                msg,
            },
        );
    }

    /// Totals over all shards.
    pub fn totals(&self) -> crate::world::WorldTotals {
        let mut t = crate::world::WorldTotals::default();
        for s in &self.shards {
            let x = s.totals();
            t.cells += x.cells;
            t.entities += x.entities;
            t.ghosts += x.ghosts;
            t.players += x.players;
            let (a, b) = (&mut t.counters, x.counters);
            a.inputs += b.inputs;
            a.inputs_forwarded += b.inputs_forwarded;
            a.inputs_duplicate += b.inputs_duplicate;
            a.inputs_held += b.inputs_held;
            a.inputs_gap_skipped += b.inputs_gap_skipped;
            a.inputs_wrong_client += b.inputs_wrong_client;
            a.unknown_entity += b.unknown_entity;
            a.inputs_awaited += b.inputs_awaited;
            a.orphans_held += b.orphans_held;
            a.hops_exceeded += b.hops_exceeded;
            a.transfers_in += b.transfers_in;
            a.transfers_out += b.transfers_out;
            a.transfers_duplicate += b.transfers_duplicate;
            a.snapshots += b.snapshots;
            a.intents_routed += b.intents_routed;
            a.intents_applied += b.intents_applied;
            a.intents_dropped += b.intents_dropped;
        }
        t
    }

    /// Quantised state of an entity as the world owns it.
    pub fn state_of(&self, id: EntityId) -> Option<QState> {
        self.find(id)
            .map(|(_, _, e)| QState::of(e, DemoGame::stats(&e.game)))
    }
}
