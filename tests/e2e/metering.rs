//! Metering end to end: the usage log agrees exactly with the replicas' own ground truth.

use std::collections::BTreeMap;
use std::process::Command;

use serde_json::{json, Value};
use tether_e2e::{api_key_sha256, binary, regions_yaml, SimFleet, TempDir, Tether, TetherConfig};
use tether_loadgen::{RunConfig, Target, Workload};

const FLEET: [&str; 4] = ["eu-1", "eu-2", "us-1", "us-2"];

fn workload(seed: u64) -> Workload {
    Workload {
        sessions: 8,
        turns: 4,
        concurrency: 4,
        arrival_rate: 0.0,
        think_ms: 0,
        tenants: 2,
        system_tokens: 128,
        user_tokens: 32,
        max_tokens: 8,
        seed,
        ..Workload::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_usage_log_equals_the_replicas_ground_truth_after_a_graceful_shutdown() {
    let fleet = SimFleet::start(&FLEET).unwrap();
    let logs = TempDir::new("tether-usage").unwrap();
    let log_path = logs.path().join("usage.jsonl");
    let region = |prefix: &str| {
        FLEET
            .iter()
            .filter(|id| id.starts_with(prefix))
            .map(|id| (id.to_string(), fleet.addr(id), ""))
            .collect::<Vec<_>>()
    };
    let mut tether = Tether::start(&TetherConfig {
        body: format!(
            "local_region: eu\n{}tenants:\n  - {{ id: acme, api_key_sha256: \"{}\" }}\n  - {{ id: globex, api_key_sha256: \"{}\" }}\n\
             pricing:\n  default: {{ input_per_mtok: 0.5, cached_input_per_mtok: 0.05, output_per_mtok: 1.5, cache_write_per_mtok: 0.625 }}\n\
             usage_log: {{ path: \"{}\" }}\nmetering: {{ session_key: \"e2e-session-key-0123456789\" }}\n",
            regions_yaml(&[("eu", region("eu")), ("us", region("us"))]),
            api_key_sha256("sk-acme"),
            api_key_sha256("sk-globex"),
            log_path.display(),
        ),
    })
    .unwrap();
    let keys = vec!["sk-acme".to_string(), "sk-globex".to_string()];

    // Streaming and non-streaming agent sessions for both tenants…
    let mut sent = 0;
    for (seed, stream) in [(1, true), (2, false)] {
        let config = RunConfig {
            workload: workload(seed),
            target: Target::Proxy(format!("http://{}", tether.addr)),
            api_keys: keys.clone(),
            stream,
            block_tokens: 16,
            capacity_bound_tokens: None,
            bound_replicas: None,
        };
        let report = tether_loadgen::run(config, None).await.unwrap();
        assert_eq!(report.overall.errors, 0, "{:?}", report.error_samples);
        sent += report.overall.requests;
    }
    // …and Anthropic Messages, JSON and SSE (dialect chosen from the path).
    let client = reqwest::Client::new();
    for stream in [false, true] {
        let res = client
            .post(tether.url("/v1/messages"))
            .bearer_auth("sk-acme")
            .header("x-session-affinity", "anthropic-session")
            .json(&json!({"model": "claude-sim", "max_tokens": 5, "stream": stream, "system": "s".repeat(300), "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        res.bytes().await.unwrap();
        sent += 1;
    }

    // A rejected request is a request too: it gets its line, unmetered.
    let res = client
        .post(tether.url("/v1/chat/completions"))
        .bearer_auth("sk-wrong")
        .json(&json!({"messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    let metrics = client
        .get(tether.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tether_usage_log_dropped_total 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tether_input_tokens_total{cached=\"true\",tenant=\"acme\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tether_cache_write_tokens_total{tenant=\"acme\"}"),
        "{metrics}"
    );

    assert!(
        tether.terminate().unwrap(),
        "tether exits cleanly on SIGTERM"
    );

    let records: Vec<Value> = std::fs::read_to_string(&log_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len() as u64, sent + 1, "every request has its line");
    let (rejected, records): (Vec<Value>, Vec<Value>) =
        records.into_iter().partition(|r| r["status"] == 401);
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0]["usage_status"], "not_metered");
    assert!(rejected[0]["prompt_tokens"].is_null());
    for r in &records {
        assert_eq!(r["usage_status"], "found", "{r}");
        assert!(r["session"].as_str().is_some_and(|s| s.len() == 32), "{r}");
        assert!(
            !r.to_string().contains("anthropic-session"),
            "the raw token leaked: {r}"
        );
    }
    let sum = |field: &str| {
        records
            .iter()
            .map(|r| r[field].as_u64().unwrap())
            .sum::<u64>()
    };

    let truth = fleet.state().await;
    let truth_sum = |field: &str| {
        truth["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["stats"][field].as_u64().unwrap())
            .sum::<u64>()
    };
    assert_eq!(sent, truth_sum("requests"));
    assert_eq!(sum("prompt_tokens"), truth_sum("prompt_tokens"));
    assert_eq!(sum("cached_tokens"), truth_sum("cached_tokens"));
    assert_eq!(sum("completion_tokens"), truth_sum("completion_tokens"));
    assert!(sum("cached_tokens") > 0);

    // Cache writes: reported by the Anthropic replies only (inside their prompt, apart from
    // their cached tokens), null elsewhere, and priced at the cache-write price.
    let (anthropic, others): (Vec<&Value>, Vec<&Value>) =
        records.iter().partition(|r| r["model"] == "claude-sim");
    assert_eq!(anthropic.len(), 2, "{anthropic:?}");
    for r in &others {
        assert!(r["cache_write_tokens"].is_null(), "{r}");
        assert!(r["cache_write_1h_tokens"].is_null(), "{r}");
    }
    let mut written = 0;
    for r in &anthropic {
        let count = |field: &str| r[field].as_u64().unwrap();
        let (prompt, cached, write) = (
            count("prompt_tokens"),
            count("cached_tokens"),
            count("cache_write_tokens"),
        );
        assert!(cached + write <= prompt, "{r}");
        let scaled = (prompt - cached - write) * 500_000
            + cached * 50_000
            + write * 625_000
            + count("completion_tokens") * 1_500_000;
        assert_eq!(
            count("cost_micro_usd"),
            (scaled + 500_000) / 1_000_000,
            "{r}"
        );
        written += write;
    }
    assert!(
        written > 0,
        "the first Anthropic turn writes its prompt to the cache"
    );
    assert!(
        sum("uncached_cost_micro_usd") > sum("cost_micro_usd"),
        "the cache saved money"
    );

    // `tether report` prints each tenant's cache-hit % as computed from the records.
    let mut per_tenant: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for r in &records {
        let e = per_tenant
            .entry(r["tenant"].as_str().unwrap().to_owned())
            .or_default();
        e.0 += r["cached_tokens"].as_u64().unwrap();
        e.1 += r["prompt_tokens"].as_u64().unwrap();
    }
    let out = Command::new(binary("tether"))
        .arg("report")
        .arg(&log_path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    for (tenant, (cached, prompt)) in per_tenant {
        let pct = format!("{:.1}%", 100.0 * cached as f64 / prompt as f64);
        let line = table
            .lines()
            .find(|l| l.starts_with(&tenant))
            .unwrap_or_default();
        assert!(
            line.contains(&pct),
            "{tenant}: expected {pct} in {line:?}\n{table}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reopens_the_usage_log_after_rotation_and_report_reads_rotated_files() {
    let fleet = SimFleet::start(&["r-1"]).unwrap();
    let logs = TempDir::new("tether-rotate").unwrap();
    let log_path = logs.path().join("usage.jsonl");
    let mut tether = Tether::start(&TetherConfig {
        body: format!(
            "local_region: r\n{}usage_log: {{ path: \"{}\" }}\n",
            regions_yaml(&[("r", vec![("r-1".into(), fleet.addr("r-1"), "")])]),
            log_path.display()
        ),
    })
    .unwrap();
    let client = reqwest::Client::new();
    let chat = || async {
        let res = client
            .post(tether.url("/v1/chat/completions"))
            .json(&json!({"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        res.bytes().await.unwrap();
    };
    let lines = |path: &std::path::Path| {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .count()
    };

    chat().await;
    // The writer batches for a few ms; wait for the line rather than sleep blindly.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while lines(&log_path) < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first record never reached the file"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let rotated = logs.path().join("usage.jsonl.1");
    std::fs::rename(&log_path, &rotated).unwrap();
    let pid = tether.process.pid().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    // SIGHUP is handled asynchronously: keep sending until a record lands in the new file.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut sent = 1;
    while !log_path.exists() || lines(&log_path) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no new usage.jsonl after SIGHUP"
        );
        chat().await;
        sent += 1;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(tether.terminate().unwrap());
    assert_eq!(
        lines(&rotated) + lines(&log_path),
        sent,
        "no record lost across the rotation"
    );

    // Rotated files are usually compressed, and the live one may end mid-record.
    assert!(Command::new("gzip")
        .arg(&rotated)
        .status()
        .unwrap()
        .success());
    let mut live = std::fs::OpenOptions::new()
        .append(true)
        .open(&log_path)
        .unwrap();
    std::io::Write::write_all(&mut live, b"{\"ts\":\"2026-").unwrap();
    let out = Command::new(binary("tether"))
        .args(["report", "--format", "json"])
        .arg(logs.path().join("usage.jsonl.1.gz"))
        .arg(&log_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["total"]["requests"], sent, "{report}");
    assert!(
        out.stderr.is_empty(),
        "a half-written last line is not an error"
    );
}
