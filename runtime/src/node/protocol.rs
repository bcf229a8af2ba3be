//! What clients and the node agree on beyond the frames themselves.

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
    c
}
