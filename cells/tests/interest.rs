//! Interest beyond distance: an avatar that locked a target keeps seeing it
//! wherever it goes (far beyond the view radius, into cells that are not
//! neighbours), through a subscription at the target's owner; the target
//! leaves the view once the interest ends.

use std::sync::Arc;

use tessera_cells::demo::{DemoConfig, DemoGame};
use tessera_cells::geometry::{CellId, Geometry, Layout, Vec2};
use tessera_cells::messages::{CellEnvelope, CellMessage, Output};
use tessera_cells::view::ClientMirror;
use tessera_cells::{ClientId, EntityId, ShardWorld, TickId, WorldConfig};
use tessera_schema::server::{self, ServerMessage};

struct Fixture {
    world: ShardWorld<DemoGame>,
    mirror: ClientMirror,
    player: EntityId,
    target: EntityId,
    tick: u64,
}

const CLIENT: ClientId = ClientId(7);

impl Fixture {
    /// A 4x1 world on one shard; the player at x=100 in cell (0,0), a still
    /// NPC 40 m away at x=140 in cell (1,0) (a ghost of it in (0,0), in
    /// view).
    fn new() -> Fixture {
        let layout = Arc::new(Layout::new(Geometry::new(0, 128.0, 4, 1)));
        let demo = DemoConfig {
            npc_speed: 0.0,
            ..DemoConfig::default()
        };
        let mut world = ShardWorld::new(
            DemoGame::new(demo),
            layout.clone(),
            WorldConfig::default(),
            1,
        );
        for c in layout.leaves() {
            world.add_cell(c);
        }
        let target = world.allocate_id();
        let npc = world.game().npc(target, Vec2::new(140.0, 64.0));
        assert!(world.spawn(npc));
        let home = CellId::root(0, 0, 0);
        let _ = world.deliver(CellEnvelope {
            to: home,
            from: home,
            msg: CellMessage::Join {
                client: CLIENT,
                name: "ada".into(),
                pos: Vec2::new(100.0, 64.0),
                resume_key: 0,
            },
        });
        let mut f = Fixture {
            world,
            mirror: ClientMirror::new(64),
            player: EntityId(0),
            target,
            tick: 0,
        };
        f.run(3);
        f.player = f
            .world
            .cell(home)
            .unwrap()
            .entities()
            .iter()
            .find(|e| e.client == Some(CLIENT))
            .expect("the player joined")
            .id;
        f
    }

    /// Runs ticks; the client applies and acknowledges every snapshot.
    fn run(&mut self, n: u64) {
        for _ in 0..n {
            self.tick += 1;
            self.world.tick(TickId(self.tick));
            let outs: Vec<_> = self.world.drain_outbox().collect();
            for out in outs {
                if let Output::Client(o) = out {
                    if let Ok(ServerMessage::Snapshot(s)) = server::decode(&o.bytes) {
                        let tick = s.tick;
                        self.mirror.apply(&s).expect("snapshots apply");
                        let _ = self.world.deliver(CellEnvelope {
                            to: o.cell,
                            from: o.cell,
                            msg: CellMessage::Ack {
                                client: CLIENT,
                                entity: o.entity,
                                tick: TickId(tick),
                                hops: 0,
                                after: TickId(0),
                            },
                        });
                    }
                }
            }
        }
    }

    fn sees_target(&self) -> bool {
        self.mirror
            .latest()
            .is_some_and(|v| v.entries.iter().any(|(id, _)| *id == self.target))
    }

    /// Puts the target at `pos` (its cell transfers it if `pos` is
    /// elsewhere).
    fn move_target(&mut self, pos: Vec2) {
        let target = self.target;
        for c in self.world.cell_ids() {
            if let Some(e) = self
                .world
                .cell_mut(c)
                .unwrap()
                .entities_mut()
                .get_mut(target)
            {
                e.pos = pos;
            }
        }
    }

    fn owner_of_target(&self) -> CellId {
        self.world
            .cells()
            .find(|c| c.entities().contains(self.target))
            .expect("owned")
            .id()
    }
}

fn lock(f: &mut Fixture, ticks: u64) {
    let (player, target, until) = (f.player, f.target, TickId(f.tick + ticks));
    f.world
        .cell_mut(CellId::root(0, 0, 0))
        .unwrap()
        .entities_mut()
        .get_mut(player)
        .unwrap()
        .keep_in_view(target, until);
}

#[test]
fn a_locked_target_stays_in_view_wherever_it_goes_until_the_lock_ends() {
    let mut f = Fixture::new();
    assert!(f.sees_target(), "40 m away: in view by distance");
    lock(&mut f, 100);
    f.run(10);
    // 150 m away, same cell: only the subscription keeps it.
    f.move_target(Vec2::new(250.0, 64.0));
    f.run(5);
    assert!(f.sees_target(), "the locked target vanished at 150 m");
    // Into a cell that is not a neighbour of the player's: the transfer
    // carries the subscription, the new owner pushes.
    f.move_target(Vec2::new(400.0, 64.0));
    f.run(10);
    assert_eq!(f.owner_of_target(), CellId::root(0, 3, 0));
    assert!(f.sees_target(), "the locked target vanished in a far cell");
    let pos = f
        .mirror
        .latest()
        .unwrap()
        .entries
        .iter()
        .find(|(id, _)| *id == f.target)
        .unwrap()
        .1
        .position();
    assert!((pos.x - 400.0).abs() < 1.0, "stale state: {pos:?}");
    let subs: u64 = f.world.cells().map(|c| c.counters().subscriptions).sum();
    assert!(subs >= 2, "subscriptions taken: {subs}");
    // The lock ends (100 ticks, plus the subscription's margin): it goes.
    f.run(100);
    assert!(!f.sees_target(), "the target stayed after the lock ended");
}

#[test]
fn without_a_lock_a_far_target_leaves_the_view() {
    let mut f = Fixture::new();
    assert!(f.sees_target());
    f.move_target(Vec2::new(250.0, 64.0));
    f.run(5);
    assert!(!f.sees_target(), "150 m away without a lock: out of view");
}
