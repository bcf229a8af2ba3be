//! The `cell -> owner` registry: which shard of which node writes each leaf
//! cell, under which epoch. The coordinator (`tessera-coord`) is the only
//! writer; node cores read a shared copy to route messages.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::geometry::{CellId, Layout};

/// A shard of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardRef {
    /// The node (0 for a single-node deployment).
    pub node: u16,
    /// The shard within the node.
    pub shard: u16,
}

impl ShardRef {
    /// Shard `shard` of the local node.
    pub const fn local(shard: u16) -> Self {
        Self { node: 0, shard }
    }
}

impl fmt::Display for ShardRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node-{}/shard-{}", self.node, self.shard)
    }
}

/// Why a shard name could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid shard {0:?}: expected SHARD (this node), NODE/SHARD or node-N/shard-S")]
pub struct ParseShardError(pub String);

impl std::str::FromStr for ShardRef {
    type Err = ParseShardError;

    /// `3` (shard 3 of node 0), `2/1` or `node-2/shard-1` (the Display form).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseShardError(s.to_string());
        let t = s.trim();
        let (node, shard) = match t.split_once('/') {
            Some((n, sh)) => (
                n.strip_prefix("node-").unwrap_or(n),
                sh.strip_prefix("shard-").unwrap_or(sh),
            ),
            None => ("0", t),
        };
        Ok(ShardRef {
            node: node.parse().map_err(|_| bad())?,
            shard: shard.parse().map_err(|_| bad())?,
        })
    }
}

/// Who owns a cell, and under which epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// The owning shard.
    pub owner: ShardRef,
    /// The cell's epoch: bumped at every change of owner. A message about
    /// the cell with an older epoch is stale.
    pub epoch: u32,
}

/// Where the frozen copy of a cell lives while its handover's commit is not
/// yet durable (the target's backup does not hold the cell yet): if the
/// target is lost before it does, the cell comes back from this copy. Kept
/// in the registry, durable with the rest, so that a coordinator taking
/// over still knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrozenCopy {
    /// The handover (a [`crate::control::HandoverId`]'s value).
    pub handover: u64,
    /// The handover's source: the shard the copy was frozen on, and the
    /// owner of the replica holding it once that source is lost too.
    pub source: ShardRef,
    /// The shard holding the copy: the source itself, or its backup (in
    /// its replica of the source) after the source was lost.
    pub holder: ShardRef,
    /// The handover's target, to which the cell was committed.
    pub target: ShardRef,
}

/// Why a registry change was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The cell is not a leaf of the layout.
    #[error("cell {0} is not a leaf of the current layout")]
    NotALeaf(CellId),
    /// The cell has no owner.
    #[error("cell {0} has no owner")]
    Unassigned(CellId),
    /// A change carried an epoch older than the registry's.
    #[error("stale epoch {got} for cell {cell} (current {current})")]
    StaleEpoch {
        /// The cell.
        cell: CellId,
        /// The epoch given.
        got: u32,
        /// The current epoch.
        current: u32,
    },
}

/// The epoch an operator uses to override any owner (logged loudly).
pub const ADMIN_EPOCH: u32 = u32::MAX;

/// The registry of cell owners.
#[derive(Clone, Debug, PartialEq)]
pub struct Registry {
    layout: Arc<Layout>,
    cells: BTreeMap<CellId, Assignment>,
    /// Owner shard -> the shard on another node that replicates its cells.
    backups: BTreeMap<ShardRef, ShardRef>,
    /// Node -> the process (incarnation) its cells belong to: kept here,
    /// durable with the rest, so that a coordinator taking over still
    /// knows that a node registering under another one lost its cells.
    incarnations: BTreeMap<u16, u64>,
    /// Cells committed to a new owner whose backup does not hold them yet.
    frozen: BTreeMap<CellId, FrozenCopy>,
    version: u64,
    cluster_epoch: u32,
}

impl Registry {
    /// A registry of `layout` with these owners, every cell at epoch 1.
    pub fn new(
        layout: Arc<Layout>,
        owners: &BTreeMap<CellId, ShardRef>,
    ) -> Result<Self, RegistryError> {
        let mut cells = BTreeMap::new();
        for leaf in layout.leaves() {
            let owner = *owners.get(&leaf).ok_or(RegistryError::Unassigned(leaf))?;
            cells.insert(leaf, Assignment { owner, epoch: 1 });
        }
        for cell in owners.keys() {
            if !layout.is_leaf(*cell) {
                return Err(RegistryError::NotALeaf(*cell));
            }
        }
        Ok(Self {
            layout,
            cells,
            backups: BTreeMap::new(),
            incarnations: BTreeMap::new(),
            frozen: BTreeMap::new(),
            version: 1,
            cluster_epoch: 1,
        })
    }

    /// A registry as another process sent it: every leaf of `layout` must
    /// have an assignment and every assignment must be a leaf.
    pub fn from_parts(
        layout: Arc<Layout>,
        cells: BTreeMap<CellId, Assignment>,
        version: u64,
        cluster_epoch: u32,
    ) -> Result<Self, RegistryError> {
        for leaf in layout.leaves() {
            if !cells.contains_key(&leaf) {
                return Err(RegistryError::Unassigned(leaf));
            }
        }
        for cell in cells.keys() {
            if !layout.is_leaf(*cell) {
                return Err(RegistryError::NotALeaf(*cell));
            }
        }
        Ok(Self {
            layout,
            cells,
            backups: BTreeMap::new(),
            incarnations: BTreeMap::new(),
            frozen: BTreeMap::new(),
            version,
            cluster_epoch,
        })
    }

    /// The same registry with these backups (as another process sent it:
    /// the version stays).
    pub fn with_backups(mut self, backups: BTreeMap<ShardRef, ShardRef>) -> Self {
        self.backups = backups;
        self
    }

    /// The same registry with these incarnations (as another process sent
    /// it: the version stays).
    pub fn with_incarnations(mut self, incarnations: BTreeMap<u16, u64>) -> Self {
        self.incarnations = incarnations;
        self
    }

    /// The same registry with these frozen copies (as another process sent
    /// it: the version stays).
    pub fn with_frozen_copies(mut self, frozen: BTreeMap<CellId, FrozenCopy>) -> Self {
        self.frozen = frozen;
        self
    }

    /// The frozen copy `cell` would come back from if its owner were lost
    /// now: set while its last handover's commit is not durable.
    pub fn frozen_copy(&self, cell: CellId) -> Option<FrozenCopy> {
        self.frozen.get(&cell).copied()
    }

    /// Every frozen copy, by cell.
    pub fn frozen_copies(&self) -> &BTreeMap<CellId, FrozenCopy> {
        &self.frozen
    }

    /// Records (or, with None, forgets) where `cell`'s frozen copy lives;
    /// the version goes up if it changed.
    pub fn set_frozen_copy(&mut self, cell: CellId, copy: Option<FrozenCopy>) -> bool {
        let old = match copy {
            Some(c) => self.frozen.insert(cell, c),
            None => self.frozen.remove(&cell),
        };
        if old == copy {
            return false;
        }
        self.version += 1;
        true
    }

    /// The process `node`'s cells belong to, if it ever registered.
    pub fn incarnation_of(&self, node: u16) -> Option<u64> {
        self.incarnations.get(&node).copied()
    }

    /// Every node's incarnation.
    pub fn incarnations(&self) -> &BTreeMap<u16, u64> {
        &self.incarnations
    }

    /// Records `node`'s process; the version goes up if it changed.
    pub fn set_incarnation(&mut self, node: u16, incarnation: u64) -> bool {
        if self.incarnations.insert(node, incarnation) == Some(incarnation) {
            return false;
        }
        self.version += 1;
        true
    }

    /// The shard that replicates `owner`'s cells, if any (none on one node).
    pub fn backup_of(&self, owner: ShardRef) -> Option<ShardRef> {
        self.backups.get(&owner).copied()
    }

    /// Every owner -> backup pair.
    pub fn backups(&self) -> &BTreeMap<ShardRef, ShardRef> {
        &self.backups
    }

    /// Replaces the backups; the version goes up if they changed.
    pub fn set_backups(&mut self, backups: BTreeMap<ShardRef, ShardRef>) -> bool {
        if backups == self.backups {
            return false;
        }
        self.backups = backups;
        self.version += 1;
        true
    }

    /// The layout the registry covers.
    pub fn layout(&self) -> &Arc<Layout> {
        &self.layout
    }

    /// Bumped at every change.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// True if this registry supersedes `other`: a later coordinator
    /// (cluster epoch), or the same one's later version.
    pub fn is_newer_than(&self, other: &Registry) -> bool {
        (self.cluster_epoch, self.version) > (other.cluster_epoch, other.version)
    }

    /// The cluster epoch (bumped when a coordinator takes over).
    pub fn cluster_epoch(&self) -> u32 {
        self.cluster_epoch
    }

    /// Who owns a cell.
    pub fn get(&self, cell: CellId) -> Option<Assignment> {
        self.cells.get(&cell).copied()
    }

    /// Every assignment, in cell order.
    pub fn iter(&self) -> impl Iterator<Item = (CellId, Assignment)> + '_ {
        self.cells.iter().map(|(c, a)| (*c, *a))
    }

    /// The cells a shard owns, in order.
    pub fn cells_of(&self, owner: ShardRef) -> Vec<(CellId, Assignment)> {
        self.iter().filter(|(_, a)| a.owner == owner).collect()
    }

    /// Number of cells.
    pub fn len(&self) -> usize {
        self.cells.len()
    }

    /// True if no cell.
    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    /// A coordinator takes over: every order of an earlier one is now older
    /// than the cluster epoch.
    pub fn bump_cluster_epoch(&mut self) -> u32 {
        self.raise_cluster_epoch(self.cluster_epoch.saturating_add(1))
    }

    /// A coordinator takes over with fencing token `epoch` (from etcd):
    /// the cluster epoch becomes `epoch`, or one more than now if that is
    /// not newer (an epoch never goes back).
    pub fn raise_cluster_epoch(&mut self, epoch: u32) -> u32 {
        self.cluster_epoch = epoch.max(self.cluster_epoch.saturating_add(1));
        self.version += 1;
        self.cluster_epoch
    }

    /// Moves a cell to a new owner with epoch `epoch`, which must be newer
    /// than the cell's (or [`ADMIN_EPOCH`]).
    pub fn reassign(
        &mut self,
        cell: CellId,
        owner: ShardRef,
        epoch: u32,
    ) -> Result<(), RegistryError> {
        let a = self
            .cells
            .get_mut(&cell)
            .ok_or(RegistryError::Unassigned(cell))?;
        if epoch <= a.epoch && epoch != ADMIN_EPOCH {
            return Err(RegistryError::StaleEpoch {
                cell,
                got: epoch,
                current: a.epoch,
            });
        }
        *a = Assignment { owner, epoch };
        self.version += 1;
        Ok(())
    }

    /// Replaces the layout and the assignments of the cells it changed
    /// (after a split or merge): `removed` cells go, `added` come in.
    pub fn relayout(
        &mut self,
        layout: Arc<Layout>,
        removed: &[CellId],
        added: &[(CellId, Assignment)],
    ) -> Result<(), RegistryError> {
        for c in removed {
            self.cells.remove(c);
            // A reshaped cell's frozen copy is of a cell that is no more.
            self.frozen.remove(c);
        }
        for (c, a) in added {
            if !layout.is_leaf(*c) {
                return Err(RegistryError::NotALeaf(*c));
            }
            self.cells.insert(*c, *a);
        }
        self.layout = layout;
        self.version += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::Geometry;

    #[test]
    fn epochs_only_grow() {
        let layout = Arc::new(Layout::new(Geometry::new(0, 128.0, 2, 2)));
        let owners: BTreeMap<_, _> = layout
            .leaves()
            .into_iter()
            .map(|c| (c, ShardRef::local((c.cx % 2) as u16)))
            .collect();
        let mut r = Registry::new(layout.clone(), &owners).unwrap();
        assert_eq!(r.cells_of(ShardRef::local(0)).len(), 2);
        let c = CellId::root(0, 0, 0);
        let v = r.version();
        assert!(matches!(
            r.reassign(c, ShardRef::local(1), 1),
            Err(RegistryError::StaleEpoch { .. })
        ));
        r.reassign(c, ShardRef::local(1), 2).unwrap();
        assert_eq!(r.get(c).unwrap().owner, ShardRef::local(1));
        assert!(r.version() > v);
        r.reassign(c, ShardRef::local(0), ADMIN_EPOCH).unwrap();
    }

    #[test]
    fn every_leaf_needs_an_owner() {
        let layout = Arc::new(Layout::new(Geometry::new(0, 128.0, 2, 1)));
        let owners: BTreeMap<_, _> = [(CellId::root(0, 0, 0), ShardRef::local(0))]
            .into_iter()
            .collect();
        assert_eq!(
            Registry::new(layout, &owners).unwrap_err(),
            RegistryError::Unassigned(CellId::root(0, 1, 0))
        );
    }
}
