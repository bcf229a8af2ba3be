//! `rudp` suite: tessera-net against ENet (`rusty_enet`), KCP (`kcp`), renet
//! (`renet` + `renet_netcode`) and QUIC (`quinn`), with `raw-udp` (a bare
//! recvmmsg/sendmmsg loop, no protocol at all) as the machine's ceiling.
//!
//! Rows of tessera: `tessera` (settings tuned per case, clear text),
//! `tessera-encrypted` (the same settings; the server requires connect
//! tokens and every client presents one, so every packet after the
//! handshake is sealed with ChaCha20-Poly1305) and `tessera-default` (the
//! game server's and game client's `Config`, untuned: what the tuning buys;
//! stream and clients=N). The tuned rows set `peer_limit: None` explicitly:
//! the game server's 300 packets/s per peer would throttle a bench stream;
//! `tessera-default` keeps it where it can (clients=N) and drops it in the
//! stream, where it would close the connection. The table labels every
//! system's wire `encrypted` (tessera-encrypted, quinn's TLS 1.3, renet's
//! netcode ChaCha20-Poly1305) or `clear` (tessera, ENet, KCP, raw-udp).
//!
//! Cases, every system on the same loopback, payloads and schedule:
//!
//! 1. `ping-32B`: one connection, a 32 B reliable message echoed back, one at
//!    a time; round-trip time p50/p99. Every system waits the same way: it
//!    blocks in the kernel (ppoll, or quinn's epoll under tokio) until its
//!    socket is readable or its next timer is due.
//! 2. `reliable-100B loss=N%`: one reliable-ordered stream of 100 B messages
//!    through an impairment relay (`relay.rs`, the same seeds for every
//!    system). Lossy cases get a real link: 100 Mbit/s (`--link-mbit`)
//!    with a drop-tail queue of 50 ms at that rate (625,000 B), loss after
//!    the queue, 5 ms each way;
//!    `loss=0%` stays uncapped (what each protocol's CPU allows). Delivered
//!    messages/s with the sender saturating, bytes on the wire (both
//!    directions, IP and UDP headers included, from the relay's counters)
//!    per delivered message, then delivery latency (send call -> in-order
//!    delivery) at a steady 1,000 msg/s. Before each loss rate, each
//!    system's window is swept (tessera's reliable_window, KCP's send and
//!    receive window, quinn's stream and connection windows, ENet's throttle,
//!    which scales its fixed 64 KiB window) with one short run per
//!    setting; the best one is the system's row, and the notes say which.
//!    Sizes everybody gets: 4 MiB socket buffers (quinn included), at most
//!    65,536 messages undelivered, renet's reliable channel 16 MiB of
//!    memory like tessera's queue.
//! 3. `clients=N`: N connections to one server endpoint; each client sends a
//!    32 B reliable message 20 times/s and the server sends each client a
//!    300 B unreliable update 20 times/s (staggered over 1 ms buckets). Server
//!    thread CPU per connection and per packet, delivered packets/s vs
//!    `raw-udp`. Here `tessera-single-syscall` runs the same tessera server
//!    with one syscall per datagram (recvfrom/sendto, as glommio's UDP
//!    socket does) instead of recvmmsg/sendmmsg: what batching buys.
//! 4. `clients-capacity`: per system, the largest N whose clients=N run is
//!    valid, found by doubling from the smallest N, then bisecting, within
//!    a time budget.
//!
//! A clients=N run is invalid when the load generator's thread used >= 95%
//! of its core or less than 99% of the offered messages or updates arrived:
//! it measures the harness, not the system. It is shown as invalid, and no
//! median or ratio comes from it. A system whose repetitions did not all
//! succeed (or were not all valid) shows "k of n" with the errors, never a
//! median of the survivors.
//!
//! Systems are alternated within each repetition; medians of the repetitions
//! are reported (latency percentiles come from each repetition's
//! hdrhistogram). Ratios are "higher is better for tessera"; the other
//! tessera rows are compared with `tessera`, and the encrypted peers with
//! `tessera-encrypted` too. The two goals are printed as notes and
//! kept in the JSON: server CPU per packet of tessera-encrypted over tessera
//! in clients=N (<= 1.3), and tessera-encrypted's reliable throughput at 5%
//! loss over quinn's (>= 2).
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

use tessera::Flavor;

mod raw;
mod relay;
mod suite;
mod tessera;

#[cfg(feature = "peers")]
mod peer_enet;
#[cfg(feature = "peers")]
mod peer_kcp;
#[cfg(feature = "peers")]
mod peer_quinn;
#[cfg(feature = "peers")]
mod peer_renet;

pub use suite::run;

/// Options of the `rudp` suite.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A short run, for CI: one repetition, short windows, no window sweep.
    #[arg(long)]
    pub quick: bool,
    /// Repetitions per system and case (median reported).
    #[arg(long)]
    pub reps: Option<usize>,
    /// Systems to run (comma separated), e.g. `tessera,kcp`. Default: all built.
    #[arg(long, value_delimiter = ',')]
    pub systems: Option<Vec<String>>,
    /// Cases to run (comma separated): `ping`, `stream`, `clients`,
    /// `capacity`.
    #[arg(long, value_delimiter = ',')]
    pub cases: Option<Vec<String>>,
    /// Loss rates of the stream case, in percent (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub loss: Option<Vec<f64>>,
    /// Connection counts of the clients case (comma separated); the
    /// capacity sweep starts at the smallest.
    #[arg(long, value_delimiter = ',')]
    pub clients: Option<Vec<usize>>,
    /// Measured seconds per repetition of the stream and clients cases
    /// (profiling runs want longer ones).
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Stream windows to use instead of sweeping, e.g.
    /// `tessera=32768,kcp=4096,quinn=16,rusty_enet=2` (units: messages,
    /// segments, MiB of stream window, throttle preset).
    #[arg(long, value_delimiter = ',')]
    pub windows: Option<Vec<String>>,
    /// Largest connection count the capacity sweep tries.
    #[arg(long)]
    pub capacity_max: Option<usize>,
    /// Rate of the lossy stream cases' link, in Mbit/s (its queue holds
    /// 50 ms at that rate).
    #[arg(long, default_value_t = LOSSY_LINK_MBIT)]
    pub link_mbit: u64,
}

// ------------------------------------------------------------------ systems

/// A system under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum System {
    Tessera,
    /// Tessera with connect tokens: every packet sealed.
    TesseraEncrypted,
    /// Tessera with the game server's default `Config`.
    TesseraDefault,
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
            System::TesseraEncrypted => "tessera-encrypted",
            System::TesseraDefault => "tessera-default",
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

    /// What its packets look like on the wire: what a system pays that
    /// others may not.
    fn wire(self) -> &'static str {
        match self {
            System::TesseraEncrypted => "encrypted",
            #[cfg(feature = "peers")]
            System::Quinn | System::Renet => "encrypted",
            _ => "clear",
        }
    }

    fn all() -> Vec<System> {
        vec![
            System::Tessera,
            System::TesseraEncrypted,
            System::TesseraDefault,
            System::TesseraSingle,
            System::RawUdp,
            #[cfg(feature = "peers")]
            System::Enet,
            #[cfg(feature = "peers")]
            System::Kcp,
            #[cfg(feature = "peers")]
            System::Renet,
            #[cfg(feature = "peers")]
            System::Quinn,
        ]
    }

    /// The tessera flavor, for tessera's rows.
    fn flavor(self) -> Option<Flavor> {
        match self {
            System::Tessera | System::TesseraSingle => Some(Flavor::Tuned),
            System::TesseraEncrypted => Some(Flavor::Encrypted),
            System::TesseraDefault => Some(Flavor::Default),
            _ => None,
        }
    }

    /// True for tessera's rows and the raw ceiling: a failure there is a
    /// bug, not a finding.
    fn is_ours(self) -> bool {
        self.flavor().is_some() || self == System::RawUdp
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

    /// The stream settings the window sweep tries, smallest first, and
    /// what they are; empty: nothing to sweep (the encrypted row takes
    /// tessera's setting, so the two differ only in sealing).
    fn window_candidates(self) -> (&'static [u32], &'static str) {
        match self {
            System::Tessera => (&[8_192, 16_384, 32_768], "reliable_window, messages"),
            #[cfg(feature = "peers")]
            System::Kcp => (
                &[1_024, 4_096, 16_384, 65_535],
                "send and receive window, segments",
            ),
            #[cfg(feature = "peers")]
            System::Quinn => (
                &[4, 16, 64],
                "stream receive window in MiB (connection receive and send windows twice that)",
            ),
            #[cfg(feature = "peers")]
            System::Enet => (
                &peer_enet::THROTTLE_PRESETS,
                peer_enet::THROTTLE_PRESETS_TEXT,
            ),
            _ => (&[], ""),
        }
    }

    /// The setting used when the sweep does not run (`--quick`).
    fn window_default(self) -> Option<u32> {
        match self {
            System::Tessera | System::TesseraEncrypted => Some(32_768),
            #[cfg(feature = "peers")]
            System::Kcp => Some(4_096),
            #[cfg(feature = "peers")]
            System::Quinn => Some(16),
            #[cfg(feature = "peers")]
            System::Enet => Some(0),
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
    /// netcode and tessera's tokens check it).
    Server { public: Option<SocketAddr> },
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

/// `window`: the stream setting from the sweep (see
/// `System::window_candidates`), None elsewhere.
fn make_side(
    system: System,
    workload: Workload,
    role: Role,
    window: Option<u32>,
) -> io::Result<Box<dyn Side>> {
    Ok(match system {
        System::Tessera | System::TesseraEncrypted | System::TesseraDefault => {
            let flavor = system.flavor().expect("a tessera row");
            Box::new(tessera::TesseraSide::new(flavor, workload, role, window)?)
        }
        System::TesseraSingle => {
            return Err(io::Error::other(
                "tessera-single-syscall runs clients=N only",
            ))
        }
        System::RawUdp => Box::new(raw::RawSide::new(role)?),
        #[cfg(feature = "peers")]
        System::Enet => Box::new(peer_enet::EnetSide::new(workload, role, window)?),
        #[cfg(feature = "peers")]
        System::Kcp => Box::new(peer_kcp::KcpSide::new(workload, role, window)?),
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
        System::Tessera | System::TesseraEncrypted | System::TesseraDefault => {
            let flavor = system.flavor().expect("a tessera row");
            Box::new(tessera::TesseraFanoutServer::new(
                flavor,
                clients,
                IoMode::Batched,
            )?)
        }
        System::TesseraSingle => Box::new(tessera::TesseraFanoutServer::new(
            Flavor::Tuned,
            clients,
            IoMode::Single,
        )?),
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
        // The same batched load generator for every tessera server of a
        // flavor: tessera-single-syscall differs only in the server's IO mode.
        System::Tessera
        | System::TesseraSingle
        | System::TesseraEncrypted
        | System::TesseraDefault => {
            let flavor = system.flavor().expect("a tessera row");
            Box::new(tessera::TesseraFanoutClients::new(flavor, server, clients)?)
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
        let mut side = make_side(
            system,
            Workload::PingPong,
            Role::Server { public: None },
            None,
        )
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
            // Sleep in the kernel until the next ping, as quinn's tokio
            // runtime does: one waiting model for every system.
            let deadline = side.deadline();
            wait_readable(&[side.fd()], deadline);
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
            None,
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
                if !answered {
                    let deadline = side.deadline();
                    wait_readable(&[side.fd()], deadline);
                }
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
/// The lossy cases' link rate unless `--link-mbit` says otherwise: what
/// a protocol sends beyond what is delivered (extra copies, spurious
/// retransmissions) costs it throughput, as it would on a real path.
pub(crate) const LOSSY_LINK_MBIT: u64 = 100;
/// The link's drop-tail queue holds this long at its rate.
pub(crate) const LINK_QUEUE: Duration = Duration::from_millis(50);

/// The lossy cases' bottleneck at `mbit` Mbit/s (IP and UDP headers count).
pub(crate) fn lossy_link(mbit: u64) -> relay::Capacity {
    let bits_per_s = mbit.max(1) * 1_000_000;
    relay::Capacity {
        bits_per_s,
        queue_bytes: bits_per_s / 8 * LINK_QUEUE.as_millis() as u64 / 1000,
    }
}

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
    /// The bottleneck of the link, None: no cap.
    pub capacity: Option<relay::Capacity>,
    pub seed: u64,
    pub warmup: Duration,
    pub window: Duration,
    /// Length of the latency phase; zero skips it (the window sweep).
    pub paced: Duration,
    /// The system's stream setting (see `System::window_candidates`).
    pub setting: Option<u32>,
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
    /// Bytes both sides put on the wire (headers included) per message
    /// delivered, over the saturated window.
    pub wire_bytes_per_msg: f64,
    /// Datagrams the bottleneck queue dropped, % of those offered to it,
    /// over the saturated window.
    pub queue_drop_pct: f64,
    pub latency: Histogram<u64>,
}

/// What `measure_stream` saw in the saturated window.
struct Saturated {
    msgs_per_s: f64,
    delivered: u64,
    wire: relay::WireTotals,
}

/// Runs a thread's body; an error stops the run at once, so a failing side
/// is reported with its own message instead of as a drain timeout.
fn failing_stops<T>(
    stop: &AtomicBool,
    body: impl FnOnce() -> Result<T, String>,
) -> Result<T, String> {
    let result = body();
    if result.is_err() {
        stop.store(true, Ordering::Release);
    }
    result
}

/// Every error of a run, labelled by where it happened.
fn gather_errors(results: &[(&str, Result<(), String>)]) -> Result<(), String> {
    let errors: Vec<String> = results
        .iter()
        .filter_map(|(what, result)| result.as_ref().err().map(|e| format!("{what}: {e}")))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

fn stream(system: System, run: StreamRun) -> Result<StreamOutcome, String> {
    let control = StreamControl::new();
    let relay = relay::Relay::bind().map_err(io_err("relay"))?;
    let relay_addr = relay.client_facing();
    let counters = relay.counters();
    let (addr_tx, addr_rx) = mpsc::channel();
    let server = {
        let control = control.clone();
        thread::spawn(move || -> Result<(), String> {
            run.cores.pin_server();
            failing_stops(&control.stop, || {
                #[cfg(feature = "peers")]
                if system == System::Quinn {
                    return peer_quinn::stream_receiver(addr_tx, &control, run.setting);
                }
                let mut side = make_side(
                    system,
                    Workload::Stream,
                    Role::Server {
                        public: Some(relay_addr),
                    },
                    run.setting,
                )
                .map_err(io_err("receiver"))?;
                let _ = addr_tx.send(side.local_addr());
                stream_receiver(side.as_mut(), &control)
            })
        })
    };
    let server_addr = match addr_rx.recv_timeout(CONNECT_TIMEOUT) {
        Ok(addr) => addr,
        Err(_) => {
            control.stop.store(true, Ordering::Release);
            let why = join(server, "receiver").err().unwrap_or_default();
            return Err(format!("stream receiver did not start: {why}"));
        }
    };
    let relay = relay.start(
        server_addr,
        run.link(),
        run.capacity,
        run.seed,
        control.limit,
        run.cores,
    );
    let client = {
        let control = control.clone();
        thread::spawn(move || -> Result<(), String> {
            run.cores.pin_client();
            failing_stops(&control.stop, || {
                #[cfg(feature = "peers")]
                if system == System::Quinn {
                    return peer_quinn::stream_sender(relay_addr, &control, run.setting);
                }
                let mut side = make_side(
                    system,
                    Workload::Stream,
                    Role::Client { server: relay_addr },
                    run.setting,
                )
                .map_err(io_err("sender"))?;
                connect_side(side.as_mut())?;
                control.connected.store(true, Ordering::Release);
                stream_sender(side.as_mut(), &control)
            })
        })
    };
    let measured = measure_stream(&control, run, &counters);
    control.stop.store(true, Ordering::Release);
    let client_result = join(client, "sender");
    let server_result = join(server, "receiver");
    let relay_result = relay.stop().map(drop);
    let measured_result = measured.as_ref().map(drop).map_err(Clone::clone);
    gather_errors(&[
        ("sender", client_result),
        ("receiver", server_result),
        ("measure", measured_result),
        ("relay", relay_result),
    ])?;
    let saturated = measured?;
    let disorder = control.disorder.load(Ordering::Acquire);
    if disorder > 0 {
        return Err(format!("{disorder} messages delivered out of order"));
    }
    let latency = control.latency.lock().expect("latency lock").clone();
    let wire = saturated.wire;
    Ok(StreamOutcome {
        msgs_per_s: saturated.msgs_per_s,
        wire_bytes_per_msg: wire.bytes as f64 / saturated.delivered.max(1) as f64,
        queue_drop_pct: 100.0 * wire.queue_drops as f64 / wire.datagrams.max(1) as f64,
        latency,
    })
}

fn measure_stream(
    control: &StreamControl,
    run: StreamRun,
    counters: &relay::RelayCounters,
) -> Result<Saturated, String> {
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
    let sample = || {
        (
            Instant::now(),
            control.delivered.load(Ordering::Acquire),
            counters.totals(),
        )
    };
    let (t0, d0, w0) = sample();
    thread::sleep(run.window);
    let (t1, d1, w1) = sample();
    let saturated = Saturated {
        msgs_per_s: (d1 - d0) as f64 / (t1 - t0).as_secs_f64(),
        delivered: d1 - d0,
        wire: w1.since(w0),
    };
    control.phase.store(PHASE_DRAIN, Ordering::Release);
    drain(control, Duration::from_secs(20))?;
    if !run.paced.is_zero() {
        control.phase.store(PHASE_PACED, Ordering::Release);
        thread::sleep(run.paced);
        control.phase.store(PHASE_DRAIN, Ordering::Release);
        drain(control, Duration::from_secs(10))?;
    }
    Ok(saturated)
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
pub(crate) const FANOUT_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

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
    /// Budget for every handshake to finish at the clients.
    pub connect_timeout: Duration,
    pub cores: Cores,
}

/// A run whose load generator used this much of its core measured the load
/// generator, not the system.
pub(crate) const LOADGEN_CPU_PCT_MAX: f64 = 95.0;
/// A run that delivered less than this share of what was offered (messages
/// up or updates down) did not keep up.
pub(crate) const DELIVERY_PCT_MIN: f64 = 99.0;

/// What one clients run measured.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FanoutOutcome {
    /// Connections the run was asked for.
    pub offered_connections: usize,
    /// Connections the server held at the end.
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

impl FanoutOutcome {
    pub(crate) fn loadgen_cpu_pct(&self) -> f64 {
        self.clients_cpu_ns_per_s / 1e7
    }

    /// The worse direction's delivered share of what the schedule offers
    /// (`RATE_HZ` per connection each way).
    pub(crate) fn delivery_pct(&self) -> f64 {
        let offered = (self.offered_connections as u64 * RATE_HZ) as f64;
        if offered == 0.0 {
            return 0.0;
        }
        100.0 * self.messages_in_per_s.min(self.updates_out_per_s) / offered
    }

    /// Why the run measures the harness rather than the system, if it does.
    pub(crate) fn invalid_because(&self) -> Option<String> {
        let load = self.loadgen_cpu_pct();
        let delivery = self.delivery_pct();
        if load >= LOADGEN_CPU_PCT_MAX {
            Some(format!("load generator at {load:.0}% CPU"))
        } else if delivery < DELIVERY_PCT_MIN {
            Some(format!("{delivery:.1}% delivered"))
        } else {
            None
        }
    }
}

fn fanout(system: System, run: FanoutRun) -> Result<FanoutOutcome, String> {
    let control = FanoutControl::new(run.clients);
    let (addr_tx, addr_rx) = mpsc::channel();
    let server = {
        let control = control.clone();
        thread::spawn(move || -> Result<(), String> {
            run.cores.pin_server();
            control.server_tid.store(thread_id(), Ordering::Release);
            failing_stops(&control.stop, || {
                #[cfg(feature = "peers")]
                if system == System::Quinn {
                    return peer_quinn::fanout_server(addr_tx, &control);
                }
                let mut server =
                    make_fanout_server(system, run.clients).map_err(io_err("server"))?;
                let _ = addr_tx.send(server.local_addr());
                fanout_server_loop(server.as_mut(), &control)
            })
        })
    };
    let server_addr = match addr_rx.recv_timeout(CONNECT_TIMEOUT) {
        Ok(addr) => addr,
        Err(_) => {
            control.stop.store(true, Ordering::Release);
            let why = join(server, "server").err().unwrap_or_default();
            return Err(format!("fan-out server did not start: {why}"));
        }
    };
    let clients = {
        let control = control.clone();
        thread::spawn(move || -> Result<(), String> {
            run.cores.pin_client();
            control.clients_tid.store(thread_id(), Ordering::Release);
            failing_stops(&control.stop, || {
                #[cfg(feature = "peers")]
                if system == System::Quinn {
                    return peer_quinn::fanout_clients(server_addr, &control);
                }
                let mut clients = make_fanout_clients(system, server_addr, run.clients)
                    .map_err(io_err("clients"))?;
                fanout_clients_loop(clients.as_mut(), &control)
            })
        })
    };
    let measured = measure_fanout(&control, run);
    control.stop.store(true, Ordering::Release);
    let clients_result = join(clients, "clients");
    let server_result = join(server, "server");
    let measured_result = measured.as_ref().map(drop).map_err(Clone::clone);
    gather_errors(&[
        ("load generator", clients_result),
        ("server", server_result),
        ("measure", measured_result),
    ])?;
    measured
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
        run.connect_timeout,
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
    // The counters move in steps (once per loop turn of each side; renet's
    // once per 60 Hz tick): rates from two samples would swing by a step
    // at each end, a fit through many samples does not.
    let mut messages = vec![(0.0, in0 as f64)];
    let mut updates = vec![(0.0, out0 as f64)];
    let (t1, cpu1, load1) = loop {
        thread::sleep(RATE_SAMPLE);
        let (t, cpu, load, received, delivered) = sample();
        let at = (t - t0).as_secs_f64();
        messages.push((at, received as f64));
        updates.push((at, delivered as f64));
        if t - t0 >= run.window {
            break (t, cpu, load);
        }
    };
    let seconds = (t1 - t0).as_secs_f64();
    let connections = control.server_connected.load(Ordering::Acquire);
    Ok(FanoutOutcome {
        offered_connections: run.clients,
        connections,
        server_cpu_ns_per_s: (cpu1 - cpu0) as f64 / seconds,
        clients_cpu_ns_per_s: (load1 - load0) as f64 / seconds,
        messages_in_per_s: slope(&messages),
        updates_out_per_s: slope(&updates),
    })
}

/// How often the clients case samples its delivery counters.
const RATE_SAMPLE: Duration = Duration::from_millis(5);

/// Least-squares slope of `(seconds, count)` samples: a rate per second.
fn slope(samples: &[(f64, f64)]) -> f64 {
    let n = samples.len() as f64;
    if samples.len() < 2 {
        return 0.0;
    }
    let mean_t = samples.iter().map(|s| s.0).sum::<f64>() / n;
    let mean_c = samples.iter().map(|s| s.1).sum::<f64>() / n;
    let (mut covariance, mut variance) = (0.0, 0.0);
    for &(t, c) in samples {
        covariance += (t - mean_t) * (c - mean_c);
        variance += (t - mean_t) * (t - mean_t);
    }
    if variance > 0.0 {
        covariance / variance
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::slope;

    #[test]
    fn slope_of_a_staircase_is_its_mean_rate() {
        // 1000 per second, published in steps of 17 ms.
        let samples: Vec<(f64, f64)> = (0..=200)
            .map(|i| {
                let t = i as f64 * 0.005;
                (t, ((t / 0.017).floor() * 17.0).round())
            })
            .collect();
        assert!((slope(&samples) - 1000.0).abs() < 15.0);
        assert_eq!(slope(&[(0.0, 5.0)]), 0.0);
    }
}
