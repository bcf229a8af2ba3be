//! Tessera's world engine: the pure, deterministic heart.
//!
//! The world is a grid of square **cells** ([`CellId`], [`Layout`]), some
//! split quadtree-style. Each cell owns a dense store of **entities** and
//! runs the six-step tick of DESIGN.md section 4 with explicit queues
//! ([`Cell`]); a [`ShardWorld`] runs the cells of one shard together.
//! Entities near a border are mirrored to neighbours as read-only
//! **ghosts** ([`ghost`]); each player's **view** (AOI with hysteresis) is
//! sent as snapshot deltas against the view it last acknowledged ([`view`]);
//! an entity crossing a border is **transferred** to the new cell with its
//! view state, and whatever arrives for it at the old cell is forwarded. A
//! game plugs in through [`GameLogic`]; [`demo`] is the demo game.
//!
//! [`node::NodeCore`] is everything one shard of a node does (its world, its
//! client sessions, routing by the [`registry`], its side of handovers),
//! without IO: the runtime drives it over sockets and mailboxes, and the
//! deterministic simulator (`sim`, behind the `testing` feature) drives the
//! same code over a seeded network. [`control`] is the one vocabulary of
//! ownership changes shared with the coordinator.
//!
//! This crate never touches a socket, a thread or the wall clock: time is
//! the tick number, randomness comes from seeded generators, and the same
//! seed gives the same world bit for bit.
#![warn(missing_docs)]

pub mod cell;
pub mod control;
pub mod demo;
pub mod entity;
pub mod game;
pub mod geometry;
pub mod ghost;
pub mod handover;
pub mod ids;
pub mod lease;
pub mod messages;
pub mod node;
pub mod registry;
pub mod replica;
pub mod rng;
#[cfg(any(test, feature = "testing"))]
pub mod sim;
pub mod spatial;
pub mod view;
pub mod wire;
pub mod world;

pub use cell::Cell;
pub use entity::{Entity, EntityStore, QState};
pub use game::{GameContext, GameLogic};
pub use geometry::{CellId, Geometry, Layout, Rect, Vec2};
pub use ids::{ClientId, EntityId, TickId};
pub use messages::{CellEnvelope, CellMessage, ClientOutput, EntityTransfer, Output};
pub use node::{NodeCore, NodeOutput, ShardMsg};
pub use registry::{Assignment, FrozenCopy, Registry, RegistryError, ShardRef};
pub use world::{ShardWorld, WorldConfig};
