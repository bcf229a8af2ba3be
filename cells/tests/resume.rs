//! A player whose gateway is lost: the avatar stays in the world for the
//! linger time, a new session presenting the resume credential takes it
//! back (the same entity, a whole view first), a wrong credential is
//! refused, a resume sent to a cell the avatar left follows it, and an
//! avatar nobody takes back leaves after the linger time.

use std::sync::Arc;

use tessera_cells::demo::{DemoConfig, DemoGame};
use tessera_cells::geometry::{CellId, Geometry, Layout, Vec2};
use tessera_cells::messages::{CellEnvelope, CellMessage, ClientOutput, ClientOutputKind, Output};
use tessera_cells::{ClientId, EntityId, ShardWorld, TickId, WorldConfig};
use tessera_schema::server::{self, ErrorCode, ServerMessage};

const OLD: ClientId = ClientId(7);
const NEW: ClientId = ClientId(0x0002_0000_0000_0001);
const KEY: u64 = 0x5eed_1234_abcd;
const LINGER: u64 = 64;

struct Fixture {
    world: ShardWorld<DemoGame>,
    player: EntityId,
    tick: u64,
    /// The client acknowledging snapshots (None: silent, its gateway died).
    acking: Option<ClientId>,
}

impl Fixture {
    /// Two cells side by side on one shard, a player in the first.
    fn new() -> Fixture {
        let layout = Arc::new(Layout::new(Geometry::new(0, 128.0, 2, 1)));
        let demo = DemoConfig {
            npc_speed: 0.0,
            ..DemoConfig::default()
        };
        let config = WorldConfig {
            player_linger_ticks: LINGER,
            ..WorldConfig::default()
        };
        let mut world = ShardWorld::new(DemoGame::new(demo), layout.clone(), config, 1);
        for c in layout.leaves() {
            world.add_cell(c);
        }
        let home = CellId::root(0, 0, 0);
        let _ = world.deliver(CellEnvelope {
            to: home,
            from: home,
            msg: CellMessage::Join {
                client: OLD,
                name: "ada".into(),
                pos: Vec2::new(100.0, 64.0),
                resume_key: KEY,
            },
        });
        let mut f = Fixture {
            world,
            player: EntityId(0),
            tick: 0,
            acking: Some(OLD),
        };
        let outs = f.run(2);
        let welcome = outs
            .iter()
            .find(|o| o.kind == ClientOutputKind::Welcome)
            .expect("a welcome");
        match server::decode(&welcome.bytes) {
            Ok(ServerMessage::Welcome(w)) => assert_eq!(w.resume_key, KEY),
            other => panic!("{other:?}"),
        }
        f.player = welcome.entity;
        f
    }

    /// Runs ticks; the acking client acknowledges every snapshot it gets.
    /// Returns every client output.
    fn run(&mut self, n: u64) -> Vec<ClientOutput> {
        let mut all = Vec::new();
        for _ in 0..n {
            self.tick += 1;
            self.world.tick(TickId(self.tick));
            let outs: Vec<_> = self.world.drain_outbox().collect();
            for out in outs {
                let Output::Client(o) = out else { continue };
                if o.kind == ClientOutputKind::Snapshot && Some(o.client) == self.acking {
                    let _ = self.world.deliver(CellEnvelope {
                        to: o.cell,
                        from: o.cell,
                        msg: CellMessage::Ack {
                            client: o.client,
                            entity: o.entity,
                            tick: TickId(self.tick),
                            hops: 0,
                            after: TickId(0),
                        },
                    });
                }
                all.push(o);
            }
        }
        all
    }

    fn resume(&mut self, to: CellId, client: ClientId, key: u64) {
        let _ = self.world.deliver(CellEnvelope {
            to,
            from: to,
            msg: CellMessage::Resume {
                client,
                entity: self.player,
                key,
                hops: 0,
                after: TickId(0),
            },
        });
    }

    fn controller(&self) -> Option<ClientId> {
        self.world
            .cells()
            .flat_map(|c| c.entities().iter())
            .find(|e| e.id == self.player)
            .and_then(|e| e.client)
    }

    fn players(&self) -> usize {
        self.world.totals().players
    }
}

#[test]
fn a_new_session_with_the_credential_takes_the_avatar_back_once() {
    let mut f = Fixture::new();
    f.run(10);
    // The gateway dies: nothing heard from the old client any more.
    f.acking = None;
    f.run(5);
    let home = CellId::root(0, 0, 0);

    f.resume(home, NEW, KEY ^ 1);
    let outs = f.run(1);
    let refused = outs
        .iter()
        .find(|o| o.client == NEW)
        .expect("an answer to the wrong key");
    assert_eq!(refused.kind, ClientOutputKind::Refused);
    assert!(matches!(
        server::decode(&refused.bytes),
        Ok(ServerMessage::Error {
            code: ErrorCode::ResumeRefused,
            ..
        })
    ));
    assert_eq!(f.controller(), Some(OLD), "a wrong key changes nothing");

    f.resume(home, NEW, KEY);
    f.acking = Some(NEW);
    let outs = f.run(3);
    let welcome = outs
        .iter()
        .find(|o| o.client == NEW && o.kind == ClientOutputKind::Welcome)
        .expect("a welcome for the new session");
    assert_eq!(welcome.entity, f.player, "the same avatar, not a new one");
    match server::decode(&welcome.bytes) {
        Ok(ServerMessage::Welcome(w)) => {
            assert_eq!(w.entity, f.player.0);
            assert_eq!(w.resume_key, KEY, "the credential stays valid");
        }
        other => panic!("{other:?}"),
    }
    let first = outs
        .iter()
        .find(|o| o.client == NEW && o.kind == ClientOutputKind::Snapshot)
        .expect("snapshots for the new session");
    match server::decode(&first.bytes) {
        Ok(ServerMessage::Snapshot(s)) => assert_eq!(s.baseline_tick, 0, "a whole view first"),
        other => panic!("{other:?}"),
    }
    assert!(
        outs.iter()
            .all(|o| o.client != OLD || o.tick.0 < welcome.tick.0),
        "nothing for the old session after the resume"
    );
    assert_eq!(f.controller(), Some(NEW));
    assert_eq!(f.players(), 1, "no duplicate");
    let c = f.world.totals().counters;
    assert_eq!((c.resumes, c.resumes_refused), (1, 1));

    // The old session's last words (a leave from a gateway that drained)
    // do not remove the avatar any more.
    let _ = f.world.deliver(CellEnvelope {
        to: home,
        from: home,
        msg: CellMessage::Leave {
            client: OLD,
            entity: f.player,
            hops: 0,
            after: TickId(0),
        },
    });
    f.run(LINGER * 3);
    assert_eq!(f.controller(), Some(NEW), "kept while its client acks");
}

#[test]
fn a_resume_follows_an_avatar_that_moved_to_another_cell() {
    let mut f = Fixture::new();
    f.acking = None;
    // The avatar walked into the second cell after its client last saw it.
    let home = CellId::root(0, 0, 0);
    let player = f.player;
    if let Some(e) = f
        .world
        .cell_mut(home)
        .unwrap()
        .entities_mut()
        .get_mut(player)
    {
        e.pos = Vec2::new(140.0, 64.0);
    }
    f.run(3);
    let there = CellId::root(0, 1, 0);
    assert!(f.world.cell(there).unwrap().entities().contains(player));
    f.resume(home, NEW, KEY);
    f.acking = Some(NEW);
    let outs = f.run(4);
    let welcome = outs
        .iter()
        .find(|o| o.client == NEW && o.kind == ClientOutputKind::Welcome)
        .expect("the resume followed the avatar");
    assert_eq!((welcome.entity, welcome.cell), (player, there));
    assert_eq!(f.controller(), Some(NEW));
}

#[test]
fn an_avatar_never_taken_back_leaves_after_the_linger_time() {
    let mut f = Fixture::new();
    f.run(20);
    assert_eq!(f.players(), 1);
    f.acking = None;
    // Within the linger time (and the check's period) it waits.
    f.run(LINGER - 8);
    assert_eq!(f.players(), 1, "still waiting for a resume");
    f.run(8 + 16 + 1);
    assert_eq!(f.players(), 0, "gone once its client stayed silent");
    let c = f.world.totals().counters;
    assert_eq!(c.players_lingered_out, 1);
    // A late resume is refused (after waiting for the avatar a while).
    f.resume(CellId::root(0, 0, 0), NEW, KEY);
    let outs = f.run(WorldConfig::default().orphan_ticks + 2);
    assert!(outs
        .iter()
        .any(|o| o.client == NEW && o.kind == ClientOutputKind::Refused));
}
