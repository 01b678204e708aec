//! Hot reload under load, and the zero-downtime binary upgrade.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tether_e2e::{api_key_sha256, SimFleet, Tether, TetherConfig, READY_TIMEOUT};

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
        // Probes are off: this test is about what reloads move, and on a loaded machine a
        // probe that times out would move sessions for a reason the test cannot see.
        format!(
            "# step {step}\nlocal_region: a\nregions:\n  - name: a\n    replicas:\n{a}  - name: b\n    replicas:\n{b}{tenants}admin: {{ token: \"{ADMIN_TOKEN}\" }}\nreload: {{ watch: {} }}\nhealth:\n  probe: {{ enabled: false }}\n",
            self.watch
        )
    }

    /// Whether replica `id` takes traffic in this version (present and active).
    fn active(&self, id: &str) -> bool {
        !id.starts_with("c-") || self.churn.contains(&(id, "active"))
    }

    /// What `GET /admin/replicas` shows once this version is applied: id → (state, weight).
    fn admin_view(&self) -> BTreeMap<String, (String, u64)> {
        let mut view: BTreeMap<String, (String, u64)> = STABLE
            .iter()
            .map(|id| {
                let weight = if *id == "a-2" { self.a2_weight } else { 1 };
                (id.to_string(), ("active".to_owned(), u64::from(weight)))
            })
            .collect();
        for (id, state) in &self.churn {
            view.insert(id.to_string(), (state.to_string(), 1));
        }
        view
    }
}

/// `GET /admin/replicas` as id → (state, weight).
async fn admin_view(tether: &Tether) -> BTreeMap<String, (String, u64)> {
    let v: Value = reqwest::get(tether.admin_url("/admin/replicas"))
        .await
        .expect("admin answers")
        .json()
        .await
        .expect("admin answers JSON");
    v["replicas"]
        .as_array()
        .expect("a replicas array")
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap_or_default().to_owned(),
                (
                    r["state"].as_str().unwrap_or_default().to_owned(),
                    r["weight"].as_u64().unwrap_or_default(),
                ),
            )
        })
        .collect()
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

/// Waits until `tether_config_reloads_total{result}` reaches `want`.
async fn wait_for_reloads(tether: &Tether, result: &str, want: u64) {
    let started = Instant::now();
    let series = format!("tether_config_reloads_total{{result=\"{result}\"}}");
    loop {
        if counter(&tether.metrics().await, &series) >= want {
            return;
        }
        assert!(
            started.elapsed() < READY_TIMEOUT,
            "reload {want} ({result}) not seen within {READY_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[derive(Debug)]
struct Turn {
    replica: String,
    /// The test's mark (see [`Load`]) when the turn was sent and when its answer came.
    sent: usize,
    done: usize,
}

/// Steady load, and what it tells the test.
struct Load {
    tasks: tokio::task::JoinSet<Vec<(String, Vec<Turn>)>>,
    /// Requests answered so far.
    answered: Arc<AtomicUsize>,
}

impl Load {
    /// Waits until `n` requests have been answered.
    async fn until_answered(&self, n: usize) {
        let started = Instant::now();
        while self.answered.load(Ordering::Relaxed) < n {
            assert!(
                started.elapsed() < READY_TIMEOUT,
                "{} of {n} requests answered within {READY_TIMEOUT:?}",
                self.answered.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Every session's turns, once the workers have stopped.
    async fn sessions(mut self) -> BTreeMap<String, Vec<Turn>> {
        let mut sessions = BTreeMap::new();
        while let Some(done) = self.tasks.join_next().await {
            sessions.extend(done.expect("no request failed"));
        }
        sessions
    }
}

/// Sessions of up to 6 turns, one after another on each worker, until `stop`. Each turn notes
/// `sent_mark` as it is sent and `done_mark` as its answer comes: marks the test moves forward
/// as it changes things, so it knows what a turn may have seen.
async fn steady_load(
    tether: &Tether,
    workers: usize,
    stop: Arc<AtomicBool>,
    sent_mark: Arc<AtomicUsize>,
    done_mark: Arc<AtomicUsize>,
) -> Load {
    let client = reqwest::Client::new();
    let url = Arc::new(tether.url("/v1/chat/completions"));
    let next = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (client, url, stop, next, answered, sent_mark, done_mark) = (
            client.clone(),
            Arc::clone(&url),
            Arc::clone(&stop),
            Arc::clone(&next),
            Arc::clone(&answered),
            Arc::clone(&sent_mark),
            Arc::clone(&done_mark),
        );
        tasks.spawn(async move {
            let mut done = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let session = format!("session-{}", next.fetch_add(1, Ordering::Relaxed));
                let mut turns = Vec::new();
                for turn in 1..=6 {
                    let sent = sent_mark.load(Ordering::SeqCst);
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
                        sent,
                        done: done_mark.load(Ordering::SeqCst),
                    });
                    answered.fetch_add(1, Ordering::Relaxed);
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
                done.push((session, turns));
            }
            done
        });
    }
    Load { tasks, answered }
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

    // history[step] is the config in effect once step `step` is applied (a broken file
    // changes nothing). A turn notes `applied` when sent and `written` when answered: the
    // config that routed it is one of history[sent..=done].
    let mut history = vec![version.clone()];
    let (applied, written) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let stop = Arc::new(AtomicBool::new(false));
    let workers = 12;
    let load = steady_load(
        &tether,
        workers,
        Arc::clone(&stop),
        Arc::clone(&applied),
        Arc::clone(&written),
    )
    .await;

    let (mut ok, mut errors) = (0u64, 0u64);
    for step in 1..=50 {
        written.store(step, Ordering::SeqCst);
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
        } else {
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
            if step % 5 == 0 {
                tether.rewrite_config_in_place(&body).unwrap();
            } else {
                tether.rewrite_config(&body).unwrap();
            }
            ok += 1;
            wait_for_reloads(&tether, "ok", ok).await;
        }
        history.push(version.clone());
        // Applied: the admin API shows this version's replicas, states and weights.
        assert_eq!(
            admin_view(&tether).await,
            version.admin_view(),
            "replicas after step {step}"
        );
        applied.store(step, Ordering::SeqCst);
        if step % 8 == 6 {
            let want = if version.beta { 200 } else { 401 };
            assert_eq!(
                beta_status(client.clone(), url.clone()).await,
                want,
                "tenant beta after step {step}"
            );
        }
        // Every version serves a share of the load before the next write.
        load.until_answered(step * workers).await;
    }
    stop.store(true, Ordering::Relaxed);
    let sessions = load.sessions().await;

    // A session moves only off a replica that stopped taking traffic (removed, draining or
    // disabled) in some config that may have been in effect between its two turns, and onto
    // one that took traffic then: adding a replica or changing a weight moves nothing.
    let (mut kept, mut moved) = (0, 0);
    for (session, turns) in &sessions {
        for pair in turns.windows(2) {
            let (before, after) = (&pair[0], &pair[1]);
            let (from, to) = (&before.replica, &after.replica);
            if from == to {
                kept += 1;
                continue;
            }
            moved += 1;
            let steps = before.sent..=after.done;
            let window = &history[steps.clone()];
            assert!(
                window.iter().any(|v| !v.active(from)),
                "{session} moved {from} → {to}, and {from} took traffic at every step in {steps:?}"
            );
            assert!(
                window.iter().any(|v| v.active(to)),
                "{session} moved {from} → {to}, and {to} took no traffic at any step in {steps:?}"
            );
        }
    }
    let requests: usize = sessions.values().map(Vec::len).sum();
    eprintln!(
        "50 rewrites under load: {requests} requests, 0 failed; {kept} turns kept their \
         replica, {moved} moved off a replica that left rotation"
    );
    assert!(
        requests >= 50 * workers,
        "too little load: {requests} requests"
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

/// Phases of the upgrade test, as marks on each turn (see [`steady_load`]).
const BEFORE: usize = 0;
const UPGRADING: usize = 1;
const AFTER: usize = 2;

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
    let phase = Arc::new(AtomicUsize::new(BEFORE));
    let stop = Arc::new(AtomicBool::new(false));
    let workers = 8;
    let load = steady_load(
        &tether,
        workers,
        Arc::clone(&stop),
        Arc::clone(&phase),
        Arc::clone(&phase),
    )
    .await;
    // Sessions get going, then the upgrade lands in the middle of them.
    let each_phase = 100;
    load.until_answered(each_phase).await;
    phase.store(UPGRADING, Ordering::SeqCst);
    let upgrading = tokio::task::spawn_blocking(move || {
        tether.upgrade().expect("the upgrade completes");
        tether
    });
    let tether = upgrading.await.unwrap();
    assert_ne!(tether.process.pid(), old_pid);
    // The old process has exited: whatever is sent from now on reaches the new one. Once
    // the requests still on their way have been answered, as many again on the new process.
    phase.store(AFTER, Ordering::SeqCst);
    let answered = load.answered.load(Ordering::Relaxed);
    load.until_answered(answered + workers + each_phase).await;
    stop.store(true, Ordering::Relaxed);
    let sessions = load.sessions().await;

    // The new process starts with an empty override table, so a session may move where its
    // turns straddle the upgrade; turns both answered before it, or both sent after it, are
    // routed by one process and keep their replica.
    let (mut before, mut after, mut straddling, mut moved) = (0, 0, 0, 0);
    for (session, turns) in &sessions {
        for pair in turns.windows(2) {
            let (first, second) = (&pair[0], &pair[1]);
            let one_process = if second.done == BEFORE {
                before += 1;
                true
            } else if first.sent == AFTER {
                after += 1;
                true
            } else {
                straddling += 1;
                false
            };
            if first.replica != second.replica {
                assert!(
                    !one_process,
                    "{session} moved {} → {} between two turns served by one process",
                    first.replica, second.replica
                );
                moved += 1;
            }
        }
    }
    let requests: usize = sessions.values().map(Vec::len).sum();
    eprintln!(
        "upgrade under load: {requests} requests, 0 failed; of the turn-to-turn transitions, \
         {before} before the upgrade and {after} after it kept their replica, {moved} of \
         {straddling} across it moved"
    );
    let sent_after = sessions
        .values()
        .flatten()
        .filter(|t| t.sent == AFTER)
        .count();
    assert!(
        sent_after >= each_phase,
        "{sent_after} requests sent after the upgrade"
    );
    assert!(
        before > 0 && after > 0,
        "{before} transitions before, {after} after"
    );
}
