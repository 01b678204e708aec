//! Health checks and failover with real processes: replicas die, hang, drain, overload and
//! recover under steady load, and no client request fails.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tether_e2e::{regions_yaml, SimFleet, TempDir, Tether, TetherConfig, READY_TIMEOUT};

use crate::client::{chat, conversation, served_turn};

const SIX: [&str; 6] = ["eu-1", "eu-2", "eu-3", "us-1", "us-2", "us-3"];
const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// Fast health settings so a test sees verdicts within a second.
const FAST_HEALTH: &str = "health:\n  probe: { interval: 200ms, timeout: 150ms, rise: 2, fall: 2 }\n  eject_after: 2\n  eject_cooldown: 1s\n";

/// The `regions:` YAML of the six replicas of `fleet`, eu and us.
fn six_regions(fleet: &SimFleet) -> String {
    let region = |prefix: &str| {
        SIX.iter()
            .filter(|id| id.starts_with(prefix))
            .map(|id| (id.to_string(), fleet.addr(id), ""))
            .collect::<Vec<_>>()
    };
    regions_yaml(&[("eu", region("eu")), ("us", region("us"))])
}

fn config(fleet: &SimFleet, extra: &str) -> TetherConfig {
    TetherConfig {
        body: format!(
            "local_region: eu\n{}{FAST_HEALTH}admin: {{ token: \"{ADMIN_TOKEN}\" }}\n{extra}",
            six_regions(fleet)
        ),
    }
}

/// One answered turn.
#[derive(Debug, Clone)]
struct Turn {
    replica: String,
}

/// Runs `sessions` sessions of `turns` turns on `workers` workers, turn by turn (every
/// session's turn 1, then every turn 2, …), so an event lands in the middle of conversations.
/// `event` runs once `trigger` requests have completed. Every request must succeed.
async fn run_with_event<F, Fut>(
    tether: &Tether,
    sessions: usize,
    turns: usize,
    workers: usize,
    trigger: usize,
    event: F,
) -> BTreeMap<String, Vec<Turn>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let client = reqwest::Client::new();
    let url = Arc::new(tether.url("/v1/chat/completions"));
    let done = Arc::new(AtomicUsize::new(0));
    let trigger_done = Arc::clone(&done);
    let event_task = tokio::spawn(async move {
        while trigger_done.load(Ordering::Relaxed) < trigger {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        event().await;
    });
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..workers {
        let (client, url, done) = (client.clone(), Arc::clone(&url), Arc::clone(&done));
        let mine: Vec<String> = (worker..sessions)
            .step_by(workers)
            .map(|i| format!("session-{i}"))
            .collect();
        tasks.spawn(async move {
            let mut log: Vec<(String, Turn)> = Vec::new();
            for turn in 1..=turns {
                for session in &mine {
                    let reply = chat(
                        &client,
                        &url,
                        None,
                        &[session.as_bytes()],
                        &conversation(session, turn),
                    )
                    .await;
                    assert_eq!(
                        reply.status, 200,
                        "turn {turn} of {session} failed: {}",
                        reply.body
                    );
                    log.push((
                        session.clone(),
                        Turn {
                            replica: reply.replica.expect("the sim names itself"),
                        },
                    ));
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
            log
        });
    }
    let mut all: BTreeMap<String, Vec<Turn>> = BTreeMap::new();
    while let Some(log) = tasks.join_next().await {
        for (session, turn) in log.expect("a worker panicked") {
            all.entry(session).or_default().push(turn);
        }
    }
    event_task.await.expect("the event ran");
    all
}

/// Checks that only sessions on `victim` moved, each once and for good, and returns how many
/// moved.
fn assert_only_victims_moved(placed: &BTreeMap<String, Vec<Turn>>, victim: &str) -> usize {
    let mut moved = 0;
    for (session, turns) in placed {
        let replicas: Vec<&str> = turns.iter().map(|t| t.replica.as_str()).collect();
        let changes = replicas.windows(2).filter(|w| w[0] != w[1]).count();
        if changes == 0 {
            continue;
        }
        moved += 1;
        assert_eq!(
            changes, 1,
            "{session} moved more than once (flapping): {replicas:?}"
        );
        let first_other = replicas.iter().position(|r| *r != replicas[0]);
        assert_eq!(
            replicas[0], victim,
            "{session} moved without its replica failing: {replicas:?}"
        );
        assert!(
            first_other.is_some_and(|i| replicas[i..].iter().all(|r| *r != victim)),
            "{session} went back to the failed replica: {replicas:?}"
        );
    }
    moved
}

/// The value of one Prometheus series (0 when absent).
fn counter(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

async fn admin_replicas(tether: &Tether) -> Vec<Value> {
    let v: Value = reqwest::get(tether.admin_url("/admin/replicas"))
        .await
        .expect("admin answers")
        .json()
        .await
        .expect("admin answers JSON");
    v["replicas"].as_array().cloned().unwrap_or_default()
}

async fn replica_field(tether: &Tether, id: &str, field: &str) -> Value {
    admin_replicas(tether)
        .await
        .into_iter()
        .find(|r| r["id"] == id)
        .map(|r| r[field].clone())
        .unwrap_or(Value::Null)
}

/// Polls the admin API until replica `id`'s health is `want`.
async fn wait_for_health(tether: &Tether, id: &str, want: &str) {
    let started = Instant::now();
    loop {
        let health = replica_field(tether, id, "health").await;
        if health == want {
            return;
        }
        assert!(
            started.elapsed() < READY_TIMEOUT,
            "{id} still {health} after {READY_TIMEOUT:?}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn post_admin(tether: &Tether, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new().post(tether.admin_url(path));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let res = req.send().await.expect("admin answers");
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_mid_run_fails_no_request_and_moves_only_its_sessions() {
    let fleet = Arc::new(SimFleet::start(&SIX).unwrap());
    let tether = Tether::start(&config(&fleet, "")).unwrap();
    // Enough sessions that the victim's share is within about 1.5 % of 1/6 by sampling alone.
    let (sessions, turns) = (600, 5);
    let victim = "eu-2";
    let sim = Arc::clone(&fleet);
    // Killed after every session's second turn: its listener and open connections are gone.
    let placed = run_with_event(
        &tether,
        sessions,
        turns,
        16,
        sessions * 2,
        move || async move {
            sim.set_fault(victim, json!({"kind": "refuse"})).await;
        },
    )
    .await;

    let on_victim = placed
        .values()
        .filter(|turns| turns[0].replica == victim)
        .count();
    assert!(on_victim > 0, "no session started on {victim}");
    let moved = assert_only_victims_moved(&placed, victim);
    assert_eq!(
        moved, on_victim,
        "every session of the dead replica moved, and nothing else"
    );
    let share = moved as f64 / sessions as f64;
    eprintln!("killed {victim}: {moved} of {sessions} sessions moved ({share:.3}), 0 failed");
    assert!(
        share <= 1.0 / 6.0 + 0.02,
        "{moved} of {sessions} sessions moved ({share:.3} > 1/6 + 2 %)"
    );
    // Moved turns are labelled `failover` in the records and metrics.
    let metrics = tether.metrics().await;
    assert!(
        metrics.contains("outcome=\"failover\""),
        "no failover outcome counted: {metrics}"
    );
    // The dead replica is out of rotation, by probes or by failed requests.
    let health = replica_field(&tether, victim, "health").await;
    assert!(
        health == "unhealthy" || health == "ejected",
        "{victim} is {health}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_replica_costs_its_clients_one_bounded_delay_and_no_error() {
    let fleet = Arc::new(SimFleet::start(&SIX).unwrap());
    let logs = TempDir::new("tether-hung").unwrap();
    let log_path = logs.path().join("usage.jsonl");
    let mut tether = Tether::start(&config(
        &fleet,
        &format!(
            "upstream: {{ read_timeout: 800ms }}\nusage_log: {{ path: \"{}\" }}\n",
            log_path.display()
        ),
    ))
    .unwrap();
    let (sessions, turns, workers) = (120, 5, 12);
    let victim = "us-1";
    let sim = Arc::clone(&fleet);
    // It accepts connections and requests, and never answers.
    let placed = run_with_event(
        &tether,
        sessions,
        turns,
        workers,
        sessions * 2,
        move || async move {
            sim.set_fault(victim, json!({"kind": "hang"})).await;
        },
    )
    .await;

    assert_only_victims_moved(&placed, victim);
    assert_ne!(replica_field(&tether, victim, "health").await, "healthy");
    let metrics = tether.metrics().await;
    // A request waiting on the replica is retried at its read timeout, or when probes take
    // the replica out first, whichever comes first.
    let timeouts = counter(
        &metrics,
        "tether_upstream_retries_total{reason=\"timeout\"}",
    ) + counter(
        &metrics,
        "tether_upstream_retries_total{reason=\"departed\"}",
    );
    assert!(tether.terminate().unwrap());
    let records: Vec<Value> = std::fs::read_to_string(&log_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), sessions * turns, "one record per request");
    let attempts = |r: &Value| r["attempts"].as_u64().expect("attempts");
    // One read timeout, then the next replica answers: never two timeouts in a row.
    for r in &records {
        assert!(attempts(r) <= 2, "more than one bounded delay: {r}");
        assert_eq!(r["status"], 200, "{r}");
    }
    let delayed: Vec<&Value> = records.iter().filter(|r| attempts(r) == 2).collect();
    eprintln!(
        "hung {victim}: {} requests, 0 failed, {} waited for one read timeout",
        records.len(),
        delayed.len()
    );
    assert!(
        !delayed.is_empty(),
        "no request ever reached the hung replica"
    );
    assert_eq!(
        timeouts,
        delayed.len() as u64,
        "each second attempt followed a read timeout or the replica's departure"
    );
    assert!(
        delayed.iter().all(|r| r["replica"] != victim),
        "a retry was served by the hung replica"
    );
    // Probes and failed requests take the replica out quickly: only the requests already on
    // their way to it (at most one per worker, twice) wait.
    assert!(
        delayed.len() <= 2 * workers,
        "{} requests waited for the hung replica",
        delayed.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_waiting_on_a_replica_that_hangs_move_when_probes_take_it_out() {
    // The shipped `read_timeout` (5 minutes): only the departure can end their wait early,
    // which needs watched connections.
    let fleet = Arc::new(SimFleet::start(&SIX).unwrap());
    let tether = Tether::start(&config(&fleet, "upstream: { watch_connections: true }\n")).unwrap();
    let client = reqwest::Client::new();
    let url = tether.url("/v1/chat/completions");
    let session = "hung-session";
    let victim = served_turn(&client, &url, session, 1).await;
    fleet.set_fault(&victim, json!({"kind": "hang"})).await;
    let hung_at = Instant::now();
    let mut waiting = tokio::task::JoinSet::new();
    for n in 2..6 {
        let (client, url) = (client.clone(), url.clone());
        waiting.spawn(async move {
            let reply = chat(
                &client,
                &url,
                None,
                &[session.as_bytes()],
                &conversation(session, n),
            )
            .await;
            (reply, hung_at.elapsed())
        });
    }
    let mut waited = Vec::new();
    while let Some(done) = waiting.join_next().await {
        let (reply, after) = done.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_ne!(reply.replica.as_deref(), Some(victim.as_str()));
        waited.push(after);
    }
    let longest = waited.iter().max().copied().unwrap_or_default();
    // Detection: `fall` (2) probes of 200 ms interval with a 150 ms timeout, well under a
    // second; the bound leaves room for a loaded machine and stays far from the 5 minutes.
    eprintln!("hung {victim}: the waiting requests were answered after at most {longest:?}");
    assert!(longest < Duration::from_secs(5), "{waited:?}");
    let metrics = tether.metrics().await;
    assert!(
        counter(
            &metrics,
            "tether_upstream_retries_total{reason=\"departed\"}"
        ) >= 1,
        "no request was moved off the departed replica: {metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_answering_200_with_garbage_is_ejected_and_loses_its_sessions() {
    let fleet = SimFleet::start(&SIX).unwrap();
    let tether = Tether::start(&config(&fleet, "")).unwrap();
    let client = reqwest::Client::new();
    let url = tether.url("/v1/chat/completions");
    let session = "garbage-session";
    let victim = served_turn(&client, &url, session, 1).await;
    fleet.set_fault(&victim, json!({"kind": "garbage"})).await;
    // `eject_after` (2) answers that are 200 but not JSON.
    for turn in 2..4 {
        let res = client
            .post(&url)
            .header("x-session-affinity", session)
            .json(&conversation(session, turn))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["x-replica-id"], victim.as_str());
        let body = res.bytes().await.unwrap();
        assert!(serde_json::from_slice::<Value>(&body).is_err());
    }
    assert_eq!(replica_field(&tether, &victim, "health").await, "ejected");
    let moved_to = served_turn(&client, &url, session, 4).await;
    assert_ne!(moved_to, victim);
    // The session stays where it moved, even once the replica answers well again.
    fleet.set_fault(&victim, json!({"kind": "none"})).await;
    assert_eq!(served_turn(&client, &url, session, 5).await, moved_to);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_immediate_drain_moves_the_requests_waiting_on_a_stuck_replica() {
    let fleet = SimFleet::start(&SIX).unwrap();
    // Probes too rare to notice anything: only the operator's drain can.
    let tether = Tether::start(&TetherConfig {
        body: format!(
            "local_region: eu\n{}health:\n  probe: {{ interval: 1h, timeout: 1s }}\nadmin: {{ token: \"{ADMIN_TOKEN}\" }}\nupstream: {{ watch_connections: true }}\n",
            six_regions(&fleet)
        ),
    })
    .unwrap();
    let client = reqwest::Client::new();
    let url = tether.url("/v1/chat/completions");
    let session = "stuck-session";
    let victim = served_turn(&client, &url, session, 1).await;
    fleet.set_fault(&victim, json!({"kind": "hang"})).await;
    let waiting = {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move { served_turn(&client, &url, session, 2).await })
    };
    let started = Instant::now();
    while crate::client::inflight(&client, &tether.admin_url("/admin/replicas"))
        .await
        .into_iter()
        .all(|(id, n)| id != victim || n == 0)
    {
        assert!(
            started.elapsed() < READY_TIMEOUT,
            "the request never reached {victim}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drained_at = Instant::now();
    let path = format!("/admin/replicas/{victim}/drain?now=true");
    let (status, _) = post_admin(&tether, &path, Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200);
    let served_by = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiting request moved at the drain")
        .unwrap();
    assert_ne!(served_by, victim);
    eprintln!(
        "moved off {victim} {:?} after the drain",
        drained_at.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_through_the_admin_api_moves_existing_sessions_and_takes_no_new_ones() {
    let fleet = SimFleet::start(&SIX).unwrap();
    let tether = Tether::start(&config(&fleet, "")).unwrap();
    let client = reqwest::Client::new();
    let url = tether.url("/v1/chat/completions");
    let victim = "eu-1";
    let turn = |session: String, n: usize| {
        let (client, url) = (client.clone(), url.clone());
        async move { served_turn(&client, &url, &session, n).await }
    };
    let mut first = BTreeMap::new();
    for i in 0..120 {
        let session = format!("old-{i}");
        first.insert(session.clone(), turn(session, 1).await);
    }
    let held = replica_field(&tether, victim, "override_entries").await;
    let on_victim = first.values().filter(|r| *r == victim).count();
    assert_eq!(held, json!(on_victim), "admin shows the sessions it holds");
    assert!(on_victim > 0);

    // Changes need the token.
    let path = format!("/admin/replicas/{victim}/drain");
    assert_eq!(post_admin(&tether, &path, None).await.0, 401);
    assert_eq!(
        post_admin(&tether, &path, Some("wrong-token-wrong"))
            .await
            .0,
        401
    );
    assert_eq!(
        post_admin(&tether, "/admin/replicas/nope/drain", Some(ADMIN_TOKEN))
            .await
            .0,
        404
    );
    let (status, body) = post_admin(&tether, &path, Some(ADMIN_TOKEN)).await;
    assert_eq!((status, &body["changed"]), (200, &json!(true)), "{body}");
    assert_eq!(replica_field(&tether, victim, "health").await, "drained");

    // Existing sessions: those on the drained replica move, the rest stay.
    let mut second = BTreeMap::new();
    for (session, was) in &first {
        let now = turn(session.clone(), 2).await;
        if was == victim {
            assert_ne!(now, victim, "{session} stayed on the drained replica");
        } else {
            assert_eq!(&now, was, "{session} moved though its replica is fine");
        }
        second.insert(session.clone(), now);
    }
    // New sessions: none lands there.
    for i in 0..120 {
        assert_ne!(turn(format!("new-{i}"), 1).await, victim);
    }

    // Undrain: it takes new sessions again; the moved ones stay where their cache now is.
    let (status, _) = post_admin(
        &tether,
        &format!("/admin/replicas/{victim}/undrain"),
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(status, 200);
    let mut landed = 0;
    for i in 0..120 {
        landed += usize::from(turn(format!("later-{i}"), 1).await == victim);
    }
    assert!(landed > 0, "the undrained replica took no new session");
    for (session, now) in &second {
        assert_eq!(
            &turn(session.clone(), 3).await,
            now,
            "{session} flapped back"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_changes_are_refused_without_a_configured_token() {
    let fleet = SimFleet::start(&["a-1"]).unwrap();
    let tether = Tether::start(&TetherConfig {
        body: format!(
            "local_region: a\n{}",
            regions_yaml(&[("a", vec![("a-1".into(), fleet.addr("a-1"), "")])])
        ),
    })
    .unwrap();
    let (status, body) = post_admin(&tether, "/admin/replicas/a-1/drain", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "admin_disabled");
    assert_eq!(replica_field(&tether, "a-1", "drained").await, json!(false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_whole_region_down_is_served_by_the_other_and_everything_down_is_a_503() {
    let fleet = SimFleet::start(&SIX).unwrap();
    let tether = Tether::start(&config(&fleet, "")).unwrap();
    for id in ["eu-1", "eu-2", "eu-3"] {
        fleet.set_fault(id, json!({"kind": "refuse"})).await;
    }
    let client = reqwest::Client::new();
    let url = tether.url("/v1/chat/completions");
    let mut regions = BTreeSet::new();
    for i in 0..60 {
        let replica = served_turn(&client, &url, &format!("s-{i}"), 1).await;
        regions.insert(replica[..2].to_owned());
    }
    assert_eq!(regions, BTreeSet::from(["us".to_owned()]));
    assert!(tether.metrics().await.contains("outcome=\"cross_region\""));

    for id in ["us-1", "us-2", "us-3"] {
        fleet.set_fault(id, json!({"kind": "refuse"})).await;
    }
    let reply = chat(&client, &url, None, &[b"late"], &conversation("late", 1)).await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(reply.body["error"]["code"], "no_replica_available");
    assert!(
        reply
            .retry_after
            .as_deref()
            .and_then(|s| s.parse::<u64>().ok())
            .is_some_and(|s| s >= 1),
        "Retry-After: {:?}",
        reply.retry_after
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recovered_replica_returns_after_rise_probes_and_moved_sessions_stay_put() {
    let fleet = SimFleet::start(&SIX).unwrap();
    let tether = Tether::start(&config(&fleet, "")).unwrap();
    let client = reqwest::Client::new();
    let url = tether.url("/v1/chat/completions");
    let victim = "eu-3";
    let send = |session: String, n: usize| {
        let (client, url) = (client.clone(), url.clone());
        async move { served_turn(&client, &url, &session, n).await }
    };
    let mut placed = BTreeMap::new();
    for i in 0..90 {
        let s = format!("s-{i}");
        placed.insert(s.clone(), send(s, 1).await);
    }
    fleet.set_fault(victim, json!({"kind": "refuse"})).await;
    wait_for_health(&tether, victim, "unhealthy").await;
    for (session, replica) in placed.iter_mut() {
        let now = send(session.clone(), 2).await;
        assert_ne!(now, victim);
        *replica = now;
    }

    fleet.set_fault(victim, json!({"kind": "none"})).await;
    // Back after `rise` good probes in a row (the count is unit-tested in tether-health).
    wait_for_health(&tether, victim, "healthy").await;
    let mut landed = 0;
    for i in 0..90 {
        landed += usize::from(send(format!("fresh-{i}"), 1).await == victim);
    }
    assert!(landed > 0, "the recovered replica took no new session");
    for (session, replica) in &placed {
        assert_eq!(
            &send(session.clone(), 3).await,
            replica,
            "{session} flapped back"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_overloaded_replica_is_skipped_for_its_retry_after_and_the_request_succeeds() {
    let fleet = SimFleet::start(&SIX).unwrap();
    // No probes here: the overload alone must steer traffic.
    let tether = Tether::start(&config(&fleet, "")).unwrap();
    let client = reqwest::Client::new();
    let url = tether.url("/v1/chat/completions");
    // Find a session that lives on the victim.
    let victim = "us-2";
    let mut session = None;
    for i in 0..200 {
        let s = format!("s-{i}");
        let reply = chat(&client, &url, None, &[s.as_bytes()], &conversation(&s, 1)).await;
        if reply.replica.as_deref() == Some(victim) {
            session = Some(s);
            break;
        }
    }
    let session = session.expect("some session lands on the victim");
    fleet
        .set_fault(victim, json!({"kind": "unavailable", "retry_after": 30}))
        .await;
    let reply = chat(
        &client,
        &url,
        None,
        &[session.as_bytes()],
        &conversation(&session, 2),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_ne!(reply.replica.as_deref(), Some(victim));
    let replicas = admin_replicas(&tether).await;
    let state = replicas.iter().find(|r| r["id"] == victim).unwrap();
    // Overloaded for its Retry-After, unless the probes (which also get 503) already took it out.
    assert!(
        state["health"] == "overloaded" || state["health"] == "unhealthy",
        "{state}"
    );
    let metrics = tether.metrics().await;
    assert!(
        metrics.contains("tether_upstream_retries_total{reason=\"status\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains(&format!("tether_replica_healthy{{replica=\"{victim}\"}} 0")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_is_retried_once_response_bytes_reached_the_client() {
    use futures_util::StreamExt;
    let fleet = SimFleet::start(&["a-1", "a-2"]).unwrap();
    let replicas = vec![
        ("a-1".to_string(), fleet.addr("a-1"), ""),
        ("a-2".to_string(), fleet.addr("a-2"), ""),
    ];
    let tether = Tether::start(&TetherConfig {
        body: format!("local_region: a\n{}", regions_yaml(&[("a", replicas)])),
    })
    .unwrap();
    let client = reqwest::Client::new();
    let url = tether.url("/v1/chat/completions");
    // The session's first turn pins it to a replica, whose stream then never ends on its own:
    // only its death, below, can cut it.
    let serving = served_turn(&client, &url, "s", 1).await;
    fleet.set_fault(&serving, json!({"kind": "endless"})).await;
    let mut body = conversation("s", 2);
    body["stream"] = json!(true);
    let res = client
        .post(&url)
        .header("x-session-affinity", "s")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-replica-id"], serving.as_str());
    let mut stream = res.bytes_stream();
    let first = stream.next().await.expect("a first chunk").unwrap();
    assert!(!first.is_empty());
    fleet.set_fault(&serving, json!({"kind": "refuse"})).await;
    let mut rest = Vec::new();
    loop {
        let next = tokio::time::timeout(READY_TIMEOUT, stream.next())
            .await
            .expect("the stream ends once its replica is gone");
        match next {
            Some(Ok(c)) => rest.extend_from_slice(&c),
            Some(Err(_)) | None => break,
        }
    }
    // Exactly one body reached the client: no second replica's stream was spliced in.
    let rest = String::from_utf8_lossy(&rest);
    assert!(!rest.contains("[DONE]"), "{rest}");
    assert!(!rest.contains("\"role\""), "{rest}");
    let metrics = tether.metrics().await;
    assert!(
        !metrics.contains("tether_upstream_retries_total{"),
        "a retry was attempted: {metrics}"
    );
}
