//! The park watchdog: wakes a shard that overslept its park.
//!
//! A parked shard sleeps inside glommio's reactor, which waits on the main
//! io_uring for a completion from a `POLL_ADD` on the latency ring (where its
//! timers live). On some virtualised kernels that linked wait occasionally
//! never returns (glommio issue #547; seen here on Firecracker, 6.18): the
//! timer fires, nothing wakes the thread, and the shard, its cells and its
//! sessions stop until some signal interrupts the syscall. A watchdog thread
//! therefore watches every park: when a shard is still parked some time
//! after the deadline it asked for, the watchdog interrupts that thread with
//! a signal whose handler does nothing (`io_uring_enter` returns `EINTR`,
//! which glommio treats as a wake-up). Every such kick is counted and logged:
//! it is a lost wake-up that would otherwise have been an outage.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

/// The signal used to interrupt a sleeping shard. SIGURG is ignored by
/// default and unused by Tessera (no out-of-band TCP data).
const KICK_SIGNAL: libc::c_int = libc::SIGURG;

/// How late past its deadline a park may be before the shard is kicked.
pub(crate) const OVERSLEEP: Duration = Duration::from_millis(20);

/// A loop that has not turned for this long is reported and kicked,
/// whatever it awaits: a lost completion anywhere stalls it the same way.
pub(crate) const STALL: Duration = Duration::from_secs(1);

/// A yield returns within microseconds unless the executor lost the
/// task's own wake-up (seen with glommio 0.9: the thread then sleeps in the
/// reactor with the task runnable): kicked after this long.
pub(crate) const YIELD_STALL: Duration = Duration::from_millis(40);

/// How often the watchdog looks.
const PERIOD: Duration = Duration::from_millis(5);

/// Where a shard's loop is, for the stall report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum LoopState {
    /// Running a turn (or not started).
    Turn = 0,
    /// Parked until a deadline, a message or local work.
    Parked = 1,
    /// Yielded to the executor's other tasks.
    Yielded = 2,
    /// Shutting down.
    Stopping = 3,
}

impl LoopState {
    fn name(state: u8) -> &'static str {
        match state {
            0 => "turn",
            1 => "parked",
            2 => "yielded",
            _ => "stopping",
        }
    }
}

/// What the watchdog knows about one shard.
struct ParkWatch {
    /// The shard thread (`pthread_t`), 0 until the shard starts.
    thread: AtomicU64,
    /// Deadline of the current park, in ns since `origin` + 1; 0 = not parked.
    parked_until: AtomicU64,
    /// When the loop entered its current state, ns since `origin` (0: not
    /// started).
    since: AtomicU64,
    /// A [`LoopState`].
    state: AtomicU8,
    /// The `since` of the last stall kicked (one kick per stall).
    stall_kicked: AtomicU64,
    /// Kicks sent to this shard.
    kicks: AtomicU64,
    /// Taken while kicking and when the shard exits, so that the thread is
    /// never signalled after it has left its loop (it may be joined then).
    alive: Mutex<bool>,
}

/// A shard the watchdog interrupted.
#[derive(Debug)]
struct Kick {
    shard: usize,
    /// How late the park, or how long since the loop last turned.
    late: Duration,
    /// A stalled loop rather than an overslept park.
    stalled: bool,
    state: u8,
}

/// The watches of every shard of a runtime.
pub(crate) struct Watchdog {
    origin: Instant,
    watches: Vec<ParkWatch>,
    done: AtomicBool,
}

impl Watchdog {
    pub(crate) fn new(shards: usize) -> Self {
        Self {
            origin: Instant::now(),
            watches: (0..shards)
                .map(|_| ParkWatch {
                    thread: AtomicU64::new(0),
                    parked_until: AtomicU64::new(0),
                    since: AtomicU64::new(0),
                    state: AtomicU8::new(LoopState::Turn as u8),
                    stall_kicked: AtomicU64::new(0),
                    kicks: AtomicU64::new(0),
                    alive: Mutex::new(false),
                })
                .collect(),
            done: AtomicBool::new(false),
        }
    }

    fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.origin).as_nanos() as u64
    }

    /// Called on the shard's own thread when it starts.
    pub(crate) fn register(&self, shard: usize) {
        install_handler();
        let w = &self.watches[shard];
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        w.thread.store(me as u64, Ordering::Release);
        *w.alive.lock().unwrap_or_else(|e| e.into_inner()) = true;
    }

    /// Called on the shard's own thread as it leaves its loop: no kick after.
    pub(crate) fn unregister(&self, shard: usize) {
        let w = &self.watches[shard];
        *w.alive.lock().unwrap_or_else(|e| e.into_inner()) = false;
        w.parked_until.store(0, Ordering::Release);
        w.since.store(0, Ordering::Release);
    }

    /// The shard's loop enters `state` (a turn, a yield...).
    pub(crate) fn state(&self, shard: usize, state: LoopState) {
        let w = &self.watches[shard];
        w.state.store(state as u8, Ordering::Release);
        w.since
            .store(self.ns(Instant::now()).max(1), Ordering::Release);
    }

    /// The shard parks until `deadline`.
    pub(crate) fn parking(&self, shard: usize, deadline: Instant) {
        self.state(shard, LoopState::Parked);
        let w = &self.watches[shard];
        w.parked_until
            .store(self.ns(deadline).saturating_add(1), Ordering::Release);
    }

    /// The shard is awake again.
    pub(crate) fn awake(&self, shard: usize) {
        self.watches[shard].parked_until.store(0, Ordering::Release);
    }

    /// Kicks sent to `shard` so far.
    pub(crate) fn kicks(&self, shard: usize) -> u64 {
        self.watches[shard].kicks.load(Ordering::Relaxed)
    }

    /// Ends the watchdog thread.
    pub(crate) fn finish(&self) {
        self.done.store(true, Ordering::Release);
    }

    /// One look at every shard at time `now`; returns the shards kicked.
    fn check(&self, now: Instant) -> Vec<Kick> {
        let now_ns = self.ns(now);
        let mut kicked = Vec::new();
        for (i, w) in self.watches.iter().enumerate() {
            let until = w.parked_until.load(Ordering::Acquire);
            let since = w.since.load(Ordering::Acquire);
            let state = w.state.load(Ordering::Acquire);
            let limit = if state == LoopState::Yielded as u8 {
                YIELD_STALL
            } else {
                STALL
            };
            let overslept =
                until != 0 && now_ns.saturating_sub(until - 1) >= OVERSLEEP.as_nanos() as u64;
            let stalled = since != 0
                && now_ns.saturating_sub(since) >= limit.as_nanos() as u64
                && w.stall_kicked.load(Ordering::Acquire) != since;
            if !overslept && !stalled {
                continue;
            }
            let alive = w.alive.lock().unwrap_or_else(|e| e.into_inner());
            // Still the same park or stall, and the thread still in its loop.
            if !*alive
                || w.parked_until.load(Ordering::Acquire) != until
                || w.since.load(Ordering::Acquire) != since
            {
                continue;
            }
            let thread = w.thread.load(Ordering::Acquire) as libc::pthread_t;
            // SAFETY: the thread is alive (it clears `alive` under this lock
            // before leaving its loop, and is joined only after that).
            let rc = unsafe { libc::pthread_kill(thread, KICK_SIGNAL) };
            drop(alive);
            if rc != 0 {
                continue;
            }
            w.kicks.fetch_add(1, Ordering::Relaxed);
            // One kick per park and per stall: a new park or a new turn
            // re-arms it.
            let _ = w
                .parked_until
                .compare_exchange(until, 0, Ordering::AcqRel, Ordering::Relaxed);
            let late = if stalled {
                w.stall_kicked.store(since, Ordering::Release);
                now_ns.saturating_sub(since)
            } else {
                now_ns.saturating_sub(until - 1)
            };
            kicked.push(Kick {
                shard: i,
                late: Duration::from_nanos(late),
                stalled,
                state,
            });
        }
        kicked
    }
}

/// Runs the watchdog until [`Watchdog::finish`].
pub(crate) fn run(dog: Arc<Watchdog>) {
    // Also ends when the runtime is gone without a join (only we hold it).
    while !dog.done.load(Ordering::Acquire) && Arc::strong_count(&dog) > 1 {
        std::thread::sleep(PERIOD);
        for k in dog.check(Instant::now()) {
            let kicks = dog.kicks(k.shard);
            let late_ms = k.late.as_secs_f64() * 1e3;
            let state = LoopState::name(k.state);
            if k.stalled {
                tracing::warn!(
                    shard = k.shard,
                    stalled_ms = late_ms,
                    state,
                    kicks,
                    "shard loop has not turned for a while; interrupted it"
                );
            } else if kicks <= 10 || kicks.is_power_of_two() {
                // The first ones always; then rarely, so that a kernel that
                // loses every wake-up does not flood the log.
                tracing::warn!(
                    shard = k.shard,
                    late_ms,
                    kicks,
                    "shard overslept its park (lost wake-up); interrupted it"
                );
            }
        }
    }
}

extern "C" fn on_kick(_: libc::c_int) {}

fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a handler that does nothing is async-signal-safe; no
        // SA_RESTART, so that a blocking io_uring_enter returns EINTR.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_kick as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            action.sa_flags = 0;
            if libc::sigaction(KICK_SIGNAL, &action, std::ptr::null_mut()) != 0 {
                tracing::warn!("cannot install the park watchdog's signal handler");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_park_within_its_deadline_is_left_alone_and_an_overslept_one_is_kicked() {
        let dog = Arc::new(Watchdog::new(1));
        let (tx, rx) = std::sync::mpsc::channel();
        let d = dog.clone();
        // A thread that blocks in a syscall a signal interrupts, as a
        // parked shard blocks in io_uring_enter.
        let t = std::thread::spawn(move || {
            d.register(0);
            let start = Instant::now();
            d.parking(0, start);
            tx.send(()).unwrap();
            let mut fds = [0i32; 2];
            // SAFETY: plain pipe; the read blocks until EINTR (nothing writes).
            let rc = unsafe {
                libc::pipe(fds.as_mut_ptr());
                let mut b = [0u8; 1];
                libc::read(fds[0], b.as_mut_ptr().cast(), 1)
            };
            let err = std::io::Error::last_os_error();
            // SAFETY: our own pipe.
            unsafe {
                libc::close(fds[0]);
                libc::close(fds[1]);
            }
            d.unregister(0);
            (rc, err.raw_os_error())
        });
        rx.recv().unwrap();
        // Not yet late at the deadline itself.
        assert!(dog.check(dog.origin).is_empty());
        let mut kicked = Vec::new();
        for _ in 0..400 {
            std::thread::sleep(Duration::from_millis(5));
            kicked = dog.check(Instant::now());
            if !kicked.is_empty() {
                break;
            }
        }
        assert_eq!(kicked.len(), 1, "an overslept park must be kicked");
        assert!(!kicked[0].stalled);
        let (rc, errno) = t.join().unwrap();
        assert_eq!((rc, errno), (-1, Some(libc::EINTR)));
        assert_eq!(dog.kicks(0), 1);
        // Unregistered: never again.
        dog.parking(0, dog.origin);
        assert!(dog
            .check(Instant::now() + Duration::from_secs(1))
            .is_empty());
    }

    #[test]
    fn a_loop_that_stops_turning_is_kicked_once_per_stall() {
        let dog = Arc::new(Watchdog::new(1));
        let (tx, rx) = std::sync::mpsc::channel();
        let d = dog.clone();
        let t = std::thread::spawn(move || {
            d.register(0);
            d.state(0, LoopState::Turn);
            tx.send(()).unwrap();
            let mut fds = [0i32; 2];
            // SAFETY: plain pipe; the read blocks until EINTR (nothing writes).
            let rc = unsafe {
                libc::pipe(fds.as_mut_ptr());
                let mut b = [0u8; 1];
                libc::read(fds[0], b.as_mut_ptr().cast(), 1)
            };
            let err = std::io::Error::last_os_error();
            // SAFETY: our own pipe.
            unsafe {
                libc::close(fds[0]);
                libc::close(fds[1]);
            }
            (rc, err.raw_os_error())
        });
        rx.recv().unwrap();
        let start = Instant::now();
        assert!(dog.check(start).is_empty(), "not stalled yet");
        let later = start + STALL + Duration::from_millis(50);
        while Instant::now() < later {
            std::thread::sleep(Duration::from_millis(10));
        }
        let kicked = dog.check(Instant::now());
        assert_eq!(kicked.len(), 1);
        assert!(kicked[0].stalled);
        assert_eq!(kicked[0].state, LoopState::Turn as u8);
        assert_eq!(t.join().unwrap(), (-1, Some(libc::EINTR)));
        // The same stall is not kicked twice.
        assert!(dog.check(Instant::now()).is_empty());
        dog.unregister(0);
    }
}
