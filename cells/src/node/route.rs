//! Where a shard sends what it cannot keep: the owner of a cell (from the
//! registry), or the shard hosting a client's session (from the client id).

use std::sync::Arc;

use crate::game::GameLogic;
use crate::geometry::CellId;
use crate::ids::ClientId;
use crate::messages::{redirect, CellEnvelope, Locator, Redirect};
use crate::registry::{Registry, ShardRef};

/// Bits of a client id left for the serial; above them, the gateway's shard
/// (16 bits) and node (16 bits).
pub const CLIENT_SERIAL_BITS: u32 = 32;

/// The shard hosting a client's session.
pub fn gateway_of(client: ClientId) -> ShardRef {
    ShardRef {
        node: (client.0 >> 48) as u16,
        shard: (client.0 >> CLIENT_SERIAL_BITS) as u16,
    }
}

/// The client id of the `serial`-th session opened by `gateway`.
pub fn client_id(gateway: ShardRef, serial: u32) -> ClientId {
    ClientId(
        (u64::from(gateway.node) << 48)
            | (u64::from(gateway.shard) << CLIENT_SERIAL_BITS)
            | u64::from(serial),
    )
}

/// What the router counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouterCounters {
    /// Cell messages sent to another shard.
    pub cell_sent: u64,
    /// Cell messages for a cell the registry does not know (dropped).
    pub cell_unknown: u64,
    /// Cell messages for a cell the registry gives to this shard that
    /// neither the world nor a handover shadow took (dropped, logged).
    pub cell_undeliverable: u64,
    /// Entity-addressed messages for a split cell that no part of it knew
    /// after every redirect hop (the entity left the world, usually: its
    /// client's last inputs).
    pub entity_not_found: u64,
    /// Client frames sent to another shard's gateway.
    pub client_sent: u64,
}

/// A shard's view of the registry.
pub struct Router {
    registry: Arc<Registry>,
    counters: RouterCounters,
}

impl Router {
    /// A router over `registry`.
    pub fn new(registry: Arc<Registry>) -> Self {
        Self {
            registry,
            counters: RouterCounters::default(),
        }
    }

    /// The registry in use.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Takes a registry; true if it is another version.
    pub fn replace(&mut self, registry: Arc<Registry>) -> bool {
        let changed = registry.version() != self.registry.version();
        self.registry = registry;
        changed
    }

    /// The counters.
    pub fn counters(&self) -> RouterCounters {
        self.counters
    }

    pub(crate) fn counters_mut(&mut self) -> &mut RouterCounters {
        &mut self.counters
    }

    /// The owners a message for `env.to` goes to: the cell's owner, or, for a
    /// cell that is no longer a leaf, the leaf it was merged into or the
    /// child of the split it concerns (by position for joins and transfers;
    /// entity-addressed messages try the children in turn, one more hop each
    /// time, until one knows the entity; ghosts go to every child's owner).
    /// Empty: nobody owns it (counted).
    pub fn owners_of<G: GameLogic>(
        &mut self,
        env: &mut CellEnvelope<G::Components, G::Intent>,
    ) -> Vec<ShardRef> {
        if let Some(owner) = self.owner_of(env.to) {
            return vec![owner];
        }
        let registry = &self.registry;
        let owner = |c: CellId| registry.get(c).map(|a| a.owner);
        let children = match redirect(
            env.to,
            |c| registry.get(c).is_some(),
            registry.iter().map(|(c, _)| c),
        ) {
            Redirect::Ancestor(p) => return owner(p).into_iter().collect(),
            Redirect::Descendants(d) => d,
            Redirect::Nowhere => {
                self.counters.cell_unknown += 1;
                return Vec::new();
            }
        };
        let layout = registry.layout();
        match env.msg.locator(G::intent_target) {
            Locator::Position(p) => layout.leaf_at(p).and_then(owner).into_iter().collect(),
            Locator::Entity(_) => {
                let hops = env.msg.hops_mut().expect("entity messages count hops");
                if *hops > super::MAX_REDIRECT_HOPS {
                    self.counters.entity_not_found += 1;
                    return Vec::new();
                }
                let pick = children[usize::from(*hops) % children.len()];
                *hops += 1;
                owner(pick).into_iter().collect()
            }
            Locator::Every => {
                let mut owners: Vec<ShardRef> = children.into_iter().filter_map(owner).collect();
                owners.sort_unstable();
                owners.dedup();
                owners
            }
        }
    }

    /// The owner of a leaf cell (the common case, without allocating).
    pub fn owner_of(&self, cell: CellId) -> Option<ShardRef> {
        self.registry.get(cell).map(|a| a.owner)
    }

    /// Counts a cell message sent to another shard.
    pub(crate) fn sent_cell(&mut self) {
        self.counters.cell_sent += 1;
    }
}
