//! Identities used on every runtime message.

use std::fmt;

/// Index of a shard (one pinned core) inside a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub u16);

impl ShardId {
    /// The shard's index, for tables indexed by shard.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shard-{}", self.0)
    }
}

/// Dense, shard-local index of a stage. Ids are reused after removal, so a
/// stage id is only meaningful together with the shard that issued it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StageId(pub u32);

impl StageId {
    /// The stage's slot index.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for StageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stage-{}", self.0)
    }
}

/// Where a message is going: a stage on a shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StageAddr {
    /// The shard whose mailbox receives the message.
    pub shard: ShardId,
    /// The stage on that shard that handles it.
    pub stage: StageId,
}

impl StageAddr {
    /// Builds an address.
    pub fn new(shard: ShardId, stage: StageId) -> Self {
        Self { shard, stage }
    }
}

impl fmt::Display for StageAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.shard, self.stage)
    }
}

/// Who sent a message: a shard, or a thread outside the shards (signal
/// handler, admin endpoint, test driver) identified by a caller-chosen number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Origin {
    /// Sent by a stage or task running on this shard.
    Shard(ShardId),
    /// Sent from outside the shards.
    External(u32),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Shard(s) => write!(f, "{s}"),
            Origin::External(n) => write!(f, "external-{n}"),
        }
    }
}
