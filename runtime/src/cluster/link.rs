//! A blocking RUDP link that speaks control frames (joins, tools).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tessera_cells::wire::{decode_control, encode_control, ControlMsg, ShardHeader, COORDINATOR};
use tessera_cells::TickId;
use tessera_net::driver::{BatchSocket, SocketConfig};
use tessera_net::{ChannelId, ConnectionHandle, Endpoint, Event, TransmitBatch};

use super::JoinError;

/// The channel of every cluster link, shard bundles and control frames
/// alike: reliable and ordered (a registry must arrive before the order
/// that relies on it; a handover's diff after its pre-copy).
pub const CLUSTER_CHANNEL: ChannelId = ChannelId::RELIABLE_ORDERED;

/// One link to a coordinator, driven by the calling thread.
pub struct ControlLink {
    endpoint: Endpoint,
    socket: BatchSocket,
    batch: TransmitBatch,
    connection: ConnectionHandle,
    remote: SocketAddr,
    seq: u64,
    /// Control frames refused (counted, each logged).
    pub refused: u64,
}

impl ControlLink {
    /// Connects (handshake included) within `timeout`.
    pub fn connect(
        remote: SocketAddr,
        timeout: Duration,
        key: Option<&super::ClusterKey>,
    ) -> Result<Self, JoinError> {
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
            super::auth::dial(&mut endpoint, Instant::now(), remote, key).map_err(|reason| {
                JoinError::Closed {
                    addr: remote,
                    reason,
                }
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
                    addr: remote.to_string(),
                    timeout,
                });
            }
        }
    }

    /// Sends a control message.
    pub fn send(&mut self, msg: &ControlMsg) {
        self.seq += 1;
        let header = ShardHeader::control(COORDINATOR, self.seq, TickId(0));
        let bytes = encode_control(&header, msg);
        if let Err(e) = self.endpoint.send(self.connection, CLUSTER_CHANNEL, &bytes) {
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
        self.socket.wait_readable(until);
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
