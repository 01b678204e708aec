//! Routing policy against cache hits, on one simulated fleet, in one run.
//!
//! The same seeded agent workload (loadgen) against the same fleet (6 replicas in 2 regions,
//! a prefix cache of 2,560 tokens each: under pressure), caches flushed between runs, for
//! each policy: round-robin, random, least-in-flight, nginx-style consistent hash of the
//! session header, HAProxy-style consistent hash with bounded loads (c = 1.25), and Tether.
//! The oracle (one infinite cache) is the upper bound for every policy. Then the scale-out
//! event: every session runs a turn, a seventh replica joins, every session runs another;
//! the share of sessions that moved, for Tether (reload of its topology) and for plain
//! consistent hashing (the ring rebuilt with seven nodes).
//!
//! Needs release binaries: `make bench` builds them first. `BENCH_QUICK=1`: a smaller workload.

// Benchmark code: a panic with a message is how it reports a broken environment.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use tether_e2e::{regions_yaml, SimFleet, Tether, TetherConfig};
use tether_loadgen::{ClientPolicy, Report, RunConfig, Target, Workload};

const SIX: [&str; 6] = ["eu-1", "eu-2", "eu-3", "us-1", "us-2", "us-3"];

fn tether_config(fleet: &SimFleet, ids: &[&str]) -> String {
    let region = |prefix: &str| {
        ids.iter()
            .filter(|id| id.starts_with(prefix))
            .map(|id| (id.to_string(), fleet.addr(id), ""))
            .collect::<Vec<_>>()
    };
    format!(
        "local_region: eu\n{}",
        regions_yaml(&[("eu", region("eu")), ("us", region("us"))])
    )
}

async fn flush(fleet: &SimFleet, ids: &[&str]) {
    for id in ids {
        fleet.flush(id).await;
    }
}

async fn run(workload: &Workload, target: Target) -> Report {
    tether_loadgen::run(
        RunConfig {
            workload: workload.clone(),
            target,
            api_keys: vec![],
            stream: true,
            block_tokens: 16,
        },
        None,
    )
    .await
    .expect("the workload runs")
}

/// Every session's replica after one turn, for sessions `0..n`.
async fn placements(client: &reqwest::Client, url: &str, n: usize, turn: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let token = format!("scale-{i}");
        let body = serde_json::json!({
            "model": "tether-sim",
            "max_tokens": 4,
            "messages": [{"role": "user", "content": format!("{token} turn {turn}")}],
        });
        let res = client
            .post(url)
            .header("x-session-affinity", &token)
            .json(&body)
            .send()
            .await
            .expect("tether answers");
        assert!(res.status().is_success(), "{}", res.status());
        out.push(
            res.headers()["x-replica-id"]
                .to_str()
                .unwrap_or_default()
                .to_owned(),
        );
    }
    out
}

fn ketama_owner(ring: &pingora_ketama::Continuum, token: &str) -> std::net::SocketAddr {
    ring.node(token.as_bytes()).expect("a non-empty ring")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::var_os("BENCH_QUICK").is_some();
    let workload = Workload {
        sessions: if quick { 24 } else { 48 },
        ..Workload::default()
    };
    let mut ids: Vec<&str> = SIX.to_vec();
    ids.push("eu-4");
    // Real latency model: TTFT is queueing + uncached prefill, so it shows what misses cost.
    let fleet = SimFleet::start_with(&ids, &["--time-scale", "1"]).unwrap();
    let urls: Vec<String> = SIX
        .iter()
        .map(|id| format!("http://{}", fleet.addr(id)))
        .collect();

    let mut rows: Vec<(&str, Report)> = Vec::new();
    for (name, policy) in [
        ("round-robin", ClientPolicy::RoundRobin),
        ("random", ClientPolicy::Random),
        ("least-in-flight", ClientPolicy::LeastInflight),
        ("consistent hash (nginx)", ClientPolicy::ConsistentHash),
        ("bounded-load hash (HAProxy)", ClientPolicy::BoundedHash),
    ] {
        flush(&fleet, &SIX).await;
        eprintln!("running {name}…");
        rows.push((
            name,
            run(&workload, Target::Direct(urls.clone(), policy)).await,
        ));
    }
    flush(&fleet, &SIX).await;
    let tether = Tether::start(&TetherConfig {
        body: tether_config(&fleet, &SIX),
    })
    .unwrap();
    eprintln!("running tether…");
    rows.push((
        "tether",
        run(&workload, Target::Proxy(format!("http://{}", tether.addr))).await,
    ));

    println!(
        "\n{:<30} {:>8} {:>8} {:>10} {:>10} {:>10} {:>9} {:>7}",
        "policy", "hit %", "oracle %", "of oracle", "TTFT p50", "TTFT p99", "max/mean", "errors"
    );
    let rr_p50 = rows[0].1.overall.ttft_p50_ms;
    for (name, r) in &rows {
        let o = &r.overall;
        println!(
            "{name:<30} {:>8.1} {:>8.1} {:>10.3} {:>8.0}ms {:>8.0}ms {:>9.2} {:>7}",
            o.hit_ratio * 100.0,
            o.oracle_ratio * 100.0,
            o.of_oracle,
            o.ttft_p50_ms,
            o.ttft_p99_ms,
            r.replica_max_over_mean,
            o.errors
        );
    }
    let t = &rows.last().unwrap().1.overall;
    println!(
        "\npolicies/tether_of_oracle {:.3} (target >= 0.97); TTFT p50 round-robin / tether {:.1}x (target >= 3)",
        t.of_oracle,
        rr_p50 / t.ttft_p50_ms.max(f64::MIN_POSITIVE)
    );

    // Scale-out: 6 → 7 replicas. Tether: sessions placed, topology reloaded with eu-4,
    // same sessions again.
    let n = if quick { 300 } else { 1000 };
    let client = reqwest::Client::new();
    let url = tether.url("/v1/chat/completions");
    let before = placements(&client, &url, n, 1).await;
    tether.rewrite_config(&tether_config(&fleet, &ids)).unwrap();
    // The reload is visible on the admin API once eu-4 is listed.
    let admin = tether.admin_url("/admin/replicas");
    for _ in 0..200 {
        let body = client
            .get(&admin)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if body.contains("\"eu-4\"") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let after = placements(&client, &url, n, 2).await;
    let tether_moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();

    let ring = |members: &[&str]| {
        let buckets: Vec<_> = members
            .iter()
            .map(|id| pingora_ketama::Bucket::new(fleet.addr(id), 1))
            .collect();
        pingora_ketama::Continuum::new(&buckets)
    };
    let (six, seven) = (ring(&SIX), ring(&ids));
    let ch_moved = (0..n)
        .map(|i| format!("scale-{i}"))
        .filter(|t| ketama_owner(&six, t) != ketama_owner(&seven, t))
        .count();
    println!(
        "\nscale-out 6 → 7 replicas, {n} sessions with one turn each before:\n  tether: {tether_moved} moved ({:.1} %, target 0 %)\n  consistent hash (nginx): {ch_moved} moved ({:.1} %; 1/(N+1) = {:.1} %)",
        100.0 * tether_moved as f64 / n as f64,
        100.0 * ch_moved as f64 / n as f64,
        100.0 / 7.0
    );
}
