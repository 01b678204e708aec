//! Warm-follow: how often a turn is served where the session's previous turn was.
//!
//! Cache-hit ratios mix routing with cache pressure; warm-follow isolates routing. Over the turns
//! after a session's first, it is the share answered (`x-replica-id`) by the replica that
//! answered the session's previous turn. A tier of edges that agree on affinity keeps it near 1
//! whatever edge each turn lands on.
//!
//! A turn cannot follow a replica that went away. Loadgen cannot see eligibility, so whoever
//! takes replicas away (a test killing one, a bench draining one) records it in [`Excused`],
//! and the rate is also given over the turns whose previous replica was not excused at any
//! moment between sending the turn and its answer. Where replicas of a region share a KV cache,
//! affinity is to the region: [`FleetFacts::regions`] adds the same rate with "same replica"
//! read as "same region" (a region counts as excused while all its replicas are).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use crate::Outcome;

/// What the caller knows about the fleet that loadgen cannot see, for the warm-follow rates.
#[derive(Debug, Clone, Default)]
pub struct FleetFacts {
    /// Replica id → region, where a region's replicas share a KV cache. Empty = no region
    /// rate; a replica missing from a non-empty map is a region of its own.
    pub regions: BTreeMap<String, String>,
    /// When replicas were unavailable.
    pub excused: Excused,
}

/// When replicas were unavailable: a handle shared with the run, so a test can record a kill
/// as it happens.
///
/// ```
/// let excused = tether_loadgen::Excused::default();
/// let recorder = excused.clone(); // e.g. moved into the task that stops the replica
/// recorder.excuse("a-2");
/// let now = std::time::Instant::now();
/// assert!(excused.during("a-2", now, now));
/// recorder.restore("a-2");
/// ```
#[derive(Debug, Clone, Default)]
pub struct Excused(Arc<Mutex<BTreeMap<String, Vec<Interval>>>>);

/// From, and until (`None`: to the end of the run).
type Interval = (Instant, Option<Instant>);

impl Excused {
    /// `replica` is unavailable from now until [`restore`](Self::restore)d.
    pub fn excuse(&self, replica: &str) {
        self.excuse_during(replica, Instant::now(), None);
    }

    /// `replica` is available again from now (ends its open interval, if any).
    pub fn restore(&self, replica: &str) {
        let now = Instant::now();
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(intervals) = map.get_mut(replica) {
            for (_, until) in intervals.iter_mut().filter(|(_, u)| u.is_none()) {
                *until = Some(now);
            }
        }
    }

    /// `replica` is unavailable from `from` until `until` (`None`: to the end of the run).
    pub fn excuse_during(&self, replica: &str, from: Instant, until: Option<Instant>) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(replica.to_owned())
            .or_default()
            .push((from, until));
    }

    /// Whether `replica` was unavailable at any moment of `[from, to]`.
    pub fn during(&self, replica: &str, from: Instant, to: Instant) -> bool {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(replica).is_some_and(|intervals| {
            intervals
                .iter()
                .any(|&(start, end)| start <= to && end.is_none_or(|end| end > from))
        })
    }
}

/// One warm-follow rate.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct WarmFollow {
    /// Turns after a session's first where this turn and the previous one both named their
    /// replica.
    pub turns: u64,
    /// Of those, answered by the previous turn's replica (or region).
    pub warm: u64,
    /// `warm / turns`.
    pub raw_rate: f64,
    /// Of `turns`, those whose previous replica (or region) was excused while they ran.
    pub excused_turns: u64,
    /// `warm` among the turns not excused.
    pub eligible_warm: u64,
    /// `eligible_warm / (turns - excused_turns)`: the rate over turns that could follow.
    pub eligible_rate: f64,
}

impl WarmFollow {
    fn add(&mut self, warm: bool, excused: bool) {
        self.turns += 1;
        self.warm += u64::from(warm);
        if excused {
            self.excused_turns += 1;
        } else {
            self.eligible_warm += u64::from(warm);
        }
    }

    fn finish(mut self) -> Self {
        let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        self.raw_rate = ratio(self.warm, self.turns);
        self.eligible_rate = ratio(self.eligible_warm, self.turns - self.excused_turns);
        self
    }
}

/// Consecutive answered turns of each session, as `(previous, this)`.
fn follows(outcomes: &[Outcome]) -> Vec<(&Outcome, &Outcome)> {
    let mut ordered: Vec<&Outcome> = outcomes.iter().collect();
    ordered.sort_by_key(|o| (o.session, o.turn));
    ordered
        .windows(2)
        .filter(|w| w[0].session == w[1].session && w[0].turn + 1 == w[1].turn)
        .map(|w| (w[0], w[1]))
        .collect()
}

/// The replica-level rate.
pub fn warm_follow(outcomes: &[Outcome], excused: &Excused) -> WarmFollow {
    let mut rate = WarmFollow::default();
    for (prev, this) in follows(outcomes) {
        if let (Some(a), Some(b)) = (&prev.replica, &this.replica) {
            rate.add(a == b, excused.during(a, this.sent_at, this.answered_at));
        }
    }
    rate.finish()
}

/// The region-level rate; `None` without a region map.
pub fn region_warm_follow(outcomes: &[Outcome], facts: &FleetFacts) -> Option<WarmFollow> {
    if facts.regions.is_empty() {
        return None;
    }
    let region = |replica: &str| {
        facts
            .regions
            .get(replica)
            .map_or(replica, String::as_str)
            .to_owned()
    };
    let mut members: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for (replica, r) in &facts.regions {
        members.entry(r.clone()).or_default().insert(replica);
    }
    let mut rate = WarmFollow::default();
    for (prev, this) in follows(outcomes) {
        if let (Some(a), Some(b)) = (&prev.replica, &this.replica) {
            let (from, to) = (region(a), region(b));
            let gone = |replica: &str| {
                facts
                    .excused
                    .during(replica, this.sent_at, this.answered_at)
            };
            let excused = match members.get(&from) {
                Some(replicas) => replicas.iter().all(|r| gone(r)),
                None => gone(a),
            };
            rate.add(from == to, excused);
        }
    }
    Some(rate.finish())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Turn `turn` of `session`, answered by `replica`, sent `at` ms after `t0` and answered
    /// 10 ms later.
    fn turn(t0: Instant, session: usize, turn: usize, replica: &str, at: u64) -> Outcome {
        Outcome {
            session,
            tenant: 0,
            turn,
            prompt_tokens: 100,
            cached_tokens: 0,
            oracle_cached_tokens: 0,
            ttft_ms: 1.0,
            replica: (!replica.is_empty()).then(|| replica.to_owned()),
            sent_at: t0 + Duration::from_millis(at),
            answered_at: t0 + Duration::from_millis(at + 10),
        }
    }

    /// Two sessions, listed out of order as completions arrive. Session 0: a a b b (the move
    /// to b at 200 ms is after a died at 150 ms). Session 1: c d c, then a turn with no replica
    /// id, then c.
    fn run(t0: Instant) -> Vec<Outcome> {
        vec![
            turn(t0, 1, 1, "d", 100),
            turn(t0, 0, 0, "a", 0),
            turn(t0, 0, 2, "b", 200),
            turn(t0, 1, 0, "c", 0),
            turn(t0, 0, 1, "a", 100),
            turn(t0, 1, 2, "c", 200),
            turn(t0, 0, 3, "b", 300),
            turn(t0, 1, 3, "", 300),
            turn(t0, 1, 4, "c", 400),
        ]
    }

    #[test]
    fn warm_follow_counts_turns_on_the_previous_replica() {
        let t0 = Instant::now();
        let rate = warm_follow(&run(t0), &Excused::default());
        // Pairs with both ids: a→a, a→b, b→b, c→d, d→c (the id-less turn drops two pairs).
        assert_eq!((rate.turns, rate.warm), (5, 2));
        assert_eq!(rate.raw_rate, 0.4);
        assert_eq!((rate.excused_turns, rate.eligible_rate), (0, 0.4));
    }

    #[test]
    fn turns_whose_previous_replica_was_gone_are_excused() {
        let t0 = Instant::now();
        let excused = Excused::default();
        excused.excuse_during("a", t0 + Duration::from_millis(150), None);
        // d was down only between turns, not while c→d→c's second turn ran.
        excused.excuse_during(
            "d",
            t0 + Duration::from_millis(150),
            Some(t0 + Duration::from_millis(160)),
        );
        let rate = warm_follow(&run(t0), &excused);
        assert_eq!((rate.turns, rate.warm, rate.raw_rate), (5, 2, 0.4));
        // Only a→b (sent at 200 ms) is excused; a→a ran before a died.
        assert_eq!((rate.excused_turns, rate.eligible_warm), (1, 2));
        assert_eq!(rate.eligible_rate, 0.5);
    }

    #[test]
    fn an_excusal_overlapping_a_turn_in_flight_excuses_it() {
        let t0 = Instant::now();
        let excused = Excused::default();
        // a died 5 ms into the turn sent at 100 ms (a→a still answered from a).
        excused.excuse_during("a", t0 + Duration::from_millis(105), None);
        assert_eq!(warm_follow(&run(t0), &excused).excused_turns, 2);
        assert!(!excused.during("a", t0, t0 + Duration::from_millis(104)));
    }

    #[test]
    fn region_warm_follow_reads_same_region_as_warm() {
        let t0 = Instant::now();
        let mut facts = FleetFacts::default();
        assert_eq!(region_warm_follow(&run(t0), &facts), None);
        // a and b share region x; c and d are unmapped, so regions of their own.
        facts.regions = [("a", "x"), ("b", "x")]
            .map(|(r, g)| (r.to_owned(), g.to_owned()))
            .into();
        let rate = region_warm_follow(&run(t0), &facts).unwrap_or_default();
        assert_eq!((rate.turns, rate.warm), (5, 3));
        // a died, but b was up: region x stayed eligible, nothing is excused.
        facts
            .excused
            .excuse_during("a", t0 + Duration::from_millis(150), None);
        let rate = region_warm_follow(&run(t0), &facts).unwrap_or_default();
        assert_eq!((rate.excused_turns, rate.eligible_rate), (0, 0.6));
        // With b gone too, region x is gone for the turns after 150 ms that came from it.
        facts
            .excused
            .excuse_during("b", t0 + Duration::from_millis(150), None);
        let rate = region_warm_follow(&run(t0), &facts).unwrap_or_default();
        assert_eq!((rate.excused_turns, rate.eligible_warm), (2, 1));
        assert_eq!(rate.eligible_rate, 1.0 / 3.0);
        // An unmapped replica is excused by its own excusal.
        facts
            .excused
            .excuse_during("d", t0, Some(t0 + Duration::from_millis(250)));
        let rate = region_warm_follow(&run(t0), &facts).unwrap_or_default();
        assert_eq!(rate.excused_turns, 3);
    }

    #[test]
    fn restore_ends_an_excusal() {
        let excused = Excused::default();
        excused.excuse("a");
        std::thread::sleep(Duration::from_millis(2));
        excused.restore("a");
        let later = Instant::now() + Duration::from_millis(1);
        assert!(!excused.during("a", later, later));
        assert!(!excused.during("b", later, later));
    }
}
