//! A small OpenAI-style client for the tests.

use serde_json::{json, Value};

/// What the tests look at in a response.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// `x-replica-id` of the replica that answered, if one did.
    pub replica: Option<String>,
    pub retry_after: Option<String>,
    pub body: Value,
}

/// One chat turn: `turns` user messages of a conversation so far.
pub fn conversation(session: &str, turns: usize) -> Value {
    let mut messages = vec![json!({"role": "system", "content": "You are a coding agent."})];
    for t in 0..turns {
        messages.push(
            json!({"role": "user", "content": format!("{session}: step {t}, please continue")}),
        );
        if t + 1 < turns {
            messages.push(json!({"role": "assistant", "content": format!("done with step {t}")}));
        }
    }
    json!({"model": "tether-sim", "messages": messages, "max_tokens": 8})
}

/// Sends `body` to `url` with an optional API key and raw token header values.
pub async fn chat(
    client: &reqwest::Client,
    url: &str,
    api_key: Option<&str>,
    tokens: &[&[u8]],
    body: &Value,
) -> Reply {
    let mut req = client.post(url).json(body);
    if let Some(key) = api_key {
        req = req.bearer_auth(key);
    }
    for token in tokens {
        req = req.header(
            "x-session-affinity",
            reqwest::header::HeaderValue::from_bytes(token).expect("test header values are valid"),
        );
    }
    let res = req.send().await.expect("tether answers");
    let status = res.status().as_u16();
    let header = |name: &str| {
        res.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let replica = header("x-replica-id");
    let retry_after = header("retry-after");
    let bytes = res.bytes().await.expect("a complete body");
    let body = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "status {status}: body is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&bytes)
        )
    });
    Reply {
        status,
        replica,
        retry_after,
        body,
    }
}

/// Turn `n` of `session` (no API key), which must succeed; returns the replica that served it.
pub async fn served_turn(client: &reqwest::Client, url: &str, session: &str, n: usize) -> String {
    served(client, url, session, &conversation(session, n)).await
}

/// `body` sent with `session` as its affinity token and answered 200; the replica that
/// served it.
pub async fn served(client: &reqwest::Client, url: &str, session: &str, body: &Value) -> String {
    let reply = chat(client, url, None, &[session.as_bytes()], body).await;
    assert_eq!(reply.status, 200, "{session}: {}", reply.body);
    reply.replica.expect("the sim names itself")
}

/// `GET /admin/replicas` → replica id → in-flight count.
pub async fn inflight(client: &reqwest::Client, url: &str) -> Vec<(String, u64)> {
    let v: Value = client
        .get(url)
        .send()
        .await
        .expect("admin answers")
        .json()
        .await
        .expect("admin JSON");
    v["replicas"]
        .as_array()
        .expect("replicas array")
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap_or_default().to_owned(),
                r["inflight"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect()
}
