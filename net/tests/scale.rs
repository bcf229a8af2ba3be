//! One server endpoint holding 10,000 connections from one client endpoint,
//! in virtual time: every handshake finishes, a message goes each way on
//! every connection, the tables stay bounded, and timers fire only when due.

mod util;

use std::time::Duration;

use tessera_net::conditioner::ConditionerConfig;
use tessera_net::pair::Pair;
use tessera_net::{ChannelId, Config, ConnectionHandle, Event};
use util::{check_message, make_message};

const CONNECTIONS: usize = 10_000;
/// Handshakes started per wave, one wave per `WAVE_INTERVAL`, as a load
/// generator would (the server answers at most `control_queue_max`
/// handshake requests per transmit).
const WAVE: usize = 500;
const WAVE_INTERVAL: Duration = Duration::from_millis(10);

fn connected(events: &[Event]) -> Vec<ConnectionHandle> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Connected { connection, .. } => Some(*connection),
            _ => None,
        })
        .collect()
}

fn messages(events: &[Event], channel: ChannelId) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, Event::Message { channel: c, bytes, .. } if *c == channel && check_message(bytes).0 > 0))
        .count()
}

#[test]
fn ten_thousand_connections_in_one_endpoint() {
    let mut pair = Pair::new(
        Config::server(),
        Config::client(),
        ConditionerConfig::latency(Duration::from_millis(5)),
        10_000,
    );
    let mut clients = Vec::with_capacity(CONNECTIONS);
    while clients.len() < CONNECTIONS {
        for _ in 0..WAVE.min(CONNECTIONS - clients.len()) {
            clients.push(pair.connect());
        }
        pair.run_for(WAVE_INTERVAL);
    }
    let all = pair.run_until(Duration::from_secs(30), |p| {
        connected(&p.client_events).len() == CONNECTIONS
            && connected(&p.server_events).len() == CONNECTIONS
    });
    assert!(
        all,
        "client {} server {} connected",
        connected(&pair.client_events).len(),
        connected(&pair.server_events).len()
    );
    assert_eq!(pair.server.connection_count(), CONNECTIONS);
    assert_eq!(pair.client.connection_count(), CONNECTIONS);
    assert!(clients.iter().all(|&c| pair.client.is_connected(c)));
    let servers = connected(&pair.server_events);
    let handshake_time = pair.elapsed();

    // A reliable message up on every connection, a 300 B update down.
    for (i, &client) in clients.iter().enumerate() {
        pair.client
            .send(
                client,
                ChannelId::RELIABLE_ORDERED,
                &make_message(1, i as u32, 32),
            )
            .unwrap();
    }
    for (i, &server) in servers.iter().enumerate() {
        pair.server
            .send(
                server,
                ChannelId::SEQUENCED,
                &make_message(2, i as u32, 300),
            )
            .unwrap();
    }
    let exchanged = pair.run_until(Duration::from_secs(10), |p| {
        messages(&p.server_events, ChannelId::RELIABLE_ORDERED) == CONNECTIONS
            && messages(&p.client_events, ChannelId::SEQUENCED) == CONNECTIONS
    });
    assert!(exchanged);
    assert!(
        handshake_time < Duration::from_secs(10),
        "handshakes took {handshake_time:?}"
    );

    // Idle for a while: keepalives and acks only. Timers must fire when due
    // (never a deadline left in the past after a turn: no spinning), and
    // the heap must not grow with stale entries.
    let server_limits = pair.server.config().clone();
    let sent_before = pair.server.stats().datagrams_sent + pair.client.stats().datagrams_sent;
    let idle_end = pair.now + Duration::from_secs(3);
    let mut steps = 0u64;
    let mut timers_max = 0;
    while pair.now < idle_end {
        pair.step_until(idle_end);
        steps += 1;
        let (now, elapsed) = (pair.now, pair.elapsed());
        for endpoint in [&mut pair.server, &mut pair.client] {
            if let Some(deadline) = endpoint.poll_timeout() {
                assert!(
                    deadline >= now,
                    "a due timer was left unhandled at {elapsed:?}"
                );
            }
            timers_max = timers_max.max(endpoint.footprint().timers);
        }
    }
    eprintln!(
        "{CONNECTIONS} connections: handshakes done after {handshake_time:?} (virtual), 3 s idle: {steps} steps, {} datagrams, timer heap at most {timers_max}; server footprint {:?}",
        pair.server.stats().datagrams_sent + pair.client.stats().datagrams_sent - sent_before,
        pair.server.footprint()
    );
    // Idle traffic is keepalives and their acks: one ping per connection
    // and side per second at most, plus acks.
    let idle_datagrams =
        pair.server.stats().datagrams_sent + pair.client.stats().datagrams_sent - sent_before;
    assert!(
        idle_datagrams <= 3 * 4 * CONNECTIONS as u64,
        "{idle_datagrams} datagrams in 3 s of idle time"
    );
    // About one keepalive and one ack per connection and side per second;
    // an endpoint that re-ran every timer (or spun) would need far more.
    assert!(
        steps < 8 * CONNECTIONS as u64,
        "{steps} steps for 3 s of idle time"
    );
    assert!(
        timers_max <= 4 * CONNECTIONS + 64,
        "timer heap grew to {timers_max}"
    );

    // Every table is bounded by the connection count or its configured cap.
    for endpoint in [&pair.server, &pair.client] {
        let footprint = endpoint.footprint();
        assert_eq!(footprint.connections, CONNECTIONS, "{footprint:?}");
        assert_eq!(footprint.ids, CONNECTIONS, "{footprint:?}");
        assert!(footprint.peers <= CONNECTIONS, "{footprint:?}");
        assert!(footprint.timers <= 4 * CONNECTIONS + 64, "{footprint:?}");
        assert!(footprint.dirty <= CONNECTIONS, "{footprint:?}");
        assert!(
            footprint.control_queue <= server_limits.control_queue_max,
            "{footprint:?}"
        );
        assert_eq!(footprint.events, 0, "{footprint:?}");
        assert_eq!(footprint.receive_buffer_bytes, 0, "{footprint:?}");
        assert!(
            footprint.pooled_buffers <= server_limits.buffer_pool_max,
            "{footprint:?}"
        );
    }
    assert_eq!(pair.server.footprint().peers, CONNECTIONS);
    // Nobody timed out or was refused along the way.
    let stats = pair.server.stats();
    assert_eq!(stats.connections_accepted, CONNECTIONS as u64, "{stats:?}");
    assert_eq!(stats.connections_closed, 0, "{stats:?}");
    assert_eq!(stats.rejected_full, 0, "{stats:?}");
    assert_eq!(pair.client.stats().connections_closed, 0);
}
