//! Routing policy against cache hits, on one simulated fleet, in one run.
//!
//! The same seeded agent workload (loadgen) against the same fleet (6 replicas in 2 regions,
//! a prefix cache of 2,560 tokens each: under pressure), caches flushed between runs, for
//! each policy: round-robin, least-in-flight, nginx-style consistent hash of the session
//! header, HAProxy-style consistent hash with bounded loads (c = 1.25), and Tether, with tenant
//! locality (its default) and without. The workload's two tenants send their own API keys, so
//! Tether knows them (the client-side policies see only the session header). The oracle (one
//! infinite cache) is the upper bound for every policy.
//!
//! Scenarios, each on its own:
//! - steady state: the workload as it is, on 2,560-token caches: a replica holds one finished
//!   conversation, the coarsest packing there is;
//! - steady state at four times the granularity: 10,240-token caches and four times the
//!   sessions in flight, so the fleet is under the same pressure (cache per session in flight)
//!   but each replica holds several conversations, as a GPU's KV cache does; with two more
//!   Tether rows, sticky shedding on (`shed_factor: 1.25`) and the hot-spot configuration
//!   (tenant locality off and shedding on), for what they cost where nothing is hot;
//! - hot spot, on that fleet: tenant 0's sessions run 10× the turns of the others, long enough
//!   (60 turns) for a load-balancing reaction to matter; the hash policies and the same three
//!   Tethers;
//! - scale-out: every session runs a turn, a seventh replica joins, every session runs
//!   another; the share that moved (Tether: its topology reloaded; plain consistent hashing:
//!   the ring rebuilt with seven nodes);
//! - remove a replica: the same with one of the six taken out of the topology;
//! - drain one and bring it back: sessions moved by the drain, and moved again by the undrain
//!   (nginx's `down` and back is a removal and a re-add: its sessions go back, cold);
//! - shared KV regions ([`shared_kv`]): the hot spot again, the simulator giving each region a
//!   shared KV tier, through Tether with `kv_scope: region` and with `kv_scope: replica`;
//! - an edge tier ([`tier`]): three Tether instances, each turn to a random one, with and
//!   without a shared sticky store, through a replica failure and an instance restart;
//! - key sources ([`key_sources`]): the steady workload through Tether with the fingerprint
//!   on, the sessions naming themselves by the header, an agent header, `prompt_cache_key` or
//!   not at all, and with 30 % of them sharing one head; the tokenless sessions also straight
//!   to the replicas through SGLang's cache-aware policy (prefix-aware routing), and the CPU
//!   per request of both ways of routing them ([`request_cost`]).
//! - engines ([`engines`]): a slot-limited fleet (llama.cpp mode) and a KV-limited one (vLLM
//!   mode) at 1.5× and 2× the sessions they can hold, Tether reading the engines against the
//!   same Tether without engine signals and the client-side policies.
//!
//! Writes `docs/img/policies-hit-ratio.svg` and `docs/img/policies-by-turn.svg` (set
//! `BENCH_PLOTS_DIR` to write them elsewhere). Needs release binaries: `make bench` builds
//! them first; the edge tier also needs nginx and redis-server. `BENCH_QUICK=1`: a smaller
//! workload (`make bench-quick`). `BENCH_SCENARIO=steady,hot_spot,…`: only the scenarios
//! listed (`steady`, `steady_x4`, `hot_spot`, `events`, `shared_kv`, `tier`, `key_sources`,
//! `engines`).

// Benchmark code: a panic with a message is how it reports a broken environment.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use tether_e2e::{api_key_sha256, regions_yaml, SimFleet, Tether, TetherConfig};
use tether_loadgen::{ClientPolicy, Report, RunConfig, Target, Workload};

#[path = "policies/engines.rs"]
mod engines;
#[path = "policies/key_sources.rs"]
mod key_sources;
#[path = "policies/request_cost.rs"]
mod request_cost;
#[path = "policies/shared_kv.rs"]
mod shared_kv;
#[path = "policies/tier.rs"]
mod tier;

const SIX: [&str; 6] = ["eu-1", "eu-2", "eu-3", "us-1", "us-2", "us-3"];
const ADMIN_TOKEN: &str = "bench-admin-token-0123456789";
/// The workload's two tenants' API keys (tenant `i` sends key `i`): Tether knows its tenants,
/// as it would in production; the client-side policies route on the session header alone.
const TENANT_KEYS: [&str; 2] = ["sk-bench-tenant-0", "sk-bench-tenant-1"];

/// Tether's config for replicas `ids` of `fleet`; `locality: false` turns tenant locality off,
/// `shed_factor` turns sticky shedding on.
fn tether_config(
    fleet: &SimFleet,
    ids: &[&str],
    locality: bool,
    shed_factor: Option<f64>,
) -> String {
    tether_config_with(fleet, ids, locality, shed_factor, "")
}

/// [`tether_config`] with `replica_fields` (YAML, `engine: llamacpp` say) on every replica.
fn tether_config_with(
    fleet: &SimFleet,
    ids: &[&str],
    locality: bool,
    shed_factor: Option<f64>,
    replica_fields: &str,
) -> String {
    let region = |prefix: &str| {
        ids.iter()
            .filter(|id| id.starts_with(prefix))
            .map(|id| (id.to_string(), fleet.addr(id), replica_fields))
            .collect::<Vec<_>>()
    };
    let tenants: String = TENANT_KEYS
        .iter()
        .enumerate()
        .map(|(i, key)| {
            format!(
                "  - {{ id: tenant-{i}, api_key_sha256: \"{}\" }}\n",
                api_key_sha256(key)
            )
        })
        .collect();
    format!(
        "local_region: eu\naffinity: {{ tenant_locality: {}, shed_factor: {} }}\n{}admin: {{ token: \"{ADMIN_TOKEN}\" }}\ntenants:\n{tenants}",
        if locality { "30s" } else { "null" },
        shed_factor.map_or("null".to_string(), |f| f.to_string()),
        regions_yaml(&[("eu", region("eu")), ("us", region("us"))])
    )
}

/// Tether as configured by default, and the variants a fleet's scenarios compare it with:
/// tenant locality off; sticky shedding on; and the hot-spot configuration, locality off and
/// shedding on (each started only for the fleets whose runs print its row).
struct Tethers {
    default: Tether,
    no_locality: Option<Tether>,
    shedding: Option<Tether>,
    hot_config: Option<Tether>,
}

/// Which of the variant Tethers a fleet gets.
#[derive(Clone, Copy)]
struct Extras {
    no_locality: bool,
    shedding: bool,
    hot_config: bool,
}

/// The shed factor of the sticky-shedding rows, and the rows' names.
const SHED_FACTOR: f64 = 1.25;
const SHED_ROW: &str = "tether, shed_factor 1.25";
const HOT_CONFIG_ROW: &str = "tether, no locality, shed 1.25";

/// Simulated replicas `ids` (`cache_tokens` of prefix cache each, delays × `scale`) and the
/// Tethers in front of the six of `SIX`: as configured by default, and the `extras`.
fn fleet_and_tether(
    ids: &[&str],
    scale: &str,
    cache_tokens: usize,
    extras: Extras,
) -> (SimFleet, Tethers) {
    let fleet = SimFleet::start_with(
        ids,
        &[
            "--time-scale",
            scale,
            "--cache-tokens",
            &cache_tokens.to_string(),
        ],
    )
    .unwrap();
    let start = |locality, shed_factor| {
        Tether::start(&TetherConfig {
            body: tether_config(&fleet, &SIX, locality, shed_factor),
        })
        .unwrap()
    };
    let tethers = Tethers {
        default: start(true, None),
        no_locality: extras.no_locality.then(|| start(false, None)),
        shedding: extras.shedding.then(|| start(true, Some(SHED_FACTOR))),
        hot_config: extras.hot_config.then(|| start(false, Some(SHED_FACTOR))),
    };
    (fleet, tethers)
}

async fn flush(fleet: &SimFleet, ids: &[&str]) {
    for id in ids {
        fleet.flush(id).await;
    }
}

/// The simulated replicas' prefix cache, tokens (replica-sim's default): one finished
/// conversation of the workload (1,024 + 8 × (128 + 64) tokens) fills it.
const CACHE_TOKENS: usize = 2560;
/// How many times finer the second fleet is: caches this many times larger, and this many times
/// the sessions in flight (and arriving), so the pressure is the same.
const GRANULARITY: usize = 4;

/// Runs the workload once; `cache_tokens` (per replica) sizes the capacity bound (an upper
/// bound on what any router could hit with the fleet's `6 × cache_tokens`).
async fn run(workload: &Workload, target: Target, cache_tokens: usize) -> Report {
    tether_loadgen::run(
        RunConfig {
            workload: workload.clone(),
            target,
            api_keys: TENANT_KEYS.iter().map(|k| k.to_string()).collect(),
            stream: true,
            block_tokens: 16,
            capacity_bound_tokens: Some(cache_tokens * SIX.len()),
            bound_replicas: Some(SIX.len()),
        },
        None,
    )
    .await
    .expect("the workload runs")
}

/// Round-robin (the TTFT baseline) and the two hash policies: the rows of the secondary
/// scenarios.
const BASELINE_AND_HASHES: [(&str, ClientPolicy); 3] = [
    ("round-robin", ClientPolicy::RoundRobin),
    ("consistent hash (nginx)", ClientPolicy::ConsistentHash),
    ("bounded-load hash (HAProxy)", ClientPolicy::BoundedHash),
];

/// Runs `workload` once per policy (caches flushed before each), then through each variant
/// Tether the fleet has (what locality, shedding or both change, in the same run), and through
/// Tether as configured by default (last).
async fn run_policies(
    fleet: &SimFleet,
    tethers: &Tethers,
    workload: &Workload,
    policies: &[(&'static str, ClientPolicy)],
    cache_tokens: usize,
) -> Vec<(&'static str, Report)> {
    let urls: Vec<String> = SIX
        .iter()
        .map(|id| format!("http://{}", fleet.addr(id)))
        .collect();
    let variants: Vec<(&'static str, &Tether)> = tethers
        .no_locality
        .iter()
        .map(|t| ("tether, locality off", t))
        .chain(tethers.shedding.iter().map(|t| (SHED_ROW, t)))
        .chain(tethers.hot_config.iter().map(|t| (HOT_CONFIG_ROW, t)))
        .chain([("tether", &tethers.default)])
        .collect();
    let progress = indicatif::ProgressBar::new((policies.len() + variants.len()) as u64)
        .with_style(
            indicatif::ProgressStyle::with_template("  {bar:30} {pos}/{len} {msg} ({elapsed})")
                .expect("a valid template"),
        );
    let mut rows = Vec::new();
    for (name, policy) in policies {
        flush(fleet, &SIX).await;
        progress.set_message(*name);
        rows.push((
            *name,
            run(
                workload,
                Target::Direct(urls.clone(), *policy),
                cache_tokens,
            )
            .await,
        ));
        progress.inc(1);
    }
    for (name, tether) in variants {
        flush(fleet, &SIX).await;
        progress.set_message(name);
        rows.push((
            name,
            run(
                workload,
                Target::Proxy(format!("http://{}", tether.addr)),
                cache_tokens,
            )
            .await,
        ));
        progress.inc(1);
    }
    progress.finish_and_clear();
    rows
}

fn print_table(title: &str, rows: &[(&str, Report)]) {
    println!(
        "\n{title}\n{:<30} {:>8} {:>8} {:>10} {:>8} {:>10} {:>10} {:>10} {:>9} {:>7}",
        "policy",
        "hit %",
        "oracle %",
        "of oracle",
        "bound %",
        "bound/or",
        "TTFT p50",
        "TTFT p99",
        "max/mean",
        "errors"
    );
    for (name, r) in rows {
        let o = &r.overall;
        println!(
            "{name:<30} {:>8.1} {:>8.1} {:>10.3} {:>8.1} {:>10.3} {:>8.0}ms {:>8.0}ms {:>9.2} {:>7}",
            o.hit_ratio * 100.0,
            o.oracle_ratio * 100.0,
            o.of_oracle,
            r.capacity_bound_ratio.unwrap_or(0.0) * 100.0,
            r.capacity_bound_ratio.unwrap_or(0.0) / o.oracle_ratio.max(f64::MIN_POSITIVE),
            o.ttft_p50_ms,
            o.ttft_p99_ms,
            r.replica_max_over_mean,
            o.errors
        );
    }
    // The bounds depend on the requests only (every policy sends the same ones, in nearly the
    // same order): one row's will do.
    if let Some((_, r)) = rows.last() {
        println!(
            "bounds: pooled cache {:.1} %, separate replica caches (each holding its tenants' \
             shared prefix) {:.1} %",
            r.capacity_bound_ratio.unwrap_or(0.0) * 100.0,
            r.partitioned_bound_ratio.unwrap_or(0.0) * 100.0
        );
    }
}

/// Every session's replica after one turn through Tether, for tokens `{prefix}-0..n`.
async fn placements(
    client: &reqwest::Client,
    url: &str,
    prefix: &str,
    n: usize,
    turn: usize,
) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let token = format!("{prefix}-{i}");
        let body = serde_json::json!({
            "model": "tether-sim",
            "max_tokens": 4,
            "messages": [{"role": "user", "content": format!("{token} turn {turn}")}],
        });
        let res = client
            .post(url)
            .bearer_auth(TENANT_KEYS[0])
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

fn moved(before: &[String], after: &[String]) -> usize {
    before.iter().zip(after).filter(|(a, b)| a != b).count()
}

/// Waits until Tether's admin API lists (or no longer lists) replica `id`.
async fn wait_for_replica(client: &reqwest::Client, tether: &Tether, id: &str, listed: bool) {
    let admin = tether.admin_url("/admin/replicas");
    let needle = format!("\"{id}\"");
    for _ in 0..500 {
        let body = client
            .get(&admin)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if body.contains(&needle) == listed {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!(
        "tether never {} {id}",
        if listed { "listed" } else { "dropped" }
    );
}

async fn admin_post(client: &reqwest::Client, tether: &Tether, path: &str) {
    let res = client
        .post(tether.admin_url(path))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{path}: {}", res.status());
}

/// The replica plain consistent hashing (ketama, as nginx) gives each token, over `members`.
fn ketama(fleet: &SimFleet, members: &[&str], prefix: &str, n: usize) -> Vec<String> {
    let buckets: Vec<_> = members
        .iter()
        .map(|id| pingora_ketama::Bucket::new(fleet.addr(id), 1))
        .collect();
    let ring = pingora_ketama::Continuum::new(&buckets);
    (0..n)
        .map(|i| {
            let addr = ring
                .node(format!("{prefix}-{i}").as_bytes())
                .expect("a non-empty ring");
            members
                .iter()
                .find(|id| fleet.addr(id) == addr)
                .map(|id| id.to_string())
                .unwrap_or_default()
        })
        .collect()
}

fn pct(part: usize, n: usize) -> f64 {
    100.0 * part as f64 / n.max(1) as f64
}

/// Writes `{stem}-hit-ratio.svg` and `{stem}-by-turn.svg` into `dir`; `fleet` names the
/// scenario in their captions.
fn write_plots(dir: &Path, stem: &str, fleet: &str, rows: &[(&str, Report)]) {
    for (suffix, plot) in [
        (
            "hit-ratio",
            plot_hit_ratio as fn(&Path, &str, &[(&str, Report)]) -> _,
        ),
        ("by-turn", plot_by_turn),
    ] {
        let path = dir.join(format!("{stem}-{suffix}.svg"));
        match plot(&path, fleet, rows) {
            Ok(()) => eprintln!("wrote {}", path.display()),
            Err(e) => eprintln!("plot {}: {e}", path.display()),
        }
    }
}

fn plot_hit_ratio(
    path: &Path,
    fleet: &str,
    rows: &[(&str, Report)],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (960, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let n = rows.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Input cache-hit ratio by routing policy, {fleet}"),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((0..n).into_segmented(), 0f64..100f64)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc("cache-hit %")
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => rows.get(*i).map(|r| r.0.to_owned()).unwrap_or_default(),
            _ => String::new(),
        })
        .draw()?;
    for (i, (name, r)) in rows.iter().enumerate() {
        let color = if *name == "tether" {
            RGBColor(214, 39, 40)
        } else {
            RGBColor(120, 144, 176)
        };
        chart.draw_series(std::iter::once(Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), r.overall.hit_ratio * 100.0),
            ],
            color.filled(),
        )))?;
    }
    let oracle = rows
        .iter()
        .map(|r| r.1.overall.oracle_ratio)
        .fold(0.0, f64::max)
        * 100.0;
    chart
        .draw_series(LineSeries::new(
            [
                (SegmentValue::Exact(0), oracle),
                (SegmentValue::Exact(n), oracle),
            ],
            BLACK.stroke_width(2),
        ))?
        .label(format!("oracle (infinite sticky cache) {oracle:.1} %"))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn plot_by_turn(
    path: &Path,
    fleet: &str,
    rows: &[(&str, Report)],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (960, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let turns = rows.iter().map(|r| r.1.by_turn.len()).max().unwrap_or(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Input cache-hit ratio by turn of the conversation, {fleet}"),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(1usize..turns, 0f64..100f64)?;
    chart
        .configure_mesh()
        .x_desc("turn")
        .y_desc("cache-hit %")
        .draw()?;
    let series = |r: &Report, oracle: bool| -> Vec<(usize, f64)> {
        r.by_turn
            .iter()
            .enumerate()
            .map(|(t, totals)| {
                let v = if oracle {
                    totals.oracle_ratio
                } else {
                    totals.hit_ratio
                };
                (t + 1, v * 100.0)
            })
            .collect()
    };
    for (i, (name, r)) in rows.iter().enumerate() {
        let color = if *name == "tether" {
            RGBColor(214, 39, 40).stroke_width(3)
        } else {
            Palette99::pick(i).stroke_width(2)
        };
        chart
            .draw_series(LineSeries::new(series(r, false), color))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
    }
    if let Some((_, r)) = rows.last() {
        let style = BLACK.stroke_width(1);
        chart
            .draw_series(LineSeries::new(series(r, true), style))?
            .label("oracle")
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// The scenarios, by the names `BENCH_SCENARIO` takes.
const SCENARIOS: [&str; 8] = [
    "steady",
    "steady_x4",
    "hot_spot",
    "events",
    "shared_kv",
    "tier",
    "key_sources",
    "engines",
];

/// The scenarios to run: those `BENCH_SCENARIO` lists (comma-separated), or every one.
fn selected_scenarios() -> Vec<&'static str> {
    let Ok(list) = std::env::var("BENCH_SCENARIO") else {
        return SCENARIOS.to_vec();
    };
    let names: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let unknown: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !SCENARIOS.contains(n))
        .collect();
    assert!(
        unknown.is_empty(),
        "BENCH_SCENARIO: unknown {unknown:?}; the scenarios are {SCENARIOS:?}"
    );
    SCENARIOS
        .into_iter()
        .filter(|s| names.contains(s))
        .collect()
}

/// The hot-spot workload: tenant 0's sessions run 10× the turns of tenant 1's.
///
/// Short messages, so one hot conversation (60 turns, ~3,100 tokens) fits a replica's cache
/// three times over: what is measured is how a policy places and keeps many long sessions, not
/// a cache too small for one. 60 turns make the hot spot last long enough for a reaction to it
/// to matter (shedding waits 2 s, then moves a session a second; a hot spot that is over in a
/// few seconds needs no balancing).
fn hot_spot_workload(quick: bool) -> Workload {
    Workload {
        sessions: if quick { 12 } else { 24 * GRANULARITY },
        concurrency: if quick { 16 } else { 16 * GRANULARITY },
        arrival_rate: if quick { 8.0 } else { 8.0 * GRANULARITY as f64 },
        turns: if quick { 3 } else { 6 },
        hot_tenant_factor: 10,
        system_tokens: 256,
        user_tokens: 32,
        max_tokens: 16,
        think_ms: 50,
        seed: 7,
        ..Workload::default()
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::var_os("BENCH_QUICK").is_some();
    let scenarios = selected_scenarios();
    let runs = |name: &str| scenarios.contains(&name);
    let workload = Workload {
        sessions: if quick { 12 } else { 48 },
        ..Workload::default()
    };
    let mut ids: Vec<&str> = SIX.to_vec();
    ids.push("eu-4");
    // The latency model (TTFT = queueing + uncached prefill) shows what misses cost; it runs
    // at half speed (a quarter in quick mode) so the whole benchmark fits its time budget.
    // TTFT is compared as ratios between policies, which the scale does not change.
    let scale = if quick { "0.25" } else { "0.5" };
    let plots = std::env::var_os("BENCH_PLOTS_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/img"),
        PathBuf::from,
    );
    // The 2,560-token fleet, for the steady state and the events.
    let coarse = (runs("steady") || runs("events")).then(|| {
        let extras = Extras {
            no_locality: !quick && runs("steady"),
            shedding: false,
            hot_config: false,
        };
        fleet_and_tether(&ids, scale, CACHE_TOKENS, extras)
    });

    if let (true, Some((fleet, tethers))) = (runs("steady"), &coarse) {
        eprintln!("steady state:");
        let all = [
            ("round-robin", ClientPolicy::RoundRobin),
            ("least-in-flight", ClientPolicy::LeastInflight),
            ("consistent hash (nginx)", ClientPolicy::ConsistentHash),
            ("bounded-load hash (HAProxy)", ClientPolicy::BoundedHash),
        ];
        // The smoke run keeps round-robin (the TTFT baseline) and the two hash policies.
        let policies: Vec<_> = all
            .into_iter()
            .filter(|(_, p)| !quick || *p != ClientPolicy::LeastInflight)
            .collect();
        let rows = run_policies(fleet, tethers, &workload, &policies, CACHE_TOKENS).await;
        print_table(
            "steady state, 2,560-token caches (one finished conversation fills a replica)",
            &rows,
        );
        let t = &rows.last().unwrap().1.overall;
        println!(
            "policies/steady/tether_of_oracle {:.3} (target >= 0.97); TTFT p50 round-robin / tether {:.1}x (target >= 3)",
            t.of_oracle,
            rows[0].1.overall.ttft_p50_ms / t.ttft_p50_ms.max(f64::MIN_POSITIVE)
        );
        std::fs::create_dir_all(&plots).unwrap();
        write_plots(&plots, "policies", "2,560-token caches", &rows);
    }

    // The same conversations at four times the granularity: caches four times larger, four
    // times the sessions in flight. Cache per session in flight (the pressure) is unchanged,
    // but a replica now holds several conversations, as a real replica's KV cache does (tens
    // of thousands to millions of tokens against conversations of thousands), where above one
    // finished conversation fills a replica and placement is packing items as large as the bins.
    let fine_cache = CACHE_TOKENS * GRANULARITY;
    let steady_x4 = runs("steady_x4") && !quick;
    if steady_x4 || runs("hot_spot") {
        let (fine, fine_tethers) = fleet_and_tether(
            &SIX,
            scale,
            fine_cache,
            Extras {
                no_locality: false,
                shedding: true,
                hot_config: true,
            },
        );
        if steady_x4 {
            eprintln!("steady state, four times the granularity:");
            let fine_workload = Workload {
                sessions: workload.sessions * GRANULARITY,
                concurrency: workload.concurrency * GRANULARITY,
                arrival_rate: workload.arrival_rate * GRANULARITY as f64,
                ..workload.clone()
            };
            let fine_rows = run_policies(
                &fine,
                &fine_tethers,
                &fine_workload,
                &BASELINE_AND_HASHES,
                fine_cache,
            )
            .await;
            print_table(
                "steady state, 10,240-token caches and 4x the sessions in flight (the same pressure)",
                &fine_rows,
            );
            let t = &fine_rows.last().unwrap().1.overall;
            println!(
                "policies/steady_x4/tether_of_oracle {:.3} (target >= 0.97); TTFT p50 round-robin / tether {:.1}x (target >= 3)",
                t.of_oracle,
                fine_rows[0].1.overall.ttft_p50_ms / t.ttft_p50_ms.max(f64::MIN_POSITIVE)
            );
            std::fs::create_dir_all(&plots).unwrap();
            write_plots(
                &plots,
                "policies-x4",
                "10,240-token caches, 4x the sessions",
                &fine_rows,
            );
        }

        if runs("hot_spot") {
            eprintln!("hot spot (tenant 0's sessions 10x longer):");
            // Round-robin's balance is perfect by construction and its hits are not in the
            // race: the hot spot compares the hash policies with Tether's configurations.
            let hot_rows = run_policies(
                &fine,
                &fine_tethers,
                &hot_spot_workload(quick),
                &BASELINE_AND_HASHES[1..],
                fine_cache,
            )
            .await;
            print_table("hot spot: tenant 0's sessions run 10x the turns", &hot_rows);
            let max_over_mean = |name: &str| {
                hot_rows
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map_or("-".to_string(), |(_, r)| {
                        format!("{:.2}", r.replica_max_over_mean)
                    })
            };
            println!(
                "policies/hot_spot/max_over_mean tether {}, with shed_factor 1.25 {}, with locality off and shed_factor 1.25 {} (target <= 1.25)",
                max_over_mean("tether"),
                max_over_mean(SHED_ROW),
                max_over_mean(HOT_CONFIG_ROW),
            );
        }
    }

    if let (true, Some((fleet, tethers))) = (runs("events"), &coarse) {
        events(fleet, &tethers.default, &ids).await;
    }
    drop(coarse);

    if runs("shared_kv") {
        eprintln!("shared KV regions (the hot spot, with a shared KV tier per region):");
        shared_kv::run_scenario(&hot_spot_workload(quick), scale, fine_cache).await;
    }

    if runs("tier") {
        tier::run(&workload, scale).await;
    }

    if runs("key_sources") {
        eprintln!("key sources (how clients name their sessions):");
        key_sources::run_scenario(&workload, scale).await;
    }

    if runs("engines") {
        engines::run_scenario(quick, scale).await;
    }
}

/// Sessions moved by a drain and undrain, a removal and a scale-out, through Tether with its
/// defaults (`tether`, in front of `fleet`; `ids` are the six replicas and the one that joins).
async fn events(fleet: &SimFleet, tether: &Tether, ids: &[&str]) {
    // Placements run one request at a time: 200 sessions keep the moved shares within a few
    // points of exact and `make bench` within its 15-minute budget.
    let n = 200;
    let client = reqwest::Client::new();
    let url = tether.url("/v1/chat/completions");

    // Drain eu-2, then bring it back.
    let before = placements(&client, &url, "drain", n, 1).await;
    admin_post(&client, tether, "/admin/replicas/eu-2/drain").await;
    let during = placements(&client, &url, "drain", n, 2).await;
    admin_post(&client, tether, "/admin/replicas/eu-2/undrain").await;
    let after = placements(&client, &url, "drain", n, 3).await;
    let on_victim = before.iter().filter(|r| *r == "eu-2").count();
    let five: Vec<&str> = SIX.iter().copied().filter(|id| *id != "eu-2").collect();
    let (ch_all, ch_five) = (
        ketama(fleet, &SIX, "drain", n),
        ketama(fleet, &five, "drain", n),
    );
    println!(
        "\ndrain eu-2 and bring it back, {n} sessions ({on_victim} on eu-2):\n  tether: drain moved {} ({:.1} %), undrain moved {} ({:.1} %; target 0)\n  consistent hash (nginx `down` and back): drain moved {} ({:.1} %), undrain moved {} ({:.1} %)",
        moved(&before, &during),
        pct(moved(&before, &during), n),
        moved(&during, &after),
        pct(moved(&during, &after), n),
        moved(&ch_all, &ch_five),
        pct(moved(&ch_all, &ch_five), n),
        moved(&ch_five, &ch_all),
        pct(moved(&ch_five, &ch_all), n),
    );

    // Remove eu-3 from the topology.
    let before = placements(&client, &url, "remove", n, 1).await;
    let five: Vec<&str> = SIX.iter().copied().filter(|id| *id != "eu-3").collect();
    tether
        .rewrite_config(&tether_config(fleet, &five, true, None))
        .unwrap();
    wait_for_replica(&client, tether, "eu-3", false).await;
    let after = placements(&client, &url, "remove", n, 2).await;
    let on_removed = before.iter().filter(|r| *r == "eu-3").count();
    let others_moved = before
        .iter()
        .zip(&after)
        .filter(|(a, b)| *a != "eu-3" && a != b)
        .count();
    let (ch_six, ch_five) = (
        ketama(fleet, &SIX, "remove", n),
        ketama(fleet, &five, "remove", n),
    );
    println!(
        "\nremove eu-3, {n} sessions ({on_removed} on eu-3):\n  tether: {} moved ({:.1} %), of them not on eu-3: {others_moved} (target 0)\n  consistent hash (nginx): {} moved ({:.1} %)",
        moved(&before, &after),
        pct(moved(&before, &after), n),
        moved(&ch_six, &ch_five),
        pct(moved(&ch_six, &ch_five), n),
    );
    tether
        .rewrite_config(&tether_config(fleet, &SIX, true, None))
        .unwrap();
    wait_for_replica(&client, tether, "eu-3", true).await;

    // Scale-out: 6 → 7 replicas.
    let before = placements(&client, &url, "scale", n, 1).await;
    tether
        .rewrite_config(&tether_config(fleet, ids, true, None))
        .unwrap();
    wait_for_replica(&client, tether, "eu-4", true).await;
    let after = placements(&client, &url, "scale", n, 2).await;
    let tether_moved = moved(&before, &after);
    let ch_moved = moved(
        &ketama(fleet, &SIX, "scale", n),
        &ketama(fleet, ids, "scale", n),
    );
    println!(
        "\nscale-out 6 → 7 replicas, {n} sessions with one turn each before:\n  tether: {tether_moved} moved ({:.1} %, target 0 %)\n  consistent hash (nginx): {ch_moved} moved ({:.1} %; 1/(N+1) = {:.1} %)",
        pct(tether_moved, n),
        pct(ch_moved, n),
        100.0 / 7.0
    );
}
