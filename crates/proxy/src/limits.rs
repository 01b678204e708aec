//! Per-tenant limits: a request rate, a new-session rate and a concurrency cap.
//!
//! Pure bookkeeping, with time passed in: no Pingora, no clock of its own. The proxy keeps one
//! [`TenantUsage`] per tenant id across reloads (so a reload neither refills buckets nor
//! forgets requests in flight) and judges each request against the limits of the snapshot it
//! routes on, so new limits apply from the next request.
//!
//! The rates are token buckets written as GCRA (the generic cell rate algorithm): one atomic
//! "theoretical arrival time" per bucket instead of a token count and a refill time, so taking
//! a token is one compare-and-swap with no lock, and a rate that changes with a reload simply
//! applies to the next take. Not the `governor` crate: its quotas are fixed when a limiter is
//! built (a reload would rebuild, and so refill, every bucket), and it brings its own clock and
//! keyed-map machinery for what is here two atomics per tenant.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tether_metering::Limit;
use tether_topology::{Rate, TenantLimits};

/// A token bucket, lock-free.
#[derive(Debug, Default)]
pub struct TokenBucket {
    /// Nanoseconds (on the caller's clock) at which the bucket will be full again; at or
    /// before now means full.
    full_at_ns: AtomicU64,
}

/// Nanoseconds between tokens at `rate` (at least 1).
fn interval_ns(rate: Rate) -> u64 {
    // Saturating float → integer conversion is intended: validated rates lie in (0, 1e6].
    ((1e9 / rate.per_second) as u64).max(1)
}

impl TokenBucket {
    /// Takes one token at `now` (time since the caller's epoch): `Err(wait)` when the bucket
    /// is empty, `wait` being how long until a token is there.
    pub fn take(&self, now: Duration, rate: Rate) -> Result<(), Duration> {
        let now_ns = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
        let interval = interval_ns(rate);
        let capacity_ns = interval.saturating_mul(u64::from(rate.burst));
        let mut full_at = self.full_at_ns.load(Ordering::Relaxed);
        loop {
            let after = full_at.max(now_ns).saturating_add(interval);
            let debt = after - now_ns;
            if debt > capacity_ns {
                return Err(Duration::from_nanos(debt - capacity_ns));
            }
            match self.full_at_ns.compare_exchange_weak(
                full_at,
                after,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(current) => full_at = current,
            }
        }
    }
}

/// What one tenant is using: its buckets and its requests in flight.
#[derive(Debug, Default)]
pub struct TenantUsage {
    requests: TokenBucket,
    new_sessions: TokenBucket,
    in_flight: AtomicU32,
    /// Bytes of this tenant's request bodies held (see [`crate::body_budget`]).
    body_bytes: AtomicUsize,
}

/// A tenant's request counted in flight until it drops.
#[derive(Debug)]
pub struct InFlightPermit(Arc<TenantUsage>);

impl Drop for InFlightPermit {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request refused by a limit, and how long its client should wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// Which limit.
    pub limit: Limit,
    /// Until a retry may pass (a concurrency refusal has no such time: one second).
    pub retry_after: Duration,
}

impl Refused {
    /// Whole seconds for `Retry-After`, rounded up, at least 1.
    pub fn retry_after_secs(&self) -> u32 {
        let secs = self.retry_after.as_secs() + u64::from(self.retry_after.subsec_nanos() > 0);
        u32::try_from(secs.max(1)).unwrap_or(u32::MAX)
    }
}

impl TenantUsage {
    /// Admits one request under `limits` at `now`: counts it in flight (for as long as the
    /// permit lives) and takes a request token. A request refused takes neither.
    pub fn admit(
        self: &Arc<Self>,
        limits: &TenantLimits,
        now: Duration,
    ) -> Result<Option<InFlightPermit>, Refused> {
        let permit = match limits.max_concurrent {
            None => None,
            Some(max) => {
                let entered =
                    self.in_flight
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                            (n < max.get()).then_some(n + 1)
                        });
                if entered.is_err() {
                    return Err(Refused {
                        limit: Limit::Concurrency,
                        retry_after: Duration::from_secs(1),
                    });
                }
                Some(InFlightPermit(Arc::clone(self)))
            }
        };
        if let Some(rate) = limits.requests {
            // On refusal the permit drops here, leaving the count as it was.
            self.requests.take(now, rate).map_err(|wait| Refused {
                limit: Limit::Requests,
                retry_after: wait,
            })?;
        }
        Ok(permit)
    }

    /// Takes a new-session token under `limits` at `now` (for a request whose session no
    /// instance knows).
    pub fn start_session(&self, limits: &TenantLimits, now: Duration) -> Result<(), Refused> {
        match limits.new_sessions {
            None => Ok(()),
            Some(rate) => self.new_sessions.take(now, rate).map_err(|wait| Refused {
                limit: Limit::NewSessions,
                retry_after: wait,
            }),
        }
    }

    /// Bytes of this tenant's request bodies held now.
    pub fn body_bytes(&self) -> &AtomicUsize {
        &self.body_bytes
    }

    /// Requests in flight counted against `max_concurrent`.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// Every tenant's [`TenantUsage`] by id, kept across reloads.
#[derive(Debug, Default)]
pub struct TenantUsages(Mutex<HashMap<Arc<str>, Arc<TenantUsage>>>);

impl TenantUsages {
    /// Keeps the usage of exactly the tenants `ids` (creating the new ones, forgetting the
    /// removed ones: their requests in flight hold their own reference) and returns it, in
    /// the order of `ids`. Called when a generation is built, off the request path.
    pub fn renew<'a>(&self, ids: impl IntoIterator<Item = &'a str>) -> Vec<Arc<TenantUsage>> {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut kept = HashMap::with_capacity(map.len());
        let usages = ids
            .into_iter()
            .map(|id| {
                let usage = map.remove(id).unwrap_or_default();
                kept.insert(Arc::from(id), Arc::clone(&usage));
                usage
            })
            .collect();
        // Duplicate ids (never in a validated topology) would share one entry.
        *map = kept;
        usages
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;

    fn rate(per_second: f64, burst: u32) -> Rate {
        Rate { per_second, burst }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_full_bucket_admits_its_burst_at_once_then_one_per_interval() {
        let b = TokenBucket::default();
        let r = rate(10.0, 3);
        let start = Duration::from_secs(100);
        for _ in 0..3 {
            assert_eq!(b.take(start, r), Ok(()));
        }
        assert_eq!(b.take(start, r), Err(ms(100)));
        assert_eq!(b.take(start + ms(99), r), Err(ms(1)));
        assert_eq!(b.take(start + ms(100), r), Ok(()));
        assert_eq!(b.take(start + ms(100), r), Err(ms(100)));
    }

    #[test]
    fn an_idle_bucket_refills_to_its_burst_and_no_further() {
        let b = TokenBucket::default();
        let r = rate(2.0, 4);
        let t = Duration::from_secs(10);
        for _ in 0..4 {
            b.take(t, r).unwrap();
        }
        assert!(b.take(t, r).is_err());
        // An hour idle refills four tokens, not 7,200.
        let later = t + Duration::from_secs(3600);
        for _ in 0..4 {
            assert_eq!(b.take(later, r), Ok(()));
        }
        assert_eq!(b.take(later, r), Err(ms(500)));
    }

    #[test]
    fn a_refused_take_costs_nothing() {
        let b = TokenBucket::default();
        let r = rate(1.0, 1);
        let t = Duration::from_secs(5);
        b.take(t, r).unwrap();
        for _ in 0..1000 {
            assert!(b.take(t, r).is_err());
        }
        assert_eq!(b.take(t + Duration::from_secs(1), r), Ok(()));
    }

    #[test]
    fn sustained_traffic_is_held_to_the_rate() {
        let b = TokenBucket::default();
        let r = rate(50.0, 10);
        // Offered: one request a millisecond for ten seconds.
        let admitted = (0..=10_000)
            .filter(|i| b.take(Duration::from_secs(1) + ms(*i), r).is_ok())
            .count();
        // 10 s × 50/s (the last request is at 10 s exactly), plus the burst.
        assert_eq!(admitted, 510);
    }

    #[test]
    fn a_new_rate_applies_to_the_next_take() {
        let b = TokenBucket::default();
        let t = Duration::from_secs(1);
        b.take(t, rate(1.0, 1)).unwrap();
        assert!(b.take(t, rate(1.0, 1)).is_err());
        // A reload raised the burst: the same bucket now has room.
        assert_eq!(b.take(t, rate(1.0, 5)), Ok(()));
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds_of_at_least_one() {
        let r = |retry_after| Refused {
            limit: Limit::Requests,
            retry_after,
        };
        assert_eq!(r(ms(1)).retry_after_secs(), 1);
        assert_eq!(r(Duration::ZERO).retry_after_secs(), 1);
        assert_eq!(r(ms(1001)).retry_after_secs(), 2);
        assert_eq!(r(Duration::from_secs(3)).retry_after_secs(), 3);
    }

    #[test]
    fn concurrency_is_capped_and_released_when_a_permit_drops() {
        let usage = Arc::new(TenantUsage::default());
        let limits = TenantLimits {
            max_concurrent: NonZeroU32::new(2),
            ..TenantLimits::default()
        };
        let t = Duration::from_secs(1);
        let a = usage.admit(&limits, t).unwrap();
        let b = usage.admit(&limits, t).unwrap();
        assert!(a.is_some() && b.is_some());
        assert_eq!(
            usage.admit(&limits, t).unwrap_err().limit,
            Limit::Concurrency
        );
        assert_eq!(usage.in_flight(), 2);
        drop(a);
        assert_eq!(usage.in_flight(), 1);
        assert!(usage.admit(&limits, t).is_ok());
    }

    #[test]
    fn a_request_refused_by_its_rate_is_not_counted_in_flight() {
        let usage = Arc::new(TenantUsage::default());
        let limits = TenantLimits {
            requests: Some(rate(1.0, 1)),
            max_concurrent: NonZeroU32::new(10),
            ..TenantLimits::default()
        };
        let t = Duration::from_secs(1);
        let _first = usage.admit(&limits, t).unwrap();
        let refused = usage.admit(&limits, t).unwrap_err();
        assert_eq!(refused.limit, Limit::Requests);
        assert_eq!(refused.retry_after, Duration::from_secs(1));
        assert_eq!(usage.in_flight(), 1);
    }

    #[test]
    fn no_limits_admit_everything_without_a_permit() {
        let usage = Arc::new(TenantUsage::default());
        let none = TenantLimits::default();
        for i in 0..10_000 {
            assert!(usage.admit(&none, ms(i)).unwrap().is_none());
            assert_eq!(usage.start_session(&none, ms(i)), Ok(()));
        }
        assert_eq!(usage.in_flight(), 0);
    }

    #[test]
    fn new_sessions_have_their_own_bucket() {
        let usage = Arc::new(TenantUsage::default());
        let limits = TenantLimits {
            requests: Some(rate(100.0, 100)),
            new_sessions: Some(rate(1.0, 2)),
            ..TenantLimits::default()
        };
        let t = Duration::from_secs(1);
        assert_eq!(usage.start_session(&limits, t), Ok(()));
        assert_eq!(usage.start_session(&limits, t), Ok(()));
        let refused = usage.start_session(&limits, t).unwrap_err();
        assert_eq!(refused.limit, Limit::NewSessions);
        // Requests of known sessions still pass.
        assert!(usage.admit(&limits, t).is_ok());
    }

    #[test]
    fn usage_outlives_a_reload_for_kept_tenants_only() {
        let usages = TenantUsages::default();
        let first = usages.renew(["acme", "globex"]);
        let limits = TenantLimits {
            max_concurrent: NonZeroU32::new(1),
            ..TenantLimits::default()
        };
        let _in_flight = first[0].admit(&limits, ms(0)).unwrap();
        let second = usages.renew(["acme", "initech"]);
        assert!(Arc::ptr_eq(&first[0], &second[0]), "acme keeps its count");
        assert_eq!(second[0].in_flight(), 1);
        assert!(!Arc::ptr_eq(&first[1], &second[1]));
        let third = usages.renew(["globex"]);
        assert!(
            !Arc::ptr_eq(&first[1], &third[0]),
            "globex was removed in between"
        );
    }

    #[test]
    fn threads_sharing_a_bucket_take_exactly_its_burst() {
        let b = TokenBucket::default();
        let r = rate(1.0, 1000);
        let t = Duration::from_secs(1);
        let taken: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..1000).filter(|_| b.take(t, r).is_ok()).count()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(taken, 1000);
    }
}
