//! Congestion control, pacing and backpressure.

mod util;

use std::time::Duration;

use tessera_net::conditioner::{ConditionerConfig, Loss};
use tessera_net::pair::Pair;
use tessera_net::{ChannelConfig, ChannelId, Config, ConnectionHandle, SendError};
use util::{make_message, received};

/// Keeps the reliable channel's queue topped up (a bulk transfer).
fn feed(pair: &mut Pair, client: ConnectionHandle, next: &mut u32) {
    while pair
        .client
        .connection_stats(client)
        .is_some_and(|s| s.send_queue_bytes < 2 << 20)
    {
        pair.client
            .send(
                client,
                ChannelId::RELIABLE_ORDERED,
                &make_message(1, *next, 1100),
            )
            .unwrap();
        *next += 1;
    }
}

fn bulk_phase(
    pair: &mut Pair,
    client: ConnectionHandle,
    next: &mut u32,
    duration: Duration,
) -> (usize, usize) {
    let end = pair.now + duration;
    let mut windows = Vec::new();
    while pair.now < end {
        feed(pair, client, next);
        pair.run_for(Duration::from_millis(20));
        windows.push(
            pair.client
                .connection_stats(client)
                .unwrap()
                .send_window_bytes,
        );
    }
    let tail = &windows[windows.len() / 2..];
    (
        tail.iter().sum::<usize>() / tail.len(),
        *windows.last().unwrap(),
    )
}

#[test]
fn window_backs_off_on_loss_and_recovers() {
    let clean = ConditionerConfig::latency(Duration::from_millis(20));
    let mut pair = Pair::new(Config::server(), Config::client(), clean.clone(), 1);
    let (client, server) = pair.connect_and_wait();
    let mut next = 0;
    let (clean_mean, _) = bulk_phase(&mut pair, client, &mut next, Duration::from_secs(3));
    let lossy = ConditionerConfig {
        loss: Loss::Random(0.05),
        ..clean.clone()
    };
    pair.to_server.set_config(lossy.clone());
    pair.to_client.set_config(lossy);
    let (lossy_mean, lossy_last) = bulk_phase(&mut pair, client, &mut next, Duration::from_secs(3));
    let after_loss = pair.client.connection_stats(client).unwrap();
    pair.to_server.set_config(clean.clone());
    pair.to_client.set_config(clean);
    let (recovered_mean, _) = bulk_phase(&mut pair, client, &mut next, Duration::from_secs(3));
    assert!(after_loss.backoffs[0] > 0, "{after_loss:?}");
    assert!(
        lossy_mean * 2 < clean_mean,
        "backs off: clean {clean_mean} lossy {lossy_mean}"
    );
    assert!(
        recovered_mean > 2 * lossy_last,
        "recovers: lossy {lossy_last} recovered {recovered_mean}"
    );
    // Whatever happened to the window, nothing was lost or reordered.
    let got = received(&pair.server_events, server, ChannelId::RELIABLE_ORDERED);
    assert!(got.len() > 1000);
    assert!(got.iter().enumerate().all(|(i, &s)| s == i as u32));
}

#[test]
fn window_backs_off_when_rtt_grows() {
    let mut pair = Pair::new(
        Config::server(),
        Config::client(),
        ConditionerConfig::latency(Duration::from_millis(10)),
        2,
    );
    let (client, _) = pair.connect_and_wait();
    let mut next = 0;
    let _ = bulk_phase(&mut pair, client, &mut next, Duration::from_secs(2));
    let before = pair.client.connection_stats(client).unwrap();
    // The path's delay jumps (a queue building up somewhere).
    pair.to_server
        .set_config(ConditionerConfig::latency(Duration::from_millis(120)));
    let _ = bulk_phase(&mut pair, client, &mut next, Duration::from_secs(2));
    let after = pair.client.connection_stats(client).unwrap();
    assert!(
        after.backoffs[1] > before.backoffs[1],
        "{before:?} {after:?}"
    );
    assert!(
        after.send_window_bytes < before.send_window_bytes,
        "{before:?} {after:?}"
    );
}

/// A burst is spread out: never more than the window in flight, and the
/// first instant sends no more than the initial window.
#[test]
fn bursts_are_paced_and_windowed() {
    let mut pair = Pair::new(
        Config::server(),
        Config::client(),
        ConditionerConfig::latency(Duration::from_millis(50)),
        3,
    );
    let (client, server) = pair.connect_and_wait();
    pair.run_for(Duration::from_millis(500));
    let before = pair.to_server.stats().offered;
    for i in 0..400 {
        pair.client
            .send(
                client,
                ChannelId::RELIABLE_ORDERED,
                &make_message(1, i, 1100),
            )
            .unwrap();
    }
    pair.turn();
    let first_instant = pair.to_server.stats().offered - before;
    let window_packets = Config::default().congestion.initial_window_packets as u64;
    assert!(first_instant <= window_packets, "{first_instant}");
    let (mut peak_in_flight, mut peak_window) = (0, 0);
    let done = pair.run_until(Duration::from_secs(30), |p| {
        let stats = p.client.connection_stats(client).unwrap();
        peak_in_flight = peak_in_flight.max(stats.bytes_in_flight);
        peak_window = peak_window.max(stats.send_window_bytes);
        received(&p.server_events, server, ChannelId::RELIABLE_ORDERED).len() == 400
    });
    assert!(done);
    // In flight never exceeds the largest window by more than one packet (it
    // may exceed the current one right after a reduction).
    assert!(
        peak_in_flight <= peak_window + 1200,
        "{peak_in_flight} {peak_window}"
    );
    let stats = pair.client.connection_stats(client).unwrap();
    assert_eq!(
        stats.timeouts, 0,
        "no spurious timeouts on a clean path: {stats:?}"
    );
    assert_eq!(stats.retransmits, 0, "{stats:?}");
}

/// Full queues are errors the caller sees; nothing grows without bound.
#[test]
fn full_queues_push_back() {
    let mut server = Config::server();
    server.channels[2] = ChannelConfig::reliable_ordered().queue_max(100, 1 << 20);
    let client_config = Config {
        channels: server.channels.clone(),
        ..Config::client()
    };
    let mut pair = Pair::new(
        server,
        client_config,
        ConditionerConfig::latency(Duration::from_millis(10)),
        4,
    );
    let (client, _) = pair.connect_and_wait();
    pair.to_server.set_filter(Some(Box::new(|_, _| true)));
    let mut accepted = 0;
    let mut refused = 0;
    for i in 0..1000 {
        match pair.client.send(
            client,
            ChannelId::RELIABLE_ORDERED,
            &make_message(1, i, 100),
        ) {
            Ok(_) => accepted += 1,
            Err(SendError::QueueFull(2)) => refused += 1,
            Err(other) => panic!("{other}"),
        }
        pair.run_for(Duration::from_millis(1));
    }
    assert_eq!(accepted, 100);
    assert_eq!(refused, 900);
    let stats = pair.client.connection_stats(client).unwrap();
    assert_eq!(stats.send_queue_messages, 100);
    // A sequenced channel drops its oldest instead of refusing.
    for i in 0..50 {
        pair.client
            .send(client, ChannelId::SEQUENCED, &make_message(1, i, 100))
            .unwrap();
    }
    let stats = pair.client.connection_stats(client).unwrap();
    assert!(stats.superseded_messages > 0, "{stats:?}");
    assert!(stats.send_queue_messages <= 100 + 8);
}
