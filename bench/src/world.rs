//! `world` suite: the cost of a tick of the world engine on one core.
//!
//! One `ShardWorld` owns 16 cells (4 x 4 of 128 m) of the demo game; 10% of
//! the entities are players that send an input and acknowledge their last
//! snapshot every tick, the rest are wandering NPCs. Reported: tick time
//! p50/p99 (all six steps, snapshots encoded), ns per entity per tick, and
//! snapshot bytes per client per tick at sparse and crowded densities.
//!
//! The AOI is compared with a brute-force O(clients x entities) visibility
//! computation on the same positions in the same run: both compute every
//! player's membership (enter at R, leave beyond R + margin) and must agree.

use std::sync::Arc;
use std::time::Instant;

use hdrhistogram::Histogram;
use tessera_cells::demo::{DemoConfig, DemoGame};
use tessera_cells::geometry::{Geometry, Layout, Vec2};
use tessera_cells::messages::{CellMessage, ClientOutputKind, Output};
use tessera_cells::rng::Rng;
use tessera_cells::view::{AoiIndex, ViewConfig};
use tessera_cells::QState;
use tessera_cells::{CellId, ClientId, EntityId, ShardWorld, TickId, WorldConfig};
use tessera_schema::client::InputCmd;

use crate::report::{median, Report};

/// Options of the `world` suite.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A short run, for CI.
    #[arg(long)]
    pub quick: bool,
    /// Measured ticks per case.
    #[arg(long)]
    pub ticks: Option<u64>,
    /// Run only the cases whose name contains this.
    #[arg(long)]
    pub only: Option<String>,
}

struct Client {
    id: ClientId,
    entity: Option<EntityId>,
    cell: Option<CellId>,
    seq: u32,
    dir: Vec2,
    last_snapshot: u64,
}

struct Bench {
    world: ShardWorld<DemoGame>,
    clients: Vec<Client>,
    rng: Rng,
    tick: u64,
    bytes: u64,
    snapshots: u64,
}

fn us_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds")
}

impl Bench {
    /// `npcs` wanderers and `clients` players, spread over `area` (a part of
    /// the 512 m world; the whole world for uniform density).
    fn new(
        npcs: usize,
        clients: usize,
        side_cells: i32,
        area: Option<tessera_cells::Rect>,
        seed: u64,
    ) -> Self {
        let geometry = Geometry::new(0, 128.0, side_cells, side_cells);
        let area = area.unwrap_or_else(|| geometry.world_rect());
        let layout = Arc::new(Layout::new(geometry));
        let config = WorldConfig {
            seed,
            ..WorldConfig::default()
        };
        let mut world = ShardWorld::new(
            DemoGame::new(DemoConfig::default()),
            layout.clone(),
            config,
            1,
        );
        for c in layout.leaves() {
            world.add_cell(c);
        }
        let mut rng = Rng::new(seed);
        for _ in 0..npcs {
            let p = Vec2::new(
                rng.range(area.min.x, area.max.x),
                rng.range(area.min.y, area.max.y),
            );
            let id = world.allocate_id();
            let npc = world.game().npc(id, area.clamp(p));
            world.spawn(npc);
        }
        let mut out = Vec::with_capacity(clients);
        for i in 0..clients {
            let p = area.clamp(Vec2::new(
                rng.range(area.min.x, area.max.x),
                rng.range(area.min.y, area.max.y),
            ));
            let cell = layout.leaf_at(p).expect("inside");
            let id = ClientId(i as u64 + 1);
            let _ = world.deliver(tessera_cells::CellEnvelope {
                to: cell,
                from: cell,
                msg: CellMessage::Join {
                    client: id,
                    name: format!("p{i}"),
                    pos: p,
                    resume_key: 0,
                },
            });
            out.push(Client {
                id,
                entity: None,
                cell: None,
                seq: 0,
                dir: Vec2::default(),
                last_snapshot: 0,
            });
        }
        Self {
            world,
            clients: out,
            rng,
            tick: 0,
            bytes: 0,
            snapshots: 0,
        }
    }

    /// Client traffic for the next tick: an input each, and an ack of the
    /// last snapshot (so deltas stay small, as with a live client).
    fn client_traffic(&mut self) {
        for c in self.clients.iter_mut() {
            let (Some(entity), Some(cell)) = (c.entity, c.cell) else {
                continue;
            };
            if c.dir == Vec2::default() || self.rng.chance(0.05) {
                let a = self.rng.range(0.0, std::f32::consts::TAU);
                c.dir = Vec2::new(a.cos(), a.sin());
            }
            c.seq += 1;
            let input = InputCmd {
                input_seq: c.seq,
                client_tick: self.tick,
                movement: [c.dir.x, c.dir.y],
                heading: 0.0,
                actions: Vec::new(),
            };
            let _ = self.world.deliver(tessera_cells::CellEnvelope {
                to: cell,
                from: cell,
                msg: CellMessage::Input {
                    client: c.id,
                    entity,
                    input,
                    hops: 0,
                    after: TickId(0),
                },
            });
            if c.last_snapshot > 0 {
                let _ = self.world.deliver(tessera_cells::CellEnvelope {
                    to: cell,
                    from: cell,
                    msg: CellMessage::Ack {
                        client: c.id,
                        entity,
                        tick: TickId(c.last_snapshot),
                        hops: 0,
                        after: TickId(0),
                    },
                });
            }
        }
    }

    /// One tick; returns its duration in microseconds.
    fn step(&mut self) -> u64 {
        self.client_traffic();
        self.tick += 1;
        let start = Instant::now();
        self.world.tick(TickId(self.tick));
        let us = start.elapsed().as_micros() as u64;
        let outputs: Vec<_> = self.world.drain_outbox().collect();
        for o in outputs {
            if let Output::Client(out) = o {
                let c = &mut self.clients[out.client.0 as usize - 1];
                c.cell = Some(out.cell);
                match out.kind {
                    ClientOutputKind::Welcome => c.entity = Some(out.entity),
                    ClientOutputKind::Snapshot => {
                        c.last_snapshot = out.tick.0;
                        self.bytes += out.bytes.len() as u64;
                        self.snapshots += 1;
                    }
                    // The bench's clients never resume.
                    ClientOutputKind::Refused => {}
                }
            }
        }
        us
    }

    /// Positions of every entity, and which are players.
    fn positions(&self) -> (Vec<Vec2>, Vec<usize>) {
        let mut pos = Vec::new();
        let mut players = Vec::new();
        for cell in self.world.cells() {
            for e in cell.entities().iter() {
                if e.client.is_some() {
                    players.push(pos.len());
                }
                pos.push(e.pos);
            }
        }
        (pos, players)
    }
}

/// Visibility of every player: with the engine's AOI index, and by brute
/// force, both keeping the nearest `max_entities` (the view cap). Returns
/// (index us, brute us) and checks they agree.
fn aoi_compare(
    pos: &[Vec2],
    players: &[usize],
    prev: &mut [Vec<u32>],
    view: &ViewConfig,
    area: tessera_cells::Rect,
) -> (u64, u64) {
    let r2 = view.radius * view.radius;
    let l2 = view.leave_radius() * view.leave_radius();
    let ids: Vec<EntityId> = (0..pos.len() as u64).map(EntityId).collect();
    let start = Instant::now();
    let mut aoi = AoiIndex::new();
    for (i, p) in pos.iter().enumerate() {
        aoi.push(ids[i], QState::default(), *p);
    }
    aoi.build(area.expand(view.leave_radius()), 16.0);
    let mut fast: Vec<Vec<u32>> = Vec::with_capacity(players.len());
    let mut accepted = Vec::new();
    let mut previous: Vec<EntityId> = Vec::new();
    for (k, &p) in players.iter().enumerate() {
        accepted.clear();
        previous.clear();
        previous.extend(prev[k].iter().map(|&i| ids[i as usize]));
        aoi.members_of(pos[p], &previous, view, &mut accepted);
        // The view keeps the nearest `max_entities` (ties by id).
        if accepted.len() > view.max_entities {
            accepted.select_nth_unstable_by(view.max_entities, |a, b| {
                a.0.cmp(&b.0).then(a.1.cmp(&b.1))
            });
            accepted.truncate(view.max_entities);
        }
        fast.push(accepted.iter().map(|a| a.1).collect());
    }
    let index_us = start.elapsed().as_micros() as u64;
    let start = Instant::now();
    let mut slow: Vec<Vec<u32>> = Vec::with_capacity(players.len());
    for (k, &p) in players.iter().enumerate() {
        let mut members = Vec::new();
        let before = &prev[k];
        let c = pos[p];
        for (i, q) in pos.iter().enumerate() {
            let d2 = q.distance_squared(c);
            if d2 <= r2 || (d2 <= l2 && before.binary_search(&(i as u32)).is_ok()) {
                members.push((d2.to_bits(), i as u32));
            }
        }
        if members.len() > view.max_entities {
            members.sort_unstable();
            members.truncate(view.max_entities);
        }
        let mut members: Vec<u32> = members.into_iter().map(|m| m.1).collect();
        members.sort_unstable();
        slow.push(members);
    }
    let brute_us = start.elapsed().as_micros() as u64;
    for (f, s) in fast.iter_mut().zip(&slow) {
        f.sort_unstable();
        assert_eq!(f, s, "AOI index and brute force disagree");
    }
    prev.clone_from_slice(&slow);
    (index_us.max(1), brute_us.max(1))
}

/// Runs the suite.
pub fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let ticks = args.ticks.unwrap_or(if args.quick { 20 } else { 200 });
    let warmup = if args.quick { 5 } else { 20 };
    let mut report = Report::new("world", false);
    report.note("one ShardWorld on one thread, cells of 128 m: 16 cells (4x4, 512 m) unless the case says otherwise; demo game; players send an input and ack their last snapshot every tick; tick = all six steps with snapshot encoding; AOI R = 50 m, leave at 60 m, view cap 128, snapshot cap 1100 B".to_string());
    // (case, npcs, clients, world side in cells, area to fill or whole world)
    type Case = (String, usize, usize, i32, Option<tessera_cells::Rect>);
    let mut cases: Vec<Case> = vec![
        ("entities=1000".into(), 900, 100, 4, None),
        ("entities=10000".into(), 9_000, 1_000, 4, None),
        // 20,000 entities over 24 x 24 cells (3 km x 3 km): ~20 in an AOI.
        ("clients=10000,npcs=10000".into(), 10_000, 10_000, 24, None),
        // The same population packed into 16 cells: every view at its cap.
        (
            "clients=10000,npcs=10000,cells=16".into(),
            10_000,
            10_000,
            4,
            None,
        ),
    ];
    // The soak's world (tools/soak.sh): 8 x 8 cells, 2,000 NPCs, 1,000 players.
    cases.push((
        "clients=1000,npcs=2000,cells=64".into(),
        2_000,
        1_000,
        8,
        None,
    ));
    if !args.quick {
        cases.insert(2, ("entities=100000".into(), 90_000, 10_000, 4, None));
    }
    // Crowded: 2,000 entities in one 64 m square around a cell corner.
    let crowd = tessera_cells::Rect::new(Vec2::new(96.0, 96.0), Vec2::new(160.0, 160.0));
    cases.push(("density=crowded".into(), 1_800, 200, 4, Some(crowd)));
    cases.push(("density=sparse".into(), 180, 20, 4, None));

    for (case, npcs, clients, side, area) in cases {
        if args
            .only
            .as_ref()
            .is_some_and(|o| !case.contains(o.as_str()))
        {
            continue;
        }
        eprintln!("world: {case}: building");
        let mut bench = Bench::new(npcs, clients, side, area, 7);
        for _ in 0..warmup {
            bench.step();
        }
        bench.bytes = 0;
        bench.snapshots = 0;
        let mut h = us_histogram();
        let mut aoi_hash = Vec::new();
        let mut aoi_brute = Vec::new();
        let (pos, players) = bench.positions();
        let mut prev: Vec<Vec<u32>> = vec![Vec::new(); players.len()];
        let view = ViewConfig::default();
        let geometry_rect = bench.world.layout().geometry().world_rect();
        let _ = aoi_compare(&pos, &players, &mut prev, &view, geometry_rect);
        eprintln!("world: {case}: {ticks} ticks");
        for t in 0..ticks {
            let us = bench.step();
            let _ = h.record(us.max(1));
            // The brute-force peer is O(n^2): sample it every 10th tick.
            if t % 10 == 0 {
                let (pos, players) = bench.positions();
                if prev.len() != players.len() {
                    prev = vec![Vec::new(); players.len()];
                }
                let (fast, slow) = aoi_compare(&pos, &players, &mut prev, &view, geometry_rect);
                aoi_hash.push(fast as f64);
                aoi_brute.push(slow as f64);
            }
        }
        let entities = npcs + clients;
        let p50 = h.value_at_quantile(0.5) as f64;
        report.push(&case, "tessera", "tick_us_p50", p50, "us");
        report.push(
            &case,
            "tessera",
            "tick_us_p99",
            h.value_at_quantile(0.99) as f64,
            "us",
        );
        report.push(
            &case,
            "tessera",
            "ns_per_entity_tick",
            p50 * 1000.0 / entities as f64,
            "ns",
        );
        if bench.snapshots > 0 {
            report.push(
                &case,
                "tessera",
                "snapshot_bytes_per_client_tick",
                bench.bytes as f64 / bench.snapshots as f64,
                "B",
            );
        }
        report.push(
            &case,
            "tessera",
            "aoi_us_median",
            median(&mut aoi_hash),
            "us",
        );
        report.push(
            &case,
            "brute-force",
            "aoi_us_median",
            median(&mut aoi_brute),
            "us",
        );
        report.ratio(&case, "aoi_us_median", "brute-force", "tessera");
        let totals = bench.world.totals();
        eprintln!(
            "world: {case}: p99 {} us, {} entities, {} players, transfers {}, deferred {}",
            h.value_at_quantile(0.99),
            totals.entities,
            totals.players,
            totals.counters.transfers_in,
            totals.counters.snapshot_deferred
        );
    }
    report.note("aoi_us_median: every player's membership (enter R, leave R + margin) over the same positions: tessera = spatial hash (16 m buckets, rebuilt per measurement), brute-force = scan of all entities per player; results checked equal; sampled every 10th tick".to_string());
    report.note("target: clients=10000,npcs=10000 tick_us_p99 <= 12500 (a quarter of a 20 Hz budget) on one core".to_string());
    report.finish()?;
    Ok(())
}
