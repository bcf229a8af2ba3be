//! Per-shard statistics: histograms of tick duration and lateness, counters.

use std::sync::Mutex;

use hdrhistogram::Histogram;

use crate::ids::ShardId;

/// Highest value the microsecond histograms track (60 s); larger values are
/// clamped, not lost.
const MAX_US: u64 = 60_000_000;

/// A histogram of microseconds, 3 significant digits.
pub(crate) fn us_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds")
}

/// What one shard measured. Published periodically to a [`StatsBoard`] and
/// returned whole when the shard exits.
#[derive(Clone, Debug)]
pub struct ShardStats {
    /// The shard.
    pub shard: ShardId,
    /// The CPU it is pinned to, if pinned.
    pub cpu: Option<usize>,
    /// Time spent in each tick, in microseconds.
    pub tick_duration_us: Histogram<u64>,
    /// How late each tick started after its deadline, in microseconds.
    pub tick_lateness_us: Histogram<u64>,
    /// Tick durations since the previous publication only (for "now"
    /// figures; the other histograms cover the whole run).
    pub tick_duration_us_recent: Histogram<u64>,
    /// Ticks run.
    pub ticks: u64,
    /// Ticks that ended after the next deadline.
    pub overruns: u64,
    /// Deadlines skipped after overruns.
    pub skipped_ticks: u64,
    /// Loop turns.
    pub turns: u64,
    /// Messages handed to stages.
    pub messages_handled: u64,
    /// Most messages drained in one turn.
    pub max_drain: u64,
    /// Times the loop parked.
    pub parks: u64,
    /// Messages addressed to a stage that does not exist.
    pub undeliverable: u64,
    /// Outgoing bundles kept back because the destination mailbox was full.
    pub outbox_deferred: u64,
    /// Sends refused because the outgoing buffer for a shard was full.
    pub outbox_rejected: u64,
    /// Messages dropped because their destination shard had closed.
    pub outbox_lost_closed: u64,
    /// Messages queued in this shard's mailbox when published.
    pub mailbox_depth: u64,
    /// Messages other senders could not put in this mailbox because it was full.
    pub mailbox_rejected_full: u64,
    /// Stage continuations (awaiting handlers) started.
    pub continuations: u64,
    /// Parks the watchdog had to interrupt (lost wake-ups).
    pub park_kicks: u64,
}

impl ShardStats {
    pub(crate) fn new(shard: ShardId, cpu: Option<usize>) -> Self {
        Self {
            shard,
            cpu,
            tick_duration_us: us_histogram(),
            tick_lateness_us: us_histogram(),
            tick_duration_us_recent: us_histogram(),
            ticks: 0,
            overruns: 0,
            skipped_ticks: 0,
            turns: 0,
            messages_handled: 0,
            max_drain: 0,
            parks: 0,
            undeliverable: 0,
            outbox_deferred: 0,
            outbox_rejected: 0,
            outbox_lost_closed: 0,
            mailbox_depth: 0,
            mailbox_rejected_full: 0,
            continuations: 0,
            park_kicks: 0,
        }
    }

    /// Tick duration at quantile `q` (0..=1), in microseconds.
    pub fn tick_us(&self, q: f64) -> u64 {
        self.tick_duration_us.value_at_quantile(q)
    }

    /// Tick lateness at quantile `q` (0..=1), in microseconds.
    pub fn lateness_us(&self, q: f64) -> u64 {
        self.tick_lateness_us.value_at_quantile(q)
    }
}

/// What a shard returns when it exits.
pub type ShardReport = ShardStats;

/// The latest published statistics of every shard, readable from any thread
/// (metrics endpoint, admin, demo).
#[derive(Debug)]
pub struct StatsBoard {
    slots: Vec<Mutex<Option<ShardStats>>>,
}

impl StatsBoard {
    pub(crate) fn new(shards: usize) -> Self {
        Self {
            slots: (0..shards).map(|_| Mutex::new(None)).collect(),
        }
    }

    pub(crate) fn publish(&self, stats: &ShardStats) {
        if let Some(slot) = self.slots.get(stats.shard.index()) {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(stats.clone());
        }
    }

    /// The last snapshot of every shard (None until a shard first publishes).
    pub fn snapshot(&self) -> Vec<Option<ShardStats>> {
        self.slots
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }
}
