//! The cells of one shard and the six steps of their tick.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::cell::{Cell, CellCounters, Envelope, Msg, Out, Transfer};
use crate::entity::Entity;
use crate::game::{GameCounters, GameLogic};
use crate::geometry::{CellId, Layout};
use crate::ghost::GhostUpdate;
use crate::ids::{IdAllocator, TickId};
use crate::messages::{redirect, CellEnvelope, CellMessage, Locator, Output, Redirect};
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
    /// How long a message about an entity a cell does not know waits for
    /// the entity to arrive, in ticks. An entity sent to a cell that is
    /// being handed over reaches it only when the old owner releases the
    /// cell (up to the coordinator's step timeouts), while the client's
    /// inputs reach the new owner at once: wait that long.
    pub orphan_ticks: u64,
    /// How long a cell keeps a copy of a transfer to another shard, in
    /// ticks from its departure (sent again if either end is restored from
    /// a replica): longer than the transfer may wait for its replication
    /// plus a node's loss takes to detect and recover from; at most
    /// `forward_ticks` (a receiver recognises a copy it already had by its
    /// forward pointer).
    pub retain_ticks: u64,
    /// Ticks a player's avatar stays in the world after its client was
    /// last heard (an input or an ack; a connected client acks every
    /// snapshot), waiting for a resume when its session was lost without a
    /// leave (its gateway died). 0: forever. Default 600 (30 s at 20 Hz).
    pub player_linger_ticks: u64,
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
            orphan_ticks: 100,
            retain_ticks: 200,
            player_linger_ticks: 600,
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
    /// Messages for an entity of a split cell that no child knows yet, with
    /// the tick they arrived.
    unplaced: Vec<(TickId, Envelope<G>)>,
    outbox: Vec<Out<G>>,
    tick: TickId,
    frozen: BTreeSet<CellId>,
    epochs: BTreeMap<CellId, u32>,
    retired: CellCounters,
}

/// Why a split or merge was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReshapeError {
    /// The layout refused it.
    #[error(transparent)]
    Layout(#[from] crate::geometry::LayoutError),
    /// A cell involved is not owned here.
    #[error("cell {0} is not owned by this shard")]
    NotOwned(CellId),
    /// A cell involved is frozen (in a handover).
    #[error("cell {0} is frozen by a handover")]
    Frozen(CellId),
}

/// How long ghosts inherited by a split or merge wait for confirmation.
const INHERITED_GHOST_TICKS: u64 = 40;

impl<G: GameLogic> ShardWorld<G> {
    /// Starts this shard's entity serials at `serial` or later
    /// ([`IdAllocator::serial_origin`]: a restarted node never reuses ids).
    pub fn start_ids_at(&mut self, serial: u64) {
        self.ids.skip_to(serial);
    }

    /// A world with no cells. `id_prefix` makes entity ids unique per shard
    /// ([`IdAllocator::prefix_of`]).
    pub fn new(game: G, layout: Arc<Layout>, config: WorldConfig, id_prefix: u32) -> Self {
        Self {
            game,
            layout,
            config,
            cells: BTreeMap::new(),
            ids: IdAllocator::new(id_prefix),
            next_tick_local: Vec::new(),
            unplaced: Vec::new(),
            outbox: Vec::new(),
            tick: TickId(0),
            frozen: BTreeSet::new(),
            epochs: BTreeMap::new(),
            retired: CellCounters::default(),
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

    /// Replaces the layout (after a split or merge elsewhere): cells stop
    /// sending ghosts to cells that are no longer leaves.
    pub fn set_layout(&mut self, layout: Arc<Layout>) {
        if *layout == *self.layout {
            return;
        }
        for c in self.cells.values_mut() {
            c.retarget(&layout);
        }
        self.layout = layout;
    }

    /// Stops simulating a cell (a handover's freeze): it keeps its state and
    /// buffers whatever arrives for it.
    pub fn freeze(&mut self, cell: CellId) -> bool {
        self.cells.contains_key(&cell) && self.frozen.insert(cell)
    }

    /// Resumes a frozen cell.
    pub fn unfreeze(&mut self, cell: CellId) -> bool {
        self.frozen.remove(&cell)
    }

    /// True if the cell is frozen.
    pub fn is_frozen(&self, cell: CellId) -> bool {
        self.frozen.contains(&cell)
    }

    /// Removes a cell (its handover committed elsewhere); its counters stay
    /// in the totals.
    pub fn take_cell(&mut self, cell: CellId) -> Option<Cell<G>> {
        self.frozen.remove(&cell);
        self.epochs.remove(&cell);
        let c = self.cells.remove(&cell)?;
        add_counters(&mut self.retired, &c.counters());
        Some(c)
    }

    /// The epoch this shard holds a cell under.
    pub fn epoch(&self, cell: CellId) -> Option<u32> {
        self.cells
            .contains_key(&cell)
            .then(|| self.epochs.get(&cell).copied().unwrap_or(1))
    }

    /// Records the epoch of an owned cell.
    pub fn set_epoch(&mut self, cell: CellId, epoch: u32) {
        self.epochs.insert(cell, epoch);
    }

    /// Splits an owned cell into its four children, at a tick boundary.
    pub fn split(&mut self, parent: CellId) -> Result<[CellId; 4], ReshapeError> {
        if !self.cells.contains_key(&parent) {
            return Err(ReshapeError::NotOwned(parent));
        }
        if self.frozen.contains(&parent) {
            return Err(ReshapeError::Frozen(parent));
        }
        let mut layout = (*self.layout).clone();
        let children = layout.split(parent)?;
        let layout = Arc::new(layout);
        let epoch = self.epochs.remove(&parent).unwrap_or(1);
        let cell = self.cells.remove(&parent).expect("checked");
        add_counters(&mut self.retired, &cell.counters());
        let until = TickId(self.tick.0 + INHERITED_GHOST_TICKS);
        let (cells, inputs, intents) = cell.split_into(&children, &layout, self.config.seed, until);
        self.set_layout(layout);
        for c in cells {
            self.epochs.insert(c.id(), epoch + 1);
            self.cells.insert(c.id(), c);
        }
        self.redeliver(parent, inputs, intents);
        Ok(children)
    }

    /// Merges four owned sibling leaves into their parent, at a tick boundary.
    pub fn merge(&mut self, parent: CellId) -> Result<(), ReshapeError> {
        let children = parent.children().ok_or(ReshapeError::NotOwned(parent))?;
        for c in children {
            if !self.cells.contains_key(&c) {
                return Err(ReshapeError::NotOwned(c));
            }
            if self.frozen.contains(&c) {
                return Err(ReshapeError::Frozen(c));
            }
        }
        let mut layout = (*self.layout).clone();
        layout.merge(parent)?;
        let layout = Arc::new(layout);
        let mut epoch = 1;
        let mut taken = Vec::with_capacity(4);
        for c in children {
            epoch = epoch.max(self.epochs.remove(&c).unwrap_or(1));
            let cell = self.cells.remove(&c).expect("checked");
            add_counters(&mut self.retired, &cell.counters());
            taken.push(cell);
        }
        let until = TickId(self.tick.0 + INHERITED_GHOST_TICKS);
        let (cell, inputs, intents) =
            Cell::merge_from(parent, taken, &layout, self.config.seed, until);
        self.set_layout(layout);
        self.epochs.insert(parent, epoch + 1);
        self.cells.insert(parent, cell);
        self.redeliver(parent, inputs, intents);
        Ok(())
    }

    fn redeliver(&mut self, old: CellId, inputs: Vec<Msg<G>>, intents: Vec<(G::Intent, u8)>) {
        for msg in inputs {
            let env = CellEnvelope {
                to: old,
                from: old,
                msg,
            };
            if let Err(env) = self.deliver(env) {
                self.outbox.push(Output::Cell(env));
            }
        }
        for (intent, hops) in intents {
            let env = CellEnvelope {
                to: old,
                from: old,
                msg: CellMessage::Intent { intent, hops },
            };
            if let Err(env) = self.deliver(env) {
                self.outbox.push(Output::Cell(env));
            }
        }
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
    ///
    /// A message for a cell that was merged into an owned parent goes to the
    /// parent; one for a cell that was split into owned children goes to the
    /// child it concerns (by position for joins and transfers, by entity for
    /// inputs, acks, leaves and intents; ghost updates go to every child,
    /// which inherited the parent's ghosts).
    pub fn deliver(&mut self, env: Envelope<G>) -> Result<(), Envelope<G>> {
        if let Some(cell) = self.cells.get_mut(&env.to) {
            cell.push_input(env.msg);
            return Ok(());
        }
        let descendants = match redirect(
            env.to,
            |c| self.cells.contains_key(&c),
            self.cells.keys().copied(),
        ) {
            Redirect::Ancestor(p) => {
                self.cells.get_mut(&p).expect("found").push_input(env.msg);
                return Ok(());
            }
            Redirect::Descendants(d) => d,
            Redirect::Nowhere => return Err(env),
        };
        let target = match env.msg.locator(G::intent_target) {
            Locator::Position(p) => self.layout.leaf_at(p),
            Locator::Entity(id) => {
                // The child that owns it, else the one its transfer waits
                // in, else one that saw it leave after the message's newest
                // departure (every child inherited the parent's forward
                // pointers, stale ones too: an older one means the entity is
                // on its way back into the split cell, child unknown yet).
                let find = |test: &dyn Fn(&Cell<G>) -> bool| {
                    descendants.iter().copied().find(|c| test(&self.cells[c]))
                };
                let config = &self.config;
                let msg = &env.msg;
                let child = find(&|c| c.entities().contains(id))
                    .or_else(|| find(&|c| c.awaits(id)))
                    .or_else(|| find(&|c| c.points_onward(id, msg, config)));
                if child.is_none() && self.owns_all_of(env.to, descendants.len()) {
                    // No child knows the entity yet, and every child is here:
                    // its transfer is still on its way to the cell that was
                    // split. Try again at the next ticks (as a cell holds an
                    // orphan). With children elsewhere, the router tries them.
                    self.unplaced.push((self.tick, env));
                    return Ok(());
                }
                child
            }
            Locator::Every => {
                let CellMessage::Ghost(update) = env.msg else {
                    unreachable!("only ghost updates go to every child")
                };
                for c in &descendants {
                    let cell = self.cells.get_mut(c).expect("owned");
                    cell.push_input(CellMessage::Ghost(update.clone()));
                }
                return Ok(());
            }
        };
        match target {
            Some(t) if self.cells.contains_key(&t) => {
                self.cells.get_mut(&t).expect("owned").push_input(env.msg);
                Ok(())
            }
            Some(t) => Err(CellEnvelope { to: t, ..env }),
            None => Err(env),
        }
    }

    /// True if the `owned` local leaves inside `cell` are all of its leaves.
    fn owns_all_of(&self, cell: CellId, owned: usize) -> bool {
        let leaves = self
            .layout
            .leaves()
            .into_iter()
            .filter(|c| cell.contains_cell(*c))
            .count();
        leaves == owned
    }

    /// Messages no child of a split cell could take: again, now that the
    /// last tick applied the transfers it had queued. After the orphan
    /// timeout the first child that still covers the destination takes it
    /// (and counts it as for an unknown entity).
    fn retry_unplaced(&mut self, tick: TickId) {
        for (since, env) in std::mem::take(&mut self.unplaced) {
            if tick.0 <= since.0 + self.config.orphan_ticks {
                let before = self.unplaced.len();
                let result = self.deliver(env);
                // Still unplaced: keep its first arrival tick.
                if self.unplaced.len() > before {
                    self.unplaced.last_mut().expect("pushed").0 = since;
                }
                if let Err(env) = result {
                    self.outbox.push(Output::Cell(env));
                }
                continue;
            }
            let to = env.to;
            match self.cells.keys().copied().find(|c| to.contains_cell(*c)) {
                Some(child) => self
                    .cells
                    .get_mut(&child)
                    .expect("owned")
                    .push_input(env.msg),
                None => self.outbox.push(Output::Cell(env)),
            }
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
        self.retry_unplaced(tick);
        for env in std::mem::take(&mut self.next_tick_local) {
            if let Err(env) = self.deliver(env) {
                self.outbox.push(Output::Cell(env));
            }
        }
        let mut produced = Vec::new();
        let frozen = &self.frozen;
        for cell in self
            .cells
            .values_mut()
            .filter(|c| !frozen.contains(&c.id()))
        {
            cell.drain_inputs(&mut self.game, &self.config, &layout, tick, &mut self.ids);
            cell.take_outputs(&mut produced);
        }
        self.route(std::mem::take(&mut produced));

        let mut transfers = Vec::new();
        let frozen = &self.frozen;
        for cell in self
            .cells
            .values_mut()
            .filter(|c| !frozen.contains(&c.id()))
        {
            let from = cell.id();
            let moved = cell.simulate(&mut self.game, &self.config, &layout, tick, &mut self.ids);
            transfers.extend(moved.into_iter().map(|(to, t)| (from, to, t)));
        }
        // Entities whose new cell takes them only at its next tick: sent
        // after the view round, which builds their snapshot of this tick.
        let mut in_flight: BTreeMap<CellId, Vec<(CellId, Transfer<G>)>> = BTreeMap::new();
        for (from, to, t) in transfers {
            match self.cells.get_mut(&to) {
                Some(cell) if !self.frozen.contains(&to) => cell.accept_transfer(t, &self.config),
                _ => in_flight.entry(from).or_default().push((to, t)),
            }
        }

        let frozen = &self.frozen;
        for cell in self
            .cells
            .values_mut()
            .filter(|c| !frozen.contains(&c.id()))
        {
            cell.consume_intents(&mut self.game, &self.config, &layout, tick, &mut self.ids);
            cell.take_outputs(&mut produced);
        }
        self.route(std::mem::take(&mut produced));

        let mut ghost_updates: Vec<(CellId, CellId, GhostUpdate)> = Vec::new();
        let frozen = &self.frozen;
        for cell in self
            .cells
            .values_mut()
            .filter(|c| !frozen.contains(&c.id()))
        {
            let from = cell.id();
            ghost_updates.extend(
                cell.ghost_round(&self.config, &layout)
                    .into_iter()
                    .map(|(to, u)| (from, to, u)),
            );
        }
        for (from, to, update) in ghost_updates {
            match self.cells.get_mut(&to) {
                Some(cell) if self.frozen.contains(&to) => {
                    cell.push_input(CellMessage::Ghost(update))
                }
                Some(cell) => cell.apply_ghosts(&update, tick),
                None => self.outbox.push(Output::Cell(CellEnvelope {
                    to,
                    from,
                    msg: CellMessage::Ghost(update),
                })),
            }
        }
        let frozen = &self.frozen;
        let mut departing = Vec::new();
        for cell in self
            .cells
            .values_mut()
            .filter(|c| !frozen.contains(&c.id()))
        {
            let mut leaving = in_flight.remove(&cell.id()).unwrap_or_default();
            cell.view_round(&self.config, tick, &mut leaving);
            cell.take_outputs(&mut produced);
            departing.extend(leaving.into_iter().map(|(to, t)| (cell.id(), to, t)));
        }
        self.route(produced);
        for (from, to, t) in departing {
            match self.cells.get_mut(&to) {
                // A frozen cell buffers: its handover carries the message on.
                Some(cell) => cell.push_input(CellMessage::Transfer(Box::new(t))),
                None => self.outbox.push(Output::Cell(CellEnvelope {
                    to,
                    from,
                    msg: CellMessage::Transfer(Box::new(t)),
                })),
            }
        }
    }

    /// Takes what this tick produced for other shards and for clients.
    pub fn drain_outbox(&mut self) -> std::vec::Drain<'_, Out<G>> {
        self.outbox.drain(..)
    }

    /// Messages waiting for local cells at the next tick.
    pub fn pending_local(&self) -> usize {
        self.next_tick_local.len() + self.unplaced.len()
    }

    /// Totals over the cells.
    pub fn totals(&self) -> WorldTotals {
        let mut t = WorldTotals {
            cells: self.cells.len(),
            counters: self.retired,
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

pub(crate) fn add_counters(t: &mut CellCounters, c: &CellCounters) {
    t.inputs += c.inputs;
    t.inputs_forwarded += c.inputs_forwarded;
    t.inputs_duplicate += c.inputs_duplicate;
    t.inputs_held += c.inputs_held;
    t.inputs_gap_skipped += c.inputs_gap_skipped;
    t.inputs_wrong_client += c.inputs_wrong_client;
    t.unknown_entity += c.unknown_entity;
    t.inputs_awaited += c.inputs_awaited;
    t.orphans_held += c.orphans_held;
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
    t.resumes += c.resumes;
    t.resumes_refused += c.resumes_refused;
    t.players_lingered_out += c.players_lingered_out;
}
