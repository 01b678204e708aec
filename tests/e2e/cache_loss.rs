//! The cache-loss detector end to end: a replica whose prefix cache is emptied before every
//! turn is flagged within a few sticky turns (`/admin/replicas`, `/metrics`, one warn line),
//! and an agent workload on healthy replicas raises no alarm.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tether_e2e::{
    regions_yaml, ServerOpts, SimFleet, TempDir, Tether, TetherConfig, READY_TIMEOUT,
};
use tether_loadgen::{RunConfig, Target, Workload};

use crate::client::served;

const FLEET: [&str; 3] = ["eu-1", "eu-2", "eu-3"];
/// The words of the warn line that flags a replica.
const FLAGGED: &str = "prefix cache is off, flushed or evicting";

/// The config body: the replicas `ids` of `fleet`, a usage log, the detector's settings.
fn config_body(fleet: &SimFleet, ids: &[&str], usage_log: &std::path::Path) -> String {
    let replicas = ids
        .iter()
        .map(|id| (id.to_string(), fleet.addr(id), ""))
        .collect();
    format!(
        "local_region: eu\n{}usage_log: {{ path: \"{}\" }}\n\
         metering: {{ cache_loss: {{ threshold: 0.5, min_expected_tokens: 1500, window: 5m }} }}\n",
        regions_yaml(&[("eu", replicas)]),
        usage_log.display(),
    )
}

fn start(fleet: &SimFleet, usage_log: &std::path::Path) -> Tether {
    Tether::start_with_server(
        &TetherConfig {
            body: config_body(fleet, &FLEET, usage_log),
        },
        &[],
        ServerOpts {
            captured_log: Some("info"),
            ..ServerOpts::default()
        },
    )
    .unwrap()
}

async fn admin_replicas(tether: &Tether) -> Vec<Value> {
    let body: Value = reqwest::get(tether.admin_url("/admin/replicas"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["replicas"].as_array().unwrap().clone()
}

fn cache_of<'a>(replicas: &'a [Value], id: &str) -> &'a Value {
    &replicas.iter().find(|r| r["id"] == id).unwrap()["cache"]
}

/// The usage log's records, once it holds `n` (the writer thread runs behind the responses).
async fn records(path: &std::path::Path, n: usize) -> Vec<Value> {
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let records: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if records.len() >= n {
            return records;
        }
        assert!(
            started.elapsed() < READY_TIMEOUT,
            "{} of {n} records",
            records.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A conversation of `turns` user turns with a system prompt long enough that each sticky
/// turn expects a few hundred cached tokens.
fn conversation(session: &str, turns: usize) -> Value {
    let system = "You are a careful coding agent working in a large repository. ".repeat(30);
    let mut messages = vec![json!({"role": "system", "content": system})];
    for t in 0..turns {
        messages.push(json!({"role": "user", "content": format!("{session}: step {t}, go on")}));
        if t + 1 < turns {
            messages.push(json!({"role": "assistant", "content": format!("did step {t}")}));
        }
    }
    json!({"model": "tether-sim", "messages": messages, "max_tokens": 8})
}

/// Turn `n` of `session` (this file's conversation), answered 200; the replica that served it.
async fn served_turn(client: &reqwest::Client, url: &str, session: &str, n: usize) -> String {
    served(client, url, session, &conversation(session, n)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_flushed_every_turn_is_flagged_within_a_few_turns_and_the_others_are_not() {
    let fleet = SimFleet::start(&FLEET).unwrap();
    let logs = TempDir::new("tether-cache-loss").unwrap();
    let usage_log = logs.path().join("usage.jsonl");
    let mut tether = start(&fleet, &usage_log);
    let client = reqwest::Client::new();
    let url = tether.url("/v1/chat/completions");

    // The replica of the first session's first turn loses its cache before every turn.
    let sessions: Vec<String> = (0..9).map(|i| format!("agent-session-{i}")).collect();
    let cold = served_turn(&client, &url, &sessions[0], 1).await;
    let mut sent = 1;
    for turn in 1..=6 {
        for (i, session) in sessions.iter().enumerate() {
            if turn == 1 && i == 0 {
                continue;
            }
            fleet.flush(&cold).await;
            served_turn(&client, &url, session, turn).await;
            sent += 1;
        }
    }

    let records = records(&usage_log, sent).await;
    // Every sticky turn after the first on its replica has an expectation.
    let sticky_with_expectation: Vec<&Value> = records
        .iter()
        .filter(|r| r["expected_cached_tokens"].is_u64())
        .collect();
    assert!(
        sticky_with_expectation
            .iter()
            .all(|r| r["outcome"] == "sticky"),
        "only sticky turns are judged"
    );
    let cold_turns: Vec<&&Value> = sticky_with_expectation
        .iter()
        .filter(|r| r["replica"] == cold.as_str())
        .collect();
    assert!(
        cold_turns.len() >= 5,
        "{cold} served {} judged turns",
        cold_turns.len()
    );
    // Within a few turns: the first turns whose expectations reach min_expected_tokens.
    let mut expected = 0;
    let flag_after = cold_turns
        .iter()
        .position(|r| {
            expected += r["expected_cached_tokens"].as_u64().unwrap();
            expected >= 1500
        })
        .unwrap()
        + 1;
    assert!(flag_after <= 5, "{flag_after} turns to reach the evidence");
    for r in &cold_turns {
        assert_eq!(r["cached_tokens"], 0, "{cold} was flushed: {r}");
    }
    // The warm replicas' sticky turns found what they expected.
    for r in sticky_with_expectation
        .iter()
        .filter(|r| r["replica"] != cold.as_str())
    {
        assert!(
            r["cached_tokens"].as_u64() >= r["expected_cached_tokens"].as_u64(),
            "{r}"
        );
    }

    // The detector's verdict lands as the last records are logged: poll until it shows.
    let started = Instant::now();
    let replicas = loop {
        let replicas = admin_replicas(&tether).await;
        if cache_of(&replicas, &cold)["loss"] == true {
            break replicas;
        }
        assert!(started.elapsed() < READY_TIMEOUT, "{replicas:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let cold_cache = cache_of(&replicas, &cold);
    assert_eq!(cold_cache["kept_ratio"], 0.0, "{cold_cache}");
    assert_eq!(cold_cache["reported_tokens"], 0);
    assert!(cold_cache["expected_tokens"].as_u64() >= Some(1500));
    for id in FLEET.iter().filter(|id| **id != cold) {
        let cache = cache_of(&replicas, id);
        assert_eq!(cache["loss"], false, "{id}: {cache}");
        if let Some(ratio) = cache["kept_ratio"].as_f64() {
            assert!(ratio >= 0.95, "{id}: {cache}");
        }
    }
    let metrics = tether.metrics().await;
    let line = |name: &str, id: &str| {
        let prefix = format!("{name}{{replica=\"{id}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).map(str::to_owned))
    };
    assert_eq!(line("tether_cache_loss", &cold).as_deref(), Some("1"));
    assert_eq!(line("tether_cache_kept_ratio", &cold).as_deref(), Some("0"));
    assert_eq!(
        line("tether_cache_reported_tokens_total", &cold).as_deref(),
        Some("0")
    );
    let expected_total: u64 = line("tether_cache_expected_tokens_total", &cold)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        expected_total,
        cold_turns
            .iter()
            .map(|r| r["expected_cached_tokens"].as_u64().unwrap())
            .sum::<u64>(),
        "the counter sums the usage log's expectations"
    );
    for id in FLEET.iter().filter(|id| **id != cold) {
        assert_ne!(line("tether_cache_loss", id).as_deref(), Some("1"), "{id}");
    }

    // Removed from the topology, the replica is judged no more: its window and every series
    // labelled with it go.
    let remaining: Vec<&str> = FLEET.iter().copied().filter(|id| *id != cold).collect();
    tether
        .rewrite_config(&config_body(&fleet, &remaining, &usage_log))
        .unwrap();
    tether.hangup().unwrap();
    let started = Instant::now();
    loop {
        let metrics = tether.metrics().await;
        let label = format!("replica=\"{cold}\"");
        if !metrics.lines().any(|l| l.contains(&label)) {
            break;
        }
        assert!(
            started.elapsed() < READY_TIMEOUT,
            "{cold} still in {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    assert!(tether.terminate().unwrap());
    let log = std::fs::read_to_string(tether.log_path()).unwrap();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains(FLAGGED)).collect();
    assert_eq!(warnings.len(), 1, "one line per crossing: {warnings:#?}");
    assert!(
        warnings[0].contains(&format!("replica {cold}:")),
        "{}",
        warnings[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_workload_on_healthy_replicas_raises_no_alarm() {
    let fleet = SimFleet::start(&FLEET).unwrap();
    let logs = TempDir::new("tether-cache-loss").unwrap();
    let usage_log = logs.path().join("usage.jsonl");
    let mut tether = start(&fleet, &usage_log);
    let mut sent = 0;
    for (seed, stream) in [(3, true), (4, false)] {
        let config = RunConfig {
            workload: Workload {
                sessions: 12,
                turns: 8,
                concurrency: 4,
                arrival_rate: 0.0,
                think_ms: 0,
                tenants: 2,
                system_tokens: 256,
                user_tokens: 64,
                max_tokens: 32,
                seed,
                ..Workload::default()
            },
            target: Target::Proxy(format!("http://{}", tether.addr)),
            api_keys: vec![],
            stream,
            block_tokens: 16,
            capacity_bound_tokens: None,
            bound_replicas: None,
        };
        let report = tether_loadgen::run(config, None).await.unwrap();
        assert_eq!(report.overall.errors, 0, "{:?}", report.error_samples);
        sent += report.overall.requests;
    }
    let records = records(&usage_log, usize::try_from(sent).unwrap()).await;
    let judged: Vec<&Value> = records
        .iter()
        .filter(|r| r["expected_cached_tokens"].is_u64())
        .collect();
    assert!(
        judged.len() >= 100,
        "{} of {sent} turns judged",
        judged.len()
    );
    let replicas = admin_replicas(&tether).await;
    for id in FLEET {
        let cache = cache_of(&replicas, id);
        assert_eq!(cache["loss"], false, "{id}: {cache}");
        let ratio = cache["kept_ratio"]
            .as_f64()
            .unwrap_or_else(|| panic!("{id} judged: {cache}"));
        assert!(ratio >= 0.95, "{id}: {cache}");
    }
    let metrics = tether.metrics().await;
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("tether_cache_loss{") && l.ends_with(" 1")),
        "{metrics}"
    );
    assert!(tether.terminate().unwrap());
    let log = std::fs::read_to_string(tether.log_path()).unwrap();
    assert!(!log.contains(FLAGGED), "{log}");
}

/// In a tier the previous turn's prompt size stays with the instance that served it: a turn
/// whose previous turn another instance served is sticky but not judged, and the instance
/// that served an earlier turn judges against that (smaller) one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_tier_only_the_instance_that_served_the_previous_turn_expects_a_hit() {
    use tether_affinity::{TenantScope, TokenRules};
    use tether_sticky_store::testing::RedisServer;

    let redis = RedisServer::start().expect("redis-server starts");
    let fleet = SimFleet::start(&FLEET).unwrap();
    let logs = TempDir::new("tether-cache-loss-tier").unwrap();
    let replicas: Vec<_> = FLEET
        .iter()
        .map(|id| (id.to_string(), fleet.addr(id), ""))
        .collect();
    let edge = |name: &str| {
        Tether::start(&TetherConfig {
            body: format!(
                "local_region: eu\n{}usage_log: {{ path: \"{}\" }}\n\
                 sticky_store: {{ url: \"{}\", lookup_timeout: 20ms }}\n",
                regions_yaml(&[("eu", replicas.clone())]),
                logs.path().join(format!("{name}.jsonl")).display(),
                redis.url(),
            ),
        })
        .unwrap()
    };
    let (a, b) = (edge("a"), edge("b"));
    let session = "tier-cache-session";
    let token = TokenRules::default().validate(session.as_bytes()).unwrap();
    let store_key = format!("tether:s:{:016x}", TenantScope::new("default").key(token).0);
    let client = reqwest::Client::new();
    let mut replica = String::new();
    for (turn, edge) in [(1, &a), (2, &b), (3, &b), (4, &a)] {
        replica = served_turn(&client, &edge.url("/v1/chat/completions"), session, turn).await;
        // The next turn may go to the other instance: wait until the store has the binding.
        let started = Instant::now();
        loop {
            let stored: Option<String> = redis.query(redis::cmd("GET").arg(&store_key)).unwrap();
            if stored.as_deref() == Some(replica.as_str()) {
                break;
            }
            assert!(started.elapsed() < READY_TIMEOUT, "{stored:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let on_a = records(&logs.path().join("a.jsonl"), 2).await;
    let on_b = records(&logs.path().join("b.jsonl"), 2).await;
    let prompt = |r: &Value| r["prompt_tokens"].as_u64().unwrap();
    let blocks = |previous: u64, current: u64| previous.min(current - 1) / 16 * 16;
    for r in on_a.iter().chain(&on_b) {
        assert_eq!(
            r["replica"],
            replica.as_str(),
            "one replica throughout: {r}"
        );
    }
    assert_eq!(
        on_a[0]["expected_cached_tokens"],
        Value::Null,
        "a new session"
    );
    assert_eq!(on_b[0]["outcome"], "sticky", "{}", on_b[0]);
    assert_eq!(
        on_b[0]["expected_cached_tokens"],
        Value::Null,
        "b did not serve turn 1: {}",
        on_b[0]
    );
    assert_eq!(
        on_b[1]["expected_cached_tokens"].as_u64(),
        Some(blocks(prompt(&on_b[0]), prompt(&on_b[1]))),
        "b served turn 2: {}",
        on_b[1]
    );
    assert_eq!(on_a[1]["outcome"], "sticky");
    assert_eq!(
        on_a[1]["expected_cached_tokens"].as_u64(),
        Some(blocks(prompt(&on_a[0]), prompt(&on_a[1]))),
        "a judges turn 4 against turn 1, the last it served: {}",
        on_a[1]
    );
    for r in [&on_b[1], &on_a[1]] {
        assert!(
            r["cached_tokens"].as_u64() >= r["expected_cached_tokens"].as_u64(),
            "{r}"
        );
    }
}
