//! Hot reload under load, and the zero-downtime binary upgrade.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tether_e2e::{api_key_sha256, SimFleet, Tether, TetherConfig};

use crate::client::{chat, conversation};

const STABLE: [&str; 6] = ["a-1", "a-2", "a-3", "b-1", "b-2", "b-3"];
const CHURN: [&str; 2] = ["c-1", "c-2"];
const ADMIN_TOKEN: &str = "reload-test-admin-token";

/// One version of the fleet's config.
#[derive(Debug, Clone)]
struct Version {
    /// Churn replicas present, with their state.
    churn: Vec<(&'static str, &'static str)>,
    /// Weight of a-2.
    a2_weight: u32,
    /// Whether tenant `beta` exists.
    beta: bool,
    /// Watch the file (`reload.watch`).
    watch: bool,
}

impl Version {
    fn body(&self, fleet: &SimFleet, step: usize) -> String {
        let line = |id: &str, extra: &str| {
            format!(
                "      - {{ id: {id}, address: \"{}\"{extra} }}\n",
                fleet.addr(id)
            )
        };
        let mut a = String::new();
        for id in ["a-1", "a-2", "a-3"] {
            let extra = if id == "a-2" {
                format!(", weight: {}", self.a2_weight)
            } else {
                String::new()
            };
            a.push_str(&line(id, &extra));
        }
        for (id, state) in &self.churn {
            a.push_str(&line(id, &format!(", state: {state}")));
        }
        let b: String = ["b-1", "b-2", "b-3"]
            .iter()
            .map(|id| line(id, ""))
            .collect();
        let mut tenants = format!(
            "tenants:\n  - {{ id: acme, api_key_sha256: \"{}\" }}\n",
            api_key_sha256("sk-acme")
        );
        if self.beta {
            tenants.push_str(&format!(
                "  - {{ id: beta, api_key_sha256: \"{}\" }}\n",
                api_key_sha256("sk-beta")
            ));
        }
        // The step number makes every version's bytes differ, so each write is a reload.
        format!(
            "# step {step}\nlocal_region: a\nregions:\n  - name: a\n    replicas:\n{a}  - name: b\n    replicas:\n{b}{tenants}admin: {{ token: \"{ADMIN_TOKEN}\" }}\nreload: {{ watch: {} }}\nhealth:\n  probe: {{ interval: 200ms, timeout: 150ms }}\n",
            self.watch
        )
    }
}

/// The stable and churn replicas, and Tether on the first version of their config.
fn start(watch: bool) -> (SimFleet, Version, Tether) {
    let ids: Vec<&str> = STABLE.iter().chain(CHURN.iter()).copied().collect();
    let fleet = SimFleet::start(&ids).unwrap();
    let version = Version {
        churn: vec![],
        a2_weight: 1,
        beta: false,
        watch,
    };
    let tether = Tether::start(&TetherConfig {
        body: version.body(&fleet, 0),
    })
    .unwrap();
    (fleet, version, tether)
}

async fn reload_answer(res: reqwest::Result<reqwest::Response>) -> Value {
    res.expect("admin answers")
        .json()
        .await
        .expect("admin answers JSON")
}

fn counter(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until `tether_config_reloads_total{result}` reaches `want`; returns the wait.
async fn wait_for_reloads(tether: &Tether, result: &str, want: u64) -> Duration {
    let started = Instant::now();
    let series = format!("tether_config_reloads_total{{result=\"{result}\"}}");
    loop {
        if counter(&tether.metrics().await, &series) >= want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "reload {want} ({result}) not seen within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[derive(Debug)]
struct Turn {
    replica: String,
}

/// Sessions of up to 6 turns, one after another on each worker, until `stop`.
async fn steady_load(
    tether: &Tether,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinSet<Vec<(String, Vec<Turn>)>> {
    let client = reqwest::Client::new();
    let url = Arc::new(tether.url("/v1/chat/completions"));
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (client, url, stop, next) = (
            client.clone(),
            Arc::clone(&url),
            Arc::clone(&stop),
            Arc::clone(&next),
        );
        tasks.spawn(async move {
            let mut done = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let session = format!("session-{}", next.fetch_add(1, Ordering::Relaxed));
                let mut turns = Vec::new();
                for turn in 1..=6 {
                    let reply = chat(
                        &client,
                        &url,
                        Some("sk-acme"),
                        &[session.as_bytes()],
                        &conversation(&session, turn),
                    )
                    .await;
                    assert_eq!(
                        reply.status, 200,
                        "turn {turn} of {session} failed: {}",
                        reply.body
                    );
                    turns.push(Turn {
                        replica: reply.replica.expect("the sim names itself"),
                    });
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
                done.push((session, turns));
            }
            done
        });
    }
    tasks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_rewrites_under_load_fail_nothing_and_move_no_session_that_could_stay() {
    let (fleet, mut version, tether) = start(true);
    let client = reqwest::Client::new();
    let beta_status = |client: reqwest::Client, url: String| async move {
        chat(
            &client,
            &url,
            Some("sk-beta"),
            &[b"beta"],
            &conversation("beta", 1),
        )
        .await
        .status
    };
    let url = tether.url("/v1/chat/completions");
    assert_eq!(beta_status(client.clone(), url.clone()).await, 401);

    let stop = Arc::new(AtomicBool::new(false));
    let mut load = steady_load(&tether, 12, Arc::clone(&stop)).await;

    let (mut ok, mut errors) = (0u64, 0u64);
    let mut latencies = Vec::new();
    for step in 1..=50 {
        if step == 25 {
            // A broken file: the old config keeps serving, the error is counted and reported.
            tether
                .rewrite_config("regions: [ {name: a, replicas: [ {id: broken\n")
                .unwrap();
            errors += 1;
            wait_for_reloads(&tether, "error", errors).await;
            let res = client
                .post(tether.admin_url("/admin/reload"))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 422);
            let body: Value = res.json().await.unwrap();
            let message = body["error"]["message"].as_str().unwrap_or_default();
            assert!(message.contains("line"), "{message}");
            errors += 1;
            continue;
        }
        // Cycle through the operations an operator does all day.
        match step % 8 {
            1 => version.churn = vec![("c-1", "active")],
            2 => version.churn = vec![("c-1", "active"), ("c-2", "active")],
            3 => version.churn = vec![("c-1", "draining"), ("c-2", "active")],
            4 => version.a2_weight = if version.a2_weight == 1 { 3 } else { 1 },
            5 => version.churn = vec![("c-2", "active")],
            6 => version.beta = !version.beta,
            7 => version.churn = vec![("c-2", "disabled")],
            _ => version.churn = vec![],
        }
        let body = version.body(&fleet, step);
        let written = Instant::now();
        if step % 5 == 0 {
            tether.rewrite_config_in_place(&body).unwrap();
        } else {
            tether.rewrite_config(&body).unwrap();
        }
        ok += 1;
        wait_for_reloads(&tether, "ok", ok).await;
        latencies.push(written.elapsed());
        if step % 8 == 6 {
            let want = if version.beta { 200 } else { 401 };
            assert_eq!(
                beta_status(client.clone(), url.clone()).await,
                want,
                "tenant beta after step {step}"
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut sessions: BTreeMap<String, Vec<Turn>> = BTreeMap::new();
    while let Some(done) = load.join_next().await {
        sessions.extend(done.expect("no request failed"));
    }

    // Sessions on replicas that never stopped being eligible kept their replica, every turn.
    let (mut kept, mut churned) = (0, 0);
    for (session, turns) in &sessions {
        for pair in turns.windows(2) {
            let (from, to) = (&pair[0].replica, &pair[1].replica);
            if from.starts_with("c-") {
                churned += usize::from(from != to);
            } else {
                assert_eq!(
                    from, to,
                    "{session} moved off {from}, which stayed eligible"
                );
                kept += 1;
            }
        }
    }
    let requests: usize = sessions.values().map(Vec::len).sum();
    let worst = latencies.iter().max().copied().unwrap_or_default();
    eprintln!(
        "50 rewrites under load: {requests} requests, 0 failed; {kept} turns on stable replicas \
         all kept their replica; {churned} moves off churned replicas; reload latency worst \
         {worst:?}, median {:?}",
        {
            let mut l = latencies.clone();
            l.sort();
            l[l.len() / 2]
        }
    );
    assert!(requests > 500, "too little load: {requests} requests");
    assert!(
        worst <= Duration::from_secs(1),
        "a reload took {worst:?} from the write to its effect"
    );
    let m = tether.metrics().await;
    assert_eq!(
        counter(&m, "tether_config_reloads_total{result=\"ok\"}"),
        ok
    );
    assert_eq!(
        counter(&m, "tether_config_reloads_total{result=\"error\"}"),
        errors
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sighup_and_the_admin_api_reload_and_report_what_changed_and_what_needs_a_restart() {
    let (fleet, mut version, tether) = start(false);
    let client = reqwest::Client::new();
    let admin_ids = || async {
        let v: Value = reqwest::get(tether.admin_url("/admin/replicas"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };

    // SIGHUP (the watch is off, so only the signal can apply it).
    version.churn = vec![("c-1", "active")];
    tether.rewrite_config(&version.body(&fleet, 1)).unwrap();
    tether.hangup().unwrap();
    wait_for_reloads(&tether, "ok", 1).await;
    assert!(admin_ids().await.contains(&"c-1".to_owned()));

    // The admin API: needs the token, answers what changed.
    version.churn = vec![];
    version.beta = true;
    tether.rewrite_config(&version.body(&fleet, 2)).unwrap();
    let reload = |token: Option<&'static str>| {
        let mut req = client.post(tether.admin_url("/admin/reload"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    assert_eq!(reload(None).await.unwrap().status(), 401);
    let res = reload(Some(ADMIN_TOKEN)).await.unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["result"], "ok");
    assert_eq!(
        body["changes"],
        serde_json::json!(["replica c-1 removed", "tenant beta added"])
    );
    assert!(!admin_ids().await.contains(&"c-1".to_owned()));
    // Nothing new: unchanged.
    let body = reload_answer(reload(Some(ADMIN_TOKEN)).await).await;
    assert_eq!(body["result"], "unchanged");

    // A setting that cannot change live is applied nowhere and reported.
    let mut text = std::fs::read_to_string(&tether.config).unwrap();
    text = text.replace("threads: 2", "threads: 3");
    std::fs::write(&tether.config, text).unwrap();
    let body = reload_answer(reload(Some(ADMIN_TOKEN)).await).await;
    assert_eq!(
        body["restart_required"],
        serde_json::json!(["server.threads"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_binary_upgrade_under_load_fails_no_request() {
    let fleet = SimFleet::start(&STABLE).unwrap();
    let version = Version {
        churn: vec![],
        a2_weight: 1,
        beta: false,
        watch: true,
    };
    let mut tether = Tether::start(&TetherConfig {
        body: version.body(&fleet, 0),
    })
    .unwrap();
    let old_pid = tether.process.pid();
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = steady_load(&tether, 8, Arc::clone(&stop)).await;
    // Let sessions get going, then upgrade in the middle of them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let upgrading = tokio::task::spawn_blocking(move || {
        tether.upgrade().expect("the upgrade completes");
        tether
    });
    let tether = upgrading.await.unwrap();
    assert_ne!(tether.process.pid(), old_pid);
    // Some traffic on the new process, then stop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut sessions: BTreeMap<String, Vec<Turn>> = BTreeMap::new();
    while let Some(done) = load.join_next().await {
        sessions.extend(done.expect("no request failed during the upgrade"));
    }
    let requests: usize = sessions.values().map(Vec::len).sum();
    let moves: usize = sessions
        .values()
        .map(|t| {
            t.windows(2)
                .filter(|w| w[0].replica != w[1].replica)
                .count()
        })
        .sum();
    let transitions: usize = sessions.values().map(|t| t.len().saturating_sub(1)).sum();
    eprintln!(
        "upgrade under load: {requests} requests, 0 failed; {moves} of {transitions} turn-to-turn \
         transitions changed replica (the new process starts with an empty override table)"
    );
    assert!(requests > 100, "too little load: {requests}");
}
