//! A server endpoint with one live connection, fed arbitrary datagrams (some
//! patched to carry the live connection id and a valid header prefix, so the
//! fuzzer reaches the connection's frame handling). Never a panic; every
//! datagram is accounted for; the tables stay bounded.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tessera_net::conditioner::ConditionerConfig;
use tessera_net::pair::Pair;
use tessera_net::wire::{self, PacketType, PROTOCOL_ID, PROTOCOL_VERSION};
use tessera_net::{ChannelId, Config};

/// A connected pair and the server's id for the connection.
fn setup() -> (Pair, u32) {
    // The game server's settings: per-peer and per-address limits on.
    let mut pair = Pair::new(
        Config::game_server(64),
        Config::client(),
        ConditionerConfig::default(),
        1,
    );
    let seen = Arc::new(Mutex::new(None));
    let sink = seen.clone();
    pair.to_server.set_filter(Some(Box::new(move |_, bytes| {
        if let Ok((header, _)) = wire::decode_header(bytes) {
            if header.packet_type == PacketType::Data {
                *sink.lock().unwrap() = Some(header.connection_id);
            }
        }
        false
    })));
    let (client, _) = pair.connect_and_wait();
    pair.client
        .send(client, ChannelId::RELIABLE_ORDERED, b"hello")
        .unwrap();
    pair.run_for(Duration::from_millis(50));
    pair.to_server.set_filter(None);
    let id = seen.lock().unwrap().expect("the client sent a data packet");
    (pair, id)
}

fuzz_target!(|data: &[u8]| {
    let (mut pair, server_id) = setup();
    let stranger: SocketAddr = "10.9.9.9:9999".parse().unwrap();
    let before = pair.server.stats().datagrams_received;
    let delivered_before = pair.to_server.stats().delivered;
    let mut fed = 0u64;
    let mut rest = data;
    while rest.len() >= 2 {
        let control = rest[0];
        let len = (rest[1] as usize * 6).min(rest.len() - 2);
        let mut datagram = rest[2..2 + len].to_vec();
        rest = &rest[2 + len..];
        if control & 1 != 0 && datagram.len() >= 4 {
            datagram[..2].copy_from_slice(&PROTOCOL_ID.to_le_bytes());
            datagram[2] = PROTOCOL_VERSION;
            datagram[3] = 1 + datagram[3] % 7;
        }
        if control & 2 != 0 && datagram.len() >= 10 {
            datagram[6..10].copy_from_slice(&server_id.to_le_bytes());
        }
        let from = if control & 4 != 0 {
            stranger
        } else {
            pair.client_addr
        };
        pair.server.handle_datagram(pair.now, from, &datagram);
        fed += 1;
        if control & 8 != 0 {
            pair.now += Duration::from_millis((control >> 4) as u64 * 20);
            pair.turn();
        }
    }
    // Every datagram is accounted for: ours plus what the link delivered.
    let delivered = pair.to_server.stats().delivered - delivered_before;
    assert_eq!(
        pair.server.stats().datagrams_received - before,
        fed + delivered
    );
    pair.run_for(Duration::from_millis(200));
    let footprint = pair.server.footprint();
    assert!(footprint.connections <= 1);
    assert!(
        footprint.receive_buffer_bytes <= pair.server.config().endpoint_receive_buffer_bytes_max
    );
});
