//! Ghosts: read-only copies of entities owned by a neighbouring cell.
//!
//! An owning cell sends each neighbour the entities within ghost distance of
//! it, as incremental enter / update / leave entries ([`GhostSender`]). The
//! neighbour keeps them in a [`GhostTable`]. Each entry names the entity's
//! owner cell and its ownership version, which grows at every transfer; a
//! message about an older version loses to a newer one, and a leave leaves a
//! tombstone so that a late enter cannot resurrect the ghost. This makes the
//! table converge whatever the order in which messages from the old and the
//! new owner arrive.

use std::collections::BTreeMap;

use rustc_hash::{FxHashMap, FxHashSet};

use crate::entity::QState;
use crate::geometry::CellId;
use crate::ids::{EntityId, TickId};

/// What changed about a ghost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GhostChange {
    /// New to the receiver (or handed over to a new owner): the whole state.
    Enter(QState),
    /// Changed fields only.
    Update {
        /// New position and velocity, cm and cm/s.
        moved: Option<([i32; 2], [i32; 2])>,
        /// New heading.
        heading: Option<i16>,
        /// New (health, state).
        stats: Option<(u16, u8)>,
    },
    /// No longer within ghost distance (or gone).
    Leave,
}

/// One entity's change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GhostEntry {
    /// The entity.
    pub id: EntityId,
    /// Its ownership version.
    pub version: u32,
    /// The cell that owns it (for a handover entry, the new owner).
    pub owner: CellId,
    /// What changed.
    pub change: GhostChange,
}

/// Ghost changes from one cell to a neighbour, for one tick.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GhostUpdate {
    /// The entries, in the order to apply them.
    pub entries: Vec<GhostEntry>,
}

/// A ghost as the receiving cell holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ghost {
    /// The owning cell, where intents about it go.
    pub owner: CellId,
    /// Its ownership version.
    pub version: u32,
    /// Its last known state.
    pub state: QState,
}

/// What a ghost table counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GhostCounters {
    /// Entries ignored because a newer version or a tombstone was known.
    pub stale_ignored: u64,
    /// Updates for ghosts this table does not hold from that owner.
    pub orphan_updates: u64,
    /// Entries about entities this cell owns itself.
    pub owned_ignored: u64,
}

/// How long a tombstone is kept, in ticks (longer than any message delay).
pub const TOMBSTONE_TICKS: u64 = 1200;

/// The ghosts a cell holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GhostTable {
    pub(crate) ghosts: FxHashMap<EntityId, Ghost>,
    pub(crate) tombstones: FxHashMap<EntityId, (u32, TickId)>,
    /// Ghosts inherited from a split or merged cell, dropped at the given
    /// tick unless their owner confirms them (sends an enter or an update).
    pub(crate) provisional: FxHashMap<EntityId, TickId>,
    pub(crate) counters: GhostCounters,
}

impl GhostTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies an update. `owned` says whether an id is owned by this cell
    /// (such entries are ignored: the owned copy wins).
    pub fn apply(&mut self, update: &GhostUpdate, now: TickId, owned: impl Fn(EntityId) -> bool) {
        for entry in &update.entries {
            if owned(entry.id) {
                self.counters.owned_ignored += 1;
                continue;
            }
            self.apply_entry(entry, now);
        }
    }

    fn apply_entry(&mut self, e: &GhostEntry, now: TickId) {
        if !self.provisional.is_empty() && !matches!(e.change, GhostChange::Leave) {
            self.provisional.remove(&e.id);
        }
        match e.change {
            GhostChange::Enter(state) => {
                if self
                    .tombstones
                    .get(&e.id)
                    .is_some_and(|(v, _)| *v >= e.version)
                {
                    self.counters.stale_ignored += 1;
                    return;
                }
                if self
                    .ghosts
                    .get(&e.id)
                    .is_some_and(|g| g.version > e.version)
                {
                    self.counters.stale_ignored += 1;
                    return;
                }
                self.ghosts.insert(
                    e.id,
                    Ghost {
                        owner: e.owner,
                        version: e.version,
                        state,
                    },
                );
            }
            GhostChange::Update {
                moved,
                heading,
                stats,
            } => {
                let Some(g) = self.ghosts.get_mut(&e.id) else {
                    self.counters.orphan_updates += 1;
                    return;
                };
                if g.owner != e.owner || g.version != e.version {
                    self.counters.orphan_updates += 1;
                    return;
                }
                if let Some((pos, vel)) = moved {
                    g.state.pos = pos;
                    g.state.vel = vel;
                }
                if let Some(h) = heading {
                    g.state.heading = h;
                }
                if let Some((health, state)) = stats {
                    g.state.health = health;
                    g.state.state = state;
                }
            }
            GhostChange::Leave => {
                match self.ghosts.get(&e.id) {
                    Some(g)
                        if g.version > e.version
                            || (g.version == e.version && g.owner != e.owner) =>
                    {
                        self.counters.stale_ignored += 1;
                        return;
                    }
                    Some(_) => {
                        self.ghosts.remove(&e.id);
                    }
                    None => {}
                }
                let expires = TickId(now.0 + TOMBSTONE_TICKS);
                let t = self.tombstones.entry(e.id).or_insert((e.version, expires));
                if t.0 <= e.version {
                    *t = (e.version, expires);
                }
            }
        }
    }

    /// Holds a ghost directly (the cell that just gave the entity away keeps
    /// a copy until the new owner's updates arrive, so viewers see no gap).
    pub fn insert_local(&mut self, id: EntityId, ghost: Ghost) {
        if self
            .ghosts
            .get(&id)
            .is_none_or(|g| g.version <= ghost.version)
        {
            self.ghosts.insert(id, ghost);
        }
    }

    /// Drops a ghost (the entity became owned here).
    pub fn remove(&mut self, id: EntityId) -> Option<Ghost> {
        self.ghosts.remove(&id)
    }

    /// Forgets tombstones older than their expiry, and inherited ghosts no
    /// owner confirmed in time.
    pub fn expire(&mut self, now: TickId) {
        if self.tombstones.len() > 64 {
            self.tombstones.retain(|_, (_, exp)| *exp > now);
        }
        if !self.provisional.is_empty() {
            let ghosts = &mut self.ghosts;
            self.provisional.retain(|id, until| {
                if *until <= now {
                    ghosts.remove(id);
                    false
                } else {
                    true
                }
            });
        }
    }

    /// Takes in the ghosts of a cell this one was split from or merged with,
    /// provisionally: owners re-send what this cell should hold (they
    /// retarget after the layout change), the rest is dropped at `until`.
    /// `owned` says which ids this cell owns (never ghosted here).
    pub fn inherit(&mut self, other: &GhostTable, until: TickId, owned: impl Fn(EntityId) -> bool) {
        for (id, g) in &other.ghosts {
            if owned(*id)
                || self
                    .ghosts
                    .get(id)
                    .is_some_and(|mine| mine.version > g.version)
            {
                continue;
            }
            self.ghosts.insert(*id, *g);
            self.provisional.insert(*id, until);
        }
        for (id, t) in &other.tombstones {
            let mine = self.tombstones.entry(*id).or_insert(*t);
            if mine.0 < t.0 {
                *mine = *t;
            }
        }
    }

    /// The ghost of an entity.
    pub fn get(&self, id: EntityId) -> Option<&Ghost> {
        self.ghosts.get(&id)
    }

    /// Number of ghosts.
    pub fn len(&self) -> usize {
        self.ghosts.len()
    }

    /// True if none.
    pub fn is_empty(&self) -> bool {
        self.ghosts.is_empty()
    }

    /// Every ghost (deterministic order for a given history).
    pub fn iter(&self) -> impl Iterator<Item = (EntityId, &Ghost)> {
        self.ghosts.iter().map(|(id, g)| (*id, g))
    }

    /// The table's counters.
    pub fn counters(&self) -> GhostCounters {
        self.counters
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Sent {
    pub(crate) version: u32,
    /// The owner the receiver holds this ghost under (a leave must name it).
    pub(crate) owner: CellId,
    pub(crate) state: QState,
    pub(crate) stamp: u64,
}

/// What an owning cell has told each neighbour, to send only changes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GhostSender {
    pub(crate) sent: BTreeMap<CellId, FxHashMap<EntityId, Sent>>,
    pub(crate) stamp: u64,
    pub(crate) pending: BTreeMap<CellId, Vec<GhostEntry>>,
}

impl GhostSender {
    /// An empty sender.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a round of [`offer`](Self::offer)s (one per tick).
    pub fn begin(&mut self) {
        self.stamp += 1;
    }

    /// The entity `id` (owned by `owner` at `version`) should be ghosted to
    /// `target` with this state: queues an enter or the changed fields.
    pub fn offer(
        &mut self,
        owner: CellId,
        target: CellId,
        id: EntityId,
        version: u32,
        state: QState,
    ) {
        let stamp = self.stamp;
        let sent = self.sent.entry(target).or_default();
        let change = match sent.get_mut(&id) {
            Some(s) if s.version == version && s.owner == owner => {
                let moved = (s.state.pos != state.pos || s.state.vel != state.vel)
                    .then_some((state.pos, state.vel));
                let heading = (s.state.heading != state.heading).then_some(state.heading);
                let stats = (s.state.health != state.health || s.state.state != state.state)
                    .then_some((state.health, state.state));
                s.state = state;
                s.stamp = stamp;
                if moved.is_none() && heading.is_none() && stats.is_none() {
                    return;
                }
                GhostChange::Update {
                    moved,
                    heading,
                    stats,
                }
            }
            _ => {
                sent.insert(
                    id,
                    Sent {
                        version,
                        owner,
                        state,
                        stamp,
                    },
                );
                GhostChange::Enter(state)
            }
        };
        self.pending.entry(target).or_default().push(GhostEntry {
            id,
            version,
            owner,
            change,
        });
    }

    /// Ends the round: every ghost not offered again is left; returns the
    /// updates per target cell, in cell order.
    pub fn finish(&mut self) -> Vec<(CellId, GhostUpdate)> {
        let stamp = self.stamp;
        for (target, sent) in self.sent.iter_mut() {
            let mut gone: Vec<(EntityId, u32, CellId)> = sent
                .iter()
                .filter(|(_, s)| s.stamp != stamp)
                .map(|(id, s)| (*id, s.version, s.owner))
                .collect();
            if gone.is_empty() {
                continue;
            }
            gone.sort_unstable();
            let pending = self.pending.entry(*target).or_default();
            for (id, version, owner) in gone {
                sent.remove(&id);
                pending.push(GhostEntry {
                    id,
                    version,
                    owner,
                    change: GhostChange::Leave,
                });
            }
        }
        self.sent.retain(|_, s| !s.is_empty());
        std::mem::take(&mut self.pending)
            .into_iter()
            .filter(|(_, e)| !e.is_empty())
            .map(|(cell, entries)| (cell, GhostUpdate { entries }))
            .collect()
    }

    /// The entity left this cell for `new_owner` (version bumped to
    /// `new_version`): neighbours in `new_targets` keep their ghost under the
    /// new owner (a handover entry), the others get a leave. Returns the
    /// cells that hold a ghost of it afterwards, for the new owner.
    pub fn hand_over(
        &mut self,
        owner: CellId,
        id: EntityId,
        new_owner: CellId,
        new_version: u32,
        state: QState,
        new_targets: &FxHashSet<CellId>,
    ) -> Vec<CellId> {
        let mut holders = Vec::new();
        for (target, sent) in self.sent.iter_mut() {
            let Some(s) = sent.remove(&id) else { continue };
            if *target == new_owner {
                // The new owner drops its ghost when the entity arrives.
                continue;
            }
            let pending = self.pending.entry(*target).or_default();
            if new_targets.contains(target) {
                holders.push(*target);
                pending.push(GhostEntry {
                    id,
                    version: new_version,
                    owner: new_owner,
                    change: GhostChange::Enter(state),
                });
            } else {
                pending.push(GhostEntry {
                    id,
                    version: s.version,
                    owner: s.owner,
                    change: GhostChange::Leave,
                });
            }
        }
        let _ = owner;
        holders
    }

    /// The entity arrived with neighbours already holding its ghost: remember
    /// that they have it, so that they get updates rather than enters.
    pub fn adopt(
        &mut self,
        owner: CellId,
        holders: &[CellId],
        id: EntityId,
        version: u32,
        state: QState,
    ) {
        for h in holders {
            self.sent.entry(*h).or_default().insert(
                id,
                Sent {
                    version,
                    owner,
                    state,
                    stamp: self.stamp,
                },
            );
        }
    }

    /// Moves out what neighbours hold of the entities `take` selects (a
    /// split: each child takes the entries of its own entities).
    pub fn take_where(&mut self, take: impl Fn(EntityId) -> bool) -> GhostSender {
        let mut out = GhostSender {
            stamp: self.stamp,
            ..GhostSender::default()
        };
        for (target, sent) in self.sent.iter_mut() {
            let moved: Vec<EntityId> = sent.keys().copied().filter(|id| take(*id)).collect();
            if moved.is_empty() {
                continue;
            }
            let dst = out.sent.entry(*target).or_default();
            for id in moved {
                if let Some(s) = sent.remove(&id) {
                    dst.insert(id, s);
                }
            }
        }
        self.sent.retain(|_, s| !s.is_empty());
        out
    }

    /// Takes over another sender's entries (a merge).
    pub fn absorb(&mut self, other: GhostSender) {
        for (target, sent) in other.sent {
            self.sent.entry(target).or_default().extend(sent);
        }
        for (target, pending) in other.pending {
            self.pending.entry(target).or_default().extend(pending);
        }
        self.stamp = self.stamp.max(other.stamp);
    }

    /// The layout changed: forget, silently, what was sent to cells that are
    /// no longer leaves (they were split or merged; their successors
    /// inherited the ghosts provisionally and will be sent enters).
    pub fn retarget(&mut self, layout: &crate::geometry::Layout) {
        self.sent.retain(|target, _| layout.is_leaf(*target));
        self.pending.retain(|target, _| layout.is_leaf(*target));
    }

    /// The entity is gone for good (despawned): every holder gets a leave.
    pub fn forget(&mut self, id: EntityId) {
        for (target, sent) in self.sent.iter_mut() {
            if let Some(s) = sent.remove(&id) {
                self.pending.entry(*target).or_default().push(GhostEntry {
                    id,
                    version: s.version,
                    owner: s.owner,
                    change: GhostChange::Leave,
                });
            }
        }
    }

    /// Ghosts currently held by neighbours, in total.
    pub fn sent_count(&self) -> usize {
        self.sent.values().map(|s| s.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(x: i32) -> QState {
        QState {
            pos: [x, 0],
            ..QState::default()
        }
    }

    const A: CellId = CellId::root(0, 0, 0);
    const B: CellId = CellId::root(0, 1, 0);
    const D: CellId = CellId::root(0, 0, 1);

    fn entry(owner: CellId, version: u32, change: GhostChange) -> GhostUpdate {
        GhostUpdate {
            entries: vec![GhostEntry {
                id: EntityId(1),
                version,
                owner,
                change,
            }],
        }
    }

    #[test]
    fn a_handover_converges_whatever_the_arrival_order() {
        let none = |_| false;
        // Old owner A: enter v1; then A hands over to B (enter v2 owner B);
        // then B moves it away (leave v2). All six orders of the last three.
        let msgs = [
            entry(A, 1, GhostChange::Enter(q(1))),
            entry(B, 2, GhostChange::Enter(q(2))),
            entry(B, 2, GhostChange::Leave),
        ];
        let orders = [
            [0, 1, 2],
            [0, 2, 1],
            [1, 0, 2],
            [1, 2, 0],
            [2, 0, 1],
            [2, 1, 0],
        ];
        for order in orders {
            let mut t = GhostTable::new();
            for i in order {
                t.apply(&msgs[i], TickId(1), none);
            }
            assert!(t.get(EntityId(1)).is_none(), "order {order:?} left a ghost");
        }
        // Without the final leave, the newest owner's copy always wins.
        for order in [[0, 1], [1, 0]] {
            let mut t = GhostTable::new();
            for i in order {
                t.apply(&msgs[i], TickId(1), none);
            }
            let g = t.get(EntityId(1)).unwrap();
            assert_eq!(
                (g.owner, g.version, g.state),
                (B, 2, q(2)),
                "order {order:?}"
            );
        }
    }

    #[test]
    fn updates_from_a_stale_owner_are_orphans() {
        let mut t = GhostTable::new();
        t.apply(&entry(B, 2, GhostChange::Enter(q(2))), TickId(1), |_| false);
        let stale = entry(
            A,
            1,
            GhostChange::Update {
                moved: Some(([9, 9], [0, 0])),
                heading: None,
                stats: None,
            },
        );
        t.apply(&stale, TickId(1), |_| false);
        assert_eq!(t.get(EntityId(1)).unwrap().state, q(2));
        assert_eq!(t.counters().orphan_updates, 1);
    }

    #[test]
    fn sender_sends_enter_then_changes_then_leave() {
        let mut s = GhostSender::new();
        s.begin();
        s.offer(A, D, EntityId(5), 0, q(1));
        let out = s.finish();
        assert!(matches!(out[0].1.entries[0].change, GhostChange::Enter(_)));
        s.begin();
        s.offer(A, D, EntityId(5), 0, q(1));
        assert!(s.finish().is_empty(), "unchanged: nothing sent");
        s.begin();
        s.offer(A, D, EntityId(5), 0, q(2));
        let out = s.finish();
        assert!(matches!(
            out[0].1.entries[0].change,
            GhostChange::Update { moved: Some(_), .. }
        ));
        s.begin();
        let out = s.finish();
        assert_eq!(out[0].1.entries[0].change, GhostChange::Leave);
        assert_eq!(s.sent_count(), 0);
    }

    #[test]
    fn hand_over_keeps_ghosts_where_the_new_owner_will_send_them() {
        let mut s = GhostSender::new();
        s.begin();
        s.offer(A, D, EntityId(5), 0, q(1));
        s.offer(A, B, EntityId(5), 0, q(1));
        let c = CellId::root(0, 5, 5);
        s.offer(A, c, EntityId(5), 0, q(1));
        s.finish();
        let targets: FxHashSet<CellId> = [D, A].into_iter().collect();
        let holders = s.hand_over(A, EntityId(5), B, 1, q(2), &targets);
        assert_eq!(holders, vec![D]);
        let out = s.finish();
        let to = |cell| {
            out.iter()
                .find(|(t, _)| *t == cell)
                .map(|(_, u)| u.entries[0])
        };
        assert_eq!(to(D).unwrap().change, GhostChange::Enter(q(2)));
        assert_eq!(to(D).unwrap().owner, B);
        assert_eq!(to(c).unwrap().change, GhostChange::Leave);
        assert!(to(B).is_none());
    }
}
