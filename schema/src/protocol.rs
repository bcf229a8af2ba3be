//! What a game client and a Tessera server agree on beyond the frames
//! themselves: which RUDP channel carries what, and what a disconnect code
//! means. Both ends use these (the server's node core, the client library,
//! the load simulator), so they live here, where a client can reach them
//! without linking the server runtime.
//!
//! The channel numbers index the transport's default channel layout
//! (`tessera_net::Config`: 0 unreliable, 1 sequenced, 2 reliable-ordered,
//! 3 reliable-unordered).

/// The RUDP channel a frame travels on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Channel {
    /// Pings and pongs: lost is fine, late is useless.
    Unreliable = 0,
    /// Snapshots (the newest wins: a late one is dropped) and their acks.
    Snapshots = 1,
    /// Joins, inputs, leaves, welcomes, errors: reliable and ordered.
    Reliable = 2,
}

impl Channel {
    /// The channel number on the wire.
    pub const fn id(self) -> u8 {
        self as u8
    }
}

/// Disconnect codes (the RUDP disconnect reason).
pub mod disconnect {
    /// The client left.
    pub const LEFT: u16 = 1;
    /// The server is shutting down; reconnect later.
    pub const SHUTTING_DOWN: u16 = 2;
    /// The session broke the protocol.
    pub const PROTOCOL: u16 = 3;
    /// This gateway is draining: the avatar stays; resume it at another
    /// gateway (the `Gateways` message sent before names where).
    pub const MOVED: u16 = 4;
    /// The session kept sending far more game messages than a player can
    /// (the gateway's per-session input limit).
    pub const FLOODING: u16 = 5;

    /// What a code means, for people.
    pub fn describe(code: u16) -> &'static str {
        match code {
            LEFT => "left",
            SHUTTING_DOWN => "the server is shutting down",
            PROTOCOL => "protocol error",
            MOVED => "resume at another gateway",
            FLOODING => "sent far too many messages",
            _ => "unknown",
        }
    }
}
