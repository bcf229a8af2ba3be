//! Identities that name things in logs, metrics and messages.

use std::fmt;

/// A stable entity id: never changes when the entity moves between cells or
/// shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntityId(pub u64);

impl fmt::Display for EntityId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "e{}", self.0)
    }
}

/// A client session (assigned by the gateway that hosts it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub u64);

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "c{}", self.0)
    }
}

/// A simulation tick.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TickId(pub u64);

impl fmt::Display for TickId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t{}", self.0)
    }
}

/// Hands out entity ids unique across a cluster: the top 24 bits name the
/// allocator (one per shard: [`IdAllocator::prefix_of`] packs its node and
/// shard), the low 40 bits count (10^12 ids per shard).
#[derive(Clone, Debug)]
pub struct IdAllocator {
    prefix: u64,
    next: u64,
}

impl IdAllocator {
    /// Bits left for the serial number.
    pub const SERIAL_BITS: u32 = 40;

    /// An allocator whose ids start with `prefix` (its low 24 bits).
    pub fn new(prefix: u32) -> Self {
        Self {
            prefix: u64::from(prefix & 0xFF_FFFF) << Self::SERIAL_BITS,
            next: 1,
        }
    }

    /// Most shards per node for which [`IdAllocator::prefix_of`] is unique.
    pub const SHARDS_MAX: u16 = 256;

    /// The prefix of shard `shard` of node `node`: unique in a cluster for
    /// shards below [`IdAllocator::SHARDS_MAX`] (nodes refuse more), never 0.
    pub fn prefix_of(node: u16, shard: u16) -> u32 {
        debug_assert!(shard < Self::SHARDS_MAX);
        ((u32::from(node) << 8) | u32::from(shard & 0xFF)) + 1
    }

    /// The next id.
    pub fn allocate(&mut self) -> EntityId {
        let id = self.prefix | (self.next & ((1 << Self::SERIAL_BITS) - 1));
        self.next += 1;
        EntityId(id)
    }
}
