//! `mailbox` suite: messages from every shard to 1,000 / 10,000 / 100,000
//! stages, three designs side by side in one run.
//!
//! - `tessera`: the runtime's unified bulk-drained mailbox (bundled sends per
//!   destination shard, bundling by stage on receipt);
//! - `tokio-mpsc`: one tokio task and one bounded tokio mpsc channel per
//!   stage, on a tokio runtime with as many (pinned) worker threads;
//! - `per-stage-queue`: one crossbeam queue per stage, pushed directly by
//!   producers and polled by the owning shard every turn (the design seed 003
//!   replaces), on the same runtime and cores as `tessera`.
//!
//! Every system runs the same closed experiment: producers (one per shard or
//! worker) send to uniformly random stages for a fixed time, then stop; the
//! clock stops when every produced message has been handled. Throughput is
//! produced / elapsed. One message in 64 carries its enqueue time and the
//! handler records enqueue -> handled latency in an hdrhistogram.
//!
//! A second case measures how fast an idle shard notices a message sent from
//! another thread, with and without the doorbell.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_queue::SegQueue;
use hdrhistogram::Histogram;
use tessera_runtime::{
    Envelope, Handled, Origin, RuntimeBuilder, ShardConfig, ShardContext, ShardHandler, ShardId,
    Stage, StageAddr, StageContext, StageId, StageTable, Tick,
};

use crate::report::{median, Report};

/// Options of the `mailbox` suite.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A short run, for CI: fewer sizes, shorter and fewer repetitions.
    #[arg(long)]
    pub quick: bool,
    /// Shards (and tokio workers). Default: one per CPU.
    #[arg(long)]
    pub shards: Option<usize>,
    /// Seconds of production per repetition.
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Repetitions per system and size (median reported).
    #[arg(long)]
    pub reps: Option<usize>,
    /// Stage counts to run (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub stages: Option<Vec<usize>>,
}

/// One message in 64 carries its send time.
const SAMPLE_EVERY: u64 = 64;
/// Messages each producer emits per loop turn.
const BURST: usize = 512;

#[derive(Clone, Copy)]
struct BenchMsg {
    /// Destination stage (used by the per-stage-queue design's producers).
    stage: u32,
    /// Nanoseconds since the run's epoch at enqueue, 0 if not sampled.
    sent_ns: u64,
}

fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds")
}

/// A distinct, non-zero seed per producer.
fn seed_for(producer: u64) -> u64 {
    0x9E37_79B9_7F4A_7C15 ^ ((producer + 1).wrapping_mul(0x1234_5678_9ABC_DEF1))
}

struct Xorshift(u64);
impl Xorshift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        // Multiply-shift: unbiased enough for load generation, no division.
        ((self.next() >> 32) * n) >> 32
    }
}

/// What one system measured in one repetition.
struct Outcome {
    msgs_per_s: f64,
    latency: Histogram<u64>,
}

/// Coordination between the measuring thread and the producers.
struct Control {
    epoch: Instant,
    go: AtomicBool,
    producing: AtomicBool,
    ready: AtomicUsize,
    sent: AtomicU64,
    handled: AtomicU64,
    latency: Mutex<Histogram<u64>>,
}

impl Control {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            go: AtomicBool::new(false),
            producing: AtomicBool::new(true),
            ready: AtomicUsize::new(0),
            sent: AtomicU64::new(0),
            handled: AtomicU64::new(0),
            latency: Mutex::new(latency_histogram()),
        })
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Starts the producers, lets them run, stops them and waits until every
    /// produced message was handled. Returns msgs/s.
    fn measure(&self, parties: usize, seconds: f64) -> Result<f64, String> {
        let wait_ready = Instant::now();
        while self.ready.load(Ordering::Acquire) < parties {
            if wait_ready.elapsed() > Duration::from_secs(30) {
                return Err("producers did not start".into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let start = Instant::now();
        self.go.store(true, Ordering::Release);
        std::thread::sleep(Duration::from_secs_f64(seconds));
        self.producing.store(false, Ordering::Release);
        let drain_deadline = Instant::now() + Duration::from_secs(60);
        // Producers publish their counts after their last burst.
        std::thread::sleep(Duration::from_millis(5));
        loop {
            let sent = self.sent.load(Ordering::Acquire);
            let handled = self.handled.load(Ordering::Acquire);
            if handled >= sent && sent > 0 {
                let elapsed = start.elapsed().as_secs_f64();
                return Ok(sent as f64 / elapsed);
            }
            if Instant::now() > drain_deadline {
                return Err(format!("only {handled} of {sent} messages handled"));
            }
            std::hint::spin_loop();
        }
    }
}

// ---------------------------------------------------------------- tessera

struct ShardLocal {
    handled: Cell<u64>,
    latency: RefCell<Histogram<u64>>,
    control: Arc<Control>,
}

struct CountingStage {
    local: Rc<ShardLocal>,
}

impl Stage<BenchMsg> for CountingStage {
    #[inline]
    fn handle(&mut self, _cx: &mut StageContext<'_, BenchMsg>, m: Envelope<BenchMsg>) -> Handled {
        self.local.handled.set(self.local.handled.get() + 1);
        if m.msg.sent_ns != 0 {
            let now = self.local.control.now_ns();
            let _ = self
                .local
                .latency
                .borrow_mut()
                .record(now.saturating_sub(m.msg.sent_ns).max(1));
        }
        Handled::Done
    }
}

struct TesseraProducer {
    control: Arc<Control>,
    local: Option<Rc<ShardLocal>>,
    shards: usize,
    stages_total: usize,
    rng: Xorshift,
    sent: u64,
    published_handled: u64,
    serial: u64,
    started: bool,
}

impl ShardHandler for TesseraProducer {
    type Message = BenchMsg;
    type Stage = CountingStage;

    fn on_start(
        &mut self,
        cx: &mut ShardContext<BenchMsg>,
        stages: &mut StageTable<CountingStage, BenchMsg>,
    ) {
        let local = Rc::new(ShardLocal {
            handled: Cell::new(0),
            latency: RefCell::new(latency_histogram()),
            control: self.control.clone(),
        });
        let mine = (0..self.stages_total)
            .filter(|g| g % self.shards == cx.shard().index())
            .count();
        for _ in 0..mine {
            stages.insert(CountingStage {
                local: local.clone(),
            });
        }
        self.local = Some(local);
        self.control.ready.fetch_add(1, Ordering::AcqRel);
    }

    fn on_tick(
        &mut self,
        _: &mut ShardContext<BenchMsg>,
        _: &mut StageTable<CountingStage, BenchMsg>,
        _: Tick,
    ) {
    }

    fn on_turn(
        &mut self,
        cx: &mut ShardContext<BenchMsg>,
        _: &mut StageTable<CountingStage, BenchMsg>,
    ) -> usize {
        let local = self.local.as_ref().expect("started");
        let handled = local.handled.get();
        if handled != self.published_handled {
            self.control
                .handled
                .fetch_add(handled - self.published_handled, Ordering::AcqRel);
            self.published_handled = handled;
        }
        if !self.started {
            if !self.control.go.load(Ordering::Acquire) {
                return 1;
            }
            self.started = true;
        }
        if !self.control.producing.load(Ordering::Acquire) {
            return 0;
        }
        let mut sent = 0u64;
        for _ in 0..BURST {
            let g = self.rng.below(self.stages_total as u64) as usize;
            let to = StageAddr::new(
                ShardId((g % self.shards) as u16),
                StageId((g / self.shards) as u32),
            );
            self.serial += 1;
            let sent_ns = if self.serial % SAMPLE_EVERY == 0 {
                self.control.now_ns()
            } else {
                0
            };
            if cx
                .send(
                    to,
                    BenchMsg {
                        stage: g as u32,
                        sent_ns,
                    },
                )
                .is_err()
            {
                // Backpressure: the destination is full; produce again next turn.
                break;
            }
            sent += 1;
        }
        self.sent += sent;
        self.control.sent.fetch_add(sent, Ordering::AcqRel);
        BURST
    }

    fn on_shutdown(
        &mut self,
        _: &mut ShardContext<BenchMsg>,
        _: &mut StageTable<CountingStage, BenchMsg>,
    ) {
        if let Some(local) = &self.local {
            let mut h = self.control.latency.lock().unwrap();
            let _ = h.add(&*local.latency.borrow());
        }
    }
}

fn runtime_builder(shards: usize, pinned: bool) -> RuntimeBuilder {
    RuntimeBuilder::new()
        .shards(shards)
        .pinned(pinned)
        .tick_hz(20)
        .mailbox_capacity(1 << 18)
        .shard_config(ShardConfig {
            max_drain: 1 << 16,
            bundle_max: 1024,
            outbox_pending_max: 8192,
            ..ShardConfig::default()
        })
}

fn run_tessera(
    shards: usize,
    stages: usize,
    seconds: f64,
    pinned: bool,
) -> Result<Outcome, String> {
    let control = Control::new();
    let c = control.clone();
    let rt = runtime_builder(shards, pinned)
        .start(move |shard| TesseraProducer {
            control: c.clone(),
            local: None,
            shards,
            stages_total: stages,
            rng: Xorshift(seed_for(u64::from(shard.0))),
            sent: 0,
            published_handled: 0,
            serial: 0,
            started: false,
        })
        .map_err(|e| e.to_string())?;
    let result = control.measure(shards, seconds);
    rt.stop();
    rt.join().map_err(|e| e.to_string())?;
    let msgs_per_s = result?;
    let latency = control.latency.lock().unwrap().clone();
    Ok(Outcome {
        msgs_per_s,
        latency,
    })
}

// ------------------------------------------------------- per-stage-queue

struct QueueShard {
    control: Arc<Control>,
    queues: Arc<Vec<Vec<SegQueue<BenchMsg>>>>,
    shards: usize,
    stages_total: usize,
    rng: Xorshift,
    handled: u64,
    published_handled: u64,
    serial: u64,
    latency: Histogram<u64>,
    started: bool,
}

/// The per-stage-queue design needs no stage table: the shard polls its own
/// queues.
struct NoStage;
impl Stage<BenchMsg> for NoStage {
    fn handle(&mut self, _: &mut StageContext<'_, BenchMsg>, _: Envelope<BenchMsg>) -> Handled {
        Handled::Done
    }
}

impl ShardHandler for QueueShard {
    type Message = BenchMsg;
    type Stage = NoStage;

    fn on_start(&mut self, _: &mut ShardContext<BenchMsg>, _: &mut StageTable<NoStage, BenchMsg>) {
        self.control.ready.fetch_add(1, Ordering::AcqRel);
    }

    fn on_tick(
        &mut self,
        _: &mut ShardContext<BenchMsg>,
        _: &mut StageTable<NoStage, BenchMsg>,
        _: Tick,
    ) {
    }

    fn on_turn(
        &mut self,
        cx: &mut ShardContext<BenchMsg>,
        _: &mut StageTable<NoStage, BenchMsg>,
    ) -> usize {
        if !self.started {
            if !self.control.go.load(Ordering::Acquire) {
                return 1;
            }
            self.started = true;
        }
        if self.control.producing.load(Ordering::Acquire) {
            for _ in 0..BURST {
                let g = self.rng.below(self.stages_total as u64) as usize;
                self.serial += 1;
                let sent_ns = if self.serial % SAMPLE_EVERY == 0 {
                    self.control.now_ns()
                } else {
                    0
                };
                self.queues[g % self.shards][g / self.shards].push(BenchMsg {
                    stage: g as u32,
                    sent_ns,
                });
            }
            self.control.sent.fetch_add(BURST as u64, Ordering::AcqRel);
        }
        // Poll every queue this shard owns: the cost seed 003 removes.
        let mine = &self.queues[cx.shard().index()];
        for q in mine.iter() {
            while let Some(m) = q.pop() {
                debug_assert_eq!(m.stage as usize % self.shards, cx.shard().index());
                self.handled += 1;
                if m.sent_ns != 0 {
                    let now = self.control.now_ns();
                    let _ = self.latency.record(now.saturating_sub(m.sent_ns).max(1));
                }
            }
        }
        if self.handled != self.published_handled {
            self.control
                .handled
                .fetch_add(self.handled - self.published_handled, Ordering::AcqRel);
            self.published_handled = self.handled;
        }
        1
    }

    fn on_shutdown(
        &mut self,
        _: &mut ShardContext<BenchMsg>,
        _: &mut StageTable<NoStage, BenchMsg>,
    ) {
        let _ = self.control.latency.lock().unwrap().add(&self.latency);
    }
}

fn run_per_stage_queue(
    shards: usize,
    stages: usize,
    seconds: f64,
    pinned: bool,
) -> Result<Outcome, String> {
    let control = Control::new();
    let queues: Arc<Vec<Vec<SegQueue<BenchMsg>>>> = Arc::new(
        (0..shards)
            .map(|s| {
                let mine = (0..stages).filter(|g| g % shards == s).count();
                (0..mine).map(|_| SegQueue::new()).collect()
            })
            .collect(),
    );
    let c = control.clone();
    let rt = runtime_builder(shards, pinned)
        .start(move |shard| QueueShard {
            control: c.clone(),
            queues: queues.clone(),
            shards,
            stages_total: stages,
            rng: Xorshift(seed_for(u64::from(shard.0))),
            handled: 0,
            published_handled: 0,
            serial: 0,
            latency: latency_histogram(),
            started: false,
        })
        .map_err(|e| e.to_string())?;
    let result = control.measure(shards, seconds);
    rt.stop();
    rt.join().map_err(|e| e.to_string())?;
    let msgs_per_s = result?;
    let latency = control.latency.lock().unwrap().clone();
    Ok(Outcome {
        msgs_per_s,
        latency,
    })
}

// ------------------------------------------------------------ tokio-mpsc

/// Per-stage channel capacity: enough to keep producers busy, small enough
/// that 100,000 of them fit in memory.
const TOKIO_CHANNEL: usize = 256;

fn run_tokio(
    threads: usize,
    stages: usize,
    seconds: f64,
    cpus: &[usize],
) -> Result<Outcome, String> {
    let control = Control::new();
    let next_cpu = Arc::new(AtomicUsize::new(0));
    let cpus = cpus.to_vec();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .on_thread_start(move || {
            // Pin workers round-robin like the shards (blocking-pool threads
            // would also land here; this suite starts none).
            if !cpus.is_empty() {
                let i = next_cpu.fetch_add(1, Ordering::Relaxed) % cpus.len();
                core_pin(cpus[i]);
            }
        })
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    // One histogram per worker, found through a thread-local index.
    let histograms: Arc<Vec<Mutex<Histogram<u64>>>> = Arc::new(
        (0..threads + 1)
            .map(|_| Mutex::new(latency_histogram()))
            .collect(),
    );
    let result = rt.block_on(async {
        let mut senders = Vec::with_capacity(stages);
        let mut joins = Vec::with_capacity(stages);
        let worker_slot = Arc::new(AtomicUsize::new(0));
        for _ in 0..stages {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<BenchMsg>(TOKIO_CHANNEL);
            senders.push(tx);
            let control = control.clone();
            let histograms = histograms.clone();
            let worker_slot = worker_slot.clone();
            joins.push(tokio::spawn(async move {
                let mut handled = 0u64;
                while let Some(m) = rx.recv().await {
                    handled += 1;
                    if m.sent_ns != 0 {
                        let now = control.now_ns();
                        let slot = worker_index(&worker_slot) % histograms.len();
                        let _ = histograms[slot]
                            .lock()
                            .unwrap()
                            .record(now.saturating_sub(m.sent_ns).max(1));
                    }
                    // Count in batches to keep the shared counter off the hot path.
                    if handled % 256 == 0 {
                        control.handled.fetch_add(256, Ordering::AcqRel);
                    }
                }
                control.handled.fetch_add(handled % 256, Ordering::AcqRel);
            }));
        }
        let senders = Arc::new(senders);
        let mut producers = Vec::new();
        for p in 0..threads {
            let senders = senders.clone();
            let control = control.clone();
            producers.push(tokio::spawn(async move {
                control.ready.fetch_add(1, Ordering::AcqRel);
                while !control.go.load(Ordering::Acquire) {
                    tokio::task::yield_now().await;
                }
                let mut rng = Xorshift(seed_for(p as u64));
                let mut serial = 0u64;
                let mut sent = 0u64;
                while control.producing.load(Ordering::Acquire) {
                    for _ in 0..BURST {
                        let g = rng.below(senders.len() as u64) as usize;
                        serial += 1;
                        let sent_ns = if serial % SAMPLE_EVERY == 0 {
                            control.now_ns()
                        } else {
                            0
                        };
                        if senders[g]
                            .send(BenchMsg {
                                stage: g as u32,
                                sent_ns,
                            })
                            .await
                            .is_err()
                        {
                            return;
                        }
                        sent += 1;
                    }
                    control.sent.fetch_add(sent, Ordering::AcqRel);
                    sent = 0;
                }
                control.sent.fetch_add(sent, Ordering::AcqRel);
            }));
        }
        drop(senders);
        let measuring = {
            let control = control.clone();
            tokio::task::spawn_blocking(move || control.measure(threads, seconds))
        };
        let result = measuring.await.map_err(|e| e.to_string())?;
        for p in producers {
            let _ = p.await;
        }
        for j in joins {
            let _ = j.await;
        }
        result
    });
    let msgs_per_s = result?;
    let mut latency = latency_histogram();
    for h in histograms.iter() {
        let _ = latency.add(&*h.lock().unwrap());
    }
    rt.shutdown_timeout(Duration::from_secs(5));
    Ok(Outcome {
        msgs_per_s,
        latency,
    })
}

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn worker_index(next: &AtomicUsize) -> usize {
    WORKER.with(|w| {
        if w.get() == usize::MAX {
            w.set(next.fetch_add(1, Ordering::Relaxed));
        }
        w.get()
    })
}

fn core_pin(cpu: usize) {
    let _ = core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
}

// ------------------------------------------------------------ wake-up

/// A stage that records how long after its send time a message is handled.
struct WakeStage {
    control: Arc<Control>,
    latency: Rc<RefCell<Histogram<u64>>>,
}

impl Stage<BenchMsg> for WakeStage {
    fn handle(&mut self, _: &mut StageContext<'_, BenchMsg>, m: Envelope<BenchMsg>) -> Handled {
        let now = self.control.now_ns();
        let _ = self
            .latency
            .borrow_mut()
            .record(now.saturating_sub(m.msg.sent_ns).max(1));
        self.control.handled.fetch_add(1, Ordering::AcqRel);
        Handled::Done
    }
}

struct WakeShard {
    control: Arc<Control>,
    latency: Rc<RefCell<Histogram<u64>>>,
}

impl ShardHandler for WakeShard {
    type Message = BenchMsg;
    type Stage = WakeStage;
    fn on_start(
        &mut self,
        _: &mut ShardContext<BenchMsg>,
        stages: &mut StageTable<WakeStage, BenchMsg>,
    ) {
        stages.insert(WakeStage {
            control: self.control.clone(),
            latency: self.latency.clone(),
        });
        self.control.ready.fetch_add(1, Ordering::AcqRel);
    }
    fn on_tick(
        &mut self,
        _: &mut ShardContext<BenchMsg>,
        _: &mut StageTable<WakeStage, BenchMsg>,
        _: Tick,
    ) {
    }
    fn on_shutdown(
        &mut self,
        _: &mut ShardContext<BenchMsg>,
        _: &mut StageTable<WakeStage, BenchMsg>,
    ) {
        let _ = self
            .control
            .latency
            .lock()
            .unwrap()
            .add(&*self.latency.borrow());
    }
}

/// An idle 20 Hz shard; a helper thread sends one timestamped message every
/// 2-3 ms. Returns the send -> handled histogram in nanoseconds.
fn run_wakeup(doorbell: bool, messages: u64, pinned: bool) -> Result<Histogram<u64>, String> {
    let control = Control::new();
    let c = control.clone();
    let rt = RuntimeBuilder::new()
        .shards(1)
        .pinned(pinned)
        .tick_hz(20)
        .shard_config(ShardConfig {
            doorbell,
            ..ShardConfig::default()
        })
        .start(move |_| WakeShard {
            control: c.clone(),
            latency: Rc::new(RefCell::new(latency_histogram())),
        })
        .map_err(|e| e.to_string())?;
    while control.ready.load(Ordering::Acquire) < 1 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let tx = rt.sender(ShardId(0)).expect("one shard").clone();
    let mut rng = Xorshift(7);
    for _ in 0..messages {
        // Irregular gaps so that sends do not line up with the tick.
        std::thread::sleep(Duration::from_micros(2000 + rng.below(1000)));
        let m = BenchMsg {
            stage: 0,
            sent_ns: control.now_ns(),
        };
        tx.try_send(Envelope::new(StageId(0), Origin::External(0), m))
            .map_err(|e| e.to_string())?;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while control.handled.load(Ordering::Acquire) < messages && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    rt.stop();
    rt.join().map_err(|e| e.to_string())?;
    let h = control.latency.lock().unwrap().clone();
    Ok(h)
}

// ------------------------------------------------------------ the suite

/// Runs the suite.
pub fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let cpus: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    let shards = args.shards.unwrap_or(cpus.len().max(1));
    let pinned = shards <= cpus.len();
    let seconds = args.seconds.unwrap_or(if args.quick { 0.4 } else { 2.0 });
    let reps = args.reps.unwrap_or(if args.quick { 1 } else { 5 });
    let sizes = args.stages.clone().unwrap_or_else(|| {
        if args.quick {
            vec![1_000, 10_000]
        } else {
            vec![1_000, 10_000, 100_000]
        }
    });
    let mut report = Report::new("mailbox", pinned);
    let pin_note = if pinned {
        format!("CPUs {:?}", &cpus[..shards])
    } else {
        "unpinned".to_string()
    };
    report.note(format!(
        "{shards} shards / tokio workers, {pin_note}; producers run on the same cores as the consumers (one per shard or worker), so msgs/s counts the whole machine"
    ));
    report.note(format!(
        "each repetition: {seconds} s of production, then the clock runs until every produced message is handled; {reps} repetitions per system, alternated, median reported; latency = enqueue -> handled, 1 message in {SAMPLE_EVERY} sampled, all repetitions merged"
    ));
    report.note(format!(
        "tokio-mpsc: tokio {} multi-thread runtime, one task + one bounded mpsc({TOKIO_CHANNEL}) per stage, producers await send(); per-stage-queue: crossbeam SegQueue per stage, polled every turn by its shard, same runtime as tessera",
        "1.x"
    ));

    for &stages in &sizes {
        let case = format!("stages={stages}");
        eprintln!("mailbox: {case}: warm-up");
        // Warm-up: one short run of each, discarded.
        run_tessera(shards, stages, 0.2, pinned)?;
        run_tokio(
            shards,
            stages,
            0.2,
            if pinned { &cpus[..shards] } else { &[] },
        )?;
        let systems = ["tessera", "tokio-mpsc", "per-stage-queue"];
        let mut rates: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
        let mut hists: Vec<Histogram<u64>> =
            (0..systems.len()).map(|_| latency_histogram()).collect();
        for rep in 0..reps {
            for (i, system) in systems.iter().enumerate() {
                eprintln!("mailbox: {case}: {system} repetition {}", rep + 1);
                let outcome = match *system {
                    "tessera" => run_tessera(shards, stages, seconds, pinned)?,
                    "tokio-mpsc" => run_tokio(
                        shards,
                        stages,
                        seconds,
                        if pinned { &cpus[..shards] } else { &[] },
                    )?,
                    _ => run_per_stage_queue(shards, stages, seconds, pinned)?,
                };
                rates[i].push(outcome.msgs_per_s);
                let _ = hists[i].add(&outcome.latency);
            }
        }
        for (i, system) in systems.iter().enumerate() {
            let rate = median(&mut rates[i]);
            report.push(&case, system, "msgs_per_s", rate, "msg/s");
            report.push(
                &case,
                system,
                "msgs_per_s_per_core",
                rate / shards as f64,
                "msg/s",
            );
            let h = &hists[i];
            report.push(
                &case,
                system,
                "latency_us_p50",
                h.value_at_quantile(0.5) as f64 / 1000.0,
                "us",
            );
            report.push(
                &case,
                system,
                "latency_us_p99",
                h.value_at_quantile(0.99) as f64 / 1000.0,
                "us",
            );
        }
        for peer in ["tokio-mpsc", "per-stage-queue"] {
            report.ratio(&case, "msgs_per_s", "tessera", peer);
            report.ratio(&case, "latency_us_p50", peer, "tessera");
            report.ratio(&case, "latency_us_p99", peer, "tessera");
        }
    }

    // Wake-up latency of an idle shard.
    let messages = if args.quick { 100 } else { 500 };
    eprintln!("mailbox: idle wake-up");
    let with_bell = run_wakeup(true, messages, pinned)?;
    let without = run_wakeup(false, messages, pinned)?;
    let case = "idle-wakeup";
    for (system, h) in [("tessera", &with_bell), ("tessera-tick-bound", &without)] {
        report.push(
            case,
            system,
            "wakeup_us_p50",
            h.value_at_quantile(0.5) as f64 / 1000.0,
            "us",
        );
        report.push(
            case,
            system,
            "wakeup_us_p99",
            h.value_at_quantile(0.99) as f64 / 1000.0,
            "us",
        );
        report.push(case, system, "wakeup_us_max", h.max() as f64 / 1000.0, "us");
    }
    report.ratio(case, "wakeup_us_p50", "tessera-tick-bound", "tessera");
    report.ratio(case, "wakeup_us_p99", "tessera-tick-bound", "tessera");
    report.note(format!(
        "idle-wakeup: one idle 20 Hz shard, {messages} messages sent from another thread 2-3 ms apart; tessera = doorbell on (default), tessera-tick-bound = doorbell off (the shard sees the message at its next tick)"
    ));
    report.finish()?;
    Ok(())
}
