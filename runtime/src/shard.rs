//! The shard event loop.
//!
//! One turn: run the tick if its deadline passed; drain the mailbox in bulk
//! into the [`Bundler`]; hand each stage its bundle; resume stages whose
//! continuation finished; let the handler poll its own sources
//! ([`ShardHandler::on_turn`]); push the outgoing bundles. With nothing to do,
//! the shard parks until the next tick deadline, a doorbell from a sender, or
//! local work.
//!
//! Shutdown runs in two phases so that nothing in flight between shards is
//! lost: first every shard stops ticking and keeps delivering until all
//! shards are quiet at once with empty mailboxes; then each closes its
//! mailbox (late sends fail), drains what was accepted, runs its shutdown
//! hooks and exits.

use std::cell::RefCell;
use std::mem;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::future;

use crate::bundle::Bundler;
use crate::ids::{Origin, ShardId, StageAddr, StageId};
use crate::mailbox::{Envelope, Mailbox, MailboxSender, SendError};
use crate::notify::Notify;
use crate::outbox::Outbox;
use crate::runtime::{RuntimeShared, ShardConfig};
use crate::stage::{Stage, StageTable};
use crate::stats::{ShardStats, StatsBoard};
use crate::tick::{Tick, TickClock};
use crate::watchdog::LoopState;

/// The code a shard runs: owns the shard's state besides its stages.
pub trait ShardHandler: 'static {
    /// What travels through the mailboxes.
    type Message: Send + 'static;
    /// The kind of stage this shard hosts.
    type Stage: Stage<Self::Message>;

    /// Called once on the shard's thread before the first turn: create the
    /// stages, spawn local tasks (sockets, timers).
    fn on_start(
        &mut self,
        cx: &mut ShardContext<Self::Message>,
        stages: &mut StageTable<Self::Stage, Self::Message>,
    ) {
        let _ = (cx, stages);
    }

    /// Called at every tick deadline.
    fn on_tick(
        &mut self,
        cx: &mut ShardContext<Self::Message>,
        stages: &mut StageTable<Self::Stage, Self::Message>,
        tick: Tick,
    );

    /// Called every loop turn after the mailbox was dispatched, to poll
    /// sources of the handler's own. Returns how much work it did (0 lets the
    /// shard park).
    fn on_turn(
        &mut self,
        cx: &mut ShardContext<Self::Message>,
        stages: &mut StageTable<Self::Stage, Self::Message>,
    ) -> usize {
        let _ = (cx, stages);
        0
    }

    /// The handler's own next deadline (protocol timers...): the shard does
    /// not park beyond it.
    fn next_deadline(&mut self) -> Option<Instant> {
        None
    }

    /// A message arrived for a stage that does not exist (removed, or moved
    /// elsewhere). The default counts it and logs it; a node re-routes it.
    fn on_undeliverable(
        &mut self,
        cx: &mut ShardContext<Self::Message>,
        envelope: Envelope<Self::Message>,
    ) {
        tracing::debug!(shard = %cx.shard(), stage = %envelope.to, from = %envelope.from,
            "message for a missing stage dropped");
    }

    /// Stop was requested: stop accepting new outside work (sockets,
    /// sessions). Messages between shards keep flowing until all are quiet.
    fn on_stop(
        &mut self,
        cx: &mut ShardContext<Self::Message>,
        stages: &mut StageTable<Self::Stage, Self::Message>,
    ) {
        let _ = (cx, stages);
    }

    /// Called at every turn while the shard quiesces after [`Self::on_stop`],
    /// after the mailbox was dispatched: finish the handler's own work (a
    /// node pumps its sessions' disconnects). Returns true while that work
    /// goes on; the shard does not call itself quiet before it returns false
    /// (or the shutdown timeout passes).
    fn on_stopping(
        &mut self,
        cx: &mut ShardContext<Self::Message>,
        stages: &mut StageTable<Self::Stage, Self::Message>,
    ) -> bool {
        let _ = (cx, stages);
        false
    }

    /// Last call, after the mailbox was closed and drained. Other shards may
    /// already be closed: sends to them fail and are counted.
    fn on_shutdown(
        &mut self,
        cx: &mut ShardContext<Self::Message>,
        stages: &mut StageTable<Self::Stage, Self::Message>,
    ) {
        let _ = (cx, stages);
    }
}

pub(crate) struct Local<M> {
    outbox: RefCell<Outbox<M>>,
    ready: RefCell<Vec<(StageId, u32)>>,
    notify: Notify,
}

/// A handle to the shard for local tasks (a socket reader, a stage
/// continuation): send messages and wake the loop. Not `Send`: it stays on
/// its shard.
pub struct LocalHandle<M> {
    shard: ShardId,
    local: Rc<Local<M>>,
}

impl<M> Clone for LocalHandle<M> {
    fn clone(&self) -> Self {
        Self {
            shard: self.shard,
            local: self.local.clone(),
        }
    }
}

impl<M> LocalHandle<M> {
    /// The shard this handle belongs to.
    pub fn shard(&self) -> ShardId {
        self.shard
    }

    /// Queues a message (pushed at the end of the shard's next turn) and
    /// wakes the loop.
    pub fn send(&self, to: StageAddr, msg: M) -> Result<(), SendError<M>> {
        let result = self.local.outbox.borrow_mut().send(to, msg);
        self.local.notify.notify();
        result
    }

    /// Wakes the shard loop so that it runs a turn (e.g. a socket task has
    /// queued datagrams for [`ShardHandler::on_turn`]).
    pub fn wake(&self) {
        self.local.notify.notify();
    }
}

/// What the shard's handler and stages can see and do.
pub struct ShardContext<M> {
    shard: ShardId,
    local: Rc<Local<M>>,
    now: Instant,
    last_tick: Option<Tick>,
    hooks: Vec<Box<dyn FnOnce()>>,
    shared: Arc<RuntimeShared>,
    undeliverable: u64,
    continuations: u64,
}

impl<M: Send + 'static> ShardContext<M> {
    /// This shard.
    pub fn shard(&self) -> ShardId {
        self.shard
    }

    /// Number of shards in the runtime.
    pub fn shard_count(&self) -> usize {
        self.local.outbox.borrow().shard_count()
    }

    /// When the current turn started (updated after a tick).
    pub fn now(&self) -> Instant {
        self.now
    }

    /// The last tick run.
    pub fn last_tick(&self) -> Option<Tick> {
        self.last_tick
    }

    /// Queues a message for any stage of any shard; bundles are pushed at the
    /// end of the turn. Refused if the destination's buffer is full.
    pub fn send(&mut self, to: StageAddr, msg: M) -> Result<(), SendError<M>> {
        self.local.outbox.borrow_mut().send(to, msg)
    }

    /// Pushes the outgoing bundles now instead of at the end of the turn.
    pub fn flush(&mut self) -> usize {
        self.local.outbox.borrow_mut().flush()
    }

    /// A handle for local tasks.
    pub fn local_handle(&self) -> LocalHandle<M> {
        LocalHandle {
            shard: self.shard,
            local: self.local.clone(),
        }
    }

    /// A sender into any shard's mailbox (for handing to other threads).
    pub fn mailbox_sender(&self, shard: ShardId) -> Option<MailboxSender<M>> {
        self.local.outbox.borrow().sender(shard).cloned()
    }

    /// Registers a hook run at shutdown, after the mailbox was drained.
    pub fn on_shutdown(&mut self, hook: impl FnOnce() + 'static) {
        self.hooks.push(Box::new(hook));
    }

    /// True once a stop of the runtime was requested.
    pub fn stop_requested(&self) -> bool {
        self.shared.stop_requested()
    }

    /// Asks the whole runtime to stop (as SIGTERM would).
    pub fn request_stop(&self) {
        self.shared.request_stop();
    }

    /// Counts a message that could not be delivered (for handlers that
    /// override [`ShardHandler::on_undeliverable`]).
    pub fn count_undeliverable(&mut self) {
        self.undeliverable += 1;
    }

    pub(crate) fn spawn_continuation(
        &mut self,
        stage: StageId,
        generation: u32,
        future: std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>,
    ) {
        self.continuations += 1;
        let local = self.local.clone();
        glommio::spawn_local(async move {
            future.await;
            local.ready.borrow_mut().push((stage, generation));
            local.notify.notify();
        })
        .detach();
    }
}

/// Everything one shard needs, moved onto its thread.
pub(crate) struct ShardParts<M> {
    /// Deadline 0 of every shard's tick clock: the same for all shards, so
    /// that tick ids agree across shards (a cell handed over keeps counting).
    pub origin: Instant,
    pub shard: ShardId,
    pub cpu: Option<usize>,
    pub mailbox: Mailbox<M>,
    pub senders: Vec<MailboxSender<M>>,
    pub shared: Arc<RuntimeShared>,
    pub board: Arc<StatsBoard>,
    pub config: ShardConfig,
}

struct Loop<H: ShardHandler> {
    handler: H,
    cx: ShardContext<H::Message>,
    stages: StageTable<H::Stage, H::Message>,
    bundler: Bundler<H::Message>,
    mailbox: Mailbox<H::Message>,
    clock: TickClock,
    stats: ShardStats,
    board: Arc<StatsBoard>,
    config: ShardConfig,
    bell: Option<glommio::net::UdpSocket>,
    stray: Vec<Envelope<H::Message>>,
}

/// Runs one shard until the runtime stops; returns its statistics.
pub(crate) async fn run_shard<H: ShardHandler>(
    handler: H,
    parts: ShardParts<H::Message>,
) -> ShardStats {
    let ShardParts {
        origin,
        shard,
        cpu,
        mut mailbox,
        senders,
        shared,
        board,
        config,
    } = parts;
    // The doorbell is a datagram socketpair; glommio reads any datagram fd
    // through its UdpSocket type (recv on a connected socket).
    let bell = mailbox
        .take_bell()
        .map(|fd| unsafe { glommio::net::UdpSocket::from_raw_fd(fd.into_raw_fd()) });
    let now = Instant::now();
    let local = Rc::new(Local {
        outbox: RefCell::new(Outbox::new(
            Origin::Shard(shard),
            senders,
            config.bundle_max,
            config.outbox_pending_max,
        )),
        ready: RefCell::new(Vec::new()),
        notify: Notify::default(),
    });
    let mut l = Loop {
        handler,
        cx: ShardContext {
            shard,
            local,
            now,
            last_tick: None,
            hooks: Vec::new(),
            shared,
            undeliverable: 0,
            continuations: 0,
        },
        stages: StageTable::new(),
        bundler: Bundler::new(),
        mailbox,
        clock: TickClock::new(origin, config.tick_period),
        stats: ShardStats::new(shard, cpu),
        board,
        config,
        bell,
        stray: Vec::new(),
    };
    l.cx.shared.watchdog.register(shard.index());
    tracing::info!(%shard, cpu = ?cpu, "shard started");
    l.handler.on_start(&mut l.cx, &mut l.stages);
    let mut next_publish = now + l.config.publish_interval;

    let me = shard.index();
    while !l.cx.shared.stop_requested() {
        l.cx.shared.watchdog.state(me, LoopState::Turn);
        let work = l.turn(true);
        if l.cx.now >= next_publish {
            l.publish();
            next_publish = l.cx.now + l.config.publish_interval;
        }
        if work == 0 {
            let waiting = l.cx.local.outbox.borrow().waiting();
            let mut deadline = l.clock.next_deadline().min(next_publish);
            if let Some(own) = l.handler.next_deadline() {
                deadline = deadline.min(own);
            }
            if waiting > 0 {
                // A destination was full: retry soon rather than at the tick.
                deadline = deadline.min(Instant::now() + Duration::from_micros(200));
            }
            l.park(deadline).await;
        } else if l.stages.busy_count() > 0 || l.stats.turns % 16 == 0 {
            // Yield only when other tasks may need the thread (awaiting
            // stage handlers), and now and then for the executor's own
            // tasks: each yield risks a lost self-wake-up in glommio 0.9
            // (the watchdog catches those).
            l.cx.shared.watchdog.state(me, LoopState::Yielded);
            future::yield_now().await;
        }
    }

    l.cx.shared.watchdog.state(me, LoopState::Stopping);
    tracing::info!(%shard, "stop requested; quiescing");
    l.handler.on_stop(&mut l.cx, &mut l.stages);
    l.quiesce().await;
    l.close_and_drain().await;
    l.handler.on_shutdown(&mut l.cx, &mut l.stages);
    for hook in mem::take(&mut l.cx.hooks) {
        hook();
    }
    l.cx.local.outbox.borrow_mut().flush();
    l.cx.shared.watchdog.unregister(shard.index());
    l.publish();
    tracing::info!(%shard, ticks = l.stats.ticks, "shard stopped");
    l.stats
}

impl<H: ShardHandler> Loop<H> {
    /// One turn of the loop; returns the amount of work done.
    fn turn(&mut self, ticking: bool) -> usize {
        let now = Instant::now();
        self.cx.now = now;
        self.stats.turns += 1;
        // What arrived before the tick is part of it: take the mailbox first.
        let mut work = self.dispatch_mailbox();
        work += self.resume_ready();
        if ticking {
            if let Some(start) = self.clock.poll(now) {
                let tick = start.tick;
                self.stats
                    .tick_lateness_us
                    .saturating_record(start.lateness.as_micros() as u64);
                self.cx.last_tick = Some(tick);
                if tick.skipped > 0 {
                    tracing::warn!(shard = %self.cx.shard, tick = tick.id, skipped = tick.skipped,
                        "ticks skipped after an overrun");
                }
                self.handler.on_tick(&mut self.cx, &mut self.stages, tick);
                let end = Instant::now();
                let us = end.duration_since(now).as_micros() as u64;
                self.stats.tick_duration_us.saturating_record(us);
                self.stats.tick_duration_us_recent.saturating_record(us);
                self.clock.finish(end);
                self.stats.ticks = self.clock.ticks();
                self.stats.skipped_ticks = self.clock.skipped();
                self.stats.overruns = self.clock.overruns();
                self.cx.now = end;
                work += 1;
            }
        }
        work += self.dispatch_mailbox();
        work += self.resume_ready();
        if ticking {
            work += self.handler.on_turn(&mut self.cx, &mut self.stages);
        }
        let outbox = &self.cx.local.outbox;
        let before = outbox.borrow().counters().bundles;
        outbox.borrow_mut().flush();
        work += (outbox.borrow().counters().bundles - before) as usize;
        work
    }

    fn dispatch_mailbox(&mut self) -> usize {
        let bundler = &mut self.bundler;
        let n = self
            .mailbox
            .drain(self.config.max_drain, |e| bundler.push(e));
        if n == 0 {
            return 0;
        }
        self.stats.max_drain = self.stats.max_drain.max(n as u64);
        let Loop {
            handler,
            cx,
            stages,
            bundler,
            stray,
            ..
        } = self;
        let mut handled = 0;
        bundler.drain_bundles(
            |id, messages| {
                handled += stages.deliver(cx, id, messages, |cx, e| {
                    cx.undeliverable += 1;
                    handler.on_undeliverable(cx, e);
                });
            },
            |e| stray.push(e),
        );
        for e in self.stray.drain(..) {
            self.cx.undeliverable += 1;
            self.handler.on_undeliverable(&mut self.cx, e);
        }
        self.stats.messages_handled += handled;
        n
    }

    fn resume_ready(&mut self) -> usize {
        let ready = mem::take(&mut *self.cx.local.ready.borrow_mut());
        let n = ready.len();
        for (id, generation) in ready {
            self.stats.messages_handled += self.stages.resume(&mut self.cx, id, generation);
        }
        n
    }

    async fn park(&mut self, deadline: Instant) {
        // Without a doorbell the shard never announces its park, so senders
        // never ring and it wakes only at its deadline (tick-bound latency).
        if self.config.doorbell && !self.mailbox.prepare_park() {
            return;
        }
        if self.cx.local.notify.take() {
            self.mailbox.end_park();
            return;
        }
        self.stats.parks += 1;
        let timeout = deadline.saturating_duration_since(Instant::now());
        let notify = &self.cx.local.notify;
        let bell = self.bell.as_ref();
        let ring = async move {
            let mut buf = [0u8; 16];
            match bell {
                Some(b) => {
                    if b.recv(&mut buf).await.is_err() {
                        future::pending::<()>().await
                    }
                }
                None => future::pending::<()>().await,
            }
        };
        let watchdog = &self.cx.shared.watchdog;
        let me = self.cx.shard.index();
        watchdog.parking(me, deadline);
        future::or(
            ring,
            future::or(notify.wait(), glommio::timer::sleep(timeout)),
        )
        .await;
        watchdog.awake(me);
        self.mailbox.end_park();
    }

    fn is_quiet(&self) -> bool {
        self.mailbox.is_empty()
            && self.cx.local.outbox.borrow().waiting() == 0
            && self.stages.busy_count() == 0
            && self.cx.local.ready.borrow().is_empty()
    }

    /// Phase 1 of shutdown: deliver until every shard is quiet at once.
    async fn quiesce(&mut self) {
        let shared = self.cx.shared.clone();
        let me = self.cx.shard.index();
        let deadline = Instant::now() + self.config.shutdown_timeout;
        loop {
            // Announce activity before taking anything, so a shard checking
            // for global quiet cannot miss a message moving through us.
            shared.set_quiet(me, false);
            let mut work = 0;
            if !self.mailbox.is_empty() || !self.cx.local.ready.borrow().is_empty() {
                shared.bump_activity();
                work += self.turn(false);
            }
            self.cx.now = Instant::now();
            let lingering = self.handler.on_stopping(&mut self.cx, &mut self.stages);
            if lingering {
                shared.bump_activity();
            }
            work += self.turn_flush_only();
            if work == 0 && !lingering && self.is_quiet() {
                shared.set_quiet(me, true);
                let senders_empty =
                    |s: &[MailboxSender<H::Message>]| s.iter().all(|s| s.depth() == 0);
                let outbox = self.cx.local.outbox.borrow();
                if shared.all_quiet_with(|| senders_empty(outbox.senders())) {
                    break;
                }
            }
            if Instant::now() >= deadline {
                tracing::warn!(shard = %self.cx.shard, "shutdown: shards did not go quiet in time");
                break;
            }
            if work == 0 {
                let mut d = Instant::now() + Duration::from_micros(500);
                if lingering {
                    if let Some(own) = self.handler.next_deadline() {
                        d = d.min(own);
                    }
                }
                self.park(d).await;
            } else {
                future::yield_now().await;
            }
        }
    }

    fn turn_flush_only(&mut self) -> usize {
        let outbox = &self.cx.local.outbox;
        let before = outbox.borrow().counters().bundles;
        outbox.borrow_mut().flush();
        let pushed = (outbox.borrow().counters().bundles - before) as usize;
        if pushed > 0 {
            self.cx.shared.bump_activity();
        }
        pushed
    }

    /// Phase 2: close the mailbox, take what was accepted, finish continuations.
    async fn close_and_drain(&mut self) {
        self.mailbox.close();
        let deadline = Instant::now() + self.config.shutdown_timeout;
        loop {
            self.turn(false);
            if self.mailbox.depth() == 0 && self.stages.busy_count() == 0 {
                break;
            }
            if Instant::now() >= deadline {
                tracing::warn!(shard = %self.cx.shard, depth = self.mailbox.depth(),
                    busy = self.stages.busy_count(), "shutdown: gave up draining");
                break;
            }
            // Senders that reserved room before the close are still pushing,
            // or continuations are still running.
            let d = Instant::now() + Duration::from_micros(200);
            self.park(d).await;
        }
    }

    fn publish(&mut self) {
        let out = self.cx.local.outbox.borrow().counters();
        self.stats.outbox_deferred = out.deferred;
        self.stats.outbox_rejected = out.rejected;
        self.stats.outbox_lost_closed = out.lost_closed;
        self.stats.undeliverable = self.cx.undeliverable;
        self.stats.continuations = self.cx.continuations;
        self.stats.park_kicks = self.cx.shared.watchdog.kicks(self.cx.shard.index());
        self.stats.mailbox_depth = self.mailbox.depth();
        self.stats.mailbox_rejected_full = self
            .mailbox
            .counters()
            .rejected_full_msgs
            .load(Ordering::Relaxed);
        self.board.publish(&self.stats);
        self.stats.tick_duration_us_recent.reset();
    }
}
