//! Handshake, cookies, spoofing, caps, keepalive, timeouts, disconnects.

mod util;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_net::conditioner::ConditionerConfig;
use tessera_net::pair::Pair;
use tessera_net::rng::Rng;
use tessera_net::wire::{
    self, Challenge, ConnectRequest, ConnectResponse, Header, PacketType, COOKIE_LEN,
};
use tessera_net::{
    ChannelId, Config, DisconnectReason, Endpoint, Event, Footprint, RejectReason, SendError,
    TransmitBatch,
};
use util::{disconnects, make_message, received};

fn link() -> ConditionerConfig {
    ConditionerConfig::latency(Duration::from_millis(10))
}

fn request(client_id: u32, config_hash: u32, len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    Header::control(PacketType::ConnectRequest, 0).encode(&mut out);
    ConnectRequest {
        config_hash,
        client_id,
    }
    .encode(&mut out);
    out.resize(len, 0);
    out
}

fn response(client_id: u32, config_hash: u32, period: u32, cookie: [u8; COOKIE_LEN]) -> Vec<u8> {
    let mut out = Vec::new();
    Header::control(PacketType::ConnectResponse, 0).encode(&mut out);
    ConnectResponse {
        config_hash,
        client_id,
        period,
        cookie,
    }
    .encode(&mut out);
    out.resize(1200, 0);
    out
}

fn drain(endpoint: &mut Endpoint, now: Instant) -> Vec<(SocketAddr, Vec<u8>)> {
    let mut batch = TransmitBatch::new(64);
    let mut out = Vec::new();
    loop {
        batch.clear();
        let n = endpoint.poll_transmit(now, &mut batch);
        out.extend(batch.iter().map(|t| (t.destination, t.payload.to_vec())));
        if n < batch.capacity() {
            return out;
        }
    }
}

fn spoofed_addr(rng: &mut Rng) -> SocketAddr {
    let ip = rng.next_u32().to_be_bytes();
    SocketAddr::from((ip, 1024 + rng.below(60_000) as u16))
}

fn empty_footprint(endpoint: &Endpoint) -> bool {
    let f = endpoint.footprint();
    f == Footprint {
        pooled_buffers: f.pooled_buffers,
        ..Footprint::default()
    }
}

#[test]
fn handshake_connects_both_sides() {
    let mut pair = Pair::new(Config::server(), Config::client(), link(), 1);
    let (client, server) = pair.connect_and_wait();
    assert!(pair.client.is_connected(client));
    assert!(pair.server.is_connected(server));
    assert_eq!(pair.server.remote_address(server), Some(pair.client_addr));
    assert_eq!(pair.server.stats().challenges_sent, 1);
    assert_eq!(pair.server.stats().connections_accepted, 1);
    assert_eq!(pair.client.stats().connections_opened, 1);
}

#[test]
fn messages_sent_before_the_handshake_finishes_arrive() {
    let mut pair = Pair::new(Config::server(), Config::client(), link(), 2);
    let client = pair.connect();
    for i in 0..5 {
        pair.client
            .send(client, ChannelId::RELIABLE_ORDERED, &make_message(1, i, 40))
            .unwrap();
    }
    pair.run_for(Duration::from_secs(1));
    let server = pair.server.connections().next().unwrap();
    assert_eq!(
        received(&pair.server_events, server, ChannelId::RELIABLE_ORDERED),
        vec![0, 1, 2, 3, 4]
    );
}

/// Requests and forged responses from addresses that never received a
/// cookie leave the server with no connection, no map entry, no timer.
#[test]
fn spoofed_handshakes_leave_no_state() {
    let config = Config::server();
    let hash = config.protocol_hash();
    let mut server = Endpoint::new(config, 3).unwrap();
    let now = Instant::now();
    let mut rng = Rng::from_seed(99);
    for _ in 0..1000 {
        let from = spoofed_addr(&mut rng);
        server.handle_datagram(now, from, &request(rng.next_u32() | 1, hash, 1200));
        assert!(server.footprint().connections == 0 && server.footprint().ids == 0);
    }
    // The only trace: replies waiting to go out, bounded by the control queue.
    assert_eq!(server.footprint().control_queue, 1000);
    let replies = drain(&mut server, now);
    assert_eq!(replies.len(), 1000);
    assert!(empty_footprint(&server), "{:?}", server.footprint());
    for _ in 0..1000 {
        let from = spoofed_addr(&mut rng);
        let mut cookie = [0u8; COOKIE_LEN];
        cookie.iter_mut().for_each(|b| *b = rng.next_u32() as u8);
        server.handle_datagram(now, from, &response(rng.next_u32() | 1, hash, 0, cookie));
    }
    assert_eq!(server.stats().dropped_bad_cookie, 1000);
    assert!(drain(&mut server, now).is_empty());
    assert!(empty_footprint(&server), "{:?}", server.footprint());
    assert_eq!(server.poll_event(), None);
    assert_eq!(server.poll_timeout(), None);
    assert_eq!(server.connection_count(), 0);
}

/// A cookie is bound to the address it was sent to: replaying it from
/// another address, with another client id, or too late fails.
#[test]
fn cookies_bind_address_client_and_time() {
    let config = Config::server();
    let rotation = config.cookie_rotation;
    let hash = config.protocol_hash();
    let mut server = Endpoint::new(config, 4).unwrap();
    let now = Instant::now();
    let a: SocketAddr = "10.1.1.1:4000".parse().unwrap();
    let b: SocketAddr = "10.1.1.2:4000".parse().unwrap();
    server.handle_datagram(now, a, &request(77, hash, 1200));
    let replies = drain(&mut server, now);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].0, a);
    let (header, body) = wire::decode_header(&replies[0].1).unwrap();
    assert_eq!(header.packet_type, PacketType::Challenge);
    assert_eq!(header.connection_id, 77);
    let challenge = Challenge::decode(body).unwrap();

    server.handle_datagram(
        now,
        b,
        &response(77, hash, challenge.period, challenge.cookie),
    );
    server.handle_datagram(
        now,
        a,
        &response(78, hash, challenge.period, challenge.cookie),
    );
    assert_eq!(server.stats().dropped_bad_cookie, 2);
    assert!(empty_footprint(&server));

    // The genuine echo creates the connection; a repeat does not add one.
    server.handle_datagram(
        now,
        a,
        &response(77, hash, challenge.period, challenge.cookie),
    );
    server.handle_datagram(
        now,
        a,
        &response(77, hash, challenge.period, challenge.cookie),
    );
    assert_eq!(server.connection_count(), 1);
    assert!(matches!(server.poll_event(), Some(Event::Connected { addr, .. }) if addr == a));
    let replies = drain(&mut server, now);
    assert_eq!(replies.len(), 1, "one Accept for both copies");
    assert_eq!(
        wire::decode_header(&replies[0].1).unwrap().0.packet_type,
        PacketType::Accept
    );

    // Two rotations later the same cookie has expired.
    let late = now + rotation * 2 + Duration::from_millis(1);
    let c: SocketAddr = "10.1.1.3:4000".parse().unwrap();
    server.handle_datagram(now, c, &request(79, hash, 1200));
    let replies = drain(&mut server, now);
    let challenge = Challenge::decode(wire::decode_header(&replies[0].1).unwrap().1).unwrap();
    server.handle_datagram(
        late,
        c,
        &response(79, hash, challenge.period, challenge.cookie),
    );
    assert_eq!(server.stats().dropped_expired_cookie, 1);
    assert_eq!(server.connection_count(), 1);
}

/// No reply is larger than the request it answers, and short requests get
/// no reply at all.
#[test]
fn no_amplification() {
    let mut config = Config::server();
    config.connections_max = 1;
    let hash = config.protocol_hash();
    let mut server = Endpoint::new(config, 5).unwrap();
    let now = Instant::now();
    let from: SocketAddr = "10.2.2.2:1000".parse().unwrap();
    for len in [0usize, 10, 22, 30, 100, 255] {
        server.handle_datagram(now, from, &request(5, hash, len));
    }
    assert!(drain(&mut server, now).is_empty());
    assert_eq!(server.stats().dropped_short_handshake, 4);
    assert_eq!(server.stats().dropped_bad_header, 2);
    let request_len = wire::HANDSHAKE_MIN_LEN;
    // Challenge, incompatible-config reject, and (after filling the cap)
    // server-full reject: all shorter than the minimum request.
    server.handle_datagram(now, from, &request(5, hash, request_len));
    server.handle_datagram(now, from, &request(5, hash ^ 1, request_len));
    let replies = drain(&mut server, now);
    assert_eq!(replies.len(), 2);
    let challenge = Challenge::decode(wire::decode_header(&replies[0].1).unwrap().1).unwrap();
    server.handle_datagram(
        now,
        from,
        &response(5, hash, challenge.period, challenge.cookie),
    );
    let _ = drain(&mut server, now);
    server.handle_datagram(
        now,
        "10.2.2.3:1000".parse().unwrap(),
        &request(6, hash, request_len),
    );
    let mut all = replies;
    all.extend(drain(&mut server, now));
    assert_eq!(all.len(), 3);
    for (_, reply) in &all {
        assert!(reply.len() < request_len, "reply of {} bytes", reply.len());
    }
    assert_eq!(server.stats().rejected_full, 1);
    assert_eq!(server.stats().rejected_incompatible, 1);
}

#[test]
fn connection_cap_rejects_cleanly() {
    let mut server = Config::server();
    server.connections_max = 3;
    let mut pair = Pair::new(server, Config::client(), link(), 6);
    let clients: Vec<_> = (0..5).map(|_| pair.connect()).collect();
    pair.run_for(Duration::from_secs(2));
    let connected = clients
        .iter()
        .filter(|&&c| pair.client.is_connected(c))
        .count();
    assert_eq!(connected, 3);
    let rejected = clients
        .iter()
        .filter(|&&c| {
            disconnects(&pair.client_events, c)
                == vec![DisconnectReason::Rejected(RejectReason::ServerFull)]
        })
        .count();
    assert_eq!(rejected, 2);
    assert_eq!(pair.server.connection_count(), 3);
    assert_eq!(pair.client.connection_count(), 3);
    assert!(pair.server.stats().rejected_full >= 2);
}

#[test]
fn incompatible_configs_are_rejected() {
    let mut client = Config::client();
    client.channels.pop();
    let mut pair = Pair::new(Config::server(), client, link(), 7);
    let handle = pair.connect();
    pair.run_for(Duration::from_secs(1));
    assert_eq!(
        disconnects(&pair.client_events, handle),
        vec![DisconnectReason::Rejected(RejectReason::IncompatibleConfig)]
    );
    assert_eq!(pair.server.connection_count(), 0);
}

#[test]
fn handshake_times_out_without_a_server() {
    let mut pair = Pair::new(Config::server(), Config::client(), link(), 8);
    pair.to_server.set_filter(Some(Box::new(|_, _| true)));
    let handle = pair.connect();
    pair.run_for(Duration::from_secs(10));
    assert_eq!(
        disconnects(&pair.client_events, handle),
        vec![DisconnectReason::HandshakeTimedOut]
    );
    assert_eq!(pair.client.connection_count(), 0);
    // Resends backed off: far fewer than one per 200 ms.
    let sent = pair.to_server.stats().offered;
    assert!((5..=12).contains(&sent), "{sent} requests");
}

#[test]
fn idle_connections_stay_up_with_keepalives() {
    let mut pair = Pair::new(Config::server(), Config::client(), link(), 9);
    let (client, server) = pair.connect_and_wait();
    pair.run_for(Duration::from_secs(60));
    assert!(pair.client.is_connected(client) && pair.server.is_connected(server));
    let stats = pair.client.connection_stats(client).unwrap();
    assert!(stats.packets_sent >= 50, "{stats:?}");
}

#[test]
fn silent_peer_times_out() {
    let mut pair = Pair::new(Config::server(), Config::client(), link(), 10);
    let (client, server) = pair.connect_and_wait();
    let cut = pair.elapsed();
    pair.to_server.set_filter(Some(Box::new(|_, _| true)));
    pair.to_client.set_filter(Some(Box::new(|_, _| true)));
    let done = pair.run_until(Duration::from_secs(30), |p| {
        !disconnects(&p.client_events, client).is_empty()
            && !disconnects(&p.server_events, server).is_empty()
    });
    assert!(done);
    let took = pair.elapsed() - cut;
    // Idle timeout (10 s) after the last packet heard, which is at most a
    // keepalive interval (1 s) before the cut.
    assert!(
        took >= Duration::from_millis(8900) && took <= Duration::from_millis(10_500),
        "{took:?}"
    );
    assert_eq!(
        disconnects(&pair.client_events, client),
        vec![DisconnectReason::TimedOut]
    );
    assert_eq!(
        disconnects(&pair.server_events, server),
        vec![DisconnectReason::TimedOut]
    );
    assert!(empty_footprint(&pair.server) && empty_footprint(&pair.client));
}

#[test]
fn graceful_disconnect_from_either_side() {
    for client_closes in [true, false] {
        let mut pair = Pair::new(Config::server(), Config::client(), link(), 11);
        let (client, server) = pair.connect_and_wait();
        pair.client
            .send(client, ChannelId::RELIABLE_ORDERED, &make_message(1, 0, 10))
            .unwrap();
        pair.run_for(Duration::from_millis(100));
        if client_closes {
            pair.client.disconnect(pair.now, client, 7).unwrap();
        } else {
            pair.server.disconnect(pair.now, server, 9).unwrap();
        }
        pair.run_for(Duration::from_millis(500));
        let (local, remote) = if client_closes {
            (
                disconnects(&pair.client_events, client),
                disconnects(&pair.server_events, server),
            )
        } else {
            (
                disconnects(&pair.server_events, server),
                disconnects(&pair.client_events, client),
            )
        };
        let code = if client_closes { 7 } else { 9 };
        assert_eq!(local, vec![DisconnectReason::Local(code)]);
        assert_eq!(remote, vec![DisconnectReason::Remote(code)]);
        assert!(
            empty_footprint(&pair.server),
            "{:?}",
            pair.server.footprint()
        );
        assert!(
            empty_footprint(&pair.client),
            "{:?}",
            pair.client.footprint()
        );
        assert_eq!(
            pair.client
                .send(client, ChannelId::RELIABLE_ORDERED, b"late"),
            Err(SendError::UnknownConnection)
        );
    }
}

#[test]
fn reconnect_after_disconnect() {
    let mut pair = Pair::new(Config::server(), Config::client(), link(), 12);
    let (first, first_server) = pair.connect_and_wait();
    pair.client.disconnect(pair.now, first, 1).unwrap();
    pair.run_for(Duration::from_millis(300));
    assert!(!pair.server.is_connected(first_server));
    let (second, second_server) = pair.connect_and_wait();
    assert_ne!(first, second, "a new generation");
    assert_ne!(first_server, second_server);
    pair.client
        .send(
            second,
            ChannelId::RELIABLE_ORDERED,
            &make_message(1, 0, 100),
        )
        .unwrap();
    pair.run_for(Duration::from_millis(300));
    assert_eq!(
        received(
            &pair.server_events,
            second_server,
            ChannelId::RELIABLE_ORDERED
        ),
        vec![0]
    );
    assert_eq!(pair.server.connection_count(), 1);
}

/// Many bots on one client endpoint, one socket, one server.
#[test]
fn many_connections_share_one_endpoint() {
    let mut pair = Pair::new(Config::server(), Config::client(), link(), 13);
    let clients: Vec<_> = (0..500).map(|_| pair.connect()).collect();
    pair.run_for(Duration::from_secs(2));
    assert_eq!(pair.server.connection_count(), 500);
    assert!(clients.iter().all(|&c| pair.client.is_connected(c)));
    for (i, &c) in clients.iter().enumerate() {
        for k in 0..3 {
            let message = make_message(1, i as u32 * 10 + k, 64);
            pair.client
                .send(c, ChannelId::RELIABLE_ORDERED, &message)
                .unwrap();
        }
    }
    pair.run_for(Duration::from_secs(1));
    let messages = pair
        .server_events
        .iter()
        .filter(|e| matches!(e, Event::Message { .. }))
        .count();
    assert_eq!(messages, 1500);
    // Timers stay proportional to connections, not to activity.
    let footprint = pair.server.footprint();
    assert!(footprint.timers <= 4 * 500 + 64, "{footprint:?}");
}

/// Same seed and inputs: the same bytes on the wire and the same events.
#[test]
fn runs_are_deterministic() {
    fn run(seed: u64) -> (u64, Vec<Event>, Vec<Event>) {
        let mut pair = Pair::new(
            Config::server(),
            Config::client(),
            ConditionerConfig::harsh(),
            seed,
        );
        let digest = Arc::new(Mutex::new(0u64));
        for link in [&mut pair.to_server, &mut pair.to_client] {
            let digest = digest.clone();
            link.set_filter(Some(Box::new(move |_, bytes| {
                let mut d = digest.lock().unwrap();
                for &b in bytes {
                    *d = (*d ^ b as u64).wrapping_mul(0x100_0000_01B3);
                }
                false
            })));
        }
        let (client, server) = pair.connect_and_wait();
        for i in 0..50 {
            pair.client
                .send(
                    client,
                    ChannelId::RELIABLE_ORDERED,
                    &make_message(1, i, 50 + i as usize * 40),
                )
                .unwrap();
            pair.server
                .send(server, ChannelId::SEQUENCED, &make_message(2, i, 300))
                .unwrap();
            pair.run_for(Duration::from_millis(50));
        }
        pair.run_for(Duration::from_secs(5));
        let d = *digest.lock().unwrap();
        (d, pair.client_events, pair.server_events)
    }
    let a = run(42);
    let b = run(42);
    assert_eq!(a.0, b.0, "same bytes on the wire");
    assert_eq!(a.1, b.1);
    assert_eq!(a.2, b.2);
    assert_ne!(run(43).0, a.0, "another seed, another run");
}
