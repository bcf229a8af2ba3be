//! What cells say to each other and to clients.
//!
//! Inside a node these travel as Rust values through the shards' mailboxes;
//! between nodes the same messages are FlatBuffers frames (`shard.fbs`).

use tessera_schema::client::InputCmd;

use crate::entity::Entity;
use crate::game::Job;
use crate::geometry::{CellId, Vec2};
use crate::ghost::GhostUpdate;
use crate::ids::{ClientId, EntityId, TickId};

/// A message for a cell's InputQueue.
#[derive(Clone, Debug, PartialEq)]
pub enum CellMessage<C, I> {
    /// A client joins; its avatar spawns at `pos` (in this cell).
    Join {
        /// The session.
        client: ClientId,
        /// Display name.
        name: String,
        /// Spawn point.
        pos: Vec2,
        /// The avatar's resume credential (chosen by the gateway; 0: none).
        resume_key: u64,
    },
    /// An input for the entity a client controls.
    Input {
        /// The session.
        client: ClientId,
        /// Its avatar.
        entity: EntityId,
        /// The input.
        input: InputCmd,
        /// Times this input was forwarded after its entity moved.
        hops: u8,
        /// Departure tick of the newest forward pointer this message
        /// followed (0: none). A cell whose own pointer for the entity is
        /// older knows the entity left it before it left the cell that
        /// sent this: the entity is on its way back here, so the message
        /// waits for it instead of bouncing between the two cells.
        after: TickId,
    },
    /// The client applied the snapshot of `tick` (its view state lives with
    /// the avatar).
    Ack {
        /// The session.
        client: ClientId,
        /// Its avatar.
        entity: EntityId,
        /// The snapshot tick.
        tick: TickId,
        /// Times forwarded.
        hops: u8,
        /// As for [`CellMessage::Input`].
        after: TickId,
    },
    /// The client left: remove its avatar.
    Leave {
        /// The session.
        client: ClientId,
        /// Its avatar.
        entity: EntityId,
        /// Times forwarded.
        hops: u8,
        /// As for [`CellMessage::Input`]: a leave must not bounce between
        /// two cells while its entity is on its way back.
        after: TickId,
    },
    /// A new session takes back `entity` (its gateway was lost or drained)
    /// if `key` is the avatar's resume credential; the cell answers the new
    /// session with a Welcome (or a refusal) and sends it the whole view.
    Resume {
        /// The new session.
        client: ClientId,
        /// The avatar.
        entity: EntityId,
        /// The credential.
        key: u64,
        /// Times forwarded.
        hops: u8,
        /// As for [`CellMessage::Input`].
        after: TickId,
    },
    /// Ghost changes from a neighbour.
    Ghost(GhostUpdate),
    /// An entity crossing into this cell.
    Transfer(Box<EntityTransfer<C>>),
    /// Cell `subscriber` wants `entity`'s state until `until`, wherever it
    /// is (sent to the entity's owner; renewed while the interest lasts).
    Subscribe {
        /// The entity.
        entity: EntityId,
        /// The cell that wants it.
        subscriber: CellId,
        /// Until this tick.
        until: TickId,
        /// Times forwarded.
        hops: u8,
    },
    /// A game intent about an entity this cell owns (or owned).
    Intent {
        /// The intent.
        intent: I,
        /// Times forwarded.
        hops: u8,
    },
}

impl<C, I> CellMessage<C, I> {
    /// A short name for logs and counters.
    pub fn kind(&self) -> &'static str {
        match self {
            CellMessage::Join { .. } => "join",
            CellMessage::Input { .. } => "input",
            CellMessage::Ack { .. } => "ack",
            CellMessage::Leave { .. } => "leave",
            CellMessage::Resume { .. } => "resume",
            CellMessage::Ghost(_) => "ghost",
            CellMessage::Transfer(_) => "transfer",
            CellMessage::Intent { .. } => "intent",
            CellMessage::Subscribe { .. } => "subscribe",
        }
    }
}

/// Which part of a split cell a message concerns, when it is addressed to a
/// cell that is no longer a leaf. Shared by every place that redirects such
/// messages (a shard's world, the node core's router).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Locator {
    /// The child containing this point (joins, transfers).
    Position(Vec2),
    /// The child owning this entity (inputs, acks, leaves, intents).
    Entity(EntityId),
    /// Every child (ghost updates: each child inherited the parent's ghosts).
    Every,
}

impl<C, I> CellMessage<C, I> {
    /// Which child of a split destination the message is for;
    /// `intent_target` names the entity an intent is about.
    pub fn locator(&self, intent_target: impl Fn(&I) -> EntityId) -> Locator {
        match self {
            CellMessage::Join { pos, .. } => Locator::Position(*pos),
            CellMessage::Transfer(t) => Locator::Position(t.entity.pos),
            CellMessage::Input { entity, .. }
            | CellMessage::Ack { entity, .. }
            | CellMessage::Leave { entity, .. }
            | CellMessage::Resume { entity, .. }
            | CellMessage::Subscribe { entity, .. } => Locator::Entity(*entity),
            CellMessage::Intent { intent, .. } => Locator::Entity(intent_target(intent)),
            CellMessage::Ghost(_) => Locator::Every,
        }
    }

    /// Counts one more forward of an entity-addressed message; None for the
    /// kinds that carry no hop count.
    pub fn hops_mut(&mut self) -> Option<&mut u8> {
        match self {
            CellMessage::Input { hops, .. }
            | CellMessage::Ack { hops, .. }
            | CellMessage::Leave { hops, .. }
            | CellMessage::Resume { hops, .. }
            | CellMessage::Intent { hops, .. }
            | CellMessage::Subscribe { hops, .. } => Some(hops),
            _ => None,
        }
    }
}

/// Where a message for `to` goes when `to` is not a cell of `cells`: the
/// nearest ancestor in `cells` (`to` was merged into it), else the cells of
/// `cells` inside `to` (it was split), else nowhere.
pub fn redirect(
    to: CellId,
    contains: impl Fn(CellId) -> bool,
    cells: impl Iterator<Item = CellId>,
) -> Redirect {
    let mut up = to.parent();
    while let Some(p) = up {
        if contains(p) {
            return Redirect::Ancestor(p);
        }
        up = p.parent();
    }
    let inside: Vec<CellId> = cells.filter(|c| to.contains_cell(*c) && *c != to).collect();
    if inside.is_empty() {
        Redirect::Nowhere
    } else {
        Redirect::Descendants(inside)
    }
}

/// The answer of [`redirect`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Redirect {
    /// The cell the destination was merged into.
    Ancestor(CellId),
    /// The cells the destination was split into (some of them).
    Descendants(Vec<CellId>),
    /// Neither.
    Nowhere,
}

/// An entity handed from one cell to another: it is owned by this message
/// while in flight, by exactly one cell otherwise.
#[derive(Clone, Debug, PartialEq)]
pub struct EntityTransfer<C> {
    /// The entity, its version already bumped, its view state inside.
    pub entity: Entity<C>,
    /// Its scheduled jobs.
    pub jobs: Vec<Job>,
    /// Neighbours of the new owner that already hold a ghost of it.
    pub ghost_holders: Vec<CellId>,
    /// The tick the entity left its previous cell.
    pub departed: TickId,
    /// A copy sent again after a cell was restored from its replica (or
    /// found in a cell dropped after a restore elsewhere): the receiver
    /// takes it only if it neither owns the entity nor saw it leave since
    /// `departed`.
    pub resent: bool,
}

/// A message addressed to a cell.
#[derive(Clone, Debug, PartialEq)]
pub struct CellEnvelope<C, I> {
    /// Destination cell.
    pub to: CellId,
    /// Sending cell.
    pub from: CellId,
    /// The message.
    pub msg: CellMessage<C, I>,
}

/// What a frame for a client is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientOutputKind {
    /// The join was accepted.
    Welcome,
    /// A view delta.
    Snapshot,
    /// A resume was refused (wrong credential, or not a player): the
    /// frame is the error; the session may join afresh.
    Refused,
}

/// An encoded server frame for a client, computed by the cell owning its
/// avatar; the session's gateway sends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientOutput {
    /// The session.
    pub client: ClientId,
    /// Its avatar.
    pub entity: EntityId,
    /// The cell that owns the avatar now (where inputs should go).
    pub cell: CellId,
    /// The tick.
    pub tick: TickId,
    /// What it is.
    pub kind: ClientOutputKind,
    /// The encoded `ServerFrame`.
    pub bytes: Vec<u8>,
}

/// Everything a shard's world emits in a tick.
#[derive(Clone, Debug, PartialEq)]
pub enum Output<C, I> {
    /// For a cell owned elsewhere (or not found here).
    Cell(CellEnvelope<C, I>),
    /// For a client.
    Client(ClientOutput),
}
