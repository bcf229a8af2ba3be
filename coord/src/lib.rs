//! Tessera's coordinator logic: who owns which cell, under which epoch.
//!
//! Pure: no sockets, no threads, no clock. The [`Coordinator`] is the only
//! writer of the [`Registry`] (defined in `tessera-cells`, where node cores
//! read it), which maps every leaf cell to its owner (node and shard) with an
//! epoch per cell, bumped at every change of owner, and a version bumped at
//! every change of anything, so that shards can cache it and notice updates
//! with one atomic load. [`placement`] computes default assignments and validates
//! static ones from a configuration file.
#![warn(missing_docs)]

pub mod balance;
pub mod drain;
pub mod liveness;
pub mod placement;

pub use balance::{CommandError, Coordinator, CoordinatorCounters, HandoverRecord, Policy};
pub use drain::{DrainState, DRAIN_PARALLEL};
pub use liveness::{FailoverRecord, NodeLiveness};
pub use placement::{contiguous_blocks, MappingError, StaticMapping};
/// The vocabulary the coordinator speaks with shards, and the registry it
/// writes: they live in `tessera-cells`, where node cores read them too.
pub use tessera_cells::control::{CellLoad, LoadReport, Order, Report};
pub use tessera_cells::registry::{Assignment, Registry, RegistryError, ShardRef, ADMIN_EPOCH};
