//! Delivery guarantees under a hostile link, in virtual time.

mod util;

use std::collections::BTreeSet;
use std::time::Duration;

use proptest::prelude::*;
use tessera_net::conditioner::{ConditionerConfig, Loss};
use tessera_net::pair::Pair;
use tessera_net::rng::Rng;
use tessera_net::{ChannelConfig, ChannelId, Config, ConnectionHandle, Event, RELIABLE_WINDOW_MAX};
use util::{make_message, received};

const TICK: Duration = Duration::from_millis(50);

/// What one side sent, per channel.
#[derive(Default)]
struct Sent {
    ordered: u32,
    unordered: u32,
    unreliable: u32,
    sequenced: u32,
}

fn send_tick(
    endpoint: &mut tessera_net::Endpoint,
    connection: ConnectionHandle,
    rng: &mut Rng,
    sent: &mut Sent,
    tag: u8,
) {
    for _ in 0..2 {
        // Mostly small, sometimes several fragments.
        let len = if rng.chance(0.1) {
            1200 + rng.below(6000) as usize
        } else {
            9 + rng.below(300) as usize
        };
        let message = make_message(tag, sent.ordered, len);
        if endpoint
            .send(connection, ChannelId::RELIABLE_ORDERED, &message)
            .is_ok()
        {
            sent.ordered += 1;
        }
    }
    let message = make_message(tag, sent.unordered, 9 + rng.below(2500) as usize);
    if endpoint
        .send(connection, ChannelId::RELIABLE_UNORDERED, &message)
        .is_ok()
    {
        sent.unordered += 1;
    }
    let message = make_message(tag, sent.unreliable, 9 + rng.below(2000) as usize);
    if endpoint
        .send(connection, ChannelId::UNRELIABLE, &message)
        .is_ok()
    {
        sent.unreliable += 1;
    }
    let message = make_message(tag, sent.sequenced, 300);
    endpoint
        .send(connection, ChannelId::SEQUENCED, &message)
        .expect("a sequenced channel never refuses");
    sent.sequenced += 1;
}

/// Checks one direction's deliveries against what was sent.
fn check_direction(
    events: &[Event],
    connection: ConnectionHandle,
    sent: &Sent,
    seed: u64,
    what: &str,
) {
    let ordered = received(events, connection, ChannelId::RELIABLE_ORDERED);
    assert_eq!(
        ordered,
        (0..sent.ordered).collect::<Vec<_>>(),
        "{what}: reliable-ordered must arrive exactly once and in order (seed {seed})"
    );
    let unordered = received(events, connection, ChannelId::RELIABLE_UNORDERED);
    let set: BTreeSet<u32> = unordered.iter().copied().collect();
    assert_eq!(
        unordered.len(),
        set.len(),
        "{what}: reliable-unordered duplicated (seed {seed})"
    );
    assert_eq!(
        set,
        (0..sent.unordered).collect(),
        "{what}: reliable-unordered lost a message (seed {seed})"
    );
    let unreliable = received(events, connection, ChannelId::UNRELIABLE);
    let set: BTreeSet<u32> = unreliable.iter().copied().collect();
    assert_eq!(
        unreliable.len(),
        set.len(),
        "{what}: unreliable delivered twice (seed {seed})"
    );
    assert!(set.iter().all(|&s| s < sent.unreliable));
    let sequenced = received(events, connection, ChannelId::SEQUENCED);
    assert!(
        sequenced.windows(2).all(|w| w[0] < w[1]),
        "{what}: sequenced went backwards (seed {seed}): {sequenced:?}"
    );
    assert!(
        !sequenced.is_empty(),
        "{what}: no snapshot at all (seed {seed})"
    );
}

/// `sealed`: every session opened with a connect token, every packet
/// sealed (ChaCha20-Poly1305).
fn harsh_run(seed: u64, link: ConditionerConfig, sealed: bool) {
    let mut pair = Pair::new(Config::server(), Config::client(), link, seed);
    if sealed {
        pair.seal_sessions();
    }
    // A bursty link can eat a whole handshake: retry like a real client.
    let (client, server) = (0..5)
        .find_map(|_| pair.try_connect())
        .unwrap_or_else(|| panic!("no handshake in 5 tries (seed {seed})"));
    let mut rng = Rng::from_seed(seed ^ 0xA5A5);
    let (mut up, mut down) = (Sent::default(), Sent::default());
    for _ in 0..100 {
        send_tick(&mut pair.client, client, &mut rng, &mut up, 1);
        send_tick(&mut pair.server, server, &mut rng, &mut down, 2);
        pair.run_for(TICK);
    }
    let done = pair.run_until(Duration::from_secs(300), |p| {
        let up_ok = received(&p.server_events, server, ChannelId::RELIABLE_ORDERED).len()
            == up.ordered as usize
            && received(&p.server_events, server, ChannelId::RELIABLE_UNORDERED).len()
                >= up.unordered as usize;
        let down_ok = received(&p.client_events, client, ChannelId::RELIABLE_ORDERED).len()
            == down.ordered as usize
            && received(&p.client_events, client, ChannelId::RELIABLE_UNORDERED).len()
                >= down.unordered as usize;
        up_ok && down_ok
    });
    // Let duplicates and stragglers arrive: they must all be suppressed.
    pair.run_for(Duration::from_secs(2));
    assert!(
        done,
        "reliable traffic did not complete (seed {seed}): client {:?} server {:?}",
        pair.client.connection_stats(client),
        pair.server.connection_stats(server)
    );
    check_direction(&pair.server_events, server, &up, seed, "client->server");
    check_direction(&pair.client_events, client, &down, seed, "server->client");
    assert!(pair.client.is_connected(client), "seed {seed}");
    let stats = pair.client.connection_stats(client).unwrap();
    assert!(
        stats.retransmits > 0 && stats.packets_lost > 0,
        "seed {seed}: {stats:?}"
    );
    assert!(stats.duplicate_packets > 0, "seed {seed}: {stats:?}");
    assert_eq!(pair.server.token_claims(server).is_some(), sealed);
    assert_eq!(pair.server.stats().dropped_bad_seal, 0, "seed {seed}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// 20% loss, 5% duplication, 10% reordering, 20-50 ms delay: every
    /// reliable message exactly once (in order on the ordered channel), both
    /// ways; unreliable at most once; sequenced never backwards. In clear
    /// text and sealed.
    #[test]
    fn harsh_link_delivers_exactly_once(seed in any::<u64>()) {
        harsh_run(seed, ConditionerConfig::harsh(), false);
        harsh_run(seed, ConditionerConfig::harsh(), true);
    }

    /// Bursty loss (Gilbert-Elliott) with the same duplication and reordering.
    #[test]
    fn bursty_link_delivers_exactly_once(seed in any::<u64>()) {
        let link = ConditionerConfig {
            loss: Loss::GilbertElliott { good_to_bad: 0.05, bad_to_good: 0.3, loss_good: 0.05, loss_bad: 0.7 },
            ..ConditionerConfig::harsh()
        };
        harsh_run(seed, link.clone(), false);
        harsh_run(seed, link, true);
    }
}

/// A receiver that never sends application data still acks (laminar's bug):
/// on a clean link nothing is ever retransmitted and nothing stays in flight.
#[test]
fn one_way_flow_is_acked() {
    let mut pair = Pair::new(
        Config::server(),
        Config::client(),
        ConditionerConfig::latency(Duration::from_millis(15)),
        11,
    );
    let (client, server) = pair.connect_and_wait();
    for i in 0..400u32 {
        pair.client
            .send(
                client,
                ChannelId::RELIABLE_ORDERED,
                &make_message(1, i, 200),
            )
            .unwrap();
        pair.run_for(Duration::from_millis(10));
    }
    // Less than the keepalive interval: no ping is in flight at the end.
    pair.run_for(Duration::from_millis(500));
    assert_eq!(
        received(&pair.server_events, server, ChannelId::RELIABLE_ORDERED),
        (0..400).collect::<Vec<_>>()
    );
    let c = pair.client.connection_stats(client).unwrap();
    assert_eq!(c.retransmits, 0, "{c:?}");
    assert_eq!(c.packets_lost, 0, "{c:?}");
    assert_eq!(c.bytes_in_flight, 0, "{c:?}");
    assert_eq!(c.send_queue_messages, 0, "{c:?}");
    assert!(c.packets_acked >= 300, "{c:?}");
    let s = pair.server.connection_stats(server).unwrap();
    assert_eq!(s.messages_sent, 0);
    assert!(
        s.packets_sent > 50,
        "the receiver sends ack-only packets: {s:?}"
    );
    // RTT: 30 ms path plus at most the 10 ms ack delay.
    assert!(
        c.rtt_smoothed >= Duration::from_millis(30) && c.rtt_smoothed <= Duration::from_millis(45),
        "{c:?}"
    );
}

/// One lost packet in a stream is recovered by the three-newer-acks rule,
/// before its retransmission timer.
#[test]
fn fast_retransmit_recovers_a_single_loss() {
    let mut pair = Pair::new(
        Config::server(),
        Config::client(),
        ConditionerConfig::latency(Duration::from_millis(20)),
        12,
    );
    let (client, server) = pair.connect_and_wait();
    // Drop the 5th datagram the client sends from now on.
    let offered = pair.to_server.stats().offered;
    pair.to_server
        .set_filter(Some(Box::new(move |index, _| index == offered + 4)));
    for i in 0..30u32 {
        pair.client
            .send(
                client,
                ChannelId::RELIABLE_ORDERED,
                &make_message(1, i, 100),
            )
            .unwrap();
        pair.run_for(Duration::from_millis(5));
    }
    pair.run_for(Duration::from_secs(1));
    assert_eq!(pair.to_server.stats().filtered, 1);
    assert_eq!(
        received(&pair.server_events, server, ChannelId::RELIABLE_ORDERED),
        (0..30).collect::<Vec<_>>()
    );
    let c = pair.client.connection_stats(client).unwrap();
    assert_eq!(c.lost_by_threshold, 1, "{c:?}");
    assert_eq!(c.timeouts, 0, "{c:?}");
    assert_eq!(c.retransmits, 1, "{c:?}");
}

/// More packets than one header acknowledges (65) arrive between two
/// transmits, as in one large receive batch: catch-up acks cover the older
/// ones, so a clean path loses and resends nothing; on a lossy path no packet
/// that did not arrive is ever acknowledged (every message gets through).
#[test]
fn large_receive_batches_are_fully_acknowledged() {
    let burst = |loss: f64, seed: u64| {
        let mut client_config = Config::client();
        // One burst of 300 packets, all arriving at the same instant.
        client_config.congestion.initial_window_packets = 400;
        client_config.congestion.pacing_burst_bytes = 400 * 1200;
        let link = ConditionerConfig {
            loss: if loss > 0.0 {
                Loss::Random(loss)
            } else {
                Loss::None
            },
            ..ConditionerConfig::latency(Duration::from_millis(10))
        };
        let mut pair = Pair::new(Config::server(), client_config, link, seed);
        let (client, server) = pair.connect_and_wait();
        for i in 0..300u32 {
            pair.client
                .send(
                    client,
                    ChannelId::RELIABLE_ORDERED,
                    &make_message(1, i, 1100),
                )
                .unwrap();
        }
        pair.run_for(Duration::from_secs(10));
        assert_eq!(
            received(&pair.server_events, server, ChannelId::RELIABLE_ORDERED),
            (0..300).collect::<Vec<_>>(),
            "seed {seed}"
        );
        pair.client.connection_stats(client).unwrap()
    };
    let clean = burst(0.0, 21);
    assert!(clean.packets_acked >= 300, "{clean:?}");
    assert_eq!(clean.packets_lost, 0, "{clean:?}");
    assert_eq!(clean.retransmits, 0, "{clean:?}");
    for seed in 22..30 {
        burst(0.1, seed);
    }
}

/// Two copies of every retransmission (`retransmission_copies = 2`) on a
/// harsh link: still exactly once and in order, and each lost frame is sent
/// again twice.
#[test]
fn doubled_retransmissions_keep_delivery_exact() {
    let mut checked = 0;
    for seed in 40..44 {
        let mut client_config = Config::client();
        client_config.retransmission_copies = 2;
        let mut server_config = Config::server();
        server_config.retransmission_copies = 2;
        let mut pair = Pair::new(
            server_config,
            client_config,
            ConditionerConfig::harsh(),
            seed,
        );
        let Some((client, server)) = pair.try_connect() else {
            continue;
        };
        for i in 0..300u32 {
            pair.client
                .send(
                    client,
                    ChannelId::RELIABLE_ORDERED,
                    &make_message(1, i, 40 + (i as usize % 7) * 100),
                )
                .unwrap();
            pair.run_for(Duration::from_millis(5));
        }
        pair.run_for(Duration::from_secs(20));
        assert_eq!(
            received(&pair.server_events, server, ChannelId::RELIABLE_ORDERED),
            (0..300).collect::<Vec<_>>(),
            "seed {seed}"
        );
        let c = pair.client.connection_stats(client).unwrap();
        assert!(c.packets_lost > 0, "{c:?}");
        // Echoes are counted as retransmissions too.
        assert!(c.retransmits > c.packets_lost, "{c:?}");
        checked += 1;
    }
    assert!(checked >= 2, "only {checked} handshakes survived the link");
}

/// With the path cut, retransmission intervals grow by 1.5x each time.
#[test]
fn retransmission_timeout_backs_off() {
    let mut config = Config::client();
    config.idle_timeout = Duration::from_secs(60);
    let mut server_config = Config::server();
    server_config.idle_timeout = Duration::from_secs(60);
    let mut pair = Pair::new(
        server_config,
        config,
        ConditionerConfig::latency(Duration::from_millis(10)),
        13,
    );
    let (client, _) = pair.connect_and_wait();
    pair.to_server.set_filter(Some(Box::new(|_, _| true)));
    pair.client
        .send(client, ChannelId::RELIABLE_ORDERED, &make_message(1, 0, 50))
        .unwrap();
    let mut send_times = Vec::new();
    let mut last_offered = pair.to_server.stats().offered;
    let end = pair.now + Duration::from_secs(20);
    while pair.now < end {
        pair.step_until(end);
        let offered = pair.to_server.stats().offered;
        if offered > last_offered {
            send_times.push(pair.elapsed());
            last_offered = offered;
        }
    }
    let gaps: Vec<f64> = send_times
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    assert!(gaps.len() >= 6, "{gaps:?}");
    // Skip the first gaps (keepalive pings interleave early on); the tail must
    // grow geometrically until the ceiling.
    let c = pair.client.connection_stats(client).unwrap();
    assert!(c.timeouts >= 6, "{c:?}");
    assert!(c.rto >= Duration::from_secs(2), "rto backed off: {c:?}");
    let growing = gaps.windows(2).filter(|w| w[1] > w[0] * 1.3).count();
    assert!(growing >= 4, "{gaps:?}");
}

/// Unreliable-sequenced: out-of-order snapshots never go backwards, and the
/// newest always gets through on a clean link.
#[test]
fn sequenced_newest_wins() {
    let link = ConditionerConfig {
        reorder: 0.5,
        reorder_delay: Duration::from_millis(80),
        latency: Duration::from_millis(10),
        ..ConditionerConfig::default()
    };
    let mut pair = Pair::new(Config::server(), Config::client(), link, 14);
    let (client, server) = pair.connect_and_wait();
    for i in 0..200u32 {
        pair.server
            .send(server, ChannelId::SEQUENCED, &make_message(2, i, 300))
            .unwrap();
        pair.run_for(Duration::from_millis(10));
    }
    pair.run_for(Duration::from_secs(1));
    let got = received(&pair.client_events, client, ChannelId::SEQUENCED);
    assert!(got.windows(2).all(|w| w[0] < w[1]), "{got:?}");
    assert_eq!(got.last(), Some(&199));
    let stats = pair.client.connection_stats(client).unwrap();
    assert!(
        stats.stale_messages > 0,
        "reordering produced stale snapshots: {stats:?}"
    );
    assert_eq!(got.len() as u64 + stats.stale_messages, 200);
}

/// Channels with `notify_acks` report which messages the peer acknowledged
/// (the snapshot-delta baseline).
#[test]
fn acks_are_reported() {
    let mut config = Config::server();
    config.channels[1] = ChannelConfig::unreliable_sequenced().notify_acks(true);
    config.channels[2] = ChannelConfig::reliable_ordered().notify_acks(true);
    let mut client_config = Config::client();
    client_config.channels = config.channels.clone();
    let link = ConditionerConfig {
        loss: Loss::Random(0.3),
        latency: Duration::from_millis(10),
        ..ConditionerConfig::default()
    };
    let mut pair = Pair::new(config, client_config, link, 15);
    let (_, server) = pair.connect_and_wait();
    let mut snapshot_ids = Vec::new();
    let mut reliable_ids = Vec::new();
    for i in 0..100u32 {
        snapshot_ids.push(
            pair.server
                .send(server, ChannelId::SEQUENCED, &make_message(2, i, 300))
                .unwrap(),
        );
        reliable_ids.push(
            pair.server
                .send(server, ChannelId::RELIABLE_ORDERED, &make_message(2, i, 50))
                .unwrap(),
        );
        pair.run_for(TICK);
    }
    pair.run_for(Duration::from_secs(10));
    let acked = |channel| -> Vec<u64> {
        pair.server_events
            .iter()
            .filter_map(|e| match e {
                Event::Acked {
                    channel: c,
                    message,
                    ..
                } if *c == channel => Some(message.0),
                _ => None,
            })
            .collect()
    };
    let reliable = acked(ChannelId::RELIABLE_ORDERED);
    let mut sorted = reliable.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, reliable_ids.iter().map(|m| m.0).collect::<Vec<_>>());
    let snapshots = acked(ChannelId::SEQUENCED);
    let unique: BTreeSet<_> = snapshots.iter().collect();
    assert_eq!(unique.len(), snapshots.len(), "each ack reported once");
    assert!(
        snapshots.len() > 40 && snapshots.len() < 100,
        "{}",
        snapshots.len()
    );
}

/// The largest reliable window on a lossy, duplicating, reordering link:
/// more than 16,384 messages in flight at once while the 16-bit message ids
/// wrap twice, and every message still arrives exactly once, in order.
#[test]
fn full_reliable_window_wraps_ids_exactly_once() {
    let config = |mut c: Config| {
        c.reliable_window = RELIABLE_WINDOW_MAX;
        c.receive_buffer_bytes_max = 8 << 20;
        c.buffer_pool_max = 1 << 16;
        c.congestion.loss_tolerance = 0.2;
        c.channels[ChannelId::RELIABLE_ORDERED.0 as usize] =
            ChannelConfig::reliable_ordered().queue_max(1 << 16, 8 << 20);
        c
    };
    let link = ConditionerConfig {
        loss: Loss::Random(0.05),
        duplicate: 0.02,
        reorder: 0.05,
        reorder_delay: Duration::from_millis(5),
        latency: Duration::from_millis(20),
        jitter: Duration::from_millis(2),
        ..ConditionerConfig::default()
    };
    let mut pair = Pair::new(config(Config::server()), config(Config::client()), link, 11);
    let (client, server) = pair.connect_and_wait();
    const TOTAL: u32 = 140_000;
    let mut next = 0u32;
    let mut widest = 0usize;
    let end = pair.now + Duration::from_secs(60);
    while pair.now < end {
        while next < TOTAL
            && pair
                .client
                .send(
                    client,
                    ChannelId::RELIABLE_ORDERED,
                    &make_message(3, next, 9),
                )
                .is_ok()
        {
            next += 1;
        }
        pair.run_for(Duration::from_millis(2));
        let s = pair.server.connection_stats(server).unwrap();
        // Messages held behind a lost one: only a window wider than 16384
        // lets more than 16384 wait.
        widest = widest.max(s.reorder_buffered_messages);
        if s.messages_received >= TOTAL as u64 {
            break;
        }
    }
    let got = received(&pair.server_events, server, ChannelId::RELIABLE_ORDERED);
    assert_eq!(got.len(), TOTAL as usize);
    assert!(
        got.iter().copied().eq(0..TOTAL),
        "out of order or duplicated"
    );
    assert!(
        widest > 16_384,
        "the window was never wider than 16384: {widest}"
    );
    let s = pair.client.connection_stats(client).unwrap();
    assert!(s.packets_lost > 0, "{s:?}");
}
