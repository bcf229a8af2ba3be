//! State a node's shards and helper threads share: the registry and the
//! statistics each shard publishes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hdrhistogram::Histogram;
use tessera_cells::node::{CellSummary, RouterCounters, SessionCounters};
use tessera_cells::world::WorldTotals;
use tessera_cells::CellId;
use tessera_coord::{CoordinatorCounters, HandoverRecord, Registry};
use tessera_net::driver::SocketStats;
use tessera_net::EndpointStats;
use tessera_schema::FrameErrorCounts;

/// What a shard's driver counted (the core counts the rest).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DriverCounters {
    /// Frames for clients the RUDP endpoint refused (queue full or closing).
    pub send_refused: u64,
    /// Messages for shards refused by their mailbox (full or closed).
    pub mailbox_refused: u64,
    /// Messages for a shard of another node on a node that is not in a
    /// cluster (dropped, logged).
    pub remote_unreachable: u64,
}

/// What one shard of a node publishes every second.
#[derive(Clone, Debug, Default)]
pub struct NodeShardStats {
    /// The last tick run.
    pub tick: u64,
    /// Sessions hosted.
    pub sessions: usize,
    /// The sessions' counters (the gateway role).
    pub gateway: SessionCounters,
    /// Client frames refused, by reason.
    pub frames_refused: FrameErrorCounts,
    /// The RUDP endpoint's counters.
    pub endpoint: EndpointStats,
    /// The socket's counters.
    pub socket: SocketStats,
    /// The router's counters.
    pub router: RouterCounters,
    /// The driver's counters.
    pub driver: DriverCounters,
    /// Totals of the shard's world.
    pub world: WorldTotals,
    /// Every cell owned.
    pub cells: Vec<CellSummary>,
    /// This shard's side of handovers.
    pub handover: tessera_cells::handover::HandoverCounters,
    /// Its cluster links (None on a node outside a cluster).
    pub cluster: Option<crate::cluster::shard::ClusterCounters>,
    /// Replication to its backup, as backup for others, and recovery.
    pub replica: tessera_cells::replica::ReplicaCounters,
    /// True while its lease is not valid (cells frozen).
    pub fenced: bool,
    /// Times its lease ran out after it had held one.
    pub fences: u64,
}

/// What the coordinator did, for metrics, admin and benchmarks.
#[derive(Clone, Debug)]
pub struct CoordinatorStats {
    /// Its counters.
    pub counters: CoordinatorCounters,
    /// The last finished handovers (most recent last), bounded.
    pub recent: std::collections::VecDeque<HandoverRecord>,
    /// Freeze durations of committed handovers, microseconds.
    pub freeze_us: Histogram<u64>,
    /// Decision-to-commit durations, microseconds.
    pub commit_us: Histogram<u64>,
    /// The last load score of every cell.
    pub scores: Vec<(CellId, f64)>,
}

impl Default for CoordinatorStats {
    fn default() -> Self {
        Self {
            counters: CoordinatorCounters::default(),
            recent: std::collections::VecDeque::new(),
            freeze_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
            commit_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
            scores: Vec::new(),
        }
    }
}

/// Shared by the shards and the helper threads of one node.
pub struct NodeShared {
    registry: Mutex<Arc<Registry>>,
    registry_version: AtomicU64,
    stats: Mutex<Vec<Option<NodeShardStats>>>,
    coordinator: Mutex<CoordinatorStats>,
    started: Instant,
    /// Ticks per second.
    pub tick_hz: u32,
    /// In a cluster each shard takes the registry the coordinator pushes on
    /// its own link (in order with the orders); the copy here only serves
    /// operators (admin, metrics).
    pub clustered: bool,
    /// This node's id (0 outside a cluster).
    pub node: u16,
    draining: AtomicBool,
    drained: Vec<AtomicBool>,
    /// Admin requests refused (off loopback without the admin token).
    pub admin_refused: Arc<std::sync::atomic::AtomicU64>,
}

impl NodeShared {
    /// Shared state for `shards` shards starting with `registry`.
    pub fn new(registry: Registry, shards: usize, tick_hz: u32) -> Self {
        Self {
            registry_version: AtomicU64::new(registry.version()),
            registry: Mutex::new(Arc::new(registry)),
            stats: Mutex::new(vec![None; shards]),
            coordinator: Mutex::new(CoordinatorStats::default()),
            started: Instant::now(),
            tick_hz,
            clustered: false,
            node: 0,
            draining: AtomicBool::new(false),
            admin_refused: Arc::default(),
            drained: (0..shards).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// Shared state for the shards of a clustered node.
    pub fn clustered(registry: Registry, node: u16, shards: usize, tick_hz: u32) -> Self {
        Self {
            clustered: true,
            node,
            ..Self::new(registry, shards, tick_hz)
        }
    }

    /// The node starts draining (SIGTERM, or the coordinator's word):
    /// its shards tell the coordinator, which hands their cells away.
    /// True the first time.
    pub fn start_draining(&self) -> bool {
        !self.draining.swap(true, Ordering::AcqRel)
    }

    /// True once the node drains.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// A shard says whether it holds anything still (cells, a handover,
    /// another shard's replicas, transfers waiting for their ack).
    pub fn set_drained(&self, shard: usize, drained: bool) {
        if let Some(f) = self.drained.get(shard) {
            f.store(drained, Ordering::Release);
        }
    }

    /// True when every shard holds nothing any more.
    pub fn all_drained(&self) -> bool {
        self.drained.iter().all(|f| f.load(Ordering::Acquire))
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

    /// Keeps a pushed registry if it is newer than the one held (each shard
    /// of a clustered node offers the copy it received).
    pub fn offer_registry(&self, registry: Arc<Registry>) {
        let mut slot = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        if registry.is_newer_than(&slot) {
            self.registry_version
                .store(registry.version(), Ordering::Release);
            *slot = registry;
        }
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

    /// The coordinator reports finished handovers and its counters.
    pub fn record(
        &self,
        records: Vec<HandoverRecord>,
        counters: CoordinatorCounters,
        scores: Vec<(CellId, f64)>,
    ) {
        let mut c = self.coordinator.lock().unwrap_or_else(|e| e.into_inner());
        for r in records {
            if r.committed {
                if let Some(f) = r.freeze {
                    let _ = c.freeze_us.record((f.as_micros() as u64).max(1));
                }
                let _ = c
                    .commit_us
                    .record((r.decision_to_commit.as_micros() as u64).max(1));
            }
            c.recent.push_back(r);
            while c.recent.len() > 1000 {
                c.recent.pop_front();
            }
        }
        c.counters = counters;
        c.scores = scores;
    }

    /// The coordinator's counters.
    pub fn coordinator_counters(&self) -> CoordinatorCounters {
        self.coordinator
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .counters
    }

    /// What the coordinator did.
    pub fn coordinator_stats(&self) -> CoordinatorStats {
        self.coordinator
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Seconds since the node started.
    pub fn uptime_seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}
