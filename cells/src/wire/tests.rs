//! Round trips of every message through its frame, on states a real demo
//! world produced, and refusal (never a panic) of damaged frames.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use tessera_schema::client::{ActionCmd, InputCmd};

use super::cell_out;
use super::*;
use crate::cell::{CellState, Envelope};
use crate::control::{AbortReason, CellLoad, HandoverId, LoadReport, Order, PeerMsg, Report};
use crate::demo::{DemoConfig, DemoGame};
use crate::geometry::{CellId, Geometry, Layout, Vec2};
use crate::ids::{ClientId, EntityId, TickId};
use crate::messages::{CellEnvelope, CellMessage, Output};
use crate::node::ShardMsg;
use crate::registry::{Registry, ShardRef};
use crate::rng::Rng;
use crate::world::{ShardWorld, WorldConfig};

const A: ShardRef = ShardRef { node: 1, shard: 0 };
const B: ShardRef = ShardRef { node: 2, shard: 1 };

fn layout() -> Arc<Layout> {
    Arc::new(Layout::new(Geometry::new(0, 128.0, 2, 2)))
}

/// A demo world owning the left column of a 2x2 grid, with NPCs and
/// fighting players walking around, after `ticks` ticks; returns it and
/// every message it sent to the right column meanwhile.
fn busy_world(ticks: u64, seed: u64) -> (ShardWorld<DemoGame>, Vec<Envelope<DemoGame>>) {
    let mut world = ShardWorld::new(
        DemoGame::new(DemoConfig::default()),
        layout(),
        WorldConfig::default(),
        1,
    );
    world.add_cell(CellId::root(0, 0, 0));
    world.add_cell(CellId::root(0, 0, 1));
    let mut rng = Rng::new(seed);
    DemoGame::spawn_npcs(&mut world, 120, &mut rng);
    for i in 0..16u64 {
        let pos = Vec2::new(100.0 + (i % 4) as f32 * 8.0, 100.0 + (i / 4) as f32 * 20.0);
        let to = world.layout().leaf_at(pos).unwrap();
        let _ = world.deliver(CellEnvelope {
            to,
            from: to,
            msg: CellMessage::Join {
                client: ClientId(i + 1),
                name: format!("p{i}"),
                pos,
                resume_key: i + 7,
            },
        });
    }
    let mut sent = Vec::new();
    for t in 1..=ticks {
        let players: Vec<(CellId, EntityId, ClientId)> = world
            .cells()
            .flat_map(|c| {
                c.entities()
                    .iter()
                    .filter_map(move |e| e.client.map(|cl| (c.id(), e.id, cl)))
            })
            .collect();
        for (k, (cell, entity, client)) in players.iter().enumerate() {
            let actions = if t % 7 == 0 {
                vec![ActionCmd::Attack {
                    target: entity.0 ^ 1,
                }]
            } else {
                Vec::new()
            };
            let _ = world.deliver(CellEnvelope {
                to: *cell,
                from: *cell,
                msg: CellMessage::Input {
                    client: *client,
                    entity: *entity,
                    input: InputCmd {
                        input_seq: t as u32,
                        client_tick: t,
                        movement: [1.0, if k % 2 == 0 { 0.3 } else { -0.3 }],
                        heading: 0.5,
                        actions,
                    },
                    hops: 0,
                    after: TickId(0),
                },
            });
        }
        world.tick(TickId(t));
        for out in world.drain_outbox() {
            if let Output::Cell(env) = out {
                sent.push(env);
            }
        }
    }
    (world, sent)
}

fn round_trip(msgs: Vec<ShardMsg<DemoGame>>) -> Vec<(ShardHeader, ShardMsg<DemoGame>)> {
    let registry = test_registry();
    let mut w = BundleWriter::new(B);
    for m in &msgs {
        let h = ShardHeader::for_msg(m, A, TickId(9), &registry);
        w.push(h, m).unwrap();
    }
    let bytes = w.finish(|b| b.to_vec());
    let mut out = Vec::new();
    assert_eq!(decode_bundle::<DemoGame>(&bytes, &mut out), Ok(B));
    assert_eq!(out.len(), msgs.len());
    for (i, (h, _)) in out.iter().enumerate() {
        assert_eq!(h.seq, i as u64 + 1);
        assert_eq!(h.sender, A);
        assert_eq!(h.tick, TickId(9));
    }
    out
}

fn test_registry() -> Registry {
    let owners: BTreeMap<CellId, ShardRef> = layout()
        .leaves()
        .into_iter()
        .map(|c| (c, if c.cx == 0 { A } else { B }))
        .collect();
    Registry::new(layout(), &owners).unwrap()
}

#[test]
fn cell_messages_of_a_busy_world_cross_unchanged() {
    let (_, sent) = busy_world(80, 3);
    let kinds: std::collections::BTreeSet<&str> = sent.iter().map(|e| e.msg.kind()).collect();
    assert!(
        kinds.contains("ghost") && kinds.contains("transfer"),
        "{kinds:?}"
    );
    let msgs: Vec<ShardMsg<DemoGame>> = sent.iter().cloned().map(ShardMsg::Cell).collect();
    for ((h, got), want) in round_trip(msgs).into_iter().zip(sent) {
        assert_eq!(h.cell, want.to);
        match got {
            ShardMsg::Cell(env) => assert_eq!(env, want),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn whole_cell_states_and_diffs_cross_unchanged() {
    let (mut world, _) = busy_world(60, 5);
    let id = CellId::root(0, 0, 0);
    let base = world.cell(id).unwrap().state();
    assert!(base.entity_count() > 10);
    assert!(base.entities.iter().any(|e| e.view.is_some()));
    world.tick(TickId(61));
    world.tick(TickId(62));
    let diff = world.cell(id).unwrap().diff(&base);
    let full = world.cell(id).unwrap().state();
    let msgs = vec![
        ShardMsg::Peer(PeerMsg::PreCopy {
            id: HandoverId(7),
            cell: id,
            from: A,
            epoch: 3,
            state: Box::new(base.clone()),
        }),
        ShardMsg::Peer(PeerMsg::Diff {
            id: HandoverId(7),
            cell: id,
            diff: Box::new(diff),
        }),
    ];
    let out = round_trip(msgs);
    let mut rebuilt: CellState<DemoGame> = match &out[0].1 {
        ShardMsg::Peer(PeerMsg::PreCopy {
            state, epoch, from, ..
        }) => {
            assert_eq!((*epoch, *from, out[0].0.epoch), (3, A, 3));
            assert_eq!(**state, base);
            (**state).clone()
        }
        other => panic!("{other:?}"),
    };
    let (_, diff) = out.into_iter().nth(1).unwrap();
    match diff {
        ShardMsg::Peer(PeerMsg::Diff { diff, .. }) => rebuilt.apply(*diff),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        rebuilt, full,
        "pre-copy + diff across the wire rebuild the cell"
    );
}

/// A kept copy of a transfer out of one of `world`'s cells.
fn sent_transfer(world: &ShardWorld<DemoGame>) -> Option<crate::cell::Retained<DemoGame>> {
    let cell = world.cells().find(|c| !c.entities().is_empty())?;
    let e = cell.entities().iter().next()?.clone();
    Some(crate::cell::Retained {
        departed: TickId(60),
        to: CellId::root(0, 3, 3),
        sent_by: A,
        transfer: crate::messages::EntityTransfer {
            entity: e,
            jobs: Vec::new(),
            ghost_holders: vec![cell.id()],
            departed: TickId(60),
            resent: false,
        },
    })
}

/// An owner restarted under its id before its old process's cells were
/// promoted: the backup keeps the old replica (their only copy) and asks
/// the new process to start over, until the registry no longer gives the
/// old cells to that owner.
#[test]
fn a_restarted_owner_does_not_erase_the_replica_of_its_previous_process() {
    use crate::replica::{ReplicaCounters, ReplicaMsg, ReplicaStore, Replicator};
    let (mut world, _) = busy_world(60, 6);
    let mut store = ReplicaStore::<DemoGame>::new(B);
    let mut counters = ReplicaCounters::default();
    let mut old = Replicator::<DemoGame>::new(A, 1);
    old.set_backup(Some(B));
    old.set_incarnation(1);
    world.tick(TickId(61));
    let apply =
        |store: &mut ReplicaStore<DemoGame>,
         counters: &mut ReplicaCounters,
         round: ReplicaMsg<DemoGame>,
         still_owned: bool| { store.on_round(round, |_| still_owned, counters) };
    let (_, round) = old
        .round(&world, &Default::default(), TickId(61), true)
        .unwrap();
    assert!(matches!(
        apply(&mut store, &mut counters, round, true),
        Some(ReplicaMsg::Ack { .. })
    ));
    let held = store.summary();
    assert!(held[0].1 > 0, "cells replicated: {held:?}");
    // The new process owns nothing yet: its first (full, empty) round,
    // numbered from 1 and later in time, would erase the old cells.
    let empty = ShardWorld::new(
        DemoGame::new(DemoConfig::default()),
        layout(),
        WorldConfig::default(),
        1,
    );
    let mut new = Replicator::<DemoGame>::new(A, 1);
    new.set_backup(Some(B));
    new.set_incarnation(2);
    let (_, round) = new
        .round(&empty, &Default::default(), TickId(90), true)
        .unwrap();
    assert!(matches!(
        apply(&mut store, &mut counters, round, true),
        Some(ReplicaMsg::Resync { .. })
    ));
    assert_eq!(store.summary(), held, "the old process's replica stays");
    assert_eq!(counters.rounds_of_other_process, 1);
    // Once the registry gives those cells elsewhere (promoted here, or
    // recovered), the new process's full round is taken.
    new.on_resync(B);
    let (_, round) = new
        .round(&empty, &Default::default(), TickId(92), true)
        .unwrap();
    assert!(matches!(
        apply(&mut store, &mut counters, round, false),
        Some(ReplicaMsg::Ack { .. })
    ));
    assert_eq!(store.summary()[0].1, 0, "the new process's (empty) replica");
}

#[test]
fn replication_rounds_rebuild_the_cells_across_the_wire() {
    use crate::replica::{ReplicaCounters, ReplicaMsg, ReplicaStore, Replicator};
    let (mut world, _) = busy_world(60, 6);
    let mut rep = Replicator::<DemoGame>::new(A, 1);
    rep.set_backup(Some(B));
    rep.set_incarnation(0xABCD);
    let mut store = ReplicaStore::<DemoGame>::new(B);
    let mut counters = ReplicaCounters::default();
    for t in 61..66 {
        world.tick(TickId(t));
        // A transfer the shard passed on travels with every round.
        let passing: std::collections::VecDeque<_> = sent_transfer(&world).into_iter().collect();
        let (to, round) = rep
            .round(&world, &passing, TickId(t), false)
            .expect("a round every tick");
        assert_eq!(to, B);
        let mut out = round_trip(vec![ShardMsg::Replica(round)]);
        let Some((_, ShardMsg::Replica(round))) = out.pop() else {
            panic!("a round");
        };
        let ReplicaMsg::Round {
            full,
            incarnation,
            passing: got,
            ..
        } = &round
        else {
            panic!("a round: {round:?}");
        };
        let (full, incarnation) = (*full, *incarnation);
        assert_eq!(
            full,
            t == 61,
            "the first round is full, the next ones diffs"
        );
        assert!(
            *got == passing.iter().cloned().collect::<Vec<_>>(),
            "the kept transfers cross"
        );
        assert_eq!(incarnation, 0xABCD, "the process crosses");
        let ack = store.on_round(round, |_| true, &mut counters);
        let Some(ReplicaMsg::Ack { seq, .. }) = ack else {
            panic!("applied in order: {ack:?}");
        };
        rep.on_ack(B, seq);
    }
    assert_eq!(rep.acked(), 5);
    for cell in world.cells() {
        let p = store.take(A, cell.id()).expect("a replica of every cell");
        assert_eq!(p.tick, TickId(65));
        let mut want = cell.state();
        want.entities
            .iter_mut()
            .for_each(crate::replica::without_view_history);
        assert_eq!(
            p.state,
            want,
            "replica of {} equals the cell (views start again)",
            cell.id()
        );
    }
    // A gap (a lost round) asks for a full one.
    world.tick(TickId(66));
    let _lost = rep
        .round(&world, &Default::default(), TickId(66), false)
        .unwrap();
    world.tick(TickId(67));
    let (_, round) = rep
        .round(&world, &Default::default(), TickId(67), false)
        .unwrap();
    assert!(matches!(
        store.on_round(round, |_| true, &mut counters),
        Some(ReplicaMsg::Resync { .. })
    ));
    rep.on_resync(B);
    world.tick(TickId(68));
    let (_, round) = rep
        .round(&world, &Default::default(), TickId(68), false)
        .unwrap();
    assert!(matches!(round, ReplicaMsg::Round { full: true, .. }));
    let round_trip_small = round_trip(vec![
        ShardMsg::Replica(ReplicaMsg::Ack { from: B, seq: 3 }),
        ShardMsg::Replica(ReplicaMsg::Resync { from: B }),
        ShardMsg::Replica(ReplicaMsg::Restored {
            from: B,
            lost: A,
            cells: vec![CellId::root(0, 1, 1)],
            tick: TickId(70),
        }),
    ]);
    assert_eq!(round_trip_small.len(), 3);
    assert!(matches!(
        &round_trip_small[2].1,
        ShardMsg::Replica(ReplicaMsg::Restored { from, lost, cells, tick })
            if *from == B && *lost == A && cells == &vec![CellId::root(0, 1, 1)] && *tick == TickId(70)
    ));
}

#[test]
fn small_peer_messages_and_client_frames_cross() {
    let cell = CellId::root(0, 1, 1).child(2).unwrap();
    let out = round_trip(vec![
        ShardMsg::Peer(PeerMsg::Ready {
            id: HandoverId(1),
            cell,
        }),
        ShardMsg::Peer(PeerMsg::Refuse {
            id: HandoverId(2),
            cell,
            reason: AbortReason::Overloaded,
        }),
        ShardMsg::Peer(PeerMsg::Abort {
            id: HandoverId(3),
            cell,
            reason: AbortReason::Stale,
        }),
        ShardMsg::Client(crate::messages::ClientOutput {
            client: ClientId(5),
            entity: EntityId(6),
            cell,
            tick: TickId(7),
            kind: crate::messages::ClientOutputKind::Snapshot,
            bytes: vec![1, 2, 3],
        }),
    ]);
    assert!(
        matches!(out[0].1, ShardMsg::Peer(PeerMsg::Ready { id: HandoverId(1), cell: c }) if c == cell)
    );
    assert!(matches!(
        out[1].1,
        ShardMsg::Peer(PeerMsg::Refuse {
            reason: AbortReason::Overloaded,
            ..
        })
    ));
    assert!(matches!(
        out[2].1,
        ShardMsg::Peer(PeerMsg::Abort {
            reason: AbortReason::Stale,
            ..
        })
    ));
    match &out[3].1 {
        ShardMsg::Client(o) => assert_eq!(o.bytes, vec![1, 2, 3]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn resumes_and_refusals_cross_unchanged() {
    let cell = CellId::root(0, 1, 1);
    let resume = CellEnvelope {
        to: cell,
        from: cell,
        msg: CellMessage::Resume {
            client: ClientId(0x0003_0001_0000_0009),
            entity: EntityId(42),
            key: 0xdead_beef_cafe,
            hops: 2,
            after: TickId(77),
        },
    };
    let refused = crate::messages::ClientOutput {
        client: ClientId(5),
        entity: EntityId(42),
        cell,
        tick: TickId(8),
        kind: crate::messages::ClientOutputKind::Refused,
        bytes: vec![9, 9],
    };
    let out = round_trip(vec![
        ShardMsg::Cell(resume.clone()),
        ShardMsg::Client(refused.clone()),
    ]);
    match &out[0].1 {
        ShardMsg::Cell(env) => assert_eq!(env, &resume),
        other => panic!("{other:?}"),
    }
    match &out[1].1 {
        ShardMsg::Client(o) => assert_eq!(o, &refused),
        other => panic!("{other:?}"),
    }
}

#[test]
fn orders_never_travel_between_shards() {
    let mut w = BundleWriter::new(B);
    let order: ShardMsg<DemoGame> = ShardMsg::Order(Order::Split {
        op: 1,
        cell: CellId::root(0, 0, 0),
    });
    let h = ShardHeader::for_msg(&order, A, TickId(1), &test_registry());
    assert_eq!(w.push(h, &order), Err(EncodeError::Order));
    assert!(w.is_empty());
}

#[test]
fn a_handover_step_from_an_older_epoch_is_stale() {
    let mut registry = test_registry();
    let cell = CellId::root(0, 0, 0);
    let msg: ShardMsg<DemoGame> = ShardMsg::Peer(PeerMsg::Ready {
        id: HandoverId(1),
        cell,
    });
    let h = ShardHeader::for_msg(&msg, A, TickId(1), &registry);
    assert!(!h.is_stale(&msg, &registry));
    registry.reassign(cell, B, 2).unwrap();
    assert!(h.is_stale(&msg, &registry));
    // A cell message is routed on, never dropped for its epoch.
    let cell_msg: ShardMsg<DemoGame> = ShardMsg::Cell(CellEnvelope {
        to: cell,
        from: cell,
        msg: CellMessage::Leave {
            client: ClientId(1),
            entity: EntityId(1),
            hops: 0,
            after: TickId(0),
        },
    });
    assert!(!h.is_stale(&cell_msg, &registry));
}

fn control_round_trip(msg: ControlMsg) {
    let header = ShardHeader {
        cell: CellId::root(0, 1, 0),
        epoch: 4,
        seq: 11,
        sender: A,
        tick: TickId(12),
    };
    let bytes = encode_control(&header, &msg);
    assert_eq!(decode_control(&bytes), Ok((header, msg)));
}

#[test]
fn control_messages_cross_unchanged() {
    let cell = CellId::root(0, 1, 0);
    let mut registry = test_registry();
    let mut l = (**registry.layout()).clone();
    let kids = l.split(cell).unwrap();
    l.split(kids[3]).unwrap();
    let grand = kids[3].children().unwrap();
    let added: Vec<_> = kids[..3]
        .iter()
        .chain(grand.iter())
        .map(|c| (*c, crate::registry::Assignment { owner: B, epoch: 5 }))
        .collect();
    registry.relayout(Arc::new(l), &[cell], &added).unwrap();
    registry.set_backups([(A, B), (B, A)].into_iter().collect());
    registry.set_incarnation(3, 99);
    registry.set_incarnation(0, u64::MAX);
    registry.set_frozen_copy(
        kids[0],
        Some(crate::registry::FrozenCopy {
            handover: 1 << 40 | 7,
            source: A,
            holder: B,
            target: B,
        }),
    );
    let addr = "127.0.0.2:7000".parse().unwrap();
    for msg in [
        ControlMsg::Register(Registration {
            node: 3,
            shard: 1,
            shards: 2,
            role: NodeRole::Compute,
            incarnation: 99,
            cluster_addr: addr,
            game_addr: None,
        }),
        ControlMsg::Welcome {
            cluster_epoch: 2,
            tick_hz: 20,
            tick_origin_ms: 1_780_000_000_000,
        },
        ControlMsg::Directory(vec![NodeInfo {
            node: 3,
            shards: 2,
            role: NodeRole::Gateway,
            cluster_addr: addr,
            game_addr: Some("127.0.0.3:7777".parse().unwrap()),
            incarnation: 77,
        }]),
        ControlMsg::Registry(Arc::new(registry)),
        ControlMsg::Order(Order::Begin {
            id: HandoverId(1 << 40),
            cell,
            to: B,
            epoch: 3,
        }),
        ControlMsg::Order(Order::Commit {
            id: HandoverId(2),
            cell,
            epoch: 4,
        }),
        ControlMsg::Order(Order::Abort {
            id: HandoverId(2),
            cell,
            reason: AbortReason::Timeout,
        }),
        ControlMsg::Order(Order::Split { op: 5, cell }),
        ControlMsg::Order(Order::Merge {
            op: 6,
            parent: cell,
        }),
        ControlMsg::Report(Report::Frozen {
            id: HandoverId(2),
            cell,
            epoch: 3,
            tick: TickId(100),
            entities: 42,
            repeat: true,
        }),
        ControlMsg::Report(Report::Prepared {
            id: HandoverId(2),
            cell,
            repeat: false,
        }),
        ControlMsg::Report(Report::Activated {
            id: HandoverId(2),
            cell,
        }),
        ControlMsg::Report(Report::Released {
            id: HandoverId(2),
            cell,
            forwarded: 3,
        }),
        ControlMsg::Report(Report::Aborted {
            id: HandoverId(2),
            cell,
            reason: AbortReason::Superseded,
        }),
        ControlMsg::Report(Report::Split {
            op: 5,
            parent: cell,
        }),
        ControlMsg::Report(Report::Merged {
            op: 6,
            parent: cell,
        }),
        ControlMsg::Report(Report::Refused {
            op: 7,
            reason: "not a leaf".into(),
        }),
        ControlMsg::Report(Report::Load(LoadReport {
            tick_us_p99: 1234,
            budget_us: 50_000,
            cells: vec![CellLoad {
                cell,
                actors: 10,
                players: 3,
                pps: 60.0,
            }],
        })),
        ControlMsg::Heartbeat {
            tick: TickId(5),
            sessions: 6,
            entities: 7,
            seq: 8,
            draining: true,
        },
        ControlMsg::Report(Report::Durable {
            id: HandoverId(3),
            cell,
        }),
        ControlMsg::HeartbeatAck {
            seq: 8,
            lease_ms: 1000,
            draining: true,
        },
        ControlMsg::Order(Order::Reclaim {
            id: HandoverId(12),
            cell,
            epoch: 7,
            lost: B,
        }),
        ControlMsg::Order(Order::Promote {
            from: A,
            cells: vec![(cell, 4), (CellId::root(0, 3, 1), 9)],
            fallback: vec![cell],
        }),
        ControlMsg::Report(Report::Promoted {
            from: A,
            cells: vec![cell],
            missing: vec![CellId::root(0, 3, 1)],
            replica_tick: TickId(40),
            tick: TickId(52),
            entities: 17,
        }),
    ] {
        control_round_trip(msg);
    }
}

/// A valid bundle of every kind of message, to damage.
fn sample_bundle() -> Vec<u8> {
    let (world, sent) = busy_world(30, 9);
    let id = CellId::root(0, 0, 0);
    let mut msgs: Vec<ShardMsg<DemoGame>> = sent.into_iter().take(40).map(ShardMsg::Cell).collect();
    msgs.push(ShardMsg::Peer(PeerMsg::PreCopy {
        id: HandoverId(1),
        cell: id,
        from: A,
        epoch: 1,
        state: Box::new(world.cell(id).unwrap().state()),
    }));
    let mut rep = crate::replica::Replicator::<DemoGame>::new(A, 1);
    rep.set_backup(Some(B));
    let (_, round) = rep
        .round(&world, &Default::default(), TickId(31), false)
        .unwrap();
    msgs.push(ShardMsg::Replica(round));
    let registry = test_registry();
    let mut w = BundleWriter::new(B);
    for m in &msgs {
        w.push(ShardHeader::for_msg(m, A, TickId(1), &registry), m)
            .unwrap();
    }
    w.finish(|b| b.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn damaged_bundles_are_refused_or_decoded_never_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        thread_local!(static SAMPLE: Vec<u8> = sample_bundle());
        let mut bytes = SAMPLE.with(|s| s.clone());
        for (i, b) in flips {
            let i = i.index(bytes.len());
            bytes[i] ^= b | 1;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        let mut out = Vec::new();
        if decode_bundle::<DemoGame>(&bytes, &mut out).is_err() {
            prop_assert!(out.is_empty(), "all or nothing");
        }
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut out = Vec::new();
        let _ = decode_bundle::<DemoGame>(&bytes, &mut out);
        let _ = decode_control(&bytes);
    }

    #[test]
    fn damaged_control_frames_never_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let registry = test_registry();
        let header = ShardHeader { cell: CellId::root(0, 0, 0), epoch: 1, seq: 1, sender: A, tick: TickId(1) };
        let mut bytes = encode_control(&header, &ControlMsg::Registry(Arc::new(registry)));
        for (i, b) in flips {
            let i = i.index(bytes.len());
            bytes[i] ^= b | 1;
        }
        if let Ok((_, ControlMsg::Registry(r))) = decode_control(&bytes) {
            // Whatever survives is a consistent registry.
            for leaf in r.layout().leaves() {
                prop_assert!(r.get(leaf).is_some());
            }
        }
    }

    #[test]
    fn demo_components_and_intents_round_trip(
        health in any::<u16>(), dead in any::<bool>(), cooldown in any::<u64>(),
        wander in proptest::option::of((-1e6f32..1e6, -1e6f32..1e6)),
        home in (-1e6f32..1e6, -1e6f32..1e6), kills in any::<u32>(),
        attacker in any::<u64>(), target in any::<u64>(), damage in any::<u16>(),
    ) {
        use crate::demo::{DemoComponents, DemoIntent};
        use crate::GameLogic;
        let c = DemoComponents {
            health, dead, cooldown_until: cooldown,
            wander_to: wander.map(|(x, y)| Vec2::new(x, y)),
            home: Vec2::new(home.0, home.1), kills,
        };
        let mut bytes = Vec::new();
        DemoGame::encode_components(&c, &mut bytes);
        prop_assert_eq!(DemoGame::decode_components(&bytes), Some(c));
        prop_assert_eq!(DemoGame::decode_components(&bytes[..bytes.len() - 1]), None);
        let i = DemoIntent::Attack {
            attacker: EntityId(attacker),
            attacker_pos: Vec2::new(home.0, home.1),
            target: EntityId(target),
            damage,
        };
        bytes.clear();
        DemoGame::encode_intent(&i, &mut bytes);
        prop_assert_eq!(DemoGame::decode_intent(&bytes), Some(i));
        bytes.push(0);
        prop_assert_eq!(DemoGame::decode_intent(&bytes), None);
    }
}

#[test]
fn a_registry_that_claims_a_huge_world_is_refused_before_anything_is_built() {
    // 4096 x 4096 cells claimed, one assignment sent: refused on the counts,
    // without listing 16 M leaves.
    let mut fbb = tessera_schema::flatbuffers::FlatBufferBuilder::new();
    let cells = fbb.create_vector(&[tessera_schema::wire::CellAssignment::new(
        &cell_out(CellId::root(0, 0, 0)),
        &super::shard_out(A),
        1,
    )]);
    let split = fbb.create_vector::<tessera_schema::wire::CellId>(&[]);
    let rec = tessera_schema::wire::RegistryRec::create(
        &mut fbb,
        &tessera_schema::wire::RegistryRecArgs {
            version: 1,
            cluster_epoch: 1,
            geometry: Some(&tessera_schema::wire::GeometryRec::new(
                0, 128.0, 4096, 4096,
            )),
            split: Some(split),
            cells: Some(cells),
            backups: None,
            incarnations: None,
            frozen: None,
        },
    );
    let h = tessera_schema::wire::FrameHeader::new(
        &cell_out(CellId::root(0, 0, 0)),
        0,
        1,
        &super::shard_out(A),
        0,
    );
    let frame = tessera_schema::wire::ControlFrame::create(
        &mut fbb,
        &tessera_schema::wire::ControlFrameArgs {
            header: Some(&h),
            msg_type: tessera_schema::wire::ControlMsg::RegistryRec,
            msg: Some(rec.as_union_value()),
        },
    );
    fbb.finish(frame, None);
    assert!(matches!(
        decode_control(fbb.finished_data()),
        Err(tessera_schema::verify::FrameError::BadValue(_))
    ));
}

#[test]
fn a_frozen_copy_of_a_cell_the_registry_does_not_assign_is_refused() {
    use tessera_schema::wire;
    let frame = |frozen_cell: CellId| {
        let mut fbb = tessera_schema::flatbuffers::FlatBufferBuilder::new();
        let cells = fbb.create_vector(&[wire::CellAssignment::new(
            &cell_out(CellId::root(0, 0, 0)),
            &super::shard_out(A),
            1,
        )]);
        let split = fbb.create_vector::<wire::CellId>(&[]);
        let frozen = fbb.create_vector(&[wire::FrozenRec::new(
            &cell_out(frozen_cell),
            9,
            &super::shard_out(B),
            &super::shard_out(B),
            &super::shard_out(A),
        )]);
        let rec = wire::RegistryRec::create(
            &mut fbb,
            &wire::RegistryRecArgs {
                version: 1,
                cluster_epoch: 1,
                geometry: Some(&wire::GeometryRec::new(0, 128.0, 1, 1)),
                split: Some(split),
                cells: Some(cells),
                backups: None,
                incarnations: None,
                frozen: Some(frozen),
            },
        );
        let h = wire::FrameHeader::new(
            &cell_out(CellId::root(0, 0, 0)),
            0,
            1,
            &super::shard_out(A),
            0,
        );
        let frame = wire::ControlFrame::create(
            &mut fbb,
            &wire::ControlFrameArgs {
                header: Some(&h),
                msg_type: wire::ControlMsg::RegistryRec,
                msg: Some(rec.as_union_value()),
            },
        );
        fbb.finish(frame, None);
        fbb.finished_data().to_vec()
    };
    match decode_control(&frame(CellId::root(0, 0, 0))) {
        Ok((_, ControlMsg::Registry(r))) => {
            let f = r.frozen_copy(CellId::root(0, 0, 0)).expect("kept");
            assert_eq!((f.handover, f.source, f.holder), (9, B, B));
        }
        other => panic!("a valid record refused: {other:?}"),
    }
    assert!(matches!(
        decode_control(&frame(CellId::root(0, 3, 3))),
        Err(tessera_schema::verify::FrameError::BadValue(
            "registry.frozen"
        ))
    ));
}

#[test]
fn a_writer_keeps_numbering_after_a_large_bundle_releases_its_buffer() {
    let registry = test_registry();
    let cell = CellId::root(0, 1, 0);
    let big: ShardMsg<DemoGame> = ShardMsg::Client(crate::messages::ClientOutput {
        client: ClientId(1),
        entity: EntityId(2),
        cell,
        tick: TickId(3),
        kind: crate::messages::ClientOutputKind::Snapshot,
        bytes: vec![7; 2 << 20],
    });
    let small: ShardMsg<DemoGame> = ShardMsg::Peer(PeerMsg::Ready {
        id: HandoverId(9),
        cell,
    });
    let mut w = BundleWriter::new(B);
    let mut out = Vec::new();
    for (msg, seq) in [(&big, 1), (&small, 2), (&small, 3)] {
        w.push(ShardHeader::for_msg(msg, A, TickId(1), &registry), msg)
            .unwrap();
        let bytes = w.finish(|b| b.to_vec());
        out.clear();
        assert_eq!(decode_bundle::<DemoGame>(&bytes, &mut out), Ok(B));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0.seq, seq);
    }
    match &out[0].1 {
        ShardMsg::Peer(PeerMsg::Ready { id, .. }) => assert_eq!(*id, HandoverId(9)),
        other => panic!("{other:?}"),
    }
}
