//! Shutdown: a SIGTERM closes the listeners at once, lets the streams in flight finish up to
//! `server.drain_timeout`, cuts the rest, and every request gets its usage record.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tether_e2e::{regions_yaml, ServerOpts, SimFleet, TempDir, Tether, TetherConfig};

/// The drain limit of the test instance: longer than the short stream, shorter than the long.
const DRAIN: Duration = Duration::from_millis(1500);

/// A stream of `tokens` tokens; the sim decodes 20 tokens a second.
fn stream_body(tokens: u32) -> Value {
    json!({
        "model": "tether-sim",
        "stream": true,
        "max_tokens": tokens,
        "messages": [{"role": "user", "content": "count slowly"}],
    })
}

/// Reads a streamed response to its end; returns the bytes and whether it ended cleanly.
async fn read_to_end(res: reqwest::Response) -> (String, bool) {
    let mut bytes = Vec::new();
    let mut stream = res.bytes_stream();
    let mut clean = true;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => bytes.extend_from_slice(&c),
            Err(_) => {
                clean = false;
                break;
            }
        }
    }
    (String::from_utf8_lossy(&bytes).into_owned(), clean)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_streams_finish_cuts_those_past_the_drain_limit_and_logs_both() {
    let fleet =
        SimFleet::start_with(&["s-1"], &["--time-scale", "1", "--decode-rate", "20"]).unwrap();
    let logs = TempDir::new("tether-drain").unwrap();
    let log_path = logs.path().join("usage.jsonl");
    let mut tether = Tether::start_with_server(
        &TetherConfig {
            body: format!(
                // Cutting the streams past the drain limit needs watched connections.
                "local_region: eu\n{}usage_log: {{ path: \"{}\" }}\nmetering: {{ session_key: \"e2e-session-key-0123456789\" }}\nupstream: {{ watch_connections: true }}\n",
                regions_yaml(&[("eu", vec![("s-1".into(), fleet.addr("s-1"), "")])]),
                log_path.display(),
            ),
        },
        &[],
        ServerOpts {
            drain_timeout: DRAIN,
            ..ServerOpts::default()
        },
    )
    .unwrap();
    let client = reqwest::Client::new();
    let url = tether.url("/v1/chat/completions");
    // About 1 s and 10 s of tokens.
    let short = client
        .post(&url)
        .header("x-session-affinity", "short-stream")
        .json(&stream_body(20))
        .send()
        .await
        .unwrap();
    let long = client
        .post(&url)
        .header("x-session-affinity", "long-stream")
        .json(&stream_body(200))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (short.status().as_u16(), long.status().as_u16()),
        (200, 200)
    );
    // An Anthropic stream reports its input tokens in its first event.
    let messages = client
        .post(tether.url("/v1/messages"))
        .header("x-session-affinity", "long-messages")
        .json(
            &json!({"model": "claude-sim", "max_tokens": 200, "stream": true,
            "messages": [{"role": "user", "content": "count slowly, at length"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(messages.status().as_u16(), 200);
    let short = tokio::spawn(read_to_end(short));
    let long = tokio::spawn(read_to_end(long));
    let messages = tokio::spawn(read_to_end(messages));

    let addr = tether.addr;
    let terminated_at = Instant::now();
    let mut process = tokio::task::spawn_blocking(move || {
        let clean = tether.terminate().unwrap();
        (tether, clean)
    });
    // The listener closes at once: new connections are refused while the streams drain.
    let refused_after = loop {
        if TcpStream::connect(addr).is_err() {
            break terminated_at.elapsed();
        }
        assert!(
            terminated_at.elapsed() < Duration::from_secs(1),
            "still accepting connections after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        tokio::time::timeout(Duration::from_millis(1), &mut process)
            .await
            .is_err(),
        "tether exited before its streams were done"
    );

    let (short, short_clean) = short.await.unwrap();
    assert!(short_clean, "the short stream ended with an error: {short}");
    assert!(short.trim_end().ends_with("data: [DONE]"), "{short}");
    let (long, long_clean) = long.await.unwrap();
    assert!(
        !long_clean || !long.contains("[DONE]"),
        "the long stream was not cut: {long}"
    );
    let (messages, _) = messages.await.unwrap();
    assert!(!messages.contains("message_stop"), "not cut: {messages}");
    let (_tether, exited_cleanly) = process.await.unwrap();
    let took = terminated_at.elapsed();
    assert!(exited_cleanly, "tether exited with an error");
    eprintln!("refused new connections after {refused_after:?}; exited {took:?} after SIGTERM");
    // The drain limit, the cut requests' logging, and start-up noise; far below the long
    // stream's 10 s.
    assert!(took >= DRAIN, "exited before the drain limit: {took:?}");
    assert!(took < DRAIN + Duration::from_secs(3), "{took:?}");

    let records: Vec<Value> = std::fs::read_to_string(&log_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 3, "{records:?}");
    let by_completion = |tokens: u64| {
        records
            .iter()
            .find(|r| r["completion_tokens"] == tokens)
            .cloned()
    };
    let finished = by_completion(20).expect("the finished stream's record");
    assert_eq!(finished["usage_status"], "found", "{finished}");
    assert_eq!(finished["status"], 200, "{finished}");
    let cut: Vec<&Value> = records
        .iter()
        .filter(|r| r["usage_status"] == "incomplete")
        .collect();
    assert_eq!(cut.len(), 2, "both long streams were cut: {records:?}");
    for r in &cut {
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["replica"], "s-1", "{r}");
    }
    // With the tokens seen so far: the Anthropic stream's input, from its first event.
    assert!(
        cut.iter()
            .any(|r| r["prompt_tokens"].as_u64().is_some_and(|n| n > 0)),
        "{cut:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_with_nothing_in_flight_exits_at_once_however_long_the_drain_limit() {
    let fleet = SimFleet::start(&["s-1"]).unwrap();
    let mut tether = Tether::start_with_server(
        &TetherConfig {
            body: format!(
                "local_region: eu\n{}",
                regions_yaml(&[("eu", vec![("s-1".into(), fleet.addr("s-1"), "")])])
            ),
        },
        &[],
        ServerOpts {
            drain_timeout: Duration::from_secs(600),
            ..ServerOpts::default()
        },
    )
    .unwrap();
    let reply = reqwest::Client::new()
        .post(tether.url("/v1/chat/completions"))
        .json(&json!({"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    let started = Instant::now();
    let clean = tokio::task::spawn_blocking(move || tether.terminate().unwrap())
        .await
        .unwrap();
    assert!(clean);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_running_through_a_binary_upgrade_finishes_on_the_old_process_and_is_logged() {
    let fleet =
        SimFleet::start_with(&["s-1"], &["--time-scale", "1", "--decode-rate", "20"]).unwrap();
    let logs = TempDir::new("tether-upgrade-drain").unwrap();
    let log_path = logs.path().join("usage.jsonl");
    let mut tether = Tether::start_with_server(
        &TetherConfig {
            body: format!(
                "local_region: eu\n{}usage_log: {{ path: \"{}\" }}\nmetering: {{ session_key: \"e2e-session-key-0123456789\" }}\n",
                regions_yaml(&[("eu", vec![("s-1".into(), fleet.addr("s-1"), "")])]),
                log_path.display(),
            ),
        },
        &[],
        ServerOpts {
            drain_timeout: Duration::from_secs(20),
            ..ServerOpts::default()
        },
    )
    .unwrap();
    // Longer than the hand-over (Pingora keeps the old listeners 5 s), so it is still running
    // when the old process starts draining: about 6.5 s of tokens.
    let res = reqwest::Client::new()
        .post(tether.url("/v1/chat/completions"))
        .header("x-session-affinity", "upgrade-stream")
        .json(&stream_body(130))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    let stream = tokio::spawn(read_to_end(res));
    let tether = tokio::task::spawn_blocking(move || {
        tether.upgrade().expect("the upgrade completes");
        tether
    })
    .await
    .unwrap();
    let (body, clean) = stream.await.unwrap();
    assert!(clean, "the stream broke during the upgrade: {body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    // The old process wrote its record before exiting; the new one answers.
    let records: Vec<Value> = std::fs::read_to_string(&log_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["usage_status"], "found", "{}", records[0]);
    assert_eq!(records[0]["completion_tokens"], 130, "{}", records[0]);
    let reply = reqwest::Client::new()
        .post(tether.url("/v1/chat/completions"))
        .json(&json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status().as_u16(), 200);
}
