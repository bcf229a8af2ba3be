//! The coordinator: orchestrates handovers, splits and merges, and decides
//! them from load reports.
//!
//! Pure: time is an argument (a report is stamped with the `now` it is
//! handled at), orders come out of [`Coordinator::poll_order`], and the
//! registry it owns changes only here (route swaps at commit, new
//! layouts after splits and merges).
//!
//! Load score of a cell (DESIGN.md section 7):
//! `0.5 * actors / actors_ref + 0.3 * pps / pps_ref + 0.2 * share * p99 / budget`,
//! where `share` is the cell's part of its shard's actors. A cell above
//! `split_score` for `split_sustain` splits into its four children (depth
//! permitting); a shard whose tick p99 stays above its budget share hands
//! its hottest movable cell to the coolest shard, preferring a cell that
//! borders cells the target already owns; four sibling leaves below
//! `merge_score` for `merge_after` are gathered on one shard and merged.
//! Cooldowns after every operation stop flapping.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_cells::control::{AbortReason, HandoverId, LoadReport, Order, Report};
use tessera_cells::registry::{Assignment, FrozenCopy, Registry, ShardRef};
use tessera_cells::CellId;

/// Tunables of the balancing policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Shards balancing may use (on one node: shards 0..N of node 0; a
    /// cluster's coordinator sets its members with
    /// [`Coordinator::set_members`]).
    pub shards: u16,
    /// Actors that make a cell "full" (score 0.5 from actors alone).
    pub actors_ref: f64,
    /// Inputs per second that make a cell busy (score 0.3 alone).
    pub pps_ref: f64,
    /// Score above which a cell is hot.
    pub split_score: f64,
    /// How long a cell must stay hot before it splits.
    pub split_sustain: Duration,
    /// Score below which four siblings may merge back.
    pub merge_score: f64,
    /// How long siblings must stay cold before they merge.
    pub merge_after: Duration,
    /// Deepest split.
    pub max_depth: u8,
    /// Tick p99 / budget above which a shard sheds a cell.
    pub shard_busy_ratio: f64,
    /// How long a shard must stay busy (or the node unbalanced) before it
    /// sheds.
    pub move_sustain: Duration,
    /// Difference of summed cell scores between the most and the least
    /// loaded shard above which a cell moves, even under the tick budget.
    pub imbalance: f64,
    /// No new operation on a cell for this long after one.
    pub cooldown: Duration,
    /// A handover step that takes longer is aborted.
    pub step_timeout: Duration,
    /// Decide automatically (off: only operator commands).
    pub automatic: bool,
    /// Watch nodes' heartbeats and recover the cells of lost ones (a
    /// cluster's coordinator; one node's embedded coordinator has no one to
    /// fail over to and leaves it off).
    pub watch_nodes: bool,
    /// A node silent this long is declared dead.
    pub dead_after: Duration,
    /// How long a heartbeat keeps a node's ownership valid (counted by the
    /// node from when it sent the heartbeat): the cells of a dead node move
    /// to their backups only after it.
    pub lease: Duration,
    /// Extra wait after the lease before reassigning (clock rate drift,
    /// the node's last tick).
    pub lease_margin: Duration,
}

impl Policy {
    /// Defaults for `shards` shards: a shard sheds load above N/(N+1) of its
    /// tick budget, so that the node keeps room to absorb one shard's load.
    pub fn new(shards: u16) -> Self {
        let n = f64::from(shards.max(1));
        Self {
            shards,
            actors_ref: 300.0,
            pps_ref: 4000.0,
            split_score: 1.0,
            split_sustain: Duration::from_secs(3),
            merge_score: 0.3,
            merge_after: Duration::from_secs(10),
            max_depth: 3,
            shard_busy_ratio: n / (n + 1.0),
            move_sustain: Duration::from_secs(2),
            imbalance: 1.5,
            cooldown: Duration::from_secs(5),
            step_timeout: Duration::from_secs(2),
            automatic: true,
            watch_nodes: false,
            dead_after: Duration::from_millis(500),
            lease: Duration::from_millis(1000),
            lease_margin: Duration::from_millis(100),
        }
    }
}

/// One finished handover, for logs, metrics and benchmarks.
#[derive(Clone, Debug, PartialEq)]
pub struct HandoverRecord {
    /// The handover.
    pub id: HandoverId,
    /// The cell.
    pub cell: CellId,
    /// From shard.
    pub from: ShardRef,
    /// To shard.
    pub to: ShardRef,
    /// New epoch (if committed).
    pub epoch: u32,
    /// Entities moved.
    pub entities: usize,
    /// Decision to commit.
    pub decision_to_commit: Duration,
    /// Freeze on the source to simulation on the target.
    pub freeze: Option<Duration>,
    /// Committed (else aborted).
    pub committed: bool,
    /// Abort reason.
    pub abort: Option<AbortReason>,
    /// Who decided: "policy" or "operator".
    pub cause: &'static str,
}

#[derive(Clone, Debug)]
struct MoveOp {
    cell: CellId,
    from: ShardRef,
    to: ShardRef,
    epoch: u32,
    decided: Instant,
    deadline: Instant,
    frozen: Option<Instant>,
    entities: usize,
    committed: Option<(Instant, u32)>,
    activated: bool,
    /// The target's backup holds the cell: the source may let go.
    durable: bool,
    cause: &'static str,
}

#[derive(Clone, Debug)]
struct ReshapeOp {
    shard: ShardRef,
    cell: CellId,
    split: bool,
    deadline: Instant,
}

#[derive(Clone, Copy, Debug, Default)]
struct Heat {
    score: f64,
    hot_since: Option<Instant>,
    cold_since: Option<Instant>,
}

/// Counters of the coordinator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoordinatorCounters {
    /// Handovers committed.
    pub handovers: u64,
    /// Handovers aborted.
    pub aborts: u64,
    /// Splits done.
    pub splits: u64,
    /// Merges done.
    pub merges: u64,
    /// Events about unknown or finished operations (ignored).
    pub stale_events: u64,
}

/// Why an operator command was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// Unknown cell.
    #[error("cell {0} is not a leaf of the current layout")]
    UnknownCell(CellId),
    /// Unknown shard.
    #[error("shard {0} does not exist")]
    UnknownShard(ShardRef),
    /// Already there, or in an operation.
    #[error("cell {cell} {why}")]
    Busy {
        /// The cell.
        cell: CellId,
        /// Why.
        why: &'static str,
    },
    /// A split or merge is not possible.
    #[error("{0}")]
    Impossible(String),
}

/// The coordinator.
pub struct Coordinator {
    registry: Registry,
    policy: Policy,
    moves: BTreeMap<HandoverId, MoveOp>,
    /// Cells pinned at the admin epoch by an operator.
    pinned: BTreeSet<CellId>,
    reshapes: BTreeMap<u64, ReshapeOp>,
    /// Merges waiting for their children to be gathered on one shard: the
    /// cause, and when to give up.
    gathering: BTreeMap<CellId, (&'static str, Instant)>,
    next_id: u64,
    heat: BTreeMap<CellId, Heat>,
    shard_busy_since: BTreeMap<ShardRef, Instant>,
    shard_ratio: BTreeMap<ShardRef, f64>,
    shard_score: BTreeMap<ShardRef, f64>,
    unbalanced_since: Option<Instant>,
    cooldown: BTreeMap<CellId, Instant>,
    orders: VecDeque<(ShardRef, Order)>,
    records: VecDeque<HandoverRecord>,
    log: VecDeque<String>,
    counters: CoordinatorCounters,
    members: Vec<ShardRef>,
    pub(crate) liveness: crate::liveness::Liveness,
    /// Nodes draining, since when.
    pub(crate) draining: BTreeMap<u16, Instant>,
}

impl Coordinator {
    /// A coordinator taking over `registry`: the cluster epoch goes up, and
    /// operation ids start in a range no earlier coordinator used, so that a
    /// late report about an operation of a dead coordinator can never be
    /// mistaken for one of ours.
    pub fn new(registry: Registry, policy: Policy) -> Self {
        let epoch = registry.cluster_epoch().saturating_add(1);
        Self::taking_over(registry, policy, epoch)
    }

    /// A coordinator elected with fencing token `epoch` (etcd's cluster
    /// epoch): the registry's cluster epoch becomes it (at least one more
    /// than the registry had), so every order of an earlier leader is
    /// older than anything this one says.
    pub fn taking_over(mut registry: Registry, policy: Policy, epoch: u32) -> Self {
        let incarnation = registry.raise_cluster_epoch(epoch);
        let policy_shards = policy.shards;
        // A successor taking over the registry keeps the pins.
        let pinned = registry
            .iter()
            .filter(|(_, a)| a.epoch == crate::ADMIN_EPOCH)
            .map(|(c, _)| c)
            .collect();
        Self {
            registry,
            policy,
            moves: BTreeMap::new(),
            pinned,
            reshapes: BTreeMap::new(),
            gathering: BTreeMap::new(),
            next_id: (u64::from(incarnation) << 32) | 1,
            heat: BTreeMap::new(),
            shard_busy_since: BTreeMap::new(),
            shard_ratio: BTreeMap::new(),
            shard_score: BTreeMap::new(),
            unbalanced_since: None,
            cooldown: BTreeMap::new(),
            orders: VecDeque::new(),
            records: VecDeque::new(),
            log: VecDeque::new(),
            counters: CoordinatorCounters::default(),
            members: (0..policy_shards).map(ShardRef::local).collect(),
            liveness: crate::liveness::Liveness::default(),
            draining: BTreeMap::new(),
        }
    }

    /// The shards balancing may use (a cluster's compute shards, as they
    /// register). The busy threshold becomes N/(N+1) of the tick budget for
    /// the new count (seed 002's headroom: the cluster keeps room to absorb
    /// one shard's load).
    pub fn set_members(&mut self, mut members: Vec<ShardRef>) {
        members.sort_unstable();
        members.dedup();
        let n = members.len().max(1) as f64;
        self.policy.shards = members.len() as u16;
        self.policy.shard_busy_ratio = n / (n + 1.0);
        self.members = members;
    }

    /// The shards balancing may use.
    pub fn members(&self) -> &[ShardRef] {
        &self.members
    }

    /// The registry (publish it when its version changes).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The policy.
    pub fn policy_mut(&mut self) -> &mut Policy {
        &mut self.policy
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub(crate) fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    pub(crate) fn counters_mut(&mut self) -> &mut CoordinatorCounters {
        &mut self.counters
    }

    pub(crate) fn push_order(&mut self, to: ShardRef, order: Order) {
        self.orders.push_back((to, order));
    }

    pub(crate) fn moves_involving(&self, shards: &BTreeSet<ShardRef>) -> Vec<HandoverId> {
        self.moves
            .iter()
            .filter(|(_, m)| shards.contains(&m.from) || shards.contains(&m.to))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Settles a handover one side of which was declared dead: one that
    /// has not committed is aborted (the source keeps the cell); one
    /// committed to a lost target whose backup did not hold the cell yet
    /// stays until the target's lease ends ([`Self::reclaim_lost_moves`]);
    /// otherwise the target runs the cell, or its backup will.
    pub(crate) fn settle_lost_move(
        &mut self,
        now: Instant,
        id: HandoverId,
        lost: &BTreeSet<ShardRef>,
    ) {
        let Some(m) = self.moves.get(&id).cloned() else {
            return;
        };
        match m.committed {
            None => self.abort(now, id, AbortReason::Timeout),
            Some(_) if !m.durable && lost.contains(&m.to) => {}
            Some(_) => {
                self.moves.remove(&id);
            }
        }
    }

    /// The lease of `node` ended: the cells committed to one of its shards
    /// whose backup was not known to hold them yet (the registry still
    /// records their frozen copy). Their backup promotes its replica if it
    /// has one; if not, [`Self::reclaim`] gives them back to the frozen
    /// copy.
    pub(crate) fn uncertain_moves(&mut self, node: u16) -> Vec<CellId> {
        self.moves
            .retain(|_, m| !(m.to.node == node && m.committed.is_some() && !m.durable));
        self.registry
            .frozen_copies()
            .iter()
            .filter(|(c, f)| {
                f.target.node == node && self.registry.get(**c).is_some_and(|a| a.owner == f.target)
            })
            .map(|(c, _)| *c)
            .collect()
    }

    /// The shards of `node` are lost: frozen copies they held now live in
    /// their backups' replicas of them.
    pub(crate) fn frozen_copies_move_to_backups(&mut self, node: u16) {
        let moved: Vec<(CellId, FrozenCopy)> = self
            .registry
            .frozen_copies()
            .iter()
            .filter(|(_, f)| f.holder.node == node)
            .map(|(c, f)| (*c, *f))
            .collect();
        for (cell, mut f) in moved {
            match self.registry.backup_of(f.holder) {
                Some(b) if b.node != node => {
                    f.holder = b;
                    self.registry.set_frozen_copy(cell, Some(f));
                }
                _ => {
                    self.note(format!(
                        "handover {} of {cell}: its frozen copy was lost with {} (no backup)",
                        f.handover, f.holder
                    ));
                    self.registry.set_frozen_copy(cell, None);
                }
            }
        }
    }

    /// `cell`'s new owner holds it durably (its backup has it, or a lost
    /// target's backup restored it): the frozen copy is let go.
    pub(crate) fn release_frozen(&mut self, cell: CellId) {
        let Some(f) = self.registry.frozen_copy(cell) else {
            return;
        };
        self.registry.set_frozen_copy(cell, None);
        // A copy held in a replica is forgotten with the replica's leftovers.
        if f.holder == f.source && !self.is_dead(f.holder.node) {
            let epoch = self.registry.get(cell).map_or(0, |a| a.epoch);
            let id = HandoverId(f.handover);
            self.orders
                .push_back((f.source, Order::Commit { id, cell, epoch }));
        }
    }

    /// True if `cell` can come back from a frozen copy.
    pub(crate) fn reclaimable(&self, cell: CellId) -> bool {
        self.registry.frozen_copy(cell).is_some()
    }

    /// A cell of a lost handover target that its backup had no replica of
    /// goes back to its frozen copy (epoch + 1): the handover's source, or
    /// the source's backup if the source was lost too.
    pub(crate) fn reclaim(&mut self, cell: CellId) {
        let Some(f) = self.registry.frozen_copy(cell) else {
            return;
        };
        self.registry.set_frozen_copy(cell, None);
        let id = HandoverId(f.handover);
        let epoch = self
            .registry
            .get(cell)
            .map_or(0, |a| a.epoch)
            .saturating_add(1);
        // A source lost but not yet failed over: its backup still holds it.
        let holder = if self.is_dead(f.holder.node) && f.holder == f.source {
            self.registry.backup_of(f.source)
        } else {
            Some(f.holder)
        };
        let Some(to) = holder.filter(|h| !self.is_dead(h.node)) else {
            self.note(format!(
                "handover {} of {cell}: its source and target were lost with no replica of it",
                id.0
            ));
            return;
        };
        let in_replica = to != f.source;
        match self.registry.reassign(cell, to, epoch) {
            Ok(()) => {
                self.note(format!(
                    "handover {} of {cell}: its target {} was lost before its backup held the cell; back to its source {}{} (epoch {epoch})",
                    id.0,
                    f.target,
                    f.source,
                    if in_replica { format!(", lost too: its copy on {to}") } else { String::new() }
                ));
                let order = if in_replica {
                    Order::Promote {
                        from: f.source,
                        cells: vec![(cell, epoch)],
                        fallback: Vec::new(),
                    }
                } else {
                    Order::Reclaim {
                        id,
                        cell,
                        epoch,
                        lost: f.target,
                    }
                };
                self.orders.push_back((to, order));
            }
            Err(e) => self.note(format!("handover {} of {cell}: {e}", id.0)),
        }
    }

    pub(crate) fn drop_reshapes_of(&mut self, shards: &BTreeSet<ShardRef>) {
        self.reshapes.retain(|_, r| !shards.contains(&r.shard));
    }

    /// The counters.
    pub fn counters(&self) -> CoordinatorCounters {
        self.counters
    }

    /// The next order to send, and to which shard.
    #[must_use]
    pub fn poll_order(&mut self) -> Option<(ShardRef, Order)> {
        self.orders.pop_front()
    }

    /// Finished handovers since the last call.
    pub fn take_records(&mut self) -> Vec<HandoverRecord> {
        self.records.drain(..).collect()
    }

    /// Decisions and outcomes since the last call, as log lines.
    pub fn take_log(&mut self) -> Vec<String> {
        self.log.drain(..).collect()
    }

    /// Operations in flight.
    pub fn in_flight(&self) -> usize {
        self.moves.len() + self.reshapes.len() + self.gathering.len()
    }

    /// The last load score of each cell.
    pub fn scores(&self) -> Vec<(CellId, f64)> {
        self.heat.iter().map(|(c, h)| (*c, h.score)).collect()
    }

    pub(crate) fn note(&mut self, line: String) {
        if self.log.len() < 10_000 {
            self.log.push_back(line);
        }
    }

    fn busy(&self, cell: CellId) -> bool {
        let overlaps =
            |other: CellId| other == cell || other.contains_cell(cell) || cell.contains_cell(other);
        self.moves.values().any(|m| m.cell == cell)
            || self.reshapes.values().any(|r| overlaps(r.cell))
            || self.gathering.keys().any(|p| overlaps(*p))
    }

    /// The shards balancing may use (members of nodes neither declared
    /// dead nor draining).
    fn shards(&self) -> impl Iterator<Item = ShardRef> + '_ {
        self.members
            .iter()
            .copied()
            .filter(|s| !self.is_dead(s.node) && !self.is_draining(s.node))
    }

    pub(crate) fn cell_busy(&self, cell: CellId) -> bool {
        self.busy(cell)
    }

    pub(crate) fn moves_to(&self, shard: ShardRef) -> usize {
        self.moves.values().filter(|m| m.to == shard).count()
    }

    /// A handover decided by a drain.
    pub(crate) fn move_for_drain(&mut self, now: Instant, cell: CellId, to: ShardRef) -> bool {
        match self.registry.get(cell) {
            Some(a) if a.owner != to && a.epoch != crate::ADMIN_EPOCH => {
                self.start_move(now, cell, a, to, "drain");
                true
            }
            _ => false,
        }
    }

    fn shard_busy(&self, shard: ShardRef) -> bool {
        self.moves
            .values()
            .any(|m| m.from == shard || m.to == shard)
            || self.reshapes.values().any(|r| r.shard == shard)
    }

    /// Operator: move a cell to a shard.
    pub fn command_move(
        &mut self,
        now: Instant,
        cell: CellId,
        to: ShardRef,
    ) -> Result<HandoverId, CommandError> {
        let a = self
            .registry
            .get(cell)
            .ok_or(CommandError::UnknownCell(cell))?;
        if !self.shards().any(|s| s == to) {
            return Err(CommandError::UnknownShard(to));
        }
        if a.owner == to {
            return Err(CommandError::Busy {
                cell,
                why: "is already on that shard",
            });
        }
        if self.pinned_near(cell) {
            return Err(CommandError::Busy {
                cell,
                why: "is pinned at the admin epoch",
            });
        }
        if self.busy(cell) {
            return Err(CommandError::Busy {
                cell,
                why: "is in an operation",
            });
        }
        Ok(self.start_move(now, cell, a, to, "operator"))
    }

    /// Operator: split a cell.
    pub fn command_split(&mut self, now: Instant, cell: CellId) -> Result<u64, CommandError> {
        let a = self
            .registry
            .get(cell)
            .ok_or(CommandError::UnknownCell(cell))?;
        if cell.depth >= self.policy.max_depth {
            return Err(CommandError::Impossible(format!(
                "cell {cell} is at the maximum depth {}",
                self.policy.max_depth
            )));
        }
        if self.pinned_near(cell) {
            return Err(CommandError::Busy {
                cell,
                why: "is pinned at the admin epoch",
            });
        }
        if self.busy(cell) {
            return Err(CommandError::Busy {
                cell,
                why: "is in an operation",
            });
        }
        Ok(self.start_split(now, cell, a.owner, "operator"))
    }

    /// Operator: merge the four children of `parent`. Children on several
    /// shards are first gathered on the shard that has most of them; the
    /// merge follows by itself once they are there (0 is returned then).
    pub fn command_merge(&mut self, now: Instant, parent: CellId) -> Result<u64, CommandError> {
        if self.pinned_near(parent) {
            return Err(CommandError::Busy {
                cell: parent,
                why: "has a part pinned at the admin epoch",
            });
        }
        self.start_merge(now, parent, "operator")
    }

    /// Operator override, seed 002's admin epoch: `cell` stays with its
    /// current owner at [`crate::ADMIN_EPOCH`] (`u32::MAX`), above any epoch
    /// anyone can hold. A handover of it not yet committed is aborted;
    /// every other shard still holding a copy drops it (a newer epoch names
    /// someone else); the balancer never moves, splits or merges it again,
    /// nor do operator commands; it still fails over if its node dies (at
    /// the same epoch: it cannot go higher). For a cell that flaps or that
    /// two shards claim. Returns the owner it is pinned to.
    pub fn command_pin(&mut self, now: Instant, cell: CellId) -> Result<ShardRef, CommandError> {
        let a = self
            .registry
            .get(cell)
            .ok_or(CommandError::UnknownCell(cell))?;
        if a.epoch == crate::ADMIN_EPOCH {
            return Err(CommandError::Busy {
                cell,
                why: "is already pinned at the admin epoch",
            });
        }
        let overlaps =
            |other: CellId| other == cell || other.contains_cell(cell) || cell.contains_cell(other);
        if self.reshapes.values().any(|r| overlaps(r.cell))
            || self.gathering.keys().any(|p| overlaps(*p))
        {
            return Err(CommandError::Busy {
                cell,
                why: "is being split or merged: try again in a moment",
            });
        }
        if let Some((&id, m)) = self.moves.iter().find(|(_, m)| m.cell == cell) {
            if m.committed.is_some() {
                return Err(CommandError::Busy {
                    cell,
                    why: "is committing a handover: try again in a moment",
                });
            }
            self.abort(now, id, AbortReason::Superseded);
        }
        self.registry
            .reassign(cell, a.owner, crate::ADMIN_EPOCH)
            .map_err(|e| CommandError::Impossible(e.to_string()))?;
        self.pinned.insert(cell);
        self.note(format!(
            "ADMIN EPOCH: {cell} pinned to {} at epoch {} (was {}): every other claim is overridden",
            a.owner,
            crate::ADMIN_EPOCH,
            a.epoch
        ));
        Ok(a.owner)
    }

    /// True if `cell`, a part of it or a cell containing it is pinned.
    fn pinned_near(&self, cell: CellId) -> bool {
        self.pinned
            .iter()
            .any(|p| *p == cell || p.contains_cell(cell) || cell.contains_cell(*p))
    }

    fn start_move(
        &mut self,
        now: Instant,
        cell: CellId,
        a: Assignment,
        to: ShardRef,
        cause: &'static str,
    ) -> HandoverId {
        let id = HandoverId(self.next_id);
        self.next_id += 1;
        self.moves.insert(
            id,
            MoveOp {
                cell,
                from: a.owner,
                to,
                epoch: a.epoch,
                decided: now,
                deadline: now + self.policy.step_timeout * 3,
                frozen: None,
                entities: 0,
                committed: None,
                activated: false,
                durable: false,
                cause,
            },
        );
        self.cooldown.insert(cell, now + self.policy.cooldown);
        self.note(format!(
            "decision: move {cell} {} -> {to} (epoch {}, {cause}, handover {})",
            a.owner, a.epoch, id.0
        ));
        self.orders.push_back((
            a.owner,
            Order::Begin {
                id,
                cell,
                to,
                epoch: a.epoch,
            },
        ));
        id
    }

    fn start_split(
        &mut self,
        now: Instant,
        cell: CellId,
        shard: ShardRef,
        cause: &'static str,
    ) -> u64 {
        let op = self.next_id;
        self.next_id += 1;
        self.reshapes.insert(
            op,
            ReshapeOp {
                shard,
                cell,
                split: true,
                deadline: now + self.policy.step_timeout,
            },
        );
        self.cooldown.insert(cell, now + self.policy.cooldown);
        self.note(format!(
            "decision: split {cell} on {shard} ({cause}, op {op})"
        ));
        self.orders.push_back((shard, Order::Split { op, cell }));
        op
    }

    fn start_merge(
        &mut self,
        now: Instant,
        parent: CellId,
        cause: &'static str,
    ) -> Result<u64, CommandError> {
        let children = parent
            .children()
            .ok_or_else(|| CommandError::Impossible(format!("cell {parent} has no children")))?;
        let mut owners = Vec::new();
        for c in children {
            let a = self.registry.get(c).ok_or_else(|| {
                CommandError::Impossible(format!("{c} is not a leaf: {parent} cannot merge"))
            })?;
            if self.busy(c) {
                return Err(CommandError::Busy {
                    cell: c,
                    why: "is in an operation",
                });
            }
            owners.push(a);
        }
        // Gather on the shard that owns most of them.
        let mut count: BTreeMap<ShardRef, usize> = BTreeMap::new();
        for a in &owners {
            *count.entry(a.owner).or_default() += 1;
        }
        let (&home, _) = count
            .iter()
            .max_by_key(|(s, n)| (**n, std::cmp::Reverse(**s)))
            .expect("four children");
        let mut gathering = false;
        for (c, a) in children.iter().zip(&owners) {
            if a.owner != home {
                gathering = true;
                self.start_move(now, *c, *a, home, cause);
            }
        }
        if gathering {
            let give_up = now + self.policy.step_timeout * 6;
            self.gathering.insert(parent, (cause, give_up));
            self.note(format!(
                "decision: gather the children of {parent} on {home} before merging ({cause})"
            ));
            return Ok(0);
        }
        let op = self.next_id;
        self.next_id += 1;
        self.reshapes.insert(
            op,
            ReshapeOp {
                shard: home,
                cell: parent,
                split: false,
                deadline: now + self.policy.step_timeout,
            },
        );
        for c in children {
            self.cooldown.insert(c, now + self.policy.cooldown);
        }
        self.note(format!(
            "decision: merge into {parent} on {home} ({cause}, op {op})"
        ));
        self.orders.push_back((home, Order::Merge { op, parent }));
        Ok(op)
    }

    /// Takes in what a shard reports; `now` stamps it (freeze and commit
    /// durations are measured between the reports' arrivals).
    pub fn handle_report(&mut self, now: Instant, shard: ShardRef, report: Report) {
        match report {
            Report::Load(load) => self.take_load(now, shard, load),
            Report::Frozen {
                id,
                cell,
                epoch,
                entities,
                repeat,
                ..
            } => self.on_frozen(now, shard, id, cell, epoch, entities, repeat),
            Report::Prepared { id, cell, repeat } => self.on_prepared(now, shard, id, cell, repeat),
            Report::Activated { id, .. } => self.on_activated(now, id),
            Report::Durable { id, cell } => self.on_durable(shard, id, cell),
            Report::Released { id, .. } => {
                if self.moves.get(&id).is_some_and(|m| m.durable) {
                    self.moves.remove(&id);
                    self.resume_merges(now);
                }
            }
            Report::Aborted { id, reason, .. } => {
                if self.moves.get(&id).is_some_and(|m| m.committed.is_none()) {
                    self.abort(now, id, reason);
                } else {
                    self.counters.stale_events += 1;
                }
            }
            Report::Split { op, parent } => self.on_split(now, shard, op, parent),
            promoted @ Report::Promoted { .. } => self.on_promoted(now, shard, promoted),
            Report::Merged { op, parent } => self.on_merged(now, shard, op, parent),
            Report::Refused { op, reason } => {
                if let Some(r) = self.reshapes.remove(&op) {
                    self.note(format!(
                        "{} of {} refused by {}: {reason}",
                        if r.split { "split" } else { "merge" },
                        r.cell,
                        r.shard
                    ));
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_frozen(
        &mut self,
        now: Instant,
        shard: ShardRef,
        id: HandoverId,
        cell: CellId,
        epoch: u32,
        entities: usize,
        repeat: bool,
    ) {
        let Some(m) = self.moves.get_mut(&id).filter(|m| m.cell == cell) else {
            self.settle_unknown(shard, id, cell, epoch);
            return;
        };
        if !repeat {
            m.frozen = Some(now);
            m.entities = entities;
        }
        if let (Some((_, new_epoch)), true) = (m.committed, m.durable) {
            // The release may have been lost: say it again.
            let commit = Order::Commit {
                id,
                cell,
                epoch: new_epoch,
            };
            self.orders.push_back((shard, commit));
        }
    }

    fn on_prepared(
        &mut self,
        now: Instant,
        shard: ShardRef,
        id: HandoverId,
        cell: CellId,
        repeat: bool,
    ) {
        let Some(m) = self.moves.get_mut(&id).filter(|m| m.cell == cell) else {
            // A handover this coordinator does not know (it took over from
            // one that crashed): the registry decides.
            let order = match self.registry.get(cell) {
                Some(a) if a.owner == shard => Order::Commit {
                    id,
                    cell,
                    epoch: a.epoch,
                },
                _ => Order::Abort {
                    id,
                    cell,
                    reason: AbortReason::Superseded,
                },
            };
            self.orders.push_back((shard, order));
            self.counters.stale_events += 1;
            return;
        };
        if let Some((_, epoch)) = m.committed {
            if repeat {
                self.orders
                    .push_back((shard, Order::Commit { id, cell, epoch }));
            }
            return;
        }
        if shard != m.to {
            self.counters.stale_events += 1;
            return;
        }
        let epoch = m.epoch.saturating_add(1);
        let to = m.to;
        match self.registry.reassign(cell, to, epoch) {
            Ok(()) => {
                // The target first: the source lets go of its frozen copy
                // only once the target runs the cell.
                m.committed = Some((now, epoch));
                let source = m.from;
                self.registry.set_frozen_copy(
                    cell,
                    Some(FrozenCopy {
                        handover: id.0,
                        source,
                        holder: source,
                        target: to,
                    }),
                );
                self.orders
                    .push_back((to, Order::Commit { id, cell, epoch }));
            }
            Err(e) => {
                self.note(format!(
                    "handover {} of {cell}: registry refused the swap: {e}; aborting",
                    id.0
                ));
                self.abort(now, id, AbortReason::Stale);
            }
        }
    }

    fn on_activated(&mut self, now: Instant, id: HandoverId) {
        let Some(m) = self.moves.get_mut(&id) else {
            self.counters.stale_events += 1;
            return;
        };
        if m.activated {
            return;
        }
        m.activated = true;
        let (commit_at, epoch) = m.committed.unwrap_or((now, m.epoch));
        let m = m.clone();
        let record = HandoverRecord {
            id,
            cell: m.cell,
            from: m.from,
            to: m.to,
            epoch,
            entities: m.entities,
            decision_to_commit: commit_at.saturating_duration_since(m.decided),
            freeze: m.frozen.map(|f| now.saturating_duration_since(f)),
            committed: true,
            abort: None,
            cause: m.cause,
        };
        self.counters.handovers += 1;
        self.note(format!(
            "handover {}: {} {} -> {} committed at epoch {epoch}: {} entities, decision to commit {:.2} ms, freeze {:.2} ms",
            id.0,
            m.cell,
            m.from,
            m.to,
            m.entities,
            record.decision_to_commit.as_secs_f64() * 1e3,
            record.freeze.map_or(0.0, |f| f.as_secs_f64() * 1e3)
        ));
        self.records.push_back(record);
    }

    /// The target's backup holds the activated cell: the source lets go of
    /// its frozen copy (until then it is the copy a lost target's cell
    /// comes back from).
    ///
    /// A handover this coordinator does not know (its predecessor ordered
    /// it; the target reports again to every new coordinator) is settled
    /// from the registry's record of its frozen copy.
    fn on_durable(&mut self, shard: ShardRef, id: HandoverId, cell: CellId) {
        let Some(m) = self.moves.get_mut(&id) else {
            self.counters.stale_events += 1;
            let recorded = self
                .registry
                .frozen_copy(cell)
                .is_some_and(|f| f.handover == id.0 && f.target == shard);
            if recorded && self.registry.get(cell).is_some_and(|a| a.owner == shard) {
                self.release_frozen(cell);
            }
            return;
        };
        if !m.activated || m.durable {
            return;
        }
        m.durable = true;
        let cell = m.cell;
        if self
            .registry
            .frozen_copy(cell)
            .is_some_and(|f| f.handover == id.0)
        {
            self.release_frozen(cell);
        } else {
            let epoch = m.committed.map_or(m.epoch, |(_, e)| e);
            let from = m.from;
            self.orders
                .push_back((from, Order::Commit { id, cell, epoch }));
        }
    }

    /// A reshape report names what its shard did: an unknown one (ordered by
    /// a coordinator that crashed since) still counts if the registry gives
    /// the reporting shard every cell involved.
    fn reshape_owner(&mut self, op: u64, shard: ShardRef, cells: &[CellId]) -> Option<ShardRef> {
        if let Some(r) = self.reshapes.remove(&op) {
            return Some(r.shard);
        }
        self.counters.stale_events += 1;
        cells
            .iter()
            .all(|c| self.registry.get(*c).is_some_and(|a| a.owner == shard))
            .then_some(shard)
    }

    fn on_split(&mut self, now: Instant, shard: ShardRef, op: u64, parent: CellId) {
        let Some(owner) = self.reshape_owner(op, shard, &[parent]) else {
            return;
        };
        let epoch = self
            .registry
            .get(parent)
            .map_or(1, |a| a.epoch)
            .saturating_add(1);
        let mut layout = (**self.registry.layout()).clone();
        let Ok(children) = layout.split(parent) else {
            self.note(format!("split {op} of {parent}: the layout refused it"));
            return;
        };
        let added: Vec<(CellId, Assignment)> = children
            .iter()
            .map(|c| (*c, Assignment { owner, epoch }))
            .collect();
        if let Err(e) = self.registry.relayout(Arc::new(layout), &[parent], &added) {
            self.note(format!("split {op} of {parent}: registry refused it: {e}"));
            return;
        }
        for c in children {
            self.cooldown.insert(c, now + self.policy.cooldown);
        }
        self.counters.splits += 1;
        self.note(format!(
            "split {op}: {parent} -> 4 children on {owner} (epoch {epoch})"
        ));
    }

    fn on_merged(&mut self, now: Instant, shard: ShardRef, op: u64, parent: CellId) {
        let Some(children) = parent.children() else {
            self.note(format!("merge {op} into {parent}: it has no children"));
            return;
        };
        let Some(owner) = self.reshape_owner(op, shard, &children) else {
            return;
        };
        let epoch = children
            .iter()
            .filter_map(|c| self.registry.get(*c))
            .map(|a| a.epoch)
            .max()
            .unwrap_or(1)
            + 1;
        let mut layout = (**self.registry.layout()).clone();
        if layout.merge(parent).is_err() {
            self.note(format!("merge {op} into {parent}: the layout refused it"));
            return;
        }
        let added = [(parent, Assignment { owner, epoch })];
        if let Err(e) = self.registry.relayout(Arc::new(layout), &children, &added) {
            self.note(format!(
                "merge {op} into {parent}: registry refused it: {e}"
            ));
            return;
        }
        self.cooldown.insert(parent, now + self.policy.cooldown);
        self.counters.merges += 1;
        self.note(format!(
            "merge {op}: 4 children -> {parent} on {owner} (epoch {epoch})"
        ));
    }

    /// A source reports a handover this coordinator does not know (its
    /// predecessor ordered it). If the registry gives the cell, or any part
    /// of the area it covered (it was split or merged since), to another
    /// shard, the handover committed and the source lets go: it never runs
    /// the cell again. Otherwise nothing was committed: it aborts and keeps
    /// the cell.
    fn settle_unknown(&mut self, shard: ShardRef, id: HandoverId, cell: CellId, epoch: u32) {
        self.counters.stale_events += 1;
        if self
            .registry
            .frozen_copy(cell)
            .is_some_and(|f| f.handover == id.0 && f.holder == shard)
        {
            // Committed, not yet durable: the source keeps its copy until
            // the target says its backup holds the cell (it tells every new
            // coordinator), or the target's backup decides after its loss.
            return;
        }
        let order = match self.moved_on(cell, shard) {
            Some(current) => Order::Commit {
                id,
                cell,
                epoch: current.max(epoch.saturating_add(1)),
            },
            None => Order::Abort {
                id,
                cell,
                reason: AbortReason::Superseded,
            },
        };
        self.orders.push_back((shard, order));
    }

    /// The newest epoch at which the registry gives `cell`'s area (the cell,
    /// the leaf it was merged into, or the leaves it was split into) to a
    /// shard other than `shard`; None if it is all still `shard`'s.
    fn moved_on(&self, cell: CellId, shard: ShardRef) -> Option<u32> {
        let mut up = Some(cell);
        while let Some(c) = up {
            if let Some(a) = self.registry.get(c) {
                return (a.owner != shard).then_some(a.epoch);
            }
            up = c.parent();
        }
        self.registry
            .iter()
            .filter(|(c, a)| cell.contains_cell(*c) && a.owner != shard)
            .map(|(_, a)| a.epoch)
            .max()
    }

    fn abort(&mut self, now: Instant, id: HandoverId, reason: AbortReason) {
        let Some(m) = self.moves.remove(&id) else {
            return;
        };
        self.counters.aborts += 1;
        self.orders.push_back((
            m.from,
            Order::Abort {
                id,
                cell: m.cell,
                reason,
            },
        ));
        self.orders.push_back((
            m.to,
            Order::Abort {
                id,
                cell: m.cell,
                reason,
            },
        ));
        self.note(format!(
            "handover {} of {} aborted: {reason:?}",
            id.0, m.cell
        ));
        self.records.push_back(HandoverRecord {
            id,
            cell: m.cell,
            from: m.from,
            to: m.to,
            epoch: m.epoch,
            entities: m.entities,
            decision_to_commit: now.saturating_duration_since(m.decided),
            freeze: None,
            committed: false,
            abort: Some(reason),
            cause: m.cause,
        });
    }

    fn take_load(&mut self, now: Instant, shard: ShardRef, r: LoadReport) {
        let ratio = r.tick_us_p99 as f64 / r.budget_us.max(1) as f64;
        self.shard_ratio.insert(shard, ratio);
        if ratio > self.policy.shard_busy_ratio {
            self.shard_busy_since.entry(shard).or_insert(now);
        } else {
            self.shard_busy_since.remove(&shard);
        }
        let actors: u32 = r.cells.iter().map(|c| c.actors).sum::<u32>().max(1);
        for c in &r.cells {
            let share = f64::from(c.actors) / f64::from(actors);
            let score = 0.5 * f64::from(c.actors) / self.policy.actors_ref
                + 0.3 * c.pps / self.policy.pps_ref
                + 0.2 * share * ratio;
            let h = self.heat.entry(c.cell).or_default();
            h.score = score;
            if score >= self.policy.split_score {
                h.hot_since.get_or_insert(now);
            } else {
                h.hot_since = None;
            }
            if score < self.policy.merge_score {
                h.cold_since.get_or_insert(now);
            } else {
                h.cold_since = None;
            }
        }
        // Forget cells that no longer exist.
        let registry = &self.registry;
        self.heat.retain(|c, _| registry.get(*c).is_some());
        let total: f64 = r
            .cells
            .iter()
            .filter_map(|c| self.heat.get(&c.cell))
            .map(|h| h.score)
            .sum();
        self.shard_score.insert(shard, total);
        let (lo, hi) = self.score_extremes();
        if hi - lo > self.policy.imbalance {
            self.unbalanced_since.get_or_insert(now);
        } else {
            self.unbalanced_since = None;
        }
    }

    fn score_extremes(&self) -> (f64, f64) {
        let scores: Vec<f64> = self
            .shards()
            .map(|s| self.shard_score.get(&s).copied().unwrap_or(0.0))
            .collect();
        let lo = scores.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (lo, hi)
    }

    fn cooling(&self, cell: CellId, now: Instant) -> bool {
        // A pinned cell (and what contains it) is never reshaped or moved.
        self.cooldown.get(&cell).is_some_and(|t| *t > now) || self.pinned_near(cell)
    }

    /// Node liveness (detection, recovery), timeouts, then (if automatic)
    /// one decision.
    pub fn tick(&mut self, now: Instant) {
        self.watch_nodes(now);
        let late: Vec<HandoverId> = self
            .moves
            .iter()
            .filter(|(_, m)| m.committed.is_none() && now > m.deadline)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            self.abort(now, id, AbortReason::Timeout);
        }
        let late: Vec<u64> = self
            .reshapes
            .iter()
            .filter(|(_, r)| now > r.deadline)
            .map(|(op, _)| *op)
            .collect();
        for op in late {
            if let Some(r) = self.reshapes.remove(&op) {
                self.note(format!(
                    "{} of {} timed out on {}",
                    if r.split { "split" } else { "merge" },
                    r.cell,
                    r.shard
                ));
            }
        }
        self.resume_merges(now);
        self.drain_step(now);
        if self.policy.automatic && self.in_flight() == 0 {
            self.decide(now);
        }
    }

    /// Merges whose children were being gathered: merge those now on one
    /// shard; give up on those whose gathering failed (a move aborted, a
    /// child split further) or took too long.
    fn resume_merges(&mut self, now: Instant) {
        let waiting: Vec<(CellId, &'static str, Instant)> = self
            .gathering
            .iter()
            .map(|(p, (cause, until))| (*p, *cause, *until))
            .collect();
        for (parent, cause, give_up) in waiting {
            let children = parent.children().expect("only parents gather");
            let moving = self.moves.values().any(|m| children.contains(&m.cell));
            if moving && now <= give_up {
                continue;
            }
            self.gathering.remove(&parent);
            let owners: Vec<Option<ShardRef>> = children
                .iter()
                .map(|c| self.registry.get(*c).map(|a| a.owner))
                .collect();
            let together = owners.iter().all(|o| o.is_some() && *o == owners[0]);
            if !together || moving {
                self.note(format!(
                    "merge into {parent} given up: its children were not gathered on one shard"
                ));
                continue;
            }
            if let Err(e) = self.start_merge(now, parent, cause) {
                self.note(format!("merge into {parent} given up: {e}"));
            }
        }
    }

    fn decide(&mut self, now: Instant) {
        // 1. Split the hottest cell that stayed hot.
        let hot = self
            .heat
            .iter()
            .filter(|(c, h)| {
                h.hot_since
                    .is_some_and(|t| now.duration_since(t) >= self.policy.split_sustain)
                    && c.depth < self.policy.max_depth
                    && !self.cooling(**c, now)
            })
            .max_by(|a, b| a.1.score.total_cmp(&b.1.score))
            .map(|(c, _)| *c);
        if let Some(cell) = hot {
            if let Some(a) = self.registry.get(cell) {
                self.start_split(now, cell, a.owner, "policy");
                return;
            }
        }
        // 2. A shard busy for long enough sheds its hottest movable cell.
        let busy = self
            .shard_busy_since
            .iter()
            .filter(|(_, t)| now.duration_since(**t) >= self.policy.move_sustain)
            .map(|(s, _)| *s)
            .max_by(|a, b| {
                self.shard_ratio
                    .get(a)
                    .unwrap_or(&0.0)
                    .total_cmp(self.shard_ratio.get(b).unwrap_or(&0.0))
            });
        if let Some(from) = busy {
            if let Some((cell, a, to)) = self.pick_move(now, from) {
                self.start_move(now, cell, a, to, "policy");
                self.shard_busy_since.remove(&from);
                return;
            }
        }
        // 2b. Or the node is unbalanced: the most loaded shard gives a cell
        // to the least loaded one, if that narrows the gap.
        if self
            .unbalanced_since
            .is_some_and(|t| now.duration_since(t) >= self.policy.move_sustain)
        {
            let from = self.shards().max_by(|a, b| {
                self.shard_score
                    .get(a)
                    .unwrap_or(&0.0)
                    .total_cmp(self.shard_score.get(b).unwrap_or(&0.0))
            });
            if let Some(from) = from {
                if let Some((cell, a, to)) = self.pick_move(now, from) {
                    let (lo, hi) = self.score_extremes();
                    let s = self.heat.get(&cell).map_or(0.0, |h| h.score);
                    if (hi - s - (lo + s)).abs() < hi - lo {
                        self.start_move(now, cell, a, to, "policy");
                        self.unbalanced_since = None;
                        return;
                    }
                }
            }
        }
        // 2c. A member that owns far fewer cells than the average (a node
        // that just joined the cluster) takes one from the member that owns
        // most, whatever the load: a joining node gets cells.
        if let Some((cell, a, to)) = self.pick_spread(now) {
            self.start_move(now, cell, a, to, "spread");
            return;
        }
        // 3. Merge four cold siblings.
        let mut parents: BTreeSet<CellId> = BTreeSet::new();
        for (c, h) in &self.heat {
            if let (Some(p), Some(t)) = (c.parent(), h.cold_since) {
                if now.duration_since(t) >= self.policy.merge_after && !self.cooling(*c, now) {
                    parents.insert(p);
                }
            }
        }
        for p in parents {
            let children = p.children().expect("a parent");
            let all_cold = children.iter().all(|c| {
                self.heat
                    .get(c)
                    .and_then(|h| h.cold_since)
                    .is_some_and(|t| now.duration_since(t) >= self.policy.merge_after)
                    && !self.cooling(*c, now)
                    && self.registry.get(*c).is_some()
            });
            if all_cold && self.start_merge(now, p, "policy").is_ok() {
                return;
            }
        }
    }

    /// In a cluster, a cell for the member that owns fewest (under 3/4 of
    /// the average:
    /// below that, load-based moves alone would leave a joining node idle;
    /// above it, they decide),
    /// from the one that owns most (at least two more): one bordering the
    /// receiver's cells if there is one, else the coolest.
    fn pick_spread(&self, now: Instant) -> Option<(CellId, Assignment, ShardRef)> {
        // Only across nodes: on one node, placement (or its static mapping)
        // decides counts and load alone moves cells.
        let nodes: BTreeSet<u16> = self.shards().map(|s| s.node).collect();
        if nodes.len() < 2 {
            return None;
        }
        let counts: Vec<(ShardRef, usize)> = self
            .shards()
            .map(|s| (s, self.registry.cells_of(s).len()))
            .collect();
        let total: usize = counts.iter().map(|c| c.1).sum();
        let avg = total as f64 / counts.len() as f64;
        let &(to, lo) = counts.iter().min_by_key(|c| (c.1, c.0))?;
        let &(from, hi) = counts
            .iter()
            .max_by_key(|c| (c.1, std::cmp::Reverse(c.0)))?;
        if (lo as f64) >= avg * 0.75 || hi < lo + 2 || self.shard_busy(from) || self.shard_busy(to)
        {
            return None;
        }
        let theirs: BTreeSet<CellId> = self
            .registry
            .cells_of(to)
            .into_iter()
            .map(|(c, _)| c)
            .collect();
        let score = |c: &CellId| self.heat.get(c).map_or(0.0, |h| h.score);
        self.registry
            .cells_of(from)
            .into_iter()
            .filter(|(c, _)| !self.cooling(*c, now) && !self.busy(*c))
            .min_by(|(x, _), (y, _)| {
                let borders = |c: &CellId| c.neighbours().iter().any(|n| theirs.contains(n));
                borders(y)
                    .cmp(&borders(x))
                    .then(score(x).total_cmp(&score(y)))
                    .then(x.cmp(y))
            })
            .map(|(c, a)| (c, a, to))
    }

    /// The cell of `from` worth moving, and where: the coolest other shard,
    /// if moving the cell does not make that shard the busiest; among the
    /// candidates, the hottest cell that borders the target's cells.
    fn pick_move(&self, now: Instant, from: ShardRef) -> Option<(CellId, Assignment, ShardRef)> {
        let to = self
            .shards()
            .filter(|s| *s != from && !self.shard_busy(*s))
            .min_by(|a, b| {
                self.shard_ratio
                    .get(a)
                    .unwrap_or(&0.0)
                    .total_cmp(self.shard_ratio.get(b).unwrap_or(&0.0))
            })?;
        if self.shard_busy(from) {
            return None;
        }
        let target_cells: BTreeSet<CellId> = self
            .registry
            .cells_of(to)
            .into_iter()
            .map(|(c, _)| c)
            .collect();
        let layout = self.registry.layout().clone();
        let mut best: Option<(f64, CellId, Assignment)> = None;
        for (cell, a) in self.registry.cells_of(from) {
            if self.cooling(cell, now) || self.busy(cell) {
                continue;
            }
            let score = self.heat.get(&cell).map_or(0.0, |h| h.score);
            if score <= 0.0 {
                continue;
            }
            let b = layout.geometry().bounds(cell);
            let mut near = Vec::new();
            layout.leaves_near(b.center(), b.width() * 0.75, &mut near);
            let borders = near.iter().any(|n| target_cells.contains(n));
            // The hottest, with a bonus for bordering the target's cells
            // (fewer ghosts cross shards).
            let value = score * if borders { 1.5 } else { 1.0 };
            if best.as_ref().is_none_or(|(v, _, _)| value > *v) {
                best = Some((value, cell, a));
            }
        }
        best.map(|(_, c, a)| (c, a, to))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_cells::{Geometry, Layout};

    fn shard(s: u16) -> ShardRef {
        ShardRef::local(s)
    }

    /// A 2x1 world on 2 shards (cell (0,0) on shard 0, (1,0) on shard 1),
    /// with (0,0) split and its children `remote` on shard 1.
    fn coordinator(split: bool, remote: &[usize]) -> (Coordinator, Instant) {
        let mut layout = Layout::new(Geometry::new(0, 128.0, 2, 1));
        let left = CellId::root(0, 0, 0);
        let children = if split {
            layout.split(left).unwrap().to_vec()
        } else {
            Vec::new()
        };
        let owners = layout
            .leaves()
            .into_iter()
            .map(|c| {
                let k = children.iter().position(|x| *x == c);
                let on_one = c.cx == 1 || k.is_some_and(|k| remote.contains(&k));
                (c, shard(u16::from(on_one)))
            })
            .collect();
        let registry = Registry::new(Arc::new(layout), &owners).unwrap();
        let mut policy = Policy::new(2);
        policy.automatic = false;
        policy.max_depth = 2;
        (Coordinator::new(registry, policy), Instant::now())
    }

    fn orders(c: &mut Coordinator) -> Vec<(ShardRef, Order)> {
        std::iter::from_fn(|| c.poll_order()).collect()
    }

    #[test]
    fn a_pinned_cell_overrides_a_handover_in_flight_and_never_moves_again() {
        let (mut c, now) = coordinator(false, &[]);
        let left = CellId::root(0, 0, 0);
        let id = c.command_move(now, left, shard(1)).unwrap();
        let _ = orders(&mut c);
        let before = c.registry().version();
        assert_eq!(c.command_pin(now, left), Ok(shard(0)));
        let a = c.registry().get(left).unwrap();
        assert_eq!((a.owner, a.epoch), (shard(0), crate::ADMIN_EPOCH));
        assert!(c.registry().version() > before, "published");
        // The handover it overrode is aborted on both sides.
        let sent = orders(&mut c);
        assert_eq!(sent.len(), 2, "{sent:?}");
        assert!(sent.iter().all(|(_, o)| matches!(o, Order::Abort { id: i, reason: AbortReason::Superseded, .. } if *i == id)));
        // Nothing moves, splits or merges it any more, and pinning twice says so.
        for e in [
            c.command_move(now, left, shard(1)).map(|_| ()),
            c.command_split(now, left).map(|_| ()),
            c.command_pin(now, left).map(|_| ()),
        ] {
            assert!(matches!(e, Err(CommandError::Busy { .. })), "{e:?}");
        }
        // A successor taking over the registry keeps the pin.
        let mut next = Coordinator::new(c.registry().clone(), c.policy().clone());
        assert!(matches!(
            next.command_move(now, left, shard(1)),
            Err(CommandError::Busy {
                why: "is pinned at the admin epoch",
                ..
            })
        ));
        assert!(matches!(
            next.command_pin(now, CellId::root(0, 5, 5)),
            Err(CommandError::UnknownCell(_))
        ));
    }

    #[test]
    fn a_successor_keeps_a_frozen_copy_until_the_target_says_its_backup_holds_the_cell() {
        let (mut c, now) = coordinator(false, &[]);
        let left = CellId::root(0, 0, 0);
        let id = c.command_move(now, left, shard(1)).unwrap();
        let frozen = |repeat| Report::Frozen {
            id,
            cell: left,
            epoch: 1,
            tick: tessera_cells::TickId(10),
            entities: 3,
            repeat,
        };
        c.handle_report(now, shard(0), frozen(false));
        c.handle_report(
            now,
            shard(1),
            Report::Prepared {
                id,
                cell: left,
                repeat: false,
            },
        );
        let _ = orders(&mut c);
        let copy = c
            .registry()
            .frozen_copy(left)
            .expect("recorded at the commit");
        assert_eq!(
            (copy.source, copy.holder, copy.target),
            (shard(0), shard(0), shard(1))
        );
        // The coordinator dies before the target's backup holds the cell.
        let mut next = Coordinator::new(c.registry().clone(), c.policy().clone());
        // The source, still frozen, asks again: it must keep its copy.
        next.handle_report(now, shard(0), frozen(true));
        let sent = orders(&mut next);
        assert!(
            sent.iter().all(|(_, o)| !matches!(o, Order::Commit { .. })),
            "{sent:?}"
        );
        assert!(next.registry().frozen_copy(left).is_some());
        // The target tells the new coordinator its commit is durable: the
        // source lets go, and the record goes.
        next.handle_report(now, shard(1), Report::Durable { id, cell: left });
        let sent = orders(&mut next);
        assert!(
            sent.iter()
                .any(|(to, o)| *to == shard(0)
                    && matches!(o, Order::Commit { id: i, .. } if *i == id)),
            "{sent:?}"
        );
        assert!(next.registry().frozen_copy(left).is_none());
    }

    #[test]
    fn a_committing_handover_is_not_pinned_over() {
        let (mut c, now) = coordinator(false, &[]);
        let left = CellId::root(0, 0, 0);
        let id = c.command_move(now, left, shard(1)).unwrap();
        if let Some(m) = c.moves.get_mut(&id) {
            m.committed = Some((now, 2));
        }
        assert!(matches!(
            c.command_pin(now, left),
            Err(CommandError::Busy {
                why: "is committing a handover: try again in a moment",
                ..
            })
        ));
    }

    #[test]
    fn moves_name_what_is_wrong() {
        let (mut c, now) = coordinator(false, &[]);
        let left = CellId::root(0, 0, 0);
        let outside = CellId::root(0, 5, 5);
        assert_eq!(
            c.command_move(now, outside, shard(1)),
            Err(CommandError::UnknownCell(outside))
        );
        assert_eq!(
            c.command_move(now, left, shard(7)),
            Err(CommandError::UnknownShard(shard(7)))
        );
        assert!(matches!(
            c.command_move(now, left, shard(0)),
            Err(CommandError::Busy {
                why: "is already on that shard",
                ..
            })
        ));
        c.command_move(now, left, shard(1)).unwrap();
        assert!(matches!(
            c.command_move(now, left, shard(1)),
            Err(CommandError::Busy {
                why: "is in an operation",
                ..
            })
        ));
        assert!(matches!(
            c.command_split(now, left),
            Err(CommandError::Busy { .. })
        ));
        let sent = orders(&mut c);
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert!(matches!(sent[0], (s, Order::Begin { to, .. }) if s == shard(0) && to == shard(1)));
    }

    #[test]
    fn splits_stop_at_the_maximum_depth() {
        let (mut c, now) = coordinator(true, &[]);
        let outside = CellId::root(0, 9, 0);
        assert_eq!(
            c.command_split(now, outside),
            Err(CommandError::UnknownCell(outside))
        );
        let child = CellId::root(0, 0, 0).children().unwrap()[0];
        let op = c.command_split(now, child).unwrap();
        assert!(op > 0);
        c.handle_report(now, shard(0), Report::Split { op, parent: child });
        let grandchild = child.children().unwrap()[0];
        assert_eq!(grandchild.depth, 2);
        assert!(matches!(
            c.command_split(now, grandchild),
            Err(CommandError::Impossible(m)) if m.contains("maximum depth")
        ));
    }

    #[test]
    fn merges_refuse_cells_whose_children_are_not_leaves() {
        let (mut c, now) = coordinator(true, &[]);
        // (1,0) was never split: its children are not leaves.
        assert!(matches!(
            c.command_merge(now, CellId::root(0, 1, 0)),
            Err(CommandError::Impossible(m)) if m.contains("is not a leaf")
        ));
        // A child split further: the parent cannot merge yet.
        let left = CellId::root(0, 0, 0);
        let child = left.children().unwrap()[0];
        let op = c.command_split(now, child).unwrap();
        c.handle_report(now, shard(0), Report::Split { op, parent: child });
        assert!(matches!(
            c.command_merge(now, left),
            Err(CommandError::Impossible(_))
        ));
        // A reshape report for an operation nobody ordered from a shard
        // that does not own the cell changes nothing.
        let version = c.registry().version();
        c.handle_report(
            now,
            shard(1),
            Report::Merged {
                op: 999,
                parent: child,
            },
        );
        assert_eq!(c.registry().version(), version);
    }

    #[test]
    fn a_merge_across_shards_gathers_the_children_then_merges_by_itself() {
        // Children 2 and 3 on shard 1: they move to shard 0, then it merges.
        let (mut c, mut now) = coordinator(true, &[2, 3]);
        let left = CellId::root(0, 0, 0);
        assert_eq!(c.command_merge(now, left), Ok(0), "gathering first");
        assert!(matches!(
            c.command_merge(now, left),
            Err(CommandError::Busy { .. })
        ));
        let moves = orders(&mut c);
        assert_eq!(moves.len(), 2, "{moves:?}");
        for (from, order) in moves {
            let Order::Begin {
                id,
                cell,
                to,
                epoch,
            } = order
            else {
                panic!("{order:?}");
            };
            assert_eq!((from, to), (shard(1), shard(0)));
            now += Duration::from_millis(50);
            let frozen = Report::Frozen {
                id,
                cell,
                epoch,
                tick: tessera_cells::TickId(1),
                entities: 0,
                repeat: false,
            };
            c.handle_report(now, from, frozen);
            let prepared = Report::Prepared {
                id,
                cell,
                repeat: false,
            };
            c.handle_report(now, to, prepared);
            c.handle_report(now, to, Report::Activated { id, cell });
            c.handle_report(now, to, Report::Durable { id, cell });
            c.handle_report(
                now,
                from,
                Report::Released {
                    id,
                    cell,
                    forwarded: 0,
                },
            );
        }
        let merge = orders(&mut c)
            .into_iter()
            .find(|(_, o)| matches!(o, Order::Merge { .. }));
        let Some((on, Order::Merge { op, parent })) = merge else {
            panic!("no merge order after the gathering");
        };
        assert_eq!((on, parent), (shard(0), left));
        c.handle_report(now, on, Report::Merged { op, parent });
        assert_eq!(c.registry().get(left).map(|a| a.owner), Some(shard(0)));
        assert_eq!(c.counters().merges, 1);
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn a_gathering_that_fails_is_given_up() {
        let (mut c, mut now) = coordinator(true, &[3]);
        let left = CellId::root(0, 0, 0);
        assert_eq!(c.command_merge(now, left), Ok(0));
        let moves = orders(&mut c);
        let (_, Order::Begin { id, cell, .. }) = moves[0].clone() else {
            panic!("{moves:?}");
        };
        now += Duration::from_millis(50);
        c.handle_report(
            now,
            shard(0),
            Report::Aborted {
                id,
                cell,
                reason: AbortReason::Refused,
            },
        );
        c.tick(now);
        assert_eq!(c.in_flight(), 0);
        assert!(c.take_log().iter().any(|l| l.contains("given up")));
        assert!(orders(&mut c)
            .iter()
            .all(|(_, o)| !matches!(o, Order::Merge { .. })));
    }

    #[test]
    fn a_node_that_joins_gets_cells_until_it_holds_three_quarters_of_the_average() {
        // Four cells on node 1; node 2 joins with no cell.
        let layout = Layout::new(Geometry::new(0, 128.0, 4, 1));
        let first = ShardRef { node: 1, shard: 0 };
        let joiner = ShardRef { node: 2, shard: 0 };
        let owners = layout.leaves().into_iter().map(|c| (c, first)).collect();
        let registry = Registry::new(Arc::new(layout), &owners).unwrap();
        let mut c = Coordinator::new(registry, Policy::new(1));
        c.set_members(vec![first, joiner]);
        let mut now = Instant::now();
        let mut moved = Vec::new();
        for _ in 0..10 {
            now += Duration::from_millis(100);
            c.tick(now);
            for (from, order) in orders(&mut c) {
                let Order::Begin {
                    id,
                    cell,
                    to,
                    epoch,
                } = order
                else {
                    continue;
                };
                assert_eq!((from, to), (first, joiner));
                moved.push(cell);
                for (by, report) in [
                    (
                        from,
                        Report::Frozen {
                            id,
                            cell,
                            epoch,
                            tick: tessera_cells::TickId(1),
                            entities: 0,
                            repeat: false,
                        },
                    ),
                    (
                        to,
                        Report::Prepared {
                            id,
                            cell,
                            repeat: false,
                        },
                    ),
                    (to, Report::Activated { id, cell }),
                    (to, Report::Durable { id, cell }),
                    (
                        from,
                        Report::Released {
                            id,
                            cell,
                            forwarded: 0,
                        },
                    ),
                ] {
                    c.handle_report(now, by, report);
                }
            }
        }
        // Average 2: the joiner takes cells while it holds under 1.5.
        assert_eq!(moved.len(), 2, "{moved:?}");
        assert_eq!(c.registry().cells_of(joiner).len(), 2);
        // The cells it got border each other (a contiguous block).
        assert!(moved[1].neighbours().contains(&moved[0]), "{moved:?}");
        assert_eq!(c.in_flight(), 0);
    }
}
