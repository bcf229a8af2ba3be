//! tessera-net in the suite: one `Endpoint` on one `BatchSocket`
//! (recvmmsg/sendmmsg), driven the way a shard drives it: read every waiting
//! batch into `handle_datagram`, `handle_timeout` when due, drain events,
//! `send`, then drain `poll_transmit` into `send_batch`.
//!
//! Three flavors share that loop: `tessera` (settings tuned per case),
//! `tessera-encrypted` (the same settings, but the server requires connect
//! tokens, so every packet after the handshake is sealed) and
//! `tessera-default` (the game server's and game client's `Config`, to show
//! what the tuning buys).

use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Instant, SystemTime};

use tessera_net::driver::{BatchSocket, IoMode, SocketConfig};
use tessera_net::rng::Rng;
use tessera_net::token::{ConnectToken, SessionKeys, TokenKey, TokenRequest, KEY_LEN};
use tessera_net::{
    ChannelConfig, ChannelId, Config, ConnectionHandle, Endpoint, Event, SendError, TokenPolicy,
    TransmitBatch,
};

use super::{loopback, FanoutClients, FanoutEvent, FanoutServer, Role, Side, Workload};

pub(crate) const DESCRIPTION: &str = "tessera-net, one Endpoint per side on one BatchSocket (recvmmsg/sendmmsg, batch 64, 4 MiB buffers), every waiting batch read, then timers, events, sends and one transmit drain per loop turn, as a shard runs it; ping and clients=N: Config::server()/Config::client() (ack_delay 10 ms, RTO floor 50 ms, AIMD window with pacing) with peer_limit None set explicitly (the game server's 300 packets/s per peer would throttle a ping-pong or a stream) and connections_max raised to the connection count; reliable-100B: its lossy-link settings, congestion.loss_tolerance 0.2 (random loss below 20% is not congestion) and retransmission_copies 2 (each retransmission sent twice, in two packets), reliable_window from the window sweep (largest 32768), a 65536-message queue, 8 MiB receive buffer and 65536 pooled buffers for the bulk transfer; reliable messages on the reliable-ordered channel, updates on the unreliable-sequenced channel (newest wins); clear text (no connect token: the trusted-link mode)";

pub(crate) const ENCRYPTED_DESCRIPTION: &str = "tessera exactly as `tessera` (same Config, window and loop) but the server calls require_tokens (TokenPolicy: one TokenKey, the address clients reach it at, a wall-clock anchor) and every client connects with connect_with_token and a token minted for it (fresh session keys): every packet after the handshake is sealed with ChaCha20-Poly1305 (16-byte tag, in the trailer room every configuration keeps); the server checks each connection carries token claims";

pub(crate) const DEFAULT_DESCRIPTION: &str = "tessera with the configuration a game server starts with: Config::game_server(connections) on the server, Config::game_client(connections) on the clients (acks wait up to 60 ms for an input to ride on), no tuning of windows, queues or buffers (reliable_window 1024, a 4096-message / 4 MiB reliable queue, every loss backs off, one copy per retransmission); clients=N keeps game_server's peer_limit (300 packets/s per peer: the case's 20 Hz stays under it); reliable-100B sets peer_limit None, since a saturating stream from one peer is what the limit exists to stop (with it the server drops the stream and closes the connection for abuse within a second); stream and clients=N only (ping: the limit would throttle it, and without it the row is `tessera`'s); clear text";

pub(crate) const SINGLE_DESCRIPTION: &str = "tessera-net exactly as `tessera` (same Endpoint, Config and loop) but its server socket in IoMode::Single: recvfrom/sendto, one syscall per datagram, as glommio's UDP socket does; the load generator stays batched; clients=N only";

/// Which tessera row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flavor {
    /// Settings tuned per case, clear text.
    Tuned,
    /// `Tuned` with connect tokens: sealed packets.
    Encrypted,
    /// The game server's and game client's defaults.
    Default,
}

/// The configuration of one end (both ends must agree). `connections`:
/// how many the endpoint must hold. `window`: the stream's reliable window
/// (from the sweep) for the tuned flavors.
fn config(
    flavor: Flavor,
    workload: Workload,
    server: bool,
    connections: usize,
    window: Option<u32>,
) -> Config {
    if flavor == Flavor::Default {
        let mut config = if server {
            Config::game_server(connections)
        } else {
            Config::game_client(connections)
        };
        if workload == Workload::Stream {
            // 300 packets/s per peer would drop the stream and close it for
            // abuse: the one default the stream cannot keep.
            config.peer_limit = None;
        }
        return config;
    }
    let mut config = if server {
        Config::server()
    } else {
        Config::client()
    };
    // Explicit, although Config::server() has it off: the game server's
    // per-peer limit (300 packets/s) would throttle a bench stream.
    config.peer_limit = None;
    config.connections_max = config.connections_max.max(connections);
    if workload == Workload::Stream {
        config.reliable_window = window.map_or(tessera_net::RELIABLE_WINDOW_MAX, |w| {
            w.min(tessera_net::RELIABLE_WINDOW_MAX as u32) as u16
        });
        config.receive_buffer_bytes_max = 8 << 20;
        config.congestion.loss_tolerance = 0.2;
        config.retransmission_copies = 2;
        // Tens of thousands of messages in flight: keep their buffers.
        config.buffer_pool_max = 1 << 16;
        config.channels[ChannelId::RELIABLE_ORDERED.0 as usize] =
            ChannelConfig::reliable_ordered().queue_max(1 << 16, 16 << 20);
    }
    config
}

/// The key the bench's "login service" and its servers share.
const TOKEN_KEY: TokenKey = TokenKey([0x7E; KEY_LEN]);
/// Tokens outlive any run by far.
const TOKEN_LIFETIME_S: u64 = 3600;

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Makes a server require tokens naming `address`.
fn require_tokens(endpoint: &mut Endpoint, address: SocketAddr) -> io::Result<()> {
    endpoint
        .require_tokens(TokenPolicy {
            keys: vec![TOKEN_KEY],
            addresses: vec![address],
            clock: (Instant::now(), unix_ms()),
        })
        .map_err(io::Error::other)
}

/// Mints tokens as a login service would: fresh session keys and nonce per
/// token, from a seeded generator (the net crate draws no randomness).
struct Minter {
    rng: Rng,
}

impl Minter {
    fn new(seed: u64) -> Self {
        Self {
            rng: Rng::from_seed(seed),
        }
    }

    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        for chunk in out.chunks_mut(8) {
            let word = self.rng.next_u64().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
        out
    }

    fn mint(&mut self, client_id: u64, server: SocketAddr) -> io::Result<ConnectToken> {
        let keys = SessionKeys {
            client_to_server: self.bytes(),
            server_to_client: self.bytes(),
        };
        let nonce = self.bytes();
        ConnectToken::mint(
            &TOKEN_KEY,
            &TokenRequest {
                client_id,
                expires_unix_s: unix_ms() / 1000 + TOKEN_LIFETIME_S,
                servers: &[server],
                user_data: &client_id.to_le_bytes(),
            },
            keys,
            nonce,
        )
        .map_err(io::Error::other)
    }
}

/// Starts a client connection, with a token for the encrypted flavor.
fn connect(
    endpoint: &mut Endpoint,
    minter: &mut Option<Minter>,
    now: Instant,
    server: SocketAddr,
    client_id: u64,
) -> io::Result<ConnectionHandle> {
    match minter {
        Some(minter) => {
            let token = minter.mint(client_id, server)?;
            endpoint.connect_with_token(now, server, &token)
        }
        None => endpoint.connect(now, server),
    }
    .map_err(io::Error::other)
}

/// A server of the encrypted flavor only admits token sessions: a
/// connection without claims means the row measures clear text.
fn check_sealed(endpoint: &Endpoint, flavor: Flavor, connection: ConnectionHandle) {
    if flavor == Flavor::Encrypted {
        assert!(
            endpoint.token_claims(connection).is_some(),
            "tessera-encrypted accepted a connection without a token"
        );
    }
}

fn bind_with(mode: IoMode) -> io::Result<BatchSocket> {
    BatchSocket::bind(
        loopback(),
        &SocketConfig {
            mode,
            ..SocketConfig::default()
        },
    )
}

fn endpoint(config: Config, seed: u64) -> io::Result<Endpoint> {
    Endpoint::new(config, seed).map_err(io::Error::other)
}

// ---------------------------------------------------- one connection

pub(crate) struct TesseraSide {
    flavor: Flavor,
    server: bool,
    endpoint: Endpoint,
    socket: BatchSocket,
    batch: TransmitBatch,
    connection: Option<ConnectionHandle>,
    connected: bool,
}

impl TesseraSide {
    pub(crate) fn new(
        flavor: Flavor,
        workload: Workload,
        role: Role,
        window: Option<u32>,
    ) -> io::Result<Self> {
        let server = matches!(role, Role::Server { .. });
        let socket = bind_with(IoMode::Batched)?;
        let mut side = Self {
            flavor,
            server,
            endpoint: endpoint(
                config(flavor, workload, server, 1, window),
                if server { 1 } else { 2 },
            )?,
            batch: TransmitBatch::new(socket.batch_size()),
            socket,
            connection: None,
            connected: false,
        };
        let mut minter = (flavor == Flavor::Encrypted).then(|| Minter::new(5));
        match role {
            Role::Server { public } => {
                if flavor == Flavor::Encrypted {
                    let address = public.unwrap_or(side.socket.local_addr());
                    require_tokens(&mut side.endpoint, address)?;
                }
            }
            Role::Client { server } => {
                let handle = connect(&mut side.endpoint, &mut minter, Instant::now(), server, 1)?;
                side.connection = Some(handle);
            }
        }
        Ok(side)
    }
}

impl Side for TesseraSide {
    fn local_addr(&self) -> SocketAddr {
        self.socket.local_addr()
    }

    fn is_connected(&self) -> bool {
        self.connected
    }

    fn send(&mut self, _now: Instant, bytes: &[u8]) -> bool {
        let Some(connection) = self.connection else {
            return false;
        };
        match self
            .endpoint
            .send(connection, ChannelId::RELIABLE_ORDERED, bytes)
        {
            Ok(_) => true,
            Err(SendError::QueueFull(_)) => false,
            Err(e) => panic!("tessera send failed: {e}"),
        }
    }

    fn poll(&mut self, now: Instant, on_message: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        self.socket
            .receive_into(&mut self.endpoint, now, usize::MAX)?;
        while let Some(event) = self.endpoint.poll_event() {
            match event {
                Event::Connected { connection, .. } => {
                    if self.server {
                        check_sealed(&self.endpoint, self.flavor, connection);
                    }
                    self.connection = Some(connection);
                    self.connected = true;
                }
                Event::Message { bytes, .. } => {
                    on_message(&bytes);
                    self.endpoint.recycle(bytes);
                }
                Event::Disconnected { reason, .. } => {
                    return Err(io::Error::other(format!("disconnected: {reason:?}")));
                }
                Event::Acked { .. } => {}
            }
        }
        Ok(())
    }

    fn flush(&mut self, now: Instant) -> io::Result<()> {
        self.socket
            .transmit_from(&mut self.endpoint, &mut self.batch, now)
            .map(drop)
    }

    fn deadline(&mut self) -> Option<Instant> {
        self.endpoint.poll_timeout()
    }

    fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

// ---------------------------------------------------- clients=N

pub(crate) struct TesseraFanoutServer {
    flavor: Flavor,
    endpoint: Endpoint,
    socket: BatchSocket,
    batch: TransmitBatch,
    /// Handles by slot index (the key).
    handles: Vec<Option<ConnectionHandle>>,
}

impl TesseraFanoutServer {
    pub(crate) fn new(flavor: Flavor, clients: usize, mode: IoMode) -> io::Result<Self> {
        let socket = bind_with(mode)?;
        let mut endpoint = endpoint(config(flavor, Workload::PingPong, true, clients, None), 3)?;
        if flavor == Flavor::Encrypted {
            require_tokens(&mut endpoint, socket.local_addr())?;
        }
        Ok(Self {
            flavor,
            endpoint,
            batch: TransmitBatch::new(socket.batch_size()),
            socket,
            handles: Vec::with_capacity(clients),
        })
    }
}

impl FanoutServer for TesseraFanoutServer {
    fn local_addr(&self) -> SocketAddr {
        self.socket.local_addr()
    }

    fn poll(&mut self, now: Instant, on_event: &mut dyn FnMut(FanoutEvent)) -> io::Result<()> {
        self.socket
            .receive_into(&mut self.endpoint, now, usize::MAX)?;
        while let Some(event) = self.endpoint.poll_event() {
            match event {
                Event::Connected { connection, .. } => {
                    check_sealed(&self.endpoint, self.flavor, connection);
                    let index = connection.index() as usize;
                    if self.handles.len() <= index {
                        self.handles.resize(index + 1, None);
                    }
                    self.handles[index] = Some(connection);
                    on_event(FanoutEvent::Connected(index as u64));
                }
                Event::Message {
                    connection, bytes, ..
                } => {
                    on_event(FanoutEvent::Message(connection.index() as u64));
                    self.endpoint.recycle(bytes);
                }
                Event::Disconnected { connection, .. } => {
                    let index = connection.index() as usize;
                    if let Some(slot) = self.handles.get_mut(index) {
                        *slot = None;
                    }
                    on_event(FanoutEvent::Disconnected(index as u64));
                }
                Event::Acked { .. } => {}
            }
        }
        Ok(())
    }

    fn send_update(&mut self, _now: Instant, key: u64, bytes: &[u8]) {
        if let Some(Some(connection)) = self.handles.get(key as usize) {
            // A full sequenced queue drops its oldest update: never an error.
            let _ = self.endpoint.send(*connection, ChannelId::SEQUENCED, bytes);
        }
    }

    fn flush(&mut self, now: Instant) -> io::Result<()> {
        self.socket
            .transmit_from(&mut self.endpoint, &mut self.batch, now)
            .map(drop)
    }

    fn deadline(&mut self) -> Option<Instant> {
        self.endpoint.poll_timeout()
    }

    fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

/// Every client connection in one client `Endpoint` on one socket.
pub(crate) struct TesseraFanoutClients {
    endpoint: Endpoint,
    minter: Option<Minter>,
    socket: BatchSocket,
    batch: TransmitBatch,
    server: SocketAddr,
    handles: Vec<Option<ConnectionHandle>>,
    connected: usize,
}

impl TesseraFanoutClients {
    pub(crate) fn new(flavor: Flavor, server: SocketAddr, clients: usize) -> io::Result<Self> {
        let socket = bind_with(IoMode::Batched)?;
        Ok(Self {
            endpoint: endpoint(config(flavor, Workload::PingPong, false, clients, None), 4)?,
            minter: (flavor == Flavor::Encrypted).then(|| Minter::new(6)),
            batch: TransmitBatch::new(socket.batch_size()),
            socket,
            server,
            handles: vec![None; clients],
            connected: 0,
        })
    }
}

impl FanoutClients for TesseraFanoutClients {
    fn connect(&mut self, now: Instant, clients: Range<usize>) -> io::Result<()> {
        for client in clients {
            let handle = connect(
                &mut self.endpoint,
                &mut self.minter,
                now,
                self.server,
                client as u64 + 1,
            )?;
            self.handles[client] = Some(handle);
        }
        Ok(())
    }

    fn connected(&self) -> usize {
        self.connected
    }

    fn poll(&mut self, now: Instant) -> io::Result<u64> {
        self.socket
            .receive_into(&mut self.endpoint, now, usize::MAX)?;
        let mut updates = 0;
        while let Some(event) = self.endpoint.poll_event() {
            match event {
                Event::Connected { .. } => self.connected += 1,
                Event::Message { bytes, .. } => {
                    updates += 1;
                    self.endpoint.recycle(bytes);
                }
                Event::Disconnected { reason, .. } => {
                    return Err(io::Error::other(format!(
                        "a client connection closed: {reason:?}"
                    )));
                }
                Event::Acked { .. } => {}
            }
        }
        Ok(updates)
    }

    fn send(&mut self, _now: Instant, client: usize, bytes: &[u8]) {
        if let Some(Some(connection)) = self.handles.get(client) {
            let _ = self
                .endpoint
                .send(*connection, ChannelId::RELIABLE_ORDERED, bytes);
        }
    }

    fn flush(&mut self, now: Instant) -> io::Result<()> {
        self.socket
            .transmit_from(&mut self.endpoint, &mut self.batch, now)
            .map(drop)
    }

    fn deadline(&mut self) -> Option<Instant> {
        self.endpoint.poll_timeout()
    }

    fn fds(&self, out: &mut Vec<RawFd>) {
        out.push(self.socket.as_raw_fd());
    }
}
