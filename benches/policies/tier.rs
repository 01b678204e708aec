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
//! from that moment); after two thirds, one instance of a three-instance row is terminated
//! (SIGTERM) and started again on the same config and listeners, with an empty local table.
//! Both events fail requests: those in flight at the replica, and those in flight at the
//! instance (the harness runs instances with `drain_timeout: 0s`, so SIGTERM cuts them) or sent
//! to it before it listens again. Loadgen does not retry, and a failed turn ends its
//! conversation: the errors column counts them, and the restart gap is printed.

use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tether_benches::{nginx_hash_proxy_conf, start_nginx};
use tether_e2e::{binary, free_port, ChildGuard, SimFleet, TempDir, Tether, TetherConfig};
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
    /// Tether instances (0: nginx).
    edges: usize,
    store: bool,
    /// `affinity.placement: hash` set explicitly (with a store the default is `nearest`).
    hash_placement: bool,
}

const TIER_STORE: Setup = Setup {
    name: "tether x3, sticky store",
    edges: EDGES,
    store: true,
    hash_placement: false,
};
const TIER_STORE_HASH: Setup = Setup {
    name: "tether x3, store, hash placement",
    edges: EDGES,
    store: true,
    hash_placement: true,
};
const TIER_NO_STORE: Setup = Setup {
    name: "tether x3, no store",
    edges: EDGES,
    store: false,
    hash_placement: false,
};
const NGINX: Setup = Setup {
    name: "nginx hash consistent",
    edges: 0,
    store: false,
    hash_placement: false,
};
const SINGLE: Setup = Setup {
    name: "tether x1 (reference)",
    edges: 1,
    store: false,
    hash_placement: false,
};

/// What one row measured.
struct Row {
    setup: Setup,
    report: Report,
    /// From SIGTERM to the restarted instance accepting connections.
    restart_gap: Option<Duration>,
}

/// Runs the scenario on a fleet of its own (replicas' delays × `scale`) and prints its table.
pub async fn run(workload: &Workload, scale: &str) {
    eprintln!("edge tier (3 instances, each turn to a random one):");
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
    let mut rows = Vec::new();
    for setup in [TIER_STORE, TIER_STORE_HASH, TIER_NO_STORE, NGINX, SINGLE] {
        let started = Instant::now();
        let row = run_row(&fleet, nginx_port, setup, workload).await;
        eprintln!(
            "  {} ({:.1} s)",
            setup.name,
            started.elapsed().as_secs_f64()
        );
        rows.push(row);
    }
    drop(nginx);
    print_rows(workload, &rows);
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
                let took = restart(&mut tether);
                (tether, took)
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
    let (report, restart_gap) = tokio::join!(
        tether_loadgen::run_with(config, facts, Some(progress.clone())),
        events
    );
    drop(restarted);
    drop(edges);
    Row {
        setup,
        report: report.expect("the workload runs"),
        restart_gap,
    }
}

/// Returns once `share` of the workload's `turns` have been answered or given up.
async fn at_share(progress: &indicatif::ProgressBar, turns: f64, share: f64) {
    while (progress.position() as f64) < turns * share {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Terminates `tether` (SIGTERM: it stops accepting and exits, and with the harness's
/// `drain_timeout: 0s` what it had in flight is cut) and starts it again on the same config
/// file, so on the same listeners; returns the time from SIGTERM until it accepts connections
/// again.
fn restart(tether: &mut Tether) -> Duration {
    let started = Instant::now();
    tether.terminate().expect("tether stops on SIGTERM");
    let child = Command::new(binary("tether"))
        .args(["run", "-c"])
        .arg(&tether.config)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("tether starts again");
    tether.process = ChildGuard::new(child, "tether (restarted)");
    // Polled finely: every millisecond of the gap is turns refused.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(listening(tether.addr) && listening(tether.admin)) {
        assert!(
            !tether.process.has_exited(),
            "the restarted tether exited during start-up (config {})",
            tether.config.display()
        );
        assert!(
            Instant::now() < deadline,
            "the restarted tether never listened"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    started.elapsed()
}

fn listening(addr: SocketAddr) -> bool {
    TcpStream::connect(addr).is_ok()
}

fn print_rows(workload: &Workload, rows: &[Row]) {
    println!(
        "\nedge tier: {} sessions; each turn to a random instance of 3; {VICTIM} dies after 1/3 of the turns, one instance restarts after 2/3\n{:<32} {:>11} {:>8} {:>9} {:>7} {:>8} {:>9} {:>8} {:>7} {:>11}",
        workload.sessions,
        "row",
        "warm-follow",
        "excused",
        "of oracle",
        "hit %",
        "oracle %",
        "TTFT p50",
        "max/mean",
        "errors",
        "restart gap"
    );
    for row in rows {
        let (r, o) = (&row.report, &row.report.overall);
        println!(
            "{:<32} {:>11.3} {:>8} {:>9.3} {:>7.1} {:>8.1} {:>7.0}ms {:>8.2} {:>7} {:>11}",
            row.setup.name,
            r.warm_follow.eligible_rate,
            r.warm_follow.excused_turns,
            o.of_oracle,
            o.hit_ratio * 100.0,
            o.oracle_ratio * 100.0,
            o.ttft_p50_ms,
            r.replica_max_over_mean,
            o.errors,
            row.restart_gap
                .map_or("-".to_owned(), |g| format!("{} ms", g.as_millis())),
        );
    }
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
            "  {}: per replica: {}{}",
            row.setup.name,
            per_replica.join(", "),
            per_edge.unwrap_or_default()
        );
    }
    for row in rows {
        for sample in row.report.error_samples.iter().take(2) {
            eprintln!("  {}: {sample}", row.setup.name);
        }
    }
    let of = |setup: Setup| {
        rows.iter()
            .find(|r| r.setup.name == setup.name)
            .map_or(f64::NAN, |r| r.report.overall.of_oracle)
    };
    let (store, store_hash, no_store, single) = (
        of(TIER_STORE),
        of(TIER_STORE_HASH),
        of(TIER_NO_STORE),
        of(SINGLE),
    );
    let points = |a: f64| (a - single) * 100.0;
    println!(
        "policies/tier/of_oracle against one instance ({single:.3}): with the store {store:.3}, {:+.1} points (target >= -1.0); with the store and hash placement {store_hash:.3}, {:+.1}; without the store {no_store:.3}, {:+.1}",
        points(store),
        points(store_hash),
        points(no_store),
    );
}
