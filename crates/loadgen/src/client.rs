//! Sending one turn and reading what came back: reply text, usage, time to first token.

use std::time::Instant;

use futures_util::StreamExt;
use serde_json::Value;

/// What one turn produced.
#[derive(Debug, Clone)]
pub struct TurnReply {
    /// The assistant's text.
    pub content: String,
    /// `usage.prompt_tokens`.
    pub prompt_tokens: u64,
    /// `usage.prompt_tokens_details.cached_tokens` (0 when absent).
    pub cached_tokens: u64,
    /// Milliseconds until the first content token (the whole response when not streaming).
    pub ttft_ms: f64,
    /// `x-replica-id`.
    pub replica: Option<String>,
}

/// Why a turn failed.
#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    /// Could not send or read.
    #[error("transport: {0}")]
    Transport(String),
    /// A non-2xx status.
    #[error("status {0}: {1}")]
    Status(u16, String),
    /// The response had no usable usage block.
    #[error("response has no usage")]
    NoUsage,
}

fn read_usage(usage: &Value) -> Option<(u64, u64)> {
    let prompt = usage.get("prompt_tokens")?.as_u64()?;
    let cached = usage
        .pointer("/prompt_tokens_details/cached_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    Some((prompt, cached))
}

/// Sends one chat-completions request and waits for the whole answer.
pub async fn send_turn(
    client: &reqwest::Client,
    url: &str,
    api_key: Option<&str>,
    session_header: Option<(&str, &str)>,
    body: &Value,
    stream: bool,
) -> Result<TurnReply, TurnError> {
    let started = Instant::now();
    let mut req = client.post(url).json(body);
    if let Some(key) = api_key {
        req = req.bearer_auth(key);
    }
    if let Some((name, value)) = session_header {
        req = req.header(name, value);
    }
    let res = req
        .send()
        .await
        .map_err(|e| TurnError::Transport(e.to_string()))?;
    let status = res.status();
    let replica = res
        .headers()
        .get("x-replica-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if !status.is_success() {
        let body = res.text().await.unwrap_or_default();
        return Err(TurnError::Status(
            status.as_u16(),
            body.chars().take(200).collect(),
        ));
    }

    if !stream {
        let v: Value = res
            .json()
            .await
            .map_err(|e| TurnError::Transport(e.to_string()))?;
        let ttft_ms = started.elapsed().as_secs_f64() * 1000.0;
        let (prompt_tokens, cached_tokens) = v
            .get("usage")
            .and_then(read_usage)
            .ok_or(TurnError::NoUsage)?;
        let content = v
            .pointer("/choices/0/message/content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        return Ok(TurnReply {
            content,
            prompt_tokens,
            cached_tokens,
            ttft_ms,
            replica,
        });
    }

    let mut content = String::new();
    let mut usage = None;
    let mut ttft_ms = None;
    let mut pending = Vec::new();
    let mut chunks = res.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| TurnError::Transport(e.to_string()))?;
        pending.extend_from_slice(&chunk);
        // SSE events end with a blank line; chunks may split them anywhere.
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            for line in event.split(|b| *b == b'\n') {
                let Some(data) = line.strip_prefix(b"data: ") else {
                    continue;
                };
                if data == b"[DONE]" {
                    continue;
                }
                let Ok(v) = serde_json::from_slice::<Value>(data) else {
                    continue;
                };
                if let Some(text) = v
                    .pointer("/choices/0/delta/content")
                    .and_then(Value::as_str)
                {
                    if !text.is_empty() {
                        ttft_ms.get_or_insert_with(|| started.elapsed().as_secs_f64() * 1000.0);
                        content.push_str(text);
                    }
                }
                if let Some(u) = v.get("usage").and_then(read_usage) {
                    usage = Some(u);
                }
            }
        }
    }
    let (prompt_tokens, cached_tokens) = usage.ok_or(TurnError::NoUsage)?;
    Ok(TurnReply {
        content,
        prompt_tokens,
        cached_tokens,
        ttft_ms: ttft_ms.unwrap_or_else(|| started.elapsed().as_secs_f64() * 1000.0),
        replica,
    })
}
