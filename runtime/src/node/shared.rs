//! State a node's shards and helper threads share: the registry and the
//! statistics each shard publishes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tessera_cells::world::WorldTotals;
use tessera_cells::CellId;
use tessera_coord::Registry;
use tessera_net::driver::SocketStats;
use tessera_net::EndpointStats;
use tessera_schema::FrameErrorCounts;

use super::gateway::GatewayCounters;
use super::router::RouterCounters;

/// What one shard of a node publishes every second.
#[derive(Clone, Debug, Default)]
pub struct NodeShardStats {
    /// The last tick run.
    pub tick: u64,
    /// Sessions hosted.
    pub sessions: usize,
    /// The gateway's counters.
    pub gateway: GatewayCounters,
    /// Client frames refused, by reason.
    pub frames_refused: FrameErrorCounts,
    /// The RUDP endpoint's counters.
    pub endpoint: EndpointStats,
    /// The socket's counters.
    pub socket: SocketStats,
    /// The router's counters.
    pub router: RouterCounters,
    /// Totals of the shard's world.
    pub world: WorldTotals,
    /// (cell, entities, ghosts, players) for every cell owned.
    pub cells: Vec<(CellId, usize, usize, usize)>,
}

/// Shared by the shards and the helper threads of one node.
pub struct NodeShared {
    registry: Mutex<Arc<Registry>>,
    registry_version: AtomicU64,
    stats: Mutex<Vec<Option<NodeShardStats>>>,
    started: Instant,
    /// Ticks per second.
    pub tick_hz: u32,
}

impl NodeShared {
    /// Shared state for `shards` shards starting with `registry`.
    pub fn new(registry: Registry, shards: usize, tick_hz: u32) -> Self {
        Self {
            registry_version: AtomicU64::new(registry.version()),
            registry: Mutex::new(Arc::new(registry)),
            stats: Mutex::new(vec![None; shards]),
            started: Instant::now(),
            tick_hz,
        }
    }

    /// The current registry.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Its version (one atomic load: shards poll this every tick).
    pub fn registry_version(&self) -> u64 {
        self.registry_version.load(Ordering::Acquire)
    }

    /// Replaces the registry (coordinator decisions).
    pub fn set_registry(&self, registry: Registry) {
        let version = registry.version();
        *self.registry.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(registry);
        self.registry_version.store(version, Ordering::Release);
    }

    /// A shard publishes its statistics.
    pub fn publish(&self, shard: usize, stats: NodeShardStats) {
        if let Some(slot) = self
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(shard)
        {
            *slot = Some(stats);
        }
    }

    /// The last statistics of every shard.
    pub fn stats(&self) -> Vec<Option<NodeShardStats>> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Seconds since the node started.
    pub fn uptime_seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}
