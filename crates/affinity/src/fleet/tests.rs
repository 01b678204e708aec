use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Mutex;

use proptest::prelude::*;

use super::*;

fn address(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

fn plan(regions: &[(&str, &[(&str, u16)])]) -> FleetPlan<u16> {
    FleetPlan {
        regions: regions
            .iter()
            .map(|(name, replicas)| RegionPlan {
                name: name.to_string(),
                replicas: replicas
                    .iter()
                    .map(|(id, port)| ReplicaPlan {
                        spec: ReplicaSpec {
                            id: id.to_string(),
                            weight: 1,
                            admission: Admission::Active,
                            max_inflight: None,
                        },
                        address: address(*port),
                        upstream: *port,
                    })
                    .collect(),
                kv_scope: KvScope::Replica,
            })
            .collect(),
        options: SelectorOptions::default(),
        tenant_locality: None,
        health: HealthPolicy {
            probes: false,
            ..HealthPolicy::default()
        },
        override_ttl: Duration::from_secs(3600),
        override_capacity: 10_000,
    }
}

fn three() -> FleetPlan<u16> {
    plan(&[("eu", &[("a", 9001), ("b", 9002), ("c", 9003)])])
}

fn fleet(plan: FleetPlan<u16>) -> (Arc<FleetState>, Arc<Fleet<u16>>) {
    let state = FleetState::new(Duration::from_secs(3600), 10_000);
    let fleet = Arc::new(state.build(plan));
    (state, fleet)
}

fn keyed(k: u64) -> Attempts {
    Attempts::new(Some(RoutingKey(k)), Some(TenantScope::new("acme")))
}

fn keys() -> impl Iterator<Item = u64> {
    (1..200u64).map(|k| k.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

const NOW: u64 = 1_000;

#[test]
fn a_2xx_answer_makes_the_next_turn_sticky_to_the_same_replica() {
    let (_, fleet) = fleet(three());
    for k in keys() {
        let mut first = fleet.route(&mut keyed(k), NOW).unwrap();
        assert_ne!(first.outcome(), Outcome::Sticky);
        first.answered(200, None, NOW);
        let next = fleet.route(&mut keyed(k), NOW).unwrap();
        assert_eq!(next.outcome(), Outcome::Sticky);
        assert_eq!(next.replica().id(), first.replica().id());
    }
}

#[test]
fn an_unbound_key_carries_over_to_the_replica_of_a_bound_one() {
    let (_, fleet) = fleet(three());
    for k in keys() {
        let (fingerprint, token) = (k, k ^ 1);
        let mut first = fleet.route(&mut keyed(fingerprint), NOW).unwrap();
        first.answered(200, None, NOW);
        assert!(fleet.carry_over(RoutingKey(token), RoutingKey(fingerprint)));
        let next = fleet.route(&mut keyed(token), NOW).unwrap();
        assert_eq!(next.outcome(), Outcome::Sticky);
        assert_eq!(next.replica().id(), first.replica().id());
    }
}

#[test]
fn carry_over_never_moves_a_bound_key_nor_invents_a_binding() {
    let (_, fleet) = fleet(three());
    let (a, b, unbound) = (RoutingKey(11), RoutingKey(12), RoutingKey(13));
    let mut route_a = fleet.route(&mut keyed(a.0), NOW).unwrap();
    route_a.answered(200, None, NOW);
    let mut route_b = fleet.route(&mut keyed(b.0), NOW).unwrap();
    route_b.answered(200, None, NOW);
    let before = fleet.overrides().get(b);
    assert!(!fleet.carry_over(b, a), "b is bound already");
    assert_eq!(fleet.overrides().get(b), before);
    assert!(
        !fleet.carry_over(RoutingKey(14), unbound),
        "nothing to inherit"
    );
    assert_eq!(fleet.overrides().get(RoutingKey(14)), None);
    assert!(!fleet.carry_over(a, a));
}

#[test]
fn only_a_2xx_answer_records_the_session() {
    let (state, fleet) = fleet(three());
    for status in [400, 404, 429, 500, 503] {
        let mut route = fleet.route(&mut keyed(7), NOW).unwrap();
        route.answered(status, None, NOW);
    }
    assert!(state.overrides().is_empty());
    let mut tokenless = fleet.route(&mut Attempts::new(None, None), NOW).unwrap();
    tokenless.answered(200, None, NOW);
    assert!(state.overrides().is_empty(), "no key, no entry");
}

#[test]
fn the_slot_is_held_until_the_receipt_is_finished_failed_or_dropped() {
    let (_, fleet) = fleet(three());
    let inflight = |f: &Fleet<u16>| f.replicas().iter().map(Replica::inflight).sum::<u32>();
    let mut a = fleet.route(&mut keyed(1), NOW).unwrap();
    let mut b = fleet.route(&mut keyed(2), NOW).unwrap();
    let c = fleet.route(&mut keyed(3), NOW).unwrap();
    assert_eq!(inflight(&fleet), 3);
    a.finished();
    assert!(!a.in_flight());
    b.failed(Failure::Client, NOW);
    assert_eq!(inflight(&fleet), 1);
    drop(c);
    assert_eq!(inflight(&fleet), 0);
    drop((a, b));
    assert_eq!(inflight(&fleet), 0);
}

#[test]
fn a_receipt_knows_whether_its_replica_left_rotation_after_it_was_chosen() {
    let (_, fleet) = fleet(three());
    fleet.replicas()[0].status().depart();
    let route = fleet.route(&mut keyed(1), NOW).unwrap();
    assert!(
        !route.departed_since_chosen(),
        "a departure before the choice is not one since"
    );
    route.replica().status().depart();
    assert!(route.departed_since_chosen());
}

#[test]
fn failures_that_are_the_replicas_doing_eject_it_and_routing_avoids_it() {
    let (_, fleet) = fleet(three());
    let victim = fleet.route(&mut keyed(5), NOW).unwrap().replica().tag();
    for _ in 0..fleet.health_policy().eject_after {
        let mut attempts = keyed(5);
        let mut route = fleet.route(&mut attempts, NOW).unwrap();
        assert_eq!(route.replica().tag(), victim);
        route.failed(Failure::Timeout, NOW);
    }
    let next = fleet.route(&mut keyed(5), NOW).unwrap();
    assert_ne!(next.replica().tag(), victim);
    assert_eq!(next.outcome(), Outcome::Failover);
    // Without probes, the cooldown's end brings it back.
    let later = NOW + 60_000;
    let back = fleet.route(&mut keyed(5), later).unwrap();
    assert_eq!(back.replica().tag(), victim);
}

#[test]
fn malformed_answers_eject_the_replica_and_move_its_sessions() {
    let (_, fleet) = fleet(three());
    let victim = fleet.route(&mut keyed(5), NOW).unwrap().replica().tag();
    for _ in 0..fleet.health_policy().eject_after {
        let mut route = fleet.route(&mut keyed(5), NOW).unwrap();
        assert_eq!(route.replica().tag(), victim);
        route.answered_body_to_judge(200, None, NOW);
        route.body_ended(false, NOW);
    }
    let next = fleet.route(&mut keyed(5), NOW).unwrap();
    assert_ne!(next.replica().tag(), victim);
    assert_eq!(next.outcome(), Outcome::Failover);
}

#[test]
fn a_sound_body_ends_the_failure_streak_and_an_unfinished_one_counts_nothing() {
    let (_, fleet) = fleet(three());
    let victim = fleet.route(&mut keyed(5), NOW).unwrap().replica().tag();
    let eject_after = fleet.health_policy().eject_after;
    for round in 0..3 {
        for _ in 1..eject_after {
            let mut route = fleet.route(&mut keyed(5), NOW).unwrap();
            route.answered_body_to_judge(200, None, NOW);
            route.body_ended(false, NOW);
        }
        // A 2xx whose body never ended: neither success nor failure.
        let mut cut = fleet.route(&mut keyed(5), NOW).unwrap();
        cut.answered_body_to_judge(200, None, NOW);
        drop(cut);
        let mut sound = fleet.route(&mut keyed(5), NOW).unwrap();
        assert_eq!(sound.replica().tag(), victim, "round {round}");
        sound.answered_body_to_judge(200, None, NOW);
        sound.body_ended(true, NOW);
        // Judged once: a second verdict changes nothing.
        sound.body_ended(false, NOW);
    }
    assert_eq!(
        fleet.route(&mut keyed(5), NOW).unwrap().replica().tag(),
        victim
    );
}

#[test]
fn failures_that_are_not_the_replicas_doing_never_eject_it() {
    let (_, fleet) = fleet(three());
    let first = fleet.route(&mut keyed(9), NOW).unwrap().replica().tag();
    for failure in [
        Failure::StaleConnection,
        Failure::Client,
        Failure::Status(502),
    ] {
        for _ in 0..10 {
            fleet
                .route(&mut keyed(9), NOW)
                .unwrap()
                .failed(failure, NOW);
        }
    }
    assert_eq!(
        fleet.route(&mut keyed(9), NOW).unwrap().replica().tag(),
        first
    );
}

#[test]
fn a_retry_goes_to_a_replica_not_yet_tried_and_each_is_tried_once() {
    let (_, fleet) = fleet(three());
    let mut attempts = keyed(11);
    let mut seen = Vec::new();
    while let Some(route) = fleet.route(&mut attempts, NOW) {
        assert!(!seen.contains(route.replica().id()));
        seen.push(Arc::clone(route.replica().id()));
    }
    assert_eq!(seen.len(), 3);
    assert_eq!(attempts.total(), 3);
}

#[test]
fn a_stale_connection_is_retried_once_on_the_same_replica_for_free() {
    let (_, fleet) = fleet(three());
    let limits = RetryLimits {
        resend_safe: true,
        body_replayable: true,
        max_attempts: 3,
        past_deadline: false,
    };
    let mut attempts = keyed(13);
    let first = fleet.route(&mut attempts, NOW).unwrap();
    assert_eq!(
        attempts.after_failure(&first, Failure::StaleConnection, limits),
        Retry::Here
    );
    let again = fleet.route(&mut attempts, NOW).unwrap();
    assert_eq!(again.replica().id(), first.replica().id());
    assert_eq!(again.outcome(), first.outcome());
    assert_eq!(
        attempts.counted(),
        1,
        "the stale attempt was free; the retry counts"
    );
    assert_eq!(
        attempts.after_failure(&again, Failure::StaleConnection, limits),
        Retry::NextReplica
    );
    let third = fleet.route(&mut attempts, NOW).unwrap();
    assert_ne!(third.replica().id(), first.replica().id());
}

#[test]
fn refused_connections_do_not_use_up_attempts() {
    let (_, fleet) = fleet(plan(&[(
        "eu",
        &[("a", 1), ("b", 2), ("c", 3), ("d", 4), ("e", 5)],
    )]));
    let limits = RetryLimits {
        resend_safe: false,
        body_replayable: false,
        max_attempts: 2,
        past_deadline: false,
    };
    let mut attempts = keyed(17);
    for _ in 0..4 {
        let route = fleet.route(&mut attempts, NOW).unwrap();
        assert_eq!(
            attempts.after_failure(&route, Failure::Refused, limits),
            Retry::NextReplica
        );
    }
    assert_eq!((attempts.total(), attempts.counted()), (4, 0));
}

#[test]
fn live_state_survives_a_new_generation_unless_the_address_changed() {
    let state = FleetState::new(Duration::from_secs(3600), 10_000);
    let old = Arc::new(state.build(three()));
    old.find("a").unwrap().status().set_drained(true);
    old.find("b").unwrap().status().set_drained(true);
    let _held = old.route(&mut keyed(21), NOW).unwrap();
    // Reordered, and `b` moved to a new address.
    let new = state.build(plan(&[("eu", &[("c", 9003), ("b", 9999), ("a", 9001)])]));
    assert!(new.find("a").unwrap().status().is_drained());
    assert!(!new.find("b").unwrap().status().is_drained());
    assert_eq!(
        new.find("c").unwrap().inflight(),
        1,
        "the held slot is visible"
    );
    assert_eq!(new.find("b").unwrap().upstream(), &9999);
}

#[test]
fn a_recorded_session_follows_its_replica_across_generations() {
    let state = FleetState::new(Duration::from_secs(3600), 10_000);
    let old = Arc::new(state.build(three()));
    let mut first = old.route(&mut keyed(23), NOW).unwrap();
    first.answered(200, None, NOW);
    let id = Arc::clone(first.replica().id());
    let new = Arc::new(state.build(plan(&[(
        "eu",
        &[("d", 9004), ("c", 9003), ("b", 9002), ("a", 9001)],
    )])));
    let next = new.route(&mut keyed(23), NOW).unwrap();
    assert_eq!(
        (next.replica().id(), next.outcome()),
        (&id, Outcome::Sticky)
    );
}

fn facts(failure: Failure) -> AttemptFacts {
    AttemptFacts {
        failure,
        resend_safe: true,
        body_replayable: true,
        was_retry_here: false,
        counted_attempts: 1,
        max_attempts: 3,
        past_deadline: false,
    }
}

/// Every row of the failover table in docs/health.md.
#[test]
fn retry_policy_table() {
    use Failure::*;
    use Retry::*;
    let not_safe = |f| AttemptFacts {
        resend_safe: false,
        ..facts(f)
    };
    let truncated = |f| AttemptFacts {
        body_replayable: false,
        ..facts(f)
    };
    let spent = |f| AttemptFacts {
        counted_attempts: 3,
        ..facts(f)
    };
    let late = |f| AttemptFacts {
        past_deadline: true,
        ..facts(f)
    };
    let rows: Vec<(&str, AttemptFacts, Retry)> = vec![
        // Connect refused or timed out: always, nothing reached the replica.
        ("refused", facts(Refused), NextReplica),
        ("refused, not resend-safe", not_safe(Refused), NextReplica),
        (
            "connect failed, not resend-safe",
            not_safe(ConnectFailed),
            NextReplica,
        ),
        (
            "connect failed, body too large",
            truncated(ConnectFailed),
            NextReplica,
        ),
        // Accepted, then timed out or reset before any byte: if safe to resend.
        ("timeout", facts(Timeout), NextReplica),
        ("timeout, not resend-safe", not_safe(Timeout), GiveUp),
        ("reset", facts(Broken), NextReplica),
        ("reset, not resend-safe", not_safe(Broken), GiveUp),
        (
            "reset, body over the retry buffer",
            truncated(Broken),
            GiveUp,
        ),
        // Its replica left rotation while it waited: same rule.
        ("departed", facts(Departed), NextReplica),
        ("departed, not resend-safe", not_safe(Departed), GiveUp),
        (
            "departed, body over the retry buffer",
            truncated(Departed),
            GiveUp,
        ),
        // Cut by a shutdown: never.
        ("shutdown", facts(Shutdown), GiveUp),
        // Answered 429/502/503/504 before the header went on: same rule.
        ("429", facts(Status(429)), NextReplica),
        ("503", facts(Status(503)), NextReplica),
        ("502, not resend-safe", not_safe(Status(502)), GiveUp),
        (
            "504, body over the retry buffer",
            truncated(Status(504)),
            GiveUp,
        ),
        // Response bytes already went to the client: never.
        ("after the answer", facts(AfterAnswer), GiveUp),
        // The client failed: never.
        ("client", facts(Client), GiveUp),
        // A pooled connection the replica had closed: the same replica once, then the next.
        ("stale", facts(StaleConnection), Here),
        (
            "stale twice",
            AttemptFacts {
                was_retry_here: true,
                ..facts(StaleConnection)
            },
            NextReplica,
        ),
        ("stale, not resend-safe", not_safe(StaleConnection), GiveUp),
        // Limits: max_attempts and the deadline stop everything.
        ("attempts used up", spent(Timeout), GiveUp),
        ("attempts used up, refused", spent(Refused), GiveUp),
        ("deadline passed", late(Refused), GiveUp),
        ("deadline passed, status", late(Status(503)), GiveUp),
    ];
    for (row, facts, expected) in rows {
        assert_eq!(retry_policy(&facts), expected, "{row}");
    }
}

#[derive(Debug, Clone)]
enum Step {
    Route { key: u8 },
    Answer { status: u16 },
    Fail { failure: u8 },
    Finish,
    Drop,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0u8..8).prop_map(|key| Step::Route { key }),
        prop::sample::select(vec![200u16, 201, 400, 429, 500, 502, 503])
            .prop_map(|status| Step::Answer { status }),
        (0u8..10).prop_map(|failure| Step::Fail { failure }),
        Just(Step::Finish),
        Just(Step::Drop),
    ]
}

fn failure(n: u8) -> Failure {
    [
        Failure::Refused,
        Failure::ConnectFailed,
        Failure::StaleConnection,
        Failure::Timeout,
        Failure::Broken,
        Failure::Status(503),
        Failure::AfterAnswer,
        Failure::Client,
        Failure::Departed,
        Failure::Shutdown,
    ][n as usize % 10]
}

proptest! {
    /// Whatever happens to receipts, no in-flight slot leaks, and every session's entry names
    /// the last replica that answered it 2xx.
    #[test]
    fn the_lifecycle_keeps_counts_and_entries_straight(steps in prop::collection::vec(step(), 1..80)) {
        let (state, fleet) = fleet(three());
        let mut open: Vec<(u8, Route<u16>)> = Vec::new();
        let mut last_2xx: HashMap<u8, ReplicaTag> = HashMap::new();
        let mut now = NOW;
        for step in steps {
            now += 10;
            match step {
                Step::Route { key } => {
                    if let Some(route) = fleet.route(&mut keyed(u64::from(key) + 1), now) {
                        open.push((key, route));
                    }
                }
                Step::Answer { status } => {
                    if let Some((key, route)) = open.last_mut() {
                        route.answered(status, None, now);
                        if (200..300).contains(&status) {
                            last_2xx.insert(*key, route.replica().tag());
                        }
                    }
                }
                Step::Fail { failure: f } => {
                    if let Some((_, route)) = open.last_mut() {
                        route.failed(failure(f), now);
                    }
                }
                Step::Finish => {
                    if let Some((_, route)) = open.first_mut() {
                        route.finished();
                    }
                }
                Step::Drop => {
                    if !open.is_empty() {
                        open.remove(0);
                    }
                }
            }
            let held = open.iter().filter(|(_, r)| r.in_flight()).count() as u32;
            let counted: u32 = fleet.replicas().iter().map(Replica::inflight).sum();
            prop_assert_eq!(held, counted);
        }
        drop(open);
        prop_assert_eq!(fleet.replicas().iter().map(Replica::inflight).sum::<u32>(), 0);
        for (key, tag) in last_2xx {
            prop_assert_eq!(state.overrides().get(RoutingKey(u64::from(key) + 1)), Some(tag));
        }
    }
}

/// Remembers what it was told.
#[derive(Debug, Default)]
struct RecordingSink {
    bound: Mutex<Vec<(u64, String)>>,
    tenants: Mutex<Vec<Option<TenantScope>>>,
    refreshed: Mutex<Vec<u64>>,
}

impl BindingSink for RecordingSink {
    fn bound(&self, key: RoutingKey, replica: &str, tenant: Option<TenantScope>) {
        self.bound.lock().unwrap().push((key.0, replica.to_owned()));
        self.tenants.lock().unwrap().push(tenant);
    }
    fn still_bound(&self, key: RoutingKey, _replica: &str) {
        self.refreshed.lock().unwrap().push(key.0);
    }
}

#[test]
fn the_sink_hears_of_new_and_moved_bindings_only() {
    let sink = Arc::new(RecordingSink::default());
    let state = FleetState::shared(
        Duration::from_secs(3600),
        10_000,
        Some(Arc::clone(&sink) as Arc<dyn BindingSink>),
    );
    let fleet = Arc::new(state.build(three()));
    let mut first = fleet.route(&mut keyed(31), NOW).unwrap();
    first.answered(200, None, NOW);
    let home = Arc::clone(first.replica().id());
    // Sticky turns within the same second: nothing to tell.
    for _ in 0..5 {
        fleet
            .route(&mut keyed(31), NOW)
            .unwrap()
            .answered(200, None, NOW);
    }
    assert_eq!(
        sink.bound.lock().unwrap().clone(),
        vec![(31, home.to_string())]
    );
    // The replica is drained: the session moves, and the sink hears of it.
    fleet.find(&home).unwrap().status().set_drained(true);
    let mut moved = fleet.route(&mut keyed(31), NOW).unwrap();
    moved.answered(200, None, NOW);
    let bound = sink.bound.lock().unwrap().clone();
    assert_eq!(bound.len(), 2);
    assert_eq!(bound[1], (31, moved.replica().id().to_string()));
    assert!(sink.refreshed.lock().unwrap().is_empty());
    // Each with the session's tenant, which other instances' tenant locality counts.
    assert_eq!(
        sink.tenants.lock().unwrap().clone(),
        vec![Some(TenantScope::new("acme")); 2]
    );
}

#[test]
fn load_reported_by_other_instances_steers_new_sessions_and_keeps_sticky_ones() {
    let (_, fleet) = fleet(three());
    let mut first = fleet.route(&mut keyed(11), NOW).unwrap();
    let owner = Arc::clone(first.replica().id());
    first.answered(200, None, NOW);
    drop(first);
    // Other instances have five requests in flight at the owner: the tier's bound is
    // ceil(1.25 × (5 + 1) / 3) = 3, so a new session whose ring owner it is goes elsewhere.
    fleet.set_inflight_elsewhere(|id| if *id == *owner { 5 } else { 0 });
    let new_key = keys()
        .find(|&k| {
            let (_, alone) = fleet_of_three();
            **alone.route(&mut keyed(k), NOW).unwrap().replica().id() == *owner
        })
        .unwrap();
    assert_ne!(
        **fleet
            .route(&mut keyed(new_key), NOW)
            .unwrap()
            .replica()
            .id(),
        *owner
    );
    // The session already there stays: the hard cap is judged on this instance's own count.
    let sticky = fleet.route(&mut keyed(11), NOW).unwrap();
    assert_eq!(
        (sticky.outcome(), &**sticky.replica().id()),
        (Outcome::Sticky, &*owner)
    );
    drop(sticky);
    // The report goes out as this instance's own counts.
    let held = fleet.route(&mut keyed(11), NOW).unwrap();
    let report = fleet.inflight_report();
    assert_eq!(report.len(), 3);
    assert!(report.contains(&(&*owner, 1)));
    drop(held);
    // Reports that stop (all zero again) stop steering.
    fleet.set_inflight_elsewhere(|_| 0);
    assert_eq!(
        **fleet
            .route(&mut keyed(new_key), NOW)
            .unwrap()
            .replica()
            .id(),
        *owner
    );
}

#[test]
fn placements_announced_since_the_last_report_count_as_load_until_the_next() {
    let (_, fleet) = fleet(three());
    let owner = {
        let first = fleet.route(&mut keyed(11), NOW).unwrap();
        Arc::clone(first.replica().id())
    };
    let new_key = keys()
        .find(|&k| {
            let (_, alone) = fleet_of_three();
            **alone.route(&mut keyed(k), NOW).unwrap().replica().id() == *owner
        })
        .unwrap();
    let lands_on_owner =
        |f: &Arc<Fleet<u16>>| **f.route(&mut keyed(new_key), NOW).unwrap().replica().id() == *owner;
    assert!(lands_on_owner(&fleet));
    // Five placements on the owner announced by other instances: over the tier's bound.
    for _ in 0..5 {
        assert!(fleet.note_inflight_elsewhere(&owner));
    }
    assert!(!fleet.note_inflight_elsewhere("no-such-replica"));
    assert!(!lands_on_owner(&fleet));
    // The next sum of reports says those requests have ended: the estimate is replaced.
    fleet.set_inflight_elsewhere(|_| 0);
    assert!(lands_on_owner(&fleet));
}

fn fleet_of_three() -> (Arc<FleetState>, Arc<Fleet<u16>>) {
    fleet(three())
}

#[test]
fn placements_announced_by_other_instances_count_towards_tenant_locality() {
    let mut with_locality = plan(&[("eu", &[("a", 9001), ("b", 9002), ("c", 9003), ("d", 9004)])]);
    with_locality.tenant_locality = Some(Duration::from_secs(30));
    let acme = TenantScope::new("acme");
    let (_, alone) = fleet(with_locality.clone());
    let (_, told) = fleet(with_locality);
    let owner = Arc::clone(alone.route(&mut keyed(7), NOW).unwrap().replica().id());
    // Other instances placed three of acme's sessions on the key's ring owner: it is then
    // over locality's bound on recent placements, ceil-free 1.25 × (3 + 1) / 4 = 1.25, so
    // this instance places the session elsewhere, as one instance that had placed all
    // four itself would.
    for _ in 0..3 {
        assert!(told.note_placed_elsewhere(&owner, acme.locality_tag(), NOW));
    }
    let placed = told.route(&mut keyed(7), NOW).unwrap();
    assert_ne!(*placed.replica().id(), owner);
    assert!(!told.note_placed_elsewhere("no-such-replica", acme.locality_tag(), NOW));
    // Without tenant locality the note is taken and changes nothing.
    let (_, plain) = fleet(three());
    assert!(plain.note_placed_elsewhere("a", acme.locality_tag(), NOW));
}

#[test]
fn a_binding_in_use_refreshes_about_four_times_per_ttl() {
    let ttl = 3600;
    for key in keys().take(50).map(RoutingKey) {
        // One turn every 10 s for two TTLs.
        let due = (0..720u32)
            .filter(|t| refresh_due(key, t * 10, (t + 1) * 10, ttl))
            .count();
        assert!((7..=9).contains(&due), "{due} refreshes for {key:?}");
        // Turns within one second never refresh twice in a row.
        assert!(!refresh_due(key, 100, 100, ttl));
    }
}

#[test]
fn learnt_bindings_route_like_local_ones_and_unknown_ids_are_refused() {
    let (state, fleet) = fleet(three());
    assert!(!state.learn(RoutingKey(41), "no-such-replica"));
    assert!(!fleet.knows(RoutingKey(41)));
    let owner = fleet.route(&mut keyed(41), NOW).unwrap().replica().tag();
    let other = fleet.replicas().iter().find(|r| r.tag() != owner).unwrap();
    assert!(state.learn(RoutingKey(41), other.id()));
    let next = fleet.route(&mut keyed(41), NOW).unwrap();
    assert_eq!(
        (next.replica().tag(), next.outcome()),
        (other.tag(), Outcome::Sticky)
    );
}

#[test]
fn after_reverify_an_entry_is_trusted_again_only_once_its_session_is_served() {
    let (state, fleet) = fleet(three());
    let mut first = fleet.route(&mut keyed(51), NOW).unwrap();
    first.answered(200, None, NOW);
    assert!(fleet.knows(RoutingKey(51)));
    state.reverify();
    assert!(
        !fleet.knows(RoutingKey(51)),
        "to be checked against the store"
    );
    // The entry still routes (a store that answers nothing leaves it as it was).
    let next = fleet.route(&mut keyed(51), NOW).unwrap();
    assert_eq!(next.outcome(), Outcome::Sticky);
    assert_eq!(state.overrides().entries().len(), 1);
}

#[test]
fn the_session_status_says_new_warm_moved_or_none_and_nothing_else() {
    let (_, fleet) = fleet(three());
    let mut first = fleet.route(&mut keyed(61), NOW).unwrap();
    assert_eq!(first.session_status(), SessionStatus::New);
    first.answered(200, None, NOW);
    let warm = fleet.route(&mut keyed(61), NOW).unwrap();
    assert_eq!(warm.session_status(), SessionStatus::Warm);
    fleet
        .find(first.replica().id())
        .unwrap()
        .status()
        .set_drained(true);
    let moved = fleet.route(&mut keyed(61), NOW).unwrap();
    assert_eq!(moved.session_status(), SessionStatus::Moved);
    let none = fleet.route(&mut Attempts::new(None, None), NOW).unwrap();
    assert_eq!(none.session_status(), SessionStatus::None);
    let labels: Vec<_> = [
        SessionStatus::Warm,
        SessionStatus::New,
        SessionStatus::Moved,
        SessionStatus::None,
    ]
    .iter()
    .map(|s| s.as_str())
    .collect();
    assert_eq!(labels, ["warm", "new", "moved", "none"]);
}
