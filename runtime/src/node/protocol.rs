//! What clients and the node agree on beyond the frames themselves.

use std::time::Duration;

use tessera_net::{ChannelId, Config};

/// Pings and pongs: unreliable.
pub const CHANNEL_UNRELIABLE: ChannelId = ChannelId(0);
/// Snapshots (newest wins) and acks.
pub const CHANNEL_SNAPSHOTS: ChannelId = ChannelId(1);
/// Joins, inputs, leaves, welcomes, errors: reliable and ordered.
pub const CHANNEL_RELIABLE: ChannelId = ChannelId(2);

/// Disconnect codes (the RUDP disconnect reason).
pub mod disconnect {
    /// The client left.
    pub const LEFT: u16 = 1;
    /// The server is shutting down; reconnect later.
    pub const SHUTTING_DOWN: u16 = 2;
    /// The session broke the protocol.
    pub const PROTOCOL: u16 = 3;
}

/// The RUDP settings of a game server endpoint: the default channel layout
/// (0 unreliable, 1 sequenced, 2 reliable-ordered, 3 reliable-unordered)
/// with room for `sessions` connections.
pub fn server_config(sessions: usize) -> Config {
    let mut c = Config::server();
    c.connections_max = sessions.max(1);
    c
}

/// The matching client settings (clients and the load simulator).
pub fn client_config(connections: usize) -> Config {
    let mut c = Config::client();
    c.connections_max = connections.max(1);
    c.ack_delay = CLIENT_ACK_DELAY;
    c
}

/// How long a client's acknowledgement of a snapshot waits for a packet to
/// ride on. A playing client sends an input every tick: with the 10 ms
/// default, most snapshot acks left as packets of their own (a bot sent ~37
/// packets/s for 20 inputs/s, and the server's receive path paid for each).
/// A little more than one 20 Hz tick lets them ride on the next input. Only
/// the server's view of the RTT grows (by up to this much); snapshots are
/// unreliable and the baseline acks are messages of their own.
pub const CLIENT_ACK_DELAY: Duration = Duration::from_millis(60);
