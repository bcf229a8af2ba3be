//! Where cells go: default contiguous blocks, or a validated static mapping.

use std::collections::BTreeMap;

use tessera_cells::{CellId, Layout};

use tessera_cells::registry::ShardRef;

/// The depth-0 grid in snake order (row by row, every other row reversed),
/// cut into `shards` runs of nearly equal length: every shard gets one
/// contiguous block, so neighbouring cells mostly share a shard and few
/// ghosts cross shards.
pub fn contiguous_blocks(layout: &Layout, shards: usize) -> BTreeMap<CellId, ShardRef> {
    let g = layout.geometry();
    let mut order = Vec::new();
    for cy in 0..g.rows {
        let row: Vec<i32> = if cy % 2 == 0 {
            (0..g.columns).collect()
        } else {
            (0..g.columns).rev().collect()
        };
        order.extend(row.into_iter().map(|cx| CellId::root(g.world, cx, cy)));
    }
    let n = shards.max(1);
    let total = order.len();
    let mut out = BTreeMap::new();
    for (i, cell) in order.into_iter().enumerate() {
        let shard = (i * n / total.max(1)).min(n - 1);
        // Split cells follow their depth-0 ancestor.
        out.insert(cell, ShardRef::local(shard as u16));
    }
    let mut leaves = BTreeMap::new();
    for leaf in layout.leaves() {
        let root = CellId::root(leaf.world, leaf.cx, leaf.cy);
        leaves.insert(leaf, out[&root]);
    }
    leaves
}

/// Why a static mapping was refused. Each names what to fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    /// A shard id beyond the shards the node runs.
    #[error("shard {shard} in the cell mapping does not exist (the node runs {shards} shards: 0..{shards})")]
    NoSuchShard {
        /// The shard given.
        shard: usize,
        /// Shards running.
        shards: usize,
    },
    /// A cell outside the world.
    #[error("cell {cell} in the mapping of shard {shard} is outside the world ({columns} x {rows} cells)")]
    OutsideWorld {
        /// The cell.
        cell: CellId,
        /// The shard it was given to.
        shard: usize,
        /// World columns.
        columns: i32,
        /// World rows.
        rows: i32,
    },
    /// A cell given to two shards.
    #[error("cell {cell} is assigned twice: to shard {first} and to shard {second}")]
    Duplicate {
        /// The cell.
        cell: CellId,
        /// First shard.
        first: usize,
        /// Second shard.
        second: usize,
    },
    /// A cell given to nobody.
    #[error("cell {cell} is not assigned to any shard ({missing} cells unassigned in all)")]
    Unassigned {
        /// The first such cell.
        cell: CellId,
        /// How many.
        missing: usize,
    },
    /// Only depth-0 cells can be mapped statically.
    #[error("cell {0} is not a depth-0 cell; static mappings name grid cells")]
    NotRoot(CellId),
}

/// Cells per shard, as an operator wrote them in a configuration file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StaticMapping {
    /// (shard, its cells).
    pub shards: Vec<(usize, Vec<CellId>)>,
}

impl StaticMapping {
    /// Checks that every grid cell of `layout` is given to exactly one of
    /// `shards` shards, and returns the owners.
    pub fn validate(
        &self,
        layout: &Layout,
        shards: usize,
    ) -> Result<BTreeMap<CellId, ShardRef>, MappingError> {
        let g = layout.geometry();
        let mut owners: BTreeMap<CellId, usize> = BTreeMap::new();
        for (shard, cells) in &self.shards {
            if *shard >= shards {
                return Err(MappingError::NoSuchShard {
                    shard: *shard,
                    shards,
                });
            }
            for cell in cells {
                if cell.depth != 0 {
                    return Err(MappingError::NotRoot(*cell));
                }
                if !g.is_in_world(*cell) {
                    return Err(MappingError::OutsideWorld {
                        cell: *cell,
                        shard: *shard,
                        columns: g.columns,
                        rows: g.rows,
                    });
                }
                if let Some(first) = owners.insert(*cell, *shard) {
                    return Err(MappingError::Duplicate {
                        cell: *cell,
                        first,
                        second: *shard,
                    });
                }
            }
        }
        let missing: Vec<CellId> = g.root_cells().filter(|c| !owners.contains_key(c)).collect();
        if let Some(first) = missing.first() {
            return Err(MappingError::Unassigned {
                cell: *first,
                missing: missing.len(),
            });
        }
        Ok(owners
            .into_iter()
            .map(|(c, s)| (c, ShardRef::local(s as u16)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tessera_cells::Geometry;

    proptest! {
        #[test]
        fn blocks_cover_every_cell_once_and_are_balanced(cols in 1i32..12, rows in 1i32..12, shards in 1usize..9) {
            let layout = Layout::new(Geometry::new(0, 128.0, cols, rows));
            let owners = contiguous_blocks(&layout, shards);
            prop_assert_eq!(owners.len(), (cols * rows) as usize);
            let mut count = vec![0usize; shards];
            for s in owners.values() {
                count[s.shard as usize] += 1;
            }
            let total = (cols * rows) as usize;
            for c in count {
                prop_assert!(c <= total.div_ceil(shards) && c + 1 >= total / shards);
            }
        }
    }

    #[test]
    fn static_mapping_errors_name_the_problem() {
        let layout = Layout::new(Geometry::new(0, 128.0, 2, 1));
        let a = CellId::root(0, 0, 0);
        let b = CellId::root(0, 1, 0);
        let ok = StaticMapping {
            shards: vec![(0, vec![a]), (1, vec![b])],
        };
        assert_eq!(ok.validate(&layout, 2).unwrap().len(), 2);
        let twice = StaticMapping {
            shards: vec![(0, vec![a, b]), (1, vec![b])],
        };
        assert!(twice
            .validate(&layout, 2)
            .unwrap_err()
            .to_string()
            .contains("assigned twice"));
        let missing = StaticMapping {
            shards: vec![(0, vec![a])],
        };
        assert!(matches!(
            missing.validate(&layout, 2),
            Err(MappingError::Unassigned { .. })
        ));
        let far = StaticMapping {
            shards: vec![(0, vec![a, b, CellId::root(0, 9, 9)])],
        };
        assert!(far
            .validate(&layout, 1)
            .unwrap_err()
            .to_string()
            .contains("outside the world"));
        assert!(matches!(
            ok.validate(&layout, 1),
            Err(MappingError::NoSuchShard { shard: 1, .. })
        ));
    }
}
