//! The fleet's admin API (its own listener):
//!
//! ```text
//! GET  /replicas                  every replica: address, fault, cache occupancy, ground truth
//! POST /replicas/{id}/fault       body: {"kind":"none"|"unavailable"|"refuse"|"hang"|"slow", …}
//! POST /replicas/{id}/flush       empty the prefix cache
//! GET  /health
//! ```

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::engine::Fault;
use crate::server::Listening;

pub(crate) type Replicas = Arc<Vec<Listening>>;

fn find<'a>(replicas: &'a Replicas, id: &str) -> Option<&'a Listening> {
    replicas.iter().find(|l| l.replica.id == id)
}

fn not_found(id: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": format!("no replica {id:?}")})),
    )
        .into_response()
}

async fn list(State(replicas): State<Replicas>) -> Response {
    let items: Vec<_> = replicas
        .iter()
        .map(|l| {
            let (blocks, capacity) = l.replica.cache_occupancy();
            json!({
                "id": l.replica.id,
                "address": l.addr.to_string(),
                "fault": l.replica.fault(),
                "cache": {"blocks": blocks, "capacity_blocks": capacity},
                "stats": l.replica.stats(),
            })
        })
        .collect();
    Json(json!({ "replicas": items })).into_response()
}

async fn set_fault(
    State(replicas): State<Replicas>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let Some(listening) = find(&replicas, &id) else {
        return not_found(&id);
    };
    let fault: Fault = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": format!("bad fault: {e}")})),
            )
                .into_response()
        }
    };
    match listening.set_fault(fault).await {
        Ok(()) => Json(json!({"id": id, "fault": fault})).into_response(),
        Err(e) => (
            StatusCode::CONFLICT,
            Json(json!({"error": format!("cannot listen on {} again: {e}", listening.addr)})),
        )
            .into_response(),
    }
}

async fn flush(State(replicas): State<Replicas>, Path(id): Path<String>) -> Response {
    match find(&replicas, &id) {
        Some(l) => {
            l.replica.flush();
            Json(json!({"id": id, "flushed": true})).into_response()
        }
        None => not_found(&id),
    }
}

pub(crate) fn router(replicas: Replicas) -> Router {
    Router::new()
        .route("/replicas", get(list))
        .route("/replicas/{id}/fault", post(set_fault))
        .route("/replicas/{id}/flush", post(flush))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .with_state(replicas)
}
