//! `rudp` suite: tessera-net against ENet (`rusty_enet`), KCP (`kcp`), renet
//! (`renet` + `renet_netcode`) and QUIC (`quinn`), with `raw-udp` (a bare
//! recvmmsg/sendmmsg loop, no protocol at all) as the machine's ceiling.
//!
//! Three cases, every system on the same loopback, payloads and schedule:
//!
//! 1. `ping-32B`: one connection, a 32 B reliable message echoed back, one at
//!    a time; round-trip time p50/p99. Both sides busy-poll on their own core.
//! 2. `reliable-100B loss=N%`: one reliable-ordered stream of 100 B messages
//!    through an impairment relay (the same seeded [`LinkConditioner`] for
//!    every system): delivered messages/s with the sender saturating, then
//!    delivery latency (send call -> in-order delivery) at a steady
//!    1,000 msg/s.
//! 3. `clients=N`: N connections to one server endpoint; each client sends a
//!    32 B reliable message 20 times/s and the server sends each client a
//!    300 B unreliable update 20 times/s (staggered over 1 ms buckets). Server
//!    thread CPU per connection and delivered packets/s vs `raw-udp`. Here
//!    `tessera-single-syscall` runs the same tessera server with one syscall
//!    per datagram (recvfrom/sendto, as glommio's UDP socket does) instead
//!    of recvmmsg/sendmmsg: what batching buys.
//!
//! Systems are alternated within each repetition; medians of the repetitions
//! are reported (latency percentiles come from each repetition's
//! hdrhistogram). Loss and delay come from one impairment relay
//! (`relay.rs`) with the same seeds for every system.
//!
//! The peers are behind the `peers` cargo feature (they are slow to build);
//! without it the suite runs tessera and raw-udp and says so.

use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tessera_net::conditioner::{ConditionerConfig, Loss};
use tessera_net::driver::IoMode;

use crate::report::{median, Report};

mod raw;
mod relay;
mod tessera;

#[cfg(feature = "peers")]
mod peer_enet;
#[cfg(feature = "peers")]
mod peer_kcp;
#[cfg(feature = "peers")]
mod peer_quinn;
#[cfg(feature = "peers")]
mod peer_renet;

/// Options of the `rudp` suite.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A short run, for CI: one repetition, short windows.
    #[arg(long)]
    pub quick: bool,
    /// Repetitions per system and case (median reported).
    #[arg(long)]
    pub reps: Option<usize>,
    /// Systems to run (comma separated), e.g. `tessera,kcp`. Default: all built.
    #[arg(long, value_delimiter = ',')]
    pub systems: Option<Vec<String>>,
    /// Cases to run (comma separated): `ping`, `stream`, `clients`.
    #[arg(long, value_delimiter = ',')]
    pub cases: Option<Vec<String>>,
    /// Loss rates of the stream case, in percent (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub loss: Option<Vec<f64>>,
    /// Connection counts of the clients case (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub clients: Option<Vec<usize>>,
    /// Measured seconds per repetition of the stream and clients cases
    /// (profiling runs want longer ones).
    #[arg(long)]
    pub seconds: Option<f64>,
}

// ------------------------------------------------------------------ systems

/// A system under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum System {
    Tessera,
    /// tessera-net with one syscall per datagram (`IoMode::Single`): the
    /// measure of what recvmmsg/sendmmsg batching buys (clients=N only).
    TesseraSingle,
    RawUdp,
    #[cfg(feature = "peers")]
    Enet,
    #[cfg(feature = "peers")]
    Kcp,
    #[cfg(feature = "peers")]
    Renet,
    #[cfg(feature = "peers")]
    Quinn,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Tessera => "tessera",
            System::TesseraSingle => "tessera-single-syscall",
            System::RawUdp => "raw-udp",
            #[cfg(feature = "peers")]
            System::Enet => "rusty_enet",
            #[cfg(feature = "peers")]
            System::Kcp => "kcp",
            #[cfg(feature = "peers")]
            System::Renet => "renet",
            #[cfg(feature = "peers")]
            System::Quinn => "quinn",
        }
    }

    fn all() -> Vec<System> {
        #[cfg(feature = "peers")]
        {
            vec![
                System::Tessera,
                System::TesseraSingle,
                System::RawUdp,
                System::Enet,
                System::Kcp,
                System::Renet,
                System::Quinn,
            ]
        }
        #[cfg(not(feature = "peers"))]
        {
            vec![System::Tessera, System::TesseraSingle, System::RawUdp]
        }
    }

    /// Most connections one server endpoint of this system can hold.
    fn connections_max(self) -> Option<usize> {
        match self {
            #[cfg(feature = "peers")]
            System::Enet => Some(peer_enet::PEERS_MAX),
            #[cfg(feature = "peers")]
            System::Renet => Some(peer_renet::CLIENTS_MAX),
            _ => None,
        }
    }
}

/// What a one-connection side is configured for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Workload {
    /// Small messages, lowest latency.
    PingPong,
    /// A saturating reliable stream of small messages.
    Stream,
}

/// Which end of a one-connection case.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Role {
    /// Binds 127.0.0.1:0 and accepts one connection. `public` is the address
    /// clients send to (the relay's), when it is not the bound one (renet's
    /// netcode checks it).
    Server {
        #[cfg_attr(not(feature = "peers"), allow(dead_code))]
        public: Option<SocketAddr>,
    },
    /// Connects to `server`.
    Client { server: SocketAddr },
}

/// One end of one connection, driven by the generic loops below (cases 1
/// and 2). Messages are reliable and ordered.
pub(crate) trait Side {
    /// The bound address.
    fn local_addr(&self) -> SocketAddr;
    /// Handshake finished (a server: a client connected).
    fn is_connected(&self) -> bool;
    /// Queues a message; false is backpressure (try again later).
    fn send(&mut self, now: Instant, bytes: &[u8]) -> bool;
    /// Reads what the socket holds, runs due timers and hands every
    /// delivered message to `on_message`.
    fn poll(&mut self, now: Instant, on_message: &mut dyn FnMut(&[u8])) -> io::Result<()>;
    /// Sends what is queued.
    fn flush(&mut self, now: Instant) -> io::Result<()>;
    /// The next instant the protocol wants to run timers, if it says.
    fn deadline(&mut self) -> Option<Instant> {
        None
    }
    /// The socket to wait on.
    fn fd(&self) -> RawFd;
}

fn make_side(system: System, workload: Workload, role: Role) -> io::Result<Box<dyn Side>> {
    Ok(match system {
        System::Tessera => Box::new(tessera::TesseraSide::new(workload, role)?),
        System::TesseraSingle => {
            return Err(io::Error::other(
                "tessera-single-syscall runs clients=N only",
            ))
        }
        System::RawUdp => Box::new(raw::RawSide::new(role)?),
        #[cfg(feature = "peers")]
        System::Enet => Box::new(peer_enet::EnetSide::new(workload, role)?),
        #[cfg(feature = "peers")]
        System::Kcp => Box::new(peer_kcp::KcpSide::new(workload, role)?),
        #[cfg(feature = "peers")]
        System::Renet => Box::new(peer_renet::RenetSide::new(workload, role)?),
        #[cfg(feature = "peers")]
        System::Quinn => return Err(io::Error::other("quinn runs its own async loops")),
    })
}

/// What the server of the clients case reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FanoutEvent {
    /// A client connected; the key names it in `send_update`.
    Connected(u64),
    /// A client message arrived.
    Message(u64),
    /// A client went away.
    Disconnected(u64),
}

/// The server of the clients case: one endpoint, one socket.
pub(crate) trait FanoutServer {
    fn local_addr(&self) -> SocketAddr;
    /// Reads everything waiting, runs timers, reports events.
    fn poll(&mut self, now: Instant, on_event: &mut dyn FnMut(FanoutEvent)) -> io::Result<()>;
    /// Queues a 300 B update (unreliable, newest wins where offered).
    fn send_update(&mut self, now: Instant, key: u64, bytes: &[u8]);
    /// Sends what is queued.
    fn flush(&mut self, now: Instant) -> io::Result<()>;
    fn deadline(&mut self) -> Option<Instant> {
        None
    }
    fn fd(&self) -> RawFd;
    /// False for a server that ticks at its own rate instead of waking on
    /// every datagram (renet).
    fn wakes_on_readable(&self) -> bool {
        true
    }
}

/// The load generator of the clients case: many client connections, as few
/// sockets as the system allows.
pub(crate) trait FanoutClients {
    /// Starts the handshakes of `clients`.
    fn connect(&mut self, now: Instant, clients: Range<usize>) -> io::Result<()>;
    /// Clients whose handshake finished.
    fn connected(&self) -> usize;
    /// Reads everything waiting, runs timers; returns updates received.
    fn poll(&mut self, now: Instant) -> io::Result<u64>;
    /// Queues a 32 B reliable message from client `client`.
    fn send(&mut self, now: Instant, client: usize, bytes: &[u8]);
    fn flush(&mut self, now: Instant) -> io::Result<()>;
    fn deadline(&mut self) -> Option<Instant> {
        None
    }
    /// Sockets to wait on.
    fn fds(&self, out: &mut Vec<RawFd>);
}

fn make_fanout_server(system: System, clients: usize) -> io::Result<Box<dyn FanoutServer>> {
    Ok(match system {
        System::Tessera => Box::new(tessera::TesseraFanoutServer::new(clients, IoMode::Batched)?),
        System::TesseraSingle => {
            Box::new(tessera::TesseraFanoutServer::new(clients, IoMode::Single)?)
        }
        System::RawUdp => Box::new(raw::RawFanoutServer::new(clients)?),
        #[cfg(feature = "peers")]
        System::Enet => Box::new(peer_enet::EnetFanoutServer::new(clients)?),
        #[cfg(feature = "peers")]
        System::Kcp => Box::new(peer_kcp::KcpFanoutServer::new()?),
        #[cfg(feature = "peers")]
        System::Renet => Box::new(peer_renet::RenetFanoutServer::new(clients)?),
        #[cfg(feature = "peers")]
        System::Quinn => return Err(io::Error::other("quinn runs its own async loops")),
    })
}

fn make_fanout_clients(
    system: System,
    server: SocketAddr,
    clients: usize,
) -> io::Result<Box<dyn FanoutClients>> {
    Ok(match system {
        // The same batched load generator for both tessera servers: only the
        // server's IO mode differs.
        System::Tessera | System::TesseraSingle => {
            Box::new(tessera::TesseraFanoutClients::new(server, clients)?)
        }
        System::RawUdp => Box::new(raw::RawFanoutClients::new(server, clients)?),
        #[cfg(feature = "peers")]
        System::Enet => Box::new(peer_enet::EnetFanoutClients::new(server, clients)?),
        #[cfg(feature = "peers")]
        System::Kcp => Box::new(peer_kcp::KcpFanoutClients::new(server, clients)?),
        #[cfg(feature = "peers")]
        System::Renet => Box::new(peer_renet::RenetFanoutClients::new(server, clients)?),
        #[cfg(feature = "peers")]
        System::Quinn => return Err(io::Error::other("quinn runs its own async loops")),
    })
}

// ------------------------------------------------------------------ helpers

/// Every loop in this suite stops by this much after it started, whatever
/// happens.
pub(crate) const HARD_LIMIT: Duration = Duration::from_secs(120);
/// Longest sleep of a waiting loop: timers of the systems that do not say
/// when they are due are run at least this often.
pub(crate) const WAIT_MAX: Duration = Duration::from_millis(1);
/// Handshake budget of one connection (cases 1 and 2).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// The two cores: load generator / client side first, server second.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cores {
    client: Option<core_affinity::CoreId>,
    server: Option<core_affinity::CoreId>,
}

impl Cores {
    fn detect() -> Self {
        let ids = core_affinity::get_core_ids().unwrap_or_default();
        if ids.len() >= 2 {
            Cores {
                client: Some(ids[0]),
                server: Some(ids[1]),
            }
        } else {
            Cores {
                client: None,
                server: None,
            }
        }
    }

    fn pinned(&self) -> bool {
        self.server.is_some()
    }

    fn describe(&self) -> String {
        match (self.client, self.server) {
            (Some(c), Some(s)) => format!(
                "client/load generator on CPU {}, server on CPU {}",
                c.id, s.id
            ),
            _ => "unpinned (fewer than 2 CPUs)".to_string(),
        }
    }

    pub(crate) fn pin_client(&self) {
        if let Some(core) = self.client {
            core_affinity::set_for_current(core);
        }
    }

    pub(crate) fn pin_server(&self) {
        if let Some(core) = self.server {
            core_affinity::set_for_current(core);
        }
    }
}

/// Waits until one of `fds` is readable, `until` passes, or `WAIT_MAX`.
pub(crate) fn wait_readable(fds: &[RawFd], until: Option<Instant>) {
    let now = Instant::now();
    let wait = until.map_or(WAIT_MAX, |u| u.saturating_duration_since(now).min(WAIT_MAX));
    if wait.is_zero() {
        return;
    }
    let mut small = [libc::pollfd {
        fd: -1,
        events: 0,
        revents: 0,
    }; 4];
    let mut large = Vec::new();
    let pollfds: &mut [libc::pollfd] = if fds.len() <= small.len() {
        for (p, &fd) in small.iter_mut().zip(fds) {
            p.fd = fd;
            p.events = libc::POLLIN;
        }
        &mut small[..fds.len()]
    } else {
        large.extend(fds.iter().map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }));
        &mut large
    };
    let timeout = libc::timespec {
        tv_sec: wait.as_secs() as libc::time_t,
        tv_nsec: wait.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `pollfds` and `timeout` are valid for the call; a null signal
    // mask leaves the mask unchanged.
    unsafe {
        libc::ppoll(
            pollfds.as_mut_ptr(),
            pollfds.len() as libc::nfds_t,
            &timeout,
            std::ptr::null(),
        );
    }
}

#[cfg(feature = "peers")]
/// Socket buffer size every system's sockets get (tessera's `BatchSocket`
/// default): the peers' std sockets would otherwise keep the kernel default
/// (208 KiB), which a server reading once per tick overflows.
pub(crate) const SOCKET_BUFFER_BYTES: usize = 4 << 20;

#[cfg(feature = "peers")]
/// Sets `SO_RCVBUF`/`SO_SNDBUF` of a peer's std socket.
pub(crate) fn set_socket_buffers(socket: &impl std::os::fd::AsRawFd) -> io::Result<()> {
    let bytes = SOCKET_BUFFER_BYTES as libc::c_int;
    for option in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: a valid socket descriptor and a c_int option value.
        let result = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                &bytes as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if result != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The kernel's thread id of the calling thread.
pub(crate) fn thread_id() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// CPU time (user + system) a thread of this process has used, in ns, from
/// `/proc/self/task/<tid>/schedstat` (nanosecond resolution).
pub(crate) fn thread_cpu_ns(tid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

pub(crate) fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds")
}

/// Nanoseconds since a shared epoch, written into messages so the receiving
/// thread can measure delivery latency.
pub(crate) fn ns_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_nanos() as u64
}

fn join<T>(handle: thread::JoinHandle<Result<T, String>>, what: &str) -> Result<T, String> {
    handle
        .join()
        .map_err(|_| format!("{what} thread panicked"))?
}

fn io_err(what: &str) -> impl Fn(io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

// ------------------------------------------------------- case 1: ping-pong

pub(crate) const PING_BYTES: usize = 32;

/// Settings of one ping-pong run.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PingRun {
    pub warmup: usize,
    pub pings: usize,
    pub cores: Cores,
}

fn ping_pong(system: System, run: PingRun) -> Result<Histogram<u64>, String> {
    #[cfg(feature = "peers")]
    if system == System::Quinn {
        return peer_quinn::ping_pong(run);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (addr_tx, addr_rx) = mpsc::channel();
    let server_stop = stop.clone();
    let server = thread::spawn(move || -> Result<(), String> {
        run.cores.pin_server();
        let mut side = make_side(system, Workload::PingPong, Role::Server { public: None })
            .map_err(io_err("server"))?;
        let _ = addr_tx.send(side.local_addr());
        let limit = Instant::now() + HARD_LIMIT;
        let mut pending = Vec::with_capacity(PING_BYTES * 4);
        while !server_stop.load(Ordering::Relaxed) && Instant::now() < limit {
            let now = Instant::now();
            side.poll(now, &mut |m| pending.extend_from_slice(m))
                .map_err(io_err("server poll"))?;
            for ping in pending.chunks(PING_BYTES) {
                // Backpressure cannot happen with one message in flight.
                let _ = side.send(now, ping);
            }
            pending.clear();
            side.flush(now).map_err(io_err("server flush"))?;
        }
        Ok(())
    });
    let server_addr = addr_rx
        .recv_timeout(CONNECT_TIMEOUT)
        .map_err(|_| "ping server did not start".to_string())?;
    let client = thread::spawn(move || -> Result<Histogram<u64>, String> {
        run.cores.pin_client();
        let mut side = make_side(
            system,
            Workload::PingPong,
            Role::Client {
                server: server_addr,
            },
        )
        .map_err(io_err("client"))?;
        connect_side(side.as_mut())?;
        let mut histogram = latency_histogram();
        let mut ping = [0u8; PING_BYTES];
        for seq in 0..(run.warmup + run.pings) as u64 {
            let sent = Instant::now();
            ping[..8].copy_from_slice(&seq.to_le_bytes());
            if !side.send(sent, &ping) {
                return Err("ping refused by backpressure".into());
            }
            side.flush(sent).map_err(io_err("client flush"))?;
            let mut answered = false;
            while !answered {
                let now = Instant::now();
                if now - sent > Duration::from_secs(2) {
                    return Err(format!("no answer to ping {seq} within 2 s"));
                }
                side.poll(now, &mut |m| {
                    if m.len() >= 8 && m[..8] == seq.to_le_bytes() {
                        answered = true;
                    }
                })
                .map_err(io_err("client poll"))?;
                side.flush(now).map_err(io_err("client flush"))?;
            }
            if seq as usize >= run.warmup {
                let rtt = sent.elapsed().as_nanos() as u64;
                let _ = histogram.record(rtt.max(1));
            }
        }
        Ok(histogram)
    });
    let result = join(client, "ping client");
    stop.store(true, Ordering::Relaxed);
    join(server, "ping server")?;
    result
}

/// Polls a client side until its handshake finished (busy, bounded).
fn connect_side(side: &mut dyn Side) -> Result<(), String> {
    let start = Instant::now();
    while !side.is_connected() {
        if start.elapsed() > CONNECT_TIMEOUT {
            return Err("handshake did not finish within 10 s".into());
        }
        let now = Instant::now();
        side.poll(now, &mut |_| {})
            .map_err(io_err("connect poll"))?;
        side.flush(now).map_err(io_err("connect flush"))?;
        let deadline = side.deadline();
        wait_readable(&[side.fd()], deadline);
    }
    Ok(())
}

// ------------------------------------------------- case 2: reliable stream

pub(crate) const STREAM_BYTES: usize = 100;
/// Messages sent but not yet delivered at most (the same application-level
/// bound for every system, on top of each system's own backpressure). At
/// 32,768 this bound, not quinn's flow control, limited quinn at 5% loss
/// (541k vs 749k msg/s); at 131,072 quinn gains nothing more (774k).
pub(crate) const OUTSTANDING_MAX: u64 = 65_536;
/// Messages per send burst of a saturating sender before it polls again.
pub(crate) const SEND_BURST: usize = 256;
/// Rate of the latency phase.
pub(crate) const PACED_RATE: u64 = 1_000;
/// One-way delay of the impairment relay in the stream case.
pub(crate) const RELAY_DELAY: Duration = Duration::from_millis(5);

pub(crate) const PHASE_CONNECTING: u8 = 0;
pub(crate) const PHASE_SATURATE: u8 = 1;
pub(crate) const PHASE_DRAIN: u8 = 2;
pub(crate) const PHASE_PACED: u8 = 3;

/// Shared by the stream case's threads.
pub(crate) struct StreamControl {
    pub epoch: Instant,
    pub limit: Instant,
    pub phase: AtomicU8,
    pub stop: AtomicBool,
    pub connected: AtomicBool,
    pub sent: AtomicU64,
    pub delivered: AtomicU64,
    /// Deliveries out of order or duplicated: must stay 0.
    pub disorder: AtomicU64,
    pub latency: Mutex<Histogram<u64>>,
}

impl StreamControl {
    fn new() -> Arc<Self> {
        let epoch = Instant::now();
        Arc::new(Self {
            epoch,
            limit: epoch + HARD_LIMIT,
            phase: AtomicU8::new(PHASE_CONNECTING),
            stop: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            disorder: AtomicU64::new(0),
            latency: Mutex::new(latency_histogram()),
        })
    }

    pub(crate) fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed) && Instant::now() < self.limit
    }

    /// Writes message `seq` into `buffer` (100 B: seq, send time, phase).
    /// Only paced messages carry their send time (the clock read is not
    /// free, and saturating runs measure throughput only).
    pub(crate) fn fill(&self, buffer: &mut [u8], seq: u64, paced: bool) {
        let sent = if paced { ns_since(self.epoch) } else { 0 };
        buffer[..8].copy_from_slice(&seq.to_le_bytes());
        buffer[8..16].copy_from_slice(&sent.to_le_bytes());
        buffer[16] = paced as u8;
    }

    /// Checks a delivered message: in order, and its latency if paced.
    pub(crate) fn on_delivered(
        &self,
        bytes: &[u8],
        expected: &mut u64,
        histogram: &mut Histogram<u64>,
    ) {
        if bytes.len() < 17 {
            self.disorder.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let seq = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        if seq != *expected {
            self.disorder.fetch_add(1, Ordering::Relaxed);
        }
        *expected = seq + 1;
        if bytes[16] == 1 {
            let sent = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
            let _ = histogram.record(ns_since(self.epoch).saturating_sub(sent).max(1));
        }
    }
}

fn stream_sender(side: &mut dyn Side, control: &StreamControl) -> Result<(), String> {
    let mut message = [0u8; STREAM_BYTES];
    let mut seq = 0u64;
    let interval = Duration::from_nanos(1_000_000_000 / PACED_RATE);
    let mut next_paced: Option<Instant> = None;
    while control.running() {
        let now = Instant::now();
        side.poll(now, &mut |_| {}).map_err(io_err("sender poll"))?;
        let mut progressed = false;
        match control.phase.load(Ordering::Acquire) {
            PHASE_SATURATE => {
                let delivered = control.delivered.load(Ordering::Acquire);
                for _ in 0..SEND_BURST {
                    if seq - delivered >= OUTSTANDING_MAX {
                        break;
                    }
                    control.fill(&mut message, seq, false);
                    if !side.send(now, &message) {
                        break;
                    }
                    seq += 1;
                    progressed = true;
                }
            }
            PHASE_PACED => {
                let next = next_paced.get_or_insert(now);
                while *next <= now {
                    control.fill(&mut message, seq, true);
                    if !side.send(now, &message) {
                        break;
                    }
                    seq += 1;
                    *next += interval;
                }
            }
            _ => next_paced = None,
        }
        control.sent.store(seq, Ordering::Release);
        side.flush(now).map_err(io_err("sender flush"))?;
        if !progressed {
            let until = [side.deadline(), next_paced].into_iter().flatten().min();
            wait_readable(&[side.fd()], until);
        }
    }
    Ok(())
}

fn stream_receiver(side: &mut dyn Side, control: &StreamControl) -> Result<(), String> {
    let mut expected = 0u64;
    let mut delivered = 0u64;
    let mut histogram = latency_histogram();
    while control.running() {
        let now = Instant::now();
        side.poll(now, &mut |m| {
            delivered += 1;
            control.on_delivered(m, &mut expected, &mut histogram);
        })
        .map_err(io_err("receiver poll"))?;
        control.delivered.store(delivered, Ordering::Release);
        side.flush(now).map_err(io_err("receiver flush"))?;
        let deadline = side.deadline();
        wait_readable(&[side.fd()], deadline);
    }
    let _ = control
        .latency
        .lock()
        .expect("latency lock")
        .add(&histogram);
    Ok(())
}

/// Settings of one stream run.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StreamRun {
    pub loss: f64,
    pub seed: u64,
    pub warmup: Duration,
    pub window: Duration,
    pub paced: Duration,
    pub cores: Cores,
}

impl StreamRun {
    pub(crate) fn link(&self) -> ConditionerConfig {
        ConditionerConfig {
            loss: if self.loss > 0.0 {
                Loss::Random(self.loss)
            } else {
                Loss::None
            },
            latency: RELAY_DELAY,
            ..ConditionerConfig::default()
        }
    }
}

/// What one stream run measured.
pub(crate) struct StreamOutcome {
    pub msgs_per_s: f64,
    pub latency: Histogram<u64>,
}

fn stream(system: System, run: StreamRun) -> Result<StreamOutcome, String> {
    let control = StreamControl::new();
    let relay = relay::Relay::bind().map_err(io_err("relay"))?;
    let relay_addr = relay.client_facing();
    let (addr_tx, addr_rx) = mpsc::channel();
    let server = {
        let control = control.clone();
        thread::spawn(move || -> Result<(), String> {
            run.cores.pin_server();
            #[cfg(feature = "peers")]
            if system == System::Quinn {
                return peer_quinn::stream_receiver(relay_addr, addr_tx, &control);
            }
            let mut side = make_side(
                system,
                Workload::Stream,
                Role::Server {
                    public: Some(relay_addr),
                },
            )
            .map_err(io_err("receiver"))?;
            let _ = addr_tx.send(side.local_addr());
            stream_receiver(side.as_mut(), &control)
        })
    };
    let server_addr = addr_rx
        .recv_timeout(CONNECT_TIMEOUT)
        .map_err(|_| "stream receiver did not start".to_string())?;
    let relay = relay.start(server_addr, run.link(), run.seed, control.limit, run.cores);
    let client = {
        let control = control.clone();
        thread::spawn(move || -> Result<(), String> {
            run.cores.pin_client();
            #[cfg(feature = "peers")]
            if system == System::Quinn {
                return peer_quinn::stream_sender(relay_addr, &control);
            }
            let mut side = make_side(
                system,
                Workload::Stream,
                Role::Client { server: relay_addr },
            )
            .map_err(io_err("sender"))?;
            connect_side(side.as_mut())?;
            control.connected.store(true, Ordering::Release);
            stream_sender(side.as_mut(), &control)
        })
    };
    let measured = measure_stream(&control, run);
    control.stop.store(true, Ordering::Release);
    let client_result = join(client, "sender");
    let server_result = join(server, "receiver");
    let relay_stats = relay.stop();
    let msgs_per_s = measured?;
    client_result?;
    server_result?;
    relay_stats?;
    let disorder = control.disorder.load(Ordering::Acquire);
    if disorder > 0 {
        return Err(format!("{disorder} messages delivered out of order"));
    }
    let latency = control.latency.lock().expect("latency lock").clone();
    Ok(StreamOutcome {
        msgs_per_s,
        latency,
    })
}

fn measure_stream(control: &StreamControl, run: StreamRun) -> Result<f64, String> {
    let start = Instant::now();
    while !control.connected.load(Ordering::Acquire) {
        if start.elapsed() > CONNECT_TIMEOUT || !control.running() {
            return Err("the stream's handshake did not finish".into());
        }
        thread::sleep(Duration::from_millis(1));
    }
    if std::env::var_os("RUDP_SKIP_SATURATE").is_none() {
        control.phase.store(PHASE_SATURATE, Ordering::Release);
    }
    thread::sleep(run.warmup);
    let (t0, d0) = (Instant::now(), control.delivered.load(Ordering::Acquire));
    thread::sleep(run.window);
    let (t1, d1) = (Instant::now(), control.delivered.load(Ordering::Acquire));
    let rate = (d1 - d0) as f64 / (t1 - t0).as_secs_f64();
    control.phase.store(PHASE_DRAIN, Ordering::Release);
    drain(control, Duration::from_secs(20))?;
    control.phase.store(PHASE_PACED, Ordering::Release);
    thread::sleep(run.paced);
    control.phase.store(PHASE_DRAIN, Ordering::Release);
    drain(control, Duration::from_secs(10))?;
    Ok(rate)
}

/// Waits until every message sent was delivered.
fn drain(control: &StreamControl, budget: Duration) -> Result<(), String> {
    let start = Instant::now();
    // Let the sender publish its last count.
    thread::sleep(Duration::from_millis(2));
    loop {
        let sent = control.sent.load(Ordering::Acquire);
        let delivered = control.delivered.load(Ordering::Acquire);
        if delivered >= sent {
            return Ok(());
        }
        if start.elapsed() > budget || !control.running() {
            return Err(format!(
                "only {delivered} of {sent} messages delivered {budget:?} after the sender stopped"
            ));
        }
        thread::sleep(Duration::from_millis(1));
    }
}

// ------------------------------------------------------ case 3: clients=N

pub(crate) const UPDATE_BYTES: usize = 300;
pub(crate) const INPUT_BYTES: usize = 32;
/// Per-client rate of messages up and updates down.
pub(crate) const RATE_HZ: u64 = 20;
/// Updates and messages are staggered over this many 1 ms buckets.
pub(crate) const BUCKETS: usize = (1000 / RATE_HZ) as usize;
const BUCKET: Duration = Duration::from_millis(1);
/// Handshakes started per wave, one wave per `WAVE_INTERVAL`.
pub(crate) const WAVE_SIZE: usize = 250;
pub(crate) const WAVE_INTERVAL: Duration = Duration::from_millis(5);
const FANOUT_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

pub(crate) const FANOUT_CONNECTING: u8 = 0;
pub(crate) const FANOUT_RUNNING: u8 = 1;

/// Shared by the clients case's threads.
pub(crate) struct FanoutControl {
    pub clients: usize,
    pub limit: Instant,
    pub phase: AtomicU8,
    pub stop: AtomicBool,
    pub server_tid: AtomicI32,
    pub clients_tid: AtomicI32,
    pub server_connected: AtomicUsize,
    pub server_received: AtomicU64,
    pub clients_connected: AtomicUsize,
    pub updates_received: AtomicU64,
}

impl FanoutControl {
    fn new(clients: usize) -> Arc<Self> {
        Arc::new(Self {
            clients,
            limit: Instant::now() + HARD_LIMIT,
            phase: AtomicU8::new(FANOUT_CONNECTING),
            stop: AtomicBool::new(false),
            server_tid: AtomicI32::new(0),
            clients_tid: AtomicI32::new(0),
            server_connected: AtomicUsize::new(0),
            server_received: AtomicU64::new(0),
            clients_connected: AtomicUsize::new(0),
            updates_received: AtomicU64::new(0),
        })
    }

    pub(crate) fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed) && Instant::now() < self.limit
    }
}

/// Round-robin 1 ms buckets: `members[b]` are served at bucket `b`, once per
/// `BUCKETS` ms (20 Hz).
pub(crate) struct Schedule<T> {
    members: Vec<Vec<T>>,
    next: usize,
    due: Instant,
    placed: usize,
}

impl<T: Copy + PartialEq> Schedule<T> {
    pub(crate) fn new(start: Instant) -> Self {
        Self {
            members: (0..BUCKETS).map(|_| Vec::new()).collect(),
            next: 0,
            due: start,
            placed: 0,
        }
    }

    pub(crate) fn add(&mut self, member: T) {
        self.members[self.placed % BUCKETS].push(member);
        self.placed += 1;
    }

    pub(crate) fn remove(&mut self, member: T) {
        for bucket in &mut self.members {
            bucket.retain(|m| *m != member);
        }
    }

    /// Calls `serve` for every member of every bucket due at `now`.
    pub(crate) fn run_due(&mut self, now: Instant, mut serve: impl FnMut(T)) {
        while self.due <= now {
            for &member in &self.members[self.next] {
                serve(member);
            }
            self.next = (self.next + 1) % BUCKETS;
            self.due += BUCKET;
        }
    }

    pub(crate) fn due(&self) -> Instant {
        self.due
    }
}

fn fanout_server_loop(
    server: &mut dyn FanoutServer,
    control: &FanoutControl,
) -> Result<(), String> {
    let update = [0x5Au8; UPDATE_BYTES];
    let mut schedule = Schedule::new(Instant::now());
    let mut connected = 0usize;
    let mut received = 0u64;
    let fds = if server.wakes_on_readable() {
        vec![server.fd()]
    } else {
        Vec::new()
    };
    while control.running() {
        let now = Instant::now();
        server
            .poll(now, &mut |event| match event {
                FanoutEvent::Connected(key) => {
                    connected += 1;
                    schedule.add(key);
                }
                FanoutEvent::Message(_) => received += 1,
                FanoutEvent::Disconnected(key) => {
                    connected = connected.saturating_sub(1);
                    schedule.remove(key);
                }
            })
            .map_err(io_err("server poll"))?;
        if control.phase.load(Ordering::Acquire) == FANOUT_RUNNING {
            schedule.run_due(now, |key| server.send_update(now, key, &update));
        } else {
            schedule.run_due(now, |_| {});
        }
        server.flush(now).map_err(io_err("server flush"))?;
        control.server_connected.store(connected, Ordering::Release);
        control.server_received.store(received, Ordering::Release);
        let until = [Some(schedule.due()), server.deadline()]
            .into_iter()
            .flatten()
            .min();
        wait_readable(&fds, until);
    }
    Ok(())
}

fn fanout_clients_loop(
    clients: &mut dyn FanoutClients,
    control: &FanoutControl,
) -> Result<(), String> {
    let count = control.clients;
    let start = Instant::now();
    let mut started = 0usize;
    let mut next_wave = start;
    let mut schedule = Schedule::new(start);
    let mut message = [0u8; INPUT_BYTES];
    let mut updates = 0u64;
    let mut fds = Vec::new();
    while control.running() {
        let now = Instant::now();
        if started < count && now >= next_wave {
            let end = (started + WAVE_SIZE).min(count);
            clients
                .connect(now, started..end)
                .map_err(io_err("connect"))?;
            for client in started..end {
                schedule.add(client);
            }
            started = end;
            next_wave = now + WAVE_INTERVAL;
            fds.clear();
            clients.fds(&mut fds);
        }
        updates += clients.poll(now).map_err(io_err("clients poll"))?;
        if control.phase.load(Ordering::Acquire) == FANOUT_RUNNING {
            schedule.run_due(now, |client| {
                message[..4].copy_from_slice(&(client as u32).to_le_bytes());
                clients.send(now, client, &message);
            });
        } else {
            schedule.run_due(now, |_| {});
        }
        clients.flush(now).map_err(io_err("clients flush"))?;
        control
            .clients_connected
            .store(clients.connected(), Ordering::Release);
        control.updates_received.store(updates, Ordering::Release);
        let mut until = [Some(schedule.due()), clients.deadline()]
            .into_iter()
            .flatten()
            .min();
        if started < count {
            until = until.map(|u| u.min(next_wave));
        }
        wait_readable(&fds, until);
    }
    Ok(())
}

/// Settings of one clients run.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FanoutRun {
    pub clients: usize,
    pub warmup: Duration,
    pub window: Duration,
    pub cores: Cores,
}

/// What one clients run measured.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FanoutOutcome {
    pub connections: usize,
    /// Server thread CPU, ns per second of the window.
    pub server_cpu_ns_per_s: f64,
    /// Load-generator thread CPU, ns per second of the window.
    pub clients_cpu_ns_per_s: f64,
    /// Client messages received by the server, per second.
    pub messages_in_per_s: f64,
    /// Updates received by the clients, per second.
    pub updates_out_per_s: f64,
}

fn fanout(system: System, run: FanoutRun) -> Result<FanoutOutcome, String> {
    let control = FanoutControl::new(run.clients);
    let (addr_tx, addr_rx) = mpsc::channel();
    let server = {
        let control = control.clone();
        thread::spawn(move || -> Result<(), String> {
            run.cores.pin_server();
            control.server_tid.store(thread_id(), Ordering::Release);
            #[cfg(feature = "peers")]
            if system == System::Quinn {
                return peer_quinn::fanout_server(addr_tx, &control);
            }
            let mut server = make_fanout_server(system, run.clients).map_err(io_err("server"))?;
            let _ = addr_tx.send(server.local_addr());
            fanout_server_loop(server.as_mut(), &control)
        })
    };
    let server_addr = addr_rx
        .recv_timeout(CONNECT_TIMEOUT)
        .map_err(|_| "fan-out server did not start".to_string())?;
    let clients = {
        let control = control.clone();
        thread::spawn(move || -> Result<(), String> {
            run.cores.pin_client();
            control.clients_tid.store(thread_id(), Ordering::Release);
            #[cfg(feature = "peers")]
            if system == System::Quinn {
                return peer_quinn::fanout_clients(server_addr, &control);
            }
            let mut clients =
                make_fanout_clients(system, server_addr, run.clients).map_err(io_err("clients"))?;
            fanout_clients_loop(clients.as_mut(), &control)
        })
    };
    let measured = measure_fanout(&control, run);
    control.stop.store(true, Ordering::Release);
    let clients_result = join(clients, "clients");
    let server_result = join(server, "server");
    let outcome = measured?;
    clients_result?;
    server_result?;
    Ok(outcome)
}

fn measure_fanout(control: &FanoutControl, run: FanoutRun) -> Result<FanoutOutcome, String> {
    let start = Instant::now();
    let wait = |what: &str, count: &AtomicUsize, budget: Duration| -> Result<(), String> {
        let since = Instant::now();
        loop {
            let n = count.load(Ordering::Acquire);
            if n >= run.clients {
                return Ok(());
            }
            if since.elapsed() > budget || !control.running() {
                return Err(format!(
                    "only {n} of {} connections {what} after {:?}",
                    run.clients,
                    start.elapsed()
                ));
            }
            thread::sleep(Duration::from_millis(5));
        }
    };
    wait(
        "open at the clients",
        &control.clients_connected,
        FANOUT_CONNECT_TIMEOUT,
    )?;
    // Systems without a handshake (KCP) meet their clients with the first
    // messages. A server that never completes a few handshakes the clients
    // saw complete (an overloaded QUIC server) is measured anyway: it shows
    // in `connections_held`.
    control.phase.store(FANOUT_RUNNING, Ordering::Release);
    let _ = wait(
        "known to the server",
        &control.server_connected,
        Duration::from_secs(10),
    );
    thread::sleep(run.warmup);
    let server_tid = control.server_tid.load(Ordering::Acquire);
    let clients_tid = control.clients_tid.load(Ordering::Acquire);
    let sample = || {
        (
            Instant::now(),
            thread_cpu_ns(server_tid).unwrap_or(0),
            thread_cpu_ns(clients_tid).unwrap_or(0),
            control.server_received.load(Ordering::Acquire),
            control.updates_received.load(Ordering::Acquire),
        )
    };
    let (t0, cpu0, load0, in0, out0) = sample();
    thread::sleep(run.window);
    let (t1, cpu1, load1, in1, out1) = sample();
    let seconds = (t1 - t0).as_secs_f64();
    let connections = control.server_connected.load(Ordering::Acquire);
    Ok(FanoutOutcome {
        connections,
        server_cpu_ns_per_s: (cpu1 - cpu0) as f64 / seconds,
        clients_cpu_ns_per_s: (load1 - load0) as f64 / seconds,
        messages_in_per_s: (in1 - in0) as f64 / seconds,
        updates_out_per_s: (out1 - out0) as f64 / seconds,
    })
}

// ------------------------------------------------------------ the suite

fn select_systems(args: &Args) -> Result<Vec<System>, String> {
    let all = System::all();
    let Some(names) = &args.systems else {
        return Ok(all);
    };
    names
        .iter()
        .map(|name| {
            all.iter()
                .copied()
                .find(|s| s.name() == name.as_str())
                .ok_or_else(|| {
                    let known: Vec<_> = all.iter().map(|s| s.name()).collect();
                    format!(
                        "unknown or unbuilt system {name:?}; built: {} (peers need --features peers)",
                        known.join(", ")
                    )
                })
        })
        .collect()
}

/// The measured window: `--seconds` or the default.
fn window(args: &Args, default_seconds: f64) -> Duration {
    Duration::from_secs_f64(args.seconds.unwrap_or(default_seconds).max(0.1))
}

fn wants(args: &Args, case: &str) -> bool {
    args.cases
        .as_ref()
        .is_none_or(|cases| cases.iter().any(|c| c == case))
}

/// Runs the suite.
pub fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let systems = select_systems(&args)?;
    let cores = Cores::detect();
    let reps = args.reps.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    let mut report = Report::new("rudp", cores.pinned());
    report.note(format!(
        "all traffic on 127.0.0.1; {}; the load generator shares this {}-CPU machine with the systems under test; {reps} repetition(s), systems alternated within each, median of the repetitions reported (latency percentiles from each repetition's hdrhistogram)",
        cores.describe(),
        thread::available_parallelism().map_or(1, |n| n.get()),
    ));
    if cfg!(not(feature = "peers")) {
        report.note(
            "peers (rusty_enet, kcp, renet, quinn) are not built: run with `--features peers` to compare against them",
        );
    }
    let mut failures: Vec<(System, String)> = Vec::new();

    // The IO-mode variant only matters where one socket carries thousands
    // of connections.
    let solo: Vec<System> = systems
        .iter()
        .copied()
        .filter(|s| *s != System::TesseraSingle)
        .collect();
    if wants(&args, "ping") {
        ping_case(&args, &solo, cores, reps, &mut report, &mut failures);
    }
    if wants(&args, "stream") {
        stream_case(&args, &solo, cores, reps, &mut report, &mut failures);
    }
    if wants(&args, "clients") {
        fanout_case(&args, &systems, cores, reps, &mut report, &mut failures);
    }
    describe_systems(&systems, &mut report);
    for (_, failure) in &failures {
        report.note(format!("FAILED: {failure}"));
    }
    report.finish()?;
    // A peer that fails a repetition (renet timing out under saturation)
    // is reported, not fatal; tessera or the raw ceiling failing is a bug.
    let ours = failures
        .iter()
        .filter(|(system, _)| {
            matches!(
                system,
                System::Tessera | System::TesseraSingle | System::RawUdp
            )
        })
        .count();
    if ours == 0 {
        Ok(())
    } else {
        Err(format!("{ours} tessera or raw-udp run(s) failed (see the notes above)").into())
    }
}

fn peers_of(systems: &[System]) -> impl Iterator<Item = &'static str> + '_ {
    systems
        .iter()
        .filter(|s| **s != System::Tessera)
        .map(|s| s.name())
}

fn ping_case(
    args: &Args,
    systems: &[System],
    cores: Cores,
    reps: usize,
    report: &mut Report,
    failures: &mut Vec<(System, String)>,
) {
    let run = PingRun {
        warmup: if args.quick { 200 } else { 1_000 },
        pings: if args.quick { 2_000 } else { 5_000 },
        cores,
    };
    let case = "ping-32B";
    let quantiles = [("rtt_us_p50", 0.5), ("rtt_us_p99", 0.99)];
    // Per system and quantile, the value of every repetition.
    let mut values: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); quantiles.len()]; systems.len()];
    for rep in 0..reps {
        for (i, &system) in systems.iter().enumerate() {
            eprintln!("rudp: {case}: {} repetition {}", system.name(), rep + 1);
            match ping_pong(system, run) {
                Ok(h) => {
                    for (q, &(_, quantile)) in quantiles.iter().enumerate() {
                        values[i][q].push(h.value_at_quantile(quantile) as f64 / 1000.0);
                    }
                }
                Err(e) => failures.push((system, format!("{case} {}: {e}", system.name()))),
            }
        }
    }
    for (i, system) in systems.iter().enumerate() {
        for (q, &(metric, _)) in quantiles.iter().enumerate() {
            if !values[i][q].is_empty() {
                report.push(case, system.name(), metric, median(&mut values[i][q]), "us");
            }
        }
    }
    for peer in peers_of(systems) {
        for metric in ["rtt_us_p50", "rtt_us_p99"] {
            report.ratio(case, metric, peer, "tessera");
        }
    }
    report.note(format!(
        "{case}: one connection, a {PING_BYTES} B reliable message echoed by the server, one in flight; {} pings after {} warm-up per repetition; both sides busy-poll their socket (quinn: tokio current-thread runtimes), client and server on separate cores",
        run.pings, run.warmup
    ));
}

fn stream_case(
    args: &Args,
    systems: &[System],
    cores: Cores,
    reps: usize,
    report: &mut Report,
    failures: &mut Vec<(System, String)>,
) {
    // raw-udp has no reliability: it has no place in this case.
    let systems: Vec<System> = systems
        .iter()
        .copied()
        .filter(|s| *s != System::RawUdp)
        .collect();
    let losses = args.loss.clone().unwrap_or_else(|| vec![0.0, 5.0, 10.0]);
    let base = StreamRun {
        loss: 0.0,
        seed: 0x7E55_E7A0,
        warmup: Duration::from_millis(if args.quick { 300 } else { 500 }),
        window: window(args, if args.quick { 0.7 } else { 1.0 }),
        paced: window(args, if args.quick { 0.7 } else { 1.0 }),
        cores,
    };
    for &loss in &losses {
        let case = format!("reliable-100B loss={loss}%");
        let quantiles = [("delivery_ms_p50", 0.5), ("delivery_ms_p99", 0.99)];
        let mut rates: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
        let mut latencies: Vec<Vec<Vec<f64>>> =
            vec![vec![Vec::new(); quantiles.len()]; systems.len()];
        for rep in 0..reps {
            for (i, &system) in systems.iter().enumerate() {
                eprintln!("rudp: {case}: {} repetition {}", system.name(), rep + 1);
                let run = StreamRun {
                    loss: loss / 100.0,
                    // Same link for every system in a repetition.
                    seed: base.seed + rep as u64,
                    ..base
                };
                match stream(system, run) {
                    Ok(outcome) => {
                        rates[i].push(outcome.msgs_per_s);
                        for (q, &(_, quantile)) in quantiles.iter().enumerate() {
                            latencies[i][q]
                                .push(outcome.latency.value_at_quantile(quantile) as f64 / 1e6);
                        }
                    }
                    Err(e) => failures.push((system, format!("{case} {}: {e}", system.name()))),
                }
            }
        }
        for (i, system) in systems.iter().enumerate() {
            if !rates[i].is_empty() {
                report.push(
                    &case,
                    system.name(),
                    "msgs_per_s",
                    median(&mut rates[i]),
                    "msg/s",
                );
            }
            for (q, &(metric, _)) in quantiles.iter().enumerate() {
                if !latencies[i][q].is_empty() {
                    report.push(
                        &case,
                        system.name(),
                        metric,
                        median(&mut latencies[i][q]),
                        "ms",
                    );
                }
            }
        }
        for peer in peers_of(&systems) {
            report.ratio(&case, "msgs_per_s", "tessera", peer);
            report.ratio(&case, "delivery_ms_p50", peer, "tessera");
            report.ratio(&case, "delivery_ms_p99", peer, "tessera");
        }
    }
    report.note(format!(
        "reliable-100B: one reliable-ordered stream of {STREAM_BYTES} B messages client -> server through an impairment relay on loopback (one thread, two sockets) that applies tessera-net's LinkConditioner to both directions with the same seeds for every system (the relay thread is pinned to the server's core): uniform random loss at the given rate, {} ms one-way delay (RTT {} ms), no reordering; msgs_per_s = in-order deliveries/s over {:?} after {:?} with the sender saturating (at most {OUTSTANDING_MAX} messages undelivered, plus each system's own backpressure); delivery_ms = send call -> in-order delivery at a steady {PACED_RATE} msg/s for {:?}; every delivery is checked for order",
        RELAY_DELAY.as_millis(),
        2 * RELAY_DELAY.as_millis(),
        base.window,
        base.warmup,
        base.paced
    ));
    report.note("reliable-100B: raw-udp is not run (no reliability)");
}

fn fanout_case(
    args: &Args,
    systems: &[System],
    cores: Cores,
    reps: usize,
    report: &mut Report,
    failures: &mut Vec<(System, String)>,
) {
    let sizes = args.clients.clone().unwrap_or_else(|| vec![1_000, 10_000]);
    let base = FanoutRun {
        clients: 0,
        warmup: Duration::from_millis(500),
        window: window(args, if args.quick { 1.0 } else { 1.5 }),
        cores,
    };
    for &clients in &sizes {
        let case = format!("clients={clients}");
        // A system that cannot hold `clients` in one endpoint runs at its cap.
        let count_of = |system: System| {
            system
                .connections_max()
                .map_or(clients, |max| clients.min(max))
        };
        let mut outcomes: Vec<Vec<FanoutOutcome>> = vec![Vec::new(); systems.len()];
        for rep in 0..reps {
            for (i, &system) in systems.iter().enumerate() {
                let n = count_of(system);
                eprintln!(
                    "rudp: {case}: {} ({n} connections) repetition {}",
                    system.name(),
                    rep + 1
                );
                match fanout(system, FanoutRun { clients: n, ..base }) {
                    Ok(outcome) => outcomes[i].push(outcome),
                    Err(e) => failures.push((system, format!("{case} {}: {e}", system.name()))),
                }
            }
        }
        let mut raw_pps = None;
        let mut rows = Vec::new();
        for (i, &system) in systems.iter().enumerate() {
            if outcomes[i].is_empty() {
                continue;
            }
            let pick = |f: fn(&FanoutOutcome) -> f64| {
                let mut values: Vec<f64> = outcomes[i].iter().map(f).collect();
                median(&mut values)
            };
            let cpu = pick(|o| o.server_cpu_ns_per_s);
            let load = pick(|o| o.clients_cpu_ns_per_s);
            let messages = pick(|o| o.messages_in_per_s);
            let updates = pick(|o| o.updates_out_per_s);
            let connections = pick(|o| o.connections as f64);
            let pps = pick(|o| o.messages_in_per_s + o.updates_out_per_s);
            if system == System::RawUdp {
                raw_pps = Some(pps);
            }
            rows.push((system, connections, cpu, load, messages, updates, pps));
        }
        for &(system, connections, cpu, load, messages, updates, pps) in &rows {
            let name = system.name();
            let n = count_of(system);
            report.push(&case, name, "connections_held", connections, "conns");
            report.push(
                &case,
                name,
                "server_cpu_us_per_connection_per_s",
                cpu / 1000.0 / n as f64,
                "us/s",
            );
            report.push(
                &case,
                name,
                "server_cpu_ns_per_pkt",
                if pps > 0.0 { cpu / pps } else { 0.0 },
                "ns",
            );
            report.push(&case, name, "server_cpu_pct", cpu / 1e7, "%");
            report.push(&case, name, "loadgen_cpu_pct", load / 1e7, "%");
            report.push(&case, name, "server_msgs_in_per_s", messages, "msg/s");
            report.push(&case, name, "updates_delivered_per_s", updates, "msg/s");
            report.push(&case, name, "server_pps", pps, "pkt/s");
            match raw_pps {
                Some(raw) if n == clients => {
                    report.push(&case, name, "server_pps_pct_of_raw", 100.0 * pps / raw, "%")
                }
                _ => {}
            }
        }
        for &system in systems {
            if let Some(max) = system.connections_max().filter(|&max| clients > max) {
                report.note(format!(
                    "{case}: {} cannot hold {clients} connections in one server endpoint (at most {max}): run at {max}, so its rows are for {max} connections (no % of raw, no ratio)",
                    system.name()
                ));
            }
        }
        let full: Vec<System> = systems
            .iter()
            .copied()
            .filter(|&s| count_of(s) == clients)
            .collect();
        for peer in peers_of(&full) {
            report.ratio(&case, "server_cpu_us_per_connection_per_s", peer, "tessera");
            report.ratio(&case, "server_cpu_ns_per_pkt", peer, "tessera");
            report.ratio(&case, "server_pps_pct_of_raw", "tessera", peer);
        }
    }
    let offered = 2 * RATE_HZ;
    report.note(format!(
        "clients=N: N connections to one server endpoint on one socket; every client sends a {INPUT_BYTES} B reliable-ordered message {RATE_HZ} times/s and the server sends every client a {UPDATE_BYTES} B unreliable update {RATE_HZ} times/s, both staggered over {BUCKETS} 1 ms buckets (offered: {offered} packets/s per connection); after {:?} warm-up, {:?} measured; server CPU = the server thread's schedstat run time (user + kernel, including loopback delivery it triggers); server_pps = client messages received by the server + updates received by the clients, per second (application packets; acks and keep-alives are not counted); server_pps_pct_of_raw compares with the raw-udp server under the same load; server_cpu_ns_per_pkt = server CPU / server_pps (efficiency even where the server saturates, which caps CPU per connection at 1e6/N us/s); loadgen_cpu_pct = the load generator's thread, on the other core",
        base.warmup, base.window
    ));
    report.note(
        "clients=N: server loops wake when the socket is readable or the next 1 ms bucket is due; they receive everything waiting, run timers, send the due updates and flush; the load generator runs the same loop for all clients on the other core",
    );
}

fn describe_systems(systems: &[System], report: &mut Report) {
    for system in systems {
        let text = match system {
            System::Tessera => tessera::DESCRIPTION,
            System::TesseraSingle => tessera::SINGLE_DESCRIPTION,
            System::RawUdp => raw::DESCRIPTION,
            #[cfg(feature = "peers")]
            System::Enet => peer_enet::DESCRIPTION,
            #[cfg(feature = "peers")]
            System::Kcp => peer_kcp::DESCRIPTION,
            #[cfg(feature = "peers")]
            System::Renet => peer_renet::DESCRIPTION,
            #[cfg(feature = "peers")]
            System::Quinn => peer_quinn::DESCRIPTION,
        };
        report.note(format!("{}: {text}", system.name()));
    }
}
