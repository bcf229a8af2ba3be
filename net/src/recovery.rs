//! RTT estimation, retransmission timeout and congestion control with pacing.

use std::time::{Duration, Instant};

use crate::config::CongestionConfig;

/// Smoothed RTT and its variation (RFC 6298), plus the minimum seen.
#[derive(Debug, Clone)]
pub(crate) struct RttEstimator {
    smoothed: Duration,
    variation: Duration,
    latest: Duration,
    min: Option<Duration>,
    min_refreshed_at: Option<Instant>,
    has_sample: bool,
}

/// How long a minimum RTT sample stays authoritative: routes change, and a
/// stale minimum would make every later RTT look like queueing.
const MIN_RTT_LIFETIME: Duration = Duration::from_secs(30);

impl RttEstimator {
    pub fn new(initial: Duration) -> Self {
        Self {
            smoothed: initial,
            variation: initial / 2,
            latest: initial,
            min: None,
            min_refreshed_at: None,
            has_sample: false,
        }
    }

    pub fn update(&mut self, sample: Duration, now: Instant) {
        self.latest = sample;
        if self.has_sample {
            let error = self.smoothed.abs_diff(sample);
            self.variation = (self.variation * 3 + error) / 4;
            self.smoothed = (self.smoothed * 7 + sample) / 8;
        } else {
            self.smoothed = sample;
            self.variation = sample / 2;
            self.has_sample = true;
        }
        let expired = self
            .min_refreshed_at
            .is_none_or(|at| now.saturating_duration_since(at) >= MIN_RTT_LIFETIME);
        if expired || self.min.is_none_or(|min| sample < min) {
            self.min = Some(sample);
            self.min_refreshed_at = Some(now);
        }
    }

    /// `srtt + 4 * rttvar + ack_delay`, at least `floor`. The peer may hold
    /// an ack for up to `ack_delay`, and on a steady path `rttvar` decays to
    /// zero: without the two terms every delayed ack would be a spurious
    /// timeout (QUIC's PTO adds `max_ack_delay` for the same reason).
    pub fn rto(&self, floor: Duration, ack_delay: Duration) -> Duration {
        let variation = (self.variation * 4).max(Duration::from_millis(1));
        (self.smoothed + variation + ack_delay).max(floor)
    }

    pub fn smoothed(&self) -> Duration {
        self.smoothed
    }

    pub fn variation(&self) -> Duration {
        self.variation
    }

    pub fn latest(&self) -> Duration {
        self.latest
    }

    pub fn min(&self) -> Option<Duration> {
        self.min
    }
}

/// Weight of one packet's outcome (acknowledged or lost) in the loss-rate
/// average: about the last 256 packets count, enough that 10% random loss
/// does not wander past a 20% tolerance by chance, while a queue dropping
/// half of a flow's packets crosses it within a hundred packets.
const LOSS_RATE_GAIN: f64 = 1.0 / 256.0;

/// AIMD send window (slow start, loss and delay back-off once per round
/// trip) with a token-bucket pacer.
#[derive(Debug, Clone)]
pub(crate) struct Congestion {
    window: usize,
    ssthresh: usize,
    min_window: usize,
    max_window: usize,
    /// Packets with a lower sequence were sent before the last reduction and
    /// cannot trigger another one (one reduction per round trip).
    recovery_until: u64,
    tokens: f64,
    burst: f64,
    refilled_at: Option<Instant>,
    mtu: usize,
    config: CongestionConfig,
    /// Average of packet outcomes, 1 for lost, 0 for acknowledged.
    loss_rate: f64,
    /// Losses not taken as congestion (`loss_tolerance`).
    pub losses_tolerated: u64,
    pub backoffs_loss: u64,
    pub backoffs_delay: u64,
    pub backoffs_timeout: u64,
}

impl Congestion {
    pub fn new(config: &CongestionConfig, mtu: usize) -> Self {
        let min_window = config.min_window_packets * mtu;
        let max_window = config.max_window_bytes.max(min_window);
        let window = (config.initial_window_packets * mtu).clamp(min_window, max_window);
        let burst = config.pacing_burst_bytes.max(2 * mtu) as f64;
        Self {
            window,
            ssthresh: max_window,
            min_window,
            max_window,
            recovery_until: 0,
            tokens: burst,
            burst,
            refilled_at: None,
            mtu,
            config: CongestionConfig {
                loss_tolerance: config.loss_tolerance.clamp(0.0, 0.5),
                ..config.clone()
            },
            loss_rate: 0.0,
            losses_tolerated: 0,
            backoffs_loss: 0,
            backoffs_delay: 0,
            backoffs_timeout: 0,
        }
    }

    pub fn window(&self) -> usize {
        self.window
    }

    /// May another data packet go out with `in_flight` bytes unacknowledged?
    pub fn window_open(&self, in_flight: usize) -> bool {
        in_flight < self.window
    }

    pub fn on_ack(&mut self, bytes: usize) {
        self.loss_rate -= self.loss_rate * LOSS_RATE_GAIN;
        if self.window < self.ssthresh {
            self.window += bytes;
        } else {
            // About one MTU per window's worth of acks.
            self.window += (self.mtu * bytes / self.window.max(1)).max(1);
        }
        self.window = self.window.min(self.max_window);
    }

    fn reduce(&mut self, beta: f64, next_seq: u64) {
        self.window = ((self.window as f64 * beta) as usize).max(self.min_window);
        self.ssthresh = self.window;
        self.recovery_until = next_seq;
    }

    /// A packet `seq` was declared lost. Below `loss_tolerance` (recent
    /// loss rate) it is taken for a lossy link, not congestion.
    pub fn on_loss(&mut self, seq: u64, next_seq: u64) {
        self.loss_rate += (1.0 - self.loss_rate) * LOSS_RATE_GAIN;
        if self.loss_rate < self.config.loss_tolerance {
            self.losses_tolerated += 1;
            return;
        }
        if seq >= self.recovery_until {
            self.backoffs_loss += 1;
            self.reduce(self.config.loss_beta, next_seq);
        }
    }

    /// A new RTT sample from packet `seq`: back off when queueing delay grows.
    pub fn on_rtt(&mut self, rtt: &RttEstimator, seq: u64, next_seq: u64) {
        let Some(min) = rtt.min() else { return };
        let limit = min.mul_f64(self.config.rtt_growth_ratio) + self.config.rtt_growth_slack;
        if seq >= self.recovery_until && rtt.smoothed() > limit && rtt.latest() > limit {
            self.backoffs_delay += 1;
            self.reduce(self.config.delay_beta, next_seq);
        }
    }

    /// The retransmission timer fired: the path may be gone.
    pub fn on_timeout(&mut self, next_seq: u64) {
        self.backoffs_timeout += 1;
        self.reduce(0.5, next_seq);
    }

    fn rate_bytes_per_s(&self, srtt: Duration) -> f64 {
        let gain = if self.window < self.ssthresh {
            2.0
        } else {
            1.25
        };
        gain * self.window as f64 / srtt.as_secs_f64().max(1e-4)
    }

    /// Adds the tokens earned since the last refill.
    pub fn refill(&mut self, now: Instant, srtt: Duration) {
        if let Some(at) = self.refilled_at {
            let elapsed = now.saturating_duration_since(at).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.rate_bytes_per_s(srtt)).min(self.burst);
        }
        self.refilled_at = Some(now);
    }

    pub fn pacing_open(&self) -> bool {
        self.tokens > 0.0
    }

    pub fn on_sent(&mut self, bytes: usize) {
        self.tokens -= bytes as f64;
    }

    /// When the pacer opens again (only meaningful when it is closed).
    pub fn pacing_release(&self, now: Instant, srtt: Duration) -> Instant {
        let missing = (-self.tokens).max(0.0) + 1.0;
        let wait = missing / self.rate_bytes_per_s(srtt);
        now + Duration::from_secs_f64(wait.min(1.0)).max(Duration::from_micros(50))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtt_follows_rfc6298() {
        let now = Instant::now();
        let mut rtt = RttEstimator::new(Duration::from_millis(100));
        rtt.update(Duration::from_millis(40), now);
        assert_eq!(rtt.smoothed(), Duration::from_millis(40));
        assert_eq!(rtt.variation(), Duration::from_millis(20));
        assert_eq!(
            rtt.rto(Duration::from_millis(10), Duration::ZERO),
            Duration::from_millis(120)
        );
        for _ in 0..100 {
            rtt.update(Duration::from_millis(40), now);
        }
        assert_eq!(
            rtt.rto(Duration::from_millis(10), Duration::from_millis(5)),
            Duration::from_millis(46)
        );
        assert_eq!(
            rtt.rto(Duration::from_millis(50), Duration::ZERO),
            Duration::from_millis(50)
        );
        assert_eq!(rtt.min(), Some(Duration::from_millis(40)));
    }

    #[test]
    fn loss_below_the_tolerance_is_not_congestion() {
        let config = CongestionConfig {
            loss_tolerance: 0.2,
            ..CongestionConfig::default()
        };
        let mut c = Congestion::new(&config, 1000);
        let start = c.window();
        // 5% random loss: tolerated, the window keeps growing.
        for seq in 0..2000u64 {
            if seq % 20 == 0 {
                c.on_loss(seq, seq + 1);
            } else {
                c.on_ack(1000);
            }
        }
        assert!(c.window() > start);
        assert_eq!(c.backoffs_loss, 0);
        assert_eq!(c.losses_tolerated, 100);
        // A burst of losses (a queue overflowing) is congestion again.
        let before = c.window();
        for seq in 2000..2100u64 {
            c.on_loss(seq, 3000);
        }
        assert!(c.backoffs_loss > 0);
        assert!(c.window() < before);
        // Without a tolerance every loss event backs off.
        let mut strict = Congestion::new(&CongestionConfig::default(), 1000);
        strict.on_loss(0, 1);
        assert_eq!(strict.backoffs_loss, 1);
    }

    #[test]
    fn window_backs_off_once_per_round_trip() {
        let config = CongestionConfig::default();
        let mut c = Congestion::new(&config, 1000);
        let start = c.window();
        c.on_loss(10, 20);
        let once = c.window();
        assert!(once < start);
        c.on_loss(15, 25); // sent before the reduction: same loss event
        assert_eq!(c.window(), once);
        c.on_loss(21, 30);
        assert!(c.window() < once);
        for _ in 0..100 {
            c.on_timeout(40);
        }
        assert_eq!(c.window(), config.min_window_packets * 1000);
        for _ in 0..10_000 {
            c.on_ack(1000);
        }
        assert!(c.window() > once);
    }
}
