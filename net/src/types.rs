//! Handles, events and errors the caller sees.

use std::net::SocketAddr;

use crate::config::ChannelId;

/// A connection of an [`crate::Endpoint`]: a slot index and a generation, so
/// a handle of a closed connection never reaches the slot's next tenant.
/// Small, `Copy`, usable as a map key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionHandle {
    pub(crate) index: u32,
    pub(crate) generation: u32,
}

impl ConnectionHandle {
    /// The slot index (dense: usable to index a caller's `Vec`).
    pub fn index(self) -> u32 {
        self.index
    }

    /// The slot's generation.
    pub fn generation(self) -> u32 {
        self.generation
    }

    /// The handle as one number (generation in the high half), for callers
    /// that keep connections in code that does not depend on this crate.
    pub fn to_bits(self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.index)
    }

    /// The handle [`Self::to_bits`] gave. A made-up value names no live
    /// connection unless its generation matches: the endpoint checks.
    pub fn from_bits(bits: u64) -> Self {
        Self {
            index: bits as u32,
            generation: (bits >> 32) as u32,
        }
    }
}

/// Per-channel id of a message, as returned by `send` and reported by
/// [`Event::Acked`]. Counts from 0 per channel and connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub u64);

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    /// This side called `disconnect` with this code.
    Local(u16),
    /// The peer disconnected with this code.
    Remote(u16),
    /// Nothing was heard for the idle timeout.
    TimedOut,
    /// The handshake did not finish in time.
    HandshakeTimedOut,
    /// The server refused the connection.
    Rejected(RejectReason),
}

/// Why a server refused a handshake (sent on the wire as one byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// The server is at its connection cap.
    ServerFull,
    /// Channel layout or limits differ.
    IncompatibleConfig,
    /// The connect token expired: get a fresh one from the login service.
    TokenExpired,
    /// The connect token is not valid for the address the client reached.
    TokenWrongAddress,
    /// A live session already uses this token's player from another
    /// address.
    TokenInUse,
    /// The server requires a connect token and none came.
    TokenRequired,
    /// The client's IP address holds as many sessions as the server allows
    /// one address ([`crate::AddressLimit::sessions_max`]).
    TooManySessions,
    /// A reason this version does not know.
    Unknown(u8),
}

impl RejectReason {
    pub(crate) fn to_wire(self) -> u8 {
        match self {
            Self::ServerFull => 1,
            Self::IncompatibleConfig => 2,
            Self::TokenExpired => 3,
            Self::TokenWrongAddress => 4,
            Self::TokenInUse => 5,
            Self::TokenRequired => 6,
            Self::TooManySessions => 7,
            Self::Unknown(code) => code,
        }
    }

    pub(crate) fn from_wire(code: u8) -> Self {
        match code {
            1 => Self::ServerFull,
            2 => Self::IncompatibleConfig,
            3 => Self::TokenExpired,
            4 => Self::TokenWrongAddress,
            5 => Self::TokenInUse,
            6 => Self::TokenRequired,
            7 => Self::TooManySessions,
            other => Self::Unknown(other),
        }
    }
}

/// What happened, drained with [`crate::Endpoint::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A handshake finished (either role).
    Connected {
        /// The connection.
        connection: ConnectionHandle,
        /// The peer's address.
        addr: SocketAddr,
    },
    /// A message arrived. Give `bytes` back with
    /// [`crate::Endpoint::recycle`] to spare an allocation.
    Message {
        /// The connection.
        connection: ConnectionHandle,
        /// The channel it came on.
        channel: ChannelId,
        /// The message.
        bytes: Vec<u8>,
    },
    /// A message of a channel with `notify_acks` was acknowledged.
    Acked {
        /// The connection.
        connection: ConnectionHandle,
        /// The channel.
        channel: ChannelId,
        /// The id `send` returned.
        message: MessageId,
    },
    /// The connection is gone; its handle is now invalid.
    Disconnected {
        /// The connection.
        connection: ConnectionHandle,
        /// Why.
        reason: DisconnectReason,
    },
}

/// Why `send` refused a message. Nothing was queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The handle is stale or unknown.
    #[error("unknown connection")]
    UnknownConnection,
    /// The connection is closing.
    #[error("connection is closing")]
    Closing,
    /// No such channel.
    #[error("unknown channel {0}")]
    UnknownChannel(u8),
    /// Larger than `message_bytes_max`.
    #[error("message of {len} bytes exceeds the {max}-byte limit")]
    MessageTooLarge {
        /// The message's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The channel's queue is at its bound: back off and retry later.
    #[error("send queue of channel {0} is full")]
    QueueFull(u8),
}

/// Why `connect` failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// The endpoint holds `connections_max` connections.
    #[error("connection limit reached")]
    TooManyConnections,
    /// The configuration keeps no room for a connect token (MTU) or for
    /// the tag of a sealed packet (`trailer_reserved_bytes` under 16).
    #[error("the configuration has no room for a connect token or a packet tag")]
    NoRoomForToken,
}

/// The handle is stale or unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown connection")]
pub struct UnknownConnection;
