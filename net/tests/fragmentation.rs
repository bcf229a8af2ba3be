//! Fragmentation edge cases and reassembly memory bounds.

mod util;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tessera_net::conditioner::ConditionerConfig;
use tessera_net::pair::Pair;
use tessera_net::wire::{self, Challenge, ConnectRequest, ConnectResponse, Header, PacketType};
use tessera_net::{ChannelId, Config, Endpoint, Event, SendError, TransmitBatch};
use util::{make_message, received};

const MTU: usize = 1200;
/// Largest unfragmented message at the default MTU (header 22, frame 6).
const SINGLE_MAX: usize = MTU - 22 - 6;
/// Largest fragment payload (header 22, fragment frame 12).
const FRAGMENT_MAX: usize = MTU - 22 - 12;
const MESSAGE_MAX: usize = 256 * 1024;

fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt))
        .collect()
}

fn messages_on(events: &[Event], channel: ChannelId) -> Vec<Vec<u8>> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message {
                channel: c, bytes, ..
            } if *c == channel => Some(bytes.clone()),
            _ => None,
        })
        .collect()
}

/// Sizes around every boundary, up to the 256 KiB limit, over a harsh link,
/// on both reliable channels.
#[test]
fn edge_sizes_arrive_intact() {
    let sizes = [
        0,
        1,
        SINGLE_MAX - 1,
        SINGLE_MAX,
        SINGLE_MAX + 1,
        2 * FRAGMENT_MAX - 1,
        2 * FRAGMENT_MAX,
        2 * FRAGMENT_MAX + 1,
        3 * FRAGMENT_MAX + 2,
        65_535,
        65_536,
        MESSAGE_MAX - 1,
        MESSAGE_MAX,
    ];
    for seed in 0..4u64 {
        let mut pair = Pair::new(
            Config::server(),
            Config::client(),
            ConditionerConfig::harsh(),
            seed,
        );
        let (client, _) = pair.connect_and_wait();
        let expected: Vec<Vec<u8>> = sizes.iter().map(|&n| pattern(n, n as u8)).collect();
        for m in &expected {
            pair.client
                .send(client, ChannelId::RELIABLE_ORDERED, m)
                .unwrap();
            pair.client
                .send(client, ChannelId::RELIABLE_UNORDERED, m)
                .unwrap();
        }
        let done = pair.run_until(Duration::from_secs(120), |p| {
            messages_on(&p.server_events, ChannelId::RELIABLE_ORDERED).len() == sizes.len()
                && messages_on(&p.server_events, ChannelId::RELIABLE_UNORDERED).len() == sizes.len()
        });
        assert!(
            done,
            "seed {seed}: {:?}",
            pair.client.connection_stats(client)
        );
        pair.run_for(Duration::from_secs(2));
        assert_eq!(
            messages_on(&pair.server_events, ChannelId::RELIABLE_ORDERED),
            expected,
            "seed {seed}"
        );
        let mut unordered = messages_on(&pair.server_events, ChannelId::RELIABLE_UNORDERED);
        unordered.sort_by_key(Vec::len);
        assert_eq!(unordered, expected, "seed {seed}");
        let server = pair.server.connections().next().unwrap();
        let stats = pair.server.connection_stats(server).unwrap();
        assert_eq!(stats.receive_buffer_bytes, 0, "buffers released: {stats:?}");
        assert_eq!(pair.server.footprint().receive_buffer_bytes, 0);
    }
}

#[test]
fn oversized_messages_are_refused() {
    let mut pair = Pair::new(
        Config::server(),
        Config::client(),
        ConditionerConfig::default(),
        1,
    );
    let (client, _) = pair.connect_and_wait();
    let too_big = vec![0u8; MESSAGE_MAX + 1];
    assert_eq!(
        pair.client
            .send(client, ChannelId::RELIABLE_ORDERED, &too_big),
        Err(SendError::MessageTooLarge {
            len: MESSAGE_MAX + 1,
            max: MESSAGE_MAX
        })
    );
    assert_eq!(
        pair.client.send(client, ChannelId(9), b"x"),
        Err(SendError::UnknownChannel(9))
    );
}

/// An unreliable fragmented message with one lost fragment is dropped whole;
/// its neighbours arrive intact.
#[test]
fn unreliable_fragmented_message_is_dropped_whole() {
    let mut pair = Pair::new(
        Config::server(),
        Config::client(),
        ConditionerConfig::latency(Duration::from_millis(5)),
        2,
    );
    let (client, server) = pair.connect_and_wait();
    // Each 5000-byte message is 5 fragments, one per datagram: drop the 3rd
    // fragment of the second message.
    let offered = pair.to_server.stats().offered;
    pair.to_server
        .set_filter(Some(Box::new(move |index, _| index == offered + 5 + 2)));
    for i in 0..3 {
        pair.client
            .send(client, ChannelId::UNRELIABLE, &make_message(1, i, 5000))
            .unwrap();
        pair.run_for(Duration::from_millis(20));
    }
    pair.run_for(Duration::from_secs(3));
    assert_eq!(pair.to_server.stats().filtered, 1);
    assert_eq!(
        received(&pair.server_events, server, ChannelId::UNRELIABLE),
        vec![0, 2]
    );
    let stats = pair.server.connection_stats(server).unwrap();
    assert_eq!(stats.incomplete_messages, 1, "{stats:?}");
    assert_eq!(stats.receive_buffer_bytes, 0, "{stats:?}");
}

/// Handshakes by hand, so the test can then send crafted frames.
fn raw_connect(server: &mut Endpoint, now: Instant, from: SocketAddr, client_id: u32) -> u32 {
    let hash = server.config().protocol_hash();
    let mut out = Vec::new();
    Header::control(PacketType::ConnectRequest, 0).encode(&mut out);
    ConnectRequest {
        config_hash: hash,
        client_id,
    }
    .encode(&mut out);
    out.resize(1200, 0);
    server.handle_datagram(now, from, &out);
    let mut batch = TransmitBatch::new(16);
    let _ = server.poll_transmit(now, &mut batch);
    let reply = batch
        .iter()
        .find(|t| t.destination == from)
        .unwrap()
        .payload
        .to_vec();
    let challenge = Challenge::decode(wire::decode_header(&reply).unwrap().1).unwrap();
    out.clear();
    Header::control(PacketType::ConnectResponse, 0).encode(&mut out);
    ConnectResponse {
        config_hash: hash,
        client_id,
        period: challenge.period,
        cookie: challenge.cookie,
    }
    .encode(&mut out);
    out.resize(1200, 0);
    server.handle_datagram(now, from, &out);
    batch.clear();
    let _ = server.poll_transmit(now, &mut batch);
    let accept = batch
        .iter()
        .find(|t| t.destination == from)
        .unwrap()
        .payload
        .to_vec();
    let (header, body) = wire::decode_header(&accept).unwrap();
    assert_eq!(header.packet_type, PacketType::Accept);
    wire::decode_u32_body(body).unwrap()
}

/// Peers that open many large reassemblies and never finish them cannot make
/// the server hold more than its per-connection and per-endpoint bounds;
/// what does not fit is refused unacknowledged.
#[test]
fn reassembly_memory_is_bounded() {
    let mut config = Config::server();
    config.receive_buffer_bytes_max = 1 << 20;
    config.endpoint_receive_buffer_bytes_max = 2 << 20;
    let mut server = Endpoint::new(config, 3).unwrap();
    let now = Instant::now();
    let total = MESSAGE_MAX as u32;
    let (count, _) = wire::fragment_layout(total as usize, FRAGMENT_MAX);
    let (_, len) = wire::fragment_span(total, count as u16, 0).unwrap();
    let payload = vec![7u8; len];
    let mut peak_per_connection = 0;
    for attacker in 0..4u32 {
        let from = SocketAddr::from(([10, 9, 9, attacker as u8 + 1], 999));
        let server_id = raw_connect(&mut server, now, from, 1000 + attacker);
        for (seq, id) in (0..300u16).enumerate() {
            let mut packet = Vec::new();
            Header {
                packet_type: PacketType::Data,
                connection_id: server_id,
                seq: seq as u16,
                ack: None,
                sealed: false,
            }
            .encode(&mut packet);
            let channel = if id % 2 == 0 { 2 } else { 3 };
            wire::write_fragment(
                &mut packet,
                channel,
                id / 2,
                0,
                count as u16,
                total,
                &payload,
            );
            server.handle_datagram(now, from, &packet);
            assert!(server.footprint().receive_buffer_bytes <= 2 << 20);
        }
        let handle = server.connections().last().unwrap();
        let stats = server.connection_stats(handle).unwrap();
        peak_per_connection = peak_per_connection.max(stats.receive_buffer_bytes);
        assert!(stats.refused_packets > 0);
    }
    // One connection may exceed its bound by the next in-order message only.
    assert!(
        peak_per_connection <= (1 << 20) + MESSAGE_MAX,
        "{peak_per_connection}"
    );
    assert!(server.stats().dropped_receive_window > 1000);
    assert!(server.footprint().receive_buffer_bytes <= 2 << 20);
    while server.poll_event().is_some() {}
    // Closing the connections frees everything.
    server.disconnect_all(now, 0);
    let mut batch = TransmitBatch::new(64);
    for i in 0..10 {
        batch.clear();
        let t = now + Duration::from_millis(50 * i);
        server.handle_timeout(t);
        let _ = server.poll_transmit(t, &mut batch);
    }
    assert_eq!(server.footprint().receive_buffer_bytes, 0);
    assert_eq!(server.connection_count(), 0);
}

/// With real traffic and a tight receive buffer, large reliable messages
/// still all arrive (flow control by refusal), and the bound holds.
#[test]
fn tight_receive_buffer_still_delivers() {
    let mut config = Config::server();
    config.receive_buffer_bytes_max = MESSAGE_MAX + 10_000;
    let mut pair = Pair::new(config, Config::client(), ConditionerConfig::harsh(), 4);
    let (client, server) = pair.connect_and_wait();
    for i in 0..8 {
        pair.client
            .send(
                client,
                ChannelId::RELIABLE_UNORDERED,
                &make_message(1, i, 100_000 + i as usize * 20_000),
            )
            .unwrap();
        pair.client
            .send(
                client,
                ChannelId::RELIABLE_ORDERED,
                &make_message(1, i, 60_000),
            )
            .unwrap();
    }
    let mut peak = 0;
    let done = pair.run_until(Duration::from_secs(300), |p| {
        peak = peak.max(p.server.footprint().receive_buffer_bytes);
        received(&p.server_events, server, ChannelId::RELIABLE_UNORDERED).len() == 8
            && received(&p.server_events, server, ChannelId::RELIABLE_ORDERED).len() == 8
    });
    assert!(done, "{:?}", pair.server.connection_stats(server));
    assert!(peak <= 2 * MESSAGE_MAX + 10_000, "{peak}");
    assert_eq!(
        received(&pair.server_events, server, ChannelId::RELIABLE_ORDERED),
        (0..8).collect::<Vec<_>>()
    );
}
