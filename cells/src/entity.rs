//! Entities and the dense per-cell entity store.

use rustc_hash::FxHashMap;
use tessera_schema::quant::{quantize, quantize_heading};
use tessera_schema::wire::{self, EntityKind};

use crate::geometry::{CellId, Vec2};
use crate::ids::{ClientId, EntityId, TickId};
use crate::view::ClientView;

/// One simulated thing: a player's avatar, an NPC...
#[derive(Clone, Debug, PartialEq)]
pub struct Entity<C> {
    /// Stable id.
    pub id: EntityId,
    /// What it is.
    pub kind: EntityKind,
    /// Position, metres.
    pub pos: Vec2,
    /// Velocity, metres per second.
    pub vel: Vec2,
    /// Facing, radians.
    pub heading: f32,
    /// Ownership version: incremented at every transfer to another cell, so
    /// that ghost messages about an older owner lose to newer ones.
    pub version: u32,
    /// The client controlling it, if a player.
    pub client: Option<ClientId>,
    /// A player's resume credential (0: none): a new session presenting it
    /// takes the avatar back after its gateway was lost.
    pub resume_key: u64,
    /// The tick its client was last heard from (an input, an ack, a resume):
    /// a player silent for the world's `player_linger_ticks` lost its
    /// session with no leave (its gateway died) and is removed.
    pub heard: TickId,
    /// Newest input applied (inputs at or below are duplicates).
    pub last_input_seq: u32,
    /// Inputs that arrived ahead of a missing one (an older input still on
    /// its way through the cell the entity left), by sequence number, with
    /// the tick they arrived. Applied in order when the gap fills, or after a
    /// timeout.
    pub pending_inputs: Vec<(u32, crate::ids::TickId, tessera_schema::client::InputCmd)>,
    /// Game-defined state.
    pub game: C,
    /// The client's view state (players only); it travels with the entity.
    pub view: Option<Box<ClientView>>,
    /// Entities this one keeps seeing wherever they are (a locked target,
    /// squad members), until the tick: beyond distance, their owners push
    /// their state here. At most [`MAX_INTERESTS`]; set by the game with
    /// [`Entity::keep_in_view`].
    pub interests: Vec<(EntityId, TickId)>,
    /// Cells that asked for this entity's state wherever it goes, until the
    /// tick (their entities are interested in it). At most
    /// [`MAX_SUBSCRIBERS`]; it travels with the entity.
    pub subscribers: Vec<(CellId, TickId)>,
}

/// Most interests an entity holds (the one expiring first makes room).
pub const MAX_INTERESTS: usize = 8;
/// Most cells subscribed to one entity (the one expiring first makes room).
pub const MAX_SUBSCRIBERS: usize = 16;

/// Inserts or extends `(key, until)` in a short list bounded at `max`;
/// when full, the entry expiring first makes room (if it expires first).
fn upsert<K: PartialEq + Copy>(list: &mut Vec<(K, TickId)>, key: K, until: TickId, max: usize) {
    if let Some(e) = list.iter_mut().find(|e| e.0 == key) {
        e.1 = e.1.max(until);
        return;
    }
    if list.len() < max {
        list.push((key, until));
        return;
    }
    if let Some(min) = list.iter_mut().min_by_key(|e| e.1) {
        if min.1 < until {
            *min = (key, until);
        }
    }
}

impl<C> Entity<C> {
    /// A new entity at rest.
    pub fn new(id: EntityId, kind: EntityKind, pos: Vec2, game: C) -> Self {
        Self {
            id,
            kind,
            pos,
            vel: Vec2::default(),
            heading: 0.0,
            version: 0,
            client: None,
            resume_key: 0,
            heard: TickId(0),
            last_input_seq: 0,
            pending_inputs: Vec::new(),
            game,
            view: None,
            interests: Vec::new(),
            subscribers: Vec::new(),
        }
    }

    /// Keeps `target` in this entity's view until `until`, wherever it is
    /// (extends an existing interest; a full list drops the one expiring
    /// first).
    pub fn keep_in_view(&mut self, target: EntityId, until: TickId) {
        if target != self.id {
            upsert(&mut self.interests, target, until, MAX_INTERESTS);
        }
    }

    /// Cell `cell` wants this entity's state until `until`.
    pub fn add_subscriber(&mut self, cell: CellId, until: TickId) {
        upsert(&mut self.subscribers, cell, until, MAX_SUBSCRIBERS);
    }

    /// Drops interests and subscriptions that ended before `now`.
    pub fn expire_interest(&mut self, now: TickId) {
        self.interests.retain(|(_, until)| *until >= now);
        self.subscribers.retain(|(_, until)| *until >= now);
    }
}

/// An entity as viewers see it: quantised, compared field by field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct QState {
    /// Position, cm.
    pub pos: [i32; 2],
    /// Velocity, cm/s.
    pub vel: [i32; 2],
    /// Heading, wire units.
    pub heading: i16,
    /// Game health.
    pub health: u16,
    /// Kind (wire value).
    pub kind: u8,
    /// Game state flags.
    pub state: u8,
}

impl QState {
    /// Quantises an entity; `stats` is what the game exposes (health, state).
    pub fn of<C>(e: &Entity<C>, stats: (u16, u8)) -> Self {
        Self {
            pos: [quantize(e.pos.x), quantize(e.pos.y)],
            vel: [quantize(e.vel.x), quantize(e.vel.y)],
            heading: quantize_heading(e.heading),
            health: stats.0,
            kind: e.kind.0,
            state: stats.1,
        }
    }

    /// Position in metres.
    pub fn position(&self) -> Vec2 {
        Vec2::new(
            tessera_schema::quant::dequantize(self.pos[0]),
            tessera_schema::quant::dequantize(self.pos[1]),
        )
    }

    /// The wire form of the whole state.
    pub fn full(&self, id: EntityId) -> wire::EntityFull {
        wire::EntityFull::new(
            id.0,
            &wire::QVec2::new(self.pos[0], self.pos[1]),
            &wire::QVec2::new(self.vel[0], self.vel[1]),
            self.heading,
            self.health,
            EntityKind(self.kind),
            self.state,
        )
    }

    /// Reads the wire form.
    pub fn from_full(f: &wire::EntityFull) -> (EntityId, Self) {
        (
            EntityId(f.id()),
            Self {
                pos: [f.pos().x(), f.pos().y()],
                vel: [f.vel().x(), f.vel().y()],
                heading: f.heading(),
                health: f.health(),
                kind: f.kind().0,
                state: f.state(),
            },
        )
    }
}

/// Why an entity could not be stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("entity {0} is already in this store")]
pub struct DuplicateEntity(pub EntityId);

/// The entities a cell owns: dense, with an id index. Removal swaps the last
/// entity into the hole, so iteration stays a tight loop over a `Vec`.
#[derive(Clone, Debug)]
pub struct EntityStore<C> {
    entities: Vec<Entity<C>>,
    index: FxHashMap<EntityId, u32>,
}

impl<C> Default for EntityStore<C> {
    fn default() -> Self {
        Self {
            entities: Vec::new(),
            index: FxHashMap::default(),
        }
    }
}

impl<C> EntityStore<C> {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an entity; refuses a second entity with the same id.
    pub fn insert(&mut self, e: Entity<C>) -> Result<(), Box<(DuplicateEntity, Entity<C>)>> {
        if self.index.contains_key(&e.id) {
            return Err(Box::new((DuplicateEntity(e.id), e)));
        }
        self.index.insert(e.id, self.entities.len() as u32);
        self.entities.push(e);
        Ok(())
    }

    /// Removes and returns an entity.
    pub fn remove(&mut self, id: EntityId) -> Option<Entity<C>> {
        let i = self.index.remove(&id)? as usize;
        let e = self.entities.swap_remove(i);
        if let Some(moved) = self.entities.get(i) {
            self.index.insert(moved.id, i as u32);
        }
        Some(e)
    }

    /// The entity with this id.
    pub fn get(&self, id: EntityId) -> Option<&Entity<C>> {
        self.index.get(&id).map(|&i| &self.entities[i as usize])
    }

    /// The entity with this id, mutably.
    pub fn get_mut(&mut self, id: EntityId) -> Option<&mut Entity<C>> {
        self.index.get(&id).map(|&i| &mut self.entities[i as usize])
    }

    /// True if the id is stored.
    pub fn contains(&self, id: EntityId) -> bool {
        self.index.contains_key(&id)
    }

    /// Number of entities.
    pub fn len(&self) -> usize {
        self.entities.len()
    }

    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.entities.is_empty()
    }

    /// All entities, in storage order.
    pub fn iter(&self) -> std::slice::Iter<'_, Entity<C>> {
        self.entities.iter()
    }

    /// All entities, mutably.
    pub fn iter_mut(&mut self) -> std::slice::IterMut<'_, Entity<C>> {
        self.entities.iter_mut()
    }

    /// The entities as a slice.
    pub fn as_slice(&self) -> &[Entity<C>] {
        &self.entities
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_keeps_its_index_through_removals() {
        let mut s = EntityStore::new();
        for i in 0..10 {
            s.insert(Entity::new(
                EntityId(i),
                EntityKind::Npc,
                Vec2::new(i as f32, 0.0),
                (),
            ))
            .unwrap();
        }
        assert!(s
            .insert(Entity::new(
                EntityId(3),
                EntityKind::Npc,
                Vec2::default(),
                ()
            ))
            .is_err());
        for i in [0, 5, 9, 1] {
            assert_eq!(s.remove(EntityId(i)).unwrap().id, EntityId(i));
        }
        assert!(s.remove(EntityId(5)).is_none());
        assert_eq!(s.len(), 6);
        for e in s.iter() {
            assert_eq!(s.get(e.id).unwrap().pos.x, e.id.0 as f32);
        }
    }
}
