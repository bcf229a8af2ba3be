//! The gateway role of a shard: the client sessions whose handshake reached
//! this shard's socket (SO_REUSEPORT spreads clients over shards), for their
//! whole lifetime. A session forwards its client's inputs to the shard that
//! owns the avatar's cell and sends the client whatever that shard computes
//! for it; when the avatar moves to a cell owned elsewhere only the route
//! changes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use rustc_hash::FxHashMap;
use tessera_cells::demo::DemoGame;
use tessera_cells::messages::ClientOutputKind;
use tessera_cells::{
    CellEnvelope, CellId, CellMessage, ClientId, ClientOutput, EntityId, GameLogic, Layout, TickId,
};
use tessera_net::driver::BatchSocket;
use tessera_net::{ConnectionHandle, Endpoint, Event, TransmitBatch};
use tessera_schema::client::{self, ClientMessage};
use tessera_schema::flatbuffers::FlatBufferBuilder;
use tessera_schema::server::{self as srv, ErrorCode, ServerMessage};
use tessera_schema::FrameErrorCounts;

use crate::ids::ShardId;

use super::msg::CellMsg;
use super::protocol::{disconnect, CHANNEL_RELIABLE, CHANNEL_SNAPSHOTS, CHANNEL_UNRELIABLE};
use super::router::client_id;

/// What a gateway counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GatewayCounters {
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
    /// Frames the RUDP endpoint refused (queue full or closing).
    pub send_refused: u64,
    /// Frames for a client that is gone.
    pub frames_for_gone_clients: u64,
}

struct Session {
    client: ClientId,
    entity: Option<EntityId>,
    route: Option<CellId>,
    route_tick: u64,
    join_requested: bool,
}

/// The sessions of one shard and their RUDP endpoint and socket.
pub struct Gateway {
    shard: ShardId,
    endpoint: Endpoint,
    socket: BatchSocket,
    batch: TransmitBatch,
    sessions: FxHashMap<ConnectionHandle, Session>,
    by_client: FxHashMap<ClientId, ConnectionHandle>,
    serial: u64,
    layout: Arc<Layout>,
    game: DemoGame,
    fbb: FlatBufferBuilder<'static>,
    counters: GatewayCounters,
    refused: FrameErrorCounts,
    tick: u64,
    to_route: Vec<CellMsg>,
}

impl Gateway {
    /// A gateway over an endpoint (server role) and its bound socket.
    pub fn new(
        shard: ShardId,
        endpoint: Endpoint,
        socket: BatchSocket,
        layout: Arc<Layout>,
        game: DemoGame,
    ) -> Self {
        let batch = TransmitBatch::new(socket.batch_size());
        Self {
            shard,
            endpoint,
            socket,
            batch,
            sessions: FxHashMap::default(),
            by_client: FxHashMap::default(),
            serial: 0,
            layout,
            game,
            fbb: FlatBufferBuilder::with_capacity(256),
            counters: GatewayCounters::default(),
            refused: FrameErrorCounts::default(),
            tick: 0,
            to_route: Vec::new(),
        }
    }

    /// The socket (for a readiness waiter).
    pub fn socket(&self) -> &BatchSocket {
        &self.socket
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The counters.
    pub fn counters(&self) -> GatewayCounters {
        self.counters
    }

    /// Client frames refused, by reason.
    pub fn refused(&self) -> FrameErrorCounts {
        self.refused
    }

    /// Sessions hosted.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// The server tick (for pongs).
    pub fn set_tick(&mut self, tick: u64) {
        self.tick = tick;
    }

    /// Uses a new layout (after a split or merge).
    pub fn set_layout(&mut self, layout: Arc<Layout>) {
        self.layout = layout;
    }

    /// When the endpoint needs to run its timers.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        self.endpoint.poll_timeout()
    }

    /// Reads the socket until it is empty, runs due timers and handles every
    /// event. Returns the amount of work and whether the socket was drained;
    /// cell messages to route are appended to `out`.
    pub fn poll(&mut self, now: Instant, out: &mut Vec<CellMsg>) -> (usize, bool) {
        // Bounded: a flood cannot keep the shard from ticking.
        let (mut work, drained) = match self.socket.receive_into(&mut self.endpoint, now, 64) {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!(shard = %self.shard, error = %e, "socket receive failed");
                (0, true)
            }
        };
        while let Some(event) = self.endpoint.poll_event() {
            work += 1;
            self.handle_event(now, event);
        }
        out.append(&mut self.to_route);
        (work, drained)
    }

    fn handle_event(&mut self, now: Instant, event: Event) {
        match event {
            Event::Connected { connection, addr } => self.open(connection, addr),
            Event::Message {
                connection,
                channel: _,
                bytes,
            } => {
                self.handle_frame(now, connection, &bytes);
                self.endpoint.recycle(bytes);
            }
            Event::Disconnected { connection, reason } => {
                if let Some(s) = self.sessions.remove(&connection) {
                    self.by_client.remove(&s.client);
                    self.counters.sessions_closed += 1;
                    tracing::debug!(shard = %self.shard, client = %s.client, reason = ?reason, "session closed");
                    if let (Some(entity), Some(route)) = (s.entity, s.route) {
                        self.counters.leaves += 1;
                        self.route(
                            route,
                            CellMessage::Leave {
                                client: s.client,
                                entity,
                                hops: 0,
                            },
                        );
                    }
                }
            }
            Event::Acked { .. } => {}
        }
    }

    fn open(&mut self, connection: ConnectionHandle, addr: SocketAddr) {
        self.serial += 1;
        let client = client_id(self.shard, self.serial);
        self.sessions.insert(
            connection,
            Session {
                client,
                entity: None,
                route: None,
                route_tick: 0,
                join_requested: false,
            },
        );
        self.by_client.insert(client, connection);
        self.counters.sessions_opened += 1;
        tracing::debug!(shard = %self.shard, %client, %addr, "session opened");
    }

    fn route(
        &mut self,
        to: CellId,
        msg: CellMessage<tessera_cells::demo::DemoComponents, tessera_cells::demo::DemoIntent>,
    ) {
        self.to_route.push(CellEnvelope { to, from: to, msg });
    }

    fn reply(
        &mut self,
        connection: ConnectionHandle,
        msg: &ServerMessage,
        channel: tessera_net::ChannelId,
    ) {
        let bytes = srv::encode(&mut self.fbb, msg);
        if self.endpoint.send(connection, channel, bytes).is_err() {
            self.counters.send_refused += 1;
        }
    }

    fn error(&mut self, connection: ConnectionHandle, code: ErrorCode, message: &str) {
        self.reply(
            connection,
            &ServerMessage::Error {
                code,
                message: message.to_string(),
            },
            CHANNEL_RELIABLE,
        );
    }

    fn handle_frame(&mut self, now: Instant, connection: ConnectionHandle, bytes: &[u8]) {
        let msg = match client::decode(bytes) {
            Ok(m) => m,
            Err(e) => {
                self.refused.record(&e);
                self.counters.frames_refused += 1;
                tracing::debug!(shard = %self.shard, reason = e.reason(), error = %e, "client frame refused");
                return;
            }
        };
        let Some(session) = self.sessions.get_mut(&connection) else {
            return;
        };
        let client = session.client;
        match msg {
            ClientMessage::Join { name, .. } => {
                if session.join_requested {
                    self.counters.already_joined += 1;
                    self.error(connection, ErrorCode::AlreadyJoined, "already joined");
                    return;
                }
                let world = self.layout.geometry().world_rect();
                let pos = self.game.spawn_point(&name, client.0, world);
                let Some(cell) = self.layout.leaf_at(pos) else {
                    self.error(connection, ErrorCode::Unknown, "no cell at the spawn point");
                    return;
                };
                session.join_requested = true;
                session.route = Some(cell);
                self.counters.joins += 1;
                tracing::info!(shard = %self.shard, %client, %cell, name = %name, "join");
                self.route(cell, CellMessage::Join { client, name, pos });
            }
            ClientMessage::Input(input) => match (session.entity, session.route) {
                (Some(entity), Some(route)) => {
                    self.counters.inputs += 1;
                    self.route(
                        route,
                        CellMessage::Input {
                            client,
                            entity,
                            input,
                            hops: 0,
                            after: TickId(0),
                        },
                    );
                }
                _ => {
                    self.counters.not_joined += 1;
                }
            },
            ClientMessage::Ack { snapshot_tick } => match (session.entity, session.route) {
                (Some(entity), Some(route)) => {
                    self.counters.acks += 1;
                    self.route(
                        route,
                        CellMessage::Ack {
                            client,
                            entity,
                            tick: TickId(snapshot_tick),
                            hops: 0,
                            after: TickId(0),
                        },
                    );
                }
                _ => self.counters.not_joined += 1,
            },
            ClientMessage::Ping { client_time_us } => {
                self.counters.pings += 1;
                let pong = ServerMessage::Pong {
                    client_time_us,
                    server_tick: self.tick,
                };
                self.reply(connection, &pong, CHANNEL_UNRELIABLE);
            }
            ClientMessage::Leave { .. } => {
                if let (Some(entity), Some(route)) = (session.entity, session.route) {
                    session.entity = None;
                    self.counters.leaves += 1;
                    self.route(
                        route,
                        CellMessage::Leave {
                            client,
                            entity,
                            hops: 0,
                        },
                    );
                }
                let _ = self.endpoint.disconnect(now, connection, disconnect::LEFT);
            }
        }
    }

    /// A frame computed for one of this gateway's clients.
    pub fn to_client(&mut self, out: ClientOutput) {
        let Some(&connection) = self.by_client.get(&out.client) else {
            self.counters.frames_for_gone_clients += 1;
            return;
        };
        let Some(s) = self.sessions.get_mut(&connection) else {
            return;
        };
        if out.tick.0 >= s.route_tick {
            // The cell that computed this owns the avatar now: inputs go there.
            s.route = Some(out.cell);
            s.route_tick = out.tick.0;
        }
        let channel = match out.kind {
            ClientOutputKind::Welcome => {
                s.entity = Some(out.entity);
                self.counters.welcomes += 1;
                tracing::info!(shard = %self.shard, client = %out.client, entity = %out.entity, cell = %out.cell, tick = out.tick.0, "welcome");
                CHANNEL_RELIABLE
            }
            ClientOutputKind::Snapshot => {
                self.counters.snapshots_sent += 1;
                self.counters.snapshot_bytes += out.bytes.len() as u64;
                CHANNEL_SNAPSHOTS
            }
        };
        if self.endpoint.send(connection, channel, &out.bytes).is_err() {
            self.counters.send_refused += 1;
        }
    }

    /// Hands every waiting datagram to the kernel. Returns how many.
    pub fn flush(&mut self, now: Instant) -> usize {
        let sent = self
            .socket
            .transmit_from(&mut self.endpoint, &mut self.batch, now)
            .unwrap_or_else(|e| {
                tracing::warn!(shard = %self.shard, error = %e, "socket send failed");
                0
            });
        let _ = self.socket.flush_conditioner(now);
        sent
    }

    /// Shutdown: every session gets a disconnect saying the server stops.
    pub fn disconnect_all(&mut self, now: Instant) {
        self.endpoint.disconnect_all(now, disconnect::SHUTTING_DOWN);
        self.flush(now);
    }
}
