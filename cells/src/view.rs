//! What each client sees: its area of interest with hysteresis, and the
//! snapshot deltas against the last view it acknowledged.
//!
//! Two sets per client: the *membership* (entities within the AOI, entering
//! at `radius` and leaving beyond `radius + margin`, at most `max_entities`
//! nearest) and the *sent views* (what the client holds after applying each
//! snapshot, kept in a bounded ring by tick). A snapshot is the difference
//! between the current membership and the sent view the client last
//! acknowledged; when it would exceed the byte cap, the nearest changes go
//! first (with an age bonus so that far ones are not starved) and the rest
//! wait: the stored sent view is exactly what the client will have.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;
use tessera_schema::server::{snapshot_size_bound, SnapshotRef};
use tessera_schema::wire::{EntityFull, GameEvent, HeadingUpdate, PosUpdate, QVec2, StatUpdate};

use crate::entity::QState;
use crate::geometry::{Rect, Vec2};
use crate::ids::{ClientId, EntityId, TickId};
use crate::spatial::SpatialHash;

/// AOI and snapshot settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ViewConfig {
    /// Enter radius R, metres.
    pub radius: f32,
    /// Hysteresis: leave beyond R + margin.
    pub margin: f32,
    /// Most entities in one view (nearest kept).
    pub max_entities: usize,
    /// Byte cap of one encoded snapshot.
    pub snapshot_bytes_max: usize,
    /// Past sent views kept per client (baselines for deltas).
    pub history: usize,
}

impl Default for ViewConfig {
    fn default() -> Self {
        Self {
            radius: 50.0,
            margin: 10.0,
            max_entities: 128,
            // One RUDP datagram: 1200 B payload minus headers.
            snapshot_bytes_max: 1100,
            history: 16,
        }
    }
}

impl ViewConfig {
    /// Radius beyond which a member leaves (and ghost distance).
    pub fn leave_radius(&self) -> f32 {
        self.radius + self.margin
    }
}

/// A view the client holds after applying one snapshot: sorted by id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SentView {
    /// The snapshot's tick.
    pub tick: TickId,
    /// (entity, state), sorted by entity.
    pub entries: Vec<(EntityId, QState)>,
}

/// One client's view state. It lives in the client's avatar and moves with
/// it between cells and shards.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientView {
    /// The client.
    pub client: ClientId,
    pub(crate) members: Vec<EntityId>,
    pub(crate) history: VecDeque<SentView>,
    pub(crate) acked: Option<TickId>,
    pub(crate) last_included: FxHashMap<EntityId, TickId>,
}

/// One tick's index of what can be seen from a cell: its entities and
/// ghosts (the *items*) and a spatial hash over them.
#[derive(Debug, Default)]
pub struct AoiIndex {
    items: Vec<(EntityId, QState)>,
    positions: Vec<Vec2>,
    hash: SpatialHash,
    scratch: Vec<f32>,
    /// Item by entity, built on the first lookup after a rebuild (only
    /// entities with interests look items up by id).
    by_id: FxHashMap<EntityId, u32>,
    by_id_built: bool,
}

impl AoiIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets every item.
    pub fn clear(&mut self) {
        self.items.clear();
        self.positions.clear();
        self.by_id.clear();
        self.by_id_built = false;
    }

    /// The item of an entity, if indexed.
    pub fn index_of(&mut self, id: EntityId) -> Option<u32> {
        if !self.by_id_built {
            self.by_id_built = true;
            self.by_id.extend(
                self.items
                    .iter()
                    .enumerate()
                    .map(|(i, (e, _))| (*e, i as u32)),
            );
        }
        self.by_id.get(&id).copied()
    }

    /// Adds an item.
    pub fn push(&mut self, id: EntityId, state: QState, pos: Vec2) {
        self.items.push((id, state));
        self.positions.push(pos);
    }

    /// Builds the spatial hash over `area` once every item was pushed.
    pub fn build(&mut self, area: Rect, bucket: f32) {
        self.hash.rebuild(area, bucket, &self.positions);
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True if no item.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// An item: (entity, state).
    pub fn item(&self, i: u32) -> (EntityId, QState) {
        self.items[i as usize]
    }

    /// The viewer at `center`, whose membership was `previous` (sorted),
    /// sees: every item within `radius`, and the previous members still
    /// within the leave radius; only the `max_entities` nearest matter, so
    /// the search stops once they are known. Appends (squared distance as
    /// bits, item) to `out`.
    pub fn members_of(
        &mut self,
        center: Vec2,
        previous: &[EntityId],
        config: &ViewConfig,
        out: &mut Vec<(u32, u32)>,
    ) {
        let r2 = config.radius * config.radius;
        let items = &self.items;
        self.hash.for_each_nearest(
            center,
            config.leave_radius(),
            config.max_entities,
            &mut self.scratch,
            |i, d2| {
                // Beyond R only a previous member stays (hysteresis); a
                // binary search in the short, hot membership list is cheaper
                // than a lookup in a table of every entity.
                let keep = d2 <= r2 || previous.binary_search(&items[i as usize].0).is_ok();
                if keep {
                    // Non-negative floats order like their bits.
                    out.push((d2.to_bits(), i));
                }
                keep
            },
        );
    }
}

/// Reusable buffers for building snapshots.
#[derive(Default)]
pub struct ViewScratch {
    current: Vec<(EntityId, QState, f32)>,
    included: Vec<bool>,
    spare: Vec<(EntityId, QState)>,
    entered: Vec<EntityFull>,
    moved: Vec<PosUpdate>,
    turned: Vec<HeadingUpdate>,
    stats: Vec<StatUpdate>,
    left: Vec<u64>,
    events: Vec<GameEvent>,
    changes: Vec<(f32, usize, Option<usize>)>,
    fbb: Option<tessera_schema::flatbuffers::FlatBufferBuilder<'static>>,
}

/// The result of one view update.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotStats {
    /// Encoded bytes.
    pub bytes: usize,
    /// Changes left out by the byte cap (sent later).
    pub deferred: usize,
}

impl ClientView {
    /// A fresh view (the first snapshot will be full).
    pub fn new(client: ClientId) -> Self {
        Self {
            client,
            members: Vec::new(),
            history: VecDeque::new(),
            acked: None,
            last_included: FxHashMap::default(),
        }
    }

    /// True if `id` is a member (the hysteresis rule keeps it until R + margin).
    pub fn is_member(&self, id: EntityId) -> bool {
        self.members.binary_search(&id).is_ok()
    }

    /// The current membership, sorted.
    pub fn members(&self) -> &[EntityId] {
        &self.members
    }

    /// The newest sent view.
    pub fn latest_sent(&self) -> Option<&SentView> {
        self.history.back()
    }

    /// The acknowledged tick in use as baseline.
    pub fn acked(&self) -> Option<TickId> {
        self.acked
    }

    /// The client has applied the snapshot of `tick`. Older acks (reordered)
    /// and acks of views no longer kept are ignored.
    pub fn ack(&mut self, tick: TickId) {
        if self.acked.is_some_and(|a| a >= tick) {
            return;
        }
        if let Some(pos) = self.history.iter().position(|v| v.tick == tick) {
            self.acked = Some(tick);
            // Older views can no longer be baselines: acks only move forward.
            self.history.drain(..pos);
        }
    }

    /// Computes the new membership from `accepted` (the items
    /// [`AoiIndex::members_of`] found for this viewer), keeping the nearest
    /// `max_entities`, and the snapshot against the acked view; encodes it
    /// and returns the frame. `events` are this tick's events; the ones about
    /// entities in the view are included.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        config: &ViewConfig,
        tick: TickId,
        avatar: EntityId,
        last_input_seq: u32,
        aoi: &AoiIndex,
        accepted: &mut [(u32, u32)],
        events: &[GameEvent],
        scratch: &mut ViewScratch,
    ) -> (Vec<u8>, SnapshotStats) {
        // 1. Membership: the nearest `max_entities` (ties broken by id).
        let mut accepted = accepted;
        if accepted.len() > config.max_entities {
            let by_distance = |a: &(u32, u32), b: &(u32, u32)| {
                a.0.cmp(&b.0)
                    .then_with(|| aoi.item(a.1).0.cmp(&aoi.item(b.1).0))
            };
            accepted.select_nth_unstable_by(config.max_entities, by_distance);
            accepted = &mut accepted[..config.max_entities];
        }
        let cur = &mut scratch.current;
        cur.clear();
        cur.extend(accepted.iter().map(|&(d, i)| {
            let (id, q) = aoi.item(i);
            (id, q, f32::from_bits(d))
        }));
        cur.sort_unstable_by_key(|c| c.0);
        self.members.clear();
        self.members.extend(cur.iter().map(|c| c.0));

        // 2. Delta against the acknowledged view.
        let empty = SentView::default();
        let baseline = self
            .acked
            .and_then(|a| self.history.iter().find(|v| v.tick == a))
            .unwrap_or(&empty);
        let baseline_tick = if std::ptr::eq(baseline, &empty) {
            0
        } else {
            baseline.tick.0
        };
        scratch.left.clear();
        scratch.changes.clear();
        let (mut i, mut j) = (0, 0);
        let base = &baseline.entries;
        while i < base.len() || j < cur.len() {
            match (base.get(i), cur.get(j)) {
                (Some(b), Some(c)) if b.0 == c.0 => {
                    if b.1 != c.1 {
                        scratch.changes.push((c.2, j, Some(i)));
                    }
                    i += 1;
                    j += 1;
                }
                (Some(b), Some(c)) if b.0 < c.0 => {
                    scratch.left.push(b.0 .0);
                    i += 1;
                }
                (Some(b), None) => {
                    scratch.left.push(b.0 .0);
                    i += 1;
                }
                (_, Some(c)) => {
                    scratch.changes.push((c.2, j, None));
                    j += 1;
                }
                (None, None) => unreachable!(),
            }
        }

        // 3. Under the byte cap, nearest (and longest-waiting) first. When
        // everything fits, no ordering is needed.
        let kinds = |base_index: Option<usize>,
                     c: &(EntityId, QState, f32)|
         -> (usize, usize, usize, usize) {
            match base_index {
                // A changed kind is sent whole, like a new entity.
                Some(bi) if base[bi].1.kind == c.1.kind => {
                    let b = &base[bi].1;
                    (
                        0,
                        usize::from(b.pos != c.1.pos || b.vel != c.1.vel),
                        usize::from(b.heading != c.1.heading),
                        usize::from(b.health != c.1.health || b.state != c.1.state),
                    )
                }
                _ => (1, 0, 0, 0),
            }
        };
        let mut all = (0, 0, 0, 0);
        for &(_, j, bi) in scratch.changes.iter() {
            let k = kinds(bi, &cur[j]);
            all = (all.0 + k.0, all.1 + k.1, all.2 + k.2, all.3 + k.3);
        }
        let fits = snapshot_size_bound(all.0, all.1, all.2, all.3, scratch.left.len(), 0)
            <= config.snapshot_bytes_max;
        if !fits && scratch.changes.len() > 1 {
            let age_of = |id: EntityId| {
                tick.0
                    .saturating_sub(self.last_included.get(&id).map_or(0, |t| t.0))
                    .min(64) as f32
            };
            for ch in scratch.changes.iter_mut() {
                let age = age_of(cur[ch.1].0);
                ch.0 /= (1.0 + age) * (1.0 + age);
            }
            scratch
                .changes
                .sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(cur[a.1].0.cmp(&cur[b.1].0)));
        }
        scratch.entered.clear();
        scratch.moved.clear();
        scratch.turned.clear();
        scratch.stats.clear();
        scratch.events.clear();
        // Reuse the storage of a view that fell out of the history.
        let mut entries = std::mem::take(&mut scratch.spare);
        entries.clear();
        entries.reserve(cur.len());
        let mut next = SentView { tick, entries };
        // The leaves first: they are small and must not linger.
        let budget = config.snapshot_bytes_max;
        let mut lefts_kept = scratch.left.len();
        while lefts_kept > 0 && snapshot_size_bound(0, 0, 0, 0, lefts_kept, 0) > budget {
            lefts_kept -= 1;
        }
        let mut deferred = scratch.left.len() - lefts_kept;
        scratch.left.truncate(lefts_kept);
        let included = &mut scratch.included;
        included.clear();
        included.resize(cur.len(), false);
        for &(_, j, base_index) in scratch.changes.iter() {
            let c = &cur[j];
            let (e, m, t, s) = kinds(base_index, c);
            let size = snapshot_size_bound(
                scratch.entered.len() + e,
                scratch.moved.len() + m,
                scratch.turned.len() + t,
                scratch.stats.len() + s,
                scratch.left.len(),
                0,
            );
            if size > budget {
                deferred += 1;
                continue;
            }
            included[j] = true;
            if !fits {
                self.last_included.insert(c.0, tick);
            }
            let st = &c.1;
            if e == 1 {
                scratch.entered.push(st.full(c.0));
                continue;
            }
            if m == 1 {
                scratch.moved.push(PosUpdate::new(
                    c.0 .0,
                    &QVec2::new(st.pos[0], st.pos[1]),
                    &QVec2::new(st.vel[0], st.vel[1]),
                ));
            }
            if t == 1 {
                scratch.turned.push(HeadingUpdate::new(c.0 .0, st.heading));
            }
            if s == 1 {
                scratch
                    .stats
                    .push(StatUpdate::new(c.0 .0, st.health, st.state));
            }
        }
        // 4. The sent view: baseline - left + included changes; what did not
        // fit keeps its baseline state (or stays absent).
        let (mut i, mut j) = (0, 0);
        let left_set = &scratch.left; // sorted: merged from the sorted baseline
        while i < base.len() || j < cur.len() {
            match (base.get(i), cur.get(j)) {
                (Some(b), Some(c)) if b.0 == c.0 => {
                    next.entries
                        .push((c.0, if included[j] { c.1 } else { b.1 }));
                    i += 1;
                    j += 1;
                }
                (Some(b), Some(c)) if b.0 < c.0 => {
                    if left_set.binary_search(&b.0 .0).is_err() {
                        next.entries.push(*b);
                    }
                    i += 1;
                }
                (Some(b), None) => {
                    if left_set.binary_search(&b.0 .0).is_err() {
                        next.entries.push(*b);
                    }
                    i += 1;
                }
                (_, Some(c)) => {
                    if included[j] {
                        next.entries.push((c.0, c.1));
                    }
                    j += 1;
                }
                (None, None) => unreachable!(),
            }
        }
        // Forget ages of entities no longer around.
        if self.last_included.len() > 2 * config.max_entities.max(16) {
            let members = &self.members;
            self.last_included
                .retain(|id, _| members.binary_search(id).is_ok());
        }
        // 5. Events about what the client sees (or about itself).
        for ev in events {
            let sees = |id: u64| {
                id == avatar.0 || next.entries.binary_search_by_key(&id, |e| e.0 .0).is_ok()
            };
            if sees(ev.source()) || sees(ev.target()) {
                let with = snapshot_size_bound(
                    scratch.entered.len(),
                    scratch.moved.len(),
                    scratch.turned.len(),
                    scratch.stats.len(),
                    scratch.left.len(),
                    scratch.events.len() + 1,
                );
                if with <= budget {
                    scratch.events.push(*ev);
                }
            }
        }
        let snapshot = SnapshotRef {
            tick: tick.0,
            baseline_tick,
            entity: avatar.0,
            last_input_seq,
            entered: &scratch.entered,
            moved: &scratch.moved,
            turned: &scratch.turned,
            stats: &scratch.stats,
            left: &scratch.left,
            events: &scratch.events,
        };
        let fbb = scratch.fbb.get_or_insert_with(|| {
            tessera_schema::flatbuffers::FlatBufferBuilder::with_capacity(2048)
        });
        let bytes = tessera_schema::server::encode_snapshot(fbb, &snapshot).to_vec();
        self.history.push_back(next);
        while self.history.len() > config.history.max(1) {
            if let Some(dropped) = self.history.pop_front() {
                if Some(dropped.tick) == self.acked {
                    // The acked view fell out: the next snapshot is full.
                    self.acked = None;
                }
                scratch.spare = dropped.entries;
            }
        }
        let stats = SnapshotStats {
            bytes: bytes.len(),
            deferred,
        };
        (bytes, stats)
    }
}

/// Why a client could not apply a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MirrorError {
    /// Not newer than the newest applied: dropped (reordered or duplicated).
    #[error("snapshot {0} is not newer than the last one applied")]
    Stale(u64),
    /// Its baseline is not among the views the client kept.
    #[error("snapshot {tick} is based on view {baseline}, which is not kept")]
    MissingBaseline {
        /// The snapshot.
        tick: u64,
        /// Its baseline.
        baseline: u64,
    },
    /// It names the same entity twice as entering.
    #[error("snapshot {tick} has entity {id} entering twice")]
    DuplicateEntity {
        /// The snapshot.
        tick: u64,
        /// The entity.
        id: u64,
    },
    /// It updates an entity absent from the baseline.
    #[error("snapshot {tick} updates entity {id} absent from its baseline")]
    UnknownEntity {
        /// The snapshot.
        tick: u64,
        /// The entity.
        id: u64,
    },
}

/// The client side of the snapshot stream: rebuilds views from deltas.
#[derive(Clone, Debug, Default)]
pub struct ClientMirror {
    views: VecDeque<SentView>,
    capacity: usize,
}

impl ClientMirror {
    /// A mirror keeping `capacity` past views (at least the server's history).
    pub fn new(capacity: usize) -> Self {
        Self {
            views: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// The newest view.
    pub fn latest(&self) -> Option<&SentView> {
        self.views.back()
    }

    /// Applies a decoded snapshot; on success the view at its tick is the
    /// newest and its tick should be acknowledged.
    pub fn apply(
        &mut self,
        s: &tessera_schema::server::Snapshot,
    ) -> Result<&SentView, MirrorError> {
        if self.views.back().is_some_and(|v| v.tick.0 >= s.tick) {
            return Err(MirrorError::Stale(s.tick));
        }
        let mut entries: Vec<(EntityId, QState)> = if s.baseline_tick == 0 {
            Vec::new()
        } else {
            self.views
                .iter()
                .find(|v| v.tick.0 == s.baseline_tick)
                .ok_or(MirrorError::MissingBaseline {
                    tick: s.tick,
                    baseline: s.baseline_tick,
                })?
                .entries
                .clone()
        };
        let mut left: Vec<u64> = s.left.clone();
        left.sort_unstable();
        entries.retain(|(id, _)| left.binary_search(&id.0).is_err());
        let mut entering: Vec<u64> = s.entered.iter().map(|f| f.id()).collect();
        entering.sort_unstable();
        if let Some(w) = entering.windows(2).find(|w| w[0] == w[1]) {
            return Err(MirrorError::DuplicateEntity {
                tick: s.tick,
                id: w[0],
            });
        }
        for f in &s.entered {
            let (id, q) = QState::from_full(f);
            match entries.binary_search_by_key(&id, |e| e.0) {
                Ok(k) => entries[k].1 = q,
                Err(k) => entries.insert(k, (id, q)),
            }
        }
        let find = |entries: &mut Vec<(EntityId, QState)>, id: u64| -> Result<usize, MirrorError> {
            entries
                .binary_search_by_key(&EntityId(id), |e| e.0)
                .map_err(|_| MirrorError::UnknownEntity { tick: s.tick, id })
        };
        for m in &s.moved {
            let k = find(&mut entries, m.id())?;
            entries[k].1.pos = [m.pos().x(), m.pos().y()];
            entries[k].1.vel = [m.vel().x(), m.vel().y()];
        }
        for t in &s.turned {
            let k = find(&mut entries, t.id())?;
            entries[k].1.heading = t.heading();
        }
        for st in &s.stats {
            let k = find(&mut entries, st.id())?;
            entries[k].1.health = st.health();
            entries[k].1.state = st.state();
        }
        self.views.push_back(SentView {
            tick: TickId(s.tick),
            entries,
        });
        while self.views.len() > self.capacity {
            self.views.pop_front();
        }
        Ok(self.views.back().expect("just pushed"))
    }
}
