//! The one vocabulary of cell ownership changes, shared by the coordinator
//! (`tessera-coord`), the shards' handover agents and the node core.
//!
//! Three directions, three types:
//! - [`Order`]: coordinator -> shard (start a handover, commit it, abort it,
//!   split a cell, merge four cells);
//! - [`PeerMsg`]: shard -> shard, the steps of a handover between its source
//!   and its target (pre-copy, ready, refuse, diff, abort);
//! - [`Report`]: shard -> coordinator (frozen, prepared, activated,
//!   released, aborted, split, merged, refused, and the load every second).
//!
//! Orders and reports carry no wall-clock time: the coordinator stamps a
//! report with its own clock when it takes it in, so node cores stay free of
//! clocks.

use crate::cell::{CellDiff, CellState};
use crate::game::GameLogic;
use crate::geometry::CellId;
use crate::ids::TickId;
use crate::registry::ShardRef;

/// Identifies one handover (chosen by the coordinator; its top 32 bits are
/// the coordinator's incarnation, so ids never repeat across takeovers).
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

/// Coordinator -> shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Order {
    /// To the source: hand `cell`, held at `epoch`, to shard `to`.
    Begin {
        /// The handover.
        id: HandoverId,
        /// The cell to move.
        cell: CellId,
        /// The target shard.
        to: ShardRef,
        /// The cell's epoch as the coordinator knows it; a source holding
        /// another epoch refuses the order as stale.
        epoch: u32,
    },
    /// To the target, then (once it runs the cell) to the source: the
    /// registry names the target at `epoch`.
    Commit {
        /// The handover.
        id: HandoverId,
        /// The cell moved.
        cell: CellId,
        /// The cell's new epoch.
        epoch: u32,
    },
    /// To both sides: roll back; the source keeps the cell.
    Abort {
        /// The handover.
        id: HandoverId,
        /// The cell that stays.
        cell: CellId,
        /// Why.
        reason: AbortReason,
    },
    /// To the owner: split `cell` into its four children, on the same shard.
    Split {
        /// The operation (matched by the [`Report::Split`] answer).
        op: u64,
        /// The leaf to split.
        cell: CellId,
    },
    /// To the owner of all four children: merge them into `parent`.
    Merge {
        /// The operation (matched by the [`Report::Merged`] answer).
        op: u64,
        /// The cell the children become again.
        parent: CellId,
    },
    /// To the source of handover `id`, whose target was lost before its
    /// backup held the cell: run the frozen copy again, at `epoch` (the
    /// registry names the source again).
    Reclaim {
        /// The handover.
        id: HandoverId,
        /// The cell.
        cell: CellId,
        /// Its new epoch.
        epoch: u32,
        /// The lost target.
        lost: ShardRef,
    },
    /// To a backup shard: shard `from` is gone (its lease expired); run
    /// `cells` again from the replicas held of them, each at its new epoch
    /// (the registry already names this shard).
    Promote {
        /// The lost shard.
        from: ShardRef,
        /// Its cells, with their new epochs.
        cells: Vec<(CellId, u32)>,
        /// Cells among them that another shard can take back whole (the
        /// source of a handover to the lost shard): without a replica here
        /// they are not started empty, only reported missing.
        fallback: Vec<CellId>,
    },
}

impl Order {
    /// A short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Order::Begin { .. } => "begin",
            Order::Commit { .. } => "commit",
            Order::Abort { .. } => "abort",
            Order::Split { .. } => "split",
            Order::Merge { .. } => "merge",
            Order::Promote { .. } => "promote",
            Order::Reclaim { .. } => "reclaim",
        }
    }
}

/// Shard -> shard: the steps between a handover's source and target.
pub enum PeerMsg<G: GameLogic> {
    /// Source -> target: the cell's state, taken while it keeps running.
    PreCopy {
        /// The handover.
        id: HandoverId,
        /// The cell.
        cell: CellId,
        /// The source shard (answers go there).
        from: ShardRef,
        /// The epoch the source holds the cell at.
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
    /// Source -> target: what changed since the pre-copy, taken frozen, with
    /// the inputs buffered meanwhile.
    Diff {
        /// The handover.
        id: HandoverId,
        /// The cell.
        cell: CellId,
        /// The changes.
        diff: Box<CellDiff<G>>,
    },
    /// Source -> target: the source gave up; drop the shadow.
    Abort {
        /// The handover.
        id: HandoverId,
        /// The cell.
        cell: CellId,
        /// Why.
        reason: AbortReason,
    },
}

impl<G: GameLogic> PeerMsg<G> {
    /// A short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            PeerMsg::PreCopy { .. } => "precopy",
            PeerMsg::Ready { .. } => "ready",
            PeerMsg::Refuse { .. } => "refuse",
            PeerMsg::Diff { .. } => "diff",
            PeerMsg::Abort { .. } => "abort",
        }
    }

    /// The cell concerned.
    pub fn cell(&self) -> CellId {
        match self {
            PeerMsg::PreCopy { cell, .. }
            | PeerMsg::Ready { cell, .. }
            | PeerMsg::Refuse { cell, .. }
            | PeerMsg::Diff { cell, .. }
            | PeerMsg::Abort { cell, .. } => *cell,
        }
    }
}

impl<G: GameLogic> std::fmt::Debug for PeerMsg<G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PeerMsg::{}({})", self.kind(), self.cell())
    }
}

/// A cell's load as its shard measured it over the last second.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CellLoad {
    /// The cell.
    pub cell: CellId,
    /// Entities owned.
    pub actors: u32,
    /// Players among them.
    pub players: u32,
    /// Client inputs applied per second.
    pub pps: f64,
}

/// What a shard reports every second.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadReport {
    /// Its tick p99 over the last second, microseconds (measured by the
    /// driver: the core has no clock).
    pub tick_us_p99: u64,
    /// Its tick budget (the period), microseconds.
    pub budget_us: u64,
    /// Its cells.
    pub cells: Vec<CellLoad>,
}

/// Shard -> coordinator.
#[derive(Clone, Debug, PartialEq)]
pub enum Report {
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
        /// The last tick the source ran the cell.
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
    /// The target runs the cell after the commit.
    Activated {
        /// The handover.
        id: HandoverId,
        /// The cell.
        cell: CellId,
    },
    /// The target's backup holds the activated cell (sent right after
    /// `Activated` when the target has no backup): the source may drop its
    /// frozen copy.
    Durable {
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
    /// A split was done: the four children now run on the reporting shard.
    Split {
        /// The operation.
        op: u64,
        /// The cell that was split.
        parent: CellId,
    },
    /// A merge was done: `parent` runs on the reporting shard.
    Merged {
        /// The operation.
        op: u64,
        /// The merged cell.
        parent: CellId,
    },
    /// A split or merge was refused by the shard.
    Refused {
        /// The operation.
        op: u64,
        /// Why, for the log.
        reason: String,
    },
    /// Load of the last second.
    Load(LoadReport),
    /// A backup runs a lost shard's cells again.
    Promoted {
        /// The lost shard.
        from: ShardRef,
        /// Cells restored from a replica.
        cells: Vec<CellId>,
        /// Cells that had no replica here: they restart empty.
        missing: Vec<CellId>,
        /// The tick the replicas were taken at (the state of later ticks
        /// is lost).
        replica_tick: TickId,
        /// The tick the promotion happened at.
        tick: TickId,
        /// Entities restored.
        entities: usize,
    },
}
