//! Continuous replication of a shard's cells to a backup shard on another
//! node, and the backup's side (DESIGN.md section 8).
//!
//! Every `every` ticks, right after the tick, the owner sends its backup one
//! [`ReplicaMsg::Round`] covering every cell it owns: a cell's whole state
//! the first time (or after a resync), then the same diffs a handover uses
//! (entities changed and removed since the previous round, the rest of the
//! state whole). One round holds every cell of the shard, so the backup
//! always has a cut of the shard taken at one tick: an entity that moved
//! between two cells of the shard is in exactly one of them.
//!
//! The backup applies rounds in sequence and acknowledges each; a round it
//! cannot apply (a gap after a reconnect, a backup that restarted) makes it
//! ask for a full one. When the coordinator declares the owner lost, it
//! orders the backup to promote its replicas ([`Order::Promote`](crate::control::Order)).
//!
//! What leaves a cell for another shard after the last replicated tick is
//! the one thing a replica cannot undo, so the node core holds entity
//! transfers to other shards until the round covering their departure is
//! acknowledged, and keeps a copy (in the cell's state, so it is replicated
//! too) for `retain_ticks`: if either end is restored from a replica, the
//! copies are sent again and the receiver takes only the ones it does not
//! know.

use std::collections::BTreeMap;

use crate::cell::{Cell, CellDiff, CellState, Msg};
use crate::game::GameLogic;
use crate::geometry::CellId;
use crate::ids::TickId;
use crate::registry::ShardRef;
use crate::world::ShardWorld;

/// One cell in a replication round.
pub enum ReplicaBody<G: GameLogic> {
    /// The whole state.
    Full(Box<CellState<G>>),
    /// What changed since the previous round.
    Diff(Box<CellDiff<G>>),
}

/// A cell as a round carries it.
pub struct ReplicaCell<G: GameLogic> {
    /// Which cell of the owner this is.
    pub cell: CellId,
    /// The epoch its owner holds it at.
    pub epoch: u32,
    /// Its state or diff.
    pub body: ReplicaBody<G>,
}

/// Replication messages between an owner shard and its backup.
pub enum ReplicaMsg<G: GameLogic> {
    /// Owner -> backup: the shard's cells at the end of `tick`.
    Round {
        /// The owner.
        from: ShardRef,
        /// Numbers the rounds of this owner (from 1).
        seq: u64,
        /// The tick the cells were taken at.
        tick: TickId,
        /// True: replaces whatever the backup held of `from`.
        full: bool,
        /// The owner's process: a backup keeps what it holds of an earlier
        /// process (restarted under the same id) until those cells are
        /// promoted, since it is their only copy.
        incarnation: u64,
        /// Every cell the owner has (a cell not listed is no longer its).
        cells: Vec<ReplicaCell<G>>,
        /// Transfers the owner passed on for cells it no longer runs (a
        /// released handover's late messages), kept: sent again if the
        /// owner is lost.
        passing: Vec<crate::cell::Retained<G>>,
    },
    /// Backup -> owner: round `seq` is applied.
    Ack {
        /// The backup.
        from: ShardRef,
        /// The round.
        seq: u64,
    },
    /// Backup -> owner: a round could not be applied; send a full one.
    Resync {
        /// The backup.
        from: ShardRef,
    },
    /// Promoted backup -> every shard: shard `lost` is gone and its `cells`
    /// run on `from` again, restored from replicas of `tick`: send again
    /// the transfers kept for them, and those `lost` transmitted.
    Restored {
        /// The shard now running them.
        from: ShardRef,
        /// The lost shard.
        lost: ShardRef,
        /// The restored cells.
        cells: Vec<CellId>,
        /// The tick their replicas were taken at.
        tick: TickId,
    },
}

impl<G: GameLogic> ReplicaMsg<G> {
    /// A short name for logs and counters.
    pub fn kind(&self) -> &'static str {
        match self {
            ReplicaMsg::Round { .. } => "replica-round",
            ReplicaMsg::Ack { .. } => "replica-ack",
            ReplicaMsg::Resync { .. } => "replica-resync",
            ReplicaMsg::Restored { .. } => "restored",
        }
    }
}

impl<G: GameLogic> std::fmt::Debug for ReplicaMsg<G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplicaMsg::Round {
                from,
                seq,
                tick,
                full,
                cells,
                ..
            } => write!(
                f,
                "Replica::Round(from {from}, seq {seq}, tick {}, full {full}, {} cells)",
                tick.0,
                cells.len()
            ),
            ReplicaMsg::Ack { from, seq } => write!(f, "Replica::Ack(from {from}, seq {seq})"),
            ReplicaMsg::Resync { from } => write!(f, "Replica::Resync(from {from})"),
            ReplicaMsg::Restored {
                from, cells, tick, ..
            } => write!(
                f,
                "Replica::Restored(from {from}, {} cells, tick {})",
                cells.len(),
                tick.0
            ),
        }
    }
}

/// What replication counted on one shard (both roles).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplicaCounters {
    /// Rounds sent as owner.
    pub rounds_sent: u64,
    /// Full rounds among them.
    pub full_rounds: u64,
    /// Entities carried (whole or changed) in those rounds.
    pub entities_sent: u64,
    /// Acks received from the backup.
    pub acks: u64,
    /// Rounds applied as backup.
    pub rounds_applied: u64,
    /// Rounds that could not be applied (gap, no base): a resync asked.
    pub resyncs: u64,
    /// Rounds ignored as backup (an older or repeated round, or from a
    /// shard this one does not back up).
    pub rounds_ignored: u64,
    /// Rounds from another process of an owner than the one whose cells
    /// the backup holds and the registry still gives it (an owner
    /// restarted under its id before those cells were promoted; or a late
    /// round of a dead process): turned away, the state kept.
    pub rounds_of_other_process: u64,
    /// Cells promoted from a replica.
    pub promoted: u64,
    /// Cells promoted without a replica (restarted empty).
    pub promoted_empty: u64,
    /// Transfers held until their departure was replicated.
    pub transfers_held: u64,
    /// Transfers sent again after a restore.
    pub transfers_resent: u64,
    /// Kept transfers too old to send again after a restore (their
    /// receiver might no longer recognise them).
    pub transfers_too_old_to_resend: u64,
    /// Cells dropped because the registry gave them (restored from a
    /// replica) to another shard while this one was cut off.
    pub cells_superseded: u64,
    /// Cells of a promotion order the registry no longer gives this shard
    /// at that epoch (a replayed or outdated order): ignored.
    pub promotions_stale: u64,
    /// Handovers into this shard reported durable again to a coordinator
    /// that took over while the registry still recorded their frozen copy
    /// (the first report went to its predecessor).
    pub durable_retold: u64,
    /// Cells of a lost handover target this shard had no replica of,
    /// reported again to a coordinator that took over before it settled
    /// them (they come back from their frozen copy).
    pub missing_retold: u64,
}

/// A player's view history is not replicated: it changes every tick and
/// is most of a player's bytes. A restored avatar's view starts again, so
/// its client gets one full snapshot (its baseline is unknown to the new
/// owner), then deltas.
pub fn without_view_history<C>(e: &mut crate::entity::Entity<C>) {
    if let Some(v) = e.view.as_mut() {
        **v = crate::view::ClientView::new(v.client);
    }
}

/// The owner's side: what was last sent to the backup.
pub struct Replicator<G: GameLogic> {
    me: ShardRef,
    backup: Option<ShardRef>,
    every: u64,
    seq: u64,
    acked: u64,
    full: bool,
    base: BTreeMap<CellId, CellState<G>>,
    counters: ReplicaCounters,
    incarnation: u64,
}

impl<G: GameLogic> Replicator<G> {
    /// The replicator of shard `me`, a round every `every` ticks (at least 1).
    pub fn new(me: ShardRef, every: u64) -> Self {
        Self {
            me,
            backup: None,
            every: every.max(1),
            seq: 0,
            acked: 0,
            full: true,
            base: BTreeMap::new(),
            counters: ReplicaCounters::default(),
            incarnation: 0,
        }
    }

    /// The process this shard runs in (as registered with the coordinator),
    /// sent with every round.
    pub fn set_incarnation(&mut self, incarnation: u64) {
        self.incarnation = incarnation;
    }

    /// The backup the registry names (None: no replication, as on one node).
    /// A new backup gets a full round first.
    pub fn set_backup(&mut self, backup: Option<ShardRef>) {
        if backup != self.backup {
            tracing::info!(shard = %self.me, backup = ?backup.map(|b| b.to_string()), "replication backup changed");
            self.backup = backup;
            self.full = true;
            self.base.clear();
            // What waits for an ack keeps waiting: for the new backup's
            // first (full) round, which covers it.
        }
    }

    /// The current backup.
    pub fn backup(&self) -> Option<ShardRef> {
        self.backup
    }

    /// The round that will cover the tick being run now.
    pub fn covering_seq(&self) -> u64 {
        self.seq + 1
    }

    /// The newest round the backup acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Replication and recovery counters of this shard (both roles: the
    /// node core counts its holds, resends and promotions here too).
    pub fn counters(&self) -> ReplicaCounters {
        self.counters
    }

    /// Counters, mutably (the node core counts holds and resends here).
    pub fn counters_mut(&mut self) -> &mut ReplicaCounters {
        &mut self.counters
    }

    /// After tick `tick`: the round for the backup, if one is due, or if
    /// `now` (something waits for the round: a transfer, an activation).
    pub fn round(
        &mut self,
        world: &ShardWorld<G>,
        passing: &std::collections::VecDeque<crate::cell::Retained<G>>,
        tick: TickId,
        now: bool,
    ) -> Option<(ShardRef, ReplicaMsg<G>)> {
        let backup = self.backup?;
        if !now && tick.0 % self.every != 0 {
            return None;
        }
        let full = std::mem::take(&mut self.full);
        if full {
            self.base.clear();
        }
        let mut cells = Vec::with_capacity(world.cells().size_hint().0);
        let mut entities = 0u64;
        for cell in world.cells() {
            let id = cell.id();
            let epoch = world.epoch(id).unwrap_or(0);
            let body = match self.base.get(&id) {
                Some(base) => {
                    let mut diff = cell.diff(base);
                    entities += diff.changed.len() as u64;
                    diff.changed.iter_mut().for_each(without_view_history);
                    ReplicaBody::Diff(Box::new(diff))
                }
                None => {
                    entities += cell.entities().len() as u64;
                    let mut state = cell.state();
                    state.entities.iter_mut().for_each(without_view_history);
                    ReplicaBody::Full(Box::new(state))
                }
            };
            cells.push(ReplicaCell {
                cell: id,
                epoch,
                body,
            });
            self.base.insert(id, cell.state());
        }
        let live: std::collections::BTreeSet<CellId> = world.cells().map(Cell::id).collect();
        self.base.retain(|c, _| live.contains(c));
        self.seq += 1;
        self.counters.rounds_sent += 1;
        self.counters.full_rounds += u64::from(full);
        self.counters.entities_sent += entities;
        Some((
            backup,
            ReplicaMsg::Round {
                from: self.me,
                seq: self.seq,
                tick,
                full,
                incarnation: self.incarnation,
                cells,
                passing: passing.iter().cloned().collect(),
            },
        ))
    }

    /// The backup acknowledged round `seq`.
    pub fn on_ack(&mut self, from: ShardRef, seq: u64) {
        if Some(from) == self.backup && seq <= self.seq {
            self.acked = self.acked.max(seq);
            self.counters.acks += 1;
        }
    }

    /// The backup asks for a full round.
    pub fn on_resync(&mut self, from: ShardRef) {
        if Some(from) == self.backup {
            self.full = true;
        }
    }
}

/// A replica of one owner shard's cells.
struct Source<G: GameLogic> {
    incarnation: u64,
    seq: u64,
    tick: TickId,
    cells: BTreeMap<CellId, (u32, CellState<G>)>,
    passing: Vec<crate::cell::Retained<G>>,
    /// Promoted at this tick: what is left (cells the lost shard was
    /// handing over) is kept a while, in case the handover's target was
    /// lost too and the coordinator falls back on these copies.
    retired: Option<TickId>,
}

/// A cell taken out of the store to be promoted.
pub struct Promotion<G: GameLogic> {
    /// The replicated state.
    pub state: CellState<G>,
    /// The tick it was taken at.
    pub tick: TickId,
}

/// The backup's side: the replicas it holds, by owner shard.
pub struct ReplicaStore<G: GameLogic> {
    me: ShardRef,
    sources: BTreeMap<ShardRef, Source<G>>,
}

impl<G: GameLogic> ReplicaStore<G> {
    /// The store of shard `me`.
    pub fn new(me: ShardRef) -> Self {
        Self {
            me,
            sources: BTreeMap::new(),
        }
    }

    /// Applies a round (other messages are not for the store: None);
    /// returns the answer for the owner (an ack, or a resync when the
    /// round does not follow the last one applied). `owned_by_source` says
    /// whether a cell held of an earlier process of the owner is still
    /// needed (not yet promoted).
    pub fn on_round(
        &mut self,
        round: ReplicaMsg<G>,
        owned_by_source: impl Fn(CellId) -> bool,
        counters: &mut ReplicaCounters,
    ) -> Option<ReplicaMsg<G>> {
        let ReplicaMsg::Round {
            from,
            seq,
            tick,
            full,
            incarnation,
            cells,
            passing,
        } = round
        else {
            return None;
        };
        self.apply_round(
            from,
            seq,
            tick,
            full,
            incarnation,
            cells,
            passing,
            owned_by_source,
            counters,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_round(
        &mut self,
        from: ShardRef,
        seq: u64,
        tick: TickId,
        full: bool,
        incarnation: u64,
        cells: Vec<ReplicaCell<G>>,
        passing: Vec<crate::cell::Retained<G>>,
        owned_by_source: impl Fn(CellId) -> bool,
        counters: &mut ReplicaCounters,
    ) -> Option<ReplicaMsg<G>> {
        if let Some(s) = self.sources.get(&from) {
            if s.incarnation != incarnation {
                if s.retired.is_none() && s.cells.keys().any(|c| owned_by_source(*c)) {
                    // The owner restarted under its id before its old
                    // process's cells were promoted: this replica is their
                    // only copy. The new process starts over (a full round)
                    // until they are.
                    counters.rounds_of_other_process += 1;
                    return Some(ReplicaMsg::Resync { from: self.me });
                }
                // Promoted (or nothing of it is still the owner's): the
                // leftovers go, the new process starts with a full round.
                self.sources.remove(&from);
                if !full {
                    counters.resyncs += 1;
                    return Some(ReplicaMsg::Resync { from: self.me });
                }
            } else if s.retired.is_some() {
                // A late round of the promoted process: what is left
                // serves the promotion's leftovers.
                counters.rounds_ignored += 1;
                return None;
            }
        }
        // The same process: numbers only go up.
        if full && self.sources.get(&from).is_some_and(|s| seq <= s.seq) {
            // A late or repeated full round must not undo newer state.
            counters.rounds_ignored += 1;
            return None;
        }
        if !full {
            match self.sources.get(&from) {
                // Repeated or late.
                Some(s) if seq <= s.seq => {
                    counters.rounds_ignored += 1;
                    return None;
                }
                Some(s) if seq == s.seq + 1 => {}
                _ => {
                    counters.resyncs += 1;
                    self.sources.remove(&from);
                    return Some(ReplicaMsg::Resync { from: self.me });
                }
            }
        }
        let mut old = match (full, self.sources.remove(&from)) {
            (false, Some(s)) => s.cells,
            _ => BTreeMap::new(),
        };
        let mut next = BTreeMap::new();
        for c in cells {
            let state = match (c.body, old.remove(&c.cell)) {
                (ReplicaBody::Full(state), _) => *state,
                (ReplicaBody::Diff(diff), Some((_, mut base))) => {
                    base.apply(*diff);
                    base
                }
                (ReplicaBody::Diff(_), None) => {
                    counters.resyncs += 1;

                    return Some(ReplicaMsg::Resync { from: self.me });
                }
            };
            next.insert(c.cell, (c.epoch, state));
        }
        self.sources.insert(
            from,
            Source {
                incarnation,
                seq,
                tick,
                cells: next,
                passing,
                retired: None,
            },
        );
        counters.rounds_applied += 1;
        Some(ReplicaMsg::Ack { from: self.me, seq })
    }

    /// Takes the replica of `cell` held for `from` (a promoted source's
    /// leftovers too: a later order may restore one of its cells, a
    /// handover's target lost with it).
    pub fn take(&mut self, from: ShardRef, cell: CellId) -> Option<Promotion<G>> {
        let s = self.sources.get_mut(&from)?;
        let tick = s.tick;
        s.cells
            .remove(&cell)
            .map(|(_, state)| Promotion { state, tick })
    }

    /// The transfers `from` had passed on for cells it no longer ran,
    /// as its last round carried them.
    pub fn passing_of(&self, from: ShardRef) -> Vec<crate::cell::Retained<G>> {
        self.sources
            .get(&from)
            .map(|s| s.passing.clone())
            .unwrap_or_default()
    }

    /// After the promotion of `from` at `tick`: the cells left (not
    /// promoted) with copies of the transfers waiting in them. They stay
    /// until [`Self::prune`] forgets them; rounds from `from` are no longer
    /// applied.
    pub fn retire(&mut self, from: ShardRef, tick: TickId) -> Vec<(CellId, Vec<Msg<G>>)> {
        let Some(s) = self.sources.get_mut(&from) else {
            return Vec::new();
        };
        s.retired.get_or_insert(tick);
        s.cells
            .iter()
            .map(|(c, (_, st))| {
                let transfers = st
                    .input_queue
                    .iter()
                    .filter(|m| matches!(m, crate::messages::CellMessage::Transfer(_)))
                    .cloned()
                    .collect();
                (*c, transfers)
            })
            .collect()
    }

    /// Forgets retired replicas older than `keep` ticks.
    pub fn prune(&mut self, now: TickId, keep: u64) {
        self.sources
            .retain(|_, s| s.retired.is_none_or(|t| t.0.saturating_add(keep) >= now.0));
    }

    /// The tick of the newest round applied from `from`.
    pub fn tick_of(&self, from: ShardRef) -> Option<TickId> {
        self.sources.get(&from).map(|s| s.tick)
    }

    /// Keeps only the replicas `keep` says (given each owner and the cells
    /// held of it).
    pub fn retain_sources(&mut self, keep: impl Fn(ShardRef, &[CellId]) -> bool) {
        self.sources.retain(|s, src| {
            let cells: Vec<CellId> = src.cells.keys().copied().collect();
            keep(*s, &cells)
        });
    }

    /// Forgets what is left of promoted owners that `alive` says run again
    /// (a new incarnation the registry gives cells): those leftovers are
    /// older than anything the new incarnation held, never to be restored.
    pub fn forget_retired(&mut self, alive: impl Fn(ShardRef) -> bool) {
        self.sources
            .retain(|s, src| src.retired.is_none() || !alive(*s));
    }

    /// A message for a cell this shard holds a replica of and that the
    /// registry already names this shard for (its promotion order is on
    /// the way): kept in the replica's InputQueue. Handed back otherwise.
    pub fn deliver(&mut self, cell: CellId, msg: Msg<G>) -> Result<(), Msg<G>> {
        for s in self.sources.values_mut() {
            if let Some((_, state)) = s.cells.get_mut(&cell) {
                state.input_queue.push(msg);
                return Ok(());
            }
        }
        Err(msg)
    }

    /// Owners replicated here, with the number of cells and entities held.
    pub fn summary(&self) -> Vec<(ShardRef, usize, usize)> {
        self.sources
            .iter()
            .map(|(s, src)| {
                (
                    *s,
                    src.cells.len(),
                    src.cells.values().map(|(_, st)| st.entities.len()).sum(),
                )
            })
            .collect()
    }

    /// Transfers kept in replicas (entity, the cell that sent it, where
    /// to), for failure messages.
    pub fn kept(&self) -> Vec<(ShardRef, CellId, crate::ids::EntityId, CellId)> {
        let mut out = Vec::new();
        for (s, src) in &self.sources {
            for (c, (_, st)) in &src.cells {
                for r in &st.retained {
                    out.push((*s, *c, r.transfer.entity.id, r.to));
                }
            }
        }
        out
    }

    /// Entities held in replicas (not authoritative), for checkers.
    pub fn entities(&self) -> impl Iterator<Item = (ShardRef, CellId, crate::ids::EntityId)> + '_ {
        self.sources.iter().flat_map(|(s, src)| {
            src.cells
                .iter()
                .flat_map(move |(c, (_, st))| st.entities.iter().map(move |e| (*s, *c, e.id)))
        })
    }
}
