//! The cache-loss detector: do sticky turns find the prefix their replica should hold?
//!
//! For a sticky turn (the session went back to the replica that served its previous turn)
//! Tether knows how many prompt tokens that replica processed last time. A replica with a
//! working prefix cache holds those tokens' KV blocks, so it should now report about that
//! many cached tokens: all the full blocks of the shorter of the two prompts
//! ([`expected_cached_tokens`]). When its sticky turns report far fewer (prefix caching off,
//! a chat template that renders the history differently, eviction under memory pressure, a
//! restart), the routing is right but the discount never comes, and nothing else in the
//! metrics says so: the hit ratio per tenant mixes it with new sessions and moves.
//!
//! Each replica keeps a [`ReplicaCacheLoss`]: lifetime totals of expected and reported tokens
//! (the reported ones capped at each turn's expectation, so one replica's shared system
//! prompts cannot hide another session's losses), and the same two sums over a recent window
//! in time buckets. Its ratio (reported ÷ expected over the window) is judged once the window
//! holds at least `min_expected_tokens` of expectation, so a replica is never flagged on one
//! short turn. Below `threshold` it is flagged; it clears at a slightly higher ratio
//! ([`CacheLossSettings::clear_at`]) so a ratio hovering at the threshold does not flap. Each
//! change is returned once, as a [`Crossing`], for the proxy to log.
//!
//! Pure: the time is passed in, the proxy holds the lock.
//!
//! ```
//! use tether_metering::{expected_cached_tokens, CacheLossSettings, Crossing, ReplicaCacheLoss};
//!
//! let settings = CacheLossSettings::default();
//! let mut replica = ReplicaCacheLoss::default();
//! // The previous turn's prompt was 3,000 tokens; this one is 3,400: 2,992 should be cached.
//! let expected = expected_cached_tokens(3_000, 3_400, settings.block_tokens);
//! assert_eq!(expected, 2_992);
//! // A replica that lost its cache reports none, turn after turn.
//! let mut crossings = Vec::new();
//! for turn in 0..8 {
//!     crossings.extend(replica.observe(turn * 1_000, expected, 0, &settings));
//! }
//! assert!(matches!(crossings[..], [Crossing::Lost { .. }]));
//! assert_eq!(replica.ratio(8_000, &settings), Some(0.0));
//! ```

use std::time::Duration;

/// Buckets of the window: the window slides in steps of `window / BUCKETS`.
const BUCKETS: usize = 10;

/// What the detector judges by (the `metering.cache_loss` section, validated).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheLossSettings {
    /// A replica is flagged when its ratio over the window falls below this (0 < t ≤ 1).
    pub threshold: f64,
    /// Expected tokens the window must hold before the ratio is judged.
    pub min_expected_tokens: u64,
    /// How far back the ratio looks.
    pub window: Duration,
    /// Tokens per KV block of the replicas' engines: only whole blocks are cached.
    pub block_tokens: u32,
}

impl Default for CacheLossSettings {
    fn default() -> Self {
        CacheLossSettings {
            threshold: 0.5,
            min_expected_tokens: 20_000,
            window: Duration::from_secs(120),
            block_tokens: 16,
        }
    }
}

impl CacheLossSettings {
    /// The ratio at which a flagged replica clears: 0.1 above the threshold, or halfway to 1
    /// when that is closer (a ratio is at most 1).
    pub fn clear_at(&self) -> f64 {
        (self.threshold + 0.1).min((1.0 + self.threshold) / 2.0)
    }

    fn bucket_ms(&self) -> u64 {
        let window = u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX);
        (window / BUCKETS as u64).max(1)
    }
}

/// How many cached tokens a sticky turn should report: the whole blocks of what the replica
/// processed last time, but no more than the current prompt can use (an engine computes at
/// least its last token, so a prompt of `n` tokens reuses at most `n − 1`; a client that cut
/// its history sends a shorter prompt).
pub fn expected_cached_tokens(previous_prompt: u64, prompt: u64, block_tokens: u32) -> u64 {
    let block = u64::from(block_tokens.max(1));
    let usable = previous_prompt.min(prompt.saturating_sub(1));
    usable / block * block
}

/// A change of a replica's verdict, returned once by [`ReplicaCacheLoss::observe`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Crossing {
    /// The ratio fell below the threshold.
    Lost {
        /// Reported ÷ expected over the window.
        ratio: f64,
        /// Expected tokens in the window.
        expected: u64,
    },
    /// The ratio came back to [`CacheLossSettings::clear_at`] or above.
    Recovered {
        /// Reported ÷ expected over the window.
        ratio: f64,
    },
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// `now_ms / bucket_ms` of the sums below.
    index: u64,
    expected: u64,
    reported: u64,
}

/// One replica's detector state.
#[derive(Debug, Clone, Default)]
pub struct ReplicaCacheLoss {
    buckets: [Bucket; BUCKETS],
    expected_total: u64,
    reported_total: u64,
    flagged: bool,
}

impl ReplicaCacheLoss {
    /// Counts one sticky turn that expected `expected` cached tokens and reported `reported`
    /// (capped at `expected`), and returns the verdict's change, if any.
    pub fn observe(
        &mut self,
        now_ms: u64,
        expected: u64,
        reported: u64,
        settings: &CacheLossSettings,
    ) -> Option<Crossing> {
        let reported = reported.min(expected);
        self.expected_total = self.expected_total.saturating_add(expected);
        self.reported_total = self.reported_total.saturating_add(reported);
        let index = now_ms / settings.bucket_ms();
        let bucket = &mut self.buckets[(index % BUCKETS as u64) as usize];
        if bucket.index != index {
            *bucket = Bucket {
                index,
                ..Bucket::default()
            };
        }
        bucket.expected = bucket.expected.saturating_add(expected);
        bucket.reported = bucket.reported.saturating_add(reported);
        let ratio = self.ratio(now_ms, settings)?;
        if !self.flagged && ratio < settings.threshold {
            self.flagged = true;
            let (expected, _) = self.window_sums(now_ms, settings);
            return Some(Crossing::Lost { ratio, expected });
        }
        if self.flagged && ratio >= settings.clear_at() {
            self.flagged = false;
            return Some(Crossing::Recovered { ratio });
        }
        None
    }

    /// Reported ÷ expected over the window ending at `now_ms`, once the window holds
    /// `min_expected_tokens` of expectation (`None` before).
    pub fn ratio(&self, now_ms: u64, settings: &CacheLossSettings) -> Option<f64> {
        let (expected, reported) = self.window_sums(now_ms, settings);
        (expected > 0 && expected >= settings.min_expected_tokens)
            .then(|| reported as f64 / expected as f64)
    }

    /// Whether the replica is flagged (its last judged ratio was below the threshold and has
    /// not come back since).
    pub fn flagged(&self) -> bool {
        self.flagged
    }

    /// Every expected token counted.
    pub fn expected_total(&self) -> u64 {
        self.expected_total
    }

    /// Every reported cached token counted (each turn's capped at its expectation).
    pub fn reported_total(&self) -> u64 {
        self.reported_total
    }

    /// `(expected, reported)` in the buckets still inside the window.
    fn window_sums(&self, now_ms: u64, settings: &CacheLossSettings) -> (u64, u64) {
        let now = now_ms / settings.bucket_ms();
        let oldest = now.saturating_sub(BUCKETS as u64 - 1);
        self.buckets
            .iter()
            .filter(|b| (oldest..=now).contains(&b.index) && b.expected > 0)
            .fold((0u64, 0u64), |(e, r), b| {
                (e.saturating_add(b.expected), r.saturating_add(b.reported))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn settings() -> CacheLossSettings {
        CacheLossSettings {
            threshold: 0.5,
            min_expected_tokens: 1_000,
            window: Duration::from_secs(10),
            block_tokens: 16,
        }
    }

    #[test]
    fn the_expectation_is_the_whole_blocks_of_the_shorter_prompt() {
        for (previous, prompt, expected) in [
            (3_000, 3_400, 2_992),
            (3_200, 3_400, 3_200),
            // A prompt cut shorter than last time reuses at most its own length less one.
            (3_200, 1_601, 1_600),
            (3_200, 1_600, 1_584),
            (10, 50, 0),
            (0, 50, 0),
            (100, 0, 0),
        ] {
            assert_eq!(
                expected_cached_tokens(previous, prompt, 16),
                expected,
                "{previous} then {prompt}"
            );
        }
        assert_eq!(expected_cached_tokens(100, 200, 0), 100, "a block of 1");
    }

    #[test]
    fn a_replica_is_not_judged_before_the_window_holds_enough() {
        let s = settings();
        let mut r = ReplicaCacheLoss::default();
        assert_eq!(r.observe(0, 600, 0, &s), None);
        assert_eq!(r.ratio(0, &s), None);
        assert!(!r.flagged());
        assert!(matches!(
            r.observe(100, 600, 0, &s),
            Some(Crossing::Lost {
                expected: 1_200,
                ..
            })
        ));
        assert!(r.flagged());
        assert_eq!(r.observe(200, 600, 0, &s), None, "once per crossing");
    }

    #[test]
    fn a_flagged_replica_clears_above_the_threshold_with_a_margin() {
        let s = settings();
        let mut r = ReplicaCacheLoss::default();
        r.observe(0, 2_000, 0, &s);
        assert!(r.flagged());
        // 2,000 of 4,000: at the threshold, not past the margin.
        assert_eq!(r.observe(1_000, 2_000, 2_000, &s), None);
        assert_eq!(r.ratio(1_000, &s), Some(0.5));
        assert!(r.flagged());
        let back = r.observe(2_000, 1_000, 1_000, &s);
        assert_eq!(back, Some(Crossing::Recovered { ratio: 0.6 }));
        assert!(!r.flagged());
    }

    #[test]
    fn old_turns_leave_the_window() {
        let s = settings();
        let mut r = ReplicaCacheLoss::default();
        r.observe(0, 5_000, 0, &s);
        assert!(r.flagged());
        // Ten seconds later the lost turns are out of the window: only the warm ones count.
        assert_eq!(r.ratio(10_000, &s), None);
        let back = r.observe(10_500, 2_000, 2_000, &s);
        assert_eq!(back, Some(Crossing::Recovered { ratio: 1.0 }));
        assert_eq!((r.expected_total(), r.reported_total()), (7_000, 2_000));
    }

    #[test]
    fn reports_above_the_expectation_count_as_the_expectation() {
        let s = settings();
        let mut r = ReplicaCacheLoss::default();
        r.observe(0, 1_000, 50_000, &s);
        assert_eq!(r.reported_total(), 1_000);
        assert_eq!(r.ratio(0, &s), Some(1.0));
    }

    #[test]
    fn clear_at_stays_between_the_threshold_and_one() {
        for (threshold, clear) in [(0.5, 0.6), (0.95, 0.975), (1.0, 1.0)] {
            let s = CacheLossSettings {
                threshold,
                ..settings()
            };
            assert!((s.clear_at() - clear).abs() < 1e-9, "{threshold}");
        }
    }

    proptest! {
        #[test]
        fn the_ratio_stays_in_0_1_and_totals_add_up(
            turns in proptest::collection::vec((0u64..30_000, 0u64..100_000, 0u64..100_000), 1..60),
        ) {
            let s = settings();
            let mut r = ReplicaCacheLoss::default();
            let (mut expected, mut reported, mut now) = (0u64, 0u64, 0u64);
            let mut flagged = false;
            for (step, e, c) in turns {
                now += step;
                match r.observe(now, e, c, &s) {
                    Some(Crossing::Lost { ratio, .. }) => {
                        prop_assert!(!flagged && ratio < s.threshold);
                        flagged = true;
                    }
                    Some(Crossing::Recovered { ratio }) => {
                        prop_assert!(flagged && ratio >= s.clear_at());
                        flagged = false;
                    }
                    None => {}
                }
                prop_assert_eq!(flagged, r.flagged());
                expected += e;
                reported += c.min(e);
                if let Some(ratio) = r.ratio(now, &s) {
                    prop_assert!((0.0..=1.0).contains(&ratio));
                }
            }
            prop_assert_eq!((r.expected_total(), r.reported_total()), (expected, reported));
        }
    }
}
