//! Connect tokens and sealed sessions: who gets in, and what an attacker
//! on the path can and cannot do.

mod util;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tessera_net::conditioner::ConditionerConfig;
use tessera_net::pair::{Pair, PAIR_UNIX_MS};
use tessera_net::token::{ConnectToken, SessionKeys, TokenKey, TokenRequest};
use tessera_net::wire::{self, PacketType};
use tessera_net::{
    ChannelId, Config, ConnectionHandle, DisconnectReason, Endpoint, Event, RejectReason,
    TokenPolicy, TransmitBatch,
};
use util::{make_message, received};

const KEY: TokenKey = TokenKey([0x42; 32]);
const RO: ChannelId = ChannelId::RELIABLE_ORDERED;
const SERVER: ([u8; 4], u16) = ([10, 0, 0, 1], 7777);

fn server_addr() -> SocketAddr {
    SocketAddr::from(SERVER)
}

fn token(client_id: u64, expires_unix_s: u64, servers: &[SocketAddr], salt: u8) -> ConnectToken {
    ConnectToken::mint(
        &KEY,
        &TokenRequest {
            client_id,
            expires_unix_s,
            servers,
            user_data: b"alice",
        },
        SessionKeys {
            client_to_server: [salt; 32],
            server_to_client: [salt ^ 0xFF; 32],
        },
        [salt; 24],
    )
    .unwrap()
}

/// A server and clients on their own addresses, datagrams handed over by
/// hand so a test can look at, change, drop or replay any of them.
struct Net {
    now: Instant,
    server: Endpoint,
    clients: Vec<(SocketAddr, Endpoint)>,
    /// (from, to, bytes) in flight.
    wire: Vec<(SocketAddr, SocketAddr, Vec<u8>)>,
    server_events: Vec<Event>,
    client_events: Vec<Vec<Event>>,
}

impl Net {
    fn new(clients: usize) -> Net {
        let addrs = (0..clients)
            .map(|i| SocketAddr::from(([10, 0, 1, i as u8 + 1], 40_000)))
            .collect();
        Net::with(Config::game_server(64), addrs)
    }

    /// A server with `config` and one client endpoint at each address.
    fn with(config: Config, addrs: Vec<SocketAddr>) -> Net {
        let now = Instant::now();
        let clients = addrs.len();
        let mut server = Endpoint::new(config, 1).unwrap();
        server
            .require_tokens(TokenPolicy {
                keys: vec![TokenKey([9; 32]), KEY],
                addresses: vec![server_addr()],
                clock: (now, PAIR_UNIX_MS),
            })
            .unwrap();
        Net {
            now,
            server,
            clients: addrs
                .into_iter()
                .enumerate()
                .map(|(i, addr)| {
                    (
                        addr,
                        Endpoint::new(Config::default(), 100 + i as u64).unwrap(),
                    )
                })
                .collect(),
            wire: Vec::new(),
            server_events: Vec::new(),
            client_events: vec![Vec::new(); clients],
        }
    }

    /// Everything the endpoints want to send goes on the wire.
    fn transmit(&mut self) {
        let mut batch = TransmitBatch::new(64);
        let now = self.now;
        let wire = &mut self.wire;
        let mut drain = |from: SocketAddr, e: &mut Endpoint| {
            e.handle_timeout(now);
            loop {
                batch.clear();
                let n = e.poll_transmit(now, &mut batch);
                for t in batch.iter() {
                    wire.push((from, t.destination, t.payload.to_vec()));
                }
                if n < batch.capacity() {
                    break;
                }
            }
        };
        for (addr, c) in &mut self.clients {
            drain(*addr, c);
        }
        drain(server_addr(), &mut self.server);
    }

    fn deliver(&mut self, from: SocketAddr, to: SocketAddr, bytes: &[u8]) {
        if to == server_addr() {
            self.server.handle_datagram(self.now, from, bytes);
        } else if let Some((_, c)) = self.clients.iter_mut().find(|(a, _)| *a == to) {
            c.handle_datagram(self.now, from, bytes);
        }
    }

    /// Delivers what is on the wire, then collects events.
    fn flush(&mut self) {
        for (from, to, bytes) in std::mem::take(&mut self.wire) {
            self.deliver(from, to, &bytes);
        }
        self.collect();
    }

    fn collect(&mut self) {
        while let Some(e) = self.server.poll_event() {
            self.server_events.push(e);
        }
        for (i, (_, c)) in self.clients.iter_mut().enumerate() {
            while let Some(e) = c.poll_event() {
                self.client_events[i].push(e);
            }
        }
    }

    /// Runs `ms` of 5 ms turns, everything delivered.
    fn run(&mut self, ms: u64) {
        for _ in 0..ms / 5 {
            self.transmit();
            self.flush();
            self.now += Duration::from_millis(5);
        }
    }

    fn connected(&self, client: usize) -> bool {
        self.client_events[client]
            .iter()
            .any(|e| matches!(e, Event::Connected { .. }))
    }

    fn rejected(&self, client: usize) -> Option<DisconnectReason> {
        self.client_events[client].iter().find_map(|e| match e {
            Event::Disconnected { reason, .. } => Some(*reason),
            _ => None,
        })
    }

    /// Client 0 opens a sealed session as player `player` and sends one
    /// message: the server's session, and the data packet carrying it
    /// (taken off the wire, not delivered).
    fn sealed_data_packet(
        &mut self,
        player: u8,
    ) -> (ConnectionHandle, (SocketAddr, SocketAddr, Vec<u8>)) {
        let t = token(
            u64::from(player),
            PAIR_UNIX_MS / 1000 + 60,
            &[server_addr()],
            player,
        );
        let now = self.now;
        let client = self.clients[0]
            .1
            .connect_with_token(now, server_addr(), &t)
            .unwrap();
        self.run(100);
        let session = self.server_connection();
        self.clients[0]
            .1
            .send(client, RO, &make_message(1, 0, 100))
            .unwrap();
        self.transmit();
        let me = self.clients[0].0;
        let packet = self
            .wire
            .iter()
            .find(|(f, ..)| *f == me)
            .cloned()
            .expect("the data packet");
        self.wire.clear();
        (session, packet)
    }

    fn server_connection(&self) -> ConnectionHandle {
        self.server_events
            .iter()
            .find_map(|e| match e {
                Event::Connected { connection, .. } => Some(*connection),
                _ => None,
            })
            .expect("a session")
    }
}

#[test]
fn a_sealed_session_carries_messages_both_ways_and_names_its_player() {
    let mut net = Net::new(1);
    let t = token(77, PAIR_UNIX_MS / 1000 + 60, &[server_addr()], 1);
    let client = net.clients[0]
        .1
        .connect_with_token(net.now, server_addr(), &t)
        .unwrap();
    net.run(100);
    assert!(net.connected(0));
    let session = net.server_connection();
    let claims = net.server.token_claims(session).expect("claims");
    assert_eq!(
        (claims.client_id, claims.user_data.as_slice()),
        (77, &b"alice"[..])
    );
    for i in 0..20 {
        net.clients[0]
            .1
            .send(client, RO, &make_message(1, i, 300))
            .unwrap();
        net.server
            .send(session, RO, &make_message(2, i, 300))
            .unwrap();
    }
    // Nothing crosses in clear text after the handshake.
    net.transmit();
    let mut data = 0;
    for (_, _, bytes) in &net.wire {
        let (header, _) = wire::decode_header(bytes).unwrap();
        if header.packet_type == PacketType::Data {
            assert!(header.sealed);
            let needle = &make_message(1, 0, 300)[9..41];
            assert!(!bytes.windows(needle.len()).any(|w| w == needle));
            data += 1;
        }
    }
    assert!(data > 0);
    net.flush();
    net.run(200);
    assert_eq!(
        received(&net.server_events, session, RO),
        (0..20).collect::<Vec<_>>()
    );
    assert_eq!(
        received(&net.client_events[0], client, RO),
        (0..20).collect::<Vec<_>>()
    );
    assert_eq!(net.server.stats().dropped_bad_seal, 0);
}

#[test]
fn forged_expired_wrong_address_missing_and_reused_tokens_are_refused_and_counted() {
    let live = PAIR_UNIX_MS / 1000 + 60;
    let mut net = Net::new(6);
    // 0: forged (one bit of the sealed part flipped): silence, then timeout.
    let mut forged = token(1, live, &[server_addr()], 1);
    forged.sealed[200] ^= 4;
    // 1: expired.
    let expired = token(2, PAIR_UNIX_MS / 1000, &[server_addr()], 2);
    // 2: for another server.
    let elsewhere = token(3, live, &[SocketAddr::from(([10, 0, 0, 9], 7777))], 3);
    // 4 and 5: one player's token from two addresses.
    let shared = token(5, live, &[server_addr()], 5);
    let now = net.now;
    net.clients[0]
        .1
        .connect_with_token(now, server_addr(), &forged)
        .unwrap();
    net.clients[1]
        .1
        .connect_with_token(now, server_addr(), &expired)
        .unwrap();
    net.clients[2]
        .1
        .connect_with_token(now, server_addr(), &elsewhere)
        .unwrap();
    // 3: no token at all.
    net.clients[3].1.connect(now, server_addr()).unwrap();
    net.clients[4]
        .1
        .connect_with_token(now, server_addr(), &shared)
        .unwrap();
    net.run(100);
    assert!(net.connected(4));
    net.clients[5]
        .1
        .connect_with_token(net.now, server_addr(), &shared)
        .unwrap();
    net.run(6000);
    let s = net.server.stats();
    assert!(!net.connected(0));
    assert_eq!(net.rejected(0), Some(DisconnectReason::HandshakeTimedOut));
    assert!(s.dropped_bad_token > 0);
    assert_eq!(
        net.rejected(1),
        Some(DisconnectReason::Rejected(RejectReason::TokenExpired))
    );
    assert!(s.rejected_token_expired > 0);
    assert_eq!(
        net.rejected(2),
        Some(DisconnectReason::Rejected(RejectReason::TokenWrongAddress))
    );
    assert!(s.rejected_token_wrong_address > 0);
    assert_eq!(
        net.rejected(3),
        Some(DisconnectReason::Rejected(RejectReason::TokenRequired))
    );
    assert!(s.rejected_token_required > 0);
    assert_eq!(
        net.rejected(5),
        Some(DisconnectReason::Rejected(RejectReason::TokenInUse))
    );
    assert!(s.rejected_token_in_use > 0);
    assert_eq!(net.server.connection_count(), 1, "only the genuine session");
}

#[test]
fn tampered_replayed_and_spoofed_packets_inject_nothing() {
    let mut net = Net::new(2);
    let (session, (from, to, genuine)) = net.sealed_data_packet(8);
    // Every single-bit change of the packet's header or body is dropped
    // before anything reads it.
    let before = net.server.stats().dropped_bad_seal;
    let mut flips = 0;
    for i in 0..genuine.len() {
        let mut bad = genuine.clone();
        bad[i] ^= 0x10;
        net.deliver(from, to, &bad);
        flips += 1;
    }
    net.collect();
    let s = net.server.stats();
    let refused = (s.dropped_bad_seal - before)
        + s.dropped_bad_header
        + s.dropped_unknown_connection
        + s.dropped_bad_version
        + s.dropped_unsealed
        + s.dropped_too_old;
    assert_eq!(refused, flips, "every altered copy refused");
    assert!(received(&net.server_events, session, RO).is_empty());
    // The genuine one is read once; its replay is a duplicate.
    net.deliver(from, to, &genuine);
    net.deliver(from, to, &genuine);
    net.collect();
    assert_eq!(received(&net.server_events, session, RO), vec![0]);
    assert!(net.server.stats().dropped_duplicate >= 1);
    // Another host sending with the session's connection id: from its own
    // address it is refused as a mismatch, and with the victim's address
    // spoofed it cannot seal anything.
    let (header, _) = wire::decode_header(&genuine).unwrap();
    let mut forged = Vec::new();
    wire::Header {
        seq: header.seq.wrapping_add(1),
        ..header
    }
    .encode(&mut forged);
    wire::write_message(&mut forged, 2, 1, &make_message(1, 1, 100));
    forged.extend_from_slice(&[0; 16]);
    let attacker = net.clients[1].0;
    net.deliver(attacker, to, &forged);
    net.deliver(from, to, &forged);
    net.collect();
    assert_eq!(received(&net.server_events, session, RO), vec![0]);
    assert!(net.server.stats().dropped_address_mismatch >= 1);
    assert!(net.server.stats().dropped_bad_seal > before);
}

/// The reliability suite's harsh link, with every session sealed: loss,
/// duplication and reordering change nothing.
#[test]
fn sealed_sessions_stay_reliable_on_a_harsh_link() {
    for seed in 0..4u64 {
        let mut pair = Pair::new(
            Config::server(),
            Config::default(),
            ConditionerConfig::harsh(),
            seed,
        );
        pair.seal_sessions();
        let (client, server) = pair.connect_and_wait();
        assert!(pair.server.token_claims(server).is_some(), "sealed");
        for i in 0..300 {
            pair.client
                .send(
                    client,
                    RO,
                    &make_message(7, i, 40 + (i as usize * 37) % 3000),
                )
                .unwrap();
        }
        let done = pair.run_until(Duration::from_secs(60), |p| {
            received(&p.server_events, server, RO).len() == 300
        });
        assert!(done, "seed {seed}");
        assert_eq!(
            received(&pair.server_events, server, RO),
            (0..300).collect::<Vec<_>>(),
            "seed {seed}"
        );
        assert_eq!(pair.server.stats().dropped_bad_seal, 0, "seed {seed}");
    }
}

/// A game server's peer limit: a client sending far more than a player
/// is dropped, then closed with `PeerLimit::CODE`; one playing at 60 Hz
/// loses nothing.
#[test]
fn a_peer_far_over_its_receive_limit_is_cut_off_and_players_are_not() {
    use tessera_net::PeerLimit;
    for flood in [false, true] {
        // Tighter than a game server's default, so that a client endpoint
        // (which paces itself) can be far over it.
        let mut config = Config::game_server(16);
        config.peer_limit = Some(PeerLimit {
            packets_per_s: 100,
            bytes_per_s: 64 * 1024,
            burst: Duration::from_secs(1),
            abuse_drops: 50,
        });
        let mut pair = Pair::new(config, Config::default(), ConditionerConfig::default(), 21);
        pair.seal_sessions();
        let (client, server) = pair.connect_and_wait();
        let tick = Duration::from_millis(if flood { 1 } else { 16 });
        let mut sent = 0u32;
        for _ in 0..(Duration::from_secs(3).as_millis() / tick.as_millis()) {
            // One player input a tick (a flood: a large one every ms).
            let len = if flood { 1000 } else { 40 };
            let _ = pair
                .client
                .send(client, ChannelId::UNRELIABLE, &make_message(3, sent, len));
            sent += 1;
            pair.run_for(tick);
        }
        let s = pair.server.stats();
        if flood {
            assert!(s.dropped_rate_limited > 0, "{s:?}");
            assert_eq!(s.closed_for_abuse, 1, "{s:?}");
            assert!(
                util::disconnects(&pair.client_events, client)
                    .contains(&DisconnectReason::Remote(PeerLimit::CODE)),
                "{:?}",
                pair.client_events.iter().rev().take(3).collect::<Vec<_>>()
            );
        } else {
            assert_eq!(s.dropped_rate_limited, 0, "{s:?}");
            assert_eq!(
                received(&pair.server_events, server, ChannelId::UNRELIABLE).len(),
                sent as usize
            );
            assert!(pair.client.is_connected(client));
        }
    }
}

#[test]
fn replays_of_a_players_packets_are_not_charged_to_the_player() {
    let mut net = Net::new(1);
    let (_, (from, to, genuine)) = net.sealed_data_packet(9);
    for _ in 0..5000 {
        net.deliver(from, to, &genuine);
    }
    net.collect();
    let s = net.server.stats();
    assert_eq!(s.closed_for_abuse, 0, "{s:?}");
    assert!(s.dropped_duplicate >= 4999, "{s:?}");
    net.run(100);
    assert!(!net.client_events[0]
        .iter()
        .any(|e| matches!(e, Event::Disconnected { .. })));
}

/// One host, many ports: past `sessions_max` its handshakes are refused
/// with `TooManySessions` while another host still gets in; a flood of
/// requests from one host is cut to its handshake rate, without replies.
#[test]
fn one_host_gets_its_share_of_sessions_and_handshakes_and_no_more() {
    use tessera_net::AddressLimit;
    let mut config = Config::game_server(64);
    config.address_limit = Some(AddressLimit {
        handshakes_per_s: 10,
        burst: Duration::from_secs(2),
        sessions_max: 3,
    });
    let crowd = [10, 0, 2, 1];
    let mut addrs: Vec<SocketAddr> = (0..5)
        .map(|port| SocketAddr::from((crowd, 50_000 + port)))
        .collect();
    addrs.push(SocketAddr::from(([10, 0, 3, 1], 50_000)));
    let mut net = Net::with(config, addrs);
    let expires = PAIR_UNIX_MS / 1000 + 60;
    for i in 0..6 {
        let t = token(i as u64 + 1, expires, &[server_addr()], i as u8 + 1);
        let now = net.now;
        net.clients[i]
            .1
            .connect_with_token(now, server_addr(), &t)
            .unwrap();
        // One at a time, so the outcome does not depend on arrival order.
        net.run(200);
    }
    for i in 0..3 {
        assert!(net.connected(i), "client {i} of the crowded host");
    }
    for i in 3..5 {
        assert_eq!(
            net.rejected(i),
            Some(DisconnectReason::Rejected(RejectReason::TooManySessions)),
            "client {i}"
        );
    }
    assert!(net.connected(5), "another host still gets in");
    let s = net.server.stats().clone();
    assert!(s.rejected_address_sessions >= 2, "{s:?}");
    assert_eq!(net.server.footprint().source_addresses, 2);

    // A request flood from 1,000 ports of one host: past its burst
    // (20 handshakes) nothing is answered.
    let replies_before = net.server.stats().datagrams_sent;
    let request = {
        let mut probe = Endpoint::new(Config::default(), 7).unwrap();
        let t = token(99, expires, &[server_addr()], 99);
        let now = net.now;
        probe.connect_with_token(now, server_addr(), &t).unwrap();
        let mut batch = TransmitBatch::new(4);
        let _ = probe.poll_transmit(now, &mut batch);
        batch.get(0).unwrap().payload.to_vec()
    };
    let flooder = [10, 0, 4, 1];
    for port in 0..1000u16 {
        net.server.handle_datagram(
            net.now,
            SocketAddr::from((flooder, 20_000 + port)),
            &request,
        );
    }
    net.transmit();
    let replies = net
        .wire
        .iter()
        .filter(|(from, to, _)| {
            *from == server_addr() && to.ip() == SocketAddr::from((flooder, 0)).ip()
        })
        .count();
    net.wire.clear();
    let s = net.server.stats();
    assert_eq!(replies, 20, "one burst's worth of challenges");
    assert_eq!(s.dropped_handshake_rate_limited, 980, "{s:?}");
    assert!(s.datagrams_sent > replies_before);
    // The players already in keep playing.
    net.run(500);
    for i in [0, 1, 2, 5] {
        assert!(net.rejected(i).is_none(), "client {i} still connected");
    }
}

/// Runs the handshake of `client` (at `caddr`) with `server` (at `saddr`)
/// by hand: true once connected, false once refused.
fn shake(
    client: &mut Endpoint,
    caddr: SocketAddr,
    server: &mut Endpoint,
    saddr: SocketAddr,
    now: Instant,
) -> Result<(), DisconnectReason> {
    let mut batch = TransmitBatch::new(16);
    for _ in 0..20 {
        for (from, to) in [(0, 1), (1, 0)] {
            let (src, dst) = if from == 0 {
                (&mut *client, &mut *server)
            } else {
                (&mut *server, &mut *client)
            };
            batch.clear();
            let _ = src.poll_transmit(now, &mut batch);
            let from_addr = if to == 1 { caddr } else { saddr };
            for t in batch.iter() {
                dst.handle_datagram(now, from_addr, t.payload);
            }
        }
        while let Some(e) = client.poll_event() {
            match e {
                Event::Connected { .. } => return Ok(()),
                Event::Disconnected { reason, .. } => return Err(reason),
                _ => {}
            }
        }
        while server.poll_event().is_some() {}
    }
    panic!("the handshake neither finished nor failed");
}

/// A server's endpoints (a node's shards) share one session per player:
/// a token's player in a session on one is refused on another until that
/// session ends.
#[test]
fn one_session_per_player_across_endpoints_sharing_a_gate() {
    use std::sync::Arc;
    use tessera_net::token::PlayerGate;
    let now = Instant::now();
    let gate = Arc::new(PlayerGate::default());
    let addrs = [server_addr(), SocketAddr::from(([10, 0, 0, 2], 7777))];
    let mut servers: Vec<Endpoint> = (0..2)
        .map(|i| {
            let mut s = Endpoint::new(Config::game_server(8), 50 + i).unwrap();
            s.require_tokens(TokenPolicy {
                keys: vec![KEY],
                addresses: addrs.to_vec(),
                clock: (now, PAIR_UNIX_MS),
            })
            .unwrap();
            s.share_players(gate.clone(), i as u32);
            s
        })
        .collect();
    let expires = PAIR_UNIX_MS / 1000 + 60;
    let a_addr = SocketAddr::from(([10, 0, 9, 1], 4000));
    let b_addr = SocketAddr::from(([10, 0, 9, 2], 4000));
    let mut a = Endpoint::new(Config::default(), 1).unwrap();
    let mut b = Endpoint::new(Config::default(), 2).unwrap();
    let ha = a
        .connect_with_token(now, addrs[0], &token(5, expires, &addrs, 1))
        .unwrap();
    shake(&mut a, a_addr, &mut servers[0], addrs[0], now).expect("the first session");
    assert_eq!(gate.len(), 1);
    b.connect_with_token(now, addrs[1], &token(5, expires, &addrs, 2))
        .unwrap();
    assert_eq!(
        shake(&mut b, b_addr, &mut servers[1], addrs[1], now),
        Err(DisconnectReason::Rejected(RejectReason::TokenInUse)),
        "the same player on the other endpoint"
    );
    assert_eq!(servers[1].stats().rejected_token_in_use, 1);
    // Another player is welcome there.
    let mut c = Endpoint::new(Config::default(), 3).unwrap();
    c.connect_with_token(now, addrs[1], &token(6, expires, &addrs, 3))
        .unwrap();
    shake(&mut c, b_addr, &mut servers[1], addrs[1], now).expect("another player");
    // The first session ends: the player may connect anywhere again.
    a.disconnect(now, ha, 1).unwrap();
    let _ = shake(&mut a, a_addr, &mut servers[0], addrs[0], now);
    assert_eq!(gate.len(), 1, "only player 6 is in a session");
    let mut b = Endpoint::new(Config::default(), 4).unwrap();
    b.connect_with_token(now, addrs[1], &token(5, expires, &addrs, 4))
        .unwrap();
    shake(&mut b, b_addr, &mut servers[1], addrs[1], now).expect("after the first ended");
}
