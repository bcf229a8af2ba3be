//! The gateway's per-session input limit: a player sending an input and an
//! ack every tick loses nothing; a session flooding pings has the excess
//! dropped and counted, then is closed with `disconnect::FLOODING`.

use std::sync::Arc;

use tessera_cells::demo::{DemoConfig, DemoGame};
use tessera_cells::geometry::{Geometry, Layout};
use tessera_cells::node::{ConnectionKey, InputLimit, NodeCore, NodeOutput};
use tessera_cells::{Registry, ShardRef, ShardWorld, TickId, WorldConfig};
use tessera_schema::client::{self, ClientMessage, InputCmd};
use tessera_schema::flatbuffers::FlatBufferBuilder;
use tessera_schema::protocol::disconnect;

const HZ: u32 = 20;

fn core() -> NodeCore<DemoGame> {
    let me = ShardRef::local(0);
    let layout = Arc::new(Layout::new(Geometry::new(0, 128.0, 2, 2)));
    let owners = layout.leaves().into_iter().map(|c| (c, me)).collect();
    let registry = Arc::new(Registry::new(layout.clone(), &owners).unwrap());
    let world = ShardWorld::new(
        DemoGame::new(DemoConfig::default()),
        layout,
        WorldConfig::default(),
        1,
    );
    let mut core = NodeCore::new(me, world, registry);
    core.set_input_limit(
        Some(InputLimit {
            per_second: 60,
            burst_seconds: 2,
        }),
        HZ,
    );
    core
}

/// Runs `seconds` of ticks; each tick `per_tick` frames from `connection`
/// (an input and an ack alternating, or pings). Returns the disconnect
/// code the core asked for, if any, and at which tick.
fn play(
    core: &mut NodeCore<DemoGame>,
    connection: ConnectionKey,
    seconds: u64,
    per_tick: usize,
    pings: bool,
) -> Option<(u16, u64)> {
    let mut fbb = FlatBufferBuilder::with_capacity(256);
    core.handle_connected(connection);
    let join = ClientMessage::Join {
        name: "ada".into(),
        token: Vec::new(),
    };
    core.handle_client_frame(connection, client::encode(&mut fbb, &join));
    let mut closed = None;
    for tick in 1..=seconds * u64::from(HZ) {
        for i in 0..per_tick {
            let msg = if pings {
                ClientMessage::Ping {
                    client_time_us: tick,
                }
            } else if i % 2 == 0 {
                ClientMessage::Input(InputCmd {
                    input_seq: tick as u32,
                    client_tick: tick,
                    movement: [1.0, 0.0],
                    heading: 0.0,
                    actions: Vec::new(),
                })
            } else {
                ClientMessage::Ack {
                    snapshot_tick: tick.saturating_sub(1),
                }
            };
            core.handle_client_frame(connection, client::encode(&mut fbb, &msg));
        }
        core.tick(TickId(tick));
        while let Some(out) = core.poll_output() {
            match out {
                NodeOutput::Disconnect { code, .. } if closed.is_none() => {
                    closed = Some((code, tick));
                }
                NodeOutput::Shard { msg, .. } => core.handle_message(msg),
                _ => {}
            }
        }
    }
    closed
}

#[test]
fn a_player_at_its_tick_rate_loses_nothing() {
    let mut core = core();
    let closed = play(&mut core, ConnectionKey(1), 10, 2, false);
    assert_eq!(closed, None);
    let c = core.sessions().counters();
    assert_eq!(c.inputs_rate_limited, 0, "{c:?}");
    assert_eq!(c.inputs + c.acks, 10 * u64::from(HZ) * 2 - c.not_joined);
}

#[test]
fn a_flood_is_cut_to_the_limit_then_closed() {
    let mut core = core();
    // 400 pings a second against a limit of 60: the 120 of the burst pass,
    // then about 60 a second; 60 drops within a second close it.
    let closed = play(&mut core, ConnectionKey(2), 5, 20, true);
    let (code, tick) = closed.expect("closed for flooding");
    assert_eq!(code, disconnect::FLOODING);
    assert!(tick <= 2 * u64::from(HZ), "closed at tick {tick}");
    let c = core.sessions().counters();
    assert!(c.pings >= 120 && c.pings < 200, "{c:?}");
    assert!(c.inputs_rate_limited >= 60, "{c:?}");
    assert_eq!(c.closed_for_flooding, 1, "{c:?}");
}
