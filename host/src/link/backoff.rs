//! Reconnect backoff: exponential with full jitter, capped, reset only after a healthy link.
//!
//! Attempt `n` (from 0) waits a uniformly random time in `[0, min(ceiling, base · 2ⁿ)]` ("full
//! jitter"), so a fleet that lost its platform at the same moment does not come back in
//! lockstep. The attempt counter goes back to zero only when a connection has stayed up for
//! `healthy_after`; a platform that accepts and then drops the agent at once keeps the agent
//! backing off instead of spinning. Every failure kind (DNS, TCP, TLS, refused enrollment,
//! handshake) goes through the same backoff.

use std::time::Duration;

/// Backoff state for one link.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    ceiling: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `base` and never waiting longer than `ceiling`.
    pub fn new(base: Duration, ceiling: Duration) -> Backoff {
        Backoff {
            base: base.max(Duration::from_millis(1)),
            ceiling: ceiling.max(base),
            attempt: 0,
        }
    }

    /// The cap on the next wait (before jitter).
    pub fn cap(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.ceiling)
    }

    /// The next wait: uniformly random in `[0, cap]`; advances the attempt counter.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self.cap();
        self.attempt = self.attempt.saturating_add(1);
        cap.mul_f64(unit_random())
    }

    /// Back to the first attempt (after a healthy connection).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// How many failures in a row so far.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

/// A uniform random number in `[0, 1)` from the system's generator.
fn unit_random() -> f64 {
    let mut b = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_double_up_to_the_ceiling_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let caps: Vec<u128> = (0..6)
            .map(|_| {
                let cap = b.cap();
                let d = b.next_delay();
                assert!(d <= cap, "{d:?} > {cap:?}");
                cap.as_millis()
            })
            .collect();
        assert_eq!(caps, vec![100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.cap(), Duration::from_millis(100));
    }

    #[test]
    fn jitter_spreads_the_waits() {
        let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(10));
        let waits: Vec<Duration> = (0..200).map(|_| b.next_delay()).collect();
        let min = waits.iter().min().unwrap();
        let max = waits.iter().max().unwrap();
        assert!(
            *min < Duration::from_secs(2) && *max > Duration::from_secs(8),
            "{min:?}..{max:?}"
        );
    }

    #[test]
    fn a_huge_attempt_count_does_not_overflow() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
        for _ in 0..1000 {
            assert!(b.next_delay() <= Duration::from_secs(60));
        }
    }
}
