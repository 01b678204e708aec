//! Affinity for clients that never send the affinity header: the session ids agents send of
//! their own, `prompt_cache_key`, and the conversation fingerprint, through the real proxy.

use serde_json::{json, Value};
use tether_e2e::{regions_yaml, SimFleet, TempDir, Tether, TetherConfig};

use crate::client::conversation;
use crate::sdk::Recorder;

const SIX: [&str; 6] = ["eu-1", "eu-2", "eu-3", "us-1", "us-2", "us-3"];
const WITH_FINGERPRINT: &str =
    "affinity: { key_sources: [header, agent_header, prompt_cache_key, fingerprint] }\n";

/// Six replicas in two regions, `extra` YAML, and a usage log in `logs`.
fn config(fleet: &SimFleet, extra: &str, logs: &TempDir) -> TetherConfig {
    let region = |prefix: &str| {
        SIX.iter()
            .filter(|id| id.starts_with(prefix))
            .map(|id| (id.to_string(), fleet.addr(id), ""))
            .collect::<Vec<_>>()
    };
    TetherConfig {
        body: format!(
            "local_region: eu\n{}{extra}usage_log: {{ path: \"{}\" }}\n",
            regions_yaml(&[("eu", region("eu")), ("us", region("us"))]),
            logs.path().join("usage.jsonl").display()
        ),
    }
}

/// The usage log's records, after Tether stopped (which flushes it).
fn records(tether: &mut Tether, logs: &TempDir) -> Vec<Value> {
    assert!(tether.terminate().unwrap(), "tether exits cleanly");
    std::fs::read_to_string(logs.path().join("usage.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// What one turn came back with: the replica and the session status Tether reported.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Turn {
    replica: String,
    status: String,
}

async fn turn(
    client: &reqwest::Client,
    tether: &Tether,
    headers: &[(&str, &str)],
    body: &Value,
) -> Turn {
    let mut req = client.post(tether.url("/v1/chat/completions")).json(body);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let res = req.send().await.expect("tether answers");
    assert_eq!(res.status(), 200);
    let header = |name: &str| {
        res.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    Turn {
        replica: header("x-replica-id"),
        status: header("x-session-affinity-status"),
    }
}

/// `turns` turns of `session` sent by `way`; asserts that every turn after the first was
/// warm on the first turn's replica.
async fn assert_sticky(
    client: &reqwest::Client,
    tether: &Tether,
    session: &str,
    way: &str,
    turns: usize,
) -> String {
    let mut first: Option<Turn> = None;
    for n in 1..=turns {
        let mut body = conversation(session, n);
        let headers: Vec<(&str, &str)> = match way {
            "header" => vec![("x-session-affinity", session)],
            "agent_header" => vec![("X-Claude-Code-Session-Id", session)],
            "prompt_cache_key" => {
                body["prompt_cache_key"] = json!(session);
                vec![]
            }
            "fingerprint" => vec![],
            other => panic!("no way {other}"),
        };
        let got = turn(client, tether, &headers, &body).await;
        match &first {
            None => {
                assert_eq!(got.status, "new", "{way} {session} turn {n}");
                first = Some(got);
            }
            Some(first) => {
                assert_eq!(got.replica, first.replica, "{way} {session} turn {n} moved");
                assert_eq!(got.status, "warm", "{way} {session} turn {n}");
            }
        }
    }
    first.map(|t| t.replica).unwrap_or_default()
}

fn key_sources_of(records: &[Value]) -> Vec<&str> {
    records
        .iter()
        .map(|r| r["key_source"].as_str().unwrap_or("?"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_session_header_or_prompt_cache_key_alone_is_as_sticky_as_the_affinity_header() {
    let fleet = SimFleet::start(&SIX).unwrap();
    let logs = TempDir::new("tether-key-sources").unwrap();
    let mut tether = Tether::start(&config(&fleet, "", &logs)).unwrap();
    let client = reqwest::Client::new();
    let ways = ["header", "agent_header", "prompt_cache_key"];
    for way in ways {
        for i in 0..6 {
            assert_sticky(&client, &tether, &format!("{way}-session-{i}"), way, 3).await;
        }
    }
    let records = records(&mut tether, &logs);
    let sources = key_sources_of(&records);
    for way in ways {
        assert_eq!(
            sources.iter().filter(|s| **s == way).count(),
            18,
            "{sources:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_affinity_header_and_an_agent_id_with_the_same_value_are_one_session() {
    let fleet = SimFleet::start(&SIX).unwrap();
    let logs = TempDir::new("tether-key-sources").unwrap();
    let tether = Tether::start(&config(&fleet, "", &logs)).unwrap();
    let client = reqwest::Client::new();
    for i in 0..6 {
        let id = format!("opencode-session-{i}");
        // OpenCode sends its session id in both headers; an older turn may have had only one.
        let first = turn(
            &client,
            &tether,
            &[("X-Session-Id", &id)],
            &conversation(&id, 1),
        )
        .await;
        assert_eq!(first.status, "new");
        for (n, headers) in [
            (
                2,
                vec![("x-session-affinity", id.as_str()), ("X-Session-Id", &id)],
            ),
            (3, vec![("x-session-affinity", id.as_str())]),
        ] {
            let next = turn(&client, &tether, &headers, &conversation(&id, n)).await;
            assert_eq!(
                next,
                Turn {
                    status: "warm".into(),
                    ..first.clone()
                },
                "{id} turn {n}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tokenless_conversation_sticks_through_its_fingerprint_and_keeps_its_replica_when_it_gains_a_token(
) {
    let fleet = SimFleet::start(&SIX).unwrap();
    let logs = TempDir::new("tether-key-sources").unwrap();
    let mut tether = Tether::start(&config(&fleet, WITH_FINGERPRINT, &logs)).unwrap();
    let client = reqwest::Client::new();
    let mut replicas = std::collections::HashSet::new();
    for i in 0..8 {
        let session = format!("anonymous-conversation-{i}");
        let replica = assert_sticky(&client, &tether, &session, "fingerprint", 3).await;
        replicas.insert(replica.clone());
        // The client starts sending a token it never sent before: the token inherits the
        // fingerprint's replica instead of hashing somewhere else.
        let token = format!("late-token-{i}");
        for n in 4..=5 {
            let got = turn(
                &client,
                &tether,
                &[("x-session-affinity", &token)],
                &conversation(&session, n),
            )
            .await;
            assert_eq!(
                got,
                Turn {
                    replica: replica.clone(),
                    status: "warm".into()
                },
                "{session} turn {n}"
            );
        }
    }
    assert!(replicas.len() > 1, "distinct heads spread: {replicas:?}");
    let records = records(&mut tether, &logs);
    let sources = key_sources_of(&records);
    assert_eq!(
        sources.iter().filter(|s| **s == "fingerprint").count(),
        24,
        "{sources:?}"
    );
    assert_eq!(
        sources.iter().filter(|s| **s == "header").count(),
        16,
        "{sources:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_that_give_no_key_pass_through_byte_for_byte_and_fall_back() {
    let recorder = Recorder::start().await;
    let logs = TempDir::new("tether-key-sources").unwrap();
    let mut tether = Tether::start(&TetherConfig {
        body: format!(
            "local_region: r\n{}{WITH_FINGERPRINT}usage_log: {{ path: \"{}\" }}\n",
            regions_yaml(&[("r", vec![("rec-1".into(), recorder.addr, "")])]),
            logs.path().join("usage.jsonl").display()
        ),
    })
    .unwrap();
    let client = reqwest::Client::new();
    // Over the read-ahead limit, with a prompt_cache_key that is never looked at.
    let padding = "x".repeat(100 << 10);
    let oversized = format!(
        r#"{{ "messages": [{{"role":"user","content":"{padding}"}}], "prompt_cache_key": "k" }}"#
    );
    let bodies: [(&str, Vec<u8>); 4] = [
        (
            "text/plain",
            b"not json at all {\"prompt_cache_key\":\"k\"}".to_vec(),
        ),
        ("application/json", b"{\"messages\": [ \"truncated".to_vec()),
        (
            "application/json",
            b"{\"model\":\"m\",\"messages\":[]}  ".to_vec(),
        ),
        ("application/json", oversized.into_bytes()),
    ];
    for (content_type, body) in &bodies {
        let res = client
            .post(tether.url("/v1/chat/completions"))
            .header("content-type", *content_type)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["x-session-affinity-status"], "none");
    }
    // A small chunked client body: read ahead whole, so its prompt_cache_key counts.
    let chunked =
        b"{\"prompt_cache_key\":\"k\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}"
            .to_vec();
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
        chunked.chunks(7).map(|c| Ok(c.to_vec())).collect();
    let res = client
        .post(tether.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            pieces,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-session-affinity-status"], "new");
    let mut bodies = bodies.to_vec();
    bodies.push(("application/json", chunked));
    let received = recorder.requests();
    // Probes of the replica's health come in between.
    let received: Vec<Vec<u8>> = received
        .into_iter()
        .filter(|(head, _)| head.starts_with("post "))
        .map(|(_, body)| body)
        .collect();
    assert_eq!(received.len(), bodies.len());
    for ((_, sent), got) in bodies.iter().zip(&received) {
        assert!(
            sent == got,
            "a body changed on the way ({} bytes sent, {} received)",
            sent.len(),
            got.len()
        );
    }
    let records = records(&mut tether, &logs);
    assert_eq!(
        key_sources_of(&records),
        ["none", "none", "none", "none", "prompt_cache_key"]
    );
}

/// A tokenless conversation whose turns grow to `sizes` bytes: a short system prompt and
/// first message, then turns padded to the size. `model` comes after `messages`, as the
/// OpenAI SDK writes it.
fn growing_conversation(sizes: &[usize]) -> Vec<Vec<u8>> {
    let head = r#"{"messages":[{"role":"system","content":"You are a coding agent."},{"role":"user","content":"Refactor the parser, please."}"#;
    let tail = r#"],"model":"tether-sim","max_tokens":8}"#;
    sizes
        .iter()
        .enumerate()
        .map(|(n, &size)| {
            let mut body = head.to_owned();
            let mut t = 0;
            while body.len() + tail.len() < size {
                let room = size - body.len() - tail.len();
                let role = if t % 2 == 0 { "assistant" } else { "user" };
                let frame = format!(r#",{{"role":"{role}","content":"turn {n}.{t} "}}"#);
                let pad = room.saturating_sub(frame.len()).min(30_000);
                body.push_str(&format!(
                    r#",{{"role":"{role}","content":"turn {n}.{t} {}"}}"#,
                    "é".repeat(pad / 2)
                ));
                t += 1;
            }
            body.push_str(tail);
            body.into_bytes()
        })
        .collect()
}

/// Sends each of `bodies` as one turn of a tokenless conversation to three recording
/// replicas, with a `Content-Length` or chunked; asserts every turn after the first was warm
/// on the first turn's replica, and that each body reached it byte for byte.
async fn a_growing_conversation_sticks_and_arrives_intact(chunked: bool) {
    let ids = ["rec-1", "rec-2", "rec-3"];
    let mut recorders = Vec::new();
    for id in ids {
        recorders.push(Recorder::start_as(id).await);
    }
    let logs = TempDir::new("tether-key-sources").unwrap();
    let replicas = ids
        .iter()
        .zip(&recorders)
        .map(|(id, r)| (id.to_string(), r.addr, ""))
        .collect::<Vec<_>>();
    let mut tether = Tether::start(&TetherConfig {
        body: format!(
            "local_region: r\n{}{WITH_FINGERPRINT}usage_log: {{ path: \"{}\" }}\n",
            regions_yaml(&[("r", replicas)]),
            logs.path().join("usage.jsonl").display()
        ),
    })
    .unwrap();
    let client = reqwest::Client::new();
    let sizes = [
        20 << 10,
        50 << 10,
        63 << 10,
        66 << 10,
        90 << 10,
        130 << 10,
        200 << 10,
    ];
    let bodies = growing_conversation(&sizes);
    let mut first: Option<String> = None;
    for (n, body) in bodies.iter().enumerate() {
        let req = client
            .post(tether.url("/v1/chat/completions"))
            .header("content-type", "application/json");
        let req = if chunked {
            let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
                body.chunks(7_000).map(|c| Ok(c.to_vec())).collect();
            req.body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                pieces,
            )))
        } else {
            req.body(body.clone())
        };
        let res = req.send().await.expect("tether answers");
        assert_eq!(res.status(), 200, "turn {n}");
        let replica = res.headers()["x-replica-id"].to_str().unwrap().to_owned();
        let status = res.headers()["x-session-affinity-status"]
            .to_str()
            .unwrap()
            .to_owned();
        match &first {
            None => {
                assert_eq!(status, "new");
                first = Some(replica.clone());
            }
            Some(first) => {
                assert_eq!(&replica, first, "turn {n} ({} bytes) moved", body.len());
                assert_eq!(status, "warm", "turn {n} ({} bytes)", body.len());
            }
        }
        let at = ids.iter().position(|id| *id == replica).unwrap();
        let received = recorders[at]
            .requests()
            .into_iter()
            .filter(|(head, _)| head.starts_with("post "))
            .map(|(_, body)| body)
            .next_back()
            .expect("the replica received the turn");
        assert!(
            received == *body,
            "turn {n}: a body changed on the way ({} bytes sent, {} received)",
            body.len(),
            received.len()
        );
    }
    let records = records(&mut tether, &logs);
    assert_eq!(key_sources_of(&records), ["fingerprint"; 7]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokenless_conversation_keeps_its_replica_as_its_body_grows_past_the_read_ahead_limit() {
    a_growing_conversation_sticks_and_arrives_intact(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_tokenless_conversation_keeps_its_replica_as_its_body_grows() {
    a_growing_conversation_sticks_and_arrives_intact(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_body_read_ahead_in_part_is_sent_whole_to_the_next_replica_after_a_refused_connection(
) {
    // A port with no listener: connections to it are refused.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let live = Recorder::start_as("rec-1").await;
    let logs = TempDir::new("tether-key-sources").unwrap();
    let mut tether = Tether::start(&TetherConfig {
        body: format!(
            "local_region: r\nhealth:\n  probe: {{ enabled: false }}\n{}{WITH_FINGERPRINT}usage_log: {{ path: \"{}\" }}\n",
            regions_yaml(&[(
                "r",
                vec![("dead".into(), dead, ""), ("rec-1".into(), live.addr, "")]
            )]),
            logs.path().join("usage.jsonl").display()
        ),
    })
    .unwrap();
    let client = reqwest::Client::new();
    // Conversations of their own (other heads), so that some hash to the dead replica first.
    let mut sent = Vec::new();
    for n in 0..8 {
        let head = format!(
            r#"{{"messages":[{{"role":"user","content":"conversation {n}"}},{{"role":"assistant","content":"{}"}}],"model":"m"}}"#,
            "z".repeat(200 << 10)
        );
        let body = head.into_bytes();
        let req = client
            .post(tether.url("/v1/chat/completions"))
            .header("content-type", "application/json");
        let req = if n % 2 == 0 {
            req.body(body.clone())
        } else {
            let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
                body.chunks(16_000).map(|c| Ok(c.to_vec())).collect();
            req.body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                pieces,
            )))
        };
        let res = req.send().await.expect("tether answers");
        assert_eq!(res.status(), 200, "conversation {n}");
        sent.push(body);
    }
    let received: Vec<Vec<u8>> = live
        .requests()
        .into_iter()
        .filter(|(head, _)| head.starts_with("post "))
        .map(|(_, body)| body)
        .collect();
    assert_eq!(received.len(), sent.len());
    for (n, (sent, got)) in sent.iter().zip(&received).enumerate() {
        assert!(
            sent == got,
            "conversation {n}: {} bytes sent, {} received",
            sent.len(),
            got.len()
        );
    }
    let records = records(&mut tether, &logs);
    assert_eq!(key_sources_of(&records), ["fingerprint"; 8]);
    let retried = records
        .iter()
        .filter(|r| r["attempts"].as_u64().unwrap_or(1) > 1)
        .count();
    assert!(retried > 0, "no request met the dead replica: {records:?}");
}
