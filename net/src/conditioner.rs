//! A seeded link conditioner: loss (random or bursty Gilbert-Elliott),
//! duplication, reordering, delay with jitter and an MTU limit.
//!
//! Pure like the protocol core (time is an argument, randomness a seed), so
//! the same seed and inputs give the same deliveries. The `Pair` harness puts
//! one on each direction; the socket driver can put one on its send path for
//! manual testing.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::rng::Rng;

/// How datagrams are lost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Loss {
    /// Nothing is lost.
    None,
    /// Each datagram is lost with this probability, independently.
    Random(f64),
    /// Two-state Markov chain (Gilbert-Elliott): bursts of loss.
    GilbertElliott {
        /// Per datagram, probability of moving from the good to the bad state.
        good_to_bad: f64,
        /// Per datagram, probability of moving from the bad to the good state.
        bad_to_good: f64,
        /// Loss probability in the good state.
        loss_good: f64,
        /// Loss probability in the bad state.
        loss_bad: f64,
    },
}

/// Link properties.
#[derive(Debug, Clone, PartialEq)]
pub struct ConditionerConfig {
    /// Loss model.
    pub loss: Loss,
    /// Probability that a datagram is delivered twice.
    pub duplicate: f64,
    /// Probability that a datagram is held back so later ones overtake it.
    pub reorder: f64,
    /// Most extra delay of a reordered datagram.
    pub reorder_delay: Duration,
    /// One-way delay.
    pub latency: Duration,
    /// Extra one-way delay, uniform in `[0, jitter]`. Datagrams that are not
    /// picked for reordering still arrive in send order (a FIFO link).
    pub jitter: Duration,
    /// Datagrams longer than this are dropped.
    pub mtu: Option<usize>,
    /// Datagrams in flight at most; beyond, new ones are dropped.
    pub queue_max: usize,
}

impl Default for ConditionerConfig {
    /// A perfect link with no delay.
    fn default() -> Self {
        Self {
            loss: Loss::None,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_delay: Duration::ZERO,
            latency: Duration::ZERO,
            jitter: Duration::ZERO,
            mtu: None,
            queue_max: 1 << 20,
        }
    }
}

impl ConditionerConfig {
    /// A clean link with a fixed one-way `latency`.
    pub fn latency(latency: Duration) -> Self {
        Self {
            latency,
            ..Self::default()
        }
    }

    /// The harsh link: 20% loss, 5% duplication, 10% reordering,
    /// 20-50 ms one-way delay.
    pub fn harsh() -> Self {
        Self {
            loss: Loss::Random(0.2),
            duplicate: 0.05,
            reorder: 0.1,
            reorder_delay: Duration::from_millis(40),
            latency: Duration::from_millis(20),
            jitter: Duration::from_millis(30),
            mtu: None,
            queue_max: 1 << 20,
        }
    }
}

/// A datagram in or out of the conditioner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    /// Sender.
    pub from: SocketAddr,
    /// Receiver.
    pub to: SocketAddr,
    /// Payload.
    pub bytes: Vec<u8>,
}

/// What the conditioner did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConditionerStats {
    /// Datagrams offered.
    pub offered: u64,
    /// Dropped by the loss model.
    pub lost: u64,
    /// Dropped for exceeding the MTU.
    pub over_mtu: u64,
    /// Dropped because the queue was full.
    pub queue_full: u64,
    /// Dropped by the filter.
    pub filtered: u64,
    /// Extra copies made.
    pub duplicated: u64,
    /// Held back to be overtaken.
    pub reordered: u64,
    /// Handed out by `poll`.
    pub delivered: u64,
}

struct Pending {
    at: Instant,
    order: u64,
    datagram: Datagram,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.order) == (other.at, other.order)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.order).cmp(&(other.at, other.order))
    }
}

/// Decides, per datagram `index` (0-based, in offer order), whether to drop it.
pub type Filter = Box<dyn FnMut(u64, &[u8]) -> bool + Send>;

/// One direction of a simulated link.
pub struct LinkConditioner {
    config: ConditionerConfig,
    rng: Rng,
    bad: bool,
    queue: BinaryHeap<Reverse<Pending>>,
    last_in_order: Option<Instant>,
    order: u64,
    filter: Option<Filter>,
    stats: ConditionerStats,
}

impl fmt::Debug for LinkConditioner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkConditioner")
            .field("config", &self.config)
            .field("queued", &self.queue.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl LinkConditioner {
    /// A conditioner whose random choices all come from `seed`.
    pub fn new(config: ConditionerConfig, seed: u64) -> Self {
        Self {
            config,
            rng: Rng::from_seed(seed),
            bad: false,
            queue: BinaryHeap::new(),
            last_in_order: None,
            order: 0,
            filter: None,
            stats: ConditionerStats::default(),
        }
    }

    /// The link properties.
    pub fn config(&self) -> &ConditionerConfig {
        &self.config
    }

    /// Changes the link properties (e.g. loss off after a lossy phase).
    pub fn set_config(&mut self, config: ConditionerConfig) {
        self.config = config;
    }

    /// Drops every datagram for which `filter(index, bytes)` is true, before
    /// the loss model runs (deterministic loss in tests).
    pub fn set_filter(&mut self, filter: Option<Filter>) {
        self.filter = filter;
    }

    /// Counters.
    pub fn stats(&self) -> ConditionerStats {
        self.stats
    }

    /// Datagrams in flight.
    pub fn in_flight(&self) -> usize {
        self.queue.len()
    }

    fn lost(&mut self) -> bool {
        match self.config.loss {
            Loss::None => false,
            Loss::Random(p) => self.rng.chance(p),
            Loss::GilbertElliott {
                good_to_bad,
                bad_to_good,
                loss_good,
                loss_bad,
            } => {
                let flip = if self.bad { bad_to_good } else { good_to_bad };
                if self.rng.chance(flip) {
                    self.bad = !self.bad;
                }
                self.rng.chance(if self.bad { loss_bad } else { loss_good })
            }
        }
    }

    fn delay(&mut self) -> Duration {
        let jitter = self.config.jitter.as_nanos() as u64;
        self.config.latency + Duration::from_nanos(self.rng.below(jitter + 1))
    }

    fn enqueue(&mut self, now: Instant, datagram: Datagram) {
        if self.queue.len() >= self.config.queue_max {
            self.stats.queue_full += 1;
            return;
        }
        let mut at = now + self.delay();
        if self.rng.chance(self.config.reorder) {
            self.stats.reordered += 1;
            let extra = self.config.reorder_delay.as_nanos() as u64;
            at += Duration::from_nanos(1 + self.rng.below(extra.max(1)));
        } else {
            if let Some(last) = self.last_in_order {
                at = at.max(last);
            }
            self.last_in_order = Some(at);
        }
        self.order += 1;
        self.queue.push(Reverse(Pending {
            at,
            order: self.order,
            datagram,
        }));
    }

    /// Offers a datagram sent at `now`.
    pub fn send(&mut self, now: Instant, from: SocketAddr, to: SocketAddr, bytes: &[u8]) {
        let index = self.stats.offered;
        self.stats.offered += 1;
        if let Some(filter) = &mut self.filter {
            if filter(index, bytes) {
                self.stats.filtered += 1;
                return;
            }
        }
        if self.config.mtu.is_some_and(|mtu| bytes.len() > mtu) {
            self.stats.over_mtu += 1;
            return;
        }
        if self.lost() {
            self.stats.lost += 1;
            return;
        }
        let copies = if self.rng.chance(self.config.duplicate) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let datagram = Datagram {
                from,
                to,
                bytes: bytes.to_vec(),
            };
            self.enqueue(now, datagram);
        }
    }

    /// The next datagram due at or before `now`.
    pub fn poll(&mut self, now: Instant) -> Option<Datagram> {
        if self.queue.peek()?.0.at > now {
            return None;
        }
        self.stats.delivered += 1;
        self.queue.pop().map(|p| p.0.datagram)
    }

    /// When the next datagram is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.queue.peek().map(|p| p.0.at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn run(config: ConditionerConfig, seed: u64, n: u32) -> (Vec<u32>, ConditionerStats) {
        let mut link = LinkConditioner::new(config, seed);
        let start = Instant::now();
        for i in 0..n {
            let now = start + Duration::from_millis(i as u64);
            link.send(now, addr(1), addr(2), &i.to_le_bytes());
        }
        let mut out = Vec::new();
        while let Some(d) = link.poll(start + Duration::from_secs(3600)) {
            out.push(u32::from_le_bytes(d.bytes[..4].try_into().unwrap()));
        }
        (out, link.stats())
    }

    #[test]
    fn clean_link_is_fifo() {
        let (out, stats) = run(ConditionerConfig::latency(Duration::from_millis(5)), 1, 100);
        assert_eq!(out, (0..100).collect::<Vec<_>>());
        assert_eq!(stats.delivered, 100);
    }

    #[test]
    fn jitter_alone_keeps_order() {
        let config = ConditionerConfig {
            jitter: Duration::from_millis(50),
            ..ConditionerConfig::default()
        };
        let (out, _) = run(config, 2, 500);
        assert_eq!(out, (0..500).collect::<Vec<_>>());
    }

    #[test]
    fn harsh_link_loses_duplicates_and_reorders() {
        let (out, stats) = run(ConditionerConfig::harsh(), 3, 10_000);
        let loss = stats.lost as f64 / 10_000.0;
        assert!((0.17..0.23).contains(&loss), "loss {loss}");
        assert!(stats.duplicated > 300 && stats.reordered > 500);
        assert!(out.windows(2).any(|w| w[0] > w[1]));
        let mut sorted = out.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert!(sorted.len() < out.len());
        // Same seed, same result.
        assert_eq!(run(ConditionerConfig::harsh(), 3, 10_000).0, out);
    }

    #[test]
    fn gilbert_elliott_loses_in_bursts() {
        let config = ConditionerConfig {
            loss: Loss::GilbertElliott {
                good_to_bad: 0.02,
                bad_to_good: 0.25,
                loss_good: 0.0,
                loss_bad: 0.9,
            },
            ..ConditionerConfig::default()
        };
        let (out, stats) = run(config, 4, 20_000);
        assert!(stats.lost > 500);
        // Count runs of consecutive losses longer than 1.
        let mut bursts = 0;
        for w in out.windows(2) {
            if w[1] - w[0] > 2 {
                bursts += 1;
            }
        }
        assert!(bursts > 50, "bursts {bursts}");
    }

    #[test]
    fn mtu_and_filter_drop() {
        let mut link = LinkConditioner::new(
            ConditionerConfig {
                mtu: Some(3),
                ..ConditionerConfig::default()
            },
            5,
        );
        link.set_filter(Some(Box::new(|index, _| index == 1)));
        let now = Instant::now();
        link.send(now, addr(1), addr(2), &[1, 2, 3]);
        link.send(now, addr(1), addr(2), &[1, 2]);
        link.send(now, addr(1), addr(2), &[1, 2, 3, 4]);
        assert_eq!(link.poll(now).map(|d| d.bytes), Some(vec![1, 2, 3]));
        assert_eq!(link.poll(now), None);
        let stats = link.stats();
        assert_eq!((stats.filtered, stats.over_mtu), (1, 1));
    }
}
