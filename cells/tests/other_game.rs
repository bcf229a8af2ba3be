//! The node core is not tied to the demo game: a tiny game of its own (every
//! player carries a step counter; nothing else) runs through a real
//! `NodeCore`: a session opens, its client joins with an encoded frame, is
//! welcomed, walks, and its snapshots show it moving.

use std::sync::Arc;

use tessera_cells::entity::{Entity, EntityStore};
use tessera_cells::game::{GameContext, GameLogic};
use tessera_cells::geometry::{Geometry, Layout, Rect, Vec2};
use tessera_cells::node::{ConnectionKey, NodeCore, NodeOutput};
use tessera_cells::{EntityId, Registry, ShardRef, ShardWorld, TickId, WorldConfig};
use tessera_schema::client::{self, ClientMessage, InputCmd};
use tessera_schema::flatbuffers::FlatBufferBuilder;
use tessera_schema::protocol::Channel;
use tessera_schema::server::{self, ServerMessage};

/// Counts the inputs each player applied; moves at 4 m/s.
struct StepGame;

impl GameLogic for StepGame {
    type Components = u32;
    type Intent = EntityId;

    fn spawn_point(&self, _name: &str, _join_serial: u64, world: Rect) -> Vec2 {
        world.center()
    }

    fn new_player(&mut self, _cx: &mut GameContext<'_>, _name: &str) -> u32 {
        0
    }

    fn apply_input(
        &mut self,
        _cx: &mut GameContext<'_>,
        entity: &mut Entity<u32>,
        input: &InputCmd,
        _intents: &mut Vec<EntityId>,
    ) {
        entity.game += 1;
        entity.vel = Vec2::new(input.movement[0] * 4.0, input.movement[1] * 4.0);
    }

    fn simulate(
        &mut self,
        _cx: &mut GameContext<'_>,
        _entities: &mut EntityStore<u32>,
        _intents: &mut Vec<EntityId>,
    ) {
    }

    fn run_job(&mut self, _cx: &mut GameContext<'_>, _entity: &mut Entity<u32>, _kind: u32) {}

    fn intent_target(intent: &EntityId) -> EntityId {
        *intent
    }

    fn apply_intent(
        &mut self,
        _cx: &mut GameContext<'_>,
        _target: &mut Entity<u32>,
        _intent: &EntityId,
    ) {
    }

    fn stats(steps: &u32) -> (u16, u8) {
        ((*steps).min(u32::from(u16::MAX)) as u16, 0)
    }

    fn encode_components(steps: &u32, out: &mut Vec<u8>) {
        out.extend_from_slice(&steps.to_le_bytes());
    }

    fn decode_components(bytes: &[u8]) -> Option<u32> {
        Some(u32::from_le_bytes(bytes.try_into().ok()?))
    }

    fn encode_intent(target: &EntityId, out: &mut Vec<u8>) {
        out.extend_from_slice(&target.0.to_le_bytes());
    }

    fn decode_intent(bytes: &[u8]) -> Option<EntityId> {
        Some(EntityId(u64::from_le_bytes(bytes.try_into().ok()?)))
    }
}

/// Runs the core's outputs: messages to itself come back in, client frames
/// are returned.
fn outputs(core: &mut NodeCore<StepGame>) -> Vec<(Channel, Vec<u8>)> {
    let mut frames = Vec::new();
    while let Some(out) = core.poll_output() {
        match out {
            NodeOutput::Client { channel, bytes, .. } => frames.push((channel, bytes)),
            NodeOutput::Shard { to, msg } => {
                assert_eq!(to, core.me(), "one shard: everything stays here");
                core.handle_message(msg);
            }
            NodeOutput::Disconnect { .. } | NodeOutput::Coordinator(_) => {}
        }
    }
    frames
}

#[test]
fn a_game_of_its_own_runs_through_the_node_core() {
    let me = ShardRef::local(0);
    let layout = Arc::new(Layout::new(Geometry::new(0, 128.0, 2, 2)));
    let owners = layout.leaves().into_iter().map(|c| (c, me)).collect();
    let registry = Arc::new(Registry::new(layout.clone(), &owners).unwrap());
    let world = ShardWorld::new(StepGame, layout, WorldConfig::default(), 1);
    let mut core = NodeCore::new(me, world, registry);
    let mut fbb = FlatBufferBuilder::with_capacity(256);

    let connection = ConnectionKey(7);
    core.handle_connected(connection);
    let join = ClientMessage::Join {
        name: "ada".into(),
        token: Vec::new(),
    };
    core.handle_client_frame(connection, client::encode(&mut fbb, &join));
    let mut entity = None;
    let mut acked = Vec::new();
    for tick in 1..=40u64 {
        if let Some(_e) = entity {
            let input = ClientMessage::Input(InputCmd {
                input_seq: tick as u32,
                client_tick: tick,
                movement: [1.0, 0.0],
                heading: 0.0,
                actions: Vec::new(),
            });
            core.handle_client_frame(connection, client::encode(&mut fbb, &input));
        }
        core.tick(TickId(tick));
        for (channel, bytes) in outputs(&mut core) {
            match server::decode(&bytes).expect("valid server frame") {
                ServerMessage::Welcome(w) => {
                    assert_eq!(channel, Channel::Reliable);
                    entity = Some(EntityId(w.entity));
                }
                ServerMessage::Snapshot(s) => {
                    assert_eq!(channel, Channel::Snapshots);
                    let ack = ClientMessage::Ack {
                        snapshot_tick: s.tick,
                    };
                    core.handle_client_frame(connection, client::encode(&mut fbb, &ack));
                    acked.push(s.last_input_seq);
                }
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }
    let entity = entity.expect("welcomed");
    let steps = core
        .world()
        .cells()
        .find_map(|c| c.entities().get(entity).map(|e| e.game))
        .expect("the avatar lives in a cell");
    assert!(steps >= 30, "inputs applied by the game: {steps}");
    assert_eq!(core.sessions().counters().welcomes, 1);
    let (x0, x1) = (world_center_x(), avatar_x(&core, entity));
    assert!(x1 > x0 + 4.0, "the avatar walked east: {x0} -> {x1}");
    assert!(
        acked.len() >= 30 && acked.windows(2).all(|w| w[0] <= w[1]) && acked[acked.len() - 1] >= 30,
        "snapshots acknowledge the inputs in order: {acked:?}"
    );
}

fn world_center_x() -> f32 {
    128.0
}

fn avatar_x(core: &NodeCore<StepGame>, entity: EntityId) -> f32 {
    core.world()
        .cells()
        .find_map(|c| c.entities().get(entity).map(|e| e.pos.x))
        .expect("the avatar lives in a cell")
}
