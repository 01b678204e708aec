//! Which sessions a replica is serving now: what a slot-limited engine's slots are compared with.
//!
//! A llama.cpp or SGLang server keeps a session's KV cache in one of a few slots between its
//! turns, so a session holds its slot while nothing of it is in flight: placement must count
//! the sessions a replica is *serving*, not its requests. A session that ends says nothing,
//! though. Counting every session served within a fixed window long enough for a person's
//! pause (two minutes) counts, in a fast agent workload, every session of the last two minutes:
//! every replica then looks full, placement sees no room anywhere, and a replica whose sessions
//! have ended is not told from one whose sessions are mid-conversation.
//!
//! So the record also learns how far apart this replica's sessions' turns are (an
//! exponentially weighted mean of the gaps it sees, each capped at the longest window) and
//! counts a session as active for [`GAP_MULTIPLE`] mean gaps after its last turn, within
//! [`MIN_ACTIVE_WINDOW_MS`] and [`ACTIVE_SESSION_WINDOW_MS`]. Until it has seen a gap the
//! window is the longest one. A session whose next turn is that late has most likely ended;
//! if it was only slow, its turn finds its replica as placement left it, since a sticky session
//! stays on its replica whatever the count says.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::warmth::TenantWarmth;
use crate::TenantScope;

/// The longest a session counts as active after its turn: an agent's turn gap is seconds to
/// minutes, and its cache must survive it.
pub const ACTIVE_SESSION_WINDOW_MS: u64 = 120_000;

/// The shortest: below it the record's 100 ms clock is too coarse to tell sessions apart.
pub const MIN_ACTIVE_WINDOW_MS: u64 = 1_000;

/// Mean turn gaps after which a silent session no longer counts as active. With gaps spread
/// like an exponential distribution, one live session in fifty is late by that much.
pub const GAP_MULTIPLE: u64 = 4;

/// Weight of a new gap in the mean (1/8: about the last eight turns).
const GAP_WEIGHT: f64 = 0.125;

/// One replica's sessions served recently and the usual gap between their turns.
#[derive(Debug, Default)]
pub struct SessionActivity {
    /// One slot per session (the count saturates at [`crate::WARMTH_SLOTS`], more than any
    /// slot-limited engine holds).
    sessions: TenantWarmth,
    /// Mean gap between a session's turns, milliseconds; 0 until one is seen.
    mean_gap_ms: AtomicU32,
}

impl SessionActivity {
    /// An empty record.
    pub fn new() -> Self {
        Self::default()
    }

    /// Notes a request of `session` at `now_ms` (any monotonic milliseconds).
    pub fn record(&self, session: TenantScope, now_ms: u64) {
        // A gap under one tick is a retry or a parallel request, not a turn.
        let Some(gap) = self.sessions.record(session, now_ms).filter(|&g| g > 0) else {
            return;
        };
        let gap = gap.min(ACTIVE_SESSION_WINDOW_MS) as f64;
        let mean = self.mean_gap_ms.load(Ordering::Relaxed);
        let next = if mean == 0 {
            gap
        } else {
            f64::from(mean) + GAP_WEIGHT * (gap - f64::from(mean))
        };
        // Racing writers each store a mean that includes their own gap: one is lost, which a
        // mean over eight turns does not notice.
        self.mean_gap_ms
            .store((next.round() as u32).max(1), Ordering::Relaxed);
    }

    /// How long after its last turn a session counts as active now.
    pub fn window_ms(&self) -> u64 {
        match u64::from(self.mean_gap_ms.load(Ordering::Relaxed)) {
            0 => ACTIVE_SESSION_WINDOW_MS,
            mean => (GAP_MULTIPLE * mean).clamp(MIN_ACTIVE_WINDOW_MS, ACTIVE_SESSION_WINDOW_MS),
        }
    }

    /// Distinct sessions served within the [window](Self::window_ms) before `now_ms`.
    pub fn active(&self, now_ms: u64) -> u32 {
        self.sessions.served_within(now_ms, self.window_ms())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(n: u64) -> TenantScope {
        TenantScope::of_session(crate::RoutingKey(n.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1))
    }

    #[test]
    fn until_a_gap_is_seen_a_session_counts_for_the_longest_window() {
        let a = SessionActivity::new();
        a.record(session(1), 1_000);
        assert_eq!(a.window_ms(), ACTIVE_SESSION_WINDOW_MS);
        assert_eq!(a.active(1_000 + ACTIVE_SESSION_WINDOW_MS - 100), 1);
        assert_eq!(a.active(1_000 + ACTIVE_SESSION_WINDOW_MS + 200), 0);
    }

    #[test]
    fn sessions_a_few_turn_gaps_silent_no_longer_count() {
        let a = SessionActivity::new();
        // Four sessions taking turns every two seconds.
        for turn in 0..10u64 {
            for s in 0..4 {
                a.record(session(s), 10_000 + turn * 2_000 + s * 100);
            }
        }
        assert_eq!(a.window_ms(), GAP_MULTIPLE * 2_000);
        let last = 10_000 + 9 * 2_000;
        assert_eq!(a.active(last + 1_000), 4);
        // Two of them end; the others go on.
        for turn in 10..14u64 {
            for s in 0..2 {
                a.record(session(s), 10_000 + turn * 2_000 + s * 100);
            }
        }
        assert_eq!(a.active(10_000 + 13 * 2_000 + 500), 2);
    }

    #[test]
    fn the_window_stays_within_its_bounds_and_long_pauses_weigh_no_more_than_the_longest() {
        let a = SessionActivity::new();
        for turn in 0..20u64 {
            a.record(session(1), turn * 100);
        }
        assert_eq!(a.window_ms(), MIN_ACTIVE_WINDOW_MS);
        let b = SessionActivity::new();
        b.record(session(1), 0);
        b.record(session(1), 3_600_000);
        assert_eq!(b.window_ms(), ACTIVE_SESSION_WINDOW_MS);
        // One hour-long pause among short gaps moves the mean by an eighth of the cap at most.
        for turn in 1..40u64 {
            b.record(session(1), 3_600_000 + turn * 1_000);
        }
        assert!(b.window_ms() < 10_000, "{}", b.window_ms());
    }

    #[test]
    fn requests_within_one_tick_are_not_turns() {
        let a = SessionActivity::new();
        a.record(session(1), 1_000);
        a.record(session(1), 3_000);
        let window = a.window_ms();
        for _ in 0..10 {
            a.record(session(1), 3_050);
        }
        assert_eq!(a.window_ms(), window);
    }
}
