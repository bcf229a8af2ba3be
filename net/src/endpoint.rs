//! The endpoint: many connections behind one socket, in either role.
//!
//! Call order, once per loop turn (quinn-proto style):
//! 1. [`Endpoint::handle_datagram`] for every datagram read;
//! 2. [`Endpoint::handle_timeout`] when [`Endpoint::poll_timeout`] has passed;
//! 3. drain [`Endpoint::poll_event`]; call [`Endpoint::send`] as needed;
//! 4. drain [`Endpoint::poll_transmit`] into the socket until it adds less
//!    than the batch's free room.
//!
//! Costs: timers live in a binary heap keyed by deadline (stale entries are
//! skipped lazily), so `poll_timeout` and `handle_timeout` never walk all
//! connections; `poll_transmit` visits only connections on the dirty list.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

use crate::config::{ChannelId, Config, ConfigError, Limits};
use crate::connection::{Connection, ConnectionStats, Context, Received};
use crate::cookie::{CookieError, CookieJar};
use crate::pool::BufferPool;
use crate::rng::Rng;
use crate::types::{
    ConnectError, ConnectionHandle, DisconnectReason, Event, MessageId, RejectReason, SendError,
    UnknownConnection,
};
use crate::wire::{
    self, Challenge, ConnectRequest, ConnectResponse, DecodeError, Header, PacketType,
    HANDSHAKE_MIN_LEN,
};

/// Endpoint-wide counters. Every datagram that is dropped is counted under
/// exactly one `dropped_*` reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointStats {
    /// Datagrams passed to `handle_datagram`.
    pub datagrams_received: u64,
    /// Their bytes.
    pub bytes_received: u64,
    /// Datagrams handed out by `poll_transmit`.
    pub datagrams_sent: u64,
    /// Their bytes.
    pub bytes_sent: u64,
    /// Too short, wrong protocol id, unknown packet type or reserved bits.
    pub dropped_bad_header: u64,
    /// Another protocol version.
    pub dropped_bad_version: u64,
    /// A handshake or control body that is too short or invalid.
    pub dropped_bad_body: u64,
    /// A malformed frame (the whole packet is dropped).
    pub dropped_bad_frame: u64,
    /// A frame for a channel that does not exist.
    pub dropped_unknown_channel: u64,
    /// A message larger than `message_bytes_max`.
    pub dropped_oversized: u64,
    /// No connection has this id.
    pub dropped_unknown_connection: u64,
    /// The id exists but the datagram came from another address.
    pub dropped_address_mismatch: u64,
    /// A packet the connection's state does not expect.
    pub dropped_unexpected: u64,
    /// A packet received before.
    pub dropped_duplicate: u64,
    /// A packet older than the duplicate-suppression window.
    pub dropped_too_old: u64,
    /// Refused for the receive window or a receive-buffer bound (the peer
    /// retransmits).
    pub dropped_receive_window: u64,
    /// Refused because `events_max` events are waiting.
    pub dropped_event_queue_full: u64,
    /// A handshake packet while `accept_incoming` is off.
    pub dropped_not_accepting: u64,
    /// A handshake request shorter than [`HANDSHAKE_MIN_LEN`].
    pub dropped_short_handshake: u64,
    /// A cookie that does not verify.
    pub dropped_bad_cookie: u64,
    /// A cookie from an expired period.
    pub dropped_expired_cookie: u64,
    /// A stateless reply dropped because `control_queue_max` are waiting.
    pub dropped_control_queue_full: u64,
    /// Challenges sent.
    pub challenges_sent: u64,
    /// Handshakes refused because of the connection cap.
    pub rejected_full: u64,
    /// Handshakes refused because the configurations differ.
    pub rejected_incompatible: u64,
    /// Connections created by accepting a handshake.
    pub connections_accepted: u64,
    /// Client connections that finished their handshake.
    pub connections_opened: u64,
    /// Connections gone (any reason).
    pub connections_closed: u64,
    /// Handshakes whose connect token is malformed or does not open under
    /// any key (forged, damaged, or sealed under a retired key): dropped
    /// without a reply.
    pub dropped_bad_token: u64,
    /// Handshakes refused: the token expired.
    pub rejected_token_expired: u64,
    /// Handshakes refused: the token does not name this server's address.
    pub rejected_token_wrong_address: u64,
    /// Handshakes refused: a live session uses the token's player from
    /// another address.
    pub rejected_token_in_use: u64,
    /// Handshakes refused: this endpoint requires a token and none came.
    pub rejected_token_required: u64,
    /// Sealed packets that did not open (forged, damaged, replayed from
    /// another session): dropped before anything read them.
    pub dropped_bad_seal: u64,
    /// Packets whose sealing does not match their session (clear text on a
    /// sealed session, or sealed on a clear one).
    pub dropped_unsealed: u64,
    /// Data packets over their peer's receive limit ([`crate::PeerLimit`]).
    pub dropped_rate_limited: u64,
    /// Connections closed for staying far over their receive limit.
    pub closed_for_abuse: u64,
    /// Handshake packets over their source address's rate
    /// ([`crate::AddressLimit`]): dropped without a reply.
    pub dropped_handshake_rate_limited: u64,
    /// Handshakes refused: their source address holds `sessions_max`
    /// sessions already.
    pub rejected_address_sessions: u64,
}

/// What a server demands of a connecting client: a connect token sealed
/// under one of `keys`, not expired, naming one of `addresses`.
#[derive(Clone, Debug)]
pub struct TokenPolicy {
    /// The current key first, then the previous one (rotation).
    pub keys: Vec<crate::token::TokenKey>,
    /// The addresses clients reach this server at (a token must name one).
    pub addresses: Vec<SocketAddr>,
    /// Wall-clock anchor: the Unix time in milliseconds at an instant. The
    /// endpoint never reads the clock; tokens expire in Unix time.
    pub clock: (Instant, u64),
}

impl TokenPolicy {
    fn unix_s(&self, now: Instant) -> u64 {
        let (at, unix_ms) = self.clock;
        let since = now.saturating_duration_since(at).as_millis() as u64;
        unix_ms.saturating_add(since) / 1000
    }
}

/// Sizes of the endpoint's tables: what outside input can make grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Footprint {
    /// Live connections.
    pub connections: usize,
    /// Entries of the connection-id map.
    pub ids: usize,
    /// Entries of the (address, client id) map.
    pub peers: usize,
    /// Timer heap entries (live and stale).
    pub timers: usize,
    /// Connections waiting to transmit.
    pub dirty: usize,
    /// Stateless replies waiting to be sent.
    pub control_queue: usize,
    /// Events waiting.
    pub events: usize,
    /// Bytes in receive buffers, all connections.
    pub receive_buffer_bytes: usize,
    /// Buffers in the reuse pool.
    pub pooled_buffers: usize,
    /// Source addresses holding live sessions (with an address limit).
    pub source_addresses: usize,
}

/// Datagrams produced by `poll_transmit`, in one reusable buffer.
#[derive(Debug, Clone)]
pub struct TransmitBatch {
    buffer: Vec<u8>,
    datagrams: Vec<(SocketAddr, usize, usize)>,
    capacity: usize,
}

/// One datagram of a [`TransmitBatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit<'a> {
    /// Where to send it.
    pub destination: SocketAddr,
    /// The UDP payload.
    pub payload: &'a [u8],
}

impl TransmitBatch {
    /// A batch holding at most `capacity` datagrams (e.g. the sendmmsg
    /// batch size).
    pub fn new(capacity: usize) -> Self {
        Self {
            buffer: Vec::new(),
            datagrams: Vec::with_capacity(capacity.max(1)),
            capacity: capacity.max(1),
        }
    }

    /// Datagrams in the batch.
    pub fn len(&self) -> usize {
        self.datagrams.len()
    }

    /// No datagram.
    pub fn is_empty(&self) -> bool {
        self.datagrams.is_empty()
    }

    /// No room for another datagram.
    pub fn is_full(&self) -> bool {
        self.datagrams.len() >= self.capacity
    }

    /// Most datagrams the batch holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Empties the batch, keeping its memory.
    pub fn clear(&mut self) {
        self.buffer.clear();
        self.datagrams.clear();
    }

    /// Datagram `i`.
    pub fn get(&self, i: usize) -> Option<Transmit<'_>> {
        let &(destination, start, len) = self.datagrams.get(i)?;
        Some(Transmit {
            destination,
            payload: &self.buffer[start..start + len],
        })
    }

    /// Every datagram in order.
    pub fn iter(&self) -> impl Iterator<Item = Transmit<'_>> + '_ {
        (0..self.len()).filter_map(|i| self.get(i))
    }

    /// Adds a datagram (for tests and tools that inject raw bytes).
    pub fn push(&mut self, destination: SocketAddr, payload: &[u8]) -> bool {
        if self.is_full() {
            return false;
        }
        let start = self.buffer.len();
        self.buffer.extend_from_slice(payload);
        self.datagrams.push((destination, start, payload.len()));
        true
    }
}

/// A stateless reply to a handshake packet.
#[derive(Debug, Clone, Copy)]
enum Control {
    Challenge {
        client_id: u32,
        period: u32,
        cookie: [u8; wire::COOKIE_LEN],
    },
    Reject {
        client_id: u32,
        reason: RejectReason,
    },
}

#[derive(Debug, Default)]
struct Slot {
    generation: u32,
    connection: Option<Box<Connection>>,
    /// The deadline registered in the heap.
    deadline: Option<Instant>,
    dirty: bool,
    /// The connection counts against its source address's sessions.
    address_counted: bool,
}

/// A set of connections over one socket; see the module docs for the call
/// order.
#[derive(Debug)]
pub struct Endpoint {
    config: Config,
    limits: Limits,
    config_hash: u32,
    rng: Rng,
    cookies: CookieJar,
    slots: Vec<Slot>,
    free_slots: Vec<u32>,
    live: usize,
    by_id: HashMap<u32, u32>,
    by_peer: HashMap<(SocketAddr, u32), u32>,
    timers: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    due_scratch: Vec<(Instant, u32, u32)>,
    dirty: VecDeque<u32>,
    events: VecDeque<Event>,
    control: VecDeque<(SocketAddr, Control)>,
    pool: BufferPool,
    receive_bytes: usize,
    stats: EndpointStats,
    /// Set: every client needs a connect token, and sessions are sealed.
    tokens: Option<TokenPolicy>,
    /// Token client id -> the session using it (one address per player).
    by_token: HashMap<u64, u32>,
    /// Where a sealed packet's body is opened.
    plain: Vec<u8>,
    /// Per source address accounting, with `config.address_limit`.
    addresses: Option<crate::address::AddressTable>,
    /// Shared with the server's other endpoints, and this one's id there.
    gate: Option<(std::sync::Arc<crate::token::PlayerGate>, u32)>,
}

impl Endpoint {
    /// An endpoint whose every random choice (connection ids, cookie
    /// secrets) comes from `seed`.
    pub fn new(config: Config, seed: u64) -> Result<Self, ConfigError> {
        config.validate()?;
        let mut rng = Rng::from_seed(seed);
        let cookies = CookieJar::new(config.cookie_rotation, &mut rng);
        // A stream of its own: the endpoint's other draws stay as they were.
        let addresses = config
            .address_limit
            .map(|_| crate::address::AddressTable::new(&mut Rng::from_seed(seed ^ 0xADD7_E55E5)));
        Ok(Self {
            limits: config.limits(),
            config_hash: config.protocol_hash(),
            pool: BufferPool::new(config.buffer_pool_max),
            config,
            rng,
            cookies,
            slots: Vec::new(),
            free_slots: Vec::new(),
            live: 0,
            by_id: HashMap::new(),
            by_peer: HashMap::new(),
            timers: BinaryHeap::new(),
            due_scratch: Vec::new(),
            dirty: VecDeque::new(),
            events: VecDeque::new(),
            control: VecDeque::new(),
            receive_bytes: 0,
            stats: EndpointStats::default(),
            tokens: None,
            by_token: HashMap::new(),
            plain: Vec::new(),
            addresses,
            gate: None,
        })
    }

    /// From now on every client needs a connect token under `policy`, and
    /// every session is sealed. Fails if the configuration keeps no room
    /// for the tag.
    pub fn require_tokens(&mut self, policy: TokenPolicy) -> Result<(), ConfigError> {
        if self.config.trailer_reserved_bytes < crate::crypto::TAG_LEN {
            return Err(ConfigError::TrailerTooSmall(
                self.config.trailer_reserved_bytes,
            ));
        }
        self.tokens = Some(policy);
        Ok(())
    }

    /// Shares the one-session-per-player rule with the other endpoints of
    /// the server holding `gate` (each with its own `id`): a token's
    /// player in a session on any of them is refused with `TokenInUse`.
    pub fn share_players(&mut self, gate: std::sync::Arc<crate::token::PlayerGate>, id: u32) {
        self.gate = Some((gate, id));
    }

    /// Moves the wall-clock anchor of the token policy (a driver re-reads
    /// the clock now and then). No effect without a policy.
    pub fn set_clock(&mut self, now: Instant, unix_ms: u64) {
        if let Some(p) = &mut self.tokens {
            p.clock = (now, unix_ms);
        }
    }

    /// What the token of a server-side session said (player id, user
    /// data); None for a session opened without one.
    pub fn token_claims(&self, connection: ConnectionHandle) -> Option<&crate::token::TokenClaims> {
        let index = self.resolve(connection)?;
        self.slots[index as usize]
            .connection
            .as_deref()?
            .claims
            .as_deref()
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    // ----- connections -----

    /// Starts a handshake with `addr`. Messages may be sent on the handle at
    /// once; they go out after [`Event::Connected`].
    pub fn connect(
        &mut self,
        now: Instant,
        addr: SocketAddr,
    ) -> Result<ConnectionHandle, ConnectError> {
        if self.live >= self.config.connections_max {
            return Err(ConnectError::TooManyConnections);
        }
        let local_id = self.fresh_id();
        let connection = Connection::new(local_id, 0, addr, now, true, &self.config);
        let handle = self.insert(connection);
        self.by_id.insert(local_id, handle.index);
        self.refresh(handle.index, true);
        Ok(handle)
    }

    /// Starts a handshake with `addr` presenting `token`; the session is
    /// sealed with the token's keys.
    pub fn connect_with_token(
        &mut self,
        now: Instant,
        addr: SocketAddr,
        token: &crate::token::ConnectToken,
    ) -> Result<ConnectionHandle, ConnectError> {
        if self.config.trailer_reserved_bytes < crate::crypto::TAG_LEN
            || self.config.mtu
                < wire::HEADER_LEN + wire::ConnectResponse::LEN + crate::token::SEALED_TOKEN_LEN
        {
            return Err(ConnectError::NoRoomForToken);
        }
        let handle = self.connect(now, addr)?;
        self.with_connection(handle.index, |c, _| {
            c.crypto = Some(Box::new(crate::crypto::PacketCrypto::client(&token.keys)));
            c.token = Some(token.sealed.clone());
        });
        Ok(handle)
    }

    /// Queues a message. Fails without queueing when the channel's queue is
    /// at its bound (backpressure), the message is too large, or the
    /// connection is unknown or closing.
    pub fn send(
        &mut self,
        connection: ConnectionHandle,
        channel: ChannelId,
        bytes: &[u8],
    ) -> Result<MessageId, SendError> {
        let index = self
            .resolve(connection)
            .ok_or(SendError::UnknownConnection)?;
        let id = self
            .with_connection(index, |c, cx| c.send(channel.0, bytes, cx))
            .ok_or(SendError::UnknownConnection)??;
        self.refresh(index, true);
        Ok(MessageId(id))
    }

    /// Closes a connection gracefully with `code` (the peer sees
    /// [`DisconnectReason::Remote`]). Emits [`Event::Disconnected`] with
    /// [`DisconnectReason::Local`] at once; the handle is invalid from now on.
    pub fn disconnect(
        &mut self,
        now: Instant,
        connection: ConnectionHandle,
        code: u16,
    ) -> Result<(), UnknownConnection> {
        let index = self.resolve(connection).ok_or(UnknownConnection)?;
        let closing = self
            .with_connection(index, |c, cx| {
                if !c.is_connected() && !c.is_connecting() {
                    return false;
                }
                c.close(now, code, cx);
                true
            })
            .unwrap_or(false);
        if !closing {
            return Err(UnknownConnection);
        }
        self.events.push_back(Event::Disconnected {
            connection,
            reason: DisconnectReason::Local(code),
        });
        self.stats.connections_closed += 1;
        self.refresh(index, true);
        Ok(())
    }

    /// Closes every connection with `code` (shutdown).
    pub fn disconnect_all(&mut self, now: Instant, code: u16) {
        for index in 0..self.slots.len() as u32 {
            let slot = &self.slots[index as usize];
            if slot.connection.is_some() {
                let handle = ConnectionHandle {
                    index,
                    generation: slot.generation,
                };
                let _ = self.disconnect(now, handle, code);
            }
        }
    }

    /// Gives a buffer (e.g. from [`Event::Message`]) back for reuse.
    pub fn recycle(&mut self, buffer: Vec<u8>) {
        self.pool.put(buffer);
    }

    // ----- inputs -----

    /// Feeds one datagram received from `from`. Bad input is dropped and
    /// counted in [`EndpointStats`], never a panic.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        self.stats.datagrams_received += 1;
        self.stats.bytes_received += bytes.len() as u64;
        let (header, body) = match wire::decode_header(bytes) {
            Ok(decoded) => decoded,
            Err(error) => {
                self.count_decode_error(error);
                return;
            }
        };
        match header.packet_type {
            PacketType::ConnectRequest | PacketType::ConnectResponse => {
                self.on_handshake(now, from, &header, body, bytes.len())
            }
            _ => self.on_connection_packet(now, from, &header, bytes, body),
        }
    }

    /// Runs every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        // Take the due entries first: a connection whose new deadline is
        // still due waits for the next call instead of spinning here.
        let mut due = std::mem::take(&mut self.due_scratch);
        while let Some(&Reverse(entry)) = self.timers.peek() {
            if entry.0 > now {
                break;
            }
            self.timers.pop();
            due.push(entry);
        }
        for &(deadline, index, generation) in &due {
            let slot = &mut self.slots[index as usize];
            if slot.generation != generation || slot.deadline != Some(deadline) {
                continue;
            }
            slot.deadline = None;
            let handle = ConnectionHandle { index, generation };
            if let Some(Some(reason)) =
                self.with_connection(index, |c, cx| c.handle_timeout(now, cx))
            {
                tracing::debug!(connection = ?handle, ?reason, "connection closed by a timer");
                self.events.push_back(Event::Disconnected {
                    connection: handle,
                    reason,
                });
                self.stats.connections_closed += 1;
            }
            self.refresh(index, true);
        }
        due.clear();
        self.due_scratch = due;
    }

    // ----- outputs -----

    /// The next instant [`Endpoint::handle_timeout`] has work, if any.
    #[must_use]
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        while let Some(&Reverse((deadline, index, generation))) = self.timers.peek() {
            let slot = &self.slots[index as usize];
            if slot.generation == generation && slot.deadline == Some(deadline) {
                return Some(deadline);
            }
            self.timers.pop();
        }
        None
    }

    /// The next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Appends datagrams to `batch` until it is full or nothing is left to
    /// send; returns how many were added. Visits only connections that have
    /// something to send; one connection adds at most
    /// `transmit_burst_packets` before the others get a turn.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant, batch: &mut TransmitBatch) -> usize {
        let mut added = 0;
        while !batch.is_full() {
            let Some((destination, control)) = self.control.pop_front() else {
                break;
            };
            let start = batch.buffer.len();
            encode_control(control, &mut batch.buffer);
            added += self.push_datagram(batch, destination, start);
        }
        while !batch.is_full() {
            let Some(index) = self.dirty.pop_front() else {
                break;
            };
            let slot = &mut self.slots[index as usize];
            slot.dirty = false;
            let Some(destination) = slot.connection.as_ref().map(|c| c.addr) else {
                continue;
            };
            let mut produced = 0;
            while produced < self.config.transmit_burst_packets && !batch.is_full() {
                let start = batch.buffer.len();
                let wrote = self
                    .with_connection(index, |c, cx| c.poll_transmit(now, &mut batch.buffer, cx))
                    .unwrap_or(false);
                if !wrote {
                    break;
                }
                produced += 1;
                added += self.push_datagram(batch, destination, start);
            }
            // A connection that produced nothing is not requeued here: this
            // bounds the loop even if `wants_transmit` was optimistic.
            self.refresh(index, produced > 0);
        }
        added
    }

    fn push_datagram(
        &mut self,
        batch: &mut TransmitBatch,
        destination: SocketAddr,
        start: usize,
    ) -> usize {
        let len = batch.buffer.len() - start;
        batch.datagrams.push((destination, start, len));
        self.stats.datagrams_sent += 1;
        self.stats.bytes_sent += len as u64;
        1
    }

    // ----- introspection -----

    /// Endpoint counters.
    pub fn stats(&self) -> &EndpointStats {
        &self.stats
    }

    /// Statistics of one connection.
    pub fn connection_stats(&self, connection: ConnectionHandle) -> Option<ConnectionStats> {
        let index = self.resolve(connection)?;
        self.slots[index as usize]
            .connection
            .as_ref()
            .map(|c| c.stats())
    }

    /// The peer's address.
    pub fn remote_address(&self, connection: ConnectionHandle) -> Option<SocketAddr> {
        let index = self.resolve(connection)?;
        self.slots[index as usize]
            .connection
            .as_ref()
            .map(|c| c.addr)
    }

    /// True once the handshake finished and until the connection closes.
    pub fn is_connected(&self, connection: ConnectionHandle) -> bool {
        self.resolve(connection)
            .and_then(|i| self.slots[i as usize].connection.as_ref())
            .is_some_and(|c| c.is_connected())
    }

    /// Live connections (any state).
    pub fn connection_count(&self) -> usize {
        self.live
    }

    /// Handles of every live connection, in slot order.
    pub fn connections(&self) -> impl Iterator<Item = ConnectionHandle> + '_ {
        self.slots.iter().enumerate().filter_map(|(i, s)| {
            s.connection.as_ref().map(|_| ConnectionHandle {
                index: i as u32,
                generation: s.generation,
            })
        })
    }

    /// Sizes of the tables that outside input can make grow.
    pub fn footprint(&self) -> Footprint {
        Footprint {
            connections: self.live,
            ids: self.by_id.len(),
            peers: self.by_peer.len(),
            timers: self.timers.len(),
            dirty: self.dirty.len(),
            control_queue: self.control.len(),
            events: self.events.len(),
            receive_buffer_bytes: self.receive_bytes,
            pooled_buffers: self.pool.len(),
            source_addresses: self.addresses.as_ref().map_or(0, |t| t.addresses()),
        }
    }

    // ----- internals -----

    fn resolve(&self, handle: ConnectionHandle) -> Option<u32> {
        let slot = self.slots.get(handle.index as usize)?;
        (slot.generation == handle.generation && slot.connection.is_some()).then_some(handle.index)
    }

    fn with_connection<R>(
        &mut self,
        index: u32,
        f: impl FnOnce(&mut Connection, &mut Context<'_>) -> R,
    ) -> Option<R> {
        let slot = &mut self.slots[index as usize];
        let handle = ConnectionHandle {
            index,
            generation: slot.generation,
        };
        let connection = slot.connection.as_deref_mut()?;
        let mut cx = Context {
            config: &self.config,
            limits: &self.limits,
            handle,
            events: &mut self.events,
            pool: &mut self.pool,
            endpoint_receive_bytes: &mut self.receive_bytes,
        };
        Some(f(connection, &mut cx))
    }

    fn fresh_id(&mut self) -> u32 {
        loop {
            let id = self.rng.next_u32();
            if id != 0 && !self.by_id.contains_key(&id) {
                return id;
            }
        }
    }

    fn insert(&mut self, connection: Connection) -> ConnectionHandle {
        let index = match self.free_slots.pop() {
            Some(index) => index,
            None => {
                self.slots.push(Slot::default());
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        slot.connection = Some(Box::new(connection));
        slot.deadline = None;
        self.live += 1;
        ConnectionHandle {
            index,
            generation: slot.generation,
        }
    }

    /// Re-registers the connection's deadline and dirty state after anything
    /// touched it; frees it once closed.
    fn refresh(&mut self, index: u32, may_queue: bool) {
        let slot = &mut self.slots[index as usize];
        let Some(connection) = slot.connection.as_deref() else {
            return;
        };
        if connection.is_closed() {
            self.free(index);
            return;
        }
        let deadline = connection.next_deadline(&self.config);
        let mut pushed = false;
        if deadline != slot.deadline {
            slot.deadline = deadline;
            if let Some(deadline) = deadline {
                self.timers
                    .push(Reverse((deadline, index, slot.generation)));
                pushed = true;
            }
        }
        if may_queue && !slot.dirty && connection.wants_transmit(&self.config) {
            slot.dirty = true;
            self.dirty.push_back(index);
        }
        // Bounded at all times, not only when a timer fires: busy
        // connections re-register on every packet. Amortized O(1).
        if pushed && self.timers.len() > 4 * self.live + 64 {
            self.compact_timers();
        }
    }

    fn free(&mut self, index: u32) {
        let Some(mut connection) = self.slots[index as usize].connection.take() else {
            return;
        };
        let mut cx = Context {
            config: &self.config,
            limits: &self.limits,
            handle: ConnectionHandle {
                index,
                generation: self.slots[index as usize].generation,
            },
            events: &mut self.events,
            pool: &mut self.pool,
            endpoint_receive_bytes: &mut self.receive_bytes,
        };
        connection.release(&mut cx);
        if self.by_id.get(&connection.local_id) == Some(&index) {
            self.by_id.remove(&connection.local_id);
        }
        let peer = (connection.addr, connection.peer_id);
        if self.by_peer.get(&peer) == Some(&index) {
            self.by_peer.remove(&peer);
        }
        if let Some(claims) = &connection.claims {
            if self.by_token.get(&claims.client_id) == Some(&index) {
                self.by_token.remove(&claims.client_id);
            }
            if let Some((gate, id)) = &self.gate {
                gate.exit(claims.client_id, *id, connection.local_id);
            }
        }
        let slot = &mut self.slots[index as usize];
        if std::mem::take(&mut slot.address_counted) {
            if let Some(table) = &mut self.addresses {
                table.session_closed(connection.addr.ip());
            }
        }
        slot.generation = slot.generation.wrapping_add(1);
        slot.deadline = None;
        self.free_slots.push(index);
        self.live -= 1;
    }

    fn compact_timers(&mut self) {
        let entries: Vec<_> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.deadline.map(|d| Reverse((d, i as u32, s.generation))))
            .collect();
        self.timers = BinaryHeap::from(entries);
    }

    fn count_decode_error(&mut self, error: DecodeError) {
        let s = &mut self.stats;
        match error {
            DecodeError::TooShort(_)
            | DecodeError::BadProtocolId(_)
            | DecodeError::UnknownPacketType(_)
            | DecodeError::ReservedBits => s.dropped_bad_header += 1,
            DecodeError::UnsupportedVersion(_) => s.dropped_bad_version += 1,
            DecodeError::TruncatedBody | DecodeError::TrailingBody(_) => s.dropped_bad_body += 1,
            DecodeError::UnknownFrameType(_)
            | DecodeError::TruncatedFrame
            | DecodeError::BadFragment => s.dropped_bad_frame += 1,
        }
    }

    fn queue_control(&mut self, to: SocketAddr, control: Control) {
        if self.control.len() >= self.config.control_queue_max {
            self.stats.dropped_control_queue_full += 1;
            return;
        }
        self.control.push_back((to, control));
    }

    /// Server side of the handshake. Stateless until a valid cookie comes
    /// back: a request only costs one MAC and one queued reply.
    fn on_handshake(
        &mut self,
        now: Instant,
        from: SocketAddr,
        header: &Header,
        body: &[u8],
        len: usize,
    ) {
        if !self.config.accept_incoming {
            self.stats.dropped_not_accepting += 1;
            return;
        }
        // Replies are far shorter than this: no amplification.
        if len < HANDSHAKE_MIN_LEN {
            self.stats.dropped_short_handshake += 1;
            return;
        }
        if header.sealed {
            self.stats.dropped_unsealed += 1;
            return;
        }
        // Before any MAC or AEAD work: a flooding host spends its own
        // budget only.
        if let (Some(limit), Some(table)) = (&self.config.address_limit, &mut self.addresses) {
            if !table.spend_handshake(limit, from.ip(), now) {
                self.stats.dropped_handshake_rate_limited += 1;
                return;
            }
        }
        let (config_hash, client_id, cookie, fixed) =
            if header.packet_type == PacketType::ConnectRequest {
                match ConnectRequest::decode(body) {
                    Ok(r) => (r.config_hash, r.client_id, None, ConnectRequest::LEN),
                    Err(error) => return self.count_decode_error(error),
                }
            } else {
                match ConnectResponse::decode(body) {
                    Ok(r) => (
                        r.config_hash,
                        r.client_id,
                        Some((r.period, r.cookie)),
                        ConnectResponse::LEN,
                    ),
                    Err(error) => return self.count_decode_error(error),
                }
            };
        if client_id == 0 {
            self.stats.dropped_bad_body += 1;
            return;
        }
        if config_hash != self.config_hash {
            self.stats.rejected_incompatible += 1;
            let reason = RejectReason::IncompatibleConfig;
            return self.queue_control(from, Control::Reject { client_id, reason });
        }
        // With a token policy, nothing happens for a client without a
        // valid token: one AEAD open per request, no state. A response's
        // cookie (cheaper) is checked before its token.
        let token = &body[fixed.min(body.len())..];
        let Some((period, cookie)) = cookie else {
            if self.check_token(now, from, client_id, token).is_err() {
                return;
            }
            if self.live >= self.config.connections_max {
                self.stats.rejected_full += 1;
                let reason = RejectReason::ServerFull;
                return self.queue_control(from, Control::Reject { client_id, reason });
            }
            if self.address_full(from) {
                return self.reject_address_full(from, client_id);
            }
            let (period, cookie) = self.cookies.mint(now, &mut self.rng, from, client_id);
            self.stats.challenges_sent += 1;
            return self.queue_control(
                from,
                Control::Challenge {
                    client_id,
                    period,
                    cookie,
                },
            );
        };
        match self
            .cookies
            .verify(now, &mut self.rng, from, client_id, period, &cookie)
        {
            Ok(()) => {}
            Err(CookieError::Expired) => {
                self.stats.dropped_expired_cookie += 1;
                return;
            }
            Err(CookieError::Invalid) => {
                self.stats.dropped_bad_cookie += 1;
                return;
            }
        }
        let Ok(claims) = self.check_token(now, from, client_id, token) else {
            return;
        };
        if let Some(&index) = self.by_peer.get(&(from, client_id)) {
            // The client did not hear our Accept: say it again.
            if let Some(connection) = self.slots[index as usize].connection.as_deref_mut() {
                if connection.is_connected() {
                    connection.accept_pending = true;
                }
            }
            self.refresh(index, true);
            return;
        }
        if self.live >= self.config.connections_max {
            self.stats.rejected_full += 1;
            let reason = RejectReason::ServerFull;
            return self.queue_control(from, Control::Reject { client_id, reason });
        }
        if self.address_full(from) {
            return self.reject_address_full(from, client_id);
        }
        if let Some(c) = &claims {
            let other = self.by_token.get(&c.client_id).and_then(|i| {
                self.slots[*i as usize]
                    .connection
                    .as_deref()
                    .map(|x| x.addr)
            });
            let elsewhere = self
                .gate
                .as_ref()
                .is_some_and(|(g, id)| g.held_elsewhere(c.client_id, *id));
            if other.is_some_and(|addr| addr != from) || elsewhere {
                // One player, one address: a stolen token cannot take over
                // (the player's own reconnect waits for the old session to
                // time out, or comes from the same address).
                self.stats.rejected_token_in_use += 1;
                let reason = RejectReason::TokenInUse;
                return self.queue_control(from, Control::Reject { client_id, reason });
            }
        }
        let server_id = self.fresh_id();
        let mut connection = Connection::new(server_id, client_id, from, now, false, &self.config);
        if let Some(c) = claims {
            connection.crypto = Some(Box::new(crate::crypto::PacketCrypto::server(&c.keys)));
            connection.claims = Some(Box::new(c));
        }
        let handle = self.insert(connection);
        if let Some(c) = &self.slots[handle.index as usize]
            .connection
            .as_deref()
            .and_then(|x| x.claims.as_deref())
        {
            self.by_token.insert(c.client_id, handle.index);
            if let Some((gate, id)) = &self.gate {
                gate.enter(c.client_id, *id, server_id);
            }
        }
        self.by_id.insert(server_id, handle.index);
        self.by_peer.insert((from, client_id), handle.index);
        if let Some(table) = &mut self.addresses {
            table.session_opened(from.ip());
            self.slots[handle.index as usize].address_counted = true;
        }
        self.stats.connections_accepted += 1;
        tracing::debug!(connection = ?handle, %from, "connection accepted");
        self.events.push_back(Event::Connected {
            connection: handle,
            addr: from,
        });
        self.refresh(handle.index, true);
    }

    /// True when `from`'s host holds `sessions_max` live sessions already.
    fn address_full(&self, from: SocketAddr) -> bool {
        match (&self.config.address_limit, &self.addresses) {
            (Some(limit), Some(table)) => table.sessions(from.ip()) >= limit.sessions_max,
            _ => false,
        }
    }

    fn reject_address_full(&mut self, from: SocketAddr, client_id: u32) {
        self.stats.rejected_address_sessions += 1;
        let reason = RejectReason::TooManySessions;
        self.queue_control(from, Control::Reject { client_id, reason });
    }

    /// The token a handshake packet carries, checked against the policy:
    /// Ok(None) without a policy; Err after counting (and, where the client
    /// can act on it, queueing a reject).
    fn check_token(
        &mut self,
        now: Instant,
        from: SocketAddr,
        client_id: u32,
        token: &[u8],
    ) -> Result<Option<crate::token::TokenClaims>, ()> {
        use crate::token::{TokenError, SEALED_TOKEN_LEN};
        let Some(policy) = &self.tokens else {
            return Ok(None);
        };
        if token.len() < SEALED_TOKEN_LEN || token[0] == 0 {
            self.stats.rejected_token_required += 1;
            let reason = RejectReason::TokenRequired;
            self.queue_control(from, Control::Reject { client_id, reason });
            return Err(());
        }
        let sealed = &token[..SEALED_TOKEN_LEN];
        let reason = match crate::token::open_sealed(sealed, &policy.keys, policy.unix_s(now)) {
            Ok(claims) if claims.servers.iter().any(|a| policy.addresses.contains(a)) => {
                return Ok(Some(claims));
            }
            Ok(_) | Err(TokenError::WrongAddress) => {
                self.stats.rejected_token_wrong_address += 1;
                RejectReason::TokenWrongAddress
            }
            Err(TokenError::Expired) => {
                self.stats.rejected_token_expired += 1;
                RejectReason::TokenExpired
            }
            Err(_) => {
                // A forgery learns nothing, not even that it was read.
                self.stats.dropped_bad_token += 1;
                return Err(());
            }
        };
        self.queue_control(from, Control::Reject { client_id, reason });
        Err(())
    }

    /// A packet for a connection: a sealed session's packets are opened
    /// first (a packet that does not open goes no further).
    fn on_connection_packet(
        &mut self,
        now: Instant,
        from: SocketAddr,
        header: &Header,
        datagram: &[u8],
        body: &[u8],
    ) {
        use crate::crypto::SealKind;
        let sealed_session = self
            .by_id
            .get(&header.connection_id)
            .and_then(|i| self.slots[*i as usize].connection.as_deref())
            .filter(|c| c.addr == from)
            .map(|c| (c.crypto.is_some(), c.received_seq(header.seq)));
        let Some((true, received_seq)) = sealed_session else {
            if header.sealed && sealed_session.is_some() {
                self.stats.dropped_unsealed += 1;
                return;
            }
            if !self.within_budget(now, from, header, datagram.len()) {
                return;
            }
            return self.on_session_packet(now, from, header, body, datagram.len());
        };
        // Challenges and rejects stay clear text: they carry nothing secret,
        // and forging one takes the client's random connection id.
        let kind = match header.packet_type {
            PacketType::Data | PacketType::Disconnect => SealKind::Data,
            PacketType::Accept => SealKind::Accept,
            _ => return self.on_session_packet(now, from, header, body, datagram.len()),
        };
        if !header.sealed {
            self.stats.dropped_unsealed += 1;
            return;
        }
        let seq = match kind {
            SealKind::Accept => 0,
            SealKind::Data => match received_seq {
                Some(seq) => seq,
                None => {
                    self.stats.dropped_too_old += 1;
                    return;
                }
            },
        };
        let mut plain = std::mem::take(&mut self.plain);
        let crypto = self.by_id.get(&header.connection_id).and_then(|i| {
            self.slots[*i as usize]
                .connection
                .as_deref()
                .and_then(|c| c.crypto.as_deref())
        });
        let opened = crypto
            .is_some_and(|c| c.open(&datagram[..wire::HEADER_LEN], body, kind, seq, &mut plain));
        if opened {
            if self.within_budget(now, from, header, datagram.len()) {
                self.on_session_packet(now, from, header, &plain, datagram.len());
            }
        } else {
            self.stats.dropped_bad_seal += 1;
        }
        self.plain = plain;
    }

    /// Spends a data packet from the session's peer against its receive
    /// limit: false if it must be dropped. A peer far over the limit is
    /// closed with [`crate::PeerLimit::CODE`].
    fn within_budget(
        &mut self,
        now: Instant,
        from: SocketAddr,
        header: &Header,
        len: usize,
    ) -> bool {
        use crate::connection::Budgeted;
        if header.packet_type != PacketType::Data {
            return true;
        }
        let Some(limit) = self.config.peer_limit else {
            return true;
        };
        let Some(&index) = self.by_id.get(&header.connection_id) else {
            return true;
        };
        let slot = &mut self.slots[index as usize];
        let generation = slot.generation;
        // Only new packets spend: a replayed one (an on-path attacker
        // repeating a victim's) is dropped as a duplicate, not charged to
        // the victim.
        let verdict = match slot
            .connection
            .as_deref_mut()
            .filter(|c| c.addr == from && c.is_new_packet(header.seq))
            .and_then(|c| c.budget.as_mut())
        {
            Some(budget) => budget.spend(&limit, now, len),
            None => return true,
        };
        match verdict {
            Budgeted::Admit => true,
            Budgeted::Drop => {
                self.stats.dropped_rate_limited += 1;
                false
            }
            Budgeted::Abuse => {
                self.stats.dropped_rate_limited += 1;
                self.stats.closed_for_abuse += 1;
                let handle = ConnectionHandle { index, generation };
                tracing::warn!(connection = ?handle, %from, "peer far over its receive limit: closed");
                let _ = self.disconnect(now, handle, crate::PeerLimit::CODE);
                false
            }
        }
    }

    fn on_session_packet(
        &mut self,
        now: Instant,
        from: SocketAddr,
        header: &Header,
        body: &[u8],
        len: usize,
    ) {
        let Some(&index) = self.by_id.get(&header.connection_id) else {
            self.stats.dropped_unknown_connection += 1;
            return;
        };
        let slot = &self.slots[index as usize];
        let handle = ConnectionHandle {
            index,
            generation: slot.generation,
        };
        let Some(connection) = slot.connection.as_deref() else {
            self.stats.dropped_unknown_connection += 1;
            return;
        };
        if connection.addr != from {
            self.stats.dropped_address_mismatch += 1;
            return;
        }
        let connecting = connection.is_connecting();
        match header.packet_type {
            PacketType::Challenge => {
                let applied = match Challenge::decode(body) {
                    Ok(challenge) => self
                        .with_connection(index, |c, _| c.on_challenge(challenge))
                        .unwrap_or(false),
                    Err(error) => return self.count_decode_error(error),
                };
                if !applied {
                    self.stats.dropped_unexpected += 1;
                }
            }
            PacketType::Accept => {
                let server_id = match wire::decode_u32_body(body) {
                    Ok(0) => {
                        self.stats.dropped_bad_body += 1;
                        return;
                    }
                    Ok(id) => id,
                    Err(error) => return self.count_decode_error(error),
                };
                let connected = self
                    .with_connection(index, |c, _| c.on_accept(now, server_id))
                    .unwrap_or(false);
                if connected {
                    self.stats.connections_opened += 1;
                    tracing::debug!(connection = ?handle, %from, "connection opened");
                    self.events.push_back(Event::Connected {
                        connection: handle,
                        addr: from,
                    });
                } else {
                    // A repeated Accept: harmless.
                    self.stats.dropped_unexpected += 1;
                }
            }
            PacketType::Reject => {
                let reason = match wire::decode_u8_body(body) {
                    Ok(code) => RejectReason::from_wire(code),
                    Err(error) => return self.count_decode_error(error),
                };
                if !connecting {
                    self.stats.dropped_unexpected += 1;
                    return;
                }
                self.with_connection(index, |c, _| c.state = crate::connection::State::Closed);
                self.stats.connections_closed += 1;
                self.events.push_back(Event::Disconnected {
                    connection: handle,
                    reason: DisconnectReason::Rejected(reason),
                });
            }
            PacketType::Data | PacketType::Disconnect => {
                let was_connected = connection.is_connected();
                let received = self
                    .with_connection(index, |c, cx| c.handle_packet(now, header, body, len, cx))
                    .unwrap_or(Received::Unexpected);
                let s = &mut self.stats;
                match received {
                    Received::Accepted => {}
                    Received::Duplicate => s.dropped_duplicate += 1,
                    Received::TooOld => s.dropped_too_old += 1,
                    Received::Refused => s.dropped_receive_window += 1,
                    Received::EventQueueFull => s.dropped_event_queue_full += 1,
                    Received::BadFrame(error) => self.count_decode_error(error),
                    Received::UnknownChannel => s.dropped_unknown_channel += 1,
                    Received::Oversized => s.dropped_oversized += 1,
                    Received::Unexpected => s.dropped_unexpected += 1,
                    Received::PeerClosed { code } => {
                        // A peer closing while we close too: we already
                        // reported our own reason.
                        if was_connected {
                            s.connections_closed += 1;
                            self.events.push_back(Event::Disconnected {
                                connection: handle,
                                reason: DisconnectReason::Remote(code),
                            });
                        }
                    }
                }
            }
            PacketType::ConnectRequest | PacketType::ConnectResponse => {}
        }
        self.refresh(index, true);
    }
}

fn encode_control(control: Control, out: &mut Vec<u8>) {
    match control {
        Control::Challenge {
            client_id,
            period,
            cookie,
        } => {
            Header::control(PacketType::Challenge, client_id).encode(out);
            Challenge { period, cookie }.encode(out);
        }
        Control::Reject { client_id, reason } => {
            Header::control(PacketType::Reject, client_id).encode(out);
            out.push(reason.to_wire());
        }
    }
}
