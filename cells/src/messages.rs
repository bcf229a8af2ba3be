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
    },
    /// Ghost changes from a neighbour.
    Ghost(GhostUpdate),
    /// An entity crossing into this cell.
    Transfer(Box<EntityTransfer<C>>),
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
            CellMessage::Ghost(_) => "ghost",
            CellMessage::Transfer(_) => "transfer",
            CellMessage::Intent { .. } => "intent",
        }
    }
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
