//! The unified per-shard mailbox: bounded, multi-producer, drained in bulk.
//!
//! Every message for any stage of a shard goes through this one queue (seed
//! 003: one queue per event loop instead of one per stage). Producers may
//! push single messages or whole bundles (a `Vec` built during one turn), so
//! the cost of the channel operation is paid per bundle, not per message.
//!
//! The bound is counted in messages, not in pushes: a sender reserves room
//! for the whole bundle first, and a full or closed mailbox hands the
//! message(s) back inside the error, so nothing is lost silently.
//!
//! A parked glommio executor is not woken by a crossbeam send, so the
//! receiver announces when it is about to park and the first sender that sees
//! it rings a doorbell: a one-byte datagram on a pair of connected loopback
//! UDP sockets, which the shard reads through io_uring (glommio reads UDP
//! sockets; it cannot wrap an eventfd or a unix socket created outside it).
//! Only one bell rings per park.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::OwnedFd;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::ids::{Origin, ShardId, StageId};

/// A message addressed to a stage of the receiving shard.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope<M> {
    /// The stage that handles the message.
    pub to: StageId,
    /// Who sent it; order is preserved per sender.
    pub from: Origin,
    /// The payload.
    pub msg: M,
}

impl<M> Envelope<M> {
    /// Builds an envelope.
    pub fn new(to: StageId, from: Origin, msg: M) -> Self {
        Self { to, from, msg }
    }
}

/// Why a send did not go through. The unsent message(s) come back inside.
pub enum SendError<T> {
    /// The mailbox holds `capacity` messages already: back off and retry.
    Full(T),
    /// The shard is shutting down or gone: it will never take this message.
    Closed(T),
}

impl<T> SendError<T> {
    /// Takes back what could not be sent.
    pub fn into_inner(self) -> T {
        match self {
            SendError::Full(t) | SendError::Closed(t) => t,
        }
    }

    /// True for a full mailbox (retry later), false for a closed one.
    pub fn is_full(&self) -> bool {
        matches!(self, SendError::Full(_))
    }

    fn map<U>(self, f: impl FnOnce(T) -> U) -> SendError<U> {
        match self {
            SendError::Full(t) => SendError::Full(f(t)),
            SendError::Closed(t) => SendError::Closed(f(t)),
        }
    }
}

impl<T> fmt::Debug for SendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Full(_) => f.write_str("Full(..)"),
            SendError::Closed(_) => f.write_str("Closed(..)"),
        }
    }
}

impl<T> fmt::Display for SendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Full(_) => f.write_str("mailbox is full"),
            SendError::Closed(_) => f.write_str("mailbox is closed"),
        }
    }
}

impl<T> std::error::Error for SendError<T> {}

/// Counters of one mailbox; shared by the receiver and all senders.
#[derive(Debug, Default)]
pub struct MailboxCounters {
    /// Messages taken out by the shard.
    pub drained_msgs: AtomicU64,
    /// Pushes (single messages or bundles) taken out by the shard.
    pub drained_parcels: AtomicU64,
    /// Messages refused because the mailbox was full.
    pub rejected_full_msgs: AtomicU64,
    /// Messages refused because the mailbox was closed.
    pub rejected_closed_msgs: AtomicU64,
    /// Doorbells rung to wake the parked shard.
    pub bells_rung: AtomicU64,
}

const CLOSED: u64 = 1 << 63;

enum Parcel<M> {
    One(Envelope<M>),
    Bundle(Vec<Envelope<M>>),
}

struct Shared<M> {
    tx: crossbeam_channel::Sender<Parcel<M>>,
    /// `CLOSED` bit plus the number of messages reserved or queued.
    state: AtomicU64,
    capacity: u64,
    parked: AtomicBool,
    bell: UdpSocket,
    owner: ShardId,
    counters: MailboxCounters,
}

impl<M> Shared<M> {
    fn reserve(&self, n: u64) -> Result<(), SendError<()>> {
        let mut current = self.state.load(Ordering::Acquire);
        loop {
            if current & CLOSED != 0 {
                self.counters
                    .rejected_closed_msgs
                    .fetch_add(n, Ordering::Relaxed);
                return Err(SendError::Closed(()));
            }
            if current + n > self.capacity {
                self.counters
                    .rejected_full_msgs
                    .fetch_add(n, Ordering::Relaxed);
                return Err(SendError::Full(()));
            }
            match self.state.compare_exchange_weak(
                current,
                current + n,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(seen) => current = seen,
            }
        }
    }

    fn push(&self, n: u64, parcel: Parcel<M>) -> Result<(), SendError<Parcel<M>>> {
        if let Err(error) = self.tx.send(parcel) {
            // The receiver is gone (the shard exited): release the room we took.
            self.state.fetch_sub(n, Ordering::AcqRel);
            self.counters
                .rejected_closed_msgs
                .fetch_add(n, Ordering::Relaxed);
            return Err(SendError::Closed(error.0));
        }
        // Pairs with the fence in `Mailbox::prepare_park`: either the shard sees
        // our parcel in its re-check, or we see its `parked` flag.
        fence(Ordering::SeqCst);
        if self.parked.load(Ordering::Relaxed) && self.parked.swap(false, Ordering::AcqRel) {
            self.counters.bells_rung.fetch_add(1, Ordering::Relaxed);
            // WouldBlock means bells are already waiting to be read: the shard
            // will wake anyway.
            let _ = self.bell.send(&[1]);
        }
        Ok(())
    }
}

/// Two loopback UDP sockets connected to each other, so that the receiving
/// end hears only its sender.
fn bell_pair() -> io::Result<(UdpSocket, UdpSocket)> {
    let rx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    let tx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    tx.connect(rx.local_addr()?)?;
    rx.connect(tx.local_addr()?)?;
    // Senders must never block on a full bell. The receiving end stays
    // blocking: io_uring answers EAGAIN at once on an O_NONBLOCK socket
    // instead of waiting for a datagram.
    tx.set_nonblocking(true)?;
    Ok((tx, rx))
}

/// Creates a mailbox for `owner` holding at most `capacity` messages.
pub fn mailbox<M>(owner: ShardId, capacity: usize) -> io::Result<Mailbox<M>> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let (bell_tx, bell_rx) = bell_pair()?;
    let shared = Arc::new(Shared {
        tx,
        state: AtomicU64::new(0),
        capacity: capacity.max(1) as u64,
        parked: AtomicBool::new(false),
        bell: bell_tx,
        owner,
        counters: MailboxCounters::default(),
    });
    Ok(Mailbox {
        rx,
        shared,
        bell_rx: Some(bell_rx),
    })
}

/// A cloneable handle to send into a shard's mailbox, from any thread.
pub struct MailboxSender<M> {
    shared: Arc<Shared<M>>,
}

impl<M> Clone for MailboxSender<M> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<M> fmt::Debug for MailboxSender<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MailboxSender")
            .field("shard", &self.shared.owner)
            .field("depth", &self.depth())
            .finish()
    }
}

impl<M> MailboxSender<M> {
    /// Sends one message. Never blocks.
    pub fn try_send(&self, envelope: Envelope<M>) -> Result<(), SendError<Envelope<M>>> {
        if let Err(e) = self.shared.reserve(1) {
            return Err(e.map(|()| envelope));
        }
        self.shared.push(1, Parcel::One(envelope)).map_err(|e| {
            e.map(|p| match p {
                Parcel::One(e) => e,
                Parcel::Bundle(_) => unreachable!("pushed a single message"),
            })
        })
    }

    /// Sends a bundle as one unit: all of it or none of it. Never blocks.
    pub fn try_send_bundle(
        &self,
        bundle: Vec<Envelope<M>>,
    ) -> Result<(), SendError<Vec<Envelope<M>>>> {
        if bundle.is_empty() {
            return Ok(());
        }
        let n = bundle.len() as u64;
        if let Err(e) = self.shared.reserve(n) {
            return Err(e.map(|()| bundle));
        }
        self.shared.push(n, Parcel::Bundle(bundle)).map_err(|e| {
            e.map(|p| match p {
                Parcel::Bundle(b) => b,
                Parcel::One(e) => vec![e],
            })
        })
    }

    /// Sends one message, retrying while the mailbox is full until `timeout`.
    /// Meant for helper threads; shards use [`try_send`](Self::try_send).
    pub fn send_timeout(
        &self,
        mut envelope: Envelope<M>,
        timeout: Duration,
    ) -> Result<(), SendError<Envelope<M>>> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_micros(10);
        loop {
            match self.try_send(envelope) {
                Err(SendError::Full(e)) if Instant::now() < deadline => {
                    envelope = e;
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(5));
                }
                other => return other,
            }
        }
    }

    /// The shard this mailbox belongs to.
    pub fn shard(&self) -> ShardId {
        self.shared.owner
    }

    /// Messages queued or being pushed right now.
    pub fn depth(&self) -> u64 {
        self.shared.state.load(Ordering::Relaxed) & !CLOSED
    }

    /// The bound, in messages.
    pub fn capacity(&self) -> u64 {
        self.shared.capacity
    }

    /// True once the shard closed its mailbox.
    pub fn is_closed(&self) -> bool {
        self.shared.state.load(Ordering::Relaxed) & CLOSED != 0
    }

    /// The mailbox's counters.
    pub fn counters(&self) -> &MailboxCounters {
        &self.shared.counters
    }

    /// Wakes the shard if it is parked, without sending anything (used to make
    /// it notice a stop request).
    pub fn wake(&self) {
        self.shared.parked.store(false, Ordering::Release);
        self.shared
            .counters
            .bells_rung
            .fetch_add(1, Ordering::Relaxed);
        let _ = self.shared.bell.send(&[1]);
    }
}

/// The receiving side, owned by one shard.
pub struct Mailbox<M> {
    rx: crossbeam_channel::Receiver<Parcel<M>>,
    shared: Arc<Shared<M>>,
    bell_rx: Option<UdpSocket>,
}

impl<M> fmt::Debug for Mailbox<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mailbox")
            .field("shard", &self.shared.owner)
            .field("depth", &self.depth())
            .finish()
    }
}

impl<M> Mailbox<M> {
    /// A new sending handle.
    pub fn sender(&self) -> MailboxSender<M> {
        MailboxSender {
            shared: self.shared.clone(),
        }
    }

    /// Takes every message queued now (up to about `max`; a bundle is never
    /// split), calling `f` on each in arrival order. Returns how many.
    pub fn drain(&self, max: usize, mut f: impl FnMut(Envelope<M>)) -> usize {
        let mut taken = 0usize;
        let mut parcels = 0u64;
        while taken < max {
            match self.rx.try_recv() {
                Ok(Parcel::One(e)) => {
                    f(e);
                    taken += 1;
                }
                Ok(Parcel::Bundle(bundle)) => {
                    taken += bundle.len();
                    bundle.into_iter().for_each(&mut f);
                }
                Err(_) => break,
            }
            parcels += 1;
        }
        if taken > 0 {
            self.shared.state.fetch_sub(taken as u64, Ordering::AcqRel);
            let c = &self.shared.counters;
            c.drained_msgs.fetch_add(taken as u64, Ordering::Relaxed);
            c.drained_parcels.fetch_add(parcels, Ordering::Relaxed);
        }
        taken
    }

    /// Messages queued or being pushed right now.
    pub fn depth(&self) -> u64 {
        self.shared.state.load(Ordering::Relaxed) & !CLOSED
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// Refuses every later send with [`SendError::Closed`]. Messages already
    /// accepted stay and must still be drained.
    pub fn close(&self) {
        self.shared.state.fetch_or(CLOSED, Ordering::AcqRel);
    }

    /// True once [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.shared.state.load(Ordering::Relaxed) & CLOSED != 0
    }

    /// Announces that the shard is about to park. Returns false (and cancels
    /// the announcement) if messages are already waiting.
    pub fn prepare_park(&self) -> bool {
        self.shared.parked.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if !self.rx.is_empty() {
            self.shared.parked.store(false, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Ends a park (woken by the bell, a timer or local work).
    pub fn end_park(&self) {
        self.shared.parked.store(false, Ordering::Relaxed);
    }

    /// Hands out the receiving end of the doorbell once, to be read by the
    /// shard's reactor.
    pub fn take_bell(&mut self) -> Option<OwnedFd> {
        self.bell_rx.take().map(OwnedFd::from)
    }

    /// The mailbox's counters.
    pub fn counters(&self) -> &MailboxCounters {
        &self.shared.counters
    }

    /// The shard owning this mailbox.
    pub fn shard(&self) -> ShardId {
        self.shared.owner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(to: u32, n: u64) -> Envelope<u64> {
        Envelope::new(StageId(to), Origin::External(0), n)
    }

    #[test]
    fn full_mailbox_returns_the_message_and_counts_it() {
        let mb = mailbox::<u64>(ShardId(0), 3).unwrap();
        let tx = mb.sender();
        tx.try_send(env(0, 1)).unwrap();
        tx.try_send_bundle(vec![env(0, 2), env(0, 3)]).unwrap();
        match tx.try_send(env(0, 4)) {
            Err(SendError::Full(e)) => assert_eq!(e.msg, 4),
            other => panic!("expected Full, got {other:?}"),
        }
        // A bundle that does not fit is refused whole.
        let mut got = Vec::new();
        assert_eq!(mb.drain(usize::MAX, |e| got.push(e.msg)), 3);
        assert_eq!(got, vec![1, 2, 3]);
        match tx.try_send_bundle(vec![env(0, 5), env(0, 6), env(0, 7), env(0, 8)]) {
            Err(SendError::Full(b)) => assert_eq!(b.len(), 4),
            other => panic!("expected Full, got {other:?}"),
        }
        assert_eq!(mb.counters().rejected_full_msgs.load(Ordering::Relaxed), 5);
        assert_eq!(mb.depth(), 0);
    }

    #[test]
    fn closed_mailbox_rejects_but_keeps_what_it_accepted() {
        let mb = mailbox::<u64>(ShardId(1), 16).unwrap();
        let tx = mb.sender();
        tx.try_send(env(0, 1)).unwrap();
        mb.close();
        assert!(tx.is_closed());
        assert!(matches!(tx.try_send(env(0, 2)), Err(SendError::Closed(_))));
        let mut got = Vec::new();
        mb.drain(usize::MAX, |e| got.push(e.msg));
        assert_eq!(got, vec![1]);
        assert_eq!(
            mb.counters().rejected_closed_msgs.load(Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn dropped_receiver_is_closed_for_senders() {
        let mb = mailbox::<u64>(ShardId(0), 16).unwrap();
        let tx = mb.sender();
        drop(mb);
        assert!(matches!(tx.try_send(env(0, 1)), Err(SendError::Closed(_))));
        assert_eq!(tx.depth(), 0);
    }

    #[test]
    fn a_parked_receiver_gets_exactly_one_bell() {
        let mut mb = mailbox::<u64>(ShardId(0), 16).unwrap();
        let bell = UdpSocket::from(mb.take_bell().unwrap());
        bell.set_nonblocking(true).unwrap();
        let tx = mb.sender();
        assert!(mb.prepare_park());
        tx.try_send(env(0, 1)).unwrap();
        tx.try_send(env(0, 2)).unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(bell.recv(&mut buf).unwrap(), 1);
        assert!(bell.recv(&mut buf).is_err(), "second send must not ring");
        // With a message waiting, the shard refuses to park.
        assert!(!mb.prepare_park());
    }

    #[test]
    fn concurrent_senders_lose_nothing_and_keep_their_order() {
        let mb = mailbox::<(u32, u64)>(ShardId(0), 1 << 20).unwrap();
        let senders = 4u32;
        let per = 20_000u64;
        let handles: Vec<_> = (0..senders)
            .map(|s| {
                let tx = mb.sender();
                std::thread::spawn(move || {
                    let mut i = 0;
                    while i < per {
                        let n = (per - i).min(1 + (i % 7));
                        let bundle = (i..i + n)
                            .map(|k| Envelope::new(StageId(0), Origin::External(s), (s, k)))
                            .collect();
                        tx.try_send_bundle(bundle).unwrap();
                        i += n;
                    }
                })
            })
            .collect();
        let mut next = vec![0u64; senders as usize];
        let mut total = 0;
        while total < senders as u64 * per {
            total += mb.drain(1024, |e| {
                let (s, k) = e.msg;
                assert_eq!(next[s as usize], k, "order broken for sender {s}");
                next[s as usize] += 1;
            }) as u64;
        }
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(mb.depth(), 0);
    }
}
