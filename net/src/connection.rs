//! One connection's state machine: handshake (client side), packet
//! sequencing and acks, loss detection, retransmission, congestion control,
//! channels, keepalive, idle timeout and graceful close.
//!
//! Driven by the [`crate::Endpoint`], which demultiplexes datagrams, keeps the
//! timers and the dirty list, and owns the shared buffers.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::channel::{Admission, Budget, RecvChannel, RecvContext, RecvStats, SendChannel};
use crate::config::{Config, Limits};
use crate::pool::BufferPool;
use crate::recovery::{Congestion, RttEstimator};
use crate::types::{ConnectionHandle, DisconnectReason, Event, SendError};
use crate::wire::{
    self, Challenge, ConnectRequest, ConnectResponse, DecodeError, Frame, Frames, Header,
    PacketType, COOKIE_LEN, HEADER_LEN,
};

/// Packets remembered for duplicate suppression (a power of two).
const RECEIVED_WINDOW: u64 = 1024;
/// Packets one header acknowledges below its `ack` (the `ack_bits` field).
const ACK_BITS: u64 = 64;
/// Copies of each catch-up ack (see `Connection::acked_below`).
const CATCH_UP_COPIES: u8 = 2;
/// Packets declared lost once this many later packets were sent and the
/// newest of them acknowledged ("three newer acks").
const PACKET_THRESHOLD: usize = 3;
/// Longest handshake resend interval.
const HANDSHAKE_RESEND_MAX: Duration = Duration::from_secs(1);

/// Which packets of the peer arrived: the newest and a 1024-packet ring.
#[derive(Debug, Clone)]
struct ReceivedPackets {
    largest: Option<u64>,
    bits: [u64; (RECEIVED_WINDOW / 64) as usize],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arrival {
    New,
    Duplicate,
    TooOld,
}

impl ReceivedPackets {
    fn new() -> Self {
        Self {
            largest: None,
            bits: [0; (RECEIVED_WINDOW / 64) as usize],
        }
    }

    fn get(&self, seq: u64) -> bool {
        let i = seq % RECEIVED_WINDOW;
        self.bits[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, seq: u64, on: bool) {
        let i = seq % RECEIVED_WINDOW;
        let word = &mut self.bits[(i / 64) as usize];
        if on {
            *word |= 1 << (i % 64);
        } else {
            *word &= !(1 << (i % 64));
        }
    }

    fn arrival(&self, seq: u64) -> Arrival {
        match self.largest {
            None => Arrival::New,
            Some(largest) if seq > largest => Arrival::New,
            Some(largest) if largest - seq >= RECEIVED_WINDOW => Arrival::TooOld,
            Some(_) if self.get(seq) => Arrival::Duplicate,
            Some(_) => Arrival::New,
        }
    }

    fn insert(&mut self, seq: u64) {
        match self.largest {
            Some(largest) if seq <= largest => {}
            Some(largest) if seq - largest < RECEIVED_WINDOW => {
                for s in largest + 1..seq {
                    self.set(s, false);
                }
                self.largest = Some(seq);
            }
            _ => {
                self.bits = [0; (RECEIVED_WINDOW / 64) as usize];
                self.largest = Some(seq);
            }
        }
        self.set(seq, true);
    }

    /// Whether packet `seq` arrived (false once out of the window).
    fn contains(&self, seq: u64) -> bool {
        self.largest
            .is_some_and(|l| seq <= l && l - seq < RECEIVED_WINDOW && self.get(seq))
    }

    /// `(ack, ack_bits)` for the next header.
    fn ack_fields(&self) -> Option<(u16, u64)> {
        let largest = self.largest?;
        Some((largest as u16, self.bits_below(largest)))
    }

    /// Bit `i` set: packet `top - 1 - i` arrived (within the window).
    fn bits_below(&self, top: u64) -> u64 {
        let Some(largest) = self.largest else {
            return 0;
        };
        let mut bits = 0u64;
        for i in 0..ACK_BITS {
            let Some(seq) = top.checked_sub(1 + i) else {
                break;
            };
            if largest - seq >= RECEIVED_WINDOW {
                break;
            }
            if self.get(seq) {
                bits |= 1 << i;
            }
        }
        bits
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SentState {
    InFlight,
    Acked,
    Lost,
}

/// An ack-eliciting packet, kept until it is acknowledged or lost and every
/// older one is too.
#[derive(Debug, Clone)]
struct SentPacket {
    seq: u64,
    sent_at: Instant,
    size: u32,
    /// Its frames in `sent_frames`, as absolute indices.
    frames_start: u64,
    frames_end: u64,
    state: SentState,
}

/// A tracked frame of a sent packet.
#[derive(Debug, Clone, Copy)]
struct SentFrame {
    channel: u8,
    part: u16,
    id: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct Handshake {
    /// `(period, cookie)` once a challenge arrived.
    cookie: Option<(u32, [u8; COOKIE_LEN])>,
    started: Instant,
    resend_at: Instant,
    interval: Duration,
    due: bool,
}

#[derive(Debug, Clone)]
pub(crate) enum State {
    /// Client side, before `Accept`.
    Connecting(Handshake),
    Connected,
    /// Sending `copies_left` more disconnect packets.
    Closing {
        code: u16,
        copies_left: u8,
        next_at: Instant,
        due: bool,
    },
    /// Done; the endpoint frees the slot.
    Closed,
}

/// What became of a data or disconnect packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Received {
    Accepted,
    Duplicate,
    TooOld,
    /// Outside the receive window or over a receive buffer bound: not
    /// acknowledged, the peer will send it again.
    Refused,
    EventQueueFull,
    BadFrame(DecodeError),
    UnknownChannel,
    Oversized,
    /// A data packet before the handshake finished.
    Unexpected,
    /// The peer closed the connection.
    PeerClosed {
        code: u16,
    },
}

/// Things the connection borrows from its endpoint for one call.
pub(crate) struct Context<'a> {
    pub config: &'a Config,
    pub limits: &'a Limits,
    pub handle: ConnectionHandle,
    pub events: &'a mut VecDeque<Event>,
    pub pool: &'a mut BufferPool,
    pub endpoint_receive_bytes: &'a mut usize,
}

/// Per-connection statistics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConnectionStats {
    /// Smoothed round-trip time.
    pub rtt_smoothed: Duration,
    /// Round-trip time variation.
    pub rtt_variation: Duration,
    /// Lowest RTT sample of the last 30 s.
    pub rtt_min: Option<Duration>,
    /// Current retransmission timeout, backoff included.
    pub rto: Duration,
    /// Congestion window in bytes.
    pub send_window_bytes: usize,
    /// Bytes of ack-eliciting packets not yet acknowledged or lost.
    pub bytes_in_flight: usize,
    /// Datagrams sent (all kinds).
    pub packets_sent: u64,
    /// Datagrams received and accepted for this connection.
    pub packets_received: u64,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// Ack-eliciting packets acknowledged.
    pub packets_acked: u64,
    /// Ack-eliciting packets declared lost.
    pub packets_lost: u64,
    /// `packets_lost / (packets_acked + packets_lost)`.
    pub loss_ratio: f64,
    /// Packets declared lost by the packet or time threshold (three later
    /// packets sent, or 9/8 RTT passed, and a later packet acknowledged).
    pub lost_by_threshold: u64,
    /// Retransmission timer expiries.
    pub timeouts: u64,
    /// Lost packets that were acknowledged later.
    pub spurious_losses: u64,
    /// Reliable frames sent again.
    pub retransmits: u64,
    /// Messages queued with `send`.
    pub messages_sent: u64,
    /// Messages delivered.
    pub messages_received: u64,
    /// Duplicate datagrams dropped.
    pub duplicate_packets: u64,
    /// Duplicate messages or fragments dropped.
    pub duplicate_messages: u64,
    /// Sequenced messages dropped because a newer one was delivered.
    pub stale_messages: u64,
    /// Sequenced messages dropped unsent because the queue was full.
    pub superseded_messages: u64,
    /// Unreliable fragmented messages dropped incomplete.
    pub incomplete_messages: u64,
    /// Unreliable fragments dropped for lack of reassembly memory.
    pub reassembly_memory_drops: u64,
    /// Packets refused (receive window or buffer bound).
    pub refused_packets: u64,
    /// Window reductions on loss, on RTT growth, on timeout.
    pub backoffs: [u64; 3],
    /// Losses below `CongestionConfig::loss_tolerance`, not taken as
    /// congestion.
    pub losses_tolerated: u64,
    /// Messages waiting or unacknowledged, all channels.
    pub send_queue_messages: usize,
    /// Bytes of those messages.
    pub send_queue_bytes: usize,
    /// Bytes held in reorder and reassembly buffers.
    pub receive_buffer_bytes: usize,
    /// Complete messages waiting for an earlier one.
    pub reorder_buffered_messages: usize,
    /// Messages being reassembled.
    pub reassemblies: usize,
}

/// One connection.
#[derive(Debug)]
pub(crate) struct Connection {
    pub local_id: u32,
    pub peer_id: u32,
    pub addr: SocketAddr,
    pub state: State,
    /// Server side: send `Accept` (again) at the next transmit.
    pub accept_pending: bool,
    config_hash: u32,
    mtu: usize,
    rto_min: Duration,
    rto_max: Duration,
    ack_delay: Duration,
    // Send side.
    next_seq: u64,
    sent: VecDeque<SentPacket>,
    sent_frames: VecDeque<SentFrame>,
    frames_base: u64,
    in_flight: usize,
    largest_acked: Option<u64>,
    rtt: RttEstimator,
    rto_backoff: i32,
    congestion: Congestion,
    send: Vec<SendChannel>,
    ping_pending: bool,
    pacing_release: Option<Instant>,
    last_send: Instant,
    // Receive side.
    received: ReceivedPackets,
    recv: Vec<RecvChannel>,
    ack_count: u32,
    ack_deadline: Option<Instant>,
    ack_now: bool,
    /// Every packet received below this was covered by an ack we sent (or
    /// fell out of the window): more than 65 packets can arrive between two
    /// transmits (one receive batch), and one header only covers 65.
    acked_below: u64,
    /// The oldest ack-eliciting packet at or above `acked_below`, if any:
    /// where catch-up acks start (packets that elicit nothing need none).
    eliciting_since: Option<u64>,
    /// A catch-up ack (its `ack`) still to send, and how many times.
    catch_up_repeat: Option<(u64, u8)>,
    last_recv: Instant,
    receive_bytes: usize,
    recv_stats: RecvStats,
    /// (channel, id) of reassemblies already counted in a pre-scan.
    scratch: Vec<(u8, u64)>,
    stats: ConnectionStats,
    /// The session's ciphers (a connection opened with a connect token):
    /// every packet after the handshake is sealed.
    pub(crate) crypto: Option<Box<crate::crypto::PacketCrypto>>,
    /// The client's sealed token, sent in its handshake requests.
    pub(crate) token: Option<Box<[u8; crate::token::SEALED_TOKEN_LEN]>>,
    /// What the server learnt from the client's token.
    pub(crate) claims: Option<Box<crate::token::TokenClaims>>,
    /// What is left of the peer's receive budget (with a peer limit).
    pub(crate) budget: Option<PeerBudget>,
}

/// A peer's token buckets (see [`crate::PeerLimit`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PeerBudget {
    packets: f64,
    bytes: f64,
    refilled: Instant,
    drops: u32,
    drops_since: Instant,
}

/// What the budget says of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Budgeted {
    Admit,
    Drop,
    /// Dropped, and the peer went over `abuse_drops` in one second.
    Abuse,
}

impl PeerBudget {
    pub fn new(limit: &crate::PeerLimit, now: Instant) -> Self {
        let burst = limit.burst.as_secs_f64();
        Self {
            packets: f64::from(limit.packets_per_s) * burst,
            bytes: f64::from(limit.bytes_per_s) * burst,
            refilled: now,
            drops: 0,
            drops_since: now,
        }
    }

    /// Spends one packet of `len` bytes, if both buckets hold it.
    pub fn spend(&mut self, limit: &crate::PeerLimit, now: Instant, len: usize) -> Budgeted {
        let burst = limit.burst.as_secs_f64();
        let dt = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        let (pps, bps) = (f64::from(limit.packets_per_s), f64::from(limit.bytes_per_s));
        self.packets = (self.packets + dt * pps).min(pps * burst);
        self.bytes = (self.bytes + dt * bps).min(bps * burst);
        if self.packets >= 1.0 && self.bytes >= len as f64 {
            self.packets -= 1.0;
            self.bytes -= len as f64;
            return Budgeted::Admit;
        }
        if now.saturating_duration_since(self.drops_since) >= Duration::from_secs(1) {
            self.drops = 0;
            self.drops_since = now;
        }
        self.drops += 1;
        if limit.abuse_drops > 0 && self.drops >= limit.abuse_drops {
            Budgeted::Abuse
        } else {
            Budgeted::Drop
        }
    }
}

impl Connection {
    /// A connection in `state` (client: `Connecting`; server: `Connected`).
    pub fn new(
        local_id: u32,
        peer_id: u32,
        addr: SocketAddr,
        now: Instant,
        client: bool,
        config: &Config,
    ) -> Self {
        let state = if client {
            State::Connecting(Handshake {
                cookie: None,
                started: now,
                resend_at: now,
                interval: config.handshake_resend_interval,
                due: true,
            })
        } else {
            State::Connected
        };
        let window = config.reliable_window;
        Self {
            local_id,
            peer_id,
            addr,
            state,
            accept_pending: !client,
            config_hash: config.protocol_hash(),
            mtu: config.mtu,
            rto_min: config.rto_min,
            rto_max: config.rto_max,
            ack_delay: config.ack_delay,
            next_seq: 0,
            sent: VecDeque::new(),
            sent_frames: VecDeque::new(),
            frames_base: 0,
            in_flight: 0,
            largest_acked: None,
            rtt: RttEstimator::new(config.initial_rtt),
            rto_backoff: 0,
            congestion: Congestion::new(&config.congestion, config.mtu),
            send: config
                .channels
                .iter()
                .enumerate()
                .map(|(i, c)| SendChannel::new(i as u8, c, window, config.retransmission_copies))
                .collect(),
            ping_pending: false,
            pacing_release: None,
            last_send: now,
            received: ReceivedPackets::new(),
            recv: config
                .channels
                .iter()
                .enumerate()
                .map(|(i, c)| RecvChannel::new(i as u8, c.kind, window))
                .collect(),
            ack_count: 0,
            ack_deadline: None,
            ack_now: false,
            acked_below: 0,
            eliciting_since: None,
            catch_up_repeat: None,
            last_recv: now,
            receive_bytes: 0,
            recv_stats: RecvStats::default(),
            scratch: Vec::new(),
            stats: ConnectionStats::default(),
            crypto: None,
            token: None,
            claims: None,
            budget: config.peer_limit.as_ref().map(|l| PeerBudget::new(l, now)),
        }
    }

    pub fn is_connected(&self) -> bool {
        matches!(self.state, State::Connected)
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    pub fn is_connecting(&self) -> bool {
        matches!(self.state, State::Connecting(_))
    }

    // ----- application side -----

    /// Queues a message.
    pub fn send(
        &mut self,
        channel: u8,
        bytes: &[u8],
        cx: &mut Context<'_>,
    ) -> Result<u64, SendError> {
        if matches!(self.state, State::Closing { .. } | State::Closed) {
            return Err(SendError::Closing);
        }
        let Some(queue) = self.send.get_mut(channel as usize) else {
            return Err(SendError::UnknownChannel(channel));
        };
        if bytes.len() > cx.config.message_bytes_max {
            return Err(SendError::MessageTooLarge {
                len: bytes.len(),
                max: cx.config.message_bytes_max,
            });
        }
        let id = queue
            .push(bytes, cx.limits, cx.pool)
            .ok_or(SendError::QueueFull(channel))?;
        self.stats.messages_sent += 1;
        Ok(id)
    }

    /// Starts a graceful close: queued data is dropped and a few disconnect
    /// packets go out. A connection still in its handshake just closes.
    pub fn close(&mut self, now: Instant, code: u16, cx: &mut Context<'_>) {
        for channel in &mut self.send {
            channel.clear(cx.pool);
        }
        self.state = match self.state {
            State::Connected if cx.config.disconnect_copies > 0 => State::Closing {
                code,
                copies_left: cx.config.disconnect_copies,
                next_at: now,
                due: true,
            },
            _ => State::Closed,
        };
    }

    /// Frees every buffer; called once when the slot is freed.
    pub fn release(&mut self, cx: &mut Context<'_>) {
        for channel in &mut self.send {
            channel.clear(cx.pool);
        }
        let mut budget = Budget {
            connection: &mut self.receive_bytes,
            connection_max: usize::MAX,
            endpoint: cx.endpoint_receive_bytes,
            endpoint_max: usize::MAX,
        };
        for channel in &mut self.recv {
            channel.clear(&mut budget, cx.pool);
        }
    }

    // ----- handshake (client side) -----

    /// A challenge arrived: answer with the cookie.
    pub fn on_challenge(&mut self, challenge: Challenge) -> bool {
        let State::Connecting(h) = &mut self.state else {
            return false;
        };
        h.cookie = Some((challenge.period, challenge.cookie));
        h.due = true;
        true
    }

    /// The server accepted: connected from now on.
    pub fn on_accept(&mut self, now: Instant, server_id: u32) -> bool {
        if !self.is_connecting() {
            return false;
        }
        self.peer_id = server_id;
        self.state = State::Connected;
        self.last_recv = now;
        self.last_send = now;
        true
    }

    // ----- receive -----

    /// A data or disconnect packet for this connection, already matched by
    /// id and address.
    pub fn handle_packet(
        &mut self,
        now: Instant,
        header: &Header,
        body: &[u8],
        datagram_len: usize,
        cx: &mut Context<'_>,
    ) -> Received {
        if self.is_connecting() || self.is_closed() {
            return Received::Unexpected;
        }
        self.last_recv = now;
        self.stats.bytes_received += datagram_len as u64;
        if let Some((ack, bits)) = header.ack {
            self.on_ack_field(now, ack, bits, cx);
        }
        if header.packet_type == PacketType::Disconnect {
            return match wire::decode_u16_body(body) {
                Ok(code) => {
                    self.state = State::Closed;
                    Received::PeerClosed { code }
                }
                Err(error) => Received::BadFrame(error),
            };
        }
        let Some(seq) = wire::unwrap_u16(self.received.largest.unwrap_or(0), header.seq) else {
            return Received::TooOld;
        };
        match self.received.arrival(seq) {
            Arrival::New => {}
            Arrival::Duplicate => {
                self.stats.duplicate_packets += 1;
                return Received::Duplicate;
            }
            Arrival::TooOld => return Received::TooOld,
        }
        // Pre-scan: nothing is applied unless the whole packet can be, because
        // acknowledging a packet promises that its reliable frames are held.
        let mut messages = 0usize;
        let mut new_bytes = 0usize;
        let mut exempt_bytes = 0usize;
        let mut ack_eliciting = false;
        self.scratch.clear();
        for frame in Frames::new(body) {
            let frame = match frame {
                Ok(frame) => frame,
                Err(error) => return Received::BadFrame(error),
            };
            let (channel, id, len, total) = match frame {
                Frame::Ping => {
                    ack_eliciting = true;
                    continue;
                }
                Frame::Message {
                    channel,
                    id,
                    payload,
                } => (channel, id, payload.len(), None),
                Frame::Fragment(f) => (f.channel, f.id, f.payload.len(), Some(f.total)),
            };
            ack_eliciting = true;
            messages += 1;
            let Some(receiver) = self.recv.get(channel as usize) else {
                return Received::UnknownChannel;
            };
            if len > cx.config.message_bytes_max
                || total.is_some_and(|t| t as usize > cx.config.message_bytes_max)
            {
                return Received::Oversized;
            }
            match receiver.admit(id, len, total) {
                Admission::Refuse => {
                    self.stats.refused_packets += 1;
                    return Received::Refused;
                }
                Admission::Accept { id, bytes, exempt } => {
                    if bytes > 0 && !self.scratch.contains(&(channel, id)) {
                        self.scratch.push((channel, id));
                        if exempt {
                            exempt_bytes += bytes;
                        } else {
                            new_bytes += bytes;
                        }
                    }
                }
            }
        }
        let closing = matches!(self.state, State::Closing { .. });
        if !closing {
            let over_connection =
                self.receive_bytes + new_bytes > cx.config.receive_buffer_bytes_max;
            let over_endpoint = *cx.endpoint_receive_bytes + new_bytes + exempt_bytes
                > cx.config.endpoint_receive_buffer_bytes_max;
            if over_connection || over_endpoint {
                self.stats.refused_packets += 1;
                return Received::Refused;
            }
            if cx.events.len() + messages > cx.config.events_max {
                return Received::EventQueueFull;
            }
        }
        self.received.insert(seq);
        self.stats.packets_received += 1;
        if ack_eliciting {
            if seq >= self.acked_below && self.eliciting_since.is_none_or(|s| seq < s) {
                self.eliciting_since = Some(seq);
            }
            self.ack_count += 1;
            if self.ack_deadline.is_none() {
                self.ack_deadline = Some(now + cx.config.ack_delay);
            }
        }
        if closing {
            return Received::Accepted;
        }
        let mut rcx = RecvContext {
            handle: cx.handle,
            now,
            events: cx.events,
            pool: cx.pool,
            budget: Budget {
                connection: &mut self.receive_bytes,
                connection_max: cx.config.receive_buffer_bytes_max,
                endpoint: cx.endpoint_receive_bytes,
                endpoint_max: cx.config.endpoint_receive_buffer_bytes_max,
            },
            stats: &mut self.recv_stats,
            reassemblies_max: cx.config.unreliable_reassemblies_max,
            reassembly_timeout: cx.config.reassembly_timeout,
        };
        for frame in Frames::new(body).flatten() {
            match frame {
                Frame::Ping => {}
                Frame::Message {
                    channel,
                    id,
                    payload,
                } => self.recv[channel as usize].on_message(id, payload, &mut rcx),
                Frame::Fragment(f) => self.recv[f.channel as usize].on_fragment(&f, &mut rcx),
            }
        }
        Received::Accepted
    }

    fn on_ack_field(&mut self, now: Instant, ack: u16, bits: u64, cx: &mut Context<'_>) {
        let Some(last_sent) = self.next_seq.checked_sub(1) else {
            return;
        };
        let Some(largest) = wire::unwrap_u16(last_sent, ack).filter(|&l| l <= last_sent) else {
            return;
        };
        let low = largest.saturating_sub(64);
        let mut i = self.sent.partition_point(|p| p.seq < low);
        let mut newly_acked = false;
        while i < self.sent.len() {
            let seq = self.sent[i].seq;
            if seq > largest {
                break;
            }
            let acked = seq == largest || (bits >> (largest - 1 - seq)) & 1 == 1;
            if acked && self.sent[i].state != SentState::Acked {
                // A catch-up ack for older packets says nothing about the
                // current RTT: sample only a newly newest acknowledgement.
                if seq == largest && self.largest_acked.is_none_or(|l| largest > l) {
                    let sample = now.saturating_duration_since(self.sent[i].sent_at);
                    self.rtt.update(sample, now);
                    self.congestion.on_rtt(&self.rtt, seq, self.next_seq);
                }
                self.mark_acked(i, cx);
                newly_acked = true;
            }
            i += 1;
        }
        if newly_acked {
            self.largest_acked = Some(self.largest_acked.map_or(largest, |l| l.max(largest)));
            self.rto_backoff = 0;
            self.detect_lost(now);
            self.pop_resolved();
        }
    }

    fn frames_of(&self, i: usize) -> std::ops::Range<usize> {
        let p = &self.sent[i];
        (p.frames_start - self.frames_base) as usize..(p.frames_end - self.frames_base) as usize
    }

    fn mark_acked(&mut self, i: usize, cx: &mut Context<'_>) {
        let packet = &mut self.sent[i];
        match packet.state {
            SentState::InFlight => {
                self.in_flight -= packet.size as usize;
                self.congestion.on_ack(packet.size as usize);
                self.stats.packets_acked += 1;
            }
            SentState::Lost => self.stats.spurious_losses += 1,
            SentState::Acked => return,
        }
        packet.state = SentState::Acked;
        for f in self.frames_of(i) {
            let frame = self.sent_frames[f];
            if let Some(channel) = self.send.get_mut(frame.channel as usize) {
                if channel.on_ack(frame.id, frame.part, cx.pool) {
                    cx.events.push_back(Event::Acked {
                        connection: cx.handle,
                        channel: crate::ChannelId(frame.channel),
                        message: crate::MessageId(frame.id),
                    });
                }
            }
        }
    }

    fn mark_lost(&mut self, i: usize, by_timeout: bool) {
        let packet = &mut self.sent[i];
        if packet.state != SentState::InFlight {
            return;
        }
        packet.state = SentState::Lost;
        self.in_flight -= packet.size as usize;
        self.stats.packets_lost += 1;
        let seq = packet.seq;
        if !by_timeout {
            self.congestion.on_loss(seq, self.next_seq);
        }
        for f in self.frames_of(i) {
            let frame = self.sent_frames[f];
            if let Some(channel) = self.send.get_mut(frame.channel as usize) {
                channel.on_lost(frame.id, frame.part, seq);
            }
        }
    }

    /// RFC 9002's thresholds: an in-flight packet older than the newest
    /// acknowledged one is lost once `PACKET_THRESHOLD` later packets were
    /// sent, or once it was sent more than [`Connection::loss_delay`] ago
    /// (the time rule catches the last packets of a burst, which have too few
    /// successors for the packet rule, without waiting for the RTO).
    fn detect_lost(&mut self, now: Instant) {
        let Some(largest) = self.largest_acked else {
            return;
        };
        let position = self.sent.partition_point(|p| p.seq < largest);
        let loss_delay = self.loss_delay();
        for i in 0..position {
            let packet = &self.sent[i];
            if packet.state != SentState::InFlight {
                continue;
            }
            let by_count = i + PACKET_THRESHOLD <= position;
            let by_time = now.saturating_duration_since(packet.sent_at) >= loss_delay;
            if !by_count && !by_time {
                // Later packets are younger and have fewer successors.
                break;
            }
            self.stats.lost_by_threshold += 1;
            self.mark_lost(i, false);
        }
    }

    /// How long after its sending a packet with an acknowledged successor is
    /// declared lost: 9/8 of the larger of the smoothed and latest RTT.
    fn loss_delay(&self) -> Duration {
        let rtt = self.rtt.smoothed().max(self.rtt.latest());
        (rtt + rtt / 8).max(Duration::from_millis(1))
    }

    /// When the oldest in-flight packet below the newest acknowledged one
    /// crosses the time threshold.
    fn loss_deadline(&self) -> Option<Instant> {
        let largest = self.largest_acked?;
        let oldest = self
            .sent
            .front()
            .filter(|p| p.state == SentState::InFlight && p.seq < largest)?;
        Some(oldest.sent_at + self.loss_delay())
    }

    fn pop_resolved(&mut self) {
        while self
            .sent
            .front()
            .is_some_and(|p| p.state != SentState::InFlight)
        {
            if let Some(p) = self.sent.pop_front() {
                let n = (p.frames_end - self.frames_base) as usize;
                self.sent_frames.drain(..n.min(self.sent_frames.len()));
                self.frames_base = p.frames_end;
            }
        }
    }

    fn current_rto(&self) -> Duration {
        let base = self.rtt.rto(self.rto_min, self.ack_delay);
        if self.rto_backoff == 0 {
            // The common case, on every deadline refresh: no float math.
            return base.min(self.rto_max);
        }
        let backed_off = base.mul_f64(1.5f64.powi(self.rto_backoff.min(30)));
        backed_off.min(self.rto_max)
    }

    fn rto_deadline(&self) -> Option<Instant> {
        let oldest = self.sent.iter().find(|p| p.state == SentState::InFlight)?;
        Some(oldest.sent_at + self.current_rto())
    }

    // ----- timers -----

    /// Applies every timer due at `now`. Returns why the connection closed,
    /// if a timer closed it.
    pub fn handle_timeout(
        &mut self,
        now: Instant,
        cx: &mut Context<'_>,
    ) -> Option<DisconnectReason> {
        match &mut self.state {
            State::Connecting(h) => {
                if now >= h.started + cx.config.handshake_timeout {
                    self.state = State::Closed;
                    return Some(DisconnectReason::HandshakeTimedOut);
                }
                if !h.due && now >= h.resend_at {
                    h.due = true;
                    h.interval = (h.interval.mul_f64(1.5)).min(HANDSHAKE_RESEND_MAX);
                }
                None
            }
            State::Closing { next_at, due, .. } => {
                if now >= *next_at {
                    *due = true;
                }
                None
            }
            State::Closed => None,
            State::Connected => {
                if now >= self.last_recv + cx.config.idle_timeout {
                    self.state = State::Closed;
                    return Some(DisconnectReason::TimedOut);
                }
                if self.ack_deadline.is_some_and(|d| now >= d) {
                    self.ack_deadline = None;
                    self.ack_now = true;
                }
                if !self.ping_pending && now >= self.last_send + cx.config.keepalive_interval {
                    self.ping_pending = true;
                }
                if self.pacing_release.is_some_and(|d| now >= d) {
                    self.pacing_release = None;
                }
                if self.loss_deadline().is_some_and(|d| now >= d) {
                    self.detect_lost(now);
                    self.pop_resolved();
                }
                if self.rto_deadline().is_some_and(|d| now >= d) {
                    let rto = self.current_rto();
                    for i in 0..self.sent.len() {
                        let p = &self.sent[i];
                        if p.sent_at + rto > now {
                            break;
                        }
                        self.mark_lost(i, true);
                    }
                    self.stats.timeouts += 1;
                    self.rto_backoff += 1;
                    self.congestion.on_timeout(self.next_seq);
                    self.pop_resolved();
                }
                let mut rcx = RecvContext {
                    handle: cx.handle,
                    now,
                    events: cx.events,
                    pool: cx.pool,
                    budget: Budget {
                        connection: &mut self.receive_bytes,
                        connection_max: cx.config.receive_buffer_bytes_max,
                        endpoint: cx.endpoint_receive_bytes,
                        endpoint_max: cx.config.endpoint_receive_buffer_bytes_max,
                    },
                    stats: &mut self.recv_stats,
                    reassemblies_max: cx.config.unreliable_reassemblies_max,
                    reassembly_timeout: cx.config.reassembly_timeout,
                };
                for channel in &mut self.recv {
                    channel.collect_unreliable(&mut rcx);
                }
                None
            }
        }
    }

    /// The earliest instant a timer of this connection fires. Timers that
    /// already fired and only wait for a transmit are not included.
    pub fn next_deadline(&self, config: &Config) -> Option<Instant> {
        let mut deadline: Option<Instant> = None;
        let mut consider = |at: Option<Instant>| {
            if let Some(at) = at {
                deadline = Some(deadline.map_or(at, |d| d.min(at)));
            }
        };
        match &self.state {
            State::Connecting(h) => {
                consider(Some(h.started + config.handshake_timeout));
                consider((!h.due).then_some(h.resend_at));
            }
            State::Closing { next_at, due, .. } => consider((!due).then_some(*next_at)),
            State::Closed => {}
            State::Connected => {
                consider(Some(self.last_recv + config.idle_timeout));
                consider(self.ack_deadline);
                consider(
                    (!self.ping_pending).then_some(self.last_send + config.keepalive_interval),
                );
                consider(self.pacing_release);
                consider(self.loss_deadline());
                consider(self.rto_deadline());
            }
        }
        deadline
    }

    fn has_data(&self) -> bool {
        self.send.iter().any(SendChannel::has_unit)
    }

    /// Whether `poll_transmit` may produce a datagram now.
    pub fn wants_transmit(&self, config: &Config) -> bool {
        match &self.state {
            State::Connecting(h) => h.due,
            State::Closing { due, .. } => *due,
            State::Closed => false,
            State::Connected => {
                self.accept_pending
                    || self.ack_now
                    || self.ack_count >= config.ack_frequency
                    || self.catch_up_repeat.is_some()
                    || self.catch_up_ack().is_some()
                    || self.ping_pending
                    || (self.pacing_release.is_none()
                        && self.congestion.window_open(self.in_flight)
                        && self.has_data())
            }
        }
    }

    // ----- transmit -----

    fn pad_to_mtu(&self, out: &mut Vec<u8>, start: usize) {
        let end = start + self.mtu.max(wire::HANDSHAKE_MIN_LEN);
        if out.len() < end {
            out.resize(end, 0);
        }
    }

    /// Appends at most one datagram to `out`. True when one was written.
    pub fn poll_transmit(&mut self, now: Instant, out: &mut Vec<u8>, cx: &mut Context<'_>) -> bool {
        let start = out.len();
        match &mut self.state {
            State::Connecting(h) => {
                if !h.due {
                    return false;
                }
                h.due = false;
                h.resend_at = now + h.interval;
                match h.cookie {
                    None => {
                        Header::control(PacketType::ConnectRequest, 0).encode(out);
                        ConnectRequest {
                            config_hash: self.config_hash,
                            client_id: self.local_id,
                        }
                        .encode(out);
                        if let Some(token) = &self.token {
                            out.extend_from_slice(&token[..]);
                        }
                    }
                    Some((period, cookie)) => {
                        Header::control(PacketType::ConnectResponse, 0).encode(out);
                        ConnectResponse {
                            config_hash: self.config_hash,
                            client_id: self.local_id,
                            period,
                            cookie,
                        }
                        .encode(out);
                        if let Some(token) = &self.token {
                            out.extend_from_slice(&token[..]);
                        }
                    }
                }
                // Padding: no server reply is ever larger than this request.
                self.pad_to_mtu(out, start);
                self.on_datagram_sent(now, out.len() - start);
                return true;
            }
            State::Closing {
                code,
                copies_left,
                next_at,
                due,
            } => {
                if !*due {
                    return false;
                }
                let code = *code;
                *due = false;
                *copies_left = copies_left.saturating_sub(1);
                *next_at = now + cx.config.disconnect_interval;
                if *copies_left == 0 {
                    self.state = State::Closed;
                }
                Header {
                    packet_type: PacketType::Disconnect,
                    connection_id: self.peer_id,
                    seq: self.next_seq as u16,
                    ack: self.received.ack_fields(),
                    sealed: false,
                }
                .encode(out);
                out.extend_from_slice(&code.to_le_bytes());
                self.seal(out, start, crate::crypto::SealKind::Data, self.next_seq);
                self.on_datagram_sent(now, out.len() - start);
                return true;
            }
            State::Closed => return false,
            State::Connected => {}
        }
        if self.accept_pending {
            self.accept_pending = false;
            Header::control(PacketType::Accept, self.peer_id).encode(out);
            out.extend_from_slice(&self.local_id.to_le_bytes());
            self.seal(out, start, crate::crypto::SealKind::Accept, 0);
            self.on_datagram_sent(now, out.len() - start);
            return true;
        }
        while self.catch_up_repeat.is_none() {
            let Some(end) = self.catch_up_ack() else {
                break;
            };
            // Acknowledge what the next header cannot reach, oldest first.
            // `ack` must name a packet that arrived: the newest of the range.
            let largest = self.received.largest.unwrap_or(0);
            self.acked_below = end + 1;
            self.eliciting_since = (largest > end).then_some(end + 1);
            if let Some(top) = (end - ACK_BITS..=end)
                .rev()
                .find(|&seq| self.received.contains(seq))
            {
                self.catch_up_repeat = Some((top, CATCH_UP_COPIES));
            }
        }
        if let Some((top, copies)) = self.catch_up_repeat {
            // No later ack covers this range: each goes out more than once,
            // or one lost ack would make the peer resend 65 packets.
            self.catch_up_repeat = (copies > 1).then_some((top, copies - 1));
            Header {
                packet_type: PacketType::Data,
                connection_id: self.peer_id,
                seq: self.next_seq as u16,
                ack: Some((top as u16, self.received.bits_below(top))),
                sealed: false,
            }
            .encode(out);
            self.seal(out, start, crate::crypto::SealKind::Data, self.next_seq);
            self.next_seq += 1;
            self.on_datagram_sent(now, out.len() - start);
            return true;
        }
        let srtt = self.rtt.smoothed();
        self.congestion.refill(now, srtt);
        let has_data = self.has_data();
        let window_open = self.congestion.window_open(self.in_flight);
        let pacing_open = self.congestion.pacing_open();
        let send_data = has_data && window_open && pacing_open;
        if has_data && window_open && !pacing_open {
            self.pacing_release = Some(self.congestion.pacing_release(now, srtt));
        }
        let ack_needed = self.ack_now || self.ack_count >= cx.config.ack_frequency;
        if !send_data && !self.ping_pending && !ack_needed {
            return false;
        }
        let seq = self.next_seq;
        Header {
            packet_type: PacketType::Data,
            connection_id: self.peer_id,
            seq: seq as u16,
            ack: self.received.ack_fields(),
            sealed: false,
        }
        .encode(out);
        let frames_start = self.frames_base + self.sent_frames.len() as u64;
        let end = start + HEADER_LEN + cx.limits.frame_room;
        let mut ack_eliciting = send_data && self.pack(seq, out, end, cx);
        if !ack_eliciting && self.ping_pending {
            wire::write_ping(out);
            ack_eliciting = true;
        }
        if !ack_eliciting && !ack_needed {
            out.truncate(start);
            return false;
        }
        self.seal(out, start, crate::crypto::SealKind::Data, seq);
        let size = out.len() - start;
        self.next_seq += 1;
        if ack_eliciting {
            self.sent.push_back(SentPacket {
                seq,
                sent_at: now,
                size: size as u32,
                frames_start,
                frames_end: self.frames_base + self.sent_frames.len() as u64,
                state: SentState::InFlight,
            });
            self.in_flight += size;
            self.congestion.on_sent(size);
            self.ping_pending = false;
        }
        self.ack_now = false;
        self.ack_count = 0;
        self.ack_deadline = None;
        if let Some(largest) = self.received.largest {
            if largest.saturating_sub(ACK_BITS) <= self.acked_below {
                self.acked_below = self.acked_below.max(largest + 1);
                self.eliciting_since = None;
            }
        }
        self.on_datagram_sent(now, size);
        true
    }

    /// The end of the range `[end - 64, end]` a catch-up ack-only packet
    /// must cover, when packets arrived that the next regular header (the
    /// newest and the 64 below it) would not acknowledge.
    fn catch_up_ack(&self) -> Option<u64> {
        let largest = self.received.largest?;
        let oldest = self
            .eliciting_since?
            .max(largest.saturating_sub(RECEIVED_WINDOW - 1));
        let end = oldest + ACK_BITS;
        (end < largest).then_some(end)
    }

    /// Seals the packet at `out[start..]` if this session is encrypted.
    fn seal(&self, out: &mut Vec<u8>, start: usize, kind: crate::crypto::SealKind, seq: u64) {
        if let Some(crypto) = &self.crypto {
            crypto.seal(out, start, kind, seq);
        }
    }

    /// The 64-bit sequence number a received header's 16 bits stand for
    /// (the nonce of a sealed packet); None if too old to tell.
    pub(crate) fn received_seq(&self, seq: u16) -> Option<u64> {
        wire::unwrap_u16(self.received.largest.unwrap_or(0), seq)
    }

    /// True if a data packet with this header sequence number was not
    /// received yet (neither a duplicate nor too old).
    pub(crate) fn is_new_packet(&self, seq: u16) -> bool {
        self.received_seq(seq)
            .is_some_and(|s| self.received.arrival(s) == Arrival::New)
    }

    fn on_datagram_sent(&mut self, now: Instant, size: usize) {
        self.last_send = now;
        self.stats.packets_sent += 1;
        self.stats.bytes_sent += size as u64;
    }

    /// Fills the packet with frames: channels in priority order within their
    /// per-packet budget, then whatever room is left in priority order again.
    fn pack(&mut self, seq: u64, out: &mut Vec<u8>, end: usize, cx: &mut Context<'_>) -> bool {
        let Self {
            send,
            sent_frames,
            stats,
            ..
        } = self;
        let mut wrote = false;
        for pass in 0..2 {
            for &c in &cx.limits.order {
                let channel = &mut send[c];
                let budget = if pass == 0 {
                    channel.budget()
                } else {
                    usize::MAX
                };
                let mut used = 0usize;
                while let Some(unit) = channel.peek(seq) {
                    let room = end.saturating_sub(out.len());
                    if unit.frame_len > room || used.saturating_add(unit.frame_len) > budget {
                        break;
                    }
                    if unit.tracked {
                        sent_frames.push_back(SentFrame {
                            channel: c as u8,
                            part: unit.part,
                            id: unit.id,
                        });
                    }
                    if unit.retransmit {
                        stats.retransmits += 1;
                    }
                    channel.send_unit(unit, seq, out, cx.pool);
                    used += unit.frame_len;
                    wrote = true;
                }
            }
        }
        wrote
    }

    // ----- introspection -----

    pub fn stats(&self) -> ConnectionStats {
        let mut s = self.stats.clone();
        s.rtt_smoothed = self.rtt.smoothed();
        s.rtt_variation = self.rtt.variation();
        s.rtt_min = self.rtt.min();
        s.rto = self.current_rto();
        s.send_window_bytes = self.congestion.window();
        s.bytes_in_flight = self.in_flight;
        let resolved = s.packets_acked + s.packets_lost;
        s.loss_ratio = if resolved == 0 {
            0.0
        } else {
            s.packets_lost as f64 / resolved as f64
        };
        s.backoffs = [
            self.congestion.backoffs_loss,
            self.congestion.backoffs_delay,
            self.congestion.backoffs_timeout,
        ];
        s.losses_tolerated = self.congestion.losses_tolerated;
        s.messages_received = self.recv_stats.messages;
        s.duplicate_messages = self.recv_stats.duplicates;
        s.stale_messages = self.recv_stats.stale;
        s.incomplete_messages = self.recv_stats.incomplete_dropped;
        s.reassembly_memory_drops = self.recv_stats.no_memory;
        s.superseded_messages = self.send.iter().map(|c| c.dropped_superseded).sum();
        s.send_queue_messages = self.send.iter().map(SendChannel::queued_messages).sum();
        s.send_queue_bytes = self.send.iter().map(|c| c.queued_bytes).sum();
        s.receive_buffer_bytes = self.receive_bytes;
        s.reorder_buffered_messages = self.recv.iter().map(RecvChannel::buffered_messages).sum();
        s.reassemblies = self.recv.iter().map(RecvChannel::reassemblies).sum();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn received_window_dedups_and_acks() {
        let mut r = ReceivedPackets::new();
        assert_eq!(r.ack_fields(), None);
        for seq in [0u64, 1, 2, 4, 7] {
            assert_eq!(r.arrival(seq), Arrival::New);
            r.insert(seq);
        }
        assert_eq!(r.arrival(4), Arrival::Duplicate);
        assert_eq!(r.arrival(5), Arrival::New);
        let (ack, bits) = r.ack_fields().unwrap();
        assert_eq!(ack, 7);
        // 6 no, 5 no, 4 yes, 3 no, 2 yes, 1 yes, 0 yes
        assert_eq!(bits & 0x7F, 0b111_0100);
        r.insert(7 + RECEIVED_WINDOW + 5);
        assert_eq!(r.arrival(7), Arrival::TooOld);
        assert_eq!(r.arrival(7 + RECEIVED_WINDOW + 4), Arrival::New);
        let (_, bits) = r.ack_fields().unwrap();
        assert_eq!(bits, 0);
    }
}
