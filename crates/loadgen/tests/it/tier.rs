//! A tier of edges, played by replica-sim listeners: two edges on one replica stand for a tier
//! whose edges agree on affinity; one edge per replica, for edges that do not.

use tether_loadgen::{EdgeChoice, FleetFacts, Report, RunConfig, Target, Workload};
use tether_replica_sim::{Fleet, ReplicaConfig, SimConfig};

/// 4 sessions × 4 turns: 12 turns that follow a previous one.
fn workload() -> Workload {
    Workload {
        sessions: 4,
        turns: 4,
        concurrency: 4,
        arrival_rate: 0.0,
        think_ms: 0,
        tenants: 1,
        system_tokens: 32,
        user_tokens: 8,
        max_tokens: 4,
        ..Workload::default()
    }
}

async fn fleet(ids: &[&str]) -> (Fleet, Vec<String>) {
    let configs = ids
        .iter()
        .map(|id| ReplicaConfig::new(*id, "127.0.0.1:0".parse().unwrap()))
        .collect();
    let sim = SimConfig {
        time_scale: 0.0,
        ..SimConfig::default()
    };
    let fleet = Fleet::start(configs, sim, None).await.unwrap();
    let urls = fleet
        .replicas()
        .iter()
        .map(|(_, addr)| format!("http://{addr}"))
        .collect();
    (fleet, urls)
}

async fn run(edges: Vec<String>, choice: EdgeChoice, facts: FleetFacts) -> Report {
    let config = RunConfig {
        workload: workload(),
        target: Target::Tier(edges, choice),
        api_keys: vec![],
        stream: true,
        block_tokens: 16,
        capacity_bound_tokens: None,
        bound_replicas: None,
    };
    let report = tether_loadgen::run_with(config, facts, None).await.unwrap();
    assert_eq!(report.overall.errors, 0, "{:?}", report.error_samples);
    assert_eq!(report.overall.requests, 16);
    report
}

fn per_edge(report: &Report) -> Vec<u64> {
    report.by_edge.iter().map(|e| e.requests).collect()
}

#[tokio::test]
async fn two_edges_on_one_replica_share_the_turns_and_every_turn_follows() {
    let (fleet, urls) = fleet(&["r1"]).await;
    let edges = vec![urls[0].clone(), urls[0].clone()];
    for choice in [EdgeChoice::RoundRobin, EdgeChoice::Sticky] {
        let report = run(edges.clone(), choice, FleetFacts::default()).await;
        assert_eq!(per_edge(&report), [8, 8], "{choice:?}");
        let follow = &report.warm_follow;
        assert_eq!((follow.turns, follow.warm, follow.raw_rate), (12, 12, 1.0));
        assert_eq!((follow.excused_turns, follow.eligible_rate), (0, 1.0));
        assert!(report.table().contains("requests per edge"));
    }
    let random = run(edges.clone(), EdgeChoice::Random, FleetFacts::default()).await;
    let again = run(edges, EdgeChoice::Random, FleetFacts::default()).await;
    assert_eq!(per_edge(&random), per_edge(&again));
    assert_eq!(per_edge(&random).iter().sum::<u64>(), 16);
    fleet.stop();
}

#[tokio::test]
async fn edges_that_disagree_break_warm_follow_unless_excused_or_in_one_region() {
    let (fleet, urls) = fleet(&["r1", "r2"]).await;
    let sticky = run(urls.clone(), EdgeChoice::Sticky, FleetFacts::default()).await;
    assert_eq!(per_edge(&sticky), [8, 8]);
    assert_eq!(sticky.warm_follow.raw_rate, 1.0);
    assert_eq!(sticky.by_replica.len(), 2);

    // Round-robin moves every turn to the other replica. With r1 gone for the whole run, the
    // turns that came from r1 could not have followed: session s's turns 1..=3 come from edges
    // s, s + 1, s + 2 (mod 2), so two of them for even s, one for odd s.
    let facts = FleetFacts {
        regions: [("r1", "a"), ("r2", "a")]
            .map(|(r, g)| (r.to_owned(), g.to_owned()))
            .into(),
        ..FleetFacts::default()
    };
    facts.excused.excuse("r1");
    let moved = run(urls, EdgeChoice::RoundRobin, facts).await;
    assert_eq!(per_edge(&moved), [8, 8]);
    let follow = &moved.warm_follow;
    assert_eq!((follow.turns, follow.warm), (12, 0));
    assert_eq!((follow.excused_turns, follow.eligible_rate), (6, 0.0));
    // One shared-KV region: every turn stayed in it, and r2 kept it eligible.
    let region = moved.region_warm_follow.clone().unwrap();
    assert_eq!(
        (region.turns, region.warm, region.excused_turns),
        (12, 12, 0)
    );
    assert!(moved.table().contains("region warm-follow"));
    fleet.stop();
}
