//! The OpenAI-compatible endpoints: chat completions (JSON and SSE), models, health.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::engine::{Dialect, Fault, Job, Prefilled, Replica};
use crate::template::{parse_messages, render_prompt, reply_text};

const REPLICA_HEADER: HeaderName = HeaderName::from_static("x-replica-id");
/// Completion length when the request does not say.
pub const DEFAULT_COMPLETION_TOKENS: u64 = 16;
/// Longest completion the simulator generates.
pub const MAX_COMPLETION_TOKENS: u64 = 4096;

static COMPLETION_IDS: AtomicU64 = AtomicU64::new(1);

/// Adds `x-replica-id`.
pub(crate) fn named(replica: &Replica, mut response: Response) -> Response {
    if let Ok(value) = HeaderValue::from_str(&replica.id) {
        response.headers_mut().insert(REPLICA_HEADER, value);
    }
    response
}

pub(crate) fn openai_error(status: StatusCode, message: impl Into<String>, code: &str) -> Response {
    let kind = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    let body = json!({"error": {"message": message.into(), "type": kind, "code": code}});
    (status, Json(body)).into_response()
}

fn unavailable(_retry_after: u32) -> Response {
    openai_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "replica unavailable",
        "unavailable",
    )
}

/// What a fault does to a request before any work: `Some(response)` to answer now. A hanging
/// replica never returns.
pub(crate) async fn fault_gate(replica: &Replica, error: fn(u32) -> Response) -> Option<Response> {
    match replica.fault() {
        Fault::Unavailable { retry_after } => {
            let mut response = error(retry_after.unwrap_or(0));
            if let Some(secs) = retry_after {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            Some(response)
        }
        Fault::Hang => std::future::pending().await,
        Fault::Garbage => {
            // Deterministic noise, with bytes JSON and SSE parsers must survive.
            let noise: Vec<u8> = (0..65_536u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect();
            let mut response = Response::new(Body::from(noise));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            Some(response)
        }
        Fault::Huge { bytes } => Some(huge_body(bytes)),
        Fault::Endless => Some(endless_stream()),
        Fault::None | Fault::Refuse | Fault::Slow { .. } => None,
    }
}

/// `{"usage":{"pad":"xxxx…"}}` of about `bytes` bytes, streamed in 64 KiB chunks.
fn huge_body(bytes: u64) -> Response {
    const CHUNK: usize = 64 << 10;
    let pad = Bytes::from(vec![b'x'; CHUNK]);
    // State: bytes sent so far, or None once the closing frame is out.
    let stream = futures_util::stream::unfold(Some(0u64), move |sent| {
        let pad = pad.clone();
        async move {
            let sent = sent?;
            let (frame, next) = if sent == 0 {
                let open = Bytes::from_static(b"{\"usage\":{\"prompt_tokens\":1,\"pad\":\"");
                let len = open.len() as u64;
                (open, Some(len))
            } else if sent < bytes {
                (pad, Some(sent + CHUNK as u64))
            } else {
                (Bytes::from_static(b"\"}}"), None)
            };
            Some((Ok::<_, Infallible>(frame), next))
        }
    });
    let mut response = Response::new(Body::from_stream(stream));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// An SSE stream of content deltas every 10 ms, forever.
fn endless_stream() -> Response {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let frame = sse_frame(
            None,
            r#"{"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"more "}}]}"#,
        );
        loop {
            if tx.send(frame.clone()).await.is_err() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    });
    sse_response(rx)
}

/// Response identity: fixed in deterministic mode so identical requests get identical bytes.
pub(crate) struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl Meta {
    /// In deterministic mode the id is a hash of what the request asks — rendered prompt,
    /// length, model — so options that do not change the answer (`stream_options`) do not
    /// change it either.
    pub fn new(replica: &Replica, prefix: &str, job: &Job, model: &str) -> Meta {
        if replica.config().deterministic {
            let seed = xxh3_64(model.as_bytes()) ^ job.completion_tokens;
            Meta {
                id: format!("{prefix}{:016x}", xxh3_64_with_seed(&job.prompt, seed)),
                created: 0,
                model: model.to_owned(),
            }
        } else {
            Meta {
                id: format!(
                    "{prefix}sim-{}",
                    COMPLETION_IDS.fetch_add(1, Ordering::Relaxed)
                ),
                created: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                model: model.to_owned(),
            }
        }
    }
}

/// Tokens to generate, from `max_tokens` / `max_completion_tokens`.
pub(crate) fn completion_tokens(request: &Value) -> u64 {
    request
        .get("max_tokens")
        .or_else(|| request.get("max_completion_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(DEFAULT_COMPLETION_TOKENS)
        .clamp(1, MAX_COMPLETION_TOKENS)
}

fn usage(dialect: Dialect, job: &Job, p: &Prefilled) -> Value {
    match dialect {
        Dialect::Openai => json!({
            "prompt_tokens": job.prompt_tokens,
            "completion_tokens": job.completion_tokens,
            "total_tokens": job.prompt_tokens + job.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": p.cached_tokens},
        }),
        Dialect::Llamacpp => json!({
            "prompt_tokens": job.prompt_tokens,
            "completion_tokens": job.completion_tokens,
            "total_tokens": job.prompt_tokens + job.completion_tokens,
        }),
    }
}

fn llamacpp_timings(job: &Job, p: &Prefilled) -> Value {
    json!({
        "prompt_n": job.prompt_tokens - p.cached_tokens,
        "cache_n": p.cached_tokens,
        "predicted_n": job.completion_tokens,
        "prompt_ms": p.prefill.as_secs_f64() * 1000.0,
        "predicted_ms": p.per_token.saturating_mul(job.completion_tokens as u32).as_secs_f64() * 1000.0,
    })
}

pub(crate) fn sse_frame(event: Option<&str>, data: &str) -> Bytes {
    match event {
        Some(e) => Bytes::from(format!("event: {e}\ndata: {data}\n\n")),
        None => Bytes::from(format!("data: {data}\n\n")),
    }
}

/// A streaming response whose frames come from `rx`.
pub(crate) fn sse_response(rx: mpsc::Receiver<Bytes>) -> Response {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|frame| (Ok::<_, Infallible>(frame), rx))
    });
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

pub(crate) async fn completions(State(replica): State<Arc<Replica>>, body: Bytes) -> Response {
    if let Some(response) = fault_gate(&replica, unavailable).await {
        return named(&replica, response);
    }
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            let msg = format!("request body is not valid JSON: {e}");
            return named(
                &replica,
                openai_error(StatusCode::BAD_REQUEST, msg, "invalid_json"),
            );
        }
    };
    let Some(messages) = request.get("messages") else {
        let msg = "missing required field `messages`";
        return named(
            &replica,
            openai_error(StatusCode::BAD_REQUEST, msg, "missing_messages"),
        );
    };
    let messages = match parse_messages(messages) {
        Ok(m) => m,
        Err(e) => {
            return named(
                &replica,
                openai_error(StatusCode::BAD_REQUEST, e.to_string(), "invalid_messages"),
            )
        }
    };
    let job = Job::new(render_prompt(&messages), completion_tokens(&request));
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("tether-sim");
    let meta = Meta::new(&replica, "chatcmpl-", &job, model);
    let streaming = request.get("stream").and_then(Value::as_bool) == Some(true);
    let include_usage = request
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);

    if streaming {
        let (tx, rx) = mpsc::channel(32);
        tokio::spawn(stream_completion(
            Arc::clone(&replica),
            job,
            meta,
            include_usage,
            tx,
        ));
        return named(&replica, sse_response(rx));
    }

    let (prefilled, reply) = replica.complete(&job).await;
    let dialect = replica.config().dialect;
    let mut body = json!({
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": reply},
            "finish_reason": "length",
        }],
        "usage": usage(dialect, &job, &prefilled),
    });
    if dialect == Dialect::Llamacpp {
        body["timings"] = llamacpp_timings(&job, &prefilled);
        body["tokens_cached"] = json!(prefilled.cached_tokens);
    }
    named(&replica, Json(body).into_response())
}

/// Produces the SSE frames of one completion; stops quietly if the client goes away.
async fn stream_completion(
    replica: Arc<Replica>,
    job: Job,
    meta: Meta,
    include_usage: bool,
    tx: mpsc::Sender<Bytes>,
) {
    let chunk = |delta: Value, finish: Value| {
        json!({
            "id": meta.id,
            "object": "chat.completion.chunk",
            "created": meta.created,
            "model": meta.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })
    };
    let prefilled = replica.prefill(&job).await;
    let first = chunk(json!({"role": "assistant", "content": ""}), Value::Null);
    if tx.send(sse_frame(None, &first.to_string())).await.is_err() {
        return;
    }
    let reply = reply_text(job.completion_tokens);
    for (index, token) in reply
        .as_bytes()
        .chunks(crate::template::BYTES_PER_TOKEN)
        .enumerate()
    {
        prefilled.pace(index).await;
        let text = String::from_utf8_lossy(token);
        if tx
            .send(sse_frame(
                None,
                &chunk(json!({"content": text}), Value::Null).to_string(),
            ))
            .await
            .is_err()
        {
            return;
        }
    }
    replica.finish(&job, &reply, &prefilled);
    let dialect = replica.config().dialect;
    let mut last = chunk(json!({}), json!("length"));
    if dialect == Dialect::Llamacpp {
        last["timings"] = llamacpp_timings(&job, &prefilled);
    }
    let mut frames = vec![sse_frame(None, &last.to_string())];
    if include_usage {
        let usage_chunk = json!({
            "id": meta.id,
            "object": "chat.completion.chunk",
            "created": meta.created,
            "model": meta.model,
            "choices": [],
            "usage": usage(dialect, &job, &prefilled),
        });
        frames.push(sse_frame(None, &usage_chunk.to_string()));
    }
    frames.push(sse_frame(None, "[DONE]"));
    for frame in frames {
        if tx.send(frame).await.is_err() {
            return;
        }
    }
}

pub(crate) async fn models(State(replica): State<Arc<Replica>>) -> Response {
    let body = json!({"object": "list", "data": [{"id": "tether-sim", "object": "model", "owned_by": "tether"}]});
    named(&replica, Json(body).into_response())
}

pub(crate) async fn health(State(replica): State<Arc<Replica>>) -> Response {
    replica.count_probe();
    if let Some(response) = fault_gate(&replica, unavailable).await {
        return named(&replica, response);
    }
    named(
        &replica,
        Json(json!({"status": "ok", "replica": replica.id})).into_response(),
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::engine::SimConfig;
    use crate::template::ChatMessage;

    /// When each content token of a streamed reply reaches the client, from the request's start.
    async fn content_times(config: SimConfig, reply_tokens: u64) -> (Vec<Duration>, u64) {
        let replica = Arc::new(Replica::new("r", Arc::new(config)));
        let prompt = render_prompt(&[ChatMessage {
            role: "user".into(),
            content: "word ".repeat(200),
        }]);
        let job = Job::new(prompt, reply_tokens);
        let prompt_tokens = job.prompt_tokens;
        let meta = Meta::new(&replica, "chatcmpl", &job, "m");
        let (tx, mut rx) = mpsc::channel(64);
        let started = tokio::time::Instant::now();
        tokio::spawn(stream_completion(replica, job, meta, false, tx));
        let mut times = Vec::new();
        while let Some(frame) = rx.recv().await {
            let text = String::from_utf8_lossy(&frame);
            let Some(data) = text.trim_end().strip_prefix("data: ") else {
                continue;
            };
            let Ok(event) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            let content = event.pointer("/choices/0/delta/content");
            if content
                .and_then(Value::as_str)
                .is_some_and(|c| !c.is_empty())
            {
                times.push(started.elapsed());
            }
        }
        (times, prompt_tokens)
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_token_comes_with_the_prefill_and_each_next_one_a_decode_step_later() {
        let config = SimConfig {
            prefill_tokens_per_sec: 1_000.0,
            decode_tokens_per_sec: 10.0,
            time_scale: 1.0,
            ..SimConfig::default()
        };
        let (times, prompt_tokens) = content_times(config, 4).await;
        assert_eq!(times.len(), 4, "{times:?}");
        // A cold prompt: time to first token is its prefill, with no decode step before it
        // (vLLM samples the first token from the prefill's last position).
        let prefill = Duration::from_secs_f64(prompt_tokens as f64 / 1_000.0);
        let close = |a: Duration, b: Duration| a.abs_diff(b) < Duration::from_millis(2);
        assert!(close(times[0], prefill), "{times:?} against {prefill:?}");
        for pair in times.windows(2) {
            assert!(
                close(pair[1] - pair[0], Duration::from_millis(100)),
                "{times:?}"
            );
        }
    }
}
