//! A shard's lease on its cells, as the shard keeps it (DESIGN.md
//! section 8): every heartbeat is numbered and its send time remembered;
//! the coordinator's ack of heartbeat `n` extends the lease to `sent(n) +
//! lease`. Counting from the *send* time, never from the ack's arrival,
//! makes the shard's lease end no later than the coordinator's view of it
//! (which counts from the heartbeat's arrival), so a cut-off shard stops
//! writing before the coordinator gives its cells away. Sans-IO: time is an
//! argument.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Heartbeats remembered while their ack is awaited (older ones are
/// forgotten: an ack that late would not extend the lease anyway).
const PENDING_MAX: usize = 64;

/// One shard's lease.
#[derive(Debug, Default)]
pub struct LeaseKeeper {
    next_seq: u64,
    pending: VecDeque<(u64, Instant)>,
    until: Option<Instant>,
    acks: u64,
}

impl LeaseKeeper {
    /// No lease yet: the shard writes nothing until its first ack.
    pub fn new() -> Self {
        Self::default()
    }

    /// A heartbeat goes out at `now`: its number.
    pub fn sent(&mut self, now: Instant) -> u64 {
        self.next_seq += 1;
        if self.pending.len() == PENDING_MAX {
            self.pending.pop_front();
        }
        self.pending.push_back((self.next_seq, now));
        self.next_seq
    }

    /// The coordinator acknowledged heartbeat `seq`, granting `lease`.
    /// Unknown (forgotten, repeated or forged) numbers change nothing.
    pub fn acked(&mut self, seq: u64, lease: Duration) {
        let Some(pos) = self.pending.iter().position(|(s, _)| *s == seq) else {
            return;
        };
        let (_, sent) = self.pending[pos];
        self.pending.drain(..=pos);
        let until = sent + lease;
        self.until = Some(self.until.map_or(until, |u| u.max(until)));
        self.acks += 1;
    }

    /// True while the lease runs.
    pub fn valid(&self, now: Instant) -> bool {
        self.until.is_some_and(|u| now < u)
    }

    /// When the lease ends (None: never granted).
    pub fn until(&self) -> Option<Instant> {
        self.until
    }

    /// Acks taken.
    pub fn acks(&self) -> u64 {
        self.acks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_counts_from_the_acknowledged_heartbeat_s_send_time() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut l = LeaseKeeper::new();
        assert!(!l.valid(t0), "no lease before the first ack");
        let a = l.sent(t0);
        let b = l.sent(t0 + ms(100));
        // The ack of the first arrives late: the lease still counts from
        // its send time.
        l.acked(a, ms(1000));
        assert!(l.valid(t0 + ms(999)));
        assert!(!l.valid(t0 + ms(1000)));
        l.acked(b, ms(1000));
        assert!(l.valid(t0 + ms(1099)));
        assert!(!l.valid(t0 + ms(1100)));
        // A repeated or unknown ack changes nothing; an older one cannot
        // shorten it.
        l.acked(a, ms(5000));
        l.acked(99, ms(5000));
        assert_eq!(l.until(), Some(t0 + ms(1100)));
        assert_eq!(l.acks(), 2);
    }

    #[test]
    fn heartbeats_never_acknowledged_are_forgotten_beyond_a_bound() {
        let t0 = Instant::now();
        let mut l = LeaseKeeper::new();
        let first = l.sent(t0);
        for i in 0..PENDING_MAX as u64 {
            l.sent(t0 + Duration::from_millis(i));
        }
        l.acked(first, Duration::from_secs(1));
        assert!(!l.valid(t0), "the first heartbeat was forgotten");
    }
}
