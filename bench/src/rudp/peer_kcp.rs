//! KCP (`kcp`, a Rust port of skywind3000's KCP) in the suite. KCP is only a
//! protocol state machine: the transport is ours, the way its README shows
//! (an output callback doing one `sendto` per datagram, `input` per datagram
//! received, `update` when `check` says). Conversations are demultiplexed by
//! `conv` on one socket, as KCP servers (kcp-go's listener) do.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::{self, Write};
use std::net::{SocketAddr, UdpSocket};
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use kcp::Kcp;

use super::{
    loopback, set_socket_buffers, FanoutClients, FanoutEvent, FanoutServer, Role, Side, Workload,
    STREAM_BYTES,
};

pub(crate) const DESCRIPTION: &str = "kcp 0.6 (KCP), transport as in KCP's README (one sendto per output datagram, input per datagram); fast mode nodelay(1, interval 10 ms, fast resend 2, no congestion window) for ping and reliable-100B, nodelay(1, 20 ms, 2, nc) for clients=N; window 128 (ping), 32 (clients=N); reliable-100B: stream mode (the mode KCP offers for bulk small writes) with the send and receive window from the sweep (1,024 to 65,535 segments, KCP's largest; a segment carries up to 13 messages of 100 B), the sender blocking at 2 windows waiting as kcp-go's write path does; flush() right after sends and flush_ack() right after input (as kcp-go's write path and ack-no-delay do); update() when check() says; KCP has no unreliable mode, so updates ride KCP too; conversations demultiplexed by conv on one socket";

/// Datagrams KCP wants sent, written straight to the socket.
struct Output {
    socket: Rc<UdpSocket>,
    peer: SocketAddr,
}

impl Write for Output {
    fn write(&mut self, datagram: &[u8]) -> io::Result<usize> {
        match self.socket.send_to(datagram, self.peer) {
            Ok(n) => Ok(n),
            // UDP semantics: a full socket buffer drops, KCP resends.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(datagram.len()),
            Err(e) => Err(e),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Clone, Copy)]
struct Tuning {
    interval: i32,
    window: u16,
    stream: bool,
}

/// `window`: the stream's send and receive window (segments), from the
/// sweep.
fn tuning(workload: Workload, window: Option<u32>) -> Tuning {
    match workload {
        Workload::PingPong => Tuning {
            interval: 10,
            window: 128,
            stream: false,
        },
        Workload::Stream => Tuning {
            interval: 10,
            window: window.map_or(4_096, |w| w.clamp(128, u16::MAX as u32) as u16),
            stream: true,
        },
    }
}

const FANOUT_TUNING: Tuning = Tuning {
    interval: 20,
    window: 32,
    stream: false,
};

fn new_kcp(conv: u32, output: Output, tuning: Tuning, now_ms: u32) -> io::Result<Kcp<Output>> {
    let mut kcp = if tuning.stream {
        Kcp::new_stream(conv, output)
    } else {
        Kcp::new(conv, output)
    };
    kcp.set_nodelay(true, tuning.interval, 2, true);
    kcp.set_wndsize(tuning.window, tuning.window);
    // The first update arms the timers; flush() refuses to run before it.
    kcp.update(now_ms).map_err(kcp_error)?;
    Ok(kcp)
}

fn kcp_error(e: kcp::Error) -> io::Error {
    io::Error::other(format!("kcp: {e}"))
}

fn bind() -> io::Result<Rc<UdpSocket>> {
    let socket = UdpSocket::bind(loopback())?;
    set_socket_buffers(&socket)?;
    socket.set_nonblocking(true)?;
    Ok(Rc::new(socket))
}

/// Milliseconds on KCP's clock.
fn millis(epoch: Instant, now: Instant) -> u32 {
    now.saturating_duration_since(epoch).as_millis() as u32
}

pub(crate) struct KcpSide {
    socket: Rc<UdpSocket>,
    local: SocketAddr,
    epoch: Instant,
    tuning: Tuning,
    kcp: Option<Kcp<Output>>,
    datagram: Vec<u8>,
    message: Vec<u8>,
    /// Stream mode: bytes of a message not complete yet.
    carry: Vec<u8>,
    next_update: u32,
}

impl KcpSide {
    pub(crate) fn new(workload: Workload, role: Role, window: Option<u32>) -> io::Result<Self> {
        let socket = bind()?;
        let local = socket.local_addr()?;
        let epoch = Instant::now();
        let tuning = tuning(workload, window);
        let kcp = match role {
            Role::Server { .. } => None,
            Role::Client { server } => {
                let output = Output {
                    socket: socket.clone(),
                    peer: server,
                };
                Some(new_kcp(1, output, tuning, 0)?)
            }
        };
        Ok(Self {
            socket,
            local,
            epoch,
            tuning,
            kcp,
            datagram: vec![0; 64 * 1024],
            message: vec![0; 64 * 1024],
            carry: Vec::new(),
            next_update: 0,
        })
    }
}

impl Side for KcpSide {
    fn local_addr(&self) -> SocketAddr {
        self.local
    }

    fn is_connected(&self) -> bool {
        self.kcp.is_some()
    }

    fn send(&mut self, _now: Instant, bytes: &[u8]) -> bool {
        let Some(kcp) = &mut self.kcp else {
            return false;
        };
        // kcp-go's write path blocks at this depth.
        if kcp.wait_snd() >= 2 * kcp.snd_wnd() as usize {
            return false;
        }
        kcp.send(bytes).is_ok()
    }

    fn poll(&mut self, now: Instant, on_message: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        let now_ms = millis(self.epoch, now);
        let mut received = false;
        loop {
            let (len, from) = match self.socket.recv_from(&mut self.datagram) {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            if self.kcp.is_none() {
                let conv = kcp::get_conv(&self.datagram[..len]);
                let output = Output {
                    socket: self.socket.clone(),
                    peer: from,
                };
                self.kcp = Some(new_kcp(conv, output, self.tuning, now_ms)?);
            }
            if let Some(kcp) = &mut self.kcp {
                // A datagram of another conversation or garbage: dropped.
                let _ = kcp.input(&self.datagram[..len]);
                received = true;
            }
        }
        let Some(kcp) = &mut self.kcp else {
            return Ok(());
        };
        if received {
            kcp.flush_ack().map_err(kcp_error)?;
        }
        if now_ms >= self.next_update {
            kcp.update(now_ms).map_err(kcp_error)?;
            self.next_update = now_ms + kcp.check(now_ms).max(1);
        }
        while let Ok(n) = kcp.recv(&mut self.message) {
            if self.tuning.stream {
                self.carry.extend_from_slice(&self.message[..n]);
                let whole = self.carry.len() / STREAM_BYTES * STREAM_BYTES;
                for m in self.carry[..whole].chunks(STREAM_BYTES) {
                    on_message(m);
                }
                self.carry.drain(..whole);
            } else {
                on_message(&self.message[..n]);
            }
        }
        Ok(())
    }

    fn flush(&mut self, _now: Instant) -> io::Result<()> {
        if let Some(kcp) = &mut self.kcp {
            kcp.flush().map_err(kcp_error)?;
        }
        Ok(())
    }

    fn deadline(&mut self) -> Option<Instant> {
        Some(self.epoch + Duration::from_millis(self.next_update as u64))
    }

    fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

/// Many conversations on one socket, with a timer heap driven by `check`.
struct Conversations {
    socket: Rc<UdpSocket>,
    epoch: Instant,
    by_conv: HashMap<u32, usize>,
    kcps: Vec<Kcp<Output>>,
    /// Next update instant (KCP ms) of each conversation.
    next_update: Vec<u32>,
    timers: BinaryHeap<Reverse<(u32, usize)>>,
    /// Conversations touched this turn (need a flush).
    touched: Vec<usize>,
    is_touched: Vec<bool>,
    datagram: Vec<u8>,
    message: Vec<u8>,
}

impl Conversations {
    fn new(socket: Rc<UdpSocket>) -> Self {
        Self {
            socket,
            epoch: Instant::now(),
            by_conv: HashMap::new(),
            kcps: Vec::new(),
            next_update: Vec::new(),
            timers: BinaryHeap::new(),
            touched: Vec::new(),
            is_touched: Vec::new(),
            datagram: vec![0; 64 * 1024],
            message: vec![0; 64 * 1024],
        }
    }

    fn add(&mut self, conv: u32, peer: SocketAddr, now: Instant) -> io::Result<usize> {
        let output = Output {
            socket: self.socket.clone(),
            peer,
        };
        let now_ms = millis(self.epoch, now);
        let kcp = new_kcp(conv, output, FANOUT_TUNING, now_ms)?;
        let index = self.kcps.len();
        self.next_update.push(now_ms + kcp.check(now_ms).max(1));
        self.timers.push(Reverse((self.next_update[index], index)));
        self.kcps.push(kcp);
        self.is_touched.push(false);
        self.by_conv.insert(conv, index);
        Ok(index)
    }

    fn touch(&mut self, index: usize) {
        if !self.is_touched[index] {
            self.is_touched[index] = true;
            self.touched.push(index);
        }
    }

    /// Reads every datagram; `accept` decides whether an unknown conv opens
    /// a conversation. Calls `on_message(index)` per message.
    fn receive(
        &mut self,
        now: Instant,
        accept: bool,
        on_new: &mut dyn FnMut(usize),
        on_message: &mut dyn FnMut(usize),
    ) -> io::Result<()> {
        loop {
            let (len, from) = match self.socket.recv_from(&mut self.datagram) {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            let conv = kcp::get_conv(&self.datagram[..len]);
            let index = match self.by_conv.get(&conv) {
                Some(&index) => index,
                None if accept => {
                    let index = self.add(conv, from, now)?;
                    on_new(index);
                    index
                }
                None => continue,
            };
            let _ = self.kcps[index].input(&self.datagram[..len]);
            self.touch(index);
        }
        // Acks go out at once; messages are handed over.
        for i in 0..self.touched.len() {
            let index = self.touched[i];
            let kcp = &mut self.kcps[index];
            kcp.flush_ack().map_err(kcp_error)?;
            while kcp.recv(&mut self.message).is_ok() {
                on_message(index);
            }
        }
        // Timers.
        let now_ms = millis(self.epoch, now);
        while let Some(&Reverse((at, index))) = self.timers.peek() {
            if at > now_ms {
                break;
            }
            self.timers.pop();
            if self.next_update[index] != at {
                continue;
            }
            let kcp = &mut self.kcps[index];
            kcp.update(now_ms).map_err(kcp_error)?;
            self.next_update[index] = now_ms + kcp.check(now_ms).max(1);
            self.timers.push(Reverse((self.next_update[index], index)));
        }
        Ok(())
    }

    fn send(&mut self, index: usize, bytes: &[u8]) {
        if self.kcps[index].send(bytes).is_ok() {
            self.touch(index);
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        for index in self.touched.drain(..) {
            self.is_touched[index] = false;
            self.kcps[index].flush().map_err(kcp_error)?;
        }
        Ok(())
    }

    fn deadline(&self) -> Option<Instant> {
        let &Reverse((at, _)) = self.timers.peek()?;
        Some(self.epoch + Duration::from_millis(at as u64))
    }
}

pub(crate) struct KcpFanoutServer {
    conversations: Conversations,
    local: SocketAddr,
}

impl KcpFanoutServer {
    pub(crate) fn new() -> io::Result<Self> {
        let socket = bind()?;
        let local = socket.local_addr()?;
        Ok(Self {
            conversations: Conversations::new(socket),
            local,
        })
    }
}

impl FanoutServer for KcpFanoutServer {
    fn local_addr(&self) -> SocketAddr {
        self.local
    }

    fn poll(&mut self, now: Instant, on_event: &mut dyn FnMut(FanoutEvent)) -> io::Result<()> {
        let on_event = RefCell::new(on_event);
        self.conversations.receive(
            now,
            true,
            &mut |index| (on_event.borrow_mut())(FanoutEvent::Connected(index as u64)),
            &mut |index| (on_event.borrow_mut())(FanoutEvent::Message(index as u64)),
        )
    }

    fn send_update(&mut self, _now: Instant, key: u64, bytes: &[u8]) {
        self.conversations.send(key as usize, bytes);
    }

    fn flush(&mut self, _now: Instant) -> io::Result<()> {
        self.conversations.flush()
    }

    fn deadline(&mut self) -> Option<Instant> {
        self.conversations.deadline()
    }

    fn fd(&self) -> RawFd {
        self.conversations.socket.as_raw_fd()
    }
}

/// Every client conversation (conv = client index + 1) on one socket.
pub(crate) struct KcpFanoutClients {
    conversations: Conversations,
    server: SocketAddr,
    /// Conversation index of each client.
    index_of: Vec<Option<usize>>,
}

impl KcpFanoutClients {
    pub(crate) fn new(server: SocketAddr, clients: usize) -> io::Result<Self> {
        Ok(Self {
            conversations: Conversations::new(bind()?),
            server,
            index_of: vec![None; clients],
        })
    }
}

impl FanoutClients for KcpFanoutClients {
    fn connect(&mut self, now: Instant, clients: Range<usize>) -> io::Result<()> {
        for client in clients {
            let index = self
                .conversations
                .add(client as u32 + 1, self.server, now)?;
            self.index_of[client] = Some(index);
        }
        Ok(())
    }

    /// KCP has no handshake: a conversation exists once created.
    fn connected(&self) -> usize {
        self.conversations.kcps.len()
    }

    fn poll(&mut self, now: Instant) -> io::Result<u64> {
        let mut updates = 0;
        self.conversations
            .receive(now, false, &mut |_| {}, &mut |_| updates += 1)?;
        Ok(updates)
    }

    fn send(&mut self, _now: Instant, client: usize, bytes: &[u8]) {
        if let Some(index) = self.index_of[client] {
            self.conversations.send(index, bytes);
        }
    }

    fn flush(&mut self, _now: Instant) -> io::Result<()> {
        self.conversations.flush()
    }

    fn deadline(&mut self) -> Option<Instant> {
        self.conversations.deadline()
    }

    fn fds(&self, out: &mut Vec<RawFd>) {
        out.push(self.conversations.socket.as_raw_fd());
    }
}
