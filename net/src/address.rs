//! Per source IP address accounting ([`crate::AddressLimit`]): a handshake
//! rate and a count of live sessions, whatever the port.
//!
//! The rate buckets live in a fixed table indexed by a keyed hash of the
//! address, so a flood from a million spoofed addresses costs no memory:
//! addresses that collide share a bucket, which only makes the limit
//! stricter for them. The key comes from the endpoint's seed, so an
//! attacker cannot aim its addresses at a victim's bucket without first
//! learning it. The session counts are exact (a map bounded by the live
//! sessions).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

use crate::rng::Rng;
use crate::AddressLimit;

/// Rate buckets: 4,096 x 16 B = 64 KiB whatever the traffic.
const BUCKETS: usize = 4096;

#[derive(Clone, Copy, Default, Debug)]
struct Bucket {
    /// Handshakes left, in thousandths (integer arithmetic, no drift).
    milli: u64,
    /// When the bucket was last refilled; None: never used (full).
    refilled: Option<Instant>,
}

/// The accounting behind an [`AddressLimit`].
#[derive(Debug)]
pub(crate) struct AddressTable {
    key: (u64, u64),
    buckets: Vec<Bucket>,
    sessions: HashMap<IpAddr, u32>,
}

impl AddressTable {
    pub(crate) fn new(rng: &mut Rng) -> Self {
        Self {
            key: (rng.next_u64() | 1, rng.next_u64()),
            buckets: vec![Bucket::default(); BUCKETS],
            sessions: HashMap::new(),
        }
    }

    fn slot(&self, ip: IpAddr) -> usize {
        let (a, b) = match ip {
            IpAddr::V4(v4) => (u64::from(u32::from(v4)), 4),
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                ((bits >> 64) as u64 ^ (bits as u64).rotate_left(29), 6)
            }
        };
        // A keyed multiply-xorshift mix: cheap, and without the key the
        // slot of an address cannot be predicted.
        let mut h = (a ^ self.key.1).wrapping_add(b).wrapping_mul(self.key.0);
        h ^= h >> 31;
        h = h.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^= h >> 29;
        (h as usize) % BUCKETS
    }

    /// Spends one handshake of `ip`'s budget; false when it is empty.
    pub(crate) fn spend_handshake(
        &mut self,
        limit: &AddressLimit,
        ip: IpAddr,
        now: Instant,
    ) -> bool {
        let capacity = u64::from(limit.handshakes_per_s)
            .saturating_mul(limit.burst.as_millis() as u64)
            .max(1000);
        let slot = self.slot(ip);
        let bucket = &mut self.buckets[slot];
        let milli = match bucket.refilled {
            None => capacity,
            Some(then) => {
                let elapsed_ms = now.saturating_duration_since(then).as_millis() as u64;
                bucket
                    .milli
                    .saturating_add(elapsed_ms.saturating_mul(u64::from(limit.handshakes_per_s)))
                    .min(capacity)
            }
        };
        bucket.refilled = Some(now);
        if milli < 1000 {
            bucket.milli = milli;
            return false;
        }
        bucket.milli = milli - 1000;
        true
    }

    /// Live sessions from `ip`.
    pub(crate) fn sessions(&self, ip: IpAddr) -> u32 {
        self.sessions.get(&ip).copied().unwrap_or(0)
    }

    pub(crate) fn session_opened(&mut self, ip: IpAddr) {
        *self.sessions.entry(ip).or_insert(0) += 1;
    }

    pub(crate) fn session_closed(&mut self, ip: IpAddr) {
        if let Some(n) = self.sessions.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.sessions.remove(&ip);
            }
        }
    }

    /// Addresses with live sessions (a footprint figure).
    pub(crate) fn addresses(&self) -> usize {
        self.sessions.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limit() -> AddressLimit {
        AddressLimit {
            handshakes_per_s: 10,
            burst: Duration::from_secs(2),
            sessions_max: 4,
        }
    }

    #[test]
    fn a_burst_is_spent_then_the_rate_refills() {
        let mut table = AddressTable::new(&mut Rng::from_seed(1));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        let admitted = (0..50)
            .filter(|_| table.spend_handshake(&limit(), ip, t0))
            .count();
        assert_eq!(admitted, 20, "two seconds of ten per second");
        let t1 = t0 + Duration::from_millis(500);
        let admitted = (0..50)
            .filter(|_| table.spend_handshake(&limit(), ip, t1))
            .count();
        assert_eq!(admitted, 5, "half a second refills five");
    }

    #[test]
    fn another_address_keeps_its_own_budget() {
        let mut table = AddressTable::new(&mut Rng::from_seed(2));
        let t0 = Instant::now();
        let flood: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..100 {
            table.spend_handshake(&limit(), flood, t0);
        }
        // The odd collision shares a bucket; most addresses do not.
        let fresh = (2..=50u8)
            .filter(|i| {
                let ip = IpAddr::from([10, 0, 1, *i]);
                table.spend_handshake(&limit(), ip, t0)
            })
            .count();
        assert!(fresh >= 45, "{fresh} of 49 fresh addresses admitted");
    }

    #[test]
    fn session_counts_follow_opens_and_closes() {
        let mut table = AddressTable::new(&mut Rng::from_seed(3));
        let ip: IpAddr = "::1".parse().unwrap();
        table.session_opened(ip);
        table.session_opened(ip);
        assert_eq!(table.sessions(ip), 2);
        table.session_closed(ip);
        table.session_closed(ip);
        assert_eq!(table.sessions(ip), 0);
        assert_eq!(
            table.addresses(),
            0,
            "an address with no session is forgotten"
        );
    }
}
