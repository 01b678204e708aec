//! Counters for the proxy's metrics: lock-free atomics written from any thread, read as a
//! [`StoreStats`] snapshot.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::error::StoreErrorKind;

/// Upper bounds of the lookup latency buckets, in microseconds (0.1 ms … 50 ms): a healthy
/// lookup lands in the first few, a timed-out one at `lookup_timeout`.
const LATENCY_BOUNDS_MICROS: [u64; 9] =
    [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000];

/// A counter per [`StoreErrorKind`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindCounts([u64; StoreErrorKind::ALL.len()]);

impl KindCounts {
    /// The count of `kind`.
    pub fn get(&self, kind: StoreErrorKind) -> u64 {
        self.0[kind.index()]
    }

    /// The sum over every kind.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// `(kind, count)` for every kind, zeros included (a metric series should exist before its
    /// first error).
    pub fn iter(&self) -> impl Iterator<Item = (StoreErrorKind, u64)> + '_ {
        StoreErrorKind::ALL
            .iter()
            .map(|&kind| (kind, self.get(kind)))
    }
}

/// Lookups by result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LookupCounts {
    /// Redis held a valid binding.
    pub found: u64,
    /// Redis answered that there is no binding.
    pub missing: u64,
    /// No answer could be used, by reason.
    pub unavailable: KindCounts,
}

/// One bucket of a Prometheus histogram.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HistogramBucket {
    /// Upper bound in seconds (the `le` label).
    pub le_seconds: f64,
    /// Observations at or below the bound (cumulative, as Prometheus wants).
    pub cumulative_count: u64,
}

/// Latency of lookups that were sent to Redis, in the shape of a Prometheus histogram: the
/// `+Inf` bucket is [`count`](Self::count).
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyHistogram {
    /// Finite buckets in increasing order.
    pub buckets: Vec<HistogramBucket>,
    /// Every observation.
    pub count: u64,
    /// Sum of the observations, in seconds.
    pub sum_seconds: f64,
}

/// A snapshot of the store's state and counters.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreStats {
    /// The command connection is up (the last check succeeded).
    pub connected: bool,
    /// The subscription to binding changes is up.
    pub subscribed: bool,
    /// Lookups by result.
    pub lookups: LookupCounts,
    /// Every failed operation by kind: lookups (also in [`lookups`](Self::lookups)), writes,
    /// connection attempts, health checks, and discarded garbage values or messages.
    pub errors: KindCounts,
    /// Writes (binds and touches) Redis accepted.
    pub writes_done: u64,
    /// Writes dropped: queue full, not connected, failed, or after shutdown.
    pub writes_dropped: u64,
    /// Binding changes received from other instances.
    pub remote_binds: u64,
    /// Lookup latency as the caller saw it (lookups answered at once because the store is
    /// disconnected are not in it).
    pub lookup_latency: LatencyHistogram,
}

#[derive(Debug, Default)]
struct KindCounters([AtomicU64; StoreErrorKind::ALL.len()]);

impl KindCounters {
    fn add(&self, kind: StoreErrorKind) {
        self.0[kind.index()].fetch_add(1, Relaxed);
    }

    fn snapshot(&self) -> KindCounts {
        KindCounts(std::array::from_fn(|i| self.0[i].load(Relaxed)))
    }
}

/// The live counters, shared by the handle and the store's thread.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub connected: AtomicBool,
    pub subscribed: AtomicBool,
    /// Connections and subscriptions established so far (see `StickyStore::epoch`).
    pub established: AtomicU64,
    found: AtomicU64,
    missing: AtomicU64,
    unavailable: KindCounters,
    errors: KindCounters,
    writes_done: AtomicU64,
    writes_dropped: AtomicU64,
    remote_binds: AtomicU64,
    /// One per finite bound, then `+Inf`; not cumulative (cumulated on snapshot).
    latency_buckets: [AtomicU64; LATENCY_BOUNDS_MICROS.len() + 1],
    latency_sum_nanos: AtomicU64,
}

impl Counters {
    pub(crate) fn found(&self) {
        self.found.fetch_add(1, Relaxed);
    }

    pub(crate) fn missing(&self) {
        self.missing.fetch_add(1, Relaxed);
    }

    pub(crate) fn unavailable(&self, kind: StoreErrorKind) {
        self.unavailable.add(kind);
        self.errors.add(kind);
    }

    pub(crate) fn error(&self, kind: StoreErrorKind) {
        self.errors.add(kind);
    }

    pub(crate) fn writes_done(&self, n: u64) {
        self.writes_done.fetch_add(n, Relaxed);
    }

    pub(crate) fn writes_dropped(&self, n: u64) {
        self.writes_dropped.fetch_add(n, Relaxed);
    }

    pub(crate) fn remote_bind(&self) {
        self.remote_binds.fetch_add(1, Relaxed);
    }

    pub(crate) fn observe_latency(&self, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BOUNDS_MICROS.partition_point(|&bound| bound < micros);
        self.latency_buckets[bucket].fetch_add(1, Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.latency_sum_nanos.fetch_add(nanos, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> StoreStats {
        let mut cumulative = 0;
        let buckets = LATENCY_BOUNDS_MICROS
            .iter()
            .zip(&self.latency_buckets)
            .map(|(&bound, count)| {
                cumulative += count.load(Relaxed);
                HistogramBucket {
                    le_seconds: bound as f64 / 1e6,
                    cumulative_count: cumulative,
                }
            })
            .collect();
        let over_last = self.latency_buckets[LATENCY_BOUNDS_MICROS.len()].load(Relaxed);
        StoreStats {
            connected: self.connected.load(Relaxed),
            subscribed: self.subscribed.load(Relaxed),
            lookups: LookupCounts {
                found: self.found.load(Relaxed),
                missing: self.missing.load(Relaxed),
                unavailable: self.unavailable.snapshot(),
            },
            errors: self.errors.snapshot(),
            writes_done: self.writes_done.load(Relaxed),
            writes_dropped: self.writes_dropped.load(Relaxed),
            remote_binds: self.remote_binds.load(Relaxed),
            lookup_latency: LatencyHistogram {
                buckets,
                count: cumulative + over_last,
                sum_seconds: self.latency_sum_nanos.load(Relaxed) as f64 / 1e9,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_land_in_cumulative_buckets_with_the_bound_inclusive() {
        let counters = Counters::default();
        for micros in [50, 100, 101, 4_000, 60_000] {
            counters.observe_latency(Duration::from_micros(micros));
        }
        let histogram = counters.snapshot().lookup_latency;
        let cumulative: Vec<u64> = histogram
            .buckets
            .iter()
            .map(|b| b.cumulative_count)
            .collect();
        assert_eq!(cumulative, [2, 3, 3, 3, 3, 4, 4, 4, 4]);
        assert_eq!(histogram.buckets[0].le_seconds, 0.0001);
        assert_eq!(histogram.buckets[8].le_seconds, 0.05);
        assert_eq!(histogram.count, 5);
        assert!((histogram.sum_seconds - 0.064251).abs() < 1e-9);
    }

    #[test]
    fn unavailable_lookups_also_count_as_errors() {
        let counters = Counters::default();
        counters.unavailable(StoreErrorKind::Timeout);
        counters.error(StoreErrorKind::Connect);
        let stats = counters.snapshot();
        assert_eq!(stats.lookups.unavailable.get(StoreErrorKind::Timeout), 1);
        assert_eq!(stats.lookups.unavailable.total(), 1);
        assert_eq!(stats.errors.get(StoreErrorKind::Timeout), 1);
        assert_eq!(stats.errors.get(StoreErrorKind::Connect), 1);
        assert_eq!(stats.errors.iter().count(), StoreErrorKind::ALL.len());
    }
}
