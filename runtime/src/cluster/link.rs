//! A blocking RUDP link that speaks control frames (joins, tools).

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use tessera_cells::wire::{decode_control, encode_control, ControlMsg, ShardHeader};
use tessera_cells::{CellId, ShardRef, TickId};
use tessera_net::driver::{BatchSocket, SocketConfig};
use tessera_net::{ChannelId, ConnectionHandle, Endpoint, Event, TransmitBatch};

use super::JoinError;

/// The channel control frames use (reliable, ordered: a registry must
/// arrive before the order that relies on it).
pub const CONTROL_CHANNEL: ChannelId = ChannelId::RELIABLE_ORDERED;

/// One link to a coordinator, driven by the calling thread.
pub struct ControlLink {
    endpoint: Endpoint,
    socket: BatchSocket,
    batch: TransmitBatch,
    connection: ConnectionHandle,
    remote: SocketAddr,
    seq: u64,
    /// Control frames refused (counted, logged once each).
    pub refused: u64,
}

fn wait_readable(socket: &BatchSocket, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(1000) as libc::c_int;
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe {
        libc::poll(&mut pfd, 1, ms);
    }
}

impl ControlLink {
    /// Connects (handshake included) within `timeout`.
    pub fn connect(remote: SocketAddr, timeout: Duration) -> Result<Self, JoinError> {
        let local: SocketAddr = if remote.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        }
        .parse()
        .expect("literal");
        let socket = BatchSocket::bind(
            local,
            &SocketConfig {
                reuse_port: false,
                ..SocketConfig::default()
            },
        )?;
        let seed = tessera_net::driver::os_seed().unwrap_or(0xC0DE);
        let mut endpoint =
            Endpoint::new(tessera_net::Config::cluster(1), seed).expect("valid cluster config");
        let connection =
            endpoint
                .connect(Instant::now(), remote)
                .map_err(|e| JoinError::Closed {
                    addr: remote,
                    reason: e.to_string(),
                })?;
        let batch = TransmitBatch::new(socket.batch_size());
        let mut link = Self {
            endpoint,
            socket,
            batch,
            connection,
            remote,
            seq: 0,
            refused: 0,
        };
        let deadline = Instant::now() + timeout;
        loop {
            // Nothing but the handshake can arrive before we registered.
            let (connected, _) = link.pump_inner(Duration::from_millis(20))?;
            if connected {
                return Ok(link);
            }
            if Instant::now() >= deadline {
                return Err(JoinError::Unreachable {
                    addr: remote,
                    timeout,
                });
            }
        }
    }

    /// Sends a control message.
    pub fn send(&mut self, msg: &ControlMsg) {
        self.seq += 1;
        let header = ShardHeader {
            cell: CellId::root(0, 0, 0),
            epoch: 0,
            seq: self.seq,
            sender: ShardRef {
                node: u16::MAX,
                shard: u16::MAX,
            },
            tick: TickId(0),
        };
        let bytes = encode_control(&header, msg);
        if let Err(e) = self.endpoint.send(self.connection, CONTROL_CHANNEL, &bytes) {
            tracing::warn!(error = ?e, kind = msg.kind(), "control message not sent");
        }
        let _ = self
            .socket
            .transmit_from(&mut self.endpoint, &mut self.batch, Instant::now());
    }

    /// Runs the link for up to `wait`; returns what arrived.
    pub fn pump(&mut self, wait: Duration) -> Result<Vec<ControlMsg>, JoinError> {
        self.pump_inner(wait).map(|(_, m)| m)
    }

    fn pump_inner(&mut self, wait: Duration) -> Result<(bool, Vec<ControlMsg>), JoinError> {
        let now = Instant::now();
        let until = self
            .endpoint
            .poll_timeout()
            .map_or(wait, |t| t.saturating_duration_since(now).min(wait));
        wait_readable(&self.socket, until);
        let now = Instant::now();
        let _ = self
            .socket
            .receive_into(&mut self.endpoint, now, usize::MAX);
        self.endpoint.handle_timeout(now);
        let mut connected = false;
        let mut out = Vec::new();
        let mut closed = None;
        while let Some(ev) = self.endpoint.poll_event() {
            match ev {
                Event::Connected { .. } => connected = true,
                Event::Message { bytes, .. } => {
                    match decode_control(&bytes) {
                        Ok((_, msg)) => out.push(msg),
                        Err(e) => {
                            self.refused += 1;
                            tracing::warn!(error = %e, "control frame refused");
                        }
                    }
                    self.endpoint.recycle(bytes);
                }
                Event::Disconnected { reason, .. } => closed = Some(format!("{reason:?}")),
                Event::Acked { .. } => {}
            }
        }
        let _ = self
            .socket
            .transmit_from(&mut self.endpoint, &mut self.batch, now);
        if let Some(reason) = closed {
            return Err(JoinError::Closed {
                addr: self.remote,
                reason,
            });
        }
        Ok((connected, out))
    }

    /// Closes the link gracefully (the peer hears it).
    pub fn close(&mut self) {
        let now = Instant::now();
        let _ = self.endpoint.disconnect(now, self.connection, 0);
        let _ = self
            .socket
            .transmit_from(&mut self.endpoint, &mut self.batch, now);
    }
}
