//! The impairment relay: a UDP proxy thread between one client and one
//! server, applying tessera-net's seeded `LinkConditioner` to each direction.
//! Every system goes through the same relay with the same seeds, so loss and
//! delay favour nobody (and no system's own conditioner is used).

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use tessera_net::conditioner::{ConditionerConfig, ConditionerStats, LinkConditioner};
use tessera_net::driver::{BatchSocket, SocketConfig};
use tessera_net::TransmitBatch;

use super::{loopback, wait_readable, Cores};

/// Two bound sockets: one the client sends to, one that talks to the server.
pub(crate) struct Relay {
    client_side: BatchSocket,
    server_side: BatchSocket,
}

/// A running relay.
pub(crate) struct RunningRelay {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<io::Result<[ConditionerStats; 2]>>,
}

fn socket() -> io::Result<BatchSocket> {
    let config = SocketConfig {
        reuse_port: false,
        batch: 64,
        ..SocketConfig::default()
    };
    BatchSocket::bind(loopback(), &config)
}

impl Relay {
    pub(crate) fn bind() -> io::Result<Self> {
        Ok(Self {
            client_side: socket()?,
            server_side: socket()?,
        })
    }

    /// The address clients connect to.
    pub(crate) fn client_facing(&self) -> SocketAddr {
        self.client_side.local_addr()
    }

    /// Starts forwarding between the client (learnt from its first
    /// datagram) and `server`, until stopped or `limit`.
    pub(crate) fn start(
        self,
        server: SocketAddr,
        link: ConditionerConfig,
        seed: u64,
        limit: Instant,
        cores: Cores,
    ) -> RunningRelay {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            // The receiving side is the lighter one: the sender keeps its
            // core to itself.
            cores.pin_server();
            self.run(server, link, seed, &flag, limit)
        });
        RunningRelay { stop, thread }
    }

    fn run(
        mut self,
        server: SocketAddr,
        link: ConditionerConfig,
        seed: u64,
        stop: &AtomicBool,
        limit: Instant,
    ) -> io::Result<[ConditionerStats; 2]> {
        let mut to_server = LinkConditioner::new(link.clone(), seed);
        let mut to_client = LinkConditioner::new(link, seed ^ 0x5EED_0000_0000_0001);
        let mut client: Option<SocketAddr> = None;
        let mut batch = TransmitBatch::new(64);
        let fds = [self.client_side.as_raw_fd(), self.server_side.as_raw_fd()];
        let batch_size = self.client_side.batch_size();
        while !stop.load(Ordering::Relaxed) && Instant::now() < limit {
            let now = Instant::now();
            loop {
                let n = self.client_side.recv_batch()?;
                for (from, bytes) in self.client_side.received() {
                    client = Some(from);
                    to_server.send(now, from, server, bytes);
                }
                if n < batch_size {
                    break;
                }
            }
            loop {
                let n = self.server_side.recv_batch()?;
                if let Some(client) = client {
                    for (from, bytes) in self.server_side.received() {
                        if from == server {
                            to_client.send(now, from, client, bytes);
                        }
                    }
                }
                if n < batch_size {
                    break;
                }
            }
            forward(&mut to_server, &mut self.server_side, &mut batch, now)?;
            forward(&mut to_client, &mut self.client_side, &mut batch, now)?;
            let until = [to_server.next_deadline(), to_client.next_deadline()]
                .into_iter()
                .flatten()
                .min();
            wait_readable(&fds, until);
        }
        Ok([to_server.stats(), to_client.stats()])
    }
}

/// Sends what `link` releases at `now` out of `socket`.
fn forward(
    link: &mut LinkConditioner,
    socket: &mut BatchSocket,
    batch: &mut TransmitBatch,
    now: Instant,
) -> io::Result<()> {
    batch.clear();
    while let Some(datagram) = link.poll(now) {
        batch.push(datagram.to, &datagram.bytes);
        if batch.is_full() {
            socket.send_batch(now, batch)?;
            batch.clear();
        }
    }
    if !batch.is_empty() {
        socket.send_batch(now, batch)?;
    }
    Ok(())
}

impl RunningRelay {
    /// Stops the relay; returns the two directions' conditioner counters.
    pub(crate) fn stop(self) -> Result<[ConditionerStats; 2], String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| "relay thread panicked".to_string())?
            .map_err(|e| format!("relay: {e}"))
    }
}
