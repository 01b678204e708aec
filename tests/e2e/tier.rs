//! Several Tether instances in front of one fleet, sharing sticky state through a real
//! `redis-server`: the turns of a conversation land on a different instance each time and
//! must still reach the replica that holds its cache.

use std::collections::BTreeMap;
use std::time::Duration;

use tether_affinity::{TenantScope, TokenRules};
use tether_e2e::{SimFleet, Tether, TetherConfig};
use tether_sticky_store::testing::{RedisCluster, RedisServer};

use crate::client::{chat, conversation, served_turn};

const FLEET: [&str; 6] = ["eu-1", "eu-2", "eu-3", "us-1", "us-2", "us-3"];
const ADMIN_TOKEN: &str = "tier-admin-token-0123456789";

/// A client's pause between turns (agents think for seconds); where a test has the store at
/// hand, it also waits until the store holds the bindings before the next round.
const THINK: Duration = Duration::from_millis(30);

fn config(fleet: &SimFleet, local_region: &str, store: Option<&str>, extra: &str) -> TetherConfig {
    let mut body = format!(
        "local_region: {local_region}\nadmin: {{ token: \"{ADMIN_TOKEN}\" }}\n{}{extra}",
        fleet.regions_by_prefix(&["eu", "us"])
    );
    if let Some(url) = store {
        body.push_str(&format!(
            "sticky_store: {{ url: \"{url}\", lookup_timeout: 20ms }}\n"
        ));
    }
    TetherConfig { body }
}

/// The share of turns after the first that reached the replica of the session's previous
/// turn, over turns whose previous replica was not `excused` (killed on purpose).
fn warm_follow(turns: &BTreeMap<String, Vec<String>>, excused: &[&str]) -> (usize, usize) {
    let (mut warm, mut counted) = (0, 0);
    for replicas in turns.values() {
        for pair in replicas.windows(2) {
            if excused.contains(&pair[0].as_str()) {
                continue;
            }
            counted += 1;
            warm += usize::from(pair[0] == pair[1]);
        }
    }
    (warm, counted)
}

/// The store key of `session`'s binding (tenant `default`, the store's default prefix).
fn store_key(session: &str) -> String {
    let token = TokenRules::default()
        .validate(session.as_bytes())
        .expect("a valid token");
    format!("tether:s:{:016x}", TenantScope::new("default").key(token).0)
}

/// Waits until `store` holds, for every session, the replica of its latest turn: the
/// readiness of the next round, whose turns go to other instances.
async fn until_stored(store: &RedisServer, served: &BTreeMap<String, Vec<String>>) {
    let deadline = std::time::Instant::now() + tether_e2e::READY_TIMEOUT;
    for (session, replicas) in served {
        let key = store_key(session);
        loop {
            let stored: Option<String> = store
                .query(redis::cmd("GET").arg(&key))
                .expect("redis answers");
            if stored.as_deref() == replicas.last().map(String::as_str) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{session}: the store holds {stored:?}, its last turn was on {replicas:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Every turn after a session's first reached the replica of its previous turn.
fn assert_all_warm(served: &BTreeMap<String, Vec<String>>) {
    let (warm, counted) = warm_follow(served, &[]);
    assert_eq!(warm, counted, "{served:?}");
}

/// Runs `turns` turns of each session, turn `t` of session `s` on instance `(s + t) % n`;
/// `between` runs after each round of turns (to kill a replica, restart an instance…). With
/// `store`, each round waits until the store holds the round's bindings.
async fn alternate<F>(
    edges: &mut [Tether],
    sessions: usize,
    turns: usize,
    mut between: F,
    store: Option<&RedisServer>,
) -> BTreeMap<String, Vec<String>>
where
    F: AsyncRound,
{
    let client = reqwest::Client::new();
    let mut served: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for t in 1..=turns {
        for s in 0..sessions {
            let session = format!("tier-session-{s}");
            let edge = &edges[(s + t) % edges.len()];
            let url = edge.url("/v1/chat/completions");
            let replica = served_turn(&client, &url, &session, t).await;
            served.entry(session).or_default().push(replica);
        }
        tokio::time::sleep(THINK).await;
        if let Some(store) = store {
            until_stored(store, &served).await;
        }
        between.after_round(t, edges).await;
    }
    served
}

/// What a test does between rounds of turns.
trait AsyncRound {
    async fn after_round(&mut self, round: usize, edges: &mut [Tether]);
}

struct Nothing;

impl AsyncRound for Nothing {
    async fn after_round(&mut self, _: usize, _: &mut [Tether]) {}
}

fn three_edges(fleet: &SimFleet, store: Option<&str>, extra: &str) -> Vec<Tether> {
    (0..3)
        .map(|_| Tether::start(&config(fleet, "eu", store, extra)).expect("tether starts"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turns_alternating_across_three_instances_follow_their_replica_through_a_failure() {
    let redis = RedisServer::start().expect("redis-server starts");
    let fleet = SimFleet::start(&FLEET).expect("sim starts");
    // Locality and shedding on: both place sessions where only the placing instance knows.
    let extra = "affinity: { tenant_locality: 30s, shed_factor: 1.25 }\n";
    let mut edges = three_edges(&fleet, Some(&redis.url()), extra);

    struct KillOne<'a>(&'a SimFleet);
    impl AsyncRound for KillOne<'_> {
        async fn after_round(&mut self, round: usize, _: &mut [Tether]) {
            if round == 3 {
                self.0
                    .set_fault("eu-2", serde_json::json!({"kind": "refuse"}))
                    .await;
            }
        }
    }
    let served = alternate(&mut edges, 40, 8, KillOne(&fleet), Some(&redis)).await;
    let (warm, counted) = warm_follow(&served, &["eu-2"]);
    assert!(counted >= 200, "{counted}");
    assert!(
        warm * 100 >= counted * 99,
        "warm-follow {warm} of {counted}: {served:?}"
    );
    for replicas in served.values() {
        assert!(replicas[3..].iter().all(|r| r != "eu-2"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_store_alternating_instances_lose_the_sessions_they_did_not_place() {
    let fleet = SimFleet::start(&FLEET).expect("sim starts");
    let extra = "affinity: { tenant_locality: 30s }\n";
    let mut edges = three_edges(&fleet, None, extra);
    // Each instance places a session by its own tenant locality, which the others cannot
    // know: the same run as above follows far less often.
    let served = alternate(&mut edges, 40, 4, Nothing, None).await;
    let (warm, counted) = warm_follow(&served, &[]);
    assert!(warm * 100 < counted * 99, "warm-follow {warm} of {counted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_instance_serves_its_next_turns_warm() {
    let redis = RedisServer::start().expect("redis-server starts");
    let fleet = SimFleet::start(&FLEET).expect("sim starts");
    let url = redis.url();
    let mut edges = three_edges(&fleet, Some(&url), "");

    struct Restart<'a>(&'a SimFleet, String);
    impl AsyncRound for Restart<'_> {
        async fn after_round(&mut self, round: usize, edges: &mut [Tether]) {
            if round == 2 {
                assert!(edges[0].terminate().expect("tether stops"));
                edges[0] = Tether::start(&config(self.0, "eu", Some(&self.1), ""))
                    .expect("tether restarts");
            }
        }
    }
    let served = alternate(&mut edges, 30, 5, Restart(&fleet, url), Some(&redis)).await;
    assert_all_warm(&served);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_on_one_instance_reaches_the_next_decision_of_another() {
    let redis = RedisServer::start().expect("redis-server starts");
    let fleet = SimFleet::start(&FLEET).expect("sim starts");
    let edges = [
        Tether::start(&config(&fleet, "eu", Some(&redis.url()), "")).expect("tether starts"),
        Tether::start(&config(&fleet, "eu", Some(&redis.url()), "")).expect("tether starts"),
    ];
    let client = reqwest::Client::new();
    let (a, b) = (
        edges[0].url("/v1/chat/completions"),
        edges[1].url("/v1/chat/completions"),
    );
    for s in 0..10 {
        let session = format!("coherent-{s}");
        let first = served_turn(&client, &a, &session, 1).await;
        tokio::time::sleep(THINK).await;
        assert_eq!(served_turn(&client, &b, &session, 2).await, first);
        // Drain the session's replica on A only: A moves it, and B, which still sees the
        // replica as healthy, must follow the move instead of its own stale entry.
        let drain = client
            .post(edges[0].admin_url(&format!("/admin/replicas/{first}/drain")))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("admin answers");
        assert!(drain.status().is_success());
        let moved = served_turn(&client, &a, &session, 3).await;
        assert_ne!(moved, first);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            served_turn(&client, &b, &session, 4).await,
            moved,
            "{session}"
        );
        client
            .post(edges[0].admin_url(&format!("/admin/replicas/{first}/undrain")))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("admin answers");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_dies_stalls_and_comes_back_empty_fails_no_request() {
    let mut redis = RedisServer::start().expect("redis-server starts");
    let fleet = SimFleet::start(&FLEET).expect("sim starts");
    let mut edges = three_edges(&fleet, Some(&redis.url()), "");
    let client = reqwest::Client::new();
    let mut failed = 0;
    let run = |edges: &[Tether], round: usize| {
        let client = client.clone();
        let urls: Vec<String> = edges
            .iter()
            .map(|e| e.url("/v1/chat/completions"))
            .collect();
        async move {
            let mut failed = 0;
            for s in 0..20 {
                let session = format!("faulty-{round}-{s}");
                for t in 1..=3 {
                    let reply = chat(
                        &client,
                        &urls[(s + t) % urls.len()],
                        None,
                        &[session.as_bytes()],
                        &conversation(&session, t),
                    )
                    .await;
                    failed += usize::from(reply.status != 200);
                }
            }
            failed
        }
    };
    failed += run(&edges, 0).await;
    redis.kill().expect("redis stops");
    failed += run(&edges, 1).await;
    redis.restart().expect("redis comes back, empty");
    failed += run(&edges, 2).await;
    redis.pause().expect("SIGSTOP");
    failed += run(&edges, 3).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.resume().expect("SIGCONT");
    failed += run(&edges, 4).await;
    assert_eq!(failed, 0);
    // No request waited for the store much past its lookup timeout (20 ms): every lookup is
    // in the 50 ms bucket (the margin is scheduling on a loaded machine).
    for edge in &mut edges {
        let metrics = edge.metrics().await;
        let sample = |name: &str| {
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or_else(|| panic!("{name} in {metrics}"))
        };
        let within = sample("tether_sticky_store_lookup_seconds_bucket{le=\"0.05\"}");
        let all = sample("tether_sticky_store_lookup_seconds_count");
        assert_eq!(within, all, "lookups over 50 ms");
        assert!(sample("tether_sticky_store_errors_total{kind=\"connect\"}") > 0.0);
    }
    // Sharing resumes once every instance is connected and subscribed again.
    until_rejoined(&edges).await;
    let served = alternate(&mut edges, 10, 3, Nothing, Some(&redis)).await;
    assert_all_warm(&served);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_works_like_one_server() {
    let cluster = RedisCluster::start().expect("a 3-node cluster forms");
    let fleet = SimFleet::start(&FLEET).expect("sim starts");
    let store = format!(
        "sticky_store: {{ url: \"{}\", cluster: true, lookup_timeout: 50ms }}\n",
        cluster.seed_url()
    );
    let mut edges: Vec<Tether> = (0..3)
        .map(|_| {
            let mut c = config(&fleet, "eu", None, "affinity: { tenant_locality: 30s }\n");
            c.body.push_str(&store);
            Tether::start(&c).expect("tether starts")
        })
        .collect();
    let served = alternate(&mut edges, 30, 5, Nothing, None).await;
    let (warm, counted) = warm_follow(&served, &[]);
    assert!(
        warm * 100 >= counted * 99,
        "warm-follow {warm} of {counted}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nearest_placement_keeps_new_sessions_in_the_edges_own_region() {
    let redis = RedisServer::start().expect("redis-server starts");
    let fleet = SimFleet::start(&FLEET).expect("sim starts");
    let client = reqwest::Client::new();
    for region in ["eu", "us"] {
        let edge =
            Tether::start(&config(&fleet, region, Some(&redis.url()), "")).expect("tether starts");
        let url = edge.url("/v1/chat/completions");
        let mut home = 0;
        for s in 0..60 {
            let replica = served_turn(&client, &url, &format!("near-{region}-{s}"), 1).await;
            home += usize::from(replica.starts_with(region));
        }
        assert!(
            home * 100 >= 60 * 95,
            "{home} of 60 first turns in {region}"
        );
    }
}

/// Waits until every instance is connected to the store and subscribed again.
async fn until_rejoined(edges: &[Tether]) {
    for edge in edges {
        let deadline = std::time::Instant::now() + tether_e2e::READY_TIMEOUT;
        loop {
            let metrics = edge.metrics().await;
            if metrics.contains("tether_sticky_store_connected 1")
                && metrics.contains("tether_sticky_store_subscribed 1")
            {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the store never came back"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_that_outlive_a_store_restarted_empty_stay_warm_across_instances() {
    let mut redis = RedisServer::start().expect("redis-server starts");
    let fleet = SimFleet::start(&FLEET).expect("sim starts");
    let extra = "affinity: { tenant_locality: 30s }\n";
    let mut edges = three_edges(&fleet, Some(&redis.url()), extra);
    let before = alternate(&mut edges, 30, 2, Nothing, Some(&redis)).await;
    redis.kill().expect("redis stops");
    redis.restart().expect("redis comes back, empty");
    until_rejoined(&edges).await;
    // Each instance writes the bindings it holds back to the store.
    until_stored(&redis, &before).await;

    let client = reqwest::Client::new();
    let mut served = before.clone();
    for t in 3..=5 {
        for s in 0..30 {
            let session = format!("tier-session-{s}");
            let url = edges[(s + t) % edges.len()].url("/v1/chat/completions");
            let replica = served_turn(&client, &url, &session, t).await;
            served.entry(session).or_default().push(replica);
        }
        tokio::time::sleep(THINK).await;
        until_stored(&redis, &served).await;
    }
    assert_all_warm(&served);
}
