//! Starting, placing, stopping and joining shards.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};

use crate::ids::ShardId;
use crate::mailbox::{mailbox, MailboxSender};
use crate::shard::{run_shard, ShardHandler, ShardParts};
use crate::stats::{ShardReport, ShardStats, StatsBoard};
use crate::watchdog::{self, Watchdog};

/// Why the runtime could not start or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// More pinned shards than CPUs this process may run on.
    #[error("{requested} pinned shards requested but only {available} CPUs are available; use fewer shards or the unpinned mode")]
    TooManyShards {
        /// Shards asked for.
        requested: usize,
        /// CPUs in this process's affinity mask.
        available: usize,
    },
    /// A CPU in an explicit placement is not available to this process.
    #[error("CPU {0} is not in this process's affinity mask")]
    UnknownCpu(usize),
    /// A setting is out of range.
    #[error("invalid runtime setting: {0}")]
    InvalidConfig(String),
    /// Creating a mailbox or thread failed.
    #[error("runtime I/O error: {0}")]
    Io(#[from] io::Error),
    /// glommio refused to create an executor (memlock limit, io_uring...).
    #[error("could not start {shard}: {reason}")]
    Executor {
        /// The shard.
        shard: ShardId,
        /// glommio's explanation.
        reason: String,
    },
    /// A shard's thread panicked.
    #[error("{0} panicked")]
    ShardPanicked(ShardId),
}

/// Where shards run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CpuPlacement {
    /// Shard `i` pinned to the `i`-th CPU of the affinity mask.
    Pinned,
    /// Not pinned: the kernel places threads (tests, oversubscribed machines).
    Unpinned,
    /// Shard `i` pinned to `cpus[i]`.
    Cpus(Vec<usize>),
}

/// Settings each shard runs with.
#[derive(Clone, Debug)]
pub struct ShardConfig {
    /// Time between tick deadlines.
    pub tick_period: Duration,
    /// Most messages drained in one turn (a bundle is never split).
    pub max_drain: usize,
    /// An outgoing bundle is pushed as soon as it holds this many messages.
    pub bundle_max: usize,
    /// Most messages waiting in the outbox per destination shard.
    pub outbox_pending_max: usize,
    /// How long each shutdown phase may take before giving up.
    pub shutdown_timeout: Duration,
    /// How often statistics are published to the [`StatsBoard`].
    pub publish_interval: Duration,
    /// Wake a parked shard as soon as a message arrives (default). Off, a
    /// parked shard notices messages only at its next deadline.
    pub doorbell: bool,
}

impl Default for ShardConfig {
    fn default() -> Self {
        Self {
            tick_period: Duration::from_millis(50),
            max_drain: 16_384,
            bundle_max: 1024,
            outbox_pending_max: 65_536,
            shutdown_timeout: Duration::from_secs(5),
            publish_interval: Duration::from_secs(1),
            doorbell: true,
        }
    }
}

/// Configures and starts a [`Runtime`].
#[derive(Clone, Debug)]
pub struct RuntimeBuilder {
    shards: Option<usize>,
    placement: CpuPlacement,
    mailbox_capacity: usize,
    io_memory: usize,
    ring_depth: usize,
    preempt: Duration,
    config: ShardConfig,
    tick_origin: Option<std::time::Instant>,
}

impl Default for RuntimeBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl RuntimeBuilder {
    /// Defaults: one pinned shard per available CPU, 20 Hz, 256 KiB of
    /// io_uring memory per shard (memlock limits are often 8 MiB per process).
    pub fn new() -> Self {
        Self {
            shards: None,
            placement: CpuPlacement::Pinned,
            mailbox_capacity: 1 << 18,
            io_memory: 256 << 10,
            ring_depth: 256,
            preempt: Duration::from_millis(1),
            config: ShardConfig::default(),
            tick_origin: None,
        }
    }

    /// Number of shards (default: one per available CPU).
    pub fn shards(mut self, n: usize) -> Self {
        self.shards = Some(n);
        self
    }

    /// Pinned (default) or unpinned.
    pub fn pinned(mut self, pinned: bool) -> Self {
        self.placement = if pinned {
            CpuPlacement::Pinned
        } else {
            CpuPlacement::Unpinned
        };
        self
    }

    /// When tick 0 is due (default: at start). A cluster node passes the
    /// next boundary of the cluster's tick schedule.
    pub fn tick_origin(mut self, origin: std::time::Instant) -> Self {
        self.tick_origin = Some(origin);
        self
    }

    /// An explicit placement.
    pub fn placement(mut self, placement: CpuPlacement) -> Self {
        self.placement = placement;
        self
    }

    /// Tick rate in Hz (1..=1000; the server accepts 10..=60).
    pub fn tick_hz(mut self, hz: u32) -> Self {
        self.config.tick_period = Duration::from_nanos(1_000_000_000 / u64::from(hz.max(1)));
        self
    }

    /// Mailbox bound, in messages.
    pub fn mailbox_capacity(mut self, messages: usize) -> Self {
        self.mailbox_capacity = messages;
        self
    }

    /// io_uring buffer memory per shard, in bytes.
    pub fn io_memory(mut self, bytes: usize) -> Self {
        self.io_memory = bytes;
        self
    }

    /// How often glommio polls for I/O while the shard stays busy.
    pub fn preempt_interval(mut self, interval: Duration) -> Self {
        self.preempt = interval;
        self
    }

    /// Per-shard settings.
    pub fn shard_config(mut self, config: ShardConfig) -> Self {
        self.config = config;
        self
    }

    /// The per-shard settings as configured so far.
    pub fn config(&self) -> &ShardConfig {
        &self.config
    }

    fn validate(&self) -> Result<(), RuntimeError> {
        let hz = 1e9 / self.config.tick_period.as_nanos() as f64;
        if !(0.99..=1000.5).contains(&hz) {
            return Err(RuntimeError::InvalidConfig(format!(
                "tick rate {hz:.1} Hz is outside 1..=1000"
            )));
        }
        if self.mailbox_capacity == 0 || self.config.max_drain == 0 {
            return Err(RuntimeError::InvalidConfig(
                "mailbox capacity and max_drain must be positive".into(),
            ));
        }
        if self.shards == Some(0) {
            return Err(RuntimeError::InvalidConfig(
                "at least one shard is needed".into(),
            ));
        }
        Ok(())
    }

    /// The CPU each shard will be pinned to (None: unpinned).
    pub fn plan(&self) -> Result<Vec<Option<usize>>, RuntimeError> {
        let available: Vec<usize> = core_affinity::get_core_ids()
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.id)
            .collect();
        let n = self.shards.unwrap_or(available.len().max(1));
        match &self.placement {
            CpuPlacement::Unpinned => Ok(vec![None; n]),
            CpuPlacement::Pinned => {
                if n > available.len() {
                    return Err(RuntimeError::TooManyShards {
                        requested: n,
                        available: available.len(),
                    });
                }
                Ok(available[..n].iter().map(|&c| Some(c)).collect())
            }
            CpuPlacement::Cpus(cpus) => {
                if cpus.len() < n {
                    return Err(RuntimeError::InvalidConfig(format!(
                        "{n} shards but only {} CPUs listed",
                        cpus.len()
                    )));
                }
                for &c in &cpus[..n] {
                    if !available.contains(&c) {
                        return Err(RuntimeError::UnknownCpu(c));
                    }
                }
                Ok(cpus[..n].iter().map(|&c| Some(c)).collect())
            }
        }
    }

    /// Starts the shards. `factory` is called on each shard's own thread to
    /// build its handler.
    pub fn start<H, F>(self, factory: F) -> Result<Runtime<H::Message>, RuntimeError>
    where
        H: ShardHandler,
        F: Fn(ShardId) -> H + Send + Sync + 'static,
    {
        self.validate()?;
        let plan = self.plan()?;
        let n = plan.len();
        let mut mailboxes = Vec::with_capacity(n);
        for i in 0..n {
            mailboxes.push(mailbox::<H::Message>(
                ShardId(i as u16),
                self.mailbox_capacity,
            )?);
        }
        let senders: Vec<MailboxSender<H::Message>> =
            mailboxes.iter().map(|m| m.sender()).collect();
        let wakers: Vec<Box<dyn Fn() + Send + Sync>> = senders
            .iter()
            .map(|s| {
                let s = s.clone();
                Box::new(move || s.wake()) as Box<dyn Fn() + Send + Sync>
            })
            .collect();
        let shared = Arc::new(RuntimeShared::new(n, wakers));
        let board = Arc::new(StatsBoard::new(n));
        let factory = Arc::new(factory);
        let mut handles = Vec::with_capacity(n);
        // One origin for every shard's tick clock: tick ids agree across
        // shards (and, with a cluster's origin, across nodes).
        let origin = self.tick_origin.unwrap_or_else(std::time::Instant::now);
        for (i, mb) in mailboxes.into_iter().enumerate() {
            let shard = ShardId(i as u16);
            let cpu = plan[i];
            let placement = match cpu {
                Some(c) => Placement::Fixed(c),
                None => Placement::Unbound,
            };
            let parts = ShardParts {
                origin,
                shard,
                cpu,
                mailbox: mb,
                senders: senders.clone(),
                shared: shared.clone(),
                board: board.clone(),
                config: self.config.clone(),
            };
            let factory = factory.clone();
            let spawned = LocalExecutorBuilder::new(placement)
                .name(&format!("tessera-shard-{i}"))
                .io_memory(self.io_memory)
                .ring_depth(self.ring_depth)
                .preempt_timer(self.preempt)
                .spawn(move || async move {
                    let handler = factory(shard);
                    run_shard(handler, parts).await
                });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    shared.request_stop();
                    for h in handles {
                        let _ = h.join();
                    }
                    return Err(RuntimeError::Executor {
                        shard,
                        reason: e.to_string(),
                    });
                }
            }
        }
        let dog = shared.watchdog.clone();
        let watchdog = match spawn_helper("tessera-watchdog", None, move || watchdog::run(dog)) {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!(error = %e, "no park watchdog: a lost wake-up would stall a shard");
                None
            }
        };
        for (i, cpu) in plan.iter().enumerate() {
            match cpu {
                Some(c) => tracing::info!(shard = i, cpu = c, "shard pinned"),
                None => tracing::info!(shard = i, "shard unpinned"),
            }
        }
        Ok(Runtime {
            senders,
            handles,
            shared,
            board,
            plan,
            watchdog,
        })
    }
}

/// State shared by all shards of a runtime: the stop flag and the shutdown
/// quiescence detector.
pub(crate) struct RuntimeShared {
    stop: AtomicBool,
    stopped: Mutex<bool>,
    stopped_cv: Condvar,
    wakers: Vec<Box<dyn Fn() + Send + Sync>>,
    quiet: Vec<AtomicBool>,
    activity: AtomicU64,
    pub(crate) watchdog: Arc<Watchdog>,
}

impl RuntimeShared {
    fn new(shards: usize, wakers: Vec<Box<dyn Fn() + Send + Sync>>) -> Self {
        Self {
            stop: AtomicBool::new(false),
            stopped: Mutex::new(false),
            stopped_cv: Condvar::new(),
            wakers,
            quiet: (0..shards).map(|_| AtomicBool::new(false)).collect(),
            activity: AtomicU64::new(0),
            watchdog: Arc::new(Watchdog::new(shards)),
        }
    }

    pub(crate) fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    pub(crate) fn request_stop(&self) {
        if !self.stop.swap(true, Ordering::AcqRel) {
            *self.stopped.lock().unwrap_or_else(|e| e.into_inner()) = true;
            self.stopped_cv.notify_all();
        }
        for wake in &self.wakers {
            wake();
        }
    }

    pub(crate) fn set_quiet(&self, shard: usize, quiet: bool) {
        self.quiet[shard].store(quiet, Ordering::SeqCst);
    }

    pub(crate) fn bump_activity(&self) {
        self.activity.fetch_add(1, Ordering::SeqCst);
    }

    /// True if every shard is quiet and `empty()` holds, with no activity
    /// announced while we looked.
    pub(crate) fn all_quiet_with(&self, empty: impl FnOnce() -> bool) -> bool {
        let before = self.activity.load(Ordering::SeqCst);
        if !self.quiet.iter().all(|q| q.load(Ordering::SeqCst)) {
            return false;
        }
        if !empty() {
            return false;
        }
        self.activity.load(Ordering::SeqCst) == before
    }
}

/// Asks a runtime to stop, from any thread. Cheap to clone.
#[derive(Clone)]
pub struct StopHandle {
    shared: Arc<RuntimeShared>,
}

impl std::fmt::Debug for StopHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopHandle")
            .field("stop_requested", &self.is_stop_requested())
            .finish()
    }
}

impl StopHandle {
    /// Requests a graceful stop: shards finish their tick, deliver what is in
    /// flight, run their shutdown hooks and exit.
    pub fn stop(&self) {
        self.shared.request_stop();
    }

    /// True once a stop was requested.
    pub fn is_stop_requested(&self) -> bool {
        self.shared.stop_requested()
    }

    /// Blocks until a stop is requested or `timeout` passes; true if stopped.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        let guard = self
            .shared
            .stopped
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let (guard, _) = self
            .shared
            .stopped_cv
            .wait_timeout_while(guard, timeout, |stopped| !*stopped)
            .unwrap_or_else(|e| e.into_inner());
        *guard
    }
}

/// A running set of shards.
pub struct Runtime<M> {
    senders: Vec<MailboxSender<M>>,
    handles: Vec<ExecutorJoinHandle<ShardStats>>,
    shared: Arc<RuntimeShared>,
    board: Arc<StatsBoard>,
    plan: Vec<Option<usize>>,
    watchdog: Option<JoinHandle<()>>,
}

impl<M: Send + 'static> Runtime<M> {
    /// Mailbox senders, indexed by shard.
    pub fn senders(&self) -> &[MailboxSender<M>] {
        &self.senders
    }

    /// The sender of one shard's mailbox.
    pub fn sender(&self, shard: ShardId) -> Option<&MailboxSender<M>> {
        self.senders.get(shard.index())
    }

    /// Number of shards.
    pub fn shard_count(&self) -> usize {
        self.senders.len()
    }

    /// Shard -> CPU mapping (None: unpinned).
    pub fn placement(&self) -> Vec<(ShardId, Option<usize>)> {
        self.plan
            .iter()
            .enumerate()
            .map(|(i, c)| (ShardId(i as u16), *c))
            .collect()
    }

    /// Live statistics board.
    pub fn stats(&self) -> Arc<StatsBoard> {
        self.board.clone()
    }

    /// A handle to stop the runtime from anywhere (signal thread, admin).
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            shared: self.shared.clone(),
        }
    }

    /// Requests a graceful stop.
    pub fn stop(&self) {
        self.shared.request_stop();
    }

    /// Waits for every shard to exit and returns their reports.
    pub fn join(self) -> Result<Vec<ShardReport>, RuntimeError> {
        let mut reports = Vec::with_capacity(self.handles.len());
        let mut failure = None;
        for (i, h) in self.handles.into_iter().enumerate() {
            match h.join() {
                Ok(r) => reports.push(r),
                Err(_) => {
                    // One shard died: stop the others so join returns.
                    self.shared.request_stop();
                    failure.get_or_insert(RuntimeError::ShardPanicked(ShardId(i as u16)));
                }
            }
        }
        self.shared.watchdog.finish();
        if let Some(h) = self.watchdog {
            let _ = h.join();
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(reports),
        }
    }
}

/// Starts a helper thread (not a shard), pinned to `cpu` if given, so that
/// it does not wander onto whichever core the scheduler picks.
pub fn spawn_helper<T, F>(name: &str, cpu: Option<usize>, f: F) -> io::Result<JoinHandle<T>>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            if let Some(id) = cpu {
                if !core_affinity::set_for_current(core_affinity::CoreId { id }) {
                    tracing::warn!(cpu = id, "could not pin helper thread");
                }
            }
            f()
        })
}
