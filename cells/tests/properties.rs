//! Property tests over many seeds: random walks of thousands of entities
//! across many cells.

use tessera_cells::geometry::Geometry;
use tessera_cells::sim::{Faults, Harness, HarnessConfig};

fn world(seed: u64, shards: usize, npcs: usize, clients: usize) -> HarnessConfig {
    let mut c = HarnessConfig::new(seed);
    c.shards = shards;
    c.geometry = Geometry::new(0, 128.0, 4, 4);
    c.npcs = npcs;
    c.clients = clients;
    c
}

/// One shard, 16 cells, 2,000 NPCs and 60 players: every tick each entity is
/// owned by exactly one cell, each view equals the brute-force hysteresis
/// computation, and every rebuilt client view equals the server's.
#[test]
fn views_match_brute_force_and_snapshots_rebuild_them() {
    for seed in 1..=4u64 {
        let mut c = world(seed, 1, 2_000, 60);
        c.check_views = true;
        c.snapshot_drop = 0.25;
        c.ack_drop = 0.25;
        let mut h = Harness::new(c);
        h.run(120);
        assert!(
            h.violations().is_empty(),
            "seed {seed}: {:#?}",
            h.violations()
        );
        let applied: u64 = h.clients().iter().map(|c| c.stats.applied).sum();
        let dropped: u64 = h.clients().iter().map(|c| c.stats.dropped).sum();
        assert!(
            applied > 60 * 60 && dropped > 60 * 10,
            "applied {applied}, dropped {dropped}"
        );
        assert!(
            h.totals().counters.transfers_in > 50,
            "entities crossed borders"
        );
    }
}

/// A crowded view: the cap keeps the nearest entities and the byte cap
/// defers changes, yet rebuilt views still match the server's.
#[test]
fn crowded_views_are_capped_and_still_consistent() {
    let mut c = world(7, 1, 3_000, 20);
    c.geometry = Geometry::new(0, 128.0, 2, 2);
    c.check_views = true;
    c.world.view.max_entities = 64;
    c.snapshot_drop = 0.1;
    let mut h = Harness::new(c);
    h.run(80);
    assert!(h.violations().is_empty(), "{:#?}", h.violations());
    let t = h.world(0).totals();
    assert!(
        t.counters.snapshot_deferred > 0,
        "the byte cap was exercised"
    );
}

/// Four shards over a network with 20% loss, duplication and reordering:
/// ownership holds every tick, rebuilt views match, and once the network
/// settles no input was lost.
#[test]
fn multi_shard_random_walks_over_a_harsh_network() {
    for seed in 100..=105u64 {
        let mut c = world(seed, 4, 1_000, 40);
        c.faults = Faults::harsh();
        // This network's tail (repeated losses, 3 ticks each, on two hops)
        // is far longer than a real one's: let held inputs wait for it.
        c.world.input_reorder_ticks = 60;
        c.snapshot_drop = 0.2;
        c.ack_drop = 0.2;
        let mut h = Harness::new(c);
        h.run(150);
        h.settle(100);
        assert!(
            h.violations().is_empty(),
            "seed {seed}: {:#?}",
            h.violations()
        );
        let t = h.totals();
        assert!(
            t.counters.transfers_in > 20,
            "seed {seed}: {:?}",
            t.counters
        );
        assert_eq!(t.counters.unknown_entity, 0, "seed {seed}");
        assert_eq!(t.counters.hops_exceeded, 0, "seed {seed}");
        assert_eq!(
            t.counters.inputs_gap_skipped, 0,
            "seed {seed}: an input never arrived"
        );
        for client in h.clients() {
            let id = client.entity.expect("joined");
            let (_, _, e) = h.find(id).expect("avatar exists");
            assert_eq!(
                e.last_input_seq, client.stats.inputs_sent as u32,
                "seed {seed}: {} applied {} of {} inputs",
                client.id, e.last_input_seq, client.stats.inputs_sent
            );
        }
        let n = h.net_counters();
        assert!(
            n.dropped > 0 && n.duplicated > 0 && n.deduplicated > 0,
            "seed {seed}: faults exercised: {n:?}"
        );
    }
}

/// Same seed, same world, bit for bit; another seed, another world.
#[test]
fn same_seed_same_world() {
    let run = |seed| {
        let mut c = world(seed, 3, 800, 30);
        c.faults = Faults::harsh();
        let mut h = Harness::new(c);
        let mut digests = Vec::new();
        for _ in 0..6 {
            h.run(20);
            digests.push(h.digest());
        }
        digests
    };
    assert_eq!(run(42), run(42));
    assert_ne!(run(42), run(43));
}
