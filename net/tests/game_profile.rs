//! The transport as the game configures it (`Config::game_server`,
//! `Config::game_client` with its 60 ms acknowledgement hold), playing the
//! game's traffic on a clean link in virtual time: the client sends an
//! input and a snapshot acknowledgement every 20 Hz tick, the server a
//! snapshot every tick. Nothing is retransmitted, nothing times out, and
//! each side sends about one packet per tick: the client's acknowledgements
//! ride on its inputs. (Snapshots travel on the sequenced channel and draw
//! no acknowledgement packet of their own here, with the default 10 ms
//! delay too: what the 60 ms hold saves in the field is measured by the
//! soak, not shown by this test.)

use std::time::Duration;

use tessera_net::conditioner::ConditionerConfig;
use tessera_net::pair::Pair;
use tessera_net::{ChannelId, Config, ConnectionStats, Event};

const TICK: Duration = Duration::from_millis(50);
/// The game's channels (`tessera_schema::protocol::Channel`).
const SNAPSHOTS: ChannelId = ChannelId(1);
const RELIABLE: ChannelId = ChannelId(2);
const TICKS: u32 = 20 * 60;
const CLIENT_PHASE: Duration = Duration::from_millis(40);

fn delta(after: &ConnectionStats, before: &ConnectionStats) -> (u64, u64, u64, u64) {
    (
        after.packets_sent - before.packets_sent,
        after.retransmits - before.retransmits,
        after.timeouts - before.timeouts,
        after.packets_lost - before.packets_lost,
    )
}

#[test]
fn game_traffic_at_20_hz_on_a_clean_link() {
    let link = ConditionerConfig {
        latency: Duration::from_millis(15),
        ..ConditionerConfig::default()
    };
    let mut pair = Pair::new(Config::game_server(64), Config::game_client(1), link, 3);
    let (client, server) = pair.connect_and_wait();
    pair.run_for(Duration::from_millis(500));
    let client_before = pair.client.connection_stats(client).expect("connected");
    let server_before = pair.server.connection_stats(server).expect("connected");
    let input = [7u8; 40];
    let snapshot = [9u8; 700];
    let mut newest_snapshot: Option<u32> = None;
    let (mut inputs_received, mut snapshots_received) = (0u32, 0u32);
    for tick in 0..TICKS {
        // The server ticks on the tick, the client 40 ms later: a snapshot
        // (15 ms on the link) waits 25 ms for the client's next input, more
        // than the transport's default 10 ms acknowledgement delay.
        let mut message = snapshot;
        message[..4].copy_from_slice(&tick.to_le_bytes());
        pair.server
            .send(server, SNAPSHOTS, &message)
            .expect("snapshot queued");
        let phase = pair.now + CLIENT_PHASE;
        pair.step_until(phase);
        pair.client
            .send(client, RELIABLE, &input)
            .expect("input queued");
        if let Some(acked) = newest_snapshot.take() {
            pair.client
                .send(client, SNAPSHOTS, &acked.to_le_bytes())
                .expect("ack queued");
        }
        let end = phase + (TICK - CLIENT_PHASE);
        pair.step_until(end);
        for event in pair.client_events.drain(..) {
            if let Event::Message { channel, bytes, .. } = event {
                assert_eq!(channel, SNAPSHOTS);
                snapshots_received += 1;
                newest_snapshot = Some(u32::from_le_bytes(bytes[..4].try_into().unwrap()));
            }
        }
        for event in pair.server_events.drain(..) {
            if let Event::Message { channel, .. } = event {
                if channel == RELIABLE {
                    inputs_received += 1;
                }
            }
        }
    }
    // The last tick's messages land.
    let settle = pair.now + Duration::from_millis(100);
    pair.step_until(settle);
    inputs_received += pair
        .server_events
        .drain(..)
        .filter(|e| matches!(e, Event::Message { channel, .. } if *channel == RELIABLE))
        .count() as u32;
    let client_after = pair.client.connection_stats(client).expect("connected");
    let server_after = pair.server.connection_stats(server).expect("connected");
    let (client_packets, client_retransmits, client_timeouts, client_lost) =
        delta(&client_after, &client_before);
    let (server_packets, server_retransmits, server_timeouts, server_lost) =
        delta(&server_after, &server_before);

    assert_eq!(inputs_received, TICKS, "every input arrived");
    assert!(
        snapshots_received >= TICKS - 1,
        "snapshots: {snapshots_received}"
    );
    assert_eq!(
        (client_retransmits, client_timeouts, client_lost),
        (0, 0, 0),
        "client: retransmits, timeouts, losses on a clean link"
    );
    assert_eq!(
        (server_retransmits, server_timeouts, server_lost),
        (0, 0, 0),
        "server: retransmits, timeouts, losses on a clean link"
    );
    // One packet per tick carries the input, the snapshot ack and the
    // transport acks; a few more for keep-alives at most.
    let ticks = u64::from(TICKS);
    assert!(
        client_packets >= ticks && client_packets <= ticks * 11 / 10,
        "client sent {client_packets} packets for {ticks} ticks of input"
    );
    assert!(
        server_packets >= ticks && server_packets <= ticks * 11 / 10,
        "server sent {server_packets} packets for {ticks} snapshots"
    );
    // The hold delays the server's view of the RTT by at most the hold.
    let rtt = client_after.rtt_smoothed.max(server_after.rtt_smoothed);
    assert!(
        rtt <= Duration::from_millis(30) + tessera_net::GAME_CLIENT_ACK_DELAY + TICK,
        "rtt {rtt:?}"
    );
}
