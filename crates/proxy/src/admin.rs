//! The admin listener: readiness, Prometheus metrics, and the replica API.
//!
//! Reads are open (bind the listener to a private address); changes (`drain`, `undrain`)
//! need `Authorization: Bearer <admin.token>`, and are refused outright when no token is set.

use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;
use sha2::{Digest, Sha256};
use tether_health::{now_ms, HealthState};

use crate::meter::{CacheLossView, Meter};
use crate::reload::{ReloadError, Reloader};
use crate::router::Router;
use crate::tier::Tier;

/// Serves `GET /health` (readiness), `GET /metrics` (Prometheus), `GET /admin/replicas`
/// (state, health, in-flight and override entries per replica) and
/// `POST /admin/replicas/{id}/drain|undrain`.
#[derive(Debug)]
pub struct AdminApp {
    router: Arc<Router>,
    meter: Arc<Meter>,
    tier: Option<Tier>,
    reloader: Arc<Reloader>,
}

impl AdminApp {
    /// An admin app over `router`, `meter` and the config `reloader`.
    pub fn new(
        router: Arc<Router>,
        meter: Arc<Meter>,
        tier: Option<Tier>,
        reloader: Arc<Reloader>,
    ) -> Self {
        AdminApp {
            router,
            meter,
            tier,
            reloader,
        }
    }

    /// Prometheus text: the meter's registry, then the sticky store's counters.
    fn metrics(&self) -> String {
        let mut text = self.meter.render(&self.router);
        if let Some(tier) = &self.tier {
            tier.render(&mut text);
        }
        text
    }

    fn replicas(&self) -> serde_json::Value {
        let snapshot = self.router.snapshot();
        let held = self.router.overrides().counts_by_tag();
        let now = now_ms();
        let replicas: Vec<_> = snapshot
            .fleet()
            .replicas()
            .iter()
            .map(|r| {
                let health = r.health(now);
                let until = match health {
                    HealthState::Ejected { until_ms } | HealthState::Overloaded { until_ms } => {
                        Some(until_ms.saturating_sub(now))
                    }
                    _ => None,
                };
                json!({
                    "id": &**r.id(),
                    "address": r.address().to_string(),
                    "region": &**r.region(),
                    "weight": r.weight(),
                    "state": format!("{:?}", r.admission()).to_lowercase(),
                    "health": health.as_str(),
                    "health_for_ms": until,
                    "drained": r.status().is_drained(),
                    "inflight": r.inflight(),
                    "ejections": r.status().ejections_total(),
                    "override_entries": held.get(&r.tag()).copied().unwrap_or(0),
                    "cache": cache_json(self.meter.cache_loss(r.id(), snapshot.cache_loss())),
                    "engine": engine_json(r, now, snapshot.fleet().health_policy()),
                })
            })
            .collect();
        json!({ "replicas": replicas, "override_entries": self.router.overrides().len() })
    }

    /// `POST /admin/replicas/{id}/drain|undrain`; `drain?now=true` also moves the requests
    /// still waiting for the replica's answer to other replicas (a replica known to be stuck).
    fn set_drained(&self, id: &str, drained: bool, now: bool) -> http::Response<Vec<u8>> {
        let snapshot = self.router.snapshot();
        let Some(replica) = snapshot.fleet().find(id) else {
            return error(404, "not_found", &format!("no replica {id:?}"));
        };
        let changed = replica.status().set_drained(drained);
        if drained && now {
            replica.status().depart();
        }
        log::info!(
            "admin: replica {id} {}{}",
            if drained { "drained" } else { "undrained" },
            if changed { "" } else { " (no change)" }
        );
        response(
            200,
            json!({"id": id, "drained": drained, "changed": changed}).to_string(),
        )
    }

    /// Checks the bearer token of a changing request; `Some(response)` refuses it.
    fn refuse_unauthorized(&self, session: &ServerSession) -> Option<http::Response<Vec<u8>>> {
        let Some(expected) = self.router.snapshot().admin_token_sha256().copied() else {
            return Some(error(
                403,
                "admin_disabled",
                "admin changes are disabled: set admin.token or TETHER_ADMIN_TOKEN",
            ));
        };
        // The same parsing as the proxy's: any case of the scheme, surrounding spaces trimmed.
        let presented = crate::admission::bearer_token(session.req_header())
            .map(|t| <[u8; 32]>::from(Sha256::digest(t)));
        // Comparing digests: equal-length values, and no timing hint about the token itself.
        if presented == Some(expected) {
            None
        } else {
            Some(error(
                401,
                "unauthorized",
                "send `Authorization: Bearer <admin token>`",
            ))
        }
    }
}

/// The cache-loss detector's view of a replica; zeros and no ratio before its first judged
/// sticky turn.
fn cache_json(view: Option<CacheLossView>) -> serde_json::Value {
    let view = view.unwrap_or(CacheLossView {
        expected_tokens: 0,
        reported_tokens: 0,
        kept_ratio: None,
        loss: false,
    });
    json!({
        "expected_tokens": view.expected_tokens,
        "reported_tokens": view.reported_tokens,
        "kept_ratio": view.kept_ratio,
        "loss": view.loss,
    })
}

fn error(status: u16, code: &str, message: &str) -> http::Response<Vec<u8>> {
    response(
        status,
        json!({"error": {"message": message, "type": "invalid_request_error", "code": code}})
            .to_string(),
    )
}

fn response(status: u16, body: String) -> http::Response<Vec<u8>> {
    with_type(status, body, "application/json")
}

fn with_type(status: u16, body: String, content_type: &'static str) -> http::Response<Vec<u8>> {
    let body = body.into_bytes();
    let mut res = http::Response::new(Vec::new());
    *res.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    let headers = res.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    // Without a length the reply would be close-delimited.
    headers.insert(
        http::header::CONTENT_LENGTH,
        http::HeaderValue::from(body.len()),
    );
    *res.body_mut() = body;
    res
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        let req = session.req_header();
        let path = req.uri.path().to_owned();
        if req.method == http::Method::POST && path == "/admin/reload" {
            if let Some(refusal) = self.refuse_unauthorized(session) {
                return refusal;
            }
            let reloader = Arc::clone(&self.reloader);
            // Reading and parsing the file is blocking work.
            let result = tokio::task::spawn_blocking(move || reloader.reload("admin API"))
                .await
                .unwrap_or_else(|e| Err(ReloadError::Task(e.to_string())));
            return match result {
                Ok(outcome) => response(200, outcome.to_json().to_string()),
                Err(e) => response(
                    422,
                    json!({"result": "error", "error": {"message": e.to_string(), "type": "invalid_request_error", "code": "invalid_config"}})
                        .to_string(),
                ),
            };
        }
        if req.method == http::Method::POST {
            let action = path
                .strip_prefix("/admin/replicas/")
                .and_then(|rest| rest.rsplit_once('/'));
            return match action {
                Some((id, verb @ ("drain" | "undrain"))) if !id.is_empty() => {
                    if let Some(refusal) = self.refuse_unauthorized(session) {
                        return refusal;
                    }
                    let now = req
                        .uri
                        .query()
                        .is_some_and(|q| q.split('&').any(|p| p == "now=true" || p == "now"));
                    self.set_drained(id, verb == "drain", now)
                }
                _ => error(404, "not_found", "not found"),
            };
        }
        if path != "/health" && self.router.snapshot().admin_reads_need_token() {
            if let Some(refusal) = self.refuse_unauthorized(session) {
                return refusal;
            }
        }
        match (req.method.as_str(), path.as_str()) {
            ("GET", "/health") => response(200, json!({"status": "ok"}).to_string()),
            ("GET", "/admin/replicas") => response(200, self.replicas().to_string()),
            ("GET", "/metrics") => with_type(200, self.metrics(), "text/plain; version=0.0.4"),
            _ => error(404, "not_found", "not found"),
        }
    }
}

/// The engine's latest reading as the admin API shows it (`null` when none is fresh).
fn engine_json<U>(
    replica: &tether_affinity::Replica<U>,
    now: u64,
    policy: &tether_health::HealthPolicy,
) -> serde_json::Value {
    match replica.status().engine(now, policy.engine_max_age) {
        None => serde_json::Value::Null,
        Some(e) => json!({
            "sequences": e.capacity.sequences,
            "kv_blocks": e.capacity.kv_blocks,
            "running": e.load.running,
            "waiting": e.load.waiting,
            "kv_usage": e.load.kv_usage,
        }),
    }
}
