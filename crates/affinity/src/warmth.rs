//! Which tenants a replica served recently: the hint behind tenant locality.
//!
//! Sessions of one tenant usually share a long prefix (the tenant's system prompt, tool
//! definitions). A replica that served the tenant a moment ago still holds that prefix in its
//! KV cache; a replica that never did must prefill it and spend cache space on a second copy.
//! So a *new* session goes, when it can, to a replica that is warm for its tenant and serves
//! few other tenants (see [`crate::Selector::decide`]). It is the tenant-level form of the
//! cache-aware routing in SGLang's router, which prefers the worker holding the longest
//! matching prefix while loads stay balanced: a proxy that routes on headers cannot see the
//! prefix, but it knows the tenant.
//!
//! Grouping alone would pile a tenant onto one replica whenever few requests are in flight
//! (people reading between turns), leaving the other replicas' caches idle. So the record
//! also counts the sessions *placed* on the replica recently, and locality only picks a
//! replica under the bounded-load limit on that count: sessions still spread over the fleet's
//! caches in proportion, and a tenant's sessions gather on as many replicas as its share of new
//! sessions needs.
//!
//! [`TenantWarmth`] is one replica's record: a few slots of (tenant, last served) and a decayed
//! placement count, each one `AtomicU64`, so the hot path records without a lock and readers
//! never see a torn value. When more tenants are recent than there are slots, the least recent
//! is forgotten; the record is a hint, and a lost race between two writers costs at most one
//! cold placement.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::TenantScope;

/// Slots per replica: tenants remembered at once. Beyond this many recent tenants a replica
/// is "busy with many tenants" either way, and the answer no longer changes a decision.
pub const WARMTH_SLOTS: usize = 16;

/// The clock unit of [`TenantWarmth`]: time is kept in tenths of a second, so recording the
/// same tenant again within 100 ms writes nothing (no cache-line traffic per request).
pub(crate) const TICK_MS: u64 = 100;

/// What a replica's record says about one tenant at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Warmth {
    /// The replica served this tenant within the window.
    pub warm: bool,
    /// Other tenants it served within the window.
    pub others: u32,
    /// Sessions placed on it recently ([`TenantWarmth::recent_placements`]).
    pub recent_placements: f64,
}

/// One replica's recently served tenants and placed sessions (see the module docs).
#[derive(Debug, Default)]
pub struct TenantWarmth {
    /// `fingerprint << 32 | tick`; 0 = empty. A tick of 0 is stored as 1 (100 ms early).
    slots: [AtomicU64; WARMTH_SLOTS],
    /// `f32 bits << 32 | tick`: sessions placed, decayed by `exp(-age / window)`, as of `tick`.
    placements: AtomicU64,
}

fn decayed(packed: u64, now: u32, window_ms: u64) -> f32 {
    let (count, at) = (f32::from_bits((packed >> 32) as u32), packed as u32);
    let age_ms = u64::from(now.saturating_sub(at)) * TICK_MS;
    // A zero window forgets at once (validation keeps it positive; no division by zero).
    let factor = (-(age_ms as f64) / window_ms.max(1) as f64).exp();
    (f64::from(count) * factor) as f32
}

/// Adds one to a decayed count (`f32 bits << 32 | tick`, see [`decayed`]) at `now_ms`.
pub(crate) fn bump(counter: &AtomicU64, now_ms: u64, window_ms: u64) {
    let now = tick(now_ms);
    let mut current = counter.load(Ordering::Relaxed);
    loop {
        let count = decayed(current, now, window_ms) + 1.0;
        let next = u64::from(count.to_bits()) << 32 | u64::from(now);
        match counter.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return,
            Err(seen) => current = seen,
        }
    }
}

/// A decayed count (see [`bump`]) as of `now_ms`.
pub(crate) fn read_decayed(counter: &AtomicU64, now_ms: u64, window_ms: u64) -> f64 {
    f64::from(decayed(
        counter.load(Ordering::Relaxed),
        tick(now_ms),
        window_ms,
    ))
}

fn fingerprint(tenant: TenantScope) -> u32 {
    // The high half of the scope hash; 0 is reserved for an empty slot. Two tenants sharing a
    // fingerprint (one in 4 billion) count as one: a worse hint, never a wrong route.
    match (tenant.hash() >> 32) as u32 {
        0 => 1,
        f => f,
    }
}

pub(crate) fn tick(now_ms: u64) -> u32 {
    // Saturates after 13 years of uptime.
    u32::try_from(now_ms / TICK_MS).unwrap_or(u32::MAX).max(1)
}

fn unpack(slot: u64) -> (u32, u32) {
    ((slot >> 32) as u32, slot as u32)
}

impl TenantWarmth {
    /// An empty record.
    pub fn new() -> Self {
        Self::default()
    }

    /// Notes that the replica serves `tenant` at `now_ms` (any monotonic milliseconds), and
    /// returns how long ago, in milliseconds rounded down to [`TICK_MS`], it last did, if the
    /// record still held it.
    pub fn record(&self, tenant: TenantScope, now_ms: u64) -> Option<u64> {
        let (fp, now) = (fingerprint(tenant), tick(now_ms));
        let packed = u64::from(fp) << 32 | u64::from(now);
        let mut oldest: Option<(usize, u32)> = None;
        for (i, slot) in self.slots.iter().enumerate() {
            let current = slot.load(Ordering::Relaxed);
            let (slot_fp, at) = unpack(current);
            if slot_fp == fp {
                if at < now {
                    // Lost races only keep an older time: the tenant looks warm a tick less.
                    let _ = slot.compare_exchange(
                        current,
                        packed,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                }
                return Some(u64::from(now.saturating_sub(at)) * TICK_MS);
            }
            if oldest.is_none_or(|(_, t)| at < t) {
                oldest = Some((i, at));
            }
        }
        if let Some((i, _)) = oldest {
            self.slots[i].store(packed, Ordering::Relaxed);
        }
        None
    }

    /// Notes that a session was placed on the replica at `now_ms`; the count decays with time
    /// constant `window_ms`.
    pub fn record_placement(&self, now_ms: u64, window_ms: u64) {
        bump(&self.placements, now_ms, window_ms);
    }

    /// Sessions placed on the replica recently: each counts `exp(-age / window_ms)`.
    pub fn recent_placements(&self, now_ms: u64, window_ms: u64) -> f64 {
        read_decayed(&self.placements, now_ms, window_ms)
    }

    /// How many distinct tenants it served within the last `window_ms` (at most
    /// [`WARMTH_SLOTS`]).
    pub fn served_within(&self, now_ms: u64, window_ms: u64) -> u32 {
        let since = tick(now_ms.saturating_sub(window_ms));
        self.slots
            .iter()
            .map(|slot| unpack(slot.load(Ordering::Relaxed)))
            .filter(|(fp, at)| *fp != 0 && *at >= since)
            .count() as u32
    }

    /// What the record says about `tenant` at `now_ms`, counting what was served within the
    /// last `window_ms`.
    pub fn warmth(&self, tenant: TenantScope, now_ms: u64, window_ms: u64) -> Warmth {
        let fp = fingerprint(tenant);
        let since = tick(now_ms.saturating_sub(window_ms));
        let mut out = Warmth {
            recent_placements: self.recent_placements(now_ms, window_ms),
            ..Warmth::default()
        };
        for slot in &self.slots {
            let (slot_fp, at) = unpack(slot.load(Ordering::Relaxed));
            if slot_fp == 0 || at < since {
                continue;
            }
            if slot_fp == fp {
                out.warm = true;
            } else {
                out.others += 1;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(n: usize) -> TenantScope {
        TenantScope::new(&format!("tenant-{n}"))
    }

    #[test]
    fn a_served_tenant_is_warm_for_the_window_and_then_cold() {
        let w = TenantWarmth::new();
        assert_eq!(w.warmth(tenant(0), 1_000, 30_000), Warmth::default());
        w.record(tenant(0), 1_000);
        assert!(w.warmth(tenant(0), 1_000, 30_000).warm);
        assert!(w.warmth(tenant(0), 31_000, 30_000).warm);
        assert!(!w.warmth(tenant(0), 31_200, 30_000).warm);
        // Serving it again renews it.
        w.record(tenant(0), 31_200);
        assert!(w.warmth(tenant(0), 60_000, 30_000).warm);
    }

    #[test]
    fn other_tenants_are_counted_not_confused() {
        let w = TenantWarmth::new();
        for n in 1..=3 {
            w.record(tenant(n), 500);
        }
        let cold = w.warmth(tenant(0), 600, 1_000);
        assert_eq!((cold.warm, cold.others), (false, 3));
        let warm = w.warmth(tenant(2), 600, 1_000);
        assert_eq!((warm.warm, warm.others), (true, 2));
        // Recording a tenant twice takes one slot.
        w.record(tenant(1), 700);
        assert_eq!(w.warmth(tenant(0), 700, 1_000).others, 3);
    }

    #[test]
    fn with_more_tenants_than_slots_the_least_recent_is_forgotten() {
        let w = TenantWarmth::new();
        for n in 0..WARMTH_SLOTS {
            w.record(tenant(n), 1_000 + 100 * n as u64);
        }
        w.record(tenant(99), 10_000);
        let now = 10_000;
        assert!(w.warmth(tenant(99), now, 60_000).warm);
        assert!(!w.warmth(tenant(0), now, 60_000).warm, "the oldest went");
        assert!(w.warmth(tenant(1), now, 60_000).warm);
        assert_eq!(w.warmth(tenant(0), now, 60_000).others, WARMTH_SLOTS as u32);
    }

    #[test]
    fn time_zero_and_the_far_future_do_not_break_it() {
        let w = TenantWarmth::new();
        w.record(tenant(0), 0);
        assert!(w.warmth(tenant(0), 0, 1).warm);
        w.record(tenant(1), u64::MAX);
        assert!(w.warmth(tenant(1), u64::MAX, 1_000).warm);
        assert_eq!(w.warmth(tenant(2), u64::MAX, u64::MAX).others, 2);
    }

    #[test]
    fn placements_add_up_and_decay_with_the_window() {
        let w = TenantWarmth::new();
        assert_eq!(w.recent_placements(5_000, 10_000), 0.0);
        for _ in 0..4 {
            w.record_placement(5_000, 10_000);
        }
        assert!((w.recent_placements(5_000, 10_000) - 4.0).abs() < 1e-6);
        // One window later: 4 / e.
        let later = w.recent_placements(15_000, 10_000);
        assert!((later - 4.0 / std::f64::consts::E).abs() < 1e-3, "{later}");
        w.record_placement(15_000, 10_000);
        assert!((w.recent_placements(15_000, 10_000) - later - 1.0).abs() < 1e-3);
        // Far later, nothing is left; the count never goes negative or NaN.
        let gone = w.recent_placements(u64::MAX, 10_000);
        assert!((0.0..1e-6).contains(&gone), "{gone}");
    }

    #[test]
    fn concurrent_placements_are_all_counted() {
        let w = std::sync::Arc::new(TenantWarmth::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let w = std::sync::Arc::clone(&w);
                std::thread::spawn(move || {
                    for _ in 0..1_000 {
                        w.record_placement(1_000, 60_000);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("no recorder panics");
        }
        assert_eq!(w.recent_placements(1_000, 60_000), 4_000.0);
    }

    #[test]
    fn concurrent_recorders_leave_every_slot_whole() {
        let w = std::sync::Arc::new(TenantWarmth::new());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let w = std::sync::Arc::clone(&w);
                std::thread::spawn(move || {
                    for i in 0..2_000u64 {
                        w.record(tenant(t * 4 + (i % 4) as usize), 100 + i * 100);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("no recorder panics");
        }
        let known: Vec<u32> = (0..16).map(|n| fingerprint(tenant(n))).collect();
        for slot in &w.slots {
            let (fp, at) = unpack(slot.load(Ordering::Relaxed));
            assert!(known.contains(&fp), "a slot holds a real tenant");
            assert!(at >= 1, "and a real time");
        }
    }
}
