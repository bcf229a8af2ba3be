//! ENet (`rusty_enet`, a Rust port of ENet 1.3.18) in the suite: one `Host`
//! per side on a std `UdpSocket` (ENet's own socket model: one
//! `recvfrom`/`sendto` per datagram), reliable packets on channel 0, updates
//! as unreliable (sequenced) packets on channel 1.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

use rusty_enet::{Event, Host, HostSettings, Packet, PeerID};

use super::{
    loopback, set_socket_buffers, FanoutClients, FanoutEvent, FanoutServer, Role, Side, Workload,
};

/// ENet peer ids are 12 bits: a host holds at most 4095 peers.
pub(crate) const PEERS_MAX: usize = rusty_enet::consts::PROTOCOL_MAXIMUM_PEER_ID as usize;

pub(crate) const DESCRIPTION: &str = "rusty_enet 0.4 (ENet 1.3.18), one Host per side on a std UdpSocket (one syscall per datagram, as ENet does), default host settings (no bandwidth limits, so ENet's reliable window is its protocol ceiling, 64 KiB of reliable data in flight per peer: about 580 messages of 100 B, which caps a stream at ~580 / RTT whatever the link); reliable packets on channel 0, updates as unreliable sequenced packets on channel 1 (one Packet shared by all peers, ENet's refcounted broadcast style); service() called every loop turn, flush() after sends; reliable-100B: the packet throttle (which scales that window by throttle/32 when RTT samples rise) swept over presets via Peer::set_throttle (enet_peer_throttle_configure) on both peers: 0 = ENet's defaults (interval 5000 ms, acceleration 2, deceleration 2), 1 = responsive (1000 ms, 8, 1), 2 = held open (5000 ms, acceleration 32, deceleration 0: the window never shrinks); ping and clients=N: defaults; at most 4095 peers per host, so the load generator uses one client host per 4095 connections";

/// The stream's throttle settings the window sweep tries (indices of
/// `THROTTLES`).
pub(crate) const THROTTLE_PRESETS: [u32; 3] = [0, 1, 2];
pub(crate) const THROTTLE_PRESETS_TEXT: &str = "packet throttle preset: 0 ENet defaults (5000 ms, 2, 2), 1 responsive (1000 ms, 8, 1), 2 held open (5000 ms, 32, 0)";

/// (interval ms, acceleration, deceleration) per preset. ENet documents
/// acceleration and deceleration as ratios to the throttle scale (32): a
/// deceleration of 0 never lowers the throttle, so the reliable window
/// stays at 64 KiB.
const THROTTLES: [(u32, u32, u32); 3] = [(5000, 2, 2), (1000, 8, 1), (5000, 32, 0)];

const CHANNELS: usize = 2;
const RELIABLE: u8 = 0;
const UPDATES: u8 = 1;

fn host(peers: usize) -> io::Result<(Host<UdpSocket>, SocketAddr, RawFd)> {
    let socket = UdpSocket::bind(loopback())?;
    set_socket_buffers(&socket)?;
    let local = socket.local_addr()?;
    let fd = socket.as_raw_fd();
    let host = Host::new(
        socket,
        HostSettings {
            peer_limit: peers.clamp(1, PEERS_MAX),
            channel_limit: CHANNELS,
            ..HostSettings::default()
        },
    )
    .map_err(|e| io::Error::other(format!("{e:?}")))?;
    Ok((host, local, fd))
}

pub(crate) struct EnetSide {
    host: Host<UdpSocket>,
    local: SocketAddr,
    fd: RawFd,
    peer: Option<PeerID>,
    connected: bool,
    /// Set on the peer once connected (stream only).
    throttle: Option<(u32, u32, u32)>,
}

impl EnetSide {
    /// `throttle`: a preset of `THROTTLES` for the stream.
    pub(crate) fn new(workload: Workload, role: Role, throttle: Option<u32>) -> io::Result<Self> {
        let throttle = match workload {
            Workload::Stream => {
                throttle.map(|preset| THROTTLES[(preset as usize).min(THROTTLES.len() - 1)])
            }
            Workload::PingPong => None,
        };
        let (mut host, local, fd) = host(1)?;
        let peer = match role {
            Role::Server { .. } => None,
            Role::Client { server } => Some(
                host.connect(server, CHANNELS, 0)
                    .map_err(|e| io::Error::other(format!("{e:?}")))?
                    .id(),
            ),
        };
        Ok(Self {
            host,
            local,
            fd,
            peer,
            connected: false,
            throttle,
        })
    }
}

impl Side for EnetSide {
    fn local_addr(&self) -> SocketAddr {
        self.local
    }

    fn is_connected(&self) -> bool {
        self.connected
    }

    fn send(&mut self, _now: Instant, bytes: &[u8]) -> bool {
        let Some(peer) = self.peer else { return false };
        self.host
            .peer_mut(peer)
            .send(RELIABLE, &Packet::reliable(bytes))
            .is_ok()
    }

    fn poll(&mut self, _now: Instant, on_message: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        while let Some(event) = self.host.service()? {
            match event {
                Event::Connect { peer, .. } => {
                    if let Some((interval, acceleration, deceleration)) = self.throttle {
                        peer.set_throttle(interval, acceleration, deceleration);
                    }
                    self.peer = Some(peer.id());
                    self.connected = true;
                }
                Event::Receive { packet, .. } => on_message(packet.data()),
                Event::Disconnect { data, .. } => {
                    return Err(io::Error::other(format!(
                        "ENet peer disconnected (data {data})"
                    )));
                }
            }
        }
        Ok(())
    }

    fn flush(&mut self, _now: Instant) -> io::Result<()> {
        self.host.flush();
        Ok(())
    }

    fn fd(&self) -> RawFd {
        self.fd
    }
}

pub(crate) struct EnetFanoutServer {
    host: Host<UdpSocket>,
    local: SocketAddr,
    fd: RawFd,
    /// The update of the current turn, shared by every peer it goes to.
    update: Option<Packet>,
}

impl EnetFanoutServer {
    pub(crate) fn new(clients: usize) -> io::Result<Self> {
        let (host, local, fd) = host(clients)?;
        Ok(Self {
            host,
            local,
            fd,
            update: None,
        })
    }
}

impl FanoutServer for EnetFanoutServer {
    fn local_addr(&self) -> SocketAddr {
        self.local
    }

    fn poll(&mut self, _now: Instant, on_event: &mut dyn FnMut(FanoutEvent)) -> io::Result<()> {
        self.update = None;
        while let Some(event) = self.host.service()? {
            match event {
                Event::Connect { peer, .. } => on_event(FanoutEvent::Connected(peer.id().0 as u64)),
                Event::Receive { peer, .. } => on_event(FanoutEvent::Message(peer.id().0 as u64)),
                Event::Disconnect { peer, .. } => {
                    on_event(FanoutEvent::Disconnected(peer.id().0 as u64))
                }
            }
        }
        Ok(())
    }

    fn send_update(&mut self, _now: Instant, key: u64, bytes: &[u8]) {
        let packet = self.update.get_or_insert_with(|| Packet::unreliable(bytes));
        let _ = self
            .host
            .peer_mut(PeerID(key as usize))
            .send(UPDATES, packet);
    }

    fn flush(&mut self, _now: Instant) -> io::Result<()> {
        self.host.flush();
        Ok(())
    }

    fn fd(&self) -> RawFd {
        self.fd
    }
}

pub(crate) struct EnetFanoutClients {
    server: SocketAddr,
    hosts: Vec<(Host<UdpSocket>, RawFd)>,
    /// (host, peer) of each client.
    peers: Vec<Option<(usize, PeerID)>>,
    connected: usize,
}

impl EnetFanoutClients {
    pub(crate) fn new(server: SocketAddr, clients: usize) -> io::Result<Self> {
        let mut hosts = Vec::new();
        let mut left = clients;
        while left > 0 {
            let n = left.min(PEERS_MAX);
            let (host, _, fd) = host(n)?;
            hosts.push((host, fd));
            left -= n;
        }
        Ok(Self {
            server,
            hosts,
            peers: vec![None; clients],
            connected: 0,
        })
    }
}

impl FanoutClients for EnetFanoutClients {
    fn connect(&mut self, _now: Instant, clients: Range<usize>) -> io::Result<()> {
        for client in clients {
            let index = client / PEERS_MAX;
            let peer = self.hosts[index]
                .0
                .connect(self.server, CHANNELS, client as u32)
                .map_err(|e| io::Error::other(format!("{e:?}")))?
                .id();
            self.peers[client] = Some((index, peer));
        }
        Ok(())
    }

    fn connected(&self) -> usize {
        self.connected
    }

    fn poll(&mut self, _now: Instant) -> io::Result<u64> {
        let mut updates = 0;
        for (host, _) in &mut self.hosts {
            while let Some(event) = host.service()? {
                match event {
                    Event::Connect { .. } => self.connected += 1,
                    Event::Receive { .. } => updates += 1,
                    Event::Disconnect { .. } => {
                        return Err(io::Error::other("an ENet client was disconnected"));
                    }
                }
            }
        }
        Ok(updates)
    }

    fn send(&mut self, _now: Instant, client: usize, bytes: &[u8]) {
        if let Some((index, peer)) = self.peers[client] {
            let _ = self.hosts[index]
                .0
                .peer_mut(peer)
                .send(RELIABLE, &Packet::reliable(bytes));
        }
    }

    fn flush(&mut self, _now: Instant) -> io::Result<()> {
        for (host, _) in &mut self.hosts {
            host.flush();
        }
        Ok(())
    }

    fn fds(&self, out: &mut Vec<RawFd>) {
        out.extend(self.hosts.iter().map(|(_, fd)| *fd));
    }
}
