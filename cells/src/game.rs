//! The contract between the engine and a game.
//!
//! The engine owns entities, cells, ghosts, views, transfers and the tick;
//! the game says what inputs mean, what its systems do every tick and how
//! intents change their targets.

use std::collections::BinaryHeap;
use std::fmt::Debug;

use tessera_schema::client::InputCmd;
use tessera_schema::wire::{EventKind, GameEvent};

use crate::entity::{Entity, EntityStore};
use crate::geometry::{CellId, Rect, Vec2};
use crate::ids::{EntityId, IdAllocator, TickId};
use crate::rng::Rng;

/// Counters a game bumps when it refuses or corrects input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GameCounters {
    /// Inputs refused outright (NaN, dead player...).
    pub inputs_rejected: u64,
    /// Inputs corrected (movement longer than 1 clamped...).
    pub inputs_clamped: u64,
    /// Actions refused (cooldown, range, unknown target).
    pub actions_rejected: u64,
    /// Intents applied.
    pub intents_applied: u64,
}

/// A job the game scheduled for a later tick (the SimulationQueue).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Job {
    /// Tick it is due at.
    pub due: TickId,
    /// The entity concerned.
    pub entity: EntityId,
    /// Game-defined job kind.
    pub kind: u32,
}

impl Ord for Job {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Min-heap on (due, entity, kind): BinaryHeap is a max-heap.
        (other.due, other.entity, other.kind).cmp(&(self.due, self.entity, self.kind))
    }
}

impl PartialOrd for Job {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Jobs waiting for their tick, per cell. Jobs follow their entity when it
/// moves to another cell.
#[derive(Clone, Debug, Default)]
pub struct SimulationQueue {
    pub(crate) heap: BinaryHeap<Job>,
}

impl SimulationQueue {
    /// Schedules a job.
    pub fn schedule(&mut self, job: Job) {
        self.heap.push(job);
    }

    /// Takes the jobs due at or before `now`, in due order.
    pub fn take_due(&mut self, now: TickId, out: &mut Vec<Job>) {
        while self.heap.peek().is_some_and(|j| j.due <= now) {
            out.extend(self.heap.pop());
        }
    }

    /// Removes and returns every job of `entity`.
    pub fn take_for(&mut self, entity: EntityId) -> Vec<Job> {
        let (mine, rest): (Vec<Job>, Vec<Job>) = std::mem::take(&mut self.heap)
            .into_iter()
            .partition(|j| j.entity == entity);
        self.heap = rest.into();
        mine
    }

    /// Jobs waiting.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// True if none.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

/// What the game sees while the engine calls it for one cell.
pub struct GameContext<'a> {
    /// The tick being run.
    pub tick: TickId,
    /// Seconds per tick.
    pub dt: f32,
    /// The cell.
    pub cell: CellId,
    /// The cell's area.
    pub bounds: Rect,
    /// The whole world's area.
    pub world: Rect,
    /// The cell's seeded generator.
    pub rng: &'a mut Rng,
    /// Events of this tick (shown to the clients that see source or target).
    pub events: &'a mut Vec<GameEvent>,
    /// The game's counters.
    pub counters: &'a mut GameCounters,
    /// Jobs for later ticks.
    pub jobs: &'a mut SimulationQueue,
    /// For entities the game spawns.
    pub ids: &'a mut IdAllocator,
}

impl GameContext<'_> {
    /// Records an event.
    pub fn event(&mut self, kind: EventKind, source: EntityId, target: EntityId, amount: i32) {
        self.events.push(GameEvent::new(
            self.tick.0,
            source.0,
            target.0,
            amount,
            kind,
        ));
    }

    /// Schedules a job `after` ticks from now.
    pub fn schedule(&mut self, after: u64, entity: EntityId, kind: u32) {
        self.jobs.schedule(Job {
            due: TickId(self.tick.0 + after.max(1)),
            entity,
            kind,
        });
    }
}

/// A game running on the engine.
pub trait GameLogic: 'static {
    /// Per-entity game state (health, cooldowns, AI...).
    type Components: Clone + Debug + PartialEq + Send + 'static;
    /// Something that should happen to an entity, possibly owned elsewhere
    /// (an attack...). Routed by the engine to the cell owning its target.
    type Intent: Clone + Debug + PartialEq + Send + 'static;

    /// Where a joining player appears (called by the gateway to pick the cell).
    fn spawn_point(&self, name: &str, join_serial: u64, world: Rect) -> Vec2;

    /// Components of a new player.
    fn new_player(&mut self, cx: &mut GameContext<'_>, name: &str) -> Self::Components;

    /// Applies a client's input to the entity it controls: validate (clamp
    /// and count, never trust), set velocity and heading, and push the
    /// intents its actions cause.
    fn apply_input(
        &mut self,
        cx: &mut GameContext<'_>,
        entity: &mut Entity<Self::Components>,
        input: &InputCmd,
        intents: &mut Vec<Self::Intent>,
    );

    /// The game's systems for one cell and tick (AI, cooldowns); it may also
    /// push intents. The engine integrates velocities afterwards.
    fn simulate(
        &mut self,
        cx: &mut GameContext<'_>,
        entities: &mut EntityStore<Self::Components>,
        intents: &mut Vec<Self::Intent>,
    );

    /// A scheduled job is due (the entity is owned by this cell).
    fn run_job(
        &mut self,
        cx: &mut GameContext<'_>,
        entity: &mut Entity<Self::Components>,
        kind: u32,
    );

    /// The entity an intent is about.
    fn intent_target(intent: &Self::Intent) -> EntityId;

    /// Applies an intent to its target, owned by this cell.
    fn apply_intent(
        &mut self,
        cx: &mut GameContext<'_>,
        target: &mut Entity<Self::Components>,
        intent: &Self::Intent,
    );

    /// What viewers see of the game state: (health, state flags).
    fn stats(components: &Self::Components) -> (u16, u8);

    /// Writes an entity's components for another node (entity transfers
    /// and handovers between machines), in any encoding the game likes
    /// ([`crate::wire::ByteReader`] reads fixed-size fields back).
    fn encode_components(components: &Self::Components, out: &mut Vec<u8>);

    /// Reads what [`GameLogic::encode_components`] wrote; None refuses the
    /// frame that carried it (counted as a bad value, never trusted).
    fn decode_components(bytes: &[u8]) -> Option<Self::Components>;

    /// Writes an intent for another node.
    fn encode_intent(intent: &Self::Intent, out: &mut Vec<u8>);

    /// Reads what [`GameLogic::encode_intent`] wrote; None refuses the frame.
    fn decode_intent(bytes: &[u8]) -> Option<Self::Intent>;
}
