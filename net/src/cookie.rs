//! Stateless handshake cookies.
//!
//! A cookie is a keyed MAC over (period, client address, client id). The
//! server keeps only two secrets (this period's and the previous one's), never
//! anything per client, so a flood of spoofed `ConnectRequest`s costs it one
//! MAC each and no memory. The secret rotates every `cookie_rotation`, so a
//! cookie is valid for one to two periods.
//!
//! The MAC is SipHash-2-4 with a 128-bit tag: a PRF built for short inputs,
//! with a 128-bit key, tens of nanoseconds per cookie (the server computes one
//! per handshake packet, so cost matters under a flood), and a tiny,
//! well-kept dependency. HMAC-SHA256 would be as safe here but several times
//! slower per cookie and pulls in more code; nothing in this use needs a
//! collision-resistant hash.

use std::hash::Hasher;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use siphasher::sip128::{Hasher128, SipHasher24};

use crate::rng::Rng;
use crate::wire::COOKIE_LEN;

/// Why a cookie was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CookieError {
    /// Minted more than one full period ago (or in the future).
    Expired,
    /// Not minted by us for this address and client id.
    Invalid,
}

#[derive(Debug, Clone, Copy)]
struct Secret {
    period: u32,
    key: (u64, u64),
}

/// The two live secrets and the clock that rotates them.
#[derive(Debug, Clone)]
pub(crate) struct CookieJar {
    epoch: Option<Instant>,
    rotation: Duration,
    current: Secret,
    previous: Option<Secret>,
}

fn random_key(rng: &mut Rng) -> (u64, u64) {
    (rng.next_u64(), rng.next_u64())
}

fn mac(key: (u64, u64), period: u32, addr: SocketAddr, client_id: u32) -> [u8; COOKIE_LEN] {
    let mut h = SipHasher24::new_with_keys(key.0, key.1);
    h.write(&period.to_le_bytes());
    h.write(&client_id.to_le_bytes());
    match addr {
        SocketAddr::V4(a) => {
            h.write(&[4]);
            h.write(&a.ip().octets());
        }
        SocketAddr::V6(a) => {
            h.write(&[6]);
            h.write(&a.ip().octets());
        }
    }
    h.write(&addr.port().to_le_bytes());
    h.finish128().as_bytes()
}

/// Compares without an early exit, so timing does not reveal a prefix match.
fn equal(a: &[u8; COOKIE_LEN], b: &[u8; COOKIE_LEN]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl CookieJar {
    pub fn new(rotation: Duration, rng: &mut Rng) -> Self {
        Self {
            epoch: None,
            rotation,
            current: Secret {
                period: 0,
                key: random_key(rng),
            },
            previous: None,
        }
    }

    fn period(&mut self, now: Instant) -> u32 {
        let epoch = *self.epoch.get_or_insert(now);
        let elapsed = now.saturating_duration_since(epoch).as_nanos();
        (elapsed / self.rotation.as_nanos().max(1)).min(u32::MAX as u128) as u32
    }

    fn rotate(&mut self, now: Instant, rng: &mut Rng) {
        let period = self.period(now);
        if period > self.current.period {
            // Skipping periods: the old secret is too old to keep.
            self.previous = (period == self.current.period + 1).then_some(self.current);
            self.current = Secret {
                period,
                key: random_key(rng),
            };
        }
    }

    /// A cookie for `addr` and `client_id`, and the period it belongs to.
    pub fn mint(
        &mut self,
        now: Instant,
        rng: &mut Rng,
        addr: SocketAddr,
        client_id: u32,
    ) -> (u32, [u8; COOKIE_LEN]) {
        self.rotate(now, rng);
        let s = self.current;
        (s.period, mac(s.key, s.period, addr, client_id))
    }

    /// Checks a cookie echoed by `addr`.
    pub fn verify(
        &mut self,
        now: Instant,
        rng: &mut Rng,
        addr: SocketAddr,
        client_id: u32,
        period: u32,
        cookie: &[u8; COOKIE_LEN],
    ) -> Result<(), CookieError> {
        self.rotate(now, rng);
        let secret = if period == self.current.period {
            self.current
        } else {
            match self.previous {
                Some(previous) if previous.period == period => previous,
                _ => return Err(CookieError::Expired),
            }
        };
        if equal(&mac(secret.key, period, addr, client_id), cookie) {
            Ok(())
        } else {
            Err(CookieError::Invalid)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_bind_address_id_and_time() {
        let mut rng = Rng::from_seed(1);
        let rotation = Duration::from_secs(5);
        let mut jar = CookieJar::new(rotation, &mut rng);
        let t0 = Instant::now();
        let a: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let b: SocketAddr = "10.0.0.1:5001".parse().unwrap();
        let (period, cookie) = jar.mint(t0, &mut rng, a, 7);
        assert_eq!(jar.verify(t0, &mut rng, a, 7, period, &cookie), Ok(()));
        assert_eq!(
            jar.verify(t0, &mut rng, b, 7, period, &cookie),
            Err(CookieError::Invalid)
        );
        assert_eq!(
            jar.verify(t0, &mut rng, a, 8, period, &cookie),
            Err(CookieError::Invalid)
        );
        let mut forged = cookie;
        forged[0] ^= 1;
        assert_eq!(
            jar.verify(t0, &mut rng, a, 7, period, &forged),
            Err(CookieError::Invalid)
        );
        // Still valid in the next period, expired in the one after.
        let t1 = t0 + rotation + Duration::from_millis(1);
        assert_eq!(jar.verify(t1, &mut rng, a, 7, period, &cookie), Ok(()));
        let t2 = t0 + rotation * 2 + Duration::from_millis(1);
        assert_eq!(
            jar.verify(t2, &mut rng, a, 7, period, &cookie),
            Err(CookieError::Expired)
        );
    }
}
