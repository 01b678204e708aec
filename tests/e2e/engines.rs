//! Placement that knows the engines: three llama.cpp-like replicas with two slots each, six
//! agent sessions at once, Tether's defaults and no `max_inflight`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tether_e2e::{regions_yaml, SimFleet, Tether, TetherConfig, READY_TIMEOUT};

use crate::client::chat;

const THREE: [&str; 3] = ["eu-1", "eu-2", "eu-3"];
const SESSIONS: usize = 6;
const TURNS: usize = 6;

/// Turn `turns` of agent `session`: its own long system prompt (an agent's context), then
/// user and assistant messages.
fn agent_turn(session: usize, turns: usize) -> Value {
    let mut messages = vec![json!({
        "role": "system",
        "content": format!("agent {session} tools and instructions. ").repeat(40),
    })];
    for t in 0..turns {
        messages.push(
            json!({"role": "user", "content": format!("step {t} of {session}: ").repeat(12)}),
        );
        if t + 1 < turns {
            messages.push(json!({"role": "assistant", "content": format!("did {t}")}));
        }
    }
    json!({"model": "tether-sim", "messages": messages, "max_tokens": 8})
}

#[derive(Debug, Default)]
struct Run {
    /// Replica of each session's first turn.
    placed: Vec<String>,
    /// Cached and prompt tokens over turns 2 and later.
    cached: u64,
    prompt: u64,
}

impl Run {
    fn hit_share(&self) -> f64 {
        self.cached as f64 / self.prompt.max(1) as f64
    }

    fn placement(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for replica in &self.placed {
            *counts.entry(replica.clone()).or_default() += 1;
        }
        counts
    }
}

/// Six sessions at once, each `TURNS` turns with a think time of 0 to 320 ms before each (a
/// turn takes the sim's real time, some 200 ms, so sessions on one replica interleave and
/// contend for its slots); with `tokens`, each sends its own
/// `x-session-affinity`. First turns start 20 ms apart, so that "at once" does not depend on
/// two placements landing in the same microsecond.
async fn run(tether: &Tether, tokens: bool) -> Run {
    let client = reqwest::Client::new();
    let url = tether.url("/v1/chat/completions");
    let mut tasks = tokio::task::JoinSet::new();
    for session in 0..SESSIONS {
        let (client, url) = (client.clone(), url.clone());
        tasks.spawn(async move {
            tokio::time::sleep(Duration::from_millis(20 * session as u64)).await;
            let token = format!("agent-{session}");
            let header: Vec<&[u8]> = if tokens {
                vec![token.as_bytes()]
            } else {
                vec![]
            };
            let (mut first, mut cached, mut prompt) = (String::new(), 0, 0);
            for turn in 1..=TURNS {
                // An agent's tool call between turns, a different length each time.
                let think = ((session * 7 + turn * 13) % 5) as u64 * 80;
                tokio::time::sleep(Duration::from_millis(think)).await;
                let reply = chat(&client, &url, None, &header, &agent_turn(session, turn)).await;
                assert_eq!(reply.status, 200, "{}", reply.body);
                if turn == 1 {
                    first = reply.replica.expect("the sim names itself");
                } else {
                    let usage = &reply.body["usage"];
                    prompt += usage["prompt_tokens"].as_u64().expect("prompt_tokens");
                    cached += usage["prompt_tokens_details"]["cached_tokens"]
                        .as_u64()
                        .unwrap_or(0);
                }
            }
            (first, cached, prompt)
        });
    }
    let mut out = Run::default();
    while let Some(done) = tasks.join_next().await {
        let (first, cached, prompt) = done.expect("a session task");
        out.placed.push(first);
        out.cached += cached;
        out.prompt += prompt;
    }
    out
}

/// Waits until Tether holds an engine reading of two slots for every replica.
pub(crate) async fn engines_read(tether: &Tether) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let v: Value = client
            .get(tether.admin_url("/admin/replicas"))
            .send()
            .await
            .expect("admin answers")
            .json()
            .await
            .expect("admin JSON");
        let replicas = v["replicas"].as_array().expect("replicas");
        if replicas.iter().all(|r| r["engine"]["sequences"] == 2) {
            return;
        }
        assert!(Instant::now() < deadline, "no engine readings: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Requests the sim counted on its engine endpoints and `/health`, per replica.
async fn probe_requests(fleet: &SimFleet) -> BTreeMap<String, u64> {
    let state = fleet.state().await;
    state["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap_or_default().to_owned(),
                r["engine"]["probe_requests"].as_u64().expect("a counter"),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn six_sessions_on_three_two_slot_engines_are_placed_two_by_two_and_keep_their_caches() {
    let fleet = SimFleet::start_with(
        &THREE,
        &[
            "--time-scale",
            "1",
            "--engine",
            "llamacpp",
            "--slots",
            "2",
            "--cache-tokens",
            "16384",
        ],
    )
    .unwrap();
    let replicas = THREE
        .iter()
        .map(|id| (id.to_string(), fleet.addr(id), "engine: llamacpp"))
        .collect();
    let tether = Tether::start(&TetherConfig {
        body: format!("local_region: eu\n{}", regions_yaml(&[("eu", replicas)])),
    })
    .unwrap();
    engines_read(&tether).await;
    let probes_before = probe_requests(&fleet).await;
    let started = Instant::now();

    let with_tokens = run(&tether, true).await;
    for id in THREE {
        fleet.flush(id).await;
    }
    let tokenless = run(&tether, false).await;

    let placement = with_tokens.placement();
    assert_eq!(
        placement.values().copied().collect::<Vec<_>>(),
        [2, 2, 2],
        "new sessions per replica: {placement:?}"
    );
    let (header, none) = (with_tokens.hit_share(), tokenless.hit_share());
    assert!(
        header >= none + 0.10,
        "cache-hit share with the header {header:.3}, without {none:.3}"
    );

    // One engine read per replica per probe interval (2 s by default), and no health probe
    // besides it.
    let elapsed = started.elapsed().as_secs_f64();
    let rounds = (elapsed / 2.0).ceil() as u64 + 1;
    for (id, after) in probe_requests(&fleet).await {
        let sent = after - probes_before[&id];
        assert!(
            sent <= rounds,
            "{id}: {sent} probe requests in {elapsed:.1} s"
        );
    }
    println!(
        "placement {placement:?}; later-turn hit share: header {header:.3}, tokenless {none:.3}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_engine_signals_the_same_sessions_can_share_a_replica_three_ways() {
    // The baseline the test above improves on: no `engine` key, Tether sees no slots. Only
    // recorded, not asserted to be uneven: the ring may happen to spread six keys evenly.
    let fleet = SimFleet::start_with(
        &THREE,
        &[
            "--time-scale",
            "1",
            "--engine",
            "llamacpp",
            "--slots",
            "2",
            "--cache-tokens",
            "16384",
        ],
    )
    .unwrap();
    let replicas = THREE
        .iter()
        .map(|id| (id.to_string(), fleet.addr(id), ""))
        .collect();
    let tether = Tether::start(&TetherConfig {
        body: format!("local_region: eu\n{}", regions_yaml(&[("eu", replicas)])),
    })
    .unwrap();
    let blind = run(&tether, true).await;
    assert_eq!(blind.placed.len(), SESSIONS);
    let v: Value = reqwest::get(tether.admin_url("/admin/replicas"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for r in v["replicas"].as_array().unwrap() {
        assert!(r["engine"].is_null(), "no engine is read: {r}");
    }
    println!(
        "without engine signals: placement {:?}, later-turn hit share {:.3}",
        blind.placement(),
        blind.hit_share()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_engine_without_its_endpoint_is_probed_on_the_health_path_and_still_serves() {
    // `engine: vllm` on a replica that serves no /metrics (the sim's basic mode answers 404):
    // the probe falls back to /health, the replica stays in, and no reading is held.
    let fleet = SimFleet::start_with(&THREE[..1], &["--time-scale", "0"]).unwrap();
    let replicas = vec![(THREE[0].to_string(), fleet.addr(THREE[0]), "engine: vllm")];
    let tether = Tether::start(&TetherConfig {
        body: format!(
            "local_region: eu\n{}health:\n  probe: {{ interval: 200ms, timeout: 150ms }}\n",
            regions_yaml(&[("eu", replicas)])
        ),
    })
    .unwrap();
    let client = reqwest::Client::new();
    let url = tether.url("/v1/chat/completions");
    // Enough rounds for a fall-back probe to have run (rise and fall are 2 by default).
    let deadline = Instant::now() + READY_TIMEOUT;
    while probe_requests(&fleet).await[THREE[0]] < 6 {
        assert!(Instant::now() < deadline, "the prober does not probe");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reply = chat(&client, &url, None, &[b"s"], &agent_turn(0, 1)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let v: Value = client
        .get(tether.admin_url("/admin/replicas"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["replicas"][0]["health"], "healthy", "{v}");
    assert!(v["replicas"][0]["engine"].is_null(), "{v}");

    // An engine endpoint answering 503 (a server loading its model) takes the replica out.
    let fleet =
        SimFleet::start_with(&THREE[..1], &["--time-scale", "0", "--engine", "vllm"]).unwrap();
    let replicas = vec![(THREE[0].to_string(), fleet.addr(THREE[0]), "engine: vllm")];
    let tether = Tether::start(&TetherConfig {
        body: format!(
            "local_region: eu\n{}health:\n  probe: {{ interval: 200ms, timeout: 150ms }}\n",
            regions_yaml(&[("eu", replicas)])
        ),
    })
    .unwrap();
    fleet
        .set_fault(THREE[0], json!({"kind": "unavailable"}))
        .await;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let v: Value = client
            .get(tether.admin_url("/admin/replicas"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["replicas"][0]["health"] == "unhealthy" {
            assert!(v["replicas"][0]["engine"].is_null(), "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "still in: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
