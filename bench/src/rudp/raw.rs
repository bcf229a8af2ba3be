//! `raw-udp`: no protocol at all, the machine's ceiling. The same
//! `BatchSocket` (recvmmsg/sendmmsg) as tessera, datagrams passed straight
//! through: no handshake, acks, retransmission or ordering.

use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

use tessera_net::driver::{BatchSocket, SocketConfig};
use tessera_net::TransmitBatch;

use super::{loopback, FanoutClients, FanoutEvent, FanoutServer, Role, Side, INPUT_BYTES};

pub(crate) const DESCRIPTION: &str = "bare UDP on the same BatchSocket (recvmmsg/sendmmsg, batch 64), one datagram per message, nothing else: the ceiling (ping: echo; clients=N: the server learns each client's address from its datagrams and sends it its updates)";

fn bind() -> io::Result<BatchSocket> {
    BatchSocket::bind(loopback(), &SocketConfig::default())
}

/// Sends the batch and empties it.
fn send(socket: &mut BatchSocket, batch: &mut TransmitBatch, now: Instant) -> io::Result<()> {
    if !batch.is_empty() {
        socket.send_batch(now, batch)?;
        batch.clear();
    }
    Ok(())
}

pub(crate) struct RawSide {
    socket: BatchSocket,
    batch: TransmitBatch,
    peer: Option<SocketAddr>,
}

impl RawSide {
    pub(crate) fn new(role: Role) -> io::Result<Self> {
        let socket = bind()?;
        Ok(Self {
            batch: TransmitBatch::new(socket.batch_size()),
            socket,
            peer: match role {
                Role::Server { .. } => None,
                Role::Client { server } => Some(server),
            },
        })
    }
}

impl Side for RawSide {
    fn local_addr(&self) -> SocketAddr {
        self.socket.local_addr()
    }

    fn is_connected(&self) -> bool {
        self.peer.is_some()
    }

    fn send(&mut self, now: Instant, bytes: &[u8]) -> bool {
        let Some(peer) = self.peer else { return false };
        if self.batch.is_full() && send(&mut self.socket, &mut self.batch, now).is_err() {
            return false;
        }
        self.batch.push(peer, bytes)
    }

    fn poll(&mut self, _now: Instant, on_message: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        loop {
            let n = self.socket.recv_batch()?;
            for (from, bytes) in self.socket.received() {
                self.peer.get_or_insert(from);
                on_message(bytes);
            }
            if n < self.socket.batch_size() {
                return Ok(());
            }
        }
    }

    fn flush(&mut self, now: Instant) -> io::Result<()> {
        send(&mut self.socket, &mut self.batch, now)
    }

    fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

/// Reads the client index a load-generator datagram starts with.
fn client_index(bytes: &[u8]) -> Option<usize> {
    Some(u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize)
}

pub(crate) struct RawFanoutServer {
    socket: BatchSocket,
    batch: TransmitBatch,
    /// Client address by client index.
    clients: Vec<Option<SocketAddr>>,
}

impl RawFanoutServer {
    pub(crate) fn new(clients: usize) -> io::Result<Self> {
        let socket = bind()?;
        Ok(Self {
            batch: TransmitBatch::new(socket.batch_size()),
            socket,
            clients: vec![None; clients],
        })
    }
}

impl FanoutServer for RawFanoutServer {
    fn local_addr(&self) -> SocketAddr {
        self.socket.local_addr()
    }

    fn poll(&mut self, _now: Instant, on_event: &mut dyn FnMut(FanoutEvent)) -> io::Result<()> {
        loop {
            let n = self.socket.recv_batch()?;
            for (from, bytes) in self.socket.received() {
                let Some(index) = client_index(bytes).filter(|&i| i < self.clients.len()) else {
                    continue;
                };
                let key = index as u64;
                if self.clients[index].is_none() {
                    self.clients[index] = Some(from);
                    on_event(FanoutEvent::Connected(key));
                }
                if bytes.len() == INPUT_BYTES {
                    on_event(FanoutEvent::Message(key));
                }
            }
            if n < self.socket.batch_size() {
                return Ok(());
            }
        }
    }

    fn send_update(&mut self, now: Instant, key: u64, bytes: &[u8]) {
        if let Some(Some(addr)) = self.clients.get(key as usize) {
            if self.batch.is_full() {
                let _ = send(&mut self.socket, &mut self.batch, now);
            }
            self.batch.push(*addr, bytes);
        }
    }

    fn flush(&mut self, now: Instant) -> io::Result<()> {
        send(&mut self.socket, &mut self.batch, now)
    }

    fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

/// Every client on one socket; a client "connects" by sending a short hello
/// that carries its index.
pub(crate) struct RawFanoutClients {
    socket: BatchSocket,
    batch: TransmitBatch,
    server: SocketAddr,
    connected: usize,
}

impl RawFanoutClients {
    pub(crate) fn new(server: SocketAddr, _clients: usize) -> io::Result<Self> {
        let socket = bind()?;
        Ok(Self {
            batch: TransmitBatch::new(socket.batch_size()),
            socket,
            server,
            connected: 0,
        })
    }
}

impl FanoutClients for RawFanoutClients {
    fn connect(&mut self, now: Instant, clients: Range<usize>) -> io::Result<()> {
        for client in clients {
            if self.batch.is_full() {
                send(&mut self.socket, &mut self.batch, now)?;
            }
            self.batch.push(self.server, &(client as u32).to_le_bytes());
            self.connected += 1;
        }
        send(&mut self.socket, &mut self.batch, now)
    }

    fn connected(&self) -> usize {
        self.connected
    }

    fn poll(&mut self, _now: Instant) -> io::Result<u64> {
        let mut updates = 0;
        loop {
            let n = self.socket.recv_batch()?;
            updates += self.socket.received().count() as u64;
            if n < self.socket.batch_size() {
                return Ok(updates);
            }
        }
    }

    fn send(&mut self, now: Instant, _client: usize, bytes: &[u8]) {
        if self.batch.is_full() {
            let _ = send(&mut self.socket, &mut self.batch, now);
        }
        self.batch.push(self.server, bytes);
    }

    fn flush(&mut self, now: Instant) -> io::Result<()> {
        send(&mut self.socket, &mut self.batch, now)
    }

    fn fds(&self, out: &mut Vec<RawFd>) {
        out.push(self.socket.as_raw_fd());
    }
}
