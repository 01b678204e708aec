//! `POST /v1/messages`: the Anthropic Messages API shape, so metering can be tested against
//! `input_tokens` / `cache_read_input_tokens` / `cache_creation_input_tokens`, including the
//! streaming split of usage between `message_start` and `message_delta`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::chat::{completion_tokens, fault_gate, named, sse_frame, sse_response, Meta};
use crate::engine::{Job, Prefilled, Replica};
use crate::template::{content_text, parse_messages, render_prompt, reply_text, ChatMessage};

fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    let body = json!({"type": "error", "error": {"type": kind, "message": message.into()}});
    (status, Json(body)).into_response()
}

fn overloaded(_: u32) -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded_error",
        "replica unavailable",
    )
}

/// Anthropic splits the prompt three ways; together they are the whole prompt.
fn usage(job: &Job, p: &Prefilled, output_tokens: u64) -> Value {
    let fresh = job.prompt_tokens - p.cached_tokens;
    let creation = p.cache_creation_tokens.min(fresh);
    json!({
        "input_tokens": fresh - creation,
        "cache_creation_input_tokens": creation,
        "cache_read_input_tokens": p.cached_tokens,
        "output_tokens": output_tokens,
    })
}

pub(crate) async fn messages(State(replica): State<Arc<Replica>>, body: Bytes) -> Response {
    if let Some(response) = fault_gate(&replica, overloaded).await {
        return named(&replica, response);
    }
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            let msg = format!("request body is not valid JSON: {e}");
            return named(
                &replica,
                error(StatusCode::BAD_REQUEST, "invalid_request_error", msg),
            );
        }
    };
    let Some(raw) = request.get("messages") else {
        let msg = "messages: field required";
        return named(
            &replica,
            error(StatusCode::BAD_REQUEST, "invalid_request_error", msg),
        );
    };
    let mut messages = match parse_messages(raw) {
        Ok(m) => m,
        Err(e) => {
            let msg = e.to_string();
            return named(
                &replica,
                error(StatusCode::BAD_REQUEST, "invalid_request_error", msg),
            );
        }
    };
    if let Some(system) = request.get("system") {
        messages.insert(
            0,
            ChatMessage {
                role: "system".into(),
                content: content_text(Some(system)),
            },
        );
    }
    let job = Job::new(render_prompt(&messages), completion_tokens(&request));
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("tether-sim");
    let meta = Meta::new(&replica, "msg_", &job, model);

    if request.get("stream").and_then(Value::as_bool) == Some(true) {
        let (tx, rx) = mpsc::channel(32);
        tokio::spawn(stream_message(Arc::clone(&replica), job, meta, tx));
        return named(&replica, sse_response(rx));
    }

    let (prefilled, reply) = replica.complete(&job).await;
    let body = json!({
        "id": meta.id,
        "type": "message",
        "role": "assistant",
        "model": meta.model,
        "content": [{"type": "text", "text": reply}],
        "stop_reason": "max_tokens",
        "stop_sequence": null,
        "usage": usage(&job, &prefilled, job.completion_tokens),
    });
    named(&replica, Json(body).into_response())
}

async fn stream_message(replica: Arc<Replica>, job: Job, meta: Meta, tx: mpsc::Sender<Bytes>) {
    let prefilled = replica.prefill(&job).await;
    let start = json!({
        "type": "message_start",
        "message": {
            "id": meta.id, "type": "message", "role": "assistant", "model": meta.model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": usage(&job, &prefilled, 1),
        },
    });
    let block_start = json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}});
    for (event, data) in [
        ("message_start", start),
        ("content_block_start", block_start),
    ] {
        if tx
            .send(sse_frame(Some(event), &data.to_string()))
            .await
            .is_err()
        {
            return;
        }
    }
    let reply = reply_text(job.completion_tokens);
    for (index, token) in reply
        .as_bytes()
        .chunks(crate::template::BYTES_PER_TOKEN)
        .enumerate()
    {
        prefilled.pace(index).await;
        let delta = json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": String::from_utf8_lossy(token)}});
        if tx
            .send(sse_frame(Some("content_block_delta"), &delta.to_string()))
            .await
            .is_err()
        {
            return;
        }
    }
    replica.finish(&job, &reply, &prefilled);
    let tail = [
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
        (
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": null}, "usage": {"output_tokens": job.completion_tokens}}),
        ),
        ("message_stop", json!({"type": "message_stop"})),
    ];
    for (event, data) in tail {
        if tx
            .send(sse_frame(Some(event), &data.to_string()))
            .await
            .is_err()
        {
            return;
        }
    }
}
