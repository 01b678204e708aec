//! The OpenAI-compatible endpoints.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::ReplicaState;

/// The tokenizer stand-in: one token per 4 bytes of the rendered prompt (rounded up), close to
/// what BPE tokenizers average on English and code, and exactly reproducible.
pub const BYTES_PER_TOKEN: usize = 4;

const REPLICA_HEADER: HeaderName = HeaderName::from_static("x-replica-id");
const DEFAULT_COMPLETION_TOKENS: u64 = 16;
const MAX_COMPLETION_TOKENS: u64 = 4096;

static COMPLETION_IDS: AtomicU64 = AtomicU64::new(1);

fn with_replica(state: &ReplicaState, mut response: Response) -> Response {
    if let Ok(value) = HeaderValue::from_str(&state.id) {
        response.headers_mut().insert(REPLICA_HEADER, value);
    }
    response
}

fn error(status: StatusCode, message: impl Into<String>, code: &str) -> Response {
    let body = json!({"error": {"message": message.into(), "type": "invalid_request_error", "code": code}});
    (status, Json(body)).into_response()
}

/// Renders `messages` the way a chat template would and counts its tokens.
///
/// Returns `None` when `messages` is not an array of objects with a string `role`.
pub fn count_prompt_tokens(messages: &Value) -> Option<u64> {
    let messages = messages.as_array()?;
    let mut bytes = 0usize;
    for message in messages {
        let role = message.get("role")?.as_str()?;
        bytes += role.len() + "<|im_start|>\n<|im_end|>\n".len();
        match message.get("content") {
            Some(Value::String(text)) => bytes += text.len(),
            // Content parts: count the text parts.
            Some(Value::Array(parts)) => {
                for part in parts {
                    if let Some(text) = part.get("text").and_then(Value::as_str) {
                        bytes += text.len();
                    }
                }
            }
            _ => {}
        }
    }
    Some(bytes.div_ceil(BYTES_PER_TOKEN) as u64)
}

pub(crate) async fn completions(State(state): State<Arc<ReplicaState>>, body: Bytes) -> Response {
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return with_replica(
                &state,
                error(
                    StatusCode::BAD_REQUEST,
                    format!("request body is not valid JSON: {e}"),
                    "invalid_json",
                ),
            )
        }
    };
    let Some(messages) = request.get("messages") else {
        return with_replica(
            &state,
            error(
                StatusCode::BAD_REQUEST,
                "missing required field `messages`",
                "missing_messages",
            ),
        );
    };
    let Some(prompt_tokens) = count_prompt_tokens(messages) else {
        return with_replica(
            &state,
            error(
                StatusCode::BAD_REQUEST,
                "`messages` must be an array of objects with a string `role`",
                "invalid_messages",
            ),
        );
    };
    if request.get("stream").and_then(Value::as_bool) == Some(true) {
        return with_replica(
            &state,
            error(
                StatusCode::BAD_REQUEST,
                "streaming is not supported by this simulator version",
                "unsupported_stream",
            ),
        );
    }
    let completion_tokens = request
        .get("max_tokens")
        .or_else(|| request.get("max_completion_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(DEFAULT_COMPLETION_TOKENS)
        .clamp(1, MAX_COMPLETION_TOKENS);
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("tether-sim");
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let id = COMPLETION_IDS.fetch_add(1, Ordering::Relaxed);
    let body = json!({
        "id": format!("chatcmpl-sim-{id}"),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": format!("Simulated reply from {}.", state.id)},
            "finish_reason": "length",
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    });
    with_replica(&state, Json(body).into_response())
}

pub(crate) async fn models(State(state): State<Arc<ReplicaState>>) -> Response {
    let body = json!({"object": "list", "data": [{"id": "tether-sim", "object": "model", "owned_by": "tether"}]});
    with_replica(&state, Json(body).into_response())
}

pub(crate) async fn health(State(state): State<Arc<ReplicaState>>) -> Response {
    with_replica(
        &state,
        Json(json!({"status": "ok", "replica": state.id})).into_response(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_tokens_count_the_rendered_template() {
        let messages = json!([{"role": "user", "content": "hello world!"}]);
        // "user" (4) + template (24) + content (12) = 40 bytes = 10 tokens.
        assert_eq!(count_prompt_tokens(&messages), Some(10));
    }

    #[test]
    fn content_parts_are_counted() {
        let messages = json!([{"role": "user", "content": [{"type": "text", "text": "abcd"}, {"type": "image_url"}]}]);
        assert_eq!(count_prompt_tokens(&messages), Some(8));
    }

    #[test]
    fn malformed_messages_are_refused() {
        assert_eq!(count_prompt_tokens(&json!("hi")), None);
        assert_eq!(count_prompt_tokens(&json!([{"content": "no role"}])), None);
    }
}
