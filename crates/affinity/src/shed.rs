//! Sticky shedding: moving a few warm sessions off a replica that carries far more than its
//! share of the traffic.
//!
//! The bounded-load rule steers every *new* session, but a sticky session stays where its KV
//! cache is, because moving it costs a full prefill. When the sessions placed on one replica
//! turn out to be much longer than the rest (a hot tenant), that replica keeps their load for
//! their whole life: in the hot-spot benchmark, up to 1.82× the fleet's mean. With
//! `affinity.shed_factor` set, a replica that has served more than `shed_factor` × the fleet's
//! mean (per unit of weight, recently) for [`PERSIST_MS`] gives up one sticky session — the
//! next one to arrive — every [`COOLDOWN_MS`], to the least-loaded eligible replica, until it is
//! back under the limit.
//!
//! One session at a time, and only after the excess has lasted, because each move costs that
//! session its cache and, under cache pressure, the caches of the sessions it lands beside: on
//! fleets whose caches hold one or two conversations it costs points of hit ratio where balance
//! was already good (docs/performance.md). So it is off by default and an operator's choice (docs/performance.md).
//!
//! [`ReplicaLoad`] is one replica's record, atomics only, like [`crate::TenantWarmth`].

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::warmth::{bump, read_decayed, tick, TICK_MS};

/// Time constant of the sent-request count, ms: long enough that a replica's count is a
/// few dozen requests at ordinary rates (noise well under the limit's margin), short enough to
/// follow a hot spot within seconds.
pub const SENT_WINDOW_MS: u64 = 10_000;
/// How long a replica must stay over the limit before its first shed, ms.
pub const PERSIST_MS: u64 = 2_000;
/// At most one shed per replica (per edge) this often, ms. Shorter than the count's window,
/// so a hot replica may shed a session or two more than needed before its count shows the
/// first move; a cooldown as long as the window left the hot spot at 1.44 max/mean instead of
/// 1.17–1.39 in loadgen runs.
pub const COOLDOWN_MS: u64 = 1_000;
/// An excess not seen for this long is stale (the replica got no sticky request, was out of
/// rotation, or shedding was off), and the [`PERSIST_MS`] wait starts again.
const STALE_MS: u64 = 1_000;
/// Below this many recent requests (per unit of weight) a replica is never over the limit: at
/// start-up a handful of requests would make any ratio look extreme.
pub const MIN_SHED_LOAD: f64 = 4.0;

/// One replica's recent load and shedding state (see the module docs).
#[derive(Debug, Default)]
pub struct ReplicaLoad {
    /// Keyed requests sent to the replica (attempts), decayed with [`SENT_WINDOW_MS`] (`f32 bits << 32 | tick`).
    sent: AtomicU64,
    /// Tick since which the replica has been over the limit; 0 = it is not.
    over_since: AtomicU32,
    /// Tick it was last seen over the limit.
    last_over: AtomicU32,
    /// Tick of the last shed; 0 = never.
    last_shed: AtomicU32,
}

impl ReplicaLoad {
    /// An empty record.
    pub fn new() -> Self {
        Self::default()
    }

    /// Notes a request sent to the replica at `now_ms` (any monotonic milliseconds).
    pub fn record_sent(&self, now_ms: u64) {
        bump(&self.sent, now_ms, SENT_WINDOW_MS);
    }

    /// Requests sent recently: each counts `exp(-age / SENT_WINDOW_MS)`.
    pub fn recent_sent(&self, now_ms: u64) -> f64 {
        read_decayed(&self.sent, now_ms, SENT_WINDOW_MS)
    }

    /// Notes whether the replica is `over` the limit at `now_ms`, and claims a shed: true when
    /// it has been seen over for [`PERSIST_MS`] (with no gap of more than a second between
    /// sightings) and the last shed was [`COOLDOWN_MS`] ago or more.
    /// Of two threads racing for one shed, one wins.
    pub fn claim_shed(&self, over: bool, now_ms: u64) -> bool {
        let now = tick(now_ms);
        let since = self.over_since.load(Ordering::Relaxed);
        if !over {
            if since != 0 {
                self.over_since.store(0, Ordering::Relaxed);
            }
            return false;
        }
        let elapsed = |from: u32| u64::from(now.saturating_sub(from)) * TICK_MS;
        let last_over = self.last_over.load(Ordering::Relaxed);
        if last_over != now {
            self.last_over.store(now, Ordering::Relaxed);
        }
        if since == 0 || elapsed(last_over) > STALE_MS {
            self.over_since.store(now, Ordering::Relaxed);
            return false;
        }
        if elapsed(since) < PERSIST_MS {
            return false;
        }
        let last = self.last_shed.load(Ordering::Relaxed);
        if last != 0 && elapsed(last) < COOLDOWN_MS {
            return false;
        }
        self.last_shed
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngSeed};

    #[test]
    fn sent_requests_decay_with_the_window() {
        let load = ReplicaLoad::new();
        assert_eq!(load.recent_sent(1_000), 0.0);
        for _ in 0..10 {
            load.record_sent(1_000);
        }
        assert!((load.recent_sent(1_000) - 10.0).abs() < 1e-3);
        let later = load.recent_sent(1_000 + SENT_WINDOW_MS);
        assert!((later - 10.0 / std::f64::consts::E).abs() < 0.01, "{later}");
    }

    /// Sees the replica over the limit every 500 ms from `from` up to and excluding `to`; no
    /// shed is claimed on the way.
    fn over_until(load: &ReplicaLoad, from: u64, to: u64) {
        for t in (from..to).step_by(500) {
            assert!(!load.claim_shed(true, t), "claimed at {t}");
        }
    }

    #[test]
    fn a_shed_needs_a_lasting_excess_and_then_one_per_cooldown() {
        let load = ReplicaLoad::new();
        let t0 = 50_000;
        over_until(&load, t0, t0 + PERSIST_MS);
        assert!(!load.claim_shed(true, t0 + PERSIST_MS - TICK_MS));
        assert!(
            load.claim_shed(true, t0 + PERSIST_MS),
            "over for PERSIST_MS"
        );
        assert!(!load.claim_shed(true, t0 + PERSIST_MS), "one per cooldown");
        assert!(!load.claim_shed(true, t0 + PERSIST_MS + COOLDOWN_MS - TICK_MS));
        assert!(load.claim_shed(true, t0 + PERSIST_MS + COOLDOWN_MS));
        // Back under the limit: the excess must last again before the next shed.
        let t1 = t0 + PERSIST_MS + COOLDOWN_MS + 500;
        assert!(!load.claim_shed(false, t1));
        over_until(&load, t1 + TICK_MS, t1 + TICK_MS + PERSIST_MS);
        assert!(load.claim_shed(true, t1 + TICK_MS + PERSIST_MS));
    }

    #[test]
    fn an_excess_not_seen_for_a_while_waits_again() {
        let load = ReplicaLoad::new();
        assert!(!load.claim_shed(true, 10_000));
        // Seen over at the start and then not at all (no sticky traffic, out of rotation):
        // the first sighting later is a new excess, not one that lasted.
        let later = 10_000 + 5 * PERSIST_MS;
        over_until(&load, later, later + PERSIST_MS);
        assert!(load.claim_shed(true, later + PERSIST_MS));
    }

    #[test]
    fn racing_threads_claim_one_shed() {
        let load = std::sync::Arc::new(ReplicaLoad::new());
        over_until(&load, 1_000, 1_000 + PERSIST_MS);
        let wins: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let load = &load;
                    s.spawn(move || usize::from(load.claim_shed(true, 1_000 + PERSIST_MS)))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        assert_eq!(wins, 1);
    }

    /// The times among `times` at which a replica seen over the limit at each of them, in
    /// order, wins a shed.
    fn claims(load: &ReplicaLoad, times: impl IntoIterator<Item = u64>) -> Vec<u64> {
        times
            .into_iter()
            .filter(|&t| load.claim_shed(true, t))
            .collect()
    }

    #[test]
    fn a_lasting_excess_sheds_first_at_persist_ms_then_once_per_cooldown() {
        // Seen over every 10 ms for 10 s, from a tick boundary.
        let (t0, run) = (20_000, 10_000);
        let shed = claims(&ReplicaLoad::new(), (t0..t0 + run).step_by(10));
        let want: Vec<u64> = (t0 + PERSIST_MS..t0 + run)
            .step_by(COOLDOWN_MS as usize)
            .collect();
        assert_eq!(shed, want);
        assert!(shed.len() as u64 <= run / COOLDOWN_MS + 1);
    }

    #[test]
    fn time_is_kept_in_ticks_so_a_wait_can_end_up_to_a_tick_early() {
        // First seen 50 ms into a tick: the wait counts from the tick's start.
        let t0 = 20_050;
        let shed = claims(&ReplicaLoad::new(), (t0..t0 + 3_500).step_by(10));
        assert_eq!(
            shed,
            [t0 - 50 + PERSIST_MS, t0 - 50 + PERSIST_MS + COOLDOWN_MS]
        );
        assert!(shed[0] >= t0 + PERSIST_MS - TICK_MS);
    }

    #[test]
    fn a_sighting_under_the_limit_before_persist_ms_restarts_the_wait() {
        let load = ReplicaLoad::new();
        let t0 = 30_000;
        over_until(&load, t0, t0 + 1_500);
        assert!(!load.claim_shed(false, t0 + 1_500));
        // Over again at once: PERSIST_MS from here, not from t0.
        let t1 = t0 + 1_600;
        assert_eq!(
            claims(&load, (t1..=t1 + PERSIST_MS).step_by(100)),
            [t1 + PERSIST_MS]
        );
    }

    #[test]
    fn an_excess_survives_gaps_of_up_to_stale_ms_between_sightings_and_no_more() {
        let t0 = 40_000;
        // Seen once every STALE_MS: one excess, which lasts.
        let shed = claims(
            &ReplicaLoad::new(),
            (t0..=t0 + PERSIST_MS).step_by(STALE_MS as usize),
        );
        assert_eq!(shed, [t0 + PERSIST_MS]);
        // Seen once every STALE_MS and a tick: every sighting starts a new excess.
        let shed = claims(
            &ReplicaLoad::new(),
            (t0..t0 + 10 * PERSIST_MS).step_by((STALE_MS + TICK_MS) as usize),
        );
        assert_eq!(shed, [] as [u64; 0]);
    }

    fn config(cases: u32) -> Config {
        Config {
            cases,
            // Fixed seed: deterministic CI; no regression files written into the tree.
            rng_seed: RngSeed::Fixed(0x5_4ed),
            failure_persistence: None,
            ..Config::default()
        }
    }

    proptest! {
        #![proptest_config(config(512))]

        /// Whatever the sightings (any spacing, over or not), every shed ends an unbroken
        /// excess of PERSIST_MS, two sheds are COOLDOWN_MS apart, and a run of N ms sheds at
        /// most N / COOLDOWN_MS + 1 times. In ticks, as the record keeps time.
        #[test]
        fn sheds_follow_a_lasting_excess_and_the_cooldown_for_any_sightings(
            steps in prop::collection::vec(
                (prop_oneof![4 => 1u64..300, 1 => 300u64..1_500], prop::bool::weighted(0.97)),
                1..400,
            )
        ) {
            let ticks = |ms: u64| ms / TICK_MS;
            let load = ReplicaLoad::new();
            let (start, mut now) = (10_000, 10_000);
            let mut seen: Vec<(u64, bool)> = Vec::new();
            let mut sheds = Vec::new();
            for (dt, over) in steps {
                now += dt;
                if load.claim_shed(over, now) {
                    prop_assert!(over, "shed while under the limit at {now}");
                    sheds.push(seen.len());
                }
                seen.push((now, over));
            }
            for &i in &sheds {
                // Back from the shed while seen over with no stale gap: where the excess began.
                let mut first = i;
                while first > 0
                    && seen[first - 1].1
                    && ticks(seen[first].0) - ticks(seen[first - 1].0) <= ticks(STALE_MS)
                {
                    first -= 1;
                }
                prop_assert!(
                    ticks(seen[i].0) - ticks(seen[first].0) >= ticks(PERSIST_MS),
                    "shed at {} after an excess seen since {}", seen[i].0, seen[first].0
                );
            }
            for pair in sheds.windows(2) {
                let (a, b) = (seen[pair[0]].0, seen[pair[1]].0);
                prop_assert!(ticks(b) - ticks(a) >= ticks(COOLDOWN_MS), "sheds at {a} and {b}");
            }
            prop_assert!(sheds.len() as u64 <= (now - start) / COOLDOWN_MS + 1);
        }
    }
}
