//! Graceful drain: a node leaving on purpose (Kubernetes preStop,
//! `tessera admin drain NODE`) hands every cell it owns to the other nodes
//! by live handover, a few at a time, and backs up no one any more; once
//! it owns nothing and no handover involves it, it may exit without a
//! player noticing more than a handover's freeze.

use std::collections::BTreeSet;
use std::time::Instant;

use tessera_cells::registry::ShardRef;

use crate::balance::{CommandError, Coordinator};

/// Handovers out of one draining node at a time: enough to drain a node's
/// cells in seconds, few enough that the receivers' ticks absorb them.
pub const DRAIN_PARALLEL: usize = 2;

/// Where a drain stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainState {
    /// When it began.
    pub since: Instant,
    /// Cells the node still owns.
    pub cells_left: usize,
    /// Handovers out of it under way.
    pub moving: usize,
    /// Shards it still backs up.
    pub backing_up: usize,
}

impl DrainState {
    /// The node may exit: it owns nothing, sends nothing, backs up no one.
    pub fn done(&self) -> bool {
        self.cells_left == 0 && self.moving == 0 && self.backing_up == 0
    }
}

impl Coordinator {
    /// Starts draining `node` (again: no effect). Refused when no other
    /// live node could take its cells.
    pub fn drain(&mut self, now: Instant, node: u16) -> Result<usize, CommandError> {
        if !self.members().iter().any(|s| s.node == node) {
            return Err(CommandError::Impossible(format!(
                "node {node} is not a compute member of the cluster"
            )));
        }
        if !self.draining.contains_key(&node) {
            let others = self
                .members()
                .iter()
                .any(|s| s.node != node && !self.is_dead(s.node) && !self.is_draining(s.node));
            if !others {
                return Err(CommandError::Impossible(format!(
                    "node {node} cannot drain: no other live node would take its cells"
                )));
            }
            self.draining.insert(node, now);
            let cells = self.cells_of_node(node).len();
            self.note(format!(
                "drain of node {node}: {cells} cells to hand over, {DRAIN_PARALLEL} at a time"
            ));
        }
        Ok(self.cells_of_node(node).len())
    }

    /// Forgets a drain (the node registered again as a new incarnation).
    pub fn forget_drain(&mut self, node: u16) {
        if self.draining.remove(&node).is_some() {
            self.note(format!("node {node} came back: no longer draining"));
        }
    }

    /// True while `node` drains (it gets no cells and backs up no one).
    pub fn is_draining(&self, node: u16) -> bool {
        self.draining.contains_key(&node)
    }

    /// Where `node`'s drain stands (None: it does not drain).
    pub fn drain_state(&self, node: u16) -> Option<DrainState> {
        let since = *self.draining.get(&node)?;
        let shards: BTreeSet<ShardRef> = self
            .members()
            .iter()
            .copied()
            .filter(|s| s.node == node)
            .collect();
        Some(DrainState {
            since,
            cells_left: self.cells_of_node(node).len(),
            moving: self.moves_involving(&shards).len(),
            backing_up: self
                .registry()
                .backups()
                .values()
                .filter(|b| b.node == node)
                .count(),
        })
    }

    fn cells_of_node(&self, node: u16) -> Vec<tessera_cells::CellId> {
        self.registry()
            .iter()
            .filter(|(_, a)| a.owner.node == node)
            .map(|(c, _)| c)
            .collect()
    }

    /// Starts the next handovers out of draining nodes (every tick,
    /// automatic balancing or not).
    pub(crate) fn drain_step(&mut self, now: Instant) {
        let nodes: Vec<u16> = self.draining.keys().copied().collect();
        for node in nodes {
            if self.is_dead(node) {
                // Its cells went to their backups instead.
                continue;
            }
            let shards: BTreeSet<ShardRef> = self
                .members()
                .iter()
                .copied()
                .filter(|s| s.node == node)
                .collect();
            let mut moving = self.moves_involving(&shards).len();
            for cell in self.cells_of_node(node) {
                if moving >= DRAIN_PARALLEL {
                    break;
                }
                if self.cell_busy(cell) {
                    continue;
                }
                let Some(to) = self.drain_target(node) else {
                    self.note(format!(
                        "drain of node {node} waits: no live node to take its cells"
                    ));
                    return;
                };
                if self.move_for_drain(now, cell, to) {
                    moving += 1;
                }
            }
        }
    }

    /// The live, non-draining member shard with the fewest cells.
    fn drain_target(&self, except: u16) -> Option<ShardRef> {
        self.members()
            .iter()
            .copied()
            .filter(|s| s.node != except && !self.is_dead(s.node) && !self.is_draining(s.node))
            .min_by_key(|s| {
                let moving_in = self.moves_to(*s);
                (self.registry().cells_of(*s).len() + moving_in, *s)
            })
    }
}
