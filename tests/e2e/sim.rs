//! The simulated replica as a real process: errors, dialects, ground truth and faults.

use std::time::Duration;

use serde_json::{json, Value};
use tether_e2e::SimFleet;

fn chat(max_tokens: u64) -> Value {
    json!({
        "model": "m",
        "max_tokens": max_tokens,
        "messages": [{"role": "system", "content": "x".repeat(400)}, {"role": "user", "content": "hello"}],
    })
}

async fn post(
    client: &reqwest::Client,
    url: String,
    body: &Value,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let res = client.post(url).json(body).send().await.unwrap();
    let (status, headers) = (res.status().as_u16(), res.headers().clone());
    (status, headers, res.json().await.unwrap_or(Value::Null))
}

async fn fault(client: &reqwest::Client, fleet: &SimFleet, id: &str, fault: Value) {
    let res = client
        .post(fleet.admin_url(&format!("/replicas/{id}/fault")))
        .json(&fault)
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{:?}", res.text().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors() {
    let fleet = SimFleet::start(&["a"]).unwrap();
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/chat/completions", fleet.addr("a"));
    let res = client.post(&url).body("{not json").send().await.unwrap();
    assert_eq!(res.status(), 400);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_json");
    let (status, _, v) = post(&client, url.clone(), &json!({"model": "m"})).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("missing_messages"))
    );
    let (status, _, v) = post(&client, url, &json!({"messages": [{"content": "no role"}]})).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("invalid_messages"))
    );
    let models: Value = client
        .get(format!("http://{}/v1/models", fleet.addr("a")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "tether-sim");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_reports_cache_hits_and_admin_reports_ground_truth() {
    let fleet = SimFleet::start(&["a"]).unwrap();
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/chat/completions", fleet.addr("a"));
    let (_, headers, first) = post(&client, url.clone(), &chat(4)).await;
    assert_eq!(headers["x-replica-id"], "a");
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let (_, _, second) = post(&client, url.clone(), &chat(4)).await;
    let prompt = second["usage"]["prompt_tokens"].as_u64().unwrap();
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached > 0 && cached < prompt, "cached {cached} of {prompt}");
    assert_eq!(second["usage"]["total_tokens"], prompt + 4);

    let admin = fleet.state().await;
    let stats = &admin["replicas"][0]["stats"];
    assert_eq!(stats["requests"], 2);
    assert_eq!(stats["prompt_tokens"], 2 * prompt);
    assert_eq!(stats["cached_tokens"], cached);
    assert_eq!(stats["completion_tokens"], 8);

    fleet.flush("a").await;
    let (_, _, third) = post(&client, url, &chat(4)).await;
    assert_eq!(
        third["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
        "flushed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_messages_split_the_prompt_three_ways() {
    let fleet = SimFleet::start(&["a"]).unwrap();
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/messages", fleet.addr("a"));
    let body = json!({"model": "m", "max_tokens": 3, "system": "y".repeat(400), "messages": [{"role": "user", "content": "hi"}]});
    let (_, _, first) = post(&client, url.clone(), &body).await;
    let (_, _, second) = post(&client, url, &body).await;
    let total = |v: &Value| {
        [
            "input_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
        ]
        .iter()
        .map(|k| v["usage"][k].as_u64().unwrap())
        .sum::<u64>()
    };
    assert_eq!(first["type"], "message");
    assert_eq!(first["usage"]["cache_read_input_tokens"], 0);
    assert!(
        first["usage"]["cache_creation_input_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(second["usage"]["cache_read_input_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        total(&first),
        total(&second),
        "the three parts always sum to the prompt"
    );
    assert_eq!(second["usage"]["output_tokens"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_llamacpp_dialect_reports_timings() {
    let fleet =
        SimFleet::start_with(&["a"], &["--time-scale", "0", "--dialect", "llamacpp"]).unwrap();
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/chat/completions", fleet.addr("a"));
    post(&client, url.clone(), &chat(2)).await;
    let (_, _, v) = post(&client, url, &chat(2)).await;
    let (prompt_n, cache_n) = (
        v["timings"]["prompt_n"].as_u64().unwrap(),
        v["timings"]["cache_n"].as_u64().unwrap(),
    );
    assert!(cache_n > 0);
    assert_eq!(
        prompt_n + cache_n,
        v["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    assert_eq!(v["tokens_cached"], cache_n);
    assert!(v["usage"].get("prompt_tokens_details").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_503_refuse_hang_and_slow_behave_and_recover() {
    // The llama.cpp dialect reports the delays the sim applied (`timings`).
    let fleet = SimFleet::start_with(
        &["a"],
        &[
            "--time-scale",
            "1",
            "--decode-rate",
            "100",
            "--dialect",
            "llamacpp",
        ],
    )
    .unwrap();
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/chat/completions", fleet.addr("a"));

    fault(
        &client,
        &fleet,
        "a",
        json!({"kind": "unavailable", "retry_after": 3}),
    )
    .await;
    let (status, headers, v) = post(&client, url.clone(), &chat(1)).await;
    assert_eq!(status, 503);
    assert_eq!(headers["retry-after"], "3");
    assert_eq!(v["error"]["type"], "server_error");

    fault(&client, &fleet, "a", json!({"kind": "refuse"})).await;
    // Open connections are dropped (a pooled keep-alive one fails)…
    assert!(client.post(&url).json(&chat(1)).send().await.is_err());
    // …and nothing listens any more.
    let refused = std::net::TcpStream::connect(fleet.addr("a")).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);

    fault(&client, &fleet, "a", json!({"kind": "hang"})).await;
    let err = client
        .post(&url)
        .timeout(Duration::from_millis(500))
        .json(&chat(1))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");

    // 10 tokens at 100 tokens/s: 100 ms of decoding, 5x slower under the fault. (That the
    // sim really sleeps for what it reports is unit-tested with paused time.)
    let decoding = |v: &Value| v["timings"]["predicted_ms"].as_f64().expect("timings");
    fault(&client, &fleet, "a", json!({"kind": "slow", "factor": 5.0})).await;
    let (status, _, slow) = post(&client, url.clone(), &chat(10)).await;
    assert_eq!(status, 200);
    assert!((decoding(&slow) - 500.0).abs() < 1e-6, "{slow}");

    fault(&client, &fleet, "a", json!({"kind": "none"})).await;
    let (status, _, normal) = post(&client, url, &chat(10)).await;
    assert_eq!(status, 200);
    assert!((decoding(&normal) - 100.0).abs() < 1e-6, "{normal}");

    let res = client
        .post(fleet.admin_url("/replicas/a/fault"))
        .json(&json!({"kind": "explode"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
}
