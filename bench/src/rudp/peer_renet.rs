//! renet (`renet` + `renet_netcode`) in the suite, used as its README shows:
//! `RenetServer`/`RenetClient` over `NetcodeServerTransport`/
//! `NetcodeClientTransport` (netcode in unsecure mode, fine on loopback),
//! `update` then `receive_message` per client then `send_packets`.
//! A netcode client needs its own socket (clients are told apart by address).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant, SystemTime};

use renet::{
    ChannelConfig, ClientId, ConnectionConfig, DefaultChannel, RenetClient, RenetServer, SendType,
    ServerEvent,
};
use renet_netcode::{
    ClientAuthentication, NetcodeClientTransport, NetcodeServerTransport, ServerAuthentication,
    ServerConfig,
};

use super::{
    loopback, set_socket_buffers, FanoutClients, FanoutEvent, FanoutServer, Role, Side, Workload,
};

/// renetcode's `NETCODE_MAX_CLIENTS`.
pub(crate) const CLIENTS_MAX: usize = 1024;

pub(crate) const DESCRIPTION: &str = "renet 2.0 + renet_netcode 2.0 (netcode in unsecure token mode; its packets are still sealed with ChaCha20-Poly1305 under the token's keys), one RenetServer/RenetClient + Netcode transport per side (std UdpSocket, one syscall per datagram; one socket per client, as netcode identifies clients by address); default channels; reliable messages on ReliableOrdered, updates on Unreliable; resend_time 25 ms (2.5x the relay RTT) for ping and reliable-100B, 300 ms default for clients=N; reliable-100B: available_bytes_per_tick 1 MB and max_memory_usage_bytes 16 MiB on every channel (like tessera's 16 MiB reliable queue; renet's 5 MiB default is below the 65,536 x 100 B the harness lets be outstanding, and a full reliable channel disconnects), the sender asking can_send_message before each message; one-connection cases: update every loop turn, send_packets when a message was queued or 1 ms passed (it emits an ack packet per call); a disconnect on either side is reported with renet's and netcode's reasons; clients=N: the server ticks at 60 Hz as in its README (update, receive_message per client, send_packets; updates queued between ticks), the client load generator at 100 Hz; at most 1024 clients per server (renetcode's NETCODE_MAX_CLIENTS)";

/// A stream's channel memory: tessera's reliable queue holds 16 MiB.
const STREAM_CHANNEL_BYTES: usize = 16 << 20;

const PROTOCOL_ID: u64 = 0x7E55_E7A0;

/// `memory`: each channel's max_memory_usage_bytes, None: renet's default.
fn connection_config(
    resend: Duration,
    bytes_per_tick: u64,
    memory: Option<usize>,
) -> ConnectionConfig {
    let channels: Vec<ChannelConfig> = DefaultChannel::config()
        .into_iter()
        .map(|mut channel| {
            if let Some(bytes) = memory {
                channel.max_memory_usage_bytes = bytes;
            }
            channel.send_type = match channel.send_type {
                SendType::ReliableOrdered { .. } => SendType::ReliableOrdered {
                    resend_time: resend,
                },
                SendType::ReliableUnordered { .. } => SendType::ReliableUnordered {
                    resend_time: resend,
                },
                SendType::Unreliable => SendType::Unreliable,
            };
            channel
        })
        .collect();
    ConnectionConfig {
        available_bytes_per_tick: bytes_per_tick,
        server_channels_config: channels.clone(),
        client_channels_config: channels,
    }
}

fn workload_config(workload: Workload) -> ConnectionConfig {
    match workload {
        Workload::PingPong => connection_config(Duration::from_millis(25), 60_000, None),
        Workload::Stream => connection_config(
            Duration::from_millis(25),
            1 << 20,
            Some(STREAM_CHANNEL_BYTES),
        ),
    }
}

fn fanout_config() -> ConnectionConfig {
    ConnectionConfig::default()
}

fn wall_clock() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
}

fn transport_error(e: renet_netcode::NetcodeTransportError) -> io::Error {
    io::Error::other(format!("renet transport: {e}"))
}

/// A socket for a transport, and a duplicate of it to wait on.
fn socket() -> io::Result<(UdpSocket, SocketAddr, UdpSocket)> {
    let socket = UdpSocket::bind(loopback())?;
    set_socket_buffers(&socket)?;
    let local = socket.local_addr()?;
    let watch = socket.try_clone()?;
    Ok((socket, local, watch))
}

fn server(
    config: ConnectionConfig,
    clients: usize,
    public: Option<SocketAddr>,
) -> io::Result<(RenetServer, NetcodeServerTransport, SocketAddr, UdpSocket)> {
    let (socket, local, watch) = socket()?;
    let transport = NetcodeServerTransport::new(
        ServerConfig {
            current_time: wall_clock(),
            max_clients: clients.min(CLIENTS_MAX),
            protocol_id: PROTOCOL_ID,
            public_addresses: vec![public.unwrap_or(local)],
            authentication: ServerAuthentication::Unsecure,
        },
        socket,
    )?;
    Ok((RenetServer::new(config), transport, local, watch))
}

fn client(
    config: ConnectionConfig,
    server: SocketAddr,
    client_id: ClientId,
) -> io::Result<(RenetClient, NetcodeClientTransport, UdpSocket)> {
    let (socket, _, watch) = socket()?;
    let transport = NetcodeClientTransport::new(
        wall_clock(),
        ClientAuthentication::Unsecure {
            protocol_id: PROTOCOL_ID,
            client_id,
            server_addr: server,
            user_data: None,
        },
        socket,
    )
    .map_err(|e| io::Error::other(format!("renet client: {e}")))?;
    Ok((RenetClient::new(config), transport, watch))
}

enum Ends {
    Server {
        server: RenetServer,
        transport: Box<NetcodeServerTransport>,
        client: Option<ClientId>,
    },
    Client {
        client: Box<RenetClient>,
        transport: Box<NetcodeClientTransport>,
    },
}

pub(crate) struct RenetSide {
    ends: Ends,
    local: SocketAddr,
    watch: UdpSocket,
    last: Instant,
    /// A message was queued since the last `send_packets`.
    queued: bool,
    last_sent: Instant,
}

/// `send_packets` emits an ack packet on every call while acks are pending
/// (renet expects one call per game tick): when nothing new is queued, the
/// busy loops here call it at most this often.
const ACK_TICK: Duration = Duration::from_millis(1);

impl RenetSide {
    pub(crate) fn new(workload: Workload, role: Role) -> io::Result<Self> {
        let config = workload_config(workload);
        let (ends, local, watch) = match role {
            Role::Server { public } => {
                let (server, transport, local, watch) = server(config, 1, public)?;
                (
                    Ends::Server {
                        server,
                        transport: Box::new(transport),
                        client: None,
                    },
                    local,
                    watch,
                )
            }
            Role::Client { server } => {
                let (client, transport, watch) = client(config, server, 1)?;
                let local = watch.local_addr()?;
                (
                    Ends::Client {
                        client: Box::new(client),
                        transport: Box::new(transport),
                    },
                    local,
                    watch,
                )
            }
        };
        Ok(Self {
            ends,
            local,
            watch,
            last: Instant::now(),
            queued: false,
            last_sent: Instant::now(),
        })
    }
}

const RELIABLE: DefaultChannel = DefaultChannel::ReliableOrdered;

impl Side for RenetSide {
    fn local_addr(&self) -> SocketAddr {
        self.local
    }

    fn is_connected(&self) -> bool {
        match &self.ends {
            Ends::Server { client, .. } => client.is_some(),
            Ends::Client { client, .. } => client.is_connected(),
        }
    }

    fn send(&mut self, _now: Instant, bytes: &[u8]) -> bool {
        let size = bytes.len();
        match &mut self.ends {
            Ends::Server {
                server,
                client: Some(id),
                ..
            } => {
                // A full reliable channel disconnects: ask first.
                if !server.can_send_message(*id, RELIABLE, size) {
                    return false;
                }
                server.send_message(*id, RELIABLE, bytes.to_vec());
                self.queued = true;
                true
            }
            Ends::Client { client, .. } => {
                if !client.can_send_message(RELIABLE, size) {
                    return false;
                }
                client.send_message(RELIABLE, bytes.to_vec());
                self.queued = true;
                true
            }
            Ends::Server { client: None, .. } => false,
        }
    }

    fn poll(&mut self, now: Instant, on_message: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        let delta = now.saturating_duration_since(self.last);
        self.last = now;
        match &mut self.ends {
            Ends::Server {
                server,
                transport,
                client,
            } => {
                server.update(delta);
                transport.update(delta, server).map_err(transport_error)?;
                while let Some(event) = server.get_event() {
                    match event {
                        ServerEvent::ClientConnected { client_id } => *client = Some(client_id),
                        ServerEvent::ClientDisconnected { reason, .. } => {
                            return Err(io::Error::other(format!(
                                "renet server lost its client: {reason}"
                            )));
                        }
                    }
                }
                if let Some(id) = *client {
                    while let Some(message) = server.receive_message(id, RELIABLE) {
                        on_message(&message);
                    }
                }
            }
            Ends::Client { client, transport } => {
                client.update(delta);
                transport.update(delta, client).map_err(transport_error)?;
                while let Some(message) = client.receive_message(RELIABLE) {
                    on_message(&message);
                }
                if client.is_disconnected() {
                    return Err(io::Error::other(format!(
                        "renet client disconnected: renet reason {:?}, netcode reason {:?}",
                        client.disconnect_reason(),
                        transport.disconnect_reason()
                    )));
                }
            }
        }
        Ok(())
    }

    fn flush(&mut self, now: Instant) -> io::Result<()> {
        if !self.queued && now.saturating_duration_since(self.last_sent) < ACK_TICK {
            return Ok(());
        }
        self.queued = false;
        self.last_sent = now;
        match &mut self.ends {
            Ends::Server {
                server, transport, ..
            } => transport.send_packets(server),
            Ends::Client { client, transport } => {
                transport.send_packets(client).map_err(transport_error)?
            }
        }
        Ok(())
    }

    fn fd(&self) -> RawFd {
        self.watch.as_raw_fd()
    }
}

pub(crate) struct RenetFanoutServer {
    server: RenetServer,
    transport: NetcodeServerTransport,
    local: SocketAddr,
    watch: UdpSocket,
    last: Instant,
    clients: Vec<ClientId>,
    update: Option<renet::Bytes>,
    ticked: bool,
}

impl RenetFanoutServer {
    pub(crate) fn new(clients: usize) -> io::Result<Self> {
        let (server, transport, local, watch) = server(fanout_config(), clients, None)?;
        Ok(Self {
            server,
            transport,
            local,
            watch,
            last: Instant::now(),
            clients: Vec::with_capacity(clients),
            update: None,
            ticked: false,
        })
    }
}

impl FanoutServer for RenetFanoutServer {
    fn local_addr(&self) -> SocketAddr {
        self.local
    }

    fn poll(&mut self, now: Instant, on_event: &mut dyn FnMut(FanoutEvent)) -> io::Result<()> {
        let delta = now.saturating_duration_since(self.last);
        if delta < SERVER_TICK {
            return Ok(());
        }
        self.last = now;
        self.ticked = true;
        self.server.update(delta);
        self.transport
            .update(delta, &mut self.server)
            .map_err(transport_error)?;
        while let Some(event) = self.server.get_event() {
            match event {
                ServerEvent::ClientConnected { client_id } => {
                    self.clients.push(client_id);
                    on_event(FanoutEvent::Connected(client_id));
                }
                ServerEvent::ClientDisconnected { client_id, .. } => {
                    self.clients.retain(|c| *c != client_id);
                    on_event(FanoutEvent::Disconnected(client_id));
                }
            }
        }
        // renet's API: messages are taken per client and channel.
        for &id in &self.clients {
            while self.server.receive_message(id, RELIABLE).is_some() {
                on_event(FanoutEvent::Message(id));
            }
        }
        Ok(())
    }

    fn send_update(&mut self, _now: Instant, key: u64, bytes: &[u8]) {
        let update = self
            .update
            .get_or_insert_with(|| renet::Bytes::copy_from_slice(bytes))
            .clone();
        self.server
            .send_message(key, DefaultChannel::Unreliable, update);
    }

    fn flush(&mut self, _now: Instant) -> io::Result<()> {
        if std::mem::take(&mut self.ticked) {
            self.transport.send_packets(&mut self.server);
        }
        Ok(())
    }

    fn deadline(&mut self) -> Option<Instant> {
        Some(self.last + SERVER_TICK)
    }

    fn fd(&self) -> RawFd {
        self.watch.as_raw_fd()
    }

    /// renet's loop is a game tick: update, receive per client, send.
    fn wakes_on_readable(&self) -> bool {
        false
    }
}

/// The server's tick in the clients case, 60 Hz as in renet's README: its
/// API walks every client each tick (transport update, receive_message,
/// send_packets), so it runs at a game tick rather than on every datagram.
const SERVER_TICK: Duration = Duration::from_micros(16_667);

/// Load-generator tick of the renet clients.
const CLIENT_TICK: Duration = Duration::from_millis(10);

pub(crate) struct RenetFanoutClients {
    server: SocketAddr,
    clients: Vec<Option<(RenetClient, NetcodeClientTransport, UdpSocket)>>,
    last: Instant,
    ticked: bool,
    connected: usize,
}

impl RenetFanoutClients {
    pub(crate) fn new(server: SocketAddr, clients: usize) -> io::Result<Self> {
        Ok(Self {
            server,
            clients: (0..clients).map(|_| None).collect(),
            last: Instant::now(),
            ticked: false,
            connected: 0,
        })
    }
}

impl FanoutClients for RenetFanoutClients {
    fn connect(&mut self, _now: Instant, clients: Range<usize>) -> io::Result<()> {
        for index in clients {
            self.clients[index] = Some(client(fanout_config(), self.server, index as u64)?);
        }
        Ok(())
    }

    fn connected(&self) -> usize {
        self.connected
    }

    fn poll(&mut self, now: Instant) -> io::Result<u64> {
        let delta = now.saturating_duration_since(self.last);
        if delta < CLIENT_TICK {
            return Ok(0);
        }
        self.last = now;
        self.ticked = true;
        let mut updates = 0;
        let mut connected = 0;
        for (client, transport, _) in self.clients.iter_mut().flatten() {
            client.update(delta);
            transport.update(delta, client).map_err(transport_error)?;
            while client.receive_message(DefaultChannel::Unreliable).is_some() {
                updates += 1;
            }
            connected += client.is_connected() as usize;
        }
        self.connected = connected;
        Ok(updates)
    }

    fn send(&mut self, _now: Instant, client: usize, bytes: &[u8]) {
        if let Some((client, _, _)) = &mut self.clients[client] {
            if client.is_connected() {
                client.send_message(RELIABLE, bytes.to_vec());
            }
        }
    }

    fn flush(&mut self, _now: Instant) -> io::Result<()> {
        if !std::mem::take(&mut self.ticked) {
            return Ok(());
        }
        for (client, transport, _) in self.clients.iter_mut().flatten() {
            if client.is_connected() || client.is_connecting() {
                transport.send_packets(client).map_err(transport_error)?;
            }
        }
        Ok(())
    }

    fn deadline(&mut self) -> Option<Instant> {
        Some(self.last + CLIENT_TICK)
    }

    /// None: the clients tick at `CLIENT_TICK` whatever arrives (waking
    /// on a socket that is only read at the next tick would spin).
    fn fds(&self, _out: &mut Vec<RawFd>) {}
}
