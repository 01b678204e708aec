//! The override (sticky) table: which replica last served a session.
//!
//! After a successful response the proxy records `key → replica`; on the next turn that replica
//! wins if it is still eligible. This is what makes scale-out free for warm sessions: adding a
//! replica changes the ring, but a session with an entry keeps going where its KV cache is.
//!
//! Entries are 16 bytes (`u64` key, `u32` replica tag, `u32` last-touched second) in a sharded
//! [`DashMap`]; the key is already a uniform hash, so the map hashes it with the identity.
//!
//! Two bounds keep memory flat:
//! - **idle TTL**: an entry not touched for `ttl` is dead. Lookups treat it as absent and remove
//!   it; [`OverrideTable::purge_expired`] sweeps the rest (the proxy calls it periodically).
//! - **capacity**: when an insert takes the table past `capacity`, one thread sweeps it down to
//!   7/8 of capacity, evicting the least recently touched entries (an approximate LRU: the cut-off
//!   second is the 1/8 quantile of a 4,096-entry sample; ties at the cut-off are split by key
//!   bits). The sweep is O(n) once every `capacity/8` inserts, i.e. O(1) amortized per insert.
//!   While a sweep runs, other threads' inserts may overshoot by at most one entry each.

use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;

use crate::clock::{Clock, MonotonicClock};
use crate::RoutingKey;

/// A replica's stable identity across topology reloads (see [`TagRegistry`](crate::TagRegistry)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplicaTag(pub u32);

#[derive(Debug, Clone, Copy)]
struct Entry {
    tag: ReplicaTag,
    touched: u32,
}

/// Sample size used to estimate the eviction cut-off.
const EVICTION_SAMPLE: usize = 4096;

/// Routing keys are uniform 64-bit digests already: hashing them again is wasted work.
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by `u64: Hash`; fold anything else in for correctness.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Map = DashMap<u64, Entry, BuildHasherDefault<IdentityHasher>>;

/// Key → replica that last served it, with idle TTL and a capacity bound.
pub struct OverrideTable<C: Clock = MonotonicClock> {
    map: Map,
    // Atomics so a reload can change them under traffic (relaxed: each is read on its own).
    ttl_secs: AtomicU32,
    capacity: AtomicUsize,
    len: AtomicUsize,
    sweeping: AtomicBool,
    clock: C,
}

impl<C: Clock> std::fmt::Debug for OverrideTable<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OverrideTable")
            .field("len", &self.len())
            .field("capacity", &self.capacity)
            .field("ttl_secs", &self.ttl_secs)
            .finish()
    }
}

impl OverrideTable<MonotonicClock> {
    /// A table on the monotonic clock.
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self::with_clock(ttl, capacity, MonotonicClock::new())
    }
}

impl<C: Clock> OverrideTable<C> {
    /// A table on an injected clock (tests use [`ManualClock`](crate::ManualClock)).
    ///
    /// `ttl` is rounded up to whole seconds (minimum 1); `capacity` is at least 1.
    pub fn with_clock(ttl: Duration, capacity: usize, clock: C) -> Self {
        let (ttl_secs, capacity) = Self::limits(ttl, capacity);
        OverrideTable {
            map: Map::default(),
            ttl_secs: AtomicU32::new(ttl_secs),
            capacity: AtomicUsize::new(capacity),
            len: AtomicUsize::new(0),
            sweeping: AtomicBool::new(false),
            clock,
        }
    }

    /// Number of entries (live or expired but not yet swept).
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// True when the table holds no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `ttl` rounded up to whole seconds (minimum 1), and `capacity` (minimum 1).
    fn limits(ttl: Duration, capacity: usize) -> (u32, usize) {
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        (
            u32::try_from(secs.max(1)).unwrap_or(u32::MAX),
            capacity.max(1),
        )
    }

    /// Changes the idle TTL and the capacity (a reload). Entries are judged by the new TTL
    /// from the next lookup; a smaller capacity takes effect at the next insert's sweep.
    pub fn set_limits(&self, ttl: Duration, capacity: usize) {
        let (ttl_secs, capacity) = Self::limits(ttl, capacity);
        self.ttl_secs.store(ttl_secs, Ordering::Relaxed);
        self.capacity.store(capacity, Ordering::Relaxed);
    }

    /// The configured capacity.
    pub fn capacity(&self) -> usize {
        self.capacity.load(Ordering::Relaxed)
    }

    fn expired(&self, entry: &Entry, now: u32) -> bool {
        now.saturating_sub(entry.touched) >= self.ttl_secs.load(Ordering::Relaxed)
    }

    /// The replica that last served `key`, unless the entry has idled past the TTL.
    pub fn get(&self, key: RoutingKey) -> Option<ReplicaTag> {
        let now = self.clock.now_secs();
        let entry = *self.map.get(&key.0)?;
        if self.expired(&entry, now) {
            // Remove only if it is still the same expired entry (another thread may have
            // re-recorded it between our read and this removal).
            if self
                .map
                .remove_if(&key.0, |_, e| self.expired(e, now))
                .is_some()
            {
                self.len.fetch_sub(1, Ordering::Relaxed);
            }
            return None;
        }
        Some(entry.tag)
    }

    /// Records that `tag` served `key` now (inserting or refreshing the entry).
    pub fn record(&self, key: RoutingKey, tag: ReplicaTag) {
        let touched = self.clock.now_secs();
        if self.map.insert(key.0, Entry { tag, touched }).is_none() {
            let len = self.len.fetch_add(1, Ordering::Relaxed) + 1;
            let capacity = self.capacity();
            if len > capacity {
                self.evict_to(capacity - capacity / 8);
            }
        }
    }

    /// Forgets `key`.
    pub fn remove(&self, key: RoutingKey) -> Option<ReplicaTag> {
        let (_, entry) = self.map.remove(&key.0)?;
        self.len.fetch_sub(1, Ordering::Relaxed);
        Some(entry.tag)
    }

    /// Removes every entry idle past the TTL; returns how many were removed.
    pub fn purge_expired(&self) -> usize {
        let now = self.clock.now_secs();
        self.retain(|_, e| !self.expired(e, now))
    }

    /// Number of live entries pointing at `tag` (an O(n) scan, for the admin API).
    pub fn count_for(&self, tag: ReplicaTag) -> usize {
        let now = self.clock.now_secs();
        self.map
            .iter()
            .filter(|e| e.value().tag == tag && !self.expired(e.value(), now))
            .count()
    }

    /// Number of live entries per replica tag, in one O(n) scan (for the admin API).
    pub fn counts_by_tag(&self) -> std::collections::HashMap<ReplicaTag, usize> {
        let now = self.clock.now_secs();
        let mut counts = std::collections::HashMap::new();
        for e in self.map.iter() {
            if !self.expired(e.value(), now) {
                *counts.entry(e.value().tag).or_insert(0) += 1;
            }
        }
        counts
    }

    fn retain(&self, mut keep: impl FnMut(u64, &Entry) -> bool) -> usize {
        let removed = AtomicUsize::new(0);
        self.map.retain(|k, e| {
            let kept = keep(*k, e);
            if !kept {
                removed.fetch_add(1, Ordering::Relaxed);
            }
            kept
        });
        let removed = removed.into_inner();
        self.len.fetch_sub(removed, Ordering::Relaxed);
        removed
    }

    /// Sweeps the table down to about `target` entries, oldest first. One sweeper at a time.
    fn evict_to(&self, target: usize) {
        if self
            .sweeping
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let now = self.clock.now_secs();
        let len = self.len().max(1);
        let excess = len.saturating_sub(target);

        // Keys are uniform hashes, so the first entries the iterator yields are a random
        // sample of the table.
        let mut sample: Vec<u32> = self
            .map
            .iter()
            .take(EVICTION_SAMPLE)
            .map(|e| e.value().touched)
            .collect();
        sample.sort_unstable();
        let want = ((excess as u128 * sample.len() as u128).div_ceil(len as u128) as usize)
            .clamp(1, sample.len().max(1));
        let cutoff = sample.get(want - 1).copied().unwrap_or(u32::MAX);
        let older = sample.partition_point(|t| *t < cutoff);
        let at_cutoff = sample[older..].partition_point(|t| *t <= cutoff).max(1) as u64;
        // Of the entries touched exactly at the cut-off second, evict this fraction, chosen by
        // key bits (uniform) rather than all of them: under a burst every entry may share one
        // second, and evicting all would empty the table.
        let evict_at_cutoff = (want - older) as u64;

        self.retain(|k, e| {
            if self.expired(e, now) || e.touched < cutoff {
                false
            } else if e.touched == cutoff {
                (k >> 40) % at_cutoff >= evict_at_cutoff
            } else {
                true
            }
        });
        if self.len() > self.capacity() {
            // The sample under-estimated the old entries; take the whole cut-off second so the
            // bound holds.
            self.retain(|_, e| e.touched > cutoff);
        }
        self.sweeping.store(false, Ordering::Release);
    }
}

/// The override table shared between the proxy's hooks.
pub type SharedOverrides = Arc<OverrideTable>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ManualClock;

    fn table(ttl_secs: u64, capacity: usize) -> OverrideTable<ManualClock> {
        OverrideTable::with_clock(
            Duration::from_secs(ttl_secs),
            capacity,
            ManualClock::default(),
        )
    }

    #[test]
    fn recorded_entry_is_returned() {
        let t = table(60, 10);
        t.record(RoutingKey(1), ReplicaTag(7));
        assert_eq!(t.get(RoutingKey(1)), Some(ReplicaTag(7)));
        assert_eq!(t.get(RoutingKey(2)), None);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn re_recording_moves_the_session_and_does_not_grow_the_table() {
        let t = table(60, 10);
        t.record(RoutingKey(1), ReplicaTag(7));
        t.record(RoutingKey(1), ReplicaTag(8));
        assert_eq!(t.get(RoutingKey(1)), Some(ReplicaTag(8)));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn entry_expires_after_idle_ttl() {
        let t = table(60, 10);
        t.record(RoutingKey(1), ReplicaTag(7));
        t.clock.advance(59);
        assert_eq!(t.get(RoutingKey(1)), Some(ReplicaTag(7)));
        t.clock.advance(1);
        assert_eq!(t.get(RoutingKey(1)), None);
        assert_eq!(t.len(), 0, "an expired entry is removed when seen");
    }

    #[test]
    fn touching_an_entry_restarts_its_ttl() {
        let t = table(60, 10);
        t.record(RoutingKey(1), ReplicaTag(7));
        t.clock.advance(50);
        t.record(RoutingKey(1), ReplicaTag(7));
        t.clock.advance(50);
        assert_eq!(t.get(RoutingKey(1)), Some(ReplicaTag(7)));
    }

    #[test]
    fn purge_removes_only_expired_entries() {
        let t = table(60, 100);
        t.record(RoutingKey(1), ReplicaTag(1));
        t.clock.advance(30);
        t.record(RoutingKey(2), ReplicaTag(2));
        t.clock.advance(30);
        assert_eq!(t.purge_expired(), 1);
        assert_eq!(t.len(), 1);
        assert_eq!(t.get(RoutingKey(2)), Some(ReplicaTag(2)));
    }

    #[test]
    fn capacity_is_never_exceeded_and_the_oldest_go_first() {
        let t = table(3600, 1000);
        for k in 0..1000u64 {
            t.record(
                RoutingKey(k.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                ReplicaTag(0),
            );
        }
        t.clock.advance(1);
        for k in 1000..5000u64 {
            t.record(
                RoutingKey(k.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                ReplicaTag(1),
            );
            assert!(t.len() <= 1000, "len {} at insert {k}", t.len());
        }
        // Everything from the first second is older than anything after it.
        let old_left = (0..1000u64)
            .filter(|k| {
                t.get(RoutingKey(k.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
                    .is_some()
            })
            .count();
        assert_eq!(old_left, 0);
        assert_eq!(t.len(), t.map.len());
    }

    #[test]
    fn a_burst_in_one_second_evicts_a_fraction_not_everything() {
        let t = table(3600, 10_000);
        for k in 0..10_001u64 {
            t.record(
                RoutingKey(k.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                ReplicaTag(0),
            );
        }
        let len = t.len();
        assert!(
            (8000..=9500).contains(&len),
            "a sweep should leave about 7/8 of capacity, left {len}"
        );
        assert_eq!(len, t.map.len());
    }

    #[test]
    fn count_for_counts_live_entries_of_a_replica() {
        let t = table(60, 100);
        t.record(RoutingKey(1), ReplicaTag(1));
        t.record(RoutingKey(2), ReplicaTag(1));
        t.record(RoutingKey(3), ReplicaTag(2));
        assert_eq!(t.count_for(ReplicaTag(1)), 2);
        assert_eq!(t.remove(RoutingKey(1)), Some(ReplicaTag(1)));
        assert_eq!(t.count_for(ReplicaTag(1)), 1);
        let counts = t.counts_by_tag();
        assert_eq!(counts.get(&ReplicaTag(1)), Some(&1));
        assert_eq!(counts.get(&ReplicaTag(2)), Some(&1));
        assert_eq!(counts.get(&ReplicaTag(3)), None);
    }

    #[test]
    fn limits_change_live() {
        let t = table(60, 100);
        t.record(RoutingKey(1), ReplicaTag(1));
        t.clock.advance(30);
        assert_eq!(t.get(RoutingKey(1)), Some(ReplicaTag(1)));
        t.set_limits(Duration::from_secs(10), 50);
        assert_eq!(t.capacity(), 50);
        t.clock.advance(11);
        assert_eq!(t.get(RoutingKey(1)), None, "judged by the new TTL");
    }

    #[test]
    fn zero_ttl_and_capacity_are_clamped_to_one() {
        let t = table(0, 0);
        assert_eq!(t.capacity(), 1);
        t.record(RoutingKey(1), ReplicaTag(1));
        assert_eq!(t.get(RoutingKey(1)), Some(ReplicaTag(1)));
    }
}
