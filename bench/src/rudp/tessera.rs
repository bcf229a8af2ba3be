//! tessera-net in the suite: one `Endpoint` on one `BatchSocket`
//! (recvmmsg/sendmmsg), driven the way a shard drives it: read every waiting
//! batch into `handle_datagram`, `handle_timeout` when due, drain events,
//! `send`, then drain `poll_transmit` into `send_batch`.

use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

use tessera_net::driver::{BatchSocket, IoMode, SocketConfig};
use tessera_net::{
    ChannelConfig, ChannelId, Config, ConnectionHandle, Endpoint, Event, SendError, TransmitBatch,
};

use super::{loopback, FanoutClients, FanoutEvent, FanoutServer, Role, Side, Workload};

pub(crate) const DESCRIPTION: &str = "tessera-net, one Endpoint per side on one BatchSocket (recvmmsg/sendmmsg, batch 64, 4 MiB buffers), every waiting batch read, then timers, events, sends and one transmit drain per loop turn, as a shard runs it; ping and clients=N: the default Config on both sides (the game server's settings in protocol.rs: ack_delay 10 ms, RTO floor 50 ms, AIMD window with pacing; game clients hold acks 60 ms for the next input, these do not); reliable-100B: its lossy-link settings, congestion.loss_tolerance 0.2 (random loss below 20% is not congestion) and retransmission_copies 2 (each retransmission sent twice, in two packets), with reliable_window 32768 (the largest), a 65536-message queue, 8 MiB receive buffer and 65536 pooled buffers for the bulk transfer; reliable messages on the reliable-ordered channel, updates on the unreliable-sequenced channel (newest wins)";

/// The configuration for a workload (both ends must agree).
fn config(workload: Workload, server: bool) -> Config {
    let mut config = if server {
        Config::server()
    } else {
        Config::client()
    };
    if workload == Workload::Stream {
        config.reliable_window = tessera_net::RELIABLE_WINDOW_MAX;
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

pub(crate) const SINGLE_DESCRIPTION: &str = "tessera-net exactly as `tessera` (same Endpoint, Config and loop) but its server socket in IoMode::Single: recvfrom/sendto, one syscall per datagram, as glommio's UDP socket does; the load generator stays batched; clients=N only";

fn bind() -> io::Result<BatchSocket> {
    bind_with(IoMode::Batched)
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
    endpoint: Endpoint,
    socket: BatchSocket,
    batch: TransmitBatch,
    connection: Option<ConnectionHandle>,
    connected: bool,
}

impl TesseraSide {
    pub(crate) fn new(workload: Workload, role: Role) -> io::Result<Self> {
        let server = matches!(role, Role::Server { .. });
        let socket = bind()?;
        let mut side = Self {
            endpoint: endpoint(config(workload, server), if server { 1 } else { 2 })?,
            batch: TransmitBatch::new(socket.batch_size()),
            socket,
            connection: None,
            connected: false,
        };
        if let Role::Client { server } = role {
            let handle = side
                .endpoint
                .connect(Instant::now(), server)
                .map_err(io::Error::other)?;
            side.connection = Some(handle);
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
    endpoint: Endpoint,
    socket: BatchSocket,
    batch: TransmitBatch,
    /// Handles by slot index (the key).
    handles: Vec<Option<ConnectionHandle>>,
}

impl TesseraFanoutServer {
    pub(crate) fn new(clients: usize, mode: IoMode) -> io::Result<Self> {
        let socket = bind_with(mode)?;
        Ok(Self {
            endpoint: endpoint(Config::server(), 3)?,
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
    socket: BatchSocket,
    batch: TransmitBatch,
    server: SocketAddr,
    handles: Vec<Option<ConnectionHandle>>,
    connected: usize,
}

impl TesseraFanoutClients {
    pub(crate) fn new(server: SocketAddr, clients: usize) -> io::Result<Self> {
        let socket = bind()?;
        Ok(Self {
            endpoint: endpoint(Config::client(), 4)?,
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
            let handle = self
                .endpoint
                .connect(now, self.server)
                .map_err(io::Error::other)?;
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
