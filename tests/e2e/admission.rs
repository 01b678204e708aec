//! What Tether refuses, and how: 400 for malformed tokens, 401 for bad keys, 503 when nothing
//! can serve — always OpenAI-style JSON, never the token echoed back.

use tether_e2e::{api_key_sha256, free_ports, regions_yaml, SimFleet, Tether, TetherConfig};

use crate::client::{chat, conversation};

fn config(fleet: &SimFleet, max_token_len: usize) -> TetherConfig {
    let replicas = fleet
        .replicas
        .iter()
        .map(|(id, addr)| (id.clone(), *addr, ""))
        .collect();
    TetherConfig {
        body: format!(
            "local_region: r\naffinity:\n  max_token_len: {max_token_len}\n{}tenants:\n  - {{ id: acme, api_key_sha256: \"{}\" }}\n",
            regions_yaml(&[("r", replicas)]),
            api_key_sha256("sk-acme")
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_tokens_get_400_with_an_openai_error_and_no_echo() {
    let fleet = SimFleet::start(&["r-1", "r-2"]).unwrap();
    let tether = Tether::start(&config(&fleet, 16)).unwrap();
    let client = reqwest::Client::new();
    let url = tether.url("/v1/chat/completions");
    let long = "secrettokensecret".as_bytes();
    let cases: Vec<(&str, Vec<&[u8]>)> = vec![
        ("empty", vec![b""]),
        ("too long", vec![long]),
        ("space", vec![b"secret token"]),
        ("control (tab)", vec![b"secret\ttoken"]),
        ("non-ASCII", vec!["secret\u{e9}token".as_bytes()]),
        ("repeated, different", vec![b"secret-a", b"secret-b"]),
    ];
    for (what, tokens) in cases {
        let reply = chat(
            &client,
            &url,
            Some("sk-acme"),
            &tokens,
            &conversation("x", 1),
        )
        .await;
        assert_eq!(reply.status, 400, "{what}: {}", reply.body);
        assert_eq!(
            reply.body["error"]["type"], "invalid_request_error",
            "{what}"
        );
        assert_eq!(
            reply.body["error"]["code"], "invalid_session_affinity",
            "{what}"
        );
        let message = reply.body["error"]["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "{what}");
        assert!(
            !reply.body.to_string().contains("secret"),
            "{what}: token echoed: {}",
            reply.body
        );
        assert!(reply.replica.is_none(), "{what}: reached a replica");
    }
    // The same value twice is one token, not a conflict.
    let reply = chat(
        &client,
        &url,
        Some("sk-acme"),
        &[b"same", b"same"],
        &conversation("x", 1),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_or_missing_api_keys_get_401() {
    let fleet = SimFleet::start(&["r-1"]).unwrap();
    let tether = Tether::start(&config(&fleet, 128)).unwrap();
    let client = reqwest::Client::new();
    let url = tether.url("/v1/chat/completions");
    for key in [Some("sk-wrong"), None] {
        let reply = chat(&client, &url, key, &[b"tok"], &conversation("x", 1)).await;
        assert_eq!(reply.status, 401, "key {key:?}: {}", reply.body);
        assert_eq!(reply.body["error"]["code"], "invalid_api_key");
        assert!(reply.replica.is_none());
    }
    let reply = chat(
        &client,
        &url,
        Some("sk-acme"),
        &[b"tok"],
        &conversation("x", 1),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_replica_anywhere_gets_503_json_with_retry_after() {
    let [gone_0, gone_1, drained_port] = free_ports();
    let dead: Vec<(String, std::net::SocketAddr, &str)> = [gone_0, gone_1]
        .iter()
        .enumerate()
        .map(|(i, port)| {
            (
                format!("gone-{i}"),
                format!("127.0.0.1:{port}").parse().unwrap(),
                "",
            )
        })
        .collect();
    let drained = vec![(
        "drained".to_string(),
        format!("127.0.0.1:{drained_port}").parse().unwrap(),
        "state: draining",
    )];
    let tether = Tether::start(&TetherConfig {
        body: format!(
            "local_region: a\n{}",
            regions_yaml(&[("a", dead), ("b", drained)])
        ),
    })
    .unwrap();
    let client = reqwest::Client::new();
    let reply = chat(
        &client,
        &tether.url("/v1/chat/completions"),
        None,
        &[b"tok"],
        &conversation("x", 1),
    )
    .await;
    // Both live-looking replicas refuse connections; after them nothing is eligible.
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(reply.body["error"]["code"], "no_replica_available");
    // One probe interval (2 s by default): when the next verdict on any replica can come.
    assert_eq!(reply.retry_after.as_deref(), Some("2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_at_once() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};

    let fleet = SimFleet::start(&["r-1"]).unwrap();
    let tether = Tether::start(&config(&fleet, 64)).unwrap();
    let body = serde_json::json!({"model": "m", "stream": true, "max_tokens": 2,
        "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    let mut conn = std::net::TcpStream::connect(tether.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer sk-acme\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    let sent = Instant::now();
    conn.write_all(head.as_bytes()).unwrap();
    let mut interim = [0u8; 25];
    conn.read_exact(&mut interim).unwrap();
    let waited = sent.elapsed();
    assert!(
        interim.starts_with(b"HTTP/1.1 100 Continue\r\n"),
        "{:?}",
        String::from_utf8_lossy(&interim)
    );
    // Clients stop waiting after about a second and send anyway: well before that.
    assert!(waited < Duration::from_millis(500), "{waited:?}");
    conn.write_all(body.as_bytes()).unwrap();
    let mut rest = String::new();
    conn.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("HTTP/1.1 200"), "{rest}");
    assert_eq!(
        rest.matches("100 Continue").count(),
        0,
        "one interim answer: {rest}"
    );
    assert!(rest.contains("[DONE]"), "{rest}");
}
