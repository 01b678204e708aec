//! The fleet's admin API (its own listener):
//!
//! ```text
//! GET  /replicas                  every replica: address, region, fault, cache occupancy,
//!                                 ground truth; every region: replicas, shared-tier occupancy
//! POST /replicas/{id}/fault       body: {"kind":"none"|"unavailable"|"refuse"|"hang"|"slow", …}
//! POST /replicas/{id}/flush       empty the replica's own prefix cache
//! POST /regions/{name}/flush      empty the region's shared KV tier
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
use crate::shared::SharedTier;

/// A region of the fleet.
#[derive(Debug)]
pub(crate) struct Region {
    pub name: String,
    /// Ids of its replicas, in start order.
    pub replicas: Vec<String>,
    /// Its shared KV tier, if it has one.
    pub tier: Option<Arc<SharedTier>>,
}

/// Everything the admin API reads and changes.
#[derive(Debug)]
pub(crate) struct FleetState {
    pub replicas: Vec<Listening>,
    pub regions: Vec<Region>,
}

impl FleetState {
    fn find(&self, id: &str) -> Option<&Listening> {
        self.replicas.iter().find(|l| l.replica.id == id)
    }

    pub fn shared_tier(&self, region: &str) -> Option<&Arc<SharedTier>> {
        self.regions
            .iter()
            .find(|r| r.name == region)
            .and_then(|r| r.tier.as_ref())
    }
}

type Fleet = Arc<FleetState>;

fn not_found(what: &str, id: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": format!("no {what} {id:?}")})),
    )
        .into_response()
}

async fn list(State(fleet): State<Fleet>) -> Response {
    let replicas: Vec<_> = fleet
        .replicas
        .iter()
        .map(|l| {
            let (blocks, capacity) = l.replica.cache_occupancy();
            json!({
                "id": l.replica.id,
                "address": l.addr.to_string(),
                "region": l.replica.region(),
                "fault": l.replica.fault(),
                "cache": {"blocks": blocks, "capacity_blocks": capacity},
                "stats": l.replica.stats(),
                "engine": l.replica.engine_snapshot(),
            })
        })
        .collect();
    let regions: Vec<_> = fleet
        .regions
        .iter()
        .map(|r| {
            let shared_kv = r.tier.as_ref().map(|tier| {
                let (blocks, capacity) = tier.occupancy();
                json!({"blocks": blocks, "capacity_blocks": capacity})
            });
            json!({"name": r.name, "replicas": r.replicas, "shared_kv": shared_kv})
        })
        .collect();
    Json(json!({ "replicas": replicas, "regions": regions })).into_response()
}

async fn set_fault(State(fleet): State<Fleet>, Path(id): Path<String>, body: Bytes) -> Response {
    let Some(listening) = fleet.find(&id) else {
        return not_found("replica", &id);
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

async fn flush(State(fleet): State<Fleet>, Path(id): Path<String>) -> Response {
    match fleet.find(&id) {
        Some(l) => {
            l.replica.flush();
            Json(json!({"id": id, "flushed": true})).into_response()
        }
        None => not_found("replica", &id),
    }
}

async fn flush_region(State(fleet): State<Fleet>, Path(name): Path<String>) -> Response {
    match fleet.shared_tier(&name) {
        Some(tier) => {
            tier.flush();
            Json(json!({"region": name, "flushed": true})).into_response()
        }
        None => not_found("region with a shared KV tier", &name),
    }
}

pub(crate) fn router(fleet: Fleet) -> Router {
    Router::new()
        .route("/replicas", get(list))
        .route("/replicas/{id}/fault", post(set_fault))
        .route("/replicas/{id}/flush", post(flush))
        .route("/regions/{name}/flush", post(flush_region))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .with_state(fleet)
}
