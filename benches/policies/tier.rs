//! The edge tier: several Tether instances in front of one fleet, each turn of a conversation
//! sent to a random instance (DNS round-robin with short TTLs, or an L4 balancer that spreads
//! requests), through a replica failure and an instance restart.
//!
//! With tenant locality on (the default) a new session's replica depends on what the instance
//! that places it has seen, so an instance that did not place a session cannot recompute its
//! replica: it needs the shared sticky store. Rows, each on a fresh set of processes, the
//! fleet's caches flushed and the victim revived before each:
//!
//! - three Tether instances sharing a sticky store (a real redis-server; `affinity.placement`
//!   then defaults to `nearest`), and the same with `placement: hash`, the placement of an
//!   instance without a store;
//! - the same three without the store;
//! - nginx's `hash … consistent`, a real nginx (stateless: one instance routes as three would,
//!   and a restart changes nothing but the requests it refuses meanwhile); a real one rather
//!   than the client-side ring the other scenarios use, because what nginx does with a dead
//!   upstream (it sends the requests to the next server on the ring) is part of what is
//!   compared;
//! - for reference, one Tether instance taking every turn, as configured by default (no
//!   store: one instance does not need one).
//!
//! Events, at fixed shares of the workload's turns: after a third, replica `eu-2` refuses
//! connections and drops the ones it has (a crashed process; excused in the warm-follow rate
//! from that moment); after two thirds, one instance of a three-instance row is restarted the
//! way docs/operations.md has a tier restarted, by a zero-downtime upgrade (a new process takes
//! the listeners, the old one finishes what it has in flight): the new process starts with an
//! empty local table. The replica's death fails the requests in flight there; loadgen does not
//! retry, and a failed turn ends its conversation: the errors column counts them.
//!
//! A row's share of the oracle moves by several points from run to run (the sessions' timing
//! decides which caches evict what), more than the 1-point target the tier is held to, so
//! every row runs `BENCH_TIER_REPEATS` times (default 3) and the comparison is made on the
//! paired differences, repetition by repetition: a tier against one instance placing the same
//! way (with `nearest` placement, one instance with the store). `BENCH_TIER_ROWS` runs a
//! subset (`store,x1-store`; the keys are in `ROWS`), to look at one comparison with more
//! repetitions.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tether_benches::{nginx_hash_proxy_conf, start_nginx};
use tether_e2e::{free_port, SimFleet, TempDir, Tether, TetherConfig};
use tether_loadgen::{EdgeChoice, FleetFacts, Report, RunConfig, Target, Workload};
use tether_sticky_store::testing::RedisServer;

use super::{tether_config, CACHE_TOKENS, SIX, TENANT_KEYS};

/// Instances in a tier row.
const EDGES: usize = 3;
/// The replica that dies.
const VICTIM: &str = "eu-2";
/// Shares of the workload's turns after which the replica dies and the instance restarts.
const KILL_AT: f64 = 1.0 / 3.0;
const RESTART_AT: f64 = 2.0 / 3.0;

/// One row of the table.
#[derive(Clone, Copy)]
struct Setup {
    name: &'static str,
    /// Its name in `BENCH_TIER_ROWS`.
    key: &'static str,
    /// Tether instances (0: nginx).
    edges: usize,
    store: bool,
    /// `affinity.placement: hash` set explicitly (with a store the default is `nearest`).
    hash_placement: bool,
}

const TIER_STORE: Setup = Setup {
    name: "tether x3, sticky store",
    key: "store",
    edges: EDGES,
    store: true,
    hash_placement: false,
};
const TIER_STORE_HASH: Setup = Setup {
    name: "tether x3, store, hash placement",
    key: "store-hash",
    edges: EDGES,
    store: true,
    hash_placement: true,
};
const TIER_NO_STORE: Setup = Setup {
    name: "tether x3, no store",
    key: "no-store",
    edges: EDGES,
    store: false,
    hash_placement: false,
};
const NGINX: Setup = Setup {
    name: "nginx hash consistent",
    key: "nginx",
    edges: 0,
    store: false,
    hash_placement: false,
};
const SINGLE: Setup = Setup {
    name: "tether x1 (reference)",
    key: "x1",
    edges: 1,
    store: false,
    hash_placement: false,
};
const SINGLE_STORE: Setup = Setup {
    name: "tether x1, sticky store",
    key: "x1-store",
    edges: 1,
    store: true,
    hash_placement: false,
};
/// Every row, in the order each repetition runs them.
const ROWS: [Setup; 6] = [
    TIER_STORE,
    TIER_STORE_HASH,
    TIER_NO_STORE,
    NGINX,
    SINGLE_STORE,
    SINGLE,
];

/// What one row measured.
struct Row {
    setup: Setup,
    report: Report,
    /// How long the restarted instance's upgrade took, from starting the new process to the
    /// old one's exit.
    upgrade_took: Option<Duration>,
}

/// Runs the scenario on a fleet of its own (replicas' delays × `scale`) and prints its table.
pub async fn run(workload: &Workload, scale: &str) {
    let repeats: usize = std::env::var("BENCH_TIER_REPEATS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(3);
    eprintln!("edge tier (3 instances, each turn to a random one), {repeats} repetitions:");
    let fleet = SimFleet::start_with(
        &SIX,
        &[
            "--time-scale",
            scale,
            "--cache-tokens",
            &CACHE_TOKENS.to_string(),
        ],
    )
    .expect("replica-sim starts");
    let dir = TempDir::new("tether-bench-tier").expect("a scratch directory");
    let nginx_port = free_port();
    let replicas: Vec<SocketAddr> = SIX.iter().map(|id| fleet.addr(id)).collect();
    let nginx = start_nginx(
        dir.path(),
        &nginx_hash_proxy_conf(dir.path(), nginx_port, &replicas),
        "nginx",
        &[nginx_port],
    );
    // A subset of the rows (`BENCH_TIER_ROWS=store,x1-store`), to look at one comparison
    // with more repetitions.
    let chosen: Vec<Setup> = match std::env::var("BENCH_TIER_ROWS") {
        Ok(keys) => {
            let keys: Vec<&str> = keys.split(',').map(str::trim).collect();
            ROWS.into_iter().filter(|s| keys.contains(&s.key)).collect()
        }
        Err(_) => ROWS.to_vec(),
    };
    assert!(
        !chosen.is_empty(),
        "BENCH_TIER_ROWS names no row; rows: {}",
        ROWS.map(|s| s.key).join(",")
    );
    let mut repetitions = Vec::new();
    for repetition in 1..=repeats {
        let mut rows = Vec::new();
        for &setup in &chosen {
            let started = Instant::now();
            let row = run_row(&fleet, nginx_port, setup, workload).await;
            eprintln!(
                "  {repetition}/{repeats} {}: {:.3} of the oracle ({:.1} s)",
                setup.name,
                row.report.overall.of_oracle,
                started.elapsed().as_secs_f64()
            );
            rows.push(row);
        }
        repetitions.push(rows);
    }
    drop(nginx);
    print_rows(workload, &repetitions);
}

async fn run_row(fleet: &SimFleet, nginx_port: u16, setup: Setup, workload: &Workload) -> Row {
    for id in SIX {
        fleet.flush(id).await;
    }
    fleet
        .set_fault(VICTIM, serde_json::json!({"kind": "none"}))
        .await;
    // A store of its own per row: bindings of an earlier row (the same sessions) stay out.
    let redis = setup
        .store
        .then(|| RedisServer::start().expect("redis-server starts (`make deps` installs it)"));
    let mut body = tether_config(fleet, &SIX, true, None);
    if setup.hash_placement {
        body = body.replacen("affinity: { ", "affinity: { placement: hash, ", 1);
    }
    if let Some(redis) = &redis {
        body.push_str(&format!("sticky_store: {{ url: \"{}\" }}\n", redis.url()));
    }
    let config = TetherConfig { body };
    let mut edges: Vec<Tether> = (0..setup.edges)
        .map(|_| Tether::start(&config).expect("tether starts"))
        .collect();
    let target = if setup.edges == 0 {
        Target::Proxy(format!("http://127.0.0.1:{nginx_port}"))
    } else {
        Target::Tier(
            edges.iter().map(|t| format!("http://{}", t.addr)).collect(),
            EdgeChoice::Random,
        )
    };
    // The last instance of a tier restarts.
    let mut restarted = (setup.edges > 1).then(|| edges.pop()).flatten();

    let facts = FleetFacts::default();
    let excused = facts.excused.clone();
    let turns = workload.total_turns() as f64;
    let progress = indicatif::ProgressBar::hidden();
    let events = async {
        at_share(&progress, turns, KILL_AT).await;
        excused.excuse(VICTIM);
        fleet
            .set_fault(VICTIM, serde_json::json!({"kind": "refuse"}))
            .await;
        let mut gap = None;
        if let Some(mut tether) = restarted.take() {
            at_share(&progress, turns, RESTART_AT).await;
            let (tether, took) = tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                tether.upgrade().expect("the upgrade completes");
                (tether, started.elapsed())
            })
            .await
            .expect("the restart does not panic");
            restarted = Some(tether);
            gap = Some(took);
        }
        gap
    };
    let config = RunConfig {
        workload: workload.clone(),
        target,
        api_keys: TENANT_KEYS.iter().map(|k| k.to_string()).collect(),
        stream: true,
        block_tokens: 16,
        capacity_bound_tokens: None,
        bound_replicas: None,
    };
    let (report, upgrade_took) = tokio::join!(
        tether_loadgen::run_with(config, facts, Some(progress.clone())),
        events
    );
    drop(restarted);
    drop(edges);
    Row {
        setup,
        report: report.expect("the workload runs"),
        upgrade_took,
    }
}

/// Returns once `share` of the workload's `turns` have been answered or given up.
async fn at_share(progress: &indicatif::ProgressBar, turns: f64, share: f64) {
    while (progress.position() as f64) < turns * share {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn print_rows(workload: &Workload, repetitions: &[Vec<Row>]) {
    println!(
        "\nedge tier: {} sessions; each turn to a random instance of 3; {VICTIM} dies after 1/3 of the turns, one instance is upgraded after 2/3; medians of {} repetitions\n{:<32} {:>11} {:>8} {:>9} {:>15} {:>7} {:>8} {:>9} {:>8} {:>7} {:>9}",
        workload.sessions,
        repetitions.len(),
        "row",
        "warm-follow",
        "excused",
        "of oracle",
        "(range)",
        "hit %",
        "oracle %",
        "TTFT p50",
        "max/mean",
        "errors",
        "upgrade"
    );
    let of_row = |setup: Setup| -> Vec<&Row> {
        repetitions
            .iter()
            .filter_map(|rows| rows.iter().find(|r| r.setup.name == setup.name))
            .collect()
    };
    for setup in ROWS {
        let runs = of_row(setup);
        if runs.is_empty() {
            continue;
        }
        let col = |f: &dyn Fn(&Row) -> f64| median(runs.iter().map(|r| f(r)).collect());
        let of_oracle: Vec<f64> = runs.iter().map(|r| r.report.overall.of_oracle).collect();
        let lo = of_oracle.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = of_oracle.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let upgrade: Vec<f64> = runs
            .iter()
            .filter_map(|r| r.upgrade_took.map(|d| d.as_secs_f64()))
            .collect();
        println!(
            "{:<32} {:>11.3} {:>8.0} {:>9.3} {:>15} {:>7.1} {:>8.1} {:>7.0}ms {:>8.2} {:>7.0} {:>9}",
            setup.name,
            col(&|r| r.report.warm_follow.eligible_rate),
            col(&|r| r.report.warm_follow.excused_turns as f64),
            median(of_oracle),
            format!("{lo:.3}-{hi:.3}"),
            col(&|r| r.report.overall.hit_ratio * 100.0),
            col(&|r| r.report.overall.oracle_ratio * 100.0),
            col(&|r| r.report.overall.ttft_p50_ms),
            col(&|r| r.report.replica_max_over_mean),
            col(&|r| r.report.overall.errors as f64),
            if upgrade.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.1} s", median(upgrade))
            },
        );
    }
    for (i, rows) in repetitions.iter().enumerate() {
        for row in rows {
            let r = &row.report;
            let per_edge = (r.by_edge.len() > 1).then(|| {
                let edges: Vec<String> = r
                    .by_edge
                    .iter()
                    .map(|e| format!("{} ({})", e.requests, e.errors))
                    .collect();
                format!("; per instance, answered (failed): {}", edges.join(", "))
            });
            let per_replica: Vec<String> = r
                .by_replica
                .iter()
                .map(|(id, n)| format!("{id} {n}"))
                .collect();
            println!(
                "  {}/{} {}: {:.3} of the oracle; per replica: {}{}",
                i + 1,
                repetitions.len(),
                row.setup.name,
                r.overall.of_oracle,
                per_replica.join(", "),
                per_edge.unwrap_or_default()
            );
            for sample in r.error_samples.iter().take(2) {
                eprintln!("    {sample}");
            }
        }
    }
    // Paired: each repetition's tier against the same repetition's single instance.
    let points = |tier: Setup, single: Setup| -> (f64, String) {
        let diffs: Vec<f64> = of_row(tier)
            .iter()
            .zip(of_row(single))
            .map(|(t, s)| (t.report.overall.of_oracle - s.report.overall.of_oracle) * 100.0)
            .collect();
        if diffs.is_empty() {
            return (f64::NAN, "not run".to_owned());
        }
        let each: Vec<String> = diffs.iter().map(|d| format!("{d:+.1}")).collect();
        (median(diffs), each.join(" "))
    };
    let (nearest, nearest_each) = points(TIER_STORE, SINGLE_STORE);
    let (hash, hash_each) = points(TIER_STORE_HASH, SINGLE);
    let (no_store, no_store_each) = points(TIER_NO_STORE, SINGLE);
    let (defaults, defaults_each) = points(TIER_STORE, SINGLE);
    println!(
        "policies/tier/of_oracle, paired median points of a tier against one instance (target >= -1.0): \
         with the store, nearest placement, against one instance with the store {nearest:+.1} ({nearest_each}); \
         with the store and hash placement, against one instance (hash) {hash:+.1} ({hash_each}); \
         without the store {no_store:+.1} ({no_store_each}); \
         with the store as configured by default against one instance as configured by default {defaults:+.1} ({defaults_each})"
    );
}
