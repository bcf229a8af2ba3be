//! The impairment relay: a UDP proxy thread between one client and one
//! server. Each direction is a link: a bottleneck (a bandwidth cap with a
//! finite drop-tail queue, for the lossy cases) followed by tessera-net's
//! seeded `LinkConditioner` (random loss, one-way delay). Every system goes
//! through the same relay with the same seeds, so the link favours nobody
//! (and no system's own conditioner is used).
//!
//! Loss comes after the bottleneck, as on a real path: a datagram lost on
//! the way has used its share of the link, so extra copies are not free.
//! The relay counts what each side put on the wire (UDP payload plus
//! `HEADER_BYTES` of IPv4 and UDP headers, the unit the cap is in too).

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use tessera_net::conditioner::{ConditionerConfig, ConditionerStats, LinkConditioner};
use tessera_net::driver::{BatchSocket, SocketConfig};
use tessera_net::TransmitBatch;

use super::{loopback, wait_readable, Cores};

/// Bytes a datagram costs on the link beyond its UDP payload: IPv4 (20)
/// and UDP (8) headers.
pub(crate) const HEADER_BYTES: u64 = 28;

/// A link's capacity.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Capacity {
    /// The rate datagrams leave the queue at (payload + headers).
    pub bits_per_s: u64,
    /// Bytes waiting or being sent at most; a datagram that does not fit is
    /// dropped (drop-tail) and counted.
    pub queue_bytes: u64,
}

impl Capacity {
    /// How long the link takes to send `bytes`.
    fn transmission(&self, bytes: u64) -> Duration {
        Duration::from_nanos(bytes * 8 * 1_000_000_000 / self.bits_per_s)
    }
}

/// One direction's counters, shared with the thread that measures.
#[derive(Debug, Default)]
pub(crate) struct DirectionCounters {
    /// Datagrams the sending side put on the wire.
    pub datagrams: AtomicU64,
    /// Their bytes, headers included.
    pub bytes: AtomicU64,
    /// Datagrams dropped because the bottleneck queue was full.
    pub queue_drops: AtomicU64,
}

/// Both directions: `[0]` client -> server, `[1]` server -> client.
#[derive(Debug, Default)]
pub(crate) struct RelayCounters {
    pub directions: [DirectionCounters; 2],
}

/// A snapshot of [`RelayCounters`], summed over both directions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct WireTotals {
    pub datagrams: u64,
    pub bytes: u64,
    pub queue_drops: u64,
}

impl RelayCounters {
    pub(crate) fn totals(&self) -> WireTotals {
        let mut t = WireTotals::default();
        for d in &self.directions {
            t.datagrams += d.datagrams.load(Ordering::Acquire);
            t.bytes += d.bytes.load(Ordering::Acquire);
            t.queue_drops += d.queue_drops.load(Ordering::Acquire);
        }
        t
    }
}

impl WireTotals {
    /// What happened between two snapshots.
    pub(crate) fn since(self, earlier: WireTotals) -> WireTotals {
        WireTotals {
            datagrams: self.datagrams - earlier.datagrams,
            bytes: self.bytes - earlier.bytes,
            queue_drops: self.queue_drops - earlier.queue_drops,
        }
    }
}

/// A datagram waiting in the bottleneck, with the instant it has left.
struct Queued {
    departs: Instant,
    from: SocketAddr,
    to: SocketAddr,
    bytes: Vec<u8>,
}

/// One direction of the link.
struct Link {
    capacity: Option<Capacity>,
    queue: VecDeque<Queued>,
    queued_bytes: u64,
    /// When the link finishes sending what is queued.
    busy_until: Option<Instant>,
    conditioner: LinkConditioner,
}

impl Link {
    fn new(capacity: Option<Capacity>, conditioner: LinkConditioner) -> Self {
        Self {
            capacity,
            queue: VecDeque::new(),
            queued_bytes: 0,
            busy_until: None,
            conditioner,
        }
    }

    /// A datagram a side sent at `now`.
    fn offer(
        &mut self,
        now: Instant,
        from: SocketAddr,
        to: SocketAddr,
        bytes: &[u8],
        counters: &DirectionCounters,
    ) {
        let wire = bytes.len() as u64 + HEADER_BYTES;
        counters.datagrams.fetch_add(1, Ordering::Relaxed);
        counters.bytes.fetch_add(wire, Ordering::Relaxed);
        let Some(capacity) = self.capacity else {
            self.conditioner.send(now, from, to, bytes);
            return;
        };
        self.release(now);
        if self.queued_bytes + wire > capacity.queue_bytes {
            counters.queue_drops.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let start = self.busy_until.map_or(now, |b| b.max(now));
        let departs = start + capacity.transmission(wire);
        self.busy_until = Some(departs);
        self.queued_bytes += wire;
        self.queue.push_back(Queued {
            departs,
            from,
            to,
            bytes: bytes.to_vec(),
        });
    }

    /// Hands what has left the queue by `now` to the conditioner, at the
    /// instant it left.
    fn release(&mut self, now: Instant) {
        while self.queue.front().is_some_and(|q| q.departs <= now) {
            let q = self.queue.pop_front().expect("front exists");
            self.queued_bytes -= q.bytes.len() as u64 + HEADER_BYTES;
            self.conditioner.send(q.departs, q.from, q.to, &q.bytes);
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        [
            self.queue.front().map(|q| q.departs),
            self.conditioner.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

/// Two bound sockets: one the client sends to, one that talks to the server.
pub(crate) struct Relay {
    client_side: BatchSocket,
    server_side: BatchSocket,
    counters: Arc<RelayCounters>,
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
            counters: Arc::new(RelayCounters::default()),
        })
    }

    /// The address clients connect to.
    pub(crate) fn client_facing(&self) -> SocketAddr {
        self.client_side.local_addr()
    }

    /// What crossed the relay so far (read while it runs).
    pub(crate) fn counters(&self) -> Arc<RelayCounters> {
        self.counters.clone()
    }

    /// Starts forwarding between the client (learnt from its first
    /// datagram) and `server`, until stopped or `limit`.
    pub(crate) fn start(
        self,
        server: SocketAddr,
        link: ConditionerConfig,
        capacity: Option<Capacity>,
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
            self.run(server, link, capacity, seed, &flag, limit)
        });
        RunningRelay { stop, thread }
    }

    fn run(
        mut self,
        server: SocketAddr,
        link: ConditionerConfig,
        capacity: Option<Capacity>,
        seed: u64,
        stop: &AtomicBool,
        limit: Instant,
    ) -> io::Result<[ConditionerStats; 2]> {
        let mut to_server = Link::new(capacity, LinkConditioner::new(link.clone(), seed));
        let mut to_client = Link::new(
            capacity,
            LinkConditioner::new(link, seed ^ 0x5EED_0000_0000_0001),
        );
        let [up, down] = &self.counters.directions;
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
                    to_server.offer(now, from, server, bytes, up);
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
                            to_client.offer(now, from, client, bytes, down);
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
        Ok([to_server.conditioner.stats(), to_client.conditioner.stats()])
    }
}

/// Sends what `link` delivers by `now` out of `socket`.
fn forward(
    link: &mut Link,
    socket: &mut BatchSocket,
    batch: &mut TransmitBatch,
    now: Instant,
) -> io::Result<()> {
    link.release(now);
    batch.clear();
    while let Some(datagram) = link.conditioner.poll(now) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn the_cap_spaces_departures_and_the_queue_drops_its_tail() {
        // 1 Mbit/s: a 97 B payload (125 B on the wire) takes 1 ms.
        let capacity = Capacity {
            bits_per_s: 1_000_000,
            queue_bytes: 3 * 125,
        };
        let mut link = Link::new(
            Some(capacity),
            LinkConditioner::new(ConditionerConfig::default(), 1),
        );
        let counters = DirectionCounters::default();
        let start = Instant::now();
        for _ in 0..5 {
            link.offer(start, addr(1), addr(2), &[0u8; 97], &counters);
        }
        assert_eq!(counters.datagrams.load(Ordering::Relaxed), 5);
        assert_eq!(counters.bytes.load(Ordering::Relaxed), 5 * 125);
        assert_eq!(counters.queue_drops.load(Ordering::Relaxed), 2);
        let delivered_by = |link: &mut Link, ms: u64| {
            let now = start + Duration::from_millis(ms);
            link.release(now);
            let mut n = 0;
            while link.conditioner.poll(now).is_some() {
                n += 1;
            }
            n
        };
        assert_eq!(delivered_by(&mut link, 0), 0);
        assert_eq!(delivered_by(&mut link, 1), 1);
        assert_eq!(delivered_by(&mut link, 3), 2);
        // Room again: the queue drained.
        link.offer(
            start + Duration::from_millis(3),
            addr(1),
            addr(2),
            &[0u8; 97],
            &counters,
        );
        assert_eq!(counters.queue_drops.load(Ordering::Relaxed), 2);
    }
}
