//! Arbitrary and mutated datagrams: never a panic, always counted.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use tessera_net::conditioner::ConditionerConfig;
use tessera_net::pair::Pair;
use tessera_net::{ChannelId, Config, EndpointStats};

fn dropped(s: &EndpointStats) -> u64 {
    s.dropped_bad_header
        + s.dropped_bad_version
        + s.dropped_bad_body
        + s.dropped_bad_frame
        + s.dropped_unknown_channel
        + s.dropped_oversized
        + s.dropped_unknown_connection
        + s.dropped_address_mismatch
        + s.dropped_unexpected
        + s.dropped_duplicate
        + s.dropped_too_old
        + s.dropped_receive_window
        + s.dropped_event_queue_full
        + s.dropped_not_accepting
        + s.dropped_short_handshake
        + s.dropped_bad_cookie
        + s.dropped_expired_cookie
}

/// Real traffic of a short session, captured from the wire.
fn captured() -> (Pair, Vec<Vec<u8>>) {
    let mut pair = Pair::new(
        Config::server(),
        Config::client(),
        ConditionerConfig::default(),
        5,
    );
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    pair.to_server.set_filter(Some(Box::new(move |_, bytes| {
        sink.lock().unwrap().push(bytes.to_vec());
        false
    })));
    let (client, _) = pair.connect_and_wait();
    for i in 0..20u32 {
        let message = vec![i as u8; 10 + i as usize * 300];
        pair.client
            .send(client, ChannelId(i as u8 % 4), &message)
            .unwrap();
        pair.run_for(Duration::from_millis(20));
    }
    pair.to_server.set_filter(None);
    let packets = log.lock().unwrap().clone();
    (pair, packets)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_are_counted(datagrams in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..1500), 1..20)) {
        let mut pair = Pair::new(Config::server(), Config::client(), ConditionerConfig::default(), 1);
        let before = pair.server.stats().clone();
        for d in &datagrams {
            pair.server.handle_datagram(pair.now, pair.client_addr, d);
        }
        let after = pair.server.stats();
        prop_assert_eq!(after.datagrams_received - before.datagrams_received, datagrams.len() as u64);
        prop_assert_eq!(dropped(after) - dropped(&before), datagrams.len() as u64);
        prop_assert_eq!(pair.server.connection_count(), 0);
    }

    /// Valid packets with bytes flipped, fed into a live connection from its
    /// own address: no panic, and the session survives.
    #[test]
    fn mutated_packets_do_not_break_the_connection(
        mutations in proptest::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>(), any::<u8>()), 1..50),
    ) {
        let (mut pair, packets) = captured();
        for (packet, position, value) in &mutations {
            let mut bytes = packet.get(&packets).clone();
            let i = position.index(bytes.len());
            bytes[i] ^= value | 1;
            pair.server.handle_datagram(pair.now, pair.client_addr, &bytes);
        }
        pair.run_for(Duration::from_secs(1));
        prop_assert_eq!(pair.server.connection_count(), 1);
    }
}

/// Every single-bit flip in the header of real data packets, fed back from
/// the client's own address: none closes the session (a data packet whose
/// type byte turns into a disconnect has a body that is not a close code,
/// and is dropped as a bad body). A deterministic companion of the
/// property above, which once found exactly that.
#[test]
fn no_single_bit_flip_in_a_header_closes_the_connection() {
    let (_, packets) = captured();
    let data: Vec<usize> = (0..packets.len())
        .filter(|&p| packets[p].len() > tessera_net::wire::HEADER_LEN && packets[p][3] == 6)
        .take(3)
        .collect();
    assert!(!data.is_empty(), "no data packet was captured");
    for p in data {
        for byte in 0..tessera_net::wire::HEADER_LEN {
            for bit in 0..8 {
                let (mut pair, packets) = captured();
                let mut bytes = packets[p].clone();
                bytes[byte] ^= 1 << bit;
                pair.server
                    .handle_datagram(pair.now, pair.client_addr, &bytes);
                pair.run_for(Duration::from_millis(200));
                assert_eq!(
                    pair.server.connection_count(),
                    1,
                    "packet {p}, byte {byte}, bit {bit} closed the session"
                );
            }
        }
    }
}
