#![doc = include_str!("../README.md")]
//!
//! What this crate must never do: block, read the clock or the OS's
//! randomness, or touch a socket outside the `driver` module (feature
//! `driver`); grow a table, queue or buffer on outside input without a bound;
//! panic on bytes from the network.
#![warn(missing_docs)]

mod address;
mod channel;
pub mod conditioner;
mod config;
mod connection;
mod cookie;
mod crypto;
#[cfg(feature = "driver")]
pub mod driver;
mod endpoint;
#[cfg(any(test, feature = "testing"))]
pub mod pair;
mod pool;
mod recovery;
pub mod rng;
pub mod token;
mod types;
pub mod wire;

pub use config::{
    AddressLimit, ChannelConfig, ChannelId, ChannelKind, Config, ConfigError, CongestionConfig,
    PeerLimit, GAME_CLIENT_ACK_DELAY, RELIABLE_WINDOW_MAX,
};
pub use connection::ConnectionStats;
pub use crypto::TAG_LEN;
pub use endpoint::{Endpoint, EndpointStats, Footprint, TokenPolicy, Transmit, TransmitBatch};
pub use types::{
    ConnectError, ConnectionHandle, DisconnectReason, Event, MessageId, RejectReason, SendError,
    UnknownConnection,
};
