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

    /// Moves the serial forward to at least `serial` (never back).
    pub fn skip_to(&mut self, serial: u64) {
        self.next = self.next.max(serial & ((1 << Self::SERIAL_BITS) - 1));
    }

    /// Where a shard that starts at Unix time `unix_ms` begins its serials,
    /// so that a node restarted under its old id does not hand out an id
    /// its previous incarnation used (entities it created may live on
    /// elsewhere): 64 serials per millisecond since 2026-01-01, faster than
    /// a shard allocates. It relies on the clock not stepping back, and the
    /// serials wrap every 199 days (an entity older than that could meet
    /// its id again).
    pub fn serial_origin(unix_ms: u64) -> u64 {
        const EPOCH_MS: u64 = 1_767_225_600_000;
        (unix_ms.saturating_sub(EPOCH_MS) << 6) & ((1 << Self::SERIAL_BITS) - 1)
    }

    /// The next id.
    pub fn allocate(&mut self) -> EntityId {
        let id = self.prefix | (self.next & ((1 << Self::SERIAL_BITS) - 1));
        self.next += 1;
        EntityId(id)
    }
}

#[cfg(test)]
mod serial_tests {
    use super::*;

    #[test]
    fn a_restarted_shard_starts_past_what_its_last_incarnation_handed_out() {
        let t0 = 1_780_000_000_000;
        let mut first = IdAllocator::new(IdAllocator::prefix_of(3, 1));
        first.skip_to(IdAllocator::serial_origin(t0));
        // Up to 64 ids per millisecond of life: 10 s of it.
        let last = (0..640_000).map(|_| first.allocate()).last().unwrap();
        let mut second = IdAllocator::new(IdAllocator::prefix_of(3, 1));
        second.skip_to(IdAllocator::serial_origin(t0 + 10_000));
        assert!(second.allocate().0 > last.0);
        // Same prefix: the node and shard stay readable.
        assert_eq!(
            second.allocate().0 >> IdAllocator::SERIAL_BITS,
            last.0 >> IdAllocator::SERIAL_BITS
        );
    }
}
