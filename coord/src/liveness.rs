//! Node loss: heartbeats, leases, backups and promotion (DESIGN.md
//! section 8).
//!
//! Every node heartbeats; each heartbeat the coordinator takes renews the
//! node's lease on its cells (the node counts the lease from when it *sent*
//! the heartbeat, the coordinator from when it *received* it, so the node's
//! lease always ends first). A node silent for `dead_after` is declared
//! dead: balancing stops using it and its handovers are aborted. Once its
//! lease has surely expired (`lease + lease_margin` after its last
//! heartbeat) each of its shards' cells goes, with epoch + 1, to the
//! shard's backup, which promotes the replicas it holds; a cut-off node has
//! fenced itself by then, so no cell ever has two writers.
//!
//! Backups: every owning shard is replicated to a shard of another node,
//! spread so that no shard backs up more shards than it must.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use tessera_cells::control::{Order, Report};
use tessera_cells::ids::TickId;
use tessera_cells::registry::ShardRef;
use tessera_cells::CellId;

use crate::balance::Coordinator;

/// How long a node the coordinator has not heard yet may stay silent
/// before it is declared dead (a node builds its shards after it joins; a
/// coordinator that just took over has heard nobody).
pub const JOIN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// What the coordinator knows of one node's liveness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeLiveness {
    /// The last heartbeat taken (or when the coordinator started watching).
    pub last_seen: Instant,
    /// The node's tick in that heartbeat.
    pub last_tick: TickId,
    /// Declared dead at.
    pub dead_since: Option<Instant>,
    /// Its cells were given to their backups.
    pub recovered: bool,
    /// A heartbeat came since this coordinator started watching (false: it
    /// is only assumed alive, from the registry, after a takeover).
    pub heard: bool,
}

/// One shard's cells given to its backup after its node was lost.
#[derive(Clone, Debug, PartialEq)]
pub struct FailoverRecord {
    /// The lost shard.
    pub shard: ShardRef,
    /// Where its cells went.
    pub to: ShardRef,
    /// How many cells it had.
    pub cells: usize,
    /// Last heartbeat to declared dead.
    pub detection: Duration,
    /// When it was declared dead (the caller's clock: a crash's moment,
    /// known outside, gives crash-to-detection).
    pub declared_at: Instant,
    /// Declared dead to the cells' reassignment (the lease's end).
    pub lease_wait: Duration,
    /// Declared dead to the backup running them (None until reported).
    pub served: Option<Duration>,
    /// Ticks of state lost: the node's tick in its last heartbeat minus the
    /// replicas' tick (the node may have run up to a heartbeat period
    /// more).
    pub ticks_lost: Option<u64>,
    /// Cells that had no replica on the backup (restarted empty).
    pub missing: usize,
    /// Entities restored.
    pub entities: usize,
    /// True if the backup had replicas (false: the cells restarted empty
    /// on another shard).
    pub from_replica: bool,
}

#[derive(Clone, Debug)]
pub(crate) struct Pending {
    pub(crate) record: FailoverRecord,
    pub(crate) declared: Instant,
    pub(crate) last_tick: TickId,
}

/// The liveness side of the coordinator's state.
#[derive(Debug, Default)]
pub(crate) struct Liveness {
    pub(crate) nodes: BTreeMap<u16, NodeLiveness>,
    pub(crate) watching_since: Option<Instant>,
    pub(crate) pending: BTreeMap<ShardRef, Pending>,
    pub(crate) records: Vec<FailoverRecord>,
    /// Nodes whose process was replaced while the registry still gave
    /// their old one cells -> the new incarnation, recorded once those
    /// cells have failed over.
    pub(crate) replaced: BTreeMap<u16, u64>,
}

impl Coordinator {
    /// `node` registered as process `incarnation` (it does at every start
    /// and to every coordinator it reaches). Under another incarnation
    /// than the one the registry gives cells to, the process that ran them
    /// is gone: the node is declared dead now (the cells move to their
    /// backups once the old process's lease has ended, as for any death),
    /// and its heartbeats renew nothing until they have; only then does
    /// the registry take the new incarnation. Returns true when this call
    /// found it out (every shard link registers: the rest return false).
    pub fn registered(&mut self, now: Instant, node: u16, incarnation: u64) -> bool {
        let owns = self.registry().iter().any(|(_, a)| a.owner.node == node);
        let old = self.registry().incarnation_of(node);
        if owns && old.is_some_and(|old| old != incarnation) {
            // Every shard link registers: said and acted on once.
            let fresh = self.liveness.replaced.insert(node, incarnation) != Some(incarnation);
            if fresh {
                self.note(format!(
                    "node {node} registered as a new process ({incarnation:#x}, was {:#x}) while it owned cells: they fail over to their backups once the old process's lease ends",
                    old.unwrap_or_default()
                ));
                let l = self.liveness.nodes.entry(node).or_insert(NodeLiveness {
                    last_seen: now,
                    last_tick: TickId(0),
                    dead_since: None,
                    recovered: false,
                    heard: false,
                });
                if l.dead_since.is_none() {
                    let silent = now.saturating_duration_since(l.last_seen);
                    self.declare_dead(now, node, silent);
                }
            }
            return fresh;
        }
        self.liveness.replaced.remove(&node);
        self.registry_mut().set_incarnation(node, incarnation);
        false
    }

    /// A heartbeat from `node`, sent at its tick `tick`, arrived at `now`:
    /// its lease runs on (returns true: grant it). A node declared dead
    /// that speaks again is alive (its cells, if they were recovered
    /// meanwhile, stay where they went: the registry tells it). A node
    /// whose process was replaced while it owned cells
    /// ([`Coordinator::registered`]) gets nothing until those cells have
    /// failed over (returns false).
    pub fn heartbeat(&mut self, now: Instant, node: u16, tick: TickId) -> bool {
        if self.liveness.replaced.contains_key(&node) {
            return false;
        }
        let l = self.liveness.nodes.entry(node).or_insert(NodeLiveness {
            last_seen: now,
            last_tick: tick,
            dead_since: None,
            recovered: false,
            heard: true,
        });
        l.heard = true;
        l.last_seen = l.last_seen.max(now);
        l.last_tick = l.last_tick.max(tick);
        if l.dead_since.take().is_some() {
            let recovered = std::mem::take(&mut l.recovered);
            self.note(format!(
                "node {node} is back{}",
                if recovered {
                    " (its cells were recovered elsewhere meanwhile)"
                } else {
                    " before its lease ended: it keeps its cells"
                }
            ));
        }
        true
    }

    /// True if `node` is declared dead.
    pub fn is_dead(&self, node: u16) -> bool {
        self.liveness
            .nodes
            .get(&node)
            .is_some_and(|l| l.dead_since.is_some())
    }

    /// What is known of every watched node.
    pub fn liveness(&self) -> &BTreeMap<u16, NodeLiveness> {
        &self.liveness.nodes
    }

    /// Failovers finished since the last call.
    pub fn take_failovers(&mut self) -> Vec<FailoverRecord> {
        std::mem::take(&mut self.liveness.records)
    }

    /// Failovers waiting for their backup's report.
    pub fn failovers_pending(&self) -> usize {
        self.liveness.pending.len()
    }

    /// The lease a heartbeat grants, as nodes are told.
    pub fn lease(&self) -> Duration {
        self.policy().lease
    }

    /// Detection, recovery after the lease, and backup placement.
    pub(crate) fn watch_nodes(&mut self, now: Instant) {
        if !self.policy().watch_nodes {
            return;
        }
        if self.liveness.watching_since.is_none() {
            // A coordinator that just took over has heard nobody yet: every
            // node the registry names gets a full lease from now.
            self.liveness.watching_since = Some(now);
            let owners: BTreeSet<u16> = self.registry().iter().map(|(_, a)| a.owner.node).collect();
            let members: BTreeSet<u16> = self.members().iter().map(|s| s.node).collect();
            for node in owners.into_iter().chain(members) {
                self.liveness.nodes.entry(node).or_insert(NodeLiveness {
                    last_seen: now,
                    last_tick: TickId(0),
                    dead_since: None,
                    recovered: false,
                    heard: false,
                });
            }
        }
        let (dead_after, lease) = (
            self.policy().dead_after,
            self.policy().lease + self.policy().lease_margin,
        );
        let nodes: Vec<(u16, NodeLiveness)> =
            self.liveness.nodes.iter().map(|(n, l)| (*n, *l)).collect();
        for (node, l) in nodes {
            let silent = now.saturating_duration_since(l.last_seen);
            // A node not heard yet (still building its shards after joining,
            // or only assumed alive after a takeover) gets longer: a slow
            // start is not a death.
            let limit = if l.heard {
                dead_after
            } else {
                dead_after.max(JOIN_GRACE)
            };
            if l.dead_since.is_none() && silent >= limit {
                self.declare_dead(now, node, silent);
            }
            let l = self.liveness.nodes[&node];
            if l.dead_since.is_some() && !l.recovered && silent >= lease {
                self.recover(now, node);
            }
        }
        // A replaced node whose old cells have all gone: its new process
        // becomes the registry's.
        let settled: Vec<(u16, u64)> = self
            .liveness
            .replaced
            .iter()
            .filter(|(n, _)| !self.registry().iter().any(|(_, a)| a.owner.node == **n))
            .map(|(n, i)| (*n, *i))
            .collect();
        for (node, incarnation) in settled {
            self.liveness.replaced.remove(&node);
            self.registry_mut().set_incarnation(node, incarnation);
        }
        self.place_backups();
    }

    fn declare_dead(&mut self, now: Instant, node: u16, silent: Duration) {
        if let Some(l) = self.liveness.nodes.get_mut(&node) {
            l.dead_since = Some(now);
        }
        let shards: BTreeSet<ShardRef> = self
            .registry()
            .iter()
            .map(|(_, a)| a.owner)
            .chain(self.members().iter().copied())
            .filter(|s| s.node == node)
            .collect();
        self.note(format!(
            "node {node} declared dead: silent for {:.0} ms; its cells move to their backups when its lease ends",
            silent.as_secs_f64() * 1e3
        ));
        // Handovers to or from it cannot finish.
        let ids = self.moves_involving(&shards);
        for id in ids {
            self.settle_lost_move(now, id, &shards);
        }
        self.drop_reshapes_of(&shards);
    }

    /// Gives every cell of a dead node's shards to the shard's backup.
    fn recover(&mut self, now: Instant, node: u16) {
        let Some(l) = self.liveness.nodes.get_mut(&node) else {
            return;
        };
        l.recovered = true;
        let l = *l;
        let uncertain = self.uncertain_moves(node);
        self.frozen_copies_move_to_backups(node);
        let declared = l.dead_since.unwrap_or(now);
        // Shards that own cells, and those that own none but were
        // replicated: their backup still holds what waited in them (a
        // handover source's buffer) and must pass it on.
        let shards: BTreeSet<ShardRef> = self
            .registry()
            .iter()
            .map(|(_, a)| a.owner)
            .chain(self.registry().backups().keys().copied())
            .filter(|s| s.node == node)
            .collect();
        for shard in shards {
            let cells: Vec<(CellId, u32)> = self
                .registry()
                .cells_of(shard)
                .into_iter()
                .map(|(c, a)| (c, a.epoch))
                .collect();
            let backup = self
                .registry()
                .backup_of(shard)
                .filter(|b| !self.is_dead(b.node));
            let (to, from_replica) = match backup {
                Some(b) => (b, true),
                None if cells.is_empty() => continue,
                None => match self.least_loaded_live(node) {
                    Some(s) => (s, false),
                    None => {
                        self.note(format!(
                            "{shard} lost with {} cells and no live shard to take them",
                            cells.len()
                        ));
                        continue;
                    }
                },
            };
            let fallback: Vec<CellId> = cells
                .iter()
                .map(|(c, _)| *c)
                .filter(|c| uncertain.contains(c))
                .collect();
            let mut promoted = Vec::with_capacity(cells.len());
            for (cell, epoch) in cells {
                // Saturating: a cell pinned at the admin epoch fails over at it.
                let epoch = epoch.saturating_add(1);
                match self.registry_mut().reassign(cell, to, epoch) {
                    Ok(()) => promoted.push((cell, epoch)),
                    Err(e) => self.note(format!("recovery of {cell}: {e}")),
                }
            }
            self.note(format!(
                "{shard} lost: {} cells to {to} {} (epoch + 1)",
                promoted.len(),
                if from_replica {
                    "from its replicas"
                } else {
                    "EMPTY: no live backup held replicas"
                }
            ));
            let record = FailoverRecord {
                shard,
                to,
                cells: promoted.len(),
                detection: declared.saturating_duration_since(l.last_seen),
                declared_at: declared,
                lease_wait: now.saturating_duration_since(declared),
                served: None,
                ticks_lost: None,
                missing: 0,
                entities: 0,
                from_replica,
            };
            self.liveness.pending.insert(
                shard,
                Pending {
                    record,
                    declared,
                    last_tick: l.last_tick,
                },
            );
            self.push_order(
                to,
                Order::Promote {
                    from: shard,
                    cells: promoted,
                    fallback,
                },
            );
        }
    }

    /// The backup reported the promotion ([`Report::Promoted`]).
    pub(crate) fn on_promoted(&mut self, now: Instant, shard: ShardRef, report: Report) {
        let Report::Promoted {
            from,
            cells: promoted,
            missing,
            replica_tick,
            tick,
            entities,
        } = report
        else {
            return;
        };
        // Whoever ordered the promotion (a predecessor that crashed since,
        // too), the registry's records of frozen copies settle its cells:
        // one the backup lacked comes back from its copy, one it restored
        // lets its copy go.
        let mut lost_cells = 0;
        for cell in &missing {
            let given = self.registry().get(*cell).is_some_and(|a| a.owner == shard);
            if given && self.reclaimable(*cell) {
                self.reclaim(*cell);
            } else {
                lost_cells += 1;
            }
        }
        for cell in &promoted {
            if self.registry().get(*cell).is_some_and(|a| a.owner == shard) {
                self.release_frozen(*cell);
            }
        }
        let Some(mut p) = self.liveness.pending.remove(&from) else {
            self.counters_mut().stale_events += 1;
            return;
        };
        if p.record.to != shard {
            self.liveness.pending.insert(from, p);
            self.counters_mut().stale_events += 1;
            return;
        }
        let missing = lost_cells;
        p.record.served = Some(now.saturating_duration_since(p.declared));
        let _ = tick;
        p.record.ticks_lost =
            (replica_tick.0 > 0).then(|| p.last_tick.0.saturating_sub(replica_tick.0));
        p.record.missing = missing;
        p.record.entities = entities;
        self.note(format!(
            "{from} recovered on {shard}: {} cells ({missing} without replica), {entities} entities, {} ticks of state lost, served {:.0} ms after detection",
            p.record.cells,
            p.record.ticks_lost.map_or("all".to_string(), |t| t.to_string()),
            p.record.served.unwrap_or_default().as_secs_f64() * 1e3
        ));
        self.liveness.records.push(p.record);
    }

    fn least_loaded_live(&self, except_node: u16) -> Option<ShardRef> {
        self.members()
            .iter()
            .copied()
            .filter(|s| s.node != except_node && !self.is_dead(s.node) && !self.is_draining(s.node))
            .min_by_key(|s| (self.registry().cells_of(*s).len(), *s))
    }

    /// Every live owning shard gets a backup on another live node; the
    /// entries of dead shards stay until their promotion was ordered (their
    /// backup keeps the replicas meanwhile).
    fn place_backups(&mut self) {
        let live: Vec<ShardRef> = self
            .members()
            .iter()
            .copied()
            .filter(|s| !self.is_dead(s.node))
            .collect();
        // A draining node backs up no one, and needs a backup only while it
        // still owns cells: it is about to leave.
        let staying: Vec<ShardRef> = live
            .iter()
            .copied()
            .filter(|s| !self.is_draining(s.node))
            .collect();
        let nodes: BTreeSet<u16> = live.iter().map(|s| s.node).collect();
        let current = self.registry().backups().clone();
        let mut next: BTreeMap<ShardRef, ShardRef> = BTreeMap::new();
        if nodes.len() >= 2 {
            let owners: BTreeSet<ShardRef> = self
                .registry()
                .iter()
                .map(|(_, a)| a.owner)
                .chain(staying.iter().copied())
                .filter(|s| !self.is_dead(s.node))
                .collect();
            let mut load: BTreeMap<ShardRef, usize> = staying.iter().map(|s| (*s, 0)).collect();
            // Keep what is still valid (moving a backup costs a full round).
            for (owner, backup) in &current {
                if owners.contains(owner) && backup.node != owner.node && load.contains_key(backup)
                {
                    next.insert(*owner, *backup);
                    *load.get_mut(backup).expect("live") += 1;
                }
            }
            for owner in owners {
                if next.contains_key(&owner) {
                    continue;
                }
                let pick = load
                    .iter()
                    .filter(|(s, _)| s.node != owner.node)
                    .min_by_key(|(s, n)| (**n, **s))
                    .map(|(s, _)| *s);
                if let Some(b) = pick {
                    next.insert(owner, b);
                    *load.get_mut(&b).expect("live") += 1;
                }
            }
        }
        // Dead shards not yet promoted keep theirs.
        for (owner, backup) in &current {
            if self.is_dead(owner.node) && !self.liveness.nodes[&owner.node].recovered {
                next.entry(*owner).or_insert(*backup);
            }
        }
        if self.registry_mut().set_backups(next.clone()) {
            self.note(format!(
                "backups: {}",
                next.iter()
                    .map(|(o, b)| format!("{o}->{b}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
        }
    }
}
