//! The gateway role of a shard: the client sessions whose handshake reached
//! this shard, for their whole lifetime. A session forwards its client's
//! inputs to the cell that owns the avatar and sends the client whatever that
//! cell computes for it; when the avatar moves to a cell owned elsewhere only
//! the route changes.

use rustc_hash::FxHashMap;
use tessera_schema::client::{self, ClientMessage};
use tessera_schema::flatbuffers::FlatBufferBuilder;
use tessera_schema::protocol::{disconnect, Channel};
use tessera_schema::server::{self as srv, ErrorCode, ServerMessage};
use tessera_schema::FrameErrorCounts;

use crate::cell::Envelope;
use crate::game::GameLogic;
use crate::geometry::{CellId, Layout};
use crate::ids::{ClientId, EntityId, TickId};
use crate::messages::{CellEnvelope, CellMessage, ClientOutput, ClientOutputKind};
use crate::registry::ShardRef;

use super::route::client_id;
use super::{ConnectionKey, NodeOutput};

/// What a shard's sessions counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionCounters {
    /// Sessions opened (handshakes completed).
    pub sessions_opened: u64,
    /// Sessions closed (any reason).
    pub sessions_closed: u64,
    /// Join requests forwarded to a cell.
    pub joins: u64,
    /// Welcomes delivered.
    pub welcomes: u64,
    /// Leaves (explicit or by disconnect) forwarded.
    pub leaves: u64,
    /// Inputs forwarded.
    pub inputs: u64,
    /// Acks forwarded.
    pub acks: u64,
    /// Pings answered.
    pub pings: u64,
    /// Client frames refused (bad bytes), all reasons.
    pub frames_refused: u64,
    /// Inputs or acks before the join completed.
    pub not_joined: u64,
    /// A second join on one session.
    pub already_joined: u64,
    /// Snapshots sent.
    pub snapshots_sent: u64,
    /// Their bytes.
    pub snapshot_bytes: u64,
    /// Frames for a client whose session is gone.
    pub frames_for_gone_clients: u64,
    /// Resumes forwarded (a client taking back its avatar after losing
    /// its gateway).
    pub resumes: u64,
    /// Resumes the avatar's cell refused.
    pub resumes_refused: u64,
    /// Sessions told to resume at another gateway (this one drains).
    pub handed_off: u64,
    /// Inputs, acks and pings over their session's [`InputLimit`]: dropped.
    pub inputs_rate_limited: u64,
    /// Sessions closed for staying far over their input limit.
    pub closed_for_flooding: u64,
    /// Avatars parked when their player's session was lost.
    pub avatars_parked: u64,
    /// Joins that took back the player's parked avatar.
    pub avatars_reclaimed: u64,
    /// Parked avatars that were gone when their player came back (a fresh
    /// join followed).
    pub reclaims_refused: u64,
}

/// What one session may send of game messages (inputs, acks, pings): a
/// token bucket refilled every tick. The excess is dropped and counted; a
/// session that has `per_second` messages dropped within one second is
/// closed with [`disconnect::FLOODING`]. Counted in ticks, so that a
/// simulation replays it exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InputLimit {
    /// Messages per second.
    pub per_second: u32,
    /// How many the bucket holds, in seconds of its rate.
    pub burst_seconds: u32,
}

impl InputLimit {
    /// A player's client: an input and an ack a tick at up to 60 Hz, pings,
    /// with twice the room.
    pub fn game_client() -> Self {
        Self {
            per_second: 240,
            burst_seconds: 2,
        }
    }
}

/// A session's input budget, in thousandths of a message.
#[derive(Clone, Copy, Debug, Default)]
struct InputBudget {
    milli: u64,
    refilled_tick: u64,
    drops: u32,
    drops_since_tick: u64,
}

/// What [`InputBudget::spend`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Spent {
    Admit,
    Drop,
    Flooding,
}

impl InputBudget {
    fn full(limit: &InputLimit, tick: u64) -> Self {
        Self {
            milli: capacity(limit),
            refilled_tick: tick,
            drops: 0,
            drops_since_tick: tick,
        }
    }

    fn spend(&mut self, limit: &InputLimit, tick_hz: u32, tick: u64) -> Spent {
        let elapsed = tick.saturating_sub(self.refilled_tick);
        if elapsed > 0 {
            let refill = elapsed.saturating_mul(u64::from(limit.per_second) * 1000)
                / u64::from(tick_hz.max(1));
            self.milli = self.milli.saturating_add(refill).min(capacity(limit));
            self.refilled_tick = tick;
        }
        if self.milli >= 1000 {
            self.milli -= 1000;
            return Spent::Admit;
        }
        if tick.saturating_sub(self.drops_since_tick) >= u64::from(tick_hz.max(1)) {
            self.drops = 0;
            self.drops_since_tick = tick;
        }
        self.drops += 1;
        if self.drops >= limit.per_second {
            Spent::Flooding
        } else {
            Spent::Drop
        }
    }
}

fn capacity(limit: &InputLimit) -> u64 {
    u64::from(limit.per_second) * u64::from(limit.burst_seconds.max(1)) * 1000
}

struct Session {
    client: ClientId,
    entity: Option<EntityId>,
    route: Option<CellId>,
    route_tick: u64,
    join_requested: bool,
    /// Told to resume elsewhere: its close leaves the avatar in the world.
    handed_off: bool,
    /// With an input limit.
    budget: InputBudget,
    /// Closed for flooding: later frames are ignored.
    flooding: bool,
    /// The player its connect token names.
    player: Option<u64>,
    /// The avatar's resume credential.
    key: u64,
    /// A join sent as a reclaim of a parked avatar: where to join afresh
    /// if the avatar is gone.
    fallback: Option<(CellId, String, crate::geometry::Vec2)>,
}

/// The sessions of one shard.
pub struct Sessions {
    me: ShardRef,
    sessions: FxHashMap<ConnectionKey, Session>,
    by_client: FxHashMap<ClientId, ConnectionKey>,
    serial: u32,
    fbb: FlatBufferBuilder<'static>,
    counters: SessionCounters,
    refused: FrameErrorCounts,
    /// Key of the resume credentials this gateway mints.
    secret: (u64, u64),
    /// The cluster's other gateways, for clients to resume at.
    gateways: Vec<String>,
    /// Per-session input limit and the tick rate that refills it.
    input_limit: Option<(InputLimit, u32)>,
    /// The tick of the last frame handled (new sessions start full then).
    last_tick: u64,
    /// Where lost players' avatars wait (None: a lost session's avatar
    /// leaves at once).
    directory: Option<std::sync::Arc<super::PlayerDirectory>>,
}

/// Where a session's work goes: cell messages to route, frames to send.
pub(crate) struct SessionSink<'a, G: GameLogic> {
    pub(crate) cells: &'a mut Vec<Envelope<G>>,
    pub(crate) outputs: &'a mut std::collections::VecDeque<NodeOutput<G>>,
}

impl Sessions {
    /// No sessions yet, on shard `me` (it names the gateway in client ids).
    pub fn new(me: ShardRef) -> Self {
        Self {
            me,
            sessions: FxHashMap::default(),
            by_client: FxHashMap::default(),
            serial: 0,
            fbb: FlatBufferBuilder::with_capacity(256),
            counters: SessionCounters::default(),
            refused: FrameErrorCounts::default(),
            secret: (
                0x7465_7373_6572_6131,
                u64::from(me.node) << 16 | u64::from(me.shard),
            ),
            gateways: Vec::new(),
            input_limit: None,
            last_tick: 0,
            directory: None,
        }
    }

    /// Parks lost players' avatars in `directory` (shared by the node's
    /// gateway shards), for their next session to take back.
    pub fn set_player_directory(&mut self, directory: std::sync::Arc<super::PlayerDirectory>) {
        self.directory = Some(directory);
    }

    /// Limits every session's game messages from now on (None: unlimited);
    /// `tick_hz` converts the rate into ticks.
    pub fn set_input_limit(&mut self, limit: Option<InputLimit>, tick_hz: u32) {
        self.input_limit = limit.map(|l| (l, tick_hz.max(1)));
    }

    /// The key of the resume credentials minted from now on (the driver
    /// passes fresh randomness at start; the default is fixed, for
    /// deterministic simulations).
    pub fn set_secret(&mut self, k0: u64, k1: u64) {
        self.secret = (k0, k1);
    }

    /// The cluster's other gateways changed: joined clients learn the new
    /// list (where to resume if this gateway is lost).
    pub(crate) fn set_gateways<G: GameLogic>(
        &mut self,
        sink: &mut SessionSink<'_, G>,
        mut gateways: Vec<String>,
    ) {
        gateways.truncate(srv::GATEWAYS_MAX);
        if gateways == self.gateways {
            return;
        }
        self.gateways = gateways;
        if self.gateways.is_empty() {
            return;
        }
        let mut joined: Vec<ConnectionKey> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.entity.is_some())
            .map(|(c, _)| *c)
            .collect();
        joined.sort_unstable();
        let msg = ServerMessage::Gateways {
            addresses: self.gateways.clone(),
            now: false,
        };
        for connection in joined {
            self.reply(sink, connection, &msg, Channel::Reliable);
        }
    }

    /// This gateway drains: every session is told to resume at another
    /// gateway (spread over them) and its close will leave the avatar in
    /// the world for the resume. Returns the sessions told; 0 when no other
    /// gateway is known (then closing them makes their avatars leave).
    pub(crate) fn hand_off<G: GameLogic>(&mut self, sink: &mut SessionSink<'_, G>) -> usize {
        if self.gateways.is_empty() {
            return 0;
        }
        let mut all: Vec<ConnectionKey> = self
            .sessions
            .iter()
            .filter(|(_, s)| !s.handed_off)
            .map(|(c, _)| *c)
            .collect();
        all.sort_unstable();
        let n = self.gateways.len();
        for (i, connection) in all.iter().enumerate() {
            if let Some(s) = self.sessions.get_mut(connection) {
                s.handed_off = true;
            }
            let mut addresses = self.gateways.clone();
            addresses.rotate_left(i % n);
            let msg = ServerMessage::Gateways {
                addresses,
                now: true,
            };
            self.reply(sink, *connection, &msg, Channel::Reliable);
        }
        self.counters.handed_off += all.len() as u64;
        tracing::info!(shard = %self.me, sessions = all.len(), gateways = n, "sessions told to resume at another gateway");
        all.len()
    }

    /// The counters.
    pub fn counters(&self) -> SessionCounters {
        self.counters
    }

    /// Client frames refused, by reason.
    pub fn refused(&self) -> FrameErrorCounts {
        self.refused
    }

    /// Sessions open.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// True if none.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    pub(crate) fn open(&mut self, connection: ConnectionKey, player: Option<u64>) -> ClientId {
        self.serial = self.serial.wrapping_add(1);
        let client = client_id(self.me, self.serial);
        self.sessions.insert(
            connection,
            Session {
                client,
                entity: None,
                route: None,
                route_tick: 0,
                join_requested: false,
                handed_off: false,
                budget: self
                    .input_limit
                    .map(|(l, _)| InputBudget::full(&l, self.last_tick))
                    .unwrap_or_default(),
                flooding: false,
                player,
                key: 0,
                fallback: None,
            },
        );
        self.by_client.insert(client, connection);
        self.counters.sessions_opened += 1;
        tracing::debug!(shard = %self.me, %client, connection = connection.0, "session opened");
        client
    }

    /// A session ends. `lost`: its client went without leaving (a
    /// timeout): a player's avatar is parked for the player's next session.
    pub(crate) fn close<G: GameLogic>(
        &mut self,
        connection: ConnectionKey,
        lost: bool,
        cells: &mut Vec<Envelope<G>>,
    ) {
        let Some(s) = self.sessions.remove(&connection) else {
            return;
        };
        self.by_client.remove(&s.client);
        self.counters.sessions_closed += 1;
        tracing::debug!(shard = %self.me, client = %s.client, handed_off = s.handed_off, lost, "session closed");
        if s.handed_off {
            // Its client resumes elsewhere; an avatar never taken back
            // leaves after the world's linger time.
            return;
        }
        if let (true, Some(player), Some(entity), Some(cell), Some(directory)) =
            (lost, s.player, s.entity, s.route, &self.directory)
        {
            // Like a handed-off session: the avatar lingers, silent.
            directory.park(
                player,
                super::ParkedAvatar {
                    entity,
                    cell,
                    key: s.key,
                    tick: self.last_tick,
                },
            );
            self.counters.avatars_parked += 1;
            tracing::info!(shard = %self.me, client = %s.client, player, %entity, %cell, "session lost: avatar parked for its player");
            return;
        }
        if let (Some(entity), Some(route)) = (s.entity, s.route) {
            self.counters.leaves += 1;
            cells.push(leave(route, s.client, entity));
        }
    }

    fn reply<G: GameLogic>(
        &mut self,
        sink: &mut SessionSink<'_, G>,
        connection: ConnectionKey,
        msg: &ServerMessage,
        channel: Channel,
    ) {
        let bytes = srv::encode(&mut self.fbb, msg).to_vec();
        sink.outputs.push_back(NodeOutput::Client {
            connection,
            channel,
            bytes,
        });
    }

    fn error<G: GameLogic>(
        &mut self,
        sink: &mut SessionSink<'_, G>,
        connection: ConnectionKey,
        code: ErrorCode,
        message: &str,
    ) {
        let msg = ServerMessage::Error {
            code,
            message: message.to_string(),
        };
        self.reply(sink, connection, &msg, Channel::Reliable);
    }

    /// A frame from a client: decoded (bad bytes are counted by reason and
    /// dropped), then turned into cell messages or answers.
    pub(crate) fn handle_frame<G: GameLogic>(
        &mut self,
        sink: &mut SessionSink<'_, G>,
        connection: ConnectionKey,
        bytes: &[u8],
        tick: TickId,
        game: &G,
        layout: &Layout,
    ) {
        let msg = match client::decode(bytes) {
            Ok(m) => m,
            Err(e) => {
                self.refused.record(&e);
                self.counters.frames_refused += 1;
                tracing::debug!(shard = %self.me, reason = e.reason(), error = %e, "client frame refused");
                return;
            }
        };
        self.last_tick = tick.0;
        let secret = self.secret;
        let Some(session) = self.sessions.get_mut(&connection) else {
            return;
        };
        let client = session.client;
        let joined = session.entity.zip(session.route);
        if session.flooding {
            self.counters.inputs_rate_limited += 1;
            return;
        }
        if let (
            ClientMessage::Input(_) | ClientMessage::Ack { .. } | ClientMessage::Ping { .. },
            Some((limit, hz)),
        ) = (&msg, self.input_limit)
        {
            match session.budget.spend(&limit, hz, tick.0) {
                Spent::Admit => {}
                Spent::Drop => {
                    self.counters.inputs_rate_limited += 1;
                    return;
                }
                Spent::Flooding => {
                    self.counters.inputs_rate_limited += 1;
                    self.counters.closed_for_flooding += 1;
                    session.flooding = true;
                    tracing::warn!(shard = %self.me, %client, %tick, "session far over its input limit: closed");
                    sink.outputs.push_back(NodeOutput::Disconnect {
                        connection,
                        code: disconnect::FLOODING,
                    });
                    return;
                }
            }
        }
        match msg {
            ClientMessage::Join { name, .. } => {
                if session.join_requested {
                    self.counters.already_joined += 1;
                    self.error(sink, connection, ErrorCode::AlreadyJoined, "already joined");
                    return;
                }
                let pos = game.spawn_point(&name, client.0, layout.geometry().world_rect());
                let Some(cell) = layout.leaf_at(pos) else {
                    self.error(
                        sink,
                        connection,
                        ErrorCode::Unknown,
                        "no cell at the spawn point",
                    );
                    return;
                };
                session.join_requested = true;
                session.route = Some(cell);
                let parked = match (session.player, &self.directory) {
                    (Some(player), Some(d)) => d.take(player, tick.0).map(|a| (player, a)),
                    _ => None,
                };
                if let Some((player, avatar)) = parked {
                    // The player's avatar from a lost session: take it back.
                    session.route = Some(avatar.cell);
                    session.key = avatar.key;
                    session.fallback = Some((cell, name, pos));
                    self.counters.avatars_reclaimed += 1;
                    tracing::info!(shard = %self.me, %client, player, entity = %avatar.entity, cell = %avatar.cell, "join: the player's parked avatar is taken back");
                    sink.cells.push(to_cell(
                        avatar.cell,
                        CellMessage::Resume {
                            client,
                            entity: avatar.entity,
                            key: avatar.key,
                            hops: 0,
                            after: TickId(0),
                        },
                    ));
                    return;
                }
                self.counters.joins += 1;
                tracing::info!(shard = %self.me, %client, %cell, name = %name, "join");
                let resume_key = credential(secret, client);
                session.key = resume_key;
                sink.cells.push(to_cell(
                    cell,
                    CellMessage::Join {
                        client,
                        name,
                        pos,
                        resume_key,
                    },
                ));
            }
            ClientMessage::Resume {
                entity,
                key,
                position,
            } => {
                if session.join_requested {
                    self.counters.already_joined += 1;
                    self.error(sink, connection, ErrorCode::AlreadyJoined, "already joined");
                    return;
                }
                // Positions travel in centimetres: one on the world's far
                // edge rounds onto it, outside. The nearest inside will do.
                let at = layout
                    .geometry()
                    .world_rect()
                    .clamp(crate::geometry::Vec2::new(position[0], position[1]));
                let Some(cell) = layout.leaf_at(at) else {
                    self.error(
                        sink,
                        connection,
                        ErrorCode::ResumeRefused,
                        "the position is outside the world",
                    );
                    return;
                };
                session.join_requested = true;
                session.route = Some(cell);
                session.key = key;
                self.counters.resumes += 1;
                let entity = EntityId(entity);
                tracing::info!(shard = %self.me, %client, %entity, %cell, "resume");
                sink.cells.push(to_cell(
                    cell,
                    CellMessage::Resume {
                        client,
                        entity,
                        key,
                        hops: 0,
                        after: TickId(0),
                    },
                ));
            }
            ClientMessage::Input(input) => match joined {
                Some((entity, route)) => {
                    self.counters.inputs += 1;
                    let msg = CellMessage::Input {
                        client,
                        entity,
                        input,
                        hops: 0,
                        after: TickId(0),
                    };
                    sink.cells.push(to_cell(route, msg));
                }
                None => self.counters.not_joined += 1,
            },
            ClientMessage::Ack { snapshot_tick } => match joined {
                Some((entity, route)) => {
                    self.counters.acks += 1;
                    let msg = CellMessage::Ack {
                        client,
                        entity,
                        tick: TickId(snapshot_tick),
                        hops: 0,
                        after: TickId(0),
                    };
                    sink.cells.push(to_cell(route, msg));
                }
                None => self.counters.not_joined += 1,
            },
            ClientMessage::Ping { client_time_us } => {
                self.counters.pings += 1;
                let pong = ServerMessage::Pong {
                    client_time_us,
                    server_tick: tick.0,
                };
                self.reply(sink, connection, &pong, Channel::Unreliable);
            }
            ClientMessage::Leave { .. } => {
                if let Some((entity, route)) = joined {
                    session.entity = None;
                    self.counters.leaves += 1;
                    sink.cells.push(leave(route, client, entity));
                }
                sink.outputs.push_back(NodeOutput::Disconnect {
                    connection,
                    code: disconnect::LEFT,
                });
            }
        }
    }

    /// A frame a cell computed for one of this shard's clients: it also
    /// tells where the avatar lives now, so the session's route follows.
    pub(crate) fn deliver_frame<G: GameLogic>(
        &mut self,
        sink: &mut SessionSink<'_, G>,
        out: ClientOutput,
    ) {
        let Some(&connection) = self.by_client.get(&out.client) else {
            self.counters.frames_for_gone_clients += 1;
            return;
        };
        let secret = self.secret;
        let Some(s) = self.sessions.get_mut(&connection) else {
            return;
        };
        if out.kind == ClientOutputKind::Refused {
            if let Some((cell, name, pos)) = s.fallback.take() {
                // The parked avatar was gone: the player joins afresh, and
                // never sees the refusal.
                let fresh_key = credential(secret, out.client);
                s.route = Some(cell);
                s.key = fresh_key;
                self.counters.reclaims_refused += 1;
                self.counters.joins += 1;
                tracing::info!(shard = %self.me, client = %out.client, %cell, "parked avatar gone: join afresh");
                sink.cells.push(to_cell(
                    cell,
                    CellMessage::Join {
                        client: out.client,
                        name,
                        pos,
                        resume_key: fresh_key,
                    },
                ));
                return;
            }
        }
        if out.tick.0 >= s.route_tick {
            // The cell that computed this owns the avatar now: inputs go there.
            s.route = Some(out.cell);
            s.route_tick = out.tick.0;
        }
        let mut welcome = false;
        let channel = match out.kind {
            ClientOutputKind::Welcome => {
                s.entity = Some(out.entity);
                s.fallback = None;
                self.counters.welcomes += 1;
                welcome = true;
                tracing::info!(shard = %self.me, client = %out.client, entity = %out.entity, cell = %out.cell, tick = out.tick.0, "welcome");
                Channel::Reliable
            }
            ClientOutputKind::Snapshot => {
                self.counters.snapshots_sent += 1;
                self.counters.snapshot_bytes += out.bytes.len() as u64;
                Channel::Snapshots
            }
            ClientOutputKind::Refused => {
                // The session may join afresh.
                s.join_requested = false;
                s.entity = None;
                s.route = None;
                self.counters.resumes_refused += 1;
                Channel::Reliable
            }
        };
        sink.outputs.push_back(NodeOutput::Client {
            connection,
            channel,
            bytes: out.bytes,
        });
        if welcome && !self.gateways.is_empty() {
            let msg = ServerMessage::Gateways {
                addresses: self.gateways.clone(),
                now: false,
            };
            self.reply(sink, connection, &msg, Channel::Reliable);
        }
    }
}

/// A resume credential under `secret`: a keyed hash of the client id,
/// never 0.
fn credential(secret: (u64, u64), client: ClientId) -> u64 {
    use std::hash::Hasher;
    let mut h = siphasher::sip::SipHasher13::new_with_keys(secret.0, secret.1);
    h.write_u64(client.0);
    h.finish().max(1)
}

fn to_cell<C, I>(cell: CellId, msg: CellMessage<C, I>) -> CellEnvelope<C, I> {
    CellEnvelope {
        to: cell,
        from: cell,
        msg,
    }
}

fn leave<C, I>(route: CellId, client: ClientId, entity: EntityId) -> CellEnvelope<C, I> {
    to_cell(
        route,
        CellMessage::Leave {
            client,
            entity,
            hops: 0,
            after: TickId(0),
        },
    )
}
