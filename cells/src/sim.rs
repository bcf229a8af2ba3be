//! The deterministic multi-shard simulator (behind the `testing` feature).
//!
//! N production [`NodeCore`]s of the demo game run in one process on
//! virtual ticks: the same code a node's shards run, sessions included.
//! Whatever a core addresses to a shard (itself included) or to the
//! coordinator crosses a seeded network ([`SimNet`]) that drops, duplicates,
//! delays and reorders transmissions; a reliable-ordered sublayer (sequence
//! numbers, retransmission, deduplication, reordering buffer) turns that into
//! what the real transport gives: every message once, in order per link,
//! after a random delay. Simulated clients speak encoded client frames to
//! their gateway core, walk, ack and rebuild their views from the snapshot
//! frames they receive (some dropped). The coordinator is not here (this
//! crate is below it): a test above drives one with [`Harness::take_reports`],
//! [`Harness::set_registry`] and [`Harness::send_order`]. After every tick,
//! checkers assert the invariants; a violation is recorded with the seed and
//! tick, so a failure reproduces from its seed.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::sync::Arc;

use tessera_schema::client::{self, ClientMessage, InputCmd};
use tessera_schema::flatbuffers::FlatBufferBuilder;
use tessera_schema::protocol::Channel;
use tessera_schema::quant::{dequantize, quantize};
use tessera_schema::server::{self, ServerMessage};

use crate::control::{Order, Report};
use crate::demo::{DemoConfig, DemoGame};
use crate::entity::QState;
use crate::game::GameLogic;
use crate::geometry::{CellId, Geometry, Layout, Vec2};
use crate::handover::HandoverAgent;
use crate::ids::{ClientId, EntityId, TickId};
use crate::messages::{CellEnvelope, CellMessage};
use crate::node::{ConnectionKey, NodeCore, NodeOutput, ShardMsg};
use crate::registry::{Registry, ShardRef};
use crate::rng::Rng;
use crate::view::{ClientMirror, SentView};
use crate::wire::{BundleWriter, ControlMsg, ShardHeader};
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

    /// Messages sent and not yet delivered, with their link, sequence number
    /// and the next sequence number the link delivers (for failure messages).
    pub fn in_flight_detail(&self) -> impl Iterator<Item = ((usize, usize), u64, u64, &T)> {
        self.pending.iter().flat_map(move |(link, p)| {
            let expected = self.expected.get(link).copied().unwrap_or(0);
            p.iter().map(move |(seq, m)| (*link, *seq, expected, m))
        })
    }

    /// Where the next message of a link is: (on the wire at these arrival
    /// ticks, arrived and buffered), for failure messages.
    pub fn next_of(&self, link: (usize, usize)) -> (Vec<u64>, bool) {
        let expected = self.expected.get(&link).copied().unwrap_or(0);
        let wire = self
            .wire
            .iter()
            .filter(|Reverse((_, _, l, s))| *l == link && *s == expected)
            .map(|Reverse((a, ..))| *a)
            .collect();
        let buffered = self
            .arrived
            .get(&link)
            .is_some_and(|b| b.contains(&expected));
        (wire, buffered)
    }

    /// Drops every message on the links `cut` names (from, to): a node
    /// that crashed neither receives nor retransmits anything more.
    pub fn purge(&mut self, cut: impl Fn(usize, usize) -> bool) {
        for (link, p) in self.pending.iter_mut() {
            if cut(link.0, link.1) {
                p.clear();
            }
        }
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
    /// Changes direction now and then.
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
    /// Its session id (given by its gateway).
    pub id: ClientId,
    /// The shard hosting its session.
    pub gateway: usize,
    /// Its connection, as the gateway knows it.
    pub connection: ConnectionKey,
    /// Its avatar, once welcomed.
    pub entity: Option<EntityId>,
    /// Its rebuilt views.
    pub mirror: ClientMirror,
    /// How it moves.
    pub behavior: Behavior,
    /// Where it spawns (None: the game chooses).
    pub spawn: Option<Vec2>,
    /// True once its session was closed.
    pub gone: bool,
    /// The avatar's resume credential (from its Welcome).
    pub resume_key: u64,
    /// Times it took its avatar back through another gateway.
    pub resumes: u32,
    /// Waiting for the welcome of a resume (it sends nothing meanwhile).
    pub resuming: bool,
    /// Its latest inputs, sent again after a resume (the lost gateway may
    /// have taken them along; the cell skips those it applied).
    recent: VecDeque<InputCmd>,
    /// Where its views last showed its avatar (asked first by a resume).
    seen_at: Option<[f32; 2]>,
    input_seq: u32,
    direction: Vec2,
    /// The server's sent views by tick, to compare with the mirror.
    truth: BTreeMap<u64, SentView>,
    /// What it saw.
    pub stats: ClientStats,
}

/// Inputs a simulated client keeps to send again after a resume.
const RECENT_INPUTS: usize = 32;

/// Harness settings.
#[derive(Clone, Debug)]
pub struct HarnessConfig {
    /// The seed of everything.
    pub seed: u64,
    /// Number of shards (over all nodes).
    pub shards: usize,
    /// Nodes the shards are spread over (`shards / nodes` each, node ids
    /// from 0): messages between nodes cross as encoded bundles, reports and
    /// orders as encoded control frames, through the production codec.
    pub nodes: usize,
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
    /// Chance per input that a random walker attacks an entity it sees
    /// (which also locks it in its view beyond distance).
    pub attack_chance: f64,
    /// Clients' sessions only on node 0's shards (a gateway that survives
    /// the compute nodes' crashes).
    pub sessions_on_node0: bool,
    /// Nodes crash and get cut off: every tick, check only that no entity
    /// is owned by two cells (while a node is lost, its entities are in its
    /// replicas and in transfers kept to be sent again; the test checks
    /// that each is back exactly once after the recovery).
    pub node_faults: bool,
}

impl HarnessConfig {
    /// A small default world: 4x4 cells of 128 m, one shard, no faults.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            shards: 1,
            nodes: 1,
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
            attack_chance: 0.0,
            sessions_on_node0: false,
            node_faults: false,
        }
    }
}

/// What travels on the simulated network (the coordinator's node index is
/// the number of shards).
pub enum Wire {
    /// For a shard's core, from a shard of the same node (a Rust value, as
    /// in a node's mailboxes) or from the coordinator.
    Shard(ShardMsg<DemoGame>),
    /// For a shard's core, from another node: it was encoded into a bundle
    /// and decoded again by the production codec when it was sent (so the
    /// checkers can still see it in flight); its header is checked on
    /// arrival like a real link does.
    Remote(ShardHeader, ShardMsg<DemoGame>),
    /// A shard's report to the coordinator.
    Report(ShardRef, Report),
}

impl Wire {
    /// The shard message inside, if any.
    pub fn shard(&self) -> Option<&ShardMsg<DemoGame>> {
        match self {
            Wire::Shard(m) | Wire::Remote(_, m) => Some(m),
            Wire::Report(..) => None,
        }
    }
}

/// What crossed between nodes in the simulation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClusterCounters {
    /// Bundles encoded and decoded.
    pub bundles: u64,
    /// Bytes of those bundles.
    pub bundle_bytes: u64,
    /// Messages in them.
    pub frames: u64,
    /// Handover steps ignored on arrival for a stale epoch.
    pub stale: u64,
    /// Control frames (reports and orders) encoded and decoded.
    pub control_frames: u64,
}

/// The harness.
pub struct Harness {
    config: HarnessConfig,
    registry: Arc<Registry>,
    cores: Vec<NodeCore<DemoGame>>,
    net: SimNet<Wire>,
    to_clients: BinaryHeap<Reverse<(u64, u64, usize)>>,
    client_frames: BTreeMap<u64, Vec<u8>>,
    frame_serial: u64,
    clients: Vec<SimClient>,
    by_id: BTreeMap<ClientId, usize>,
    brute: BTreeMap<ClientId, BTreeSet<EntityId>>,
    known: BTreeSet<EntityId>,
    rng: Rng,
    tick: u64,
    violations: Vec<String>,
    reports: Vec<(ShardRef, Report)>,
    fbb: FlatBufferBuilder<'static>,
    per_node: usize,
    writers: BTreeMap<(usize, usize), BundleWriter>,
    cluster: ClusterCounters,
    control_seq: u64,
    /// Cores of crashed nodes: they neither tick nor receive.
    down: BTreeSet<usize>,
    /// Nodes cut from the coordinator: no registry, no orders, no reports.
    cut: BTreeSet<u16>,
}

/// The shard of core `i` when each node runs `per_node` shards.
fn shard_ref_of(i: usize, per_node: usize) -> ShardRef {
    ShardRef {
        node: (i / per_node) as u16,
        shard: (i % per_node) as u16,
    }
}

impl Harness {
    /// Builds the world: cells in contiguous column blocks per shard, NPCs
    /// spread over them, `clients` random walkers.
    pub fn new(mut config: HarnessConfig) -> Self {
        config.world.seed = config.seed;
        let layout = Arc::new(Layout::new(config.geometry.clone()));
        let n = config.shards.max(1);
        let nodes = config.nodes.clamp(1, n);
        assert_eq!(n % nodes, 0, "shards must spread evenly over the nodes");
        let per_node = n / nodes;
        let shard_ref = |i: usize| shard_ref_of(i, per_node);
        let columns = config.geometry.columns;
        let owners: BTreeMap<CellId, ShardRef> = layout
            .leaves()
            .into_iter()
            .map(|cell| {
                let shard = ((cell.cx as i64 * n as i64) / i64::from(columns)) as usize;
                (cell, shard_ref(shard.min(n - 1)))
            })
            .collect();
        let registry = Arc::new(Registry::new(layout.clone(), &owners).expect("every leaf owned"));
        let mut rng = Rng::derive(config.seed, 0xA11);
        let mut known = BTreeSet::new();
        let cores: Vec<NodeCore<DemoGame>> = (0..n)
            .map(|s| {
                let world = ShardWorld::new(
                    DemoGame::new(config.demo.clone()),
                    layout.clone(),
                    config.world.clone(),
                    crate::ids::IdAllocator::prefix_of(shard_ref(s).node, shard_ref(s).shard),
                );
                let mut core = NodeCore::new(shard_ref(s), world, registry.clone());
                let count = config.npcs / n + usize::from(s < config.npcs % n);
                DemoGame::spawn_npcs(core.world_mut(), count, &mut rng);
                for c in core.world().cells() {
                    known.extend(c.entities().iter().map(|e| e.id));
                }
                core
            })
            .collect();
        let mut h = Self {
            net: SimNet::new(config.faults, config.seed ^ 0x5EED),
            registry,
            cores,
            to_clients: BinaryHeap::new(),
            client_frames: BTreeMap::new(),
            frame_serial: 0,
            clients: Vec::new(),
            by_id: BTreeMap::new(),
            brute: BTreeMap::new(),
            known,
            rng,
            tick: 0,
            violations: Vec::new(),
            reports: Vec::new(),
            fbb: FlatBufferBuilder::with_capacity(256),
            per_node,
            writers: BTreeMap::new(),
            cluster: ClusterCounters::default(),
            control_seq: 0,
            down: BTreeSet::new(),
            cut: BTreeSet::new(),
            config,
        };
        for _ in 0..h.config.clients {
            h.add_client(Behavior::RandomWalk, None);
        }
        h
    }

    /// Adds a client: its session opens on a gateway shard and it joins (at
    /// the game's spawn point, or at `spawn`). Returns its index.
    pub fn add_client(&mut self, behavior: Behavior, spawn: Option<Vec2>) -> usize {
        let i = self.clients.len();
        let gateways = if self.config.sessions_on_node0 {
            self.per_node
        } else {
            self.cores.len()
        };
        let gateway = i % gateways;
        let connection = ConnectionKey(i as u64 + 1);
        let id = self.cores[gateway].handle_connected(connection);
        self.by_id.insert(id, i);
        self.clients.push(SimClient {
            id,
            gateway,
            connection,
            entity: None,
            mirror: ClientMirror::new(64),
            behavior,
            spawn,
            gone: false,
            resume_key: 0,
            resumes: 0,
            resuming: false,
            recent: VecDeque::new(),
            seen_at: None,
            input_seq: 0,
            direction: Vec2::default(),
            truth: BTreeMap::new(),
            stats: ClientStats::default(),
        });
        let name = format!("bot{i}");
        match spawn {
            None => self.client_send(
                i,
                &ClientMessage::Join {
                    name,
                    token: Vec::new(),
                },
            ),
            Some(pos) => {
                // A join the session did not choose the place of: hand it to
                // the gateway core as if it came from another shard.
                let cell = self
                    .registry
                    .layout()
                    .leaf_at(pos)
                    .expect("spawn point inside the world");
                let join = CellMessage::Join {
                    client: id,
                    name,
                    pos,
                    resume_key: id.0 | 1,
                };
                let env = CellEnvelope {
                    to: cell,
                    from: cell,
                    msg: join,
                };
                self.cores[gateway].handle_message(ShardMsg::Cell(env));
                self.process_outputs(gateway);
            }
        }
        i
    }

    /// Client `i`, whose gateway crashed, connects to core `gateway` and
    /// takes its avatar back with its resume credential, asking the cell
    /// where its view last showed it. False if it has no avatar to resume.
    pub fn resume_client(&mut self, i: usize, gateway: usize) -> bool {
        let c = &self.clients[i];
        let Some(entity) = c.entity else {
            return false;
        };
        if !(c.gone || c.resuming) || c.resume_key == 0 || self.down.contains(&gateway) {
            return false;
        }
        if c.resuming && !c.gone {
            // A retry: the unanswered attempt's session closes (it holds no
            // avatar, so nothing leaves the world).
            let (old, connection) = (c.gateway, c.connection);
            if !self.down.contains(&old) {
                self.cores[old].handle_disconnected(connection);
                self.process_outputs(old);
            }
        }
        let c = &self.clients[i];
        let pos = c
            .mirror
            .latest()
            .and_then(|v| v.entries.iter().find(|(id, _)| *id == entity))
            .map(|(_, q)| [q.pos[0] as f32 / 100.0, q.pos[1] as f32 / 100.0])
            .or(c.seen_at)
            .unwrap_or([0.0, 0.0]);
        self.clients[i].seen_at = Some(pos);
        // A connection key no earlier session used on any core.
        let connection =
            ConnectionKey(((self.clients[i].resumes as u64 + 1) << 32) | (i as u64 + 1));
        let id = self.cores[gateway].handle_connected(connection);
        self.by_id.insert(id, i);
        let c = &mut self.clients[i];
        c.id = id;
        c.gateway = gateway;
        c.connection = connection;
        c.gone = false;
        c.resumes += 1;
        c.resuming = true;
        // The new session starts from a whole view.
        c.mirror = ClientMirror::new(64);
        c.truth.clear();
        let key = c.resume_key;
        if std::env::var("DEBUG_RESUME").is_ok() {
            eprintln!("resume: client {i} ({id}) entity {entity} at {pos:?} cell {:?} via core {gateway} tick {}", self.registry.layout().leaf_at(Vec2::new(pos[0], pos[1])), self.tick);
        }
        self.client_send(
            i,
            &ClientMessage::Resume {
                entity: entity.0,
                key,
                position: pos,
            },
        );
        true
    }

    /// A frame from client `i` to its gateway.
    fn client_send(&mut self, i: usize, msg: &ClientMessage) {
        let (gateway, connection) = (self.clients[i].gateway, self.clients[i].connection);
        let bytes = client::encode(&mut self.fbb, msg).to_vec();
        self.cores[gateway].handle_client_frame(connection, &bytes);
        self.process_outputs(gateway);
    }

    /// Client `i` leaves (its connection closes).
    pub fn remove_client(&mut self, i: usize) {
        if self.clients[i].gone {
            return;
        }
        self.client_send(i, &ClientMessage::Leave { reason: 0 });
        let (gateway, connection) = (self.clients[i].gateway, self.clients[i].connection);
        self.cores[gateway].handle_disconnected(connection);
        self.process_outputs(gateway);
        self.clients[i].gone = true;
        if let Some(e) = self.clients[i].entity {
            self.known.remove(&e);
        }
    }

    /// Carries out what core `s` asked for.
    fn process_outputs(&mut self, s: usize) {
        let now = self.tick;
        while let Some(out) = self.cores[s].poll_output() {
            match out {
                NodeOutput::Client {
                    connection,
                    channel,
                    bytes,
                } => {
                    // The low half names the client; a frame for a session it
                    // left (a resume retried) is not for it any more.
                    let i = (connection.0 & 0xFFFF_FFFF) as usize - 1;
                    if connection != self.clients[i].connection {
                        continue;
                    }
                    if channel == Channel::Snapshots && self.rng.chance(self.config.snapshot_drop) {
                        self.clients[i].stats.dropped += 1;
                        continue;
                    }
                    self.frame_serial += 1;
                    self.client_frames.insert(self.frame_serial, bytes);
                    self.to_clients
                        .push(Reverse((now + 1, self.frame_serial, i)));
                }
                NodeOutput::Disconnect { .. } => {}
                NodeOutput::Shard { to, msg } => {
                    let dest = self.index_of(to);
                    if self.down.contains(&dest) {
                        continue;
                    }
                    let me = self.shard_ref(s);
                    if to.node == me.node {
                        self.net.send(s, dest, Wire::Shard(msg), now);
                    } else {
                        self.flush_bundle_to(s, dest, now, Some(msg));
                    }
                }
                NodeOutput::Coordinator(report) => {
                    let n = self.cores.len();
                    let me = self.shard_ref(s);
                    if self.cut.contains(&me.node) {
                        continue;
                    }
                    let report = self.through_control(me, ControlMsg::Report(report));
                    if let Some(ControlMsg::Report(report)) = report {
                        self.net.send(s, n, Wire::Report(me, report), now);
                    }
                }
            }
        }
        let dests: Vec<usize> = self
            .writers
            .range((s, 0)..(s + 1, 0))
            .map(|((_, d), _)| *d)
            .collect();
        for dest in dests {
            self.flush_bundle_to(s, dest, now, None);
        }
    }

    /// Adds `msg` (if any) to the bundle from core `s` to core `dest`, or,
    /// without a message, encodes the bundle, decodes it again with the
    /// production codec and puts its messages on the link in order.
    fn flush_bundle_to(
        &mut self,
        s: usize,
        dest: usize,
        now: u64,
        msg: Option<ShardMsg<DemoGame>>,
    ) {
        let to = self.shard_ref(dest);
        let me = self.shard_ref(s);
        let tick = self.cores[s].world().tick_id();
        let writer = self
            .writers
            .entry((s, dest))
            .or_insert_with(|| BundleWriter::new(to));
        if let Some(msg) = msg {
            let header = ShardHeader::for_msg(&msg, me, tick, self.cores[s].router().registry());
            writer.push(header, &msg).expect("no orders between shards");
            return;
        }
        if writer.is_empty() {
            return;
        }
        let bytes = writer.finish(|b| b.to_vec());
        let mut decoded = Vec::new();
        match crate::wire::decode_bundle::<DemoGame>(&bytes, &mut decoded) {
            Ok(addressed) if addressed == to => {}
            other => {
                self.violation(format!(
                    "bundle from {me} to {to} did not decode: {other:?}"
                ));
                return;
            }
        }
        self.cluster.bundles += 1;
        self.cluster.bundle_bytes += bytes.len() as u64;
        self.cluster.frames += decoded.len() as u64;
        for (header, msg) in decoded {
            self.net.send(s, dest, Wire::Remote(header, msg), now);
        }
    }

    /// A control message through the production codec (a cluster has a
    /// standalone coordinator); unchanged on one node.
    fn through_control(&mut self, sender: ShardRef, msg: ControlMsg) -> Option<ControlMsg> {
        if self.per_node == self.cores.len() {
            return Some(msg);
        }
        self.control_seq += 1;
        let header = ShardHeader {
            cell: CellId::root(0, 0, 0),
            epoch: self.registry.cluster_epoch(),
            seq: self.control_seq,
            sender,
            tick: TickId(self.tick),
        };
        let bytes = crate::wire::encode_control(&header, &msg);
        match crate::wire::decode_control(&bytes) {
            Ok((h, decoded)) if h == header => {
                self.cluster.control_frames += 1;
                Some(decoded)
            }
            other => {
                self.violation(format!(
                    "control frame {} did not decode: {other:?}",
                    msg.kind()
                ));
                None
            }
        }
    }

    /// The shard core `i` is.
    pub fn shard_ref(&self, i: usize) -> ShardRef {
        shard_ref_of(i, self.per_node)
    }

    /// The core index of a shard.
    pub fn index_of(&self, shard: ShardRef) -> usize {
        usize::from(shard.node) * self.per_node + usize::from(shard.shard)
    }

    /// Every shard, in core order.
    pub fn shard_refs(&self) -> Vec<ShardRef> {
        (0..self.cores.len()).map(|i| self.shard_ref(i)).collect()
    }

    /// What crossed between nodes.
    pub fn cluster_counters(&self) -> ClusterCounters {
        self.cluster
    }

    /// The clients.
    pub fn clients(&self) -> &[SimClient] {
        &self.clients
    }

    /// The shards' cores.
    pub fn cores(&self) -> &[NodeCore<DemoGame>] {
        &self.cores
    }

    /// The world of shard `s`.
    pub fn world(&self, s: usize) -> &ShardWorld<DemoGame> {
        self.cores[s].world()
    }

    /// A shard's handover agent.
    pub fn agent(&self, s: usize) -> &HandoverAgent<DemoGame> {
        self.cores[s].agent()
    }

    /// A shard's handover agent restarts: shadows and pending steps are lost
    /// (its cells and sessions are not).
    pub fn restart_agent(&mut self, s: usize) {
        self.cores[s].restart_agent();
    }

    /// The registry the cores route by.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The coordinator publishes a registry: every core takes it at once
    /// (as a node's shards do; orders travel the network and arrive later).
    /// Nodes cut from the coordinator (and crashed ones) do not get it.
    pub fn set_registry(&mut self, registry: Arc<Registry>) {
        for (i, core) in self.cores.iter_mut().enumerate() {
            let node = shard_ref_of(i, self.per_node).node;
            if self.down.contains(&i) || self.cut.contains(&node) {
                continue;
            }
            core.handle_registry(registry.clone());
        }
        self.registry = registry;
    }

    /// Node `node` crashes: its shards stop, everything on its links is
    /// lost, its sessions' clients are gone.
    pub fn crash_node(&mut self, node: u16) {
        let per_node = self.per_node;
        let cores: BTreeSet<usize> = (0..self.cores.len())
            .filter(|i| shard_ref_of(*i, per_node).node == node)
            .collect();
        self.net
            .purge(|a, b| cores.contains(&a) || cores.contains(&b));
        for i in 0..self.clients.len() {
            if cores.contains(&self.clients[i].gateway) && !self.clients[i].gone {
                self.clients[i].gone = true;
                if let Some(e) = self.clients[i].entity {
                    self.known.remove(&e);
                }
            }
        }
        self.down.extend(cores);
    }

    /// Crashed node `node` starts again under its old id: fresh, empty
    /// shards (the production cores, as a restarted process builds them)
    /// whose entity serials start at `first_serial` (past what the dead
    /// incarnation handed out), taking the current registry. `first_serial`
    /// also names the new process (its incarnation): register it with the
    /// coordinator under that.
    pub fn restart_node(&mut self, node: u16, first_serial: u64) {
        let per_node = self.per_node;
        let layout = self.registry.layout().clone();
        for i in 0..self.cores.len() {
            let me = shard_ref_of(i, per_node);
            if me.node != node || !self.down.remove(&i) {
                continue;
            }
            let mut world = ShardWorld::new(
                DemoGame::new(self.config.demo.clone()),
                layout.clone(),
                self.config.world.clone(),
                crate::ids::IdAllocator::prefix_of(me.node, me.shard),
            );
            world.start_ids_at(first_serial);
            // A new process: its first serial names it (as it registers
            // with the coordinator).
            self.cores[i] =
                NodeCore::with_incarnation(me, world, self.registry.clone(), first_serial);
            self.process_outputs(i);
        }
    }

    /// True if core `s` crashed.
    pub fn is_down(&self, s: usize) -> bool {
        self.down.contains(&s)
    }

    /// Cuts (or heals) the links between node `node` and the coordinator;
    /// shard-to-shard links stay. A healed node gets the current registry.
    pub fn cut_from_coordinator(&mut self, node: u16, cut: bool) {
        if cut {
            self.cut.insert(node);
            return;
        }
        if self.cut.remove(&node) {
            let registry = self.registry.clone();
            for i in 0..self.cores.len() {
                if shard_ref_of(i, self.per_node).node == node && !self.down.contains(&i) {
                    self.cores[i].handle_registry(registry.clone());
                    self.process_outputs(i);
                }
            }
        }
    }

    /// The driver's lease verdict for every shard of `node`.
    pub fn set_fenced(&mut self, node: u16, fenced: bool) {
        for i in 0..self.cores.len() {
            if shard_ref_of(i, self.per_node).node == node && !self.down.contains(&i) {
                self.cores[i].set_fenced(fenced);
            }
        }
    }

    /// Sends an order from the coordinator to a shard.
    pub fn send_order(&mut self, to: ShardRef, order: Order) {
        let now = self.tick;
        let from = self.cores.len();
        let coordinator = ShardRef {
            node: u16::MAX,
            shard: 0,
        };
        let Some(ControlMsg::Order(order)) =
            self.through_control(coordinator, ControlMsg::Order(order))
        else {
            return;
        };
        let dest = self.index_of(to);
        if self.down.contains(&dest) || self.cut.contains(&to.node) {
            return;
        }
        self.net
            .send(from, dest, Wire::Shard(ShardMsg::Order(order)), now);
    }

    /// Reports that reached the coordinator since the last call.
    pub fn take_reports(&mut self) -> Vec<(ShardRef, Report)> {
        std::mem::take(&mut self.reports)
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
                    m.shard(),
                    Some(ShardMsg::Cell(CellEnvelope {
                        msg: CellMessage::Input { .. } | CellMessage::Transfer(_),
                        ..
                    }))
                )
            });
            let held = self
                .cores
                .iter()
                .flat_map(|c| c.world().cells())
                .any(|c| c.entities().iter().any(|e| !e.pending_inputs.is_empty()));
            let avatars_owned = self
                .clients
                .iter()
                .all(|c| c.gone || c.entity.is_none_or(|id| self.find(id).is_some()));
            if !inputs_in_flight
                && !held
                && avatars_owned
                && self.cores.iter().all(|c| c.world().pending_local() == 0)
            {
                break;
            }
        }
    }

    /// One tick: deliver the network, let clients act, tick every shard,
    /// carry out their outputs, check the invariants.
    pub fn step(&mut self) {
        self.tick += 1;
        let now = self.tick;
        for (to, msg) in self.net.deliver(now) {
            if self.down.contains(&to) {
                continue;
            }
            match msg {
                Wire::Shard(msg) => {
                    self.cores[to].handle_message(msg);
                    self.process_outputs(to);
                }
                Wire::Remote(header, msg) => {
                    if header.is_stale(&msg, self.cores[to].router().registry()) {
                        self.cluster.stale += 1;
                        continue;
                    }
                    self.cores[to].handle_message(msg);
                    self.process_outputs(to);
                }
                Wire::Report(from, report) => self.reports.push((from, report)),
            }
        }
        while let Some(Reverse((at, serial, i))) = self.to_clients.peek().copied() {
            if at > now {
                break;
            }
            self.to_clients.pop();
            if let Some(bytes) = self.client_frames.remove(&serial) {
                self.client_receive(i, &bytes);
            }
        }
        for i in 0..self.clients.len() {
            self.client_act(i);
        }
        for s in 0..self.cores.len() {
            if self.down.contains(&s) {
                continue;
            }
            self.cores[s].tick(TickId(now));
            self.process_outputs(s);
            self.record_truth(s);
        }
        self.check_live_copies();
        if self.config.check_ownership {
            self.check_ownership();
        }
        if self.config.check_views {
            self.check_views();
        }
    }

    fn record_truth(&mut self, s: usize) {
        for cell in self.cores[s].world().cells() {
            for e in cell.entities().iter() {
                let (Some(v), Some(client)) = (e.view.as_ref(), e.client) else {
                    continue;
                };
                let Some(sent) = v.latest_sent() else {
                    continue;
                };
                if let Some(c) = self.by_id.get(&client).map(|i| &mut self.clients[*i]) {
                    c.truth.insert(sent.tick.0, sent.clone());
                    while c.truth.len() > 64 {
                        c.truth.pop_first();
                    }
                }
            }
        }
    }

    fn client_receive(&mut self, i: usize, bytes: &[u8]) {
        if self.clients[i].gone {
            // Frames still on their way to a client that left.
            return;
        }
        let msg = match server::decode(bytes) {
            Ok(m) => m,
            Err(e) => {
                let client = self.clients[i].id;
                self.violation(format!("client {client} got an undecodable frame: {e}"));
                return;
            }
        };
        match msg {
            ServerMessage::Welcome(w) => {
                let c = &self.clients[i];
                let (client, had, key) = (c.id, c.entity, c.resume_key);
                if had.is_some_and(|e| e.0 != w.entity) {
                    self.violation(format!(
                        "client {client} resumed as {} instead of its avatar {had:?}",
                        w.entity
                    ));
                }
                if key != 0 && w.resume_key != key {
                    self.violation(format!("client {client}: its resume credential changed"));
                }
                let c = &mut self.clients[i];
                c.entity = Some(EntityId(w.entity));
                c.resume_key = w.resume_key;
                if std::mem::take(&mut c.resuming) {
                    let again: Vec<InputCmd> = c.recent.iter().cloned().collect();
                    for input in again {
                        self.client_send(i, &ClientMessage::Input(input));
                    }
                }
                self.known.insert(EntityId(w.entity));
            }
            ServerMessage::Snapshot(snap) => self.client_snapshot(i, &snap),
            _ => {}
        }
    }

    fn client_snapshot(&mut self, i: usize, snap: &server::Snapshot) {
        let c = &mut self.clients[i];
        c.stats.received += 1;
        let tick = snap.tick;
        let view = match c.mirror.apply(snap) {
            Ok(view) => view.clone(),
            Err(e) => {
                c.stats.refused += 1;
                if !matches!(e, crate::view::MirrorError::Stale(_)) {
                    let client = c.id;
                    self.violation(format!("client {client}: {e}"));
                }
                return;
            }
        };
        c.stats.applied += 1;
        let client = c.id;
        if view.entries.windows(2).any(|w| w[0].0 == w[1].0) {
            self.violation(format!("client {client} view {tick} holds an entity twice"));
        }
        match self.clients[i].truth.get(&tick) {
            Some(t) if *t != view => {
                let (got, want) = (view.entries.len(), t.entries.len());
                let differ: Vec<_> = view
                    .entries
                    .iter()
                    .zip(&t.entries)
                    .filter(|(a, b)| a != b)
                    .take(2)
                    .map(|(a, b)| format!("{}: {:?} vs {:?}", a.0, a.1, b.1))
                    .collect();
                self.violation(format!(
                    "client {client} rebuilt view {tick} differs from the server's ({got} vs {want} entities; {differ:?})"
                ))
            }
            _ => {}
        }
        if !self.rng.chance(self.config.ack_drop) {
            self.client_send(
                i,
                &ClientMessage::Ack {
                    snapshot_tick: tick,
                },
            );
        }
    }

    fn client_act(&mut self, i: usize) {
        let now = self.tick;
        let c = &mut self.clients[i];
        if c.gone || c.entity.is_none() || c.resuming {
            return;
        }
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
        // Random walkers attack something they see now and then: attacks
        // are intents routed to the target's owner, and lock the target in
        // the attacker's view (a subscription wherever it goes).
        let mut actions = Vec::new();
        if matches!(c.behavior, Behavior::RandomWalk)
            && self.config.attack_chance > 0.0
            && self.rng.chance(self.config.attack_chance)
        {
            let me = c.entity;
            let seen: Vec<EntityId> = c
                .mirror
                .latest()
                .map(|v| {
                    v.entries
                        .iter()
                        .map(|e| e.0)
                        .filter(|e| Some(*e) != me)
                        .collect()
                })
                .unwrap_or_default();
            if !seen.is_empty() {
                let target = seen[self.rng.below(seen.len() as u64) as usize];
                actions.push(client::ActionCmd::Attack { target: target.0 });
            }
        }
        let input = InputCmd {
            input_seq: c.input_seq,
            client_tick: now,
            movement: [movement.x, movement.y],
            heading: movement.y.atan2(movement.x),
            actions,
        };
        if c.recent.len() >= RECENT_INPUTS {
            c.recent.pop_front();
        }
        c.recent.push_back(input.clone());
        self.client_send(i, &ClientMessage::Input(input));
    }

    /// True if shard `s` may write `cell` now: the registry names it for the
    /// cell at the epoch it holds, or the cell comes from a split or merge
    /// this shard did and the registry has not caught up with yet (the
    /// registry then names this shard for the cell's ancestor or for cells
    /// inside it).
    fn authoritative(&self, s: usize, cell: CellId) -> bool {
        let me = self.shard_ref(s);
        let world = self.cores[s].world();
        match self.registry.get(cell) {
            Some(a) => a.owner == me && world.epoch(cell) == Some(a.epoch),
            None => {
                let mut up = cell.parent();
                while let Some(p) = up {
                    if let Some(a) = self.registry.get(p) {
                        return a.owner == me;
                    }
                    up = p.parent();
                }
                self.registry
                    .iter()
                    .filter(|(c, _)| cell.contains_cell(*c))
                    .all(|(_, a)| a.owner == me)
            }
        }
    }

    /// At most one running (not frozen) copy of any piece of the world: no
    /// cell runs on two shards, and no running cell overlaps another running
    /// cell (a parent and its child on different shards).
    fn check_live_copies(&mut self) {
        let mut live: BTreeMap<CellId, usize> = BTreeMap::new();
        let mut problems = Vec::new();
        for (s, core) in self.cores.iter().enumerate() {
            if self.down.contains(&s) {
                continue;
            }
            let world = core.world();
            for cell in world.cells().map(|c| c.id()) {
                if world.is_frozen(cell) {
                    continue;
                }
                if let Some(other) = live.insert(cell, s) {
                    problems.push(format!("{cell} runs on shards {other} and {s}"));
                }
            }
        }
        for (cell, s) in &live {
            let mut up = cell.parent();
            while let Some(p) = up {
                if let Some(other) = live.get(&p) {
                    problems.push(format!(
                        "{cell} on shard {s} overlaps {p} running on shard {other}"
                    ));
                }
                up = p.parent();
            }
        }
        for p in problems {
            self.violation(p);
        }
    }

    /// Every known entity is owned by exactly one cell, counting transfers
    /// in flight as owned by their destination; no cell holds an entity both
    /// as owned and as a ghost.
    fn check_ownership(&mut self) {
        let mut count: BTreeMap<EntityId, u32> = BTreeMap::new();
        let mut problems = Vec::new();
        for (s, core) in self.cores.iter().enumerate() {
            let world = core.world();
            for cell in world.cells() {
                let authoritative = self.authoritative(s, cell.id());
                if !authoritative {
                    // A frozen source that lost authority keeps what arrived
                    // after its diff until it releases the cell.
                    if world.is_frozen(cell.id()) && !self.config.node_faults {
                        for id in cell.queued_transfers() {
                            *count.entry(id).or_default() += 1;
                        }
                    }
                    continue;
                }
                if !self.config.node_faults {
                    for id in cell.queued_transfers() {
                        *count.entry(id).or_default() += 1;
                    }
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
            // Sent to a handover target ahead of its activation: they join
            // the cell, or go back to the source.
            if !self.config.node_faults {
                for (_, id) in core.agent().arrived_transfers() {
                    *count.entry(id).or_default() += 1;
                }
            }
            // Committed but not yet activated: the target's shadow holds them.
            for (cell, state) in core.agent().prepared() {
                let named = self
                    .registry
                    .get(cell)
                    .is_some_and(|a| a.owner == self.shard_ref(s));
                if named && !world.owns(cell) {
                    for e in state.entities.iter() {
                        *count.entry(e.id).or_default() += 1;
                    }
                    // Under node faults a queued transfer may be a copy sent
                    // again (taken only if new): entities alone count.
                    if !self.config.node_faults {
                        for id in crate::cell::queued_transfer_ids(&state.input_queue) {
                            *count.entry(id).or_default() += 1;
                        }
                    }
                }
            }
        }
        if !self.config.node_faults {
            for msg in self.net.in_flight() {
                if let Some(ShardMsg::Cell(CellEnvelope {
                    msg: CellMessage::Transfer(t),
                    ..
                })) = msg.shard()
                {
                    *count.entry(t.entity.id).or_default() += 1;
                }
            }
            for core in &self.cores {
                for env in core.held_transfers() {
                    if let CellMessage::Transfer(t) = &env.msg {
                        *count.entry(t.entity.id).or_default() += 1;
                    }
                }
            }
        }
        let faults = self.config.node_faults;
        for id in &self.known {
            match count.get(id).copied().unwrap_or(0) {
                1 => {}
                0 if faults => {}
                n if problems.len() < 3 => {
                    let traces = self.traces(*id);
                    let cells: Vec<String> = traces
                        .iter()
                        .filter_map(|t| t.strip_prefix("owned by "))
                        .filter_map(|t| t.split(' ').next())
                        .filter_map(|c| c.parse::<CellId>().ok())
                        .map(|c| {
                            format!(
                                "{c}: registry {:?}, epochs {:?}",
                                self.registry.get(c),
                                self.cores
                                    .iter()
                                    .map(|k| k.world().epoch(c))
                                    .collect::<Vec<_>>()
                            )
                        })
                        .collect();
                    problems.push(format!("{id} is owned {n} times: {traces:?}; {cells:?}"))
                }
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
        for core in &self.cores {
            for cell in core.world().cells() {
                all.extend(cell.entities().iter().map(|e| (e.id, e.pos, cell.id())));
            }
        }
        let mut problems = Vec::new();
        for core in &self.cores {
            for cell in core.world().cells() {
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
        for core in &self.cores {
            for cell in core.world().cells() {
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
        for (s, core) in self.cores.iter().enumerate() {
            if self.down.contains(&s) {
                continue;
            }
            for c in core.world().cells() {
                if let Some(e) = c.entities().get(id) {
                    return Some((s, c.id(), e));
                }
            }
        }
        None
    }

    /// Entities the harness knows of (NPCs, avatars of clients still
    /// connected) that no cell owns and no transfer carries (on the network
    /// or queued for a cell): wandering NPCs are always crossing somewhere.
    pub fn missing(&self) -> Vec<EntityId> {
        let mut carried: BTreeSet<EntityId> = self
            .net
            .in_flight()
            .filter_map(|m| match m.shard() {
                Some(ShardMsg::Cell(CellEnvelope {
                    msg: CellMessage::Transfer(t),
                    ..
                })) => Some(t.entity.id),
                _ => None,
            })
            .collect();
        for (s, core) in self.cores.iter().enumerate() {
            if self.down.contains(&s) {
                continue;
            }
            for c in core.world().cells() {
                carried.extend(c.entities().iter().map(|e| e.id));
                carried.extend(c.queued_transfers());
            }
            for env in core.held_transfers() {
                if let CellMessage::Transfer(t) = &env.msg {
                    carried.insert(t.entity.id);
                }
            }
        }
        self.known
            .iter()
            .copied()
            .filter(|id| !carried.contains(id))
            .collect()
    }

    /// Entities the harness knows of (NPCs, avatars of clients still
    /// connected).
    pub fn population(&self) -> usize {
        self.known.len()
    }

    /// Every place the harness can see a trace of an entity (for failure
    /// messages): owned, queued for a cell, in a handover shadow, on the
    /// network, or as a ghost.
    pub fn traces(&self, id: EntityId) -> Vec<String> {
        let mut out = Vec::new();
        for (s, core) in self.cores.iter().enumerate() {
            if self.down.contains(&s) {
                out.push(format!("(shard {s} is down)"));
            }
            let world = core.world();
            for c in world.cells() {
                if c.entities().contains(id) {
                    out.push(format!("owned by {} on shard {s}", c.id()));
                }
                if c.queued_transfers().any(|e| e == id) {
                    out.push(format!(
                        "queued for {} on shard {s} (frozen {})",
                        c.id(),
                        world.is_frozen(c.id())
                    ));
                }
                if c.ghosts().get(id).is_some() {
                    out.push(format!("ghost in {} on shard {s}", c.id()));
                }
                for (to, t) in c.resend_for(|_, _| true) {
                    if t.entity.id == id {
                        out.push(format!(
                            "kept by {} on shard {s} (sent to {to} at tick {})",
                            c.id(),
                            t.departed.0
                        ));
                    }
                }
            }
            for env in core.held_transfers() {
                if matches!(&env.msg, CellMessage::Transfer(t) if t.entity.id == id) {
                    out.push(format!("held on shard {s} for {}", env.to));
                }
            }
            for (from, cell, e, to) in core.replicas().kept() {
                if e == id {
                    out.push(format!(
                        "kept in the replica of {cell} ({from}) on shard {s}, for {to}"
                    ));
                }
            }
            for (from, cell, e) in core.replicas().entities() {
                if e == id {
                    out.push(format!("in the replica of {cell} ({from}) on shard {s}"));
                }
            }
            for (cell, e) in core.agent().shadow_entities() {
                if e == id {
                    out.push(format!("in the shadow of {cell} on shard {s}"));
                }
            }
        }
        for msg in self.net.in_flight() {
            match msg.shard() {
                Some(ShardMsg::Peer(crate::control::PeerMsg::Diff { cell, diff, .. })) => {
                    if diff.changed.iter().any(|e| e.id == id) {
                        out.push(format!("changed in the diff of {cell} in flight"));
                    }
                    if crate::cell::queued_transfer_ids(&diff.rest.input_queue).any(|e| e == id) {
                        out.push(format!("queued in the diff of {cell} in flight"));
                    }
                }
                Some(ShardMsg::Peer(crate::control::PeerMsg::PreCopy { cell, state, .. }))
                    if state.entities.iter().any(|e| e.id == id) =>
                {
                    out.push(format!("in the pre-copy of {cell} in flight"));
                }
                _ => {}
            }
        }
        for (s, core) in self.cores.iter().enumerate() {
            for (cell, e) in core.agent().arrived_transfers() {
                if e == id {
                    out.push(format!(
                        "sent to the handover target of {cell} on shard {s}"
                    ));
                }
            }
            for (cell, state) in core.agent().prepared() {
                if crate::cell::queued_transfer_ids(&state.input_queue).any(|e| e == id) {
                    out.push(format!(
                        "queued in the prepared shadow of {cell} on shard {s}"
                    ));
                }
            }
        }
        for (link, seq, expected, msg) in self.net.in_flight_detail() {
            if let Some(ShardMsg::Cell(CellEnvelope {
                to,
                msg: CellMessage::Transfer(t),
                ..
            })) = msg.shard()
            {
                if t.entity.id == id {
                    out.push(format!(
                        "in flight to {to} on link {link:?}, seq {seq} (the link delivers {expected} next: {:?}; now {})",
                        self.net.next_of(link), self.tick
                    ));
                }
            }
        }
        out
    }

    /// Totals over all shards.
    pub fn totals(&self) -> crate::world::WorldTotals {
        let mut t = crate::world::WorldTotals::default();
        for core in &self.cores {
            let x = core.world().totals();
            t.cells += x.cells;
            t.entities += x.entities;
            t.ghosts += x.ghosts;
            t.players += x.players;
            crate::world::add_counters(&mut t.counters, &x.counters);
        }
        t
    }

    /// Quantised state of an entity as the world owns it.
    pub fn state_of(&self, id: EntityId) -> Option<QState> {
        self.find(id)
            .map(|(_, _, e)| QState::of(e, DemoGame::stats(&e.game)))
    }
}
