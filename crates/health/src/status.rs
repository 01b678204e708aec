//! The live status of one replica: in-flight count, admin drain, and the health state machine.
//!
//! Everything is atomics: the proxy reads it for every routing decision without a lock, and
//! the writers (request outcomes on the proxy threads, the probe loop) never wait on each other.
//! Time is passed in as milliseconds on a monotonic clock ([`now_ms`]) so every transition is a
//! pure function of its inputs and testable without sleeping.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use tether_engine::{Capacity, EngineReading, Load};
use tokio::sync::Notify;

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Milliseconds on the process's monotonic clock (0 at first use). Never 0 after the first
/// millisecond, which the state machine uses as "not set".
pub fn now_ms() -> u64 {
    u64::try_from(EPOCH.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// How failures, probes and overload signals change a replica's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthPolicy {
    /// Active probes run (otherwise an ejected replica returns when its cooldown ends).
    pub probes: bool,
    /// Consecutive successful probes that bring a probe-failed replica back.
    pub rise: u32,
    /// Consecutive failed probes that take a replica out.
    pub fall: u32,
    /// Consecutive failed requests (connect error, timeout, 5xx) that eject a replica.
    pub eject_after: u32,
    /// The first ejection's length; each further ejection without a success in between
    /// doubles it.
    pub eject_cooldown: Duration,
    /// Longest ejection.
    pub eject_max_cooldown: Duration,
    /// How long a 429/503 without a usable `Retry-After` marks the replica overloaded.
    pub overload_default: Duration,
    /// Longest honoured `Retry-After`.
    pub overload_max: Duration,
    /// Age past which an engine reading is ignored (the prober stopped reading it).
    pub engine_max_age: Duration,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            probes: true,
            rise: 2,
            fall: 2,
            eject_after: 3,
            eject_cooldown: Duration::from_secs(5),
            eject_max_cooldown: Duration::from_secs(60),
            overload_default: Duration::from_secs(1),
            overload_max: Duration::from_secs(60),
            engine_max_age: Duration::from_secs(10),
        }
    }
}

impl HealthPolicy {
    /// The length of ejection number `level` (0-based): the cooldown doubled `level` times,
    /// capped.
    pub fn cooldown(&self, level: u32) -> Duration {
        let factor = 1u32.checked_shl(level.min(31)).unwrap_or(u32::MAX);
        self.eject_cooldown
            .checked_mul(factor)
            .unwrap_or(Duration::MAX)
            .min(self.eject_max_cooldown)
    }
}

/// What routing sees of a replica, in the order the checks apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthState {
    /// Takes traffic.
    Healthy,
    /// Drained through the admin API: no new sessions, existing ones move on their next turn.
    Drained,
    /// Failed `fall` probes in a row; back after `rise` successes.
    Unhealthy,
    /// Ejected after `eject_after` failed requests, until `until_ms` (and, with probes, until
    /// a probe succeeds after that).
    Ejected {
        /// End of the cooldown, on the [`now_ms`] clock.
        until_ms: u64,
    },
    /// Answered 429/503: out until `until_ms`.
    Overloaded {
        /// End of the overload, on the [`now_ms`] clock.
        until_ms: u64,
    },
}

impl HealthState {
    /// Lower-case name for the admin API and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            HealthState::Healthy => "healthy",
            HealthState::Drained => "drained",
            HealthState::Unhealthy => "unhealthy",
            HealthState::Ejected { .. } => "ejected",
            HealthState::Overloaded { .. } => "overloaded",
        }
    }
}

/// A change worth logging and counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Probes took the replica out.
    ProbeDown,
    /// Probes brought it back.
    ProbeUp,
    /// Failed requests ejected it, for this long.
    Ejected(Duration),
    /// A probe after the cooldown failed: ejected again, for this long.
    EjectionExtended(Duration),
    /// It returned from an ejection.
    Returned,
}

/// Live per-replica state. Shared by tag, so it outlives topology reloads: a reload neither
/// resets a replica's health nor loses its in-flight count.
#[derive(Debug)]
pub struct ReplicaStatus {
    inflight: AtomicU32,
    drained: AtomicBool,
    probe_ok: AtomicBool,
    /// Consecutive probe results of the current kind (successes while out, failures while in).
    probe_streak: AtomicU32,
    consecutive_failures: AtomicU32,
    /// End of the current ejection; 0 = not ejected.
    ejected_until: AtomicU64,
    /// Ejections since the last success: the backoff level.
    ejections: AtomicU32,
    /// End of the current overload; 0 = not overloaded.
    overloaded_until: AtomicU64,
    ejections_total: AtomicU64,
    /// Times the replica left rotation by its own doing (probe `fall`, ejection) or by an
    /// immediate admin drain: requests still waiting for its answer compare it with the value
    /// they started with.
    departures: AtomicU64,
    /// Woken on every departure, so those requests need not wait out their read timeout.
    departed: Arc<Notify>,
    engine: EngineGauge,
}

/// The latest engine reading, as atomics: the prober writes it once per round, routing reads
/// it on every new placement. Fields are written one by one, so a reader may see a mix of two
/// consecutive readings: each is a hint, and two rounds differ little.
#[derive(Debug, Default)]
struct EngineGauge {
    /// When it was read, on the [`now_ms`] clock; 0 = no reading.
    read_at: AtomicU64,
    /// 0 = unknown.
    sequences: AtomicU32,
    /// 0 = unknown.
    kv_blocks: AtomicU64,
    running: AtomicU32,
    waiting: AtomicU32,
    /// KV usage in millionths; `u32::MAX` = unknown.
    kv_usage_ppm: AtomicU32,
}

impl Default for ReplicaStatus {
    fn default() -> Self {
        ReplicaStatus {
            inflight: AtomicU32::new(0),
            drained: AtomicBool::new(false),
            // Optimistic start: a dead replica is found by its first connect failures (which
            // are retried elsewhere) and by `fall` probes, without holding up start-up.
            probe_ok: AtomicBool::new(true),
            probe_streak: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            overloaded_until: AtomicU64::new(0),
            ejections_total: AtomicU64::new(0),
            departures: AtomicU64::new(0),
            departed: Arc::new(Notify::new()),
            engine: EngineGauge::default(),
        }
    }
}

impl ReplicaStatus {
    /// Stores what the replica's engine reported at `now`, or forgets the last reading
    /// (`None`: the engine did not answer, or is not read).
    pub fn record_engine(&self, reading: Option<&EngineReading>, now: u64) {
        let g = &self.engine;
        let Some(r) = reading else {
            g.read_at.store(0, Ordering::Relaxed);
            return;
        };
        g.sequences
            .store(r.capacity.sequences.unwrap_or(0), Ordering::Relaxed);
        g.kv_blocks
            .store(r.capacity.kv_blocks.unwrap_or(0), Ordering::Relaxed);
        g.running.store(r.load.running, Ordering::Relaxed);
        g.waiting.store(r.load.waiting, Ordering::Relaxed);
        let ppm = r
            .load
            .kv_usage
            .map_or(u32::MAX, |u| (u.clamp(0.0, 1.0) * 1e6) as u32);
        g.kv_usage_ppm.store(ppm, Ordering::Relaxed);
        g.read_at.store(now.max(1), Ordering::Relaxed);
    }

    /// The engine's latest reading if it is at most `max_age` old at `now`.
    pub fn engine(&self, now: u64, max_age: Duration) -> Option<EngineReading> {
        let g = &self.engine;
        let at = g.read_at.load(Ordering::Relaxed);
        if at == 0 || now.saturating_sub(at) > ms(max_age) {
            return None;
        }
        let known = |v: u32| (v != 0).then_some(v);
        let ppm = g.kv_usage_ppm.load(Ordering::Relaxed);
        Some(EngineReading {
            capacity: Capacity {
                sequences: known(g.sequences.load(Ordering::Relaxed)),
                kv_blocks: Some(g.kv_blocks.load(Ordering::Relaxed)).filter(|b| *b != 0),
            },
            load: Load {
                running: g.running.load(Ordering::Relaxed),
                waiting: g.waiting.load(Ordering::Relaxed),
                kv_usage: (ppm != u32::MAX).then(|| f64::from(ppm) / 1e6),
            },
        })
    }

    /// Requests in flight now.
    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Takes an in-flight slot, released when the guard drops.
    pub fn acquire(self: &Arc<Self>) -> InflightGuard {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        InflightGuard(Arc::clone(self))
    }

    /// Whether routing may send requests here now (new sessions and sticky ones alike).
    pub fn usable(&self, now: u64) -> bool {
        !self.drained.load(Ordering::Relaxed)
            && self.probe_ok.load(Ordering::Relaxed)
            && self.ejected_until.load(Ordering::Relaxed) == 0
            && self.overloaded_until.load(Ordering::Relaxed) <= now
    }

    /// The state as routing sees it.
    pub fn state(&self, now: u64) -> HealthState {
        let ejected_until = self.ejected_until.load(Ordering::Relaxed);
        let overloaded_until = self.overloaded_until.load(Ordering::Relaxed);
        if self.drained.load(Ordering::Relaxed) {
            HealthState::Drained
        } else if !self.probe_ok.load(Ordering::Relaxed) {
            HealthState::Unhealthy
        } else if ejected_until != 0 {
            HealthState::Ejected {
                until_ms: ejected_until,
            }
        } else if overloaded_until > now {
            HealthState::Overloaded {
                until_ms: overloaded_until,
            }
        } else {
            HealthState::Healthy
        }
    }

    /// Drains (or undrains) the replica; returns whether that changed anything.
    pub fn set_drained(&self, drained: bool) -> bool {
        self.drained.swap(drained, Ordering::Relaxed) != drained
    }

    /// Whether the admin API drained it.
    pub fn is_drained(&self) -> bool {
        self.drained.load(Ordering::Relaxed)
    }

    /// Ejections since start.
    pub fn ejections_total(&self) -> u64 {
        self.ejections_total.load(Ordering::Relaxed)
    }

    /// Departures so far (see [`ReplicaStatus::departed`]).
    pub fn departures(&self) -> u64 {
        self.departures.load(Ordering::Acquire)
    }

    /// Notified at each departure. A waiter reads [`ReplicaStatus::departures`] when its
    /// request is sent, enables a `notified()` future, then compares again.
    pub fn departed(&self) -> &Arc<Notify> {
        &self.departed
    }

    /// The replica left rotation: wakes every request still waiting for its answer.
    pub fn depart(&self) {
        self.departures.fetch_add(1, Ordering::AcqRel);
        self.departed.notify_waiters();
    }

    /// A request succeeded: the failure streak and the backoff level reset.
    pub fn record_success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        if self.ejected_until.load(Ordering::Relaxed) == 0 {
            self.ejections.store(0, Ordering::Relaxed);
        }
    }

    /// A request failed (connect error, timeout, 5xx). Ejects the replica after
    /// `eject_after` in a row.
    pub fn record_failure(&self, now: u64, policy: &HealthPolicy) -> Option<Transition> {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < policy.eject_after.max(1) {
            return None;
        }
        // Only one thread wins the ejection; the rest see it already ejected.
        let level = self.ejections.load(Ordering::Relaxed);
        let cooldown = policy.cooldown(level);
        let until = now.saturating_add(ms(cooldown)).max(1);
        self.ejected_until
            .compare_exchange(0, until, Ordering::Relaxed, Ordering::Relaxed)
            .ok()?;
        self.ejections.fetch_add(1, Ordering::Relaxed);
        self.ejections_total.fetch_add(1, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.depart();
        Some(Transition::Ejected(cooldown))
    }

    /// A 429 or 503: out until `retry_after` (or the default) has passed.
    pub fn record_overload(&self, now: u64, retry_after: Option<Duration>, policy: &HealthPolicy) {
        let wait = retry_after
            .filter(|d| !d.is_zero())
            .unwrap_or(policy.overload_default)
            .min(policy.overload_max);
        let until = now.saturating_add(ms(wait));
        self.overloaded_until.fetch_max(until, Ordering::Relaxed);
    }

    /// The result of an active probe. When a probe both ends or extends an ejection and flips
    /// the rise / fall verdict, the verdict is the transition returned.
    pub fn record_probe(&self, ok: bool, now: u64, policy: &HealthPolicy) -> Option<Transition> {
        // An ejected replica whose cooldown is over returns on its first good probe; a bad
        // one extends the ejection with the next, longer cooldown.
        let ejected_until = self.ejected_until.load(Ordering::Relaxed);
        let mut transition = None;
        if ejected_until != 0 && now >= ejected_until {
            if ok {
                self.ejected_until.store(0, Ordering::Relaxed);
                transition = Some(Transition::Returned);
            } else {
                let level = self.ejections.fetch_add(1, Ordering::Relaxed);
                let cooldown = policy.cooldown(level);
                self.ejected_until
                    .store(now.saturating_add(ms(cooldown)).max(1), Ordering::Relaxed);
                self.ejections_total.fetch_add(1, Ordering::Relaxed);
                transition = Some(Transition::EjectionExtended(cooldown));
            }
        }
        // Rise / fall: count results that disagree with the current verdict.
        let up = self.probe_ok.load(Ordering::Relaxed);
        if ok == up {
            self.probe_streak.store(0, Ordering::Relaxed);
            return transition;
        }
        let streak = self.probe_streak.fetch_add(1, Ordering::Relaxed) + 1;
        let needed = if up { policy.fall } else { policy.rise };
        if streak >= needed.max(1) {
            self.probe_ok.store(ok, Ordering::Relaxed);
            self.probe_streak.store(0, Ordering::Relaxed);
            if ok {
                self.consecutive_failures.store(0, Ordering::Relaxed);
            } else {
                self.depart();
            }
            return Some(if ok {
                Transition::ProbeUp
            } else {
                Transition::ProbeDown
            });
        }
        transition
    }

    /// Without probes, an ejection simply ends with its cooldown; one more failure then
    /// ejects again, for longer. Call before routing reads the status (cheap when not ejected).
    pub fn expire_ejection(&self, now: u64, policy: &HealthPolicy) -> Option<Transition> {
        if policy.probes {
            return None;
        }
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until == 0 || now < until {
            return None;
        }
        self.ejected_until
            .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed)
            .ok()?;
        // On probation: the next failure counts as the last straw.
        self.consecutive_failures
            .store(policy.eject_after.saturating_sub(1), Ordering::Relaxed);
        Some(Transition::Returned)
    }
}

/// Holds one in-flight slot of a replica; releases it when dropped, so no error path can leak
/// a count.
#[derive(Debug)]
pub struct InflightGuard(Arc<ReplicaStatus>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> HealthPolicy {
        HealthPolicy {
            probes: true,
            rise: 2,
            fall: 3,
            eject_after: 3,
            eject_cooldown: Duration::from_secs(5),
            eject_max_cooldown: Duration::from_secs(60),
            overload_default: Duration::from_secs(1),
            overload_max: Duration::from_secs(30),
            engine_max_age: Duration::from_secs(3),
        }
    }

    #[test]
    fn leaving_rotation_by_probes_or_ejection_is_a_departure_and_drain_or_overload_is_not() {
        let (s, p) = (ReplicaStatus::default(), policy());
        s.set_drained(true);
        s.record_overload(1_000, None, &p);
        assert_eq!(s.departures(), 0);
        for _ in 0..p.eject_after {
            s.record_failure(1_000, &p);
        }
        assert_eq!(s.departures(), 1, "ejected");
        let s = ReplicaStatus::default();
        for _ in 0..p.fall {
            s.record_probe(false, 1_000, &p);
        }
        assert_eq!(s.departures(), 1, "probes took it out");
        s.record_probe(false, 2_000, &p);
        assert_eq!(s.departures(), 1, "already out");
        s.depart();
        assert_eq!(s.departures(), 2, "an immediate drain");
    }

    #[test]
    fn a_fresh_replica_is_healthy_and_counts_in_flight() {
        let s = Arc::new(ReplicaStatus::default());
        assert!(s.usable(1));
        assert_eq!(s.state(1), HealthState::Healthy);
        let a = s.acquire();
        let b = s.acquire();
        assert_eq!(s.inflight(), 2);
        drop(a);
        drop(b);
        assert_eq!(s.inflight(), 0);
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_in_between_resets() {
        let (s, p) = (ReplicaStatus::default(), policy());
        assert_eq!(s.record_failure(10, &p), None);
        assert_eq!(s.record_failure(10, &p), None);
        s.record_success();
        assert_eq!(s.record_failure(10, &p), None);
        assert_eq!(s.record_failure(10, &p), None);
        assert_eq!(
            s.record_failure(10, &p),
            Some(Transition::Ejected(Duration::from_secs(5)))
        );
        assert!(!s.usable(11));
        assert_eq!(s.state(11), HealthState::Ejected { until_ms: 5_010 });
        assert_eq!(s.record_failure(12, &p), None, "already ejected");
        assert_eq!(s.ejections_total(), 1);
    }

    #[test]
    fn with_probes_the_first_good_probe_after_the_cooldown_returns_it() {
        let (s, p) = (ReplicaStatus::default(), policy());
        for _ in 0..3 {
            s.record_failure(0, &p);
        }
        assert_eq!(s.record_probe(true, 4_999, &p), None, "cooldown not over");
        assert!(!s.usable(4_999));
        assert_eq!(s.record_probe(true, 5_000, &p), Some(Transition::Returned));
        assert!(s.usable(5_000));
    }

    #[test]
    fn ejections_back_off_while_failures_continue_and_reset_after_a_success() {
        // A high `fall`, so the probe verdict itself stays up and only the ejection shows.
        let p = HealthPolicy {
            fall: 100,
            ..policy()
        };
        let s = ReplicaStatus::default();
        for _ in 0..3 {
            s.record_failure(0, &p);
        }
        // Probe after the cooldown fails: 10 s, then 20 s, 40 s, capped at 60 s.
        let mut now = 5_000;
        for expected in [10, 20, 40, 60, 60] {
            assert_eq!(
                s.record_probe(false, now, &p),
                Some(Transition::EjectionExtended(Duration::from_secs(expected)))
            );
            now += expected * 1000;
        }
        assert_eq!(s.record_probe(true, now, &p), Some(Transition::Returned));
        s.record_success();
        // A fresh streak starts from the base cooldown again.
        for _ in 0..3 {
            s.record_failure(now, &p);
        }
        assert_eq!(
            s.state(now),
            HealthState::Ejected {
                until_ms: now + 5_000
            }
        );
    }

    #[test]
    fn rise_and_fall_thresholds() {
        let (s, p) = (ReplicaStatus::default(), policy());
        assert_eq!(s.record_probe(false, 1, &p), None);
        assert_eq!(s.record_probe(false, 2, &p), None);
        assert_eq!(
            s.record_probe(true, 3, &p),
            None,
            "a success breaks the streak"
        );
        assert_eq!(s.record_probe(false, 4, &p), None);
        assert_eq!(s.record_probe(false, 5, &p), None);
        assert_eq!(s.record_probe(false, 6, &p), Some(Transition::ProbeDown));
        assert_eq!(s.state(6), HealthState::Unhealthy);
        assert_eq!(s.record_probe(true, 7, &p), None);
        assert_eq!(s.record_probe(true, 8, &p), Some(Transition::ProbeUp));
        assert!(s.usable(8));
    }

    #[test]
    fn overload_honours_retry_after_within_the_cap() {
        let (s, p) = (ReplicaStatus::default(), policy());
        s.record_overload(1_000, Some(Duration::from_secs(3)), &p);
        assert_eq!(s.state(1_000), HealthState::Overloaded { until_ms: 4_000 });
        assert!(!s.usable(3_999));
        assert!(s.usable(4_000));
        s.record_overload(10_000, None, &p);
        assert!(!s.usable(10_999));
        assert!(s.usable(11_000));
        s.record_overload(20_000, Some(Duration::from_secs(3600)), &p);
        assert!(s.usable(50_000), "capped at overload_max");
    }

    #[test]
    fn drain_wins_over_everything_and_reports_changes() {
        let s = ReplicaStatus::default();
        assert!(s.set_drained(true));
        assert!(!s.set_drained(true));
        assert_eq!(s.state(1), HealthState::Drained);
        assert!(!s.usable(1));
        assert!(s.set_drained(false));
        assert!(s.usable(1));
    }

    #[test]
    fn without_probes_the_cooldown_alone_returns_it_on_probation() {
        let p = HealthPolicy {
            probes: false,
            ..policy()
        };
        let s = ReplicaStatus::default();
        for _ in 0..3 {
            s.record_failure(0, &p);
        }
        assert_eq!(s.expire_ejection(4_999, &p), None);
        assert_eq!(s.expire_ejection(5_000, &p), Some(Transition::Returned));
        assert!(s.usable(5_000));
        // One more failure ejects again, for twice as long.
        assert_eq!(
            s.record_failure(5_001, &p),
            Some(Transition::Ejected(Duration::from_secs(10)))
        );
    }

    #[test]
    fn cooldown_never_overflows() {
        let p = policy();
        assert_eq!(p.cooldown(0), Duration::from_secs(5));
        assert_eq!(p.cooldown(1_000), Duration::from_secs(60));
        assert_eq!(p.cooldown(u32::MAX), Duration::from_secs(60));
    }

    #[test]
    fn an_engine_reading_is_kept_until_it_is_stale_or_forgotten() {
        let s = ReplicaStatus::default();
        let max_age = Duration::from_secs(3);
        assert_eq!(s.engine(1_000, max_age), None);
        let reading = EngineReading {
            capacity: Capacity {
                sequences: Some(2),
                kv_blocks: None,
            },
            load: Load {
                running: 1,
                waiting: 4,
                kv_usage: Some(0.25),
            },
        };
        s.record_engine(Some(&reading), 1_000);
        assert_eq!(s.engine(4_000, max_age), Some(reading));
        assert_eq!(s.engine(4_001, max_age), None, "stale");
        s.record_engine(Some(&reading), 5_000);
        s.record_engine(None, 5_500);
        assert_eq!(s.engine(5_500, max_age), None, "forgotten");
    }
}
