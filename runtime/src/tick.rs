//! Fixed-rate ticks on absolute deadlines.
//!
//! Deadline `k` is `origin + k * period`, computed from the origin each time,
//! so rounding never accumulates into drift. A shard that falls more than a
//! whole period behind runs the most recent missed deadline once and counts
//! the older ones as skipped, instead of bursting through them.
//!
//! Pure: time is an argument, so tests drive it with a simulated clock.

use std::time::{Duration, Instant};

/// One tick as the shard runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tick {
    /// The tick's number: the index of its deadline since the shard started.
    /// Skipped ticks leave gaps.
    pub id: u64,
    /// When it was due.
    pub deadline: Instant,
    /// Ticks skipped just before this one.
    pub skipped: u64,
    /// The tick period.
    pub period: Duration,
}

/// A tick that is due now, and how late it starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TickStart {
    /// The tick to run.
    pub tick: Tick,
    /// `now - deadline` when it was polled.
    pub lateness: Duration,
}

/// The deadline schedule of one shard.
#[derive(Clone, Debug)]
pub struct TickClock {
    origin: Instant,
    period: Duration,
    // The period as an exact fraction of nanoseconds (1e9 / hz for rates),
    // so that 60 Hz does not lose 2/3 ns per tick.
    period_num: u128,
    period_den: u128,
    next_index: u64,
    ticks: u64,
    skipped: u64,
    overruns: u64,
}

impl TickClock {
    /// A clock whose first tick is due at `origin`.
    pub fn new(origin: Instant, period: Duration) -> Self {
        assert!(!period.is_zero(), "tick period must be positive");
        Self {
            origin,
            period,
            period_num: period.as_nanos(),
            period_den: 1,
            next_index: 0,
            ticks: 0,
            skipped: 0,
            overruns: 0,
        }
    }

    /// A clock ticking `hz` times per second.
    pub fn with_rate(origin: Instant, hz: u32) -> Self {
        let hz = u64::from(hz.max(1));
        let mut clock = Self::new(origin, Duration::from_nanos(1_000_000_000 / hz));
        clock.period_num = 1_000_000_000;
        clock.period_den = u128::from(hz);
        clock
    }

    /// The period between deadlines.
    pub fn period(&self) -> Duration {
        self.period
    }

    fn deadline_of(&self, index: u64) -> Instant {
        // Multiply in nanoseconds from the origin: no accumulated error.
        let nanos = self.period_num * u128::from(index) / self.period_den;
        self.origin + Duration::from_nanos(nanos.min(u128::from(u64::MAX)) as u64)
    }

    /// When the next tick is due.
    pub fn next_deadline(&self) -> Instant {
        self.deadline_of(self.next_index)
    }

    /// Returns the tick to run if one is due at `now`.
    pub fn poll(&mut self, now: Instant) -> Option<TickStart> {
        let due = self.deadline_of(self.next_index);
        if now < due {
            return None;
        }
        let elapsed = now.duration_since(self.origin).as_nanos();
        let latest = (elapsed * self.period_den / self.period_num) as u64;
        let latest = latest.max(self.next_index);
        let skipped = latest - self.next_index;
        self.next_index = latest + 1;
        self.ticks += 1;
        self.skipped += skipped;
        let deadline = self.deadline_of(latest);
        Some(TickStart {
            tick: Tick {
                id: latest,
                deadline,
                skipped,
                period: self.period,
            },
            lateness: now.saturating_duration_since(deadline),
        })
    }

    /// Records the end of a tick; returns true if it overran (ended after
    /// the next deadline).
    pub fn finish(&mut self, end: Instant) -> bool {
        let overran = end > self.next_deadline();
        if overran {
            self.overruns += 1;
        }
        overran
    }

    /// Ticks run so far.
    pub fn ticks(&self) -> u64 {
        self.ticks
    }

    /// Ticks skipped so far.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Ticks that ended after the next deadline.
    pub fn overruns(&self) -> u64 {
        self.overruns
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: Duration = Duration::from_millis(50);

    #[test]
    fn on_time_ticks_follow_the_deadlines_exactly() {
        let t0 = Instant::now();
        let mut clock = TickClock::new(t0, P);
        for k in 0..1000u64 {
            let deadline = t0 + P * k as u32;
            assert_eq!(clock.next_deadline(), deadline);
            assert!(clock.poll(deadline - Duration::from_nanos(1)).is_none());
            let start = clock.poll(deadline + Duration::from_micros(3)).unwrap();
            assert_eq!(start.tick.id, k);
            assert_eq!(start.tick.skipped, 0);
            assert_eq!(start.lateness, Duration::from_micros(3));
            assert!(!clock.finish(deadline + Duration::from_millis(10)));
        }
        assert_eq!(clock.ticks(), 1000);
        assert_eq!(clock.overruns(), 0);
    }

    #[test]
    fn no_drift_with_a_period_that_does_not_divide_a_second() {
        let t0 = Instant::now();
        let mut clock = TickClock::with_rate(t0, 60);
        let mut last = t0;
        for _ in 0..60 * 3600 {
            let d = clock.next_deadline();
            last = d;
            clock.poll(d).unwrap();
        }
        // After an hour of 60 Hz ticks the schedule is off by at most the
        // rounding of one period, never by the sum of them.
        // The last of 216,000 deadlines is exactly one period before the hour.
        let expected = t0 + Duration::from_secs(3600) - Duration::from_nanos(16_666_667);
        let error = if last > expected {
            last - expected
        } else {
            expected - last
        };
        assert!(error <= Duration::from_nanos(1), "drift {error:?}");
    }

    #[test]
    fn a_small_overrun_runs_the_next_tick_late_without_skipping() {
        let t0 = Instant::now();
        let mut clock = TickClock::new(t0, P);
        clock.poll(t0).unwrap();
        let end = t0 + P + Duration::from_millis(15);
        assert!(clock.finish(end));
        let start = clock.poll(end).unwrap();
        assert_eq!(start.tick.id, 1);
        assert_eq!(start.tick.skipped, 0);
        assert_eq!(start.lateness, Duration::from_millis(15));
        assert_eq!(clock.overruns(), 1);
    }

    #[test]
    fn a_long_stall_skips_ticks_instead_of_bursting() {
        let t0 = Instant::now();
        let mut clock = TickClock::new(t0, P);
        clock.poll(t0).unwrap();
        // The tick takes 3.4 periods.
        let end = t0 + P * 3 + Duration::from_millis(20);
        assert!(clock.finish(end));
        let start = clock.poll(end).unwrap();
        assert_eq!(start.tick.id, 3);
        assert_eq!(start.tick.skipped, 2);
        assert_eq!(start.lateness, Duration::from_millis(20));
        // Nothing else is due until deadline 4: no burst.
        assert!(clock.poll(end + Duration::from_millis(1)).is_none());
        assert_eq!(clock.next_deadline(), t0 + P * 4);
        assert_eq!(clock.skipped(), 2);
    }

    proptest! {
        #[test]
        fn ticks_are_increasing_and_account_for_every_deadline(
            work in proptest::collection::vec(0u64..200_000, 1..400),
            hz in 10u32..=60,
        ) {
            let t0 = Instant::now();
            let mut clock = TickClock::with_rate(t0, hz);
            let mut now = t0;
            let mut last_id = None;
            for w in work {
                // Park until the next deadline, then run a tick of `w` microseconds.
                now = now.max(clock.next_deadline());
                let start = clock.poll(now).unwrap();
                if let Some(prev) = last_id {
                    prop_assert_eq!(start.tick.id, prev + 1 + start.tick.skipped);
                }
                // Less than one exact period (the reported period is rounded down).
                prop_assert!(start.lateness <= clock.period() + Duration::from_nanos(1));
                last_id = Some(start.tick.id);
                now += Duration::from_micros(w);
                clock.finish(now);
            }
            // Every deadline up to the last tick was either run or skipped.
            prop_assert_eq!(clock.ticks() + clock.skipped(), last_id.unwrap() + 1);
        }
    }
}
