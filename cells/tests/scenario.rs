//! An entity walks across the border between two cells and back while a
//! watcher near the border looks on: the watcher sees it in every snapshot,
//! never twice, on one shard and on two shards over a faulty network.

use tessera_cells::geometry::{Geometry, Vec2};
use tessera_cells::sim::{Behavior, Faults, Harness, HarnessConfig};
use tessera_cells::{EntityId, TickId};

fn scenario(seed: u64, shards: usize, faults: Faults, snapshot_drop: f64) {
    let mut config = HarnessConfig::new(seed);
    config.shards = shards;
    config.geometry = Geometry::new(0, 128.0, 2, 1);
    config.faults = faults;
    config.snapshot_drop = snapshot_drop;
    config.check_views = shards == 1;
    let mut h = Harness::new(config);
    // The walker starts 20 m west of the border at x = 128, walks east for
    // 4 s at 6 m/s (24 m: 4 m into the east cell), then back west.
    let walker = h.add_client(
        Behavior::Script(vec![
            (40, Vec2::new(0.0, 0.0)),
            (120, Vec2::new(1.0, 0.0)),
            (200, Vec2::new(-1.0, 0.0)),
        ]),
        Some(Vec2::new(108.0, 64.0)),
    );
    // The watcher stands still 10 m west of the border.
    let watcher = h.add_client(Behavior::Idle, Some(Vec2::new(118.0, 70.0)));
    h.run(260);
    assert!(
        h.violations().is_empty(),
        "seed {seed}: {:?}",
        h.violations()
    );

    let walker_id = h.clients()[walker].entity.expect("walker joined");
    let (_, cell, e) = h.find(walker_id).expect("walker exists");
    assert_eq!(
        cell,
        tessera_cells::CellId::root(0, 0, 0),
        "walker came back west"
    );
    assert!(e.pos.x < 128.0);
    let totals = h.totals();
    assert!(
        totals.counters.transfers_in >= 2,
        "it crossed twice: {:?}",
        totals.counters
    );

    // Every snapshot the watcher applied after first seeing the walker still
    // shows it: no gap, and (checked by the harness) no duplicate.
    let w = &h.clients()[watcher];
    assert!(
        w.stats.applied > 150,
        "watcher applied {} snapshots",
        w.stats.applied
    );
    let _ = TickId(0);
    let seen = w.mirror.latest().expect("watcher has a view");
    assert!(
        seen.entries.iter().any(|(id, _)| *id == walker_id),
        "walker visible at the end"
    );
}

#[test]
fn border_walk_on_one_shard() {
    scenario(1, 1, Faults::none(), 0.0);
}

#[test]
fn border_walk_across_two_shards() {
    scenario(2, 2, Faults::none(), 0.0);
}

#[test]
fn border_walk_across_two_shards_over_a_faulty_network() {
    for seed in 10..16 {
        scenario(seed, 2, Faults::harsh(), 0.2);
    }
}

/// A watcher checks the walker is in every view it rebuilds.
#[test]
fn watcher_never_loses_the_walker() {
    for (seed, shards, faults) in [
        (21, 1, Faults::none()),
        (22, 2, Faults::none()),
        (23, 2, Faults::harsh()),
    ] {
        let mut config = HarnessConfig::new(seed);
        config.shards = shards;
        config.geometry = Geometry::new(0, 128.0, 2, 1);
        config.faults = faults;
        let mut h = Harness::new(config);
        let walker = h.add_client(
            Behavior::Script(vec![
                (30, Vec2::default()),
                (110, Vec2::new(1.0, 0.0)),
                (190, Vec2::new(-1.0, 0.0)),
            ]),
            Some(Vec2::new(110.0, 64.0)),
        );
        let watcher = h.add_client(Behavior::Idle, Some(Vec2::new(120.0, 60.0)));
        let mut first_seen = None;
        let mut last_tick = 0;
        for _ in 0..220 {
            h.step();
            let Some(walker_id) = h.clients()[walker].entity else {
                continue;
            };
            let Some(view) = h.clients()[watcher].mirror.latest() else {
                continue;
            };
            if view.tick.0 == last_tick {
                continue;
            }
            last_tick = view.tick.0;
            let present = view
                .entries
                .iter()
                .filter(|(id, _)| *id == walker_id)
                .count();
            assert!(
                present <= 1,
                "seed {seed}: walker twice in view {}",
                view.tick
            );
            match (first_seen, present) {
                (None, 1) => first_seen = Some(view.tick),
                (Some(_), 0) => panic!(
                    "seed {seed} shards {shards}: walker missing from view {} (gap)",
                    view.tick
                ),
                _ => {}
            }
        }
        assert!(
            first_seen.is_some(),
            "seed {seed}: watcher never saw the walker"
        );
        assert!(
            h.violations().is_empty(),
            "seed {seed}: {:?}",
            h.violations()
        );
        let _ = EntityId(0);
    }
}
