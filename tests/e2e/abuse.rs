//! One tenant flooding the override table with unique tokens cannot evict another tenant's
//! sessions: each tenant holds at most `affinity.override_share` of the table; and a tenant over
//! its request, new-session or concurrency limit is answered 429, logged and counted.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures_util::future::join_all;
use tether_e2e::{api_key_sha256, SimFleet, Tether, TetherConfig};

use crate::client::conversation;

const QUIET_SESSIONS: usize = 40;
const QUIET_ROUNDS: usize = 6;
const FLOOD_TOKENS: usize = 1_500;
const FLOOD_CONCURRENCY: usize = 6;

fn config(fleet: &SimFleet, override_share: &str) -> TetherConfig {
    TetherConfig {
        body: format!(
            // No probes: on a loaded machine a late probe answer would take a replica out and
            // turn this into a test of failover.
            "local_region: r\naffinity:\n  override_capacity: 300\n  override_share: {override_share}\nhealth:\n  probe: {{ enabled: false }}\n{}tenants:\n  - {{ id: flood, api_key_sha256: \"{}\" }}\n  - {{ id: quiet, api_key_sha256: \"{}\" }}\n",
            fleet.regions_by_prefix(&["r"]),
            api_key_sha256("sk-flood"),
            api_key_sha256("sk-quiet"),
        ),
    }
}

/// One turn; returns the session-affinity outcome Tether reported, `None` when the turn was
/// not answered 200 (a flood on a loaded machine may meet a busy replica).
async fn turn(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    token: &str,
    n: usize,
) -> Option<String> {
    let res = client
        .post(url)
        .bearer_auth(key)
        .header("x-session-affinity", token)
        .json(&conversation(token, n))
        .send()
        .await
        .expect("tether answers");
    if res.status() != 200 {
        return None;
    }
    let outcome = res
        .headers()
        .get("x-session-affinity-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    res.bytes().await.ok()?;
    Some(outcome)
}

/// The quiet tenant's later turns that found their session's entry (`warm`), out of all its
/// later turns, while the flood tenant sends one turn each of many new sessions.
async fn quiet_stickiness_under_a_flood(override_share: &str) -> (usize, usize) {
    let fleet = SimFleet::start(&["r-1", "r-2"]).unwrap();
    let tether = Tether::start(&config(&fleet, override_share)).unwrap();
    let client = reqwest::Client::new();
    let url = tether.url("/v1/chat/completions");
    let quiet: Vec<String> = (0..QUIET_SESSIONS).map(|i| format!("quiet-{i}")).collect();
    for token in &quiet {
        assert_eq!(
            turn(&client, &url, "sk-quiet", token, 1).await.as_deref(),
            Some("new")
        );
    }

    let next_flood = Arc::new(AtomicUsize::new(0));
    let flood = join_all((0..FLOOD_CONCURRENCY).map(|_| {
        let (client, url, next) = (client.clone(), url.clone(), Arc::clone(&next_flood));
        async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= FLOOD_TOKENS {
                    break;
                }
                turn(&client, &url, "sk-flood", &format!("flood-{i}"), 1).await;
            }
        }
    }));
    let quiet_turns = async {
        let mut warm = 0;
        for round in 0..QUIET_ROUNDS {
            // Spread the rounds over the flood, each once a sixth of it has passed.
            while next_flood.load(Ordering::Relaxed) < (round + 1) * FLOOD_TOKENS / QUIET_ROUNDS
                && next_flood.load(Ordering::Relaxed) < FLOOD_TOKENS
            {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            for token in &quiet {
                let outcome = turn(&client, &url, "sk-quiet", token, round + 2).await;
                warm += usize::from(outcome.as_deref() == Some("warm"));
            }
        }
        warm
    };
    let (_, warm) = tokio::join!(flood, quiet_turns);
    (warm, QUIET_SESSIONS * QUIET_ROUNDS)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_tenant_cannot_evict_a_quiet_tenants_sessions() {
    let (warm, turns) = quiet_stickiness_under_a_flood("0.5").await;
    println!("override_share 0.5: {warm} of {turns} quiet turns warm");
    assert!(
        warm * 100 >= turns * 99,
        "{warm} of {turns} quiet turns stayed sticky"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_share_the_same_flood_evicts_quiet_sessions() {
    // The control for the test above: the flood is large enough to matter.
    let (warm, turns) = quiet_stickiness_under_a_flood("1").await;
    println!("override_share 1: {warm} of {turns} quiet turns warm");
    assert!(
        warm * 100 < turns * 90,
        "{warm} of {turns} quiet turns stayed sticky without a share"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_over_their_limits_get_429_logged_and_counted() {
    let fleet = SimFleet::start(&["r-1", "r-2"]).unwrap();
    let logs = tether_e2e::TempDir::new("tether-limits").unwrap();
    let log_path = logs.path().join("usage.jsonl");
    let mut tether = Tether::start(&TetherConfig {
        body: format!(
            "local_region: r\n{}tenants:\n  - {{ id: flood, api_key_sha256: \"{}\", limits: {{ requests_per_second: 0.05, request_burst: 3 }} }}\n  - {{ id: quiet, api_key_sha256: \"{}\" }}\n\
             tenant_limits: {{ new_sessions_per_second: 0.05, new_session_burst: 1 }}\n\
             usage_log: {{ path: \"{}\" }}\n",
            fleet.regions_by_prefix(&["r"]),
            api_key_sha256("sk-flood"),
            api_key_sha256("sk-quiet"),
            log_path.display(),
        ),
    })
    .unwrap();
    let client = reqwest::Client::new();
    let url = tether.url("/v1/chat/completions");
    let send = |key: &'static str, token: &'static str| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let res = client
                .post(&url)
                .bearer_auth(key)
                .header("x-session-affinity", token)
                .json(&conversation(token, 1))
                .send()
                .await
                .expect("tether answers");
            let status = res.status().as_u16();
            let retry_after = res
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body: serde_json::Value = res.json().await.expect("a JSON body");
            (status, retry_after, body)
        }
    };

    // The quiet tenant: one new session a burst, then its next new session is refused while
    // the session it has goes on.
    assert_eq!(send("sk-quiet", "q-1").await.0, 200);
    let (status, retry_after, body) = send("sk-quiet", "q-2").await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    let secs: u32 = retry_after.expect("Retry-After").parse().unwrap();
    assert!((19..=20).contains(&secs), "{secs}");
    assert_eq!(send("sk-quiet", "q-1").await.0, 200);

    // The flood tenant: its request rate (burst 3; one goes to its first session).
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(send("sk-flood", "f-1").await.0);
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);

    let metrics = client
        .get(tether.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"tether_limited_total{limit="requests",tenant="flood"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"tether_limited_total{limit="new_sessions",tenant="quiet"} 1"#),
        "{metrics}"
    );
    assert!(
        tether.terminate().unwrap(),
        "tether exits cleanly on SIGTERM"
    );
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&log_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 8, "every request has its line");
    let limited: Vec<(&str, &str)> = records
        .iter()
        .filter(|r| r["status"] == 429)
        .map(|r| {
            (
                r["tenant"].as_str().unwrap_or_default(),
                r["limit"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        limited,
        [
            ("quiet", "new_sessions"),
            ("flood", "requests"),
            ("flood", "requests")
        ]
    );
    assert!(records
        .iter()
        .filter(|r| r["status"] == 200)
        .all(|r| r.get("limit").is_none()));
}
