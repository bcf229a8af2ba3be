//! Live cell handover between shards, sans-IO.
//!
//! `PreCopy(state) -> Freeze -> Diff -> Commit(epoch + 1) -> route swap ->
//! Unfreeze`, with `Abort` back to the old owner at any step before Commit.
//!
//! - The coordinator sends [`Order::Begin`] to the source (old owner) with the
//!   cell's current epoch; a stale epoch is refused.
//! - The source sends a **PreCopy** of the cell's state to the target and
//!   keeps simulating.
//! - The target builds a shadow cell (not simulated, not the owner) and
//!   answers **Ready**, or **Refuse** (it already has the cell, or is full).
//! - At its next tick boundary the source **freezes** the cell (no more
//!   simulation; whatever arrives is buffered) and sends the **Diff**: the
//!   entities changed since the pre-copy, the rest of the state, and the
//!   buffered inputs.
//! - The target applies the diff and reports **Prepared** to the
//!   coordinator, which swaps the route in the registry (epoch + 1) and
//!   sends **Commit** to both.
//! - On Commit the target starts simulating the cell at its next tick; the
//!   source drops its copy and passes on what arrived since the diff.
//! - On **Abort** the source unfreezes (the inputs it had put in the diff
//!   come back first) and the target drops its shadow.
//!
//! At every moment one copy is authoritative: the source's until the
//! registry moves to epoch + 1, the target's after; a message carrying an
//! older epoch than the receiver's is ignored and counted.

use std::collections::BTreeMap;

use crate::cell::{Cell, CellState, Msg};
pub use crate::control::{AbortReason, HandoverId};
use crate::control::{Order, PeerMsg, Report};
use crate::game::GameLogic;
use crate::geometry::CellId;
use crate::ids::TickId;
use crate::registry::ShardRef;
use crate::world::ShardWorld;

/// What the agent asks its shard to do.
pub enum AgentOutput<G: GameLogic> {
    /// Send to another shard.
    ToShard(ShardRef, PeerMsg<G>),
    /// Tell the coordinator.
    Report(Report),
    /// Route these messages to the cell's (new) owner.
    Forward(CellId, Vec<Msg<G>>),
}

/// What an agent counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandoverCounters {
    /// Messages ignored: stale epoch, unknown handover, or wrong state.
    pub stale_ignored: u64,
    /// Handovers started as source.
    pub begun: u64,
    /// Handovers refused as target.
    pub refused: u64,
    /// Handovers aborted (either side).
    pub aborted: u64,
    /// Handovers committed as source.
    pub released: u64,
    /// Handovers committed as target.
    pub activated: u64,
}

enum SourceState<G: GameLogic> {
    PreCopied {
        base: Box<CellState<G>>,
        since: TickId,
    },
    Ready {
        base: Box<CellState<G>>,
    },
    Frozen {
        moved: Vec<Msg<G>>,
        since: TickId,
        entities: usize,
    },
}

struct SourceOp<G: GameLogic> {
    id: HandoverId,
    to: ShardRef,
    epoch: u32,
    state: SourceState<G>,
}

enum TargetState<G: GameLogic> {
    Shadow(Box<CellState<G>>),
    Prepared(Box<CellState<G>>),
}

struct TargetOp<G: GameLogic> {
    id: HandoverId,
    from: ShardRef,
    state: TargetState<G>,
    since: TickId,
    /// Messages sent to this shard for the cell while it was a shadow
    /// (routed here ahead of the registry, or by a forward pointer): kept
    /// apart, because the diff replaces the shadow's queues with the
    /// source's. They join the cell at activation, and go to the source
    /// (still the owner) if the handover is dropped.
    arrived: Vec<Msg<G>>,
}

/// One shard's side of every handover it takes part in.
pub struct HandoverAgent<G: GameLogic> {
    shard: ShardRef,
    sources: BTreeMap<CellId, SourceOp<G>>,
    targets: BTreeMap<CellId, TargetOp<G>>,
    counters: HandoverCounters,
    /// Ticks a step may take before the agent gives up on its side.
    pub timeout_ticks: u64,
    /// Most shadows held at once (beyond: refuse, "overloaded").
    pub shadows_max: usize,
}

impl<G: GameLogic> HandoverAgent<G> {
    /// The agent of shard `shard`.
    pub fn new(shard: ShardRef) -> Self {
        Self {
            shard,
            sources: BTreeMap::new(),
            targets: BTreeMap::new(),
            counters: HandoverCounters::default(),
            timeout_ticks: 100,
            shadows_max: 16,
        }
    }

    /// The counters.
    pub fn counters(&self) -> HandoverCounters {
        self.counters
    }

    /// True if `cell` is in a handover on this shard (either side).
    pub fn busy(&self, cell: CellId) -> bool {
        self.sources.contains_key(&cell) || self.targets.contains_key(&cell)
    }

    /// Handovers this shard is the source of.
    pub fn sourcing(&self) -> usize {
        self.sources.len()
    }

    /// Handovers in progress on this shard.
    pub fn in_progress(&self) -> usize {
        self.sources.len() + self.targets.len()
    }

    /// A message for a cell this shard holds as a prepared shadow (the
    /// registry may already route to us before our commit arrives): kept in
    /// the shadow's InputQueue. Handed back otherwise.
    pub fn deliver_to_shadow(&mut self, cell: CellId, msg: Msg<G>) -> Result<(), Msg<G>> {
        match self.targets.get_mut(&cell).map(|op| &mut op.state) {
            Some(_) => {
                let op = self.targets.get_mut(&cell).expect("matched");
                op.arrived.push(msg);
                Ok(())
            }
            None => Err(msg),
        }
    }

    /// Prepared shadows: (cell, its state), for checkers.
    pub fn prepared(&self) -> impl Iterator<Item = (CellId, &CellState<G>)> + '_ {
        self.targets
            .iter()
            .filter_map(|(cell, op)| match &op.state {
                TargetState::Prepared(s) => Some((*cell, s.as_ref())),
                TargetState::Shadow(_) => None,
            })
    }

    /// Transfers sent to this shard for cells it is a handover target of
    /// (waiting to join the cell, or to go back to the source), for
    /// checkers.
    pub fn arrived_transfers(&self) -> impl Iterator<Item = (CellId, crate::ids::EntityId)> + '_ {
        self.targets.iter().flat_map(|(cell, op)| {
            crate::cell::queued_transfer_ids(&op.arrived).map(move |id| (*cell, id))
        })
    }

    /// Entities held in shadows (not authoritative), for checkers.
    pub fn shadow_entities(&self) -> impl Iterator<Item = (CellId, crate::ids::EntityId)> + '_ {
        self.targets.iter().flat_map(|(cell, op)| {
            let st = match &op.state {
                TargetState::Shadow(s) | TargetState::Prepared(s) => s,
            };
            st.entities.iter().map(move |e| (*cell, e.id))
        })
    }

    fn stale(&mut self, what: &str, cell: CellId) {
        self.counters.stale_ignored += 1;
        tracing::debug!(shard = %self.shard, %cell, what, "stale handover message ignored");
    }

    /// Handles a coordinator order about a handover (Begin, Commit, Abort).
    /// Split and merge orders are the node core's, not the agent's: they
    /// are refused here as stale.
    pub fn handle_order(
        &mut self,
        world: &mut ShardWorld<G>,
        order: Order,
        tick: TickId,
    ) -> Vec<AgentOutput<G>> {
        let mut out = Vec::new();
        match order {
            Order::Begin {
                id,
                cell,
                to,
                epoch,
            } => self.on_begin(world, id, cell, to, epoch, tick, &mut out),
            Order::Commit { id, cell, epoch } => self.on_commit(world, id, cell, epoch, &mut out),
            Order::Abort { id, cell, reason } => self.on_abort(world, id, cell, reason, &mut out),
            Order::Split { cell, .. } | Order::Merge { parent: cell, .. } => {
                self.stale("reshape order", cell)
            }
            Order::Promote { cells, .. } => {
                for (cell, _) in cells {
                    self.stale("promote order", cell);
                }
            }
            Order::Reclaim { cell, .. } => self.stale("reclaim order", cell),
        }
        out
    }

    /// Handles a message from the other side of a handover.
    pub fn handle_peer(
        &mut self,
        world: &mut ShardWorld<G>,
        msg: PeerMsg<G>,
        tick: TickId,
    ) -> Vec<AgentOutput<G>> {
        let mut out = Vec::new();
        match msg {
            PeerMsg::PreCopy {
                id,
                cell,
                from,
                epoch: _,
                state,
            } => self.on_precopy(world, id, cell, from, state, tick, &mut out),
            PeerMsg::Ready { id, cell } => self.on_ready(id, cell, tick),
            PeerMsg::Refuse { id, cell, reason } => match self.sources.get(&cell) {
                Some(op) if op.id == id => self.abort_source(world, cell, reason, &mut out),
                _ => self.stale("refuse", cell),
            },
            PeerMsg::Diff { id, cell, diff } => self.on_diff(id, cell, *diff, tick, &mut out),
            PeerMsg::Abort { id, cell, reason } => self.on_abort(world, id, cell, reason, &mut out),
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn on_begin(
        &mut self,
        world: &mut ShardWorld<G>,
        id: HandoverId,
        cell: CellId,
        to: ShardRef,
        epoch: u32,
        tick: TickId,
        out: &mut Vec<AgentOutput<G>>,
    ) {
        let current = world.epoch(cell);
        if current != Some(epoch) || world.is_frozen(cell) || self.busy(cell) || to == self.shard {
            self.stale("begin", cell);
            out.push(AgentOutput::Report(Report::Aborted {
                id,
                cell,
                reason: AbortReason::Stale,
            }));
            return;
        }
        let state = world.cell(cell).expect("owned: it has an epoch").state();
        self.counters.begun += 1;
        self.sources.insert(
            cell,
            SourceOp {
                id,
                to,
                epoch,
                state: SourceState::PreCopied {
                    base: Box::new(state.clone()),
                    since: tick,
                },
            },
        );
        tracing::info!(shard = %self.shard, %cell, %to, epoch, handover = id.0, entities = state.entity_count(), "handover: pre-copy");
        out.push(AgentOutput::ToShard(
            to,
            PeerMsg::PreCopy {
                id,
                cell,
                from: self.shard,
                epoch,
                state: Box::new(state),
            },
        ));
    }

    #[allow(clippy::too_many_arguments)]
    fn on_precopy(
        &mut self,
        world: &ShardWorld<G>,
        id: HandoverId,
        cell: CellId,
        from: ShardRef,
        state: Box<CellState<G>>,
        tick: TickId,
        out: &mut Vec<AgentOutput<G>>,
    ) {
        let refusal = if world.owns(cell) || self.busy(cell) {
            Some(AbortReason::Refused)
        } else if self.targets.len() >= self.shadows_max {
            Some(AbortReason::Overloaded)
        } else {
            None
        };
        if let Some(reason) = refusal {
            self.counters.refused += 1;
            out.push(AgentOutput::ToShard(
                from,
                PeerMsg::Refuse { id, cell, reason },
            ));
            return;
        }
        self.targets.insert(
            cell,
            TargetOp {
                id,
                from,
                state: TargetState::Shadow(state),
                since: tick,
                arrived: Vec::new(),
            },
        );
        out.push(AgentOutput::ToShard(from, PeerMsg::Ready { id, cell }));
    }

    fn on_ready(&mut self, id: HandoverId, cell: CellId, tick: TickId) {
        let Some(op) = self.sources.get_mut(&cell).filter(|op| op.id == id) else {
            self.stale("ready", cell);
            return;
        };
        let placeholder = SourceState::Frozen {
            moved: Vec::new(),
            since: tick,
            entities: 0,
        };
        match std::mem::replace(&mut op.state, placeholder) {
            SourceState::PreCopied { base, .. } => op.state = SourceState::Ready { base },
            other => {
                op.state = other;
                self.stale("ready", cell);
            }
        }
    }

    fn on_diff(
        &mut self,
        id: HandoverId,
        cell: CellId,
        diff: crate::cell::CellDiff<G>,
        tick: TickId,
        out: &mut Vec<AgentOutput<G>>,
    ) {
        let Some(op) = self.targets.get_mut(&cell).filter(|op| op.id == id) else {
            self.stale("diff", cell);
            return;
        };
        let placeholder = TargetState::Prepared(Box::new(empty_state(cell)));
        match std::mem::replace(&mut op.state, placeholder) {
            TargetState::Shadow(mut state) => {
                state.apply(diff);
                op.state = TargetState::Prepared(state);
                op.since = tick;
                out.push(AgentOutput::Report(Report::Prepared {
                    id,
                    cell,
                    repeat: false,
                }));
            }
            prepared @ TargetState::Prepared(_) => {
                op.state = prepared;
                self.stale("diff", cell);
            }
        }
    }

    fn on_commit(
        &mut self,
        world: &mut ShardWorld<G>,
        id: HandoverId,
        cell: CellId,
        epoch: u32,
        out: &mut Vec<AgentOutput<G>>,
    ) {
        let mut known = false;
        if self.targets.get(&cell).is_some_and(|op| op.id == id) {
            known = true;
            let op = self.targets.remove(&cell).expect("checked");
            match op.state {
                TargetState::Prepared(mut state) => {
                    state.input_queue.extend(op.arrived);
                    let layout = world.layout().clone();
                    world.insert_cell(Cell::from_state(*state, &layout));
                    world.set_epoch(cell, epoch);
                    self.counters.activated += 1;
                    tracing::info!(shard = %self.shard, %cell, epoch, handover = id.0, "handover: target took over");
                    out.push(AgentOutput::Report(Report::Activated { id, cell }));
                }
                TargetState::Shadow(_) => {
                    // Committed without our diff: impossible with a sound
                    // coordinator; keep nothing, say so loudly.
                    tracing::error!(shard = %self.shard, %cell, handover = id.0, "commit before the diff: shadow dropped");
                }
            }
        }
        if self.sources.get(&cell).is_some_and(|op| op.id == id) {
            known = true;
            self.sources.remove(&cell);
            let mut forwarded = 0;
            if let Some(mut c) = world.take_cell(cell) {
                let late = c.take_inputs();
                forwarded = late.len();
                if !late.is_empty() {
                    out.push(AgentOutput::Forward(cell, late));
                }
            }
            self.counters.released += 1;
            tracing::info!(shard = %self.shard, %cell, epoch, handover = id.0, forwarded, "handover: source released the cell");
            out.push(AgentOutput::Report(Report::Released {
                id,
                cell,
                forwarded,
            }));
        }
        if !known {
            self.stale("commit", cell);
        }
    }

    fn on_abort(
        &mut self,
        world: &mut ShardWorld<G>,
        id: HandoverId,
        cell: CellId,
        reason: AbortReason,
        out: &mut Vec<AgentOutput<G>>,
    ) {
        let mut known = false;
        if self.targets.get(&cell).is_some_and(|op| op.id == id) {
            known = true;
            let op = self.targets.remove(&cell).expect("checked");
            self.counters.aborted += 1;
            if !op.arrived.is_empty() {
                out.push(AgentOutput::Forward(cell, op.arrived));
            }
            out.push(AgentOutput::Report(Report::Aborted { id, cell, reason }));
        }
        if self.sources.get(&cell).is_some_and(|op| op.id == id) {
            known = true;
            self.abort_source(world, cell, reason, out);
        }
        if !known {
            self.stale("abort", cell);
        }
    }

    /// True if this shard is the source of a handover of `cell` that has
    /// not frozen it yet (pre-copy sent, or target ready): the cell is
    /// still this shard's to run.
    pub fn source_unfrozen(&self, cell: CellId) -> bool {
        self.sources
            .get(&cell)
            .is_some_and(|op| !matches!(op.state, SourceState::Frozen { .. }))
    }

    /// The handover this shard is the source of for `cell`, if any.
    pub fn source_id(&self, cell: CellId) -> Option<HandoverId> {
        self.sources.get(&cell).map(|op| op.id)
    }

    /// Forgets this shard's side of the handover of `cell` as its source
    /// (the cell is replaced by a newer copy).
    pub fn forget_source(&mut self, cell: CellId) {
        if self.sources.remove(&cell).is_some() {
            self.counters.aborted += 1;
        }
    }

    /// Takes back a cell this shard was handing over to a shard that was
    /// lost (the coordinator gave it back): unfrozen, the inputs it had
    /// buffered first again, nothing sent to the lost side.
    pub fn reclaim(&mut self, world: &mut ShardWorld<G>, id: HandoverId, cell: CellId) -> bool {
        if self.sources.get(&cell).is_none_or(|op| op.id != id) {
            self.stale("reclaim", cell);
            return false;
        }
        let Some(op) = self.sources.remove(&cell) else {
            return false;
        };
        if let SourceState::Frozen { moved, .. } = op.state {
            if let Some(c) = world.cell_mut(cell) {
                c.restore_inputs(moved);
            }
            world.unfreeze(cell);
        }
        self.counters.aborted += 1;
        tracing::warn!(shard = %self.shard, %cell, handover = op.id.0, to = %op.to, "handover target lost before its backup held the cell: taken back");
        true
    }

    fn abort_source(
        &mut self,
        world: &mut ShardWorld<G>,
        cell: CellId,
        reason: AbortReason,
        out: &mut Vec<AgentOutput<G>>,
    ) {
        let Some(op) = self.sources.remove(&cell) else {
            return;
        };
        if let SourceState::Frozen { moved, .. } = op.state {
            if let Some(c) = world.cell_mut(cell) {
                c.restore_inputs(moved);
            }
            world.unfreeze(cell);
        }
        self.counters.aborted += 1;
        tracing::warn!(shard = %self.shard, %cell, reason = ?reason, handover = op.id.0, "handover aborted: the source keeps the cell");
        out.push(AgentOutput::ToShard(
            op.to,
            PeerMsg::Abort {
                id: op.id,
                cell,
                reason,
            },
        ));
        out.push(AgentOutput::Report(Report::Aborted {
            id: op.id,
            cell,
            reason,
        }));
    }

    /// Called after each tick of the shard: freezes the cells whose target
    /// is ready and sends their diff; gives up on steps that took too long.
    pub fn after_tick(&mut self, world: &mut ShardWorld<G>, tick: TickId) -> Vec<AgentOutput<G>> {
        let mut out = Vec::new();
        let ready: Vec<CellId> = self
            .sources
            .iter()
            .filter(|(_, op)| matches!(op.state, SourceState::Ready { .. }))
            .map(|(c, _)| *c)
            .collect();
        for cell in ready {
            let op = self.sources.get_mut(&cell).expect("listed");
            let SourceState::Ready { base } = std::mem::replace(
                &mut op.state,
                SourceState::Frozen {
                    moved: Vec::new(),
                    since: tick,
                    entities: 0,
                },
            ) else {
                continue;
            };
            if !world.freeze(cell) {
                let id = op.id;
                self.stale("freeze of a cell not owned", cell);
                self.sources.remove(&cell);
                out.push(AgentOutput::Report(Report::Aborted {
                    id,
                    cell,
                    reason: AbortReason::Stale,
                }));
                continue;
            }
            let c = world.cell_mut(cell).expect("frozen so owned");
            let diff = c.diff(&base);
            // The buffered inputs travel in the diff; keep a copy in case of abort.
            let moved = c.take_inputs();
            let entities = c.entities().len();
            op.state = SourceState::Frozen {
                moved,
                since: tick,
                entities,
            };
            let (id, to, epoch) = (op.id, op.to, op.epoch);
            out.push(AgentOutput::ToShard(
                to,
                PeerMsg::Diff {
                    id,
                    cell,
                    diff: Box::new(diff),
                },
            ));
            out.push(AgentOutput::Report(Report::Frozen {
                id,
                cell,
                epoch,
                tick,
                entities,
                repeat: false,
            }));
        }
        // Sides waiting for the outcome say so now and then: the coordinator
        // answers from the registry even if it lost track of the handover.
        let every = (self.timeout_ticks / 4).max(1);
        for (cell, op) in self.sources.iter_mut() {
            if let SourceState::Frozen {
                since, entities, ..
            } = &mut op.state
            {
                if tick.0 >= since.0 + every {
                    *since = tick;
                    out.push(AgentOutput::Report(Report::Frozen {
                        id: op.id,
                        cell: *cell,
                        epoch: op.epoch,
                        tick,
                        entities: *entities,
                        repeat: true,
                    }));
                }
            }
        }
        for (cell, op) in self.targets.iter_mut() {
            if matches!(op.state, TargetState::Prepared(_)) && tick.0 >= op.since.0 + every {
                op.since = tick;
                out.push(AgentOutput::Report(Report::Prepared {
                    id: op.id,
                    cell: *cell,
                    repeat: true,
                }));
            }
        }
        let late_sources: Vec<CellId> = self
            .sources
            .iter()
            .filter(|(_, op)| matches!(op.state, SourceState::PreCopied { since, .. } if tick.0 > since.0 + self.timeout_ticks))
            .map(|(c, _)| *c)
            .collect();
        for cell in late_sources {
            self.abort_source(world, cell, AbortReason::Timeout, &mut out);
        }
        let late_targets: Vec<CellId> = self
            .targets
            .iter()
            .filter(|(_, op)| {
                matches!(op.state, TargetState::Shadow(_))
                    && tick.0 > op.since.0 + self.timeout_ticks
            })
            .map(|(c, _)| *c)
            .collect();
        for cell in late_targets {
            // No diff came: drop the shadow (a Prepared shadow waits for the
            // coordinator, which commits or aborts).
            let op = self.targets.remove(&cell).expect("listed");
            self.counters.aborted += 1;
            if !op.arrived.is_empty() {
                out.push(AgentOutput::Forward(cell, op.arrived));
            }
            out.push(AgentOutput::Report(Report::Aborted {
                id: op.id,
                cell,
                reason: AbortReason::Timeout,
            }));
            // The source may still wait for our Ready: let it go now rather
            // than at its own timeout.
            out.push(AgentOutput::ToShard(
                op.from,
                PeerMsg::Refuse {
                    id: op.id,
                    cell,
                    reason: AbortReason::Timeout,
                },
            ));
        }
        out
    }
}

fn empty_state<G: GameLogic>(cell: CellId) -> CellState<G> {
    let layout =
        crate::geometry::Layout::new(crate::geometry::Geometry::new(cell.world, 1.0, 1, 1));
    Cell::<G>::new(cell, &layout, 0).into_state()
}
