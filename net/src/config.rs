//! Endpoint and channel configuration.

use std::time::Duration;

use crate::wire::{
    FRAGMENTED_LEN_MAX, FRAGMENT_FRAME_OVERHEAD, HANDSHAKE_MIN_LEN, HEADER_LEN,
    MESSAGE_FRAME_OVERHEAD,
};

/// Index of a channel in [`Config::channels`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelId(pub u8);

impl ChannelId {
    /// Channel 0 of [`Config::default`]: unreliable.
    pub const UNRELIABLE: ChannelId = ChannelId(0);
    /// Channel 1 of [`Config::default`]: unreliable-sequenced (snapshots).
    pub const SEQUENCED: ChannelId = ChannelId(1);
    /// Channel 2 of [`Config::default`]: reliable-ordered (events, handover).
    pub const RELIABLE_ORDERED: ChannelId = ChannelId(2);
    /// Channel 3 of [`Config::default`]: reliable-unordered.
    pub const RELIABLE_UNORDERED: ChannelId = ChannelId(3);
}

/// Delivery guarantees of a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChannelKind {
    /// At most once, any order. A fragmented message is dropped whole when
    /// one fragment is lost.
    Unreliable,
    /// At most once, and never older than a message already delivered
    /// (newest wins). A full send queue drops its oldest message.
    UnreliableSequenced,
    /// Exactly once, in send order.
    ReliableOrdered,
    /// Exactly once, any order.
    ReliableUnordered,
}

impl ChannelKind {
    /// True for the two reliable kinds.
    pub fn is_reliable(self) -> bool {
        matches!(self, Self::ReliableOrdered | Self::ReliableUnordered)
    }
}

/// One channel. Both ends of a connection must use the same channel list
/// (kinds are part of the handshake's config hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelConfig {
    /// Delivery guarantees.
    pub kind: ChannelKind,
    /// Higher goes first when a packet is filled.
    pub priority: u8,
    /// Bytes of frames this channel may put in one packet before channels of
    /// lower priority get a turn; what is left after every channel had its
    /// turn is filled in priority order again. 0 means no limit.
    pub packet_budget_bytes: usize,
    /// Messages waiting or unacknowledged at most; beyond, `send` fails
    /// (a sequenced channel drops its oldest instead).
    pub queue_messages_max: usize,
    /// Bytes waiting or unacknowledged at most; beyond, `send` fails.
    pub queue_bytes_max: usize,
    /// Emit [`crate::Event::Acked`] when a message of this channel is
    /// acknowledged (whole messages on unreliable channels; a fragmented
    /// unreliable message is never reported).
    pub notify_acks: bool,
}

impl ChannelConfig {
    fn with(
        kind: ChannelKind,
        priority: u8,
        queue_messages_max: usize,
        queue_bytes_max: usize,
    ) -> Self {
        Self {
            kind,
            priority,
            packet_budget_bytes: 0,
            queue_messages_max,
            queue_bytes_max,
            notify_acks: false,
        }
    }

    /// An unreliable channel with default limits.
    pub fn unreliable() -> Self {
        Self::with(ChannelKind::Unreliable, 64, 1024, 1 << 20)
    }

    /// An unreliable-sequenced channel with default limits (a short queue:
    /// stale snapshots are worthless).
    pub fn unreliable_sequenced() -> Self {
        Self::with(ChannelKind::UnreliableSequenced, 128, 8, 1 << 20)
    }

    /// A reliable-ordered channel with default limits (room for a few
    /// 256 KiB handover snapshots).
    pub fn reliable_ordered() -> Self {
        Self::with(ChannelKind::ReliableOrdered, 192, 4096, 4 << 20)
    }

    /// A reliable-unordered channel with default limits.
    pub fn reliable_unordered() -> Self {
        Self::with(ChannelKind::ReliableUnordered, 160, 4096, 4 << 20)
    }

    /// Sets the priority.
    pub fn priority(mut self, priority: u8) -> Self {
        self.priority = priority;
        self
    }

    /// Sets the per-packet byte budget.
    pub fn packet_budget_bytes(mut self, bytes: usize) -> Self {
        self.packet_budget_bytes = bytes;
        self
    }

    /// Sets the queue bounds.
    pub fn queue_max(mut self, messages: usize, bytes: usize) -> Self {
        self.queue_messages_max = messages;
        self.queue_bytes_max = bytes;
        self
    }

    /// Turns ack notifications on or off.
    pub fn notify_acks(mut self, on: bool) -> Self {
        self.notify_acks = on;
        self
    }
}

/// Congestion control and pacing.
#[derive(Debug, Clone, PartialEq)]
pub struct CongestionConfig {
    /// Initial send window, in packets of MTU size.
    pub initial_window_packets: usize,
    /// The window never goes below this many MTU-sized packets.
    pub min_window_packets: usize,
    /// The window never grows above this many bytes.
    pub max_window_bytes: usize,
    /// Window multiplier on a loss event (once per round trip).
    pub loss_beta: f64,
    /// Window multiplier when the smoothed RTT grows past
    /// `min_rtt * rtt_growth_ratio + rtt_growth_slack` (once per round trip).
    pub delay_beta: f64,
    /// See `delay_beta`.
    pub rtt_growth_ratio: f64,
    /// See `delay_beta`.
    pub rtt_growth_slack: Duration,
    /// Bytes a connection may send back to back before pacing spaces them.
    pub pacing_burst_bytes: usize,
    /// Loss rate (average over about the last 256 packets) below which a
    /// loss is not taken as congestion: for links that lose packets at
    /// random (radio), where AIMD would shrink the window to nothing.
    /// Congestion still shows as RTT growth (`delay_beta`), as loss above
    /// the tolerance, and as retransmission timeouts. 0 (the default): every
    /// loss event backs off. Values are clamped to `[0, 0.5]`.
    pub loss_tolerance: f64,
}

impl Default for CongestionConfig {
    fn default() -> Self {
        Self {
            initial_window_packets: 32,
            min_window_packets: 4,
            max_window_bytes: 8 << 20,
            loss_beta: 0.7,
            delay_beta: 0.85,
            rtt_growth_ratio: 1.5,
            rtt_growth_slack: Duration::from_millis(25),
            pacing_burst_bytes: 16 * 1200,
            loss_tolerance: 0.0,
        }
    }
}

/// Largest `reliable_window`: half the 16-bit message id space.
pub const RELIABLE_WINDOW_MAX: u16 = 32_768;

/// Configuration of an [`crate::Endpoint`] and of its connections.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The channels, indexed by [`ChannelId`] (at most 255).
    pub channels: Vec<ChannelConfig>,
    /// Largest datagram (UDP payload) this endpoint sends, header included.
    pub mtu: usize,
    /// Bytes kept free at the end of every packet: room for the AEAD tag of
    /// a sealed session (at least [`crate::crypto::TAG_LEN`], 16, for one;
    /// the default). A clear-text session leaves it unused, so that both
    /// kinds of session share one configuration.
    pub trailer_reserved_bytes: usize,
    /// Largest message `send` accepts (fragmented above one packet).
    pub message_bytes_max: usize,
    /// Reliable messages of one channel that may be in flight at once (span
    /// of message ids, at most [`RELIABLE_WINDOW_MAX`]). The receiver
    /// buffers at most this many out of order. A bulk transfer needs about
    /// messages/s x (RTT + loss recovery time) to keep the link busy.
    pub reliable_window: u16,
    /// Bytes a connection may hold in reassembly and reorder buffers (the
    /// next in-order message is always admitted on top of this).
    pub receive_buffer_bytes_max: usize,
    /// Bytes all connections of the endpoint may hold in those buffers.
    pub endpoint_receive_buffer_bytes_max: usize,
    /// Unreliable messages being reassembled at once per channel.
    pub unreliable_reassemblies_max: usize,
    /// An unreliable reassembly older than this is dropped.
    pub reassembly_timeout: Duration,
    /// Connections (any state) the endpoint holds at most.
    pub connections_max: usize,
    /// Answer handshakes (server role). `connect` works either way.
    pub accept_incoming: bool,
    /// A connection that hears nothing for this long is closed.
    pub idle_timeout: Duration,
    /// A connection that sent nothing for this long sends a ping.
    pub keepalive_interval: Duration,
    /// A handshake not finished after this long fails.
    pub handshake_timeout: Duration,
    /// First handshake resend interval (x1.5 per resend, at most 1 s).
    pub handshake_resend_interval: Duration,
    /// Longest an ack waits for a packet to ride on.
    pub ack_delay: Duration,
    /// Ack-eliciting packets received that force an immediate ack.
    pub ack_frequency: u32,
    /// RTT assumed before the first sample.
    pub initial_rtt: Duration,
    /// Floor of the retransmission timeout.
    pub rto_min: Duration,
    /// Ceiling of the retransmission timeout after backoff.
    pub rto_max: Duration,
    /// Congestion control.
    pub congestion: CongestionConfig,
    /// Period after which the handshake cookie secret rotates; a cookie is
    /// valid for one to two periods.
    pub cookie_rotation: Duration,
    /// Events waiting for `poll_event` at most; beyond, data packets are
    /// dropped unacknowledged (the peer retransmits) and counted.
    pub events_max: usize,
    /// Stateless replies (challenges, rejections) waiting to be sent at most.
    pub control_queue_max: usize,
    /// Copies of a disconnect packet sent on a graceful close.
    pub disconnect_copies: u8,
    /// Spacing of those copies.
    pub disconnect_interval: Duration,
    /// Packets one connection may add to a transmit batch before the next
    /// connection gets a turn.
    pub transmit_burst_packets: usize,
    /// Copies of every retransmission of a reliable frame, each in its own
    /// packet: 2 trades the retransmitted bytes (loss rate x traffic) for
    /// tail latency on lossy links, as a lost retransmission no longer costs
    /// another loss-detection round. 1 (the default) or 2; other values are
    /// clamped.
    pub retransmission_copies: u8,
    /// Message buffers kept for reuse.
    pub buffer_pool_max: usize,
    /// What one peer may send (abuse limits); None: unlimited (cluster
    /// links, clients).
    pub peer_limit: Option<PeerLimit>,
    /// What one source IP address (all its ports) may open; None:
    /// unlimited (cluster links, clients, a development server whose
    /// clients all share loopback).
    pub address_limit: Option<AddressLimit>,
}

/// Limits per source IP address, whatever the port: a flood from many
/// ports of one host cannot take every session slot or keep the
/// handshake path busy. Handshake packets over the rate are dropped
/// without a reply; a handshake past `sessions_max` live sessions is
/// refused with [`crate::RejectReason::TooManySessions`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AddressLimit {
    /// Handshake packets (requests and cookie responses) per second.
    pub handshakes_per_s: u32,
    /// How many the bucket holds, in seconds of its rate.
    pub burst: Duration,
    /// Live sessions at once.
    pub sessions_max: u32,
}

impl AddressLimit {
    /// A public game server's default: a household or a small LAN party
    /// behind one NAT connects freely, and one host cannot hold more than
    /// a few dozen slots. A host behind a carrier-grade NAT may need more.
    pub fn game_server() -> Self {
        Self {
            handshakes_per_s: 10,
            burst: Duration::from_secs(3),
            sessions_max: 32,
        }
    }
}

/// Receive limits per connection: token buckets of packets and bytes per
/// second, each holding `burst` worth. A packet over either is dropped
/// (after it opened, so a forger cannot spend a victim's budget) and
/// counted; `abuse_drops` drops within one second close the connection
/// with [`PeerLimit::CODE`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeerLimit {
    /// Packets per second.
    pub packets_per_s: u32,
    /// Bytes per second (datagram sizes).
    pub bytes_per_s: u32,
    /// How much the buckets hold, in seconds of their rate.
    pub burst: Duration,
    /// Drops within one second that close the connection (0: never).
    pub abuse_drops: u32,
}

impl PeerLimit {
    /// The disconnect code of a connection closed for sending too much
    /// (the transport reserves codes from 0xFF00).
    pub const CODE: u16 = 0xFF01;

    /// A game client's budget: its inputs (up to 120 Hz), acks and pings,
    /// with room to spare; a client doing far more is not playing.
    pub fn game_client() -> Self {
        Self {
            packets_per_s: 300,
            bytes_per_s: 128 * 1024,
            burst: Duration::from_secs(2),
            abuse_drops: 300,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            channels: vec![
                ChannelConfig::unreliable(),
                ChannelConfig::unreliable_sequenced(),
                ChannelConfig::reliable_ordered(),
                ChannelConfig::reliable_unordered(),
            ],
            mtu: 1200,
            trailer_reserved_bytes: crate::crypto::TAG_LEN,
            message_bytes_max: 256 * 1024,
            reliable_window: 1024,
            receive_buffer_bytes_max: 1 << 20,
            endpoint_receive_buffer_bytes_max: 256 << 20,
            unreliable_reassemblies_max: 4,
            reassembly_timeout: Duration::from_secs(2),
            connections_max: 16_384,
            accept_incoming: false,
            idle_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(5),
            handshake_resend_interval: Duration::from_millis(200),
            ack_delay: Duration::from_millis(10),
            ack_frequency: 2,
            initial_rtt: Duration::from_millis(100),
            rto_min: Duration::from_millis(50),
            rto_max: Duration::from_secs(3),
            congestion: CongestionConfig::default(),
            cookie_rotation: Duration::from_secs(5),
            events_max: 1 << 16,
            control_queue_max: 1024,
            disconnect_copies: 3,
            disconnect_interval: Duration::from_millis(30),
            transmit_burst_packets: 8,
            retransmission_copies: 1,
            buffer_pool_max: 4096,
            peer_limit: None,
            address_limit: None,
        }
    }
}

/// A configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Sealed sessions need 16 bytes of trailer for their tag.
    #[error("trailer_reserved_bytes must be at least 16 for sealed sessions, got {0}")]
    TrailerTooSmall(usize),
    /// Zero or more than 255 channels.
    #[error("between 1 and 255 channels are needed, got {0}")]
    ChannelCount(usize),
    /// MTU out of range.
    #[error("mtu must be between {min} and 65507 bytes, got {0}", min = HANDSHAKE_MIN_LEN)]
    Mtu(usize),
    /// Message limit out of range for the MTU.
    #[error("message_bytes_max {0} is too large (fragment count or wire limit)")]
    MessageBytesMax(usize),
    /// Reliable window out of range.
    #[error("reliable_window must be between 1 and 32768, got {0}")]
    ReliableWindow(u16),
    /// Receive buffer cannot hold one message.
    #[error("receive_buffer_bytes_max must be at least message_bytes_max")]
    ReceiveBuffer,
    /// A zero that must not be zero.
    #[error("{0} must not be zero")]
    Zero(&'static str),
}

/// Values derived from a validated [`Config`], shared by every connection.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// Channel indices, highest priority first.
    pub order: Vec<usize>,
    /// Bytes of a packet that frames may use after the header.
    pub frame_room: usize,
    /// Largest message sent unfragmented.
    pub single_max: usize,
    /// Largest fragment payload.
    pub fragment_max: usize,
}

/// How long a game client's acknowledgement of a snapshot waits for a packet
/// to ride on. A playing client sends an input every tick: with the 10 ms
/// default, most snapshot acks left as packets of their own (a bot sent ~37
/// packets/s for 20 inputs/s, and the server's receive path paid for each).
/// A little more than one 20 Hz tick lets them ride on the next input. Only
/// the server's view of the RTT grows (by up to this much); snapshots are
/// unreliable and the baseline acks are messages of their own.
pub const GAME_CLIENT_ACK_DELAY: Duration = Duration::from_millis(60);

impl Config {
    /// A server configuration (accepts incoming connections).
    pub fn server() -> Self {
        Self {
            accept_incoming: true,
            ..Self::default()
        }
    }

    /// A client configuration (connects out only).
    pub fn client() -> Self {
        Self::default()
    }

    /// A game server endpoint: the default channel layout with room for
    /// `sessions` connections.
    pub fn game_server(sessions: usize) -> Self {
        let mut c = Self::server();
        c.connections_max = sessions.max(1);
        c.peer_limit = Some(PeerLimit::game_client());
        c.address_limit = Some(AddressLimit::game_server());
        c
    }

    /// The matching game client settings (clients, the load simulator):
    /// acknowledgements wait [`GAME_CLIENT_ACK_DELAY`] for a packet to ride on.
    pub fn game_client(connections: usize) -> Self {
        let mut c = Self::client();
        c.connections_max = connections.max(1);
        c.ack_delay = GAME_CLIENT_ACK_DELAY;
        c
    }

    /// A cluster link endpoint (shard to shard between nodes, shard to
    /// coordinator): accepts incoming links, carries messages up to the
    /// wire's 16 MiB (a crowded cell's handover pre-copy), keeps a wide
    /// reliable window and roomy reassembly buffers, acknowledges quickly
    /// (a handover step waits on it).
    pub fn cluster(links: usize) -> Self {
        let mut c = Self::server();
        c.connections_max = links.max(1);
        c.message_bytes_max = 16 << 20;
        c.reliable_window = 8192;
        c.receive_buffer_bytes_max = 64 << 20;
        c.endpoint_receive_buffer_bytes_max = 512 << 20;
        c.ack_delay = Duration::from_millis(2);
        c.mtu = 1400;
        // Room for a few crowded cells' pre-copies in flight on one link.
        c.channels[ChannelId::RELIABLE_ORDERED.0 as usize] =
            ChannelConfig::reliable_ordered().queue_max(16_384, 64 << 20);
        c
    }

    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.channels.is_empty() || self.channels.len() > 255 {
            return Err(ConfigError::ChannelCount(self.channels.len()));
        }
        let overhead = HEADER_LEN + self.trailer_reserved_bytes + FRAGMENT_FRAME_OVERHEAD;
        if self.mtu < HANDSHAKE_MIN_LEN || self.mtu > 65_507 || self.mtu < overhead + 64 {
            return Err(ConfigError::Mtu(self.mtu));
        }
        let limits = self.limits();
        let fragments = self.message_bytes_max.div_ceil(limits.fragment_max);
        if self.message_bytes_max > FRAGMENTED_LEN_MAX as usize || fragments > u16::MAX as usize {
            return Err(ConfigError::MessageBytesMax(self.message_bytes_max));
        }
        // Message ids travel as 16 bits. A conforming sender only (re)sends
        // ids in [its base, base + window) and its base trails the
        // receiver's next by at most a window, so the receiver sees ids in
        // [next - window, next + window): inside the +-32768 `unwrap_u16`
        // resolves. Older copies come only in packets older than the
        // received window, which are dropped before their frames are read.
        if self.reliable_window == 0 || self.reliable_window > RELIABLE_WINDOW_MAX {
            return Err(ConfigError::ReliableWindow(self.reliable_window));
        }
        if self.receive_buffer_bytes_max < self.message_bytes_max {
            return Err(ConfigError::ReceiveBuffer);
        }
        for (value, name) in [
            (self.connections_max, "connections_max"),
            (self.events_max, "events_max"),
            (self.transmit_burst_packets, "transmit_burst_packets"),
            (
                self.congestion.min_window_packets,
                "congestion.min_window_packets",
            ),
            (
                self.unreliable_reassemblies_max,
                "unreliable_reassemblies_max",
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        for channel in &self.channels {
            if channel.queue_messages_max == 0 || channel.queue_bytes_max == 0 {
                return Err(ConfigError::Zero("channel queue bound"));
            }
        }
        if self.ack_frequency == 0 {
            return Err(ConfigError::Zero("ack_frequency"));
        }
        if let Some(limit) = &self.address_limit {
            if limit.handshakes_per_s == 0 || limit.burst.is_zero() || limit.sessions_max == 0 {
                return Err(ConfigError::Zero("address_limit"));
            }
        }
        if self.cookie_rotation.is_zero() {
            return Err(ConfigError::Zero("cookie_rotation"));
        }
        Ok(())
    }

    pub(crate) fn limits(&self) -> Limits {
        let mut order: Vec<usize> = (0..self.channels.len()).collect();
        // Stable: equal priorities keep channel order.
        order.sort_by_key(|&c| std::cmp::Reverse(self.channels[c].priority));
        let frame_room = self
            .mtu
            .saturating_sub(HEADER_LEN + self.trailer_reserved_bytes);
        Limits {
            order,
            frame_room,
            single_max: frame_room
                .saturating_sub(MESSAGE_FRAME_OVERHEAD)
                .min(u16::MAX as usize),
            fragment_max: frame_room
                .saturating_sub(FRAGMENT_FRAME_OVERHEAD)
                .clamp(1, u16::MAX as usize),
        }
    }

    /// Hash of what both ends must agree on (channel kinds, reliable window,
    /// message limit); carried in the handshake.
    pub fn protocol_hash(&self) -> u32 {
        // FNV-1a: stable across builds and platforms, unlike `Hash`.
        let mut hash: u32 = 0x811C_9DC5;
        let mut feed = |byte: u8| {
            hash ^= byte as u32;
            hash = hash.wrapping_mul(0x0100_0193);
        };
        for channel in &self.channels {
            feed(channel.kind as u8 + 1);
        }
        for byte in self.reliable_window.to_le_bytes() {
            feed(byte);
        }
        for byte in (self.message_bytes_max as u32).to_le_bytes() {
            feed(byte);
        }
        hash
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
        Config::server().validate().unwrap();
        let limits = Config::default().limits();
        assert_eq!(
            limits.frame_room,
            1200 - HEADER_LEN - crate::crypto::TAG_LEN
        );
        assert_eq!(limits.order, vec![2, 3, 1, 0]);
    }

    #[test]
    fn bad_configs_are_refused() {
        let mut c = Config::default();
        c.channels.clear();
        assert_eq!(c.validate(), Err(ConfigError::ChannelCount(0)));
        let c = Config {
            mtu: 100,
            ..Config::default()
        };
        assert_eq!(c.validate(), Err(ConfigError::Mtu(100)));
        let c = Config {
            message_bytes_max: 100 << 20,
            ..Config::default()
        };
        assert!(matches!(c.validate(), Err(ConfigError::MessageBytesMax(_))));
        let c = Config {
            receive_buffer_bytes_max: 1000,
            ..Config::default()
        };
        assert_eq!(c.validate(), Err(ConfigError::ReceiveBuffer));
        for (window, ok) in [(0, false), (1, true), (32_768, true), (32_769, false)] {
            let c = Config {
                reliable_window: window,
                ..Config::default()
            };
            assert_eq!(c.validate().is_ok(), ok, "reliable_window {window}");
        }
    }

    #[test]
    fn hash_tracks_channel_kinds() {
        let a = Config::default();
        let mut b = Config::default();
        assert_eq!(a.protocol_hash(), b.protocol_hash());
        b.channels[0].kind = ChannelKind::ReliableOrdered;
        assert_ne!(a.protocol_hash(), b.protocol_hash());
        // Local-only knobs do not change the hash.
        let c = Config {
            mtu: 1400,
            ..Config::default()
        };
        assert_eq!(a.protocol_hash(), c.protocol_hash());
    }
}
