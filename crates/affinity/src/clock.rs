//! Time, injected: the override table's TTL reads a [`Clock`] so tests control it exactly.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

/// Whole seconds since some fixed origin. Second resolution is enough for idle TTLs measured in
/// minutes and keeps an override entry at 16 bytes.
pub trait Clock: Send + Sync {
    /// Seconds since the clock's origin.
    fn now_secs(&self) -> u32;
}

/// The process's monotonic clock.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    origin: Instant,
}

impl MonotonicClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        MonotonicClock {
            origin: Instant::now(),
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
        // Saturates after 136 years of uptime.
        u32::try_from(self.origin.elapsed().as_secs()).unwrap_or(u32::MAX)
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
