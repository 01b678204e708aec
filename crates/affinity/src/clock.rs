//! Time, injected: the override table's TTL reads a [`Clock`] so tests control it exactly.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Whole seconds since some fixed origin. Second resolution is enough for idle TTLs measured in
/// minutes and keeps an override entry at 16 bytes.
pub trait Clock: Send + Sync {
    /// Seconds since the clock's origin.
    fn now_secs(&self) -> u32;
}

/// How often the clock thread advances [`MonotonicClock`].
const TICK: Duration = Duration::from_millis(100);

/// The process's monotonic clock in whole seconds, read from an atomic that a background thread
/// advances every 100 ms. Every override lookup reads the clock; an atomic load costs nothing
/// next to `Instant::now()`, a clock read that is a noticeable share of a lookup on virtual
/// machines (`benches/routing.rs`). The thread ends within a tick of the last clone being dropped; if no thread can
/// be started, every read falls back to `Instant::now()`.
#[derive(Debug, Clone)]
pub struct MonotonicClock {
    secs: Arc<AtomicU32>,
    /// Set when the ticking thread could not be started.
    unticked_origin: Option<Instant>,
}

fn secs_since(origin: Instant) -> u32 {
    // Saturates after 136 years of uptime.
    u32::try_from(origin.elapsed().as_secs()).unwrap_or(u32::MAX)
}

impl MonotonicClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        let origin = Instant::now();
        let secs = Arc::new(AtomicU32::new(0));
        let weak = Arc::downgrade(&secs);
        let ticking = std::thread::Builder::new()
            .name("tether-clock".into())
            .spawn(move || loop {
                std::thread::sleep(TICK);
                let Some(secs) = weak.upgrade() else { break };
                secs.store(secs_since(origin), Ordering::Relaxed);
            })
            .is_ok();
        MonotonicClock {
            secs,
            unticked_origin: (!ticking).then_some(origin),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now_secs(&self) -> u32 {
        match self.unticked_origin {
            None => self.secs.load(Ordering::Relaxed),
            Some(origin) => secs_since(origin),
        }
    }
}

/// A clock that moves only when told to (for tests).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU32);

impl ManualClock {
    /// Moves the clock forward.
    pub fn advance(&self, secs: u32) {
        self.0.fetch_add(secs, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now_secs(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_monotonic_clock_advances_by_itself() {
        let started = Instant::now();
        let clock = MonotonicClock::new();
        // Wait for the tick that carries the first whole second (a readiness poll, bounded).
        let deadline = started + Duration::from_secs(5);
        while clock.now_secs() == 0 {
            assert!(Instant::now() < deadline, "the clock never reached 1 s");
            std::thread::sleep(TICK);
        }
        // Never ahead of real time.
        assert!(u64::from(clock.now_secs()) <= started.elapsed().as_secs());
    }
}
