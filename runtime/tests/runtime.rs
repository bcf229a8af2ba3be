//! Scenario tests of the runtime with real shards (unpinned, so they run on
//! any machine). No wall-clock thresholds: they check counts and order.

use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_runtime::{
    Envelope, Handled, Origin, RuntimeBuilder, SendError, ShardConfig, ShardContext, ShardHandler,
    ShardId, Stage, StageAddr, StageContext, StageId, StageTable, Tick,
};

/// SplitMix64: a tiny seeded generator for the tests.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone, Copy)]
struct Msg {
    /// Sequence number per (sender, destination stage), from 0.
    seq: u64,
    /// Make the handler await before finishing.
    slow: bool,
}

#[derive(Default)]
struct Shared {
    received: AtomicU64,
    sent: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Shared {
    fn error(&self, e: String) {
        self.errors.lock().unwrap().push(e);
    }
}

struct Checker {
    shared: Arc<Shared>,
    next: HashMap<Origin, u64>,
    running: Rc<Cell<bool>>,
}

impl Stage<Msg> for Checker {
    fn handle(&mut self, cx: &mut StageContext<'_, Msg>, m: Envelope<Msg>) -> Handled {
        if self.running.get() {
            self.shared
                .error(format!("{} ran two messages at once", cx.address()));
        }
        let expected = self.next.entry(m.from).or_insert(0);
        if m.msg.seq != *expected {
            self.shared.error(format!(
                "{} from {}: got seq {} expected {}",
                cx.address(),
                m.from,
                m.msg.seq,
                expected
            ));
        }
        *expected = m.msg.seq + 1;
        self.shared.received.fetch_add(1, Ordering::Relaxed);
        if m.msg.slow {
            self.running.set(true);
            let running = self.running.clone();
            return Handled::continue_with(async move {
                glommio::timer::sleep(Duration::from_micros(100)).await;
                running.set(false);
            });
        }
        Handled::Done
    }
}

struct Producer {
    rng: Rng,
    shards: usize,
    stages: u32,
    quota: u64,
    seqs: HashMap<StageAddr, u64>,
    retry: Option<(StageAddr, Msg)>,
    shared: Arc<Shared>,
}

impl ShardHandler for Producer {
    type Message = Msg;
    type Stage = Checker;

    fn on_start(&mut self, _cx: &mut ShardContext<Msg>, stages: &mut StageTable<Checker, Msg>) {
        for _ in 0..self.stages {
            stages.insert(Checker {
                shared: self.shared.clone(),
                next: HashMap::new(),
                running: Rc::new(Cell::new(false)),
            });
        }
    }

    fn on_tick(&mut self, _: &mut ShardContext<Msg>, _: &mut StageTable<Checker, Msg>, _: Tick) {}

    fn on_turn(&mut self, cx: &mut ShardContext<Msg>, _: &mut StageTable<Checker, Msg>) -> usize {
        let burst = 1 + self.rng.below(64);
        let mut sent = 0;
        for _ in 0..burst {
            let (to, msg) = match self.retry.take() {
                Some(r) => r,
                None if self.quota > 0 => {
                    let to = StageAddr::new(
                        ShardId(self.rng.below(self.shards as u64) as u16),
                        StageId(self.rng.below(u64::from(self.stages)) as u32),
                    );
                    let seq = self.seqs.entry(to).or_insert(0);
                    let msg = Msg {
                        seq: *seq,
                        slow: self.rng.below(50) == 0,
                    };
                    *seq += 1;
                    self.quota -= 1;
                    (to, msg)
                }
                None => break,
            };
            match cx.send(to, msg) {
                Ok(()) => {
                    sent += 1;
                    self.shared.sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(SendError::Full(msg)) => {
                    // Backpressure: keep it and try again next turn, in order.
                    self.retry = Some((to, msg));
                    break;
                }
                Err(SendError::Closed(_)) => {
                    self.shared.error(format!("{to} closed while running"));
                    break;
                }
            }
        }
        sent
    }
}

fn run_seed(seed: u64, shards: usize, stages: u32, quota: u64, capacity: usize) {
    let shared = Arc::new(Shared::default());
    let external_quota = 2_000u64;
    let s2 = shared.clone();
    let config = ShardConfig {
        outbox_pending_max: 512,
        bundle_max: 128,
        ..ShardConfig::default()
    };
    let rt = RuntimeBuilder::new()
        .shards(shards)
        .pinned(false)
        .tick_hz(1000)
        .mailbox_capacity(capacity)
        .shard_config(config)
        .start(move |shard| Producer {
            rng: Rng(seed ^ (u64::from(shard.0) << 32)),
            shards,
            stages,
            quota,
            seqs: HashMap::new(),
            retry: None,
            shared: s2.clone(),
        })
        .unwrap();

    // An outside thread sends too, through the same mailboxes.
    let mut rng = Rng(seed.wrapping_mul(31));
    let mut seqs: HashMap<StageAddr, u64> = HashMap::new();
    for _ in 0..external_quota {
        let to = StageAddr::new(
            ShardId(rng.below(shards as u64) as u16),
            StageId(rng.below(u64::from(stages)) as u32),
        );
        let seq = seqs.entry(to).or_insert(0);
        let env = Envelope::new(
            to.stage,
            Origin::External(7),
            Msg {
                seq: *seq,
                slow: false,
            },
        );
        *seq += 1;
        rt.sender(to.shard)
            .unwrap()
            .send_timeout(env, Duration::from_secs(20))
            .expect("mailbox stayed full for 20 s");
        shared.sent.fetch_add(1, Ordering::Relaxed);
    }

    let expected = quota * shards as u64 + external_quota;
    let deadline = Instant::now() + Duration::from_secs(60);
    while shared.received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let senders: Vec<_> = rt.senders().to_vec();
    rt.stop();
    let reports = rt.join().unwrap();

    let errors = shared.errors.lock().unwrap();
    assert!(
        errors.is_empty(),
        "seed {seed}: {:?}",
        &errors[..errors.len().min(5)]
    );
    assert_eq!(
        shared.sent.load(Ordering::Relaxed),
        expected,
        "seed {seed}: not everything was sent"
    );
    assert_eq!(
        shared.received.load(Ordering::Relaxed),
        expected,
        "seed {seed}: messages lost or duplicated"
    );
    let handled: u64 = reports.iter().map(|r| r.messages_handled).sum();
    assert_eq!(handled, expected, "seed {seed}");
    assert!(reports
        .iter()
        .all(|r| r.undeliverable == 0 && r.outbox_lost_closed == 0));
    // After shutdown every mailbox refuses sends.
    for s in senders {
        let late = Envelope::new(
            StageId(0),
            Origin::External(0),
            Msg {
                seq: 0,
                slow: false,
            },
        );
        assert!(
            matches!(s.try_send(late), Err(SendError::Closed(_))),
            "seed {seed}"
        );
    }
}

#[test]
fn per_stage_order_and_no_loss_with_concurrent_senders() {
    for seed in 1..=6u64 {
        run_seed(seed, 3, 40, 6_000, 1 << 16);
    }
}

#[test]
fn backpressure_under_a_tiny_mailbox_loses_nothing() {
    // 64-message mailboxes: senders hit Full constantly and must retry.
    for seed in 100..=102u64 {
        run_seed(seed, 2, 8, 4_000, 64);
    }
}

/// A handler that stops the runtime from inside after some ticks and records
/// what shutdown did.
struct Stopper {
    ticks: u64,
    hooks_run: Arc<AtomicU64>,
    shutdown_seen: Arc<AtomicU64>,
}

struct Nop;
impl Stage<u32> for Nop {
    fn handle(&mut self, _: &mut StageContext<'_, u32>, _: Envelope<u32>) -> Handled {
        Handled::Done
    }
}

impl ShardHandler for Stopper {
    type Message = u32;
    type Stage = Nop;
    fn on_start(&mut self, cx: &mut ShardContext<u32>, stages: &mut StageTable<Nop, u32>) {
        stages.insert(Nop);
        let hooks = self.hooks_run.clone();
        cx.on_shutdown(move || {
            hooks.fetch_add(1, Ordering::Relaxed);
        });
    }
    fn on_tick(&mut self, cx: &mut ShardContext<u32>, _: &mut StageTable<Nop, u32>, tick: Tick) {
        self.ticks += 1;
        if self.ticks == 5 && cx.shard() == ShardId(0) {
            assert!(tick.id >= 4);
            cx.request_stop();
        }
    }
    fn on_shutdown(&mut self, _: &mut ShardContext<u32>, _: &mut StageTable<Nop, u32>) {
        self.shutdown_seen.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn stop_from_inside_runs_every_hook_once() {
    let hooks = Arc::new(AtomicU64::new(0));
    let seen = Arc::new(AtomicU64::new(0));
    let (h, s) = (hooks.clone(), seen.clone());
    let rt = RuntimeBuilder::new()
        .shards(2)
        .pinned(false)
        .tick_hz(200)
        .start(move |_| Stopper {
            ticks: 0,
            hooks_run: h.clone(),
            shutdown_seen: s.clone(),
        })
        .unwrap();
    assert!(rt.stop_handle().wait_timeout(Duration::from_secs(30)));
    let reports = rt.join().unwrap();
    assert_eq!(hooks.load(Ordering::Relaxed), 2);
    assert_eq!(seen.load(Ordering::Relaxed), 2);
    assert!(reports.iter().all(|r| r.ticks >= 1));
}

#[test]
fn messages_to_missing_stages_are_counted() {
    let rt = RuntimeBuilder::new()
        .shards(1)
        .pinned(false)
        .start(|_| Stopper {
            ticks: 0,
            hooks_run: Arc::new(AtomicU64::new(0)),
            shutdown_seen: Arc::new(AtomicU64::new(0)),
        })
        .unwrap();
    let tx = rt.sender(ShardId(0)).unwrap().clone();
    for i in 0..10 {
        tx.try_send(Envelope::new(StageId(1000 + i), Origin::External(1), i))
            .unwrap();
    }
    rt.stop();
    let reports = rt.join().unwrap();
    assert_eq!(reports[0].undeliverable, 10);
    assert_eq!(reports[0].messages_handled, 0);
}

#[test]
fn too_many_pinned_shards_is_a_clear_error() {
    let err = RuntimeBuilder::new()
        .shards(100_000)
        .pinned(true)
        .plan()
        .unwrap_err();
    assert!(err.to_string().contains("pinned shards requested"), "{err}");
}
