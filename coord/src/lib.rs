//! Tessera's coordinator logic: who owns which cell, under which epoch.
//!
//! Pure: no sockets, no threads, no clock. The [`Registry`] maps every leaf
//! cell of the [`Layout`] to its owner (node and shard) with an epoch per
//! cell, bumped at every change of owner, and a version bumped at every
//! change of anything, so that shards can cache it and notice updates with
//! one atomic load. [`placement`] computes default assignments and validates
//! static ones from a configuration file.
#![warn(missing_docs)]

pub mod balance;
pub mod placement;
pub mod registry;

pub use balance::{
    CellLoad, CommandError, Coordinator, CoordinatorCounters, HandoverRecord, LoadReport, Order,
    Policy, ShardEvent,
};
pub use placement::{contiguous_blocks, MappingError, StaticMapping};
pub use registry::{Assignment, Registry, RegistryError, ShardRef};
