//! Live cell handover between shards, sans-IO.
//!
//! `PreCopy(state) -> Freeze -> Diff -> Commit(epoch + 1) -> route swap ->
//! Unfreeze`, with `Abort` back to the old owner at any step before Commit.
//!
//! - The coordinator sends **Begin** to the source (old owner) with the
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

use crate::cell::{Cell, CellDiff, CellState, Msg};
use crate::game::GameLogic;
use crate::geometry::CellId;
use crate::ids::TickId;
use crate::world::ShardWorld;

/// Identifies one handover (chosen by the coordinator).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HandoverId(pub u64);

/// Why a handover was refused or aborted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbortReason {
    /// The target refused (it already has the cell, or is busy).
    Refused,
    /// A step did not happen in time.
    Timeout,
    /// The target is overloaded.
    Overloaded,
    /// The order named an epoch that is no longer current, or a cell the
    /// source does not own.
    Stale,
    /// An operator or a newer decision replaced it.
    Superseded,
}

/// A handover message between the coordinator, the source and the target.
pub enum HandoverMsg<G: GameLogic> {
    /// Coordinator -> source: hand `cell`, held at `epoch`, to shard `to`.
    Begin {
        /// The handover.
        id: HandoverId,
        /// The cell.
        cell: CellId,
        /// The target shard.
        to: u16,
        /// The cell's current epoch.
        epoch: u32,
    },
    /// Source -> target: the cell's state, taken while it keeps running.
    PreCopy {
        /// The handover.
        id: HandoverId,
        /// The cell.
        cell: CellId,
        /// The source shard.
        from: u16,
        /// The cell's epoch.
        epoch: u32,
        /// The state.
        state: Box<CellState<G>>,
    },
    /// Target -> source: shadow built, freeze when you like.
    Ready {
        /// The handover.
        id: HandoverId,
        /// The cell.
        cell: CellId,
    },
    /// Target -> source: will not take the cell.
    Refuse {
        /// The handover.
        id: HandoverId,
        /// The cell.
        cell: CellId,
        /// Why.
        reason: AbortReason,
    },
    /// Source -> target: what changed since the pre-copy, taken frozen.
    Diff {
        /// The handover.
        id: HandoverId,
        /// The cell.
        cell: CellId,
        /// The changes.
        diff: Box<CellDiff<G>>,
    },
    /// Coordinator -> source and target: the registry now names the target,
    /// at `epoch`.
    Commit {
        /// The handover.
        id: HandoverId,
        /// The cell.
        cell: CellId,
        /// The new epoch.
        epoch: u32,
    },
    /// Coordinator (or source) -> source and target: roll back.
    Abort {
        /// The handover.
        id: HandoverId,
        /// The cell.
        cell: CellId,
        /// Why.
        reason: AbortReason,
    },
}

impl<G: GameLogic> HandoverMsg<G> {
    /// A short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            HandoverMsg::Begin { .. } => "begin",
            HandoverMsg::PreCopy { .. } => "precopy",
            HandoverMsg::Ready { .. } => "ready",
            HandoverMsg::Refuse { .. } => "refuse",
            HandoverMsg::Diff { .. } => "diff",
            HandoverMsg::Commit { .. } => "commit",
            HandoverMsg::Abort { .. } => "abort",
        }
    }

    /// The cell concerned.
    pub fn cell(&self) -> CellId {
        match self {
            HandoverMsg::Begin { cell, .. }
            | HandoverMsg::PreCopy { cell, .. }
            | HandoverMsg::Ready { cell, .. }
            | HandoverMsg::Refuse { cell, .. }
            | HandoverMsg::Diff { cell, .. }
            | HandoverMsg::Commit { cell, .. }
            | HandoverMsg::Abort { cell, .. } => *cell,
        }
    }
}

/// What a shard tells the coordinator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandoverReport {
    /// The source froze the cell at the end of `tick` (repeated while it
    /// waits for the outcome, so that a coordinator that lost track of the
    /// handover settles it from the registry).
    Frozen {
        /// The handover.
        id: HandoverId,
        /// The cell.
        cell: CellId,
        /// The epoch the source holds the cell at.
        epoch: u32,
        /// The tick.
        tick: TickId,
        /// Entities in the cell.
        entities: usize,
        /// False for the first report, true for the repeats.
        repeat: bool,
    },
    /// The target holds the whole frozen state: ready to commit (repeated
    /// while it waits).
    Prepared {
        /// The handover.
        id: HandoverId,
        /// The cell.
        cell: CellId,
        /// False for the first report, true for the repeats.
        repeat: bool,
    },
    /// The target took over after the commit.
    Activated {
        /// The handover.
        id: HandoverId,
        /// The cell.
        cell: CellId,
    },
    /// The source dropped its copy after the commit.
    Released {
        /// The handover.
        id: HandoverId,
        /// The cell.
        cell: CellId,
        /// Messages that arrived after the diff, passed on to the target.
        forwarded: usize,
    },
    /// The handover will not happen (on this side).
    Aborted {
        /// The handover.
        id: HandoverId,
        /// The cell.
        cell: CellId,
        /// Why.
        reason: AbortReason,
    },
}

/// What the agent asks its shard to do.
pub enum AgentOutput<G: GameLogic> {
    /// Send to another shard.
    ToShard(u16, HandoverMsg<G>),
    /// Tell the coordinator.
    ToCoordinator(HandoverReport),
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
    to: u16,
    epoch: u32,
    state: SourceState<G>,
}

enum TargetState<G: GameLogic> {
    Shadow(Box<CellState<G>>),
    Prepared(Box<CellState<G>>),
}

struct TargetOp<G: GameLogic> {
    id: HandoverId,
    from: u16,
    state: TargetState<G>,
    since: TickId,
}

/// One shard's side of every handover it takes part in.
pub struct HandoverAgent<G: GameLogic> {
    shard: u16,
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
    pub fn new(shard: u16) -> Self {
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
            Some(TargetState::Prepared(state)) | Some(TargetState::Shadow(state)) => {
                state.input_queue.push(msg);
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
        tracing::debug!(shard = self.shard, %cell, what, "stale handover message ignored");
    }

    /// Handles a message addressed to this shard.
    pub fn handle(
        &mut self,
        world: &mut ShardWorld<G>,
        msg: HandoverMsg<G>,
        tick: TickId,
    ) -> Vec<AgentOutput<G>> {
        let mut out = Vec::new();
        match msg {
            HandoverMsg::Begin {
                id,
                cell,
                to,
                epoch,
            } => {
                let current = world.epoch(cell);
                if current != Some(epoch)
                    || world.is_frozen(cell)
                    || self.busy(cell)
                    || to == self.shard
                {
                    self.stale("begin", cell);
                    out.push(AgentOutput::ToCoordinator(HandoverReport::Aborted {
                        id,
                        cell,
                        reason: AbortReason::Stale,
                    }));
                    return out;
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
                tracing::info!(shard = self.shard, %cell, to, epoch, handover = id.0, entities = state.entity_count(), "handover: pre-copy");
                out.push(AgentOutput::ToShard(
                    to,
                    HandoverMsg::PreCopy {
                        id,
                        cell,
                        from: self.shard,
                        epoch,
                        state: Box::new(state),
                    },
                ));
            }
            HandoverMsg::PreCopy {
                id,
                cell,
                from,
                epoch,
                state,
            } => {
                if world.owns(cell) || self.busy(cell) {
                    self.counters.refused += 1;
                    out.push(AgentOutput::ToShard(
                        from,
                        HandoverMsg::Refuse {
                            id,
                            cell,
                            reason: AbortReason::Refused,
                        },
                    ));
                    return out;
                }
                if self.targets.len() >= self.shadows_max {
                    self.counters.refused += 1;
                    out.push(AgentOutput::ToShard(
                        from,
                        HandoverMsg::Refuse {
                            id,
                            cell,
                            reason: AbortReason::Overloaded,
                        },
                    ));
                    return out;
                }
                let _ = epoch;
                self.targets.insert(
                    cell,
                    TargetOp {
                        id,
                        from,
                        state: TargetState::Shadow(state),
                        since: tick,
                    },
                );
                out.push(AgentOutput::ToShard(from, HandoverMsg::Ready { id, cell }));
            }
            HandoverMsg::Ready { id, cell } => match self.sources.get_mut(&cell) {
                Some(op) if op.id == id => {
                    match std::mem::replace(
                        &mut op.state,
                        SourceState::Frozen {
                            moved: Vec::new(),
                            since: tick,
                            entities: 0,
                        },
                    ) {
                        SourceState::PreCopied { base, .. } => {
                            op.state = SourceState::Ready { base }
                        }
                        other => {
                            op.state = other;
                            self.stale("ready", cell);
                        }
                    }
                }
                _ => self.stale("ready", cell),
            },
            HandoverMsg::Refuse { id, cell, reason } => match self.sources.get(&cell) {
                Some(op) if op.id == id => {
                    self.abort_source(world, cell, reason, &mut out);
                }
                _ => self.stale("refuse", cell),
            },
            HandoverMsg::Diff { id, cell, diff } => match self.targets.get_mut(&cell) {
                Some(op) if op.id == id => {
                    if let TargetState::Shadow(mut state) = std::mem::replace(
                        &mut op.state,
                        TargetState::Prepared(Box::new(empty_state(cell))),
                    ) {
                        state.apply(*diff);
                        op.state = TargetState::Prepared(state);
                        op.since = tick;
                        out.push(AgentOutput::ToCoordinator(HandoverReport::Prepared {
                            id,
                            cell,
                            repeat: false,
                        }));
                    } else {
                        self.stale("diff", cell);
                    }
                }
                _ => self.stale("diff", cell),
            },
            HandoverMsg::Commit { id, cell, epoch } => {
                let mut known = false;
                if self.targets.get(&cell).is_some_and(|op| op.id == id) {
                    known = true;
                    let op = self.targets.remove(&cell).expect("checked");
                    match op.state {
                        TargetState::Prepared(state) => {
                            let layout = world.layout().clone();
                            world.insert_cell(Cell::from_state(*state, &layout));
                            world.set_epoch(cell, epoch);
                            self.counters.activated += 1;
                            tracing::info!(shard = self.shard, %cell, epoch, handover = id.0, "handover: target took over");
                            out.push(AgentOutput::ToCoordinator(HandoverReport::Activated {
                                id,
                                cell,
                            }));
                        }
                        TargetState::Shadow(_) => {
                            // Committed without our diff: impossible with a
                            // sound coordinator; keep nothing, say so loudly.
                            tracing::error!(shard = self.shard, %cell, handover = id.0, "commit before the diff: shadow dropped");
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
                    tracing::info!(shard = self.shard, %cell, epoch, handover = id.0, forwarded, "handover: source released the cell");
                    out.push(AgentOutput::ToCoordinator(HandoverReport::Released {
                        id,
                        cell,
                        forwarded,
                    }));
                }
                if !known {
                    self.stale("commit", cell);
                }
            }
            HandoverMsg::Abort { id, cell, reason } => {
                let mut known = false;
                if self.targets.get(&cell).is_some_and(|op| op.id == id) {
                    known = true;
                    self.targets.remove(&cell);
                    self.counters.aborted += 1;
                    out.push(AgentOutput::ToCoordinator(HandoverReport::Aborted {
                        id,
                        cell,
                        reason,
                    }));
                }
                if self.sources.get(&cell).is_some_and(|op| op.id == id) {
                    known = true;
                    self.abort_source(world, cell, reason, &mut out);
                }
                if !known {
                    self.stale("abort", cell);
                }
            }
        }
        out
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
        tracing::warn!(shard = self.shard, %cell, reason = ?reason, handover = op.id.0, "handover aborted: the source keeps the cell");
        out.push(AgentOutput::ToShard(
            op.to,
            HandoverMsg::Abort {
                id: op.id,
                cell,
                reason,
            },
        ));
        out.push(AgentOutput::ToCoordinator(HandoverReport::Aborted {
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
                out.push(AgentOutput::ToCoordinator(HandoverReport::Aborted {
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
                HandoverMsg::Diff {
                    id,
                    cell,
                    diff: Box::new(diff),
                },
            ));
            out.push(AgentOutput::ToCoordinator(HandoverReport::Frozen {
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
                    out.push(AgentOutput::ToCoordinator(HandoverReport::Frozen {
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
                out.push(AgentOutput::ToCoordinator(HandoverReport::Prepared {
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
            out.push(AgentOutput::ToCoordinator(HandoverReport::Aborted {
                id: op.id,
                cell,
                reason: AbortReason::Timeout,
            }));
            let _ = op.from;
        }
        out
    }
}

fn empty_state<G: GameLogic>(cell: CellId) -> CellState<G> {
    let layout =
        crate::geometry::Layout::new(crate::geometry::Geometry::new(cell.world, 1.0, 1, 1));
    Cell::<G>::new(cell, &layout, 0).into_state()
}
