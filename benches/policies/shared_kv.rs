//! Shared KV regions: soft affinity inside a region whose replicas share a KV tier.
//!
//! Each region of the six-replica fleet gets a shared KV tier in the simulator (LMCache or
//! Mooncake style: write-through, a hit from the tier costs a fraction of the prefill), each
//! replica [`MAX_NUM_SEQS`] sequence slots, so the hot spot queues, and the hot-spot workload
//! runs twice through Tether: once told `kv_scope: region`, so a session's later turns go to
//! the least-loaded replica of its region, and once with `kv_scope: replica` (its defaults: hard
//! affinity, tenant locality on) in front of the same simulator. Hits count the tier's tokens as
//! cached, as vLLM with an LMCache connector reports them.

use std::time::Instant;

use tether_e2e::{SimFleet, Tether, TetherConfig};
use tether_loadgen::{Report, RunConfig, Target, Workload};

use super::{flush, tether_config, SIX, TENANT_KEYS};

/// The fleet's regions: each one gets a shared KV tier.
const REGIONS: [&str; 2] = ["eu", "us"];

/// Sequence slots per replica, half the simulator's 16. A shared tier is for a hot spot that
/// overfills its replica's slots; with 16, the hot spot's busiest replica rarely queues. With 8,
/// the fleet still has room on average (balanced, a replica rarely queues) while a replica at
/// 1.6 × the mean does; with 4 every replica queues, balanced or not, which is overload, not a
/// hot spot. Few slots is a real engine's shape: llama.cpp's server decodes `--parallel`
/// sequences, vLLM admits a sequence only while its KV blocks fit.
const MAX_NUM_SEQS: usize = 8;

/// The two Tether configurations compared, by row name and `kv_scope`; the one under test last,
/// as in the other tables.
const SCOPES: [(&str, &str); 2] = [
    ("tether, kv_scope: replica", "replica"),
    ("tether, kv_scope: region", "region"),
];

/// One configuration's run.
struct Row {
    name: &'static str,
    report: Report,
    /// Tokens fetched from a shared tier ÷ prompt tokens (the simulator's ground truth).
    shared_ratio: f64,
    /// Requests Tether routed with outcome `shared_kv` ÷ requests.
    shared_kv_share: f64,
}

/// Runs the scenario on a fresh simulator (`scale`: its time scale, `cache_tokens`: each
/// replica's own cache) and prints its table.
pub(crate) async fn run_scenario(workload: &Workload, scale: &str, cache_tokens: usize) {
    let started = Instant::now();
    let fleet = start_fleet(scale, cache_tokens);
    let mut rows = Vec::new();
    for (name, scope) in SCOPES {
        eprintln!("  {name}");
        rows.push(run_one(&fleet, workload, name, scope).await);
    }
    print_shared_table(
        "shared KV regions: the hot spot, a shared KV tier per region in the simulator",
        &rows,
    );
    let (replica, region) = (&rows[0], &rows[1]);
    let (a, b) = (&replica.report, &region.report);
    println!(
        "policies/shared_kv/region_vs_replica max/mean {:.2} vs {:.2}, TTFT p99 {:.0} ms vs {:.0} ms (target: both lower with region); hit {:.1} % vs {:.1} % ({:+.1} points, target within 2)",
        b.replica_max_over_mean,
        a.replica_max_over_mean,
        b.overall.ttft_p99_ms,
        a.overall.ttft_p99_ms,
        b.overall.hit_ratio * 100.0,
        a.overall.hit_ratio * 100.0,
        (b.overall.hit_ratio - a.overall.hit_ratio) * 100.0,
    );
    println!(
        "policies/shared_kv/run_time {:.0} s",
        started.elapsed().as_secs_f64()
    );
}

/// The six replicas in their regions, [`MAX_NUM_SEQS`] slots each, each region with a shared KV
/// tier of the simulator's default size (8 × `cache_tokens`) and transfer cost (0.2 × the
/// prefill time).
fn start_fleet(scale: &str, cache_tokens: usize) -> SimFleet {
    let mut args: Vec<String> = vec![
        "--time-scale".into(),
        scale.into(),
        "--cache-tokens".into(),
        cache_tokens.to_string(),
        "--max-num-seqs".into(),
        MAX_NUM_SEQS.to_string(),
    ];
    for id in SIX {
        args.push("--region-of".into());
        args.push(format!("{id}={}", region_of(id)));
    }
    for region in REGIONS {
        args.push("--shared-kv-region".into());
        args.push(region.into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    SimFleet::start_with(&SIX, &args).unwrap()
}

/// The region of a replica of `SIX`: its id's prefix, as `tether_config` places it.
fn region_of(id: &str) -> &str {
    id.split('-').next().unwrap_or(id)
}

/// Tether's default config for the six replicas, every region with `kv_scope: scope`.
fn scoped_config(fleet: &SimFleet, scope: &str) -> String {
    let mut body = tether_config(fleet, &SIX, true, None);
    for region in REGIONS {
        let line = format!("  - name: {region}\n");
        assert!(body.contains(&line), "no region {region} in {body}");
        body = body.replacen(&line, &format!("{line}    kv_scope: {scope}\n"), 1);
    }
    body
}

/// Empties every replica's cache and every region's tier, runs `workload` through a Tether
/// started with `kv_scope: scope`, and reads what the simulator and Tether counted.
async fn run_one(fleet: &SimFleet, workload: &Workload, name: &'static str, scope: &str) -> Row {
    flush(fleet, &SIX).await;
    let client = reqwest::Client::new();
    for region in REGIONS {
        let res = client
            .post(fleet.admin_url(&format!("/regions/{region}/flush")))
            .send()
            .await
            .expect("the sim admin API answers");
        assert!(
            res.status().is_success(),
            "flushing {region}'s tier: {}",
            res.status()
        );
    }
    let tether = Tether::start(&TetherConfig {
        body: scoped_config(fleet, scope),
    })
    .unwrap();
    let before = sim_tokens(fleet).await;
    let report = tether_loadgen::run(
        RunConfig {
            workload: workload.clone(),
            target: Target::Proxy(format!("http://{}", tether.addr)),
            api_keys: TENANT_KEYS.iter().map(|k| k.to_string()).collect(),
            stream: true,
            block_tokens: 16,
            // The capacity bounds model separate replica caches, which a shared tier is not.
            capacity_bound_tokens: None,
            bound_replicas: None,
        },
        None,
    )
    .await
    .expect("the workload runs");
    let after = sim_tokens(fleet).await;
    let metrics = tether.metrics().await;
    let requests = requests_counted(&metrics, "");
    Row {
        name,
        report,
        shared_ratio: (after.0 - before.0) as f64 / (after.1 - before.1).max(1) as f64,
        shared_kv_share: requests_counted(&metrics, "outcome=\"shared_kv\"") / requests.max(1.0),
    }
}

/// The simulator's ground truth summed over the replicas: (tokens fetched from a shared
/// tier, prompt tokens).
async fn sim_tokens(fleet: &SimFleet) -> (u64, u64) {
    let state = fleet.state().await;
    let replicas = state["replicas"]
        .as_array()
        .expect("GET /replicas lists replicas");
    let sum = |field: &str| {
        replicas
            .iter()
            .map(|r| r["stats"][field].as_u64().expect("a counter"))
            .sum()
    };
    (sum("shared_cached_tokens"), sum("prompt_tokens"))
}

/// The sum of the `tether_requests_total` series whose labels contain `label`.
fn requests_counted(metrics: &str, label: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("tether_requests_total{") && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        // Not `sum()`: the sum of no floats is -0.0.
        .fold(0.0, |total, n| total + n)
}

fn print_shared_table(title: &str, rows: &[Row]) {
    println!(
        "\n{title}\n{:<30} {:>8} {:>8} {:>10} {:>9} {:>10} {:>10} {:>10} {:>9} {:>7}",
        "policy",
        "hit %",
        "oracle %",
        "of oracle",
        "shared %",
        "shared_kv",
        "TTFT p50",
        "TTFT p99",
        "max/mean",
        "errors"
    );
    for row in rows {
        let o = &row.report.overall;
        println!(
            "{:<30} {:>8.1} {:>8.1} {:>10.3} {:>9.1} {:>9.1}% {:>8.0}ms {:>8.0}ms {:>9.2} {:>7}",
            row.name,
            o.hit_ratio * 100.0,
            o.oracle_ratio * 100.0,
            o.of_oracle,
            row.shared_ratio * 100.0,
            row.shared_kv_share * 100.0,
            o.ttft_p50_ms,
            o.ttft_p99_ms,
            row.report.replica_max_over_mean,
            o.errors
        );
    }
    println!(
        "shared %: the part of the prompt tokens fetched from a region's tier (in hit %); \
         shared_kv: requests Tether routed with that outcome"
    );
}
