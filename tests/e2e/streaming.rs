//! Streams pass through Tether untouched and without buffering.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;
use tether_e2e::{regions_yaml, SimFleet, Tether, TetherConfig, READY_TIMEOUT};

use crate::client::inflight;

struct Received {
    bytes: Vec<u8>,
}

/// The same request straight to replica `s-1` and through Tether, each from an empty cache (so
/// usage, and with it the bytes, can match).
async fn direct_then_proxied(
    fleet: &SimFleet,
    tether: &Tether,
    body: &serde_json::Value,
    token: Option<&str>,
) -> (Received, Received) {
    let client = reqwest::Client::new();
    fleet.flush("s-1").await;
    let direct = receive(
        client
            .post(format!("http://{}/v1/chat/completions", fleet.addr("s-1")))
            .json(body),
    )
    .await;
    fleet.flush("s-1").await;
    let mut proxied = client.post(tether.url("/v1/chat/completions")).json(body);
    if let Some(token) = token {
        proxied = proxied.header("x-session-affinity", token);
    }
    (direct, receive(proxied).await)
}

async fn receive(req: reqwest::RequestBuilder) -> Received {
    let res = req.send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut stream = res.bytes_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        bytes.extend_from_slice(&chunk.unwrap());
    }
    Received { bytes }
}

/// Requests Tether counts in flight to replica `id`.
async fn inflight_to(tether: &Tether, id: &str) -> u64 {
    inflight(
        &reqwest::Client::new(),
        &tether.admin_url("/admin/replicas"),
    )
    .await
    .into_iter()
    .find_map(|(replica, n)| (replica == id).then_some(n))
    .unwrap_or_else(|| panic!("Tether lists no replica {id}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_completion_arrives_byte_for_byte_and_promptly_through_tether() {
    // 20 tokens at 50 tokens/s: the sim writes each chunk on its own, so the bytes reach
    // Tether in pieces and must still come out whole.
    let fleet = SimFleet::start_with(
        &["s-1"],
        &[
            "--deterministic",
            "--time-scale",
            "1",
            "--decode-rate",
            "50",
        ],
    )
    .unwrap();
    let tether = Tether::start(&TetherConfig {
        body: format!(
            "local_region: r\n{}",
            regions_yaml(&[("r", vec![("s-1".into(), fleet.addr("s-1"), "")])])
        ),
    })
    .unwrap();
    let body = json!({
        "model": "tether-sim",
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_tokens": 20,
        "messages": [{"role": "system", "content": "s".repeat(200)}, {"role": "user", "content": "stream please"}],
    });
    let (direct, proxied) =
        direct_then_proxied(&fleet, &tether, &body, Some("stream-session")).await;

    assert_eq!(
        String::from_utf8_lossy(&proxied.bytes),
        String::from_utf8_lossy(&direct.bytes),
        "the stream changed on its way through tether"
    );
    let text = String::from_utf8_lossy(&proxied.bytes);
    assert_eq!(
        text.matches("\"content\":\"0").count(),
        20,
        "20 token chunks"
    );
    assert!(text.contains("\"usage\""));
    assert!(text.ends_with("data: [DONE]\n\n"));

    // Relayed as it comes, not held until the end: a stream whose upstream never ends reaches
    // the client while Tether still counts it in flight.
    fleet.set_fault("s-1", json!({"kind": "endless"})).await;
    let res = reqwest::Client::new()
        .post(tether.url("/v1/chat/completions"))
        .header("x-session-affinity", "stream-session")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut stream = res.bytes_stream();
    let mut relayed = String::new();
    while relayed.matches("data: ").count() < 20 {
        let chunk = tokio::time::timeout(READY_TIMEOUT, stream.next())
            .await
            .expect("the open stream keeps reaching the client")
            .expect("the stream is open")
            .unwrap();
        relayed.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(relayed.contains("more "), "{relayed}");
    assert_eq!(inflight_to(&tether, "s-1").await, 1, "the upstream is open");
    // The client gives up: Tether lets the upstream go.
    drop(stream);
    let started = Instant::now();
    while inflight_to(&tether, "s-1").await != 0 {
        assert!(
            started.elapsed() < READY_TIMEOUT,
            "the abandoned stream is still in flight"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_did_not_ask_for_usage_is_metered_and_reaches_the_client_unchanged() {
    // A small body is read ahead (exact Content-Length upstream); one over 64 KiB is collected
    // on the way (chunked upstream). Both must be invisible to the client.
    for system_prompt_bytes in [200, 100_000] {
        unrequested_usage_is_metered_and_hidden(system_prompt_bytes, 0, "").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_stream_whose_prefix_was_read_for_its_fingerprint_is_metered_unchanged() {
    // The fingerprint reads a prefix of a body over 64 KiB ahead; the rest streams on, and the
    // usage option is still added as the body passes.
    let fingerprint = "affinity: { key_sources: [header, fingerprint] }\n";
    for later_turn_bytes in [100_000, 200_000] {
        unrequested_usage_is_metered_and_hidden(200, later_turn_bytes, fingerprint).await;
    }
}

/// A streaming request without `stream_options`, with a system prompt of
/// `system_prompt_bytes` and, when not 0, a later turn of `later_turn_bytes`, under `extra`
/// configuration: the client sees exactly what the replica sends to a direct request, and
/// the usage is metered.
async fn unrequested_usage_is_metered_and_hidden(
    system_prompt_bytes: usize,
    later_turn_bytes: usize,
    extra: &str,
) {
    let fleet = SimFleet::start_with(&["s-1"], &["--deterministic", "--time-scale", "0"]).unwrap();
    let logs = tether_e2e::TempDir::new("tether-inject").unwrap();
    let log_path = logs.path().join("usage.jsonl");
    let mut tether = Tether::start(&TetherConfig {
        body: format!(
            "local_region: r\n{}{extra}usage_log: {{ path: \"{}\" }}\n",
            regions_yaml(&[("r", vec![("s-1".into(), fleet.addr("s-1"), "")])]),
            log_path.display()
        ),
    })
    .unwrap();
    // No stream_options: an OpenAI server would send no usage on this stream.
    let mut messages = vec![
        json!({"role": "system", "content": "s".repeat(system_prompt_bytes)}),
        json!({"role": "user", "content": "no usage please"}),
    ];
    if later_turn_bytes > 0 {
        messages.push(json!({"role": "assistant", "content": "a".repeat(later_turn_bytes)}));
        messages.push(json!({"role": "user", "content": "still none"}));
    }
    let body = json!({
        "model": "tether-sim",
        "stream": true,
        "max_tokens": 5,
        "messages": messages,
    });
    let (direct, proxied) = direct_then_proxied(&fleet, &tether, &body, None).await;

    let text = String::from_utf8_lossy(&proxied.bytes);
    assert!(
        !text.contains("\"usage\""),
        "the client sees no usage it did not ask for:\n{text}"
    );
    assert_eq!(text, String::from_utf8_lossy(&direct.bytes));

    assert!(tether.terminate().unwrap());
    let log = std::fs::read_to_string(&log_path).unwrap();
    let record: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert_eq!(record["usage_status"], "found", "{record}");
    if !extra.is_empty() {
        assert_eq!(record["key_source"], "fingerprint", "{record}");
    }
    assert_eq!(record["completion_tokens"], 5);
    assert!(record["prompt_tokens"].as_u64().unwrap() > 50);
    // The whole prompt reached the replica (the deterministic completion id, compared above,
    // also hashes it).
    assert!(
        record["prompt_tokens"].as_u64().unwrap() > (later_turn_bytes / 4) as u64,
        "{record}"
    );
}
