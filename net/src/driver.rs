//! The socket driver (feature `driver`): the only part of this crate that
//! touches the OS.
//!
//! - [`BatchSocket`]: a non-blocking UDP socket (bound with `SO_REUSEPORT` so
//!   every shard can bind the same port) read with `recvmmsg` and written
//!   with `sendmmsg` into reusable buffers; [`IoMode::Single`] does one
//!   syscall per datagram instead, to compare. A shard loop calls it
//!   synchronously every turn.
//! - [`Readiness`]: waits inside glommio until the socket is readable
//!   (an io_uring `recvmsg(MSG_PEEK)` on a duplicate of the fd), so a parked
//!   shard wakes on traffic without consuming the datagram.
//! - [`run_endpoint`]: a small loop that runs one [`Endpoint`] on one socket by
//!   itself (CLI client, tests), with one timer for the endpoint's next
//!   deadline.
//!
//! An optional [`LinkConditioner`] on the send path degrades the link for
//! manual testing.

use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::ops::ControlFlow;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::ptr;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::conditioner::LinkConditioner;
use crate::endpoint::{Endpoint, TransmitBatch};

/// Most datagrams per `recvmmsg`/`sendmmsg` call.
pub const BATCH_MAX: usize = 128;

/// Glommio's io_uring buffer memory for executors made here: the locked
/// memory limit is small (8 MiB on the dev machines), and UDP needs little.
pub const IO_MEMORY_BYTES: usize = 256 * 1024;

/// A seed for [`Endpoint::new`] from the OS.
pub fn os_seed() -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    getrandom::getrandom(&mut bytes).map_err(|e| io::Error::other(e.to_string()))?;
    Ok(u64::from_le_bytes(bytes))
}

/// How the socket talks to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoMode {
    /// `recvmmsg`/`sendmmsg`: one syscall per batch.
    Batched,
    /// `recvfrom`/`sendto`: one syscall per datagram (for comparison).
    Single,
}

/// Socket options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketConfig {
    /// Set `SO_REUSEPORT` so several shards bind the same port (the kernel
    /// spreads flows across them by address hash).
    pub reuse_port: bool,
    /// Datagrams per receive batch (at most [`BATCH_MAX`]).
    pub batch: usize,
    /// Receive buffer per datagram; longer datagrams are dropped and counted.
    pub datagram_max: usize,
    /// `SO_RCVBUF`, if set.
    pub recv_buffer_bytes: Option<usize>,
    /// `SO_SNDBUF`, if set.
    pub send_buffer_bytes: Option<usize>,
    /// Batched or one datagram per call.
    pub mode: IoMode,
}

impl Default for SocketConfig {
    fn default() -> Self {
        Self {
            reuse_port: true,
            batch: 64,
            datagram_max: 2048,
            recv_buffer_bytes: Some(4 << 20),
            send_buffer_bytes: Some(4 << 20),
            mode: IoMode::Batched,
        }
    }
}

/// Socket counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketStats {
    /// Receive syscalls that returned data.
    pub recv_calls: u64,
    /// Datagrams received.
    pub recv_datagrams: u64,
    /// Datagrams dropped because they did not fit `datagram_max`.
    pub recv_truncated: u64,
    /// Send syscalls.
    pub send_calls: u64,
    /// Datagrams handed to the kernel.
    pub send_datagrams: u64,
    /// Datagrams dropped because the socket buffer was full.
    pub send_would_block: u64,
    /// Datagrams the kernel refused with another error.
    pub send_errors: u64,
}

/// A non-blocking UDP socket with batched receive and send.
#[derive(Debug)]
pub struct BatchSocket {
    socket: Socket,
    local: SocketAddr,
    mode: IoMode,
    batch: usize,
    datagram_max: usize,
    recv_data: Vec<u8>,
    recv_addrs: Vec<libc::sockaddr_storage>,
    /// (source, offset, length) of the datagrams of the last receive.
    received: Vec<(SocketAddr, usize, usize)>,
    send_addrs: Vec<libc::sockaddr_storage>,
    /// Message headers and iovecs of `recvmmsg`/`sendmmsg`, kept between
    /// calls so a call does not clear kilobytes of arrays first (the
    /// pointers inside are rewritten before every call).
    recv_headers: Vec<libc::mmsghdr>,
    recv_iovecs: Vec<libc::iovec>,
    send_headers: Vec<libc::mmsghdr>,
    send_iovecs: Vec<libc::iovec>,
    conditioner: Option<LinkConditioner>,
    stats: SocketStats,
}

fn zeroed_storage() -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    unsafe { mem::zeroed() }
}

fn zeroed_header() -> libc::mmsghdr {
    // SAFETY: mmsghdr is plain old data; all-zero is a valid value.
    unsafe { mem::zeroed() }
}

fn zeroed_iovec() -> libc::iovec {
    libc::iovec {
        iov_base: ptr::null_mut(),
        iov_len: 0,
    }
}

fn write_sockaddr(addr: &SocketAddr, storage: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { ptr::write(storage as *mut _ as *mut libc::sockaddr_in, sin) };
            mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { ptr::write(storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

fn read_sockaddr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin = unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::from((ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 = unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn would_block(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

impl BatchSocket {
    /// Binds a non-blocking UDP socket to `addr`.
    pub fn bind(addr: SocketAddr, config: &SocketConfig) -> io::Result<Self> {
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        if config.reuse_port {
            socket.set_reuse_port(true)?;
        }
        if let Some(bytes) = config.recv_buffer_bytes {
            socket.set_recv_buffer_size(bytes)?;
        }
        if let Some(bytes) = config.send_buffer_bytes {
            socket.set_send_buffer_size(bytes)?;
        }
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        let local = socket
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("bound address is not an IP address"))?;
        let batch = config.batch.clamp(1, BATCH_MAX);
        let datagram_max = config.datagram_max.max(64);
        Ok(Self {
            socket,
            local,
            mode: config.mode,
            batch,
            datagram_max,
            recv_data: vec![0; batch * datagram_max],
            recv_addrs: vec![zeroed_storage(); batch],
            received: Vec::with_capacity(batch),
            send_addrs: vec![zeroed_storage(); BATCH_MAX],
            recv_headers: vec![zeroed_header(); batch],
            recv_iovecs: vec![zeroed_iovec(); batch],
            send_headers: vec![zeroed_header(); BATCH_MAX],
            send_iovecs: vec![zeroed_iovec(); BATCH_MAX],
            conditioner: None,
            stats: SocketStats::default(),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Datagrams per receive batch.
    pub fn batch_size(&self) -> usize {
        self.batch
    }

    /// Counters.
    pub fn stats(&self) -> SocketStats {
        self.stats
    }

    /// Puts a link conditioner on the send path (manual testing), or removes
    /// it. Conditioned datagrams go out through [`BatchSocket::flush_conditioner`].
    pub fn set_conditioner(&mut self, conditioner: Option<LinkConditioner>) {
        self.conditioner = conditioner;
    }

    /// When the conditioner releases its next datagram.
    pub fn conditioner_deadline(&self) -> Option<Instant> {
        self.conditioner.as_ref().and_then(|c| c.next_deadline())
    }

    /// Reads what is waiting, up to one batch, without blocking. Returns how
    /// many datagrams the kernel handed over (less than the batch size means
    /// the queue was drained); read them with [`BatchSocket::received`].
    pub fn recv_batch(&mut self) -> io::Result<usize> {
        self.received.clear();
        match self.mode {
            IoMode::Batched => self.recv_mmsg(),
            IoMode::Single => self.recv_single(),
        }
    }

    /// The datagrams of the last [`BatchSocket::recv_batch`].
    pub fn received(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> + '_ {
        self.received
            .iter()
            .map(|&(from, offset, len)| (from, &self.recv_data[offset..offset + len]))
    }

    fn recv_mmsg(&mut self) -> io::Result<usize> {
        let n = self.batch;
        let base = self.recv_data.as_mut_ptr();
        for i in 0..n {
            self.recv_iovecs[i] = libc::iovec {
                // SAFETY: i * datagram_max + datagram_max <= recv_data.len().
                iov_base: unsafe { base.add(i * self.datagram_max) } as *mut libc::c_void,
                iov_len: self.datagram_max,
            };
            let header = &mut self.recv_headers[i].msg_hdr;
            header.msg_name = &mut self.recv_addrs[i] as *mut _ as *mut libc::c_void;
            header.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            header.msg_iov = &mut self.recv_iovecs[i];
            header.msg_iovlen = 1;
            header.msg_flags = 0;
        }
        // SAFETY: every pointer in the headers points into buffers owned by
        // `self` that live (unmoved) until the call returns; the kernel
        // writes at most the given sizes.
        let count = unsafe {
            libc::recvmmsg(
                self.socket.as_raw_fd(),
                self.recv_headers.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                ptr::null_mut(),
            )
        };
        if count < 0 {
            let error = io::Error::last_os_error();
            return if would_block(&error) {
                Ok(0)
            } else {
                Err(error)
            };
        }
        let count = count as usize;
        self.stats.recv_calls += 1;
        for (i, message) in self.recv_headers.iter().enumerate().take(count) {
            if message.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                self.stats.recv_truncated += 1;
                continue;
            }
            if let Some(from) = read_sockaddr(&self.recv_addrs[i]) {
                self.received
                    .push((from, i * self.datagram_max, message.msg_len as usize));
            }
        }
        self.stats.recv_datagrams += self.received.len() as u64;
        Ok(count)
    }

    fn recv_single(&mut self) -> io::Result<usize> {
        let mut count = 0;
        while count < self.batch {
            let offset = count * self.datagram_max;
            let mut storage = zeroed_storage();
            let mut storage_len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            // SAFETY: the buffer and the address storage are valid for the
            // given lengths for the duration of the call.
            let len = unsafe {
                libc::recvfrom(
                    self.socket.as_raw_fd(),
                    self.recv_data[offset..].as_mut_ptr() as *mut libc::c_void,
                    self.datagram_max,
                    libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                    &mut storage as *mut _ as *mut libc::sockaddr,
                    &mut storage_len,
                )
            };
            if len < 0 {
                let error = io::Error::last_os_error();
                if would_block(&error) {
                    break;
                }
                return Err(error);
            }
            self.stats.recv_calls += 1;
            count += 1;
            if len as usize > self.datagram_max {
                self.stats.recv_truncated += 1;
                continue;
            }
            if let Some(from) = read_sockaddr(&storage) {
                self.received.push((from, offset, len as usize));
                self.stats.recv_datagrams += 1;
            }
        }
        Ok(count)
    }

    /// Sends every datagram of `batch` (through the conditioner when one is
    /// set). Datagrams the kernel cannot take now are dropped and counted:
    /// UDP semantics, the protocol recovers. Returns how many were handed
    /// to the kernel (or to the conditioner).
    pub fn send_batch(&mut self, now: Instant, batch: &TransmitBatch) -> io::Result<usize> {
        if let Some(conditioner) = &mut self.conditioner {
            for t in batch.iter() {
                conditioner.send(now, self.local, t.destination, t.payload);
            }
            self.flush_conditioner(now)?;
            return Ok(batch.len());
        }
        match self.mode {
            IoMode::Batched => Ok(self.send_mmsg(batch)),
            IoMode::Single => Ok(self.send_single(batch)),
        }
    }

    /// Sends what the conditioner releases at `now`.
    pub fn flush_conditioner(&mut self, now: Instant) -> io::Result<()> {
        let Some(conditioner) = &mut self.conditioner else {
            return Ok(());
        };
        while let Some(d) = conditioner.poll(now) {
            self.stats.send_calls += 1;
            match self.socket.send_to(&d.bytes, &d.to.into()) {
                Ok(_) => self.stats.send_datagrams += 1,
                Err(error) if would_block(&error) => self.stats.send_would_block += 1,
                Err(_) => self.stats.send_errors += 1,
            }
        }
        Ok(())
    }

    fn send_mmsg(&mut self, batch: &TransmitBatch) -> usize {
        let total = batch.len();
        let mut sent = 0;
        let mut next = 0;
        while next < total {
            let n = (total - next).min(BATCH_MAX);
            for i in 0..n {
                let Some(t) = batch.get(next + i) else { break };
                let name_len = write_sockaddr(&t.destination, &mut self.send_addrs[i]);
                self.send_iovecs[i] = libc::iovec {
                    // The kernel only reads through this pointer.
                    iov_base: t.payload.as_ptr() as *mut libc::c_void,
                    iov_len: t.payload.len(),
                };
                let header = &mut self.send_headers[i].msg_hdr;
                header.msg_name = &mut self.send_addrs[i] as *mut _ as *mut libc::c_void;
                header.msg_namelen = name_len;
                header.msg_iov = &mut self.send_iovecs[i];
                header.msg_iovlen = 1;
            }
            // SAFETY: every pointer refers to memory alive for the call.
            let result = unsafe {
                libc::sendmmsg(
                    self.socket.as_raw_fd(),
                    self.send_headers.as_mut_ptr(),
                    n as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            self.stats.send_calls += 1;
            if result < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if error.kind() == io::ErrorKind::WouldBlock {
                    self.stats.send_would_block += (total - next) as u64;
                    break;
                }
                // The first datagram of the call was refused: skip it.
                self.stats.send_errors += 1;
                next += 1;
                continue;
            }
            sent += result as usize;
            next += result as usize;
        }
        self.stats.send_datagrams += sent as u64;
        sent
    }

    fn send_single(&mut self, batch: &TransmitBatch) -> usize {
        let mut sent = 0;
        for t in batch.iter() {
            self.stats.send_calls += 1;
            match self.socket.send_to(t.payload, &t.destination.into()) {
                Ok(_) => sent += 1,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    self.stats.send_would_block += 1
                }
                Err(_) => self.stats.send_errors += 1,
            }
        }
        self.stats.send_datagrams += sent as u64;
        sent
    }

    /// Blocks the calling thread until the socket has a datagram or
    /// `timeout` passes (at most a second), for drivers outside glommio
    /// (tools, a coordinator loop).
    pub fn wait_readable(&self, timeout: Duration) {
        let mut pfd = libc::pollfd {
            fd: self.socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(1000) as libc::c_int;
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe {
            libc::poll(&mut pfd, 1, ms);
        }
    }

    /// A glommio readiness waiter on this socket. Call inside a glommio
    /// executor.
    pub fn readiness(&self) -> io::Result<Readiness> {
        // SAFETY: dup returns a new descriptor we own (or -1).
        let fd: RawFd = unsafe { libc::dup(self.socket.as_raw_fd()) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor for a UDP socket, owned by the
        // glommio socket from now on (it closes it on drop).
        let socket = unsafe { glommio::net::UdpSocket::from_raw_fd(fd) };
        Ok(Readiness { socket })
    }
}

// SAFETY: the raw pointers in the kept message headers point into buffers
// the socket owns and are rewritten before every call that reads them; no
// pointer is ever used across threads or after a move.
unsafe impl Send for BatchSocket {}

impl AsRawFd for BatchSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

/// Waits in glommio until a socket has a datagram, without reading it.
#[derive(Debug)]
pub struct Readiness {
    socket: glommio::net::UdpSocket,
}

impl Readiness {
    /// Completes when a datagram is waiting (the datagram stays queued for
    /// the next [`BatchSocket::recv_batch`]).
    pub async fn readable(&self) -> io::Result<()> {
        let mut byte = [0u8; 1];
        self.socket
            .peek_from(&mut byte)
            .await
            .map(|_| ())
            .map_err(io::Error::from)
    }
}

/// A glommio executor sized for this crate (small `io_memory`, see
/// [`IO_MEMORY_BYTES`]), unpinned.
pub fn executor() -> io::Result<glommio::LocalExecutor> {
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(IO_MEMORY_BYTES)
        .make()
        .map_err(io::Error::from)
}

impl BatchSocket {
    /// Reads waiting batches into `endpoint` (at most `max_batches`, so a
    /// flood cannot starve the caller), then runs the endpoint's due timers.
    /// Draining the socket before transmitting keeps an overloaded loop from
    /// letting the kernel drop datagrams, acks among them. Returns the
    /// datagrams read and whether the socket was left empty.
    pub fn receive_into(
        &mut self,
        endpoint: &mut Endpoint,
        now: Instant,
        max_batches: usize,
    ) -> io::Result<(usize, bool)> {
        let mut read = 0;
        let mut drained = Ok(false);
        for _ in 0..max_batches {
            match self.recv_batch() {
                Ok(n) => {
                    for (from, bytes) in self.received() {
                        endpoint.handle_datagram(now, from, bytes);
                    }
                    read += n;
                    if n < self.batch_size() {
                        drained = Ok(true);
                        break;
                    }
                }
                Err(e) => {
                    drained = Err(e);
                    break;
                }
            }
        }
        // Timers run even after a failed read: they do not depend on it.
        if endpoint.poll_timeout().is_some_and(|t| t <= now) {
            endpoint.handle_timeout(now);
        }
        drained.map(|d| (read, d))
    }

    /// Hands everything `endpoint` has to send to the kernel, `batch` at a
    /// time. Returns the datagrams sent.
    pub fn transmit_from(
        &mut self,
        endpoint: &mut Endpoint,
        batch: &mut TransmitBatch,
        now: Instant,
    ) -> io::Result<usize> {
        let mut sent = 0;
        loop {
            batch.clear();
            let n = endpoint.poll_transmit(now, batch);
            if n > 0 {
                sent += self.send_batch(now, batch)?;
            }
            if n < batch.capacity() {
                return Ok(sent);
            }
        }
    }
}

/// Runs `endpoint` on `socket` until `on_turn` breaks. Each turn: read every
/// waiting datagram, run due timers, call `on_turn` (drain events, send),
/// flush transmits; then sleep until traffic, the endpoint's next deadline,
/// or `max_wait` (so `on_turn` runs at least that often). Call inside a
/// glommio executor.
pub async fn run_endpoint<F>(
    endpoint: &mut Endpoint,
    socket: &mut BatchSocket,
    max_wait: Duration,
    mut on_turn: F,
) -> io::Result<()>
where
    F: FnMut(&mut Endpoint, Instant) -> ControlFlow<()>,
{
    let readiness = socket.readiness()?;
    let mut batch = TransmitBatch::new(socket.batch_size());
    loop {
        let now = Instant::now();
        socket.receive_into(endpoint, now, usize::MAX)?;
        let flow = on_turn(endpoint, now);
        socket.transmit_from(endpoint, &mut batch, now)?;
        socket.flush_conditioner(now)?;
        if flow.is_break() {
            return Ok(());
        }
        let mut wake = now + max_wait;
        for deadline in [endpoint.poll_timeout(), socket.conditioner_deadline()]
            .into_iter()
            .flatten()
        {
            wake = wake.min(deadline);
        }
        let wait = wake.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            glommio::yield_if_needed().await;
            continue;
        }
        futures_lite::future::or(readiness.readable(), async {
            glommio::timer::sleep(wait).await;
            Ok(())
        })
        .await?;
    }
}
