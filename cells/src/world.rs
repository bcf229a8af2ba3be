//! The cells of one shard and the six steps of their tick.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::cell::{Cell, CellCounters, Envelope, Msg, Out};
use crate::entity::Entity;
use crate::game::{GameCounters, GameLogic};
use crate::geometry::{CellId, Layout};
use crate::ghost::GhostUpdate;
use crate::ids::{IdAllocator, TickId};
use crate::messages::{CellEnvelope, CellMessage, Output};
use crate::view::ViewConfig;

/// Settings of the world engine.
#[derive(Clone, Debug, PartialEq)]
pub struct WorldConfig {
    /// AOI and snapshots.
    pub view: ViewConfig,
    /// Ticks per second.
    pub tick_hz: u32,
    /// Spatial hash bucket edge, metres.
    pub bucket: f32,
    /// How long a cell remembers where an entity went, in ticks.
    pub forward_ticks: u64,
    /// Most times a message may be forwarded after its entity.
    pub max_hops: u8,
    /// How long an input that arrived ahead of a missing one waits for it,
    /// in ticks, before it is applied anyway.
    pub input_reorder_ticks: u64,
    /// Most inputs held back per entity.
    pub input_reorder_max: usize,
    /// Seed of every generator.
    pub seed: u64,
}

impl Default for WorldConfig {
    fn default() -> Self {
        Self {
            view: ViewConfig::default(),
            tick_hz: 20,
            bucket: 16.0,
            forward_ticks: 200,
            max_hops: 8,
            input_reorder_ticks: 10,
            input_reorder_max: 32,
            seed: 1,
        }
    }
}

impl WorldConfig {
    /// Seconds per tick.
    pub fn dt(&self) -> f32 {
        1.0 / self.tick_hz.max(1) as f32
    }
}

/// Totals over the cells of a shard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorldTotals {
    /// Cells.
    pub cells: usize,
    /// Entities owned.
    pub entities: usize,
    /// Ghosts held.
    pub ghosts: usize,
    /// Players (entities with a client).
    pub players: usize,
    /// Sum of the cells' counters.
    pub counters: CellCounters,
    /// Sum of the game's counters.
    pub game: GameCounters,
}

/// The cells one shard owns, run together: messages between them are
/// delivered without leaving the shard, transfers and ghosts within the
/// same tick.
pub struct ShardWorld<G: GameLogic> {
    game: G,
    layout: Arc<Layout>,
    config: WorldConfig,
    cells: BTreeMap<CellId, Cell<G>>,
    ids: IdAllocator,
    next_tick_local: Vec<Envelope<G>>,
    outbox: Vec<Out<G>>,
    tick: TickId,
}

impl<G: GameLogic> ShardWorld<G> {
    /// A world with no cells. `id_prefix` makes entity ids unique per shard.
    pub fn new(game: G, layout: Arc<Layout>, config: WorldConfig, id_prefix: u16) -> Self {
        Self {
            game,
            layout,
            config,
            cells: BTreeMap::new(),
            ids: IdAllocator::new(id_prefix),
            next_tick_local: Vec::new(),
            outbox: Vec::new(),
            tick: TickId(0),
        }
    }

    /// The game.
    pub fn game(&self) -> &G {
        &self.game
    }

    /// The game, mutably.
    pub fn game_mut(&mut self) -> &mut G {
        &mut self.game
    }

    /// The layout in use.
    pub fn layout(&self) -> &Arc<Layout> {
        &self.layout
    }

    /// Replaces the layout (after a split or merge).
    pub fn set_layout(&mut self, layout: Arc<Layout>) {
        self.layout = layout;
    }

    /// The settings.
    pub fn config(&self) -> &WorldConfig {
        &self.config
    }

    /// The last tick run.
    pub fn tick_id(&self) -> TickId {
        self.tick
    }

    /// Takes ownership of an (empty) cell.
    pub fn add_cell(&mut self, id: CellId) -> &mut Cell<G> {
        let seed = self.config.seed;
        let layout = self.layout.clone();
        self.cells
            .entry(id)
            .or_insert_with(|| Cell::new(id, &layout, seed))
    }

    /// Takes ownership of an existing cell (a handover).
    pub fn insert_cell(&mut self, cell: Cell<G>) {
        self.cells.insert(cell.id(), cell);
    }

    /// Gives up a cell.
    pub fn remove_cell(&mut self, id: CellId) -> Option<Cell<G>> {
        self.cells.remove(&id)
    }

    /// True if this shard owns the cell.
    pub fn owns(&self, id: CellId) -> bool {
        self.cells.contains_key(&id)
    }

    /// A cell.
    pub fn cell(&self, id: CellId) -> Option<&Cell<G>> {
        self.cells.get(&id)
    }

    /// A cell, mutably.
    pub fn cell_mut(&mut self, id: CellId) -> Option<&mut Cell<G>> {
        self.cells.get_mut(&id)
    }

    /// Every cell, in id order.
    pub fn cells(&self) -> impl Iterator<Item = &Cell<G>> {
        self.cells.values()
    }

    /// The owned cells' ids.
    pub fn cell_ids(&self) -> Vec<CellId> {
        self.cells.keys().copied().collect()
    }

    /// Allocates an entity id.
    pub fn allocate_id(&mut self) -> crate::ids::EntityId {
        self.ids.allocate()
    }

    /// Spawns an entity in the leaf containing it, if that cell is owned here.
    pub fn spawn(&mut self, e: Entity<G::Components>) -> bool {
        match self
            .layout
            .leaf_at(e.pos)
            .and_then(|c| self.cells.get_mut(&c))
        {
            Some(cell) => cell.spawn(e),
            None => false,
        }
    }

    /// A message for one of this shard's cells (from a client session, or
    /// another shard). Hands it back if the cell is not owned here.
    pub fn deliver(&mut self, env: Envelope<G>) -> Result<(), Envelope<G>> {
        match self.cells.get_mut(&env.to) {
            Some(cell) => {
                cell.push_input(env.msg);
                Ok(())
            }
            None => Err(env),
        }
    }

    /// Queues a message to a cell, whoever owns it (sent with the outputs if
    /// not local).
    pub fn send(&mut self, to: CellId, from: CellId, msg: Msg<G>) {
        let env = CellEnvelope { to, from, msg };
        if let Err(env) = self.deliver(env) {
            self.outbox.push(Output::Cell(env));
        }
    }

    fn route(&mut self, out: Vec<Out<G>>) {
        for o in out {
            match o {
                Output::Cell(env) if self.cells.contains_key(&env.to) => {
                    self.next_tick_local.push(env)
                }
                other => self.outbox.push(other),
            }
        }
    }

    /// Runs one tick over every cell (DESIGN.md section 4):
    /// 1. messages to local cells from the last tick join the InputQueues;
    /// 2. inputs become intents; ghosts, transfers, joins are taken in;
    /// 3. every cell simulates; entities that crossed a border move to their
    ///    new cell (at once if it is local, as a message otherwise);
    /// 4. intents are consumed or routed to the owner of their target;
    /// 5. ghost changes go to neighbours (at once if local), then every
    ///    player's snapshot is computed;
    /// 6. what is for other shards and for clients waits in the outbox.
    pub fn tick(&mut self, tick: TickId) {
        self.tick = tick;
        let layout = self.layout.clone();
        for env in std::mem::take(&mut self.next_tick_local) {
            if let Err(env) = self.deliver(env) {
                self.outbox.push(Output::Cell(env));
            }
        }
        let mut produced = Vec::new();
        for cell in self.cells.values_mut() {
            cell.drain_inputs(&mut self.game, &self.config, &layout, tick, &mut self.ids);
            cell.take_outputs(&mut produced);
        }
        self.route(std::mem::take(&mut produced));

        let mut transfers = Vec::new();
        for cell in self.cells.values_mut() {
            let from = cell.id();
            let moved = cell.simulate(&mut self.game, &self.config, &layout, tick, &mut self.ids);
            transfers.extend(moved.into_iter().map(|(to, t)| (from, to, t)));
        }
        for (from, to, t) in transfers {
            match self.cells.get_mut(&to) {
                Some(cell) => cell.accept_transfer(t),
                None => self.outbox.push(Output::Cell(CellEnvelope {
                    to,
                    from,
                    msg: CellMessage::Transfer(Box::new(t)),
                })),
            }
        }

        for cell in self.cells.values_mut() {
            cell.consume_intents(&mut self.game, &self.config, &layout, tick, &mut self.ids);
            cell.take_outputs(&mut produced);
        }
        self.route(std::mem::take(&mut produced));

        let mut ghost_updates: Vec<(CellId, CellId, GhostUpdate)> = Vec::new();
        for cell in self.cells.values_mut() {
            let from = cell.id();
            ghost_updates.extend(
                cell.ghost_round(&self.config, &layout)
                    .into_iter()
                    .map(|(to, u)| (from, to, u)),
            );
        }
        for (from, to, update) in ghost_updates {
            match self.cells.get_mut(&to) {
                Some(cell) => cell.apply_ghosts(&update, tick),
                None => self.outbox.push(Output::Cell(CellEnvelope {
                    to,
                    from,
                    msg: CellMessage::Ghost(update),
                })),
            }
        }
        for cell in self.cells.values_mut() {
            cell.view_round(&self.config, tick);
            cell.take_outputs(&mut produced);
        }
        self.route(produced);
    }

    /// Takes what this tick produced for other shards and for clients.
    pub fn drain_outbox(&mut self) -> std::vec::Drain<'_, Out<G>> {
        self.outbox.drain(..)
    }

    /// Messages waiting for local cells at the next tick.
    pub fn pending_local(&self) -> usize {
        self.next_tick_local.len()
    }

    /// Totals over the cells.
    pub fn totals(&self) -> WorldTotals {
        let mut t = WorldTotals {
            cells: self.cells.len(),
            ..WorldTotals::default()
        };
        for c in self.cells.values() {
            t.entities += c.entities().len();
            t.ghosts += c.ghosts().len();
            t.players += c.entities().iter().filter(|e| e.client.is_some()).count();
            add_counters(&mut t.counters, &c.counters());
            let g = c.game_counters();
            t.game.inputs_rejected += g.inputs_rejected;
            t.game.inputs_clamped += g.inputs_clamped;
            t.game.actions_rejected += g.actions_rejected;
            t.game.intents_applied += g.intents_applied;
        }
        t
    }
}

fn add_counters(t: &mut CellCounters, c: &CellCounters) {
    t.inputs += c.inputs;
    t.inputs_forwarded += c.inputs_forwarded;
    t.inputs_duplicate += c.inputs_duplicate;
    t.inputs_held += c.inputs_held;
    t.inputs_gap_skipped += c.inputs_gap_skipped;
    t.inputs_wrong_client += c.inputs_wrong_client;
    t.unknown_entity += c.unknown_entity;
    t.hops_exceeded += c.hops_exceeded;
    t.intents_applied += c.intents_applied;
    t.intents_routed += c.intents_routed;
    t.intents_dropped += c.intents_dropped;
    t.transfers_out += c.transfers_out;
    t.transfers_in += c.transfers_in;
    t.transfers_duplicate += c.transfers_duplicate;
    t.joins += c.joins;
    t.leaves += c.leaves;
    t.snapshots += c.snapshots;
    t.snapshot_bytes += c.snapshot_bytes;
    t.snapshot_deferred += c.snapshot_deferred;
    t.ghost_updates += c.ghost_updates;
}
