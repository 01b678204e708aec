//! Reconnection delays: doubling from [`FIRST`] to [`CAP`], with jitter.

use std::time::Duration;

/// Delay before the first retry: short, since most losses are a restart or a failover.
pub(crate) const FIRST: Duration = Duration::from_millis(50);
/// Longest delay: bounds how long the store stays down after Redis is back.
pub(crate) const CAP: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Backoff { next: FIRST }
    }

    /// The delay before the next attempt. `jitter` in `[0, 1)` spreads it over ±20%, so a tier
    /// of proxies that lost Redis together does not reconnect in lockstep.
    pub(crate) fn next_delay(&mut self, jitter: f64) -> Duration {
        let delay = self.next.mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0));
        self.next = (self.next * 2).min(CAP);
        delay
    }

    pub(crate) fn reset(&mut self) {
        self.next = FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_reset() {
        let mut backoff = Backoff::new();
        let millis: Vec<u128> = (0..8)
            .map(|_| backoff.next_delay(0.5).as_millis())
            .collect();
        assert_eq!(millis, [50, 100, 200, 400, 800, 1600, 2000, 2000]);
        backoff.reset();
        assert_eq!(backoff.next_delay(0.5), FIRST);
    }

    #[test]
    fn jitter_stays_within_a_fifth() {
        let mut low = Backoff::new();
        let mut high = Backoff::new();
        assert_eq!(low.next_delay(0.0), Duration::from_millis(40));
        assert_eq!(high.next_delay(1.0), Duration::from_millis(60));
    }
}
